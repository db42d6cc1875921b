//! Registering a machine as a node: what authorises it ([`Grant`]: a pre-auth key or an
//! administrator's approval of a login), the tags it gets, and the node record made or
//! renewed, with its name and addresses.

use super::Outcome;
use crate::state::error::StateError;
use crate::state::ipam;
use crate::state::tailnet::{stable_id, Tailnet};
use crate::state::types::{
    routes_in_hostinfo, Change, CommandOutput, Node, PreAuthKey, Prefixes, RegisterAuth,
    RegisterMethod,
};

/// What authorises a registration: a pre-auth key, or an administrator's interactive-login
/// approval for a user (no key, no tags).
pub(super) struct Grant {
    pub(super) user_id: u64,
    pub(super) tags: Vec<String>,
    pub(super) ephemeral: bool,
    pub(super) key_id: Option<u64>,
    pub(super) method: RegisterMethod,
}

impl From<&PreAuthKey> for Grant {
    fn from(k: &PreAuthKey) -> Self {
        Grant {
            user_id: k.user_id,
            tags: k.tags.clone(),
            ephemeral: k.ephemeral,
            key_id: Some(k.id),
            method: RegisterMethod::AuthKey,
        }
    }
}

/// What the registering machine says about itself (a `RegisterNode` command, or the
/// login an administrator approved).
pub(super) struct Registration<'a> {
    pub(super) machine_key: &'a str,
    pub(super) node_key: &'a str,
    /// The node key it had, when it renews one.
    pub(super) old_node_key: Option<&'a str>,
    pub(super) hostname: &'a str,
    pub(super) hostinfo: &'a str,
    pub(super) expiry: Option<i64>,
    pub(super) ephemeral: bool,
    pub(super) prefixes: &'a Prefixes,
    pub(super) now: i64,
}

impl Tailnet {
    pub(super) fn register_node(&mut self, r: &Registration<'_>, auth: &RegisterAuth) -> Outcome {
        let grant = match auth {
            RegisterAuth::PreAuthKey { hash } => {
                Some(self.key_grant(hash, r.machine_key, r.node_key, r.now)?)
            }
            RegisterAuth::Existing => None,
        };
        self.register(r, grant)
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

    /// Registers `r`'s machine: renews its node if it has one (with no grant, only for
    /// the node key it holds), else makes a node, which needs a grant.
    pub(super) fn register(&mut self, r: &Registration<'_>, key: Option<Grant>) -> Outcome {
        let existing = self.node_by_machine_key(r.machine_key).map(|n| n.id);
        if let Some(other) = self.node_by_node_key(r.node_key) {
            if Some(other.id) != existing {
                return Err(StateError::NodeKeyInUse(other.id));
            }
        }
        let tags = match &key {
            Some(k) => self.granted_tags(k, r.hostinfo)?,
            None => Vec::new(),
        };
        match (existing, key) {
            (Some(id), key) => self.renew(id, r, key, tags),
            (None, None) => Err(StateError::NodeKeyNotFound),
            (None, Some(k)) => self.add_node(r, &k, tags),
        }
    }

    /// Registers node `id`'s machine again: a new node key, host name or grant.
    fn renew(
        &mut self,
        id: u64,
        r: &Registration<'_>,
        key: Option<Grant>,
        tags: Vec<String>,
    ) -> Outcome {
        let n = self.nodes.get(&id).ok_or(StateError::NodeNotFound(id))?;
        if key.is_none() {
            let matches = n.node_key == r.node_key || r.old_node_key == Some(n.node_key.as_str());
            if !matches {
                return Err(StateError::NodeKeyMismatch);
            }
            if n.expiry.is_some_and(|e| e <= r.now) {
                return Err(StateError::NodeKeyExpired);
            }
        }
        let given = if n.hostname == r.hostname {
            n.given_name.clone()
        } else {
            self.unique_name(r.hostname, Some(id))
        };
        // Its keys and name may change here; rare enough to rebuild for.
        self.index.clear();
        let n = self
            .nodes
            .get_mut(&id)
            .ok_or(StateError::NodeNotFound(id))?;
        n.node_key = r.node_key.to_string();
        n.hostname = r.hostname.to_string();
        n.given_name = given;
        n.hostinfo = r.hostinfo.to_string();
        n.advertised_routes = routes_in_hostinfo(r.hostinfo);
        n.last_seen = Some(r.now);
        if let Some(k) = &key {
            n.user_id = k.user_id;
            n.tags = tags;
            n.ephemeral = k.ephemeral || r.ephemeral;
            n.auth_key_id = k.key_id;
            n.expiry = r.expiry;
            n.register_method = k.method;
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

    /// Makes a node of `r`'s machine, with the next id, a unique name and the lowest free
    /// addresses.
    fn add_node(&mut self, r: &Registration<'_>, k: &Grant, tags: Vec<String>) -> Outcome {
        let index = self.index.get(&self.nodes);
        let (ipv4, ipv6, offset) = ipam::allocate_from(
            r.prefixes,
            &index.used4,
            &index.used6,
            index.free_from(r.prefixes),
        )
        .ok_or(StateError::AddressesExhausted)?;
        let given_name = self.unique_name(r.hostname, None);
        self.next_node_id += 1;
        let id = self.next_node_id;
        let n = Node {
            id,
            stable_id: stable_id(id),
            machine_key: r.machine_key.to_string(),
            node_key: r.node_key.to_string(),
            disco_key: String::new(),
            user_id: k.user_id,
            tags,
            hostname: r.hostname.to_string(),
            given_name,
            ipv4,
            ipv6,
            endpoints: Vec::new(),
            home_derp: 0,
            hostinfo: r.hostinfo.to_string(),
            created: r.now,
            last_seen: Some(r.now),
            expiry: r.expiry,
            ephemeral: k.ephemeral || r.ephemeral,
            auth_key_id: k.key_id,
            online: false,
            online_via: None,
            advertised_routes: routes_in_hostinfo(r.hostinfo),
            approved_routes: Vec::new(),
            register_method: k.method,
        };
        self.index.added(&n, r.prefixes, offset);
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
