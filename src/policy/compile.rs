//! Compiles the policy for one node against the applied state: its packet filter (who may
//! reach it, on which ports), whether a given peer belongs in its map, its SSH policy and
//! its `nodeAttrs` capabilities.
//!
//! The work is per rule: a rule's sources are resolved once for the node being compiled,
//! never for every pair of nodes, and a rule whose destinations do not name the node
//! costs one test.

use std::collections::BTreeSet;

use ipnet::IpNet;
use serde_json::{json, Value};

use super::{Alias, Policy, Principal, Rule, SshAction, SshUsers};
use crate::state::{Node, Tailnet};

/// What the policy knows about `n`: its user (unless tagged), tags and addresses.
pub fn principal(t: &Tailnet, n: &Node) -> Principal {
    Principal {
        user: if n.tags.is_empty() {
            t.users.get(&n.user_id).map(|u| u.name.clone())
        } else {
            None
        },
        tags: n.tags.clone(),
        ips: vec![n.ipv4.into(), n.ipv6.into()],
        routes: n.served_routes(),
    }
}

/// The public internet as prefixes: everything but private, shared (CGNAT, where
/// Tailscale addresses live), loopback, link-local and multicast ranges. What
/// `autogroup:internet` reaches through an exit node.
pub fn internet() -> &'static [IpNet] {
    static NETS: std::sync::OnceLock<Vec<IpNet>> = std::sync::OnceLock::new();
    NETS.get_or_init(|| {
        let holes: Vec<IpNet> = [
            "0.0.0.0/8",
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "224.0.0.0/3",
            "fc00::/7",
            "fe80::/10",
            "ff00::/8",
        ]
        .iter()
        .filter_map(|h| h.parse().ok())
        .collect();
        let mut out = Vec::new();
        for all in ["0.0.0.0/0", "::/0"] {
            if let Ok(net) = all.parse() {
                subtract(net, &holes, &mut out);
            }
        }
        out
    })
}

fn subtract(net: IpNet, holes: &[IpNet], out: &mut Vec<IpNet>) {
    if holes.iter().any(|h| h.contains(&net)) {
        return;
    }
    if !holes.iter().any(|h| net.contains(h)) {
        out.push(net);
        return;
    }
    if let Ok(halves) = net.subnets(net.prefix_len() + 1) {
        for half in halves {
            subtract(half, holes, out);
        }
    }
}

/// Addresses of the nodes matching any of `src` and `extra`, as packet-filter sources.
/// `*` and prefixes stay as written unless `extra` narrows them to nodes.
fn sources(
    policy: &Policy,
    t: &Tailnet,
    src: &[Alias],
    extra: Option<&dyn Fn(&Principal) -> bool>,
) -> Vec<String> {
    let mut out = BTreeSet::new();
    let mut node_aliases = Vec::new();
    for a in src {
        match (a, extra) {
            (Alias::All, None) => return vec!["*".into()],
            (Alias::Prefix(net), None) => {
                out.insert(net.to_string());
            }
            _ => node_aliases.push(a),
        }
    }
    if !node_aliases.is_empty() {
        for n in t.nodes.values() {
            let p = principal(t, n);
            if node_aliases.iter().any(|a| policy.matches(a, &p)) && extra.is_none_or(|f| f(&p)) {
                out.insert(n.ipv4.to_string());
                out.insert(n.ipv6.to_string());
            }
        }
    }
    out.into_iter().collect()
}

fn dst_ports(dst: &[&(Alias, Vec<super::Ports>)], me: &Principal) -> Vec<Value> {
    let mut out = Vec::new();
    for (alias, ports) in dst {
        let ips: Vec<String> = match alias {
            Alias::All => vec!["*".into()],
            Alias::Prefix(net) => vec![net.to_string()],
            Alias::Internet => internet().iter().map(IpNet::to_string).collect(),
            _ => me.ips.iter().map(|ip| ip.to_string()).collect(),
        };
        for ip in ips {
            for p in ports {
                let v = json!({ "IP": ip, "Ports": { "First": p.first, "Last": p.last } });
                if !out.contains(&v) {
                    out.push(v);
                }
            }
        }
    }
    out
}

fn filter_rule(src: Vec<String>, dst: Vec<Value>, r: &Rule) -> Value {
    let mut v = json!({ "SrcIPs": src, "DstPorts": dst });
    if !r.protos.is_empty() {
        v["IPProto"] = json!(r.protos);
    }
    v
}

/// `me`'s packet filter: one entry per rule that names it as a destination.
pub fn packet_filter(policy: &Policy, t: &Tailnet, me: &Node) -> Value {
    let pm = principal(t, me);
    let mut rules = Vec::new();
    for r in &policy.rules {
        let direct: Vec<_> = r
            .dst
            .iter()
            .filter(|(a, _)| *a != Alias::OwnNodes && policy.matches(a, &pm))
            .collect();
        if !direct.is_empty() {
            let src = sources(policy, t, &r.src, None);
            if !src.is_empty() {
                rules.push(filter_rule(src, dst_ports(&direct, &pm), r));
            }
        }
        let own: Vec<_> = r
            .dst
            .iter()
            .filter(|(a, _)| *a == Alias::OwnNodes)
            .collect();
        if !own.is_empty() && pm.user.is_some() {
            let same_user = |p: &Principal| p.user == pm.user;
            let src = sources(policy, t, &r.src, Some(&same_user));
            if !src.is_empty() {
                rules.push(filter_rule(src, dst_ports(&own, &pm), r));
            }
        }
    }
    Value::Array(rules)
}

/// `me`'s SSH policy: who may open a session to it, as which local users.
pub fn ssh_policy(policy: &Policy, t: &Tailnet, me: &Node, check_url: &str) -> Option<Value> {
    if policy.ssh.is_empty() {
        return None;
    }
    let pm = principal(t, me);
    let mut rules = Vec::new();
    for r in &policy.ssh {
        let direct = r
            .dst
            .iter()
            .any(|a| *a != Alias::OwnNodes && policy.matches(a, &pm));
        let own = pm.user.is_some() && r.dst.contains(&Alias::OwnNodes);
        let same_user = |p: &Principal| p.user == pm.user;
        let src = match (direct, own) {
            (false, false) => continue,
            (true, _) => sources(policy, t, &r.src, Some(&|_: &Principal| true)),
            (false, true) => sources(policy, t, &r.src, Some(&same_user)),
        };
        if src.is_empty() {
            continue;
        }
        let mut users = serde_json::Map::new();
        for u in &r.users {
            match u {
                SshUsers::Named(n) => {
                    users.insert(n.clone(), json!(n));
                }
                SshUsers::NonRoot => {
                    users.insert("*".into(), json!("="));
                    users.entry("root").or_insert(json!(""));
                }
            }
        }
        let principals: Vec<Value> = src.iter().map(|ip| json!({ "nodeIP": ip })).collect();
        let action = match r.action {
            SshAction::Accept => accept_action(),
            // The node holds the connection and asks the control server (over its Noise
            // session) what to do; see `control::ssh_check`.
            SshAction::Check { .. } => json!({ "holdAndDelegate": check_url }),
        };
        rules.push(json!({
            "principals": principals,
            "sshUsers": users,
            "action": action,
        }));
    }
    Some(json!({ "rules": rules }))
}

/// `tailcfg.SSHAction` letting a connection in.
pub fn accept_action() -> Value {
    json!({
        "accept": true,
        "allowAgentForwarding": true,
        "allowLocalPortForwarding": true,
        "allowRemotePortForwarding": true,
    })
}

/// What the policy's SSH rules say about `ssh_user` on `dst` connecting from `src`: the
/// action of the first rule naming all three, in the order the rules are written (the
/// order the client tries them in), or `None` when no rule lets the connection in.
pub fn ssh_action_for(
    policy: &Policy,
    t: &Tailnet,
    src: &Node,
    dst: &Node,
    ssh_user: &str,
) -> Option<SshAction> {
    let (ps, pd) = (principal(t, src), principal(t, dst));
    policy.ssh.iter().find_map(|r| {
        let direct = r
            .dst
            .iter()
            .any(|a| *a != Alias::OwnNodes && policy.matches(a, &pd));
        let own = pd.user.is_some() && r.dst.contains(&Alias::OwnNodes) && ps.user == pd.user;
        let user_ok = r.users.iter().any(|u| match u {
            SshUsers::Named(n) => n == ssh_user,
            SshUsers::NonRoot => ssh_user != "root",
        });
        let src_ok = r.src.iter().any(|a| policy.matches(a, &ps));
        ((direct || own) && user_ok && src_ok).then_some(r.action)
    })
}

#[cfg(test)]
/// A tailnet with users alice and bob, alice's laptop (1), bob's laptop (2) and a
/// server tagged tag:web registered by alice (3).
pub(crate) fn sample_tailnet() -> Tailnet {
    use crate::state::{Command, RegisterAuth};
    let mut t = Tailnet::default();
    for name in ["alice", "bob"] {
        t.apply(&Command::CreateUser {
            name: name.into(),
            display_name: String::new(),
            now: 1,
        })
        .0
        .unwrap();
    }
    let mut register = |user: &str, tags: Vec<String>, n: u8| {
        t.apply(&Command::CreatePreAuthKey {
            user: user.into(),
            prefix: format!("k{n}"),
            hash: format!("h{n}"),
            reusable: false,
            ephemeral: false,
            expiration: None,
            tags,
            now: 1,
        })
        .0
        .unwrap();
        t.apply(&Command::RegisterNode {
            machine_key: format!("mkey:{n:064x}"),
            node_key: format!("nodekey:{n:064x}"),
            old_node_key: None,
            hostname: format!("h{n}"),
            hostinfo: "{}".into(),
            auth: RegisterAuth::PreAuthKey {
                hash: format!("h{n}"),
            },
            expiry: None,
            ephemeral: false,
            prefixes: Default::default(),
            now: 2,
        })
        .0
        .unwrap();
    };
    register("alice", vec![], 1);
    register("bob", vec![], 2);
    register("alice", vec!["tag:web".into()], 3);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tailnet() -> Tailnet {
        sample_tailnet()
    }

    fn node(t: &Tailnet, n: u64) -> &Node {
        &t.nodes[&n]
    }

    #[test]
    fn filters_name_sources_by_address_and_only_rules_for_the_node() {
        let t = tailnet();
        let p = super::super::parse(
            r#"{
              "tagOwners": {"tag:web": ["alice@"]},
              "acls": [
                {"action": "accept", "src": ["bob@"], "dst": ["tag:web:443"], "proto": "tcp"},
                {"action": "accept", "src": ["*"], "dst": ["autogroup:self:*"]},
              ],
            }"#,
        )
        .unwrap();
        let web = node(&t, 3);
        let f = packet_filter(&p, &t, web);
        let bob = node(&t, 2);
        assert_eq!(
            f,
            json!([{
                "SrcIPs": [bob.ipv4.to_string(), bob.ipv6.to_string()],
                "DstPorts": [
                    {"IP": web.ipv4.to_string(), "Ports": {"First": 443, "Last": 443}},
                    {"IP": web.ipv6.to_string(), "Ports": {"First": 443, "Last": 443}},
                ],
                "IPProto": [6],
            }])
        );
        // Alice's laptop: only autogroup:self applies, and its sources are alice's own
        // untagged nodes (the tagged server is not hers any more).
        let alice = node(&t, 1);
        let f = packet_filter(&p, &t, alice);
        assert_eq!(
            f[0]["SrcIPs"],
            json!([alice.ipv4.to_string(), alice.ipv6.to_string()])
        );
        assert_eq!(f.as_array().map(Vec::len), Some(1));

        let (pa, pb, pw) = (principal(&t, alice), principal(&t, bob), principal(&t, web));
        assert!(p.connected(&pb, &pw));
        assert!(!p.connected(&pa, &pb));
        assert!(!p.connected(&pa, &pw));
    }

    #[test]
    fn a_router_is_named_by_the_subnets_it_serves() {
        let mut t = tailnet();
        let route: IpNet = "10.1.2.0/24".parse().unwrap();
        if let Some(n) = t.nodes.get_mut(&2) {
            n.advertised_routes = vec![route];
            n.approved_routes = vec![route];
        }
        let p = super::super::parse(
            r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["10.1.2.0/24:443"]}]}"#,
        )
        .unwrap();
        let router = node(&t, 2);
        let f = packet_filter(&p, &t, router);
        assert_eq!(
            f[0]["DstPorts"],
            json!([{"IP": "10.1.2.0/24", "Ports": {"First": 443, "Last": 443}}])
        );
        // alice's laptop needs the router as a peer; only the router gets a filter entry.
        assert!(p.connected(&principal(&t, node(&t, 1)), &principal(&t, router)));
        assert!(packet_filter(&p, &t, node(&t, 1))
            .as_array()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_internet_leaves_out_private_and_tailscale_ranges() {
        let nets = internet();
        let inside = |ip: &str| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            nets.iter().any(|n| n.contains(&ip))
        };
        for public in ["1.1.1.1", "8.8.8.8", "203.0.113.9", "2606:4700::1111"] {
            assert!(inside(public), "{public}");
        }
        for private in [
            "10.1.2.3",
            "100.64.0.1",
            "192.168.1.1",
            "172.20.0.1",
            "fd7a:115c:a1e0::1",
            "224.0.0.1",
        ] {
            assert!(!inside(private), "{private}");
        }
        assert!(nets.len() < 64, "{}", nets.len());
    }

    #[test]
    fn ssh_policy_lists_sources_and_users() {
        let t = tailnet();
        let p = super::super::parse(
            r#"{"tagOwners": {"tag:web": ["alice@"]},
                "ssh": [{"action": "accept", "src": ["alice@"], "dst": ["tag:web"], "users": ["autogroup:nonroot", "deploy"]}]}"#,
        )
        .unwrap();
        let alice = node(&t, 1);
        let s = ssh_policy(&p, &t, node(&t, 3), "https://c/x").unwrap();
        assert_eq!(
            s["rules"][0]["principals"][0]["nodeIP"],
            json!(alice.ipv4.to_string())
        );
        assert_eq!(
            s["rules"][0]["sshUsers"],
            json!({"*": "=", "root": "", "deploy": "deploy"})
        );
        assert_eq!(
            ssh_policy(&p, &t, alice, "https://c/x").unwrap(),
            json!({"rules": []})
        );
    }

    #[test]
    fn check_rules_hold_and_the_server_finds_the_rule() {
        let t = tailnet();
        let p = super::super::parse(
            r#"{"tagOwners": {"tag:web": ["alice@"]},
                "ssh": [
                  {"action": "check", "src": ["alice@"], "dst": ["tag:web"], "users": ["root"], "checkPeriod": "2h"},
                  {"action": "accept", "src": ["alice@"], "dst": ["tag:web"], "users": ["autogroup:nonroot"]},
                  {"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"], "checkPeriod": "always"}]}"#,
        )
        .unwrap();
        let (alice, bob, web) = (node(&t, 1), node(&t, 2), node(&t, 3));
        let s = ssh_policy(&p, &t, web, "https://c/x?u=$SSH_USER").unwrap();
        assert_eq!(
            s["rules"][0]["action"],
            json!({"holdAndDelegate": "https://c/x?u=$SSH_USER"})
        );
        assert_eq!(s["rules"][1]["action"]["accept"], true);
        assert_eq!(
            ssh_action_for(&p, &t, alice, web, "root"),
            Some(SshAction::Check {
                period_ms: 2 * 3600 * 1000
            })
        );
        assert_eq!(
            ssh_action_for(&p, &t, alice, web, "deploy"),
            Some(SshAction::Accept)
        );
        assert_eq!(ssh_action_for(&p, &t, bob, web, "deploy"), None);
        assert_eq!(ssh_action_for(&p, &t, bob, alice, "root"), None);
        assert_eq!(
            ssh_action_for(&p, &t, alice, alice, "root"),
            Some(SshAction::Check { period_ms: 0 })
        );
    }
}
