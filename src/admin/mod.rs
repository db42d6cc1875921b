//! The admin gRPC API (`proto/admin.proto`): the service, its two listeners (TCP with an
//! API key, the local socket without), and the mapping of state and replication errors to
//! gRPC statuses. Each resource's calls live in the module named after it (`users`,
//! `keys`, `nodes`, `policy`, `cluster`); state types become proto messages in `convert`,
//! which the REST API (`crate::api`) uses too.
//!
//! Reads come from this replica's applied state; writes become `state::Command`s through
//! Raft. Keys are generated here (randomness stays out of `apply`) and only their hash is
//! replicated.

mod cluster;
pub mod convert;
mod dns;
mod keys;
mod nodes;
mod policy;
mod users;

use tonic::{Request, Response, Status};

use crate::state::{now_ms, Command, CommandOutput, Db, DbError, StateError};
use cluster::raft_status;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("hydrascale.admin.v1");
}

use proto::admin_service_server::{AdminService, AdminServiceServer};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin API server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Maps state and replication errors to gRPC statuses, once.
fn status(e: DbError) -> Status {
    match e {
        DbError::State(s) => {
            let msg = s.to_string();
            match s {
                StateError::UserExists(_)
                | StateError::NodeNameTaken(_)
                | StateError::NodeKeyInUse(_)
                | StateError::IdentityTaken(_)
                | StateError::UserLinked { .. } => Status::already_exists(msg),
                StateError::UserNotFound(_)
                | StateError::ApiKeyNotFound(_)
                | StateError::PreAuthKeyNotFound { .. }
                | StateError::PreAuthKeyIdNotFound(_)
                | StateError::NodeNotFound(_)
                | StateError::NodeKeyNotFound
                | StateError::LoginNotFound(_) => Status::not_found(msg),
                StateError::UserInUse { .. }
                | StateError::AddressesExhausted
                | StateError::TooManyPendingLogins => Status::failed_precondition(msg),
                _ => Status::invalid_argument(msg),
            }
        }
        DbError::Raft(r) => raft_status(r),
        DbError::Codec(c) => Status::internal(c),
        DbError::Replication(r) => {
            Status::unavailable(format!("the cluster cannot take writes: {r}"))
        }
        DbError::Upgrade(u) => Status::failed_precondition(u),
    }
}

pub struct Admin {
    db: Db,
    /// Started with `cluster.join = true`: may found a cluster on request (`InitCluster`).
    may_init: bool,
}

impl Admin {
    /// The admin service for in-process callers (the REST API); it cannot found a
    /// cluster (`InitCluster` is for the local socket of a waiting replica).
    pub fn new(db: Db) -> Admin {
        Admin {
            db,
            may_init: false,
        }
    }

    async fn write(&self, cmd: Command) -> Result<CommandOutput, Status> {
        self.db.write(cmd).await.map_err(status)
    }

    /// Keeps a made-up machine waiting on an interactive login (headscale's
    /// `POST /api/v1/debug/node`): an administrator can then register it as a node.
    pub async fn start_debug_login(&self, login: crate::state::PendingLogin) -> Result<(), Status> {
        self.write(Command::StartLogin { login }).await.map(|_| ())
    }

    /// Membership changes only work on the leader; elsewhere say where it is.
    fn require_leader(&self) -> Result<(), Status> {
        if self.db.raft.is_leader() {
            return Ok(());
        }
        let st = self.db.raft.status();
        let msg = match st.current_leader {
            Some(l) => {
                let addr = self
                    .db
                    .store
                    .read()
                    .replicas
                    .get(&l)
                    .map(|r| r.admin_addr.clone());
                match addr {
                    Some(a) => format!(
                        "replica {} is not the leader; replica {l} is: run this again with --admin-addr http://{a}",
                        st.id
                    ),
                    None => format!(
                        "replica {} is not the leader; replica {l} is: run this again against its admin API",
                        st.id
                    ),
                }
            }
            None => format!(
                "no leader yet: replica {} knows none (an election is under way, or a majority of replicas is down); retry in a few seconds; if this persists, check that a majority of replicas is running",
                st.id
            ),
        };
        Err(Status::failed_precondition(msg))
    }

    fn node_reply(&self, out: CommandOutput) -> Result<Response<proto::NodeReply>, Status> {
        match out {
            CommandOutput::Node(n) => {
                let t = self.db.store.read();
                Ok(Response::new(proto::NodeReply {
                    node: Some(convert::node_msg(&t, &n)),
                }))
            }
            _ => Err(Status::internal("command returned no node")),
        }
    }
}

/// The service's calls, each handled in its resource's module.
#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_user(
        &self,
        req: Request<proto::CreateUserRequest>,
    ) -> Result<Response<proto::UserReply>, Status> {
        users::create_user(self, req).await
    }

    async fn list_users(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::ListUsersReply>, Status> {
        users::list_users(self, req).await
    }

    async fn rename_user(
        &self,
        req: Request<proto::RenameUserRequest>,
    ) -> Result<Response<proto::UserReply>, Status> {
        users::rename_user(self, req).await
    }

    async fn delete_user(
        &self,
        req: Request<proto::DeleteUserRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        users::delete_user(self, req).await
    }

    async fn link_user(
        &self,
        req: Request<proto::LinkUserRequest>,
    ) -> Result<Response<proto::UserReply>, Status> {
        users::link_user(self, req).await
    }

    async fn create_pre_auth_key(
        &self,
        req: Request<proto::CreatePreAuthKeyRequest>,
    ) -> Result<Response<proto::PreAuthKeyReply>, Status> {
        keys::create_pre_auth_key(self, req).await
    }

    async fn list_pre_auth_keys(
        &self,
        req: Request<proto::ListPreAuthKeysRequest>,
    ) -> Result<Response<proto::ListPreAuthKeysReply>, Status> {
        keys::list_pre_auth_keys(self, req).await
    }

    async fn expire_pre_auth_key(
        &self,
        req: Request<proto::ExpirePreAuthKeyRequest>,
    ) -> Result<Response<proto::PreAuthKeyReply>, Status> {
        keys::expire_pre_auth_key(self, req).await
    }

    async fn create_api_key(
        &self,
        req: Request<proto::CreateApiKeyRequest>,
    ) -> Result<Response<proto::ApiKeyReply>, Status> {
        keys::create_api_key(self, req).await
    }

    async fn list_api_keys(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::ListApiKeysReply>, Status> {
        keys::list_api_keys(self, req).await
    }

    async fn expire_api_key(
        &self,
        req: Request<proto::ApiKeyPrefixRequest>,
    ) -> Result<Response<proto::ApiKeyReply>, Status> {
        keys::expire_api_key(self, req).await
    }

    async fn delete_api_key(
        &self,
        req: Request<proto::ApiKeyPrefixRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        keys::delete_api_key(self, req).await
    }

    async fn list_nodes(
        &self,
        req: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesReply>, Status> {
        nodes::list_nodes(self, req).await
    }

    async fn delete_node(
        &self,
        req: Request<proto::NodeIdRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        nodes::delete_node(self, req).await
    }

    async fn expire_node(
        &self,
        req: Request<proto::NodeIdRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        nodes::expire_node(self, req).await
    }

    async fn set_node_expiry(
        &self,
        req: Request<proto::SetNodeExpiryRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        nodes::set_node_expiry(self, req).await
    }

    async fn reject_login(
        &self,
        req: Request<proto::AuthIdRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        nodes::reject_login(self, req).await
    }

    async fn delete_pre_auth_key(
        &self,
        req: Request<proto::PreAuthKeyIdRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        keys::delete_pre_auth_key(self, req).await
    }

    async fn rename_node(
        &self,
        req: Request<proto::RenameNodeRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        nodes::rename_node(self, req).await
    }

    async fn set_tags(
        &self,
        req: Request<proto::SetTagsRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        nodes::set_tags(self, req).await
    }

    async fn approve_routes(
        &self,
        req: Request<proto::ApproveRoutesRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        nodes::approve_routes(self, req).await
    }

    async fn complete_login(
        &self,
        req: Request<proto::CompleteLoginRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        nodes::complete_login(self, req).await
    }

    async fn decide_ssh_check(
        &self,
        req: Request<proto::DecideSshCheckRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        nodes::decide_ssh_check(self, req).await
    }

    async fn get_dns(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::DnsReply>, Status> {
        dns::get_dns(self, req).await
    }

    async fn set_dns(
        &self,
        req: Request<proto::SetDnsRequest>,
    ) -> Result<Response<proto::DnsReply>, Status> {
        dns::set_dns(self, req).await
    }

    async fn get_policy(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::PolicyReply>, Status> {
        policy::get_policy(self, req).await
    }

    async fn set_policy(
        &self,
        req: Request<proto::SetPolicyRequest>,
    ) -> Result<Response<proto::PolicyReply>, Status> {
        policy::set_policy(self, req).await
    }

    async fn cluster_status(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::ClusterStatusReply>, Status> {
        cluster::cluster_status(self, req).await
    }

    async fn add_learner(
        &self,
        req: Request<proto::AddLearnerRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        cluster::add_learner(self, req).await
    }

    async fn promote(
        &self,
        req: Request<proto::MemberIdRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        cluster::promote(self, req).await
    }

    async fn remove_member(
        &self,
        req: Request<proto::MemberIdRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        cluster::remove_member(self, req).await
    }

    async fn transfer_leader(
        &self,
        req: Request<proto::TransferLeaderRequest>,
    ) -> Result<Response<proto::TransferLeaderReply>, Status> {
        cluster::transfer_leader(self, req).await
    }

    async fn init_cluster(
        &self,
        req: Request<proto::InitClusterRequest>,
    ) -> Result<Response<proto::InitClusterReply>, Status> {
        cluster::init_cluster(self, req).await
    }

    async fn snapshot(&self, req: Request<proto::Empty>) -> Result<Response<proto::Empty>, Status> {
        cluster::snapshot(self, req).await
    }

    async fn backup(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::BackupReply>, Status> {
        cluster::backup(self, req).await
    }
}

/// Serves the admin API on `listener` until `shutdown` resolves.
/// The admin API over TCP (`admin_listen_addr`): every call must carry a current API key
/// (`authorization: Bearer KEY`); without one it is refused before it reaches a handler,
/// so it changes nothing.
pub async fn serve_admin(
    incoming: impl tokio_stream::Stream<Item = std::io::Result<crate::listener::Conn>> + Send + 'static,
    db: Db,
    may_init: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let store = db.store.clone();
    let svc = AdminServiceServer::new(Admin { db, may_init })
        // A backup sent to `InitCluster` is the whole tailnet.
        .max_decoding_message_size(256 * 1024 * 1024);
    let authed = tonic::service::interceptor::InterceptedService::new(
        svc,
        move |req: Request<()>| -> Result<Request<()>, Status> {
            let presented = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated(
                        "this admin API needs an API key: pass --api-key (or HYDRASCALE_API_KEY); create one with `hydrascale apikeys create` on a replica (over its local admin socket)",
                    )
                })?;
            store
                .read()
                .check_api_key(presented.trim(), now_ms())
                .map_err(Status::unauthenticated)?;
            Ok(req)
        },
    );
    // Connections are admitted under the listener's limits (`crate::listener`); a peer
    // that stops answering pings is closed.
    let (ping_every, ping_timeout) = crate::listener::h2_keepalive();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(ping_every))
        .http2_keepalive_timeout(Some(ping_timeout))
        .add_service(authed)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// The admin API on a Unix socket in the data directory (`admin.sock`, mode 0600): no
/// API key, because only the server's own user can open it. This is how the first API
/// key is created, and how the CLI on the server works without one.
pub async fn serve_admin_socket(
    listener: tokio::net::UnixListener,
    db: Db,
    may_init: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let svc = AdminServiceServer::new(Admin { db, may_init })
        .max_decoding_message_size(256 * 1024 * 1024);
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}
