//! `Tailnet`: the whole replicated state and the pure function that changes it.
//!
//! `apply` validates a command completely before mutating anything, so a refused command
//! leaves the state exactly as it was, on every replica.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::StateError;
use super::ipam;
use super::types::{
    ApiKey, Change, Command, CommandOutput, Node, OidcIdentity, PendingLogin, PolicyRecord,
    PreAuthKey, Prefixes, RegisterAuth, Replica, SshCheck, User, UserOrigin, LOGIN_TTL_MS,
    MAX_PENDING_LOGINS, MAX_SSH_CHECKS, SSH_CHECK_TTL_MS,
};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tailnet {
    pub users: BTreeMap<u64, User>,
    pub nodes: BTreeMap<u64, Node>,
    pub preauth_keys: BTreeMap<u64, PreAuthKey>,
    /// The cluster's control key as `privkey:<hex>`; every replica serves with it.
    #[serde(default)]
    pub control_key: Option<String>,
    #[serde(default)]
    pub replicas: BTreeMap<u64, Replica>,
    #[serde(default)]
    pub api_keys: BTreeMap<u64, ApiKey>,
    /// Interactive logins waiting for an administrator, by auth id.
    #[serde(default)]
    pub pending_logins: BTreeMap<String, PendingLogin>,
    /// The tailnet policy; none means every node may reach every other.
    #[serde(default)]
    pub policy: Option<PolicyRecord>,
    /// Held SSH connections waiting for their check, by auth id.
    #[serde(default)]
    pub ssh_checks: BTreeMap<String, SshCheck>,
    /// When each source node last passed an SSH check into each destination node
    /// (source id → destination id → time); cleared when the policy changes.
    #[serde(default)]
    pub ssh_approvals: BTreeMap<u64, BTreeMap<u64, i64>>,
    /// The highest command level applied so far ([`super::types::COMMAND_LEVEL`]): a
    /// replica of a version that reads less refuses a snapshot of this state.
    #[serde(default)]
    pub level: u32,
    #[serde(default)]
    next_api_key_id: u64,
    next_user_id: u64,
    next_node_id: u64,
    next_key_id: u64,
    #[serde(skip)]
    index: super::index::Index,
}

type Applied = (Result<CommandOutput, StateError>, Vec<Change>);

/// What authorises a registration: a pre-auth key, or an administrator's interactive-login
/// approval for a user (no key, no tags).
struct Grant {
    user_id: u64,
    tags: Vec<String>,
    ephemeral: bool,
    key_id: Option<u64>,
}

impl From<&PreAuthKey> for Grant {
    fn from(k: &PreAuthKey) -> Self {
        Grant {
            user_id: k.user_id,
            tags: k.tags.clone(),
            ephemeral: k.ephemeral,
            key_id: Some(k.id),
        }
    }
}

pub fn valid_user_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

pub fn valid_label(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && !n.starts_with('-')
        && !n.ends_with('-')
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

pub use hydrascale_policy::valid_tag;

/// Lowercase DNS label from a client's host name: other characters become '-'.
pub fn sanitize_hostname(h: &str) -> String {
    let mut out: String = h
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out = out.trim_matches('-').to_string();
    out.truncate(55);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "node".into()
    } else {
        out
    }
}

fn stable_id(id: u64) -> String {
    let h = Sha256::digest(id.to_be_bytes());
    format!("n{}CNTRL", &hex::encode(h)[..10])
}

impl Tailnet {
    /// The highest node id ever given out (ids are never reused).
    pub fn last_node_id(&self) -> u64 {
        self.next_node_id
    }

    pub fn node_by_node_key(&self, k: &str) -> Option<&Node> {
        let id = self.index.get(&self.nodes).by_node_key(k)?;
        self.nodes.get(&id)
    }

    fn node_mut_by_node_key(&mut self, k: &str) -> Result<&mut Node, StateError> {
        let id = self.index.get(&self.nodes).by_node_key(k);
        id.and_then(|id| self.nodes.get_mut(&id))
            .ok_or(StateError::NodeKeyNotFound)
    }

    pub fn node_by_machine_key(&self, k: &str) -> Option<&Node> {
        let id = self.index.get(&self.nodes).by_machine_key(k)?;
        self.nodes.get(&id)
    }

    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.users.values().find(|u| u.name == name)
    }

    fn user_id(&self, name: &str) -> Result<u64, StateError> {
        self.user_by_name(name)
            .map(|u| u.id)
            .ok_or_else(|| StateError::UserNotFound(name.to_string()))
    }

    /// The user an OIDC login as (`issuer`, `subject`) reaches.
    pub fn user_by_identity(&self, issuer: &str, subject: &str) -> Option<&User> {
        self.users
            .values()
            .find(|u| u.oidc.as_ref().is_some_and(|o| o.same(issuer, subject)))
    }

    /// `wanted` if no user has that name, else the first free `wanted-2`, `wanted-3`, ...
    /// (shortened to stay a valid name); a name that is not valid becomes `user-<id>`.
    pub fn free_user_name(&self, wanted: &str) -> String {
        let base = if valid_user_name(wanted) {
            wanted.to_string()
        } else {
            format!("user-{}", self.next_user_id + 1)
        };
        if self.user_by_name(&base).is_none() {
            return base;
        }
        (2u64..)
            .map(|i| {
                let suffix = format!("-{i}");
                let mut stem = base.clone();
                stem.truncate(63 - suffix.len());
                stem + &suffix
            })
            .find(|c| self.user_by_name(c).is_none())
            .unwrap_or(base)
    }

    /// The interactive login `auth_id`, if it is still waiting at `now`.
    fn pending_login(&self, auth_id: &str, now: i64) -> Result<PendingLogin, StateError> {
        self.pending_logins
            .get(auth_id)
            .filter(|p| p.created > now.saturating_sub(LOGIN_TTL_MS))
            .cloned()
            .ok_or_else(|| StateError::LoginNotFound(auth_id.to_string()))
    }

    /// Registers the machine of login `p` as a node of user `user_id` and drops the login.
    fn complete_login(
        &mut self,
        p: &PendingLogin,
        user_id: u64,
        now: i64,
    ) -> Result<(CommandOutput, Vec<Change>), StateError> {
        let grant = Grant {
            user_id,
            tags: Vec::new(),
            ephemeral: p.ephemeral,
            key_id: None,
        };
        let out = self.register(
            &p.machine_key,
            &p.node_key,
            None,
            &p.hostname,
            &p.hostinfo,
            Some(grant),
            p.key_lifetime.map(|l| now.saturating_add(l)),
            p.ephemeral,
            &p.prefixes,
            now,
        )?;
        self.pending_logins.remove(&p.auth_id);
        Ok(out)
    }

    fn unique_name(&self, wanted: &str, except: Option<u64>) -> String {
        let index = self.index.get(&self.nodes);
        let taken = |n: &str| index.name_taken(n, except);
        let base = sanitize_hostname(wanted);
        if !taken(&base) {
            return base;
        }
        (1u64..)
            .map(|i| format!("{base}-{i}"))
            .find(|c| !taken(c))
            .unwrap_or(base)
    }

    /// A tailnet made of records from elsewhere (a migration), keeping their ids; new
    /// users, nodes and keys are numbered after the highest. Nodes start offline, and the
    /// caller has made names, keys and addresses unique (a `Restore` of the result
    /// applies it as it is).
    pub fn from_records(
        users: Vec<User>,
        preauth_keys: Vec<PreAuthKey>,
        nodes: Vec<Node>,
        control_key: String,
    ) -> Tailnet {
        let max = |ids: &mut dyn Iterator<Item = u64>| ids.max().unwrap_or(0);
        Tailnet {
            next_user_id: max(&mut users.iter().map(|u| u.id)),
            next_node_id: max(&mut nodes.iter().map(|n| n.id)),
            next_key_id: max(&mut preauth_keys.iter().map(|k| k.id)),
            users: users.into_iter().map(|u| (u.id, u)).collect(),
            preauth_keys: preauth_keys.into_iter().map(|k| (k.id, k)).collect(),
            nodes: nodes
                .into_iter()
                .map(|mut n| {
                    n.stable_id = stable_id(n.id);
                    n.online = false;
                    n.online_via = None;
                    (n.id, n)
                })
                .collect(),
            control_key: Some(control_key),
            ..Tailnet::default()
        }
    }

    /// Applies one command; on error nothing has changed.
    pub fn apply(&mut self, cmd: &Command) -> Applied {
        // Commands that may change a node's keys, name or address, or drop a node, make
        // the index rebuild itself; those that come by the thousand keep it up to date,
        // and those that touch no indexed field leave it be (a pre-auth key created
        // between two registrations must not cost the second a rebuild over every node).
        let keeps_index = matches!(
            cmd,
            Command::UpdateNode { .. }
                | Command::SetOnline { .. }
                | Command::Batch { .. }
                | Command::RegisterNode { .. }
                | Command::CreateUser { .. }
                | Command::CreatePreAuthKey { .. }
                | Command::ExpirePreAuthKey { .. }
                | Command::CreateApiKey { .. }
                | Command::ExpireApiKey { .. }
                | Command::DeleteApiKey { .. }
                | Command::StartLogin { .. }
                | Command::StartSshCheck { .. }
                | Command::DecideSshCheck { .. }
                | Command::SetPolicy { .. }
                | Command::SetTags { .. }
                | Command::ApproveRoutes { .. }
                | Command::ExpireNode { .. }
                | Command::LinkUser { .. }
        );
        if !keeps_index {
            self.index.clear();
        }
        match self.apply_inner(cmd) {
            Ok((out, changes)) => {
                // After the command: a `Restore` replaces the whole state, this included.
                self.level = self.level.max(cmd.level());
                (Ok(out), changes)
            }
            Err(e) => (Err(e), Vec::new()),
        }
    }

    fn apply_inner(&mut self, cmd: &Command) -> Result<(CommandOutput, Vec<Change>), StateError> {
        match cmd {
            Command::CreateUser {
                name,
                display_name,
                now,
                by_admin,
            } => {
                if !valid_user_name(name) {
                    return Err(StateError::BadUserName(name.clone()));
                }
                if self.user_by_name(name).is_some() {
                    return Err(StateError::UserExists(name.clone()));
                }
                self.next_user_id += 1;
                let u = User {
                    id: self.next_user_id,
                    name: name.clone(),
                    display_name: display_name.clone(),
                    created: *now,
                    oidc: None,
                    origin: if *by_admin {
                        UserOrigin::Admin
                    } else {
                        UserOrigin::Unrecorded
                    },
                };
                self.users.insert(u.id, u.clone());
                Ok((
                    CommandOutput::User(u.clone()),
                    vec![Change::UserChanged(u.id)],
                ))
            }
            Command::RenameUser { old_name, new_name } => {
                let id = self.user_id(old_name)?;
                if !valid_user_name(new_name) {
                    return Err(StateError::BadUserName(new_name.clone()));
                }
                if self.user_by_name(new_name).is_some() {
                    return Err(StateError::UserExists(new_name.clone()));
                }
                let u = self
                    .users
                    .get_mut(&id)
                    .ok_or(StateError::UserNotFound(old_name.clone()))?;
                u.name = new_name.clone();
                let u = u.clone();
                Ok((CommandOutput::User(u), vec![Change::UserChanged(id)]))
            }
            Command::DeleteUser { name } => {
                let id = self.user_id(name)?;
                let nodes = self.nodes.values().filter(|n| n.user_id == id).count();
                let keys = self
                    .preauth_keys
                    .values()
                    .filter(|k| k.user_id == id)
                    .count();
                if nodes > 0 || keys > 0 {
                    return Err(StateError::UserInUse {
                        name: name.clone(),
                        nodes,
                        keys,
                    });
                }
                self.users.remove(&id);
                Ok((CommandOutput::Done, vec![Change::UserChanged(id)]))
            }
            Command::CreatePreAuthKey {
                user,
                prefix,
                hash,
                reusable,
                ephemeral,
                expiration,
                tags,
                now,
            } => {
                let user_id = self.user_id(user)?;
                if let Some(bad) = tags.iter().find(|t| !valid_tag(t)) {
                    return Err(StateError::BadTag(bad.clone()));
                }
                self.next_key_id += 1;
                let k = PreAuthKey {
                    id: self.next_key_id,
                    user_id,
                    prefix: prefix.clone(),
                    hash: hash.clone(),
                    reusable: *reusable,
                    ephemeral: *ephemeral,
                    used: false,
                    expiration: *expiration,
                    created: *now,
                    tags: tags.clone(),
                };
                self.preauth_keys.insert(k.id, k.clone());
                Ok((CommandOutput::PreAuthKey(k), Vec::new()))
            }
            Command::ExpirePreAuthKey { user, prefix, now } => {
                let user_id = self.user_id(user)?;
                let k = self
                    .preauth_keys
                    .values_mut()
                    .find(|k| {
                        k.user_id == user_id
                            && k.prefix.starts_with(prefix.as_str())
                            && !prefix.is_empty()
                    })
                    .ok_or_else(|| StateError::PreAuthKeyNotFound {
                        user: user.clone(),
                        prefix: prefix.clone(),
                    })?;
                k.expiration = Some(*now);
                Ok((CommandOutput::PreAuthKey(k.clone()), Vec::new()))
            }
            Command::CreateApiKey {
                prefix,
                hash,
                expiration,
                now,
            } => {
                if prefix.is_empty() || self.api_keys.values().any(|k| &k.prefix == prefix) {
                    return Err(StateError::ApiKeyExists(prefix.clone()));
                }
                self.next_api_key_id += 1;
                let k = ApiKey {
                    id: self.next_api_key_id,
                    prefix: prefix.clone(),
                    hash: hash.clone(),
                    expiration: *expiration,
                    created: *now,
                };
                self.api_keys.insert(k.id, k.clone());
                Ok((CommandOutput::ApiKey(k), Vec::new()))
            }
            Command::ExpireApiKey { prefix, now } => {
                let k = self
                    .api_keys
                    .values_mut()
                    .find(|k| &k.prefix == prefix)
                    .ok_or_else(|| StateError::ApiKeyNotFound(prefix.clone()))?;
                // Expiring an expired key keeps its original expiry.
                if k.expiration.is_none_or(|e| e > *now) {
                    k.expiration = Some(*now);
                }
                Ok((CommandOutput::ApiKey(k.clone()), Vec::new()))
            }
            Command::DeleteApiKey { prefix } => {
                let id = self
                    .api_keys
                    .values()
                    .find(|k| &k.prefix == prefix)
                    .map(|k| k.id)
                    .ok_or_else(|| StateError::ApiKeyNotFound(prefix.clone()))?;
                self.api_keys.remove(&id);
                Ok((CommandOutput::Done, Vec::new()))
            }
            Command::RegisterNode {
                machine_key,
                node_key,
                old_node_key,
                hostname,
                hostinfo,
                auth,
                expiry,
                ephemeral,
                prefixes,
                now,
            } => {
                let grant = match auth {
                    RegisterAuth::PreAuthKey { hash } => {
                        Some(self.key_grant(hash, machine_key, node_key, *now)?)
                    }
                    RegisterAuth::Existing => None,
                };
                self.register(
                    machine_key,
                    node_key,
                    old_node_key.as_deref(),
                    hostname,
                    hostinfo,
                    grant,
                    *expiry,
                    *ephemeral,
                    prefixes,
                    *now,
                )
            }
            Command::StartLogin { login } => {
                let cutoff = login.created.saturating_sub(LOGIN_TTL_MS);
                let keep =
                    |p: &PendingLogin| p.created > cutoff && p.machine_key != login.machine_key;
                if self.pending_logins.values().filter(|p| keep(p)).count() >= MAX_PENDING_LOGINS {
                    return Err(StateError::TooManyPendingLogins);
                }
                self.pending_logins.retain(|_, p| keep(p));
                self.pending_logins
                    .insert(login.auth_id.clone(), login.clone());
                Ok((CommandOutput::Done, Vec::new()))
            }
            Command::CompleteLogin { auth_id, user, now } => {
                let p = self.pending_login(auth_id, *now)?;
                let user_id = self.user_id(user)?;
                self.complete_login(&p, user_id, *now)
            }
            Command::OidcLogin {
                auth_id,
                issuer,
                subject,
                name,
                display_name,
                now,
            } => {
                let p = self.pending_login(auth_id, *now)?;
                if let Some(id) = self.user_by_identity(issuer, subject).map(|u| u.id) {
                    return self.complete_login(&p, id, *now);
                }
                if let Some(u) = self
                    .user_by_name(name)
                    .filter(|u| u.origin == UserOrigin::Unrecorded && u.oidc.is_none())
                {
                    return Err(StateError::UnlinkedUser {
                        name: u.name.clone(),
                        issuer: issuer.clone(),
                        subject: subject.clone(),
                    });
                }
                let user = User {
                    id: self.next_user_id + 1,
                    name: self.free_user_name(name),
                    display_name: display_name.clone(),
                    created: *now,
                    oidc: Some(OidcIdentity {
                        issuer: issuer.clone(),
                        subject: subject.clone(),
                    }),
                    origin: UserOrigin::Oidc,
                };
                let id = user.id;
                // The registration validates before it changes anything; if it refuses,
                // the user made for it goes too, so the command changes nothing.
                self.users.insert(id, user);
                self.next_user_id = id;
                match self.complete_login(&p, id, *now) {
                    Ok((out, mut changes)) => {
                        changes.insert(0, Change::UserChanged(id));
                        Ok((out, changes))
                    }
                    Err(e) => {
                        self.users.remove(&id);
                        self.next_user_id = id - 1;
                        Err(e)
                    }
                }
            }
            Command::LinkUser { name, identity } => {
                let id = self.user_id(name)?;
                if let Some(want) = identity {
                    if want.issuer.is_empty() || want.subject.is_empty() {
                        return Err(StateError::BadIdentity);
                    }
                    if let Some(other) = self.user_by_identity(&want.issuer, &want.subject) {
                        if other.id != id {
                            return Err(StateError::IdentityTaken(other.name.clone()));
                        }
                    }
                    let current = self.users.get(&id).and_then(|u| u.oidc.as_ref());
                    if let Some(cur) = current.filter(|c| !c.same(&want.issuer, &want.subject)) {
                        return Err(StateError::UserLinked {
                            name: name.clone(),
                            issuer: cur.issuer.clone(),
                            subject: cur.subject.clone(),
                        });
                    }
                }
                let u = self
                    .users
                    .get_mut(&id)
                    .ok_or_else(|| StateError::UserNotFound(name.clone()))?;
                u.oidc = identity.clone();
                Ok((
                    CommandOutput::User(u.clone()),
                    vec![Change::UserChanged(id)],
                ))
            }
            Command::UpdateNode {
                node_key,
                disco_key,
                endpoints,
                hostinfo,
                hostname,
                home_derp,
                now,
            } => {
                let n = self.node_mut_by_node_key(node_key)?;
                let id = n.id;
                if let Some(d) = disco_key {
                    n.disco_key = d.clone();
                }
                if let Some(e) = endpoints {
                    n.endpoints = e.clone();
                }
                if let Some(h) = hostinfo {
                    n.hostinfo = h.clone();
                    n.advertised_routes = super::types::routes_in_hostinfo(h);
                }
                if let Some(h) = hostname {
                    n.hostname = h.clone();
                }
                if let Some(d) = home_derp {
                    n.home_derp = *d;
                }
                n.last_seen = Some(*now);
                if hostinfo.is_some() {
                    self.auto_approve(id);
                }
                Ok((
                    CommandOutput::Node(self.node(id)?),
                    vec![Change::NodeUpserted(id)],
                ))
            }
            Command::SetOnline {
                node_id,
                online,
                replica,
                now,
            } => {
                let n = self
                    .nodes
                    .get_mut(node_id)
                    .ok_or(StateError::NodeNotFound(*node_id))?;
                if *online {
                    n.online = true;
                    n.online_via = Some(*replica);
                } else if n.online_via.is_none_or(|v| v == *replica) {
                    n.online = false;
                    n.online_via = None;
                } else {
                    return Ok((CommandOutput::Done, Vec::new()));
                }
                n.last_seen = Some(*now);
                Ok((
                    CommandOutput::Node(n.clone()),
                    vec![Change::NodeUpserted(*node_id)],
                ))
            }
            Command::ReplicaDown { replica, now } => {
                let mut changes = Vec::new();
                for n in self.nodes.values_mut() {
                    if n.online && n.online_via == Some(*replica) {
                        n.online = false;
                        n.online_via = None;
                        n.last_seen = Some(*now);
                        changes.push(Change::NodeUpserted(n.id));
                    }
                }
                Ok((CommandOutput::Done, changes))
            }
            Command::SetControlKey { key } => {
                if self.control_key.is_none() {
                    self.control_key = Some(key.clone());
                }
                Ok((CommandOutput::Done, Vec::new()))
            }
            Command::Batch { commands } => {
                let mut outputs = Vec::with_capacity(commands.len());
                let mut changes = Vec::new();
                for c in commands {
                    let (r, ch) = self.apply(c);
                    outputs.push(r);
                    changes.extend(ch);
                }
                Ok((CommandOutput::Batch(outputs), changes))
            }
            Command::Restore { tailnet } => {
                if self.control_key.is_some() || !self.users.is_empty() || !self.nodes.is_empty() {
                    return Err(StateError::RestoreNotFresh);
                }
                let mut restored: Tailnet = serde_json::from_str(tailnet)
                    .map_err(|e| StateError::BadBackup(e.to_string()))?;
                if restored.control_key.is_none() {
                    return Err(StateError::BadBackup("it holds no control key".into()));
                }
                restored.replicas = std::mem::take(&mut self.replicas);
                for n in restored.nodes.values_mut() {
                    n.online = false;
                    n.online_via = None;
                }
                *self = restored;
                Ok((CommandOutput::Done, vec![Change::Reset]))
            }
            Command::RegisterReplica { replica } => {
                if self.replicas.get(&replica.id) == Some(replica) {
                    return Ok((CommandOutput::Done, Vec::new()));
                }
                self.replicas.insert(replica.id, replica.clone());
                Ok((CommandOutput::Done, vec![Change::ReplicasChanged]))
            }
            Command::ForgetReplica { id } => {
                if self.replicas.remove(id).is_none() {
                    return Ok((CommandOutput::Done, Vec::new()));
                }
                let mut changes = vec![Change::ReplicasChanged];
                for n in self.nodes.values_mut() {
                    if n.online && n.online_via == Some(*id) {
                        n.online = false;
                        n.online_via = None;
                        changes.push(Change::NodeUpserted(n.id));
                    }
                }
                Ok((CommandOutput::Done, changes))
            }
            Command::LogoutNode { node_key, now } => {
                let n = self.node_mut_by_node_key(node_key)?;
                let id = n.id;
                n.expiry = Some(*now);
                Ok((
                    CommandOutput::Node(n.clone()),
                    vec![Change::NodeUpserted(id)],
                ))
            }
            Command::DeleteNode { id } => {
                self.nodes.remove(id).ok_or(StateError::NodeNotFound(*id))?;
                self.ssh_approvals.remove(id);
                for to in self.ssh_approvals.values_mut() {
                    to.remove(id);
                }
                Ok((CommandOutput::Done, vec![Change::NodeRemoved(*id)]))
            }
            Command::SetTags { id, tags } => {
                if let Some(bad) = tags.iter().find(|t| !valid_tag(t)) {
                    return Err(StateError::BadTag(bad.clone()));
                }
                let n = self
                    .nodes
                    .get_mut(id)
                    .ok_or(StateError::NodeNotFound(*id))?;
                let mut tags = tags.clone();
                tags.sort();
                tags.dedup();
                n.tags = tags;
                Ok((
                    CommandOutput::Node(n.clone()),
                    vec![Change::NodeUpserted(*id)],
                ))
            }
            Command::SetPolicy { text, now } => {
                self.policy = if text.trim().is_empty() {
                    None
                } else {
                    let parsed = crate::policy::parse(text)
                        .map_err(|e| StateError::BadPolicy(e.to_string()))?;
                    Some(PolicyRecord::new(text.clone(), *now, parsed))
                };
                // A new policy may have new check periods: check again.
                self.ssh_approvals.clear();
                // New autoApprovers approve what nodes already advertise.
                let ids: Vec<u64> = self.nodes.keys().copied().collect();
                let mut changes = vec![Change::PolicyChanged];
                for id in ids {
                    if self.auto_approve(id) {
                        changes.push(Change::NodeUpserted(id));
                    }
                }
                Ok((CommandOutput::Done, changes))
            }
            Command::StartSshCheck {
                auth_id,
                src,
                dst,
                ssh_user,
                now,
            } => {
                for id in [src, dst] {
                    if !self.nodes.contains_key(id) {
                        return Err(StateError::NodeNotFound(*id));
                    }
                }
                let cutoff = now.saturating_sub(SSH_CHECK_TTL_MS);
                let live = self.ssh_checks.values().filter(|c| c.created > cutoff);
                if live.count() >= MAX_SSH_CHECKS {
                    return Err(StateError::TooManySshChecks);
                }
                self.ssh_checks.retain(|_, c| c.created > cutoff);
                self.ssh_checks.insert(
                    auth_id.clone(),
                    SshCheck {
                        auth_id: auth_id.clone(),
                        src: *src,
                        dst: *dst,
                        ssh_user: ssh_user.clone(),
                        created: *now,
                        decision: None,
                    },
                );
                Ok((CommandOutput::Done, Vec::new()))
            }
            Command::DecideSshCheck {
                auth_id,
                approve,
                by: _,
                now,
            } => {
                let c = self
                    .ssh_checks
                    .get_mut(auth_id)
                    .filter(|c| c.created > now.saturating_sub(SSH_CHECK_TTL_MS))
                    .filter(|c| c.decision.is_none())
                    .ok_or_else(|| StateError::SshCheckNotFound(auth_id.clone()))?;
                c.decision = Some(*approve);
                if *approve {
                    self.ssh_approvals
                        .entry(c.src)
                        .or_default()
                        .insert(c.dst, *now);
                }
                Ok((
                    CommandOutput::Done,
                    vec![Change::SshCheckDecided(auth_id.clone())],
                ))
            }
            Command::ApproveRoutes { id, routes } => {
                let mut nets = Vec::new();
                for r in routes {
                    let net = r
                        .parse::<ipnet::IpNet>()
                        .map_err(|_| StateError::BadRoute(r.clone()))?;
                    nets.push(net.trunc());
                }
                nets.sort();
                nets.dedup();
                let n = self
                    .nodes
                    .get_mut(id)
                    .ok_or(StateError::NodeNotFound(*id))?;
                n.approved_routes = nets;
                Ok((
                    CommandOutput::Node(n.clone()),
                    vec![Change::NodeUpserted(*id)],
                ))
            }
            Command::RemoveIdleEphemeral { node_ids, cutoff } => {
                let idle: Vec<u64> = node_ids
                    .iter()
                    .copied()
                    .filter(|id| {
                        self.nodes
                            .get(id)
                            .is_some_and(|n| n.idle_ephemeral(*cutoff))
                    })
                    .collect();
                for id in &idle {
                    self.nodes.remove(id);
                }
                Ok((
                    CommandOutput::Done,
                    idle.into_iter().map(Change::NodeRemoved).collect(),
                ))
            }
            Command::ExpireNode { id, now } => {
                let n = self
                    .nodes
                    .get_mut(id)
                    .ok_or(StateError::NodeNotFound(*id))?;
                n.expiry = Some(*now);
                Ok((
                    CommandOutput::Node(n.clone()),
                    vec![Change::NodeUpserted(*id)],
                ))
            }
            Command::RenameNode { id, new_name } => {
                if !valid_label(new_name) {
                    return Err(StateError::BadNodeName(new_name.clone()));
                }
                if self.index.get(&self.nodes).name_taken(new_name, Some(*id)) {
                    return Err(StateError::NodeNameTaken(new_name.clone()));
                }
                let n = self
                    .nodes
                    .get_mut(id)
                    .ok_or(StateError::NodeNotFound(*id))?;
                n.given_name = new_name.clone();
                Ok((
                    CommandOutput::Node(n.clone()),
                    vec![Change::NodeUpserted(*id)],
                ))
            }
        }
    }

    /// The pre-auth key with SHA-256 `hash`, if `machine_key` may register `node_key`
    /// with it now.
    fn key_grant(
        &self,
        hash: &str,
        machine_key: &str,
        node_key: &str,
        now: i64,
    ) -> Result<Grant, StateError> {
        let k = self
            .preauth_keys
            .values()
            .find(|k| k.hash == hash)
            .ok_or(StateError::AuthKeyUnknown)?;
        if k.expiration.is_some_and(|e| e <= now) {
            return Err(StateError::AuthKeyExpired);
        }
        // A used single-use key is refused, except for the very registration it made
        // coming again (a client that retries because the answer was lost: same machine,
        // same node key, node still valid). It never brings back a node that was expired
        // or logged out, nor registers a new node key.
        let reuse_by_owner = self.node_by_machine_key(machine_key).is_some_and(|n| {
            n.auth_key_id == Some(k.id)
                && n.node_key == node_key
                && n.expiry.is_none_or(|e| e > now)
        });
        if k.used && !k.reusable && !reuse_by_owner {
            return Err(StateError::AuthKeyUsed);
        }
        Ok(Grant::from(k))
    }

    fn node(&self, id: u64) -> Result<Node, StateError> {
        self.nodes
            .get(&id)
            .cloned()
            .ok_or(StateError::NodeNotFound(id))
    }

    /// Approves the routes node `id` advertises that the policy's autoApprovers allow it;
    /// whether anything was added.
    fn auto_approve(&mut self, id: u64) -> bool {
        let (Some(record), Some(n)) = (self.policy.as_ref(), self.nodes.get(&id)) else {
            return false;
        };
        let policy = record.policy();
        let who = crate::policy::compile::principal(self, n);
        let new: Vec<ipnet::IpNet> = n
            .advertised_routes
            .iter()
            .filter(|r| !n.approved_routes.contains(r) && policy.auto_approves(&who, r))
            .copied()
            .collect();
        match self.nodes.get_mut(&id) {
            Some(n) if !new.is_empty() => {
                n.approved_routes.extend(new);
                n.approved_routes.sort();
                true
            }
            _ => false,
        }
    }

    /// The tags a newly authorised machine gets: its key's, plus those it asked for with
    /// `--advertise-tags` (`Hostinfo.RequestTags`), each of which the policy's `tagOwners`
    /// must let the registering user (or the key's tags) own.
    fn granted_tags(&self, grant: &Grant, hostinfo: &str) -> Result<Vec<String>, StateError> {
        let requested: Vec<String> = serde_json::from_str::<serde_json::Value>(hostinfo)
            .ok()
            .and_then(|h| h.get("RequestTags").cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let mut tags = grant.tags.clone();
        if requested.is_empty() {
            return Ok(tags);
        }
        let owners = [
            hydrascale_policy::Principal {
                user: self.users.get(&grant.user_id).map(|u| u.name.clone()),
                ..Default::default()
            },
            hydrascale_policy::Principal {
                tags: grant.tags.clone(),
                ..Default::default()
            },
        ];
        let policy = self.policy.as_ref().map(|p| p.policy());
        let refused: Vec<String> = requested
            .iter()
            .filter(|t| {
                !grant.tags.contains(t)
                    && !policy.is_some_and(|p| owners.iter().any(|o| p.may_own_tag(o, t)))
            })
            .cloned()
            .collect();
        if !refused.is_empty() {
            let user = owners[0].user.clone().unwrap_or_default();
            return Err(StateError::TagsNotPermitted {
                tags: refused,
                user,
            });
        }
        tags.extend(requested);
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        machine_key: &str,
        node_key: &str,
        old_node_key: Option<&str>,
        hostname: &str,
        hostinfo: &str,
        key: Option<Grant>,
        expiry: Option<i64>,
        ephemeral: bool,
        prefixes: &Prefixes,
        now: i64,
    ) -> Result<(CommandOutput, Vec<Change>), StateError> {
        let existing = self.node_by_machine_key(machine_key).map(|n| n.id);
        if let Some(other) = self.node_by_node_key(node_key) {
            if Some(other.id) != existing {
                return Err(StateError::NodeKeyInUse(other.id));
            }
        }
        let tags = match &key {
            Some(k) => self.granted_tags(k, hostinfo)?,
            None => Vec::new(),
        };
        match (existing, key) {
            (Some(id), key) => {
                let n = self.nodes.get(&id).ok_or(StateError::NodeNotFound(id))?;
                if key.is_none() {
                    let matches =
                        n.node_key == node_key || old_node_key == Some(n.node_key.as_str());
                    if !matches {
                        return Err(StateError::NodeKeyMismatch);
                    }
                    if n.expiry.is_some_and(|e| e <= now) {
                        return Err(StateError::NodeKeyExpired);
                    }
                }
                let given = if n.hostname == hostname {
                    n.given_name.clone()
                } else {
                    self.unique_name(hostname, Some(id))
                };
                // Its keys and name may change here; rare enough to rebuild for.
                self.index.clear();
                let n = self
                    .nodes
                    .get_mut(&id)
                    .ok_or(StateError::NodeNotFound(id))?;
                n.node_key = node_key.to_string();
                n.hostname = hostname.to_string();
                n.given_name = given;
                n.hostinfo = hostinfo.to_string();
                n.advertised_routes = super::types::routes_in_hostinfo(hostinfo);
                n.last_seen = Some(now);
                if let Some(k) = &key {
                    n.user_id = k.user_id;
                    n.tags = tags;
                    n.ephemeral = k.ephemeral || ephemeral;
                    n.auth_key_id = k.key_id;
                    n.expiry = expiry;
                }
                if let Some(stored) = key
                    .and_then(|k| k.key_id)
                    .and_then(|id| self.preauth_keys.get_mut(&id))
                {
                    stored.used = true;
                }
                self.auto_approve(id);
                let out = self.node(id)?;
                Ok((CommandOutput::Node(out), vec![Change::NodeUpserted(id)]))
            }
            (None, None) => Err(StateError::NodeKeyNotFound),
            (None, Some(k)) => {
                let index = self.index.get(&self.nodes);
                let (ipv4, ipv6, offset) = ipam::allocate_from(
                    prefixes,
                    &index.used4,
                    &index.used6,
                    index.free_from(prefixes),
                )
                .ok_or(StateError::AddressesExhausted)?;
                let given_name = self.unique_name(hostname, None);
                self.next_node_id += 1;
                let id = self.next_node_id;
                let n = Node {
                    id,
                    stable_id: stable_id(id),
                    machine_key: machine_key.to_string(),
                    node_key: node_key.to_string(),
                    disco_key: String::new(),
                    user_id: k.user_id,
                    tags,
                    hostname: hostname.to_string(),
                    given_name,
                    ipv4,
                    ipv6,
                    endpoints: Vec::new(),
                    home_derp: 0,
                    hostinfo: hostinfo.to_string(),
                    created: now,
                    last_seen: Some(now),
                    expiry,
                    ephemeral: k.ephemeral || ephemeral,
                    auth_key_id: k.key_id,
                    online: false,
                    online_via: None,
                    advertised_routes: super::types::routes_in_hostinfo(hostinfo),
                    approved_routes: Vec::new(),
                };
                self.index.added(&n, prefixes, offset);
                self.nodes.insert(id, n);
                if let Some(stored) = k.key_id.and_then(|id| self.preauth_keys.get_mut(&id)) {
                    stored.used = true;
                }
                self.auto_approve(id);
                Ok((
                    CommandOutput::Node(self.node(id)?),
                    vec![Change::NodeUpserted(id)],
                ))
            }
        }
    }
}
