//! Admin calls on nodes: list, delete, expire, rename, tag, approve routes; and the two
//! decisions an administrator makes for a waiting client: letting a machine in after an
//! interactive login, and allowing or refusing a held Tailscale SSH connection.

use tonic::{Request, Response, Status};

use super::convert::node_msg;
use super::{proto, status, Admin};
use crate::state::{now_ms, Command, DbError, StateError};

pub(super) async fn list_nodes(
    admin: &Admin,
    req: Request<proto::ListNodesRequest>,
) -> Result<Response<proto::ListNodesReply>, Status> {
    let user = req.into_inner().user;
    let t = admin.db.store.read();
    let uid = if user.is_empty() {
        None
    } else {
        Some(
            t.user_by_name(&user)
                .map(|u| u.id)
                .ok_or_else(|| status(DbError::State(StateError::UserNotFound(user.clone()))))?,
        )
    };
    Ok(Response::new(proto::ListNodesReply {
        nodes: t
            .nodes
            .values()
            .filter(|n| uid.is_none_or(|u| n.user_id == u))
            .map(|n| node_msg(&t, n))
            .collect(),
    }))
}

pub(super) async fn delete_node(
    admin: &Admin,
    req: Request<proto::NodeIdRequest>,
) -> Result<Response<proto::Empty>, Status> {
    admin
        .write(Command::DeleteNode {
            id: req.into_inner().id,
        })
        .await?;
    Ok(Response::new(proto::Empty {}))
}

pub(super) async fn expire_node(
    admin: &Admin,
    req: Request<proto::NodeIdRequest>,
) -> Result<Response<proto::NodeReply>, Status> {
    let out = admin
        .write(Command::ExpireNode {
            id: req.into_inner().id,
            now: now_ms(),
        })
        .await?;
    admin.node_reply(out)
}

pub(super) async fn set_node_expiry(
    admin: &Admin,
    req: Request<proto::SetNodeExpiryRequest>,
) -> Result<Response<proto::NodeReply>, Status> {
    let r = req.into_inner();
    let expiry = match (r.disable, r.expiry_ms) {
        (true, Some(_)) => {
            return Err(Status::invalid_argument(
                "give either an expiry time or disable expiry, not both",
            ))
        }
        (true, None) => None,
        (false, Some(at)) => Some(at),
        (false, None) => Some(now_ms()),
    };
    let out = admin
        .write(Command::SetNodeExpiry { id: r.id, expiry })
        .await?;
    admin.node_reply(out)
}

pub(super) async fn rename_node(
    admin: &Admin,
    req: Request<proto::RenameNodeRequest>,
) -> Result<Response<proto::NodeReply>, Status> {
    let r = req.into_inner();
    let out = admin
        .write(Command::RenameNode {
            id: r.id,
            new_name: r.new_name,
        })
        .await?;
    admin.node_reply(out)
}

pub(super) async fn set_tags(
    admin: &Admin,
    req: Request<proto::SetTagsRequest>,
) -> Result<Response<proto::NodeReply>, Status> {
    let r = req.into_inner();
    let out = admin
        .write(Command::SetTags {
            id: r.id,
            tags: r.tags,
        })
        .await?;
    admin.node_reply(out)
}

pub(super) async fn approve_routes(
    admin: &Admin,
    req: Request<proto::ApproveRoutesRequest>,
) -> Result<Response<proto::NodeReply>, Status> {
    let r = req.into_inner();
    let out = admin
        .write(Command::ApproveRoutes {
            id: r.id,
            routes: r.routes,
        })
        .await?;
    admin.node_reply(out)
}

pub(super) async fn complete_login(
    admin: &Admin,
    req: Request<proto::CompleteLoginRequest>,
) -> Result<Response<proto::NodeReply>, Status> {
    let r = req.into_inner();
    let out = admin
        .write(Command::CompleteLogin {
            auth_id: r.auth_id,
            user: r.user,
            now: now_ms(),
        })
        .await?;
    admin.node_reply(out)
}

pub(super) async fn reject_login(
    admin: &Admin,
    req: Request<proto::AuthIdRequest>,
) -> Result<Response<proto::Empty>, Status> {
    let auth_id = crate::state::PendingLogin::id_from(&req.into_inner().auth_id).to_string();
    admin.write(Command::RejectLogin { auth_id }).await?;
    Ok(Response::new(proto::Empty {}))
}

pub(super) async fn decide_ssh_check(
    admin: &Admin,
    req: Request<proto::DecideSshCheckRequest>,
) -> Result<Response<proto::Empty>, Status> {
    let r = req.into_inner();
    admin
        .write(Command::DecideSshCheck {
            auth_id: r.auth_id,
            approve: r.approve,
            by: "administrator".into(),
            now: now_ms(),
        })
        .await?;
    Ok(Response::new(proto::Empty {}))
}
