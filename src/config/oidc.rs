//! `[oidc]`: login through an OpenID Connect provider.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// OIDC login (`[oidc]`): an interactive login's URL leads to this identity provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL (discovery at `<issuer>/.well-known/openid-configuration`);
    /// empty: OIDC login is off.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// A file holding the client secret, instead of `client_secret`.
    pub client_secret_file: Option<PathBuf>,
    /// Scopes asked for; must include `openid`.
    pub scopes: Vec<String>,
    /// Only users whose verified e-mail address is in one of these domains (empty: any).
    pub allowed_domains: Vec<String>,
    /// Only these users, by e-mail address or `preferred_username` (empty: any).
    pub allowed_users: Vec<String>,
    /// Only members of one of these groups (the `groups` claim; empty: any).
    pub allowed_groups: Vec<String>,
}

impl Default for OidcConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            client_secret_file: None,
            scopes: vec!["openid".into(), "profile".into(), "email".into()],
            allowed_domains: Vec::new(),
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
        }
    }
}

impl OidcConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.issuer.is_empty() {
            return Ok(());
        }
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: format!("oidc.{key}"),
            message: message.into(),
        };
        if !(self.issuer.starts_with("https://") || self.issuer.starts_with("http://")) {
            return Err(invalid(
                "issuer",
                "must be the provider's https:// issuer URL",
            ));
        }
        // Over plain HTTP anyone on the path could answer discovery and the JWKS with keys
        // of their own and log in as anyone; only a provider on this machine is spared.
        if let Some(rest) = self.issuer.strip_prefix("http://") {
            if !loopback_authority(rest.split(['/', '?', '#']).next().unwrap_or_default()) {
                return Err(invalid(
                    "issuer",
                    "must be an https:// URL: http:// is accepted only for a provider on this machine (localhost, 127.0.0.0/8 or [::1])",
                ));
            }
        }
        if self.client_id.is_empty() {
            return Err(invalid(
                "client_id",
                "is needed with oidc.issuer: the client id the provider gave you",
            ));
        }
        if self.client_secret.is_empty() && self.client_secret_file.is_none() {
            return Err(invalid(
                "client_secret",
                "is needed with oidc.issuer (or client_secret_file)",
            ));
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return Err(invalid("scopes", "must include \"openid\""));
        }
        Ok(())
    }
}

/// Whether a URL's authority (`host[:port]`, `[v6]:port`, no user info) names this
/// machine: `localhost`, an address in 127.0.0.0/8 or `::1`.
fn loopback_authority(authority: &str) -> bool {
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, rest)) if rest.is_empty() || rest.starts_with(':') => h,
            _ => return false,
        },
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
