//! Mutual TLS for Raft traffic: the cluster CA, per-replica certificates, and the
//! tonic server/client settings built from them.
//!
//! Every replica certificate carries the same DNS name, [`RAFT_TLS_NAME`], and clients
//! verify that name instead of the address they dial: membership stores addresses, which
//! change, while "signed by this cluster's CA" is what a replica must prove. A peer
//! without a certificate from the CA cannot complete the handshake, so it can neither
//! send Raft messages nor forward writes.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name in every replica certificate and the one clients check.
pub const RAFT_TLS_NAME: &str = "hydrascale-raft";

const CA_NAME: &str = "Hydrascale cluster CA";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
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

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn check_pem(path: &Path, text: &str, what: &str) -> Result<(), TlsError> {
    if text.contains(&format!("-----BEGIN {what}")) || (what == "KEY" && text.contains("KEY-----"))
    {
        Ok(())
    } else {
        Err(TlsError::File {
            path: path.display().to_string(),
            message: format!("not a PEM {}", what.to_lowercase()),
        })
    }
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

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// Server side: present our certificate, require one signed by the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side: trust only the CA, present our certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(self.identity())
            .domain_name(RAFT_TLS_NAME)
    }
}

/// A cluster CA: PEM certificate and PEM private key.
pub struct CaPem {
    pub cert_pem: String,
    pub key_pem: String,
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
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("hydrascale replica {id}"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_replica_certificates_from_a_reloaded_ca() {
        let ca = generate_ca().unwrap();
        assert!(ca.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(ca.key_pem.contains("PRIVATE KEY"));
        let (cert, key) = issue_replica(&ca, 4).unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
        let dbg = format!(
            "{:?}",
            RaftTls {
                ca_pem: ca.cert_pem.clone(),
                cert_pem: cert,
                key_pem: key.clone()
            }
        );
        assert!(!dbg.contains(&key[40..80]), "Debug leaks the key");
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
}
