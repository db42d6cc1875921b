//! The tailnet's DNS settings as replicated state (MagicDNS, resolvers, split DNS, search
//! domains, extra records): what every replica puts in its clients' `DNSConfig`, so a
//! change made through one replica reaches clients on all of them. The checks here run in
//! `apply`, so a setting that would break clients never enters the state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// DNS settings clients get in their map (Tailscale's `DNSConfig`). The same fields as
/// the config file's `[dns]`, which seeds them when a cluster is founded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsSettings {
    /// MagicDNS: clients answer `<node>.<base_domain>` themselves (at 100.100.100.100).
    pub magic_dns: bool,
    /// Resolvers for every other name: IP addresses, `IP:port`, or DNS-over-HTTPS URLs.
    pub nameservers: Vec<String>,
    /// true: clients use `nameservers` instead of their own resolvers; false: only when
    /// their own are unusable (Tailscale's fallback resolvers).
    pub override_local_dns: bool,
    /// Resolvers for names under a domain (split DNS); an empty list makes the domain
    /// answered only from `extra_records`.
    pub split: BTreeMap<String, Vec<String>>,
    /// Search domains after the base domain.
    pub search_domains: Vec<String>,
    /// Extra names clients resolve themselves.
    pub extra_records: Vec<DnsRecord>,
}

/// One extra DNS record (headscale's `extra_records` format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub value: String,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            magic_dns: true,
            nameservers: Vec::new(),
            override_local_dns: true,
            split: BTreeMap::new(),
            search_domains: Vec::new(),
            extra_records: Vec::new(),
        }
    }
}

/// Most of each list, so one command cannot grow every client's map without bound.
pub const MAX_DNS_ENTRIES: usize = 1000;

/// A refused setting: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsProblem {
    pub field: &'static str,
    pub message: String,
}

/// A resolver address as Tailscale clients take it: an IP, `IP:port`, or an http(s) URL.
pub fn valid_resolver(addr: &str) -> bool {
    addr.parse::<std::net::IpAddr>().is_ok()
        || addr.parse::<std::net::SocketAddr>().is_ok()
        || (addr.len() <= 2048 && (addr.starts_with("https://") || addr.starts_with("http://")))
}

/// A DNS domain such as `corp.example.com` (a trailing dot is allowed).
pub fn valid_domain(d: &str) -> bool {
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

impl DnsSettings {
    /// Whether clients can use these settings; the first problem found otherwise.
    pub fn check(&self) -> Result<(), DnsProblem> {
        let problem = |field, message| Err(DnsProblem { field, message });
        let split_resolvers: usize = self.split.values().map(Vec::len).sum();
        for (field, len) in [
            ("nameservers", self.nameservers.len()),
            ("split", self.split.len() + split_resolvers),
            ("search_domains", self.search_domains.len()),
            ("extra_records", self.extra_records.len()),
        ] {
            if len > MAX_DNS_ENTRIES {
                return problem(
                    field,
                    format!("{len} entries; at most {MAX_DNS_ENTRIES} are allowed"),
                );
            }
        }
        if let Some(ns) = self.nameservers.iter().find(|ns| !valid_resolver(ns)) {
            return problem(
                "nameservers",
                format!("{ns:?} is not an IP address, IP:port or http(s):// URL"),
            );
        }
        for (domain, resolvers) in &self.split {
            if !valid_domain(domain) {
                return problem("split", format!("{domain:?} is not a DNS domain"));
            }
            if let Some(bad) = resolvers.iter().find(|r| !valid_resolver(r)) {
                return problem(
                    "split",
                    format!("{domain}: {bad:?} is not an IP address, IP:port or http(s):// URL"),
                );
            }
        }
        if let Some(bad) = self.search_domains.iter().find(|d| !valid_domain(d)) {
            return problem("search_domains", format!("{bad:?} is not a DNS domain"));
        }
        for r in &self.extra_records {
            if !valid_domain(&r.name) {
                return problem("extra_records", format!("{:?} is not a DNS name", r.name));
            }
            let ok = match r.record_type.as_str() {
                "A" => r.value.parse::<std::net::Ipv4Addr>().is_ok(),
                "AAAA" => r.value.parse::<std::net::Ipv6Addr>().is_ok(),
                other => {
                    return problem(
                        "extra_records",
                        format!("{}: type {other:?} is not supported (A or AAAA)", r.name),
                    )
                }
            };
            if !ok {
                let family = if r.record_type == "A" { "IPv4" } else { "IPv6" };
                return problem(
                    "extra_records",
                    format!("{}: {:?} is not an {family} address", r.name, r.value),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_field_by_field() {
        let good = DnsSettings {
            nameservers: vec!["1.1.1.1".into(), "[2606:4700::1111]:53".into()],
            split: BTreeMap::from([("corp.example".into(), vec!["10.0.0.53".into()])]),
            search_domains: vec!["corp.example.".into()],
            extra_records: vec![DnsRecord {
                name: "grafana.ts.test".into(),
                record_type: "A".into(),
                value: "100.64.0.9".into(),
            }],
            ..Default::default()
        };
        assert_eq!(good.check(), Ok(()));
        let field = |edit: fn(&mut DnsSettings)| {
            let mut s = good.clone();
            edit(&mut s);
            s.check().map_err(|p| p.field)
        };
        assert_eq!(
            field(|s| s.nameservers.push("dns.google".into())),
            Err("nameservers")
        );
        assert_eq!(
            field(|s| {
                s.split.insert("bad domain".into(), vec![]);
            }),
            Err("split")
        );
        assert_eq!(
            field(|s| s.search_domains.push("a..b".into())),
            Err("search_domains")
        );
        assert_eq!(
            field(|s| s.extra_records[0].value = "fd7a::1".into()),
            Err("extra_records")
        );
        assert_eq!(
            field(|s| s.extra_records[0].record_type = "MX".into()),
            Err("extra_records")
        );
        assert_eq!(
            field(|s| s.nameservers = vec!["1.1.1.1".into(); MAX_DNS_ENTRIES + 1]),
            Err("nameservers")
        );
    }
}
