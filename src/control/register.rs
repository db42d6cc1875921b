//! `/machine/register`: pre-auth key registration, interactive login, re-login, node key
//! rotation and logout.
//!
//! The machine key comes from the Noise handshake, never from the request body, so a client
//! can only act on the node bound to its own machine key.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use sha2::{Digest, Sha256};

use super::auth_id::{auth_id_of, new_auth_id};
use super::context::{ControlError, ControlState};
use super::keys::{is_zero_key, parse_node_key};
use super::limits::{self, MAX_REGISTER_BODY};
use super::noise_peer::NoisePeer;
use crate::state::{now_ms, Command, CommandOutput, DbError, Node, PendingLogin, RegisterAuth};
use crate::tailcfg::{Login, RegisterRequest, RegisterResponse, RegisterUser};

pub async fn handle(
    State(st): State<Arc<ControlState>>,
    Extension(peer): Extension<NoisePeer>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let res = match body {
        Ok(body) => register(&st, &peer, &body).await,
        Err(e) => Err(body_refused(&st, "/machine/register", MAX_REGISTER_BODY, e)),
    };
    st.metrics
        .registration(matches!(&res, Ok(r) if r.error.is_empty()));
    // The session said who it is: a node that is logged in, or a login under way (which
    // the login limits bound).
    if matches!(&res, Ok(r) if r.machine_authorized || !r.auth_url.is_empty()) {
        peer.identity.identified();
    }
    match res {
        Ok(resp) => Json(resp).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A body that could not be read: over `max`, or cut off.
pub(super) fn body_refused(
    st: &ControlState,
    route: &str,
    max: usize,
    e: BytesRejection,
) -> ControlError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        st.refuse(limits::body_too_large(route, max))
    } else {
        ControlError::BadRequest(format!("{route}: {e}"))
    }
}

/// A failure the user must act on: shown by `tailscale up` through `RegisterResponse.Error`.
fn user_error(message: impl Into<String>) -> RegisterResponse {
    RegisterResponse {
        error: message.into(),
        ..Default::default()
    }
}

/// `Expiry` in the past means logout; the zero time (year 1) means "no request".
pub(crate) fn requested_expiry_ms(expiry: &Option<String>) -> Option<i64> {
    let text = expiry.as_deref()?;
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    if t.year() <= 1 {
        return None;
    }
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

async fn register(
    st: &ControlState,
    peer: &NoisePeer,
    body: &[u8],
) -> Result<RegisterResponse, ControlError> {
    st.check_serving()?;
    let req: RegisterRequest = serde_json::from_slice(body).map_err(|e| {
        ControlError::BadRequest(format!("register request is not valid JSON: {e}"))
    })?;
    let node_key = parse_node_key(&req.node_key)?;
    let old_node_key = if is_zero_key(&req.old_node_key) {
        None
    } else {
        Some(parse_node_key(&req.old_node_key)?)
    };
    let now = now_ms();
    let hostinfo = match req.hostinfo.as_ref().map(limits::hostinfo_text) {
        None => "{}".to_string(),
        Some(Ok(text)) => text,
        Some(Err(r)) => {
            st.count_refusal(&r);
            return Ok(user_error(r.message));
        }
    };
    let hostname = req
        .hostinfo
        .as_ref()
        .and_then(|h| h.get("Hostname"))
        .and_then(|h| h.as_str())
        .unwrap_or("node")
        .to_string();
    let existing: Option<Node> = st
        .db
        .store
        .read()
        .node_by_machine_key(&peer.machine_key)
        .cloned();

    // Logout: the client asks for an expiry in the past.
    if let Some(exp) = requested_expiry_ms(&req.expiry) {
        if exp <= now {
            if let Some(node) = existing.filter(|n| n.node_key == node_key) {
                let cmd = if node.ephemeral {
                    Command::DeleteNode { id: node.id }
                } else {
                    Command::LogoutNode {
                        node_key: node_key.clone(),
                        now,
                    }
                };
                st.db.write(cmd).await?;
            }
            return Ok(RegisterResponse {
                node_key_expired: true,
                ..Default::default()
            });
        }
    }

    let auth_key = req
        .auth
        .as_ref()
        .map(|a| a.auth_key.trim())
        .filter(|k| !k.is_empty());
    let node = if let Some(key) = auth_key {
        let hash = hex::encode(Sha256::digest(key.as_bytes()));
        let expiry = st.config.node_expiry_ms().map(|d| now + d);
        let cmd = Command::RegisterNode {
            machine_key: peer.machine_key.clone(),
            node_key: node_key.clone(),
            old_node_key,
            hostname,
            hostinfo,
            auth: RegisterAuth::PreAuthKey { hash },
            expiry,
            ephemeral: req.ephemeral,
            prefixes: st.config.prefixes,
            now,
        };
        match st.db.write(cmd).await {
            Ok(CommandOutput::Node(n)) => n,
            Ok(_) => return Err(ControlError::Internal("register returned no node".into())),
            Err(DbError::State(e)) => {
                tracing::info!(machine = %peer.machine_key, error = %e, "registration refused");
                return Ok(user_error(e.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        let known = existing.filter(|n| {
            n.node_key == node_key || old_node_key.as_deref() == Some(n.node_key.as_str())
        });
        let Some(node) = known else {
            // A new machine, or a known one with a key it never registered (a new login,
            // `tailscale up --force-reauth`): an administrator approves it.
            return interactive_login(st, peer, &req, &node_key, hostname, hostinfo, now).await;
        };
        let rotation = node.node_key != node_key;
        if node.expiry.is_some_and(|e| e <= now) {
            if rotation {
                // The client already made a new key for its expired one: it needs a login.
                return interactive_login(st, peer, &req, &node_key, hostname, hostinfo, now).await;
            }
            return Ok(RegisterResponse {
                node_key_expired: true,
                ..Default::default()
            });
        }
        if rotation {
            let cmd = Command::RegisterNode {
                machine_key: peer.machine_key.clone(),
                node_key: node_key.clone(),
                old_node_key,
                hostname,
                hostinfo,
                auth: RegisterAuth::Existing,
                expiry: node.expiry,
                ephemeral: node.ephemeral,
                prefixes: st.config.prefixes,
                now,
            };
            match st.db.write(cmd).await {
                Ok(CommandOutput::Node(n)) => n,
                Ok(_) => return Err(ControlError::Internal("register returned no node".into())),
                Err(DbError::State(e)) => return Ok(user_error(e.to_string())),
                Err(e) => return Err(e.into()),
            }
        } else {
            node
        }
    };
    Ok(authorized(st, &node))
}

/// The answer that tells the client it is logged in as `node`'s owner.
fn authorized(st: &ControlState, node: &Node) -> RegisterResponse {
    let tailnet = st.db.store.read();
    let user = tailnet.users.get(&node.user_id);
    let (name, display, created) = user
        .map(|u| (u.name.clone(), u.display_name.clone(), u.created))
        .unwrap_or_else(|| {
            (
                "tagged-devices".into(),
                "Tagged devices".into(),
                node.created,
            )
        });
    let display = if display.is_empty() {
        name.clone()
    } else {
        display
    };
    RegisterResponse {
        user: RegisterUser {
            id: node.user_id,
            display_name: display.clone(),
            profile_pic_url: String::new(),
            created: crate::tailcfg::rfc3339(created),
        },
        login: Login {
            id: node.user_id,
            provider: String::new(),
            login_name: name,
            display_name: display,
            profile_pic_url: String::new(),
        },
        machine_authorized: true,
        ..Default::default()
    }
}

/// How long a follow-up request waits for the administrator before the client is told to
/// ask again (with the same URL, so it keeps showing it).
const FOLLOWUP_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Interactive login: a first request gets an `AuthURL` (the login is recorded in
/// replicated state, so an administrator can finish it on any replica); the client's
/// follow-up request waits here until it is finished.
async fn interactive_login(
    st: &ControlState,
    peer: &NoisePeer,
    req: &RegisterRequest,
    node_key: &str,
    hostname: String,
    hostinfo: String,
    now: i64,
) -> Result<RegisterResponse, ControlError> {
    let url_of = |id: &str| format!("{}/register/{id}", st.config.server_url());
    if let Some(auth_id) = auth_id_of(&req.followup) {
        let mut changes = st.db.store.subscribe();
        let deadline = tokio::time::Instant::now() + FOLLOWUP_WAIT;
        loop {
            {
                let t = st.db.store.read();
                if let Some(n) = t
                    .node_by_machine_key(&peer.machine_key)
                    .filter(|n| n.node_key == node_key)
                {
                    let n = n.clone();
                    drop(t);
                    return Ok(authorized(st, &n));
                }
                let waiting = t
                    .pending_logins
                    .get(auth_id)
                    .is_some_and(|p| p.machine_key == peer.machine_key);
                if !waiting {
                    break;
                }
                // Waiting on its own login, which the login limits let in.
                peer.identity.identified();
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(RegisterResponse {
                    auth_url: url_of(auth_id),
                    ..Default::default()
                });
            }
            // Woken by any applied change; the timer covers a login replaced or expired.
            tokio::select! {
                _ = changes.recv() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }
    // The same machine asking again with the same key (`tailscale up` run twice) gets
    // its waiting login back: nothing to write.
    {
        let t = st.db.store.read();
        let waiting = t.pending_logins.values().find(|p| {
            p.machine_key == peer.machine_key
                && p.node_key == node_key
                && p.ephemeral == req.ephemeral
                && p.created > now.saturating_sub(crate::state::LOGIN_TTL_MS)
        });
        if let Some(p) = waiting {
            return Ok(RegisterResponse {
                auth_url: url_of(&p.auth_id),
                ..Default::default()
            });
        }
    }
    let auth_id = new_auth_id();
    // Checked here, before anything is proposed: a refused login never reaches the log.
    let admitted = st.logins.admit(
        &st.db.store.read(),
        peer.addr.ip(),
        &peer.machine_key,
        &auth_id,
        now,
    );
    if let Err(r) = admitted {
        tracing::debug!(machine = %peer.machine_key, addr = %peer.addr, "interactive login refused");
        st.count_refusal(&r);
        return Ok(user_error(r.message));
    }
    let login = PendingLogin {
        auth_id: auth_id.clone(),
        machine_key: peer.machine_key.clone(),
        node_key: node_key.to_string(),
        hostname,
        hostinfo,
        ephemeral: req.ephemeral,
        created: now,
        prefixes: st.config.prefixes,
        key_lifetime: st.config.node_expiry_ms(),
    };
    match st.db.write(Command::StartLogin { login }).await {
        Ok(_) => st.logins.committed(&auth_id),
        Err(DbError::State(e)) => {
            st.logins.failed(&auth_id);
            return Ok(user_error(e.to_string()));
        }
        Err(e) => {
            st.logins.failed(&auth_id);
            return Err(e.into());
        }
    }
    tracing::info!(machine = %peer.machine_key, auth_id, "interactive login started");
    Ok(RegisterResponse {
        auth_url: url_of(&auth_id),
        ..Default::default()
    })
}
