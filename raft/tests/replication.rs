//! Replication tests with real nodes on loopback and RocksDB in temporary directories.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test, with its location"
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hydrascale_raft::{Application, RaftConfig, RaftNode};

mod support;

/// A log of every applied command: apply returns the number of commands so far. An "old
/// version" cannot read commands that start with `future:`.
#[derive(Default)]
struct Recorder {
    applied: Mutex<Vec<Vec<u8>>>,
    old: bool,
}

impl Application for Recorder {
    fn apply(&self, _index: u64, command: &[u8]) -> Result<Vec<u8>, String> {
        self.check(command)?;
        let mut a = self.applied.lock().expect("lock");
        a.push(command.to_vec());
        Ok((a.len() as u64).to_be_bytes().to_vec())
    }
    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.applied.lock().expect("lock")).expect("json")
    }
    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        *self.applied.lock().expect("lock") = serde_json::from_slice(snapshot).expect("json");
        Ok(())
    }
    fn check(&self, command: &[u8]) -> Result<(), String> {
        if self.old && command.starts_with(b"future:") {
            return Err("a command of a newer version".into());
        }
        Ok(())
    }
}

impl Recorder {
    fn commands(&self) -> Vec<Vec<u8>> {
        self.applied.lock().expect("lock").clone()
    }
}

fn config(id: u64, dir: &std::path::Path) -> RaftConfig {
    RaftConfig {
        node_id: id,
        data_dir: dir.join(format!("n{id}")),
        election_timeout_ms: (300, 600),
        heartbeat_ms: 100,
        ..Default::default()
    }
}

/// Three nodes (ids 1-3) with data under `dir`, each applying to its own recorder;
/// `tweak` adjusts node `i`'s settings first. Not yet a cluster.
async fn three(
    dir: &std::path::Path,
    mut tweak: impl FnMut(usize, &mut RaftConfig),
) -> (Vec<Arc<Recorder>>, Vec<RaftNode>) {
    let apps: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::new(Recorder::default())).collect();
    let mut nodes = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let mut cfg = config(i as u64 + 1, dir);
        tweak(i, &mut cfg);
        nodes.push(RaftNode::start(cfg, app.clone()).await.expect("start"));
    }
    (apps, nodes)
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count(resp: &[u8]) -> u64 {
    u64::from_be_bytes(resp.try_into().expect("8 bytes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = Arc::new(Recorder::default());
    let node = RaftNode::start(config(1, dir.path()), app.clone())
        .await
        .expect("start");
    node.initialize_single().await.expect("init");
    for i in 0..100u32 {
        let r = node.write(i.to_be_bytes().to_vec()).await.expect("write");
        assert_eq!(count(&r), u64::from(i) + 1);
    }
    node.shutdown().await.expect("shutdown");
    drop(node);

    let app2 = Arc::new(Recorder::default());
    let node = RaftNode::start(config(1, dir.path()), app2.clone())
        .await
        .expect("restart");
    node.initialize_single().await.expect("init is idempotent");
    wait_for("replay", || app2.commands().len() == 100).await;
    assert_eq!(app2.commands(), app.commands());
    let r = node
        .write(b"after".to_vec())
        .await
        .expect("write after restart");
    assert_eq!(count(&r), 101);
    node.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_restart_restores_everything_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(1, dir.path());
    cfg.snapshot_every = 10;
    let app = Arc::new(Recorder::default());
    let node = RaftNode::start(cfg.clone(), app.clone())
        .await
        .expect("start");
    node.initialize_single().await.expect("init");
    for i in 0..50u32 {
        node.write(i.to_be_bytes().to_vec()).await.expect("write");
    }
    wait_for("a snapshot", || node.status().snapshot_index.is_some()).await;
    node.shutdown().await.expect("shutdown");
    drop(node);
    let app2 = Arc::new(Recorder::default());
    let node = RaftNode::start(cfg, app2.clone()).await.expect("restart");
    node.initialize_single().await.expect("init");
    wait_for("restore + replay", || app2.commands().len() >= 50).await;
    // Snapshot plus replay must not apply any entry twice.
    assert_eq!(app2.commands(), app.commands());
    node.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_forward_and_fail_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (apps, mut nodes) = three(dir.path(), |_, _| {}).await;
    nodes[0].initialize_single().await.expect("init");
    // Never heard from a leader: not caught up.
    assert!(!nodes[1].caught_up(1000));
    support::add_voters(&nodes[0], &nodes[1..]).await;
    // A write through a follower is forwarded and visible there when it returns.
    let r = nodes[2]
        .write(b"via-follower".to_vec())
        .await
        .expect("forwarded write");
    assert!(count(&r) >= 1);
    assert!(apps[2].commands().contains(&b"via-follower".to_vec()));
    for i in 0..20u32 {
        nodes[i as usize % 3]
            .write(i.to_be_bytes().to_vec())
            .await
            .expect("write");
    }
    wait_for("convergence", || {
        apps[0].commands().len() == 21 && apps.iter().all(|a| a.commands() == apps[0].commands())
    })
    .await;
    // Followers learn the leader's commit index from its appends and count as caught up
    // once they have applied it.
    wait_for("everyone caught up", || {
        nodes.iter().all(|n| n.caught_up(0))
    })
    .await;
    // Hand leadership to another node while every node keeps writing: each write lands
    // exactly once, and the chosen node leads.
    let from = nodes[0].status().current_leader.expect("leader");
    let to = from % 3 + 1;
    let writers: Vec<_> = nodes
        .iter()
        .cloned()
        .map(|n| {
            tokio::spawn(async move {
                for i in 0..30u32 {
                    let cmd = format!("handover-{}-{i}", n.node_id()).into_bytes();
                    n.write(cmd).await.expect("write during the handover");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let paused = nodes[from as usize - 1]
        .transfer_leader(to)
        .await
        .expect("transfer");
    assert!(paused < Duration::from_secs(5), "paused {paused:?}");
    for w in writers {
        w.await.expect("writer");
    }
    wait_for("everyone follows the new leader", || {
        nodes.iter().all(|n| n.status().current_leader == Some(to))
    })
    .await;
    wait_for("convergence after the handover", || {
        apps[0].commands().len() == 111 && apps.iter().all(|a| a.commands() == apps[0].commands())
    })
    .await;
    // Not to itself, not from a follower.
    assert_eq!(
        nodes[to as usize - 1]
            .transfer_leader(to)
            .await
            .expect("no-op"),
        Duration::ZERO
    );
    assert!(nodes[from as usize - 1].transfer_leader(to).await.is_err());

    // Kill the leader; the other two elect a new one and keep accepting writes.
    let leader = nodes[0].status().current_leader.expect("leader");
    let idx = nodes
        .iter()
        .position(|n| n.node_id() == leader)
        .expect("leader node");
    let dead = nodes.remove(idx);
    dead.shutdown().await.expect("shutdown leader");
    let start = std::time::Instant::now();
    loop {
        match nodes[0].write(b"after-failover".to_vec()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "no failover: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for n in &nodes {
        assert_ne!(n.status().current_leader, Some(leader));
        n.shutdown().await.expect("shutdown");
    }
}

/// A follower cut off from the leader for several of its election timeouts, then healed,
/// rejoins without unseating the leader: the majority keeps its leader and term and goes on
/// committing throughout, and the follower catches up. (Campaigning alone, the follower
/// would raise its term; healed, its answer to the leader's next append would carry the
/// higher term and make the leader step down, stalling every write for an election.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_follower_does_not_unseat_the_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut links = Vec::new();
    for _ in 0..3 {
        links.push(support::Link::open().await);
    }
    let (apps, nodes) = three(dir.path(), |i, cfg| {
        cfg.advertise_addr = Some(links[i].addr.to_string());
    })
    .await;
    for (link, n) in links.iter().zip(&nodes) {
        link.forward_to(n.listen_addr());
    }
    nodes[0].initialize_single().await.expect("init");
    support::add_voters(&nodes[0], &nodes[1..]).await;
    let leader = nodes[0].status().current_leader.expect("leader");
    let term = nodes[0].status().term;
    let follower = (0..3)
        .find(|i| nodes[*i].node_id() != leader)
        .expect("a follower");
    let lead = nodes
        .iter()
        .find(|n| n.node_id() == leader)
        .expect("leader node")
        .clone();
    // Writes through the leader all along: none may wait on an election.
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (lead, writing) = (lead.clone(), writing.clone());
        tokio::spawn(async move {
            let mut longest = Duration::ZERO;
            let mut n = 0u32;
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                let start = std::time::Instant::now();
                lead.write(format!("w{n}").into_bytes())
                    .await
                    .expect("a write to the leader");
                longest = longest.max(start.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (n, longest)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    links[follower].cut();
    // Several election timeouts (300-600 ms after a 600 ms lease) without the leader.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let cut_off_term = nodes[follower].status().term;
    links[follower].heal();
    let healed = std::time::Instant::now();
    wait_for("the healed follower to catch up", || {
        nodes[follower].status().last_applied >= lead.status().last_applied
            && nodes[follower].status().current_leader == Some(leader)
    })
    .await;
    let caught_up = healed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let (writes, longest) = writer.await.expect("writer");
    eprintln!(
        "healed follower: caught up {caught_up:?} after the heal; {writes} writes, longest {longest:?}; its term while cut off {cut_off_term} (leader's {term})"
    );
    for n in &nodes {
        let s = n.status();
        assert_eq!(s.current_leader, Some(leader), "{s:?}");
        assert_eq!(s.term, term, "no election anywhere: {s:?}");
    }
    // An election would have failed a write ("not leader") and moved the term; this bounds
    // a stall without one. Alone the longest write takes tens of milliseconds; beside the
    // other tests' fsyncs on two cores, up to some hundreds.
    assert!(
        longest < Duration::from_secs(2),
        "a write waited {longest:?}"
    );
    wait_for("convergence", || {
        apps.iter().all(|a| a.commands() == apps[0].commands())
    })
    .await;
    for n in &nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// A replica of a version before compact appends (it answers them "unimplemented") in a
/// cluster of newer ones: the leader sends it JSON appends, and every write reaches all
/// three, through the leader and through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_compact_appends_gets_json_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (apps, nodes) = three(dir.path(), |i, cfg| cfg.json_appends_only = i == 2).await;
    nodes[0].initialize_single().await.expect("init");
    support::add_voters(&nodes[0], &nodes[1..]).await;
    for i in 0..20u32 {
        let cmd: Vec<u8> = (0..=255u8).chain(i.to_be_bytes()).collect();
        nodes[if i % 2 == 0 { 0 } else { 2 }]
            .write(cmd)
            .await
            .expect("write");
    }
    wait_for("convergence", || {
        apps[0].commands().len() == 20 && apps.iter().all(|a| a.commands() == apps[0].commands())
    })
    .await;
    assert!(apps[2].commands()[19].starts_with(&(0..=255u8).collect::<Vec<_>>()));
    for n in &nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// With mutual TLS, replicas certified by the cluster CA replicate and forward; a node
/// with a certificate from another CA, or with none, cannot join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_the_cluster_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = hydrascale_raft::tls::generate_ca().expect("ca");
    let other_ca = hydrascale_raft::tls::generate_ca().expect("other ca");
    let start = |id: u64, tls: Option<hydrascale_raft::RaftTls>| {
        let app = Arc::new(Recorder::default());
        let cfg = RaftConfig {
            tls,
            write_timeout: Duration::from_secs(3),
            ..config(id, dir.path())
        };
        async move {
            let n = RaftNode::start(cfg, app.clone()).await.expect("start");
            (n, app)
        }
    };
    let (n1, _a1) = start(1, Some(support::tls_for(&ca, 1))).await;
    let (n2, a2) = start(2, Some(support::tls_for(&ca, 2))).await;
    n1.initialize_single().await.expect("init");
    n1.add_learner(2, n2.listen_addr().to_string())
        .await
        .expect("a certified replica joins");
    n1.change_membership(vec![1, 2]).await.expect("membership");
    n2.write(b"forwarded over tls".to_vec())
        .await
        .expect("forwarded write over mutual TLS");
    assert!(a2.commands().contains(&b"forwarded over tls".to_vec()));

    // Certificate from another CA: the leader cannot reach it as a learner.
    let (stranger, _) = start(3, Some(support::tls_for(&other_ca, 3))).await;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        n1.add_learner(3, stranger.listen_addr().to_string()),
    )
    .await;
    assert!(!matches!(r, Ok(Ok(()))), "a replica from another CA joined");
    // Plaintext: the leader cannot reach it either.
    let (plain, _) = start(4, None).await;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        n1.add_learner(4, plain.listen_addr().to_string()),
    )
    .await;
    assert!(!matches!(r, Ok(Ok(()))), "a plaintext replica joined");
    for n in [stranger, plain] {
        n.shutdown().await.expect("shutdown");
    }
    n2.shutdown().await.expect("shutdown");
    n1.shutdown().await.expect("shutdown");
}

/// A stopped node's storage, read without Raft, gives the state it had committed:
/// snapshot plus the log after it, each entry once; a running node's store is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_committed_reads_a_stopped_nodes_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(1, dir.path());
    cfg.snapshot_every = 10;
    let app = Arc::new(Recorder::default());
    let node = RaftNode::start(cfg.clone(), app.clone())
        .await
        .expect("start");
    node.initialize_single().await.expect("init");
    for i in 0..25u32 {
        node.write(i.to_be_bytes().to_vec()).await.expect("write");
    }
    wait_for("a snapshot", || node.status().snapshot_index.is_some()).await;
    let refused = hydrascale_raft::recover_committed(&cfg.data_dir, &Recorder::default())
        .expect_err("the running node holds the store");
    assert!(
        refused.to_string().contains("another hydrascale process"),
        "{refused}"
    );
    let applied = node.status().last_applied.expect("applied");
    node.shutdown().await.expect("shutdown");
    drop(node);

    let recovered_app = Recorder::default();
    let recovered =
        hydrascale_raft::recover_committed(&cfg.data_dir, &recovered_app).expect("recover");
    assert_eq!(recovered_app.commands(), app.commands());
    // The status read before the stop may trail the last applied entry by a moment.
    assert!(recovered.committed_index >= applied, "{recovered:?}");
    assert_eq!(recovered.last_log_index, recovered.committed_index);
    assert_eq!(
        recovered.voters.keys().copied().collect::<Vec<_>>(),
        vec![1]
    );

    let missing =
        hydrascale_raft::recover_committed(&dir.path().join("nothing"), &Recorder::default())
            .expect_err("no store");
    assert!(missing.to_string().contains("no Raft store"), "{missing}");
    assert!(!dir.path().join("nothing").exists(), "nothing is created");
}

/// A committed command a replica cannot read stops Raft there, before the entry: its
/// applied index stays below it (no silent skip while the log moves on), a restart stops
/// at the same entry again, and the replicas that read it go on. A leader that cannot
/// read a command a follower forwards refuses it before it reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_command_stops_the_replica_instead_of_being_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = Arc::new(Recorder {
        old: true,
        ..Recorder::default()
    });
    let apps: Vec<Arc<Recorder>> = vec![
        Arc::new(Recorder::default()),
        Arc::new(Recorder::default()),
        old.clone(),
    ];
    let mut nodes = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        nodes.push(
            RaftNode::start(config(i as u64 + 1, dir.path()), app.clone())
                .await
                .expect("start"),
        );
    }
    nodes[0].initialize_single().await.expect("init");
    support::add_voters(&nodes[0], &nodes[1..]).await;
    nodes[0].write(b"before".to_vec()).await.expect("write");
    wait_for("all applied", || old.commands().len() == 1).await;
    let before = nodes[2].status().last_applied.expect("applied");

    let resp = nodes[0].write(b"future:x".to_vec()).await.expect("write");
    assert_eq!(count(&resp), 2);
    let why = tokio::time::timeout(Duration::from_secs(10), nodes[2].stopped())
        .await
        .expect("the old replica stops");
    assert!(why.contains("cannot be applied"), "{why}");
    assert_eq!(old.commands(), vec![b"before".to_vec()]);
    assert_eq!(
        nodes[2].status().last_applied,
        Some(before),
        "the unreadable entry was counted as applied"
    );
    // The others go on.
    nodes[0].write(b"after".to_vec()).await.expect("write");
    wait_for("the new replica applies", || apps[1].commands().len() == 3).await;
    let _ = nodes[2].shutdown().await;

    // Restarted, the old replica refuses to start at the same entry again: it replays
    // its committed log as it starts.
    let again = Arc::new(Recorder {
        old: true,
        ..Recorder::default()
    });
    let why = match RaftNode::start(config(3, dir.path()), again.clone()).await {
        Ok(n3) => {
            let why = tokio::time::timeout(Duration::from_secs(10), n3.stopped())
                .await
                .expect("stops again");
            let _ = n3.shutdown().await;
            why
        }
        Err(e) => e.to_string(),
    };
    assert!(
        why.contains("log entry") && why.contains("cannot be applied"),
        "{why}"
    );
    assert_eq!(again.commands(), vec![b"before".to_vec()]);

    for n in &nodes[..2] {
        n.shutdown().await.expect("shutdown");
    }
}

/// A leader that cannot read what a follower forwards refuses it: nothing reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_refuses_a_forwarded_command_it_cannot_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = Arc::new(Recorder {
        old: true,
        ..Recorder::default()
    });
    let new = Arc::new(Recorder::default());
    let n1 = RaftNode::start(config(1, dir.path()), old.clone())
        .await
        .expect("start");
    let n2 = RaftNode::start(config(2, dir.path()), new.clone())
        .await
        .expect("start");
    n1.initialize_single().await.expect("init");
    support::add_voters(&n1, std::slice::from_ref(&n2)).await;
    let last = n1.status().last_log_index;
    let err = n2
        .write(b"future:y".to_vec())
        .await
        .expect_err("forwarded to a leader that cannot read it")
        .to_string();
    assert!(
        err.contains("cannot apply") && err.contains("upgrade"),
        "{err}"
    );
    assert_eq!(n1.status().last_log_index, last, "it reached the log");
    n2.shutdown().await.expect("shutdown");
    n1.shutdown().await.expect("shutdown");
}
