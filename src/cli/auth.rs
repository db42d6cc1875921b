//! `hydrascale auth`: let in a machine waiting on an interactive login, and decide a held
//! Tailscale SSH check.

use anyhow::{Context, Result};
use clap::Subcommand;

use super::client::{grpc_error, Target};
use super::output::emit;
use crate::admin::proto;

#[derive(Subcommand)]
pub(super) enum AuthCmd {
    /// Let a machine that ran `tailscale up` without a key in, as a node of USER. The id
    /// is the last part of the URL it printed (…/register/ID).
    Register {
        #[arg(long)]
        user: String,
        #[arg(long)]
        auth_id: String,
    },
    /// Turn away a machine waiting on an interactive login (it is shown a new login URL
    /// if it asks again).
    Reject {
        #[arg(long)]
        auth_id: String,
    },
    /// Let a Tailscale SSH connection held by a `check` rule go on (or refuse it with
    /// --reject). The id is the last part of the link the ssh user was shown
    /// (…/ssh/check/ID); the whole link works too.
    ApproveSsh {
        #[arg(long)]
        auth_id: String,
        #[arg(long)]
        reject: bool,
    },
}

pub(super) async fn run(cmd: AuthCmd, target: &Target, json: bool) -> Result<()> {
    let mut c = super::client::connect(target).await?;
    match cmd {
        AuthCmd::Register { user, auth_id } => {
            // Accept the whole URL too: it is what the user has in front of them.
            let auth_id = crate::state::PendingLogin::id_from(&auth_id).to_string();
            let r = c
                .complete_login(proto::CompleteLoginRequest { auth_id, user })
                .await
                .map_err(grpc_error)?
                .into_inner();
            let n = r.node.context("no node in reply")?;
            emit(json, &n, || {
                println!(
                    "Node {} ({}) registered, address {}",
                    n.id, n.given_name, n.ipv4
                );
            })?;
        }
        AuthCmd::Reject { auth_id } => {
            let auth_id = crate::state::PendingLogin::id_from(&auth_id).to_string();
            c.reject_login(proto::AuthIdRequest {
                auth_id: auth_id.clone(),
            })
            .await
            .map_err(grpc_error)?;
            emit(json, &serde_json::json!({ "rejected": auth_id }), || {
                println!("Login {auth_id} turned away");
            })?;
        }
        AuthCmd::ApproveSsh { auth_id, reject } => {
            let auth_id = auth_id
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(&auth_id)
                .to_string();
            c.decide_ssh_check(proto::DecideSshCheckRequest {
                auth_id: auth_id.clone(),
                approve: !reject,
            })
            .await
            .map_err(grpc_error)?;
            let verdict = if reject { "refused" } else { "approved" };
            emit(
                json,
                &serde_json::json!({ "auth_id": auth_id, "decision": verdict }),
                || {
                    println!("SSH check {auth_id} {verdict}");
                },
            )?;
        }
    }
    Ok(())
}
