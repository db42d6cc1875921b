//! Admin calls on the cluster: status (with the leader's view of every member),
//! membership changes, leadership transfer, founding a cluster (empty or from a backup),
//! snapshots and backups; and what a replication error tells the caller.

use tonic::{Request, Response, Status};

use super::{proto, Admin};
use crate::state::Command;

pub(super) async fn cluster_status(
    admin: &Admin,
    _req: Request<proto::Empty>,
) -> Result<Response<proto::ClusterStatusReply>, Status> {
    Ok(Response::new(status_view(admin).await))
}

pub(super) async fn add_learner(
    admin: &Admin,
    req: Request<proto::AddLearnerRequest>,
) -> Result<Response<proto::Empty>, Status> {
    let r = req.into_inner();
    if r.id == 0 || r.raft_addr.rsplit_once(':').is_none() {
        return Err(Status::invalid_argument(
            "give the new replica's node_id (1 or more) and its Raft address HOST:PORT",
        ));
    }
    admin.require_leader()?;
    if admin
        .db
        .raft
        .status()
        .membership
        .iter()
        .any(|m| m.0 == r.id)
    {
        return Err(Status::already_exists(format!(
            "replica {} is already a member; pick an unused node_id",
            r.id
        )));
    }
    // Returns once the learner has caught up with the log; one that cannot be reached
    // would otherwise hold the command forever.
    let catch_up = std::time::Duration::from_secs(60);
    match tokio::time::timeout(catch_up, admin.db.raft.add_learner(r.id, r.raft_addr.clone()))
        .await
    {
        Ok(res) => res.map_err(raft_status)?,
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "replica {} at {} has not caught up within {catch_up:?}: check that it is running with cluster.join = true, that {} is reachable from the leader, and that its certificate is from this cluster's CA (cluster.tls_*); it stays a learner until `hydrascale cluster remove --id {}`",
                r.id, r.raft_addr, r.raft_addr, r.id
            )))
        }
    }
    Ok(Response::new(proto::Empty {}))
}

pub(super) async fn promote(
    admin: &Admin,
    req: Request<proto::MemberIdRequest>,
) -> Result<Response<proto::Empty>, Status> {
    let id = req.into_inner().id;
    admin.require_leader()?;
    if !admin.db.raft.status().membership.iter().any(|m| m.0 == id) {
        return Err(Status::not_found(format!(
            "replica {id} is not a member; add it first with `hydrascale cluster add-learner`"
        )));
    }
    admin.db.raft.promote(id).await.map_err(raft_status)?;
    Ok(Response::new(proto::Empty {}))
}

pub(super) async fn remove_member(
    admin: &Admin,
    req: Request<proto::MemberIdRequest>,
) -> Result<Response<proto::Empty>, Status> {
    let id = req.into_inner().id;
    admin.require_leader()?;
    admin.db.raft.remove_member(id).await.map_err(raft_status)?;
    // Its relay leaves the DERP map and its nodes go offline until they reconnect.
    admin.write(Command::ForgetReplica { id }).await?;
    Ok(Response::new(proto::Empty {}))
}

pub(super) async fn transfer_leader(
    admin: &Admin,
    req: Request<proto::TransferLeaderRequest>,
) -> Result<Response<proto::TransferLeaderReply>, Status> {
    admin.require_leader()?;
    let me = admin.db.raft.node_id();
    let st = admin.db.raft.status();
    let to = match req.into_inner().to {
        0 => {
            // The voter with the most of the log loses the least time catching up.
            let matched = admin.db.raft.matched_indexes().unwrap_or_default();
            st.membership
                .iter()
                .filter(|(id, _, voter)| *voter && *id != me)
                .max_by_key(|(id, _, _)| matched.get(id).copied().flatten())
                .map(|(id, _, _)| *id)
                .ok_or_else(|| {
                    Status::failed_precondition(
                        "this replica is the only voter; promote another one first",
                    )
                })?
        }
        id => id,
    };
    let paused = admin
        .db
        .raft
        .transfer_leader(to)
        .await
        .map_err(raft_status)?;
    tracing::info!(to, paused_ms = paused.as_millis(), "leadership handed over");
    Ok(Response::new(proto::TransferLeaderReply {
        leader: to,
        paused_ms: u64::try_from(paused.as_millis()).unwrap_or(u64::MAX),
    }))
}

pub(super) async fn init_cluster(
    admin: &Admin,
    req: Request<proto::InitClusterRequest>,
) -> Result<Response<proto::InitClusterReply>, Status> {
    let r = req.into_inner();
    let me = admin.db.raft.node_id();
    if admin.db.raft.is_initialized().await.map_err(raft_status)? {
        return Err(Status::failed_precondition(
            "this replica already belongs to a cluster; `cluster init` and `cluster restore` only work on a new replica started with cluster.join = true (and an empty data directory)",
        ));
    }
    if !admin.may_init {
        return Err(Status::failed_precondition(
            "this replica was not started with cluster.join = true: it founds or joins the cluster named by cluster.peers by itself",
        ));
    }
    if r.peers.contains_key(&me) || r.peers.contains_key(&0) {
        return Err(Status::invalid_argument(format!(
            "--peers lists the other voters only (this replica is {me}); node_ids start at 1"
        )));
    }
    if let Some((id, addr)) = r.peers.iter().find(|(_, a)| a.rsplit_once(':').is_none()) {
        return Err(Status::invalid_argument(format!(
            "peer {id}: {addr:?} is not a Raft address HOST:PORT"
        )));
    }
    // Check the backup before the cluster exists: a bad file must leave nothing behind.
    let first = if r.backup.is_empty() {
        Command::SetControlKey {
            key: crate::noise::ControlKey::generate().private_text(),
        }
    } else {
        crate::cluster::restore_command_from(&r.backup)
            .map_err(|e| Status::invalid_argument(format!("the backup: {e}")))?
    };
    let mut voters = r
        .peers
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>();
    voters.insert(me, admin.db.raft.advertise_addr().to_string());
    let count = voters.len();
    admin
        .db
        .raft
        .initialize(voters)
        .await
        .map_err(raft_status)?;
    admin.db
        .raft
        .wait_for_leader(std::time::Duration::from_secs(60))
        .await
        .map_err(|e| {
            Status::unavailable(format!(
                "{e}: the cluster is initialized with {count} voters, but a majority of them must be running (with cluster.join = true) to elect a leader; start them and the election happens by itself"
            ))
        })?;
    admin.write(first).await?;
    let t = admin.db.store.read();
    let key = t
        .control_key
        .as_ref()
        .and_then(|k| crate::noise::ControlKey::parse(k.expose()).ok())
        .map(|k| k.public_text())
        .unwrap_or_default();
    Ok(Response::new(proto::InitClusterReply {
        control_key: key,
        users: t.users.len() as u64,
        nodes: t.nodes.len() as u64,
    }))
}

pub(super) async fn snapshot(
    admin: &Admin,
    _req: Request<proto::Empty>,
) -> Result<Response<proto::Empty>, Status> {
    admin
        .db
        .raft
        .trigger_snapshot()
        .await
        .map_err(raft_status)?;
    Ok(Response::new(proto::Empty {}))
}

pub(super) async fn backup(
    admin: &Admin,
    _req: Request<proto::Empty>,
) -> Result<Response<proto::BackupReply>, Status> {
    // openraft's linearizable read only works on the leader; an empty batch written
    // through Raft works from any replica: it returns once this replica has applied
    // it, and with it every write acknowledged before this call.
    admin
        .write(Command::Batch {
            commands: Vec::new(),
        })
        .await?;
    let applied_index = admin.db.raft.status().last_applied.unwrap_or(0);
    let b = crate::cluster::encode_backup(&admin.db.store.read(), applied_index)
        .map_err(|e| Status::internal(format!("encoding the backup: {e}")))?;
    Ok(Response::new(proto::BackupReply {
        backup: b.bytes,
        applied_index,
        users: b.users,
        nodes: b.nodes,
        preauth_keys: b.preauth_keys,
    }))
}

/// Maps a replication error to what the caller (the CLI, the REST API) is told: the real
/// cause and what to do, once for every admin call. An election (the leader stopped, or
/// this replica lost it) is the common case, and it only needs a retry; the raft crate's
/// generic network hint (certificates) applies only when TLS is what failed.
pub(super) fn raft_status(e: hydrascale_raft::RaftError) -> Status {
    use hydrascale_raft::RaftError as E;
    const RETRY: &str = "retry in a few seconds";
    match e {
        E::NotLeader { leader: None } => Status::unavailable(format!(
            "no leader yet: the replicas are electing one (a replica stopped, or this one lost contact with the leader); {RETRY}"
        )),
        E::NotLeader { leader: Some(l) } => Status::unavailable(format!(
            "no leader yet: replica {l} has just stepped down and a new leader is taking over; {RETRY}"
        )),
        E::LeaderLost { leader } => Status::unavailable(format!(
            "no leader yet: leader {leader} was lost while this write was in flight, so it may or may not have been applied; check, then {RETRY}"
        )),
        E::Network { target, message } => match network_failure(&message) {
            NetworkFailure::Tls => Status::unavailable(format!(
                "replica {target} (the leader) and this replica do not accept each other's TLS ({message}): both need certificates from the same cluster CA (cluster.tls_dir, `hydrascale cluster certs`)"
            )),
            NetworkFailure::Unreachable(cause) => Status::unavailable(format!(
                "no leader yet: the leader, replica {target}, does not answer ({cause}); if it stopped, the others elect a new leader within seconds: {RETRY}. If this persists, check that replica {target} is running and reachable from this one"
            )),
        },
        E::NoQuorum(m) if m.contains("not heard from a leader") => Status::unavailable(format!(
            "no leader yet: {m} (an election is under way, or this replica is cut off from the majority); {RETRY}; if this persists, check that a majority of replicas is running and reachable"
        )),
        E::Unsupported(m) => Status::not_found(m),
        other => other.into(),
    }
}

/// Why a call to another replica failed, from the causes tonic and hyper give as text.
#[derive(Debug, PartialEq)]
enum NetworkFailure {
    /// The TLS handshake: a certificate from another CA, or another replica's.
    Tls,
    /// Nothing (or nothing sane) answers: refused, reset, timed out, gone mid-call. The
    /// first cause, shortened, for the message.
    Unreachable(String),
}

fn network_failure(message: &str) -> NetworkFailure {
    let lower = message.to_ascii_lowercase();
    if ["certificate", "tls", "handshake", "fatal alert"]
        .iter()
        .any(|w| lower.contains(w))
    {
        return NetworkFailure::Tls;
    }
    let cause = message
        .split(": ")
        .next()
        .unwrap_or(message)
        .trim()
        .to_string();
    NetworkFailure::Unreachable(cause)
}

/// This replica's Raft state, with every member's lag, last contact and whether it
/// answers as the leader sees them: this replica's own view if it leads, otherwise
/// asked of the leader over the Raft channel (mutual TLS between members; the admin
/// API over TCP would need an API key on every replica). A leader that does not answer
/// is marked down, and `note` says why the view is missing.
async fn status_view(admin: &Admin) -> proto::ClusterStatusReply {
    let st = admin.db.raft.status();
    let view = admin
        .db
        .raft
        .leader_view(std::time::Duration::from_secs(2))
        .await;
    let (view, note, leader_down) = match view {
        Ok(v) => (Some(v), String::new(), None),
        Err(hydrascale_raft::RaftError::NotLeader { leader: None }) => (
            None,
            format!(
                "replica {} knows no leader (an election is under way, or it is cut off from the majority): lag, contact and down are unknown here",
                st.id
            ),
            None,
        ),
        Err(hydrascale_raft::RaftError::Network { target, message }) => (
            None,
            format!(
                "the leader, replica {target}, does not answer replica {} ({message}): lag and contact are unknown here",
                st.id
            ),
            Some(target),
        ),
        Err(e) => (
            None,
            format!("the leader's view is unavailable: {e}"),
            None,
        ),
    };
    let t = admin.db.store.read();
    let members = st
        .membership
        .iter()
        .map(|(id, addr, voter)| {
            let r = t.replicas.get(id);
            let progress = view.as_ref().and_then(|v| v.members.get(id));
            proto::Member {
                id: *id,
                raft_addr: addr.clone(),
                voter: *voter,
                admin_addr: r.map(|r| r.admin_addr.clone()).unwrap_or_default(),
                derp: r
                    .map(|r| format!("{}:{}", r.derp_host, r.derp_port))
                    .unwrap_or_default(),
                last_contact_ms: progress.and_then(|p| p.answered_ms_ago),
                matched_index: progress.and_then(|p| p.matched_index),
                down: match progress {
                    Some(p) => !p.answering,
                    None => leader_down == Some(*id),
                },
            }
        })
        .collect();
    proto::ClusterStatusReply {
        id: st.id,
        role: st.state,
        term: st.term,
        leader: st.current_leader,
        last_log_index: st.last_log_index,
        applied_index: st.last_applied,
        snapshot_index: st.snapshot_index,
        members,
        quorum_contact_ms: admin
            .db
            .raft
            .quorum_contact_age()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        view_of: view.as_ref().map(|v| v.leader),
        view_last_log_index: view.as_ref().and_then(|v| v.last_log_index),
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::{network_failure, raft_status, NetworkFailure};
    use hydrascale_raft::RaftError;

    /// Texts as the raft crate passes them on (tonic's message and causes).
    #[test]
    fn a_leader_that_does_not_answer_means_no_leader_yet_and_tls_means_certificates() {
        let refused =
            "Connection refused (os error 111): transport error: Connection refused (os error 111)";
        assert_eq!(
            network_failure(refused),
            NetworkFailure::Unreachable("Connection refused (os error 111)".into())
        );
        for tls in [
            "transport error: invalid peer certificate: UnknownIssuer",
            "transport error: received fatal alert: BadCertificate",
            "transport error: the replica at this address holds the certificate of replica 3, not of replica 2",
        ] {
            assert_eq!(network_failure(tls), NetworkFailure::Tls, "{tls}");
        }
        let s = raft_status(RaftError::Network {
            target: 1,
            message: refused.into(),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().starts_with("no leader yet"), "{}", s.message());
        assert!(!s.message().contains("certificate"), "{}", s.message());
        let s = raft_status(RaftError::Network {
            target: 1,
            message: "transport error: invalid peer certificate: UnknownIssuer".into(),
        });
        assert!(s.message().contains("same cluster CA"), "{}", s.message());
        for e in [
            RaftError::NotLeader { leader: None },
            RaftError::NotLeader { leader: Some(2) },
            RaftError::LeaderLost { leader: 2 },
            RaftError::NoQuorum("this replica has not heard from a leader for 2.1s, so it is probably cut off from the majority".into()),
        ] {
            let s = raft_status(e);
            assert!(
                s.message().starts_with("no leader yet") && s.message().contains("retry"),
                "{}",
                s.message()
            );
        }
    }
}
