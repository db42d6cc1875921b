//! `hydrascale users`: create, list, rename, delete, and bind users to OIDC identities.

use anyhow::{Context, Result};
use clap::Subcommand;

use super::client::{grpc_error, Target};
use super::output::emit;
use super::output::fmt_ms;
use crate::admin::proto;

#[derive(Subcommand)]
pub(super) enum UsersCmd {
    Create {
        name: String,
        #[arg(long, default_value = "")]
        display_name: String,
        #[arg(long, default_value = "")]
        email: String,
        /// A URL of the user's picture (https://...).
        #[arg(long, default_value = "")]
        picture_url: String,
    },
    List,
    Rename {
        old: String,
        new: String,
    },
    Delete {
        name: String,
    },
    /// Bind user NAME to an OIDC identity: an OIDC login as exactly this issuer and
    /// subject (the `sub` claim; shown on the page of a refused login) then reaches it.
    /// A first OIDC login never joins an existing user by itself.
    Link {
        #[arg(long)]
        name: String,
        /// The provider's issuer URL, as in oidc.issuer.
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        subject: String,
    },
    /// Remove user NAME's OIDC identity: no OIDC login reaches it any more.
    Unlink {
        #[arg(long)]
        name: String,
    },
}

pub(super) async fn run(cmd: UsersCmd, target: &Target, json: bool) -> Result<()> {
    let mut c = super::client::connect(target).await?;
    match cmd {
        UsersCmd::Create {
            name,
            display_name,
            email,
            picture_url,
        } => {
            let r = c
                .create_user(proto::CreateUserRequest {
                    name,
                    display_name,
                    email,
                    picture_url,
                })
                .await
                .map_err(grpc_error)?
                .into_inner();
            let u = r.user.context("no user in reply")?;
            emit(json, &u, || {
                println!("User {} created (id {})", u.name, u.id);
            })?;
        }
        UsersCmd::List => {
            let r = c
                .list_users(proto::Empty {})
                .await
                .map_err(grpc_error)?
                .into_inner();
            emit(json, &r.users, || {
                println!(
                    "{:<6} {:<24} {:<24} {:<20} {:<10} OIDC SUBJECT",
                    "ID", "NAME", "DISPLAY NAME", "CREATED", "ORIGIN"
                );
                for u in &r.users {
                    println!(
                        "{:<6} {:<24} {:<24} {:<20} {:<10} {}",
                        u.id,
                        u.name,
                        u.display_name,
                        fmt_ms(Some(u.created_ms)),
                        u.origin,
                        u.oidc_subject
                    );
                }
            })?;
        }
        UsersCmd::Rename { old, new } => {
            let r = c
                .rename_user(proto::RenameUserRequest {
                    old_name: old,
                    new_name: new,
                })
                .await
                .map_err(grpc_error)?
                .into_inner();
            let u = r.user.context("no user in reply")?;
            emit(json, &u, || {
                println!("User renamed to {}", u.name);
            })?;
        }
        UsersCmd::Link {
            name,
            issuer,
            subject,
        } => {
            if issuer.trim().is_empty() || subject.trim().is_empty() {
                anyhow::bail!("--issuer and --subject must not be empty (to unbind a user, use `hydrascale users unlink`)");
            }
            let r = c
                .link_user(proto::LinkUserRequest {
                    name,
                    issuer,
                    subject,
                })
                .await
                .map_err(grpc_error)?
                .into_inner();
            let u = r.user.context("no user in reply")?;
            emit(json, &u, || {
                println!(
                    "User {} is now the OIDC identity {} of {}",
                    u.name, u.oidc_subject, u.oidc_issuer
                );
            })?;
        }
        UsersCmd::Unlink { name } => {
            let r = c
                .link_user(proto::LinkUserRequest {
                    name,
                    issuer: String::new(),
                    subject: String::new(),
                })
                .await
                .map_err(grpc_error)?
                .into_inner();
            let u = r.user.context("no user in reply")?;
            emit(json, &u, || {
                println!("User {} has no OIDC identity now", u.name);
            })?;
        }
        UsersCmd::Delete { name } => {
            c.delete_user(proto::DeleteUserRequest { name: name.clone() })
                .await
                .map_err(grpc_error)?;
            emit(json, &serde_json::json!({ "deleted": name }), || {
                println!("User {name} deleted");
            })?;
        }
    }
    Ok(())
}
