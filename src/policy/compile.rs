//! Compiles the policy for one node against the applied state: its packet filter (who may
//! reach it, on which ports), whether a given peer belongs in its map, its SSH policy and
//! its `nodeAttrs` capabilities.
//!
//! The work is per rule: a rule's sources are resolved once for every node's filter
//! ([`Resolved`], kept until a node appears, goes or changes what it is to the policy),
//! never for every pair of nodes, and a rule whose destinations do not name the node
//! costs one test.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde_json::{json, Value};

use super::{Alias, Policy, Principal, Rule, SshAction, SshUsers};
use crate::state::{Node, Tailnet};
use crate::tailcfg::{FilterRule, PacketFilter};

/// What the policy knows about `n` ([`Tailnet::principal`], which the state's own
/// route auto-approval uses too).
pub fn principal(t: &Tailnet, n: &Node) -> Principal {
    t.principal(n)
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

/// Rules' sources resolved to addresses, shared by the packet filters and SSH policies of
/// every node for as long as the answers hold: the same policy, and no node appearing,
/// going or becoming someone else to it (the caller's `version` says when). Resolving a
/// rule walks every node, so without this a join under a policy cost each of N map
/// streams a walk over N nodes.
#[derive(Default)]
pub struct Resolved {
    version: Option<u64>,
    /// SSH rules' principals.
    sources: HashMap<SourceKey, Arc<Vec<String>>>,
    /// Packet-filter rules' `SrcIPs`, as the JSON text every node's filter shares.
    texts: HashMap<SourceKey, Arc<str>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum SourceKey {
    /// `acls` rule `.0`: packet-filter sources (addresses, prefixes, ranges, `*`).
    Acl(usize),
    /// The same among the untagged nodes of user `.1` (`autogroup:self`).
    AclOwn(usize, String),
    /// `ssh` rule `.0`: node addresses, one each.
    Ssh(usize),
    SshOwn(usize, String),
}

impl Resolved {
    /// Forgets everything unless it was resolved at `version`.
    pub fn at(&mut self, version: u64) -> &mut Self {
        if self.version != Some(version) {
            self.sources.clear();
            self.texts.clear();
            self.version = Some(version);
        }
        self
    }

    fn get(&mut self, key: SourceKey, resolve: impl FnOnce() -> Vec<String>) -> Arc<Vec<String>> {
        self.sources
            .entry(key)
            .or_insert_with(|| Arc::new(resolve()))
            .clone()
    }

    /// [`Resolved::get`], as the list's JSON text.
    fn text(&mut self, key: SourceKey, resolve: impl FnOnce() -> Vec<String>) -> Arc<str> {
        self.texts
            .entry(key)
            .or_insert_with(|| Arc::from(json!(resolve()).to_string()))
            .clone()
    }
}

/// Addresses of the nodes matching any of `src` and `extra`, as packet-filter sources
/// (`ranges`: runs of consecutive addresses as one `a-b` entry) or as SSH principals
/// (one address each). `*` and prefixes stay as written unless `extra` narrows them to
/// nodes.
fn sources(
    policy: &Policy,
    t: &Tailnet,
    src: &[Alias],
    extra: Option<&dyn Fn(&Principal) -> bool>,
    ranges: bool,
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
    let mut ips = Vec::new();
    if !node_aliases.is_empty() {
        for n in t.nodes.values() {
            let p = principal(t, n);
            if node_aliases.iter().any(|a| policy.matches(a, &p)) && extra.is_none_or(|f| f(&p)) {
                ips.push(IpAddr::from(n.ipv4));
                ips.push(IpAddr::from(n.ipv6));
            }
        }
    }
    if ranges {
        let mut out: Vec<String> = out.into_iter().collect();
        out.extend(address_ranges(ips));
        out
    } else {
        out.extend(ips.iter().map(IpAddr::to_string));
        out.into_iter().collect()
    }
}

/// `ips` as few packet-filter entries as may be: each run of consecutive addresses one
/// entry (`first-last`, which the client's filter reads as a range; a lone address as
/// itself). Addresses are handed out in order, so a rule naming most of a tailnet of
/// 10,000 nodes is a handful of entries in every node's filter, not 20,000.
fn address_ranges(ips: Vec<IpAddr>) -> Vec<String> {
    let (mut v4, mut v6): (Vec<u128>, Vec<u128>) = (Vec::new(), Vec::new());
    for ip in ips {
        match ip {
            IpAddr::V4(a) => v4.push(u128::from(u32::from(a))),
            IpAddr::V6(a) => v6.push(u128::from(a)),
        }
    }
    let mut out = Vec::new();
    for (mut list, v6) in [(v4, false), (v6, true)] {
        list.sort_unstable();
        list.dedup();
        let show = |x: u128| -> String {
            if v6 {
                std::net::Ipv6Addr::from(x).to_string()
            } else {
                // Built from a u32 above.
                std::net::Ipv4Addr::from(x as u32).to_string()
            }
        };
        let mut i = 0;
        while i < list.len() {
            let first = list[i];
            let mut last = first;
            while i + 1 < list.len() && list[i + 1] == last + 1 {
                i += 1;
                last = list[i];
            }
            out.push(if first == last {
                show(first)
            } else {
                format!("{}-{}", show(first), show(last))
            });
            i += 1;
        }
    }
    out
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

fn filter_rule(src: Arc<str>, dst: Vec<Value>, r: &Rule) -> FilterRule {
    let mut rest = format!(",\"DstPorts\":{}", Value::Array(dst));
    if !r.protos.is_empty() {
        rest.push_str(&format!(",\"IPProto\":{}", json!(r.protos)));
    }
    FilterRule { src, rest }
}

/// `me`'s packet filter: one entry per rule that names it as a destination. `resolved`
/// must hold what was resolved for this `policy` and `t` (or nothing).
pub fn packet_filter(
    policy: &Policy,
    t: &Tailnet,
    me: &Node,
    resolved: &mut Resolved,
) -> PacketFilter {
    let pm = principal(t, me);
    let mut rules = Vec::new();
    for (i, r) in policy.rules.iter().enumerate() {
        let direct: Vec<_> = r
            .dst
            .iter()
            .filter(|(a, _)| *a != Alias::OwnNodes && policy.matches(a, &pm))
            .collect();
        if !direct.is_empty() {
            let src = resolved.text(SourceKey::Acl(i), || sources(policy, t, &r.src, None, true));
            if &*src != "[]" {
                rules.push(filter_rule(src, dst_ports(&direct, &pm), r));
            }
        }
        let own: Vec<_> = r
            .dst
            .iter()
            .filter(|(a, _)| *a == Alias::OwnNodes)
            .collect();
        if let (false, Some(user)) = (own.is_empty(), &pm.user) {
            let same_user = |p: &Principal| p.user == pm.user;
            let src = resolved.text(SourceKey::AclOwn(i, user.clone()), || {
                sources(policy, t, &r.src, Some(&same_user), true)
            });
            if &*src != "[]" {
                rules.push(filter_rule(src, dst_ports(&own, &pm), r));
            }
        }
    }
    PacketFilter(rules)
}

/// `me`'s SSH policy: who may open a session to it, as which local users. `resolved` as
/// for [`packet_filter`].
pub fn ssh_policy(
    policy: &Policy,
    t: &Tailnet,
    me: &Node,
    check_url: &str,
    resolved: &mut Resolved,
) -> Option<Value> {
    if policy.ssh.is_empty() {
        return None;
    }
    let pm = principal(t, me);
    let mut rules = Vec::new();
    for (i, r) in policy.ssh.iter().enumerate() {
        let direct = r
            .dst
            .iter()
            .any(|a| *a != Alias::OwnNodes && policy.matches(a, &pm));
        let own = pm.user.is_some() && r.dst.contains(&Alias::OwnNodes);
        let same_user = |p: &Principal| p.user == pm.user;
        let src = match (direct, own, &pm.user) {
            (true, _, _) => resolved.get(SourceKey::Ssh(i), || {
                sources(policy, t, &r.src, Some(&|_: &Principal| true), false)
            }),
            (false, true, Some(user)) => resolved.get(SourceKey::SshOwn(i, user.clone()), || {
                sources(policy, t, &r.src, Some(&same_user), false)
            }),
            _ => continue,
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
    use crate::state::Command;
    let mut t = Tailnet::default();
    for name in ["alice", "bob"] {
        t.apply(&Command::CreateUser {
            name: name.into(),
            display_name: String::new(),
            now: 1,
            by_admin: true,
            profile: Default::default(),
        })
        .0
        .unwrap();
    }
    add_sample_node(&mut t, "alice", vec![], 1);
    add_sample_node(&mut t, "bob", vec![], 2);
    add_sample_node(&mut t, "alice", vec!["tag:web".into()], 3);
    t
}

#[cfg(test)]
/// Registers node `n` (machine and node keys made of `n`) for `user` with `tags` through
/// a one-off pre-auth key; returns what applying it changed.
pub(crate) fn add_sample_node(
    t: &mut Tailnet,
    user: &str,
    tags: Vec<String>,
    n: u8,
) -> Vec<crate::state::Change> {
    let [key, register] =
        crate::state::sample::registration(user, tags, n.into(), format!("h{n}"), "{}".into());
    t.apply(&key).0.unwrap();
    let (r, changes) = t.apply(&register);
    r.unwrap();
    changes
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
        let f = packet_filter(&p, &t, web, &mut Resolved::default()).to_value();
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
        let f = packet_filter(&p, &t, alice, &mut Resolved::default()).to_value();
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

    /// Every node a rule applies to gets the same source text, resolved once.
    #[test]
    fn filters_share_each_rules_source_text() {
        let mut t = tailnet();
        add_sample_node(&mut t, "bob", vec![], 4);
        let p = super::super::parse(
            r#"{"acls": [{"action": "accept", "src": ["bob@"], "dst": ["autogroup:member:22"]}]}"#,
        )
        .unwrap();
        let mut resolved = Resolved::default();
        resolved.at(1);
        let a = packet_filter(&p, &t, node(&t, 1), &mut resolved);
        let b = packet_filter(&p, &t, node(&t, 4), &mut resolved);
        assert!(Arc::ptr_eq(&a.0[0].src, &b.0[0].src));
        assert_ne!(a.0[0].rest, b.0[0].rest);
        assert_eq!(
            b.to_value()[0]["DstPorts"][0]["IP"],
            t.nodes[&4].ipv4.to_string()
        );
        // A new state is resolved anew.
        let c = packet_filter(&p, &t, node(&t, 1), resolved.at(2));
        assert!(!Arc::ptr_eq(&a.0[0].src, &c.0[0].src));
        assert_eq!(a, c);
    }

    /// Consecutive addresses become one `first-last` entry, each family on its own; SSH
    /// principals stay one address each.
    #[test]
    fn sources_collapse_runs_of_addresses_into_ranges() {
        let ips: Vec<IpAddr> = [
            "100.64.0.3",
            "100.64.0.1",
            "100.64.0.2",
            "100.64.0.5",
            "100.64.0.255",
            "100.64.1.0",
            "fd7a:115c:a1e0::1",
            "fd7a:115c:a1e0::2",
            "100.64.0.1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(
            address_ranges(ips),
            [
                "100.64.0.1-100.64.0.3",
                "100.64.0.5",
                "100.64.0.255-100.64.1.0",
                "fd7a:115c:a1e0::1-fd7a:115c:a1e0::2"
            ]
        );

        let mut t = tailnet();
        add_sample_node(&mut t, "bob", vec![], 4);
        add_sample_node(&mut t, "bob", vec![], 5);
        let p = super::super::parse(
            r#"{"acls": [{"action": "accept", "src": ["bob@", "10.0.0.0/8"], "dst": ["*:*"]}],
                "ssh": [{"action": "accept", "src": ["bob@"], "dst": ["autogroup:member"], "users": ["root"]}]}"#,
        )
        .unwrap();
        // Bob's nodes 2, 4 and 5; alice's tagged server 3 sits between the first two.
        let (b1, b2, b3) = (node(&t, 2), node(&t, 4), node(&t, 5));
        let f = packet_filter(&p, &t, node(&t, 1), &mut Resolved::default()).to_value();
        assert_eq!(
            f[0]["SrcIPs"],
            json!([
                "10.0.0.0/8",
                b1.ipv4.to_string(),
                format!("{}-{}", b2.ipv4, b3.ipv4),
                b1.ipv6.to_string(),
                format!("{}-{}", b2.ipv6, b3.ipv6)
            ])
        );
        let ssh = ssh_policy(&p, &t, node(&t, 1), "", &mut Resolved::default()).unwrap();
        let principals = ssh["rules"][0]["principals"].as_array().map(Vec::len);
        assert_eq!(principals, Some(6));
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
        let f = packet_filter(&p, &t, router, &mut Resolved::default()).to_value();
        assert_eq!(
            f[0]["DstPorts"],
            json!([{"IP": "10.1.2.0/24", "Ports": {"First": 443, "Last": 443}}])
        );
        // alice's laptop needs the router as a peer; only the router gets a filter entry.
        assert!(p.connected(&principal(&t, node(&t, 1)), &principal(&t, router)));
        assert!(packet_filter(&p, &t, node(&t, 1), &mut Resolved::default())
            .0
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
        let s = ssh_policy(&p, &t, node(&t, 3), "https://c/x", &mut Resolved::default()).unwrap();
        assert_eq!(
            s["rules"][0]["principals"][0]["nodeIP"],
            json!(alice.ipv4.to_string())
        );
        assert_eq!(
            s["rules"][0]["sshUsers"],
            json!({"*": "=", "root": "", "deploy": "deploy"})
        );
        assert_eq!(
            ssh_policy(&p, &t, alice, "https://c/x", &mut Resolved::default()).unwrap(),
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
        let s = ssh_policy(
            &p,
            &t,
            web,
            "https://c/x?u=$SSH_USER",
            &mut Resolved::default(),
        )
        .unwrap();
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
