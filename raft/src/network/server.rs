//! The gRPC service through which other replicas reach this node's openraft instance,
//! and who may use it: over mutual TLS, only current members of the cluster, each only in
//! its own name.

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use super::proto::raft_service_server::RaftService;
use super::proto::{CompactAppend, Payload, PreVoteReply, PreVoteRequest};
use super::ForwardResult;
use crate::TypeConfig;

pub struct RaftGrpc {
    pub raft: openraft::Raft<TypeConfig>,
    pub contacts: super::Contacts,
    pub gate: crate::handover::WriteGate,
    /// openraft's leader lease, within which this replica refuses a pre-vote.
    pub leader_lease: std::time::Duration,
    /// Answer compact appends as a replica of a version before them did (tests).
    pub json_appends_only: bool,
    /// The application, to check forwarded commands before they are proposed.
    pub app: std::sync::Arc<dyn crate::Application>,
    /// Mutual TLS is on: every call must come with a replica certificate (the handshake
    /// already checked the CA) of a current member.
    pub authenticate: bool,
}

fn decode<T: serde::de::DeserializeOwned>(req: Request<Payload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<Payload>, Status> {
    serde_json::to_vec(v)
        .map(|data| Response::new(Payload { data }))
        .map_err(|e| Status::internal(e.to_string()))
}

impl RaftGrpc {
    /// Admits a call from a replica of this cluster: its certificate names a current
    /// member and, where the message speaks in a replica's name (`claims`: the leader of
    /// an append or snapshot, the candidate of a vote), that replica. A replica that has
    /// never been part of a cluster (waiting to be added) has no members yet and admits any
    /// replica the CA certified: the leader that adds it.
    /// Returns the caller's replica id (`None` without mutual TLS).
    fn admit<T>(&self, req: &Request<T>, claims: Option<u64>) -> Result<Option<u64>, Status> {
        if !self.authenticate {
            return Ok(None);
        }
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate: Raft takes calls only from replicas of this cluster (mutual TLS)",
            )
        })?;
        let leaf = certs.first().ok_or_else(|| {
            Status::unauthenticated("no client certificate: Raft takes calls only from replicas of this cluster (mutual TLS)")
        })?;
        let caller = crate::tls::replica_id(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        Self::check_claim_of(Some(caller), claims)?;
        let member = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let mut nodes = membership.nodes().peekable();
            nodes.peek().is_none() || nodes.any(|(id, _)| *id == caller)
        };
        if !member {
            return Err(Status::permission_denied(format!(
                "replica {caller} is not a member of this cluster (removed, or never added); add it with `hydrascale cluster join` on the leader"
            )));
        }
        Ok(Some(caller))
    }

    /// For a claim found only once the message is decoded (the leader of an append or
    /// snapshot, the candidate of a vote): it must be the admitted caller.
    fn check_claim_of(caller: Option<u64>, claimed: Option<u64>) -> Result<(), Status> {
        match (caller, claimed) {
            (Some(caller), Some(claimed)) if caller != claimed => Err(Status::permission_denied(
                format!("replica {caller} sent a message in the name of replica {claimed}"),
            )),
            _ => Ok(()),
        }
    }

    async fn append(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<Response<Payload>, Status> {
        let leader_commit = rpc.leader_commit.map(|l| l.index);
        let res = self.raft.append_entries(rpc).await;
        // Only an accepted append proves a live leader with our term; a stale one does not.
        if matches!(&res, Ok(r) if r.is_success()) {
            self.contacts.leader_appended(leader_commit);
        }
        encode(&res)
    }
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let caller = self.admit(&req, None)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        Self::check_claim_of(caller, rpc.vote.leader_id().voted_for())?;
        self.append(rpc).await
    }

    async fn append_entries_compact(
        &self,
        req: Request<CompactAppend>,
    ) -> Result<Response<Payload>, Status> {
        if self.json_appends_only {
            return Err(Status::unimplemented(
                "this replica takes appends as JSON only",
            ));
        }
        let caller = self.admit(&req, None)?;
        let rpc = super::compact::decode(req.into_inner()).map_err(Status::invalid_argument)?;
        Self::check_claim_of(caller, rpc.vote.leader_id().voted_for())?;
        self.append(rpc).await
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let caller = self.admit(&req, None)?;
        let rpc: VoteRequest<u64> = decode(req)?;
        Self::check_claim_of(caller, rpc.vote.leader_id().voted_for())?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let caller = self.admit(&req, None)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        Self::check_claim_of(caller, rpc.vote.leader_id().voted_for())?;
        encode(&self.raft.install_snapshot(rpc).await)
    }

    async fn client_write(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.admit(&req, None)?;
        let cmd: Vec<u8> = req.into_inner().data;
        // A command this replica cannot apply (sent by a replica of a newer version) would
        // stop it as soon as it is committed: refuse it before it reaches the log.
        if let Err(why) = self.app.check(&cmd) {
            return encode(&ForwardResult::Failed(format!(
                "the leader, replica {}, cannot apply this command ({why}); upgrade it first",
                self.raft.metrics().borrow().id
            )));
        }
        let res = {
            let _open = self.gate.enter().await;
            self.raft.client_write(cmd).await
        };
        let res = match res {
            Ok(r) => ForwardResult::Ok {
                index: r.log_id.index,
                data: r.data,
            },
            Err(openraft::error::RaftError::APIError(
                openraft::error::ClientWriteError::ForwardToLeader(f),
            )) => ForwardResult::NotLeader {
                leader: f.leader_id,
            },
            Err(e) => ForwardResult::Failed(e.to_string()),
        };
        encode(&res)
    }

    async fn timeout_now(
        &self,
        req: Request<super::proto::TimeoutNowRequest>,
    ) -> Result<Response<Payload>, Status> {
        let claimed = req.get_ref().leader;
        self.admit(&req, Some(claimed))?;
        let r = req.into_inner();
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(r.leader) {
            return Err(Status::failed_precondition(format!(
                "replica {} is not the leader this replica follows ({:?})",
                r.leader, m.current_leader
            )));
        }
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == m.id)
        {
            return Err(Status::failed_precondition(
                "this replica is a learner and cannot lead; promote it first",
            ));
        }
        // Bounded so a confused caller cannot park an election for long.
        let delay = std::time::Duration::from_millis(r.delay_ms.min(60_000));
        // Until it has campaigned, no other voter may: it would win ahead of this one.
        self.gate.refuse_prevotes(
            std::time::Instant::now() + delay + std::time::Duration::from_secs(1),
            format!(
                "replica {} is taking leadership over from replica {} (handover)",
                m.id, r.leader
            ),
        );
        crate::handover::timeout_now(&self.raft, r.leader, delay);
        Ok(Response::new(Payload { data: Vec::new() }))
    }

    async fn pre_vote(
        &self,
        req: Request<PreVoteRequest>,
    ) -> Result<Response<PreVoteReply>, Status> {
        let claimed = req.get_ref().candidate;
        self.admit(&req, Some(claimed))?;
        let m = self.raft.metrics().borrow().clone();
        let refusal = self
            .gate
            .prevote_refusal()
            .or_else(|| crate::prevote::refusal(&m, &self.contacts, self.leader_lease));
        Ok(Response::new(PreVoteReply {
            granted: refusal.is_none(),
            reason: refusal.unwrap_or_default(),
        }))
    }

    /// The leader's view of replication, for `cluster status` on a follower. Read-only,
    /// and like every other call only for current members (mutual TLS).
    async fn leader_view(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.admit(&req, None)?;
        let m = self.raft.metrics().borrow().clone();
        match crate::view::of_leader(&m, &self.contacts, self.leader_lease) {
            Some(v) => encode(&v),
            None => Err(Status::failed_precondition(format!(
                "replica {} is not the leader",
                m.id
            ))),
        }
    }
}
