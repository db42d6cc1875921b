//! `[dns]`: the DNS settings a founding replica seeds the tailnet's replicated settings
//! with (afterwards `hydrascale dns` changes them, and this section is not read), what a
//! replica serves until they are seeded, and the file of extra records the leader
//! follows. The settings' fields and checks are the state's own ([`DnsSettings`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;
pub(super) use crate::state::valid_domain;
pub use crate::state::DnsRecord;
use crate::state::DnsSettings;

/// The `[dns]` section: [`DnsSettings`]' fields, and `extra_records_path`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// MagicDNS: clients answer `<node>.<base_domain>` themselves (at 100.100.100.100).
    pub magic_dns: bool,
    /// Resolvers for every other name: IP addresses, `IP:port`, or DNS-over-HTTPS URLs.
    pub nameservers: Vec<String>,
    /// true: clients use `nameservers` instead of their own resolvers; false: only when
    /// their own are unusable (Tailscale's fallback resolvers).
    pub override_local_dns: bool,
    /// Resolvers for names under a domain (split DNS), e.g. `"corp.example" = ["10.0.0.53"]`.
    /// An empty list makes the domain answered only from `extra_records`.
    pub split: BTreeMap<String, Vec<String>>,
    /// Search domains after the base domain.
    pub search_domains: Vec<String>,
    /// Extra names clients resolve themselves.
    pub extra_records: Vec<DnsRecord>,
    /// A JSON file of extra records (headscale's format) the leader follows: each valid
    /// version replaces the extra records in force.
    pub extra_records_path: Option<PathBuf>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig::from_settings(DnsSettings::default())
    }
}

impl DnsConfig {
    fn from_settings(s: DnsSettings) -> DnsConfig {
        DnsConfig {
            magic_dns: s.magic_dns,
            nameservers: s.nameservers,
            override_local_dns: s.override_local_dns,
            split: s.split,
            search_domains: s.search_domains,
            extra_records: s.extra_records,
            extra_records_path: None,
        }
    }

    /// The settings this section seeds (and serves until they are seeded).
    pub fn settings(&self) -> DnsSettings {
        DnsSettings {
            magic_dns: self.magic_dns,
            nameservers: self.nameservers.clone(),
            override_local_dns: self.override_local_dns,
            split: self.split.clone(),
            search_domains: self.search_domains.clone(),
            extra_records: self.extra_records.clone(),
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.settings().check().map_err(|p| ConfigError::Invalid {
            key: format!("dns.{}", p.field),
            message: p.message,
        })
    }
}
