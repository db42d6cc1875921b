//! `hydrascale-loadgen`: simulates many Tailscale nodes against a Hydrascale cluster with
//! the real protocol (TS2021 Noise session per node, registration with a pre-auth key,
//! streaming zstd map long-poll, endpoint updates) and reports what a user would feel:
//! registrations per second, time to first map, time until all are online, and how long
//! a change takes to reach every node: one node joining, a policy change opening a port,
//! and (with tagged servers) one that changes who sees whom.
//!
//! It speaks only what the official client speaks, so it runs against headscale too
//! (`scripts/bench-vs-headscale.sh`): a pre-auth key, `PUT /api/v1/policy` with an API key,
//! and the TS2021 early payload headscale sends before HTTP/2 (read and dropped by
//! `noise::client`). Memory and CPU come from any Prometheus endpoint with the standard
//! `process_*` series, which headscale's metrics listener has too.
//!
//! Load is open-loop: node i starts at `i / rate` seconds whatever happened to the nodes
//! before it, and latencies count from that scheduled moment, so a slow server cannot
//! hide its slowness by slowing the generator down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "hydrascale-loadgen",
    about = "Simulate Tailscale nodes against Hydrascale"
)]
struct Args {
    /// Control URL of a replica (http://HOST:PORT); repeat to spread nodes over replicas.
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// A reusable pre-auth key.
    #[arg(long)]
    auth_key: String,
    /// A reusable pre-auth key for tagged servers (tag:server): one node in
    /// `--tagged-every` registers with it. Then, after the policy change, a second change
    /// that connects other pairs (members reach only members, so every tagged server
    /// leaves every member's map) is measured too.
    #[arg(long)]
    tagged_auth_key: Option<String>,
    #[arg(long, default_value_t = 10)]
    tagged_every: usize,
    /// How many nodes to simulate.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Node starts per second (open loop).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Give up on a node that has no first map after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Seconds to let the tailnet sit idle after everyone is online, before the probe.
    #[arg(long, default_value_t = 5)]
    settle: u64,
    /// Each node sends an endpoint update every this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    endpoint_interval: u64,
    /// Metrics listeners (HOST:PORT) of the replicas, for memory and CPU figures.
    #[arg(long = "metrics")]
    metrics: Vec<String>,
    /// REST API of a replica (its control URL, http://HOST:PORT) and an API key:
    /// after the join probe, a policy change is made there and its propagation measured.
    #[arg(long, requires = "api_key")]
    api_url: Option<String>,
    #[arg(long)]
    api_key: Option<String>,
}

fn hex32(b: &[u8; 32]) -> String {
    hex::encode(b)
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}

/// Latencies in milliseconds, summarised.
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn summary(&mut self) -> Value {
        if self.0.is_empty() {
            return json!({ "count": 0 });
        }
        self.0.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
            (self.0[i] * 10.0).round() / 10.0
        };
        json!({ "count": self.0.len(), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": q(1.0) })
    }
}

struct Shared {
    first_map: Mutex<Samples>,
    register: Mutex<Samples>,
    online: AtomicUsize,
    /// Nodes (not the probe) whose map stream is open now: what the probes wait for, so
    /// that a node whose session broke after it came online is not waited for.
    streaming: AtomicUsize,
    failed: AtomicUsize,
    /// Sessions that broke, and sessions reopened (by a reconnect) after a node had been
    /// online.
    broken: AtomicUsize,
    reconnected: AtomicUsize,
    /// One node joins: its key, from when it asks to register.
    join: Probe,
    /// A policy change: the port it opens, as every node's packet filter shows it, from
    /// when the change is asked for.
    policy: Probe,
    /// A policy change that hides tagged servers from members: every node has peers
    /// removed.
    reach: Probe,
    /// The first few reasons a node gave up, and a session broke.
    errors: Mutex<Vec<String>>,
    broken_errors: Mutex<Vec<String>>,
}

async fn server_key(url: &str) -> Result<[u8; 32]> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let uri: hyper::Uri =
        format!("{url}/key?v={}", hydrascale::noise::client::CLIENT_VERSION).parse()?;
    let resp = client
        .get(uri)
        .await
        .with_context(|| format!("GET {url}/key"))?;
    let body = resp.into_body().collect().await?.to_bytes();
    let v: Value = serde_json::from_slice(&body).context("/key is not JSON")?;
    let text = v["publicKey"].as_str().context("/key has no publicKey")?;
    let raw = hex::decode(text.trim_start_matches("mkey:"))?;
    raw.try_into()
        .map_err(|_| anyhow::anyhow!("bad public key length"))
}

async fn post(
    h2: &mut hydrascale::noise::client::ControlClient,
    path: &str,
    body: Value,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    h2.ready().await?;
    let req = hyper::Request::post(format!("http://control{path}"))
        .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
    Ok(h2.send_request(req).await?)
}

/// Splits framed map messages (4-byte little-endian length, then zstd JSON) out of `buf`,
/// still compressed: a simulated node only looks inside while it waits for a change, so
/// the generator's own cost stays far below the server's.
fn next_frame(buf: &mut BytesMut) -> Option<BytesMut> {
    if buf.len() < 4 {
        return None;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if buf.len() < 4 + len {
        return None;
    }
    buf.advance(4);
    Some(buf.split_to(len))
}

thread_local! {
    /// One decompression context per thread, reused: a probe decompresses every node's
    /// message, and a fresh context each time cost an allocation and its setup.
    static UNZSTD: std::cell::RefCell<Option<zstd::stream::raw::Decoder<'static>>> =
        const { std::cell::RefCell::new(None) };
    static UNZSTD_BULK: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd frames at least this long (compressed) are kept decoded in [`Decoded`]: the
/// server's shared runs of peers and filter source lists. A stream's own frames are
/// shorter and never repeat.
const DECODED_MIN: usize = 1024;
/// Decoded bytes [`Decoded`] holds before it starts again from empty.
const DECODED_BUDGET: usize = 256 << 20;

/// Frames the generator has already decompressed, by their compressed bytes, decoded.
///
/// The replicas compress a run of peers or a filter's source list once and send the same
/// frame to every node that gets it (`mapper::shared_frames`). Ten thousand simulated nodes on
/// the replicas' own cores decompressed a 72 KB source list each while a policy change
/// was timed: more than a core's worth of the window, taken from the replicas being
/// measured. Real clients each decode their copy on their own machine; here the second
/// and later copies of identical bytes are looked up instead. The key is the whole
/// compressed frame, compared byte for byte, so a lookup cannot return another frame's
/// text.
#[derive(Default)]
struct Decoded {
    frames: std::collections::HashMap<Box<[u8]>, Arc<[u8]>, foldhash::fast::RandomState>,
    bytes: usize,
}

static DECODED: std::sync::LazyLock<Mutex<Decoded>> =
    std::sync::LazyLock::new(|| Mutex::new(Decoded::default()));

/// The text of one zstd frame.
fn decompress_frame(frame: &[u8]) -> Result<Vec<u8>> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    // The replicas' frames say how long their text is: decoded straight into a buffer of
    // that size, without zeroing a chunk for every frame, however small.
    if let Ok(Some(len)) = zstd::zstd_safe::get_frame_content_size(frame) {
        let len = usize::try_from(len).context("zstd frame too long")?;
        return UNZSTD_BULK.with(|cell| -> Result<Vec<u8>> {
            let mut cell = cell.borrow_mut();
            let dec = match &mut *cell {
                Some(d) => d,
                None => cell.insert(zstd::bulk::Decompressor::new()?),
            };
            let text = dec.decompress(frame, len)?;
            if text.len() != len {
                bail!("zstd frame shorter than its header says");
            }
            Ok(text)
        });
    }
    let mut json = Vec::with_capacity(frame.len() * 8);
    UNZSTD.with(|cell| -> Result<()> {
        let mut cell = cell.borrow_mut();
        let dec = match &mut *cell {
            Some(d) => d,
            None => cell.insert(zstd::stream::raw::Decoder::new()?),
        };
        dec.reinit()?;
        let mut input = InBuffer::around(frame);
        let mut chunk = vec![0u8; 128 * 1024];
        // What the last call that moved said is left of its frame: 0 at a frame's end.
        let mut left = 0;
        loop {
            let before = input.pos();
            let mut out = OutBuffer::around(&mut chunk[..]);
            let hint = dec.run(&mut input, &mut out)?;
            let n = out.pos();
            json.extend_from_slice(&chunk[..n]);
            if n == 0 && input.pos() == before {
                if input.pos() < frame.len() || left != 0 {
                    bail!("map message ends inside a zstd frame");
                }
                return Ok(());
            }
            left = hint;
        }
    })?;
    Ok(json)
}

/// The text of one zstd frame, from [`DECODED`] when it is a long one seen before.
fn frame_text(frame: &[u8]) -> Result<Arc<[u8]>> {
    if frame.len() < DECODED_MIN {
        return Ok(decompress_frame(frame)?.into());
    }
    let lock = || DECODED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(text) = lock().frames.get(frame) {
        return Ok(text.clone());
    }
    // Decoded outside the lock: two threads may both decode a new frame, which costs one
    // decompression more but never makes one wait for the other.
    let text: Arc<[u8]> = decompress_frame(frame)?.into();
    let mut d = lock();
    if d.bytes + text.len() > DECODED_BUDGET {
        d.frames.clear();
        d.bytes = 0;
    }
    d.bytes += text.len();
    d.frames.insert(frame.into(), text.clone());
    Ok(text)
}

/// Whether the map message `frame` (zstd frames, one after the other) carries `needle`
/// (a node key, a policy marker), which may straddle frames.
fn mentions(frame: &[u8], needle: &str) -> Result<bool> {
    let needle = needle.as_bytes();
    let finder = memchr::memmem::Finder::new(needle);
    // The end of the text so far, short of a whole needle: where one may begin that ends
    // in the next frame.
    let mut tail: Vec<u8> = Vec::new();
    let keep = needle.len().saturating_sub(1);
    // Cut into frames first, so that a message cut short is an error wherever it is.
    let mut frames = Vec::new();
    let mut rest = frame;
    while !rest.is_empty() {
        let len = zstd::zstd_safe::find_frame_compressed_size(rest)
            .ok()
            .filter(|len| *len <= rest.len())
            .ok_or_else(|| anyhow::anyhow!("map message ends inside a zstd frame"))?;
        let (one, next) = rest.split_at(len);
        frames.push(one);
        rest = next;
    }
    for one in frames {
        let text = frame_text(one)?;
        let mut seam = std::mem::take(&mut tail);
        let joined = !seam.is_empty();
        seam.extend_from_slice(&text[..keep.min(text.len())]);
        if (joined && finder.find(&seam).is_some()) || finder.find(&text).is_some() {
            return Ok(true);
        }
        if text.len() >= keep {
            tail.extend_from_slice(&text[text.len() - keep..]);
        } else {
            // A frame shorter than the needle: the old tail's bytes are still in play.
            let drop = seam.len().saturating_sub(keep);
            seam.drain(..drop);
            tail = seam;
        }
    }
    Ok(false)
}

/// Counts a node in [`Shared::streaming`] for as long as it lives (its map stream is open).
struct Streaming<'a>(&'a AtomicUsize);

impl<'a> Streaming<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Streaming(count)
    }
}

impl Drop for Streaming<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A change every node must see, and what each one saw of it.
#[derive(Default)]
struct Probe {
    /// What to look for in map messages, and when the change was asked for.
    wanted: Mutex<Option<(String, Instant)>>,
    seen: AtomicUsize,
    latency: Mutex<Samples>,
    /// The generator's own CPU time when the change was asked for, then what it spent
    /// until every node saw it: on one machine, CPU the replicas did not have meanwhile.
    cpu: Mutex<(Option<f64>, Option<f64>)>,
}

/// The generator's CPU time so far, in seconds.
fn own_cpu() -> Option<f64> {
    hydrascale::metrics::process_cpu_seconds(std::process::id())
}

impl Probe {
    fn start(&self, needle: String) {
        self.cpu.lock().unwrap_or_else(|p| p.into_inner()).0 = own_cpu();
        *self.wanted.lock().unwrap_or_else(|p| p.into_inner()) = Some((needle, Instant::now()));
    }

    /// Waits (`secs` at most) until every node still `streaming`, and `extra` more, saw
    /// the change.
    async fn wait(&self, streaming: &AtomicUsize, extra: usize, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.seen.load(Ordering::Relaxed) < streaming.load(Ordering::Relaxed) + extra
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        cpu.1 = cpu
            .0
            .zip(own_cpu())
            .map(|(a, b)| ((b - a) * 100.0).round() / 100.0);
    }

    /// What the report says about this change.
    fn report(&self) -> Value {
        json!({
            "propagation_ms": self.latency.lock().unwrap_or_else(|p| p.into_inner()).summary(),
            "saw": self.seen.load(Ordering::Relaxed),
            "loadgen_cpu_s": self.cpu.lock().unwrap_or_else(|p| p.into_inner()).1,
        })
    }

    /// Checks `frame` unless this node already saw the change.
    fn check(&self, frame: &[u8], saw: &mut bool) -> Result<()> {
        if *saw {
            return Ok(());
        }
        let wanted = self
            .wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((needle, at)) = wanted {
            if mentions(frame, &needle)? {
                *saw = true;
                self.latency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .0
                    .push(at.elapsed().as_secs_f64() * 1000.0);
                self.seen.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Why a session ended.
enum Ended {
    /// The server refused the node for good (its key, its registration): a real client
    /// would stop and tell its user, and so does the simulated one.
    Refused(anyhow::Error),
    /// The session broke (connection, keep-alive, a 5xx): a real client reconnects.
    Broken(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Ended {
    fn from(e: E) -> Self {
        Ended::Broken(e.into())
    }
}

/// What a simulated node keeps across its sessions, as a real client keeps its state
/// directory: its keys, whether it is registered, and what it already saw.
struct Node {
    i: usize,
    probe: bool,
    machine: [u8; 32],
    node_key: String,
    disco: String,
    hostinfo: Value,
    registered: bool,
    /// Whether it ever asked to register (the join probe's clock starts then).
    asked: bool,
    /// Sessions that delivered a map: the node is online from the first, and counts as
    /// online once however often it reconnects.
    maps: usize,
    saw_join: bool,
    saw_policy: bool,
    saw_reach: bool,
}

/// One simulated node: connect, register, stream its map until the run ends; when a
/// session breaks, reconnect with tailscaled's backoff (n² × 10 ms after the n-th failure
/// in a row, at most 30 s, times a random 0.5-1.5) and stream again without registering
/// again. Node `i` starts on replica `i % urls` and each reconnect goes to the next one,
/// as a load balancer would send it elsewhere when its replica is down. A node that never
/// had a map within `--timeout` of its scheduled start gives up.
async fn node(
    i: usize,
    server_pub: [u8; 32],
    args: Arc<Args>,
    shared: Arc<Shared>,
    scheduled: Instant,
    probe: bool,
) -> Result<()> {
    let hostname = if probe {
        "probe".to_string()
    } else {
        format!("load-{i}")
    };
    let mut me = Node {
        i,
        probe,
        machine: random32(),
        node_key: format!("nodekey:{}", hex32(&random32())),
        disco: format!("discokey:{}", hex32(&random32())),
        hostinfo: json!({ "Hostname": hostname, "OS": "linux", "GoArch": "amd64", "IPNVersion": "loadgen" }),
        registered: false,
        asked: false,
        maps: 0,
        saw_join: probe,
        saw_policy: false,
        saw_reach: false,
    };
    let mut failures = 0u32;
    let mut sessions = 0;
    loop {
        let url = &args.urls[(i + sessions) % args.urls.len()];
        sessions += 1;
        let maps = me.maps;
        let e = match session(&mut me, url, &server_pub, &args, &shared, scheduled).await {
            Ended::Refused(e) => return Err(e),
            Ended::Broken(e) => e,
        };
        shared.broken.fetch_add(1, Ordering::Relaxed);
        {
            let mut errs = shared
                .broken_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if errs.len() < 5 {
                errs.push(format!("node {i}: {e:#}"));
            }
        }
        if me.maps == 0 && scheduled.elapsed() > Duration::from_secs(args.timeout) {
            return Err(e.context(format!("no map within {} s", args.timeout)));
        }
        if me.maps > maps {
            // The session worked for a while: start backing off afresh.
            failures = 0;
        }
        failures = (failures + 1).min(100);
        let backoff =
            Duration::from_millis(10 * u64::from(failures).pow(2)).min(Duration::from_secs(30));
        let jitter = 0.5 + f64::from(random32()[0]) / 255.0;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
    }
}

/// One Noise session of `me`: register if it never did, then stream its map until the
/// session breaks.
async fn session(
    me: &mut Node,
    url: &str,
    server_pub: &[u8; 32],
    args: &Args,
    shared: &Shared,
    scheduled: Instant,
) -> Ended {
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let mut h2 = match hydrascale::noise::client::connect(addr, server_pub, &me.machine).await {
        Ok(h2) => h2,
        Err(e) => return Ended::Broken(e.into()),
    };
    if !me.registered {
        if let Err(e) = register(me, &mut h2, args, shared, scheduled).await {
            return e;
        }
    }
    match stream(me, &mut h2, args, shared, scheduled).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn register(
    me: &mut Node,
    h2: &mut hydrascale::noise::client::ControlClient,
    args: &Args,
    shared: &Shared,
    scheduled: Instant,
) -> Result<(), Ended> {
    let every = args.tagged_every.max(1);
    let auth_key = match &args.tagged_auth_key {
        Some(k) if !me.probe && me.i % every == every - 1 => k,
        _ => &args.auth_key,
    };
    if me.probe && !me.asked {
        // Published before the request: streams may see the new node before its own
        // registration is acknowledged, and the change starts when it is first asked for
        // (a retry after a 5xx does not restart the clock).
        me.asked = true;
        shared.join.start(me.node_key.clone());
    }
    let resp = post(
        h2,
        "/machine/register",
        json!({
            "Version": hydrascale::noise::client::CLIENT_VERSION,
            "NodeKey": me.node_key,
            "OldNodeKey": format!("nodekey:{}", "0".repeat(64)),
            "Auth": { "AuthKey": auth_key },
            "Hostinfo": me.hostinfo,
        }),
    )
    .await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = || {
        let t = String::from_utf8_lossy(&body);
        format!(
            "register reply ({status}): {}",
            t.chars().take(200).collect::<String>()
        )
    };
    if status.is_server_error() {
        return Err(Ended::Broken(anyhow::anyhow!(text())));
    }
    let reg: Value = serde_json::from_slice(&body)
        .map_err(|e| Ended::Refused(anyhow::Error::new(e).context(text())))?;
    if reg["MachineAuthorized"] != true {
        return Err(Ended::Refused(anyhow::anyhow!(
            "registration refused: {}",
            reg["Error"]
        )));
    }
    me.registered = true;
    if !me.probe {
        shared
            .register
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .push(scheduled.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(())
}

/// Streams `me`'s map until the session breaks; never returns otherwise.
async fn stream(
    me: &mut Node,
    h2: &mut hydrascale::noise::client::ControlClient,
    args: &Args,
    shared: &Shared,
    scheduled: Instant,
) -> Result<std::convert::Infallible, Ended> {
    let i = me.i;
    let endpoint = format!("192.0.2.{}:{}", 1 + i % 250, 40000 + i % 20000);
    let resp = post(
        h2,
        "/machine/map",
        json!({
            "Version": hydrascale::noise::client::CLIENT_VERSION,
            "NodeKey": me.node_key,
            "DiscoKey": me.disco,
            "Stream": true,
            "Compress": "zstd",
            "KeepAlive": true,
            "Endpoints": [endpoint],
            "Hostinfo": me.hostinfo,
        }),
    )
    .await?;
    let status = resp.status();
    if !status.is_success() {
        let e = anyhow::anyhow!("map request answered {status}");
        return Err(if status.is_server_error() {
            Ended::Broken(e)
        } else {
            Ended::Refused(e)
        });
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut first = true;
    let mut _streaming = None;
    let mut updates = tokio::time::interval(Duration::from_secs(args.endpoint_interval.max(1)));
    updates.tick().await;
    let mut counter = 0u32;
    loop {
        tokio::select! {
            frame = body.frame() => {
                let Some(frame) = frame else { return Err(anyhow::anyhow!("map stream ended").into()) };
                if let Ok(data) = frame?.into_data() {
                    buf.extend_from_slice(&data);
                }
                while let Some(msg) = next_frame(&mut buf) {
                    if first {
                        first = false;
                        me.maps += 1;
                        if !me.probe {
                            if me.maps > 1 {
                                shared.reconnected.fetch_add(1, Ordering::Relaxed);
                            } else {
                                shared.first_map.lock().unwrap_or_else(|p| p.into_inner()).0
                                    .push(scheduled.elapsed().as_secs_f64() * 1000.0);
                                shared.online.fetch_add(1, Ordering::Relaxed);
                            }
                            _streaming = Some(Streaming::new(&shared.streaming));
                        }
                    }
                    shared.join.check(&msg, &mut me.saw_join)?;
                    shared.policy.check(&msg, &mut me.saw_policy)?;
                    shared.reach.check(&msg, &mut me.saw_reach)?;
                }
                // A full map of 10,000 peers is half a megabyte; kept as every idle node's
                // buffer it was most of the generator's 5-6 GB at 10k nodes.
                if buf.is_empty() && buf.capacity() > 64 * 1024 {
                    buf = BytesMut::new();
                }
            }
            _ = updates.tick(), if args.endpoint_interval > 0 => {
                counter += 1;
                let ep = format!("192.0.2.{}:{}", 1 + i % 250, 40000 + (i + counter as usize) % 20000);
                // A "lite" update, as clients send when their endpoints change.
                let mut other = h2.clone();
                let nk = me.node_key.clone();
                let d = me.disco.clone();
                tokio::spawn(async move {
                    let _ = post(&mut other, "/machine/map", json!({
                        "Version": hydrascale::noise::client::CLIENT_VERSION, "NodeKey": nk,
                        "DiscoKey": d, "Stream": false, "OmitPeers": true, "Endpoints": [ep],
                    })).await;
                });
            }
        }
    }
}

/// A line on stderr with the wall-clock time, so that what the replicas did at a moment
/// (a profile, a log) can be matched with the phase of the run.
fn progress(what: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    eprintln!("[loadgen {now:.3}] {what}");
}

fn scrape(addr: &str) -> Option<std::collections::BTreeMap<String, f64>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

fn replica_figures(metrics: &[String]) -> Vec<Value> {
    metrics
        .iter()
        .map(|m| match scrape(m) {
            Some(v) => json!({
                "metrics": m,
                "rss_mib": v.get("process_resident_memory_bytes").map(|b| (b / 1048576.0 * 10.0).round() / 10.0),
                "heap_in_use_mib": v.get("hydrascale_heap_in_use_bytes").map(|b| (b / 1048576.0 * 10.0).round() / 10.0),
                "cpu_seconds": v.get("process_cpu_seconds_total"),
                "map_streams": v.get("hydrascale_map_streams"),
            }),
            None => json!({ "metrics": m, "error": "unreachable" }),
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    raise_fd_limit();
    let mut keys = Vec::new();
    for u in &args.urls {
        keys.push(server_key(u).await?);
    }
    if keys.windows(2).any(|w| w[0] != w[1]) {
        bail!("the replicas serve different control keys");
    }
    let server_pub = keys[0];
    let shared = Arc::new(Shared {
        first_map: Mutex::default(),
        register: Mutex::default(),
        online: AtomicUsize::new(0),
        streaming: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        broken: AtomicUsize::new(0),
        reconnected: AtomicUsize::new(0),
        join: Probe::default(),
        policy: Probe::default(),
        reach: Probe::default(),
        errors: Mutex::default(),
        broken_errors: Mutex::default(),
    });
    let before = replica_figures(&args.metrics);
    let start = Instant::now();
    let spawn_node = |i: usize, scheduled: Instant, probe: bool| {
        let (args, shared) = (args.clone(), shared.clone());
        tokio::spawn(async move {
            if let Err(e) = node(i, server_pub, args, shared.clone(), scheduled, probe).await {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                let mut errs = shared.errors.lock().unwrap_or_else(|p| p.into_inner());
                if errs.len() < 5 {
                    errs.push(format!("node {i}: {e:#}"));
                }
            }
        })
    };
    for i in 0..args.nodes {
        let at = start + Duration::from_secs_f64(i as f64 / args.rate);
        tokio::time::sleep_until(at.into()).await;
        spawn_node(i, at, false);
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while shared.online.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < args.nodes
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_online = start.elapsed();
    let online = shared.online.load(Ordering::Relaxed);
    let registered = shared
        .register
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .len();
    // CPU at rest: what the replicas spend over the settle period, everyone connected
    // and nothing changing.
    progress(&format!("{online} online; at rest for {} s", args.settle));
    let settling = replica_figures(&args.metrics);
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let at_rest = replica_figures(&args.metrics);
    let rest_cpu: Vec<Value> = settling
        .iter()
        .zip(&at_rest)
        .map(
            |(a, b)| match (a["cpu_seconds"].as_f64(), b["cpu_seconds"].as_f64()) {
                (Some(x), Some(y)) => {
                    json!(((y - x) / args.settle.max(1) as f64 * 1000.0).round() / 10.0)
                }
                _ => Value::Null,
            },
        )
        .collect();
    // The probe: one node joins; every online node must see it in its map.
    progress(&format!("{online} online; one node joins"));
    spawn_node(args.nodes, Instant::now(), true);
    // The joining node itself is not among those streaming.
    shared.join.wait(&shared.streaming, 0, 60).await;
    let after = replica_figures(&args.metrics);
    // The policy changes: every node's packet filter must show the port the first opens;
    // with tagged servers, every node must lose peers to the second.
    let mut policy_set_ms = None;
    let mut reach_set_ms = None;
    if let (Some(url), Some(key)) = (&args.api_url, &args.api_key) {
        let tagged = args.tagged_auth_key.is_some();
        let owners = json!({ "tag:server": ["bench@"] });
        // An ACL edit, as administrators make them: a rule opening one more port to every
        // member's node. Every node's packet filter changes, and its sources are every
        // member's addresses; who sees whom does not change.
        let port = 20000 + u16::from_le_bytes([random32()[0], random32()[1]]) % 40000;
        let mut policy = json!({
            "acls": [
                { "action": "accept", "src": ["*"], "dst": ["*:*"] },
                { "action": "accept", "src": ["autogroup:member"], "dst": [format!("*:{port}")] },
            ],
        });
        if tagged {
            policy["tagOwners"] = owners.clone();
        }
        let needle = format!("\"First\":{port},\"Last\":{port}");
        policy_set_ms = Some(
            change_policy(url, key, &policy, &shared.policy, needle, &shared.streaming).await?,
        );
        if tagged {
            // Members reach only members: tagged servers leave every member's map, and
            // members leave every server's.
            let policy = json!({
                "tagOwners": owners,
                "acls": [
                    { "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"] },
                ],
            });
            let needle = "\"PeersRemoved\"".to_string();
            reach_set_ms = Some(
                change_policy(url, key, &policy, &shared.reach, needle, &shared.streaming).await?,
            );
        }
    }
    progress("done");
    let after_policy = replica_figures(&args.metrics);
    let report = json!({
        "nodes": args.nodes,
        "replicas": args.urls.len(),
        "rate_per_s": args.rate,
        "registered": registered,
        "online": online,
        "failed": shared.failed.load(Ordering::Relaxed),
        "errors": *shared.errors.lock().unwrap_or_else(|p| p.into_inner()),
        // Sessions that broke (each node then reconnects), and reconnects that brought a
        // node that had been online back to a map stream.
        "sessions_broken": shared.broken.load(Ordering::Relaxed),
        "reconnected": shared.reconnected.load(Ordering::Relaxed),
        "broken_errors": *shared.broken_errors.lock().unwrap_or_else(|p| p.into_inner()),
        "streaming_at_end": shared.streaming.load(Ordering::Relaxed),
        "all_online_s": (all_online.as_secs_f64() * 100.0).round() / 100.0,
        "registrations_per_s": (registered as f64 / all_online.as_secs_f64() * 10.0).round() / 10.0,
        "register_ms": shared.register.lock().unwrap_or_else(|p| p.into_inner()).summary(),
        "first_map_ms": shared.first_map.lock().unwrap_or_else(|p| p.into_inner()).summary(),
        "join": shared.join.report(),
        "policy_set_ms": policy_set_ms,
        "policy": shared.policy.report(),
        "reach_set_ms": reach_set_ms,
        "reach": shared.reach.report(),
        "replicas_before": before,
        "replicas_at_rest": at_rest,
        "cpu_percent_at_rest": rest_cpu,
        "replicas_after": after,
        "replicas_after_policy": after_policy,
        // How much of the machine the generator took from the replicas it measures.
        "loadgen_cpu_seconds": own_cpu().map(|s| (s * 10.0).round() / 10.0),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    std::process::exit(0);
}

/// Sets `policy` and waits (two minutes at most) until every node still `streaming` and
/// the probe node saw `needle` in a map message; returns how long the API call took, in
/// milliseconds.
async fn change_policy(
    url: &str,
    key: &str,
    policy: &Value,
    probe: &Probe,
    needle: String,
    streaming: &AtomicUsize,
) -> Result<f64> {
    progress(&format!("policy change: {policy}"));
    probe.start(needle);
    let took = Instant::now();
    set_policy(url, key, &policy.to_string()).await?;
    let set_ms = (took.elapsed().as_secs_f64() * 10000.0).round() / 10.0;
    probe.wait(streaming, 1, 120).await;
    Ok(set_ms)
}

/// `PUT /api/v1/policy` on the REST API.
async fn set_policy(url: &str, key: &str, policy: &str) -> Result<()> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = hyper::Request::put(format!("{}/api/v1/policy", url.trim_end_matches('/')))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({ "policy": policy }).to_string(),
        )))?;
    let resp = client.request(req).await.context("PUT /api/v1/policy")?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.into_body().collect().await?.to_bytes();
        bail!(
            "policy change refused ({status}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// Thousands of sessions need thousands of descriptors.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message is several zstd frames whose contents join up: a needle across the seam
    /// is found, in messages bigger than one output chunk, with the context reused.
    #[test]
    fn mentions_reads_concatenated_frames() {
        let big = "x".repeat(300 * 1024);
        let mut frame = zstd::bulk::compress(format!("{big}\"First\":41").as_bytes(), 3).unwrap();
        frame.extend(zstd::bulk::compress(b"23,\"Last\":4123", 3).unwrap());
        assert!(mentions(&frame, "\"First\":4123,\"Last\":4123").unwrap());
        assert!(!mentions(&frame, "\"First\":4124").unwrap());
        let short = zstd::bulk::compress(b"{\"PeersRemoved\":[7]}", 3).unwrap();
        assert!(mentions(&short, "PeersRemoved").unwrap());
        assert!(mentions(&frame[..frame.len() - 3], "x").is_err());
        // A frame that does not say how long its text is is decoded as a stream.
        let streamed = zstd::stream::encode_all(&b"{\"PeersRemoved\":[8]}"[..], 3).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&streamed).ok(),
            Some(None)
        );
        let mut both = streamed.clone();
        both.extend_from_slice(&short);
        assert!(mentions(&both, "[8]}{").unwrap());
        assert!(mentions(&streamed[..streamed.len() - 2], "x").is_err());
    }

    /// A needle across three frames, the middle one shorter than it; and long frames
    /// (kept decoded) found again from the cache, byte for byte.
    #[test]
    fn mentions_finds_needles_across_frames_and_in_kept_frames() {
        let z = |t: &[u8]| zstd::bulk::compress(t, 3).unwrap();
        let mut msg = z(b"{\"a\":\"PeersRem");
        msg.extend(z(b"ov"));
        msg.extend(z(b"ed\":[7]}"));
        assert!(mentions(&msg, "PeersRemoved").unwrap());
        assert!(!mentions(&msg, "PeersRemovedX").unwrap());
        // Text that does not compress, so its frame is long enough to be kept.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: String = (0..4000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        let long = z(format!("{noise}\"First\":41").as_bytes());
        assert!(long.len() >= DECODED_MIN);
        for _ in 0..2 {
            let mut m = long.clone();
            m.extend(z(b"23,"));
            assert!(mentions(&m, "\"First\":4123,").unwrap());
            assert!(mentions(&m, &noise[100..140]).unwrap());
            assert!(!mentions(&m, "\"First\":4124").unwrap());
        }
        let kept = DECODED.lock().unwrap();
        assert!(kept.frames.contains_key(&long[..]));
        assert!(!kept.frames.contains_key(&z(b"23,")[..]));
    }
}
