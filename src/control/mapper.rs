//! Turns the applied tailnet state into `tailcfg` map responses: full maps and deltas.
//!
//! A delta is computed against what this stream last sent, so a reconnecting or lagging
//! stream converges on the committed state without any shared bookkeeping.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{json, Value};

use super::peers::{Entry, PeerCache};
use crate::config::Config;
use crate::policy::{compile, Policy, Principal};
use crate::state::{Node, Replica, Tailnet};
use crate::tailcfg::{rfc3339, DerpMap, DerpNode, DerpRegion, MapResponse, PacketFilter, Shared};

/// This replica's own entry in the replica registry, from its configuration and the
/// addresses it actually bound.
pub fn local_replica(config: &Config, admin_addr: &str, control_addr: SocketAddr) -> Replica {
    let (host, port) = config.server_host_port();
    let d = &config.derp;
    let derp_host = d.hostname.clone().unwrap_or(host);
    let derp_ipv4 = d.ipv4.clone().or_else(|| {
        derp_host
            .parse::<std::net::Ipv4Addr>()
            .ok()
            .map(|ip| ip.to_string())
    });
    // Relays mesh over the replicas' own plain-HTTP listeners, never through the load
    // balancer (which could send a relay to itself).
    let mesh_host = if control_addr.ip().is_unspecified() {
        config
            .cluster
            .advertise_raft_addr
            .as_deref()
            .and_then(|a| a.rsplit_once(':').map(|(h, _)| h.to_string()))
            .unwrap_or_else(|| "127.0.0.1".into())
    } else {
        control_addr.ip().to_string()
    };
    let mesh_host = if mesh_host.contains(':') && !mesh_host.starts_with('[') {
        format!("[{mesh_host}]")
    } else {
        mesh_host
    };
    Replica {
        id: config.node_id,
        admin_addr: admin_addr.to_string(),
        derp_host,
        derp_ipv4,
        derp_port: d.port.unwrap_or(port),
        stun_port: d.stun_listen_addr.port(),
        mesh_url: format!("http://{mesh_host}:{}/derp", control_addr.port()),
        // The relay's key and the command level are the server's to fill in.
        derp_key: String::new(),
        command_level: 0,
    }
}

/// Reads `derp.extra_regions_file`: a DERP map in Tailscale's JSON form
/// (`{"Regions": {"ID": {"RegionID": ID, "Nodes": [...]}}}`), checked so that a mistake
/// stops the server at start rather than breaking every client's map later.
pub fn load_extra_regions(
    path: &std::path::Path,
    own_region: Option<i32>,
) -> Result<BTreeMap<String, Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let regions = v
        .get("Regions")
        .and_then(Value::as_object)
        .ok_or("expected an object with \"Regions\", as served at /derpmap/default")?;
    let mut out = BTreeMap::new();
    for (key, region) in regions {
        let id = region.get("RegionID").and_then(Value::as_i64);
        if id.map(|i| i.to_string()).as_deref() != Some(key.as_str()) {
            return Err(format!("region {key:?}: RegionID must be the number {key}"));
        }
        if id == own_region.map(i64::from) {
            return Err(format!(
                "region {key} is the cluster's own region (derp.region_id); pick another id"
            ));
        }
        let nodes = region.get("Nodes").and_then(Value::as_array);
        if nodes.is_none_or(|n| n.is_empty() || n.iter().any(|n| n.get("HostName").is_none())) {
            return Err(format!(
                "region {key}: \"Nodes\" must list at least one node, each with a HostName"
            ));
        }
        out.insert(key.clone(), region.clone());
    }
    Ok(out)
}

/// The cluster's DERP region: one node per replica, this replica's first so that its
/// clients use the relay of the replica they talk to (the relays mesh, so peers on
/// other replicas are still reached); plus any extra regions from the config.
pub fn derp_map(
    config: &Config,
    replicas: &BTreeMap<u64, Replica>,
    me: &Replica,
    extra: &BTreeMap<String, Value>,
) -> Value {
    let d = &config.derp;
    let mut regions = BTreeMap::new();
    // With [tls] on, every relay serves the control listener's certificate: a relay
    // listed by its own address says which name to check it against.
    let cert_name = config.tls.cert_name(&config.server_host_port().0);
    if d.enabled {
        let node = |r: &Replica| DerpNode {
            name: format!("{}r{}", d.region_id, r.id),
            region_id: d.region_id,
            host_name: r.derp_host.clone(),
            cert_name: cert_name
                .clone()
                .filter(|n| !n.eq_ignore_ascii_case(&r.derp_host)),
            ipv6: r.derp_ipv4.as_ref().map(|_| "none".to_string()),
            stun_test_ip: r.derp_ipv4.clone(),
            ipv4: r.derp_ipv4.clone(),
            stun_port: i32::from(r.stun_port),
            derp_port: r.derp_port,
            insecure_for_tests: d.insecure_for_tests,
        };
        let mut nodes = vec![node(me)];
        nodes.extend(replicas.values().filter(|r| r.id != me.id).map(node));
        regions.insert(
            d.region_id.to_string(),
            DerpRegion {
                region_id: d.region_id,
                region_code: d.region_code.clone(),
                region_name: d.region_name.clone(),
                nodes,
            },
        );
    }
    let mut map = serde_json::to_value(DerpMap {
        regions,
        omit_default_regions: true,
    })
    .unwrap_or(Value::Null);
    if let Some(r) = map.get_mut("Regions").and_then(Value::as_object_mut) {
        for (id, region) in extra {
            r.insert(id.clone(), region.clone());
        }
    }
    map
}

/// Node capabilities (self and peers alike, as the client looks at both): Tailscale SSH
/// (the client runs its SSH server, `--ssh`, only with it; what it lets in is still
/// the policy's `ssh` rules, none without a policy), Taildrop for every node when switched
/// on, and what the policy's `nodeAttrs` give this node.
fn cap_map(t: &Tailnet, node: &Node, config: &Config) -> Value {
    let mut caps = serde_json::Map::new();
    caps.insert("https://tailscale.com/cap/ssh".into(), json!([]));
    if config.taildrop {
        caps.insert("https://tailscale.com/cap/file-sharing".into(), json!([]));
    }
    if let Some(p) = policy(t) {
        for attr in p.attrs_for(&compile::principal(t, node)) {
            caps.insert(attr.to_string(), json!([]));
        }
    }
    Value::Object(caps)
}

/// The tailnet policy in force, if any (none: every node reaches every other).
fn policy(t: &Tailnet) -> Option<&Policy> {
    t.policy.as_ref().map(|r| r.policy())
}

/// Which node carries each subnet route: of the online nodes serving it, the one with
/// the lowest id. When it goes offline the next one takes over at the next map update.
pub type Primaries = BTreeMap<ipnet::IpNet, u64>;

pub fn primary_routes(t: &Tailnet) -> Primaries {
    let mut primary = Primaries::new();
    for n in t
        .nodes
        .values()
        .filter(|n| n.online && !n.approved_routes.is_empty())
    {
        for r in n.served_routes() {
            if !crate::state::is_exit_route(&r) {
                primary.entry(r).or_insert(n.id);
            }
        }
    }
    primary
}

/// `tailcfg.Node` for one node, as peers (and the node itself) see it.
pub fn node_json(
    t: &Tailnet,
    node: &Node,
    primary: &Primaries,
    config: &Config,
    now: i64,
) -> Value {
    let base_domain = &config.base_domain;
    let hostinfo: Value = serde_json::from_str(&node.hostinfo).unwrap_or_else(|_| json!({}));
    let addrs = vec![format!("{}/32", node.ipv4), format!("{}/128", node.ipv6)];
    let primaries: Vec<String> = primary
        .iter()
        .filter(|(_, id)| **id == node.id)
        .map(|(r, _)| r.to_string())
        .collect();
    let mut allowed = addrs.clone();
    allowed.extend(primaries.iter().cloned());
    allowed.extend(
        node.served_routes()
            .iter()
            .filter(|r| crate::state::is_exit_route(r))
            .map(|r| r.to_string()),
    );
    let mut v = json!({
        "ID": node.id,
        "StableID": node.stable_id,
        "Name": format!("{}.{}.", node.given_name, base_domain),
        "User": node.user_id,
        "Key": node.node_key,
        "Machine": node.machine_key,
        "Addresses": addrs,
        "AllowedIPs": allowed,
        "PrimaryRoutes": primaries,
        "Endpoints": node.endpoints,
        "Hostinfo": hostinfo,
        "Created": rfc3339(node.created),
        "MachineAuthorized": true,
        "Online": node.online,
        "CapMap": cap_map(t, node, config),
    });
    let obj = match v.as_object_mut() {
        Some(o) => o,
        None => return v,
    };
    if !node.disco_key.is_empty() {
        obj.insert("DiscoKey".into(), json!(node.disco_key));
    }
    if node.home_derp > 0 {
        obj.insert("HomeDERP".into(), json!(node.home_derp));
        obj.insert(
            "DERP".into(),
            json!(format!("127.3.3.40:{}", node.home_derp)),
        );
    }
    if let Some(exp) = node.expiry {
        obj.insert("KeyExpiry".into(), json!(rfc3339(exp)));
        if exp <= now {
            obj.insert("Expired".into(), json!(true));
        }
    }
    if !node.tags.is_empty() {
        obj.insert("Tags".into(), json!(node.tags));
    }
    if !node.online {
        if let Some(ls) = node.last_seen {
            obj.insert("LastSeen".into(), json!(rfc3339(ls)));
        }
    }
    v
}

fn user_profiles(t: &Tailnet) -> Vec<Value> {
    t.users
        .values()
        .map(|u| {
            json!({
                "ID": u.id,
                "LoginName": u.name,
                "DisplayName": if u.display_name.is_empty() { &u.name } else { &u.display_name },
            })
        })
        .collect()
}

/// Tailscale's `DNSConfig` from the `[dns]` settings: the same for every node, so it
/// travels only in full maps.
fn dns_config(config: &Config) -> Value {
    let d = &config.dns;
    let resolvers =
        |list: &[String]| -> Vec<Value> { list.iter().map(|a| json!({ "Addr": a })).collect() };
    let trim = |s: &str| s.trim_end_matches('.').to_string();
    let mut domains = Vec::new();
    if d.magic_dns {
        domains.push(trim(&config.base_domain));
    }
    domains.extend(d.search_domains.iter().map(|s| trim(s)));
    let mut v = json!({ "Domains": domains, "Proxied": d.magic_dns });
    let key = if d.override_local_dns {
        "Resolvers"
    } else {
        "FallbackResolvers"
    };
    v[key] = json!(resolvers(&d.nameservers));
    if !d.split.is_empty() {
        let routes: serde_json::Map<String, Value> = d
            .split
            .iter()
            .map(|(domain, list)| (trim(domain), json!(resolvers(list))))
            .collect();
        v["Routes"] = Value::Object(routes);
    }
    if !d.extra_records.is_empty() {
        v["ExtraRecords"] = d
            .extra_records
            .iter()
            .map(|r| json!({ "Name": trim(&r.name), "Type": r.record_type, "Value": r.value }))
            .collect();
    }
    v
}

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

/// The packet filter and SSH policy of `me` under the current policy, from the rules'
/// sources as `cache` resolved them for `t` (call under the state guard `t` comes from).
fn filters(
    t: &Tailnet,
    cache: &PeerCache,
    me: &Node,
    config: &Config,
) -> (PacketFilter, Option<Value>) {
    match policy(t) {
        None => (PacketFilter::allow_all(), None),
        Some(p) => {
            let mut resolved = cache.resolved();
            (
                compile::packet_filter(p, t, me, &mut resolved),
                compile::ssh_policy(
                    p,
                    t,
                    me,
                    &super::ssh_check::delegate_url(config),
                    &mut resolved,
                ),
            )
        }
    }
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

/// Fields a `PeersChangedPatch` can carry; a change to anything else needs `PeersChanged`.
pub(crate) const PATCHABLE: [&str; 8] = [
    "Endpoints",
    "HomeDERP",
    "DERP",
    "Online",
    "LastSeen",
    "DiscoKey",
    "Key",
    "KeyExpiry",
];

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
            dns_config: Some(dns_config(config)),
            domain: base.clone(),
            packet_filter: Some(filter),
            ssh_policy: ssh,
            user_profiles: Some(user_profiles(t)),
            collect_services: Some(false),
            control_time: Some(rfc3339(now)),
            // Privacy by default: the client keeps its logs to itself (headscale does
            // the same); `client_log_upload = true` leaves its own setting alone.
            debug: (!config.client_log_upload)
                .then(|| serde_json::json!({ "DisableLogTail": true })),
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
        // After such a policy change, unless a policy names nodes by address, the nodes
        // are asked about by kind: those of the kinds this node sees now and did not, or
        // the other way round, join the touched ones. Every other node's visibility is
        // what it was, and it did not change since (or it would be touched).
        let by_address = [before, current]
            .iter()
            .flatten()
            .any(|p| p.names_addresses());
        let touched: Box<dyn Iterator<Item = Look>> =
            if missed.reach && !missed.everything && !by_address {
                let flipped: Vec<(&Vec<u64>, bool, bool)> = peers
                    .kinds
                    .0
                    .iter()
                    .map(|(kind, members)| {
                        let was = visible(before, &self.principal, kind);
                        (members, was, visible(current, &principal, kind))
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
            };
        for (id, n, known) in touched {
            if id == self.self_id {
                if let Some((_, false)) = known {
                    // Here only as one of its kind, which it stops seeing: removed with the
                    // rest, a no-op for the client (its own node is never among its peers),
                    // so that every node of the kind sends the same list, made and
                    // compressed once (`frames::FrameCache::removed_text`). Without it,
                    // 1,000 servers hidden from all at 10,000 nodes each wrote and
                    // compressed a list of 9,999 ids of their own.
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
        Ok(if empty { None } else { Some(resp) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
        let p = dir.join("regions.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    /// With [tls] on, a relay listed by its own address names the certificate's name, so
    /// the client checks the cluster's certificate while dialling the address.
    #[test]
    fn tls_relays_listed_by_address_name_the_certificate() {
        let mut config = Config {
            server_url: "https://login.example.com".into(),
            ..Config::default()
        };
        config.tls.acme_hostname = "login.example.com".into();
        let me = local_replica(&config, "127.0.0.1:1", "127.0.0.1:443".parse().unwrap());
        let mut other = me.clone();
        other.id = 2;
        other.derp_host = "10.0.0.2".into();
        let replicas = BTreeMap::from([(1, me.clone()), (2, other)]);
        let map = derp_map(&config, &replicas, &me, &BTreeMap::new());
        let nodes = &map["Regions"]["900"]["Nodes"];
        assert_eq!(nodes[0]["HostName"], "login.example.com");
        assert_eq!(nodes[0]["DERPPort"], 443);
        assert!(nodes[0].get("CertName").is_none(), "{map}");
        assert_eq!(nodes[1]["HostName"], "10.0.0.2");
        assert_eq!(nodes[1]["CertName"], "login.example.com");
        // Without TLS nothing names a certificate.
        config.tls.acme_hostname.clear();
        let map = derp_map(&config, &replicas, &me, &BTreeMap::new());
        assert!(map["Regions"]["900"]["Nodes"][1].get("CertName").is_none());
    }

    #[test]
    fn extra_regions_merge_after_checks() {
        let dir = tempfile::tempdir().unwrap();
        let good = r#"{"Regions": {"1": {"RegionID": 1, "RegionCode": "nyc", "RegionName": "New York",
            "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "derp1.example.com"}]}}}"#;
        let extra = load_extra_regions(&write(dir.path(), good), Some(900)).unwrap();
        let config = Config::default();
        let me = local_replica(&config, "127.0.0.1:1", "127.0.0.1:8080".parse().unwrap());
        let map = derp_map(&config, &BTreeMap::new(), &me, &extra);
        assert_eq!(map["Regions"]["1"]["RegionCode"], "nyc");
        assert_eq!(map["Regions"]["900"]["Nodes"][0]["DERPPort"], 8080);

        for (bad, why) in [
            ("[]", "Regions"),
            (
                r#"{"Regions": {"1": {"RegionID": 2, "Nodes": [{"HostName": "h"}]}}}"#,
                "RegionID",
            ),
            (
                r#"{"Regions": {"900": {"RegionID": 900, "Nodes": [{"HostName": "h"}]}}}"#,
                "own region",
            ),
            (
                r#"{"Regions": {"1": {"RegionID": 1, "Nodes": []}}}"#,
                "Nodes",
            ),
            ("{", "not JSON"),
        ] {
            let err = load_extra_regions(&write(dir.path(), bad), Some(900)).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    /// The sample tailnet, and a peer cache in step with it.
    fn sample_with_cache() -> (Config, Tailnet, Arc<PeerCache>) {
        use crate::state::Observer;
        let config = Config::default();
        let t = crate::policy::compile::sample_tailnet();
        let cache = PeerCache::new(Arc::new(config.clone()));
        cache.reset(&t);
        (config, t, cache)
    }

    /// Applies `cmd` to `t` and tells `cache`, as the state store does.
    fn apply_to(cache: &PeerCache, t: &mut Tailnet, cmd: crate::state::Command) {
        use crate::state::Observer;
        let (r, changes) = t.apply(&cmd);
        r.unwrap();
        cache.applied(t, &changes);
    }

    /// A stream's deltas come from the shared cache alone: patches for endpoint-only
    /// changes (several merged when the stream fell behind), whole nodes otherwise,
    /// removals when a peer goes or the policy hides it, and nothing per peer kept.
    #[test]
    fn deltas_from_the_shared_peer_cache() {
        use crate::state::Command;
        let (config, mut t, cache) = sample_with_cache();
        let apply = |t: &mut Tailnet, cmd: Command| apply_to(&cache, t, cmd);
        let mut view = StreamView::new(1);
        let full = view.full(&t, &cache, &config, &json!({}), 10).unwrap();
        let ids: Vec<u64> = full
            .peers
            .unwrap()
            .iter()
            .map(|p| p.0["ID"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [2, 3]);

        let update =
            |id: u64, endpoints: Option<&str>, disco: Option<&str>, hostinfo: Option<&str>| {
                Command::UpdateNode {
                    node_key: format!("nodekey:{id:064x}"),
                    disco_key: disco.map(str::to_string),
                    endpoints: endpoints.map(|e| vec![e.to_string()]),
                    hostinfo: hostinfo.map(str::to_string),
                    hostname: None,
                    home_derp: None,
                    now: 11,
                }
            };
        apply(&mut t, update(2, Some("192.0.2.2:1"), None, None));
        let d = view.delta(&t, &cache, &config, 12).unwrap().unwrap();
        assert!(d.peers_changed.is_none());
        let p = &d.peers_changed_patch.unwrap()[0];
        assert_eq!(
            (&p["NodeID"], &p["Endpoints"]),
            (&json!(2), &json!(["192.0.2.2:1"]))
        );
        assert!(p.get("DiscoKey").is_none());

        // Two changes before the stream catches up: one patch with both.
        apply(&mut t, update(2, Some("192.0.2.2:2"), None, None));
        apply(&mut t, update(2, None, Some("discokey:ab"), None));
        let d = view.delta(&t, &cache, &config, 13).unwrap().unwrap();
        let p = &d.peers_changed_patch.unwrap()[0];
        assert_eq!(p["Endpoints"], json!(["192.0.2.2:2"]));
        assert_eq!(p["DiscoKey"], "discokey:ab");
        // Changes to several peers before the stream reads the cache all go out in its
        // next message: it reads the cache's history, not the announcements that woke it
        // (the cache may have moved on between the two).
        apply(&mut t, update(2, Some("192.0.2.2:3"), None, None));
        apply(&mut t, update(3, Some("192.0.2.3:3"), None, None));
        let d = view.delta(&t, &cache, &config, 13).unwrap().unwrap();
        let ids: Vec<u64> = d
            .peers_changed_patch
            .unwrap()
            .iter()
            .map(|p| p["NodeID"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [2, 3]);
        // Nothing new: nothing sent.
        assert!(view.delta(&t, &cache, &config, 14).unwrap().is_none());

        // Hostinfo is not patchable: the whole node.
        apply(&mut t, update(3, None, None, Some(r#"{"OS":"linux"}"#)));
        let d = view.delta(&t, &cache, &config, 15).unwrap().unwrap();
        assert_eq!(d.peers_changed.unwrap()[0].0["ID"], 3);

        // A policy hiding node 3 (tag:web) from alice's node 1; then removing its tag
        // (it becomes alice's again) brings it back, and deleting node 2 removes it.
        let policy = r#"{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}]}"#;
        apply(
            &mut t,
            Command::SetPolicy {
                text: policy.into(),
                now: 16,
            },
        );
        // A policy change is a delta on the open stream: the peer it now hides is removed,
        // and the node's packet filter replaced.
        let d = view.delta(&t, &cache, &config, 16).unwrap().unwrap();
        assert_eq!(d.peers_removed.unwrap(), [3]);
        assert!(d.peers_changed.is_none() && d.packet_filter.is_some());
        assert!(view.delta(&t, &cache, &config, 16).unwrap().is_none());
        apply(
            &mut t,
            Command::SetTags {
                id: 3,
                tags: vec![],
            },
        );
        let d = view.delta(&t, &cache, &config, 17).unwrap().unwrap();
        assert_eq!(d.peers_changed.unwrap()[0].0["ID"], 3);
        apply(&mut t, Command::DeleteNode { id: 2 });
        let d = view.delta(&t, &cache, &config, 18).unwrap().unwrap();
        assert_eq!(d.peers_removed.unwrap(), [2]);
    }

    /// Streams caught up to the same point get the same delta, and say so with the same
    /// key; not the stream whose own node changed, and nobody under a policy.
    #[test]
    fn streams_alike_share_a_key_for_the_same_delta() {
        use crate::state::Command;
        let (config, mut t, cache) = sample_with_cache();
        let apply = |t: &mut Tailnet, cmd: Command| apply_to(&cache, t, cmd);
        let update = |id: u64| Command::UpdateNode {
            node_key: format!("nodekey:{id:064x}"),
            disco_key: None,
            endpoints: Some(vec![format!("192.0.2.{id}:41641")]),
            hostinfo: None,
            hostname: None,
            home_derp: None,
            now: 11,
        };
        let mut views: Vec<StreamView> = [1, 2, 3].map(StreamView::new).into();
        for v in &mut views {
            v.full(&t, &cache, &config, &json!({}), 10).unwrap();
        }
        apply(&mut t, update(3));
        let keys: Vec<_> = views.iter().map(|v| v.shared_key(&t, &cache)).collect();
        assert!(keys[0].is_some() && keys[0] == keys[1], "{keys:?}");
        assert_eq!(keys[2], None, "node 3 itself changed");
        let text = |v: &mut StreamView| {
            let d = v.delta(&t, &cache, &config, 12).unwrap().unwrap();
            crate::tailcfg::encode(&d).unwrap()
        };
        let (a, b) = (text(&mut views[0]), text(&mut views[1]));
        assert_eq!(a, b);
        // Moved on by a shared delta, a stream carries on from where it was sent to.
        let mut late = StreamView::new(2);
        late.full(&t, &cache, &config, &json!({}), 12).unwrap();
        apply(&mut t, update(1));
        let key = late.shared_key(&t, &cache).unwrap();
        late.advance(key.1);
        assert!(late.delta(&t, &cache, &config, 13).unwrap().is_none());

        let policy = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
        apply(
            &mut t,
            Command::SetPolicy {
                text: policy.into(),
                now: 14,
            },
        );
        for v in &mut views {
            let _ = v.delta(&t, &cache, &config, 14);
        }
        apply(&mut t, update(3));
        assert!(views.iter().all(|v| v.shared_key(&t, &cache).is_none()));
    }

    /// A policy edit that connects the same pairs of nodes (a port opened, an attribute
    /// given) costs each stream its packet filter and the nodes whose rendering changed,
    /// not a walk over every node; an edit that hides a peer still removes it.
    #[test]
    fn port_edits_replace_filters_and_leave_peers_alone() {
        use crate::state::Command;
        let (config, mut t, cache) = sample_with_cache();
        let set = |t: &mut Tailnet, text: &str, now: i64| {
            apply_to(
                &cache,
                t,
                Command::SetPolicy {
                    text: text.into(),
                    now,
                },
            )
        };
        let all = r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#;
        let port = r#"{"action": "accept", "src": ["*"], "dst": ["*:4242"]}"#;
        set(&mut t, &format!(r#"{{"acls": [{all}]}}"#), 10);
        let mut view = StreamView::new(1);
        let full = view.full(&t, &cache, &config, &json!({}), 10).unwrap();
        let peers = full.peers.unwrap().len();

        set(&mut t, &format!(r#"{{"acls": [{all}, {port}]}}"#), 11);
        {
            let p = cache.read();
            let since = p.since(p.seq - 1).unwrap();
            assert!(since.filters && !since.everything && since.ids.is_empty());
        }
        let d = view.delta(&t, &cache, &config, 11).unwrap().unwrap();
        assert!(d
            .packet_filter
            .unwrap()
            .to_value()
            .to_string()
            .contains("4242"));
        assert!(d.peers_changed.is_none() && d.peers_removed.is_none() && d.node.is_none());

        // An attribute for every node: each one's rendering (CapMap) changes, so each is
        // resent, the stream's own node included; the filter stays as it was.
        let attrs = r#""nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}]"#;
        set(
            &mut t,
            &format!(r#"{{"acls": [{all}, {port}], {attrs}}}"#),
            12,
        );
        let d = view.delta(&t, &cache, &config, 12).unwrap().unwrap();
        assert!(d.node.unwrap()["CapMap"].get("funnel").is_some());
        assert_eq!(d.peers_changed.unwrap().len(), peers);
        assert!(d.packet_filter.is_none());

        // Members only: the tagged node 3 goes.
        let members =
            r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}"#;
        set(&mut t, &format!(r#"{{"acls": [{members}], {attrs}}}"#), 13);
        {
            let p = cache.read();
            let since = p.since(p.seq - 1).unwrap();
            assert!(since.reach && !since.everything);
        }
        let d = view.delta(&t, &cache, &config, 13).unwrap().unwrap();
        assert_eq!(d.peers_removed.unwrap(), [3]);
        assert!(d.packet_filter.is_some());

        // A node deleted, then a policy change connecting other pairs: the deleted one is
        // in no kind of node any more, and must still be removed; node 3 comes back.
        apply_to(&cache, &mut t, Command::DeleteNode { id: 2 });
        set(&mut t, &format!(r#"{{"acls": [{all}], {attrs}}}"#), 14);
        let d = view.delta(&t, &cache, &config, 14).unwrap().unwrap();
        assert_eq!(d.peers_removed.unwrap(), [2]);
        assert_eq!(d.peers_changed.unwrap()[0].0["ID"], 3);
    }

    /// Nodes of a kind that stops seeing its own kind all send one and the same removal
    /// list, their own ids included, so that it is made and compressed once.
    #[test]
    fn a_kind_hidden_from_itself_sends_one_removal_list() {
        let (config, mut t, cache) = sample_with_cache();
        for id in [4u8, 5] {
            let changes = compile::add_sample_node(&mut t, "bob", vec!["tag:db".into()], id);
            crate::state::Observer::applied(&*cache, &t, &changes);
        }
        let owners = r#""tagOwners": {"tag:db": ["bob@"]}"#;
        let set = |t: &mut Tailnet, acl: &str, now: i64| {
            let text = format!(r#"{{{owners}, "acls": [{acl}]}}"#);
            apply_to(&cache, t, crate::state::Command::SetPolicy { text, now });
        };
        set(
            &mut t,
            r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#,
            10,
        );
        let mut views: Vec<StreamView> = [4, 5].map(StreamView::new).into();
        for v in &mut views {
            v.full(&t, &cache, &config, &json!({}), 10).unwrap();
        }
        set(
            &mut t,
            r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}"#,
            11,
        );
        let lists: Vec<Vec<u64>> = views
            .iter_mut()
            .map(|v| {
                let d = v.delta(&t, &cache, &config, 11).unwrap().unwrap();
                assert!(d.peers_changed.is_none());
                d.peers_removed.unwrap()
            })
            .collect();
        let everyone: Vec<u64> = t.nodes.keys().copied().collect();
        assert_eq!(lists[0], everyone);
        assert_eq!(lists[1], everyone);
    }

    /// Clients kept up to date by deltas hold the peers a full map would give them, through
    /// policy changes that connect other pairs (asked by kind of node, or node by node
    /// when a rule names an address), with nodes joining, going and changing tags in
    /// between, and streams falling behind by several changes.
    #[test]
    fn deltas_through_reach_changes_hold_what_a_full_map_would() {
        use crate::state::{Command, Observer};
        use std::collections::{BTreeMap, BTreeSet};
        let (config, mut t, cache) = sample_with_cache();
        let more = [
            ("alice", vec![]),
            ("bob", vec!["tag:db"]),
            ("bob", vec![]),
            ("alice", vec!["tag:web"]),
        ];
        for (i, (user, tags)) in more.into_iter().enumerate() {
            let tags = tags.into_iter().map(String::from).collect();
            let changes = compile::add_sample_node(&mut t, user, tags, 4 + i as u8);
            cache.applied(&t, &changes);
        }
        let owners = r#""tagOwners": {"tag:web": ["alice@"], "tag:db": ["bob@"]}"#;
        let rules = [
            r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}"#
                .to_string(),
            r#"{"action": "accept", "src": ["alice@"], "dst": ["tag:web:443", "tag:db:5432"]}"#
                .to_string(),
            r#"{"action": "accept", "src": ["bob@"], "dst": ["autogroup:self:*"]}"#.to_string(),
            format!(
                r#"{{"action": "accept", "src": ["{}/32"], "dst": ["tag:db:*"]}}"#,
                t.nodes[&2].ipv4
            ),
            r#"{"action": "accept", "src": ["tag:web"], "dst": ["alice@:22"]}"#.to_string(),
            r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#.to_string(),
        ];
        let ids = |list: &Option<Vec<Shared>>| -> Vec<u64> {
            list.iter()
                .flatten()
                .filter_map(|p| p.0["ID"].as_u64())
                .collect()
        };
        let mut views: BTreeMap<u64, (StreamView, BTreeSet<u64>)> = BTreeMap::new();
        let mut now = 20;
        for step in 0..30usize {
            now += 1;
            let rule = &rules[step % rules.len()];
            let text = format!(r#"{{{owners}, "acls": [{rule}]}}"#);
            apply_to(&cache, &mut t, Command::SetPolicy { text, now });
            match step % 7 {
                2 => {
                    let tags = if step % 2 == 0 {
                        vec!["tag:db".into()]
                    } else {
                        vec![]
                    };
                    apply_to(&cache, &mut t, Command::SetTags { id: 6, tags });
                }
                4 if t.nodes.contains_key(&5) => {
                    apply_to(&cache, &mut t, Command::DeleteNode { id: 5 });
                }
                5 if !t.nodes.contains_key(&9) => {
                    let changes = compile::add_sample_node(&mut t, "bob", vec![], 9);
                    cache.applied(&t, &changes);
                }
                _ => {}
            }
            for id in t.nodes.keys().copied().collect::<Vec<_>>() {
                // Node n catches up every (n % 3 + 1)th step, so falls behind by up to
                // three policy changes.
                if !(step as u64).is_multiple_of(id % 3 + 1) {
                    continue;
                }
                let (view, held) = views
                    .entry(id)
                    .or_insert_with(|| (StreamView::new(id), BTreeSet::new()));
                let delta = if view.synced == 0 {
                    Err(Resync::Full)
                } else {
                    view.delta(&t, &cache, &config, now)
                };
                match delta {
                    Ok(d) => {
                        if let Some(d) = d {
                            // Its own id may be among the removed (a no-op for the
                            // client), never among the peers.
                            let named = ids(&d.peers_changed);
                            assert!(!named.contains(&id), "node {id} sent as its own peer");
                            held.extend(ids(&d.peers_changed));
                            for gone in d.peers_removed.iter().flatten() {
                                held.remove(gone);
                            }
                        }
                    }
                    Err(_) => {
                        let full = view.full(&t, &cache, &config, &json!({}), now).unwrap();
                        *held = ids(&full.peers).into_iter().collect();
                    }
                }
                let want = StreamView::new(id)
                    .full(&t, &cache, &config, &json!({}), now)
                    .unwrap();
                let want: BTreeSet<u64> = ids(&want.peers).into_iter().collect();
                assert_eq!(*held, want, "node {id} after step {step}");
            }
        }
    }

    /// Every stream's filter reads the rules' sources resolved once; a node joining (or
    /// becoming someone else to the policy) makes them be resolved again.
    #[test]
    fn filters_follow_nodes_joining_under_a_policy() {
        use crate::state::{Command, Observer};
        let (config, mut t, cache) = sample_with_cache();
        let policy = r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["*:*"]}]}"#;
        apply_to(
            &cache,
            &mut t,
            Command::SetPolicy {
                text: policy.into(),
                now: 10,
            },
        );
        let sources = |f: Option<PacketFilter>| f.unwrap().to_value()[0]["SrcIPs"].to_string();
        let mut bob = StreamView::new(2);
        let full = bob.full(&t, &cache, &config, &json!({}), 10).unwrap();
        let alice1 = t.nodes[&1].ipv4.to_string();
        assert_eq!(
            sources(full.packet_filter),
            format!("[\"{alice1}\",\"{}\"]", t.nodes[&1].ipv6)
        );

        let changes = crate::policy::compile::add_sample_node(&mut t, "alice", vec![], 4);
        cache.applied(&t, &changes);
        let d = bob.delta(&t, &cache, &config, 11).unwrap().unwrap();
        assert_eq!(d.peers_changed.unwrap()[0].0["ID"], 4);
        let alice2 = &t.nodes[&4];
        // Nodes 2 and 3 sit between alice's two nodes' addresses: one entry each.
        assert!(sources(d.packet_filter).contains(&format!("\"{}\"", alice2.ipv4)));
    }

    #[test]
    fn patch_names_follow_the_patchable_fields() {
        for (field, name) in PATCHABLE.iter().zip(PATCH_NAMES) {
            let want = match *field {
                "HomeDERP" => Some("DERPRegion"),
                "DERP" => None,
                f => Some(f),
            };
            assert_eq!(name, want);
        }
    }

    #[test]
    fn taildrop_capability_follows_the_setting() {
        let mut config = Config::default();
        let mut t = crate::policy::compile::sample_tailnet();
        let node = t.nodes[&1].clone();
        assert!(cap_map(&t, &node, &config)
            .get("https://tailscale.com/cap/file-sharing")
            .is_some());
        config.taildrop = false;
        let ssh_only = serde_json::json!({"https://tailscale.com/cap/ssh": []});
        assert_eq!(cap_map(&t, &node, &config), ssh_only);
        let policy = r#"{"nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}]}"#;
        t.apply(&crate::state::Command::SetPolicy {
            text: policy.into(),
            now: 1,
        })
        .0
        .unwrap();
        assert_eq!(
            cap_map(&t, &node, &config),
            serde_json::json!({"https://tailscale.com/cap/ssh": [], "funnel": []})
        );
    }

    #[test]
    fn dns_settings_become_the_clients_dns_config() {
        let mut config = Config::default();
        assert_eq!(
            dns_config(&config),
            serde_json::json!({ "Domains": ["hydrascale.internal"], "Proxied": true, "Resolvers": [] })
        );
        config.dns.nameservers = vec!["1.1.1.1".into()];
        config.dns.override_local_dns = false;
        config.dns.search_domains = vec!["corp.example.".into()];
        config
            .dns
            .split
            .insert("corp.example".into(), vec!["10.0.0.53".into()]);
        config.dns.extra_records.push(crate::config::DnsRecord {
            name: "grafana.hydrascale.internal.".into(),
            record_type: "A".into(),
            value: "100.64.0.9".into(),
        });
        assert_eq!(
            dns_config(&config),
            serde_json::json!({
                "Domains": ["hydrascale.internal", "corp.example"],
                "Proxied": true,
                "FallbackResolvers": [{ "Addr": "1.1.1.1" }],
                "Routes": { "corp.example": [{ "Addr": "10.0.0.53" }] },
                "ExtraRecords": [{ "Name": "grafana.hydrascale.internal", "Type": "A", "Value": "100.64.0.9" }],
            })
        );
        config.dns.magic_dns = false;
        assert_eq!(
            dns_config(&config)["Domains"],
            serde_json::json!(["corp.example"])
        );
        assert_eq!(dns_config(&config)["Proxied"], false);
    }
}
