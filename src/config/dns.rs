//! `[dns]`: the DNS settings every client gets in its map, and the name checks other
//! sections share.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// DNS settings clients get in their map (Tailscale's `DNSConfig`).
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
    pub split: std::collections::BTreeMap<String, Vec<String>>,
    /// Search domains after the base domain.
    pub search_domains: Vec<String>,
    /// Extra names clients resolve themselves.
    pub extra_records: Vec<DnsRecord>,
}

/// One extra DNS record, e.g. `{ name = "grafana.hydrascale.internal", type = "A", value = "100.64.0.9" }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub value: String,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            magic_dns: true,
            nameservers: Vec::new(),
            override_local_dns: true,
            split: std::collections::BTreeMap::new(),
            search_domains: Vec::new(),
            extra_records: Vec::new(),
        }
    }
}

/// A resolver address as Tailscale clients take it: an IP, `IP:port`, or an http(s) URL.
fn valid_resolver(addr: &str) -> bool {
    addr.parse::<std::net::IpAddr>().is_ok()
        || addr.parse::<SocketAddr>().is_ok()
        || addr.starts_with("https://")
        || addr.starts_with("http://")
}

/// A DNS domain such as `corp.example.com` (a trailing dot is allowed).
pub(super) fn valid_domain(d: &str) -> bool {
    let d = d.strip_suffix('.').unwrap_or(d);
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

impl DnsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: format!("dns.{key}"),
            message,
        };
        for ns in &self.nameservers {
            if !valid_resolver(ns) {
                return Err(invalid(
                    "nameservers",
                    format!("{ns:?} is not an IP address, IP:port or http(s):// URL"),
                ));
            }
        }
        for (domain, resolvers) in &self.split {
            if !valid_domain(domain) {
                return Err(invalid("split", format!("{domain:?} is not a DNS domain")));
            }
            if let Some(bad) = resolvers.iter().find(|r| !valid_resolver(r)) {
                return Err(invalid(
                    "split",
                    format!("{domain}: {bad:?} is not an IP address, IP:port or http(s):// URL"),
                ));
            }
        }
        if let Some(bad) = self.search_domains.iter().find(|d| !valid_domain(d)) {
            return Err(invalid(
                "search_domains",
                format!("{bad:?} is not a DNS domain"),
            ));
        }
        for r in &self.extra_records {
            if !valid_domain(&r.name) {
                return Err(invalid(
                    "extra_records",
                    format!("{:?} is not a DNS name", r.name),
                ));
            }
            let ok = match r.record_type.as_str() {
                "A" => r.value.parse::<std::net::Ipv4Addr>().is_ok(),
                "AAAA" => r.value.parse::<std::net::Ipv6Addr>().is_ok(),
                other => {
                    return Err(invalid(
                        "extra_records",
                        format!("{}: type {other:?} is not supported (A or AAAA)", r.name),
                    ))
                }
            };
            if !ok {
                return Err(invalid(
                    "extra_records",
                    format!(
                        "{}: {:?} is not an {} address",
                        r.name,
                        r.value,
                        if r.record_type == "A" { "IPv4" } else { "IPv6" }
                    ),
                ));
            }
        }
        Ok(())
    }
}
