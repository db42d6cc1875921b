//! DERP relay benchmark against real `hydrascale serve` processes.
//!
//! Starts a three-replica cluster (so the replicas' DERP servers mesh), then
//! measures with the DERP wire protocol the official client speaks:
//!
//! * throughput: sender/receiver pairs pushing 1,400-byte packets flat out
//!   through one replica, across the mesh (sender on replica 1, receiver on
//!   replica 2), and around all three (1 to 2, 2 to 3, 3 to 1); delivered
//!   packets/s, bytes/s, the share dropped by the bounded per-client queues,
//!   and packets per CPU-second the replicas spent (per core: the generator
//!   shares the machine, so wall-clock rates alone would undercount);
//! * latency: one-way latency of 1,400-byte packets sent on a fixed schedule
//!   (measured from the scheduled send time, so a stalled relay cannot hide
//!   its stall by slowing the sender down), through one replica and across;
//! * memory: resident memory of replica 1 before and after opening many idle
//!   client connections, divided by their number.
//!
//! Run with `cargo bench --bench derp_relay`. Knobs (environment):
//! `DERP_BENCH_SECS` (throughput run length, default 5), `DERP_BENCH_PAIRS`
//! (default 4), `DERP_BENCH_RATE` (latency run, packets/s, default 2000),
//! `DERP_BENCH_IDLE` (idle connections, default 2000).
//!
//! Side by side (`scripts/bench-vs-derper.sh`): `DERP_BENCH_REPLICAS=1` runs one replica
//! alone (no mesh, no Raft peers), and `DERP_BENCH_DERPER=/path/to/derper` runs
//! Tailscale's `derper` (plain HTTP on loopback, STUN off, like the replicas here) instead,
//! under the same single-server measurements. `DERP_BENCH_PORT_BASE` takes the servers'
//! ports from there upwards instead of from the kernel's ephemeral range.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark, not the server: it stops on the first failure"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hydrascale::derp::{DerpClient, Frame};
use rand::RngCore;
use tokio::time::timeout;

const PACKET: usize = 1400;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The next port from `DERP_BENCH_PORT_BASE` that is free for TCP and UDP, if it is set.
fn next_base_port() -> Option<u16> {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU16> = std::sync::OnceLock::new();
    let base: u16 = std::env::var("DERP_BENCH_PORT_BASE").ok()?.parse().ok()?;
    let next = NEXT.get_or_init(|| std::sync::atomic::AtomicU16::new(base));
    loop {
        let p = next.fetch_add(1, Ordering::Relaxed);
        assert!(
            p >= base && p < base.saturating_add(1000),
            "DERP_BENCH_PORT_BASE: no free port in the 1000 above {base}"
        );
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        {
            return Some(p);
        }
    }
}

fn free_port() -> u16 {
    next_base_port().unwrap_or_else(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    })
}

fn free_udp_port() -> u16 {
    next_base_port().unwrap_or_else(|| {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("free udp port")
    })
}

struct Replica {
    control: String,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) the replicas have used so far.
fn cpu_secs(replicas: &[Replica]) -> f64 {
    replicas
        .iter()
        .filter_map(|r| hydrascale::metrics::process_cpu_seconds(r.child.id()))
        .sum()
}

impl Replica {
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Tailscale's `derper` at `bin`, alone, plain HTTP on a loopback port, STUN and the
/// HTTP-port redirect off, clients not verified (as the replicas here).
fn start_derper(dir: &Path, bin: &str) -> Replica {
    let port = free_port();
    let log = std::fs::File::create(dir.join("derper.log")).expect("log");
    let child = Command::new(bin)
        .arg("-a")
        .arg(format!("127.0.0.1:{port}"))
        .args(["-stun=false", "-http-port=-1", "-hostname", "127.0.0.1"])
        .arg("-c")
        .arg(dir.join("derper.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start derper");
    Replica {
        control: format!("127.0.0.1:{port}"),
        child,
    }
}

fn start_cluster(dir: &Path, replicas: u64) -> Vec<Replica> {
    let ids: Vec<u64> = (1..=replicas).collect();
    let ports: Vec<(u16, u16, u16, u16)> = ids
        .iter()
        .map(|_| (free_port(), free_port(), free_port(), free_udp_port()))
        .collect();
    let peers = ids
        .iter()
        .zip(&ports)
        .map(|(id, p)| format!("{id}=127.0.0.1:{}", p.2))
        .collect::<Vec<_>>()
        .join(",");
    // Raft between replicas runs over mutual TLS, as in any real cluster.
    let certs = dir.join("certs");
    let ids_arg = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let made = Command::new(env!("CARGO_BIN_EXE_hydrascale"))
        .args(["cluster", "certs", "--out"])
        .arg(&certs)
        .args(["--ids", &ids_arg])
        .stdout(Stdio::null())
        .status()
        .expect("hydrascale cluster certs");
    assert!(made.success(), "hydrascale cluster certs failed");
    let mut out = Vec::new();
    for (id, (control, admin, raft, stun)) in ids.iter().zip(ports) {
        let rdir = dir.join(format!("r{id}"));
        std::fs::create_dir_all(&rdir).expect("replica dir");
        let toml = format!(
            r#"server_url = "http://127.0.0.1:{control}"
listen_addr = "127.0.0.1:{control}"
admin_listen_addr = "127.0.0.1:{admin}"
raft_listen_addr = "127.0.0.1:{raft}"
metrics_listen_addr = "127.0.0.1:0"
data_dir = "{data}"
node_id = {id}

[derp]
hostname = "127.0.0.1"
port = {control}
stun_listen_addr = "127.0.0.1:{stun}"
# The benchmark's clients are not registered nodes.
verify_clients = false

[cluster]
peers = "{peers}"
tls_dir = "{tls}"

[limits]
# Every benchmark client connects from 127.0.0.1 (derper has no such limit).
max_connections_per_address = 0
"#,
            data = rdir.join("data").display(),
            tls = certs.join(format!("replica-{id}")).display(),
        );
        let cfg = rdir.join("hydrascale.toml");
        std::fs::write(&cfg, toml).expect("write config");
        let log = std::fs::File::create(rdir.join("hydrascale.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_hydrascale"))
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("HYDRASCALE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start hydrascale serve");
        out.push(Replica {
            control: format!("127.0.0.1:{control}"),
            child,
        });
    }
    out
}

/// Whether `path` on `addr` answers 200 (`/ready` on a replica, `/derp/probe` on derper).
fn ready(addr: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200")
}

fn key() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    k
}

async fn connect(addr: &str) -> DerpClient {
    timeout(
        Duration::from_secs(10),
        DerpClient::connect(addr, key(), None),
    )
    .await
    .expect("DERP connect timed out")
    .expect("DERP connect")
}

/// Sends until one packet crosses from `a` to `b`: the mesh link between the
/// replicas comes up asynchronously after they form a cluster.
async fn wait_path(a: &DerpClient, b: &mut DerpClient) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        a.send_packet(b.public_key(), b"probe")
            .await
            .expect("send probe");
        let got = timeout(Duration::from_millis(500), async {
            loop {
                match b.recv().await {
                    Ok(Frame::RecvPacket { .. }) => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
        })
        .await;
        if got == Ok(true) {
            return;
        }
    }
    panic!("no DERP path between the two clients after 60 s");
}

struct Throughput {
    sent: u64,
    delivered: u64,
    secs: f64,
    /// CPU seconds the replicas used during the run.
    cpu: f64,
}

/// Pair `i` sends from `routes[i % routes.len()].0` to `.1`.
async fn throughput(
    replicas: &[Replica],
    routes: &[(&str, &str)],
    pairs: usize,
    secs: u64,
) -> Throughput {
    let mut clients = Vec::new();
    for i in 0..pairs {
        let (src_addr, dst_addr) = routes[i % routes.len()];
        let a = connect(src_addr).await;
        let mut b = connect(dst_addr).await;
        wait_path(&a, &mut b).await;
        clients.push((a, b));
    }
    let sent = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for (a, b) in clients {
        let dst = b.public_key();
        let (mut rd, _w) = b.split();
        let delivered = delivered.clone();
        let stop_r = stop.clone();
        tasks.push(tokio::spawn(async move {
            while !stop_r.load(Ordering::Relaxed) {
                match timeout(Duration::from_millis(200), rd.recv()).await {
                    Ok(Ok(Frame::RecvPacket { packet, .. })) if packet.len() == PACKET => {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(_)) => break,
                }
            }
        }));
        let sent = sent.clone();
        let stop_s = stop.clone();
        tasks.push(tokio::spawn(async move {
            let payload = vec![0xa5u8; PACKET];
            while !stop_s.load(Ordering::Relaxed) {
                if a.send_packet(dst, &payload).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let cpu_before = cpu_secs(replicas);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let sent_n = sent.load(Ordering::Relaxed);
    let cpu = cpu_secs(replicas) - cpu_before;
    // Let packets already in flight land before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let delivered_n = delivered.load(Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Throughput {
        sent: sent_n,
        delivered: delivered_n,
        secs: elapsed,
        cpu,
    }
}

/// One-way latencies in microseconds: from the scheduled send time (what a sender on a
/// fixed schedule experiences, the load generator's own timer lag included) and from the
/// moment the packet was handed to the socket (the relay path alone).
struct Latency {
    from_schedule: Vec<u64>,
    from_send: Vec<u64>,
    sent: u64,
}

fn pct(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

async fn latency(src_addr: &str, dst_addr: &str, rate: u64, secs: u64) -> Latency {
    let a = connect(src_addr).await;
    let mut b = connect(dst_addr).await;
    wait_path(&a, &mut b).await;
    let dst = b.public_key();
    let (mut rd, _w) = b.split();
    let t0 = Instant::now();
    let total = rate * secs;
    let receiver = tokio::spawn(async move {
        let mut from_schedule = Vec::with_capacity(total as usize);
        let mut from_send = Vec::with_capacity(total as usize);
        let deadline = Duration::from_secs(secs + 2);
        while from_schedule.len() < total as usize && t0.elapsed() < deadline {
            match timeout(Duration::from_millis(200), rd.recv()).await {
                Ok(Ok(Frame::RecvPacket { packet, .. })) if packet.len() == PACKET => {
                    let now = t0.elapsed().as_micros() as u64;
                    let field = |at: usize| {
                        let mut ts = [0u8; 8];
                        ts.copy_from_slice(&packet[at..at + 8]);
                        u64::from_le_bytes(ts)
                    };
                    from_schedule.push(now.saturating_sub(field(0)));
                    from_send.push(now.saturating_sub(field(8)));
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => break,
            }
        }
        (from_schedule, from_send)
    });
    let interval_us = 1_000_000 / rate.max(1);
    let mut payload = vec![0u8; PACKET];
    for i in 0..total {
        let scheduled = i * interval_us;
        let target = t0 + Duration::from_micros(scheduled);
        tokio::time::sleep_until(target.into()).await;
        payload[..8].copy_from_slice(&scheduled.to_le_bytes());
        let sent_at = t0.elapsed().as_micros() as u64;
        payload[8..16].copy_from_slice(&sent_at.to_le_bytes());
        a.send_packet(dst, &payload).await.expect("send");
    }
    let (mut from_schedule, mut from_send) = receiver.await.expect("receiver");
    from_schedule.sort_unstable();
    from_send.sort_unstable();
    Latency {
        from_schedule,
        from_send,
        sent: total,
    }
}

fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            return lim.rlim_cur;
        }
    }
    1024
}

async fn idle_memory(replica: &Replica, n: usize) -> (usize, u64, u64) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = replica.rss_kib();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        match timeout(
            Duration::from_secs(10),
            DerpClient::connect(&replica.control, key(), None),
        )
        .await
        {
            Ok(Ok(c)) => conns.push(c),
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = replica.rss_kib();
    let opened = conns.len();
    drop(conns);
    (opened, before, after)
}

fn report_throughput(name: &str, t: &Throughput) {
    let pps = t.delivered as f64 / t.secs;
    let drop_pct = if t.sent > 0 {
        100.0 * (t.sent.saturating_sub(t.delivered)) as f64 / t.sent as f64
    } else {
        0.0
    };
    println!(
        "{name:<28} delivered {pps:>10.0} pkt/s  {:>8.1} MB/s  (offered {:.0} pkt/s, {drop_pct:.1}% dropped by full queues); replicas used {:.2} cores: {:.0} pkt/s per core",
        pps * PACKET as f64 / 1e6,
        t.sent as f64 / t.secs,
        t.cpu / t.secs,
        t.delivered as f64 / t.cpu.max(1e-9),
    );
}

fn report_latency(name: &str, rate: u64, l: &Latency) {
    for (what, v) in [
        ("from send", &l.from_send),
        ("from schedule", &l.from_schedule),
    ] {
        println!(
            "{name:<28} {rate} pkt/s, {what:<13}: p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} of {} delivered)",
            pct(v, 0.50),
            pct(v, 0.99),
            pct(v, 0.999),
            pct(v, 1.0),
            v.len(),
            l.sent,
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // special but must not run a multi-minute benchmark.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("derp_relay: run with `cargo bench --bench derp_relay`");
        return;
    }
    let secs: u64 = env_or("DERP_BENCH_SECS", 5);
    let pairs: usize = env_or("DERP_BENCH_PAIRS", 4);
    let rate: u64 = env_or("DERP_BENCH_RATE", 2000);
    let idle: usize = env_or("DERP_BENCH_IDLE", 2000);
    let fd_limit = raise_fd_limit();

    let derper = std::env::var("DERP_BENCH_DERPER").ok();
    let count: u64 = if derper.is_some() {
        1
    } else {
        env_or("DERP_BENCH_REPLICAS", 3u64).clamp(1, 3)
    };

    let tmp = std::env::temp_dir().join(format!("hydrascale-derp-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("bench dir");
    let (replicas, probe_path) = match &derper {
        Some(bin) => (vec![start_derper(&tmp, bin)], "/derp/probe"),
        None => (start_cluster(&tmp, count), "/ready"),
    };
    let server = match &derper {
        Some(bin) => format!("derper ({bin})"),
        None => format!("hydrascale, {count} replica(s)"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !replicas.iter().all(|r| ready(&r.control, probe_path)) {
        assert!(
            Instant::now() < deadline,
            "replicas not ready after 60 s; logs in {}",
            tmp.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.control.as_str()).collect();
    let r1 = addrs[0];
    println!(
        "DERP relay benchmark, {server}: {} CPUs, {PACKET}-byte packets, {pairs} sender/receiver pairs, {secs} s per throughput run",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    rt.block_on(async {
        let t = throughput(&replicas, &[(r1, r1)], pairs, secs).await;
        report_throughput("throughput, one replica", &t);
        if let [_, r2, ..] = addrs[..] {
            let t = throughput(&replicas, &[(r1, r2)], pairs, secs).await;
            report_throughput("throughput, across mesh", &t);
        }
        if let [_, r2, r3] = addrs[..] {
            let around = [(r1, r2), (r2, r3), (r3, r1)];
            let t = throughput(&replicas, &around, pairs.div_ceil(3) * 3, secs).await;
            report_throughput("throughput, all three", &t);
        }
        let l = latency(r1, r1, rate, secs).await;
        report_latency("latency, one replica", rate, &l);
        if let [_, r2, ..] = addrs[..] {
            let l = latency(r1, r2, rate, secs).await;
            report_latency("latency, across mesh", rate, &l);
        }
        let want = idle.min(fd_limit.saturating_sub(200) as usize);
        let (opened, before, after) = idle_memory(&replicas[0], want).await;
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / opened.max(1) as f64;
        println!(
            "idle connections            {opened} opened: replica RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
            per / 1024.0
        );
    });
    drop(rt);
    drop(replicas);
    let _ = std::fs::remove_dir_all(&tmp);
}
