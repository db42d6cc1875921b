//! Turns the applied tailnet state into `tailcfg` map responses: full maps and deltas.
//!
//! A delta is computed against what this stream last sent, so a reconnecting or lagging
//! stream converges on the committed state without any shared bookkeeping.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use serde_json::{json, Value};

use super::tailcfg::{filter_allow_all, DerpMap, DerpNode, DerpRegion, MapResponse};
use crate::config::Config;
use crate::policy::{compile, Policy, Principal};
use crate::state::{Node, Replica, Tailnet};

pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

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
    if d.enabled {
        let node = |r: &Replica| DerpNode {
            name: format!("{}r{}", d.region_id, r.id),
            region_id: d.region_id,
            host_name: r.derp_host.clone(),
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

/// Node capabilities (self and peers alike, as the client looks at both): Taildrop for
/// every node when switched on, and what the policy's `nodeAttrs` give this node.
fn cap_map(t: &Tailnet, node: &Node, config: &Config) -> Value {
    let mut caps = serde_json::Map::new();
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

/// What one map stream has told its client so far.
pub struct StreamView {
    pub self_id: u64,
    self_sent: Option<Value>,
    peers_sent: HashMap<u64, Value>,
    /// Who the node is to the policy, when its filter and peers were last computed.
    principal: Principal,
    filter_sent: Option<Value>,
    ssh_sent: Option<Value>,
}

/// The packet filter and SSH policy of `me` under the current policy.
fn filters(t: &Tailnet, me: &Node) -> (Value, Option<Value>) {
    match policy(t) {
        None => (filter_allow_all(), None),
        Some(p) => (
            compile::packet_filter(p, t, me),
            compile::ssh_policy(p, t, me),
        ),
    }
}

/// Whether `peer` belongs in the map of the node that is `me`.
fn visible(t: &Tailnet, me: &Principal, peer: &Node) -> bool {
    policy(t).is_none_or(|p| p.connected(me, &compile::principal(t, peer)))
}

/// Fields a `PeersChangedPatch` can carry; a change to anything else needs `PeersChanged`.
const PATCHABLE: &[&str] = &[
    "Endpoints",
    "HomeDERP",
    "DERP",
    "Online",
    "LastSeen",
    "DiscoKey",
    "Key",
    "KeyExpiry",
];

impl StreamView {
    pub fn new(self_id: u64) -> Self {
        Self {
            self_id,
            self_sent: None,
            peers_sent: HashMap::new(),
            principal: Principal::default(),
            filter_sent: None,
            ssh_sent: None,
        }
    }

    /// A complete map; replaces everything the client had.
    pub fn full(
        &mut self,
        t: &Tailnet,
        config: &Config,
        derp_map: &Value,
        now: i64,
    ) -> Option<MapResponse> {
        let me = t.nodes.get(&self.self_id)?;
        let base = &config.base_domain;
        let primary = primary_routes(t);
        let self_json = node_json(t, me, &primary, config, now);
        let previously: Vec<u64> = self.peers_sent.keys().copied().collect();
        self.peers_sent.clear();
        self.principal = compile::principal(t, me);
        let mut peers = Vec::new();
        for n in t.nodes.values().filter(|n| n.id != self.self_id) {
            if !visible(t, &self.principal, n) {
                continue;
            }
            let j = node_json(t, n, &primary, config, now);
            self.peers_sent.insert(n.id, j.clone());
            peers.push(j);
        }
        let previously: Vec<u64> = previously
            .into_iter()
            .filter(|id| !self.peers_sent.contains_key(id))
            .collect();
        let (filter, ssh) = filters(t, me);
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
            ..Default::default()
        };
        if peers.is_empty() {
            // An empty Peers list means "unchanged" to the client; removals need PeersRemoved.
            let mut gone = previously;
            gone.sort_unstable();
            resp.peers_removed = if gone.is_empty() { None } else { Some(gone) };
        } else {
            resp.peers = Some(peers);
        }
        Some(resp)
    }

    /// A delta for the nodes in `touched`; `None` when nothing visible changed.
    /// Returns `Err(())` when this stream's own node is gone and the stream must end.
    #[allow(clippy::result_unit_err)]
    pub fn delta(
        &mut self,
        t: &Tailnet,
        config: &Config,
        touched: &[u64],
        now: i64,
    ) -> Result<Option<MapResponse>, ()> {
        let mut resp = MapResponse::default();
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        let mut patches = Vec::new();
        let mut new_user = false;
        let me = t.nodes.get(&self.self_id).ok_or(())?;
        let principal = compile::principal(t, me);
        let primary = primary_routes(t);
        // A router coming or going moves routes between the others: touch them all.
        let with_routers: Vec<u64>;
        let touched = if touched.iter().any(|id| {
            t.nodes
                .get(id)
                .is_none_or(|n| !n.approved_routes.is_empty())
        }) {
            with_routers = touched
                .iter()
                .copied()
                .chain(
                    t.nodes
                        .values()
                        .filter(|n| !n.approved_routes.is_empty())
                        .map(|n| n.id),
                )
                .collect::<BTreeSet<u64>>()
                .into_iter()
                .collect();
            &with_routers[..]
        } else {
            touched
        };
        // When the node itself became someone else to the policy (tags, addresses), every
        // peer's visibility may have changed, not only the touched ones'.
        let everyone: Vec<u64>;
        let touched = if principal != self.principal && policy(t).is_some() {
            self.principal = principal;
            everyone = t
                .nodes
                .keys()
                .chain(self.peers_sent.keys())
                .copied()
                .collect::<BTreeSet<u64>>()
                .into_iter()
                .collect();
            &everyone[..]
        } else {
            self.principal = principal;
            touched
        };
        for &id in touched {
            let current = t
                .nodes
                .get(&id)
                .filter(|n| id == self.self_id || visible(t, &self.principal, n));
            if id == self.self_id {
                let j = node_json(t, me, &primary, config, now);
                if self.self_sent.as_ref() != Some(&j) {
                    self.self_sent = Some(j.clone());
                    resp.node = Some(j);
                }
                continue;
            }
            match current {
                None => {
                    if self.peers_sent.remove(&id).is_some() {
                        removed.push(id);
                    }
                }
                Some(n) => {
                    let j = node_json(t, n, &primary, config, now);
                    match self.peers_sent.get(&id) {
                        Some(old) if *old == j => {}
                        Some(old) => {
                            match patch_for(id, old, &j) {
                                Some(p) => patches.push(p),
                                None => changed.push(j.clone()),
                            }
                            self.peers_sent.insert(id, j);
                        }
                        None => {
                            new_user = true;
                            changed.push(j.clone());
                            self.peers_sent.insert(id, j);
                        }
                    }
                }
            }
        }
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
        if resp.node.is_some() || resp.peers_changed.is_some() || resp.peers_removed.is_some() {
            let (filter, ssh) = filters(t, me);
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
            && resp.packet_filter.is_none();
        Ok(if empty { None } else { Some(resp) })
    }
}

/// A `tailcfg.PeerChange` when only patchable fields differ.
fn patch_for(id: u64, old: &Value, new: &Value) -> Option<Value> {
    let (o, n) = (old.as_object()?, new.as_object()?);
    let strip = |m: &serde_json::Map<String, Value>| {
        m.iter()
            .filter(|(k, _)| !PATCHABLE.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    if strip(o) != strip(n) {
        return None;
    }
    let mut p = serde_json::Map::new();
    p.insert("NodeID".into(), json!(id));
    for field in PATCHABLE {
        let (ov, nv) = (o.get(*field), n.get(*field));
        if ov == nv || *field == "DERP" {
            continue;
        }
        match (field, nv) {
            // LastSeen disappears when a node comes online; Online=true says it all.
            (&"LastSeen", None) => {}
            (_, None) => return None,
            (&"HomeDERP", Some(v)) => {
                p.insert("DERPRegion".into(), v.clone());
            }
            (f, Some(v)) => {
                p.insert((*f).to_string(), v.clone());
            }
        }
    }
    Some(Value::Object(p))
}

/// Encodes one map message: 4-byte little-endian length, then zstd(JSON).
pub fn encode_frame(resp: &MapResponse) -> Result<bytes::Bytes, std::io::Error> {
    let json = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    let compressed = zstd::bulk::compress(&json, 3)?;
    let len = u32::try_from(compressed.len()).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(4 + compressed.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&compressed);
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
        let p = dir.join("regions.json");
        std::fs::write(&p, text).unwrap();
        p
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

    #[test]
    fn taildrop_capability_follows_the_setting() {
        let mut config = Config::default();
        let mut t = crate::policy::compile::sample_tailnet();
        let node = t.nodes[&1].clone();
        assert!(cap_map(&t, &node, &config)
            .get("https://tailscale.com/cap/file-sharing")
            .is_some());
        config.taildrop = false;
        assert_eq!(cap_map(&t, &node, &config), serde_json::json!({}));
        let policy = r#"{"nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}]}"#;
        t.apply(&crate::state::Command::SetPolicy {
            text: policy.into(),
            now: 1,
        })
        .0
        .unwrap();
        assert_eq!(
            cap_map(&t, &node, &config),
            serde_json::json!({"funnel": []})
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
