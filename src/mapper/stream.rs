//! What one map stream sends: a full map, or a delta against what this stream last sent,
//! so a reconnecting or lagging stream converges on the committed state without any
//! shared bookkeeping. The peers themselves come rendered from the [`PeerCache`].

use serde_json::{json, Value};

use super::filters::filters;
use super::node::{dns_config, node_json, policy, user_profiles, PATCHABLE};
use super::peers::{Entry, Kinds, PeerCache, Since};
use crate::config::Config;
use crate::policy::{compile, Policy, Principal};
use crate::state::{Node, Tailnet};
use crate::tailcfg::{rfc3339, DebugSettings, MapResponse, PacketFilter, Shared};

/// What one map stream has told its client so far: O(1), whatever the tailnet's size.
/// Which peers the client holds, and in which version, follows from the sequence number
/// it has caught up to and the shared [`PeerCache`]'s record of what changed when.
pub struct StreamView {
    pub self_id: u64,
    /// The peer cache's sequence number as of the last message sent.
    synced: u64,
    self_sent: Option<Value>,
    /// Who the node is to the policy, when its filter and peers were last computed.
    principal: Principal,
    filter_sent: Option<PacketFilter>,
    ssh_sent: Option<Value>,
}

/// A node a delta looks at: its id, the node (`None`: gone), and whether the client held
/// it and should hold it now, when its kind of node already answered that.
type Look<'a> = (u64, Option<&'a Node>, Option<(bool, bool)>);

/// Whether a peer that is `peer` to `policy` belongs in the map of the node that is `me`.
fn visible(policy: Option<&Policy>, me: &Principal, peer: &Principal) -> bool {
    policy.is_none_or(|p| p.connected(me, peer))
}

/// Why a stream cannot go on with a delta.
#[derive(Debug, PartialEq)]
pub enum Resync {
    /// The stream's own node is gone: end the stream.
    Gone,
    /// Too much changed to tell what the client holds: send a full map.
    Full,
}

/// A peer's JSON as this reader sends it: the shared rendering, plus `Expired` once its
/// key has expired by the reader's clock (which no applied change announces).
fn peer_json(e: &Entry, n: &Node, now: i64) -> Shared {
    match n.expiry {
        Some(exp) if exp <= now => {
            let mut v = (*e.json).clone();
            if let Some(o) = v.as_object_mut() {
                o.insert("Expired".into(), json!(true));
            }
            Shared::new(v)
        }
        _ => Shared(e.json.clone(), e.text.clone(), n.id),
    }
}

/// What each of [`PATCHABLE`] is called in a `tailcfg.PeerChange`; `None`: not sent
/// (the legacy `DERP` string follows from `DERPRegion`).
const PATCH_NAMES: [Option<&str>; PATCHABLE.len()] = [
    Some("Endpoints"),
    Some("DERPRegion"),
    None,
    Some("Online"),
    Some("LastSeen"),
    Some("DiscoKey"),
    Some("Key"),
    Some("KeyExpiry"),
];

/// A `tailcfg.PeerChange` with the patchable fields of `e` changed after `since`.
fn patch_since(id: u64, e: &Entry, since: u64) -> Option<Value> {
    let mut p = serde_json::Map::new();
    for ((name, at), value) in PATCH_NAMES.iter().zip(e.patched).zip(&e.patch_values) {
        if let (Some(name), Some(v), true) = (name, value, at > since) {
            p.insert((*name).to_string(), v.clone());
        }
    }
    if p.is_empty() {
        return None;
    }
    p.insert("NodeID".into(), json!(id));
    Some(Value::Object(p))
}

impl StreamView {
    pub fn new(self_id: u64) -> Self {
        Self {
            self_id,
            synced: 0,
            self_sent: None,
            principal: Principal::default(),
            filter_sent: None,
            ssh_sent: None,
        }
    }

    /// A complete map; replaces everything the client had.
    pub fn full(
        &mut self,
        t: &Tailnet,
        cache: &PeerCache,
        config: &Config,
        derp_map: &Value,
        now: i64,
    ) -> Option<MapResponse> {
        let me = t.nodes.get(&self.self_id)?;
        let peers_now = cache.read();
        let base = &config.base_domain;
        // The node's own entry is rendered here, not taken from the cache: it is one node,
        // and `Expired` (by this replica's clock) matters most to the node itself.
        let self_json = node_json(t, me, &peers_now.primaries, config, now);
        self.principal = compile::principal(t, me);
        let mut peers = Vec::new();
        for n in t.nodes.values().filter(|n| n.id != self.self_id) {
            let Some(e) = peers_now.nodes.get(&n.id) else {
                continue;
            };
            if visible(policy(t), &self.principal, &e.principal) {
                peers.push(peer_json(e, n, now));
            }
        }
        let had_peers = self.synced > 0;
        self.synced = peers_now.seq;
        drop(peers_now);
        let (filter, ssh) = filters(t, cache, me, config);
        self.filter_sent = Some(filter.clone());
        self.ssh_sent = ssh.clone();
        self.self_sent = Some(self_json.clone());
        let mut resp = MapResponse {
            node: Some(self_json),
            derp_map: Some(derp_map.clone()),
            dns_config: Some(dns_config(t, config)),
            domain: base.clone(),
            packet_filter: Some(filter),
            ssh_policy: ssh,
            user_profiles: Some(user_profiles(t)),
            collect_services: Some(false),
            control_time: Some(rfc3339(now)),
            // Privacy by default: the client keeps its logs to itself (headscale does
            // the same); `client_log_upload = true` leaves its own setting alone.
            debug: (!config.client_log_upload).then_some(DebugSettings {
                disable_log_tail: true,
            }),
            ..Default::default()
        };
        if peers.is_empty() {
            // An empty Peers list means "unchanged" to the client; a full map that leaves
            // no peers must remove them by id. Which ids the client holds is not kept, so
            // name every id ever given out: removing an unknown id is a no-op for it.
            if had_peers {
                let gone: Vec<u64> = (1..=t.last_node_id())
                    .filter(|id| *id != self.self_id)
                    .collect();
                resp.peers_removed = (!gone.is_empty()).then_some(gone);
            }
        } else {
            resp.peers = Some(peers);
        }
        Some(resp)
    }

    /// The key under which this stream's next delta is the same message as that of every
    /// other stream with the same key: the sequence number it has caught up to and the
    /// cache's current one. Only while no policy is or was in force since then (every node
    /// sees every other, under the same packet filter), nothing re-rendered every node
    /// since, and nothing touched the stream's own node; `None` otherwise. Call with the
    /// same state guard as the [`Self::delta`] it stands for, so the two see one state.
    pub fn shared_key(&self, t: &Tailnet, cache: &PeerCache) -> Option<(u64, u64)> {
        let peers = cache.read();
        let since = self.synced;
        if since == 0 || t.policy.is_some() || peers.last_all > since {
            return None;
        }
        if peers.policy_at(since)?.is_some() {
            return None;
        }
        let me = peers.nodes.get(&self.self_id)?;
        (me.touched <= since).then_some((since, peers.seq))
    }

    /// The peer cache's sequence number this stream has caught up to.
    pub fn synced(&self) -> u64 {
        self.synced
    }

    /// Moves the stream on to `seq`, having sent (or found nothing to send in) the delta
    /// another stream computed under a key from [`Self::shared_key`].
    pub fn advance(&mut self, seq: u64) {
        self.synced = seq;
    }

    /// A delta for every node the cache changed since this stream's last message (all of
    /// them after a policy change that connects other pairs of nodes); `None` when nothing
    /// visible changed.
    pub fn delta(
        &mut self,
        t: &Tailnet,
        cache: &PeerCache,
        config: &Config,
        now: i64,
    ) -> Result<Option<MapResponse>, Resync> {
        let mut resp = MapResponse::default();
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        let mut patches = Vec::new();
        let mut new_user = false;
        let me = t.nodes.get(&self.self_id).ok_or(Resync::Gone)?;
        let peers = cache.read();
        let since = self.synced;
        // Which peers the client holds follows from the policy it was last sent under.
        let before = peers.policy_at(since).ok_or(Resync::Full)?;
        let current = policy(t);
        // What changed comes from the cache's history, not from the announcements the
        // stream was woken by: the cache may have moved on before the stream read it.
        let missed = peers.since(since).ok_or(Resync::Full)?;
        let filters_changed = missed.filters;
        let principal = peers
            .nodes
            .get(&self.self_id)
            .map(|e| e.principal.clone())
            .unwrap_or_else(|| compile::principal(t, me));
        // A policy change connecting other pairs, or the node itself becoming someone else
        // to the policy (tags, addresses), may change every peer's visibility, not only
        // the touched ones'.
        let walk_all =
            missed.everything || missed.reach || (principal != self.principal && current.is_some());
        let touched = looks(
            t,
            &peers.kinds,
            missed,
            (before, current),
            (&self.principal, &principal),
            walk_all,
            &mut removed,
        );
        for (id, n, known) in touched {
            if id == self.self_id {
                if let Some((_, false)) = known {
                    // Here only as one of its kind, which it stops seeing: removed with the
                    // rest, a no-op for the client (its own node is never among its peers),
                    // so that every node of the kind sends the same list, made and
                    // compressed once (`shared_frames::FrameCache::removed_text`).
                    // Without it, 1,000 servers hidden from all at 10,000 nodes each
                    // wrote and compressed a list of 9,999 ids of their own.
                    removed.push(id);
                    continue;
                }
                let j = node_json(t, me, &peers.primaries, config, now);
                if self.self_sent.as_ref() != Some(&j) {
                    self.self_sent = Some(j.clone());
                    resp.node = Some(j);
                }
                continue;
            }
            if let Some((_, false)) = known {
                // Its kind went out of sight: nothing of the node itself matters.
                removed.push(id);
                continue;
            }
            let (Some(n), Some(e)) = (n, peers.nodes.get(&id)) else {
                // Gone. Removing an id the client never had is a no-op for it.
                removed.push(id);
                continue;
            };
            let (was_visible, now_visible) = match known {
                Some((was, is)) => (Some(was), is),
                None => (
                    // Whether the client holds it: it existed at `since` and was visible
                    // then. `None` when the peer's principal changed twice since; resend
                    // or remove.
                    if e.created > since {
                        Some(false)
                    } else {
                        e.principal_at(since)
                            .map(|p| visible(before, &self.principal, p))
                    },
                    visible(current, &principal, &e.principal),
                ),
            };
            match (was_visible, now_visible) {
                (Some(false), false) => {}
                (_, false) => removed.push(id),
                (Some(false) | None, true) => {
                    new_user = true;
                    changed.push(peer_json(e, n, now));
                }
                (Some(true), true) => {
                    if e.changed() <= since {
                        continue;
                    }
                    if e.reshaped > since {
                        changed.push(peer_json(e, n, now));
                    } else if let Some(p) = patch_since(id, e, since) {
                        patches.push(p);
                    }
                }
            }
        }
        self.synced = peers.seq;
        self.principal = principal;
        drop(peers);
        if !changed.is_empty() {
            resp.peers_changed = Some(changed);
        }
        if !removed.is_empty() {
            resp.peers_removed = Some(removed);
        }
        if !patches.is_empty() {
            resp.peers_changed_patch = Some(patches);
        }
        if new_user {
            resp.user_profiles = Some(user_profiles(t));
        }
        Ok(self.finish(resp, t, cache, me, config, filters_changed))
    }

    /// Adds the packet filter and SSH policy to a delta when they may have changed and
    /// differ from what the client holds; `None` when the delta carries nothing at all.
    fn finish(
        &mut self,
        mut resp: MapResponse,
        t: &Tailnet,
        cache: &PeerCache,
        me: &Node,
        config: &Config,
        filters_changed: bool,
    ) -> Option<MapResponse> {
        // Who may reach this node changes only when a peer appears, goes or changes more
        // than its endpoints; endpoint patches, the bulk of all updates, skip this.
        if filters_changed
            || resp.node.is_some()
            || resp.peers_changed.is_some()
            || resp.peers_removed.is_some()
        {
            let (filter, ssh) = filters(t, cache, me, config);
            if self.filter_sent.as_ref() != Some(&filter) {
                self.filter_sent = Some(filter.clone());
                resp.packet_filter = Some(filter);
            }
            if self.ssh_sent != ssh {
                self.ssh_sent = ssh.clone();
                resp.ssh_policy = Some(ssh.unwrap_or_else(|| json!({ "rules": [] })));
            }
        }
        let empty = resp.node.is_none()
            && resp.peers_changed.is_none()
            && resp.peers_removed.is_none()
            && resp.peers_changed_patch.is_none()
            && resp.packet_filter.is_none()
            && resp.ssh_policy.is_none();
        (!empty).then_some(resp)
    }
}

/// The nodes a delta looks at (see [`Look`]): the ones touched since, all of them when
/// the node may see others than before (`walk_all`), or, after a policy change connecting
/// other pairs of nodes, the touched ones plus those of the kinds the node sees now and
/// did not (`was_me` and `is_me` are who it was and is to the policy), or the other way
/// round. Reserves room in `removed` for the kinds going out of sight.
fn looks<'a>(
    t: &'a Tailnet,
    kinds: &Kinds,
    missed: Since,
    (before, current): (Option<&Policy>, Option<&Policy>),
    (was_me, is_me): (&Principal, &Principal),
    walk_all: bool,
    removed: &mut Vec<u64>,
) -> Box<dyn Iterator<Item = Look<'a>> + 'a> {
    // After a policy change connecting other pairs, unless a policy names nodes by
    // address, the nodes are asked about by kind: those of the kinds this node sees now
    // and did not, or the other way round, join the touched ones. Every other node's
    // visibility is what it was, and it did not change since (or it would be touched).
    let by_address = [before, current]
        .iter()
        .flatten()
        .any(|p| p.names_addresses());
    if missed.reach && !missed.everything && !by_address {
        let flipped: Vec<(&Vec<u64>, bool, bool)> = kinds
            .0
            .iter()
            .map(|(kind, members)| {
                let was = visible(before, was_me, kind);
                (members, was, visible(current, is_me, kind))
            })
            .filter(|(_, was, is)| was != is)
            .collect();
        // Sized up front: thousands of ids grown one push at a time were a chain of
        // reallocations per stream, and glibc's malloc the largest cost left.
        let mut look: Vec<(u64, Option<(bool, bool)>)> = Vec::with_capacity(
            missed.ids.len() + flipped.iter().map(|(m, ..)| m.len()).sum::<usize>(),
        );
        look.extend(missed.ids.iter().map(|id| (*id, None)));
        for (members, was, is) in flipped {
            if !is {
                removed.reserve(members.len());
            }
            look.extend(members.iter().map(|id| (*id, Some((was, is)))));
        }
        // In id order, which keeps runs of peers whole for the frame cache; a node
        // touched since is asked about itself, not answered for by its kind. The
        // parts are each in id order already: one part (the usual case: nothing
        // touched, one kind in or out of sight) needs no sort at all, and a stable
        // sort merges several in linear time.
        let key = |(id, known): &(u64, Option<(bool, bool)>)| (*id, known.is_some());
        if !look.is_sorted_by_key(key) {
            look.sort_by_key(key);
        }
        look.dedup_by_key(|(id, _)| *id);
        Box::new(look.into_iter().map(|(id, known)| {
            // A node to remove is not looked up (see below).
            let n = match known {
                Some((_, false)) => None,
                _ => t.nodes.get(&id),
            };
            (id, n, known)
        }))
    } else if walk_all {
        // Walking every node goes through the nodes in order (no lookup per node),
        // then the touched ones no longer there: a node deleted since must still be
        // removed.
        let gone: Vec<u64> = missed
            .ids
            .iter()
            .filter(|id| !t.nodes.contains_key(id))
            .copied()
            .collect();
        Box::new(
            t.nodes
                .iter()
                .map(|(id, n)| (*id, Some(n), None))
                .chain(gone.into_iter().map(|id| (id, None, None))),
        )
    } else {
        Box::new(
            missed
                .ids
                .into_iter()
                .map(|id| (id, t.nodes.get(&id), None)),
        )
    }
}

#[cfg(test)]
mod tests;
