//! Admin calls on the tailnet policy: read it, replace it (checked before it is proposed).

use tonic::{Request, Response, Status};

use super::convert::policy_msg;
use super::{proto, Admin};
use crate::state::{now_ms, Command};

pub(super) async fn get_policy(
    admin: &Admin,
    _req: Request<proto::Empty>,
) -> Result<Response<proto::PolicyReply>, Status> {
    Ok(Response::new(policy_msg(&admin.db.store.read())))
}

pub(super) async fn set_policy(
    admin: &Admin,
    req: Request<proto::SetPolicyRequest>,
) -> Result<Response<proto::PolicyReply>, Status> {
    let text = req.into_inner().policy;
    // Checked here first so a bad policy costs no log entry; `apply` checks it again.
    if !text.trim().is_empty() {
        crate::policy::parse(&text).map_err(|e| {
            Status::invalid_argument(format!(
                "the policy was refused, the previous one stays in force: {e}"
            ))
        })?;
    }
    admin
        .write(Command::SetPolicy {
            text,
            now: now_ms(),
        })
        .await?;
    Ok(Response::new(policy_msg(&admin.db.store.read())))
}
