//! Admin calls on users: create, list, rename, delete, bind to an OIDC identity.

use tonic::{Request, Response, Status};

use super::convert::user_msg;
use super::{proto, Admin};
use crate::state::{now_ms, Command, CommandOutput, Profile};

pub(super) async fn create_user(
    admin: &Admin,
    req: Request<proto::CreateUserRequest>,
) -> Result<Response<proto::UserReply>, Status> {
    let r = req.into_inner();
    let profile = Profile {
        email: r.email,
        picture_url: r.picture_url,
    };
    let mut cmd = Command::CreateUser {
        name: r.name,
        display_name: r.display_name,
        now: now_ms(),
        by_admin: true,
        profile: profile.clone(),
    };
    // During a rolling upgrade, replicas of an earlier version would drop the profile or
    // the origin and their state would part from the others': propose the user as those
    // versions do. Without the origin no OIDC login ever binds to it by name.
    if !profile.is_empty() && admin.db.check_level(&cmd).is_err() {
        return Err(Status::failed_precondition(
            "a user's e-mail or picture needs every replica upgraded to this version; create the user without them now and set them later",
        ));
    }
    if admin.db.check_level(&cmd).is_err() {
        if let Command::CreateUser { by_admin, .. } = &mut cmd {
            *by_admin = false;
        }
    }
    match admin.write(cmd).await? {
        CommandOutput::User(u) => Ok(Response::new(proto::UserReply {
            user: Some(user_msg(&u)),
        })),
        _ => Err(Status::internal("command returned no user")),
    }
}

pub(super) async fn list_users(
    admin: &Admin,
    _req: Request<proto::Empty>,
) -> Result<Response<proto::ListUsersReply>, Status> {
    let t = admin.db.store.read();
    Ok(Response::new(proto::ListUsersReply {
        users: t.users.values().map(user_msg).collect(),
    }))
}

pub(super) async fn rename_user(
    admin: &Admin,
    req: Request<proto::RenameUserRequest>,
) -> Result<Response<proto::UserReply>, Status> {
    let r = req.into_inner();
    match admin
        .write(Command::RenameUser {
            old_name: r.old_name,
            new_name: r.new_name,
        })
        .await?
    {
        CommandOutput::User(u) => Ok(Response::new(proto::UserReply {
            user: Some(user_msg(&u)),
        })),
        _ => Err(Status::internal("command returned no user")),
    }
}

pub(super) async fn delete_user(
    admin: &Admin,
    req: Request<proto::DeleteUserRequest>,
) -> Result<Response<proto::Empty>, Status> {
    admin
        .write(Command::DeleteUser {
            name: req.into_inner().name,
        })
        .await?;
    Ok(Response::new(proto::Empty {}))
}

pub(super) async fn link_user(
    admin: &Admin,
    req: Request<proto::LinkUserRequest>,
) -> Result<Response<proto::UserReply>, Status> {
    let r = req.into_inner();
    let identity = match (r.issuer.trim(), r.subject.trim()) {
        ("", "") => None,
        (issuer, subject) => Some(crate::state::OidcIdentity {
            issuer: issuer.trim_end_matches('/').to_string(),
            subject: subject.to_string(),
        }),
    };
    match admin
        .write(Command::LinkUser {
            name: r.name,
            identity,
        })
        .await?
    {
        CommandOutput::User(u) => Ok(Response::new(proto::UserReply {
            user: Some(user_msg(&u)),
        })),
        _ => Err(Status::internal("command returned no user")),
    }
}
