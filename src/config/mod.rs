//! Server configuration: the file format, embedded defaults, and environment overrides.
//!
//! Every key can come from the TOML file, from an environment variable
//! (`HYDRASCALE_<KEY>`, nested keys joined by `__`, e.g. `HYDRASCALE_DERP__REGION_ID`),
//! or from `hydrascale serve` flags, in increasing order of precedence. One file per
//! section (`[tls]`, `[oidc]`, ...); the whole file, its loading and checks live here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod cluster;
mod derp;
mod dns;
mod duration;
mod limits;
mod oidc;
#[cfg(test)]
mod tests;
mod tls;

pub use cluster::ClusterConfig;
pub use derp::DerpConfig;
pub use dns::{DnsConfig, DnsRecord};
pub use duration::{parse_duration_ms, ConfigDuration};
pub use limits::LimitsConfig;
pub use oidc::OidcConfig;
pub use tls::{TlsConfig, LETS_ENCRYPT_DIRECTORY};

use dns::valid_domain;

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
    /// DNS settings the founding replica seeds the tailnet's replicated ones with.
    pub dns: DnsConfig,
    /// headscale's policy file mode: the leader follows this file and replicates each
    /// valid version of it as the policy (see docs/policy.md).
    pub policy_path: Option<PathBuf>,
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
            policy_path: None,
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
