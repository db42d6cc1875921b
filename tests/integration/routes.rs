//! Subnet routes and exit nodes with official clients: advertised, approved by an
//! administrator or by the policy's autoApprovers, carried by one primary router with
//! failover, and gone when approval is withdrawn.

use std::time::Duration;

use crate::fixtures::{
    greeter_at, http_json, require_tailscale, wait_for, Lan, LanAddress, Tailscaled, TestServer,
};

fn node_id(server: &TestServer, name: &str) -> u64 {
    server
        .cli_json(&["nodes", "list"])
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["given_name"] == name))
        .and_then(|n| n["id"].as_u64())
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

fn set(c: &Tailscaled, args: &[&str]) {
    let mut all = vec!["set"];
    all.extend_from_slice(args);
    let out = c.cli(&all);
    assert!(
        out.status.success(),
        "tailscale {all:?} on {}: {}",
        c.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn reaches(c: &Tailscaled, ip: &str, port: u16, what: &str) {
    let got = wait_for(what, Duration::from_secs(45), || {
        let r = c.nc(ip, port, Duration::from_secs(5));
        async move { r }
    })
    .await;
    assert_eq!(got, "lan\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn subnet_routes_fail_over_and_exit_nodes_carry_traffic() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    // The routers run on this host, which has the "LAN" address 10.199.0.1; the client c1
    // runs in a network namespace that reaches only this host's bridge (where the server
    // listens), so 10.199.0.1 is reachable for it only through a router or exit node.
    let _lan_address = LanAddress::new("10.199.0.1/32");
    let port = greeter_at("10.199.0.1", "lan\n");
    // A stand-in for a host on the internet (TEST-NET-2, on this host's loopback only).
    let _internet_address = LanAddress::new("198.51.100.7/32");
    let web = greeter_at("198.51.100.7", "internet\n");
    let lan = Lan::new(1);
    let gateway = lan.gateway();
    let server = TestServer::start_with(|c| {
        c.listen_addr = format!("{gateway}:0").parse().expect("addr");
        c.derp.stun_listen_addr = format!("{gateway}:0").parse().expect("addr");
    })
    .await;
    let url = server.url();
    server.cli_json(&["users", "create", "alice"]);
    let key = server.cli_json(&["preauthkeys", "create", "--user", "alice", "--reusable"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let root = server.dir.path().join("clients");
    let r1 = Tailscaled::start(&bin, &root, "r1");
    let r2 = Tailscaled::start(&bin, &root, "r2");
    let c1 = Tailscaled::start_in(&bin, &root, "c1", lan.netns(0));
    let e1 = Tailscaled::start(&bin, &root, "e1");
    for c in [&r1, &r2, &c1, &e1] {
        c.up(&url, &key).await;
    }
    set(&r1, &["--advertise-routes=10.199.0.0/24"]);
    set(&r2, &["--advertise-routes=10.199.0.0/24"]);
    set(&c1, &["--accept-routes"]);
    let (r1_id, r2_id) = (node_id(&server, "r1"), node_id(&server, "r2"));
    wait_for("r1's advertised route", Duration::from_secs(30), || {
        let n = server.cli_json(&["nodes", "list"]);
        let ok = n.as_array().is_some_and(|ns| {
            ns.iter()
                .filter(|n| n["available_routes"] == serde_json::json!(["10.199.0.0/24"]))
                .count()
                == 2
        });
        async move { ok.then_some(()) }
    })
    .await;

    // Advertised but not approved: nobody carries the subnet.
    assert_eq!(c1.nc("10.199.0.1", port, Duration::from_secs(5)), None);

    // Approved by an administrator: r1 carries it.
    let out = server.cli_json(&[
        "nodes",
        "approve-routes",
        "-i",
        &r1_id.to_string(),
        "--routes",
        "10.199.0.0/24",
    ]);
    assert_eq!(
        out["subnet_routes"],
        serde_json::json!(["10.199.0.0/24"]),
        "{out}"
    );
    reaches(&c1, "10.199.0.1", port, "c1 reaches the subnet through r1").await;
    // The table shows both: r1 approved and advertising it, r2 only advertising it.
    let table = String::from_utf8_lossy(&server.cli(&["nodes", "list"]).stdout).to_string();
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .map(|l| l.split_whitespace().rev().take(2).collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no row for {name}: {table}"))
    };
    assert_eq!(row("r1"), ["10.199.0.0/24", "10.199.0.0/24"], "{table}");
    assert_eq!(row("r2"), ["10.199.0.0/24", "-"], "{table}");

    // r2 approved too (REST, headscale's shape) stands by; r1 stays primary.
    let api_key = server.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("api key")
        .to_string();
    let control = server.handle().control_addr.to_string();
    let (code, body) = http_json(
        &control,
        "POST",
        &format!("/api/v1/node/{r2_id}/approve_routes"),
        Some(&api_key),
        Some(r#"{"routes": ["10.199.0.0/24"]}"#),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["node"]["approvedRoutes"],
        serde_json::json!(["10.199.0.0/24"])
    );
    assert_eq!(
        body["node"]["subnetRoutes"],
        serde_json::json!([]),
        "{body}"
    );
    let (code, body) = http_json(
        &control,
        "POST",
        &format!("/api/v1/node/{r2_id}/approve_routes"),
        Some(&api_key),
        Some(r#"{"routes": ["10.199.0.0/33"]}"#),
    );
    assert_eq!(code, 400, "{body}");

    // r1 dies: r2 takes the route over.
    let died = std::time::Instant::now();
    drop(r1);
    wait_for(
        "r2 to become the primary router",
        Duration::from_secs(30),
        || {
            let n = server.cli_json(&["nodes", "list"]);
            let ok = n.as_array().is_some_and(|ns| {
                ns.iter().any(|n| {
                    n["id"] == r2_id && n["subnet_routes"] == serde_json::json!(["10.199.0.0/24"])
                })
            });
            async move { ok.then_some(()) }
        },
    )
    .await;
    reaches(&c1, "10.199.0.1", port, "c1 reaches the subnet through r2").await;
    eprintln!(
        "measured: subnet reachable through the standby router {:?} after the primary died",
        died.elapsed()
    );

    // Approval withdrawn: the subnet is gone.
    server.cli_json(&["nodes", "approve-routes", "-i", &r2_id.to_string()]);
    wait_for(
        "the route to leave c1's map",
        Duration::from_secs(30),
        || {
            let gone = c1.nc("10.199.0.1", port, Duration::from_secs(5)).is_none();
            async move { gone.then_some(()) }
        },
    )
    .await;

    // Exit node approved by the policy's autoApprovers; c1 sends through it.
    let policy = server.dir.path().join("policy.hujson");
    std::fs::write(
        &policy,
        r#"{
  "acls": [{ "action": "accept", "src": ["*"], "dst": ["*:*"] }],
  "autoApprovers": { "exitNode": ["alice@"] },
}"#,
    )
    .expect("policy");
    server.cli_json(&["policy", "set", "-f", &policy.display().to_string()]);
    set(&e1, &["--advertise-exit-node"]);
    let e1_id = node_id(&server, "e1");
    wait_for(
        "e1 auto-approved as exit node",
        Duration::from_secs(30),
        || {
            let n = server.cli_json(&["nodes", "list"]);
            let ok = n.as_array().is_some_and(|ns| {
                ns.iter().any(|n| {
                    n["id"] == e1_id
                        && n["approved_routes"] == serde_json::json!(["0.0.0.0/0", "::/0"])
                })
            });
            async move { ok.then_some(()) }
        },
    )
    .await;
    let e1_ip = e1.ipv4();
    wait_for(
        "c1 to accept e1 as exit node",
        Duration::from_secs(30),
        || {
            let ok = c1
                .cli(&["set", &format!("--exit-node={e1_ip}")])
                .status
                .success();
            async move { ok.then_some(()) }
        },
    )
    .await;
    // An exit node carries traffic to the internet, not to its own LAN (the client keeps
    // that out of a default route), so the far end here is a public-range address.
    let got = wait_for(
        "c1 reaches the internet through e1",
        Duration::from_secs(45),
        || {
            let r = c1.nc("198.51.100.7", web, Duration::from_secs(5));
            async move { r }
        },
    )
    .await;
    assert_eq!(got, "internet\n");
    // Without the exit node it is unreachable from c1's namespace.
    set(&c1, &["--exit-node="]);
    assert_eq!(c1.nc("198.51.100.7", web, Duration::from_secs(5)), None);
}
