//! The gRPC service through which other replicas reach this node's openraft instance.

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
        self.append(decode(req)?).await
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
        let rpc = super::compact::decode(req.into_inner()).map_err(Status::invalid_argument)?;
        self.append(rpc).await
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: VoteRequest<u64> = decode(req)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }

    async fn client_write(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let cmd: Vec<u8> = req.into_inner().data;
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
        crate::handover::timeout_now(&self.raft, r.leader, delay);
        Ok(Response::new(Payload { data: Vec::new() }))
    }

    async fn pre_vote(
        &self,
        _req: Request<PreVoteRequest>,
    ) -> Result<Response<PreVoteReply>, Status> {
        let m = self.raft.metrics().borrow().clone();
        let refusal = crate::prevote::refusal(&m, &self.contacts, self.leader_lease);
        Ok(Response::new(PreVoteReply {
            granted: refusal.is_none(),
            reason: refusal.unwrap_or_default(),
        }))
    }
}
