//! OIDC login with a real identity provider (nanoidp, from PyPI) and an official client:
//! `tailscale up` without a key shows the login URL, the person logs in at the provider
//! and the machine joins as their user; someone outside `allowed_groups` is refused.
//! Then a Tailscale SSH `check` rule: the held connection goes on once its owner logs in
//! at the provider.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::fixtures::{free_port, http_get, require_tailscale, wait_for, Tailscaled, TestServer};

/// nanoidp running on loopback (with, optionally, `tests/tools/claims_proxy.py` in front
/// of it); both killed when dropped.
pub struct Provider {
    child: Child,
    proxy: Option<Child>,
    pub issuer: String,
}

impl Drop for Provider {
    fn drop(&mut self) {
        for c in std::iter::once(&mut self.child).chain(self.proxy.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tools() -> Option<PathBuf> {
    std::env::var_os("HYDRASCALE_TOOLS_DIR").map(PathBuf::from)
}

/// The two users of the first tests: alice (group eng) and mallory.
const USERS: &str = "config_version: 1\nusers:\n  alice:\n    password: \"alice-pass\"\n    email: \"alice@example.com\"\n    \
         groups:\n      - \"eng\"\n    attributes:\n      name: \"Alice Example\"\n  \
         mallory:\n    password: \"mallory-pass\"\n    email: \"mallory@evil.test\"\n";

async fn start_provider(dir: &std::path::Path, redirect: &str) -> Option<Provider> {
    start_provider_with(dir, &[redirect], USERS, None).await
}

/// nanoidp with `users_yaml`, accepting logins for the callbacks `redirects`. With
/// `rules` (claims_proxy.py's: subject -> its userinfo's `email_verified`, or "absent"),
/// the claims proxy stands in front and is the issuer.
pub async fn start_provider_with(
    dir: &std::path::Path,
    redirects: &[&str],
    users_yaml: &str,
    rules: Option<&str>,
) -> Option<Provider> {
    let bin = tools()?.join("oidcvenv/bin/nanoidp");
    if !bin.exists() {
        assert!(
            std::env::var_os("HYDRASCALE_INTEROP").is_none(),
            "nanoidp is missing at {}; run scripts/install-deps.sh",
            bin.display()
        );
        return None;
    }
    let port = free_port();
    let proxy_port = rules.map(|_| free_port());
    let issuer = format!("http://127.0.0.1:{}", proxy_port.unwrap_or(port));
    let conf = dir.join("idp");
    std::fs::create_dir_all(conf.join("keys")).expect("idp dir");
    let redirect_uris: String = redirects
        .iter()
        .map(|r| format!("        - \"{r}\"\n"))
        .collect();
    std::fs::write(
        conf.join("settings.yaml"),
        format!(
            "config_version: 1\nserver:\n  host: \"127.0.0.1\"\n  port: {port}\n\
             oauth:\n  issuer: \"{issuer}\"\n  audience: \"hydrascale\"\n  token_expiry_minutes: 60\n  \
             clients:\n    - client_id: \"hydrascale\"\n      client_secret: \"hydrascale-secret\"\n      \
             redirect_uris:\n{redirect_uris}      token_endpoint_auth_method: \"client_secret_basic\"\n\
             jwt:\n  keys_dir: \"{keys}\"\nsession:\n  secret_key: \"test-session-secret\"\n",
            keys = conf.join("keys").display()
        ),
    )
    .expect("settings");
    std::fs::write(conf.join("users.yaml"), users_yaml).expect("users");
    let log = std::fs::File::create(dir.join("idp.log")).expect("log");
    let child = Command::new(bin)
        .args([
            "--config",
            &conf.display().to_string(),
            "--host",
            "127.0.0.1",
        ])
        .args(["--port", &port.to_string()])
        .current_dir(&conf)
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start nanoidp");
    let mut provider = Provider {
        child,
        proxy: None,
        issuer,
    };
    if let (Some(rules), Some(pp)) = (rules, proxy_port) {
        let python = tools().expect("tools dir").join("oidcvenv/bin/python");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/claims_proxy.py");
        let log = std::fs::File::create(dir.join("claims-proxy.log")).expect("log");
        provider.proxy = Some(
            Command::new(python)
                .arg(script)
                .args([&pp.to_string(), &format!("http://127.0.0.1:{port}"), rules])
                .stdout(Stdio::from(log.try_clone().expect("log")))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("start claims_proxy.py"),
        );
    }
    let addr = provider.issuer.trim_start_matches("http://").to_string();
    wait_for(
        "nanoidp to serve discovery",
        Duration::from_secs(60),
        || {
            let ok =
                http_get(&addr, "/.well-known/openid-configuration").is_some_and(|(c, _)| c == 200);
            async move { ok.then_some(()) }
        },
    )
    .await;
    Some(provider)
}

/// What the browser (tests/tools/oidc_browser.py) ended with.
pub struct Browsed {
    /// "callback" (stopped at, or refused at, Hydrascale's callback) or "confirm" (the
    /// device form was sent).
    pub step: String,
    pub status: u64,
    pub body: String,
    /// The device form's ticket, when the callback showed the form.
    pub ticket: Option<String>,
    /// Hydrascale's login cookies, `name=value`.
    pub cookies: Vec<String>,
    /// Every Hydrascale answer on the way: `{url, status, headers}`.
    pub pages: Vec<serde_json::Value>,
}

/// The person at the browser logs in as `user` and then does `decision` ("approve",
/// "cancel" or "stop") on the device form.
pub fn browse_as(login_url: &str, user: &str, password: &str, decision: &str) -> Browsed {
    let python = tools().expect("tools dir").join("oidcvenv/bin/python");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/oidc_browser.py");
    let out = Command::new(python)
        .arg(script)
        .args([login_url, user, password, decision])
        .output()
        .expect("run oidc_browser.py");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "oidc_browser.py: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let step = v["step"].as_str().unwrap_or_default().to_string();
    assert!(step == "callback" || step == "confirm", "{v}");
    Browsed {
        step,
        status: v["status"].as_u64().unwrap_or(0),
        body: v["body"].as_str().unwrap_or_default().to_string(),
        ticket: v["ticket"].as_str().map(str::to_string),
        cookies: v["cookies"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        pages: v["pages"].as_array().cloned().unwrap_or_default(),
    }
}

/// The browser's part, approving the device: (status, page).
fn browse(login_url: &str, user: &str, password: &str) -> (u64, String) {
    let b = browse_as(login_url, user, password, "approve");
    (b.status, b.body)
}

pub fn up_without_key(c: &Tailscaled, bin: &std::path::Path, url: &str) -> Child {
    Command::new(bin.join("tailscale"))
        .arg(format!("--socket={}", c.dir.join("ts.sock").display()))
        .args([
            "up",
            &format!("--login-server={url}"),
            &format!("--hostname={}", c.name),
        ])
        .args(["--accept-dns=false", "--timeout=120s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tailscale up")
}

pub async fn login_url(c: &Tailscaled) -> String {
    wait_for(
        &format!("{} shows a login URL", c.name),
        Duration::from_secs(30),
        || {
            let u = c.status()["AuthURL"]
                .as_str()
                .filter(|u| !u.is_empty())
                .map(str::to_string);
            async move { u }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn oidc_login_with_a_real_provider() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let Some(idp) = start_provider(dir.path(), &format!("{url}/oidc/callback")).await else {
        return;
    };
    let issuer = idp.issuer.clone();
    let server_url = url.clone();
    let server = TestServer::start_with(|c| {
        c.server_url = server_url;
        c.listen_addr = format!("127.0.0.1:{port}").parse().expect("addr");
        c.oidc.issuer = issuer;
        c.oidc.client_id = "hydrascale".into();
        c.oidc.client_secret = "hydrascale-secret".into();
        c.oidc.allowed_groups = vec!["eng".into()];
    })
    .await;
    assert_eq!(server.url(), url);
    let root = server.dir.path().join("clients");
    let o1 = Tailscaled::start(&bin, &root, "o1");
    let o2 = Tailscaled::start(&bin, &root, "o2");
    for c in [&o1, &o2] {
        let sock = c.dir.join("ts.sock");
        wait_for("tailscaled socket", Duration::from_secs(30), || {
            let ok = sock.exists();
            async move { ok.then_some(()) }
        })
        .await;
    }

    // Someone outside allowed_groups logs in at the provider: refused, nothing created.
    let mut up2 = up_without_key(&o2, &bin, &url);
    let link = login_url(&o2).await;
    let (code, page) = browse(&link, "mallory", "mallory-pass");
    assert_eq!(code, 403, "{page}");
    assert!(page.contains("may not join this tailnet"), "{page}");
    assert_eq!(server.cli_json(&["users", "list"]), serde_json::json!([]));
    let _ = up2.kill();
    let _ = up2.wait();

    // alice (group eng) logs in: her user appears and the machine joins as hers.
    let mut up1 = up_without_key(&o1, &bin, &url);
    let link = login_url(&o1).await;
    assert!(link.starts_with(&format!("{url}/register/")), "{link}");
    let (code, page) = browse(&link, "alice", "alice-pass");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Machine registered"), "{page}");
    let done = wait_for("tailscale up to finish", Duration::from_secs(60), || {
        let st = up1.try_wait().ok().flatten();
        async move { st }
    })
    .await;
    assert!(done.success(), "tailscale up failed after the OIDC login");
    assert_eq!(o1.status()["BackendState"], "Running");
    let users = server.cli_json(&["users", "list"]);
    assert_eq!(users[0]["name"], "alice@example.com", "{users}");
    assert_eq!(users[0]["display_name"], "Alice Example", "{users}");
    // The verified address becomes the user's e-mail, and the node says how it came in.
    assert_eq!(users[0]["email"], "alice@example.com", "{users}");
    let node_id = server.cli_json(&["nodes", "list"])[0]["id"]
        .as_u64()
        .expect("node id");
    let api_key = server.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let (_, node) = crate::fixtures::http_json(
        &server.handle().control_addr.to_string(),
        "GET",
        &format!("/api/v1/node/{node_id}"),
        Some(&api_key),
        None,
    );
    assert_eq!(
        node["node"]["registerMethod"], "REGISTER_METHOD_OIDC",
        "{node}"
    );
    assert_eq!(node["node"]["user"]["email"], "alice@example.com", "{node}");
    let nodes = server.cli_json(&["nodes", "list"]);
    assert_eq!(nodes[0]["user"], "alice@example.com", "{nodes}");
    assert_eq!(nodes[0]["given_name"], "o1", "{nodes}");

    // A login link replayed after use, or a forged state, changes nothing.
    let (code, _) = http_get(
        &format!("127.0.0.1:{port}"),
        "/oidc/callback?code=x&state=zz.forged",
    )
    .expect("callback");
    assert_eq!(code, 400);

    // SSH check through the provider: o2 joins as alice too and runs Tailscale SSH; a
    // `check` rule holds o1's connection until alice logs in at the provider.
    let key = server.cli_json(&["preauthkeys", "create", "--user", "alice@example.com"]);
    o2.up(&url, key["key"].as_str().expect("key")).await;
    crate::ssh::set_policy(
        &server,
        "check.hujson",
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
            "ssh": [{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}]}"#,
    );
    let out = o2.cli(&["set", "--ssh"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    crate::ssh::wait_ssh_action(&o2, "holdAndDelegate").await;
    crate::ssh::wait_host_keys(&o1, "o2").await;
    let mut held = crate::ssh::Session::start(&o1, "root@o2", "echo vouched");
    let link = held.check_link();
    let (code, page) = browse(&link, "alice", "alice-pass");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("SSH connection approved"), "{page}");
    let (ok, out, said) = held.finish(Duration::from_secs(60));
    assert!(
        ok && out.trim() == "vouched",
        "after the OIDC check: {out:?} {said}"
    );
    drop(idp);
}
