//! Nodes once registered: what their clients report (endpoints, host info, online),
//! and what administrators do to them (tags, routes, expiry, name, removal), and the
//! clean-up of idle ephemeral nodes.

use super::Outcome;
use crate::state::error::StateError;
use crate::state::tailnet::{valid_label, valid_tag, Tailnet};
use crate::state::types::{routes_in_hostinfo, Change, CommandOutput};

impl Tailnet {
    /// What the client of `node_key` reported; none leaves a field as it is.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn update_node(
        &mut self,
        node_key: &str,
        disco_key: Option<&str>,
        endpoints: Option<&[String]>,
        hostinfo: Option<&str>,
        hostname: Option<&str>,
        home_derp: Option<i32>,
        now: i64,
    ) -> Outcome {
        let n = self.node_mut_by_node_key(node_key)?;
        let id = n.id;
        if let Some(d) = disco_key {
            n.disco_key = d.to_string();
        }
        if let Some(e) = endpoints {
            n.endpoints = e.to_vec();
        }
        if let Some(h) = hostinfo {
            n.hostinfo = h.to_string();
            n.advertised_routes = routes_in_hostinfo(h);
        }
        if let Some(h) = hostname {
            n.hostname = h.to_string();
        }
        if let Some(d) = home_derp {
            n.home_derp = d;
        }
        n.last_seen = Some(now);
        if hostinfo.is_some() {
            self.auto_approve(id);
        }
        Ok((
            CommandOutput::Node(self.node(id)?),
            vec![Change::NodeUpserted(id)],
        ))
    }

    /// A replica says node `node_id` streams from it, or no longer does: a late "offline"
    /// from a replica the node has left changes nothing.
    pub(super) fn set_online(
        &mut self,
        node_id: u64,
        online: bool,
        replica: u64,
        now: i64,
    ) -> Outcome {
        let n = self
            .nodes
            .get_mut(&node_id)
            .ok_or(StateError::NodeNotFound(node_id))?;
        if online {
            n.online = true;
            n.online_via = Some(replica);
        } else if n.online_via.is_none_or(|v| v == replica) {
            n.online = false;
            n.online_via = None;
        } else {
            return Ok((CommandOutput::Done, Vec::new()));
        }
        n.last_seen = Some(now);
        Ok((
            CommandOutput::Node(n.clone()),
            vec![Change::NodeUpserted(node_id)],
        ))
    }

    pub(super) fn logout_node(&mut self, node_key: &str, now: i64) -> Outcome {
        let n = self.node_mut_by_node_key(node_key)?;
        let id = n.id;
        n.expiry = Some(now);
        Ok((
            CommandOutput::Node(n.clone()),
            vec![Change::NodeUpserted(id)],
        ))
    }

    /// Removes node `id` and the SSH approvals from and into it.
    pub(super) fn delete_node(&mut self, id: u64) -> Outcome {
        self.nodes.remove(&id).ok_or(StateError::NodeNotFound(id))?;
        self.ssh_approvals.remove(&id);
        for to in self.ssh_approvals.values_mut() {
            to.remove(&id);
        }
        Ok((CommandOutput::Done, vec![Change::NodeRemoved(id)]))
    }

    pub(super) fn set_tags(&mut self, id: u64, tags: &[String]) -> Outcome {
        if let Some(bad) = tags.iter().find(|t| !valid_tag(t)) {
            return Err(StateError::BadTag(bad.clone()));
        }
        let n = self
            .nodes
            .get_mut(&id)
            .ok_or(StateError::NodeNotFound(id))?;
        let mut tags = tags.to_vec();
        tags.sort();
        tags.dedup();
        n.tags = tags;
        Ok((
            CommandOutput::Node(n.clone()),
            vec![Change::NodeUpserted(id)],
        ))
    }

    /// Replaces the routes node `id` may serve with `routes` (prefixes, truncated).
    pub(super) fn approve_routes(&mut self, id: u64, routes: &[String]) -> Outcome {
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
            .get_mut(&id)
            .ok_or(StateError::NodeNotFound(id))?;
        n.approved_routes = nets;
        Ok((
            CommandOutput::Node(n.clone()),
            vec![Change::NodeUpserted(id)],
        ))
    }

    /// Removes those of `node_ids` that are ephemeral, offline and last seen at or before
    /// `cutoff`, as this state has them: one that reconnected meanwhile stays.
    pub(super) fn remove_idle_ephemeral(&mut self, node_ids: &[u64], cutoff: i64) -> Outcome {
        let idle: Vec<u64> = node_ids
            .iter()
            .copied()
            .filter(|id| self.nodes.get(id).is_some_and(|n| n.idle_ephemeral(cutoff)))
            .collect();
        for id in &idle {
            self.nodes.remove(id);
        }
        Ok((
            CommandOutput::Done,
            idle.into_iter().map(Change::NodeRemoved).collect(),
        ))
    }

    pub(super) fn expire_node(&mut self, id: u64, now: i64) -> Outcome {
        self.set_node_expiry(id, Some(now))
    }

    pub(super) fn set_node_expiry(&mut self, id: u64, expiry: Option<i64>) -> Outcome {
        let n = self
            .nodes
            .get_mut(&id)
            .ok_or(StateError::NodeNotFound(id))?;
        n.expiry = expiry;
        Ok((
            CommandOutput::Node(n.clone()),
            vec![Change::NodeUpserted(id)],
        ))
    }

    pub(super) fn rename_node(&mut self, id: u64, new_name: &str) -> Outcome {
        if !valid_label(new_name) {
            return Err(StateError::BadNodeName(new_name.to_string()));
        }
        if self.index.get(&self.nodes).name_taken(new_name, Some(id)) {
            return Err(StateError::NodeNameTaken(new_name.to_string()));
        }
        let n = self
            .nodes
            .get_mut(&id)
            .ok_or(StateError::NodeNotFound(id))?;
        n.given_name = new_name.to_string();
        Ok((
            CommandOutput::Node(n.clone()),
            vec![Change::NodeUpserted(id)],
        ))
    }
}
