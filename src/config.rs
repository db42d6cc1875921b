//! Server configuration: the file format, embedded defaults, and environment overrides.
//!
//! Every key can come from the TOML file, from an environment variable
//! (`HYDRASCALE_<KEY>`, nested keys joined by `__`, e.g. `HYDRASCALE_DERP__REGION_ID`),
//! or from `hydrascale serve` flags, in increasing order of precedence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors a user can cause with a bad configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given to --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var} has a value that does not fit key {key}: {message}")]
    Env {
        var: String,
        key: String,
        message: String,
    },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: String, message: String },
}

/// The whole configuration of one replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The URL clients use as `--login-server` (the load balancer's URL in a cluster).
    pub server_url: String,
    /// Control plane listener: TS2021 (`/key`, `/ts2021`), DERP (`/derp`) and web pages.
    pub listen_addr: SocketAddr,
    /// Admin gRPC listener used by the `hydrascale` CLI. Keep it on loopback.
    pub admin_listen_addr: SocketAddr,
    /// Raft gRPC listener between replicas.
    pub raft_listen_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`) and probes (`/health`, `/ready`).
    pub metrics_listen_addr: SocketAddr,
    /// Where RocksDB (Raft log and state) and the control key live.
    pub data_dir: PathBuf,
    /// This replica's Raft node id (unique in the cluster, never reused).
    pub node_id: u64,
    /// MagicDNS base domain: nodes are named `<name>.<base_domain>`.
    pub base_domain: String,
    /// How long a node key stays valid after registration, e.g. "180d"; "0" = never expires.
    pub node_expiry: ConfigDuration,
    /// An ephemeral node offline this long is removed, e.g. "30m".
    pub ephemeral_inactivity_timeout: ConfigDuration,
    /// Where node addresses come from: subsets of 100.64.0.0/10 and fd7a:115c:a1e0::/48.
    pub prefixes: crate::state::Prefixes,
    /// Taildrop (`tailscale file cp`) between nodes of the same user.
    pub taildrop: bool,
    /// Let clients upload their logs to Tailscale's log service (log.tailscale.io). Off:
    /// every full map tells them not to (`Debug.DisableLogTail`), as headscale does.
    pub client_log_upload: bool,
    /// DNS settings pushed to every client (keep them the same on every replica).
    pub dns: DnsConfig,
    pub oidc: OidcConfig,
    pub derp: DerpConfig,
    pub cluster: ClusterConfig,
    pub tls: TlsConfig,
    /// Load balancers whose connections to `listen_addr` may start with a PROXY protocol
    /// header (v1 or v2) naming the client, as CIDR ranges (`10.0.0.5/32`). Empty: none,
    /// and every connection's client is its TCP peer.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub limits: LimitsConfig,
}

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

    fn validate(&self, server_url: &str) -> Result<(), ConfigError> {
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

/// Bounds on what one client address can hold or start (`[limits]`); see
/// `docs/security.md` for every limit, including the fixed ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections open at once to the control listener from one client address (an
    /// IPv4 address, or an IPv6 /64); 0: no limit. Every node holds two (its Noise
    /// session and its DERP connection), so a NAT with many nodes behind it, or a load
    /// balancer that does not send the PROXY protocol, needs more.
    pub max_connections_per_address: usize,
    /// Interactive logins (`tailscale up` without an auth key) waiting at once from one
    /// client address; as many may be started from it per 10 minutes.
    pub max_pending_logins_per_address: usize,
    /// Noise sessions on this replica that have not yet identified themselves (a
    /// registration or a map request of a node of this tailnet); a new one beyond this
    /// is refused with 503 and the client retries.
    pub max_unidentified_sessions: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_address: 512,
            max_pending_logins_per_address: 10,
            max_unidentified_sessions: 1024,
        }
    }
}

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
    fn validate(&self) -> Result<(), ConfigError> {
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
fn valid_domain(d: &str) -> bool {
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
    fn validate(&self) -> Result<(), ConfigError> {
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

/// How this replica forms or joins a cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The voters a brand-new cluster starts with, `ID=HOST:PORT` (Raft addresses) separated
    /// by commas, the same on every replica; the replica with the lowest id starts the
    /// cluster. Empty: a cluster of this replica alone. Ignored once the data directory
    /// holds a cluster.
    pub peers: String,
    /// Start no cluster by itself: wait to be added (`cluster join`/`add-learner` on the
    /// leader) or to found one (`cluster init`/`cluster restore` against this replica).
    pub join: bool,
    /// Raft address other replicas dial; defaults to `raft_listen_addr`.
    pub advertise_raft_addr: Option<String>,
    /// Admin address other replicas name in "ask the leader" errors; defaults to
    /// `admin_listen_addr`.
    pub advertise_admin_addr: Option<String>,
    /// A replica that has not heard from a quorum for this long stops serving clients, and
    /// the leader marks the nodes of a replica silent for this long offline.
    pub isolation_timeout: ConfigDuration,
    /// A follower that has not heard from its leader for twice this long (the leader
    /// lease) may campaign, once a majority of voters agree (pre-vote); openraft's own
    /// election timer is drawn between this and twice this. Keep it well above the
    /// longest stall of a replica (scheduling, fsync): a shorter one fails over faster
    /// and risks elections no one needed.
    pub election_timeout: ConfigDuration,
    /// How often the leader sends heartbeats (openraft sends them on a tick of 1.5 times
    /// this); must be below `election_timeout`.
    pub heartbeat_interval: ConfigDuration,
    /// A file written by `hydrascale cluster backup`: the replica that starts a new cluster
    /// seeds it with this state (users, nodes, keys, control key). Ignored once the cluster
    /// has state, and by the other replicas.
    pub restore_from: Option<std::path::PathBuf>,
    /// Mutual TLS for Raft traffic: a directory holding the cluster CA certificate
    /// (`ca.pem`) and this replica's certificate and key (`replica.pem`, `replica.key`), as
    /// `hydrascale cluster certs` writes it for each replica. Without it (or the three
    /// files below), a replica alone makes its own CA and certificate in its data
    /// directory; a cluster does not start.
    pub tls_dir: Option<std::path::PathBuf>,
    /// The same as three files (all three or none), instead of `tls_dir`.
    pub tls_ca_file: Option<std::path::PathBuf>,
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Raft between replicas without TLS: anyone who reaches `raft_listen_addr` can then
    /// rewrite the tailnet. Only for a network where nothing else can reach that port.
    pub insecure_plaintext: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            peers: String::new(),
            join: false,
            advertise_raft_addr: None,
            advertise_admin_addr: None,
            isolation_timeout: ConfigDuration::seconds(8),
            election_timeout: ConfigDuration::millis(200),
            heartbeat_interval: ConfigDuration::millis(100),
            restore_from: None,
            tls_dir: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            insecure_plaintext: false,
        }
    }
}

impl ClusterConfig {
    /// The Raft TLS file paths, when all three are set.
    pub fn tls_files(
        &self,
    ) -> Option<(
        &std::path::PathBuf,
        &std::path::PathBuf,
        &std::path::PathBuf,
    )> {
        Some((
            self.tls_ca_file.as_ref()?,
            self.tls_cert_file.as_ref()?,
            self.tls_key_file.as_ref()?,
        ))
    }

    /// `peers` as (id, Raft address) pairs.
    pub fn peer_list(&self) -> Result<std::collections::BTreeMap<u64, String>, String> {
        let mut out = std::collections::BTreeMap::new();
        for item in self
            .peers
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (id, addr) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} should look like 1=10.0.0.1:50444"))?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|i| *i > 0)
                .ok_or_else(|| format!("{item:?}: the id must be a number of 1 or more"))?;
            let addr = addr.trim();
            if addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(format!("{item:?}: the address must be HOST:PORT"));
            }
            if out.insert(id, addr.to_string()).is_some() {
                return Err(format!("replica id {id} appears twice"));
            }
        }
        Ok(out)
    }

    pub fn isolation_timeout(&self) -> std::time::Duration {
        self.isolation_timeout.duration()
    }

    /// Raft's election timeout range in milliseconds: `election_timeout` to twice it.
    pub fn election_timeout_ms(&self) -> (u64, u64) {
        let min = u64::try_from(self.election_timeout.ms()).unwrap_or(0);
        (min, 2 * min)
    }

    pub fn heartbeat_ms(&self) -> u64 {
        u64::try_from(self.heartbeat_interval.ms()).unwrap_or(0)
    }
}

/// The embedded DERP relay and STUN server, and how it appears in the DERP map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DerpConfig {
    pub enabled: bool,
    pub region_id: i32,
    pub region_code: String,
    pub region_name: String,
    /// Host name clients dial for DERP; defaults to the host of `server_url`.
    pub hostname: Option<String>,
    /// Port clients dial for DERP; defaults to the port of `server_url`.
    pub port: Option<u16>,
    /// Literal IPv4 address advertised in the DERP map (optional).
    pub ipv4: Option<String>,
    /// UDP address of the STUN listener.
    pub stun_listen_addr: SocketAddr,
    /// Mark the DERP node `InsecureForTests` (self-signed TLS in tests only).
    pub insecure_for_tests: bool,
    /// Relay only for nodes of this tailnet (current, unexpired node keys); off makes the
    /// relay open to anyone who can reach it.
    pub verify_clients: bool,
    /// A DERP map in Tailscale's JSON form whose regions are added to the map clients get
    /// (e.g. your own external relays, or Tailscale's public ones as a fallback).
    pub extra_regions_file: Option<std::path::PathBuf>,
}

impl Default for DerpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            region_id: 900,
            region_code: "hydrascale".into(),
            region_name: "Hydrascale".into(),
            hostname: None,
            port: None,
            ipv4: None,
            stun_listen_addr: SocketAddr::from(([127, 0, 0, 1], 3478)),
            insecure_for_tests: false,
            verify_clients: true,
            extra_regions_file: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_url: "http://127.0.0.1:8080".into(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen_addr: SocketAddr::from(([127, 0, 0, 1], 50443)),
            raft_listen_addr: SocketAddr::from(([127, 0, 0, 1], 50444)),
            metrics_listen_addr: SocketAddr::from(([127, 0, 0, 1], 50445)),
            data_dir: PathBuf::from("hydrascale-data"),
            node_id: 1,
            base_domain: "hydrascale.internal".into(),
            node_expiry: ConfigDuration::zero(),
            ephemeral_inactivity_timeout: ConfigDuration::minutes(30),
            prefixes: crate::state::Prefixes::default(),
            taildrop: true,
            client_log_upload: false,
            dns: DnsConfig::default(),
            oidc: OidcConfig::default(),
            derp: DerpConfig::default(),
            cluster: ClusterConfig::default(),
            tls: TlsConfig::default(),
            trusted_proxies: Vec::new(),
            limits: LimitsConfig::default(),
        }
    }
}

impl Config {
    /// Loads the file (if any) over the embedded defaults, then applies `HYDRASCALE_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    /// Like [`Config::load`] but with an explicit environment, so tests need not touch the process's.
    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        Self::load_with(path, env, &[])
    }

    /// The file, then the environment, then `overrides` (`hydrascale serve --set KEY=VALUE`,
    /// dotted keys), and only then the checks: settings that belong together (the three
    /// `cluster.tls_*_file`) may come from separate flags.
    pub fn load_with(
        path: Option<&Path>,
        env: &[(String, String)],
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: p.display().to_string(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (var, value) in env {
            let Some(rest) = var.strip_prefix("HYDRASCALE_") else {
                continue;
            };
            // Variables the CLI reads for itself are not server settings, nor are the test
            // harness's (`HYDRASCALE_TEST_*`, `HYDRASCALE_INTEROP`, `HYDRASCALE_TOOLS_DIR`).
            if matches!(
                rest,
                "ADMIN_ADDR" | "API_KEY" | "LOG" | "CONFIG" | "INTEROP" | "TOOLS_DIR"
            ) || rest.starts_with("TEST_")
            {
                continue;
            }
            let key_path: Vec<String> = rest.split("__").map(|s| s.to_lowercase()).collect();
            set_path(&mut table, &key_path, value).map_err(|message| ConfigError::Env {
                var: var.clone(),
                key: key_path.join("."),
                message,
            })?;
        }
        for (key, value) in overrides {
            let key_path: Vec<String> = key.split('.').map(str::to_string).collect();
            set_path(&mut table, &key_path, value).map_err(|message| ConfigError::Invalid {
                key: key.clone(),
                message,
            })?;
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: match (path, overrides.is_empty()) {
                        (Some(p), true) => p.display().to_string(),
                        (Some(p), false) => format!("{} with --set", p.display()),
                        (None, true) => "<environment>".into(),
                        (None, false) => "<environment and --set>".into(),
                    },
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Applies one `key=value` override (dotted key), as given by `hydrascale serve --set`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let mut table = toml::Table::try_from(&*self).map_err(|e| ConfigError::Invalid {
            key: key.into(),
            message: e.to_string(),
        })?;
        let key_path: Vec<String> = key.split('.').map(str::to_string).collect();
        set_path(&mut table, &key_path, value).map_err(|message| ConfigError::Invalid {
            key: key.into(),
            message,
        })?;
        let updated: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    key: key.into(),
                    message: e.to_string(),
                })?;
        updated.validate()?;
        *self = updated;
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.server_url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                key: "server_url".into(),
                message: format!(
                    "{url:?} must start with http:// or https:// (it is what clients pass to --login-server)"
                ),
            });
        }
        if self.node_id == 0 {
            return Err(ConfigError::Invalid {
                key: "node_id".into(),
                message: "must be 1 or more".into(),
            });
        }
        let tailscale = crate::state::Prefixes::default();
        if !tailscale.v4.contains(&self.prefixes.v4) || self.prefixes.v4.prefix_len() > 30 {
            return Err(ConfigError::Invalid {
                key: "prefixes.v4".into(),
                message: format!(
                    "{} must be inside 100.64.0.0/10 (Tailscale clients accept no other IPv4 range) and no longer than /30",
                    self.prefixes.v4
                ),
            });
        }
        if !tailscale.v6.contains(&self.prefixes.v6) || self.prefixes.v6.prefix_len() > 120 {
            return Err(ConfigError::Invalid {
                key: "prefixes.v6".into(),
                message: format!(
                    "{} must be inside fd7a:115c:a1e0::/48 (Tailscale clients accept no other IPv6 range) and no longer than /120",
                    self.prefixes.v6
                ),
            });
        }
        let peers = self
            .cluster
            .peer_list()
            .map_err(|message| ConfigError::Invalid {
                key: "cluster.peers".into(),
                message,
            })?;
        if !peers.is_empty() && !peers.contains_key(&self.node_id) {
            return Err(ConfigError::Invalid {
                key: "cluster.peers".into(),
                message: format!(
                    "lists no replica with this replica's node_id {}; list every voter, this one included",
                    self.node_id
                ),
            });
        }
        let c = &self.cluster;
        let tls_set = [&c.tls_ca_file, &c.tls_cert_file, &c.tls_key_file]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if tls_set != 0 && tls_set != 3 {
            return Err(ConfigError::Invalid {
                key: "cluster.tls_ca_file".into(),
                message: "set cluster.tls_ca_file, cluster.tls_cert_file and cluster.tls_key_file together (or none), or cluster.tls_dir alone; `hydrascale cluster certs` makes a directory per replica".into(),
            });
        }
        if tls_set != 0 && c.tls_dir.is_some() {
            return Err(ConfigError::Invalid {
                key: "cluster.tls_dir".into(),
                message:
                    "set either cluster.tls_dir or the three cluster.tls_*_file settings, not both"
                        .into(),
            });
        }
        let tls = tls_set != 0 || c.tls_dir.is_some();
        if tls && c.insecure_plaintext {
            return Err(ConfigError::Invalid {
                key: "cluster.insecure_plaintext".into(),
                message: "is set together with Raft TLS settings; remove one of them".into(),
            });
        }
        if !tls && !c.insecure_plaintext && (peers.len() > 1 || c.join) {
            return Err(ConfigError::Invalid {
                key: "cluster.tls_dir".into(),
                message: "a cluster needs mutual TLS between its replicas: make certificates with `hydrascale cluster certs --out certs --ids 1,2,3` and set cluster.tls_dir = \"certs/replica-N\" on replica N (see docs/operations.md, \"A cluster\"); only on a network where nothing else reaches raft_listen_addr, cluster.insecure_plaintext = true runs it without".into(),
            });
        }
        if !peers.is_empty() && self.cluster.join {
            return Err(ConfigError::Invalid {
                key: "cluster.join".into(),
                message: "a replica either starts a cluster from cluster.peers or joins one; set only one".into(),
            });
        }
        if self.cluster.isolation_timeout.ms() < 1_000 {
            return Err(ConfigError::Invalid {
                key: "cluster.isolation_timeout".into(),
                message: "must be at least 1s (longer than a leader election, e.g. 8s)".into(),
            });
        }
        let election = self.cluster.election_timeout.ms();
        let heartbeat = self.cluster.heartbeat_interval.ms();
        if heartbeat < 10 {
            return Err(ConfigError::Invalid {
                key: "cluster.heartbeat_interval".into(),
                message: "must be at least 10ms, e.g. 100ms".into(),
            });
        }
        if election < 2 * heartbeat || election > 60_000 {
            return Err(ConfigError::Invalid {
                key: "cluster.election_timeout".into(),
                message: format!(
                    "must be at least twice cluster.heartbeat_interval ({}) and at most 60s, e.g. 250ms with heartbeats every 100ms",
                    self.cluster.heartbeat_interval.text
                ),
            });
        }
        if 2 * election >= self.cluster.isolation_timeout.ms() {
            return Err(ConfigError::Invalid {
                key: "cluster.isolation_timeout".into(),
                message: format!(
                    "must be longer than a leader election (twice cluster.election_timeout = {}ms, and more), e.g. 8s",
                    2 * election
                ),
            });
        }
        if self.ephemeral_inactivity_timeout.ms() < 1_000 {
            return Err(ConfigError::Invalid {
                key: "ephemeral_inactivity_timeout".into(),
                message: "must be at least 1s, e.g. 30m".into(),
            });
        }
        if !valid_domain(&self.base_domain) {
            return Err(ConfigError::Invalid {
                key: "base_domain".into(),
                message: "must be a DNS domain such as tailnet.example.com".into(),
            });
        }
        if self.limits.max_pending_logins_per_address == 0 {
            return Err(ConfigError::Invalid {
                key: "limits.max_pending_logins_per_address".into(),
                message: "must be at least 1 (or nobody can log in without an auth key)".into(),
            });
        }
        if self.limits.max_unidentified_sessions == 0 {
            return Err(ConfigError::Invalid {
                key: "limits.max_unidentified_sessions".into(),
                message: "must be at least 1 (or no client can connect)".into(),
            });
        }
        self.dns.validate()?;
        self.oidc.validate()?;
        self.tls.validate(url)
    }

    /// `server_url` without trailing slashes, as the client normalises it.
    pub fn server_url(&self) -> &str {
        self.server_url.trim_end_matches('/')
    }

    /// Host and port of `server_url`, used for DERP map defaults.
    pub fn server_host_port(&self) -> (String, u16) {
        let url = self.server_url();
        let (rest, default_port) = if let Some(r) = url.strip_prefix("https://") {
            (r, 443)
        } else {
            (url.strip_prefix("http://").unwrap_or(url), 80)
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        if let Some(v6) = authority.strip_prefix('[') {
            if let Some((host, port)) = v6.split_once(']') {
                let port = port
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(default_port);
                return (host.to_string(), port);
            }
        }
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), port.parse().unwrap_or(default_port)),
            None => (authority.to_string(), default_port),
        }
    }

    /// `ephemeral_inactivity_timeout` as a duration.
    pub fn ephemeral_inactivity_timeout(&self) -> std::time::Duration {
        self.ephemeral_inactivity_timeout.duration()
    }

    /// Node key lifetime in milliseconds; `None` = keys do not expire.
    pub fn node_expiry_ms(&self) -> Option<i64> {
        Some(self.node_expiry.ms()).filter(|ms| *ms > 0)
    }
}

/// A duration setting ("90s", "15m", "1h", "7d", or "0"), parsed once when the
/// configuration is read: a value [`parse_duration_ms`] refuses fails the load, with its
/// message and the setting's name. Written back (`Config::set`) as it was given.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigDuration {
    text: String,
    ms: i64,
}

impl ConfigDuration {
    fn of(n: i64, unit: &str, ms_per_unit: i64) -> Self {
        Self {
            text: format!("{n}{unit}"),
            ms: n.saturating_mul(ms_per_unit),
        }
    }

    pub fn zero() -> Self {
        Self {
            text: "0".into(),
            ms: 0,
        }
    }

    pub fn millis(n: i64) -> Self {
        Self::of(n, "ms", 1)
    }

    pub fn seconds(n: i64) -> Self {
        Self::of(n, "s", 1_000)
    }

    pub fn minutes(n: i64) -> Self {
        Self::of(n, "m", 60_000)
    }

    pub fn days(n: i64) -> Self {
        Self::of(n, "d", 86_400_000)
    }

    /// In milliseconds (never negative).
    pub fn ms(&self) -> i64 {
        self.ms
    }

    pub fn duration(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::try_from(self.ms).unwrap_or(0))
    }
}

impl std::str::FromStr for ConfigDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Ok(Self {
            ms: parse_duration_ms(text)?,
            text: text.to_string(),
        })
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The caller (toml) adds the setting's name to the message.
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Parses "250ms", "90s", "15m", "1h", "7d", "0" into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{t:?} needs a unit: ms, s, m, h or d (e.g. 90d)"))?;
    let (num, unit) = t.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{t:?} is not a duration like 30m, 12h or 90d"))?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{t:?} has unknown unit {unit:?}; use ms, s, m, h or d"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{t:?} is too long"))
}

fn set_path(table: &mut toml::Table, path: &[String], raw: &str) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("{p} is not a section"))?;
    }
    cur.insert(last.clone(), guess_value(raw));
    Ok(())
}

/// Environment values are text; numbers and booleans are recognised so `node_id=2` works.
fn guess_value(raw: &str) -> toml::Value {
    // A TOML array, e.g. `trusted_proxies=["10.0.0.5/32"]`.
    if raw.trim_start().starts_with('[') {
        if let Ok(mut t) = format!("v = {raw}").parse::<toml::Table>() {
            if let Some(v) = t.remove("v") {
                return v;
            }
        }
    }
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback() {
        let c = Config::load_with_env(None, &[]).expect("defaults load");
        assert!(c.listen_addr.ip().is_loopback());
        assert!(c.admin_listen_addr.ip().is_loopback());
        assert_eq!(c.server_host_port(), ("127.0.0.1".to_string(), 8080));
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "server_url = \"https://login.example.com\"\nnode_id = 3\n[derp]\nregion_id = 901\n",
        )
        .expect("write");
        let env = vec![
            ("HYDRASCALE_NODE_ID".to_string(), "7".to_string()),
            ("HYDRASCALE_DERP__REGION_CODE".to_string(), "x".to_string()),
        ];
        let c = Config::load_with_env(Some(&f), &env).expect("load");
        assert_eq!(c.node_id, 7);
        assert_eq!(c.derp.region_id, 901);
        assert_eq!(c.derp.region_code, "x");
        assert_eq!(c.server_host_port(), ("login.example.com".to_string(), 443));
    }

    #[test]
    fn trusted_proxies_and_limits_are_set_from_flags() {
        let mut c = Config::default();
        c.set("trusted_proxies", r#"["10.0.0.5/32", "2001:db8::/64"]"#)
            .expect("a TOML array");
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(c.trusted_proxies[0].contains(&"10.0.0.5".parse::<std::net::IpAddr>().unwrap()));
        assert!(c.set("trusted_proxies", r#"["not a range"]"#).is_err());
        c.set("limits.max_connections_per_address", "0")
            .expect("0 = off");
        assert_eq!(c.limits.max_connections_per_address, 0);
        let err = c
            .set("limits.max_pending_logins_per_address", "0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn shipped_example_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/hydrascale.example.toml");
        let c = Config::load_with_env(Some(&path), &[]).expect("example loads");
        assert_eq!(
            c,
            Config::default(),
            "deploy/hydrascale.example.toml drifted from the defaults"
        );
    }

    #[test]
    fn packaged_config_uses_the_units_state_directory() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/debian/config.toml");
        let c = Config::load_with_env(Some(&path), &[]).expect("packaged config loads");
        // The systemd unit's StateDirectory, the only writable place in its sandbox.
        assert_eq!(c.data_dir, Path::new("/var/lib/hydrascale"));
        assert_eq!(
            Config {
                data_dir: Config::default().data_dir,
                ..c
            },
            Config::default(),
            "deploy/debian/config.toml differs from the defaults in more than data_dir"
        );
    }

    #[test]
    fn prefixes_are_configurable_and_checked() {
        let mut c = Config::default();
        c.set("prefixes.v4", "100.70.0.0/16")
            .expect("a CGNAT subset is accepted");
        assert_eq!(c.prefixes.v4.to_string(), "100.70.0.0/16");
        let env = vec![(
            "HYDRASCALE_PREFIXES__V6".to_string(),
            "fd7a:115c:a1e0:1::/64".to_string(),
        )];
        let c = Config::load_with_env(None, &env).expect("load");
        assert_eq!(c.prefixes.v6.to_string(), "fd7a:115c:a1e0:1::/64");
        let mut c = Config::default();
        let err = c.set("prefixes.v4", "10.0.0.0/8").unwrap_err().to_string();
        assert!(
            err.contains("prefixes.v4") && err.contains("100.64.0.0/10"),
            "{err}"
        );
        let err = c.set("prefixes.v6", "fd00::/8").unwrap_err().to_string();
        assert!(err.contains("prefixes.v6"), "{err}");
        let err = c
            .set("prefixes.v4", "not-a-prefix")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prefixes.v4"), "{err}");
    }

    #[test]
    fn cluster_peers_are_parsed_and_checked() {
        let mut c = Config::default();
        c.set("cluster.tls_dir", "certs/replica-1")
            .expect("a TLS dir");
        c.set(
            "cluster.peers",
            "1=127.0.0.1:50444, 2=127.0.0.2:50444,3=[::1]:7",
        )
        .expect("a peer list");
        let peers = c.cluster.peer_list().expect("parsed");
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[&3], "[::1]:7");
        for bad in ["1=nohost", "x=1.2.3.4:5", "1=a:1,1=b:2", "2=127.0.0.1:1"] {
            let err = c.set("cluster.peers", bad).unwrap_err().to_string();
            assert!(err.contains("cluster.peers"), "{bad}: {err}");
        }
        let err = c.set("cluster.join", "true").unwrap_err().to_string();
        assert!(err.contains("cluster.join"), "{err}");
        let err = c
            .set("cluster.isolation_timeout", "10")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster.isolation_timeout"), "{err}");
    }

    #[test]
    fn raft_timings_are_configurable_and_checked() {
        let mut c = Config::default();
        assert_eq!(c.cluster.election_timeout_ms(), (200, 400));
        assert_eq!(c.cluster.heartbeat_ms(), 100);
        c.set("cluster.election_timeout", "1500ms").expect("1500ms");
        c.set("cluster.heartbeat_interval", "500ms").expect("500ms");
        assert_eq!(c.cluster.election_timeout_ms(), (1500, 3000));
        assert_eq!(c.cluster.heartbeat_ms(), 500);
        // Heartbeats must come at least twice per election timeout.
        let err = c
            .set("cluster.election_timeout", "900ms")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster.election_timeout"), "{err}");
        let err = c
            .set("cluster.heartbeat_interval", "5ms")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster.heartbeat_interval"), "{err}");
        // A replica must not give up its clients before an election could have ended.
        let err = c
            .set("cluster.election_timeout", "5s")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster.isolation_timeout"), "{err}");
        c.set("cluster.isolation_timeout", "20s").expect("20s");
        c.set("cluster.election_timeout", "5s").expect("5s");
        assert_eq!(c.cluster.election_timeout_ms(), (5000, 10000));
    }

    #[test]
    fn oidc_settings_are_checked() {
        let load = |toml: &str| {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("c.toml");
            std::fs::write(&p, toml).expect("write");
            Config::load_with_env(Some(&p), &[])
        };
        let ok = load(
            "[oidc]\nissuer = \"https://idp.example\"\nclient_id = \"h\"\nclient_secret = \"s\"\n",
        )
        .expect("valid");
        assert_eq!(ok.oidc.scopes, vec!["openid", "profile", "email"]);
        for local in [
            "http://127.0.0.1:9000",
            "http://127.8.0.1/realms/x",
            "http://localhost",
            "http://[::1]:8443/",
        ] {
            load(&format!(
                "[oidc]\nissuer = \"{local}\"\nclient_id = \"h\"\nclient_secret = \"s\"\n"
            ))
            .unwrap_or_else(|e| panic!("{local}: {e}"));
        }
        for (toml, key) in [
            ("[oidc]\nissuer = \"idp.example\"", "oidc.issuer"),
            (
                "[oidc]\nissuer = \"http://idp.example\"\nclient_id = \"h\"\nclient_secret = \"s\"",
                "oidc.issuer",
            ),
            (
                "[oidc]\nissuer = \"http://127.0.0.1.evil.example/\"\nclient_id = \"h\"\nclient_secret = \"s\"",
                "oidc.issuer",
            ),
            (
                "[oidc]\nissuer = \"http://localhost@evil.example\"\nclient_id = \"h\"\nclient_secret = \"s\"",
                "oidc.issuer",
            ),
            ("[oidc]\nissuer = \"https://i\"\nclient_secret = \"s\"", "oidc.client_id"),
            ("[oidc]\nissuer = \"https://i\"\nclient_id = \"h\"", "oidc.client_secret"),
            (
                "[oidc]\nissuer = \"https://i\"\nclient_id = \"h\"\nclient_secret = \"s\"\nscopes = [\"email\"]",
                "oidc.scopes",
            ),
        ] {
            let err = load(toml).expect_err(toml).to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn dns_settings_are_checked() {
        let load = |toml: &str| {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("c.toml");
            std::fs::write(&p, toml).expect("write");
            Config::load_with_env(Some(&p), &[])
        };
        let c = load(
            r#"
[dns]
nameservers = ["1.1.1.1", "[2606:4700::1111]:53", "https://dns.example/dns-query"]
search_domains = ["corp.example."]
extra_records = [{ name = "grafana.hydrascale.internal", type = "A", value = "100.64.0.9" }]
[dns.split]
"corp.example" = ["10.0.0.53"]
"local.test" = []
"#,
        )
        .expect("valid dns section");
        assert_eq!(c.dns.nameservers.len(), 3);
        assert_eq!(c.dns.split["local.test"], Vec::<String>::new());
        for (bad, key) in [
            ("[dns]\nnameservers = [\"dns.google\"]", "dns.nameservers"),
            ("[dns.split]\n\"bad domain\" = []", "dns.split"),
            ("[dns]\nsearch_domains = [\"a..b\"]", "dns.search_domains"),
            (
                "[dns]\nextra_records = [{ name = \"x.test\", type = \"A\", value = \"fd7a::1\" }]",
                "dns.extra_records",
            ),
            (
                "[dns]\nextra_records = [{ name = \"x.test\", type = \"MX\", value = \"1\" }]",
                "dns.extra_records",
            ),
        ] {
            let err = load(bad).expect_err(bad).to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let env = vec![("HYDRASCALE_SERVER_URL".to_string(), "login".to_string())];
        let err = Config::load_with_env(None, &env).unwrap_err().to_string();
        assert!(err.contains("server_url"), "{err}");
        let mut c = Config::default();
        let err = c.set("node_expiry", "5 weeks").unwrap_err().to_string();
        assert!(err.contains("node_expiry"), "{err}");
        c.set("derp.region_id", "950").expect("set");
        assert_eq!(c.derp.region_id, 950);
    }

    /// Settings that belong together may come from separate `--set` flags: they are
    /// checked once all are in, not one at a time.
    #[test]
    fn overrides_are_checked_together() {
        let sets: Vec<(String, String)> = [
            ("node_id", "2"),
            ("cluster.peers", "1=127.0.0.1:1,2=127.0.0.1:2"),
            ("cluster.tls_ca_file", "c/ca.pem"),
            ("cluster.tls_cert_file", "c/r.pem"),
            ("cluster.tls_key_file", "c/r.key"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Config::load_with(None, &[], &sets).expect("valid together");
        assert_eq!(c.node_id, 2);
        assert!(c.cluster.tls_files().is_some());
        // Still checked: one missing is refused, naming what to do.
        let err = Config::load_with(None, &[], &sets[..4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster.tls_ca_file"), "{err}");
    }

    /// A cluster never starts with Raft in plaintext unless told to, loudly; a replica
    /// alone needs nothing (it makes its own CA).
    #[test]
    fn a_cluster_needs_raft_tls() {
        let peers = (
            "cluster.peers".to_string(),
            "1=127.0.0.1:1,2=127.0.0.1:2".to_string(),
        );
        let err = Config::load_with(None, &[], std::slice::from_ref(&peers))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mutual TLS") && err.contains("cluster certs"),
            "{err}"
        );
        let join = ("cluster.join".to_string(), "true".to_string());
        assert!(Config::load_with(None, &[], &[join]).is_err());
        let plain = ("cluster.insecure_plaintext".to_string(), "true".to_string());
        Config::load_with(None, &[], &[peers.clone(), plain.clone()])
            .expect("explicitly plaintext");
        let dir = ("cluster.tls_dir".to_string(), "certs/replica-1".to_string());
        Config::load_with(None, &[], &[peers, dir.clone()]).expect("a TLS directory");
        let err = Config::load_with(None, &[], &[dir, plain])
            .unwrap_err()
            .to_string();
        assert!(err.contains("insecure_plaintext"), "{err}");
        Config::load_with(None, &[], &[]).expect("one replica on defaults");
    }

    #[test]
    fn tls_settings_are_checked() {
        let load = |toml: &str| {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("c.toml");
            std::fs::write(&p, toml).expect("write");
            Config::load_with_env(Some(&p), &[])
        };
        let https = "server_url = \"https://login.example.com\"\n";
        let files = load(&format!(
            "{https}[tls]\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/k.pem\"\n"
        ))
        .expect("certificate files");
        assert!(files.tls.enabled() && !files.tls.acme());
        assert_eq!(
            files.tls.cert_name("login.example.com").as_deref(),
            Some("login.example.com")
        );
        let acme = load(&format!(
            "{https}[tls]\nacme_hostname = \"Login.Example.com\"\n"
        ))
        .expect("ACME");
        assert!(acme.tls.enabled() && acme.tls.acme() && !acme.tls.http01());
        assert_eq!(acme.tls.acme_directory, LETS_ENCRYPT_DIRECTORY);
        assert_eq!(acme.tls.renew_before_ms(), 30 * 86_400_000);
        assert_eq!(
            acme.tls.cert_name("x").as_deref(),
            Some("login.example.com")
        );
        assert_eq!(Config::default().tls.cert_name("x"), None);
        for (toml, key) in [
            (
                format!("{https}[tls]\ncert_file = \"/c\"\n"),
                "tls.cert_file",
            ),
            (
                format!("{https}[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\nacme_hostname = \"login.example.com\"\n"),
                "tls.acme_hostname",
            ),
            (
                "[tls]\nacme_hostname = \"login.example.com\"\n".to_string(),
                "server_url",
            ),
            (
                format!("{https}[tls]\nacme_hostname = \"other.example.com\"\n"),
                "tls.acme_hostname",
            ),
            (
                "server_url = \"https://10.0.0.1\"\n[tls]\nacme_hostname = \"10.0.0.1\"\n".to_string(),
                "tls.acme_hostname",
            ),
            (
                format!("{https}[tls]\nacme_hostname = \"login.example.com\"\nacme_challenge = \"dns-01\"\n"),
                "tls.acme_challenge",
            ),
            (
                format!("{https}[tls]\nacme_hostname = \"login.example.com\"\nacme_directory = \"http://ca.example/dir\"\n"),
                "tls.acme_directory",
            ),
            (
                format!("{https}[tls]\nacme_hostname = \"login.example.com\"\nacme_renew_before = \"10s\"\n"),
                "tls.acme_renew_before",
            ),
            (
                "[tls]\nhttp_listen_addr = \"127.0.0.1:80\"\n".to_string(),
                "tls.http_listen_addr",
            ),
        ] {
            let err = load(&toml).expect_err(&toml).to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert!(parse_duration_ms("2w").is_err());
        assert!(parse_duration_ms("h").is_err());
        let d: ConfigDuration = "90d".parse().expect("90d");
        assert_eq!(d.ms(), 90 * 86_400_000);
        assert_eq!(ConfigDuration::minutes(30).ms(), 1_800_000);
        assert_eq!(ConfigDuration::seconds(8).duration().as_secs(), 8);
        let defaults = Config::default();
        assert_eq!(defaults.node_expiry_ms(), None);
        assert_eq!(defaults.tls.renew_before_ms(), 30 * 86_400_000);
        // Written back as given, so `Config::set` round-trips every other duration.
        let mut c = Config::default();
        c.set("node_expiry", "90d").expect("90d");
        c.set("derp.region_id", "950").expect("set");
        assert_eq!(c.node_expiry.text, "90d");
        assert_eq!(c.node_expiry_ms(), Some(90 * 86_400_000));
        // A bad value names the setting when it comes from a file, too.
        let dir = std::env::temp_dir().join(format!("hs-durations-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("config.toml");
        for (text, key) in [
            ("node_expiry = \"5w\"\n", "node_expiry"),
            (
                "[cluster]\nisolation_timeout = \"10\"\n",
                "cluster.isolation_timeout",
            ),
            (
                "[tls]\nacme_renew_before = \"30 days\"\n",
                "tls.acme_renew_before",
            ),
            (
                "ephemeral_inactivity_timeout = 30\n",
                "ephemeral_inactivity_timeout",
            ),
        ] {
            std::fs::write(&file, text).expect("write config");
            let err = Config::load_with_env(Some(&file), &[])
                .expect_err(text)
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
