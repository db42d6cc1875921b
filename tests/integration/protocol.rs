//! The TS2021 protocol against a real replica with a hand-driven Noise client:
//! what well-formed requests get, and that malformed ones are refused without harm.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fixtures::TestServer;

type H2 = hydrascale::noise::client::ControlClient;

fn initiation(server_pub: &[u8; 32], client_secret: &[u8; 32]) -> (Vec<u8>, snow::HandshakeState) {
    hydrascale::noise::client::initiation(
        server_pub,
        client_secret,
        hydrascale::noise::client::CLIENT_VERSION,
    )
    .expect("initiation")
}

async fn upgrade_raw(addr: std::net::SocketAddr, handshake_b64: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST /ts2021 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {handshake_b64}\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    // Read the response head byte by byte so nothing after it is consumed.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).await.expect("read");
        if n == 0 {
            break;
        }
        head.push(b[0]);
    }
    (s, String::from_utf8_lossy(&head).to_string())
}

/// A Noise session with HTTP/2 on top, as the official client makes one.
async fn noise_session(server: &TestServer, machine_secret: [u8; 32]) -> H2 {
    let server_pub = *server.handle().control_key.public();
    let addr = server.handle().control_addr.to_string();
    hydrascale::noise::client::connect(&addr, &server_pub, &machine_secret)
        .await
        .expect("noise session")
}

async fn post(h2: &mut H2, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let req = hyper::Request::post(format!("https://unused{path}"))
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let resp = h2.send_request(req).await.expect("send");
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, body)
}

fn nodekey(b: u8) -> String {
    format!("nodekey:{}", hex::encode([b; 32]))
}

fn state_json(server: &TestServer) -> String {
    serde_json::to_string(&*server.handle().db.store.read()).expect("state serializes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_endpoint_and_bad_handshakes() {
    let mut server = TestServer::start().await;
    let url = server.url();
    let client = reqwest_get(&format!("{url}/key?v=142")).await;
    let v: serde_json::Value = serde_json::from_str(&client).expect("json");
    assert_eq!(v["publicKey"], server.handle().control_key.public_text());

    let before = state_json(&server);
    // Garbage, wrong size, and a handshake meant for another server key.
    let (_, head) = upgrade_raw(server.handle().control_addr, "!!!notbase64").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let (_, head) = upgrade_raw(server.handle().control_addr, "AAAA").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let other = hydrascale::noise::ControlKey::generate();
    let (init, _) = initiation(other.public(), &[5u8; 32]);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&init);
    let (_, head) = upgrade_raw(server.handle().control_addr, &b64).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(
        state_json(&server),
        before,
        "refused handshakes change nothing"
    );
    // The server still serves everyone else.
    let mut h2 = noise_session(&server, [6u8; 32]).await;
    let (status, _) = post(&mut h2, "/machine/map", b"{not json").await;
    assert_eq!(status, 400);
    // The client hangs up: the replica counts a session its peer closed.
    drop(h2);
    let metrics = server.handle().metrics_addr.to_string();
    crate::fixtures::wait_for(
        "the closed session counted",
        Duration::from_secs(10),
        || {
            let m = crate::fixtures::scrape(&metrics);
            let ended = |reason: &str| {
                m.get(&format!(
                    "hydrascale_noise_sessions_ended_total{{reason=\"{reason}\"}}"
                ))
                .copied()
            };
            let counted = ended("closed") == Some(1.0)
                && ended("error") == Some(0.0)
                && ended("silent") == Some(0.0);
            async move { counted.then_some(()) }
        },
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_rules_and_bad_requests() {
    let mut server = TestServer::start().await;
    server.cli_json(&["users", "create", "bob"]);
    let single = server.cli_json(&[
        "preauthkeys",
        "create",
        "--user",
        "bob",
        "--expiration",
        "1h",
    ]);
    let single = single["key"].as_str().expect("key").to_string();

    let mut h2 = noise_session(&server, [7u8; 32]).await;
    let reg = |nk: &str, key: &str| {
        serde_json::to_vec(&serde_json::json!({
            "Version": 142, "NodeKey": nk, "OldNodeKey": format!("nodekey:{}", "0".repeat(64)),
            "Auth": {"AuthKey": key}, "Hostinfo": {"Hostname": "alpha"}
        }))
        .expect("json")
    };
    // Unknown key: refused with a message, nothing stored.
    let before = state_json(&server);
    let (status, body) = post(
        &mut h2,
        "/machine/register",
        &reg(&nodekey(1), "hskey-bogus"),
    )
    .await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert!(!v["Error"].as_str().unwrap_or_default().is_empty(), "{v}");
    assert_eq!(state_json(&server), before);
    // Garbage JSON: 400, nothing stored.
    let (status, _) = post(&mut h2, "/machine/register", b"\x00\x01garbage").await;
    assert_eq!(status, 400);
    assert_eq!(state_json(&server), before);

    // Good key registers.
    let (status, body) = post(&mut h2, "/machine/register", &reg(&nodekey(1), &single)).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["MachineAuthorized"], true, "{v}");
    assert_eq!(v["Error"], "");
    assert_eq!(v["Login"]["LoginName"], "bob");

    // The single-use key is used up for another machine.
    let mut other = noise_session(&server, [8u8; 32]).await;
    let before = state_json(&server);
    let (_, body) = post(&mut other, "/machine/register", &reg(&nodekey(2), &single)).await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert!(
        !v["Error"].as_str().unwrap_or_default().is_empty(),
        "used key accepted: {v}"
    );
    assert_eq!(state_json(&server), before);

    // Another machine may not poll the map of bob's node (wrong machine key).
    let map_req = serde_json::to_vec(&serde_json::json!({
        "Version": 142, "NodeKey": nodekey(1), "Stream": false, "Compress": "zstd"
    }))
    .expect("json");
    let (status, _) = post(&mut other, "/machine/map", &map_req).await;
    assert_eq!(status, 401);

    // The owner gets one framed, zstd-compressed map with its own node authorized.
    let (status, body) = post(&mut h2, "/machine/map", &map_req).await;
    assert_eq!(status, 200);
    let len = u32::from_le_bytes(body[..4].try_into().expect("len")) as usize;
    assert_eq!(len, body.len() - 4);
    let json = zstd::decode_all(&body[4..]).expect("zstd frame");
    let m: serde_json::Value = serde_json::from_slice(&json).expect("map json");
    assert_eq!(m["Node"]["MachineAuthorized"], true);
    assert_eq!(m["Node"]["Key"], nodekey(1));
    assert!(m["DERPMap"]["Regions"].is_object());
    assert!(m["PacketFilter"].is_array());
    server.stop().await;
}

/// Minimal HTTP/1.1 GET so the test does not need an HTTP client crate.
async fn reqwest_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("http url");
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = TcpStream::connect(authority).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    body
}

/// Updates queued while a write is in flight share the next log entry, and each keeps its
/// own outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_share_log_entries() {
    use hydrascale::control::write_batch::UpdateBatcher;
    use hydrascale::state::{Command, CommandOutput, StateError};
    let server = TestServer::start().await;
    let db = server.handle().db.clone();
    let batcher = UpdateBatcher::spawn(db.clone());
    let before = db.raft.status().last_log_index.unwrap_or(0);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300u32 {
        let b = batcher.clone();
        // Every 100th name repeats an earlier one: refused on its own, the rest unaffected.
        let name = if i % 100 == 99 {
            format!("u{}", i - 1)
        } else {
            format!("u{i}")
        };
        tasks.spawn(async move {
            b.write(Command::CreateUser {
                name,
                display_name: String::new(),
                now: 1_800_000_000_000,
                by_admin: true,
                profile: Default::default(),
            })
            .await
        });
    }
    let (mut ok, mut exists) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.expect("task") {
            Ok(CommandOutput::User(_)) => ok += 1,
            Err(hydrascale::state::DbError::State(StateError::UserExists(_))) => exists += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!((ok, exists), (297, 3));
    assert_eq!(db.store.read().users.len(), 297);
    let entries = db.raft.status().last_log_index.unwrap_or(0) - before;
    assert!(
        entries < 100,
        "300 concurrent updates took {entries} log entries"
    );
}

/// The admin API over TCP takes only a current API key; the local socket needs none and
/// is where the first key comes from. Keys are shown once and stored hashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_tcp_needs_a_current_api_key() {
    let server = TestServer::start().await;
    let tcp = format!("http://{}", server.handle().admin_addr);
    let run = |args: &[&str], key: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hydrascale"));
        c.arg("--admin-addr").arg(&tcp);
        if let Some(k) = key {
            c.arg("--api-key").arg(k);
        }
        c.args(args).output().expect("run hydrascale CLI")
    };
    let refused = |out: &std::process::Output, why: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "expected a refusal mentioning {why:?}: {err}"
        );
    };
    let users = || -> Vec<String> {
        server
            .cli_json(&["users", "list"])
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|u| u["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };

    // Without a key, with a made-up one, with garbage: refused, nothing changes.
    refused(&run(&["users", "create", "mallory"], None), "API key");
    let made_up = format!("hskey-api-000000000000-{}", "0".repeat(48));
    refused(
        &run(&["users", "create", "mallory"], Some(&made_up)),
        "not valid",
    );
    refused(
        &run(&["users", "create", "mallory"], Some("nonsense")),
        "not valid",
    );
    assert!(!users().contains(&"mallory".to_string()));

    // The local socket needs no key and is owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&server.handle().admin_socket)
        .expect("admin socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let created = server.cli_json(&["apikeys", "create", "--expiration", "1h"]);
    let key = created["key"].as_str().expect("key").to_string();
    let prefix = created["prefix"].as_str().expect("prefix").to_string();
    assert!(key.starts_with(&format!("hskey-api-{prefix}-")), "{key}");
    let listed = server.cli_json(&["apikeys", "list"]);
    assert_eq!(listed[0]["prefix"].as_str(), Some(prefix.as_str()));
    assert_eq!(listed[0]["key"].as_str(), Some(""), "the key is shown once");
    // Only the hash is stored: the replicated state (as a backup has it) lacks the key.
    let backup = server.dir.path().join("state.backup");
    server.cli_json(&["cluster", "backup", "--out", backup.to_str().expect("path")]);
    let text = std::fs::read_to_string(&backup).expect("backup");
    assert!(text.contains(&prefix) && !text.contains(&key));

    // With the key: works. With its prefix but another secret: refused.
    let out = run(&["users", "create", "trent"], Some(&key));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(users().contains(&"trent".to_string()));
    let tampered = format!(
        "{}{}",
        &key[..key.len() - 1],
        if key.ends_with('0') { '1' } else { '0' }
    );
    refused(&run(&["users", "list"], Some(&tampered)), "not valid");

    // Expired: refused. Deleted: gone.
    let out = server.cli(&["apikeys", "expire", &prefix]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(&run(&["users", "list"], Some(&key)), "expired");
    let out = server.cli(&["apikeys", "delete", &prefix]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.cli_json(&["apikeys", "list"]), serde_json::json!([]));
    refused(&run(&["users", "list"], Some(&key)), "not valid");
}
