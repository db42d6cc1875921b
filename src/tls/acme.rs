//! The cluster's certificate from an ACME CA (`tls.acme_*`), ordered by one replica.
//!
//! Every replica with ACME configured runs [`run`]; only the Raft leader starts an order,
//! and only after taking the lease recorded in the replicated state (`Command::Acme`,
//! `AcmeStep::Lease`). The state machine grants it to one replica at a time, so however
//! leadership moves the cluster places one order per renewal:
//!
//! 1. The leader finds the certificate missing, for another name, or due
//!    ([`due`]: `tls.acme_renew_before`, 30 days, before it expires), and no back-off from
//!    earlier failures pending ([`may_try`]).
//! 2. It takes the lease (10 minutes, extended every minute while the order runs), then
//!    looks again at the state as it now stands: a holder before it may have just
//!    installed a fresh certificate, and then it gives the lease back unused.
//! 3. It orders, publishes the challenge in the replicated state (every replica answers
//!    it: a load balancer may send the CA's validation anywhere), checks that every
//!    registered replica answers it, and tells the CA to validate.
//! 4. It installs the certificate and its private key in the replicated state
//!    (`AcmeStep::Issued`, which ends the lease) or records the failure (`Failed`).
//!
//! A leader that loses leadership mid-order keeps its lease and finishes; the new leader
//! sees the lease and waits. Only a holder that dies (or is cut off) for the lease's 10
//! minutes lets another replica order again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::{
    now_ms, AcmeAccountRecord, AcmeChallengeKind, AcmeChallengeRecord, AcmeStep, Change, Command,
    Db, DbError, Secret, StateError, TlsCertRecord, TlsState,
};

/// How long a lease lasts unless extended.
pub const LEASE_MS: i64 = 10 * 60 * 1000;
/// How often the holder extends it while its order runs.
const LEASE_EXTEND: Duration = Duration::from_secs(60);
/// How often every replica looks whether an order is due (and on every TLS change, and
/// as soon as it becomes the leader, which it notices within [`LEADER_POLL`]).
const CHECK_EVERY: Duration = Duration::from_secs(10);
const LEADER_POLL: Duration = Duration::from_secs(1);
/// Back-off after failed orders in a row: 30 s after the first (a load balancer that had
/// not yet marked fresh replicas healthy), then 4 minutes, doubling up to an hour: at most
/// five tries in the first hour, as many failed validations as Let's Encrypt allows per
/// name and hour.
const BACKOFF_FIRST_MS: i64 = 30 * 1000;
const BACKOFF_MIN_MS: i64 = 2 * 60 * 1000;
const BACKOFF_MAX_MS: i64 = 60 * 60 * 1000;
/// The longest an order may take, all steps included.
const ORDER_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long to wait for every replica to answer a published challenge.
const SERVED_WAIT: Duration = Duration::from_secs(10);

/// Why an order is due now, or `None`. A certificate valid for less than
/// `renew_before` (short-lived profiles) renews after two thirds of its lifetime instead
/// of at once.
pub fn due(tls: &TlsState, hostname: &str, renew_before_ms: i64, now: i64) -> Option<&'static str> {
    let Some(c) = &tls.cert else {
        return Some("the cluster has no certificate yet");
    };
    if !c.hostname.eq_ignore_ascii_case(hostname) {
        return Some("the certificate is for another name than tls.acme_hostname");
    }
    let lifetime = c.not_after.saturating_sub(c.not_before);
    let before = if renew_before_ms >= lifetime {
        lifetime / 3
    } else {
        renew_before_ms
    };
    (now >= c.not_after.saturating_sub(before))
        .then_some("the certificate expires within tls.acme_renew_before")
}

/// How long to wait after `failures` failed orders in a row.
pub fn backoff_ms(failures: u32) -> i64 {
    match failures {
        0 => return 0,
        1 => return BACKOFF_FIRST_MS,
        _ => {}
    }
    let doublings = failures.saturating_sub(1).min(20);
    BACKOFF_MIN_MS
        .saturating_mul(1i64 << doublings)
        .min(BACKOFF_MAX_MS)
}

/// Whether the back-off after the last failure has passed at `now`.
pub fn may_try(tls: &TlsState, now: i64) -> bool {
    match &tls.last_failure {
        Some((at, _)) if tls.failures_in_row > 0 => {
            now >= at.saturating_add(backoff_ms(tls.failures_in_row))
        }
        _ => true,
    }
}

/// instant-acme's requests through hyper-rustls: the public roots (webpki-roots) plus
/// `tls.acme_ca_file`.
#[derive(Clone)]
struct Http(Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>);

impl instant_acme::HttpClient for Http {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.0.request(req);
        Box::pin(async move {
            match fut.await {
                Ok(rsp) => Ok(BytesResponse::from(rsp)),
                Err(e) => Err(instant_acme::Error::Other(Box::new(e))),
            }
        })
    }
}

fn http_client(extra_roots: Option<&std::path::Path>) -> Result<Http, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_roots {
        let pem =
            std::fs::read(path).map_err(|e| format!("tls.acme_ca_file {}: {e}", path.display()))?;
        let mut added = 0;
        for der in rustls::pki_types::CertificateDer::pem_slice_iter(&pem).flatten() {
            roots
                .add(der)
                .map_err(|e| format!("tls.acme_ca_file {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "tls.acme_ca_file {} holds no PEM certificate",
                path.display()
            ));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(Http(Client::builder(TokioExecutor::new()).build(connector)))
}

/// What the ACME task of one replica needs.
pub struct Acme {
    db: Db,
    me: u64,
    hostname: String,
    email: String,
    directory: String,
    kind: AcmeChallengeKind,
    renew_before_ms: i64,
    http: Http,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Why an order failed, for the log and the replicated state.
type Failure = String;

fn failure(what: &str) -> impl Fn(instant_acme::Error) -> Failure + '_ {
    move |e| format!("{what}: {e}")
}

impl Acme {
    /// `None` when `[tls]` configures no ACME. An unreadable `tls.acme_ca_file` is an error.
    pub fn new(config: &Config, db: Db, metrics: Arc<Metrics>) -> Result<Option<Self>, String> {
        let t = &config.tls;
        if !t.acme() {
            return Ok(None);
        }
        Ok(Some(Self {
            me: config.node_id,
            hostname: t.acme_hostname.trim().to_ascii_lowercase(),
            email: t.acme_email.trim().to_string(),
            directory: t.acme_directory.clone(),
            kind: if t.http01() {
                AcmeChallengeKind::Http01
            } else {
                AcmeChallengeKind::TlsAlpn01
            },
            renew_before_ms: t.renew_before_ms(),
            http: http_client(t.acme_ca_file.as_deref())?,
            db,
            metrics,
        }))
    }

    async fn step(&self, step: AcmeStep) -> Result<(), DbError> {
        self.db
            .write(Command::Acme {
                replica: self.me,
                step,
                now: now_ms(),
            })
            .await
            .map(|_| ())
    }

    /// Writes a step that must not be lost (the certificate, the failure), retrying
    /// elections for as long as the lease would have lasted.
    async fn step_surely(&self, step: AcmeStep) -> Result<(), DbError> {
        let deadline = Instant::now() + Duration::from_millis(LEASE_MS as u64);
        loop {
            match self.step(step.clone()).await {
                Err(DbError::State(e)) => return Err(DbError::State(e)),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "writing the ACME outcome; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    /// Looks once whether to order, and orders if so. Returns the lease (holder, start)
    /// this replica found another replica ordering under, so it says so once, not at
    /// every look.
    async fn check(&self, deferred_to: Option<(u64, i64)>) -> Option<(u64, i64)> {
        if !self.db.raft.is_leader() {
            return None;
        }
        let now = now_ms();
        let (reason, held, tries) = {
            let t = self.db.store.read();
            let tls = &t.tls;
            (
                due(tls, &self.hostname, self.renew_before_ms, now),
                tls.lease
                    .as_ref()
                    .filter(|l| l.replica != self.me && l.until > now)
                    .map(|l| (l.replica, l.since)),
                may_try(tls, now),
            )
        };
        let reason = reason?;
        let defer = |held: (u64, i64)| {
            if deferred_to != Some(held) {
                tracing::info!(
                    holder = held.0,
                    "replica {} holds the ACME lease and is ordering the certificate; not ordering here",
                    held.0
                );
            }
            Some(held)
        };
        if let Some(h) = held {
            return defer(h);
        }
        if !tries {
            return None;
        }
        match self
            .step(AcmeStep::Lease {
                until: now + LEASE_MS,
            })
            .await
        {
            Ok(()) => {}
            Err(DbError::State(StateError::AcmeLeaseHeld { holder, .. })) => {
                let since = self
                    .db
                    .store
                    .read()
                    .tls
                    .lease
                    .as_ref()
                    .map_or(now, |l| l.since);
                return defer((holder, since));
            }
            Err(e) => {
                tracing::debug!(error = %e, "taking the ACME lease");
                return None;
            }
        }
        // The lease is ours, and the state we read now has everything committed before
        // it: a holder before us may have renewed meanwhile.
        let still = due(
            &self.db.store.read().tls,
            &self.hostname,
            self.renew_before_ms,
            now_ms(),
        );
        if still.is_none() {
            if let Err(e) = self.step(AcmeStep::Release).await {
                tracing::debug!(error = %e, "giving the unused ACME lease back");
            }
            return None;
        }
        tracing::info!(
            hostname = %self.hostname,
            directory = %self.directory,
            "ordering a TLS certificate: {reason}"
        );
        let started = Instant::now();
        let outcome = self.order_holding_lease().await;
        let step = match outcome {
            Ok(cert) => {
                tracing::info!(
                    serial = %cert.serial,
                    not_after = %crate::tailcfg::rfc3339(cert.not_after),
                    took_ms = started.elapsed().as_millis() as u64,
                    "TLS certificate issued; every replica serves it once applied"
                );
                AcmeStep::Issued { cert }
            }
            Err(error) => {
                tracing::warn!(%error, "ordering the TLS certificate failed; the next try backs off");
                AcmeStep::Failed { error }
            }
        };
        if let Err(e) = self.step_surely(step).await {
            tracing::warn!(error = %e, "recording the ACME outcome; the lease runs out by itself");
        }
        None
    }

    /// The order, while a side task keeps the lease from running out.
    async fn order_holding_lease(&self) -> Result<TlsCertRecord, Failure> {
        let order = tokio::time::timeout(ORDER_TIMEOUT, self.order());
        tokio::pin!(order);
        let mut extend =
            tokio::time::interval_at(tokio::time::Instant::now() + LEASE_EXTEND, LEASE_EXTEND);
        loop {
            tokio::select! {
                r = &mut order => {
                    return r.unwrap_or_else(|_| Err(format!("the order took longer than {ORDER_TIMEOUT:?}")));
                }
                _ = extend.tick() => {
                    match self.step(AcmeStep::Lease { until: now_ms() + LEASE_MS }).await {
                        Ok(()) => {}
                        Err(DbError::State(e)) => return Err(format!("lost the ACME lease: {e}")),
                        // An election: the lease has minutes left; try again next tick.
                        Err(e) => tracing::debug!(error = %e, "extending the ACME lease"),
                    }
                }
            }
        }
    }

    async fn account(&self, fresh: bool) -> Result<Account, Failure> {
        let stored = if fresh {
            None
        } else {
            self.db
                .store
                .read()
                .tls
                .account
                .clone()
                .filter(|a| a.directory == self.directory)
        };
        if let Some(a) = stored {
            let credentials: AccountCredentials = serde_json::from_str(a.credentials.expose())
                .map_err(|e| format!("the stored ACME account does not decode: {e}"))?;
            return Account::builder_with_http(Box::new(self.http.clone()))
                .from_credentials(credentials)
                .await
                .map_err(failure("reaching the ACME directory"));
        }
        let contact = if self.email.is_empty() {
            Vec::new()
        } else {
            vec![format!("mailto:{}", self.email)]
        };
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(Box::new(self.http.clone()))
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.directory.clone(),
                None,
            )
            .await
            .map_err(failure("creating the ACME account"))?;
        let credentials = serde_json::to_string(&credentials).map_err(|e| e.to_string())?;
        self.step(AcmeStep::Account {
            account: AcmeAccountRecord {
                directory: self.directory.clone(),
                credentials: Secret::new(credentials),
            },
        })
        .await
        .map_err(|e| format!("recording the ACME account: {e}"))?;
        tracing::info!(directory = %self.directory, "ACME account created");
        Ok(account)
    }

    async fn order(&self) -> Result<TlsCertRecord, Failure> {
        let identifiers = [Identifier::Dns(self.hostname.clone())];
        let new_order = NewOrder::new(&identifiers);
        let account = self.account(false).await?;
        let mut order = match account.new_order(&new_order).await {
            Ok(o) => o,
            // The CA forgot the account (a test CA restarted, or it was deactivated).
            Err(instant_acme::Error::Api(p))
                if p.r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":accountDoesNotExist")) =>
            {
                self.account(true)
                    .await?
                    .new_order(&new_order)
                    .await
                    .map_err(failure("placing the order"))?
            }
            Err(e) => return Err(failure("placing the order")(e)),
        };
        self.metrics
            .acme_orders
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let challenge_type = match self.kind {
            AcmeChallengeKind::Http01 => ChallengeType::Http01,
            AcmeChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(failure("reading the authorization"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                // Validated for an earlier order and still valid.
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(format!(
                        "the authorization for {} is {other:?}",
                        self.hostname
                    ))
                }
            }
            let mut challenge = authz.challenge(challenge_type.clone()).ok_or_else(|| {
                format!(
                    "the CA offers no {challenge_type:?} challenge for {}; set tls.acme_challenge to the other kind",
                    self.hostname
                )
            })?;
            let record = AcmeChallengeRecord {
                kind: self.kind,
                hostname: self.hostname.clone(),
                token: challenge.token.clone(),
                key_authorization: challenge.key_authorization().as_str().to_string(),
            };
            self.step(AcmeStep::Challenge {
                challenge: Some(record.clone()),
            })
            .await
            .map_err(|e| format!("publishing the challenge: {e}"))?;
            self.wait_served(&record).await;
            challenge
                .set_ready()
                .await
                .map_err(failure("asking the CA to validate"))?;
        }
        let polling = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(Duration::from_secs(180));
        let status = order
            .poll_ready(&polling)
            .await
            .map_err(failure("waiting for the CA to validate"))?;
        if status != OrderStatus::Ready {
            return Err(format!(
                "the CA did not validate {}: the order is {status:?}",
                self.hostname
            ));
        }
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = rcgen::CertificateParams::new(vec![self.hostname.clone()])
            .map_err(|e| e.to_string())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(failure("finalizing the order"))?;
        let chain = order
            .poll_certificate(&polling)
            .await
            .map_err(failure("fetching the certificate"))?;
        let key_pem = key.serialize_pem();
        let served = super::load_pem(
            chain.as_bytes(),
            key_pem.as_bytes(),
            "the issued certificate",
        )
        .map_err(|e| e.to_string())?;
        Ok(TlsCertRecord {
            hostname: self.hostname.clone(),
            chain_pem: chain,
            key_pem: Secret::new(key_pem),
            not_before: served.info.not_before,
            not_after: served.info.not_after,
            serial: served.info.serial,
            issued_by: self.me,
            installed: now_ms(),
        })
    }

    /// Waits (up to [`SERVED_WAIT`]) until every registered replica answers the challenge
    /// on its control listener, so the CA's validation finds it wherever a load balancer
    /// sends it. A replica that never answers (down) only costs the wait.
    async fn wait_served(&self, challenge: &AcmeChallengeRecord) {
        let bases: Vec<String> = self
            .db
            .store
            .read()
            .replicas
            .values()
            .filter_map(|r| r.mesh_url.strip_suffix("/derp").map(str::to_string))
            .collect();
        let client: Client<HttpConnector, http_body_util::Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let alpn = alpn_probe();
        let deadline = Instant::now() + SERVED_WAIT;
        let mut waiting = bases;
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for base in waiting {
                let url = format!("{base}/.well-known/acme-challenge/{}", challenge.token);
                let ok = answers(&client, &url, &challenge.key_authorization).await
                    && (challenge.kind != AcmeChallengeKind::TlsAlpn01
                        || answers_alpn(&alpn, &base, challenge).await);
                if !ok {
                    still.push(base);
                }
            }
            waiting = still;
            if waiting.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(replicas = ?waiting, "these replicas do not answer the ACME challenge yet; asking the CA to validate anyway");
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn answers(
    client: &Client<HttpConnector, http_body_util::Empty<Bytes>>,
    url: &str,
    expected: &str,
) -> bool {
    use http_body_util::BodyExt;
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let got = tokio::time::timeout(Duration::from_secs(2), async {
        let rsp = client.get(uri).await.ok()?;
        if !rsp.status().is_success() {
            return None;
        }
        let body = rsp.into_body().collect().await.ok()?.to_bytes();
        Some(body)
    })
    .await;
    matches!(got, Ok(Some(body)) if body == expected.as_bytes())
}

/// Accepts any certificate: the TLS-ALPN-01 self-check only looks at the challenge
/// certificate a replica presents (made from the replicated challenge); it trusts nothing
/// it learns this way.
#[derive(Debug)]
struct LookOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for LookOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    // webpki would refuse to parse the certificate's critical acmeIdentifier extension
    // just to check the handshake signature; the probe asserts nothing from it.
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client that asks for `acme-tls/1`, as the CA's validation does.
fn alpn_probe() -> Option<tokio_rustls::TlsConnector> {
    let provider = super::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LookOnly(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![super::ACME_TLS_ALPN.to_vec()];
    Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Whether the control listener at `base` (`http://host:port`) answers a TLS-ALPN-01
/// handshake for the challenge's name with a certificate carrying its digest.
async fn answers_alpn(
    probe: &Option<tokio_rustls::TlsConnector>,
    base: &str,
    challenge: &AcmeChallengeRecord,
) -> bool {
    use sha2::{Digest, Sha256};
    let Some(probe) = probe else {
        return true;
    };
    let Some(addr) = base.strip_prefix("http://") else {
        return false;
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(challenge.hostname.clone()) else {
        return false;
    };
    let digest = Sha256::digest(challenge.key_authorization.as_bytes());
    let shown = tokio::time::timeout(Duration::from_secs(2), async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let tls = probe.connect(name, tcp).await.ok()?;
        let (_, conn) = tls.get_ref();
        let leaf = conn.peer_certificates()?.first()?.to_vec();
        (conn.alpn_protocol() == Some(super::ACME_TLS_ALPN)).then_some(leaf)
    })
    .await;
    matches!(shown, Ok(Some(leaf)) if leaf.windows(digest.len()).any(|w| w == digest.as_slice()))
}

/// Orders and renews while the replica runs: looks every [`CHECK_EVERY`], whenever the
/// certificate or challenge changes, and when this replica becomes the leader.
pub async fn run(acme: Acme, mut stop: watch::Receiver<bool>) {
    let mut changes = acme.db.store.subscribe();
    let mut deferred_to = None;
    loop {
        tokio::select! {
            d = acme.check(deferred_to) => deferred_to = d,
            _ = stop.wait_for(|s| *s) => return,
        }
        let wait = tokio::time::sleep(CHECK_EVERY);
        tokio::pin!(wait);
        let mut leading = acme.db.raft.is_leader();
        loop {
            use tokio::sync::broadcast::error::RecvError;
            tokio::select! {
                _ = &mut wait => break,
                _ = tokio::time::sleep(LEADER_POLL) => {
                    let now_leading = acme.db.raft.is_leader();
                    if now_leading && !leading {
                        break;
                    }
                    leading = now_leading;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn with_cert(not_before: i64, not_after: i64) -> TlsState {
        TlsState {
            cert: Some(TlsCertRecord {
                hostname: "login.example.com".into(),
                chain_pem: String::new(),
                key_pem: Secret::default(),
                not_before,
                not_after,
                serial: "01".into(),
                issued_by: 1,
                installed: not_before,
            }),
            ..TlsState::default()
        }
    }

    #[test]
    fn renews_thirty_days_before_expiry() {
        let t = with_cert(0, 90 * DAY);
        let before = 30 * DAY;
        assert!(due(&t, "login.example.com", before, 59 * DAY).is_none());
        assert!(due(&t, "LOGIN.example.com", before, 60 * DAY - 1).is_none());
        assert!(due(&t, "login.example.com", before, 60 * DAY).is_some());
        assert!(due(&TlsState::default(), "login.example.com", before, 0).is_some());
        assert!(due(&t, "other.example.com", before, 0).is_some());
    }

    #[test]
    fn short_lived_certificates_renew_after_two_thirds() {
        // A six-day certificate would be due from the start with 30 days' margin.
        let t = with_cert(0, 6 * DAY);
        assert!(due(&t, "login.example.com", 30 * DAY, 3 * DAY).is_none());
        assert!(due(&t, "login.example.com", 30 * DAY, 4 * DAY).is_some());
    }

    #[test]
    fn failures_back_off_exponentially_up_to_an_hour() {
        assert_eq!(backoff_ms(0), 0);
        assert_eq!(backoff_ms(1), 30_000);
        assert_eq!(backoff_ms(2), 4 * 60_000);
        assert_eq!(backoff_ms(5), 32 * 60_000);
        assert_eq!(backoff_ms(6), 60 * 60_000);
        assert_eq!(backoff_ms(u32::MAX), 60 * 60_000);
        // Tries in the first hour of failures: at most five (Let's Encrypt's limit).
        let (mut at, mut tries) = (0, 0);
        for n in 0.. {
            at += backoff_ms(n);
            if at >= 60 * 60_000 {
                break;
            }
            tries += 1;
        }
        assert_eq!(tries, 5);
        let mut t = TlsState {
            failures_in_row: 2,
            last_failure: Some((1_000, "no".into())),
            ..TlsState::default()
        };
        assert!(!may_try(&t, 1_000 + 4 * 60_000 - 1));
        assert!(may_try(&t, 1_000 + 4 * 60_000));
        t.failures_in_row = 0;
        assert!(may_try(&t, 1_000));
    }
}
