//! `StateStore` (the in-memory state, its change feed, and the Raft `Application`) and
//! `Db` (how the rest of the server proposes commands).

use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use tokio::sync::broadcast;

use super::error::StateError;
use super::tailnet::Tailnet;
use super::types::{Change, Command, CommandOutput, COMMAND_LEVEL};

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

/// What the store counts as it applies, for whoever keeps this replica's metrics (the
/// server's registry implements it), so the state needs to know nothing else of them.
pub trait Meters: Send + Sync + 'static {
    /// One committed entry applied; `took` is how long applying it held the state.
    fn applied(&self, took: Duration);
}

/// The meters of a store whose metrics nobody serves (tools, tests).
impl Meters for () {
    fn applied(&self, _took: Duration) {}
}

#[derive(Clone)]
pub struct StateStore {
    tailnet: Arc<RwLock<Tailnet>>,
    changes: broadcast::Sender<StampedChange>,
    meters: Arc<dyn Meters>,
    observer: Arc<RwLock<Option<Arc<dyn Observer>>>>,
    /// Commands applied and snapshots restored so far: equal readings mean the same state.
    version: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for StateStore {
    fn default() -> Self {
        Self::new()
    }
}

impl StateStore {
    /// An empty state whose applying nobody counts.
    pub fn new() -> Self {
        Self::with_meters(Arc::new(()))
    }

    /// An empty state that tells `meters` what it applies.
    pub fn with_meters<M: Meters>(meters: Arc<M>) -> Self {
        let (changes, _) = broadcast::channel(4096);
        Self {
            tailnet: Arc::new(RwLock::new(Tailnet::default())),
            changes,
            meters,
            observer: Arc::new(RwLock::new(None)),
            version: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Installs the one derived view (the map plane's peer cache), built from the state as
    /// it is now and updated with every change from here on. Raft may be applying entries
    /// meanwhile (a restarted replica replays its log as it starts): both happen under the
    /// state's write lock, so each command is in the first build or told to the view.
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

    /// The applied state. Hold the guard briefly: `apply` waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Tailnet> {
        self.tailnet.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts every change to the state (a command applied, a snapshot restored): two
    /// equal readings saw the same state, whatever was applied in between.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    fn changed(&self) {
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
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

/// Why a command or snapshot from the log cannot be read by this version.
fn unreadable(what: &str, e: &serde_json::Error) -> String {
    format!(
        "the {what} cannot be read by this version of Hydrascale ({e}); if another replica runs a newer version, upgrade this one to it (docs/operations.md, \"Upgrade\")"
    )
}

impl hydrascale_raft::Application for StateStore {
    fn apply(&self, _index: u64, command: &[u8]) -> Result<Vec<u8>, String> {
        let cmd =
            serde_json::from_slice::<Command>(command).map_err(|e| unreadable("command", &e))?;
        // Timed out here, around the pure `Tailnet::apply`: the duration only feeds the
        // metric, never the state.
        let started = std::time::Instant::now();
        let (result, changes) = {
            let mut t = self.tailnet.write().unwrap_or_else(|p| p.into_inner());
            let (result, changes) = t.apply(&cmd);
            self.changed();
            // Looked up under the state's lock, as `observe` installs it: looked up before,
            // it could be none yet while `observe` built its first view from the state
            // without this command, and the view never learnt of it.
            if let Some(o) = self.observer() {
                o.applied(&t, &changes);
            }
            (result, changes)
        };
        self.meters.applied(started.elapsed());
        self.publish(changes);
        let result: Encoded = result;
        Ok(serde_json::to_vec(&result).unwrap_or_default())
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.read()).unwrap_or_default()
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        let restored: Tailnet = if snapshot.is_empty() {
            Tailnet::default()
        } else {
            let t: Tailnet =
                serde_json::from_slice(snapshot).map_err(|e| unreadable("snapshot", &e))?;
            if t.level > COMMAND_LEVEL {
                return Err(format!(
                    "the snapshot holds commands of level {} and this version of Hydrascale reads up to level {COMMAND_LEVEL}; upgrade this replica (docs/operations.md, \"Upgrade\")",
                    t.level
                ));
            }
            t
        };
        {
            let mut t = self.tailnet.write().unwrap_or_else(|p| p.into_inner());
            *t = restored;
            self.changed();
            if let Some(o) = self.observer() {
                o.reset(&t);
            }
        }
        self.publish(vec![Change::Reset]);
        Ok(())
    }

    fn check(&self, command: &[u8]) -> Result<(), String> {
        serde_json::from_slice::<Command>(command)
            .map(|_| ())
            .map_err(|e| unreadable("command", &e))
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
    /// The version gate: a member would stop on a command it cannot read.
    #[error("{0}")]
    Upgrade(String),
}

/// Proposes commands through Raft and returns their outcome once applied here.
#[derive(Clone)]
pub struct Db {
    pub raft: hydrascale_raft::RaftNode,
    pub store: StateStore,
}

impl Db {
    pub async fn write(&self, cmd: Command) -> Result<CommandOutput, DbError> {
        self.check_level(&cmd)?;
        let bytes = serde_json::to_vec(&cmd).map_err(|e| DbError::Codec(e.to_string()))?;
        let resp = self.raft.write(bytes).await?;
        let result: Encoded =
            serde_json::from_slice(&resp).map_err(|e| DbError::Codec(e.to_string()))?;
        Ok(result?)
    }
}

impl Db {
    /// The version gate: a command of a kind introduced at level L is proposed only once
    /// every member of the cluster has announced (in the replica registry) that it reads
    /// level L, so a rolling upgrade never puts in the log what a replica not yet upgraded
    /// would stop on. A member not yet announced counts as not reading it.
    pub fn check_level(&self, cmd: &Command) -> Result<(), DbError> {
        let need = cmd.level();
        if need <= 1 {
            return Ok(());
        }
        // This replica reads every level it can propose, announced yet or not.
        let me = self.raft.node_id();
        let members: Vec<u64> = self
            .raft
            .status()
            .membership
            .iter()
            .map(|(id, _, _)| *id)
            .filter(|id| *id != me)
            .collect();
        let state = self.store.read();
        refuse_below(need, &members, &state.replicas, cmd)
            .map_or(Ok(()), |e| Err(DbError::Upgrade(e)))
    }
}

/// Why `cmd` (of level `need`) may not be proposed to a cluster of `members` whose
/// registry is `replicas`, if it may not.
pub(crate) fn refuse_below(
    need: u32,
    members: &[u64],
    replicas: &std::collections::BTreeMap<u64, super::types::Replica>,
    cmd: &Command,
) -> Option<String> {
    let behind: Vec<String> = members
        .iter()
        .filter_map(|id| match replicas.get(id) {
            Some(r) if r.command_level() >= need => None,
            Some(r) => Some(format!(
                "replica {id} (reads up to level {})",
                r.command_level()
            )),
            None => Some(format!("replica {id} (not announced yet)")),
        })
        .collect();
    if behind.is_empty() {
        return None;
    }
    Some(format!(
        "{} needs every replica at command level {need} or later, and {} not: upgrade every replica first (docs/operations.md, \"Upgrade\"), or wait until a restarted one has announced itself",
        cmd.kind(),
        behind.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::sample;
    use hydrascale_raft::Application;
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    /// The node ids it has been told of; slow to build, as a peer cache of thousands of
    /// nodes is, so that commands arrive while it is being installed.
    #[derive(Default)]
    struct Ids(Mutex<BTreeSet<u64>>);

    impl Observer for Ids {
        fn applied(&self, t: &Tailnet, changes: &[Change]) {
            let mut ids = self.0.lock().unwrap();
            for c in changes {
                if let Change::NodeUpserted(id) | Change::NodeRemoved(id) = c {
                    if t.nodes.contains_key(id) {
                        ids.insert(*id);
                    } else {
                        ids.remove(id);
                    }
                }
            }
        }

        fn reset(&self, t: &Tailnet) {
            std::thread::sleep(std::time::Duration::from_millis(50));
            *self.0.lock().unwrap() = t.nodes.keys().copied().collect();
        }
    }

    /// A replica installs its peer cache while Raft is already applying the log (on a
    /// restart, entries replay as the server starts). Every command is seen either by the
    /// cache's first build or by the cache itself: one applied in between went unseen, and
    /// its node stayed missing from every full map that replica served.
    #[test]
    fn an_observer_installed_while_commands_apply_misses_none() {
        let store = StateStore::new();
        let encode = |c: &Command| serde_json::to_vec(c).unwrap();
        store
            .apply(
                1,
                &encode(&Command::CreateUser {
                    name: "u".into(),
                    display_name: String::new(),
                    now: 1,
                    by_admin: true,
                    profile: Default::default(),
                }),
            )
            .expect("applies");
        // One reusable key, so that every command of the loop below adds a node.
        let [mut key, _] = sample::registration("u", vec![], 0, "n0".into(), "{}".into());
        if let Command::CreatePreAuthKey { reusable, .. } = &mut key {
            *reusable = true;
        }
        store.apply(2, &encode(&key)).expect("applies");
        let stop = AtomicBool::new(false);
        let ids = Arc::new(Ids::default());
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let host = format!("n{n}");
                    let [_, mut reg] = sample::registration("u", vec![], n, host, "{}".into());
                    if let Command::RegisterNode { auth, .. } = &mut reg {
                        *auth = crate::state::RegisterAuth::PreAuthKey { hash: "h0".into() };
                    }
                    store.apply(n + 2, &encode(&reg)).expect("applies");
                }
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            store.observe(ids.clone());
            std::thread::sleep(std::time::Duration::from_millis(20));
            stop.store(true, Ordering::Relaxed);
        });
        let t = store.read();
        assert!(t.nodes.len() > 10, "the applier ran alongside");
        let want: BTreeSet<u64> = t.nodes.keys().copied().collect();
        let have = ids.0.lock().unwrap().clone();
        let missing: Vec<&u64> = want.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "the observer never saw nodes {missing:?}"
        );
    }

    /// A command this version cannot read stops the replica (Raft gets an error and stops
    /// there) instead of being skipped as "done"; so does a snapshot of a newer level.
    #[test]
    fn what_this_version_cannot_read_is_an_error_not_a_no_op() {
        let store = StateStore::new();
        let err = store
            .apply(1, br#"{"SomeFutureCommand":{"x":1}}"#)
            .expect_err("an unknown command");
        assert!(err.contains("cannot be read by this version"), "{err}");
        assert!(store.check(br#"{"SomeFutureCommand":{}}"#).is_err());
        assert_eq!(store.version(), 0, "the state changed");
        let newer = Tailnet {
            level: COMMAND_LEVEL + 1,
            ..Tailnet::default()
        };
        let err = store
            .restore(&serde_json::to_vec(&newer).unwrap())
            .expect_err("a snapshot of a newer level");
        assert!(err.contains("upgrade"), "{err}");
        assert!(store.restore(b"not json").is_err());
        let ok = serde_json::to_vec(&Tailnet::default()).unwrap();
        store.restore(&ok).expect("a snapshot of this level");
    }

    fn replica(id: u64, command_level: u32) -> crate::state::Replica {
        crate::state::Replica {
            id,
            admin_addr: String::new(),
            derp_host: String::new(),
            derp_ipv4: None,
            derp_port: 0,
            stun_port: 0,
            mesh_url: String::new(),
            derp_key: String::new(),
            command_level,
        }
    }

    /// The version gate: a command of level 2 goes to the log only once every member has
    /// announced level 2; a replica of an earlier version (which announces none) or one
    /// not yet announced holds it back, named in the refusal.
    #[test]
    fn a_new_kind_of_command_waits_for_every_member() {
        let cmd = Command::CreateUser {
            name: "u".into(),
            display_name: String::new(),
            now: 1,
            by_admin: false,
            profile: Default::default(),
        };
        let mut registry = std::collections::BTreeMap::new();
        registry.insert(1, replica(1, 2));
        registry.insert(2, replica(2, 0));
        let why = refuse_below(2, &[1, 2, 3], &registry, &cmd).expect("refused");
        assert!(why.contains("CreateUser"), "{why}");
        assert!(why.contains("replica 2 (reads up to level 1)"), "{why}");
        assert!(why.contains("replica 3 (not announced yet)"), "{why}");
        assert!(!why.contains("replica 1"), "{why}");
        registry.insert(2, replica(2, 2));
        registry.insert(3, replica(3, 3));
        assert_eq!(refuse_below(2, &[1, 2, 3], &registry, &cmd), None);
        // Level-1 commands are what every version reads.
        assert_eq!(cmd.level(), 1);
        assert_eq!(
            Command::Batch {
                commands: vec![cmd.clone()]
            }
            .level(),
            1
        );
    }

    /// The kinds of command this version introduced are level 2: OIDC identities.
    #[test]
    fn oidc_identity_commands_are_level_two() {
        let by = |by_admin| Command::CreateUser {
            name: "u".into(),
            display_name: String::new(),
            now: 1,
            by_admin,
            profile: Default::default(),
        };
        assert_eq!(by(true).level(), 2);
        assert_eq!(by(false).level(), 1);
        assert_eq!(
            Command::Batch {
                commands: vec![by(false), by(true)]
            }
            .level(),
            2
        );
    }

    /// A snapshot records the highest level it holds, as applied (deterministically).
    #[test]
    fn the_state_records_the_highest_level_applied() {
        let mut t = Tailnet::default();
        let _ = t.apply(&Command::CreateUser {
            name: "u".into(),
            display_name: String::new(),
            now: 1,
            by_admin: false,
            profile: Default::default(),
        });
        assert_eq!(t.level, 1);
        let _ = t.apply(&Command::CreateUser {
            name: "v".into(),
            display_name: String::new(),
            now: 1,
            by_admin: true,
            profile: Default::default(),
        });
        assert_eq!(t.level, 2);
    }
}
