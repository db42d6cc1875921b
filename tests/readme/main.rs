//! README.md's quick start and three-replica try-out, run as a newcomer runs them.
//!
//! The commands come from README.md itself: every fenced block preceded by an HTML
//! comment `<!-- readme-test: NAME -->` (invisible on a rendered page) is a step, and the
//! test runs the blocks by name, in a bash session of its own as a reader would paste them
//! into a terminal (shell variables such as `$KEY` carry from one block to the next). When
//! the README changes, the test runs what it says now; a marked block that fails fails
//! the test, and so does a marker the test needs that is gone.
//!
//! What the test adds of its own is only checking: the server's printed URL and commands,
//! the nodes the server lists, a leader killed with `kill -9` in the cluster and a client
//! registering after that, and that the README's commands leave nothing behind in the
//! working tree.
//!
//! It runs the README's commands on their default ports (8080, 50443-50445, 3478; the
//! try-out's 8081-8083, 50511-50533, 3471-3473), so its two parts run one after the other
//! in one test, never at the same time, and it is a test binary of its own: `cargo test`
//! runs test binaries one at a time, so no other test runs while the README's `cargo
//! run` re-links `target/debug/hydrascale`, which the other tests start. It runs in the
//! checkout itself (the quick start's data goes to `./hydrascale-data`, which must not
//! exist before and is removed after), with `TMPDIR` pointing at a temporary directory
//! (the clients' and the try-out's files go there, as the README says).
//!
//! Like the interop tests it needs the official client (installed by the README's own
//! step into `.tools/bin`); it runs under `scripts/test.sh` (`HYDRASCALE_INTEROP=1`) and
//! says why it did nothing in a bare `cargo test`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test, with its location"
)]

#[allow(dead_code)]
#[path = "../integration/fixtures.rs"]
mod fixtures;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use fixtures::{wait_for, Tailscaled};

const MARKER: &str = "<!-- readme-test: ";

/// The marked blocks of a Markdown text, by name.
fn marked_blocks(markdown: &str) -> BTreeMap<String, String> {
    let mut blocks = BTreeMap::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(rest) = line.trim().strip_prefix(MARKER) else {
            continue;
        };
        let name = rest
            .strip_suffix("-->")
            .unwrap_or_else(|| panic!("README.md line {}: a marker ends with -->", n + 1))
            .trim()
            .to_string();
        let fence = lines
            .by_ref()
            .map(|(_, l)| l)
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("README.md: marker {name:?} is followed by no block"));
        assert!(
            fence.trim_start().starts_with("```"),
            "README.md: marker {name:?} must stand right before a fenced block, not {fence:?}"
        );
        let mut body = String::new();
        let mut closed = false;
        for (_, l) in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                closed = true;
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        assert!(closed, "README.md: the block of {name:?} is not closed");
        assert!(
            blocks.insert(name.clone(), body).is_none(),
            "README.md: two blocks are marked {name:?}"
        );
    }
    blocks
}

/// The README's blocks; a step the test needs and the README no longer marks fails here.
struct Readme(BTreeMap<String, String>);

impl Readme {
    fn load(repo: &Path) -> Readme {
        let text = std::fs::read_to_string(repo.join("README.md")).expect("read README.md");
        Readme(marked_blocks(&text))
    }

    fn block(&self, name: &str) -> &str {
        self.0.get(name).unwrap_or_else(|| {
            panic!(
                "README.md has no block marked `{MARKER}{name} -->` (has: {:?})",
                self.0.keys().collect::<Vec<_>>()
            )
        })
    }
}

/// The environment of a newcomer's shell: the test's, without what the test harness and
/// cargo's test runner add (HYDRASCALE_* switches, CARGO_PKG_* and the like).
fn newcomer_env(cmd: &mut Command, tmp: &Path) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        let from_harness = k.starts_with("HYDRASCALE_")
            || k == "CARGO"
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || k.starts_with("CARGO_CRATE_")
            || k.starts_with("CARGO_MANIFEST_")
            || k == "CARGO_PRIMARY_PACKAGE"
            || k.starts_with("CARGO_CFG_")
            || k == "CARGO_TARGET_TMPDIR"
            || k == "CARGO_RUSTC_CURRENT_DIR"
            // Cargo sets OUT_DIR for a test of a package with a build script; some build
            // scripts (ring's) ask to rerun when it changes, so a `cargo run` that saw it
            // would rebuild them and everything above them, as no newcomer's would.
            || k == "OUT_DIR"
            || k == "RUST_TEST_THREADS";
        if from_harness {
            cmd.env_remove(&k);
        }
    }
    cmd.env("TMPDIR", tmp);
}

/// Lines a child writes, read on a thread of their own.
fn lines_of(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Sends `sig` to process group `pgid` (one the test made).
fn signal_group(pgid: u32, sig: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        // SAFETY: signals a process group this test created; no memory is involved.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// A bash session fed blocks one at a time, like a terminal; its own process group, so
/// what it leaves running in the background (clients) is stopped with it.
struct Session {
    child: Child,
    stdin: ChildStdin,
    out: Receiver<String>,
    dir: PathBuf,
    count: usize,
}

const DONE: &str = "__readme_block_done__";

impl Session {
    fn start(repo: &Path, tmp: &Path) -> Session {
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc"])
            .current_dir(repo)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        newcomer_env(&mut cmd, tmp);
        let mut child = cmd.spawn().expect("start bash");
        let mut stdin = child.stdin.take().expect("bash stdin");
        // Errors go where the output goes, in order.
        writeln!(stdin, "exec 2>&1").expect("write to bash");
        let out = lines_of(child.stdout.take().expect("bash stdout"));
        let dir = tmp.join("readme-blocks");
        std::fs::create_dir_all(&dir).expect("blocks dir");
        Session {
            child,
            stdin,
            out,
            dir,
            count: 0,
        }
    }

    /// Runs README block `name`; returns whether every command in it succeeded (as
    /// `set -e` would judge, without ending the session) and what it printed.
    fn run(&mut self, readme: &Readme, name: &str, timeout: Duration) -> (bool, String) {
        self.run_text(name, readme.block(name), timeout)
    }

    fn run_text(&mut self, name: &str, text: &str, timeout: Duration) -> (bool, String) {
        self.count += 1;
        // Sourced from a file: a command that reads its standard input then finds nothing
        // of the next block in it.
        let file = self.dir.join(format!("{:02}-{name}.sh", self.count));
        std::fs::write(&file, text).expect("write block");
        eprintln!("--- README block {name} ---\n{text}---");
        writeln!(
            self.stdin,
            "__failed=0; trap '__failed=1' ERR; source {}; trap - ERR; echo \"{DONE} $__failed\"",
            file.display()
        )
        .expect("write to bash");
        let deadline = Instant::now() + timeout;
        let mut output = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(line) => {
                    if let Some(failed) = line.strip_prefix(DONE) {
                        return (failed.trim() == "0", output);
                    }
                    eprintln!("{name}| {line}");
                    output.push_str(&line);
                    output.push('\n');
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("README block {name} did not finish within {timeout:?}; it printed:\n{output}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the shell exited during README block {name}; it printed:\n{output}")
                }
            }
        }
    }

    /// Like [`Session::run`], and the block must succeed.
    fn ok(&mut self, readme: &Readme, name: &str, timeout: Duration) -> String {
        let (ok, out) = self.run(readme, name, timeout);
        assert!(ok, "README block {name} failed; it printed:\n{out}");
        out
    }

    /// A shell variable's value (one the README's blocks set).
    fn var(&mut self, name: &str) -> String {
        let (ok, out) = self.run_text(
            "test-reads-variable",
            &format!("printf '%s\\n' \"${name}\"\n"),
            Duration::from_secs(10),
        );
        assert!(ok, "reading ${name}: {out}");
        out.trim().to_string()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // What the session left running: clients, and with a failed test the try-out's
        // processes too (`try-cluster.sh down` normally stops those).
        signal_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A long-running README block (the server): its own process group, output read line
/// by line.
struct Foreground {
    child: Child,
    out: Receiver<String>,
    name: String,
}

impl Foreground {
    fn start(repo: &Path, tmp: &Path, readme: &Readme, name: &str) -> Foreground {
        let text = readme.block(name);
        eprintln!("--- README block {name} (left running) ---\n{text}---");
        let log = std::fs::File::create(tmp.join(format!("{name}.log"))).expect("log file");
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-e", "-c", text])
            .current_dir(repo)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .process_group(0);
        newcomer_env(&mut cmd, tmp);
        let mut child = cmd.spawn().expect("start bash");
        let out = lines_of(child.stdout.take().expect("stdout"));
        Foreground {
            child,
            out,
            name: name.to_string(),
        }
    }

    /// Lines printed until one contains `needle` (that one included).
    fn until(&mut self, needle: &str, timeout: Duration, log: &Path) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(line) => {
                    eprintln!("{}| {line}", self.name);
                    let hit = line.contains(needle);
                    seen.push(line);
                    if hit {
                        return seen;
                    }
                }
                Err(e) => panic!(
                    "README block {} printed no {needle:?} ({e:?}); stdout:\n{}\nstderr (end):\n{}",
                    self.name,
                    seen.join("\n"),
                    tail(log, 40)
                ),
            }
        }
    }

    /// Ctrl-C, as the README says to stop it; returns its exit status.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        signal_group(self.child.id(), libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "README block {} did not stop within 30 s of Ctrl-C",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        signal_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether something accepts TCP connections on `addr`.
fn listening(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(
        &addr.parse().expect("socket address"),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Untracked files outside .gitignore, as `git status` lists them; `None` outside a git
/// checkout (an unpacked source archive), where there is nothing to compare.
fn untracked(repo: &Path) -> Option<Vec<String>> {
    let out = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=all"])
        .current_dir(repo)
        .output()
        .ok()
        .filter(|o| o.status.success());
    let Some(out) = out else {
        eprintln!("not a git checkout: what the README's commands leave behind is not checked");
        return None;
    };
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("??"))
            .map(str::to_string)
            .collect(),
    )
}

/// `hydrascale ARGS -o json` (the binary cargo built for this test: the same code the
/// README's `cargo run` runs), for checks of the test's own.
fn hydrascale_json(args: &[&str]) -> Option<serde_json::Value> {
    let out = fixtures::hydrascale_command()
        .args(["-o", "json"])
        .args(args)
        .env_remove("HYDRASCALE_CONFIG")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Node name -> online, as the server at `admin` lists them.
fn nodes_online(admin: &[&str]) -> BTreeMap<String, bool> {
    let mut args = admin.to_vec();
    args.extend(["nodes", "list"]);
    hydrascale_json(&args)
        .and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .map(|n| {
                        (
                            n["given_name"].as_str().unwrap_or_default().to_string(),
                            n["online"].as_bool().unwrap_or(false),
                        )
                    })
                    .collect()
            })
        })
        .unwrap_or_default()
}

const LONG: Duration = Duration::from_secs(600);

#[test]
fn marked_blocks_are_found_in_order_of_name() {
    let md = "text\n<!-- readme-test: one -->\n```sh\necho 1\necho 2\n```\n\n<!-- readme-test: two -->\n\n```\nls\n```\n```sh\nnot marked\n```\n";
    let b = marked_blocks(md);
    assert_eq!(b.len(), 2);
    assert_eq!(b["one"], "echo 1\necho 2\n");
    assert_eq!(b["two"], "ls\n");
}

#[test]
fn readme_quick_start_and_cluster_try_out_work_as_written() {
    if fixtures::require_tailscale().is_none() {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = Readme::load(&repo);
    let data = repo.join("hydrascale-data");
    assert!(
        !data.exists(),
        "{} exists: the README test runs the quick start in this checkout on a fresh data directory; move your own try-out's data away",
        data.display()
    );
    for addr in [
        "127.0.0.1:8080",
        "127.0.0.1:50443",
        "127.0.0.1:50444",
        "127.0.0.1:50445",
        "127.0.0.1:8081",
        "127.0.0.1:50511",
        "127.0.0.1:50521",
    ] {
        assert!(
            !listening(addr),
            "{addr} is in use: the README test runs the README's commands on their default ports; stop what listens there"
        );
    }
    let untracked_before = untracked(&repo);
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // Part 1: one replica. The README's own cleanup is checked, and this guard removes the
    // data directory whatever happens.
    struct RemoveData(PathBuf);
    impl Drop for RemoveData {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove_data = RemoveData(data.clone());
    let mut shell = Session::start(&repo, tmp.path());
    let serve_log = tmp.path().join("serve.log");
    let mut serve = Foreground::start(&repo, tmp.path(), &readme, "serve");
    // A fresh clone builds here; scripts/test.sh builds the binary beforehand.
    let printed = serve.until("clients log in at ", Duration::from_secs(1800), &serve_log);
    let url = printed
        .last()
        .and_then(|l| l.split("clients log in at ").nth(1))
        .map(|u| u.trim().to_string())
        .expect("login URL");
    assert_eq!(
        url, "http://127.0.0.1:8080",
        "the README's clients use this URL"
    );
    // The next commands it prints are the README's.
    let next = serve.until("tailscale up", Duration::from_secs(10), &serve_log);
    let user_and_key = readme.block("user-and-key");
    for cmd in next.iter().filter(|l| l.contains("cargo run")) {
        let cmd = cmd.trim();
        assert!(
            user_and_key.contains(cmd),
            "serve printed {cmd:?}, which the README's next step does not run:\n{user_and_key}"
        );
    }
    assert!(
        next.iter()
            .any(|l| l.contains(&format!("tailscale up --login-server={url}"))),
        "{next:?}"
    );

    shell.ok(&readme, "user-and-key", LONG);
    let key = shell.var("KEY");
    assert!(key.starts_with("hskey-auth-"), "KEY is {key:?}");
    let clients = shell.ok(&readme, "clients", LONG);
    assert!(!clients.contains("error"), "{clients}");
    let ping = shell.ok(&readme, "ping", Duration::from_secs(120));
    assert!(
        ping.contains("pong from client1") && ping.contains("pong from client2"),
        "{ping}"
    );
    let admin = format!("unix:{}", data.join("admin.sock").display());
    let nodes = nodes_online(&["--admin-addr", &admin]);
    assert_eq!(
        nodes,
        BTreeMap::from([("client1".to_string(), true), ("client2".to_string(), true)]),
        "the server lists both clients, online"
    );
    shell.ok(&readme, "stop-clients", Duration::from_secs(60));
    let status = serve.interrupt();
    assert!(
        status.success(),
        "the server did not stop cleanly on Ctrl-C: {status:?}\n{}",
        tail(&serve_log, 30)
    );
    drop(serve);
    std::fs::remove_dir_all(&data).expect("remove the quick start's data");

    // Part 2: the three-replica try-out, in the same shell, as a reader goes on. A guard
    // stops it if the test fails half way.
    struct Down(PathBuf, PathBuf);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = Command::new(self.0.join("scripts/try-cluster.sh"))
                .arg("down")
                .env("TMPDIR", &self.1)
                .status();
        }
    }
    let _down = Down(repo.clone(), tmp.path().to_path_buf());
    let up = shell.ok(&readme, "cluster-up", LONG);
    assert!(
        up.contains("clients log in at http://127.0.0.1:8080"),
        "{up}"
    );
    for id in 1..=3 {
        assert!(
            up.lines().any(|l| l.starts_with(&format!("{id} "))),
            "cluster status lists replica {id}:\n{up}"
        );
    }
    let cluster_dir = tmp.path().join("hydrascale-try-cluster");
    assert!(
        cluster_dir.is_dir(),
        "the try-out's files are where the README says"
    );
    shell.ok(&readme, "cluster-user-and-key", LONG);
    let key = shell.var("KEY");
    shell.ok(&readme, "clients", LONG);
    shell.ok(&readme, "ping", Duration::from_secs(120));

    // The leader dies (kill -9); a new client registers through the load balancer after.
    let config = |id: u64| cluster_dir.join(format!("replica-{id}.toml"));
    let status_of = |id: u64| {
        let c = config(id);
        hydrascale_json(&["--config", &c.display().to_string(), "cluster", "status"])
    };
    let leader = status_of(1)
        .and_then(|s| s["leader"].as_u64())
        .expect("replica 1 knows the leader");
    let pid: libc::pid_t =
        std::fs::read_to_string(cluster_dir.join(format!("replica-{leader}.pid")))
            .expect("the leader's PID file")
            .trim()
            .parse()
            .expect("a PID");
    eprintln!("killing the leader, replica {leader} (PID {pid}), with SIGKILL");
    // SAFETY: signals a replica this test started (through the README's script).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    let survivor = if leader == 1 { 2 } else { 1 };
    let new_leader = rt.block_on(wait_for("a new leader", Duration::from_secs(60), || {
        let l = status_of(survivor).and_then(|s| s["leader"].as_u64());
        async move { l.filter(|l| *l != leader) }
    }));
    let status = shell.ok(&readme, "cluster-status", Duration::from_secs(60));
    assert!(
        status.contains(&format!("replica {leader}: not running")),
        "{status}"
    );
    let bin = repo.join(".tools/bin");
    let late = Tailscaled::start(&bin, tmp.path(), "client3");
    rt.block_on(late.up("http://127.0.0.1:8080", &key));
    eprintln!(
        "replica {new_leader} leads; client3 registered {:.1?} after the kill",
        killed_at.elapsed()
    );
    let late_ip = late.ipv4();
    rt.block_on(wait_for(
        "client3 sees client1 and client2",
        Duration::from_secs(60),
        || {
            let names = late.peer_names();
            async move { (names == ["client1", "client2"]).then_some(()) }
        },
    ));
    let ping = late.cli(&["ping", "--c", "10", "--timeout", "5s", "client1"]);
    assert!(
        ping.status.success(),
        "client3 ({late_ip}) pings client1: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    // The first clients kept working through it.
    shell.ok(&readme, "ping", Duration::from_secs(120));
    drop(late);

    let down = shell.ok(&readme, "cluster-down", Duration::from_secs(120));
    assert!(down.contains("stopped"), "{down}");
    assert!(!cluster_dir.exists(), "down removes the try-out's files");
    for addr in [
        "127.0.0.1:8080",
        "127.0.0.1:8081",
        "127.0.0.1:8082",
        "127.0.0.1:8083",
    ] {
        assert!(!listening(addr), "{addr} still listens after down");
    }
    shell.ok(&readme, "stop-clients", Duration::from_secs(60));
    if let Some(before) = untracked_before {
        assert_eq!(
            untracked(&repo),
            Some(before),
            "the README's commands left files in the working tree (add them to .gitignore, or keep them out)"
        );
    }
}
