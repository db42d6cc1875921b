//! The map plane's shared picture of every node as its peers see it, kept in step with
//! the applied state.
//!
//! Every map stream used to render each peer itself and keep a copy of everything it had
//! sent, so one replica held N streams × N peers of JSON and one change cost every stream
//! a scan of all nodes. Here each node is rendered once per change that touches it, with
//! its policy principal and the sequence numbers of what changed; a stream keeps only the
//! sequence number it has caught up to and works out from these which peers to add, drop,
//! patch or resend. Memory is O(N) per replica plus O(1) per stream.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use serde_json::Value;

use super::node::{node_json, primary_routes, Primaries, PATCHABLE};
use crate::config::Config;
use crate::policy::{compile, same_reach, Policy, Principal};
use crate::state::{Change, Observer, Tailnet};

/// One node as peers see it, and when each part of it last changed.
pub struct Entry {
    /// `tailcfg.Node` without `Expired` (which depends on the reader's clock).
    pub json: Arc<Value>,
    /// `json` as text, serialized once for every stream that sends it.
    pub text: Arc<str>,
    /// Who the node is to the policy now.
    pub principal: Principal,
    /// The principal before its last change, and the sequence number of that change.
    previous: Option<(u64, Principal)>,
    principal_since: u64,
    /// When the node appeared.
    pub created: u64,
    /// Last change to a field a `PeersChangedPatch` cannot carry.
    pub reshaped: u64,
    /// Last change to each of [`PATCHABLE`], in its order.
    pub patched: [u64; PATCHABLE.len()],
    /// The last sequence number whose history names this node, whether or not its
    /// rendering changed.
    pub touched: u64,
    /// The values of [`PATCHABLE`] in `json`, taken out once: every stream builds its
    /// patches from these, and looking each up in `json` again per stream and peer was
    /// the larger part of computing a delta in a join storm.
    pub patch_values: [Option<Value>; PATCHABLE.len()],
}

impl Entry {
    /// The node's principal as of sequence number `seq`, if still known (`None` when it
    /// changed twice since then; the caller then resends or removes to be safe).
    pub fn principal_at(&self, seq: u64) -> Option<&Principal> {
        if self.principal_since <= seq {
            return Some(&self.principal);
        }
        match &self.previous {
            Some((since, p)) if *since <= seq => Some(p),
            _ => None,
        }
    }

    /// The latest change of any kind.
    pub fn changed(&self) -> u64 {
        self.patched
            .iter()
            .copied()
            .chain([self.reshaped, self.created, self.principal_since])
            .max()
            .unwrap_or(0)
    }
}

#[derive(Default)]
pub struct Peers {
    /// Counts applied changes (not commands): the clock streams measure "since" with.
    pub seq: u64,
    pub nodes: HashMap<u64, Entry>,
    pub primaries: Primaries,
    /// The policy in force (`None`: everyone reaches everyone) and since when; the one
    /// before it, so a stream can tell which peers the previous policy let it see.
    policy: (u64, PolicyRef),
    previous_policy: Option<(u64, PolicyRef)>,
    /// What each recent sequence number touched, oldest first, at most [`LOG`] entries.
    log: VecDeque<(u64, Touched)>,
    /// The last sequence number that touched every node (a policy change or a restore).
    pub last_all: u64,
    /// The last sequence number at which the policy changed or a node appeared, went or
    /// became someone else to it: what the rules' resolved sources depend on.
    reach_seq: u64,
    /// The nodes by kind, as of the last policy change that connected other pairs of
    /// nodes (see [`Touched::Reach`]).
    pub kinds: Arc<Kinds>,
}

/// The nodes grouped by what they are to a policy that names no addresses: user, tags and
/// routes. Such a policy connects a node to every node of a kind or to none, so after it
/// changes a stream asks it once per kind, not once per node, and looks only at the nodes
/// of the kinds it now sees or stops seeing.
#[derive(Default)]
pub struct Kinds(pub Vec<(Principal, Vec<u64>)>);

impl Kinds {
    fn of(nodes: &HashMap<u64, Entry>) -> Self {
        let mut index = HashMap::new();
        let mut kinds: Vec<(Principal, Vec<u64>)> = Vec::new();
        for (id, e) in nodes {
            let p = &e.principal;
            let i = *index
                .entry((&p.user, &p.tags, &p.routes))
                .or_insert_with(|| {
                    let kind = Principal {
                        ips: Vec::new(),
                        ..p.clone()
                    };
                    kinds.push((kind, Vec::new()));
                    kinds.len() - 1
                });
            kinds[i].1.push(*id);
        }
        // In id order, once per policy change: every stream's delta then merges a few
        // sorted lists instead of sorting thousands of ids (the largest part of a change
        // that hid 1,000 servers from 9,000 members, at 10,000 nodes).
        for (_, members) in &mut kinds {
            members.sort_unstable();
        }
        Kinds(kinds)
    }
}

/// A policy as the cache keeps it (`None`: no policy, everyone reaches everyone).
type PolicyRef = Option<Arc<Policy>>;

/// What one sequence number changed, as the history keeps it.
#[derive(Debug, Clone, PartialEq)]
enum Touched {
    /// These nodes (rendering, principal, or only named by a command).
    Nodes(Vec<u64>),
    /// A policy change that connects the same pairs of nodes as the policy before it:
    /// every packet filter may differ, the peers of every map do not; these nodes'
    /// renderings changed with it (their capabilities, say).
    Filters(Vec<u64>),
    /// A policy change that connects other pairs of nodes: every map's peers may differ,
    /// by kind of node (see [`Kinds`]); these nodes' renderings or principals changed
    /// with it.
    Reach(Vec<u64>),
    /// Every node: a restore.
    All,
}

/// Sequence numbers of history kept for streams that fall behind; one further back gets a
/// full map.
const LOG: usize = 8192;

/// What changed after a stream's sequence number.
#[derive(Default)]
pub struct Since {
    pub ids: BTreeSet<u64>,
    /// Every node may have changed (a restore).
    pub everything: bool,
    /// A policy change connected other pairs of nodes: any node may have come into or
    /// gone out of any map, by kind of node (see [`Peers::kinds`]).
    pub reach: bool,
    /// The policy changed, so every packet filter may have, but not which peers any map
    /// holds (unless `reach` or `everything`).
    pub filters: bool,
}

impl Peers {
    /// The nodes touched after sequence number `seq`, from the history; `None` when it
    /// does not reach back that far. A stream must look at these, not only at the changes
    /// it was told of: the cache may have moved on between a change's announcement and
    /// the stream reading it.
    pub fn since(&self, seq: u64) -> Option<Since> {
        if seq >= self.seq {
            return Some(Since::default());
        }
        let oldest = self.log.front().map(|(s, _)| *s)?;
        if oldest > seq + 1 {
            return None;
        }
        let mut out = Since::default();
        // Sequence numbers rise along the history: start at the first one after `seq`
        // instead of walking the whole history on every update of every stream.
        let first = self.log.partition_point(|(s, _)| *s <= seq);
        for (_, touched) in self.log.range(first..) {
            match touched {
                Touched::Nodes(ids) => out.ids.extend(ids.iter().copied()),
                Touched::Filters(ids) => {
                    out.ids.extend(ids.iter().copied());
                    out.filters = true;
                }
                Touched::Reach(ids) => {
                    out.ids.extend(ids.iter().copied());
                    out.reach = true;
                    out.filters = true;
                }
                Touched::All => {
                    out.everything = true;
                    out.filters = true;
                }
            }
        }
        Some(out)
    }

    /// Takes `t`'s policy as the one in force from `seq`, if it differs; the one before it
    /// stays known, so a stream can tell which peers its client holds. Returns (before,
    /// now) when it changed.
    fn adopt_policy(&mut self, t: &Tailnet, seq: u64) -> Option<(PolicyRef, PolicyRef)> {
        let now = t.policy.as_ref().map(|r| Arc::new(r.policy().clone()));
        if self.policy.1 == now {
            return None;
        }
        let before = std::mem::replace(&mut self.policy, (seq, now.clone()));
        let changed = (before.1.clone(), now);
        self.previous_policy = Some(before);
        self.reach_seq = seq;
        Some(changed)
    }

    /// Every node in `t` or still in the cache.
    fn all_ids(&self, t: &Tailnet) -> BTreeSet<u64> {
        t.nodes.keys().chain(self.nodes.keys()).copied().collect()
    }

    fn remember(&mut self, seq: u64, touched: Touched) {
        if !matches!(touched, Touched::Nodes(_)) {
            self.last_all = seq;
        }
        if self.log.len() >= LOG {
            self.log.pop_front();
        }
        self.log.push_back((seq, touched));
    }

    /// The policy in force at sequence number `seq`, if still known (`None` when it
    /// changed twice since: the stream then needs a full map).
    pub fn policy_at(&self, seq: u64) -> Option<Option<&Policy>> {
        if self.policy.0 <= seq {
            return Some(self.policy.1.as_deref());
        }
        match &self.previous_policy {
            Some((since, p)) if *since <= seq => Some(p.as_deref()),
            _ => None,
        }
    }
}

/// Shared by all streams of one replica; updated by the state store under its lock.
pub struct PeerCache {
    config: Arc<Config>,
    inner: RwLock<Peers>,
    /// The policy rules' sources as of `Peers::reach_seq`, shared by every stream's filter.
    resolved: Mutex<compile::Resolved>,
}

impl PeerCache {
    pub fn new(config: Arc<Config>) -> Arc<Self> {
        Arc::new(Self {
            config,
            inner: RwLock::new(Peers::default()),
            resolved: Mutex::new(compile::Resolved::default()),
        })
    }

    /// Take after the state's read guard (the store takes them in that order).
    pub fn read(&self) -> RwLockReadGuard<'_, Peers> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The policy rules' sources, resolved for the applied state. Take under the state's
    /// read guard, so that the state cannot move on while they are used.
    pub fn resolved(&self) -> MutexGuard<'_, compile::Resolved> {
        let version = self.read().reach_seq;
        let mut r = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        r.at(version);
        r
    }

    fn render(&self, t: &Tailnet, id: u64, primaries: &Primaries) -> Option<(Value, Principal)> {
        let n = t.nodes.get(&id)?;
        Some((
            node_json(t, n, primaries, &self.config, i64::MIN),
            compile::principal(t, n),
        ))
    }

    /// Re-renders `ids` at sequence number `seq`, stamping what changed; returns the ones
    /// that appeared, went, or render or stand to the policy otherwise than before.
    fn refresh(&self, peers: &mut Peers, t: &Tailnet, ids: &BTreeSet<u64>, seq: u64) -> Vec<u64> {
        let mut differ = Vec::new();
        for &id in ids {
            let Some((json, principal)) = self.render(t, id, &peers.primaries) else {
                if peers.nodes.remove(&id).is_some() {
                    differ.push(id);
                    peers.reach_seq = seq;
                }
                continue;
            };
            match peers.nodes.get_mut(&id) {
                None => {
                    differ.push(id);
                    peers.reach_seq = seq;
                    peers.nodes.insert(
                        id,
                        Entry {
                            touched: seq,
                            patch_values: patch_values(&json),
                            text: text_of(&json),
                            json: Arc::new(json),
                            principal,
                            previous: None,
                            principal_since: seq,
                            created: seq,
                            reshaped: seq,
                            patched: [seq; PATCHABLE.len()],
                        },
                    );
                }
                Some(e) => {
                    e.touched = seq;
                    let rendered = *e.json != json;
                    if rendered || e.principal != principal {
                        differ.push(id);
                    }
                    if rendered {
                        stamp(e, &json, seq);
                        e.patch_values = patch_values(&json);
                        e.text = text_of(&json);
                        e.json = Arc::new(json);
                    }
                    if e.principal != principal {
                        let old = std::mem::replace(&mut e.principal, principal);
                        e.previous = Some((e.principal_since, old));
                        e.principal_since = seq;
                        peers.reach_seq = seq;
                    }
                }
            }
        }
        differ
    }

    /// Re-renders every node, after a restore: anything may have changed.
    fn rebuild(&self, peers: &mut Peers, t: &Tailnet) {
        peers.seq += 1;
        let seq = peers.seq;
        peers.adopt_policy(t, seq);
        peers.primaries = primary_routes(t);
        peers.reach_seq = seq;
        let ids = peers.all_ids(t);
        self.refresh(peers, t, &ids, seq);
        peers.remember(seq, Touched::All);
    }
}

/// The `nodeAttrs` of `p`: the only part of a policy a node's rendering depends on (its
/// `CapMap`).
fn node_attrs(p: Option<&Policy>) -> &[crate::policy::NodeAttr] {
    p.map(|p| &p.node_attrs[..]).unwrap_or(&[])
}

fn patch_values(v: &Value) -> [Option<Value>; PATCHABLE.len()] {
    PATCHABLE.map(|field| v.get(field).cloned())
}

fn text_of(v: &Value) -> Arc<str> {
    serde_json::to_string(v)
        .unwrap_or_else(|_| "{}".into())
        .into()
}

/// Records in `e` which fields differ between what it holds and `new`.
fn stamp(e: &mut Entry, new: &Value, seq: u64) {
    let (Some(o), Some(n)) = (e.json.as_object(), new.as_object()) else {
        e.reshaped = seq;
        return;
    };
    let reshaped = o
        .iter()
        .filter(|(k, _)| !PATCHABLE.contains(&k.as_str()))
        .any(|(k, v)| n.get(k) != Some(v))
        || n.keys()
            .any(|k| !PATCHABLE.contains(&k.as_str()) && !o.contains_key(k));
    if reshaped {
        e.reshaped = seq;
    }
    for (i, field) in PATCHABLE.iter().enumerate() {
        let (ov, nv) = (o.get(*field), n.get(*field));
        if ov == nv {
            continue;
        }
        // A patch can set a field but not clear it; only LastSeen may vanish (when a node
        // comes online, Online=true says it all).
        if nv.is_none() && *field != "LastSeen" {
            e.reshaped = seq;
        }
        e.patched[i] = seq;
    }
}

impl Observer for PeerCache {
    fn applied(&self, t: &Tailnet, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let mut peers = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if changes.iter().any(|c| matches!(c, Change::Reset)) {
            self.rebuild(&mut peers, t);
            return;
        }
        peers.seq += 1;
        let seq = peers.seq;
        let policies = if changes.iter().any(|c| matches!(c, Change::PolicyChanged)) {
            peers.adopt_policy(t, seq)
        } else {
            None
        };
        let mut ids = BTreeSet::new();
        for c in changes {
            match c {
                Change::NodeUpserted(id) | Change::NodeRemoved(id) => {
                    ids.insert(*id);
                }
                // A renamed user is another principal to the policy.
                Change::UserChanged(uid) => {
                    ids.extend(t.nodes.values().filter(|n| n.user_id == *uid).map(|n| n.id))
                }
                Change::ReplicasChanged
                | Change::Reset
                | Change::PolicyChanged
                | Change::SshCheckDecided(_)
                | Change::TlsChanged
                | Change::DnsChanged => {}
            }
        }
        // Routers coming, going or going offline move subnet routes between the others.
        let routers_touched = ids.iter().any(|id| {
            t.nodes
                .get(id)
                .is_none_or(|n| !n.approved_routes.is_empty())
                || peers.primaries.values().any(|p| p == id)
        });
        if routers_touched {
            let primaries = primary_routes(t);
            if primaries != peers.primaries {
                ids.extend(primaries.values().chain(peers.primaries.values()).copied());
                peers.primaries = primaries;
            }
        }
        // Only `nodeAttrs` in a policy shows in a node's rendering (its capabilities):
        // when they change, every node is rendered again.
        let attrs_changed = policies
            .as_ref()
            .is_some_and(|(a, b)| node_attrs(a.as_deref()) != node_attrs(b.as_deref()));
        let rendered = if attrs_changed {
            let all = peers.all_ids(t);
            self.refresh(&mut peers, t, &all, seq)
        } else {
            self.refresh(&mut peers, t, &ids, seq);
            Vec::new()
        };
        // Streams find every node touched here, side effects included, in the history.
        let mut list = ids;
        list.extend(rendered);
        let list = list.into_iter().collect();
        let touched = match policies {
            None => Touched::Nodes(list),
            // Most policy edits open or close ports: then every stream recomputes its
            // packet filter, but none walks every node for peers to add or drop, which at
            // 10,000 nodes was most of what a policy change cost. Nodes whose principal
            // changed (an auto-approved route) are in the list, looked at one by one.
            Some((before, now))
                if same_reach(
                    before.as_deref(),
                    now.as_deref(),
                    peers.nodes.values().map(|e| &e.principal),
                ) =>
            {
                Touched::Filters(list)
            }
            // Who sees whom changed: streams go by kind of node, and walk only the nodes
            // of the kinds they now see or stop seeing.
            Some(_) => {
                peers.kinds = Arc::new(Kinds::of(&peers.nodes));
                Touched::Reach(list)
            }
        };
        peers.remember(seq, touched);
    }

    fn reset(&self, t: &Tailnet) {
        let mut peers = self.inner.write().unwrap_or_else(|p| p.into_inner());
        self.rebuild(&mut peers, t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    fn cache(t: &Tailnet) -> Arc<PeerCache> {
        let c = PeerCache::new(Arc::new(Config::default()));
        c.reset(t);
        c
    }

    #[test]
    fn endpoint_changes_are_patches_and_hostinfo_changes_are_not() {
        let mut t = compile::sample_tailnet();
        let c = cache(&t);
        let before = c.read().seq;
        let key = t.nodes[&1].node_key.clone();
        let update =
            |endpoints: Option<Vec<String>>, hostinfo: Option<String>| Command::UpdateNode {
                node_key: key.clone(),
                disco_key: None,
                endpoints,
                hostinfo,
                hostname: None,
                home_derp: None,
                now: 5,
            };
        let (_, changes) = t.apply(&update(Some(vec!["192.0.2.1:41641".into()]), None));
        c.applied(&t, &changes);
        {
            let p = c.read();
            let e = &p.nodes[&1];
            assert!(e.reshaped <= before, "an endpoint change is a patch");
            let i = PATCHABLE.iter().position(|f| *f == "Endpoints").unwrap();
            assert_eq!(e.patched[i], p.seq);
            assert_eq!(e.json["Endpoints"][0], "192.0.2.1:41641");
        }
        let (_, changes) = t.apply(&update(None, Some(r#"{"OS":"linux"}"#.into())));
        c.applied(&t, &changes);
        let p = c.read();
        assert_eq!(p.nodes[&1].reshaped, p.seq);
        assert_eq!(
            p.nodes[&1].principal_at(p.seq - 1),
            Some(&p.nodes[&1].principal)
        );
    }

    #[test]
    fn a_router_going_offline_touches_its_standby() {
        let mut t = compile::sample_tailnet();
        let route: ipnet::IpNet = "10.9.0.0/24".parse().unwrap();
        for id in [1, 2] {
            let n = t.nodes.get_mut(&id).unwrap();
            n.advertised_routes = vec![route];
            n.approved_routes = vec![route];
            n.online = true;
        }
        let c = cache(&t);
        assert_eq!(c.read().primaries[&route], 1);
        let (_, changes) = t.apply(&Command::SetOnline {
            node_id: 1,
            online: false,
            replica: 1,
            now: 9,
        });
        c.applied(&t, &changes);
        let p = c.read();
        let touched = p.since(p.seq - 1).unwrap().ids;
        assert!(
            touched.contains(&2),
            "the standby's routes changed: {touched:?}"
        );
        assert_eq!(p.primaries[&route], 2);
        assert_eq!(p.nodes[&2].json["PrimaryRoutes"][0], "10.9.0.0/24");
        assert_eq!(p.nodes[&2].reshaped, p.seq);
    }
}
