//! Rendering one node: its `tailcfg.Node` (as its peers and the node itself see it), its
//! capabilities, which node carries each subnet route, and the parts of a map that are
//! the same for every node (user profiles, DNS configuration).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::config::Config;
use crate::policy::{compile, Policy};
use crate::state::{Node, Tailnet};
use crate::tailcfg::rfc3339;

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
pub(super) fn policy(t: &Tailnet) -> Option<&Policy> {
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

/// `UserProfiles`: every user, as peers' and the node's own `User` ids refer to them.
pub(super) fn user_profiles(t: &Tailnet) -> Vec<Value> {
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
pub(super) fn dns_config(config: &Config) -> Value {
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

/// Fields a `PeersChangedPatch` can carry; a change to anything else needs `PeersChanged`.
pub const PATCHABLE: [&str; 8] = [
    "Endpoints",
    "HomeDERP",
    "DERP",
    "Online",
    "LastSeen",
    "DiscoKey",
    "Key",
    "KeyExpiry",
];

#[cfg(test)]
mod tests {
    use super::*;

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
