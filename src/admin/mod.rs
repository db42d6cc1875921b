//! The admin gRPC API (`proto/admin.proto`): users, pre-auth keys and nodes.
//!
//! Reads come from this replica's applied state; writes become `state::Command`s through
//! Raft. Pre-auth keys are generated here (randomness stays out of `apply`) and only their
//! hash is replicated.

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::state::{now_ms, Command, CommandOutput, Db, DbError, StateError, Tailnet};

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

fn user_msg(u: &crate::state::User) -> proto::User {
    let (oidc_issuer, oidc_subject) = u
        .oidc
        .as_ref()
        .map(|o| (o.issuer.clone(), o.subject.clone()))
        .unwrap_or_default();
    proto::User {
        id: u.id,
        name: u.name.clone(),
        display_name: u.display_name.clone(),
        created_ms: u.created,
        oidc_issuer,
        oidc_subject,
        origin: match u.origin {
            crate::state::UserOrigin::Admin => "admin",
            crate::state::UserOrigin::Oidc => "oidc",
            crate::state::UserOrigin::Unrecorded => "unrecorded",
        }
        .into(),
    }
}

fn key_msg(t: &Tailnet, k: &crate::state::PreAuthKey, full_key: String) -> proto::PreAuthKey {
    proto::PreAuthKey {
        id: k.id,
        user: t
            .users
            .get(&k.user_id)
            .map(|u| u.name.clone())
            .unwrap_or_default(),
        prefix: k.prefix.clone(),
        reusable: k.reusable,
        ephemeral: k.ephemeral,
        used: k.used,
        expiration_ms: k.expiration,
        created_ms: k.created,
        tags: k.tags.clone(),
        key: full_key,
    }
}

pub fn node_msg(t: &Tailnet, n: &crate::state::Node) -> proto::Node {
    proto::Node {
        id: n.id,
        given_name: n.given_name.clone(),
        hostname: n.hostname.clone(),
        user: t
            .users
            .get(&n.user_id)
            .map(|u| u.name.clone())
            .unwrap_or_default(),
        ipv4: n.ipv4.to_string(),
        ipv6: n.ipv6.to_string(),
        machine_key: n.machine_key.clone(),
        node_key: n.node_key.clone(),
        online: n.online,
        last_seen_ms: n.last_seen,
        expiry_ms: n.expiry,
        ephemeral: n.ephemeral,
        tags: n.tags.clone(),
        created_ms: n.created,
        available_routes: n.advertised_routes.iter().map(|r| r.to_string()).collect(),
        approved_routes: n.approved_routes.iter().map(|r| r.to_string()).collect(),
        subnet_routes: carried_routes(t, n),
    }
}

/// The routes `n` carries now: its primary subnet routes and the exit routes it serves.
pub fn carried_routes(t: &Tailnet, n: &crate::state::Node) -> Vec<String> {
    if n.approved_routes.is_empty() {
        return Vec::new();
    }
    let primary = crate::mapper::primary_routes(t);
    n.served_routes()
        .iter()
        .filter(|r| crate::state::is_exit_route(r) || primary.get(r) == Some(&n.id))
        .map(|r| r.to_string())
        .collect()
}

fn policy_msg(t: &Tailnet) -> proto::PolicyReply {
    proto::PolicyReply {
        policy: t
            .policy
            .as_ref()
            .map(|p| p.text.clone())
            .unwrap_or_default(),
        updated_ms: t.policy.as_ref().map(|p| p.updated),
    }
}

/// A new API key, `hskey-api-<12 hex prefix>-<48 hex secret>`, and its prefix.
fn generate_api_key() -> (String, String) {
    let mut b = [0u8; 30];
    OsRng.fill_bytes(&mut b);
    let prefix = hex::encode(&b[..6]);
    (
        format!("hskey-api-{prefix}-{}", hex::encode(&b[6..])),
        prefix,
    )
}

/// Whether `presented` (the whole key) is a current API key of this tailnet. The answer
/// is the same for an unknown, a wrong and an expired key except for the hint.
pub fn check_api_key(t: &Tailnet, presented: &str, now: i64) -> Result<(), &'static str> {
    let unknown = "the API key is not valid; create one with `hydrascale apikeys create` on a replica (over its local admin socket)";
    let prefix = presented
        .strip_prefix("hskey-api-")
        .and_then(|rest| rest.split_once('-'))
        .map(|(p, _)| p)
        .ok_or(unknown)?;
    let key = t
        .api_keys
        .values()
        .find(|k| k.prefix == prefix)
        .ok_or(unknown)?;
    let hash = hex::encode(Sha256::digest(presented.as_bytes()));
    // Constant time: how much of the hash matched must not show in the answer's timing.
    let same = hash.len() == key.hash.len()
        && hash
            .bytes()
            .zip(key.hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(unknown);
    }
    if key.expiration.is_some_and(|e| e <= now) {
        return Err("the API key has expired; create a new one with `hydrascale apikeys create`");
    }
    Ok(())
}

fn api_key_msg(k: &crate::state::ApiKey, key: String) -> proto::ApiKey {
    proto::ApiKey {
        id: k.id,
        prefix: k.prefix.clone(),
        expiration_ms: k.expiration,
        created_ms: k.created,
        key,
    }
}

/// A new pre-auth key: `hskey-auth-` and 48 random hex characters.
fn generate_key() -> String {
    let mut b = [0u8; 24];
    OsRng.fill_bytes(&mut b);
    format!("hskey-auth-{}", hex::encode(b))
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
                    node: Some(node_msg(&t, &n)),
                }))
            }
            _ => Err(Status::internal("command returned no node")),
        }
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_user(
        &self,
        req: Request<proto::CreateUserRequest>,
    ) -> Result<Response<proto::UserReply>, Status> {
        let r = req.into_inner();
        let mut cmd = Command::CreateUser {
            name: r.name,
            display_name: r.display_name,
            now: now_ms(),
            by_admin: true,
        };
        // During a rolling upgrade, replicas of the earlier version would drop the origin
        // and their state would part from the others': propose the user as those versions
        // do. Its origin then stays unrecorded, so no OIDC login ever binds to it by name.
        if self.db.check_level(&cmd).is_err() {
            if let Command::CreateUser { by_admin, .. } = &mut cmd {
                *by_admin = false;
            }
        }
        match self.write(cmd).await? {
            CommandOutput::User(u) => Ok(Response::new(proto::UserReply {
                user: Some(user_msg(&u)),
            })),
            _ => Err(Status::internal("command returned no user")),
        }
    }

    async fn list_users(
        &self,
        _req: Request<proto::Empty>,
    ) -> Result<Response<proto::ListUsersReply>, Status> {
        let t = self.db.store.read();
        Ok(Response::new(proto::ListUsersReply {
            users: t.users.values().map(user_msg).collect(),
        }))
    }

    async fn rename_user(
        &self,
        req: Request<proto::RenameUserRequest>,
    ) -> Result<Response<proto::UserReply>, Status> {
        let r = req.into_inner();
        match self
            .write(Command::RenameUser {
                old_name: r.old_name,
                new_name: r.new_name,
            })
            .await?
        {
            CommandOutput::User(u) => Ok(Response::new(proto::UserReply {
                user: Some(user_msg(&u)),
            })),
            _ => Err(Status::internal("command returned no user")),
        }
    }

    async fn delete_user(
        &self,
        req: Request<proto::DeleteUserRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        self.write(Command::DeleteUser {
            name: req.into_inner().name,
        })
        .await?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn link_user(
        &self,
        req: Request<proto::LinkUserRequest>,
    ) -> Result<Response<proto::UserReply>, Status> {
        let r = req.into_inner();
        let identity = match (r.issuer.trim(), r.subject.trim()) {
            ("", "") => None,
            (issuer, subject) => Some(crate::state::OidcIdentity {
                issuer: issuer.trim_end_matches('/').to_string(),
                subject: subject.to_string(),
            }),
        };
        match self
            .write(Command::LinkUser {
                name: r.name,
                identity,
            })
            .await?
        {
            CommandOutput::User(u) => Ok(Response::new(proto::UserReply {
                user: Some(user_msg(&u)),
            })),
            _ => Err(Status::internal("command returned no user")),
        }
    }

    async fn create_pre_auth_key(
        &self,
        req: Request<proto::CreatePreAuthKeyRequest>,
    ) -> Result<Response<proto::PreAuthKeyReply>, Status> {
        let r = req.into_inner();
        if r.expiration_ms < 0 {
            return Err(Status::invalid_argument("expiration must not be negative"));
        }
        let key = generate_key();
        let now = now_ms();
        let out = self
            .write(Command::CreatePreAuthKey {
                user: r.user,
                prefix: key.chars().take(20).collect(),
                hash: hex::encode(Sha256::digest(key.as_bytes())),
                reusable: r.reusable,
                ephemeral: r.ephemeral,
                expiration: (r.expiration_ms > 0).then(|| now.saturating_add(r.expiration_ms)),
                tags: r.tags,
                now,
            })
            .await?;
        match out {
            CommandOutput::PreAuthKey(k) => {
                let t = self.db.store.read();
                Ok(Response::new(proto::PreAuthKeyReply {
                    key: Some(key_msg(&t, &k, key)),
                }))
            }
            _ => Err(Status::internal("command returned no key")),
        }
    }

    async fn list_pre_auth_keys(
        &self,
        req: Request<proto::ListPreAuthKeysRequest>,
    ) -> Result<Response<proto::ListPreAuthKeysReply>, Status> {
        let user = req.into_inner().user;
        let t = self.db.store.read();
        let uid = t
            .user_by_name(&user)
            .map(|u| u.id)
            .ok_or_else(|| status(DbError::State(StateError::UserNotFound(user.clone()))))?;
        Ok(Response::new(proto::ListPreAuthKeysReply {
            keys: t
                .preauth_keys
                .values()
                .filter(|k| k.user_id == uid)
                .map(|k| key_msg(&t, k, String::new()))
                .collect(),
        }))
    }

    async fn expire_pre_auth_key(
        &self,
        req: Request<proto::ExpirePreAuthKeyRequest>,
    ) -> Result<Response<proto::PreAuthKeyReply>, Status> {
        let r = req.into_inner();
        match self
            .write(Command::ExpirePreAuthKey {
                user: r.user,
                prefix: r.prefix,
                now: now_ms(),
            })
            .await?
        {
            CommandOutput::PreAuthKey(k) => {
                let t = self.db.store.read();
                Ok(Response::new(proto::PreAuthKeyReply {
                    key: Some(key_msg(&t, &k, String::new())),
                }))
            }
            _ => Err(Status::internal("command returned no key")),
        }
    }

    async fn list_nodes(
        &self,
        req: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesReply>, Status> {
        let user = req.into_inner().user;
        let t = self.db.store.read();
        let uid =
            if user.is_empty() {
                None
            } else {
                Some(t.user_by_name(&user).map(|u| u.id).ok_or_else(|| {
                    status(DbError::State(StateError::UserNotFound(user.clone())))
                })?)
            };
        Ok(Response::new(proto::ListNodesReply {
            nodes: t
                .nodes
                .values()
                .filter(|n| uid.is_none_or(|u| n.user_id == u))
                .map(|n| node_msg(&t, n))
                .collect(),
        }))
    }

    async fn delete_node(
        &self,
        req: Request<proto::NodeIdRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        self.write(Command::DeleteNode {
            id: req.into_inner().id,
        })
        .await?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn expire_node(
        &self,
        req: Request<proto::NodeIdRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        let out = self
            .write(Command::ExpireNode {
                id: req.into_inner().id,
                now: now_ms(),
            })
            .await?;
        self.node_reply(out)
    }

    async fn rename_node(
        &self,
        req: Request<proto::RenameNodeRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        let r = req.into_inner();
        let out = self
            .write(Command::RenameNode {
                id: r.id,
                new_name: r.new_name,
            })
            .await?;
        self.node_reply(out)
    }

    async fn set_tags(
        &self,
        req: Request<proto::SetTagsRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        let r = req.into_inner();
        let out = self
            .write(Command::SetTags {
                id: r.id,
                tags: r.tags,
            })
            .await?;
        self.node_reply(out)
    }

    async fn approve_routes(
        &self,
        req: Request<proto::ApproveRoutesRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        let r = req.into_inner();
        let out = self
            .write(Command::ApproveRoutes {
                id: r.id,
                routes: r.routes,
            })
            .await?;
        self.node_reply(out)
    }

    async fn get_policy(
        &self,
        _req: Request<proto::Empty>,
    ) -> Result<Response<proto::PolicyReply>, Status> {
        Ok(Response::new(policy_msg(&self.db.store.read())))
    }

    async fn set_policy(
        &self,
        req: Request<proto::SetPolicyRequest>,
    ) -> Result<Response<proto::PolicyReply>, Status> {
        let text = req.into_inner().policy;
        // Checked here first so a bad policy costs no log entry; `apply` checks it again.
        if !text.trim().is_empty() {
            crate::policy::parse(&text).map_err(|e| {
                Status::invalid_argument(format!(
                    "the policy was refused, the previous one stays in force: {e}"
                ))
            })?;
        }
        self.write(Command::SetPolicy {
            text,
            now: now_ms(),
        })
        .await?;
        Ok(Response::new(policy_msg(&self.db.store.read())))
    }

    async fn complete_login(
        &self,
        req: Request<proto::CompleteLoginRequest>,
    ) -> Result<Response<proto::NodeReply>, Status> {
        let r = req.into_inner();
        let out = self
            .write(Command::CompleteLogin {
                auth_id: r.auth_id,
                user: r.user,
                now: now_ms(),
            })
            .await?;
        self.node_reply(out)
    }

    async fn decide_ssh_check(
        &self,
        req: Request<proto::DecideSshCheckRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let r = req.into_inner();
        self.write(Command::DecideSshCheck {
            auth_id: r.auth_id,
            approve: r.approve,
            by: "administrator".into(),
            now: now_ms(),
        })
        .await?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn create_api_key(
        &self,
        req: Request<proto::CreateApiKeyRequest>,
    ) -> Result<Response<proto::ApiKeyReply>, Status> {
        let r = req.into_inner();
        if r.expiration_ms < 0 {
            return Err(Status::invalid_argument("expiration must not be negative"));
        }
        let (key, prefix) = generate_api_key();
        let now = now_ms();
        let out = self
            .write(Command::CreateApiKey {
                prefix,
                hash: hex::encode(Sha256::digest(key.as_bytes())),
                expiration: (r.expiration_ms > 0).then(|| now.saturating_add(r.expiration_ms)),
                now,
            })
            .await?;
        match out {
            CommandOutput::ApiKey(k) => Ok(Response::new(proto::ApiKeyReply {
                key: Some(api_key_msg(&k, key)),
            })),
            _ => Err(Status::internal("command returned no key")),
        }
    }

    async fn list_api_keys(
        &self,
        _req: Request<proto::Empty>,
    ) -> Result<Response<proto::ListApiKeysReply>, Status> {
        let t = self.db.store.read();
        Ok(Response::new(proto::ListApiKeysReply {
            keys: t
                .api_keys
                .values()
                .map(|k| api_key_msg(k, String::new()))
                .collect(),
        }))
    }

    async fn expire_api_key(
        &self,
        req: Request<proto::ApiKeyPrefixRequest>,
    ) -> Result<Response<proto::ApiKeyReply>, Status> {
        let prefix = req.into_inner().prefix;
        match self
            .write(Command::ExpireApiKey {
                prefix,
                now: now_ms(),
            })
            .await?
        {
            CommandOutput::ApiKey(k) => Ok(Response::new(proto::ApiKeyReply {
                key: Some(api_key_msg(&k, String::new())),
            })),
            _ => Err(Status::internal("command returned no key")),
        }
    }

    async fn delete_api_key(
        &self,
        req: Request<proto::ApiKeyPrefixRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let prefix = req.into_inner().prefix;
        self.write(Command::DeleteApiKey { prefix }).await?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn cluster_status(
        &self,
        _req: Request<proto::Empty>,
    ) -> Result<Response<proto::ClusterStatusReply>, Status> {
        Ok(Response::new(Admin::cluster_status(self).await))
    }

    async fn add_learner(
        &self,
        req: Request<proto::AddLearnerRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let r = req.into_inner();
        if r.id == 0 || r.raft_addr.rsplit_once(':').is_none() {
            return Err(Status::invalid_argument(
                "give the new replica's node_id (1 or more) and its Raft address HOST:PORT",
            ));
        }
        self.require_leader()?;
        if self.db.raft.status().membership.iter().any(|m| m.0 == r.id) {
            return Err(Status::already_exists(format!(
                "replica {} is already a member; pick an unused node_id",
                r.id
            )));
        }
        // Returns once the learner has caught up with the log; one that cannot be reached
        // would otherwise hold the command forever.
        let catch_up = std::time::Duration::from_secs(60);
        match tokio::time::timeout(catch_up, self.db.raft.add_learner(r.id, r.raft_addr.clone()))
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

    async fn promote(
        &self,
        req: Request<proto::MemberIdRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let id = req.into_inner().id;
        self.require_leader()?;
        if !self.db.raft.status().membership.iter().any(|m| m.0 == id) {
            return Err(Status::not_found(format!(
                "replica {id} is not a member; add it first with `hydrascale cluster add-learner`"
            )));
        }
        self.db.raft.promote(id).await.map_err(raft_status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn remove_member(
        &self,
        req: Request<proto::MemberIdRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let id = req.into_inner().id;
        self.require_leader()?;
        self.db.raft.remove_member(id).await.map_err(raft_status)?;
        // Its relay leaves the DERP map and its nodes go offline until they reconnect.
        self.write(Command::ForgetReplica { id }).await?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn transfer_leader(
        &self,
        req: Request<proto::TransferLeaderRequest>,
    ) -> Result<Response<proto::TransferLeaderReply>, Status> {
        self.require_leader()?;
        let me = self.db.raft.node_id();
        let st = self.db.raft.status();
        let to = match req.into_inner().to {
            0 => {
                // The voter with the most of the log loses the least time catching up.
                let matched = self.db.raft.matched_indexes().unwrap_or_default();
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
        let paused = self
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

    async fn init_cluster(
        &self,
        req: Request<proto::InitClusterRequest>,
    ) -> Result<Response<proto::InitClusterReply>, Status> {
        let r = req.into_inner();
        let me = self.db.raft.node_id();
        if self.db.raft.is_initialized().await.map_err(raft_status)? {
            return Err(Status::failed_precondition(
                "this replica already belongs to a cluster; `cluster init` and `cluster restore` only work on a new replica started with cluster.join = true (and an empty data directory)",
            ));
        }
        if !self.may_init {
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
        voters.insert(me, self.db.raft.advertise_addr().to_string());
        let count = voters.len();
        self.db.raft.initialize(voters).await.map_err(raft_status)?;
        self.db
            .raft
            .wait_for_leader(std::time::Duration::from_secs(60))
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "{e}: the cluster is initialized with {count} voters, but a majority of them must be running (with cluster.join = true) to elect a leader; start them and the election happens by itself"
                ))
            })?;
        self.write(first).await?;
        let t = self.db.store.read();
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

    async fn snapshot(
        &self,
        _req: Request<proto::Empty>,
    ) -> Result<Response<proto::Empty>, Status> {
        self.db.raft.trigger_snapshot().await.map_err(raft_status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn backup(
        &self,
        _req: Request<proto::Empty>,
    ) -> Result<Response<proto::BackupReply>, Status> {
        // openraft's linearizable read only works on the leader; an empty batch written
        // through Raft works from any replica: it returns once this replica has applied
        // it, and with it every write acknowledged before this call.
        self.write(Command::Batch {
            commands: Vec::new(),
        })
        .await?;
        let applied_index = self.db.raft.status().last_applied.unwrap_or(0);
        let b = crate::cluster::encode_backup(&self.db.store.read(), applied_index)
            .map_err(|e| Status::internal(format!("encoding the backup: {e}")))?;
        Ok(Response::new(proto::BackupReply {
            backup: b.bytes,
            applied_index,
            users: b.users,
            nodes: b.nodes,
            preauth_keys: b.preauth_keys,
        }))
    }
}

/// Maps a replication error to what the caller (the CLI, the REST API) is told: the real
/// cause and what to do, once for every admin call. An election (the leader stopped, or
/// this replica lost it) is the common case, and it only needs a retry; the raft crate's
/// generic network hint (certificates) applies only when TLS is what failed.
fn raft_status(e: hydrascale_raft::RaftError) -> Status {
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

impl Admin {
    /// This replica's Raft state, with every member's lag, last contact and whether it
    /// answers as the leader sees them: this replica's own view if it leads, otherwise
    /// asked of the leader over the Raft channel (mutual TLS between members; the admin
    /// API over TCP would need an API key on every replica). A leader that does not answer
    /// is marked down, and `note` says why the view is missing.
    async fn cluster_status(&self) -> proto::ClusterStatusReply {
        let st = self.db.raft.status();
        let view = self
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
        let t = self.db.store.read();
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
            quorum_contact_ms: self
                .db
                .raft
                .quorum_contact_age()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            view_of: view.as_ref().map(|v| v.leader),
            view_last_log_index: view.as_ref().and_then(|v| v.last_log_index),
            note,
        }
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
            check_api_key(&store.read(), presented.trim(), now_ms())
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
