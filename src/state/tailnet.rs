//! `Tailnet`: the whole replicated state, the lookups its commands share, and the pure
//! function that changes it (`apply`; each command's own method is in `state/apply/`).
//!
//! `apply` validates a command completely before mutating anything, so a refused command
//! leaves the state exactly as it was, on every replica.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::StateError;
use super::types::{
    ApiKey, Change, Command, CommandOutput, Node, PendingLogin, PolicyRecord, PreAuthKey, Replica,
    SshCheck, TlsState, User,
};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tailnet {
    pub users: BTreeMap<u64, User>,
    pub nodes: BTreeMap<u64, Node>,
    pub preauth_keys: BTreeMap<u64, PreAuthKey>,
    /// The cluster's control key as `privkey:<hex>`; every replica serves with it. A
    /// [`Secret`](super::types::Secret): a debug print of the state does not show it.
    #[serde(default)]
    pub control_key: Option<super::types::Secret>,
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
    /// The cluster's ACME certificate (its private key included) and the lease that lets
    /// one replica at a time order it.
    #[serde(default)]
    pub tls: TlsState,
    /// The DNS settings clients get; none until the founding replica's `[dns]` seeds them
    /// (replicas serve their own `[dns]` meanwhile).
    #[serde(default)]
    pub dns: Option<super::dns::DnsSettings>,
    #[serde(default)]
    pub(super) next_api_key_id: u64,
    pub(super) next_user_id: u64,
    pub(super) next_node_id: u64,
    pub(super) next_key_id: u64,
    #[serde(skip)]
    pub(super) index: super::index::Index,
}

type Applied = (Result<CommandOutput, StateError>, Vec<Change>);

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

pub(super) fn stable_id(id: u64) -> String {
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

    pub(super) fn node_mut_by_node_key(&mut self, k: &str) -> Result<&mut Node, StateError> {
        let id = self.index.get(&self.nodes).by_node_key(k);
        id.and_then(|id| self.nodes.get_mut(&id))
            .ok_or(StateError::NodeKeyNotFound)
    }

    pub fn node_by_machine_key(&self, k: &str) -> Option<&Node> {
        let id = self.index.get(&self.nodes).by_machine_key(k)?;
        self.nodes.get(&id)
    }

    /// What the policy knows about `n`: its user (unless tagged), tags and addresses.
    pub fn principal(&self, n: &Node) -> hydrascale_policy::Principal {
        hydrascale_policy::Principal {
            user: if n.tags.is_empty() {
                self.users.get(&n.user_id).map(|u| u.name.clone())
            } else {
                None
            },
            tags: n.tags.clone(),
            ips: vec![n.ipv4.into(), n.ipv6.into()],
            routes: n.served_routes(),
        }
    }

    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.users.values().find(|u| u.name == name)
    }

    pub(super) fn user_id(&self, name: &str) -> Result<u64, StateError> {
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

    pub(super) fn unique_name(&self, wanted: &str, except: Option<u64>) -> String {
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
            control_key: Some(super::types::Secret::new(control_key)),
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
                | Command::SetNodeExpiry { .. }
                | Command::DeletePreAuthKey { .. }
                | Command::RejectLogin { .. }
                | Command::SetDns { .. }
                | Command::LinkUser { .. }
                | Command::Acme { .. }
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

    pub(super) fn node(&self, id: u64) -> Result<Node, StateError> {
        self.nodes
            .get(&id)
            .cloned()
            .ok_or(StateError::NodeNotFound(id))
    }
}
