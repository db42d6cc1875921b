//! What every control handler shares on one replica ([`ControlState`]: configuration,
//! Raft writes, the map plane's caches, limits, sessions) and the plane's one error type,
//! mapped once to an HTTP status. Its own file so that the handlers import it without
//! importing the router that calls them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use super::write_batch::UpdateBatcher;
use crate::config::Config;
use crate::mapper::shared_frames::{FrameCache, SharedDeltas};
use crate::mapper::{derp_map, PeerCache};
use crate::metrics::Metrics;
use crate::noise::ControlKey;
use crate::state::{Db, Replica, Tailnet};

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
    /// This replica's metrics registry.
    pub metrics: Arc<Metrics>,
    pub db: Db,
    /// This replica as the registry (and the DERP map) knows it.
    pub me: Replica,
    /// True while this replica is in contact with a quorum. When it turns false, map
    /// streams end and new requests are refused, so clients move to a healthy replica
    /// instead of following state that may be stale.
    pub serving: watch::Receiver<bool>,
    /// Open map streams per node id, so a node is marked offline only when its last stream ends.
    pub(super) sessions: Mutex<HashMap<u64, u32>>,
    /// Counts the streams opened and closed, so that `map::reconcile_online` can tell
    /// that nothing changed since it last looked.
    pub(super) sessions_changed: std::sync::atomic::AtomicU64,
    /// Endpoint/hostinfo updates and online state go through here, batched.
    pub updates: UpdateBatcher,
    /// Regions from `derp.extra_regions_file`, merged into every DERP map.
    pub extra_regions: std::collections::BTreeMap<String, serde_json::Value>,
    /// OIDC login, when `[oidc]` is configured.
    pub oidc: Option<Arc<super::oidc::Oidc>>,
    /// Every node as peers see it, rendered once per change for all map streams.
    pub peers: Arc<PeerCache>,
    /// Compressed runs of peers, shared by the map streams that send the same ones.
    pub frames: FrameCache,
    /// Delta messages many streams send alike, made once.
    pub deltas: SharedDeltas,
    /// Interactive logins per client address and overall, checked before they are proposed.
    pub logins: super::limits::LoginLimiter,
    /// Places for Noise sessions that have not identified themselves yet
    /// (`limits.max_unidentified_sessions`), and such sessions per client address.
    pub unidentified: Arc<tokio::sync::Semaphore>,
    pub unidentified_by_address: crate::listener::Slots,
}

impl ControlState {
    // Everything the control plane shares, each made once by `run_server`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        key: ControlKey,
        db: Db,
        me: Replica,
        serving: watch::Receiver<bool>,
        extra_regions: std::collections::BTreeMap<String, serde_json::Value>,
        oidc: Option<Arc<super::oidc::Oidc>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let updates = UpdateBatcher::spawn(db.clone());
        let peers = PeerCache::new(config.clone());
        db.store.observe(peers.clone());
        let frames = FrameCache::new(metrics.clone());
        Arc::new(Self {
            key,
            metrics,
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
            logins: super::limits::LoginLimiter::new(config.limits.max_pending_logins_per_address),
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
    pub fn count_refusal(&self, r: &super::limits::Refusal) {
        self.metrics.refused(r.limit);
        tracing::debug!(limit = ?r.limit, "{}", r.message);
    }

    /// Counts a refusal by one of the `limits` and turns it into the client's error.
    pub fn refuse(&self, r: super::limits::Refusal) -> ControlError {
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
