//! Tailscale SSH with official clients: an `accept` rule lets a connection in at once, a
//! `check` rule holds it until the connecting user's check is approved (then lets it in
//! without asking again for the rule's `checkPeriod`), a refused check ends it, and a
//! user the policy does not list is turned away by the destination node itself.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::fixtures::{require_tailscale, wait_for, Tailscaled, TestServer};

/// A running `tailscale ssh`, its stderr read line by line as it comes.
pub struct Session {
    pub child: Child,
    stderr: mpsc::Receiver<String>,
    seen: String,
}

impl Session {
    pub fn start(from: &Tailscaled, target: &str, command: &str) -> Session {
        let mut child = from
            .cli_command()
            .args(["ssh", target, "--", command])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tailscale ssh");
        let (tx, stderr) = mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Session {
            child,
            stderr,
            seen: String::new(),
        }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    fn wait_line(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no line with {needle:?} within {within:?}; ssh said:\n{}",
            self.seen
        );
    }

    /// Waits for the SSH check link the server sends a held connection; returns it.
    pub fn check_link(&mut self) -> String {
        let line = self.wait_line("/ssh/check/", Duration::from_secs(60));
        line.split_whitespace()
            .find(|w| w.contains("/ssh/check/"))
            .expect("link")
            .to_string()
    }

    /// Exit success and stdout, within `within`.
    pub fn finish(mut self, within: Duration) -> (bool, String, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut out = String::new();
                if let Some(mut o) = self.child.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                }
                return (status.success(), out, self.seen);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "tailscale ssh still running after {within:?}; it said:\n{}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn set_policy(server: &TestServer, name: &str, text: &str) {
    let p = server.dir.path().join(name);
    std::fs::write(&p, text).expect("write policy");
    let out = server.cli(&["policy", "set", "-f", &p.display().to_string()]);
    assert!(
        out.status.success(),
        "policy set: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until `node`'s client holds an SSH policy whose first rule has `action` set.
pub async fn wait_ssh_action(node: &Tailscaled, action: &str) {
    wait_for(
        &format!("{}'s SSH policy to {action}", node.name),
        Duration::from_secs(30),
        || {
            let out = node.cli(&["debug", "netmap"]);
            let nm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let ok = nm["SSHPolicy"]["rules"][0]["action"][action] != serde_json::Value::Null;
            async move { ok.then_some(()) }
        },
    )
    .await;
}

/// Waits until `from` knows `to`'s SSH host keys (they travel in `to`'s Hostinfo once
/// it runs the SSH server): `tailscale ssh` checks the host key strictly against them.
pub async fn wait_host_keys(from: &Tailscaled, to: &str) {
    wait_for(
        &format!("{} to know {to}'s SSH host keys", from.name),
        Duration::from_secs(30),
        || {
            let st = from.status();
            let ok = st["Peer"].as_object().is_some_and(|m| {
                m.values().any(|p| {
                    p["HostName"] == to
                        && p["sshHostKeys"].as_array().is_some_and(|k| !k.is_empty())
                })
            });
            async move { ok.then_some(()) }
        },
    )
    .await;
}

const ACLS: &str = r#""acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]"#;

#[tokio::test(flavor = "multi_thread")]
async fn tailscale_ssh_accept_and_check_rules_with_official_clients() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let server = TestServer::start().await;
    let url = server.url();
    server.cli_json(&["users", "create", "alice"]);
    let key = server.cli_json(&["preauthkeys", "create", "--user", "alice", "--reusable"]);
    let key = key["key"].as_str().expect("key").to_string();
    let root = server.dir.path().join("clients");
    let laptop = Tailscaled::start(&bin, &root, "laptop");
    let box1 = Tailscaled::start(&bin, &root, "box1");
    laptop.up(&url, &key).await;
    box1.up(&url, &key).await;
    let out = box1.cli(&["set", "--ssh"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // accept: in at once.
    set_policy(
        &server,
        "accept.hujson",
        &format!(
            r#"{{ {ACLS}, "ssh": [{{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}}] }}"#
        ),
    );
    wait_ssh_action(&box1, "accept").await;
    wait_host_keys(&laptop, "box1").await;
    let (ok, out, said) =
        Session::start(&laptop, "root@box1", "echo accepted").finish(Duration::from_secs(60));
    assert!(
        ok && out.trim() == "accepted",
        "accept rule: {out:?} {said}"
    );
    // A user the rule does not list: the destination refuses it itself.
    let (ok, _, said) =
        Session::start(&laptop, "daemon@box1", "echo no").finish(Duration::from_secs(60));
    assert!(!ok, "daemon was let in: {said}");

    // check: held until approved, then in; the next connection within checkPeriod is not
    // checked again.
    set_policy(
        &server,
        "check.hujson",
        &format!(
            r#"{{ {ACLS}, "ssh": [{{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"], "checkPeriod": "1h"}}] }}"#
        ),
    );
    wait_ssh_action(&box1, "holdAndDelegate").await;
    let mut held = Session::start(&laptop, "root@box1", "echo checked");
    let link = held.check_link();
    assert!(link.starts_with(&url), "{link} is not on {url}");
    // The page behind the link names the connection and how to approve it.
    let rest = link.strip_prefix("http://").expect("http link");
    let (addr, path) = rest.split_at(rest.find('/').expect("path"));
    let (status, page) = crate::fixtures::http_get(addr, path).expect("check page");
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("approve-ssh") && page.contains("root"),
        "{page}"
    );
    // Still held: nothing decided yet.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        held.child.try_wait().expect("wait").is_none(),
        "not held: {}",
        held.seen
    );
    let out = server.cli(&["auth", "approve-ssh", "--auth-id", &link]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let approved = Instant::now();
    let (ok, out, said) = held.finish(Duration::from_secs(60));
    assert!(
        ok && out.trim() == "checked",
        "after approval: {out:?} {said}"
    );
    eprintln!(
        "held connection went on {:?} after approval",
        approved.elapsed()
    );
    let (ok, out, said) =
        Session::start(&laptop, "root@box1", "echo again").finish(Duration::from_secs(60));
    assert!(
        ok && out.trim() == "again",
        "within checkPeriod: {out:?} {said}"
    );
    assert!(
        !said.contains("/ssh/check/"),
        "checked again within checkPeriod: {said}"
    );

    // checkPeriod "always", refused: the connection ends with the refusal. (A new policy
    // also forgets earlier approvals.)
    set_policy(
        &server,
        "always.hujson",
        &format!(
            r#"{{ {ACLS}, "ssh": [{{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"], "checkPeriod": "always"}}] }}"#
        ),
    );
    let mut held = Session::start(&laptop, "root@box1", "echo never");
    let link = held.check_link();
    let id = link.rsplit('/').next().expect("id").to_string();
    let out = server.cli(&["auth", "approve-ssh", "--auth-id", &id, "--reject"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, out, said) = held.finish(Duration::from_secs(60));
    assert!(
        !ok && out.is_empty(),
        "refused check let the command run: {out:?} {said}"
    );
    assert!(said.contains("refused"), "{said}");
    // A decided check cannot be decided again.
    let out = server.cli(&["auth", "approve-ssh", "--auth-id", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no SSH connection is waiting"));
}
