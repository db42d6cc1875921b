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

/// Waits for the replica's own announcement in the replica registry, its one background
/// write after start, so that tests comparing the state before and after a request see
/// only what the request did.
async fn settle(h: &ServerHandle) {
    let id = h.db.raft.node_id();
    let db = h.db.clone();
    wait_for(
        "the replica to announce itself",
        Duration::from_secs(10),
        || {
            let t = db.store.read();
            // ... and seeded the DNS settings, a write a test must not race.
            let ok = t.replicas.contains_key(&id) && t.dns.is_some();
            async move { ok.then_some(()) }
        },
    )
    .await;
}

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// A single replica on loopback with every port chosen by the OS.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Like `start`, with settings changed by `edit` first.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let any_port: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut config = Config {
            data_dir: dir.path().join("data"),
            listen_addr: any_port,
            admin_listen_addr: any_port,
            raft_listen_addr: any_port,
            metrics_listen_addr: any_port,
            ..Config::default()
        };
        config.derp.stun_listen_addr = "127.0.0.1:0".parse().expect("addr");
        edit(&mut config);
        let handle = hydrascale::run_server(config.clone())
            .await
            .expect("server starts");
        settle(&handle).await;
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
        cli_at(&self.admin_target(), args)
    }

    /// Like `cli` with `-o json`, asserting success and parsing the output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        cli_json_at(&self.admin_target(), args)
    }

    /// The local admin socket, as `--admin-addr` takes it (no API key needed).
    pub fn admin_target(&self) -> String {
        format!("unix:{}", self.handle().admin_socket.display())
    }

    /// Stops the replica and starts it again on the same data directory and the same
    /// addresses, as a process restart would; connected clients reconnect by themselves.
    pub async fn restart(&mut self) {
        let h = self.handle.take().expect("server running");
        let mut config = self.config.clone();
        config.listen_addr = h.control_addr;
        config.admin_listen_addr = h.admin_addr;
        config.raft_listen_addr = h.raft_addr;
        config.metrics_listen_addr = h.metrics_addr;
        if let Some(stun) = h.stun_addr {
            config.derp.stun_listen_addr = stun;
        }
        h.shutdown().await;
        let handle = hydrascale::run_server(config.clone())
            .await
            .expect("server restarts on the same data directory");
        settle(&handle).await;
        self.config = config;
        self.handle = Some(handle);
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// The `hydrascale` binary for a command that reads its configuration itself (offline
/// commands): without the test harness's own `HYDRASCALE_*` variables, which the config
/// loader would take for settings.
pub fn hydrascale_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hydrascale"));
    c.env_remove("HYDRASCALE_INTEROP")
        .env_remove("HYDRASCALE_TOOLS_DIR")
        .env_remove("HYDRASCALE_TEST_PORT_BASE");
    c
}

/// Runs the real `hydrascale` CLI against the admin API `admin` (an `--admin-addr`:
/// `unix:PATH` for a replica's local socket, or `http://HOST:PORT` with an API key).
pub fn cli_at(admin: &str, args: &[&str]) -> std::process::Output {
    cli_in(None, admin, args)
}

/// `hydrascale` (or any program) as a command, inside network namespace `netns` if given.
fn command_in(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

/// `cli_at`, run inside network namespace `netns` if given.
pub fn cli_in(netns: Option<&str>, admin: &str, args: &[&str]) -> std::process::Output {
    command_in(netns, env!("CARGO_BIN_EXE_hydrascale"))
        .arg("--admin-addr")
        .arg(admin)
        .args(args)
        .output()
        .expect("run hydrascale CLI")
}

/// Issues cluster certificates (CA reused if `dir` has one) for `ids` into `dir`:
/// `dir/ca` and `dir/replica-ID`.
pub fn make_certs(dir: &Path, ids: &[u64]) {
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_hydrascale"))
        .args(["cluster", "certs", "--out"])
        .arg(dir)
        .args(["--ids", &ids.join(",")])
        .output()
        .expect("run hydrascale cluster certs");
    assert!(
        out.status.success(),
        "cluster certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cli_at` with `-o json`, asserting success and parsing the output.
pub fn cli_json_at(admin: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let out = cli_at(admin, &full);
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

/// Ports handed out to the processes a test starts. They come from below the kernel's
/// ephemeral range: a port the OS picked with `bind(:0)` and then released can be taken
/// again by any outgoing connection (a tailscaled, a replica dialling a peer) before the
/// process it was meant for binds it, which made a replica fail to start now and then.
/// Below that range only an explicit bind takes a port, and the counter gives each port
/// once per test run.
static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

/// A loopback port free for both TCP and UDP, unique within this test run.
pub fn free_port() -> u16 {
    // The migration fixture's fixed URL (127.0.0.1:18080) lies below 20000. Two test runs
    // on one machine (two checkouts) each set their own HYDRASCALE_TEST_PORT_BASE so their
    // counters do not hand out the same ports.
    let first: u32 = std::env::var("HYDRASCALE_TEST_PORT_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|p| (20000..60000).contains(p))
        .unwrap_or(20000);
    let last = ephemeral_low().clamp(first + 1000, 65535);
    for _ in first..last {
        let n = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(first + n % (last - first)).expect("port in range");
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if tcp && udp {
            return port;
        }
    }
    panic!("no free loopback port between {first} and {last}")
}

/// A loopback TCP server that greets every connection with `greeting` and closes it;
/// userspace-networking clients hand a peer's connection to their port P to
/// 127.0.0.1:P, so it answers for every client on this host. Runs until the test ends.
pub fn greeter(greeting: &'static str) -> u16 {
    greeter_at("127.0.0.1", greeting)
}

/// Like [`greeter`], on another address of this host (a subnet behind a router).
pub fn greeter_at(ip: &str, greeting: &'static str) -> u16 {
    let port = free_port();
    let l = std::net::TcpListener::bind((ip, port)).expect("bind greeter");
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            use std::io::Write;
            let _ = c.write_all(greeting.as_bytes());
        }
    });
    port
}

/// An extra address on this host's loopback interface (e.g. 10.213.0.1/32): stands for a
/// machine on a LAN that a userspace-networking subnet router or exit node reaches from
/// this host. Removed when dropped.
pub struct LanAddress {
    cidr: String,
}

impl LanAddress {
    pub fn new(cidr: &str) -> LanAddress {
        let _ = Command::new("ip")
            .args(["addr", "del", cidr, "dev", "lo"])
            .output();
        let out = Command::new("ip")
            .args(["addr", "add", cidr, "dev", "lo"])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip addr add {cidr} dev lo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LanAddress {
            cidr: cidr.to_string(),
        }
    }
}

impl Drop for LanAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &self.cidr, "dev", "lo"])
            .output();
    }
}

/// `GET path` over plain HTTP/1.0; the status code and body, or `None` if unreachable.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// An HTTP/1.0 request with an optional bearer token and JSON body; the status and the
/// body parsed as JSON (`Null` if it is not JSON).
pub fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = bearer
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read response");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (code, json)
}

/// The scraped series `series` (name with labels, as written) of the replica whose
/// metrics listener is `metrics_addr`; 0 if absent.
pub fn metric(metrics_addr: &str, series: &str) -> f64 {
    scrape(metrics_addr).get(series).copied().unwrap_or(0.0)
}

/// What the CLI administers: an in-process [`TestServer`] or a [`ReplicaProc`].
pub trait Admin {
    fn cli_json(&self, args: &[&str]) -> serde_json::Value;
}

impl Admin for TestServer {
    fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        TestServer::cli_json(self, args)
    }
}

impl Admin for ReplicaProc {
    fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        ReplicaProc::cli_json(self, args)
    }
}

/// Creates `user` and a reusable pre-auth key of it that expires in an hour; the key.
pub fn user_with_reusable_key(admin: &impl Admin, user: &str) -> String {
    admin.cli_json(&["users", "create", user]);
    let v = admin.cli_json(&[
        "preauthkeys",
        "create",
        "--user",
        user,
        "--reusable",
        "--expiration",
        "1h",
    ]);
    v["key"]
        .as_str()
        .unwrap_or_else(|| panic!("preauthkeys create printed no key: {v}"))
        .to_string()
}

/// A replica's `/metrics` as series (name with labels, as written) -> value.
pub fn scrape(metrics_addr: &str) -> std::collections::BTreeMap<String, f64> {
    let (code, body) = http_get(metrics_addr, "/metrics").expect("metrics listener answers");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// One `hydrascale serve` process with its own config file, data and log.
pub struct ReplicaProc {
    pub id: u64,
    pub dir: PathBuf,
    pub control: String,
    pub admin: String,
    pub raft: String,
    pub stun: String,
    /// Prometheus metrics and probes.
    pub metrics: String,
    /// Directory made by `hydrascale cluster certs` (its `replica-ID` is this replica's
    /// `cluster.tls_dir`); unset, a replica of a cluster gets one from its test's own CA.
    pub tls_dir: Option<PathBuf>,
    /// Network namespace the process runs in (see [`Lan`]); the CLI runs there too.
    pub netns: Option<String>,
    /// Where a load balancer in front of it (`Haproxy`, in the test's own namespace)
    /// connects from: its `trusted_proxies` when it is started behind one.
    pub lb_source: String,
    /// `trusted_proxies` written into its config (the shipped HAProxy configs send the
    /// PROXY protocol): set by [`start_as_cluster`].
    pub trusted_proxies: Vec<String>,
    child: Option<Child>,
}

impl ReplicaProc {
    /// Replica `id` with its own directory and free loopback ports.
    pub fn new(root: &Path, id: u64) -> Self {
        let dir = root.join(format!("replica{id}"));
        std::fs::create_dir_all(&dir).expect("replica dir");
        ReplicaProc {
            id,
            dir,
            control: format!("127.0.0.1:{}", free_port()),
            admin: format!("127.0.0.1:{}", free_port()),
            raft: format!("127.0.0.1:{}", free_port()),
            stun: format!("127.0.0.1:{}", free_port()),
            metrics: format!("127.0.0.1:{}", free_port()),
            tls_dir: None,
            netns: None,
            lb_source: "127.0.0.1".into(),
            trusted_proxies: Vec::new(),
            child: None,
        }
    }

    /// Replica `id` on host `host` of `lan`: it listens on the host's address (the admin
    /// API on the namespace's own loopback) and runs in the host's namespace.
    pub fn on_lan(root: &Path, id: u64, lan: &Lan, host: usize) -> Self {
        let ip = lan.ip(host);
        let mut r = Self::new(root, id);
        // A fresh namespace has every port free; reuse the numbers picked on loopback.
        let port = |a: &str| {
            a.rsplit_once(':')
                .map(|(_, p)| p.to_string())
                .unwrap_or_default()
        };
        r.control = format!("{ip}:{}", port(&r.control));
        r.raft = format!("{ip}:{}", port(&r.raft));
        r.stun = format!("{ip}:{}", port(&r.stun));
        r.netns = Some(lan.netns(host).to_string());
        r.lb_source = lan.gateway();
        r
    }

    /// Writes the config: clients log in at `server_url`; a new cluster starts with the
    /// voters `peers`, or (`join`) the replica waits to be added.
    pub fn write_config(&self, server_url: &str, peers: &str, join: bool) {
        let (control, admin, raft, stun, metrics, id) = (
            &self.control,
            &self.admin,
            &self.raft,
            &self.stun,
            &self.metrics,
            self.id,
        );
        let (control_host, control_port) = control.rsplit_once(':').unwrap_or(("127.0.0.1", "0"));
        let trusted: Vec<String> = self
            .trusted_proxies
            .iter()
            .map(|p| format!("{p:?}"))
            .collect();
        let trusted = trusted.join(", ");
        let toml = format!(
            r#"server_url = "{server_url}"
trusted_proxies = [{trusted}]
listen_addr = "{control}"
admin_listen_addr = "{admin}"
raft_listen_addr = "{raft}"
metrics_listen_addr = "{metrics}"
data_dir = "{data}"
node_id = {id}

[derp]
hostname = "{control_host}"
port = {control_port}
stun_listen_addr = "{stun}"

[cluster]
peers = "{peers}"
join = {join}
isolation_timeout = "8s"
"#,
            data = self.dir.join("data").display(),
        );
        // A replica of a cluster needs a certificate from the cluster's CA: unless the test
        // made them, one CA per test directory (the replicas' common parent) issues them.
        let certs = match &self.tls_dir {
            Some(d) => Some(d.clone()),
            None if join || !peers.is_empty() => {
                let root = self.dir.parent().unwrap_or(&self.dir).join("certs");
                make_certs(&root, &[id]);
                Some(root)
            }
            None => None,
        };
        let toml = match certs {
            Some(d) => format!(
                "{toml}tls_dir = \"{}\"\n",
                d.join(format!("replica-{id}")).display(),
            ),
            None => toml,
        };
        std::fs::write(self.dir.join("hydrascale.toml"), toml).expect("write config");
    }

    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// Starts `hydrascale serve` with extra arguments, e.g. `--set key=value`.
    pub fn start_with(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("hydrascale.log"))
            .expect("log file");
        let log2 = log.try_clone().expect("log clone");
        // `ip netns exec` execs the server, so the child is the server itself.
        let child = command_in(self.netns.as_deref(), env!("CARGO_BIN_EXE_hydrascale"))
            .arg("serve")
            .arg("--config")
            .arg(self.dir.join("hydrascale.toml"))
            .args(extra)
            // HYDRASCALE_TEST_LOG: the replicas' log filter for a run being diagnosed.
            .env(
                "HYDRASCALE_LOG",
                std::env::var("HYDRASCALE_TEST_LOG")
                    .unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            // The test harness's own HYDRASCALE_* switches are not server settings.
            .env_remove("HYDRASCALE_INTEROP")
            .env_remove("HYDRASCALE_TEST_LOG")
            .env_remove("HYDRASCALE_TOOLS_DIR")
            .env_remove("HYDRASCALE_TEST_PORT_BASE")
            .env_remove("HYDRASCALE_ADMIN_ADDR")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .expect("start hydrascale serve");
        self.child = Some(child);
    }

    /// SIGTERM and wait for the orderly shutdown, as a service manager stops it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = libc::pid_t::try_from(c.id()).expect("pid");
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            panic!(
                "replica {} did not stop within 20 s of SIGTERM\n{}",
                self.id,
                self.log_tail()
            );
        }
    }

    /// SIGKILL: no shutdown path runs, as when a machine dies.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id while it runs (for SIGSTOP/SIGCONT).
    #[allow(dead_code)] // used by the chaos suite (chaos/), which shares these fixtures
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process ended by itself (it is then forgotten, so `start` works again).
    #[allow(dead_code)] // used by the chaos suite (chaos/), which shares these fixtures
    pub fn exited(&mut self) -> bool {
        self.exit_status().is_some()
    }

    /// How the process ended, if it ended by itself (it is then forgotten, so `start`
    /// works again).
    #[allow(dead_code)] // used by the chaos suite (chaos/), which shares these fixtures
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    pub fn ready(&self) -> bool {
        http_get(&self.control, "/ready").is_some_and(|(code, _)| code == 200)
    }

    /// Waits up to 60 s for `/ready` to answer 200 (started, in a cluster, in contact with
    /// a quorum).
    pub async fn wait_ready(&self) {
        wait_for(
            &format!("replica {} ready", self.id),
            Duration::from_secs(60),
            || {
                let ok = self.ready();
                async move { ok.then_some(()) }
            },
        )
        .await;
    }

    /// Waits until the admin API accepts connections: a replica started with
    /// `cluster.join` is never ready before it belongs to a cluster.
    pub async fn wait_admin(&self) {
        wait_for(
            &format!("replica {} admin API", self.id),
            Duration::from_secs(60),
            || {
                let ok = std::os::unix::net::UnixStream::connect(self.admin_socket()).is_ok();
                async move { ok.then_some(()) }
            },
        )
        .await;
    }

    /// The replica's local admin socket (no API key needed).
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("data").join("admin.sock")
    }

    /// [`Self::admin_socket`] as `--admin-addr` takes it.
    pub fn admin_target(&self) -> String {
        format!("unix:{}", self.admin_socket().display())
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        cli_in(self.netns.as_deref(), &self.admin_target(), args)
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = self.cli(&full);
        assert!(
            out.status.success(),
            "hydrascale {args:?} on replica {} failed: {}",
            self.id,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("CLI prints JSON")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("hydrascale.log")).unwrap_or_default();
        // Backtrace frames would push the panic message itself out of the tail.
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !(t.starts_with("at ")
                    || t.split_once(": ")
                        .is_some_and(|(n, _)| n.parse::<u32>().is_ok()))
            })
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ReplicaProc {
    fn drop(&mut self) {
        // A failing test shows what each replica said last.
        if std::thread::panicking() {
            eprintln!("--- replica {} log ---\n{}", self.id, self.log_tail());
        }
        self.kill();
    }
}

/// Starts `replicas` as one new cluster, every one a voter, whose clients log in at
/// `server_url`; returns once every replica is ready.
pub async fn start_as_cluster(replicas: &mut [ReplicaProc], server_url: &str) {
    start_as_cluster_with(replicas, server_url, "").await;
}

/// Like [`start_as_cluster`], with `extra` (TOML sections) added to every config file.
pub async fn start_as_cluster_with(replicas: &mut [ReplicaProc], server_url: &str, extra: &str) {
    let peers = replicas
        .iter()
        .map(|r| format!("{}={}", r.id, r.raft))
        .collect::<Vec<_>>()
        .join(",");
    for r in replicas.iter_mut() {
        // The shipped HAProxy configs send the PROXY protocol: trust where they connect from.
        r.trusted_proxies = vec![format!("{}/32", r.lb_source)];
        r.write_config(server_url, &peers, false);
        if !extra.is_empty() {
            let path = r.dir.join("hydrascale.toml");
            let text = std::fs::read_to_string(&path).expect("config");
            std::fs::write(&path, format!("{text}{extra}")).expect("write config");
        }
        r.start();
    }
    for r in replicas.iter() {
        r.wait_ready().await;
    }
    // Every replica has announced itself in the registry (its relay, its command level),
    // as a cluster in service has: what a test does next does not race the announcements.
    let first = &replicas[0];
    let ids: Vec<u64> = replicas.iter().map(|r| r.id).collect();
    wait_for("every replica announced", Duration::from_secs(30), || {
        let out = first.cli(&["-o", "json", "cluster", "status"]);
        let announced = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|s| {
                let members = s["members"].as_array()?.clone();
                Some(ids.iter().all(|id| {
                    members.iter().any(|m| {
                        m["id"].as_u64() == Some(*id)
                            && m["admin_addr"].as_str().is_some_and(|a| !a.is_empty())
                    })
                }))
            })
            .unwrap_or(false);
        async move { announced.then_some(()) }
    })
    .await;
    // ... and the DNS settings are seeded (a write made once every replica reads it).
    wait_for("the DNS settings seeded", Duration::from_secs(30), || {
        let out = first.cli(&["dns", "show"]);
        let seeded = out.status.success()
            && !String::from_utf8_lossy(&out.stdout).contains("not seeded yet");
        async move { seeded.then_some(()) }
    })
    .await;
}

/// The leader as the first running replica of `replicas` that answers `cluster status`.
pub fn leader_of<'a>(replicas: impl IntoIterator<Item = &'a ReplicaProc>) -> Option<u64> {
    replicas
        .into_iter()
        .filter(|r| r.is_running())
        .find_map(|r| {
            let out = r.cli(&["-o", "json", "cluster", "status"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["leader"].as_u64()
        })
}

/// User names as replica `r` has them applied; empty if it does not answer.
pub fn user_names(r: &ReplicaProc) -> Vec<String> {
    let out = r.cli(&["-o", "json", "users", "list"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|u| u["name"].as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Creates user `name` through replica `r`, retrying refusals (elections, lost leaders)
/// for up to `within`, as a client would. A retry of a write that committed just before
/// its answer was lost ("already exists") counts as success.
pub async fn create_user_retrying(r: &ReplicaProc, name: &str, within: Duration) {
    wait_for(
        &format!("user {name} created via replica {}", r.id),
        within,
        || {
            let out = r.cli(&["users", "create", name]);
            let ok = out.status.success()
                || String::from_utf8_lossy(&out.stderr).contains("already exists");
            async move { ok.then_some(()) }
        },
    )
    .await;
}

/// A private LAN made for one test: a bridge in the test's namespace (the "router", where
/// the load balancer and clients live) at 10.N.0.1/24, and one network namespace per host
/// joined to it by a veth pair. Cutting a host's link partitions it from everyone.
/// Needs root; everything is removed on drop.
pub struct Lan {
    bridge: String,
    net: String,
    hosts: Vec<(String, String)>,
}

/// Runs `ip` with `args` and fails the test with its stderr if it fails.
pub fn ip_cmd(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (apt install iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lan {
    pub fn new(hosts: usize) -> Lan {
        // Tests run in parallel: every LAN of this run gets its own names and subnet
        // (interface names stay within the kernel's 15 characters).
        static LANS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LANS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = (std::process::id() % 1000) * 100 + n % 100;
        let net = format!("10.{}", 200 + (std::process::id() + n) % 50);
        let bridge = format!("hsb{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip_cmd(&["link", "add", &bridge, "type", "bridge"]);
        let mut lan = Lan {
            bridge: bridge.clone(),
            net: net.clone(),
            hosts: Vec::new(),
        };
        ip_cmd(&["addr", "add", &format!("{net}.0.1/24"), "dev", &bridge]);
        ip_cmd(&["link", "set", &bridge, "up"]);
        for i in 0..hosts {
            let ns = format!("hs{tag}n{i}");
            let (vh, vn) = (format!("hsv{tag}h{i}"), format!("hsv{tag}n{i}"));
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            ip_cmd(&["netns", "add", &ns]);
            lan.hosts.push((ns.clone(), vh.clone()));
            ip_cmd(&["link", "add", &vh, "type", "veth", "peer", "name", &vn]);
            ip_cmd(&["link", "set", &vn, "netns", &ns]);
            ip_cmd(&["link", "set", &vh, "master", &bridge]);
            ip_cmd(&["link", "set", &vh, "up"]);
            let ip = lan.ip(i);
            for args in [
                vec!["addr", "add", &format!("{ip}/24"), "dev", &vn],
                vec!["link", "set", &vn, "up"],
                vec!["link", "set", "lo", "up"],
            ] {
                let mut full = vec!["netns", "exec", &ns, "ip"];
                full.extend(args.iter().copied());
                ip_cmd(&full);
            }
        }
        lan
    }

    /// The host's own address on the LAN (its bridge): what hosts reach it at.
    pub fn gateway(&self) -> String {
        format!("{}.0.1", self.net)
    }

    /// Address of host `i`.
    pub fn ip(&self, i: usize) -> String {
        format!("{}.0.{}", self.net, 11 + i)
    }

    pub fn netns(&self, i: usize) -> &str {
        &self.hosts[i].0
    }

    /// Cuts host `i` off the LAN (its link goes down; packets in flight are lost).
    pub fn cut(&self, i: usize) {
        ip_cmd(&["link", "set", &self.hosts[i].1, "down"]);
    }

    pub fn heal(&self, i: usize) {
        ip_cmd(&["link", "set", &self.hosts[i].1, "up"]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for (ns, vh) in &self.hosts {
            let _ = Command::new("ip").args(["link", "del", vh]).output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// HAProxy from the system, running the shipped `deploy/haproxy/haproxy.cfg`.
pub struct Haproxy {
    pub addr: String,
    child: Child,
}

impl Haproxy {
    /// Listens on `addr` (the replicas' `server_url`) and balances over `replicas`.
    pub fn start(dir: &Path, addr: &str, replicas: &[&ReplicaProc]) -> Haproxy {
        Self::start_config(dir, "haproxy.cfg", addr, replicas, &[])
    }

    /// Like `start`, with another shipped file of `deploy/haproxy/` and more of its
    /// environment.
    pub fn start_config(
        dir: &Path,
        file: &str,
        addr: &str,
        replicas: &[&ReplicaProc],
        env: &[(&str, &str)],
    ) -> Haproxy {
        let addr = addr.to_string();
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/haproxy")
            .join(file);
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("log file");
        let log2 = log.try_clone().expect("log clone");
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(cfg)
            .env("HYDRASCALE_LB_BIND", &addr);
        for (i, r) in replicas.iter().enumerate() {
            cmd.env(format!("HYDRASCALE_R{}", i + 1), &r.control);
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .expect("start haproxy (apt install haproxy)");
        Haproxy { addr, child }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    /// The network namespace it runs in; its CLI runs there too, because for addresses
    /// outside the tailnet the daemon tells the CLI to dial them itself.
    netns: Option<String>,
    child: Child,
}

impl Tailscaled {
    pub fn start(bin: &Path, root: &Path, name: &str) -> Tailscaled {
        Self::start_with_env(bin, root, name, &[])
    }

    /// Like `start`, with extra environment (the client's debug switches).
    pub fn start_with_env(bin: &Path, root: &Path, name: &str, env: &[(&str, &str)]) -> Tailscaled {
        Self::start_full(bin, root, name, env, None, None)
    }

    /// Like `start`, inside network namespace `netns` (a host of a [`Lan`]); its CLI still
    /// talks to it through the socket in its state directory.
    pub fn start_in(bin: &Path, root: &Path, name: &str, netns: &str) -> Tailscaled {
        Self::start_full(bin, root, name, &[], Some(netns), None)
    }

    /// Like `start`, with its log upload left on (the others run with
    /// `--no-logs-no-support`), sent to `log_target` (`TS_LOG_TARGET`) instead of
    /// Tailscale's log service, so that what the control server tells it can be seen.
    pub fn start_logging(bin: &Path, root: &Path, name: &str, log_target: &str) -> Tailscaled {
        Self::start_full(bin, root, name, &[], None, Some(log_target))
    }

    /// A client of a server with `[tls]` on, as a user runs it: no debug switch, DERP over
    /// TLS. Go trusts the roots in `ca_file` (`SSL_CERT_FILE`) instead of the system's.
    pub fn start_https(
        bin: &Path,
        root: &Path,
        name: &str,
        ca_file: &Path,
        env: &[(&str, &str)],
    ) -> Tailscaled {
        let ca = ca_file.display().to_string();
        let mut all = vec![("SSL_CERT_FILE", ca.as_str())];
        all.extend_from_slice(env);
        Self::start_full(bin, root, name, &all, None, None)
    }

    fn start_full(
        bin: &Path,
        root: &Path,
        name: &str,
        env: &[(&str, &str)],
        netns: Option<&str>,
        log_target: Option<&str>,
    ) -> Tailscaled {
        // A client of a TLS server (see `start_https`) speaks DERP over TLS.
        let derp_over_http = !env.iter().any(|(k, _)| *k == "SSL_CERT_FILE");
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("state dir");
        let log = std::fs::File::create(dir.join("tailscaled.log")).expect("log file");
        let log2 = log.try_clone().expect("log clone");
        let daemon = bin.join("tailscaled");
        let mut cmd = command_in(netns, &daemon.display().to_string());
        cmd.arg("--tun=userspace-networking")
            .arg(format!("--statedir={}", dir.display()))
            .arg(format!("--socket={}", dir.join("ts.sock").display()))
            .arg("--port=0");
        match log_target {
            None => {
                cmd.arg("--no-logs-no-support")
                    .env("TS_NO_LOGS_NO_SUPPORT", "true");
            }
            Some(target) => {
                // Its log buffer and log id stay in its own directory, not /var/lib/tailscale.
                cmd.env("TS_LOG_TARGET", target).env("TS_LOGS_DIR", &dir);
            }
        }
        if derp_over_http {
            // Our DERP runs on the plain-HTTP control listener.
            cmd.env("TS_DEBUG_USE_DERP_HTTP", "1");
        }
        let child = cmd
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
            netns: netns.map(str::to_string),
            child,
        }
    }

    /// The CLI talking to this daemon, to be given arguments and run.
    pub fn cli_command(&self) -> Command {
        let program = self.bin.join("tailscale").display().to_string();
        let mut c = command_in(self.netns.as_deref(), &program);
        c.arg(format!("--socket={}", self.dir.join("ts.sock").display()));
        c
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_command()
            .args(args)
            .output()
            .expect("run tailscale CLI")
    }

    /// `tailscale nc HOST PORT` through this node: what the other end sent before closing,
    /// or `None` when nothing came within `within` (the packet filter dropped the SYN,
    /// or the peer is unknown).
    pub fn nc(&self, host: &str, port: u16, within: Duration) -> Option<String> {
        use std::io::Read;
        let mut child = self
            .cli_command()
            .args(["nc", host, &port.to_string()])
            // Kept open: `nc` ends as soon as either direction does.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run tailscale nc");
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                let mut out = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                return (!out.is_empty()).then_some(out);
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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

    /// Peer host name -> Online, as this client sees it, sorted.
    pub fn peers_online(&self) -> Vec<(String, bool)> {
        let st = self.status();
        let mut v: Vec<(String, bool)> = st["Peer"]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|p| {
                        (
                            p["HostName"].as_str().unwrap_or_default().to_string(),
                            p["Online"].as_bool().unwrap_or(false),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
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
