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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde::Deserialize;

use crate::config::Config;
use crate::mapper::shared_frames::{FrameCache, SharedDeltas};
use crate::mapper::{derp_map, PeerCache};
use crate::noise::ControlKey;
use crate::state::{Db, Replica, Tailnet};
use tokio::sync::watch;

pub use map::reconcile_online;

/// RFC 3339 text of a unix-millisecond time, as the CLI and `tailcfg` show times.
pub fn tailcfg_time(ms: i64) -> String {
    crate::tailcfg::rfc3339(ms)
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
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    TooMany(String),
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
            ControlError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ControlError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
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
    /// This replica as the registry (and the DERP map) knows it.
    pub me: Replica,
    /// True while this replica is in contact with a quorum. When it turns false, map
    /// streams end and new requests are refused, so clients move to a healthy replica
    /// instead of following state that may be stale.
    pub serving: watch::Receiver<bool>,
    /// Open map streams per node id, so a node is marked offline only when its last stream ends.
    sessions: Mutex<HashMap<u64, u32>>,
    /// Counts the streams opened and closed, so that `map::reconcile_online` can tell
    /// that nothing changed since it last looked.
    sessions_changed: std::sync::atomic::AtomicU64,
    /// Endpoint/hostinfo updates and online state go through here, batched.
    pub updates: write_batch::UpdateBatcher,
    /// Regions from `derp.extra_regions_file`, merged into every DERP map.
    pub extra_regions: std::collections::BTreeMap<String, serde_json::Value>,
    /// OIDC login, when `[oidc]` is configured.
    pub oidc: Option<Arc<oidc::Oidc>>,
    /// Every node as peers see it, rendered once per change for all map streams.
    pub peers: Arc<PeerCache>,
    /// Compressed runs of peers, shared by the map streams that send the same ones.
    pub frames: FrameCache,
    /// Delta messages many streams send alike, made once.
    pub deltas: SharedDeltas,
    /// Interactive logins per client address and overall, checked before they are proposed.
    pub logins: limits::LoginLimiter,
    /// Places for Noise sessions that have not identified themselves yet
    /// (`limits.max_unidentified_sessions`), and such sessions per client address.
    pub unidentified: Arc<tokio::sync::Semaphore>,
    pub unidentified_by_address: crate::listener::Slots,
}

impl ControlState {
    pub fn new(
        config: Arc<Config>,
        key: ControlKey,
        db: Db,
        me: Replica,
        serving: watch::Receiver<bool>,
        extra_regions: std::collections::BTreeMap<String, serde_json::Value>,
        oidc: Option<Arc<oidc::Oidc>>,
    ) -> Arc<Self> {
        let updates = write_batch::UpdateBatcher::spawn(db.clone());
        let peers = PeerCache::new(config.clone());
        db.store.observe(peers.clone());
        let frames = FrameCache::new(db.store.metrics().clone());
        Arc::new(Self {
            key,
            db,
            me,
            serving,
            sessions: Mutex::new(HashMap::new()),
            sessions_changed: std::sync::atomic::AtomicU64::new(0),
            updates,
            extra_regions,
            oidc,
            peers,
            frames,
            deltas: SharedDeltas::default(),
            logins: limits::LoginLimiter::new(config.limits.max_pending_logins_per_address),
            unidentified: Arc::new(tokio::sync::Semaphore::new(
                config.limits.max_unidentified_sessions,
            )),
            unidentified_by_address: crate::listener::Slots::default(),
            config,
        })
    }

    pub fn derp_map(&self, t: &Tailnet) -> serde_json::Value {
        derp_map(&self.config, &t.replicas, &self.me, &self.extra_regions)
    }

    /// Refuses work while this replica is cut off from the quorum.
    /// Counts a refusal by one of the `limits`. Not logged at info: a flood must not
    /// grow the log files either.
    pub fn count_refusal(&self, r: &limits::Refusal) {
        self.db.store.metrics().refused(r.limit);
        tracing::debug!(limit = ?r.limit, "{}", r.message);
    }

    /// Counts a refusal by one of the `limits` and turns it into the client's error.
    pub fn refuse(&self, r: limits::Refusal) -> ControlError {
        self.count_refusal(&r);
        match r.limit {
            crate::metrics::Limit::Body
            | crate::metrics::Limit::Hostinfo
            | crate::metrics::Limit::Endpoints => ControlError::TooLarge(r.message),
            _ => ControlError::TooMany(r.message),
        }
    }

    pub fn check_serving(&self) -> Result<(), ControlError> {
        if *self.serving.borrow() {
            Ok(())
        } else {
            Err(ControlError::Unavailable(
                "this replica has lost contact with the cluster's majority".into(),
            ))
        }
    }
}

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
