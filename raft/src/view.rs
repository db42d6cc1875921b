//! The leader's view of replication (`LeaderView`): per member, the highest log index it
//! holds and how long ago it last answered. Only the leader knows either; a follower asked
//! for `cluster status` gets it from the leader over the Raft channel (mutual TLS, current
//! members only), so no API key has to travel between replicas.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use openraft::{RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};

use crate::network::Contacts;

/// What the leader knows of every member's replication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaderView {
    pub leader: u64,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub members: BTreeMap<u64, MemberProgress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberProgress {
    /// The highest log index the member is known to hold.
    pub matched_index: Option<u64>,
    /// Milliseconds since it last answered an append; `None` for the leader itself, and
    /// for a member that never answered this leader.
    pub answered_ms_ago: Option<u64>,
    /// It answered within a leader lease (heartbeats go every fraction of one), or it is
    /// the leader: otherwise it is down or cut off.
    pub answering: bool,
}

/// The view of the leader whose metrics these are; `None` if it is not the leader.
pub(crate) fn of_leader(
    m: &RaftMetrics<u64, openraft::BasicNode>,
    contacts: &Contacts,
    lease: Duration,
) -> Option<LeaderView> {
    if m.state != ServerState::Leader {
        return None;
    }
    let matched = m.replication.clone().unwrap_or_default();
    let now = Instant::now();
    let last_log_index = m.last_log_index;
    let members = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, _)| {
            let progress = if *id == m.id {
                MemberProgress {
                    matched_index: last_log_index,
                    answered_ms_ago: None,
                    answering: true,
                }
            } else {
                let age = contacts.last_answer(*id).map(|t| now - t);
                MemberProgress {
                    matched_index: matched.get(id).copied().flatten().map(|l| l.index),
                    answered_ms_ago: age.map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
                    answering: age.is_some_and(|a| a <= lease),
                }
            };
            (*id, progress)
        })
        .collect();
    Some(LeaderView {
        leader: m.id,
        term: m.current_term,
        last_log_index,
        members,
    })
}
