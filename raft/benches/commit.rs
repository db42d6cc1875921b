//! Raft commit benchmark: three real nodes (RocksDB on disk, gRPC over mutual TLS on
//! loopback, the production timing defaults), a trivial application, and writes as the
//! server makes them (`RaftNode::write`: replicated to a majority, fsynced, applied).
//!
//! Measures commit latency (one writer at a time, through the leader and through a
//! follower that forwards), latency under an open-loop rate (counted from each write's
//! scheduled moment, so a stall cannot hide by slowing the writer), throughput with many
//! concurrent writers, and the Raft log's bytes per command.
//!
//! Run with `cargo bench -p hydrascale-raft --bench commit`. Knobs (environment):
//! `RAFT_BENCH_DIR` (where the data directories go; default a temporary directory under
//! the system's; put it on the disk you mean to measure), `RAFT_BENCH_SECS` (per run,
//! default 5), `RAFT_BENCH_SIZE` (command bytes, default 256).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark, not the server: it stops on the first failure"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hydrascale_raft::{Application, RaftConfig, RaftNode};

#[path = "../tests/support/mod.rs"]
mod support;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Counts what it applies: the cheapest deterministic application, so the figures are
/// Raft's (replication, fsync, apply bookkeeping) rather than the tailnet's.
#[derive(Default)]
struct Counter(AtomicU64);

impl Application for Counter {
    fn apply(&self, _index: u64, _command: &[u8]) -> Result<Vec<u8>, String> {
        Ok((self.0.fetch_add(1, Ordering::SeqCst) + 1)
            .to_be_bytes()
            .to_vec())
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.load(Ordering::SeqCst).to_be_bytes().to_vec()
    }
    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        let n = snapshot
            .try_into()
            .map(u64::from_be_bytes)
            .unwrap_or_default();
        self.0.store(n, Ordering::SeqCst);
        Ok(())
    }
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

struct Stats {
    sorted: Vec<Duration>,
}

impl Stats {
    fn new(mut v: Vec<Duration>) -> Stats {
        v.sort();
        Stats { sorted: v }
    }
    fn q(&self, q: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let i = ((self.sorted.len() as f64 * q).ceil() as usize).clamp(1, self.sorted.len()) - 1;
        self.sorted[i].as_secs_f64() * 1e3
    }
    fn line(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} writes)",
            self.q(0.5),
            self.q(0.99),
            self.q(0.999),
            self.q(1.0),
            self.sorted.len()
        )
    }
}

fn command(size: usize, n: u64) -> Vec<u8> {
    let mut c = vec![b'x'; size.max(8)];
    c[..8].copy_from_slice(&n.to_be_bytes());
    c
}

async fn sequential(node: &RaftNode, count: u64, size: usize, seq: &AtomicU64) -> Stats {
    let mut lat = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let c = command(size, seq.fetch_add(1, Ordering::Relaxed));
        let t = Instant::now();
        node.write(c).await.expect("write");
        lat.push(t.elapsed());
    }
    Stats::new(lat)
}

/// Writes at `rate` per second for `secs`, each counted from its scheduled moment.
async fn open_loop(
    node: &RaftNode,
    rate: f64,
    secs: u64,
    size: usize,
    seq: &Arc<AtomicU64>,
) -> (Stats, u64) {
    let start = Instant::now() + Duration::from_millis(50);
    let total = (rate * secs as f64) as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        let node = node.clone();
        let seq = seq.clone();
        tasks.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let c = command(size, seq.fetch_add(1, Ordering::Relaxed));
            node.write(c).await.ok().map(|_| at.elapsed())
        });
    }
    let mut lat = Vec::new();
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        match r.ok().flatten() {
            Some(d) => lat.push(d),
            None => failed += 1,
        }
    }
    (Stats::new(lat), failed)
}

/// `writers` concurrent writers, each writing as soon as its last write committed.
async fn closed_loop(
    node: &RaftNode,
    writers: usize,
    secs: u64,
    size: usize,
    seq: &Arc<AtomicU64>,
) -> (f64, Stats) {
    let end = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let node = node.clone();
        let seq = seq.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let c = command(size, seq.fetch_add(1, Ordering::Relaxed));
                let t = Instant::now();
                if node.write(c).await.is_ok() {
                    lat.push(t.elapsed());
                }
            }
            lat
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r.unwrap_or_default());
    }
    let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    (rate, Stats::new(lat))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` must not run it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("commit: run with `cargo bench -p hydrascale-raft --bench commit`");
        return;
    }
    let secs: u64 = env_or("RAFT_BENCH_SECS", 5);
    let size: usize = env_or("RAFT_BENCH_SIZE", 256);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let root = match std::env::var_os("RAFT_BENCH_DIR") {
            Some(d) => tempfile::tempdir_in(d),
            None => tempfile::tempdir(),
        }
        .expect("bench dir");
        let ca = hydrascale_raft::tls::generate_ca().expect("ca");
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            let cfg = RaftConfig {
                node_id: id,
                data_dir: root.path().join(format!("n{id}")),
                tls: Some(support::tls_for(&ca, id)),
                ..Default::default()
            };
            nodes.push(
                RaftNode::start(cfg, Arc::new(Counter::default()))
                    .await
                    .expect("start"),
            );
        }
        nodes[0].initialize_single().await.expect("init");
        support::add_voters(&nodes[0], &nodes[1..]).await;
        let leader = &nodes[0];
        let follower = &nodes[1];
        let seq = Arc::new(AtomicU64::new(0));
        println!(
            "raft commit: 3 nodes, mutual TLS on loopback, RocksDB in {}, {size}-byte commands",
            root.path().display()
        );

        // Warm-up: connections, RocksDB's first files.
        sequential(leader, 200, size, &seq).await;

        let before = dir_bytes(&root.path().join("n1"));
        let n = 2000;
        let s = sequential(leader, n, size, &seq).await;
        let after = dir_bytes(&root.path().join("n1"));
        println!("one writer, through the leader:    {}", s.line());
        println!(
            "Raft log on disk per {size}-byte command: {} bytes",
            after.saturating_sub(before) / n
        );
        let s = sequential(follower, 1000, size, &seq).await;
        println!("one writer, through a follower:    {}", s.line());
        for rate in [200.0, 1000.0, 2000.0] {
            let (s, failed) = open_loop(leader, rate, secs, size, &seq).await;
            println!(
                "open loop {rate:>5}/s for {secs} s: {failed} failed; from schedule: {}",
                s.line()
            );
        }
        for writers in [1usize, 16, 128] {
            let (rate, s) = closed_loop(leader, writers, secs, size, &seq).await;
            println!(
                "{writers:>3} writers flat out:  {rate:>8.0} commits/s, {}",
                s.line()
            );
        }
        let (rate, s) = closed_loop(leader, 16, secs, 4096, &seq).await;
        println!(
            " 16 writers, 4 KiB commands: {rate:>8.0} commits/s ({:.1} MB/s), {}",
            rate * 4096.0 / 1e6,
            s.line()
        );
        for n in &nodes {
            let _ = n.shutdown().await;
        }
    });
}
