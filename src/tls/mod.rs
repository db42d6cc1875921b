//! TLS on the control listener (`[tls]`): where the certificate comes from, and serving it.
//!
//! - [`CertStore`] is the rustls certificate resolver every TLS handshake on the control
//!   listener asks. It holds the certificate this replica serves, swapped in place when a
//!   new one arrives (open connections keep theirs), and the TLS-ALPN-01 challenge
//!   certificate while an ACME order wants one.
//! - Certificate files (`tls.cert_file`/`key_file`) are read at start and checked for
//!   changes every [`FILE_POLL`] (size, modification time and inode of both files): a
//!   renewed pair is loaded without a restart; a pair that does not load (half written,
//!   key and certificate not matching) keeps the old one served and is tried again.
//! - With ACME (`tls.acme_hostname`) the certificate lives in the replicated state
//!   (`Tailnet::tls`), private key included: one replica orders it ([`acme`]) and every
//!   replica serves what it has applied ([`follow_state`]).
//! - `crate::listener` accepts the control listener's connections (under the same
//!   limits with TLS on or off) and tells TLS from plain HTTP by the first byte, so
//!   relays, probes and clients configured with `http://` keep working on the same port;
//!   `control::plain_router` decides what plain HTTP may still reach.

pub mod acme;
pub mod der;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::config::Config;
use crate::state::{AcmeChallengeRecord, Change, Db, TlsCertRecord};

pub use der::LeafInfo;

/// The ALPN protocol of the TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How often certificate files are checked for a change.
pub const FILE_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----, the leaf first, then its chain)")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key (expected -----BEGIN PRIVATE KEY----- or an RSA/EC key): {message}")]
    NoKey { path: String, message: String },
    #[error("the private key does not fit the certificate, or is of a kind rustls cannot use: {0}; give the key that belongs to the certificate's first (leaf) entry")]
    Mismatch(String),
    #[error("the certificate does not parse as X.509")]
    BadCertificate,
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The ring provider the whole binary uses (rustls is built without aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate ready to serve, with what it says about itself.
#[derive(Clone)]
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub info: LeafInfo,
}

/// A PEM certificate chain and its PEM private key, checked to belong together.
pub fn load_pem(chain_pem: &[u8], key_pem: &[u8], what: &str) -> Result<Served, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .filter_map(Result::ok)
        .collect();
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { path: what.into() });
    };
    let info = der::leaf_info(leaf)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::NoKey {
        path: what.into(),
        message: e.to_string(),
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(Served {
        key: Arc::new(certified),
        info,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// `tls.cert_file` and `tls.key_file`, loaded.
pub fn load_files(cert: &Path, key: &Path) -> Result<Served, TlsError> {
    let chain = read(cert)?;
    let key_pem = read(key)?;
    let what = format!("{} / {}", cert.display(), key.display());
    load_pem(&chain, &key_pem, &what).map_err(|e| match e {
        TlsError::NoCertificate { .. } => TlsError::NoCertificate {
            path: cert.display().to_string(),
        },
        TlsError::NoKey { message, .. } => TlsError::NoKey {
            path: key.display().to_string(),
            message,
        },
        other => other,
    })
}

/// A self-signed certificate for `names` with a fresh key (DER certificate, PKCS#8 key).
fn self_signed(
    names: &[String],
    extension: Option<rcgen::CustomExtension>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    if let Some(ext) = extension {
        params.custom_extensions.push(ext);
    }
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let key_der = PrivateKeyDer::from(rustls::pki_types::PrivatePkcs8KeyDer::from(
        key.serialize_der(),
    ));
    // Not `CertifiedKey::from_der`: its check that key and certificate match parses the
    // certificate with webpki, which refuses the challenge's critical acmeIdentifier
    // extension; both come from the lines above.
    let signing = provider().key_provider.load_private_key(key_der)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// The certificate answering a TLS-ALPN-01 challenge: self-signed, for the one name being
/// validated, with the key authorization's SHA-256 in the critical acmeIdentifier
/// extension (RFC 8737). Each replica makes its own from the replicated challenge.
pub fn challenge_cert(
    hostname: &str,
    key_authorization: &str,
) -> Result<Arc<CertifiedKey>, TlsError> {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key_authorization.as_bytes());
    self_signed(
        &[hostname.to_string()],
        Some(rcgen::CustomExtension::new_acme_identifier(&digest)),
    )
}

/// The resolver of the control listener's TLS handshakes.
pub struct CertStore {
    current: RwLock<Option<Served>>,
    /// Served before the cluster has its first ACME certificate, so the listener (and a
    /// load balancer's health check through it) works meanwhile; clients reject it.
    placeholder: Option<Arc<CertifiedKey>>,
    /// The TLS-ALPN-01 challenge being validated: its name and certificate.
    challenge: RwLock<Option<(String, Arc<CertifiedKey>)>>,
    /// Bumped on every swap, so tests and the metrics can tell.
    swaps: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("current", &self.info())
            .finish_non_exhaustive()
    }
}

fn lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn lock_mut<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// What a scrape reads of the served certificate (`metrics` asks through this trait, so it
/// imports nothing from here).
impl crate::metrics::ServedCert for CertStore {
    fn validity_ms(&self) -> Option<(i64, i64)> {
        self.info().map(|i| (i.not_before, i.not_after))
    }

    fn swaps(&self) -> u64 {
        CertStore::swaps(self)
    }

    fn acme(&self) -> bool {
        CertStore::acme(self)
    }
}

impl CertStore {
    pub fn new(current: Option<Served>, placeholder_name: Option<&str>) -> Result<Self, TlsError> {
        let placeholder = match placeholder_name {
            Some(name) => Some(self_signed(&[name.to_string()], None)?),
            None => None,
        };
        Ok(Self {
            current: RwLock::new(current),
            placeholder,
            challenge: RwLock::new(None),
            swaps: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The served certificate's validity and serial; `None` before there is one.
    pub fn info(&self) -> Option<LeafInfo> {
        lock(&self.current).as_ref().map(|s| s.info.clone())
    }

    /// Whether the certificate comes from ACME (the replicated state) rather than files.
    pub fn acme(&self) -> bool {
        self.placeholder.is_some()
    }

    /// Certificates swapped in since start.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Serves `served` from the next handshake on.
    pub fn set(&self, served: Served) {
        tracing::info!(
            serial = %served.info.serial,
            not_after = %crate::tailcfg::rfc3339(served.info.not_after),
            "serving a new TLS certificate"
        );
        *lock_mut(&self.current) = Some(served);
        self.swaps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_challenge(&self, challenge: Option<(String, Arc<CertifiedKey>)>) {
        *lock_mut(&self.challenge) = challenge;
    }

    /// The rustls configuration of the control listener: HTTP/1.1 (what the Tailscale
    /// client, DERP and the web pages speak), plus `acme-tls/1` when the certificate comes
    /// from TLS-ALPN-01.
    pub fn server_config(
        self: &Arc<Self>,
        alpn_challenge: bool,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if alpn_challenge {
            config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        }
        Ok(config)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme {
            // Only the challenge answers acme-tls/1, and only for the name being validated.
            let sni = hello.server_name()?;
            return lock(&self.challenge)
                .as_ref()
                .filter(|(name, _)| name.eq_ignore_ascii_case(sni))
                .map(|(_, key)| key.clone());
        }
        lock(&self.current)
            .as_ref()
            .map(|s| s.key.clone())
            .or_else(|| self.placeholder.clone())
    }
}

/// What identifies a file's content without reading it: a replaced file (a new inode,
/// as `mv` or Kubernetes' symlink swap leaves) or one rewritten in place (size, mtime).
fn file_mark(path: &Path) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// Reloads `tls.cert_file`/`key_file` into `store` whenever either changes.
pub async fn watch_files(
    store: Arc<CertStore>,
    cert: PathBuf,
    key: PathBuf,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let marks = |cert: &Path, key: &Path| (file_mark(cert), file_mark(key));
    let mut loaded = marks(&cert, &key);
    let mut failed_at = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FILE_POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = marks(&cert, &key);
        if now == loaded || failed_at == Some(now) {
            continue;
        }
        let (c, k) = (cert.clone(), key.clone());
        match tokio::task::spawn_blocking(move || load_files(&c, &k)).await {
            Ok(Ok(served)) => {
                store.set(served);
                loaded = now;
                failed_at = None;
            }
            Ok(Err(e)) => {
                // Often a pair caught half written: the next change is tried again.
                metrics
                    .tls_reload_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "the changed TLS certificate files do not load; still serving the previous certificate");
                failed_at = Some(now);
            }
            Err(e) => tracing::warn!(error = %e, "reloading the TLS certificate files"),
        }
    }
}

/// The certificate and challenge of the replicated state, as this replica serves them.
fn serve_state(
    store: &CertStore,
    cert: Option<&TlsCertRecord>,
    challenge: Option<&AcmeChallengeRecord>,
    shown: &mut Shown,
) {
    let cert_mark = cert.map(|c| c.serial.clone());
    if cert_mark != shown.cert {
        if let Some(c) = cert {
            match load_pem(
                c.chain_pem.as_bytes(),
                c.key_pem.expose().as_bytes(),
                "the replicated state's certificate",
            ) {
                Ok(served) => store.set(served),
                Err(e) => {
                    tracing::error!(error = %e, serial = %c.serial, "the certificate in the replicated state does not load; still serving the previous one")
                }
            }
        }
        shown.cert = cert_mark;
    }
    let challenge_mark = challenge.map(|c| c.token.clone());
    if challenge_mark != shown.challenge {
        let served = match challenge {
            Some(c) if c.kind == crate::state::AcmeChallengeKind::TlsAlpn01 => {
                match challenge_cert(&c.hostname, &c.key_authorization) {
                    Ok(key) => Some((c.hostname.clone(), key)),
                    Err(e) => {
                        tracing::error!(error = %e, "making the TLS-ALPN-01 challenge certificate");
                        None
                    }
                }
            }
            _ => None,
        };
        store.set_challenge(served);
        shown.challenge = challenge_mark;
    }
}

#[derive(Default)]
struct Shown {
    cert: Option<String>,
    challenge: Option<String>,
}

/// Serves the replicated state's certificate and challenge, swapping them in as they change.
pub async fn follow_state(store: Arc<CertStore>, db: Db, mut stop: watch::Receiver<bool>) {
    let mut changes = db.store.subscribe();
    let mut shown = Shown::default();
    loop {
        {
            let (cert, challenge) = {
                let t = db.store.read();
                (t.tls.cert.clone(), t.tls.challenge.clone())
            };
            serve_state(&store, cert.as_ref(), challenge.as_ref(), &mut shown);
        }
        loop {
            use tokio::sync::broadcast::error::RecvError;
            tokio::select! {
                c = changes.recv() => match c {
                    Ok((_, Change::TlsChanged)) | Ok((_, Change::Reset)) | Err(RecvError::Lagged(_)) => break,
                    Ok(_) => continue,
                    Err(RecvError::Closed) => return,
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// The replicated ACME challenge's answer for `token` (HTTP-01), on every listener.
async fn acme_http_challenge(State(db): State<Db>, UrlPath(token): UrlPath<String>) -> Response {
    let answer = db
        .store
        .read()
        .tls
        .challenge
        .as_ref()
        .filter(|c| c.token == token)
        .map(|c| c.key_authorization.clone());
    match answer {
        Some(a) => ([(header::CONTENT_TYPE, "application/octet-stream")], a).into_response(),
        None => (StatusCode::NOT_FOUND, "no such ACME challenge").into_response(),
    }
}

/// The HTTP-01 challenge route (`/.well-known/acme-challenge/{token}`).
pub fn challenge_routes(db: Db) -> Router {
    Router::new()
        .route(
            "/.well-known/acme-challenge/{token}",
            get(acme_http_challenge),
        )
        .with_state(db)
}

/// Everything else on a plain-HTTP connection: a permanent redirect to the same path at
/// `server_url` (https). Never the request's own Host: the redirect goes nowhere else.
pub fn redirect_to(server_url: String) -> Router {
    Router::new().fallback(move |uri: Uri| {
        let base = server_url.clone();
        async move {
            let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
            (
                StatusCode::PERMANENT_REDIRECT,
                [(header::LOCATION, format!("{base}{path}"))],
                "use https\n",
            )
                .into_response()
        }
    })
}

/// The listener `tls.http_listen_addr` (port 80): ACME HTTP-01 answers, and a redirect to
/// `server_url` for everything else.
pub fn http_listener_router(db: Db, config: &Config) -> Router {
    challenge_routes(db).merge(redirect_to(config.server_url().to_string()))
}
