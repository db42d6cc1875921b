//! The control plane: the public HTTP listener's TS2021 endpoints and what runs over Noise.
//!
//! `router` serves `/key` and `/ts2021` on the control listener; each upgraded connection
//! runs its own HTTP/2 server (`noise_router`) with `/machine/register` and `/machine/map`.
//! Handlers read the replica's applied state and write through Raft via [`crate::state::Db`].
//!
//! This is the HTTP/TS2021 edge only: request checks, limits, sessions, logins (OIDC,
//! login pages, SSH checks) and the Raft write batcher (`write_batch`). What a map
//! stream sends is rendered by [`crate::mapper`]; the wire types are [`crate::tailcfg`].

pub(crate) mod auth_id;
mod context;
pub(crate) mod keys;
pub mod limits;
mod login_page;
pub(crate) mod map;
mod noise_peer;
pub mod oidc;
pub(crate) mod register;
mod ssh_check;
mod ts2021;
pub mod write_batch;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde::Deserialize;

pub use context::{ControlError, ControlState};
pub use map::reconcile_online;

/// Routes of the public control listener (DERP routes are merged in by the server).
pub fn router(state: Arc<ControlState>) -> Router {
    plain_router(state.clone()).merge(web_router(state))
}

/// What a plain-HTTP connection may still reach when `[tls]` is on: TS2021 (Noise brings
/// its own encryption and authentication), the server's public key, the DERP map and the
/// probes, none of which carries a secret. Web pages and their forms (API keys, OIDC
/// codes) and the REST API are served over TLS only.
pub fn plain_router(state: Arc<ControlState>) -> Router {
    Router::new()
        .route("/key", get(key_handler))
        .route("/ts2021", any(ts2021::upgrade))
        .route("/derpmap/default", get(derp_map_handler))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready_handler))
        .with_state(state)
}

fn web_router(state: Arc<ControlState>) -> Router {
    Router::new()
        .route(
            "/register/{auth_id}",
            get(login_page::show).post(login_page::approve),
        )
        .route("/oidc/callback", get(login_page::oidc_callback))
        .route(
            "/oidc/confirm",
            axum::routing::post(login_page::oidc_confirm),
        )
        .route(
            "/ssh/check/{auth_id}",
            get(login_page::show_ssh_check).post(login_page::decide_ssh_check),
        )
        .layer(axum::middleware::map_response(no_framing))
        .with_state(state)
}

/// No page of this listener may be shown inside another site's frame (clickjacking a
/// login confirmation or an administrator's form): `X-Frame-Options` for old browsers,
/// CSP `frame-ancestors` for the others. Pages that set a fuller policy keep it.
async fn no_framing(mut r: Response) -> Response {
    use axum::http::{header, HeaderValue};
    let h = r.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'"),
        );
    }
    r
}

#[derive(Deserialize)]
struct KeyQuery {
    v: Option<u32>,
}

async fn key_handler(State(st): State<Arc<ControlState>>, Query(q): Query<KeyQuery>) -> Response {
    // Clients older than Noise (capver < 28) cannot talk to this server at all.
    if let Some(v) = q.v {
        if v < 28 {
            return (
                StatusCode::BAD_REQUEST,
                "client too old: upgrade Tailscale to a version that speaks TS2021",
            )
                .into_response();
        }
    }
    Json(serde_json::json!({
        "legacyPublicKey": format!("mkey:{}", "0".repeat(64)),
        "publicKey": st.key.public_text(),
    }))
    .into_response()
}

async fn derp_map_handler(State(st): State<Arc<ControlState>>) -> Json<serde_json::Value> {
    Json(st.derp_map(&st.db.store.read()))
}

/// 200 while this replica may serve clients (in contact with a quorum and caught up with
/// the leader), 503 otherwise: what a load balancer's health check asks.
async fn ready_handler(State(st): State<Arc<ControlState>>) -> Response {
    match crate::cluster::readiness(&st.db, &st.serving) {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}
