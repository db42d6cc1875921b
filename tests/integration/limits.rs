//! Bounded resources, attacked against real `hydrascale serve` processes: a burst of
//! key-less logins, an oversized Hostinfo, a thousand map streams of one node, a thousand
//! idle connections, and the PROXY protocol behind HAProxy. Each test asserts the
//! refusal, that nothing in the tailnet changed (nodes, the Raft log), and that a real
//! client (the official one where it matters) is still served.
//!
//! The attackers speak TS2021 with the crate's own Noise client from 127.0.0.2 (or
//! 127.0.0.3 through HAProxy); the official client runs from 127.0.0.1, so the two are
//! different client addresses to the replica.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::fixtures::{
    free_port, http_get, require_tailscale, user_with_reusable_key, wait_for, ReplicaProc,
    Tailscaled,
};

type H2 = hydrascale::noise::client::ControlClient;

const ATTACKER: &str = "127.0.0.2";

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}

fn nodekey() -> String {
    format!("nodekey:{}", hex::encode(random32()))
}

fn discokey() -> String {
    format!("discokey:{}", hex::encode(random32()))
}

/// A one-replica cluster (`hydrascale serve`) with extra `--set` arguments.
async fn replica(root: &Path, extra: &[&str]) -> ReplicaProc {
    let mut r = ReplicaProc::new(root, 1);
    r.write_config(&format!("http://{}", r.control), "", false);
    r.start_with(extra);
    r.wait_ready().await;
    r
}

/// The control key from `/key`, as a client learns it.
fn server_key(control: &str) -> [u8; 32] {
    let (code, body) = http_get(control, "/key?v=142").expect("/key answers");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("/key is JSON");
    let text = v["publicKey"].as_str().expect("publicKey");
    hex::decode(text.trim_start_matches("mkey:"))
        .expect("hex")
        .try_into()
        .expect("32 bytes")
}

/// A TCP connection to `to` from source address `from` (any port).
async fn tcp_from(from: &str, to: &str) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from.parse::<IpAddr>().expect("ip"), 0))?;
    s.connect(to.parse().expect("addr")).await
}

/// A Noise session from source address `from` as the machine `secret`.
async fn session(from: &str, control: &str, key: &[u8; 32], secret: &[u8; 32]) -> Option<H2> {
    let tcp = tcp_from(from, control).await.ok()?;
    hydrascale::noise::client::connect_over(tcp, control, key, secret)
        .await
        .ok()
}

async fn post(h2: &mut H2, path: &str, body: Vec<u8>) -> Option<(u16, Vec<u8>)> {
    h2.ready().await.ok()?;
    let req = hyper::Request::post(format!("http://control{path}"))
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let resp = h2.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes()
        .to_vec();
    Some((status, body))
}

fn register_body(node_key: &str, auth_key: Option<&str>, hostinfo: Value) -> Vec<u8> {
    let mut req = json!({
        "Version": 142,
        "NodeKey": node_key,
        "OldNodeKey": format!("nodekey:{}", "0".repeat(64)),
        "Hostinfo": hostinfo,
    });
    if let Some(k) = auth_key {
        req["Auth"] = json!({ "AuthKey": k });
    }
    serde_json::to_vec(&req).expect("json")
}

fn map_body(
    node_key: &str,
    disco: &str,
    stream: bool,
    hostinfo: Value,
    endpoints: Value,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "Version": 142,
        "NodeKey": node_key,
        "DiscoKey": disco,
        "Stream": stream,
        "OmitPeers": !stream,
        "Compress": "zstd",
        "Hostinfo": hostinfo,
        "Endpoints": endpoints,
    }))
    .expect("json")
}

/// One map message from `buf` (4-byte little-endian length, then zstd frames), decoded.
fn take_message(buf: &mut BytesMut) -> Option<Value> {
    if buf.len() < 4 {
        return None;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if buf.len() < 4 + len {
        return None;
    }
    buf.advance(4);
    let frame = buf.split_to(len);
    let text = zstd::stream::decode_all(&frame[..]).expect("zstd");
    Some(serde_json::from_slice(&text).expect("map message is JSON"))
}

/// The next message of a map stream, within a minute.
async fn next_message(stream: &mut hyper::body::Incoming, buf: &mut BytesMut) -> Option<Value> {
    let read = async {
        loop {
            if let Some(m) = take_message(buf) {
                return Some(m);
            }
            let frame = stream.frame().await?.ok()?;
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .ok()?
}

/// A node's full map (one non-streaming request), decoded.
async fn full_map(h2: &mut H2, node_key: &str, disco: &str) -> Value {
    let body = serde_json::to_vec(&json!({
        "Version": 142, "NodeKey": node_key, "DiscoKey": disco, "Stream": false,
        "OmitPeers": false, "Compress": "zstd",
    }))
    .expect("json");
    let (status, body) = post(h2, "/machine/map", body).await.expect("map answers");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let mut buf = BytesMut::from(&body[..]);
    take_message(&mut buf).expect("a whole map message")
}

/// The peer called `name` in a full map.
fn peer_named<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    map["Peers"]
        .as_array()?
        .iter()
        .find(|p| p["Hostinfo"]["Hostname"].as_str() == Some(name))
}

fn last_log_index(r: &ReplicaProc) -> u64 {
    r.cli_json(&["cluster", "status"])["last_log_index"]
        .as_u64()
        .expect("last_log_index")
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .expect("VmRSS")
}

fn metric(r: &ReplicaProc, series: &str) -> f64 {
    crate::fixtures::metric(&r.metrics, series)
}

fn limit_refusals(r: &ReplicaProc, limit: &str) -> f64 {
    metric(
        r,
        &format!("hydrascale_limit_refusals_total{{limit=\"{limit}\"}}"),
    )
}

fn node_names(r: &ReplicaProc) -> Vec<String> {
    let mut v: Vec<String> = r
        .cli_json(&["nodes", "list"])
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n["given_name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What the flood's requests got.
#[derive(Debug, Default)]
struct Outcomes {
    login_urls: usize,
    refused_per_address: usize,
    refused_other: Vec<String>,
    /// Requests never sent: their session was refused (503: too many sessions of the
    /// address not yet identified).
    session_refused: usize,
    failed: usize,
}

/// How one request of the flood ended.
enum Sent {
    Answered(Value),
    SessionRefused,
    Failed,
}

/// `sessions` Noise sessions from `from` through `to` (a replica or a load balancer), each a
/// new machine, each sending `per_session` key-less registrations with a new node key:
/// `concurrency` sessions at a time.
async fn keyless_flood(
    from: &'static str,
    to: &str,
    key: [u8; 32],
    sessions: usize,
    per_session: usize,
    concurrency: usize,
) -> Outcomes {
    use futures::StreamExt;
    let to = to.to_string();
    let results: Vec<Vec<Sent>> =
        futures::stream::iter(0..sessions)
            .map(|_| {
                let to = to.clone();
                async move {
                    let Ok(tcp) = tcp_from(from, &to).await else {
                        return (0..per_session).map(|_| Sent::Failed).collect();
                    };
                    let mut h2 =
                        match hydrascale::noise::client::connect_over(tcp, &to, &key, &random32())
                            .await
                        {
                            Ok(h2) => h2,
                            Err(e) if e.to_string().contains("503") => {
                                return (0..per_session).map(|_| Sent::SessionRefused).collect()
                            }
                            Err(_) => return (0..per_session).map(|_| Sent::Failed).collect(),
                        };
                    let mut out = Vec::new();
                    for _ in 0..per_session {
                        let body = register_body(&nodekey(), None, json!({"Hostname": "flood"}));
                        out.push(match post(&mut h2, "/machine/register", body).await {
                            Some((200, b)) => serde_json::from_slice(&b)
                                .map(Sent::Answered)
                                .unwrap_or(Sent::Failed),
                            _ => Sent::Failed,
                        });
                    }
                    out
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
    let mut o = Outcomes::default();
    for r in results.into_iter().flatten() {
        match r {
            Sent::Answered(v) if !v["AuthURL"].as_str().unwrap_or("").is_empty() => {
                o.login_urls += 1
            }
            Sent::Answered(v) => {
                let e = v["Error"].as_str().unwrap_or("").to_string();
                if e.contains("your address") {
                    o.refused_per_address += 1;
                } else {
                    o.refused_other.push(e);
                }
            }
            Sent::SessionRefused => o.session_refused += 1,
            Sent::Failed => o.failed += 1,
        }
    }
    o
}

/// `tailscale up` without a key: waits for the login URL the client shows.
async fn start_interactive_login(c: &Tailscaled, url: &str) -> (std::process::Child, String) {
    let sock = c.dir.join("ts.sock");
    wait_for("tailscaled socket", Duration::from_secs(30), || {
        let ok = sock.exists();
        async move { ok.then_some(()) }
    })
    .await;
    let up = c
        .cli_command()
        .args([
            "up",
            &format!("--login-server={url}"),
            &format!("--hostname={}", c.name),
            "--accept-dns=false",
            "--timeout=120s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tailscale up");
    let auth_url = wait_for(
        "the client shows a login URL",
        Duration::from_secs(60),
        || {
            let st = c.status();
            async move {
                st["AuthURL"]
                    .as_str()
                    .filter(|u| !u.is_empty())
                    .map(str::to_string)
            }
        },
    )
    .await;
    (up, auth_url)
}

/// An administrator lets the machine in; `tailscale up` then ends successfully.
async fn finish_interactive_login(
    r: &ReplicaProc,
    c: &Tailscaled,
    up: std::process::Child,
    auth_url: &str,
) {
    let node = r.cli_json(&["auth", "register", "--user", "alice", "--auth-id", auth_url]);
    assert_eq!(node["given_name"], c.name.as_str(), "{node}");
    let out = tokio::task::spawn_blocking(move || up.wait_with_output())
        .await
        .expect("join")
        .expect("tailscale up ends");
    assert!(
        out.status.success(),
        "tailscale up: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.log_tail()
    );
    wait_for("the client is running", Duration::from_secs(30), || {
        let st = c.status();
        async move { (st["BackendState"] == "Running").then_some(()) }
    })
    .await;
}

/// 10,000 key-less registrations in a burst from one address: at most its share of
/// logins is started (and written), the rest are refused before they reach the Raft
/// log, memory stays bounded, and a real interactive login from another address
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_keyless_logins_is_bounded_and_a_real_login_still_completes() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let r = replica(dir.path(), &[]).await;
    r.cli_json(&["users", "create", "alice"]);
    let key = server_key(&r.control);
    let pid = r.pid().expect("pid");
    // Warm the replica's allocator and runtime with a short flood from elsewhere (its
    // logins are not counted against the attacker's address).
    let warm = keyless_flood("127.0.0.5", &r.control, key, 20, 1, 20).await;
    assert_eq!(warm.login_urls, 10, "{warm:?}");
    let log_before = last_log_index(&r);
    let rss_before = rss_kib(pid);

    let started = Instant::now();
    let flood = keyless_flood(ATTACKER, &r.control, key, 2_000, 5, 100).await;
    let took = started.elapsed();
    let log_after = last_log_index(&r);
    let rss_after = rss_kib(pid);
    let rss_peak_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    eprintln!(
        "FIGURES keyless flood: 10000 requests in {took:?}: {flood:?}; Raft log {log_before} -> {log_after} (+{}); RSS {rss_before} KiB -> {rss_after} KiB (peak {rss_peak_kib} KiB)",
        log_after - log_before
    );
    assert_eq!(flood.failed, 0, "{flood:?}");
    assert!(flood.refused_other.is_empty(), "{flood:?}");
    // The address's share (limits.max_pending_logins_per_address = 10), and at most one
    // more refilled while the burst ran (10 per 10 minutes).
    assert!(
        (10..=12).contains(&flood.login_urls),
        "logins started: {flood:?}"
    );
    assert_eq!(
        flood.login_urls + flood.refused_per_address + flood.session_refused,
        10_000
    );
    // 100 sessions at a time from one address, none of which identifies: those beyond
    // the address's 64 are refused before their handshake.
    assert_eq!(
        limit_refusals(&r, "unidentified_sessions") as usize * 5,
        flood.session_refused
    );
    // Only the logins started were written: one entry each.
    assert!(
        log_after - log_before <= flood.login_urls as u64,
        "Raft log grew by {} for {} logins",
        log_after - log_before,
        flood.login_urls
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(
        limit_refusals(&r, "logins_per_address") as usize,
        warm.refused_per_address + flood.refused_per_address
    );
    assert!(node_names(&r).is_empty(), "no node was created");

    // A real interactive login from 127.0.0.1 still completes.
    let c = Tailscaled::start(&bin, &dir.path().join("clients"), "legit");
    let (up, auth_url) = start_interactive_login(&c, &format!("http://{}", r.control)).await;
    finish_interactive_login(&r, &c, up, &auth_url).await;
    assert_eq!(node_names(&r), vec!["legit".to_string()]);
}

/// A 1 MiB Hostinfo, a Hostinfo over the cap inside an allowed body, a thousand
/// endpoints: each refused with a message, and the node keeps what it had, as its peers
/// see it. The official client's own Hostinfo is far below the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_hostinfo_is_refused_and_the_previous_one_kept() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let r = replica(dir.path(), &[]).await;
    let authkey = user_with_reusable_key(&r, "alice");
    let key = server_key(&r.control);

    // The victim (our own node, from the attacker's address) and an observer peer.
    let (victim_nk, victim_disco) = (nodekey(), discokey());
    let mut victim = session(ATTACKER, &r.control, &key, &random32())
        .await
        .expect("session");
    let good = json!({"Hostname": "victim", "OS": "linux", "RoutableIPs": []});
    let (status, body) = post(
        &mut victim,
        "/machine/register",
        register_body(&victim_nk, Some(&authkey), good.clone()),
    )
    .await
    .expect("register");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let eps = json!(["192.0.2.1:41641"]);
    let (status, _) = post(
        &mut victim,
        "/machine/map",
        map_body(&victim_nk, &victim_disco, false, good.clone(), eps.clone()),
    )
    .await
    .expect("map");
    assert_eq!(status, 200);
    let (obs_nk, obs_disco) = (nodekey(), discokey());
    let mut observer = session("127.0.0.1", &r.control, &key, &random32())
        .await
        .expect("session");
    let (status, _) = post(
        &mut observer,
        "/machine/register",
        register_body(&obs_nk, Some(&authkey), json!({"Hostname": "observer"})),
    )
    .await
    .expect("register");
    assert_eq!(status, 200);
    let seen = |map: &Value| {
        let p = peer_named(map, "victim").expect("victim in the observer's map");
        (p["Hostinfo"].clone(), p["Endpoints"].clone())
    };
    let before = seen(&full_map(&mut observer, &obs_nk, &obs_disco).await);
    assert_eq!(before.0["OS"], "linux");
    assert_eq!(before.1, eps);
    let log_before = last_log_index(&r);

    // 1 MiB of Hostinfo: over the map body cap.
    let huge = json!({"Hostname": "victim", "OS": "x".repeat(1 << 20)});
    let (status, body) = post(
        &mut victim,
        "/machine/map",
        map_body(&victim_nk, &victim_disco, false, huge.clone(), eps.clone()),
    )
    .await
    .expect("answer");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("/machine/map body is larger"), "{text}");
    // The same through a registration (a node key rotation).
    let (status, body) = post(
        &mut victim,
        "/machine/register",
        register_body(&nodekey(), Some(&authkey), huge),
    )
    .await
    .expect("answer");
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    // 40 KiB: the body is allowed, the Hostinfo is not.
    let big = json!({"Hostname": "victim", "OS": "y".repeat(40 << 10)});
    let (status, body) = post(
        &mut victim,
        "/machine/map",
        map_body(&victim_nk, &victim_disco, false, big.clone(), eps.clone()),
    )
    .await
    .expect("answer");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 413, "{text}");
    assert!(
        text.contains("Hostinfo is") && text.contains("32 KiB"),
        "{text}"
    );
    let (status, body) = post(
        &mut victim,
        "/machine/register",
        register_body(&victim_nk, Some(&authkey), big),
    )
    .await
    .expect("answer");
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(status, 200);
    assert!(
        v["Error"]
            .as_str()
            .is_some_and(|e| e.contains("Hostinfo is")),
        "{v}"
    );
    // A thousand endpoints, and one endpoint of 1000 bytes.
    let many: Vec<String> = (0..1000)
        .map(|i| format!("10.1.{}.{}:41641", i / 250, i % 250))
        .collect();
    let (status, body) = post(
        &mut victim,
        "/machine/map",
        map_body(&victim_nk, &victim_disco, false, good.clone(), json!(many)),
    )
    .await
    .expect("answer");
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let (status, _) = post(
        &mut victim,
        "/machine/map",
        map_body(
            &victim_nk,
            &victim_disco,
            false,
            good.clone(),
            json!(["z".repeat(1000)]),
        ),
    )
    .await
    .expect("answer");
    assert_eq!(status, 413);
    // A disco key that is not one.
    let (status, _) = post(
        &mut victim,
        "/machine/map",
        map_body(
            &victim_nk,
            &"d".repeat(10_000),
            false,
            good.clone(),
            eps.clone(),
        ),
    )
    .await
    .expect("answer");
    assert_eq!(status, 400);

    // Nothing changed: what peers see, and the log.
    let after = seen(&full_map(&mut observer, &obs_nk, &obs_disco).await);
    assert_eq!(after, before);
    assert_eq!(last_log_index(&r), log_before);
    assert_eq!(limit_refusals(&r, "body_size"), 2.0);
    assert_eq!(limit_refusals(&r, "hostinfo_size"), 2.0);
    assert_eq!(limit_refusals(&r, "endpoints"), 2.0);
    // The node still updates within the limits.
    let newer = json!({"Hostname": "victim", "OS": "linux", "OSVersion": "6.1"});
    let (status, _) = post(
        &mut victim,
        "/machine/map",
        map_body(&victim_nk, &victim_disco, false, newer, eps.clone()),
    )
    .await
    .expect("answer");
    assert_eq!(status, 200);
    let updated = seen(&full_map(&mut observer, &obs_nk, &obs_disco).await);
    assert_eq!(updated.0["OSVersion"], "6.1");

    // What the official client sends: far below the caps.
    let c = Tailscaled::start(&bin, &dir.path().join("clients"), "official");
    c.up(&format!("http://{}", r.control), &authkey).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let official = loop {
        let map = full_map(&mut observer, &obs_nk, &obs_disco).await;
        let p = peer_named(&map, "official").cloned();
        if let Some(p) = p.filter(|p| p["Endpoints"].as_array().is_some_and(|e| !e.is_empty())) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the official client's endpoints: {map}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let hostinfo_len = official["Hostinfo"].to_string().len();
    let endpoints = official["Endpoints"].as_array().map_or(0, Vec::len);
    eprintln!(
        "FIGURES official client v1.102.3: Hostinfo {hostinfo_len} bytes (cap {}), {endpoints} endpoints (cap {})",
        hydrascale::control::limits::MAX_HOSTINFO,
        hydrascale::control::limits::MAX_ENDPOINTS
    );
    assert!(hostinfo_len * 8 < hydrascale::control::limits::MAX_HOSTINFO);
    assert!(endpoints * 8 < hydrascale::control::limits::MAX_ENDPOINTS);
}

/// A thousand map streams of one node (its own machine key: a hostile node): all but the
/// limit are refused before any map is made, the node's own stream keeps getting its
/// updates, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_map_streams_of_one_node_are_refused_beyond_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = replica(dir.path(), &[]).await;
    let authkey = user_with_reusable_key(&r, "alice");
    let key = server_key(&r.control);
    let machine = random32();
    let (nk, disco) = (nodekey(), discokey());
    let mut own = session(ATTACKER, &r.control, &key, &machine)
        .await
        .expect("session");
    let (status, _) = post(
        &mut own,
        "/machine/register",
        register_body(&nk, Some(&authkey), json!({"Hostname": "streamer"})),
    )
    .await
    .expect("register");
    assert_eq!(status, 200);
    // The node's legitimate stream.
    own.ready().await.expect("ready");
    let resp = own
        .send_request(
            hyper::Request::post("http://control/machine/map")
                .body(Full::new(Bytes::from(map_body(
                    &nk,
                    &disco,
                    true,
                    json!({"Hostname": "streamer"}),
                    json!(["192.0.2.1:41641"]),
                ))))
                .expect("request"),
        )
        .await
        .expect("stream opens");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.into_body();
    let mut buf = BytesMut::new();
    let first = next_message(&mut stream, &mut buf).await.expect("full map");
    assert!(first["Node"].is_object(), "{first}");
    wait_for("the node online", Duration::from_secs(10), || {
        let online = metric(&r, "hydrascale_nodes_online");
        async move { (online == 1.0).then_some(()) }
    })
    .await;
    let log_before = last_log_index(&r);

    // 1000 more from the same machine: 10 sessions of 100 streams.
    let mut sessions = Vec::new();
    for _ in 0..10 {
        sessions.push(
            session(ATTACKER, &r.control, &key, &machine)
                .await
                .expect("session"),
        );
    }
    let mut opened = Vec::new();
    let mut refused = 0;
    for h2 in &mut sessions {
        let mut pending = Vec::new();
        for _ in 0..100 {
            h2.ready().await.expect("ready");
            let req = hyper::Request::post("http://control/machine/map")
                .body(Full::new(Bytes::from(map_body(
                    &nk,
                    &disco,
                    true,
                    json!({"Hostname": "streamer"}),
                    json!(["192.0.2.1:41641"]),
                ))))
                .expect("request");
            pending.push(h2.send_request(req));
        }
        for resp in futures::future::join_all(pending).await {
            let resp = resp.expect("an answer");
            match resp.status().as_u16() {
                200 => opened.push(resp.into_body()),
                429 => {
                    let body = resp.into_body().collect().await.expect("body").to_bytes();
                    let text = String::from_utf8_lossy(&body).to_string();
                    assert!(text.contains("map streams open"), "{text}");
                    refused += 1;
                }
                s => panic!("unexpected status {s}"),
            }
        }
    }
    let limit = hydrascale::control::limits::MAX_STREAMS_PER_NODE as usize;
    eprintln!(
        "FIGURES map streams: {} opened, {refused} refused (limit {limit} per node)",
        opened.len()
    );
    assert_eq!(
        opened.len(),
        limit - 1,
        "the legitimate stream holds one place"
    );
    assert_eq!(refused, 1000 - (limit - 1));
    assert_eq!(limit_refusals(&r, "map_streams_per_node") as usize, refused);
    assert_eq!(metric(&r, "hydrascale_map_streams"), limit as f64);
    assert_eq!(last_log_index(&r), log_before, "nothing was written");

    // The legitimate stream still gets what changes: a new peer.
    let mut other = session("127.0.0.1", &r.control, &key, &random32())
        .await
        .expect("session");
    let (status, _) = post(
        &mut other,
        "/machine/register",
        register_body(&nodekey(), Some(&authkey), json!({"Hostname": "newcomer"})),
    )
    .await
    .expect("register");
    assert_eq!(status, 200);
    let delta = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let m = next_message(&mut stream, &mut buf)
                .await
                .expect("a message");
            let names = m["PeersChanged"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(m["Peers"].as_array().into_iter().flatten())
                .filter_map(|p| p["Hostinfo"]["Hostname"].as_str())
                .any(|n| n == "newcomer");
            if names {
                return m;
            }
        }
    })
    .await
    .expect("the newcomer reaches the node's own stream");
    assert!(delta.is_object());

    // The attacker's streams end: their places come back, and a stream opens again.
    drop(opened);
    drop(sessions);
    wait_for(
        "the attacker's streams closed",
        Duration::from_secs(30),
        || {
            let n = metric(&r, "hydrascale_map_streams");
            async move { (n == 1.0).then_some(()) }
        },
    )
    .await;
    let again = post(
        &mut own,
        "/machine/map",
        map_body(
            &nk,
            &disco,
            false,
            json!({"Hostname": "streamer"}),
            json!(["192.0.2.1:41641"]),
        ),
    )
    .await
    .expect("answer");
    assert_eq!(again.0, 200);
}

/// What became of an idle connection.
#[derive(Debug, PartialEq)]
enum Fate {
    /// Refused at once (the per-address limit), with the 429 text or without a word.
    Refused,
    /// Closed by the server after this long.
    Closed(Duration),
}

/// Waits until the server closes `s`, reading whatever it says.
async fn fate(mut s: TcpStream, opened: Instant, within: Duration) -> Option<Fate> {
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    let end = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&b[..n]),
            }
        }
    })
    .await;
    end.ok()?;
    let took = opened.elapsed();
    if String::from_utf8_lossy(&got).contains("429 Too Many Requests")
        || took < Duration::from_secs(2)
    {
        Some(Fate::Refused)
    } else {
        Some(Fate::Closed(took))
    }
}

/// Opens `n` connections to `to` from the attacker's address; `say(i)` is what the i-th
/// sends before it falls silent (nothing, half a request line, half an HTTP/2 preface).
/// Each is watched from then on until the server closes it.
async fn idle_connections(
    to: &str,
    n: usize,
    say: impl Fn(usize) -> &'static [u8],
) -> Vec<tokio::task::JoinHandle<Option<Fate>>> {
    let mut v = Vec::new();
    for i in 0..n {
        let mut s = tcp_from(ATTACKER, to).await.expect("connect");
        let opened = Instant::now();
        let words = say(i);
        if !words.is_empty() {
            let _ = s.write_all(words).await;
        }
        v.push(tokio::spawn(fate(
            s,
            opened,
            hydrascale::listener::HEADER_TIMEOUT * 4,
        )));
    }
    v
}

/// A thousand idle and half-open connections to the control listener (and a hundred to
/// the admin and metrics listeners) from one address: those over the per-address limit
/// are refused at once, the others closed after the header timeout, a client that
/// trickles its request one byte a second too; meanwhile an official client registers
/// and the CLI and Prometheus-style scrapes are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_everyone_else_is_served() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let r = replica(dir.path(), &[]).await;
    let authkey = user_with_reusable_key(&r, "alice");
    let api_key = r.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("api key")
        .to_string();
    let fds_before = metric(&r, "process_open_fds");
    let timeout = hydrascale::listener::HEADER_TIMEOUT;
    let per_address = 512;

    // Slowloris proper: a byte a second, which never ends the header wait. Opened first,
    // so they are among the connections the replica takes.
    let mut trickle = Vec::new();
    for _ in 0..5 {
        trickle.push((
            tcp_from(ATTACKER, &r.control).await.expect("connect"),
            Instant::now(),
        ));
    }
    let trickler = tokio::spawn(async move {
        let mut ended = Vec::new();
        let line = b"GET /health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut alive: Vec<(TcpStream, Instant)> = trickle;
        for b in line.iter() {
            let mut still = Vec::new();
            for (mut s, at) in alive {
                match s.write_all(&[*b]).await {
                    Ok(()) => still.push((s, at)),
                    Err(_) => ended.push(at.elapsed()),
                }
            }
            alive = still;
            if alive.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        (ended, alive.len())
    });
    let control = idle_connections(&r.control, 1000, |i| match i % 3 {
        0 => b"",
        1 => b"GET /health HTTP/1.1\r\nHost: x\r\n",
        _ => b"PRI * HTTP/2.0\r\n",
    })
    .await;
    let small = hydrascale::listener::SMALL_LISTENER_PER_ADDRESS;
    let metrics_conns = idle_connections(&r.metrics, 100, |_| b"GET /metrics HTTP/1.1\r\n").await;
    let admin_conns = idle_connections(&r.admin, 100, |_| b"PRI * HTTP/2.0\r\n\r\nSM").await;

    // While they are held: the official client registers, the CLI works over TCP with an
    // API key, and the metrics answer (all from 127.0.0.1).
    let c = Tailscaled::start(&bin, &dir.path().join("clients"), "official");
    c.up(&format!("http://{}", r.control), &authkey).await;
    let out = crate::fixtures::cli_at(
        &format!("http://{}", r.admin),
        &["--api-key", &api_key, "-o", "json", "nodes", "list"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(http_get(&r.metrics, "/health").map(|(c, _)| c), Some(200));
    assert_eq!(http_get(&r.control, "/health").map(|(c, _)| c), Some(200));

    let mut refused = 0;
    let mut closed = Vec::new();
    for f in control.into_iter().chain(metrics_conns).chain(admin_conns) {
        match f.await.expect("join") {
            Some(Fate::Refused) => refused += 1,
            Some(Fate::Closed(d)) => closed.push(d),
            None => panic!(
                "a connection was still open {:?} after it was made",
                timeout * 4
            ),
        }
    }
    let (trickled, still_open) = trickler.await.expect("join");
    closed.sort();
    eprintln!(
        "FIGURES idle connections: {refused} refused at once, {} closed after {:?}..{:?}; trickling clients cut after {trickled:?}",
        closed.len(),
        closed.first(),
        closed.last()
    );
    // The five trickling connections hold five of the address's places.
    let taken = per_address - 5;
    assert_eq!(refused, (1000 - taken) + 2 * (100 - small));
    assert_eq!(closed.len(), taken + 2 * small);
    assert!(
        closed
            .iter()
            .all(|d| *d >= timeout - Duration::from_secs(1)),
        "held until the header timeout: {closed:?}"
    );
    assert_eq!(still_open, 0, "the trickling clients were cut");
    assert!(
        trickled.iter().all(
            |d| *d >= timeout - Duration::from_secs(1) && *d < timeout + Duration::from_secs(5)
        ),
        "{trickled:?}"
    );
    let refused_metric = |listener: &str, reason: &str| {
        metric(
            &r,
            &format!(
                "hydrascale_connections_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(
        refused_metric("control", "per_address"),
        (1000 - taken) as f64
    );
    assert_eq!(
        refused_metric("metrics", "per_address"),
        (100 - small) as f64
    );
    assert_eq!(refused_metric("admin", "per_address"), (100 - small) as f64);
    let timed_out = refused_metric("control", "header_timeout");
    eprintln!("FIGURES header timeouts counted on the control listener: {timed_out}");
    // The held idle ones and the tricklers (and any idle keep-alive connection of the
    // official client's).
    assert!(timed_out >= per_address as f64, "{timed_out}");
    assert_eq!(refused_metric("metrics", "header_timeout"), small as f64);
    assert_eq!(refused_metric("admin", "header_timeout"), small as f64);
    // The official client is still fine, and the replica's descriptors came back.
    assert_eq!(c.status()["BackendState"], "Running");
    let fds_after = metric(&r, "process_open_fds");
    eprintln!("FIGURES open fds: {fds_before} before, {fds_after} after");
    assert!(fds_after < fds_before + 50.0, "{fds_before} -> {fds_after}");
}

/// Behind HAProxy with `send-proxy-v2` and `trusted_proxies`, a flood of logins from one
/// client is counted under that client's address, so an official client logging in
/// through the same balancer is not locked out; a PROXY header from anyone else is not
/// believed, and a malformed one from the proxy is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_protocol_balancer_each_client_is_its_own_address() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let Some(haproxy) = crate::monitoring::require_system_tool("haproxy") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let lb = format!("127.0.0.1:{}", free_port());
    let mut r = ReplicaProc::new(dir.path(), 1);
    r.write_config(&format!("http://{lb}"), "", false);
    r.start_with(&["--set", "trusted_proxies=[\"127.0.0.1/32\"]"]);
    r.wait_ready().await;
    r.cli_json(&["users", "create", "alice"]);
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10m\n    timeout server 10m\n\
             frontend login\n    bind {lb}\n    default_backend replicas\n\
             backend replicas\n    option httpchk GET /ready\n    server r1 {} check inter 1s send-proxy-v2\n",
            r.control
        ),
    )
    .expect("haproxy config");
    let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("log");
    let lb_proc = std::process::Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("haproxy");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _lb = Kill(lb_proc);
    wait_for("haproxy up", Duration::from_secs(20), || {
        let ok = http_get(&lb, "/health").is_some_and(|(c, _)| c == 200);
        async move { ok.then_some(()) }
    })
    .await;
    let key = server_key(&lb);
    let log_before = last_log_index(&r);

    // 300 key-less logins from 127.0.0.3, through the balancer.
    let flood = keyless_flood("127.0.0.3", &lb, key, 100, 3, 20).await;
    eprintln!("FIGURES through HAProxy: {flood:?}");
    assert_eq!(flood.failed, 0, "{flood:?}");
    assert!((10..=11).contains(&flood.login_urls), "{flood:?}");
    assert_eq!(
        flood.login_urls + flood.refused_per_address,
        300,
        "{flood:?}"
    );
    assert!(last_log_index(&r) - log_before <= flood.login_urls as u64);

    // The official client logs in through the same balancer (from 127.0.0.1).
    let c = Tailscaled::start(&bin, &dir.path().join("clients"), "behind-lb");
    let (up, auth_url) = start_interactive_login(&c, &format!("http://{lb}")).await;
    finish_interactive_login(&r, &c, up, &auth_url).await;

    // A PROXY header from a peer that is not a trusted proxy is just bad HTTP.
    let mut s = tcp_from("127.0.0.4", &r.control).await.expect("connect");
    s.write_all(b"PROXY TCP4 10.9.9.9 10.0.0.1 1234 80\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A malformed one from the trusted proxy's address is refused and counted.
    let mut s = tcp_from("127.0.0.1", &r.control).await.expect("connect");
    s.write_all(b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\nGET /health HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(
        metric(
            &r,
            "hydrascale_connections_refused_total{listener=\"control\",reason=\"proxy_header\"}"
        ),
        1.0
    );
    // A direct connection from the proxy's own address without a header is served.
    assert_eq!(http_get(&r.control, "/health").map(|(c, _)| c), Some(200));
}

/// Noise sessions that never say who they are: at most `limits.max_unidentified_sessions`
/// at once (the next is refused before its handshake), a session that registers gives its
/// place back at once, and the silent ones are closed after 30 s while the registered one
/// lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_sessions_that_never_identify_are_bounded_and_closed() {
    use hydrascale::control::limits::IDENTIFY_WITHIN;
    let dir = tempfile::tempdir().expect("tempdir");
    let r = replica(dir.path(), &["--set", "limits.max_unidentified_sessions=5"]).await;
    let authkey = user_with_reusable_key(&r, "alice");
    let key = server_key(&r.control);
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(
            session(ATTACKER, &r.control, &key, &random32())
                .await
                .expect("a place"),
        );
    }
    let refused = |from: &'static str| {
        let control = r.control.clone();
        async move {
            let tcp = tcp_from(from, &control).await.expect("connect");
            hydrascale::noise::client::connect_over(tcp, &control, &key, &random32())
                .await
                .err()
                .map(|e| e.to_string())
        }
    };
    for from in [ATTACKER, "127.0.0.1"] {
        let e = refused(from).await.expect("a sixth session is refused");
        assert!(e.contains("503"), "{e}");
    }
    assert_eq!(limit_refusals(&r, "unidentified_sessions"), 2.0);

    // One idle session hangs up: its place comes back.
    drop(idle.pop());
    let mut node = wait_for("a free place", Duration::from_secs(10), || {
        let control = r.control.clone();
        async move { session("127.0.0.1", &control, &key, &random32()).await }
    })
    .await;
    let nk = nodekey();
    let (status, _) = post(
        &mut node,
        "/machine/register",
        register_body(&nk, Some(&authkey), json!({"Hostname": "good"})),
    )
    .await
    .expect("register");
    assert_eq!(status, 200);
    // Registered: its place is free again, while the four idle ones still hold theirs.
    let extra = session("127.0.0.1", &r.control, &key, &random32()).await;
    assert!(
        extra.is_some(),
        "the registered session gave its place back"
    );
    drop(extra);

    wait_for(
        "the idle sessions closed",
        IDENTIFY_WITHIN + Duration::from_secs(15),
        || {
            let all = idle.iter().all(|h2| h2.is_closed());
            async move { all.then_some(()) }
        },
    )
    .await;
    let after = opened.elapsed();
    eprintln!("FIGURES unidentified sessions closed {after:?} after they opened");
    assert!(
        after >= IDENTIFY_WITHIN - Duration::from_secs(1),
        "{after:?}"
    );
    assert_eq!(
        metric(
            &r,
            "hydrascale_noise_sessions_ended_total{reason=\"unidentified\"}"
        ),
        4.0
    );
    // The registered node's session lives on and is served.
    assert!(!node.is_closed());
    let (status, _) = post(
        &mut node,
        "/machine/map",
        map_body(
            &nk,
            &discokey(),
            false,
            json!({"Hostname": "good"}),
            json!([]),
        ),
    )
    .await
    .expect("map");
    assert_eq!(status, 200);
}
