//! Tailscale SSH `check` rules: the destination node holds the connection and asks the
//! control server, over its Noise session, what to do (`GET /machine/ssh/action/...`,
//! the rule's `holdAndDelegate` URL). The answer is to let it in while the source node
//! passed a check within the rule's `checkPeriod`; otherwise a message with a link at
//! which the connecting user re-authenticates (through the OIDC provider, or an
//! administrator approves with `hydrascale auth approve-ssh`), and a long poll that
//! returns once that is decided.
//!
//! Checks and approvals are replicated state (`Command::StartSshCheck`,
//! `Command::DecideSshCheck`), so the browser, the CLI and the held connection may each
//! reach a different replica.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::context::{ControlError, ControlState};
use super::noise_peer::NoisePeer;
use crate::config::Config;
use crate::mapper::delegate_url;
use crate::policy::{compile, SshAction};
use crate::state::{now_ms, Change, Command, SSH_CHECK_TTL_MS};

/// How long one poll is held before the node is told to ask again (it waits up to 30
/// minutes per hop; shorter hops let a replica restart without stranding it).
const POLL: Duration = Duration::from_secs(240);

/// Where the connecting user goes to re-authenticate for check `auth_id`.
pub fn check_page(config: &Config, auth_id: &str) -> String {
    format!("{}/ssh/check/{auth_id}", config.server_url())
}

#[derive(Deserialize)]
pub struct ActionQuery {
    #[serde(default)]
    ssh_user: String,
    #[serde(default)]
    local_user: String,
    auth_id: Option<String>,
}

/// `GET /machine/ssh/action/{src}/to/{dst}` over Noise.
pub async fn action(
    State(st): State<Arc<ControlState>>,
    Extension(peer): Extension<NoisePeer>,
    Path((src, dst)): Path<(u64, u64)>,
    Query(q): Query<ActionQuery>,
) -> Response {
    match decide(&st, &peer, src, dst, &q).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn reject(message: &str) -> Value {
    json!({ "reject": true, "message": format!("tailscale: {message}\n") })
}

/// What is known about one check at the moment of asking.
enum Verdict {
    Approved,
    Refused,
    Waiting,
    Unknown,
}

async fn decide(
    st: &ControlState,
    peer: &NoisePeer,
    src: u64,
    dst: u64,
    q: &ActionQuery,
) -> Result<Value, ControlError> {
    st.check_serving()?;
    // Subscribe before reading, so a decision between the two is not missed.
    let mut changes = st.db.store.subscribe();
    let now = now_ms();
    let passed = {
        let t = st.db.store.read();
        let dst_node = t
            .nodes
            .get(&dst)
            .ok_or_else(|| ControlError::NotFound(format!("node {dst} does not exist")))?;
        // Only the node holding the connection may ask about it.
        if dst_node.machine_key != peer.machine_key {
            return Err(ControlError::Unauthorized(
                "only the destination node may ask about an SSH connection to it".into(),
            ));
        }
        let Some(src_node) = t.nodes.get(&src) else {
            return Ok(reject("the connecting node is no longer in the tailnet"));
        };
        let rule = t
            .policy
            .as_ref()
            .and_then(|p| compile::ssh_action_for(p.policy(), &t, src_node, dst_node, &q.ssh_user));
        match rule {
            None => {
                return Ok(reject(&format!(
                    "tailnet policy does not permit you to SSH as user {:?}",
                    q.ssh_user
                )))
            }
            // The policy changed from check to accept while the connection was held.
            Some(SshAction::Accept) => return Ok(compile::accept_action()),
            // Passed a check within the rule's period (0: "always", never).
            Some(SshAction::Check { period_ms }) => t
                .ssh_approvals
                .get(&src)
                .and_then(|to| to.get(&dst))
                .is_some_and(|at| period_ms > 0 && at.saturating_add(period_ms as i64) > now),
        }
    };
    if passed {
        return Ok(compile::accept_action());
    }
    let verdict = |id: &str| {
        let t = st.db.store.read();
        match t.ssh_checks.get(id) {
            Some(c) if c.src != src || c.dst != dst => Verdict::Unknown,
            Some(c) if c.created <= now_ms().saturating_sub(SSH_CHECK_TTL_MS) => Verdict::Unknown,
            Some(c) => match c.decision {
                Some(true) => Verdict::Approved,
                Some(false) => Verdict::Refused,
                None => Verdict::Waiting,
            },
            None => Verdict::Unknown,
        }
    };
    let Some(auth_id) = q.auth_id.as_deref() else {
        return start(st, src, dst, q, now).await;
    };
    let deadline = tokio::time::Instant::now() + POLL;
    loop {
        match verdict(auth_id) {
            Verdict::Approved => return Ok(compile::accept_action()),
            Verdict::Refused => return Ok(reject("the SSH check was refused")),
            Verdict::Unknown => return start(st, src, dst, q, now_ms()).await,
            Verdict::Waiting => {}
        }
        let decided = tokio::time::timeout_at(deadline, async {
            loop {
                match changes.recv().await {
                    Ok((_, Change::SshCheckDecided(id))) if id == auth_id => return,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        })
        .await;
        if decided.is_err() {
            // Ask again on the same check.
            return Ok(json!({ "holdAndDelegate": follow_up(&st.config, auth_id) }));
        }
    }
}

fn follow_up(config: &Config, auth_id: &str) -> String {
    format!("{}&auth_id={auth_id}", delegate_url(config))
}

/// Records a new check and tells the connecting user where to pass it.
async fn start(
    st: &ControlState,
    src: u64,
    dst: u64,
    q: &ActionQuery,
    now: i64,
) -> Result<Value, ControlError> {
    let auth_id = super::auth_id::new_auth_id();
    st.db
        .write(Command::StartSshCheck {
            auth_id: auth_id.clone(),
            src,
            dst,
            ssh_user: q.ssh_user.clone(),
            now,
        })
        .await?;
    tracing::info!(
        src,
        dst,
        ssh_user = %q.ssh_user,
        local_user = %q.local_user,
        auth_id,
        "SSH connection held for a check"
    );
    let how = if st.oidc.is_some() {
        "log in"
    } else {
        "ask an administrator to approve it"
    };
    Ok(json!({
        "message": format!(
            "# Tailscale SSH requires an additional check.\n# To authenticate, visit: {}\n# ({how}; the connection goes on by itself once that is done)\n",
            check_page(&st.config, &auth_id)
        ),
        "holdAndDelegate": follow_up(&st.config, &auth_id),
    }))
}
