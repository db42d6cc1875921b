//! Rendering one node: its `tailcfg.Node` (as its peers and the node itself see it), its
//! capabilities, which node carries each subnet route, and the parts of a map that are
//! the same for every node (user profiles, DNS configuration).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::config::Config;
use crate::policy::{compile, Policy};
use crate::state::{Node, Tailnet};
use crate::tailcfg::{self, rfc3339, DnsConfig, DnsRecord, DnsResolver, UserProfile};

/// Node capabilities (self and peers alike, as the client looks at both): Tailscale SSH
/// (the client runs its SSH server, `--ssh`, only with it; what it lets in is still
/// the policy's `ssh` rules, none without a policy), Taildrop for every node when switched
/// on, and what the policy's `nodeAttrs` give this node.
fn cap_map(t: &Tailnet, node: &Node, config: &Config) -> BTreeMap<String, Vec<Value>> {
    let mut caps = BTreeMap::new();
    caps.insert("https://tailscale.com/cap/ssh".into(), Vec::new());
    if config.taildrop {
        caps.insert("https://tailscale.com/cap/file-sharing".into(), Vec::new());
    }
    if let Some(p) = policy(t) {
        for attr in p.attrs_for(&compile::principal(t, node)) {
            caps.insert(attr.to_string(), Vec::new());
        }
    }
    caps
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
    let hostinfo: Value = serde_json::from_str(&node.hostinfo).unwrap_or_else(|_| json!({}));
    let addresses = vec![format!("{}/32", node.ipv4), format!("{}/128", node.ipv6)];
    let primary_routes: Vec<String> = primary
        .iter()
        .filter(|(_, id)| **id == node.id)
        .map(|(r, _)| r.to_string())
        .collect();
    let mut allowed_ips = addresses.clone();
    allowed_ips.extend(primary_routes.iter().cloned());
    allowed_ips.extend(
        node.served_routes()
            .iter()
            .filter(|r| crate::state::is_exit_route(r))
            .map(|r| r.to_string()),
    );
    let home_derp = (node.home_derp > 0).then_some(node.home_derp);
    let wire = tailcfg::Node {
        id: node.id,
        stable_id: node.stable_id.clone(),
        name: format!("{}.{}.", node.given_name, config.base_domain),
        user: node.user_id,
        key: node.node_key.clone(),
        key_expiry: node.expiry.map(rfc3339),
        expired: node.expiry.is_some_and(|exp| exp <= now),
        machine: node.machine_key.clone(),
        disco_key: node.disco_key.clone(),
        addresses,
        allowed_ips,
        endpoints: node.endpoints.clone(),
        home_derp,
        derp: home_derp.map(|r| format!("127.3.3.40:{r}")),
        hostinfo,
        created: rfc3339(node.created),
        tags: node.tags.clone(),
        primary_routes,
        last_seen: node.last_seen.filter(|_| !node.online).map(rfc3339),
        online: node.online,
        machine_authorized: true,
        cap_map: cap_map(t, node, config),
    };
    // A value, not text: the peer cache compares and patches nodes field by field. It
    // cannot fail (every map in it is keyed by strings).
    serde_json::to_value(wire).unwrap_or(Value::Null)
}

/// `UserProfiles`: every user, as peers' and the node's own `User` ids refer to them.
pub(super) fn user_profiles(t: &Tailnet) -> Vec<UserProfile> {
    t.users
        .values()
        .map(|u| UserProfile {
            id: u.id,
            login_name: u.name.clone(),
            display_name: if u.display_name.is_empty() {
                u.name.clone()
            } else {
                u.display_name.clone()
            },
        })
        .collect()
}

/// Tailscale's `DNSConfig` from the tailnet's DNS settings (the replicated ones, or this
/// replica's `[dns]` until they are seeded): the same for every node, so it travels only
/// in full maps.
pub(super) fn dns_config(t: &Tailnet, config: &Config) -> DnsConfig {
    let own;
    let d = match &t.dns {
        Some(d) => d,
        None => {
            own = config.dns.settings();
            &own
        }
    };
    let resolvers = |list: &[String]| -> Vec<DnsResolver> {
        list.iter()
            .map(|a| DnsResolver { addr: a.clone() })
            .collect()
    };
    let trim = |s: &str| s.trim_end_matches('.').to_string();
    let mut domains = Vec::new();
    if d.magic_dns {
        domains.push(trim(&config.base_domain));
    }
    domains.extend(d.search_domains.iter().map(|s| trim(s)));
    let nameservers = resolvers(&d.nameservers);
    let (resolvers_, fallback) = if d.override_local_dns {
        (Some(nameservers), None)
    } else {
        (None, Some(nameservers))
    };
    DnsConfig {
        resolvers: resolvers_,
        fallback_resolvers: fallback,
        routes: d
            .split
            .iter()
            .map(|(domain, list)| (trim(domain), resolvers(list)))
            .collect(),
        domains,
        proxied: d.magic_dns,
        extra_records: d
            .extra_records
            .iter()
            .map(|r| DnsRecord {
                name: trim(&r.name),
                record_type: r.record_type.clone(),
                value: r.value.clone(),
            })
            .collect(),
    }
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

    /// The `json!` rendering the typed wire structs replaced, kept as the reference they
    /// must equal value for value (the peer cache and the client compare values).
    mod reference {
        use super::super::policy;
        use crate::config::Config;
        use crate::mapper::Primaries;
        use crate::policy::compile;
        use crate::state::{Node, Tailnet};
        use crate::tailcfg::rfc3339;
        use serde_json::{json, Value};

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

        pub(super) fn node_json(
            t: &Tailnet,
            node: &Node,
            primary: &Primaries,
            config: &Config,
            now: i64,
        ) -> Value {
            let base_domain = &config.base_domain;
            let hostinfo: Value =
                serde_json::from_str(&node.hostinfo).unwrap_or_else(|_| json!({}));
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

        pub(super) fn dns_config(config: &Config) -> Value {
            let d = &config.dns;
            let resolvers = |list: &[String]| -> Vec<Value> {
                list.iter().map(|a| json!({ "Addr": a })).collect()
            };
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
    }

    /// Nodes in every shape the renderer distinguishes: with and without disco key, home
    /// relay, key expiry (past and future), tags, last seen while offline and online,
    /// routes (primary, standby, exit) and hostinfo, under no policy and under one with
    /// `nodeAttrs`, and a user with a display name.
    #[test]
    fn typed_rendering_equals_the_json_reference() {
        let mut config = Config::default();
        let mut t = crate::policy::compile::sample_tailnet();
        let ids: Vec<u64> = t.nodes.keys().copied().collect();
        for (i, id) in ids.iter().enumerate() {
            let n = t.nodes.get_mut(id).unwrap();
            n.disco_key = if i % 2 == 0 {
                format!("discokey:{:064x}", i)
            } else {
                String::new()
            };
            n.home_derp = (i % 3) as i32 * 450;
            n.expiry = match i % 3 {
                0 => None,
                1 => Some(5),
                _ => Some(50),
            };
            n.tags = if i % 2 == 1 {
                vec!["tag:web".into()]
            } else {
                vec![]
            };
            n.last_seen = Some(7);
            n.online = i % 2 == 0;
            // Nodes 0 and 2 both serve the subnet (0 is its primary); 0 is an exit node.
            if i % 2 == 0 {
                let routes: Vec<ipnet::IpNet> = if i == 0 {
                    vec!["10.1.0.0/16".parse().unwrap(), "0.0.0.0/0".parse().unwrap()]
                } else {
                    vec!["10.1.0.0/16".parse().unwrap()]
                };
                n.advertised_routes = routes.clone();
                n.approved_routes = routes;
            }
            n.hostinfo = if i % 2 == 0 {
                r#"{"OS":"linux","Hostname":"h"}"#.into()
            } else {
                "not json".into()
            };
        }
        let check = |t: &Tailnet, config: &Config| {
            let primary = primary_routes(t);
            for n in t.nodes.values() {
                assert_eq!(
                    node_json(t, n, &primary, config, 10),
                    reference::node_json(t, n, &primary, config, 10),
                    "node {}",
                    n.id
                );
            }
            assert_eq!(
                serde_json::to_value(user_profiles(t)).unwrap(),
                json!(reference::user_profiles(t))
            );
        };
        check(&t, &config);
        // The shapes above are really there: node 0 carries the subnet and is an exit node.
        let first = node_json(&t, &t.nodes[&ids[0]], &primary_routes(&t), &config, 10);
        assert_eq!(first["PrimaryRoutes"], json!(["10.1.0.0/16"]));
        assert_eq!(first["AllowedIPs"].as_array().map(Vec::len), Some(4));
        config.taildrop = false;
        let policy = r#"{"nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}]}"#;
        t.apply(&crate::state::Command::SetPolicy {
            text: policy.into(),
            now: 1,
        })
        .0
        .unwrap();
        check(&t, &config);
        if let Some(u) = t.users.values_mut().next() {
            u.display_name = "Alice A.".into();
        }
        check(&t, &config);
    }

    #[test]
    fn typed_dns_config_equals_the_json_reference() {
        let mut config = Config::default();
        let same = |c: &Config| {
            assert_eq!(
                serde_json::to_value(dns_config(&crate::state::Tailnet::default(), c)).unwrap(),
                reference::dns_config(c)
            )
        };
        same(&config);
        config.dns.nameservers = vec!["1.1.1.1".into(), "9.9.9.9".into()];
        same(&config);
        config.dns.override_local_dns = false;
        config.dns.search_domains = vec!["corp.example.".into()];
        config
            .dns
            .split
            .insert("corp.example".into(), vec!["10.0.0.53".into()]);
        config.dns.split.insert("lab.example.".into(), vec![]);
        config.dns.extra_records.push(crate::config::DnsRecord {
            name: "grafana.hydrascale.internal.".into(),
            record_type: "A".into(),
            value: "100.64.0.9".into(),
        });
        same(&config);
        config.dns.magic_dns = false;
        same(&config);
    }

    #[test]
    fn taildrop_capability_follows_the_setting() {
        let mut config = Config::default();
        let mut t = crate::policy::compile::sample_tailnet();
        let node = t.nodes[&1].clone();
        assert!(cap_map(&t, &node, &config).contains_key("https://tailscale.com/cap/file-sharing"));
        config.taildrop = false;
        let ssh_only = serde_json::json!({"https://tailscale.com/cap/ssh": []});
        assert_eq!(json!(cap_map(&t, &node, &config)), ssh_only);
        let policy = r#"{"nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}]}"#;
        t.apply(&crate::state::Command::SetPolicy {
            text: policy.into(),
            now: 1,
        })
        .0
        .unwrap();
        assert_eq!(
            json!(cap_map(&t, &node, &config)),
            serde_json::json!({"https://tailscale.com/cap/ssh": [], "funnel": []})
        );
    }

    #[test]
    fn dns_settings_become_the_clients_dns_config() {
        let mut config = Config::default();
        assert_eq!(
            json!(dns_config(&crate::state::Tailnet::default(), &config)),
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
            json!(dns_config(&crate::state::Tailnet::default(), &config)),
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
            json!(dns_config(&crate::state::Tailnet::default(), &config))["Domains"],
            serde_json::json!(["corp.example"])
        );
        assert_eq!(
            json!(dns_config(&crate::state::Tailnet::default(), &config))["Proxied"],
            false
        );
    }

    #[test]
    fn replicated_dns_settings_win_over_the_replicas_own() {
        let mut config = Config::default();
        config.dns.nameservers = vec!["9.9.9.9".into()];
        let mut t = crate::state::Tailnet::default();
        let mine = json!(dns_config(&t, &config));
        assert_eq!(
            mine["Resolvers"],
            serde_json::json!([{ "Addr": "9.9.9.9" }])
        );
        t.dns = Some(crate::state::DnsSettings {
            nameservers: vec!["1.1.1.1".into()],
            magic_dns: false,
            ..Default::default()
        });
        let replicated = json!(dns_config(&t, &config));
        assert_eq!(
            replicated["Resolvers"],
            serde_json::json!([{ "Addr": "1.1.1.1" }])
        );
        assert_eq!(replicated["Proxied"], false);
    }
}
