//! Raft traffic over gRPC: the server side (`server`) and the outgoing connections
//! openraft uses to reach other replicas (`client`).

pub mod client;
pub mod compact;
pub mod server;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("hydrascale.raft.v1");
}

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// When this node last heard from its peers: as a leader, the last answered AppendEntries
/// per follower; as a follower, the last AppendEntries from a leader. openraft 0.9 does
/// not expose either, and both tell whether a replica is cut off.
#[derive(Clone, Default)]
pub struct Contacts {
    inner: Arc<Mutex<ContactTimes>>,
}

#[derive(Default)]
struct ContactTimes {
    answered: HashMap<u64, Instant>,
    from_leader: Option<Instant>,
    /// The commit index the leader announced in its latest accepted append.
    leader_commit: Option<u64>,
}

impl Contacts {
    fn lock(&self) -> std::sync::MutexGuard<'_, ContactTimes> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn peer_answered(&self, peer: u64) {
        self.lock().answered.insert(peer, Instant::now());
    }

    pub fn leader_appended(&self, leader_commit: Option<u64>) {
        let mut c = self.lock();
        c.from_leader = Some(Instant::now());
        if leader_commit.is_some() {
            c.leader_commit = leader_commit;
        }
    }

    pub fn leader_commit(&self) -> Option<u64> {
        self.lock().leader_commit
    }

    pub fn last_answer(&self, peer: u64) -> Option<Instant> {
        self.lock().answered.get(&peer).copied()
    }

    pub fn last_from_leader(&self) -> Option<Instant> {
        self.lock().from_leader
    }
}

/// The answer of a leader to a forwarded client write.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardResult {
    Ok { index: u64, data: Vec<u8> },
    NotLeader { leader: Option<u64> },
    Failed(String),
}
