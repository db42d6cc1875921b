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
