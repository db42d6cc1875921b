//! What makes several replicas one service: forming or joining the Raft cluster, agreeing
//! on one control key, the replica registry (DERP map and relay mesh), and the background
//! tasks that keep client-facing state honest when replicas die or are cut off.
//!
//! Tasks here only observe Raft and propose commands; the state machine decides.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::derp::DerpServer;
use crate::noise::ControlKey;
use crate::state::{now_ms, Change, Command, Db, Replica};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid setting cluster.peers: {0}")]
    Peers(String),
    #[error("raft: {0}")]
    Raft(#[from] hydrascale_raft::RaftError),
    #[error("the cluster's control key in the replicated state is unreadable ({0}); restore from a backup")]
    BadKey(String),
    #[error("stopped while waiting for the cluster")]
    Stopped,
    #[error("cluster.restore_from {path}: {message}")]
    Restore { path: String, message: String },
    #[error("recovering the committed state: {0}")]
    Recover(String),
}

/// Starts a new cluster when this replica is the one to do it (its founder): alone (no
/// peers), or the lowest id of `cluster.peers`. A joining replica, or the other peers, wait
/// to be reached. Returns whether this replica is the founder.
pub async fn bootstrap(config: &Config, db: &Db) -> Result<bool, ClusterError> {
    if config.cluster.join {
        return Ok(false);
    }
    let peers = config.cluster.peer_list().map_err(ClusterError::Peers)?;
    let me = config
        .cluster
        .advertise_raft_addr
        .clone()
        .unwrap_or_else(|| db.raft.listen_addr().to_string());
    if peers.is_empty() {
        db.raft
            .initialize(BTreeMap::from([(config.node_id, me)]))
            .await?;
        Ok(true)
    } else if peers.keys().next() == Some(&config.node_id) {
        db.raft.initialize(peers).await?;
        Ok(true)
    } else {
        Ok(false)
    }
}

/// The first state a new cluster is seeded with: a fresh control key, or a backup.
pub enum Seed<'a> {
    Key(&'a ControlKey),
    Backup(&'a std::path::Path),
}

/// Waits until the replicated state holds the cluster's control key and returns it.
/// Only the founder proposes (`seed`), so a restore cannot race another replica's fresh
/// key; should two proposals ever meet, the first committed wins and all replicas still
/// present the same key at `/key`.
pub async fn control_key(
    db: &Db,
    local: &ControlKey,
    seed: Option<Seed<'_>>,
    mut stop: watch::Receiver<bool>,
) -> Result<ControlKey, ClusterError> {
    let mut last_note = Instant::now();
    let mut proposed = false;
    // Built on first use: a restarted founder whose cluster already has a key must not
    // need its (possibly since deleted) backup file.
    let mut first_state: Option<Command> = None;
    loop {
        let agreed = db.store.read().control_key.clone();
        if let Some(text) = agreed {
            let key = ControlKey::parse(&text).map_err(ClusterError::BadKey)?;
            if key.public() != local.public() {
                tracing::info!(key = %key.public_text(), "serving with the cluster's control key");
            }
            return Ok(key);
        }
        if !proposed && db.raft.status().current_leader.is_some() {
            if first_state.is_none() {
                first_state = match &seed {
                    None => None,
                    Some(Seed::Key(k)) => Some(Command::SetControlKey {
                        key: k.private_text(),
                    }),
                    Some(Seed::Backup(path)) => Some(restore_command(path)?),
                };
            }
            if let Some(cmd) = &first_state {
                match db.write(cmd.clone()).await {
                    Ok(_) => {
                        proposed = true;
                        if let Some(Seed::Backup(path)) = &seed {
                            tracing::info!(path = %path.display(), "new cluster seeded from the backup");
                        }
                        // Read the agreed key at once.
                        continue;
                    }
                    Err(crate::state::DbError::State(e)) => {
                        if let Some(Seed::Backup(path)) = &seed {
                            return Err(ClusterError::Restore {
                                path: path.display().to_string(),
                                message: e.to_string(),
                            });
                        }
                        tracing::warn!(error = %e, "proposing the control key");
                    }
                    // No leader yet or no quorum: wait below, then try again.
                    Err(e) => tracing::debug!(error = %e, "proposing the first state"),
                }
            }
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            last_note = Instant::now();
            tracing::info!(
                "waiting for the cluster: a majority of cluster.peers must be running; a replica started with cluster.join = true waits for `hydrascale cluster join` (or add-learner) against the leader, or for `hydrascale cluster init` / `cluster restore` against itself"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.wait_for(|s| *s) => return Err(ClusterError::Stopped),
        }
    }
}

/// A backup file as written by `hydrascale cluster backup`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Backup {
    pub format: String,
    /// Raft index the state was read at, for the operator's records.
    pub applied_index: u64,
    /// Milliseconds since the Unix epoch when it was taken.
    pub taken_ms: i64,
    pub tailnet: serde_json::Value,
}

pub const BACKUP_FORMAT: &str = "hydrascale-backup-v1";

/// A backup file's bytes and what it holds.
pub struct EncodedBackup {
    pub bytes: Vec<u8>,
    pub users: u64,
    pub nodes: u64,
    pub preauth_keys: u64,
}

/// Encodes `tailnet`, read at Raft index `applied_index`, as a backup file. Used by the
/// online `cluster backup` and by the offline `cluster recover`, so both restore alike.
pub fn encode_backup(
    tailnet: &crate::state::Tailnet,
    applied_index: u64,
) -> Result<EncodedBackup, serde_json::Error> {
    let backup = Backup {
        format: BACKUP_FORMAT.into(),
        applied_index,
        taken_ms: crate::state::now_ms(),
        tailnet: serde_json::to_value(tailnet)?,
    };
    Ok(EncodedBackup {
        bytes: serde_json::to_vec_pretty(&backup)?,
        users: tailnet.users.len() as u64,
        nodes: tailnet.nodes.len() as u64,
        preauth_keys: tailnet.preauth_keys.len() as u64,
    })
}

/// The state a stopped replica had committed, read from `<data_dir>/raft` without Raft,
/// as a backup: how a cluster that lost its majority is rebuilt (`cluster recover`).
pub fn recover_backup(
    data_dir: &std::path::Path,
) -> Result<(EncodedBackup, hydrascale_raft::Recovered), ClusterError> {
    let store = crate::state::StateStore::new();
    let recovered = hydrascale_raft::recover_committed(&data_dir.join("raft"), &store)?;
    let t = store.read();
    if t.control_key.is_none() {
        return Err(ClusterError::Recover(format!(
            "the store in {} holds no tailnet state (the replica never joined a cluster, or it had not caught up); try another replica's data directory",
            data_dir.display()
        )));
    }
    let encoded = encode_backup(&t, recovered.committed_index)
        .map_err(|e| ClusterError::Recover(format!("encoding the backup: {e}")))?;
    Ok((encoded, recovered))
}

/// Reads and checks a backup before it is proposed, so a bad file fails at startup
/// with its path rather than as a refused command.
fn restore_command(path: &std::path::Path) -> Result<Command, ClusterError> {
    let err = |message: String| ClusterError::Restore {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    restore_command_from(&text).map_err(err)
}

/// The `Restore` command for a backup file's contents, checked: right format, a state
/// that decodes, a control key.
pub fn restore_command_from(backup: &[u8]) -> Result<Command, String> {
    let backup: Backup =
        serde_json::from_slice(backup).map_err(|e| format!("not a Hydrascale backup: {e}"))?;
    if backup.format != BACKUP_FORMAT {
        return Err(format!(
            "format {:?} is not {BACKUP_FORMAT:?}",
            backup.format
        ));
    }
    let tailnet: crate::state::Tailnet = serde_json::from_value(backup.tailnet)
        .map_err(|e| format!("tailnet state does not decode: {e}"))?;
    if tailnet.control_key.is_none() {
        return Err("it holds no control key".into());
    }
    let tailnet = serde_json::to_string(&tailnet).map_err(|e| e.to_string())?;
    Ok(Command::Restore { tailnet })
}

/// Derives the relay mesh key from the cluster's control key: every replica has the
/// latter, so the mesh needs no configuration of its own.
pub fn mesh_key(control: &ControlKey) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"hydrascale derp mesh key v1");
    h.update(control.secret());
    h.finalize().into()
}

/// Which relays may mesh with this one: those whose key a replica of the cluster
/// announced in the registry. While a replica of a version before keys were announced is
/// registered (a rolling upgrade; it announces no command level either), the mesh key
/// alone still admits, as it did then.
pub fn mesh_peer_verifier(db: Db) -> crate::derp::ClientVerifier {
    std::sync::Arc::new(move |key: &[u8; 32]| {
        let text = hex::encode(key);
        let t = db.store.read();
        t.replicas
            .values()
            .any(|r| r.derp_key == text || (r.derp_key.is_empty() && r.command_level == 0))
    })
}

/// Spawns the replica's cluster tasks into `tasks`; they end when `stop` turns true.
#[allow(clippy::too_many_arguments)]
pub fn spawn_tasks(
    tasks: &mut JoinSet<()>,
    db: Db,
    me: Replica,
    derp: Option<DerpServer>,
    isolation_timeout: Duration,
    ephemeral_timeout: Duration,
    serving_tx: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
) {
    tasks.spawn(remove_idle_ephemeral_nodes(
        db.clone(),
        ephemeral_timeout,
        stop.clone(),
    ));
    tasks.spawn(announce(db.clone(), me.clone(), stop.clone()));
    tasks.spawn(watch_quorum(
        db.clone(),
        isolation_timeout,
        serving_tx,
        stop.clone(),
    ));
    tasks.spawn(mark_dead_replicas_offline(
        db.clone(),
        isolation_timeout,
        stop.clone(),
    ));
    if let Some(derp) = derp {
        tasks.spawn(mesh_with_replicas(db, me.id, derp, stop));
    }
}

/// Keeps this replica's registry entry current (after a restart with new addresses, or a
/// restore from a backup that predates it).
async fn announce(db: Db, me: Replica, mut stop: watch::Receiver<bool>) {
    loop {
        let current = db.store.read().replicas.get(&me.id) == Some(&me);
        let wait = if current {
            Duration::from_secs(10)
        } else {
            match db
                .write(Command::RegisterReplica {
                    replica: me.clone(),
                })
                .await
            {
                Ok(_) => Duration::from_secs(10),
                Err(e) => {
                    tracing::debug!(error = %e, "announcing this replica");
                    Duration::from_secs(1)
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Entries a replica may trail the leader's last announced commit and still count as
/// caught up: under steady writes a healthy follower is always a few behind.
const READY_SLACK: u64 = 100;

/// Whether a load balancer should send clients here (`/ready`): in contact with the
/// majority (`serving`) and caught up with the leader, so a replica replaying a long log
/// after a restart gets no clients until it holds what they expect. `Err` says why not.
pub fn readiness(db: &Db, serving: &watch::Receiver<bool>) -> Result<(), &'static str> {
    if !*serving.borrow() {
        return Err("this replica has lost contact with the cluster's majority");
    }
    if !db.raft.caught_up(READY_SLACK) {
        return Err("this replica is still catching up with the leader's log");
    }
    Ok(())
}

/// Publishes whether this replica is in contact with a quorum. Losing it for
/// `isolation_timeout` ends client streams here (see `ControlState::serving`).
async fn watch_quorum(
    db: Db,
    isolation_timeout: Duration,
    serving_tx: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let ok = db
            .raft
            .quorum_contact_age()
            .is_some_and(|age| age < isolation_timeout);
        serving_tx.send_if_modified(|s| {
            if *s != ok {
                if ok {
                    tracing::info!("in contact with the cluster's majority: serving clients");
                } else {
                    tracing::warn!(
                        "no contact with the cluster's majority for {isolation_timeout:?}: refusing clients until it returns"
                    );
                }
                *s = ok;
                true
            } else {
                false
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// On the leader: a replica silent for `isolation_timeout` has lost its clients (it died,
/// or it closed their streams on losing the quorum), so its nodes are marked offline;
/// they come back online when they reconnect to another replica.
async fn mark_dead_replicas_offline(
    db: Db,
    isolation_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut leading_since: Option<Instant> = None;
    loop {
        match db.raft.peer_answer_ages() {
            None => leading_since = None,
            Some(ages) => {
                let since = *leading_since.get_or_insert_with(Instant::now);
                let dead: Vec<u64> = ages
                    .into_iter()
                    .filter(|(_, age)| {
                        age.unwrap_or_else(|| since.elapsed()) >= isolation_timeout
                            && since.elapsed() >= isolation_timeout
                    })
                    .map(|(id, _)| id)
                    .collect();
                for replica in dead {
                    let has_nodes = db
                        .store
                        .read()
                        .nodes
                        .values()
                        .any(|n| n.online && n.online_via == Some(replica));
                    if has_nodes {
                        tracing::info!(replica, "replica unreachable: marking its nodes offline");
                        if let Err(e) = db
                            .write(Command::ReplicaDown {
                                replica,
                                now: now_ms(),
                            })
                            .await
                        {
                            tracing::warn!(replica, error = %e, "could not mark nodes offline");
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// On the leader: removes ephemeral nodes offline for `timeout`. The command re-checks
/// each node when applied, so one that reconnected in between stays.
async fn remove_idle_ephemeral_nodes(db: Db, timeout: Duration, mut stop: watch::Receiver<bool>) {
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let every = (timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        if db.raft.is_leader() {
            let cutoff = now_ms().saturating_sub(timeout_ms);
            let idle: Vec<u64> = db
                .store
                .read()
                .nodes
                .values()
                .filter(|n| n.idle_ephemeral(cutoff))
                .map(|n| n.id)
                .collect();
            if !idle.is_empty() {
                tracing::info!(nodes = ?idle, "removing ephemeral nodes offline for {timeout:?}");
                if let Err(e) = db
                    .write(Command::RemoveIdleEphemeral {
                        node_ids: idle,
                        cutoff,
                    })
                    .await
                {
                    tracing::warn!(error = %e, "could not remove idle ephemeral nodes");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Keeps one mesh link to every other registered replica's relay, following the registry.
async fn mesh_with_replicas(
    db: Db,
    self_id: u64,
    derp: DerpServer,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = db.store.subscribe();
    let mut links: HashMap<u64, (String, watch::Sender<bool>)> = HashMap::new();
    loop {
        let wanted: BTreeMap<u64, String> = db
            .store
            .read()
            .replicas
            .values()
            .filter(|r| r.id != self_id)
            .map(|r| (r.id, r.mesh_url.clone()))
            .collect();
        links.retain(|id, (url, link_stop)| {
            let keep = wanted.get(id) == Some(url);
            if !keep {
                let _ = link_stop.send(true);
            }
            keep
        });
        // A relay that left the registry (a removed replica) keeps no link it already had.
        let closed = derp.revalidate_mesh();
        if closed > 0 {
            tracing::info!(
                closed,
                "closed relay connections the replica registry no longer admits"
            );
        }
        for (id, url) in wanted {
            if let std::collections::hash_map::Entry::Vacant(e) = links.entry(id) {
                let (tx, rx) = watch::channel(false);
                tracing::info!(replica = id, %url, "meshing DERP with replica");
                crate::derp::spawn_mesh_peer(derp.clone(), url.clone(), rx);
                e.insert((url, tx));
            }
        }
        // Wake on a registry change (or a reset); other changes are ignored.
        loop {
            tokio::select! {
                c = changes.recv() => match c {
                    Ok((_, Change::ReplicasChanged)) | Ok((_, Change::Reset))
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = stop.wait_for(|s| *s) => {
                    for (_, (_, tx)) in links.drain() {
                        let _ = tx.send(true);
                    }
                    return;
                }
            }
        }
    }
}
