//! Interop with the official Tailscale client: registration, peers, ping, delete, re-login.

use std::time::Duration;

use crate::fixtures::{require_tailscale, wait_for, Tailscaled, TestServer};

fn create_key(server: &TestServer, user: &str, reusable: bool) -> String {
    let mut args = vec![
        "preauthkeys",
        "create",
        "--user",
        user,
        "--expiration",
        "1h",
    ];
    if reusable {
        args.push("--reusable");
    }
    let v = server.cli_json(&args);
    v["key"]
        .as_str()
        .unwrap_or_else(|| panic!("preauthkeys create printed no key: {v}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_clients_register_see_each_other_and_ping() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let mut server = TestServer::start().await;
    let url = server.url();
    server.cli_json(&["users", "create", "alice"]);
    let key = create_key(&server, "alice", true);

    let root = server.dir.path().join("clients");
    let nodes: Vec<Tailscaled> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| Tailscaled::start(&bin, &root, n))
        .collect();
    for n in &nodes {
        n.up(&url, &key).await;
    }

    // Every node sees the other two, by name, with the addresses the server assigned.
    for n in &nodes {
        let want: Vec<String> = nodes
            .iter()
            .filter(|o| o.name != n.name)
            .map(|o| o.name.clone())
            .collect();
        wait_for(
            &format!("{} to see its peers", n.name),
            Duration::from_secs(30),
            || {
                let ok = n.peer_names() == want;
                async move { ok.then_some(()) }
            },
        )
        .await;
    }
    let listed = server.cli_json(&["nodes", "list"]);
    let listed = listed.as_array().expect("nodes list is an array");
    assert_eq!(listed.len(), 3);
    for n in &nodes {
        let ip = n.ipv4();
        assert!(ip.starts_with("100."), "{} got {ip}", n.name);
        let entry = listed
            .iter()
            .find(|e| e["given_name"] == n.name.as_str())
            .unwrap_or_else(|| panic!("{} not in nodes list: {listed:?}", n.name));
        assert_eq!(entry["ipv4"].as_str(), Some(ip.as_str()));
        // Peers see the same address for this node.
        for o in nodes.iter().filter(|o| o.name != n.name) {
            let st = o.status();
            let peer = st["Peer"]
                .as_object()
                .and_then(|m| m.values().find(|p| p["HostName"] == n.name.as_str()))
                .cloned()
                .expect("peer present");
            let ips: Vec<&str> = peer["TailscaleIPs"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            assert!(
                ips.contains(&ip.as_str()),
                "{} sees {} as {ips:?}",
                o.name,
                n.name
            );
            let dns = peer["DNSName"].as_str().unwrap_or_default();
            assert_eq!(dns, format!("{}.{}.", n.name, server.config.base_domain));
        }
    }

    // The replica's metrics count what just happened.
    let metrics = crate::fixtures::scrape(&server.handle().metrics_addr.to_string());
    for (series, at_least) in [
        ("hydrascale_registrations_total{result=\"ok\"}", 3.0),
        ("hydrascale_noise_handshakes_total{result=\"ok\"}", 3.0),
        ("hydrascale_map_streams", 3.0),
        ("hydrascale_nodes_online", 3.0),
        ("hydrascale_map_responses_total{kind=\"full\"}", 3.0),
        ("hydrascale_map_responses_total{kind=\"delta\"}", 1.0),
        ("hydrascale_update_fanout_seconds_count", 1.0),
        ("hydrascale_derp_clients", 3.0),
        ("hydrascale_raft_is_leader", 1.0),
        // Peers went out as runs in zstd frames of their own, after the stream's own
        // frame: the clients above decoded those multi-frame messages into their peers.
        ("hydrascale_map_peer_runs_total{frame=\"compressed\"}", 1.0),
    ] {
        let v = metrics.get(series).copied().unwrap_or(-1.0);
        assert!(v >= at_least, "{series} = {v}, want >= {at_least}");
    }

    // The REST API shows the same nodes, as headscale's would.
    let api_key = server.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let control = server.handle().control_addr.to_string();
    let (code, rest) = crate::fixtures::http_json(
        &control,
        "GET",
        "/api/v1/node?user=alice",
        Some(&api_key),
        None,
    );
    assert_eq!(code, 200, "{rest}");
    let rest_nodes = rest["nodes"].as_array().expect("nodes");
    assert_eq!(rest_nodes.len(), 3, "{rest}");
    for n in &nodes {
        let entry = rest_nodes
            .iter()
            .find(|e| e["givenName"] == n.name.as_str())
            .unwrap_or_else(|| panic!("{} not in {rest}", n.name));
        assert_eq!(entry["ipAddresses"][0].as_str(), Some(n.ipv4().as_str()));
        assert_eq!(entry["online"], true);
        assert_eq!(entry["user"]["name"], "alice");
        assert!(entry["nodeKey"]
            .as_str()
            .unwrap_or_default()
            .starts_with("nodekey:"));
    }

    // tailscale ping between two real clients.
    let target = nodes[1].ipv4();
    let out = nodes[0].cli(&["ping", "--c", "10", "--timeout", "5s", &target]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.contains("pong from"),
        "ping n1 -> n2 failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("n1 -> n2: {}", text.lines().last().unwrap_or_default());

    // Taildrop between two nodes of the same user (on by default).
    let sent = root.join("greeting.txt");
    std::fs::write(&sent, b"hello over taildrop\n").expect("file");
    let out = nodes[0].cli(&[
        "file",
        "cp",
        sent.to_str().expect("path"),
        &format!("{}:", nodes[1].ipv4()),
    ]);
    assert!(
        out.status.success(),
        "tailscale file cp: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let inbox = root.join("n2-inbox");
    std::fs::create_dir_all(&inbox).expect("inbox");
    let out = nodes[1].cli(&["file", "get", "--wait", inbox.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "tailscale file get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(inbox.join("greeting.txt")).expect("file received"),
        "hello over taildrop\n"
    );

    // A node deleted with the CLI disappears from its peers' maps.
    let n3_id = listed
        .iter()
        .find(|e| e["given_name"] == "n3")
        .and_then(|e| e["id"].as_u64())
        .expect("n3 id");
    let out = server.cli(&["nodes", "delete", "--identifier", &n3_id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in &nodes[..2] {
        wait_for(
            &format!("{} to drop n3", n.name),
            Duration::from_secs(30),
            || {
                let ok = !n.peer_names().contains(&"n3".to_string());
                async move { ok.then_some(()) }
            },
        )
        .await;
    }

    // A node that logs out and registers again keeps its address.
    let before = nodes[1].ipv4();
    let out = nodes[1].cli(&["logout"]);
    assert!(
        out.status.success(),
        "logout: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    nodes[1].up(&url, &key).await;
    assert_eq!(
        nodes[1].ipv4(),
        before,
        "re-registered node keeps its address"
    );
    let listed = server.cli_json(&["nodes", "list"]);
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(2),
        "no duplicate node after re-login"
    );

    // A restart keeps everything: same nodes, same addresses, and the clients, which
    // reconnect by themselves, still reach each other.
    server.restart().await;
    let after = server.cli_json(&["nodes", "list"]);
    let key_of = |v: &serde_json::Value| -> Vec<(u64, String, String)> {
        let mut rows: Vec<(u64, String, String)> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["id"].as_u64().unwrap_or_default(),
                            e["given_name"].as_str().unwrap_or_default().to_string(),
                            e["ipv4"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.sort();
        rows
    };
    assert_eq!(key_of(&after), key_of(&listed), "state survives a restart");
    let users = server.cli_json(&["users", "list"]);
    assert_eq!(users.as_array().map(Vec::len), Some(1));
    let target = nodes[0].ipv4();
    wait_for(
        "n2 -> n1 ping after the server restart",
        Duration::from_secs(60),
        || {
            let out = nodes[1].cli(&["ping", "--c", "5", "--timeout", "5s", &target]);
            let ok =
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("pong from");
            async move { ok.then_some(()) }
        },
    )
    .await;
    // Registration still works after the restart (the key is reusable and not expired).
    let n4 = Tailscaled::start(&bin, &root, "n4");
    n4.up(&server.url(), &key).await;
    let ips: Vec<String> = nodes[..2].iter().map(|n| n.ipv4()).collect();
    assert!(
        !ips.contains(&n4.ipv4()),
        "a node registered after restart gets a fresh address"
    );

    drop(n4);
    drop(nodes);
    server.stop().await;
}

/// The `[dns]` settings reach the official client: its resolver answers MagicDNS names of
/// peers and the extra records, and it shows the nameservers, split DNS routes and search
/// domains it was given (a userspace-networking client never touches the host's DNS).
/// Tags an administrator sets, with the CLI or the REST API, reach the peer's map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_settings_and_admin_tags_reach_the_client() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let server = TestServer::start_with(|c| {
        c.dns.nameservers = vec!["127.0.0.1:5399".into()];
        c.dns
            .split
            .insert("corp.test".into(), vec!["127.0.0.1:5398".into()]);
        c.dns.search_domains = vec!["corp.test".into()];
        c.dns.extra_records.push(hydrascale::config::DnsRecord {
            name: "grafana.hydrascale.internal".into(),
            record_type: "A".into(),
            value: "100.64.0.99".into(),
        });
    })
    .await;
    let url = server.url();
    server.cli_json(&["users", "create", "alice"]);
    let key = create_key(&server, "alice", true);
    let root = server.dir.path().join("clients");
    let nodes: Vec<Tailscaled> = ["d1", "d2"]
        .iter()
        .map(|n| Tailscaled::start(&bin, &root, n))
        .collect();
    for n in &nodes {
        n.up(&url, &key).await;
    }
    let out = nodes[0].cli(&["set", "--accept-dns=true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d2_ip = nodes[1].ipv4();

    let query = |name: &str| {
        let out = nodes[0].cli(&["dns", "query", name, "A"]);
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    wait_for(
        "d1 resolves d2 through MagicDNS",
        Duration::from_secs(30),
        || {
            let answer = query("d2.hydrascale.internal.");
            let ok = answer.contains(&d2_ip);
            async move { ok.then_some(()) }
        },
    )
    .await;
    let answer = query("grafana.hydrascale.internal.");
    assert!(answer.contains("100.64.0.99"), "{answer}");

    let out = nodes[0].cli(&["dns", "status", "--json"]);
    let status = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{status}");
    for want in [
        "127.0.0.1:5399",
        "127.0.0.1:5398",
        "corp.test",
        "hydrascale.internal",
    ] {
        assert!(status.contains(want), "dns status lacks {want}: {status}");
    }

    // Tags set by an administrator (CLI, then REST) reach the peer's map.
    let d2_id = server
        .cli_json(&["nodes", "list"])
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["given_name"] == "d2"))
        .and_then(|n| n["id"].as_u64())
        .expect("d2 listed");
    let tagged = server.cli_json(&[
        "nodes",
        "tag",
        "-i",
        &d2_id.to_string(),
        "--tags",
        "tag:web,tag:db",
    ]);
    assert_eq!(
        tagged["tags"],
        serde_json::json!(["tag:db", "tag:web"]),
        "{tagged}"
    );
    let peer_tags = |c: &Tailscaled| {
        let st = c.status();
        st["Peer"]
            .as_object()
            .and_then(|m| m.values().find(|p| p["HostName"] == "d2"))
            .map(|p| p["Tags"].clone())
            .unwrap_or_default()
    };
    let table = String::from_utf8_lossy(&server.cli(&["nodes", "list"]).stdout).to_string();
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("d2") && l.contains(" tag:db,tag:web ")),
        "nodes list shows d2's tags: {table}"
    );
    wait_for("d1 sees d2's tags", Duration::from_secs(30), || {
        let ok = peer_tags(&nodes[0]) == serde_json::json!(["tag:db", "tag:web"]);
        async move { ok.then_some(()) }
    })
    .await;
    let api_key = server.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("api key")
        .to_string();
    let control = server.handle().control_addr.to_string();
    let path = format!("/api/v1/node/{d2_id}/tags");
    let (code, bad) = crate::fixtures::http_json(
        &control,
        "POST",
        &path,
        Some(&api_key),
        Some(r#"{"tags":["web"]}"#),
    );
    assert_eq!(code, 400, "{bad}");
    let (code, body) = crate::fixtures::http_json(
        &control,
        "POST",
        &path,
        Some(&api_key),
        Some(r#"{"tags":["tag:web"]}"#),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["node"]["tags"], serde_json::json!(["tag:web"]));
    wait_for("d1 sees d2's new tags", Duration::from_secs(30), || {
        let ok = peer_tags(&nodes[0]) == serde_json::json!(["tag:web"]);
        async move { ok.then_some(()) }
    })
    .await;
}

/// An ephemeral node whose client goes away (killed, no logout) is removed once it has
/// been offline for `ephemeral_inactivity_timeout`; its peer's map drops it, and a normal
/// node that goes offline stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_node_is_removed_after_inactivity() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let server = TestServer::start_with(|c| {
        c.ephemeral_inactivity_timeout = hydrascale::config::ConfigDuration::seconds(3)
    })
    .await;
    let url = server.url();
    server.cli_json(&["users", "create", "alice"]);
    let key = create_key(&server, "alice", true);
    let eph_key = server.cli_json(&[
        "preauthkeys",
        "create",
        "--user",
        "alice",
        "--ephemeral",
        "--expiration",
        "1h",
    ])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let root = server.dir.path().join("clients");
    let stays = Tailscaled::start(&bin, &root, "stays");
    stays.up(&url, &key).await;
    let watcher = Tailscaled::start(&bin, &root, "watcher");
    watcher.up(&url, &key).await;
    let eph = Tailscaled::start(&bin, &root, "eph");
    eph.up(&url, &eph_key).await;
    wait_for("watcher sees both", Duration::from_secs(30), || {
        let ok = watcher.peer_names() == ["eph", "stays"];
        async move { ok.then_some(()) }
    })
    .await;
    let listed = server.cli_json(&["nodes", "list"]);
    assert!(listed.to_string().contains("\"eph\""), "{listed}");
    drop(eph);
    drop(stays);
    let started = std::time::Instant::now();
    wait_for(
        "the ephemeral node removed, the other kept",
        Duration::from_secs(30),
        || {
            let ok = watcher.peer_names() == ["stays"];
            async move { ok.then_some(()) }
        },
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "removed before the inactivity timeout"
    );
    let listed = server.cli_json(&["nodes", "list"]).to_string();
    assert!(
        !listed.contains("\"eph\"") && listed.contains("\"stays\""),
        "{listed}"
    );
}

/// `tailscale up` without a key: the client shows `<server>/register/<id>`, the page
/// there names the machine, and the login completes once an administrator approves it,
/// with `hydrascale auth register` for one client and with the page's form (user and
/// API key) for the other; wrong users, ids and keys change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_login_completes_from_the_cli_and_from_the_page() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let server = TestServer::start().await;
    let url = server.url();
    let control = server.handle().control_addr.to_string();
    server.cli_json(&["users", "create", "alice"]);
    let api_key = server.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("api key")
        .to_string();
    let root = server.dir.path().join("clients");
    let clients: Vec<Tailscaled> = ["i1", "i2"]
        .iter()
        .map(|n| Tailscaled::start(&bin, &root, n))
        .collect();
    let mut ups = Vec::new();
    for c in &clients {
        let sock = c.dir.join("ts.sock");
        wait_for("tailscaled socket", Duration::from_secs(30), || {
            let ok = sock.exists();
            async move { ok.then_some(()) }
        })
        .await;
        let child = std::process::Command::new(bin.join("tailscale"))
            .arg(format!("--socket={}", sock.display()))
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
        ups.push(child);
    }
    let auth_url = |c: &Tailscaled| {
        let c = c.status();
        async move {
            c["AuthURL"]
                .as_str()
                .filter(|u| !u.is_empty())
                .map(str::to_string)
        }
    };
    let first = wait_for("i1 shows a login URL", Duration::from_secs(30), || {
        auth_url(&clients[0])
    })
    .await;
    assert!(first.starts_with(&format!("{url}/register/")), "{first}");
    let path = first.trim_start_matches(&url).to_string();
    let (code, page) = crate::fixtures::http_get(&control, &path).expect("page");
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("i1") && page.contains("hydrascale auth register"),
        "{page}"
    );

    let refused = server.cli(&["auth", "register", "--user", "mallory", "--auth-id", &first]);
    assert!(!refused.status.success());
    let refused = server.cli(&["auth", "register", "--user", "alice", "--auth-id", "0bad"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("no machine is waiting"),
        "{err}"
    );
    let node = server.cli_json(&["auth", "register", "--user", "alice", "--auth-id", &first]);
    assert_eq!(node["given_name"], "i1", "{node}");

    let second = wait_for("i2 shows a login URL", Duration::from_secs(30), || {
        auth_url(&clients[1])
    })
    .await;
    let path = second.trim_start_matches(&url).to_string();
    let post = |form: String| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&control).expect("connect");
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: {control}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        )
        .expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        text
    };
    let wrong = post("user=alice&api_key=hskey-api-000000000000-0000".into());
    assert!(
        wrong.starts_with("HTTP/1.0 401") || wrong.starts_with("HTTP/1.1 401"),
        "{wrong}"
    );
    let listed = server.cli_json(&["nodes", "list"]).to_string();
    assert!(
        !listed.contains("\"i2\""),
        "a refused approval registered i2: {listed}"
    );
    let ok = post(format!("user=alice&api_key={api_key}"));
    assert!(ok.contains("Machine registered"), "{ok}");

    for (c, up) in clients.iter().zip(ups) {
        let out = up.wait_with_output().expect("tailscale up");
        assert!(
            out.status.success(),
            "tailscale up for {}: {}{}\n{}",
            c.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            c.log_tail()
        );
    }
    wait_for("i1 and i2 see each other", Duration::from_secs(30), || {
        let ok = clients[0].peer_names() == ["i2"] && clients[1].peer_names() == ["i1"];
        async move { ok.then_some(()) }
    })
    .await;
}
