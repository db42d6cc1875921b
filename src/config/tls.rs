//! `[tls]`: TLS on the control listener, from certificate files or an ACME CA.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{valid_domain, ConfigDuration, ConfigError};

/// The ACME directory of Let's Encrypt's production CA, the default `tls.acme_directory`.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// TLS on the control listener (`[tls]`): certificate files, or a certificate from an
/// ACME CA. Off when neither is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first) and its private key; both or neither. Reloaded
    /// when either file changes.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name to obtain a certificate for by ACME (the host of `server_url`); empty: no
    /// ACME. In a cluster one replica orders it and shares it through the replicated state.
    pub acme_hostname: String,
    /// Contact address given to the CA (expiry notices); optional.
    pub acme_email: String,
    /// The CA's ACME directory URL.
    pub acme_directory: String,
    /// `tls-alpn-01` (answered on the control listener, which must be reachable on port 443
    /// of `acme_hostname`) or `http-01` (answered on port 80: `http_listen_addr`, or a load
    /// balancer forwarding port 80 to the control listeners).
    pub acme_challenge: String,
    /// Extra CA certificates (PEM) to trust for the ACME directory's own HTTPS, for a
    /// private CA; the public roots are always trusted.
    pub acme_ca_file: Option<PathBuf>,
    /// Renew this long before the certificate expires.
    pub acme_renew_before: ConfigDuration,
    /// A plain-HTTP listener (port 80) that answers ACME HTTP-01 challenges and redirects
    /// every other request to `server_url`; none by default.
    pub http_listen_addr: Option<SocketAddr>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            acme_hostname: String::new(),
            acme_email: String::new(),
            acme_directory: LETS_ENCRYPT_DIRECTORY.into(),
            acme_challenge: "tls-alpn-01".into(),
            acme_ca_file: None,
            acme_renew_before: ConfigDuration::days(30),
            http_listen_addr: None,
        }
    }
}

impl TlsConfig {
    /// Whether the control listener speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.acme()
    }

    pub fn acme(&self) -> bool {
        !self.acme_hostname.trim().is_empty()
    }

    /// HTTP-01 rather than TLS-ALPN-01 (checked by `validate`).
    pub fn http01(&self) -> bool {
        self.acme_challenge == "http-01"
    }

    /// `acme_renew_before` in milliseconds.
    pub fn renew_before_ms(&self) -> i64 {
        self.acme_renew_before.ms()
    }

    pub(super) fn validate(&self, server_url: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: format!("tls.{key}"),
            message,
        };
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(invalid(
                "cert_file",
                "set tls.cert_file and tls.key_file together (or neither)".into(),
            ));
        }
        if self.cert_file.is_some() && self.acme() {
            return Err(invalid(
                "acme_hostname",
                "either certificate files (tls.cert_file, tls.key_file) or ACME (tls.acme_hostname), not both".into(),
            ));
        }
        if !self.enabled() {
            if self.http_listen_addr.is_some() {
                return Err(invalid(
                    "http_listen_addr",
                    "only serves with [tls] on (tls.cert_file or tls.acme_hostname)".into(),
                ));
            }
            return Ok(());
        }
        if !server_url.starts_with("https://") {
            return Err(ConfigError::Invalid {
                key: "server_url".into(),
                message: format!(
                    "{server_url:?} must start with https:// when [tls] is on: it is what clients pass to --login-server"
                ),
            });
        }
        if self.acme() {
            let host = self.acme_hostname.trim();
            if !valid_domain(host)
                || host.ends_with('.')
                || host.parse::<std::net::IpAddr>().is_ok()
            {
                return Err(invalid(
                    "acme_hostname",
                    format!("{host:?} is not a DNS name such as login.example.com"),
                ));
            }
            let url_host = server_url
                .strip_prefix("https://")
                .and_then(|r| r.split(['/', ':']).next())
                .unwrap_or_default();
            if !url_host.eq_ignore_ascii_case(host) {
                return Err(invalid(
                    "acme_hostname",
                    format!(
                        "{host:?} is not the host of server_url {server_url:?}: clients check the certificate against the name they dial"
                    ),
                ));
            }
            if !self.acme_directory.starts_with("https://") {
                return Err(invalid(
                    "acme_directory",
                    format!(
                        "{:?} must be the CA's https:// directory URL",
                        self.acme_directory
                    ),
                ));
            }
            if !matches!(self.acme_challenge.as_str(), "tls-alpn-01" | "http-01") {
                return Err(invalid(
                    "acme_challenge",
                    format!(
                        "{:?} is not \"tls-alpn-01\" or \"http-01\"",
                        self.acme_challenge
                    ),
                ));
            }
            if self.acme_email.contains(['\n', ' ']) {
                return Err(invalid(
                    "acme_email",
                    format!("{:?} is not an e-mail address", self.acme_email),
                ));
            }
        }
        if self.acme_renew_before.ms() < 60_000 {
            return Err(invalid(
                "acme_renew_before",
                "must be at least 1m (the default is 30d)".into(),
            ));
        }
        Ok(())
    }

    /// The name clients check the certificate against: `acme_hostname`, or the host of
    /// `server_url` with certificate files. `None` while TLS is off.
    pub fn cert_name(&self, server_host: &str) -> Option<String> {
        if self.acme() {
            Some(self.acme_hostname.trim().to_ascii_lowercase())
        } else if self.enabled() {
            Some(server_host.to_string())
        } else {
            None
        }
    }
}
