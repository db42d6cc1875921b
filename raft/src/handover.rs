//! Leadership handover (`hydrascale cluster transfer-leader`).
//!
//! openraft 0.9 cannot hand leadership over, and an election started on another voter
//! fails while the voters' leader lease lasts (the longest election timeout since they
//! last heard from the leader). So the leader holds back new proposals, makes sure the
//! target has every entry, and stops its heartbeats; the target starts an election as
//! soon as the lease has run out. Meanwhile the leader and the target refuse pre-votes
//! (`prevote`), so no other voter may campaign: with election timeouts shorter than
//! the target's wait, another voter's timer could fire first. Writes wait for the
//! handover (about one lease) and then go to the new leader.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{RaftError, RaftNode, TypeConfig};

/// Lets proposals through, except during a handover. Every proposal on this node holds
/// it shared while openraft appends and commits; a handover holds it exclusively.
#[derive(Clone, Default)]
pub(crate) struct WriteGate {
    lock: Arc<RwLock<()>>,
    /// While a handover is under way, on the leader handing over and on its target: why
    /// this replica refuses pre-votes, and until when. With election timeouts shorter
    /// than the target's wait (a lease plus 250 ms), a third voter's timer could otherwise
    /// fire first: the leader, its heartbeats off, and the target, silent like any
    /// follower, would both have granted it.
    handing_over: Arc<Mutex<Option<(Instant, String)>>>,
}

impl WriteGate {
    pub(crate) async fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().await
    }

    async fn close(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().await
    }

    fn handing_over(&self) -> std::sync::MutexGuard<'_, Option<(Instant, String)>> {
        self.handing_over.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuse pre-votes until `until`, saying `why`.
    pub(crate) fn refuse_prevotes(&self, until: Instant, why: String) {
        *self.handing_over() = Some((until, why));
    }

    fn allow_prevotes(&self) {
        *self.handing_over() = None;
    }

    /// Why this replica refuses pre-votes now because of a handover, if it does.
    pub(crate) fn prevote_refusal(&self) -> Option<String> {
        self.handing_over()
            .as_ref()
            .filter(|(until, _)| Instant::now() < *until)
            .map(|(_, why)| why.clone())
    }
}

/// Lets pre-votes through again however the handover ends.
struct PrevotesRefused<'a>(&'a WriteGate);

impl Drop for PrevotesRefused<'_> {
    fn drop(&mut self) {
        self.0.allow_prevotes();
    }
}

/// Turns the leader's heartbeats back on however the handover ends; they only matter
/// while this node leads, and it may lead again later.
struct HeartbeatsOff<'a>(&'a openraft::Raft<TypeConfig>);

impl<'a> HeartbeatsOff<'a> {
    fn new(raft: &'a openraft::Raft<TypeConfig>) -> Self {
        raft.runtime_config().heartbeat(false);
        Self(raft)
    }
}

impl Drop for HeartbeatsOff<'_> {
    fn drop(&mut self) {
        self.0.runtime_config().heartbeat(true);
    }
}

/// How long a handover may wait for writes in flight, and for the target to catch up.
const SETTLE: Duration = Duration::from_secs(5);

impl RaftNode {
    /// As leader: hands leadership to voter `to` and returns once `to` leads, with how
    /// long proposals were held back. Another voter's election timer cannot win the race
    /// (see the module comment); if the target is down, this fails and the cluster elects
    /// whoever is first, as after a leader crash.
    pub async fn transfer_leader(&self, to: u64) -> Result<Duration, RaftError> {
        let inner = &self.inner;
        let m = inner.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Err(RaftError::NotLeader {
                leader: m.current_leader,
            });
        }
        if to == inner.id {
            return Ok(Duration::ZERO);
        }
        let membership = m.membership_config.membership();
        let Some(addr) = membership
            .nodes()
            .find(|(id, _)| **id == to)
            .map(|(_, n)| n.addr.clone())
        else {
            return Err(RaftError::Unsupported(format!(
                "replica {to} is not a member of this cluster; see `hydrascale cluster status`"
            )));
        };
        if !membership.voter_ids().any(|v| v == to) {
            return Err(RaftError::Unsupported(format!(
                "replica {to} is a learner and cannot lead; promote it first (`hydrascale cluster promote --id {to}`)"
            )));
        }

        let started = Instant::now();
        let _closed = tokio::time::timeout(SETTLE, inner.gate.close())
            .await
            .map_err(|_| {
                RaftError::NoQuorum(format!(
                    "writes in flight did not finish within {SETTLE:?}, so leadership stays here"
                ))
            })?;
        // Voters refuse a candidate whose log is shorter than theirs.
        let mut metrics = inner.raft.metrics();
        let caught_up = tokio::time::timeout(SETTLE, async {
            loop {
                let done = {
                    let m = metrics.borrow_and_update();
                    let matched = m
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&to).cloned().flatten())
                        .map(|l| l.index);
                    matched.is_some() && matched == m.last_log_index
                };
                if done || metrics.changed().await.is_err() {
                    return done;
                }
            }
        })
        .await;
        if caught_up != Ok(true) {
            return Err(RaftError::Raft(format!(
                "replica {to} did not catch up with the log within {SETTLE:?}, so leadership stays here; check its lag with `hydrascale cluster status`"
            )));
        }

        let delay = inner.leader_lease + Duration::from_millis(250);
        inner.gate.refuse_prevotes(
            Instant::now() + delay + Duration::from_secs(4),
            format!(
                "replica {} is handing leadership over to replica {to}",
                inner.id
            ),
        );
        let _refusing = PrevotesRefused(&inner.gate);
        let _quiet = HeartbeatsOff::new(&inner.raft);
        inner
            .forwarder
            .timeout_now(&addr, to, inner.id, delay)
            .await
            .map_err(|message| RaftError::Network {
                target: to,
                message,
            })?;
        let waited = tokio::time::timeout(delay + Duration::from_secs(3), async {
            loop {
                let leader = metrics.borrow_and_update().current_leader;
                if matches!(leader, Some(l) if l != inner.id) {
                    return leader;
                }
                if metrics.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match waited {
            Ok(Some(l)) if l == to => Ok(started.elapsed()),
            Ok(Some(l)) => Err(RaftError::Raft(format!(
                "replica {l} won the election instead of {to}; run the transfer again against {l}"
            ))),
            _ => Err(RaftError::Raft(format!(
                "replica {to} did not take over within {:?}; check that it is running and reachable (`hydrascale cluster status`)",
                delay + Duration::from_secs(3)
            ))),
        }
    }
}

/// The target's side: after `delay`, campaign, unless `leader` is no longer the leader
/// this node follows (the handover was overtaken by events).
pub(crate) fn timeout_now(raft: &openraft::Raft<TypeConfig>, leader: u64, delay: Duration) {
    let raft = raft.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let m = raft.metrics().borrow().clone();
        if m.current_leader == Some(leader) && m.state == ServerState::Follower {
            tracing::info!(leader, "leadership handed over: starting an election");
            if let Err(e) = raft.trigger().elect().await {
                tracing::warn!(error = %e, "starting the handover election");
            }
        }
    });
}
