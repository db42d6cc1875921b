//! Chaos suites: three `hydrascale serve` processes on hosts of their own (network
//! namespaces on a private bridge), HAProxy and official clients on the router, a workload
//! writing through every replica, and a seeded schedule of faults: kill -9 of the leader
//! and of a random replica, SIGSTOP pauses, partitions with the leader in the minority and
//! in the majority, network delay and loss, rolling restarts, a full disk. After each fault heals the cluster must
//! serve again; at the end the history is checked (`history::check`): no acknowledged
//! write lost, no address or node key given twice, no write acknowledged by a replica cut
//! off from the quorum, every replica on the same state and every client's map matching it.
//!
//! `cargo test --test chaos` runs the short suite (every fault once; what CI runs).
//! `chaos/run [SEED] [ROUNDS]` runs the long one. The seed fixes the order, targets and
//! durations of the faults and the workload's choices; the processes' own timing is real.
//! Environment: `CHAOS_SEED`, `CHAOS_ROUNDS`, and
//! `CHAOS_OUT` (a directory the history and summary are written to, and where each run's
//! directory with every process's log is kept), `HYDRASCALE_TEST_LOG` (the replicas' log
//! filter).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test, with its location"
)]

mod faults;
#[allow(dead_code)]
#[path = "../tests/integration/fixtures.rs"]
mod fixtures;
mod history;
mod netem;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use faults::Cluster;
use fixtures::{require_tailscale, wait_for, Haproxy, Tailscaled};
use history::History;

/// Removes the run's directory when the test ends, pass or fail, unless it is to be kept.
/// Declared before the cluster, so it drops after every process in it has been stopped.
struct RemoveUnless(PathBuf, bool);

impl Drop for RemoveUnless {
    fn drop(&mut self) {
        if self.1 {
            eprintln!("chaos: logs of this run kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_lose_nothing_and_everyone_converges() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    // SAFETY: geteuid only reads this process's user id.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "the chaos suite makes network namespaces and mounts, and needs root"
    );
    let seed = env_u64("CHAOS_SEED", 20261127);
    let rounds = env_u64("CHAOS_ROUNDS", 1);
    eprintln!("chaos: seed {seed}, {rounds} round(s); rerun with CHAOS_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let out_dir = std::env::var_os("CHAOS_OUT").map(PathBuf::from);
    // With CHAOS_OUT, the run's directory (every replica's, client's and HAProxy's log)
    // stays behind for reading after a failure; otherwise it goes with the test.
    let dir = match &out_dir {
        Some(out) => {
            std::fs::create_dir_all(out).expect("CHAOS_OUT");
            tempfile::Builder::new()
                .prefix(&format!("run-{seed}-"))
                .tempdir_in(out)
                .expect("run dir")
                .keep()
        }
        None => tempfile::tempdir().expect("tempdir").keep(),
    };
    let _cleanup = RemoveUnless(dir.clone(), out_dir.is_some());
    let lb_addr = format!("127.0.0.1:{}", fixtures::free_port());
    let lb_url = format!("http://{lb_addr}");
    let mut cluster = Cluster::start(&dir, &lb_url).await;
    let _lb = Haproxy::start(&dir, &lb_addr, &cluster.replicas.iter().collect::<Vec<_>>());
    wait_for("load balancer up", Duration::from_secs(30), || {
        let ok = fixtures::http_get(&lb_addr, "/ready").is_some_and(|(c, _)| c == 200);
        async move { ok.then_some(()) }
    })
    .await;

    fixtures::create_user_retrying(&cluster.replicas[0], "chaos", Duration::from_secs(30)).await;
    let key = cluster.replicas[0].cli_json(&[
        "preauthkeys",
        "create",
        "--user",
        "chaos",
        "--reusable",
        "--expiration",
        "24h",
    ])["key"]
        .as_str()
        .expect("key")
        .to_string();

    // Official clients behind the load balancer: real map streams through every fault.
    let root = dir.join("clients");
    let clients: Vec<Tailscaled> = ["c1", "c2", "c3"]
        .iter()
        .map(|n| Tailscaled::start(&bin, &root, n))
        .collect();
    for c in &clients {
        c.up(&lb_url, &key).await;
    }

    let history = Arc::new(History::new());
    let targets = cluster.targets();
    let work = workload::start(history.clone(), targets, key.clone(), seed.wrapping_add(1));

    let mut recoveries = Vec::new();
    for round in 0..rounds {
        let mut order = faults::ALL.to_vec();
        order.shuffle(&mut rng);
        for fault in order {
            let hold = Duration::from_millis(rng.gen_range(4000..9000));
            let target = rng.gen_range(0..cluster.replicas.len());
            let name = fault.name();
            eprintln!("chaos: round {round}: {name} (target {target}, {hold:?})");
            history.set_fault(name);
            let injected = cluster.inject(fault, target, hold, &history).await;
            history.set_fault("");
            let healed = Instant::now();
            cluster.heal(injected).await;
            let took = healed.elapsed();
            eprintln!("chaos: {name}: serving again {took:?} after healing");
            recoveries.push((name.to_string(), took));
            // Writes between faults, so each fault starts from a working cluster.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    work.stop().await;

    // Every replica on the same state; then the checks.
    let committed = cluster.converged_state().await;
    let ops = history.ops();
    let violations = history::check(&ops, &committed);

    // Every official client's map holds every committed node, and sees the other clients
    // online.
    for c in &clients {
        let own = c.ipv4();
        let mut want: Vec<String> = committed
            .nodes
            .iter()
            .map(|n| n.ipv4.clone())
            .filter(|ip| *ip != own)
            .collect();
        want.sort();
        let others: Vec<(String, bool)> = clients
            .iter()
            .filter(|o| o.name != c.name)
            .map(|o| (o.name.clone(), true))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let st = c.status();
            let mut have: Vec<String> = st["Peer"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|p| p["TailscaleIPs"][0].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            have.sort();
            let online = c.peers_online();
            let others_online = others.iter().all(|o| online.contains(o));
            if have == want && others_online {
                break;
            }
            if Instant::now() > deadline {
                let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
                let extra: Vec<&String> = have.iter().filter(|h| !want.contains(h)).collect();
                let online: Vec<&(String, bool)> =
                    online.iter().filter(|(n, _)| n != "chaos").collect();
                panic!(
                    "{}'s map did not converge on the committed state within 90 s: missing {missing:?}, extra {extra:?}, clients online as it sees them {online:?}\n--- its log ---\n{}",
                    c.name,
                    c.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    let summary = history::summary(&ops);
    let acked = ops
        .iter()
        .filter(|o| o.outcome == history::Outcome::Ok)
        .count();
    eprintln!(
        "chaos: {} operations ({acked} acknowledged), {} users and {} nodes committed",
        ops.len(),
        committed.users.len(),
        committed.nodes.len()
    );
    for (fault, (ok, not, gap)) in &summary {
        let fault = if fault.is_empty() {
            "(no fault)"
        } else {
            fault
        };
        eprintln!("chaos:   {fault:<20} {ok:>4} acknowledged, {not:>3} not, longest wait for an acknowledged write {gap} ms");
    }
    if let Some(out) = &out_dir {
        let report = serde_json::json!({
            "seed": seed,
            "rounds": rounds,
            "history": ops,
            "committed": committed,
            "summary": summary,
            "recoveries_ms": recoveries.iter().map(|(f, d)| (f.clone(), d.as_millis() as u64)).collect::<Vec<_>>(),
            "violations": violations,
        });
        let file = out.join(format!("chaos-{seed}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&report).expect("json"))
            .expect("write report");
        eprintln!("chaos: history written to {}", file.display());
    }
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violation(s):\n{}",
        violations.len(),
        violations.join("\n")
    );
    assert!(acked > 0, "the workload got nothing acknowledged");
}
