//! The control plane: the public HTTP listener's TS2021 endpoints and what runs over Noise.
//!
//! `router` serves `/key` and `/ts2021` on the control listener; each upgraded connection
//! runs its own HTTP/2 server (`noise_router`) with `/machine/register` and `/machine/map`.
//! Handlers read the replica's applied state and write through Raft via [`crate::state::Db`].

mod map;
mod mapper;
mod register;
pub mod tailcfg;
mod ts2021;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde::Deserialize;

use crate::config::Config;
use crate::noise::ControlKey;
use crate::state::Db;

pub use mapper::derp_map;

/// RFC 3339 text of a unix-millisecond time, as the CLI and `tailcfg` show times.
pub fn tailcfg_time(ms: i64) -> String {
    mapper::rfc3339(ms)
}

/// Errors of the control plane, each mapped once to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the cluster cannot take writes right now ({0}); retry shortly")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = match &self {
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ControlError::Forbidden(_) => StatusCode::FORBIDDEN,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, self.to_string()).into_response()
    }
}

impl From<crate::state::DbError> for ControlError {
    fn from(e: crate::state::DbError) -> Self {
        match e {
            crate::state::DbError::State(s) => ControlError::BadRequest(s.to_string()),
            other => ControlError::Unavailable(other.to_string()),
        }
    }
}

/// What every control handler shares on one replica.
pub struct ControlState {
    pub config: Arc<Config>,
    pub key: ControlKey,
    pub db: Db,
    pub derp_map: serde_json::Value,
    /// Open map streams per node id, so a node is marked offline only when its last stream ends.
    sessions: Mutex<HashMap<u64, u32>>,
}

impl ControlState {
    pub fn new(config: Arc<Config>, key: ControlKey, db: Db) -> Arc<Self> {
        let derp_map = derp_map(&config);
        Arc::new(Self {
            config,
            key,
            db,
            derp_map,
            sessions: Mutex::new(HashMap::new()),
        })
    }
}

/// Routes of the public control listener (DERP routes are merged in by the server).
pub fn router(state: Arc<ControlState>) -> Router {
    Router::new()
        .route("/key", get(key_handler))
        .route("/ts2021", any(ts2021::upgrade))
        .route("/derpmap/default", get(derp_map_handler))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
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
    Json(st.derp_map.clone())
}
