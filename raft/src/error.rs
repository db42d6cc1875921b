//! `RaftError`: every way replication can fail, said so an operator knows what to do.

#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("this replica is not the leader and the leader is unknown{}; retry once an election has finished", .leader.map(|l| format!(" (last known leader: {l})")).unwrap_or_default())]
    NotLeader { leader: Option<u64> },
    #[error("no quorum: {0}; check that a majority of replicas is running and reachable")]
    NoQuorum(String),
    #[error("leader {leader} was lost while this write was in flight (an election is under way); the write may or may not have been applied: retry it")]
    LeaderLost { leader: u64 },
    #[error("storage error: {0}; check the data directory's disk and permissions")]
    Storage(String),
    #[error("cannot open the Raft store in {path}: {message}{}", open_hint(.message))]
    Open { path: String, message: String },
    #[error("network error talking to replica {target}: {message}; check that it is running and reachable, and that both replicas have certificates from the same cluster CA (cluster.tls_*) or neither has")]
    Network { target: u64, message: String },
    #[error("Raft TLS settings: {0}; check cluster.tls_ca_file, cluster.tls_cert_file and cluster.tls_key_file")]
    Tls(String),
    #[error("cannot listen for Raft traffic on {addr}: {message}")]
    Bind { addr: String, message: String },
    #[error("raft: {0}")]
    Raft(String),
    #[error("{0}")]
    Unsupported(String),
}

impl From<RaftError> for tonic::Status {
    fn from(e: RaftError) -> Self {
        let msg = e.to_string();
        match e {
            RaftError::NotLeader { .. }
            | RaftError::NoQuorum(_)
            | RaftError::LeaderLost { .. }
            | RaftError::Network { .. } => tonic::Status::unavailable(msg),
            RaftError::Unsupported(_) => tonic::Status::unimplemented(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

pub(crate) fn storage<E: std::fmt::Display>(e: E) -> RaftError {
    RaftError::Storage(e.to_string())
}

/// What to do about a store that would not open, from what RocksDB said.
fn open_hint(message: &str) -> &'static str {
    if message.contains("No space left") {
        "; the disk is full: free space on it (RocksDB replays its log into a new file when it opens) and start again"
    } else if message.contains("lock file") || message.contains("/LOCK") {
        "; is another hydrascale process using this data directory?"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::RaftError;

    #[test]
    fn an_unopenable_store_says_what_to_do_about_the_actual_cause() {
        let open = |message: &str| {
            RaftError::Open {
                path: "/var/lib/hydrascale/raft".into(),
                message: message.into(),
            }
            .to_string()
        };
        let full = open("IO error: No space left on device: While appending to file: /var/lib/hydrascale/raft/000008.sst: No space left on device");
        assert!(full.ends_with("the disk is full: free space on it (RocksDB replays its log into a new file when it opens) and start again"), "{full}");
        assert!(!full.contains("another hydrascale process"), "{full}");
        let locked = open("IO error: While lock file: /var/lib/hydrascale/raft/LOCK: Resource temporarily unavailable");
        assert!(
            locked.ends_with("is another hydrascale process using this data directory?"),
            "{locked}"
        );
        let other = open("Corruption: bad block");
        assert!(other.ends_with("Corruption: bad block"), "{other}");
    }
}
