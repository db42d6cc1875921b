//! `StateStore` (the in-memory state, its change feed, and the Raft `Application`) and
//! `Db` (how the rest of the server proposes commands).

use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::sync::broadcast;

use super::error::StateError;
use super::tailnet::Tailnet;
use super::types::{Change, Command, CommandOutput};

/// Wall-clock milliseconds, read by callers when they build a command (never by `apply`).
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A change and when it was applied here (for the update fan-out latency metric).
pub type StampedChange = (std::time::Instant, Change);

/// A view derived from the state and kept in step with it: told of every applied change
/// while the state is still write-locked, so whoever takes the state's read lock and then
/// the view's sees the two agree.
pub trait Observer: Send + Sync {
    /// After a command is applied, before its changes are published.
    fn applied(&self, t: &Tailnet, changes: &[Change]);
    /// The whole state was replaced, or the observer has just been installed.
    fn reset(&self, t: &Tailnet);
}

#[derive(Clone)]
pub struct StateStore {
    tailnet: Arc<RwLock<Tailnet>>,
    changes: broadcast::Sender<StampedChange>,
    metrics: Arc<crate::metrics::Metrics>,
    observer: Arc<RwLock<Option<Arc<dyn Observer>>>>,
}

impl Default for StateStore {
    fn default() -> Self {
        Self::new()
    }
}

impl StateStore {
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(4096);
        Self {
            tailnet: Arc::new(RwLock::new(Tailnet::default())),
            changes,
            metrics: crate::metrics::Metrics::new(),
            observer: Arc::new(RwLock::new(None)),
        }
    }

    /// Installs the one derived view (the map plane's peer cache), built from the state as
    /// it is now and updated with every change from here on.
    pub fn observe(&self, observer: Arc<dyn Observer>) {
        let t = self.tailnet.write().unwrap_or_else(|p| p.into_inner());
        observer.reset(&t);
        *self.observer.write().unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    fn observer(&self) -> Option<Arc<dyn Observer>> {
        self.observer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// This replica's metrics: the store is the one thing every plane already holds.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The applied state. Hold the guard briefly: `apply` waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Tailnet> {
        self.tailnet.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StampedChange> {
        self.changes.subscribe()
    }

    fn publish(&self, changes: Vec<Change>) {
        let now = std::time::Instant::now();
        for c in changes {
            // No subscribers is fine: nobody is streaming maps.
            let _ = self.changes.send((now, c));
        }
    }
}

type Encoded = Result<CommandOutput, StateError>;

impl hydrascale_raft::Application for StateStore {
    fn apply(&self, _index: u64, command: &[u8]) -> Vec<u8> {
        let result: Encoded = match serde_json::from_slice::<Command>(command) {
            Ok(cmd) => {
                // Timed out here, around the pure `Tailnet::apply`: the duration only feeds
                // the metric, never the state.
                let started = std::time::Instant::now();
                let observer = self.observer();
                let (result, changes) = {
                    let mut t = self.tailnet.write().unwrap_or_else(|p| p.into_inner());
                    let (result, changes) = t.apply(&cmd);
                    if let Some(o) = &observer {
                        o.applied(&t, &changes);
                    }
                    (result, changes)
                };
                self.metrics.apply.observe(started.elapsed());
                self.metrics
                    .applied_entries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.publish(changes);
                result
            }
            // A command this version cannot decode changes nothing, identically everywhere.
            Err(e) => {
                tracing::error!(error = %e, "undecodable command in the log");
                Ok(CommandOutput::Done)
            }
        };
        serde_json::to_vec(&result).unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.read()).unwrap_or_default()
    }

    fn restore(&self, snapshot: &[u8]) {
        let restored: Tailnet = if snapshot.is_empty() {
            Tailnet::default()
        } else {
            match serde_json::from_slice(snapshot) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "snapshot does not decode; keeping current state");
                    return;
                }
            }
        };
        {
            let mut t = self.tailnet.write().unwrap_or_else(|p| p.into_inner());
            *t = restored;
            if let Some(o) = self.observer() {
                o.reset(&t);
            }
        }
        self.publish(vec![Change::Reset]);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("replication: {0}")]
    Raft(#[from] hydrascale_raft::RaftError),
    #[error("command encoding: {0}")]
    Codec(String),
    /// A batched write failed as a whole (the Raft error, as text, for every member).
    #[error("replication: {0}")]
    Replication(String),
}

/// Proposes commands through Raft and returns their outcome once applied here.
#[derive(Clone)]
pub struct Db {
    pub raft: hydrascale_raft::RaftNode,
    pub store: StateStore,
}

impl Db {
    pub async fn write(&self, cmd: Command) -> Result<CommandOutput, DbError> {
        let bytes = serde_json::to_vec(&cmd).map_err(|e| DbError::Codec(e.to_string()))?;
        let resp = self.raft.write(bytes).await?;
        let result: Encoded =
            serde_json::from_slice(&resp).map_err(|e| DbError::Codec(e.to_string()))?;
        Ok(result?)
    }
}
