//! `[cluster]`: the replicas, how they find and authenticate each other, and when a
//! replica cut off from the quorum stops serving.

use serde::{Deserialize, Serialize};

use super::ConfigDuration;

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
