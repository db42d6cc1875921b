//! `hydrascale-raft`: replication for Hydrascale.
//!
//! openraft with its log, vote and snapshots in RocksDB and its traffic over gRPC. The
//! application (the tailnet state machine) is behind the [`Application`] trait and sees
//! commands as opaque bytes: this crate knows nothing of Tailscale.

// openraft's storage traits fix the error type to `StorageError`, which is large; boxing it
// here would only mean unboxing it again at every trait boundary.
#![allow(clippy::result_large_err)]

mod error;
#[doc(hidden)]
pub mod fuzzing;
mod handover;
mod network;
mod prevote;
mod store;
pub mod tls;
mod view;

use std::collections::{BTreeMap, BTreeSet};
// `declare_raft_types!` names `Cursor` unqualified for the snapshot type.
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::ClientWriteError;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use error::RaftError;
pub use store::recover::{recover_committed, Recovered};
pub use tls::RaftTls;
pub use view::{LeaderView, MemberProgress};

openraft::declare_raft_types!(
    /// openraft types of Hydrascale: commands and responses are opaque bytes.
    pub TypeConfig:
        D = Vec<u8>,
        R = Vec<u8>,
);

/// The replicated application. `apply` must be deterministic: same commands, same state.
pub trait Application: Send + Sync + 'static {
    /// Applies one committed command at log index `index`; returns an opaque response.
    /// `Err` means this replica cannot apply it at all (it cannot read it: a command of a
    /// newer version): Raft then stops on this replica, the entry not applied, rather than
    /// let the replica's state part from the others' while its log moves on.
    fn apply(&self, index: u64, command: &[u8]) -> Result<Vec<u8>, String>;
    /// The full application state, for a snapshot.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the full state with one produced by `snapshot`. `Err` (it cannot read it)
    /// stops Raft on this replica, as for `apply`.
    fn restore(&self, snapshot: &[u8]) -> Result<(), String>;
    /// Whether a command another replica asks this one, as leader, to propose can be
    /// applied here: one that cannot is refused before it reaches the log.
    fn check(&self, _command: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub node_id: u64,
    /// RocksDB lives here.
    pub data_dir: PathBuf,
    /// gRPC listener for Raft traffic (port 0 picks one).
    pub listen_addr: SocketAddr,
    /// What peers dial; defaults to the bound listen address.
    pub advertise_addr: Option<String>,
    /// openraft's election timer is drawn from this range; its upper end is also the
    /// leader lease (voters refuse other candidates for that long after an append) and the
    /// silence after which pre-vote (`prevote`) lets a follower campaign.
    pub election_timeout_ms: (u64, u64),
    /// openraft sends heartbeats on a tick of 1.5 times this.
    pub heartbeat_ms: u64,
    /// Build a snapshot every this many applied entries.
    pub snapshot_every: u64,
    /// How long a write may wait for a quorum before it fails.
    pub write_timeout: Duration,
    /// Mutual TLS for all Raft traffic; `None` is plaintext (a single replica on loopback).
    pub tls: Option<RaftTls>,
    /// Refuse appends in compact form, as a replica of a version before them did: for
    /// tests of mixed-version clusters. Leave it `false`.
    pub json_appends_only: bool,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            data_dir: PathBuf::from("raft"),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_addr: None,
            // Hydrascale's defaults (`cluster.election_timeout`, `heartbeat_interval`):
            // failover in about a second; see docs/performance.md, "Cluster failover".
            election_timeout_ms: (200, 400),
            heartbeat_ms: 100,
            snapshot_every: 10_000,
            write_timeout: Duration::from_secs(10),
            tls: None,
            json_appends_only: false,
        }
    }
}

/// A snapshot of Raft's view of the cluster from this node.
#[derive(Debug, Clone, PartialEq)]
pub struct RaftStatus {
    pub id: u64,
    pub state: String,
    pub term: u64,
    /// The leader: this replica, or the one it follows and heard from within a leader
    /// lease. A follower cut off for longer names none, though it does not campaign
    /// (`prevote`) and Raft still records that leader.
    pub current_leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot_index: Option<u64>,
    /// (id, address, voter?)
    pub membership: Vec<(u64, String, bool)>,
}

struct Inner {
    id: u64,
    addr: SocketAddr,
    advertise: String,
    raft: openraft::Raft<TypeConfig>,
    applied: watch::Receiver<u64>,
    write_timeout: Duration,
    stale_leader_after: Duration,
    /// openraft's leader lease: voters refuse to vote for this long after a leader's
    /// last append (its `election_timeout_max`).
    leader_lease: Duration,
    gate: handover::WriteGate,
    server_stop: Mutex<Option<oneshot::Sender<()>>>,
    server_task: Mutex<Option<JoinHandle<()>>>,
    // openraft's storage tasks wind down after `shutdown` returns; RocksDB's lock is only
    // released once the last of them drops its handle, so `shutdown` waits for that.
    db_closed: Mutex<Option<watch::Receiver<()>>>,
    contacts: network::Contacts,
    forwarder: network::client::WriteForwarder,
    /// Decides when openraft may campaign (`prevote`).
    prevote_task: Mutex<Option<JoinHandle<()>>>,
}

/// A running Raft node. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    inner: Arc<Inner>,
}

impl RaftNode {
    /// Opens RocksDB, restores the application from the latest snapshot, starts openraft
    /// (which re-applies committed entries after the snapshot) and the gRPC listener.
    pub async fn start(
        config: RaftConfig,
        app: Arc<dyn Application>,
    ) -> Result<RaftNode, RaftError> {
        let (db, db_closed) = store::open(&config.data_dir)?;
        let (applied_tx, applied_rx) = watch::channel(0u64);
        let sm = store::state_machine::StateMachineStore::open(
            db.clone(),
            app.clone(),
            Arc::new(applied_tx),
        )
        .map_err(error::storage)?;
        let log = store::log::LogStore::new(db);
        let contacts = network::Contacts::default();
        // openraft's own: voters refuse to vote for this long after a leader's last append.
        let leader_lease = Duration::from_millis(config.election_timeout_ms.1);
        let raft_config = openraft::Config {
            cluster_name: "hydrascale".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_ms.0,
            election_timeout_max: config.election_timeout_ms.1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: 1000,
            // Until the pre-vote gate (`prevote`) has asked the others.
            enable_elect: false,
            ..Default::default()
        }
        .validate()
        .map_err(|e| RaftError::Raft(format!("invalid raft settings: {e}")))?;
        let listener = tokio::net::TcpListener::bind(config.listen_addr)
            .await
            .map_err(|e| RaftError::Bind {
                addr: config.listen_addr.to_string(),
                message: e.to_string(),
            })?;
        let addr = listener.local_addr().map_err(|e| RaftError::Bind {
            addr: config.listen_addr.to_string(),
            message: e.to_string(),
        })?;
        let tls = config.tls.clone().map(Arc::new);
        let raft = openraft::Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network::client::NetworkFactory {
                contacts: contacts.clone(),
                tls: tls.clone(),
            },
            log,
            sm,
        )
        .await
        .map_err(|e| RaftError::Raft(e.to_string()))?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let gate = handover::WriteGate::default();
        let svc = network::proto::raft_service_server::RaftServiceServer::new(
            network::server::RaftGrpc {
                raft: raft.clone(),
                contacts: contacts.clone(),
                gate: gate.clone(),
                leader_lease,
                json_appends_only: config.json_appends_only,
                app,
                authenticate: tls.is_some(),
            },
        )
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(256 * 1024 * 1024);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            builder = builder
                .tls_config(tls.server_config())
                .map_err(|e| RaftError::Tls(e.to_string()))?;
        }
        // Without TCP_NODELAY on accepted connections, Nagle held the second small write
        // of a reply (an append's answer) until the leader's delayed ACK, up to 40 ms:
        // one write in sixteen took 45 ms (raft/benches/commit.rs). Outgoing channels set
        // it too (network::client).
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |conn| {
                if let Ok(c) = &conn {
                    let _ = c.set_nodelay(true);
                }
                conn
            },
        );
        let server = builder
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        let task = tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "raft gRPC server stopped");
            }
        });
        let node = RaftNode {
            inner: Arc::new(Inner {
                id: config.node_id,
                addr,
                advertise: config.advertise_addr.unwrap_or_else(|| addr.to_string()),
                raft,
                applied: applied_rx,
                write_timeout: config.write_timeout,
                stale_leader_after: leader_lease,
                leader_lease,
                gate,
                server_stop: Mutex::new(Some(stop_tx)),
                server_task: Mutex::new(Some(task)),
                db_closed: Mutex::new(Some(db_closed)),
                contacts,
                forwarder: network::client::WriteForwarder::new(tls),
                prevote_task: Mutex::new(None),
            }),
        };
        // Asks twice a heartbeat, and gives each voter at most two heartbeats (a third of
        // a lease) to answer, so a majority is found well before openraft's election timer
        // (a lease plus an election timeout after the last append) would campaign.
        let heartbeat = Duration::from_millis(config.heartbeat_ms.max(2));
        let ask_within = (2 * heartbeat).min(node.inner.leader_lease / 3);
        let task = tokio::spawn(prevote::gate(
            Arc::downgrade(&node.inner),
            heartbeat / 2,
            ask_within,
        ));
        *node
            .inner
            .prevote_task
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(node)
    }

    /// Makes this node a single-voter cluster if it has never been initialized, then waits
    /// until a leader is known. Idempotent.
    pub async fn initialize_single(&self) -> Result<(), RaftError> {
        let me = BTreeMap::from([(self.inner.id, self.inner.advertise.clone())]);
        self.initialize(me).await?;
        self.wait_for_leader(Duration::from_secs(30)).await
    }

    /// Starts a new cluster with these voters (id -> Raft address) unless this node already
    /// belongs to one. Does not wait for an election: the other voters may not be up yet.
    pub async fn initialize(&self, voters: BTreeMap<u64, String>) -> Result<(), RaftError> {
        let r = &self.inner.raft;
        let initialized = r
            .is_initialized()
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        if !initialized {
            let members: BTreeMap<u64, BasicNode> = voters
                .into_iter()
                .map(|(id, addr)| (id, BasicNode::new(addr)))
                .collect();
            r.initialize(members)
                .await
                .map_err(|e| RaftError::Raft(e.to_string()))?;
        }
        Ok(())
    }

    /// Waits until this node knows a leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<(), RaftError> {
        self.inner
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map(|_| ())
            .map_err(|e| RaftError::NoQuorum(format!("no leader elected: {e}")))
    }

    /// Proposes a command and returns the application's response once it is committed and
    /// applied on this node. Followers forward to the leader.
    pub async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, RaftError> {
        match self.write_once(command.clone()).await {
            // The leader refused it without appending it (it had just handed leadership
            // over) and named its successor: safe to send again once this replica follows
            // that one too.
            Err(RaftError::NotLeader {
                leader: Some(named),
            }) => {
                let mut metrics = self.inner.raft.metrics();
                let _ = tokio::time::timeout(
                    self.inner.leader_lease,
                    metrics.wait_for(|m| m.current_leader == Some(named)),
                )
                .await;
                self.write_once(command).await
            }
            res => res,
        }
    }

    async fn write_once(&self, command: Vec<u8>) -> Result<Vec<u8>, RaftError> {
        let timeout = self.inner.write_timeout;
        let local = async {
            let _open = self.inner.gate.enter().await;
            // A follower that has not heard from any leader for this long is cut off: refuse
            // now, definitively, rather than forward a write that may be delivered once the
            // network heals ("may or may not have been applied"). Twice the leader lease,
            // so a leadership handover (heartbeats paused for one lease) never trips it.
            if !self.is_leader() {
                if let Some(age) = self.inner.contacts.last_from_leader().map(|t| t.elapsed()) {
                    if age > 2 * self.inner.leader_lease {
                        return Err(RaftError::NoQuorum(format!(
                            "this replica has not heard from a leader for {age:.1?}, so it is probably cut off from the majority"
                        )));
                    }
                }
            }
            // A leader that has not heard from a majority for an election timeout is
            // probably cut off; refuse now rather than append an entry whose fate is
            // unknown.
            if self.is_leader() {
                let stale = self.inner.stale_leader_after;
                let mut age = self.quorum_contact_age();
                // A leader elected a moment ago has not had its first appends answered
                // (what it has are answers from an earlier term, or none); give them a
                // moment.
                let deadline = std::time::Instant::now() + Duration::from_secs(1);
                while age.is_none_or(|a| a > stale) && std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    age = self.quorum_contact_age();
                }
                match age {
                    Some(age) if age <= stale => {}
                    age => {
                        return Err(RaftError::NoQuorum(format!(
                            "this replica is the leader but has not heard from a majority of replicas for {}",
                            age.map_or("ever".to_string(), |a| format!("{a:.1?}"))
                        )))
                    }
                }
            }
            Ok(self.inner.raft.client_write(command.clone()).await)
        };
        match tokio::time::timeout(timeout, local).await {
            Err(_) => Err(RaftError::NoQuorum(format!(
                "the write was not committed within {timeout:?}"
            ))),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Ok(r))) => Ok(r.data),
            Ok(Ok(Err(openraft::error::RaftError::APIError(
                ClientWriteError::ForwardToLeader(f),
            )))) => match (f.leader_id, f.leader_node) {
                (Some(leader), Some(node)) if leader != self.inner.id => {
                    self.forward(leader, &node.addr, command).await
                }
                (leader, _) => Err(RaftError::NotLeader { leader }),
            },
            Ok(Ok(Err(e))) => Err(RaftError::Raft(e.to_string())),
        }
    }

    async fn forward(
        &self,
        leader: u64,
        addr: &str,
        command: Vec<u8>,
    ) -> Result<Vec<u8>, RaftError> {
        let timeout = self.inner.write_timeout;
        // A leader cut off by a partition answers nothing; give up as soon as this replica
        // stops following it (an election started) or has not heard from it for a leader
        // lease (it is cut off itself, and does not campaign: `prevote`), instead of
        // waiting out the timeout, so the caller's retry goes elsewhere or is refused.
        let mut metrics = self.inner.raft.metrics();
        let (contacts, lease) = (self.inner.contacts.clone(), self.inner.leader_lease);
        let leader_lost = async move {
            let mut check = tokio::time::interval(Duration::from_millis(100));
            loop {
                if metrics.borrow_and_update().current_leader != Some(leader)
                    || contacts
                        .last_from_leader()
                        .is_some_and(|t| t.elapsed() > lease)
                {
                    return;
                }
                tokio::select! {
                    changed = metrics.changed() => if changed.is_err() { return },
                    _ = check.tick() => {}
                }
            }
        };
        let call = tokio::time::timeout(timeout, self.inner.forwarder.write(addr, leader, command));
        tokio::pin!(call);
        let res = tokio::select! {
            r = &mut call => r,
            _ = leader_lost => {
                // A leader that handed leadership over on purpose is still there and
                // answers at once (it held the write back, so "not leader": retried
                // below); one cut off answers nothing. A lease is ample for the answer
                // on any network the lease suits, and waiting longer only delayed the
                // caller's retry after a partition (by a second, issue 31).
                let answer_within = self.inner.leader_lease.min(Duration::from_secs(1));
                match tokio::time::timeout(answer_within, &mut call).await {
                    Ok(r) => r,
                    Err(_) => return Err(RaftError::LeaderLost { leader }),
                }
            }
        };
        let res = res
            .map_err(|_| {
                RaftError::NoQuorum(format!("leader {leader} did not answer within {timeout:?}"))
            })?
            .map_err(|message| RaftError::Network {
                target: leader,
                message,
            })?;
        match res {
            network::ForwardResult::Ok { index, data } => {
                // Read-your-writes: return only once this replica has applied the entry.
                let mut rx = self.inner.applied.clone();
                tokio::time::timeout(timeout, rx.wait_for(|a| *a >= index))
                    .await
                    .map_err(|_| {
                        RaftError::NoQuorum("entry committed but not yet applied here".into())
                    })?
                    .map_err(|_| RaftError::Raft("state machine stopped".into()))?;
                Ok(data)
            }
            network::ForwardResult::NotLeader { leader } => Err(RaftError::NotLeader { leader }),
            network::ForwardResult::Failed(m) => Err(RaftError::Raft(m)),
        }
    }

    /// Resolves once Raft has stopped by itself, with why: a storage error, such as a full
    /// disk, ends openraft's core for good, and the replica can take no further part until
    /// it is restarted. (A [`RaftNode::shutdown`] ends it too; callers stop waiting first.)
    pub async fn stopped(&self) -> String {
        let mut metrics = self.inner.raft.metrics();
        loop {
            let state = metrics.borrow().running_state.clone();
            if let Err(fatal) = state {
                return fatal.to_string();
            }
            if metrics.changed().await.is_err() {
                return "Raft's core has exited".to_string();
            }
        }
    }

    /// How long ago this replica last had evidence that it is part of a working quorum:
    /// as leader, when a majority of voters (itself included) last answered; otherwise,
    /// the last append accepted from a leader. `None` if it never had any, e.g. a replica
    /// waiting to be added. A replica cut off from the majority sees this grow without
    /// bound, and must then stop serving what may be stale state.
    pub fn quorum_contact_age(&self) -> Option<Duration> {
        let m = self.inner.raft.metrics().borrow().clone();
        quorum_contact_age(&m, &self.inner.contacts)
    }

    /// Whether this replica has applied what the leader had committed when it last heard
    /// from it, give or take `slack` entries (a replica under steady writes is always a
    /// few behind). The leader has by definition; a replica that never heard from a
    /// leader has not.
    pub fn caught_up(&self, slack: u64) -> bool {
        let m = self.inner.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            return true;
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        self.inner
            .contacts
            .leader_commit()
            .is_some_and(|commit| applied + slack >= commit)
    }

    /// As leader: the highest log index each member is known to hold (`None` inside for a
    /// member not yet matched). `None` when not leader.
    pub fn matched_indexes(&self) -> Option<BTreeMap<u64, Option<u64>>> {
        let m = self.inner.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return None;
        }
        m.replication.map(|r| {
            r.into_iter()
                .map(|(id, matched)| (id, matched.map(|l| l.index)))
                .collect()
        })
    }

    /// As leader: how long ago each other member (voter or learner) last answered an
    /// append. `None` for a member that never answered this node, or when not leader.
    pub fn peer_answer_ages(&self) -> Option<BTreeMap<u64, Option<Duration>>> {
        let m = self.inner.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return None;
        }
        let now = std::time::Instant::now();
        Some(
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .filter(|id| *id != self.inner.id)
                .map(|id| (id, self.inner.contacts.last_answer(id).map(|t| now - t)))
                .collect(),
        )
    }

    /// The leader's view of every member's replication: this replica's own if it leads,
    /// else asked of the leader it follows (over the Raft channel, within `timeout`).
    /// `NotLeader { leader: None }` when it knows no leader; `Network` when the leader
    /// does not answer; `Unsupported` from a leader of an older version.
    pub async fn leader_view(&self, timeout: Duration) -> Result<LeaderView, RaftError> {
        let m = self.inner.raft.metrics().borrow().clone();
        if let Some(v) = view::of_leader(&m, &self.inner.contacts, self.inner.leader_lease) {
            return Ok(v);
        }
        let st = self.status();
        let leader = st
            .current_leader
            .ok_or(RaftError::NotLeader { leader: None })?;
        let addr = st
            .membership
            .iter()
            .find(|(id, _, _)| *id == leader)
            .map(|(_, addr, _)| addr.clone())
            .ok_or(RaftError::NotLeader { leader: None })?;
        let ask = self.inner.forwarder.leader_view(&addr, leader);
        match tokio::time::timeout(timeout, ask).await {
            Ok(Ok(Some(v))) if v.leader == leader => Ok(v),
            Ok(Ok(Some(v))) => Err(RaftError::NotLeader {
                leader: Some(v.leader),
            }),
            Ok(Ok(None)) => Err(RaftError::Unsupported(format!(
                "the leader, replica {leader}, runs an older version that cannot share its view; ask it directly"
            ))),
            Ok(Err(message)) => Err(RaftError::Network {
                target: leader,
                message,
            }),
            Err(_) => Err(RaftError::Network {
                target: leader,
                message: format!("no answer within {timeout:?}"),
            }),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().state == ServerState::Leader
    }

    pub fn node_id(&self) -> u64 {
        self.inner.id
    }

    /// The Raft address other replicas dial for this one.
    pub fn advertise_addr(&self) -> &str {
        &self.inner.advertise
    }

    /// Whether this node belongs to a cluster (was initialized, or reached by a leader).
    pub async fn is_initialized(&self) -> Result<bool, RaftError> {
        self.inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn status(&self) -> RaftStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        RaftStatus {
            id: m.id,
            state: match m.state {
                ServerState::Leader => "Leader",
                ServerState::Follower => "Follower",
                ServerState::Candidate => "Candidate",
                ServerState::Learner => "Learner",
                ServerState::Shutdown => "Shutdown",
            }
            .to_string(),
            term: m.current_term,
            current_leader: m.current_leader.filter(|l| {
                *l == m.id
                    || self
                        .inner
                        .contacts
                        .last_from_leader()
                        .is_some_and(|t| t.elapsed() <= self.inner.leader_lease)
            }),
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            membership: membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
                .collect(),
        }
    }

    /// Adds a learner and returns once it holds the log up to its own addition. (openraft's
    /// "blocking" mode gives up silently after half a second, so this waits by itself;
    /// bound it with a timeout: an unreachable learner never catches up.)
    pub async fn add_learner(&self, id: u64, addr: String) -> Result<(), RaftError> {
        let resp = self
            .inner
            .raft
            .add_learner(id, BasicNode::new(addr), false)
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        let want = resp.log_id.index;
        let mut metrics = self.inner.raft.metrics();
        loop {
            let caught_up = {
                let m = metrics.borrow_and_update();
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .is_some_and(|matched| matched.index >= want)
            };
            if caught_up {
                return Ok(());
            }
            if !self.is_leader() {
                return Err(RaftError::NotLeader {
                    leader: self.status().current_leader,
                });
            }
            metrics
                .changed()
                .await
                .map_err(|_| RaftError::Raft("raft stopped".into()))?;
        }
    }

    pub async fn change_membership(&self, voters: Vec<u64>) -> Result<(), RaftError> {
        let set: BTreeSet<u64> = voters.into_iter().collect();
        let _open = self.inner.gate.enter().await;
        self.inner
            .raft
            .change_membership(set, false)
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    /// Makes a learner a voter (joint consensus inside openraft).
    pub async fn promote(&self, id: u64) -> Result<(), RaftError> {
        let ids = BTreeSet::from([id]);
        let _open = self.inner.gate.enter().await;
        self.inner
            .raft
            .change_membership(openraft::ChangeMembers::AddVoterIds(ids), true)
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    /// Removes a voter or a learner from the cluster altogether.
    pub async fn remove_member(&self, id: u64) -> Result<(), RaftError> {
        let ids = BTreeSet::from([id]);
        let is_voter = {
            let m = self.inner.raft.metrics().borrow().clone();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == id);
            if !voter
                && !m
                    .membership_config
                    .membership()
                    .nodes()
                    .any(|(n, _)| *n == id)
            {
                return Err(RaftError::Unsupported(format!(
                    "replica {id} is not a member of this cluster; see `hydrascale cluster status`"
                )));
            }
            voter
        };
        let change = if is_voter {
            openraft::ChangeMembers::RemoveVoters(ids)
        } else {
            openraft::ChangeMembers::RemoveNodes(ids)
        };
        let _open = self.inner.gate.enter().await;
        self.inner
            .raft
            .change_membership(change, false)
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    pub async fn trigger_snapshot(&self) -> Result<(), RaftError> {
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    /// Stops openraft and the gRPC listener; RocksDB closes when openraft drops its stores.
    pub async fn shutdown(&self) -> Result<(), RaftError> {
        if let Some(t) = take(&self.inner.prevote_task) {
            t.abort();
        }
        if let Some(tx) = take(&self.inner.server_stop) {
            let _ = tx.send(());
        }
        if let Some(t) = take(&self.inner.server_task) {
            let _ = t.await;
        }
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| RaftError::Raft(format!("shutdown: {e}")))?;
        if let Some(mut rx) = take(&self.inner.db_closed) {
            // `changed` errors exactly when the sender, dropped after the DB, is gone.
            let wait = async { while rx.changed().await.is_ok() {} };
            if tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .is_err()
            {
                return Err(RaftError::Raft(
                    "storage still in use 10 s after shutdown; the database stays locked until the process exits".into(),
                ));
            }
        }
        Ok(())
    }
}

/// See [`RaftNode::quorum_contact_age`]; `m` is the node's current metrics.
pub(crate) fn quorum_contact_age(
    m: &openraft::RaftMetrics<u64, BasicNode>,
    contacts: &network::Contacts,
) -> Option<Duration> {
    let now = std::time::Instant::now();
    if m.state != ServerState::Leader {
        return contacts.last_from_leader().map(|t| now - t);
    }
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    let mut ages: Vec<Option<Duration>> = voters
        .iter()
        .map(|v| {
            if *v == m.id {
                Some(Duration::ZERO)
            } else {
                contacts.last_answer(*v).map(|t| now - t)
            }
        })
        .collect();
    // Youngest first, never-answered last; the majority-th answer bounds the quorum's age.
    ages.sort_by_key(|a| a.unwrap_or(Duration::MAX));
    ages.get(voters.len() / 2).copied().flatten()
}

/// What `slot` holds, leaving it empty; a poisoned lock still gives it up.
fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}
