//! Pre-vote: when a voter may campaign.
//!
//! openraft 0.9 has no pre-vote. A follower that stops hearing from its leader campaigns,
//! and each campaign raises its term, also when it alone is cut off. Once the partition
//! heals, its answer to the leader's next append carries the higher term, the leader steps
//! down, and every write waits for an election: seconds, since the other voters refuse to
//! vote while their leader lease lasts. So each voter lets openraft campaign
//! (`enable_elect`) only while a majority of the voters, itself included, have lost their
//! leader too. The others say so through the `PreVote` call, answered by [`refusal`].
//! Leadership handover (`handover`) starts its election directly and is not gated.

use std::sync::Weak;
use std::time::Duration;

use openraft::{BasicNode, RaftMetrics, ServerState};
use tokio::task::JoinSet;

use crate::network::proto::raft_service_client::RaftServiceClient;
use crate::network::proto::PreVoteRequest;
use crate::network::Contacts;
use crate::Inner;

/// Why this replica (whose current metrics are `m`) would take no part in an election
/// now, or `None` if it would: it leads and hears from a majority, or it heard from a
/// leader less than `lease` ago.
pub(crate) fn refusal(
    m: &RaftMetrics<u64, BasicNode>,
    contacts: &Contacts,
    lease: Duration,
) -> Option<String> {
    if m.state == ServerState::Leader {
        return crate::quorum_contact_age(m, contacts)
            .filter(|age| *age < lease)
            .map(|age| {
                format!(
                    "replica {} leads and heard from a majority {age:.1?} ago",
                    m.id
                )
            });
    }
    contacts
        .last_from_leader()
        .map(|t| t.elapsed())
        .filter(|age| *age < lease)
        .map(|age| {
            format!(
                "replica {} heard from its leader ({:?}) {age:.1?} ago",
                m.id, m.current_leader
            )
        })
}

/// Runs until the node is dropped: every `tick`, decides whether openraft may campaign,
/// asking the other voters (each within `ask_within`) once this replica has not heard from
/// a leader for a leader lease.
pub(crate) async fn gate(node: Weak<Inner>, tick: Duration, ask_within: Duration) {
    let mut last: Option<Decision> = None;
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(inner) = node.upgrade() else { return };
        let Some((now, why)) = decide(&inner, ask_within).await else {
            continue;
        };
        if last.is_none_or(|l| l.allow != now.allow) {
            inner.raft.runtime_config().elect(now.allow);
        }
        // Following a leader is the normal state, and not news at start.
        if last != Some(now) && (last.is_some() || !now.following) {
            if now.allow {
                tracing::info!(node = inner.id, "leader lost; may campaign: {why}");
            } else {
                tracing::info!(node = inner.id, "not campaigning: {why}");
            }
        }
        last = Some(now);
    }
}

#[derive(Clone, Copy, PartialEq)]
struct Decision {
    allow: bool,
    /// Heard from a leader within a lease (no one was asked).
    following: bool,
}

/// Whether `inner` may campaign now, and why; `None` when the question does not arise
/// (it leads, or it is a learner).
async fn decide(inner: &Inner, ask_within: Duration) -> Option<(Decision, String)> {
    let m = inner.raft.metrics().borrow().clone();
    if m.state == ServerState::Leader {
        return None;
    }
    let membership = m.membership_config.membership();
    let voters: Vec<(u64, String)> = membership
        .voter_ids()
        .filter_map(|id| membership.get_node(&id).map(|n| (id, n.addr.clone())))
        .collect();
    if !voters.iter().any(|(id, _)| *id == inner.id) {
        return None;
    }
    // What it would answer another candidate holds for itself too: not leading, it refuses
    // only while it hears from a leader.
    if let Some(why) = refusal(&m, &inner.contacts, inner.leader_lease) {
        let d = Decision {
            allow: false,
            following: true,
        };
        return Some((d, why));
    }
    let needed = voters.len() / 2 + 1;
    let mut granted = 1;
    let mut refused = Vec::new();
    let mut asks = JoinSet::new();
    for (id, addr) in voters.into_iter().filter(|(id, _)| *id != inner.id) {
        let channel = match inner.forwarder.channel(&addr, id) {
            Ok(c) => c,
            Err(e) => {
                refused.push(format!("replica {id}: {e}"));
                continue;
            }
        };
        let candidate = inner.id;
        asks.spawn(async move {
            let mut client = RaftServiceClient::new(channel);
            let ask = client.pre_vote(PreVoteRequest { candidate });
            let answer = match tokio::time::timeout(ask_within, ask).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    if r.granted {
                        Ok(())
                    } else {
                        Err(r.reason)
                    }
                }
                // A replica of a version without pre-vote: it would vote as it always did.
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Ok(()),
                Ok(Err(s)) => Err(format!("unreachable: {}", s.message())),
                Err(_) => Err(format!("no answer within {ask_within:?}")),
            };
            (id, answer)
        });
    }
    while granted < needed {
        let Some(done) = asks.join_next().await else {
            break;
        };
        match done {
            Ok((_, Ok(()))) => granted += 1,
            Ok((id, Err(why))) => refused.push(format!("replica {id}: {why}")),
            Err(e) => refused.push(e.to_string()),
        }
    }
    asks.abort_all();
    let allow = granted >= needed;
    let d = Decision {
        allow,
        following: false,
    };
    if allow {
        Some((
            d,
            format!("{granted} of the {needed} voters needed lost it too"),
        ))
    } else {
        Some((
            d,
            format!(
                "only {granted} of the {needed} voters needed would vote ({})",
                refused.join("; ")
            ),
        ))
    }
}
