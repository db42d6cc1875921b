//! Mutual TLS for Raft traffic: the cluster CA, per-replica certificates that name their
//! replica, the tonic server settings and the client connector built from them.
//!
//! Every replica certificate carries the DNS name [`RAFT_TLS_NAME`] (membership stores
//! addresses, which change, so that name, not the address, is what the handshake checks)
//! and names its replica id twice: in a URI (`urn:hydrascale:replica:ID`) and in its
//! common name (`hydrascale replica ID`, the only place certificates of earlier versions
//! had it). Both ends check the other's id once the CA has vouched for the certificate:
//! the server admits only current members (`network::server`), and a client dialling
//! replica N accepts only a certificate of replica N, so a removed replica that takes over
//! a member's address cannot answer in its name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The name in every replica certificate and the one clients check.
pub const RAFT_TLS_NAME: &str = "hydrascale-raft";

/// A replica certificate's URI naming its replica: this prefix, then the id.
pub const REPLICA_URI_PREFIX: &str = "urn:hydrascale:replica:";

/// The common name of a replica certificate: this prefix, then the id.
const REPLICA_CN_PREFIX: &str = "hydrascale replica ";

const CA_NAME: &str = "Hydrascale cluster CA";

/// File names inside a replica's TLS directory (`cluster.tls_dir`) and a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const REPLICA_CERT_FILE: &str = "replica.pem";
pub const REPLICA_KEY_FILE: &str = "replica.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {message}")]
    Certificate { path: String, message: String },
    #[error("TLS settings: {0}")]
    Rustls(String),
}

/// PEM material of one replica: the cluster CA and this replica's certificate and key.
#[derive(Clone)]
pub struct RaftTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for RaftTls {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftTls").finish_non_exhaustive()
    }
}

fn file_err(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| file_err(path, e))
}

fn check_pem(path: &Path, text: &str, what: &str) -> Result<(), TlsError> {
    if text.contains(&format!("-----BEGIN {what}")) || (what == "KEY" && text.contains("KEY-----"))
    {
        Ok(())
    } else {
        Err(file_err(path, format!("not a PEM {}", what.to_lowercase())))
    }
}

/// The replica id a certificate (DER) names: its `urn:hydrascale:replica:ID` URI, or else
/// its common name `hydrascale replica ID`.
pub fn replica_id(cert_der: &[u8]) -> Result<u64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let parse = |s: &str| s.trim().parse::<u64>().ok().filter(|id| *id > 0);
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(REPLICA_URI_PREFIX).and_then(parse) {
                    return Ok(id);
                }
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Some(id) = cn
            .as_str()
            .ok()
            .and_then(|s| s.strip_prefix(REPLICA_CN_PREFIX))
            .and_then(parse)
        {
            return Ok(id);
        }
    }
    Err(format!(
        "the certificate names no replica (no {REPLICA_URI_PREFIX}ID URI, no \"{REPLICA_CN_PREFIX}ID\" common name); issue it with `hydrascale cluster certs`"
    ))
}

impl RaftTls {
    /// Reads the three PEM files, checking only that each looks like what it should be;
    /// the handshake itself is the real check.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let ca_pem = read(ca)?;
        check_pem(ca, &ca_pem, "CERTIFICATE")?;
        let cert_pem = read(cert)?;
        check_pem(cert, &cert_pem, "CERTIFICATE")?;
        let key_pem = read(key)?;
        check_pem(key, &key_pem, "KEY")?;
        Ok(Self {
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// Reads a replica's TLS directory, as `hydrascale cluster certs` writes it: `ca.pem`,
    /// `replica.pem`, `replica.key`.
    pub fn load_dir(dir: &Path) -> Result<Self, TlsError> {
        Self::load(
            &dir.join(CA_CERT_FILE),
            &dir.join(REPLICA_CERT_FILE),
            &dir.join(REPLICA_KEY_FILE),
        )
    }

    /// The replica id this replica's own certificate names.
    pub fn replica_id(&self) -> Result<u64, String> {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| format!("the replica certificate does not parse: {e}"))?;
        replica_id(der.as_ref())
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// Server side: present our certificate, require one signed by the CA. Which replica
    /// it names is checked per call (`network::server`), against the membership then.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side, dialling replica `expect`: trust only the CA, require a certificate of
    /// that replica, present ours.
    pub fn client_config(&self, expect: u64) -> Result<rustls::ClientConfig, TlsError> {
        let bad = |m: String| TlsError::Rustls(m);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let ca = ca.map_err(|e| bad(format!("cluster CA certificate: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| bad(format!("cluster CA certificate: {e}")))?;
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| bad(e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("replica certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| bad(format!("replica key: {e}")))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ReplicaVerifier { webpki, expect }))
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The CA's checks (chain, validity, [`RAFT_TLS_NAME`]), then that the certificate names
/// the replica this connection was opened for.
#[derive(Debug)]
struct ReplicaVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    expect: u64,
}

impl rustls::client::danger::ServerCertVerifier for ReplicaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(RAFT_TLS_NAME)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            self.webpki
                .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)?;
        let id = replica_id(end_entity.as_ref()).map_err(rustls::Error::General)?;
        if id != self.expect {
            return Err(rustls::Error::General(format!(
                "the replica at this address holds the certificate of replica {id}, not of replica {}",
                self.expect
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A cluster CA: PEM certificate and PEM private key.
pub struct CaPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CaPem {
    /// Reads a CA directory (`ca.pem`, `ca.key`).
    pub fn load_dir(dir: &Path) -> Result<Self, TlsError> {
        let (cert, key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        let cert_pem = read(&cert)?;
        check_pem(&cert, &cert_pem, "CERTIFICATE")?;
        let key_pem = read(&key)?;
        check_pem(&key, &key_pem, "KEY")?;
        Ok(Self { cert_pem, key_pem })
    }

    /// Writes `ca.pem` and `ca.key` (owner-only) into `dir`, made owner-only too.
    pub fn write_dir(&self, dir: &Path) -> Result<(), TlsError> {
        private_dir(dir)?;
        write_file(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes())?;
        write_file(&dir.join(CA_KEY_FILE), self.key_pem.as_bytes())
    }
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    p.not_after = p.not_before + time::Duration::days(3650);
    Ok(p)
}

/// Generates a new cluster CA valid for ten years.
pub fn generate_ca() -> Result<CaPem, TlsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    Ok(CaPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate for replica `id`, valid for ten years, as (cert PEM, key PEM).
/// `ca` must be a CA made by [`generate_ca`]: the issuer is rebuilt from its key and
/// fixed name, so an existing CA can keep issuing certificates for new replicas.
pub fn issue_replica(ca: &CaPem, id: u64) -> Result<(String, String), TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut p = CertificateParams::new(vec![RAFT_TLS_NAME.to_string()])?;
    p.subject_alt_names.push(SanType::URI(
        format!("{REPLICA_URI_PREFIX}{id}").try_into()?,
    ));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{REPLICA_CN_PREFIX}{id}"));
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    p.not_after = p.not_before + time::Duration::days(3650);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Makes `dir` (and its parents) and restricts it to its owner.
fn private_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| file_err(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| file_err(dir, e))
}

/// Writes `bytes` to a new owner-only file (replacing one already there).
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(bytes).map_err(|e| file_err(path, e))
}

/// Issues replica `id`'s certificate from `ca` into the owner-only directory `dir`, as a
/// replica reads it (`cluster.tls_dir`): `ca.pem`, `replica.pem`, `replica.key`. Holds
/// nothing of the CA but its certificate.
pub fn write_replica_dir(ca: &CaPem, id: u64, dir: &Path) -> Result<(), TlsError> {
    let (cert, key) = issue_replica(ca, id)?;
    private_dir(dir)?;
    write_file(&dir.join(CA_CERT_FILE), ca.cert_pem.as_bytes())?;
    write_file(&dir.join(REPLICA_CERT_FILE), cert.as_bytes())?;
    write_file(&dir.join(REPLICA_KEY_FILE), key.as_bytes())
}

/// Where a replica started without TLS settings keeps the cluster CA it made itself and
/// its own certificate from it (under its data directory).
#[derive(Debug, Clone)]
pub struct LocalTls {
    pub ca_dir: PathBuf,
    pub tls_dir: PathBuf,
}

impl LocalTls {
    pub fn under(data_dir: &Path) -> Self {
        Self {
            ca_dir: data_dir.join("raft-ca"),
            tls_dir: data_dir.join("raft-tls"),
        }
    }

    /// This replica's TLS material, made on first start: a new cluster CA (kept in
    /// `ca_dir`, from which `hydrascale cluster certs --ca` certifies the replicas that
    /// join later) and this replica's certificate. A single replica thus speaks mutual TLS
    /// on its Raft port from the start, and nothing without a certificate from its CA,
    /// whose key only the data directory's owner can read, gets through.
    pub fn ensure(&self, id: u64) -> Result<RaftTls, TlsError> {
        if !self.tls_dir.join(REPLICA_KEY_FILE).exists() {
            let ca = match CaPem::load_dir(&self.ca_dir) {
                Ok(ca) => ca,
                Err(_) => {
                    let ca = generate_ca()?;
                    ca.write_dir(&self.ca_dir)?;
                    ca
                }
            };
            write_replica_dir(&ca, id, &self.tls_dir)?;
        }
        let tls = RaftTls::load_dir(&self.tls_dir)?;
        match tls.replica_id() {
            Ok(own) if own == id => Ok(tls),
            Ok(own) => Err(TlsError::Certificate {
                path: self.tls_dir.display().to_string(),
                message: format!(
                    "holds the certificate of replica {own}, but this is replica {id} (node_id); was the data directory copied from another replica?"
                ),
            }),
            Err(message) => Err(TlsError::Certificate {
                path: self.tls_dir.display().to_string(),
                message,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn issues_replica_certificates_from_a_reloaded_ca() {
        let ca = generate_ca().unwrap();
        assert!(ca.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(ca.key_pem.contains("PRIVATE KEY"));
        let (cert, key) = issue_replica(&ca, 4).unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
        assert_eq!(replica_id(&der(&cert)), Ok(4));
        let tls = RaftTls {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: cert,
            key_pem: key.clone(),
        };
        assert_eq!(tls.replica_id(), Ok(4));
        let dbg = format!("{tls:?}");
        assert!(!dbg.contains(&key[40..80]), "Debug leaks the key");
        assert!(tls.client_config(4).is_ok());
    }

    /// Certificates of earlier versions named their replica only in the common name.
    #[test]
    fn reads_the_replica_from_the_common_name_of_older_certificates() {
        let ca = generate_ca().unwrap();
        let issuer = Issuer::new(
            ca_params().unwrap(),
            KeyPair::from_pem(&ca.key_pem).unwrap(),
        );
        let mut p = CertificateParams::new(vec![RAFT_TLS_NAME.to_string()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "hydrascale replica 7");
        p.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        assert_eq!(replica_id(cert.der()), Ok(7));
        // A certificate of the CA for something else names no replica.
        let mut p = CertificateParams::new(vec![RAFT_TLS_NAME.to_string()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "grafana");
        p.distinguished_name = dn;
        let cert = p.signed_by(&key, &issuer).unwrap();
        let err = replica_id(cert.der()).unwrap_err();
        assert!(err.contains("names no replica"), "{err}");
        assert!(replica_id(b"not a certificate").is_err());
    }

    #[test]
    fn load_names_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = dir.path().join("r.pem");
        let key = dir.path().join("r.key");
        std::fs::write(&ca, "hello").unwrap();
        std::fs::write(&cert, "x").unwrap();
        std::fs::write(&key, "y").unwrap();
        let err = RaftTls::load(&ca, &cert, &key).unwrap_err().to_string();
        assert!(err.contains("ca.pem") && err.contains("not a PEM"), "{err}");
        let err = RaftTls::load(&dir.path().join("missing"), &cert, &key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }

    /// A client dialling replica 3 accepts only replica 3's certificate: another member's
    /// (say, a replica that took over the address) fails the handshake, naming both.
    #[tokio::test]
    async fn a_client_accepts_only_the_replica_it_dialled() {
        let ca = generate_ca().unwrap();
        let tls_of = |id| {
            let (cert_pem, key_pem) = issue_replica(&ca, id).unwrap();
            RaftTls {
                ca_pem: ca.cert_pem.clone(),
                cert_pem,
                key_pem,
            }
        };
        let (two, one) = (tls_of(2), tls_of(1));
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(two.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(two.key_pem.as_bytes()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        let dial = |expect: u64| {
            let config = Arc::new(one.client_config(expect).unwrap());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                tokio_rustls::TlsConnector::from(config)
                    .connect(ServerName::try_from(RAFT_TLS_NAME).unwrap(), tcp)
                    .await
                    .map(|_| ())
            }
        };
        dial(2).await.expect("replica 2 is replica 2");
        let err = dial(3)
            .await
            .expect_err("replica 2 posing as 3")
            .to_string();
        assert!(
            err.contains("replica 2") && err.contains("replica 3"),
            "{err}"
        );
    }

    /// A replica without TLS settings makes its CA and certificate once, owner-only, and
    /// finds them again on the next start; a data directory of another replica is refused.
    #[test]
    fn a_lone_replica_makes_its_own_ca_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let local = LocalTls::under(dir.path());
        let first = local.ensure(1).unwrap();
        assert_eq!(first.replica_id(), Ok(1));
        let again = local.ensure(1).unwrap();
        assert_eq!(first.cert_pem, again.cert_pem, "made anew on restart");
        for d in [&local.ca_dir, &local.tls_dir] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
            for f in std::fs::read_dir(d).unwrap() {
                let f = f.unwrap().path();
                let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", f.display());
            }
        }
        assert!(
            !local.tls_dir.join(CA_KEY_FILE).exists(),
            "CA key beside the replica's"
        );
        let err = local.ensure(2).unwrap_err().to_string();
        assert!(
            err.contains("replica 1") && err.contains("replica 2"),
            "{err}"
        );
        // Another replica certified by the same CA later (`cluster certs --ca`).
        let ca = CaPem::load_dir(&local.ca_dir).unwrap();
        let other = dir.path().join("r2");
        write_replica_dir(&ca, 2, &other).unwrap();
        let r2 = RaftTls::load_dir(&other).unwrap();
        assert_eq!(r2.replica_id(), Ok(2));
        assert_eq!(r2.ca_pem, first.ca_pem);
    }
}
