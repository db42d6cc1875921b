//! Revocation takes effect everywhere: three `hydrascale serve` processes, official
//! clients streaming from replica 2. A node expired through replica 1, one deleted
//! through replica 3, and one that logs itself out lose their map stream and their DERP
//! session on replica 2 within a second, and cannot get them back; the other node keeps
//! both. A relay session held with an expired node's key by a client that ignores the
//! expiry (ours, with the key taken from the official client's state) is ended too, and
//! not let back in. A single-use pre-auth key is refused the second time, on every
//! replica; when two machines race for it on two replicas, exactly one gets in; and the
//! machine it registered cannot come back with it after being expired.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::fixtures::{
    require_tailscale, scrape, user_with_reusable_key, wait_for, ReplicaProc, Tailscaled,
};

/// Replica 2's open map streams and its regular DERP clients (mesh peers left out).
fn sessions(r: &ReplicaProc, mesh: f64) -> (f64, f64) {
    let m = scrape(&r.metrics);
    let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
    (
        get("hydrascale_map_streams"),
        get("hydrascale_derp_clients") - mesh,
    )
}

/// Nodes as `nodes list` shows them on `r`, less what moves by itself (online state,
/// last seen, endpoints): id -> (name, user, keys, addresses, expiry).
fn nodes(r: &ReplicaProc) -> std::collections::BTreeMap<u64, String> {
    let v = r.cli_json(&["nodes", "list"]);
    v.as_array()
        .expect("node list")
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().expect("id"),
                format!(
                    "{} {} {} {} {} {} expiry={}",
                    n["given_name"],
                    n["user"],
                    n["machine_key"],
                    n["node_key"],
                    n["ipv4"],
                    n["ipv6"],
                    n["expiry_ms"]
                ),
            )
        })
        .collect()
}

fn node_id(r: &ReplicaProc, host: &str) -> u64 {
    let v = r.cli_json(&["nodes", "list"]);
    v.as_array()
        .and_then(|a| a.iter().find(|n| n["hostname"] == host))
        .and_then(|n| n["id"].as_u64())
        .unwrap_or_else(|| panic!("no node {host}: {v}"))
}

/// Polls replica `r` every 10 ms until its sessions are `want`; the time that took.
fn until_sessions(r: &ReplicaProc, mesh: f64, want: (f64, f64), what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let now = sessions(r, mesh);
        if now == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: replica {} still has (streams, DERP clients) {now:?}, not {want:?}",
            r.id
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// For `span`, replica `r`'s sessions never rise above `want`: the revoked node does not
/// get back in. (A remaining client may reconnect its relay meanwhile, on a busy machine:
/// its count dips for a moment, which says nothing about the revoked one.)
fn stays(r: &ReplicaProc, mesh: f64, want: (f64, f64), span: Duration, what: &str) {
    let start = Instant::now();
    while start.elapsed() < span {
        let now = sessions(r, mesh);
        assert!(
            now.0 <= want.0 && now.1 <= want.1,
            "{what}: (streams, DERP clients) {now:?}, more than {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tailscale up` with a key against `url`; whether it succeeded, and what it said.
fn up_with(c: &Tailscaled, url: &str, key: &str, extra: &[&str]) -> std::process::Child {
    c.cli_command()
        .args([
            "up",
            &format!("--login-server={url}"),
            &format!("--auth-key={key}"),
            &format!("--hostname={}", c.name),
            "--accept-dns=false",
            "--timeout=30s",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tailscale up")
}

fn outcome(child: std::process::Child) -> (bool, String) {
    let out = child.wait_with_output().expect("tailscale up");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The node private key the official client keeps in its state file
/// (`tailscaled.state`: profile entries, base64 JSON of its prefs, `Config.PrivateNodeKey`).
fn private_node_key(dir: &std::path::Path) -> [u8; 32] {
    use base64::Engine;
    let text = std::fs::read_to_string(dir.join("tailscaled.state")).expect("state file");
    let state: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).expect("state JSON");
    let found = state.values().find_map(|v| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.as_str()?)
            .ok()?;
        let prefs: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let hex_key = prefs["Config"]["PrivateNodeKey"]
            .as_str()?
            .strip_prefix("privkey:")?
            .to_string();
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut key).ok()?;
        Some(key)
    });
    found.expect("a node key in the client's state")
}

async fn socket_ready(c: &Tailscaled) {
    let sock = c.dir.join("ts.sock");
    wait_for("tailscaled socket", Duration::from_secs(30), || {
        let ok = sock.exists();
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_takes_effect_on_every_replica() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let lb_url = format!("http://127.0.0.1:{}", crate::fixtures::free_port());
    let replicas = crate::cluster::start_cluster(dir.path(), &lb_url).await;
    let (r1, r2, r3) = (&replicas[0], &replicas[1], &replicas[2]);
    // The other two replicas' relays mesh with replica 2's: two DERP clients that are not
    // nodes.
    wait_for(
        "the DERP mesh to replica 2",
        Duration::from_secs(30),
        || {
            let n = sessions(r2, 0.0).1;
            async move { (n == 2.0).then_some(()) }
        },
    )
    .await;
    let mesh = 2.0;

    let key = user_with_reusable_key(r1, "u");
    let at_r2 = format!("http://{}", r2.control);
    let root = dir.path().join("clients");
    let names = ["keep", "expired", "deleted", "loggedout"];
    let clients: Vec<Tailscaled> = names
        .iter()
        .map(|n| Tailscaled::start(&bin, &root, n))
        .collect();
    for c in &clients {
        c.up(&at_r2, &key).await;
    }
    let until = |want, what: &str| until_sessions(r2, mesh, want, what);
    until((4.0, 4.0), "four nodes streaming and relaying on replica 2");
    let (keep, loggedout) = (&clients[0], &clients[3]);

    // Expired through replica 1.
    let before = nodes(r1);
    let id = node_id(r1, "expired");
    let issued = Instant::now();
    r1.cli_json(&["nodes", "expire", "--identifier", &id.to_string()]);
    let answered = issued.elapsed();
    let took = until((3.0, 3.0), "the expired node's sessions to end");
    eprintln!(
        "expire via replica 1: CLI answered in {answered:?}; replica 2 ended the stream and DERP session {took:?} later"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    stays(r2, mesh, (3.0, 3.0), Duration::from_secs(3), "after expiry");
    let after = nodes(r1);
    assert_eq!(after.len(), before.len());
    for (i, n) in &before {
        if *i != id {
            assert_eq!(after.get(i), Some(n), "node {i} changed");
        }
    }
    assert_ne!(after.get(&id), before.get(&id), "the expiry was recorded");

    // Deleted through replica 3.
    let before = after;
    let id = node_id(r3, "deleted");
    let issued = Instant::now();
    r3.cli_json(&["nodes", "delete", "--identifier", &id.to_string()]);
    let answered = issued.elapsed();
    let took = until((2.0, 2.0), "the deleted node's sessions to end");
    eprintln!(
        "delete via replica 3: CLI answered in {answered:?}; replica 2 ended the stream and DERP session {took:?} later"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    stays(
        r2,
        mesh,
        (2.0, 2.0),
        Duration::from_secs(3),
        "after deletion",
    );
    let after = nodes(r1);
    let mut want = before.clone();
    want.remove(&id);
    assert_eq!(after, want);

    // Logged out by itself.
    let before = after;
    let id = node_id(r1, "loggedout");
    let out = loggedout.cli(&["logout"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = until((1.0, 1.0), "the logged-out node's sessions to end");
    eprintln!(
        "logout: replica 2 ended the stream and DERP session {took:?} after the CLI returned"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    stays(r2, mesh, (1.0, 1.0), Duration::from_secs(3), "after logout");
    let after = nodes(r1);
    for (i, n) in &before {
        if *i != id {
            assert_eq!(after.get(i), Some(n), "node {i} changed");
        }
    }
    // The node that was not revoked kept its sessions throughout (above) and runs.
    assert_eq!(keep.status()["BackendState"], "Running");

    // The official client drops its own relay session once it sees its key expired; a
    // hostile holder of the key does not. The relay must end it: a DERP client of our own
    // with a registered node's private key (the client that registered it is gone).
    let hostile = Tailscaled::start(&bin, &root, "hostile");
    hostile.up(&at_r2, &key).await;
    until((2.0, 2.0), "the hostile node streaming and relaying");
    let node_key = private_node_key(&hostile.dir);
    drop(hostile);
    until((1.0, 1.0), "the hostile node's client to be gone");
    let mut held = hydrascale::derp::DerpClient::connect(&r2.control, node_key, None)
        .await
        .expect("a current node's key gets a relay session");
    until((1.0, 2.0), "the held relay session");
    let before = nodes(r1);
    let id = node_id(r1, "hostile");
    r1.cli_json(&["nodes", "expire", "--identifier", &id.to_string()]);
    let took = until(
        (1.0, 1.0),
        "the held relay session of the expired key to end",
    );
    eprintln!(
        "expire via replica 1: replica 2 ended a held DERP session {took:?} after the CLI returned"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let closed = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match held.recv().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the relay closed the session");
    eprintln!("the held session ended with: {closed}");
    let again = hydrascale::derp::DerpClient::connect(&r2.control, node_key, None).await;
    assert!(again.is_err(), "an expired key got a new relay session");
    stays(
        r2,
        mesh,
        (1.0, 1.0),
        Duration::from_secs(2),
        "after the hostile's expiry",
    );
    let after = nodes(r1);
    for (i, n) in &before {
        if *i != id {
            assert_eq!(after.get(i), Some(n), "node {i} changed");
        }
    }

    // A single-use key: used once through replica 2, refused through replica 3.
    let single = r1.cli_json(&["preauthkeys", "create", "--user", "u", "--expiration", "1h"])
        ["key"]
        .as_str()
        .expect("key")
        .to_string();
    let at_r3 = format!("http://{}", r3.control);
    let sa = Tailscaled::start(&bin, &root, "sa");
    let sb = Tailscaled::start(&bin, &root, "sb");
    for c in [&sa, &sb] {
        socket_ready(c).await;
    }
    let (ok, said) = outcome(up_with(&sa, &at_r2, &single, &[]));
    assert!(ok, "first use: {said}");
    let before = nodes(r1);
    for r in [r3, r1, r2] {
        let (ok, said) = outcome(up_with(&sb, &format!("http://{}", r.control), &single, &[]));
        assert!(
            !ok && said.contains("already used"),
            "second use via replica {}: {said}",
            r.id
        );
        assert_eq!(nodes(r1), before, "a refused key changed the tailnet");
    }
    // The machine it registered cannot bring itself back with it once expired.
    let id = node_id(r1, "sa");
    r1.cli_json(&["nodes", "expire", "--identifier", &id.to_string()]);
    let before = nodes(r1);
    let (ok, said) = outcome(up_with(&sa, &at_r2, &single, &["--force-reauth"]));
    assert!(
        !ok && said.contains("already used"),
        "reuse after expiry: {said}"
    );
    assert_eq!(nodes(r1), before, "a refused key changed the tailnet");

    // Two machines race for one fresh single-use key on two replicas: the log decides,
    // exactly one gets in, everywhere.
    let race = r1.cli_json(&["preauthkeys", "create", "--user", "u", "--expiration", "1h"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let sc = Tailscaled::start(&bin, &root, "sc");
    let sd = Tailscaled::start(&bin, &root, "sd");
    for c in [&sc, &sd] {
        socket_ready(c).await;
    }
    let before = nodes(r1);
    let (c_up, d_up) = (
        up_with(&sc, &at_r2, &race, &[]),
        up_with(&sd, &at_r3, &race, &[]),
    );
    let (c_ok, c_said) = outcome(c_up);
    let (d_ok, d_said) = outcome(d_up);
    assert!(
        c_ok != d_ok,
        "exactly one must win: sc {c_ok} {c_said} / sd {d_ok} {d_said}"
    );
    let loser = if c_ok { &d_said } else { &c_said };
    assert!(loser.contains("already used"), "{loser}");
    let winner = if c_ok { "sc" } else { "sd" };
    let want = before.len() + 1;
    for r in [r1, r2, r3] {
        let now = wait_for(
            "every replica to apply the race",
            Duration::from_secs(10),
            || {
                let n = nodes(r);
                async move { (n.len() == want).then_some(n) }
            },
        )
        .await;
        for (i, n) in &before {
            assert_eq!(now.get(i), Some(n), "replica {}: node {i} changed", r.id);
        }
        let hosts = r.cli_json(&["nodes", "list"]);
        let hosts: Vec<&str> = hosts
            .as_array()
            .expect("nodes")
            .iter()
            .filter_map(|n| n["hostname"].as_str())
            .collect();
        assert!(hosts.contains(&winner), "replica {}: {hosts:?}", r.id);
        assert!(
            !hosts.contains(&if c_ok { "sd" } else { "sc" }),
            "replica {}: {hosts:?}",
            r.id
        );
    }
    let keys = r1.cli_json(&["preauthkeys", "list", "--user", "u"]);
    eprintln!("keys after the race: {keys}");
}
