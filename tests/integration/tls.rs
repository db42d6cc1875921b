//! TLS on the control listener with the official client and a real ACME CA (Pebble, built
//! by scripts/install-deps.sh): certificate files reloaded live with DERP over TLS, ACME
//! for one replica (HTTP-01 and TLS-ALPN-01), and ACME for three replicas behind HAProxy
//! whose leader changes while the renewal is being validated.
//!
//! Pebble validates `localhost` through a DNS server of the test that answers 127.0.0.1
//! for every name (its `-dnsserver`), so validations reach this host's loopback whatever
//! /etc/hosts says. Clients trust Pebble's (or the test CA's) root through `SSL_CERT_FILE`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::fixtures::{
    free_port, http_get, leader_of, require_tailscale, scrape, start_as_cluster_with,
    user_with_reusable_key, wait_for, Haproxy, ReplicaProc, Tailscaled, TestServer,
};

/// A CA of the test's own: signs the certificate files of the first test and Pebble's
/// HTTPS listener.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    fn new() -> TestCa {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "hydrascale test CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("CA");
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    /// A server certificate for `names` (IP addresses become IP names) and its key, PEM.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(names).expect("params");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

/// The chain a TLS handshake with `addr` for `name` presents, if it verifies against the
/// roots in `roots_pem` (as a client checks it).
fn served_chain(
    addr: &str,
    name: &str,
    roots_pem: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let (conn, _) = tls_connect(addr, name, roots_pem)?;
    Ok(conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default())
}

fn tls_connect(
    addr: &str,
    name: &str,
    roots_pem: &str,
) -> Result<(rustls::ClientConnection, TcpStream), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots_pem.as_bytes()).flatten() {
        roots.add(c).map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(hydrascale::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), server_name).map_err(|e| e.to_string())?;
    let mut tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok((conn, tcp))
}

/// The serial number of the certificate `addr` serves for `name`, if it verifies.
fn served_serial(addr: &str, name: &str, roots_pem: &str) -> Option<String> {
    let chain = served_chain(addr, name, roots_pem).ok()?;
    let leaf = chain.first()?;
    Some(hydrascale::tls::der::leaf_info(leaf).ok()?.serial)
}

/// `GET path` over TLS (verified against `roots_pem`): status and body.
fn https_get(addr: &str, name: &str, path: &str, roots_pem: &str) -> Option<(u16, String)> {
    let (conn, tcp) = tls_connect(addr, name, roots_pem).ok()?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(s, "GET {path} HTTP/1.0\r\nHost: {name}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    // A server that closes without close_notify still gave us its whole answer.
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// A plain `GET` and the status line and headers of its answer.
fn http_head(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A DNS server (UDP) answering every A question with 127.0.0.1 and AAAA with nothing.
fn loopback_dns() -> u16 {
    let port = free_port();
    let sock = UdpSocket::bind(("127.0.0.1", port)).expect("bind DNS");
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let q = &buf[..n];
            if n < 12 {
                continue;
            }
            let mut i = 12;
            while i < n && q[i] != 0 {
                i += usize::from(q[i]) + 1;
            }
            if i + 5 > n {
                continue;
            }
            let question = &q[12..i + 5];
            let is_a = q[i + 1] == 0 && q[i + 2] == 1;
            let mut r = Vec::with_capacity(64);
            r.extend_from_slice(&q[..2]);
            r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
            r.extend_from_slice(question);
            if is_a {
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1]);
            }
            let _ = sock.send_to(&r, from);
        }
    });
    port
}

/// A TCP relay to `target` that can hold new connections until released: the test
/// decides when the CA's validation of a challenge goes through.
struct Gate {
    port: u16,
    state: Arc<(Mutex<(bool, usize)>, Condvar)>,
}

impl Gate {
    fn new(target: String) -> Gate {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind gate");
        let state: Arc<(Mutex<(bool, usize)>, Condvar)> = Arc::default();
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                let target = target.clone();
                std::thread::spawn(move || {
                    {
                        let (lock, cv) = &*st;
                        let mut g = lock.lock().expect("gate lock");
                        g.1 += 1;
                        cv.notify_all();
                        while g.0 {
                            g = cv.wait(g).expect("gate wait");
                        }
                    }
                    let Ok(up) = TcpStream::connect(&target) else {
                        return;
                    };
                    let (mut a, mut b) = (conn, up);
                    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else {
                        return;
                    };
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a2, &mut b2);
                        let _ = b2.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut b, &mut a);
                    let _ = a.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Gate { port, state }
    }

    fn set_holding(&self, hold: bool) {
        let (lock, cv) = &*self.state;
        lock.lock().expect("gate lock").0 = hold;
        cv.notify_all();
    }

    /// Connections that came in so far.
    fn arrived(&self) -> usize {
        self.state.0.lock().expect("gate lock").1
    }
}

fn tool(name: &str) -> Option<PathBuf> {
    let candidates = [
        std::env::var("HYDRASCALE_TOOLS_DIR")
            .ok()
            .map(|d| PathBuf::from(d).join("bin")),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin")),
    ];
    let found = candidates
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    match found {
        Some(p) => Some(p),
        None if std::env::var("HYDRASCALE_INTEROP").is_ok() => {
            panic!("{name} not found; run scripts/install-deps.sh")
        }
        None => {
            eprintln!("SKIPPED: {name} not installed (run scripts/test.sh)");
            None
        }
    }
}

/// Pebble, Let's Encrypt's ACME test server, on loopback.
struct Pebble {
    child: Child,
    log: PathBuf,
    /// The ACME directory URL.
    directory: String,
    mgmt: String,
    /// The test CA's certificate, which signed Pebble's own HTTPS certificate.
    listener_ca: String,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pebble {
    /// Validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of whatever `dns`
    /// resolves, and issues certificates valid for `validity_secs`.
    async fn start(
        bin: &Path,
        dir: &Path,
        ca: &TestCa,
        dns: u16,
        http_port: u16,
        tls_port: u16,
        validity_secs: u64,
    ) -> Pebble {
        let dir = dir.join("pebble");
        std::fs::create_dir_all(&dir).expect("pebble dir");
        let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.join("cert.pem"), cert).expect("write");
        std::fs::write(dir.join("key.pem"), key).expect("write");
        let (port, mgmt_port) = (free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "keyAlgorithm": "ecdsa",
            "profiles": {"default": {"description": "test", "validityPeriod": validity_secs}},
        }});
        std::fs::write(dir.join("config.json"), config.to_string()).expect("write");
        let log = dir.join("pebble.log");
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let child = Command::new(bin)
            .arg("-config")
            .arg(dir.join("config.json"))
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns}"))
            // Validate at once, and validate every order anew (no reused authorizations),
            // so a renewal's validation is a renewal's.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start pebble");
        let p = Pebble {
            child,
            log,
            directory: format!("https://127.0.0.1:{port}/dir"),
            mgmt: format!("127.0.0.1:{mgmt_port}"),
            listener_ca: ca.pem.clone(),
        };
        let addr = format!("127.0.0.1:{port}");
        wait_for("Pebble's directory", Duration::from_secs(30), || {
            let ok = https_get(&addr, "localhost", "/dir", &p.listener_ca)
                .is_some_and(|(code, _)| code == 200);
            async move { ok.then_some(()) }
        })
        .await;
        p
    }

    /// The root Pebble issues under (made anew at every start).
    fn root_pem(&self) -> String {
        let (code, body) = https_get(&self.mgmt, "localhost", "/roots/0", &self.listener_ca)
            .expect("Pebble's management interface answers");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Orders Pebble has taken, from its log.
    fn orders(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Added order"))
            .count()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// `tailscale ping` from `from` to `ip` until a pong comes back; the ping's output.
async fn ping(from: &Tailscaled, ip: &str) -> String {
    wait_for(
        &format!("{} to ping {ip}", from.name),
        Duration::from_secs(60),
        || {
            let out = from.cli(&["ping", "--c", "3", "--timeout", "5s", ip]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            async move { text.contains("pong from").then_some(text) }
        },
    )
    .await
}

fn write_files(dir: &Path, cert: &str, key: &str) {
    // Each file replaced at once (rename), the key first: between the two renames the
    // pair does not match, which the reload must ride out.
    for (name, text) in [("key.pem", key), ("cert.pem", cert)] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
}

fn leaf_serial(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate");
    hydrascale::tls::der::leaf_info(&der)
        .expect("parses")
        .serial
}

/// `[tls]` with certificate files: two official clients register over https and relay
/// through the embedded DERP over TLS (UDP between them off, no TS_DEBUG_USE_DERP_HTTP);
/// the DERP map names the certificate's name; plain HTTP on the same port still serves
/// what needs no TLS and redirects the rest; replaced files are served without a restart,
/// and a pair that does not load leaves the served one in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_serve_clients_and_derp_over_tls_and_reload_live() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new();
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("write");
    let (cert1, key1) = ca.issue(&["localhost", "127.0.0.1"]);
    write_files(certs.path(), &cert1, &key1);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let url = format!("https://localhost:{port}");
    let dir = certs.path().to_path_buf();
    let server = TestServer::start_with(|c| {
        c.listen_addr = addr.parse().expect("addr");
        c.server_url = url.clone();
        c.tls.cert_file = Some(dir.join("cert.pem"));
        c.tls.key_file = Some(dir.join("key.pem"));
        // Relays listed by address: the map must name the certificate's name.
        c.derp.hostname = Some("127.0.0.1".into());
    })
    .await;
    assert_eq!(
        served_serial(&addr, "localhost", &ca.pem),
        Some(leaf_serial(&cert1))
    );

    let (code, body) = https_get(&addr, "localhost", "/derpmap/default", &ca.pem).expect("derpmap");
    assert_eq!(code, 200, "{body}");
    let map: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let node = &map["Regions"]["900"]["Nodes"][0];
    assert_eq!(node["HostName"], "127.0.0.1", "{map}");
    assert_eq!(node["CertName"], "localhost", "{map}");
    assert_eq!(node["DERPPort"], port, "{map}");
    assert!(node.get("InsecureForTests").is_none(), "{map}");

    // Plain HTTP on the TLS port: probes and the relay mesh's way in stay, secrets do not.
    let (code, _) = http_get(&addr, "/ready").expect("plain /ready");
    assert_eq!(code, 200);
    for path in ["/api/v1/user", "/register/abc"] {
        let head = http_head(&addr, path);
        assert!(
            head.split_whitespace().nth(1) == Some("308")
                && head
                    .to_ascii_lowercase()
                    .contains(&format!("location: {url}{path}")),
            "{path}: {head}"
        );
    }

    let key = user_with_reusable_key(&server, "alice");
    let root = server.dir.path().join("clients");
    let only_derp = [("TS_DEBUG_ALWAYS_USE_DERP", "1")];
    let a = Tailscaled::start_https(&bin, &root, "ta", &ca_file, &only_derp);
    let b = Tailscaled::start_https(&bin, &root, "tb", &ca_file, &only_derp);
    // `up` returns only once the client is Running, which takes a live DERP connection
    // (or a peer): here, DERP over TLS.
    a.up(&url, &key).await;
    b.up(&url, &key).await;
    let text = ping(&a, &b.ipv4()).await;
    assert!(text.contains("via DERP(hydrascale)"), "{text}");
    let m = scrape(&server.handle().metrics_addr.to_string());
    assert!(m["hydrascale_derp_clients"] >= 2.0, "{m:?}");
    assert!(m["hydrascale_derp_packets_relayed_total"] >= 1.0, "{m:?}");
    let remaining = m["hydrascale_tls_certificate_remaining_seconds"];
    assert!(remaining > 86_400.0, "{remaining}");
    for c in [&a, &b] {
        let st = c.status();
        assert_eq!(st["BackendState"], "Running", "{st}");
        assert_eq!(st["Self"]["Relay"], "hydrascale", "{st}");
    }

    // New files: served from the next handshake on, no restart.
    let store = server.handle().tls.clone().expect("TLS on");
    let swaps = store.swaps();
    let (cert2, key2) = ca.issue(&["localhost", "127.0.0.1"]);
    write_files(certs.path(), &cert2, &key2);
    let want = leaf_serial(&cert2);
    wait_for(
        "the new certificate served",
        Duration::from_secs(30),
        || {
            let ok = served_serial(&addr, "localhost", &ca.pem).as_deref() == Some(want.as_str());
            async move { ok.then_some(()) }
        },
    )
    .await;
    assert!(store.swaps() > swaps);
    // The clients' connections (map stream, DERP) carried on.
    let text = ping(&b, &a.ipv4()).await;
    assert!(text.contains("via DERP(hydrascale)"), "{text}");

    // A key that does not belong to the certificate: counted, and the last good pair stays.
    let failures = |s: &TestServer| {
        scrape(&s.handle().metrics_addr.to_string())["hydrascale_tls_reload_failures_total"]
    };
    let before = failures(&server);
    let (cert3, _) = ca.issue(&["localhost"]);
    let (_, other_key) = ca.issue(&["localhost"]);
    write_files(certs.path(), &cert3, &other_key);
    wait_for("the bad pair refused", Duration::from_secs(30), || {
        let ok = failures(&server) > before;
        async move { ok.then_some(()) }
    })
    .await;
    assert_eq!(served_serial(&addr, "localhost", &ca.pem), Some(want));
}

/// One replica obtains its certificate from Pebble with `challenge`, serves it, and
/// (TLS-ALPN-01) an official client joins over https with it; the time to the first
/// certificate is printed.
async fn acme_single(challenge: &str) {
    let (Some(pebble_bin), Some(bin)) = (tool("pebble"), require_tailscale()) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new();
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("write");
    let dns = loopback_dns();
    let (port, http_port) = (free_port(), free_port());
    let http01 = challenge == "http-01";
    // Pebble validates where the replica answers; the other kind's port stays closed.
    let (pebble_http, pebble_tls) = if http01 {
        (http_port, free_port())
    } else {
        (free_port(), port)
    };
    let pebble = Pebble::start(
        &pebble_bin,
        dir.path(),
        &ca,
        dns,
        pebble_http,
        pebble_tls,
        90 * 86_400,
    )
    .await;
    let roots = pebble.root_pem();
    let roots_file = dir.path().join("pebble-root.pem");
    std::fs::write(&roots_file, &roots).expect("write");

    let addr = format!("127.0.0.1:{port}");
    let url = format!("https://localhost:{port}");
    let started = Instant::now();
    let mut server = TestServer::start_with(|c| {
        c.listen_addr = addr.parse().expect("addr");
        c.server_url = url.clone();
        c.tls.acme_hostname = "localhost".into();
        c.tls.acme_email = "admin@hydrascale.test".into();
        c.tls.acme_directory = pebble.directory.clone();
        c.tls.acme_ca_file = Some(ca_file.clone());
        c.tls.acme_challenge = challenge.into();
        if http01 {
            c.tls.http_listen_addr = Some(format!("127.0.0.1:{http_port}").parse().expect("addr"));
        }
    })
    .await;
    let serial = wait_for("a certificate from Pebble", Duration::from_secs(60), || {
        if let Some((_, why)) = &server.handle().db.store.read().tls.last_failure {
            panic!(
                "the order failed: {why}\n--- pebble ---\n{}",
                pebble.log_tail()
            );
        }
        let s = served_serial(&addr, "localhost", &roots);
        async move { s }
    })
    .await;
    eprintln!(
        "time to first certificate ({challenge}, one replica): {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(pebble.orders(), 1, "{}", pebble.log_tail());
    {
        let t = server.handle().db.store.read();
        let cert = t
            .tls
            .cert
            .as_ref()
            .expect("certificate in the replicated state");
        assert_eq!(cert.serial, serial);
        assert_eq!(cert.hostname, "localhost");
        assert_eq!((t.tls.issued, t.tls.failed), (1, 0));
        assert!(t.tls.lease.is_none() && t.tls.challenge.is_none());
        // The private key never shows in a debug dump of the state.
        let dump = format!("{t:?}");
        assert!(!dump.contains("PRIVATE KEY"), "the key leaks into Debug");
        assert!(!dump.contains(cert.key_pem.expose().lines().nth(1).unwrap_or("x")));
    }
    let m = scrape(&server.handle().metrics_addr.to_string());
    assert_eq!(m["hydrascale_acme_orders_total"], 1.0);
    assert_eq!(m["hydrascale_acme_certificates_issued"], 1.0);
    assert!(m["hydrascale_tls_certificate_remaining_seconds"] > 80.0 * 86_400.0);

    if http01 {
        // Port 80's other answers send the browser to https.
        let head = http_head(&format!("127.0.0.1:{http_port}"), "/some/page?x=1");
        assert!(
            head.split_whitespace().nth(1) == Some("308")
                && head
                    .to_ascii_lowercase()
                    .contains(&format!("location: {url}/some/page?x=1")),
            "{head}"
        );
        // A restart serves the replicated certificate (once it has replayed the state,
        // without a new order).
        server.restart().await;
        let want = Some(serial);
        wait_for(
            "the restarted replica to serve the stored certificate",
            Duration::from_secs(15),
            || {
                let got = served_serial(&addr, "localhost", &roots);
                let ok = got == want;
                async move { ok.then_some(()) }
            },
        )
        .await;
        assert_eq!(pebble.orders(), 1);
    } else {
        let key = user_with_reusable_key(&server, "alice");
        let root = dir.path().join("clients");
        let a = Tailscaled::start_https(&bin, &root, "acme-a", &roots_file, &[]);
        a.up(&url, &key).await;
        assert_eq!(a.status()["Self"]["Relay"], "hydrascale");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_http01_for_one_replica() {
    acme_single("http-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_tls_alpn01_for_one_replica_and_an_official_client() {
    acme_single("tls-alpn-01").await;
}

/// The scraped series `name` of replica `r` (0 if absent).
fn metric(r: &ReplicaProc, name: &str) -> f64 {
    crate::fixtures::metric(&r.metrics, name)
}

/// Three replicas behind HAProxy (the shipped TLS variant: TLS passed through, port 80
/// forwarded for HTTP-01) get one certificate from Pebble for the cluster's name. Its
/// renewal starts on the leader; while Pebble is validating it the leader hands over
/// (`cluster transfer-leader`), and still the cluster places one order for the renewal,
/// not one per replica or per leader, and every replica serves the renewed certificate.
/// Official clients then join over https through the load balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_cluster_renews_once_across_a_leader_change() {
    let (Some(pebble_bin), Some(bin)) = (tool("pebble"), require_tailscale()) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new();
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("write");
    let dns = loopback_dns();
    let (lb, lb_http) = (free_port(), free_port());
    let gate = Gate::new(format!("127.0.0.1:{lb_http}"));
    // 30 days and 60 seconds: renewal (30 days before expiry) is due a minute after issue.
    let validity = 30 * 86_400 + 60;
    let pebble = Pebble::start(
        &pebble_bin,
        dir.path(),
        &ca,
        dns,
        gate.port,
        free_port(),
        validity,
    )
    .await;
    let roots = pebble.root_pem();
    let roots_file = dir.path().join("pebble-root.pem");
    std::fs::write(&roots_file, &roots).expect("write");

    let url = format!("https://localhost:{lb}");
    let tls = format!(
        "\n[tls]\nacme_hostname = \"localhost\"\nacme_email = \"admin@hydrascale.test\"\n\
         acme_directory = \"{}\"\nacme_ca_file = \"{}\"\nacme_challenge = \"http-01\"\n",
        pebble.directory,
        ca_file.display()
    );
    let mut replicas: Vec<ReplicaProc> =
        (1..=3).map(|id| ReplicaProc::new(dir.path(), id)).collect();
    // The load balancer first: the first order goes out as soon as there is a leader.
    let _lb = Haproxy::start_config(
        dir.path(),
        "haproxy-tls.cfg",
        &format!("127.0.0.1:{lb}"),
        &replicas.iter().collect::<Vec<_>>(),
        &[("HYDRASCALE_LB_HTTP_BIND", &format!("127.0.0.1:{lb_http}"))],
    );
    // The first validation waits until the load balancer has found the replicas healthy
    // (as an operator starts the cluster behind a load balancer that is up already).
    gate.set_holding(true);
    let started = Instant::now();
    start_as_cluster_with(&mut replicas, &url, &tls).await;
    let lb_http_addr = format!("127.0.0.1:{lb_http}");
    wait_for(
        "HAProxy to find the replicas healthy",
        Duration::from_secs(10),
        || {
            let ok = http_get(&lb_http_addr, "/ready").is_some_and(|(code, _)| code == 200);
            async move { ok.then_some(()) }
        },
    )
    .await;
    gate.set_holding(false);
    let lb_addr = format!("127.0.0.1:{lb}");
    // Every replica, and the load balancer (passing TLS through), serves it.
    let served_everywhere = |want_other_than: Option<&str>| {
        let mut addrs: Vec<String> = replicas.iter().map(|r| r.control.clone()).collect();
        addrs.push(lb_addr.clone());
        let serials: Vec<Option<String>> = addrs
            .iter()
            .map(|a| served_serial(a, "localhost", &roots))
            .collect();
        let first = serials[0].clone()?;
        (serials.iter().all(|s| s.as_deref() == Some(first.as_str()))
            && want_other_than != Some(first.as_str()))
        .then_some(first)
    };
    let first = wait_for(
        "the cluster's first certificate on every replica",
        Duration::from_secs(60),
        || {
            let s = served_everywhere(None);
            async move { s }
        },
    )
    .await;
    eprintln!(
        "time to first certificate (three replicas, http-01 through HAProxy): {} ms from start",
        started.elapsed().as_millis()
    );
    assert_eq!(pebble.orders(), 1, "{}", pebble.log_tail());

    // The renewal: its validation waits at the gate until the leader has handed over.
    gate.set_holding(true);
    let arrived = gate.arrived();
    wait_for(
        "the renewal's validation to start",
        Duration::from_secs(120),
        || {
            let ok = gate.arrived() > arrived;
            async move { ok.then_some(()) }
        },
    )
    .await;
    let renewing_at = Instant::now();
    let leader = leader_of(&replicas).expect("a leader");
    let holder = metric(&replicas[0], "hydrascale_acme_lease_holder") as u64;
    assert_eq!(holder, leader, "the leader took the lease to renew");
    let out = replicas[(leader - 1) as usize].cli(&["cluster", "transfer-leader"]);
    assert!(
        out.status.success(),
        "transfer-leader: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_leader = wait_for("a new leader", Duration::from_secs(20), || {
        let l = leader_of(&replicas).filter(|l| *l != leader);
        async move { l }
    })
    .await;
    // The new leader finds the renewal due too, and the old leader's lease in its way.
    let log = replicas[(new_leader - 1) as usize]
        .dir
        .join("hydrascale.log");
    wait_for(
        "the new leader to see the lease and wait",
        Duration::from_secs(8),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let ok = text.contains(&format!(
                "replica {leader} holds the ACME lease and is ordering the certificate; not ordering here"
            ));
            async move { ok.then_some(()) }
        },
    )
    .await;
    gate.set_holding(false);
    let renewed = wait_for(
        "the renewed certificate on every replica",
        Duration::from_secs(60),
        || {
            let s = served_everywhere(Some(&first));
            async move { s }
        },
    )
    .await;
    eprintln!(
        "renewal with a leader change ({leader} -> {new_leader}) while Pebble validated: served everywhere {} ms after validation began",
        renewing_at.elapsed().as_millis()
    );
    // Long enough for every replica's ACME check (every 10 s) to have looked again.
    let observed = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        pebble.orders(),
        2,
        "one order for the first certificate, one for its renewal\n{}",
        pebble.log_tail()
    );
    let placed: Vec<f64> = replicas
        .iter()
        .map(|r| metric(r, "hydrascale_acme_orders_total"))
        .collect();
    assert_eq!(
        placed.iter().sum::<f64>(),
        2.0,
        "orders per replica: {placed:?}"
    );
    assert!(
        placed[(leader - 1) as usize] >= 1.0,
        "the old leader renewed: {placed:?}"
    );
    for r in &replicas {
        assert_eq!(metric(r, "hydrascale_acme_certificates_issued"), 2.0);
        assert_eq!(
            served_serial(&r.control, "localhost", &roots).as_deref(),
            Some(renewed.as_str())
        );
    }
    assert!(
        observed.elapsed() < Duration::from_secs(50),
        "the next renewal would be due"
    );
    // Each replica's log names the orders it placed: two in all, the renewal by the old
    // leader, with how long each took from lease to certificate.
    let mut issued = Vec::new();
    for r in &replicas {
        let text = std::fs::read_to_string(r.dir.join("hydrascale.log")).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("TLS certificate issued"))
        {
            // Without the log's colour codes: `took_ms=569`.
            let mut plain = String::new();
            let mut escape = false;
            for c in line.chars() {
                match (escape, c) {
                    (_, '\u{1b}') => escape = true,
                    (true, 'm') => escape = false,
                    (true, _) => {}
                    (false, c) => plain.push(c),
                }
            }
            let took = plain
                .split("took_ms=")
                .nth(1)
                .and_then(|t| {
                    t.split(|c: char| !c.is_ascii_digit())
                        .find(|d| !d.is_empty())
                })
                .unwrap_or("?")
                .to_string();
            issued.push((r.id, took));
        }
    }
    eprintln!("certificates issued (replica, ms from lease to certificate): {issued:?}");
    assert_eq!(issued.len(), 2, "{issued:?}");
    assert!(issued.iter().any(|(id, _)| *id == leader), "{issued:?}");

    // Official clients join over https through the load balancer and reach each other.
    let admin = &replicas[(new_leader - 1) as usize];
    let key = user_with_reusable_key(admin, "alice");
    let root = dir.path().join("clients");
    let a = Tailscaled::start_https(&bin, &root, "ca", &roots_file, &[]);
    let b = Tailscaled::start_https(&bin, &root, "cb", &roots_file, &[]);
    a.up(&url, &key).await;
    b.up(&url, &key).await;
    ping(&a, &b.ipv4()).await;
}

/// The shipped certificate alerts, evaluated by promtool over the series a replica
/// exposes: quiet while renewal has time, firing for a 90-day certificate 10 days from its
/// end, and judging a six-day certificate by its own lifetime.
#[test]
fn certificate_alerts_fire_when_renewal_is_overdue() {
    let Some(promtool) = crate::monitoring::require_system_tool("promtool") else {
        return;
    };
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let day = 86_400;
    // (instance, remaining, lifetime): 90 days with 10 and 20 days left, 2 days left
    // (critical); six days with 2.5 days left (renewal due at 2) and with 1 day left.
    let certs = [
        ("r1", 10 * day, 90 * day),
        ("r2", 20 * day, 90 * day),
        ("r3", 2 * day, 90 * day),
        ("r4", 5 * day / 2, 6 * day),
        ("r5", day, 6 * day),
    ];
    let mut series = String::new();
    for (i, remaining, lifetime) in certs {
        for (name, v) in [("remaining", remaining), ("lifetime", lifetime)] {
            series.push_str(&format!(
                "      - series: 'hydrascale_tls_certificate_{name}_seconds{{job=\"hydrascale\",instance=\"{i}\"}}'\n        values: '{v}x150'\n"
            ));
        }
    }
    let desc_warn = "It should have been renewed by now. With ACME see the replicas' logs (\\\"ordering the TLS certificate failed\\\") and hydrascale_acme_failures_in_row; with tls.cert_file, renew the files (they are reloaded without a restart) and watch hydrascale_tls_reload_failures_total.";
    let desc_crit = "Once it has expired clients cannot log in or relay through this replica. Renew it now (docs/operations.md, HTTPS).";
    let alert = |sev: &str, i: &str, left: &str, desc: &str| {
        format!(
            "          - exp_labels: {{severity: {sev}, job: hydrascale, instance: {i}}}\n            exp_annotations:\n              summary: \"The TLS certificate of {i} expires in {left}\"\n              description: \"{desc}\"\n"
        )
    };
    let test = format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    alert_rule_test:\n      - eval_time: 30m\n        alertname: HydrascaleCertificateRenewalOverdue\n        exp_alerts: []\n      - eval_time: 70m\n        alertname: HydrascaleCertificateRenewalOverdue\n        exp_alerts:\n{}{}{}      - eval_time: 70m\n        alertname: HydrascaleCertificateExpiring\n        exp_alerts:\n{}",
        rules.display(),
        alert("warning", "r1", "10d 0h 0m 0s", desc_warn),
        alert("warning", "r3", "2d 0h 0m 0s", desc_warn),
        alert("warning", "r5", "1d 0h 0m 0s", desc_warn),
        alert("critical", "r3", "2d 0h 0m 0s", desc_crit),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("alerts_test.yml");
    std::fs::write(&file, test).expect("write");
    let out = Command::new(promtool)
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
