//! The tailnet policy with official clients: who sees whom, which ports a peer's packet
//! filter lets through, policy changes reaching connected clients, refused policies.

use std::time::Duration;

use crate::fixtures::{greeter, http_json, require_tailscale, wait_for, Tailscaled, TestServer};

fn key(server: &TestServer, user: &str, tags: Option<&str>) -> String {
    let mut args = vec!["preauthkeys", "create", "--user", user, "--reusable"];
    if let Some(t) = tags {
        args.extend(["--tags", t]);
    }
    let v = server.cli_json(&args);
    v["key"].as_str().expect("key").to_string()
}

fn write(server: &TestServer, name: &str, text: &str) -> String {
    let p = server.dir.path().join(name);
    std::fs::write(&p, text).expect("write policy");
    p.display().to_string()
}

/// Sets the policy through the REST API (headscale's shape), which must accept it.
fn put_policy(control: &str, api_key: &str, policy: &str) {
    let body = serde_json::json!({ "policy": policy }).to_string();
    let (code, resp) = http_json(control, "PUT", "/api/v1/policy", Some(api_key), Some(&body));
    assert_eq!(code, 200, "{resp}");
}

async fn wait_peers(c: &Tailscaled, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(
        &format!("{} to see exactly {want:?}", c.name),
        Duration::from_secs(30),
        || {
            let ok = c.peer_names() == want;
            async move { ok.then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn acl_policy_decides_peers_and_ports_and_changes_live() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let server = TestServer::start().await;
    let url = server.url();
    server.cli_json(&["users", "create", "alice"]);
    server.cli_json(&["users", "create", "bob"]);
    let alice = key(&server, "alice", None);
    let bob = key(&server, "bob", None);
    let web = key(&server, "alice", Some("tag:web"));
    let root = server.dir.path().join("clients");
    let a1 = Tailscaled::start(&bin, &root, "a1");
    let a2 = Tailscaled::start(&bin, &root, "a2");
    let b1 = Tailscaled::start(&bin, &root, "b1");
    let w1 = Tailscaled::start(&bin, &root, "w1");
    a1.up(&url, &alice).await;
    a2.up(&url, &alice).await;
    b1.up(&url, &bob).await;
    w1.up(&url, &web).await;
    // No policy: everyone sees everyone.
    wait_peers(&a1, &["a2", "b1", "w1"]).await;

    let open = greeter("open\n");
    let closed = greeter("closed\n");
    let policy = format!(
        r#"// bob's group may reach the web server on one port; everyone reaches their own devices.
{{
  "groups": {{ "group:eng": ["bob@"], }},
  "tagOwners": {{ "tag:web": ["alice@"] }},
  "acls": [
    {{ "action": "accept", "src": ["group:eng"], "dst": ["tag:web:{open}"], "proto": "tcp" }},
    {{ "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"] }}, // trailing comma
  ],
  "tests": [
    {{ "src": "bob@", "accept": ["tag:web:{open}"], "deny": ["tag:web:{closed}", "alice@:{open}"] }},
  ],
}}
"#
    );
    let file = write(&server, "policy.hujson", &policy);
    let out = server.cli(&["policy", "check", "-f", &file]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&["policy", "set", "-f", &file]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same streams, no reconnect: each client now sees only whom it may talk to.
    wait_peers(&a1, &["a2"]).await;
    wait_peers(&a2, &["a1"]).await;
    wait_peers(&b1, &["w1"]).await;
    wait_peers(&w1, &["b1"]).await;

    let w1_ip = w1.ipv4();
    let b1_ip = b1.ipv4();
    let a2_ip = a2.ipv4();
    let reply = wait_for("b1 reaches w1's open port", Duration::from_secs(30), || {
        let r = b1.nc(&w1_ip, open, Duration::from_secs(5));
        async move { r }
    })
    .await;
    assert_eq!(reply, "open\n");
    assert_eq!(
        b1.nc(&w1_ip, closed, Duration::from_secs(5)),
        None,
        "w1's filter lets b1 reach a port the policy does not open"
    );
    assert_eq!(
        w1.nc(&b1_ip, open, Duration::from_secs(5)),
        None,
        "b1's filter lets w1 in although only b1 -> w1 is allowed"
    );
    // autogroup:self: any port between alice's own devices. They registered one after
    // the other, so their addresses reach a2's filter as one range ("first-last").
    assert_eq!(
        a1.nc(&a2_ip, closed, Duration::from_secs(10)).as_deref(),
        Some("closed\n")
    );
    // alice cannot reach bob: he is not in her map at all.
    let ping = a1.cli(&["ping", "--c=1", "--timeout=3s", &b1_ip]);
    assert!(!ping.status.success());

    // --advertise-tags: only owners in tagOwners may put a tag on their machine.
    let t1 = Tailscaled::start(&bin, &root, "t1");
    let t2 = Tailscaled::start(&bin, &root, "t2");
    let up_tagged = |c: &Tailscaled, key: &str| {
        c.cli(&[
            "up",
            &format!("--login-server={url}"),
            &format!("--auth-key={key}"),
            &format!("--hostname={}", c.name),
            "--advertise-tags=tag:web",
            "--accept-dns=false",
            "--timeout=30s",
        ])
    };
    wait_for("t1's tailscaled", Duration::from_secs(30), || {
        let ok = t1.dir.join("ts.sock").exists() && t2.dir.join("ts.sock").exists();
        async move { ok.then_some(()) }
    })
    .await;
    let out = up_tagged(&t1, &bob);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "bob tagged a machine tag:web");
    assert!(err.contains("not permitted"), "{err}");
    let out = up_tagged(&t2, &alice);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(t2.status()["Self"]["Tags"], serde_json::json!(["tag:web"]));
    wait_peers(&b1, &["t2", "w1"]).await;
    drop(t1);

    // A policy with a syntax error and one whose own test fails are refused with their
    // place; the policy in force stays.
    let bad = write(
        &server,
        "bad.hujson",
        "{\n  \"acls\": [\n    {\"action\": \"accept\" \"src\": [\"*\"]}\n  ]\n}\n",
    );
    let out = server.cli(&["policy", "set", "-f", &bad]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("line 3, column 25"), "{err}");
    let failing = write(
        &server,
        "failing.hujson",
        r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["bob@:22"]}],
            "tests": [{"src": "alice@", "deny": ["bob@:22"]}]}"#,
    );
    let out = server.cli(&["policy", "check", "-f", &failing]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("line 2, column 50") && err.contains("test failed"),
        "{err}"
    );
    let out = server.cli(&["policy", "set", "-f", &failing]);
    assert!(!out.status.success());
    let got = server.cli(&["policy", "get"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout), policy);

    // The REST API (headscale's shape) changes it too: alice may now reach bob.
    let api_key = server.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("api key")
        .to_string();
    let control = server.handle().control_addr.to_string();
    let wider = policy.replace(
        r#""acls": ["#,
        r#""acls": [ { "action": "accept", "src": ["alice@"], "dst": ["bob@:*"] },"#,
    );
    put_policy(&control, &api_key, &wider);
    let (code, resp) = http_json(&control, "GET", "/api/v1/policy", Some(&api_key), None);
    assert_eq!(
        (code, resp["policy"].as_str()),
        (200, Some(wider.as_str())),
        "{resp}"
    );
    assert!(resp["updatedAt"].is_string(), "{resp}");
    let (code, _) = http_json(&control, "GET", "/api/v1/policy", None, None);
    assert_eq!(code, 401);

    wait_peers(&a1, &["a2", "b1"]).await;
    wait_peers(&b1, &["a1", "a2", "t2", "w1"]).await;
    let reply = wait_for(
        "a1 reaches b1 after the change",
        Duration::from_secs(30),
        || {
            let r = a1.nc(&b1_ip, closed, Duration::from_secs(5));
            async move { r }
        },
    )
    .await;
    assert_eq!(reply, "closed\n");

    // Everyone reaches everyone; then members reach only members: the tagged machines
    // lose sight of everyone, their own kind included, and each is told to remove its own
    // id too (a no-op for it, which lets all of a kind share one removal list). They stay
    // up, with their own addresses.
    let owners = r#""tagOwners": {"tag:web": ["alice@"]}"#;
    let everyone = r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#;
    put_policy(
        &control,
        &api_key,
        &format!(r#"{{{owners}, "acls": [{everyone}]}}"#),
    );
    wait_peers(&w1, &["a1", "a2", "b1", "t2"]).await;
    let members =
        r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}"#;
    put_policy(
        &control,
        &api_key,
        &format!(r#"{{{owners}, "acls": [{members}]}}"#),
    );
    wait_peers(&w1, &[]).await;
    wait_peers(&t2, &[]).await;
    wait_peers(&a1, &["a2", "b1"]).await;
    for tagged in [&w1, &t2] {
        let st = tagged.status();
        assert_eq!(st["BackendState"], "Running", "{}: {st}", tagged.name);
        let ips = st["Self"]["TailscaleIPs"].as_array().map_or(0, Vec::len);
        assert_eq!(ips, 2, "{}: {st}", tagged.name);
    }
}
