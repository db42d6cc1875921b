//! What the TS2021 record layer costs per map message, end to end over a real loopback
//! TCP connection: one side's transport (`noise::NoiseStream`) encrypts messages
//! written to it into records (one flush per message, as HTTP/2 flushes after each batch
//! of frames), the other side's decrypts them. Reported
//! per message and size: CPU time of the whole process (both transports, the kernel's
//! TCP on both ends, user and system time from `getrusage`) and wall time.
//!
//! Sizes stand for a keep-alive-sized update (200 B), a policy change's delta (16 KiB)
//! and a full map of thousands of peers (1 MiB). The writer sends its messages back to
//! back while the reader takes them, as a replica's many streams keep its cores busy
//! during a change: the figure is the work per message, not one message's latency.
//!
//! Run with `cargo bench --bench noise_records`; `NOISE_BENCH_MESSAGES` (default 20000,
//! scaled down for large sizes) and `NOISE_BENCH_ROUNDS` (default 3; the best is kept).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark, not the server: it stops on the first failure"
)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given; no other preconditions.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given; no other preconditions.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

async fn round(size: usize, messages: usize) -> (Duration, Duration) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, server) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (client, (server, _)) = (client.expect("connect"), server.expect("accept"));
    for s in [&client, &server] {
        s.set_nodelay(true).expect("nodelay");
    }
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    let mut sender = hydrascale::noise::NoiseStream::new(server, k1, k2);
    let mut receiver = hydrascale::noise::NoiseStream::new(client, k2, k1);
    let msg = vec![0x5au8; size];
    let mut got = vec![0u8; size];
    let (wall, cpu0) = (Instant::now(), cpu());
    let writer = tokio::spawn(async move {
        for _ in 0..messages {
            sender.write_all(&msg).await.expect("write");
            sender.flush().await.expect("flush");
        }
        sender
    });
    for _ in 0..messages {
        receiver.read_exact(&mut got).await.expect("read");
    }
    let took = (wall.elapsed(), cpu() - cpu0);
    drop(writer.await.expect("writer"));
    took
}

fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let base = env("NOISE_BENCH_MESSAGES", 20_000);
    let rounds = env("NOISE_BENCH_ROUNDS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("| message | messages | CPU per message | wall per message | MB/s |");
    println!("|---|---|---|---|---|");
    for size in [200, 16 * 1024, 1 << 20] {
        // About 256 MiB in all, and never fewer than 100 messages.
        let messages = ((256 << 20) / size).clamp(100, base);
        let best = (0..rounds)
            .map(|_| rt.block_on(round(size, messages)))
            .min_by_key(|(_, cpu)| *cpu);
        if let Some((wall, cpu)) = best {
            println!(
                "| {size} B | {messages} | {:.1} µs | {:.1} µs | {:.0} |",
                cpu.as_secs_f64() * 1e6 / messages as f64,
                wall.as_secs_f64() * 1e6 / messages as f64,
                (size * messages) as f64 / wall.as_secs_f64() / 1e6
            );
        }
    }
}
