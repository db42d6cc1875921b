//! Shared fixtures: a server builder, the admin CLI, official `tailscaled` instances, `wait_for`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hydrascale::{Config, ServerHandle};

/// Polls `f` until it returns `Some` or `timeout` passes; tests never sleep blindly.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// A single replica on loopback with every port chosen by the OS.
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let any_port: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut config = Config {
            data_dir: dir.path().join("data"),
            listen_addr: any_port,
            admin_listen_addr: any_port,
            raft_listen_addr: any_port,
            ..Config::default()
        };
        config.derp.stun_listen_addr = "127.0.0.1:0".parse().expect("addr");
        let handle = hydrascale::run_server(config.clone())
            .await
            .expect("server starts");
        TestServer {
            handle: Some(handle),
            config,
            dir,
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("server running")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.handle().control_addr)
    }

    /// Runs the real `hydrascale` CLI against this server's admin API.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_hydrascale"))
            .arg("--admin-addr")
            .arg(format!("http://{}", self.handle().admin_addr))
            .args(args)
            .output()
            .expect("run hydrascale CLI")
    }

    /// Like `cli` with `-o json`, asserting success and parsing the output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = self.cli(&full);
        assert!(
            out.status.success(),
            "hydrascale {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "hydrascale {args:?} printed non-JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Stops the replica and starts it again on the same data directory and the same
    /// addresses, as a process restart would; connected clients reconnect by themselves.
    pub async fn restart(&mut self) {
        let h = self.handle.take().expect("server running");
        let mut config = self.config.clone();
        config.listen_addr = h.control_addr;
        config.admin_listen_addr = h.admin_addr;
        config.raft_listen_addr = h.raft_addr;
        if let Some(stun) = h.stun_addr {
            config.derp.stun_listen_addr = stun;
        }
        h.shutdown().await;
        let handle = hydrascale::run_server(config.clone())
            .await
            .expect("server restarts on the same data directory");
        self.config = config;
        self.handle = Some(handle);
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// Where the official client was installed by scripts/install-deps.sh, if anywhere.
pub fn tailscale_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var("HYDRASCALE_TOOLS_DIR")
            .ok()
            .map(|d| PathBuf::from(d).join("bin")),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("tailscaled").is_file() && d.join("tailscale").is_file())
}

/// Interop tests need the official client. Under `scripts/test.sh` (HYDRASCALE_INTEROP=1)
/// a missing client is a failure; in a bare `cargo test` the test says why it did nothing.
pub fn require_tailscale() -> Option<PathBuf> {
    match tailscale_dir() {
        Some(d) => Some(d),
        None if std::env::var("HYDRASCALE_INTEROP").is_ok() => {
            panic!("official Tailscale client not found; run scripts/install-deps.sh")
        }
        None => {
            eprintln!("SKIPPED: official Tailscale client not installed (run scripts/test.sh)");
            None
        }
    }
}

/// One official `tailscaled` in userspace-networking mode with its own state and socket.
pub struct Tailscaled {
    pub name: String,
    pub dir: PathBuf,
    bin: PathBuf,
    child: Child,
}

impl Tailscaled {
    pub fn start(bin: &Path, root: &Path, name: &str) -> Tailscaled {
        Self::start_with_env(bin, root, name, &[])
    }

    /// Like `start`, with extra environment (the client's debug switches).
    pub fn start_with_env(bin: &Path, root: &Path, name: &str, env: &[(&str, &str)]) -> Tailscaled {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("state dir");
        let log = std::fs::File::create(dir.join("tailscaled.log")).expect("log file");
        let log2 = log.try_clone().expect("log clone");
        let child = Command::new(bin.join("tailscaled"))
            .arg("--tun=userspace-networking")
            .arg(format!("--statedir={}", dir.display()))
            .arg(format!("--socket={}", dir.join("ts.sock").display()))
            .arg("--port=0")
            .arg("--no-logs-no-support")
            // Our DERP runs on the plain-HTTP control listener.
            .env("TS_DEBUG_USE_DERP_HTTP", "1")
            .env("TS_NO_LOGS_NO_SUPPORT", "true")
            .env("TS_ASSUME_NETWORK_UP_FOR_TEST", "1")
            .env("TS_DISABLE_PORTMAPPER", "1")
            .env("TS_PANIC_IF_HIT_MAIN_CONTROL", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .expect("start tailscaled");
        Tailscaled {
            name: name.to_string(),
            dir,
            bin: bin.to_path_buf(),
            child,
        }
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("tailscale"))
            .arg(format!("--socket={}", self.dir.join("ts.sock").display()))
            .args(args)
            .output()
            .expect("run tailscale CLI")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("tailscaled.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `tailscale up` with a pre-auth key; waits until the socket exists first.
    pub async fn up(&self, url: &str, key: &str) {
        let sock = self.dir.join("ts.sock");
        wait_for("tailscaled socket", Duration::from_secs(30), || {
            let ok = sock.exists();
            async move { ok.then_some(()) }
        })
        .await;
        let out = self.cli(&[
            "up",
            &format!("--login-server={url}"),
            &format!("--auth-key={key}"),
            &format!("--hostname={}", self.name),
            "--accept-dns=false",
            "--timeout=60s",
        ]);
        assert!(
            out.status.success(),
            "tailscale up for {} failed: {}{}\n--- tailscaled log ---\n{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    pub fn ipv4(&self) -> String {
        self.status()["Self"]["TailscaleIPs"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .find(|s| s.contains('.'))
            })
            .map(str::to_string)
            .expect("node has an IPv4 address")
    }

    /// Host names of the peers in this node's map.
    pub fn peer_names(&self) -> Vec<String> {
        let st = self.status();
        let mut names: Vec<String> = st["Peer"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|p| p["HostName"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for Tailscaled {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
