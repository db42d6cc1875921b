//! Admin calls on the tailnet's DNS settings: read them, replace them (checked before
//! they are proposed, and again in `apply`).

use tonic::{Request, Response, Status};

use super::{proto, Admin};
use crate::state::{Command, DnsSettings};

fn reply(admin: &Admin) -> Result<Response<proto::DnsReply>, Status> {
    let live = admin.db.store.read().dns.clone();
    let replicated = live.is_some();
    let settings = live.unwrap_or_default();
    let settings_json = serde_json::to_string(&settings)
        .map_err(|e| Status::internal(format!("DNS settings do not encode: {e}")))?;
    Ok(Response::new(proto::DnsReply {
        settings_json,
        replicated,
    }))
}

pub(super) async fn get_dns(
    admin: &Admin,
    _req: Request<proto::Empty>,
) -> Result<Response<proto::DnsReply>, Status> {
    reply(admin)
}

pub(super) async fn set_dns(
    admin: &Admin,
    req: Request<proto::SetDnsRequest>,
) -> Result<Response<proto::DnsReply>, Status> {
    let settings: DnsSettings = serde_json::from_str(&req.into_inner().settings_json)
        .map_err(|e| {
            Status::invalid_argument(format!(
                "the DNS settings are not valid JSON with the fields of [dns] (magic_dns, nameservers, override_local_dns, split, search_domains, extra_records): {e}"
            ))
        })?;
    settings.check().map_err(|p| {
        Status::invalid_argument(format!(
            "the DNS settings were refused, the previous ones stay in force: {}: {}",
            p.field, p.message
        ))
    })?;
    admin
        .write(Command::SetDns {
            settings,
            seed: false,
        })
        .await?;
    reply(admin)
}
