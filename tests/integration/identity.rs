//! OIDC identities that cannot be taken over, through the real provider (nanoidp) and the
//! official client: an e-mail address counts only when `email_verified` is the boolean
//! `true`; a first login never joins a user the CLI made, nor a user of unrecorded origin
//! (an administrator links those); nothing joins an account before the person confirms
//! on a page that resists cross-site posts and framing; a migration from headscale
//! carries its OIDC users' identities. And clients are told not to upload their logs.
//!
//! nanoidp always says `email_verified: true`, so `tests/tools/claims_proxy.py` stands in
//! front of it and gives chosen subjects an absent, `false` or `"true"` flag instead, as
//! other providers do; everything else is nanoidp's own answer.

use std::collections::BTreeMap;
use std::process::Child;
use std::time::Duration;

use crate::fixtures::{free_port, require_tailscale, wait_for, Tailscaled, TestServer};
use crate::oidc::{browse_as, login_url, start_provider_with, up_without_key, Browsed};

/// One HTTP/1.0 exchange with extra request headers: status, headers (lowercase names),
/// body.
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// A forged confirmation: what it is, its request headers, its form body.
type Attempt<'a> = (&'a str, Vec<(&'a str, &'a str)>, String);

/// Every answer of the control listener forbids framing.
fn assert_unframeable(what: &str, headers: &BTreeMap<String, String>) {
    assert_eq!(
        headers.get("x-frame-options").map(String::as_str),
        Some("DENY"),
        "{what}: {headers:?}"
    );
    assert!(
        headers
            .get("content-security-policy")
            .is_some_and(|c| c.contains("frame-ancestors 'none'")),
        "{what}: {headers:?}"
    );
}

/// The pages the browser saw, each checked.
fn assert_pages_unframeable(b: &Browsed) {
    assert!(!b.pages.is_empty());
    for p in &b.pages {
        let headers: BTreeMap<String, String> = p["headers"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap_or("").into()))
                    .collect()
            })
            .unwrap_or_default();
        assert_unframeable(&p["url"].to_string(), &headers);
    }
}

/// Users and nodes as they matter here: who is bound to what, and which machine is whose
/// with which key and expiry.
fn tailnet(server: &TestServer) -> (Vec<String>, Vec<String>) {
    let t = server.handle().db.store.read();
    let users = t
        .users
        .values()
        .map(|u| format!("{} {} {:?} {:?}", u.id, u.name, u.origin, u.oidc))
        .collect();
    let nodes = t
        .nodes
        .values()
        .map(|n| {
            format!(
                "{} {} user={} {} {} expiry={:?}",
                n.id, n.given_name, n.user_id, n.machine_key, n.node_key, n.expiry
            )
        })
        .collect();
    (users, nodes)
}

/// Waits for `tailscale up` to end; whether it succeeded.
async fn finished(up: &mut Child) -> bool {
    let st = wait_for("tailscale up to finish", Duration::from_secs(90), || {
        let st = up.try_wait().ok().flatten();
        async move { st }
    })
    .await;
    st.success()
}

async fn socket_ready(c: &Tailscaled) {
    let sock = c.dir.join("ts.sock");
    wait_for("tailscaled socket", Duration::from_secs(30), || {
        let ok = sock.exists();
        async move { ok.then_some(()) }
    })
    .await;
}

const USERS: &str = r#"config_version: 1
users:
  alice:
    password: "pw"
    email: "alice@example.com"
    attributes:
      name: "Alice Example"
  nover:
    password: "pw"
    email: "nover@example.com"
  strver:
    password: "pw"
    email: "strver@example.com"
  falsever:
    password: "pw"
    email: "falsever@example.com"
  bob:
    password: "pw"
    email: "bob@example.com"
"#;

/// What the proxy does to each subject's `email_verified` (nanoidp's subject is the
/// user name; alice keeps nanoidp's `true`).
const RULES: &str = r#"{"nover": "absent", "strver": "true", "falsever": false, "bob": false}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_identities_cannot_be_taken_over() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let addr = format!("127.0.0.1:{port}");
    let callback = format!("{url}/oidc/callback");
    let Some(idp) = start_provider_with(dir.path(), &[callback.as_str()], USERS, Some(RULES)).await
    else {
        return;
    };
    let issuer = idp.issuer.clone();
    let server_url = url.clone();
    let allowed: Vec<String> = ["alice", "nover", "strver", "falsever", "bob"]
        .iter()
        .map(|u| format!("{u}@example.com"))
        .collect();
    let mut server = TestServer::start_with(|c| {
        c.server_url = server_url;
        c.listen_addr = addr.parse().expect("addr");
        c.oidc.issuer = issuer.clone();
        c.oidc.client_id = "hydrascale".into();
        c.oidc.client_secret = "hydrascale-secret".into();
        c.oidc.allowed_users = allowed;
    })
    .await;
    let root = server.dir.path().join("clients");

    // bob, made by an administrator, with a machine of his.
    server.cli_json(&["users", "create", "bob"]);
    let key = server.cli_json(&["preauthkeys", "create", "--user", "bob"]);
    let b0 = Tailscaled::start(&bin, &root, "b0");
    b0.up(&url, key["key"].as_str().expect("key")).await;

    let c1 = Tailscaled::start(&bin, &root, "c1");
    socket_ready(&c1).await;
    let mut up1 = up_without_key(&c1, &bin, &url);
    let link = login_url(&c1).await;
    let auth_id = link.rsplit('/').next().expect("auth id").to_string();
    let start = tailnet(&server);

    // Addresses the provider did not verify (flag absent, "true" as a string, false) do
    // not satisfy allowed_users, which lists them: refused, nothing written.
    for who in ["nover", "strver", "falsever"] {
        let b = browse_as(&link, who, "pw", "approve");
        assert_eq!(
            (b.step.as_str(), b.status),
            ("callback", 403),
            "{who}: {}",
            b.body
        );
        assert!(b.body.contains("may not join"), "{who}: {}", b.body);
        assert_pages_unframeable(&b);
        assert_eq!(
            tailnet(&server),
            start,
            "{who}'s refused login changed the tailnet"
        );
    }

    // alice (verified) gets the confirmation page; nothing is written before she answers.
    let b = browse_as(&link, "alice", "pw", "stop");
    assert_eq!((b.step.as_str(), b.status), ("callback", 200), "{}", b.body);
    assert!(b.body.contains("Add this device?"), "{}", b.body);
    assert!(
        b.body.contains("<b>c1</b>"),
        "the page names the machine: {}",
        b.body
    );
    assert!(
        b.body.contains("<b>alice@example.com</b>'s account?"),
        "{}",
        b.body
    );
    assert_pages_unframeable(&b);
    assert_eq!(tailnet(&server), start);
    let ticket = b.ticket.clone().expect("ticket");
    let cookie = b.cookies.join("; ");
    assert!(
        cookie.starts_with(&format!("hydrascale_login_{auth_id}=")),
        "{cookie}"
    );
    let form = |ticket: &str, decision: &str| {
        serde_urlencoded::to_string([("ticket", ticket), ("decision", decision)]).expect("form")
    };
    let urlencoded = ("Content-Type", "application/x-www-form-urlencoded");
    let evil = ("Origin", "http://evil.example");

    // Forged confirmations: each refused, nothing written, no page frameable.
    let wrong_cookie = format!("hydrascale_login_{auth_id}=AAAAAAAAAAAAAAAAAAAAAA");
    let tampered = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (payload, tag) = ticket.split_once('.').expect("ticket shape");
        let mut v: serde_json::Value =
            serde_json::from_slice(&b64.decode(payload).expect("b64")).expect("json");
        v["subject"] = "bob".into();
        format!("{}.{tag}", b64.encode(v.to_string()))
    };
    let attempts: Vec<Attempt> = vec![
        (
            "a cross-site post without the ticket",
            vec![urlencoded, evil, ("Cookie", cookie.as_str())],
            form("", "approve"),
        ),
        (
            "a post without the ticket from this browser",
            vec![urlencoded, ("Cookie", cookie.as_str())],
            form("", "approve"),
        ),
        (
            "the ticket without the login cookie (what a cross-site post carries)",
            vec![urlencoded],
            form(&ticket, "approve"),
        ),
        (
            "the ticket from another site",
            vec![urlencoded, evil, ("Cookie", cookie.as_str())],
            form(&ticket, "approve"),
        ),
        (
            "the ticket with another session's cookie",
            vec![urlencoded, ("Cookie", wrong_cookie.as_str())],
            form(&ticket, "approve"),
        ),
        (
            "a ticket naming another subject",
            vec![urlencoded, ("Cookie", cookie.as_str())],
            form(&tampered, "approve"),
        ),
    ];
    for (what, headers, body) in &attempts {
        let r = request(&addr, "POST", "/oidc/confirm", headers, body);
        assert_eq!(r.status, 403, "{what}: {}", r.body);
        assert!(r.body.contains("nothing was changed"), "{what}: {}", r.body);
        assert_unframeable(what, &r.headers);
        assert_eq!(tailnet(&server), start, "{what} changed the tailnet");
    }
    let r = request(&addr, "GET", "/oidc/confirm", &[], "");
    assert_eq!(r.status, 405, "a confirmation is a POST only");
    assert_unframeable("GET /oidc/confirm", &r.headers);

    // Every other page too, found or not.
    for path in [
        format!("/register/{auth_id}?admin"),
        "/register/00ff00".to_string(),
        "/ssh/check/00ff00".to_string(),
        "/oidc/callback?code=x&state=zz.forged".to_string(),
        format!("/oidc/callback?code=x&state={auth_id}.bm90bXlzZXNzaW9u"),
        "/oidc/callback?error=access_denied".to_string(),
    ] {
        let r = request(&addr, "GET", &path, &[], "");
        assert!(r.body.contains("<!doctype html>"), "{path}: {}", r.body);
        assert_unframeable(&path, &r.headers);
    }
    // A callback in a browser that did not start the login (no cookie) is refused before
    // its code is spent.
    let r = request(
        &addr,
        "GET",
        &format!("/oidc/callback?code=x&state={auth_id}.bm90bXlzZXNzaW9u"),
        &[],
        "",
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(tailnet(&server), start);

    // The real confirmation, from the browser that logged in: alice's own new user, bound
    // to her identity, owns c1.
    let own_origin = ("Origin", url.as_str());
    let r = request(
        &addr,
        "POST",
        "/oidc/confirm",
        &[urlencoded, own_origin, ("Cookie", cookie.as_str())],
        &form(&ticket, "approve"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("Machine registered"), "{}", r.body);
    assert_unframeable("the confirmation's answer", &r.headers);
    assert!(
        finished(&mut up1).await,
        "tailscale up failed after approval"
    );
    let users = server.cli_json(&["users", "list"]);
    let alice = users
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == "alice@example.com"))
        .unwrap_or_else(|| panic!("{users}"));
    assert_eq!(alice["origin"], "oidc", "{users}");
    assert_eq!(alice["oidc_subject"], "alice", "{users}");
    assert_eq!(alice["oidc_issuer"], idp.issuer.as_str(), "{users}");
    assert_eq!(alice["display_name"], "Alice Example", "{users}");
    let after = tailnet(&server);
    assert_eq!(after.0.len(), start.0.len() + 1, "one user more: {after:?}");
    assert_eq!(after.1.len(), start.1.len() + 1, "one node more: {after:?}");
    assert!(
        start.0.iter().all(|u| after.0.contains(u)) && start.1.iter().all(|n| after.1.contains(n)),
        "nothing else changed: {start:?} -> {after:?}"
    );
    // The ticket is spent: replayed, it registers nothing.
    let r = request(
        &addr,
        "POST",
        "/oidc/confirm",
        &[urlencoded, ("Cookie", cookie.as_str())],
        &form(&ticket, "approve"),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(tailnet(&server), after);

    // Cancel adds nothing.
    let c2 = Tailscaled::start(&bin, &root, "c2");
    socket_ready(&c2).await;
    let mut up2 = up_without_key(&c2, &bin, &url);
    let link2 = login_url(&c2).await;
    let b = browse_as(&link2, "alice", "pw", "cancel");
    assert_eq!((b.step.as_str(), b.status), ("confirm", 200), "{}", b.body);
    assert!(b.body.contains("Device not added"), "{}", b.body);
    assert_pages_unframeable(&b);
    assert_eq!(tailnet(&server), after);
    let _ = up2.kill();
    let _ = up2.wait();
    drop(c2);

    // Without allow lists, unverified addresses are not names either: each person gets a
    // user named by preferred_username, and the page never shows the address.
    server.config.oidc.allowed_users.clear();
    server.restart().await;
    for who in ["nover", "strver", "falsever"] {
        let c = Tailscaled::start(&bin, &root, &format!("m-{who}"));
        socket_ready(&c).await;
        let mut up = up_without_key(&c, &bin, &url);
        let link = login_url(&c).await;
        let b = browse_as(&link, who, "pw", "stop");
        assert_eq!(b.status, 200, "{who}: {}", b.body);
        assert!(
            b.body.contains(&format!("<b>{who}</b>'s account?")),
            "{who}: {}",
            b.body
        );
        assert!(!b.body.contains("@example.com"), "{who}: {}", b.body);
        let b = browse_as(&link, who, "pw", "approve");
        assert_eq!(
            (b.step.as_str(), b.status),
            ("confirm", 200),
            "{who}: {}",
            b.body
        );
        assert!(finished(&mut up).await, "{who}: tailscale up failed");
        let (subject, by_address) = {
            let t = server.handle().db.store.read();
            let u = t
                .user_by_name(who)
                .unwrap_or_else(|| panic!("no user {who}"));
            (
                u.oidc.as_ref().map(|o| o.subject.clone()),
                t.user_by_name(&format!("{who}@example.com")).is_some(),
            )
        };
        assert_eq!(subject.as_deref(), Some(who));
        assert!(
            !by_address,
            "{who} got a user named by an unverified address"
        );
    }

    // bob at the provider (preferred_username "bob", address unverified) is not the
    // administrator's bob: a user of his own, and bob and bob's machine stay as they were.
    let before = tailnet(&server);
    let cli_bob = server
        .handle()
        .db
        .store
        .read()
        .user_by_name("bob")
        .cloned()
        .expect("bob");
    let cb = Tailscaled::start(&bin, &root, "cb");
    socket_ready(&cb).await;
    let mut up = up_without_key(&cb, &bin, &url);
    let link = login_url(&cb).await;
    let b = browse_as(&link, "bob", "pw", "stop");
    assert!(b.body.contains("<b>bob-2</b>'s account?"), "{}", b.body);
    let b = browse_as(&link, "bob", "pw", "approve");
    assert_eq!((b.step.as_str(), b.status), ("confirm", 200), "{}", b.body);
    assert!(finished(&mut up).await, "bob's tailscale up failed");
    let nodes = server.cli_json(&["nodes", "list"]);
    let owner = |host: &str| {
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["hostname"] == host))
            .map(|n| n["user"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(owner("cb").as_deref(), Some("bob-2"), "{nodes}");
    assert_eq!(owner("b0").as_deref(), Some("bob"), "{nodes}");
    let bob_now = server.handle().db.store.read().user_by_name("bob").cloned();
    assert_eq!(bob_now, Some(cli_bob));
    let after = tailnet(&server);
    assert!(
        before.0.iter().all(|u| after.0.contains(u))
            && before.1.iter().all(|n| after.1.contains(n)),
        "nothing else changed: {before:?} -> {after:?}"
    );
    // One identity is one user: it cannot be linked to the administrator's bob as well.
    let out = server.cli(&[
        "users",
        "link",
        "--name",
        "bob",
        "--issuer",
        &idp.issuer,
        "--subject",
        "bob",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already belongs to user \"bob-2\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tailnet(&server), after);
    drop((b0, c1, cb, idp));
}

/// headscale's OIDC users come over with their identity when it is under the issuer;
/// one that cannot be placed is refused at its login (with the command to link it) until
/// an administrator links it, and is then reached by that identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_and_unlinked_oidc_users() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let callback = format!("{url}/oidc/callback");
    let users = "config_version: 1\nusers:\n  dave:\n    password: \"pw\"\n    email: \"dave@example.com\"\n  \
                 carol:\n    password: \"pw\"\n    email: \"\"\n";
    let Some(idp) = start_provider_with(dir.path(), &[callback.as_str()], users, None).await else {
        return;
    };

    // headscale's database with two OIDC users added: dave under this issuer, carol
    // under one that no longer exists.
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/headscale-0.29.2");
    let db = dir.path().join("db.sqlite");
    std::fs::copy(fixture.join("db.sqlite"), &db).expect("copy db");
    {
        let c = rusqlite::Connection::open(&db).expect("open copy");
        c.execute(
            "INSERT INTO users (id, created_at, updated_at, name, display_name, email, provider_identifier, provider) \
             VALUES (3, '2026-11-27 15:30:00+00:00', '2026-11-27 15:30:00+00:00', 'dave', 'Dave', 'dave@example.com', ?1, 'oidc'), \
                    (4, '2026-11-27 15:30:00+00:00', '2026-11-27 15:30:00+00:00', 'carol', 'Carol', '', 'https://old-idp.example/carol', 'oidc')",
            [format!("{}/dave", idp.issuer)],
        )
        .expect("insert users");
    }
    let backup = dir.path().join("from-headscale.backup");
    let out = crate::fixtures::hydrascale_command()
        .args(["-o", "json", "migrate", "headscale", "--db"])
        .arg(&db)
        .arg("--noise-key")
        .arg(fixture.join("noise_private.key"))
        .arg("--out")
        .arg(&backup)
        .args(["--oidc-issuer", &idp.issuer])
        .output()
        .expect("migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["report"]["oidc_linked"], 1, "{report}");
    let unlinked = report["report"]["oidc_unlinked"].to_string();
    assert!(unlinked.contains("carol"), "{report}");

    let issuer = idp.issuer.clone();
    let server = TestServer::start_with(|c| {
        c.server_url = url.clone();
        c.listen_addr = format!("127.0.0.1:{port}").parse().expect("addr");
        c.oidc.issuer = issuer;
        c.oidc.client_id = "hydrascale".into();
        c.oidc.client_secret = "hydrascale-secret".into();
        c.cluster.restore_from = Some(backup.clone());
    })
    .await;
    let users = server.cli_json(&["users", "list"]);
    let origin = |name: &str| {
        users
            .as_array()
            .and_then(|a| a.iter().find(|u| u["name"] == name))
            .map(|u| (u["origin"].clone(), u["oidc_subject"].clone()))
            .unwrap_or_else(|| panic!("{name}: {users}"))
    };
    assert_eq!(origin("alice"), ("admin".into(), "".into()));
    assert_eq!(origin("dave"), ("oidc".into(), "dave".into()));
    assert_eq!(origin("carol"), ("unrecorded".into(), "".into()));
    let root = server.dir.path().join("clients");

    // dave's login reaches the migrated dave.
    let d1 = Tailscaled::start(&bin, &root, "d1");
    socket_ready(&d1).await;
    let mut up = up_without_key(&d1, &bin, &url);
    let link = login_url(&d1).await;
    let b = browse_as(&link, "dave", "pw", "stop");
    assert!(b.body.contains("<b>dave</b>'s account?"), "{}", b.body);
    assert!(!b.body.contains("new one"), "{}", b.body);
    let b = browse_as(&link, "dave", "pw", "approve");
    assert_eq!((b.step.as_str(), b.status), ("confirm", 200), "{}", b.body);
    assert!(finished(&mut up).await);

    // carol's name is the unlinked carol's: refused, with the command that links them.
    let start = tailnet(&server);
    let c1 = Tailscaled::start(&bin, &root, "c1");
    socket_ready(&c1).await;
    let mut up = up_without_key(&c1, &bin, &url);
    let link = login_url(&c1).await;
    let b = browse_as(&link, "carol", "pw", "stop");
    assert_eq!(b.status, 403, "{}", b.body);
    let command = format!(
        "hydrascale users link --name carol --issuer {} --subject carol",
        idp.issuer
    );
    assert!(b.body.contains(&command), "{}", b.body);
    assert_pages_unframeable(&b);
    assert_eq!(tailnet(&server), start);
    // The administrator links her; the same waiting login now reaches the old carol.
    let linked = server.cli_json(&[
        "users",
        "link",
        "--name",
        "carol",
        "--issuer",
        &idp.issuer,
        "--subject",
        "carol",
    ]);
    assert_eq!(linked["oidc_subject"], "carol");
    let b = browse_as(&link, "carol", "pw", "approve");
    assert_eq!((b.step.as_str(), b.status), ("confirm", 200), "{}", b.body);
    assert!(finished(&mut up).await);
    let nodes = server.cli_json(&["nodes", "list"]);
    let node = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["hostname"] == "c1"))
        .unwrap_or_else(|| panic!("{nodes}"));
    assert_eq!(node["user"], "carol");
    let after = tailnet(&server);
    assert_eq!(
        after.0.len(),
        start.0.len(),
        "no user was created: {after:?}"
    );
    drop((d1, c1, idp));
}

/// Every client is told not to upload its logs to Tailscale (`Debug.DisableLogTail`), as
/// the official client shows: its bug report marker says logging is off once it has a map
/// from this server. `client_log_upload = true` leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_told_not_to_upload_logs() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    // Where the clients would upload: a port nothing listens on, never Tailscale's.
    let sink = format!("http://127.0.0.1:{}", free_port());
    for upload in [false, true] {
        let server = TestServer::start_with(|c| c.client_log_upload = upload).await;
        let root = server.dir.path().join("clients");
        let c = Tailscaled::start_logging(&bin, &root, "logs", &sink);
        socket_ready(&c).await;
        let marker = |c: &Tailscaled| {
            let out = c.cli(&["bugreport"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let before = marker(&c);
        assert!(
            before.starts_with("BUG-") && !before.contains("NO-LOGS"),
            "logging was on before the client met the server: {before}"
        );
        server.cli_json(&["users", "create", "u"]);
        let key = server.cli_json(&["preauthkeys", "create", "--user", "u"]);
        c.up(&server.url(), key["key"].as_str().expect("key")).await;
        let after = wait_for(
            "the map's Debug to take effect",
            Duration::from_secs(30),
            || {
                let m = marker(&c);
                let done = upload || m.contains("NO-LOGS-NO-SUPPORT");
                async move { done.then_some(m) }
            },
        )
        .await;
        eprintln!(
            "client_log_upload = {upload}: bug report marker before {before:?}, after {after:?}"
        );
        if upload {
            assert!(!after.contains("NO-LOGS"), "{after}");
        } else {
            assert!(after.contains("BUG-NO-LOGS-NO-SUPPORT"), "{after}");
        }
    }
}
