//! What a TS2021 session costs the way the control plane uses it: HTTP/2 (hyper, on both
//! ends) over the Noise transport over real loopback TCP connections, a replica's map
//! stream on one side and a client reading it on the other. Reported as CPU time of the
//! whole process (both ends, the kernel's TCP on both, user and system time from
//! `getrusage`) per message, or per keep-alive ping answered.
//!
//! Three cases, each the shape of something the 10,000-node runs measure:
//! - **one stream**: messages sent back to back on one map stream (a full map, a long
//!   burst to one node);
//! - **fan-out**: one message to each of many open sessions at once, as a policy change
//!   sends every node its new packet filter;
//! - **idle pings**: many sessions at rest, hyper pinging each peer every
//!   `NOISE_BENCH_PING_MS` and the peer answering, as a replica at rest does every 30 s;
//!   the CPU per ping answered.
//!
//! Run with `cargo bench --bench noise_sessions`; knobs: `NOISE_BENCH_SESSIONS` (1000),
//! `NOISE_BENCH_ROUNDS` (3, the best kept), `NOISE_BENCH_PING_MS` (200),
//! `NOISE_BENCH_IDLE_SECS` (5).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark, not the server: it stops on the first failure"
)]

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

fn cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given; no other preconditions.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

/// The Noise transport over `s`, as a replica and a client each run it.
fn transport(
    s: TcpStream,
    rx: [u8; 32],
    tx: [u8; 32],
) -> impl AsyncRead + AsyncWrite + Send + Unpin {
    hydrascale::noise::NoiseStream::new(s, rx, tx)
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, (server, _)) = (client.expect("connect"), server.expect("accept"));
    for s in [&client, &server] {
        s.set_nodelay(true).expect("nodelay");
    }
    (client, server)
}

type Feed = tokio::sync::mpsc::Sender<Bytes>;

/// One session: the server end answers its one request with a body fed through the
/// returned channel (as a map stream is); the client end reads what arrives and reports
/// each message's bytes on `got`. `ping`: hyper's keep-alive interval on the server.
async fn session(ping: Option<Duration>, got: tokio::sync::mpsc::UnboundedSender<usize>) -> Feed {
    let (c, s) = pair().await;
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    let (feed_tx, feed_rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let feed_rx = std::sync::Mutex::new(Some(feed_rx));
    let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
        let rx = feed_rx.lock().expect("feed").take();
        async move {
            let stream = futures::stream::unfold(rx, |rx| async move {
                let mut rx = rx?;
                let b = rx.recv().await?;
                Some((Ok::<_, Infallible>(Frame::data(b)), Some(rx)))
            });
            Ok::<_, Infallible>(hyper::Response::new(StreamBody::new(stream)))
        }
    });
    let mut server = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    server
        .timer(TokioTimer::new())
        .keep_alive_interval(ping)
        .keep_alive_timeout(Duration::from_secs(600));
    let conn = server.serve_connection(TokioIo::new(transport(s, k1, k2)), svc);
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(256 * 1024)
        .handshake::<_, Full<Bytes>>(TokioIo::new(transport(c, k2, k1)))
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = send
        .send_request(
            hyper::Request::post("/stream")
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("response");
    tokio::spawn(async move {
        let _keep = send;
        let mut body = resp.into_body();
        while let Some(Ok(f)) = body.frame().await {
            if let Ok(d) = f.into_data() {
                let _ = got.send(d.len());
            }
        }
    });
    feed_tx
}

/// Waits until `bytes` have arrived on `got`.
async fn until(got: &mut tokio::sync::mpsc::UnboundedReceiver<usize>, bytes: usize) {
    let mut seen = 0;
    while seen < bytes {
        seen += got.recv().await.expect("sessions alive");
    }
}

async fn one_stream(size: usize, messages: usize) -> Duration {
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let feed = session(None, tx).await;
    let msg = Bytes::from(vec![0x5au8; size]);
    let cpu0 = cpu();
    let writer = tokio::spawn(async move {
        for _ in 0..messages {
            feed.send(msg.clone()).await.expect("feed");
        }
        feed
    });
    until(&mut got, size * messages).await;
    let took = cpu() - cpu0;
    drop(writer.await.expect("writer"));
    took
}

async fn fan_out(size: usize, sessions: usize) -> Duration {
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let mut feeds = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        feeds.push(session(None, tx.clone()).await);
    }
    // Let the handshakes' and first requests' work settle before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msg = Bytes::from(vec![0x5au8; size]);
    let cpu0 = cpu();
    for f in &feeds {
        f.send(msg.clone()).await.expect("feed");
    }
    until(&mut got, size * sessions).await;
    cpu() - cpu0
}

async fn idle_pings(sessions: usize, every: Duration, secs: u64) -> (Duration, f64) {
    let (tx, _got) = tokio::sync::mpsc::unbounded_channel();
    let mut feeds = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        feeds.push(session(Some(every), tx.clone()).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu0, wall) = (cpu(), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let took = cpu() - cpu0;
    // Each session's peer answers a ping about every `every` (hyper pings that long after
    // the last answer).
    let pings = sessions as f64 * wall.elapsed().as_secs_f64() / every.as_secs_f64();
    drop(feeds);
    (took, pings)
}

/// Two sockets per session: raise the soft limit on open files to the hard one.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write the struct they are given.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn main() {
    raise_fd_limit();
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let sessions = env("NOISE_BENCH_SESSIONS", 1000) as usize;
    let rounds = env("NOISE_BENCH_ROUNDS", 3);
    let ping = Duration::from_millis(env("NOISE_BENCH_PING_MS", 200));
    let idle = env("NOISE_BENCH_IDLE_SECS", 5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let best = |f: &dyn Fn() -> Duration| (0..rounds).map(|_| f()).min().unwrap_or_default();
    println!("| case | message | count | CPU per message |");
    println!("|---|---|---|---|");
    for size in [200usize, 6 * 1024, 1 << 20] {
        let messages = ((256 << 20) / size).clamp(100, 20_000);
        let cpu = best(&|| rt.block_on(one_stream(size, messages)));
        println!(
            "| one stream | {size} B | {messages} | {:.1} µs |",
            cpu.as_secs_f64() * 1e6 / messages as f64
        );
    }
    for size in [200usize, 6 * 1024] {
        let cpu = best(&|| rt.block_on(fan_out(size, sessions)));
        println!(
            "| fan-out to {sessions} sessions | {size} B | {sessions} | {:.1} µs |",
            cpu.as_secs_f64() * 1e6 / sessions as f64
        );
    }
    let (cpu, pings) = (0..rounds)
        .map(|_| rt.block_on(idle_pings(sessions, ping, idle)))
        .min_by_key(|(cpu, _)| *cpu)
        .unwrap_or_default();
    println!(
        "| {sessions} idle sessions, a ping every {} ms | ping + answer | {pings:.0} | {:.1} µs |",
        ping.as_millis(),
        cpu.as_secs_f64() * 1e6 / pings.max(1.0)
    );
}
