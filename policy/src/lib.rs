//! The tailnet policy file: Tailscale's HuJSON format read into [`Policy`] (groups, hosts,
//! tagOwners, acls, grants, ssh, autoApprovers, nodeAttrs, tests), checked whole before it
//! is accepted, and the questions asked of it (may A reach B on a port, may A own a tag,
//! which attributes does A get). The server compiles it into each node's map
//! (`hydrascale::policy::compile`); this crate has no server types, so it builds in
//! seconds for fuzzing.
//!
//! Everything here is a pure function of the policy text, so the state machine can
//! re-check a policy while applying it.

pub mod hujson;
mod parse;

pub use hujson::Pos;
pub use parse::{parse, show};

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

/// Why a policy was refused: what and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{pos}: {msg}")]
pub struct PolicyError {
    pub pos: Pos,
    pub msg: String,
}

/// A set of nodes (or, in policy tests, of identities) a rule names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Alias {
    /// `*`: anyone, any address.
    All,
    /// `alice@` or `alice@example.com`: the untagged nodes of that user.
    User(String),
    /// `group:name`, expanded through [`Policy::groups`].
    Group(String),
    /// `tag:name`.
    Tag(String),
    /// An address or prefix, written directly or through `hosts`.
    Prefix(IpNet),
    /// `autogroup:member`: every untagged node.
    Member,
    /// `autogroup:tagged`: every tagged node.
    Tagged,
    /// `autogroup:self` (destinations only): the source's own user's untagged nodes.
    OwnNodes,
    /// `autogroup:internet` (destinations only): traffic through exit nodes.
    Internet,
    /// A Tailscale admin-console role (`autogroup:admin`, `autogroup:owner`, ...). Users
    /// here have no roles (administrators act through the CLI and API), so it names no
    /// node; accepted so that policies written for Tailscale load.
    Role(String),
}

/// Inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

pub const ALL_PORTS: Ports = Ports {
    first: 0,
    last: 65535,
};

/// One allow rule from `acls` or `grants`: traffic from `src` to each destination's ports,
/// over `protos` (IP protocol numbers; empty is the client's default, TCP, UDP and ICMP).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub pos: Pos,
    pub src: Vec<Alias>,
    pub dst: Vec<(Alias, Vec<Ports>)>,
    pub protos: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SshUsers {
    /// A named local account.
    Named(String),
    /// `autogroup:nonroot`: any local account but root.
    NonRoot,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SshRule {
    pub pos: Pos,
    pub src: Vec<Alias>,
    pub dst: Vec<Alias>,
    pub users: Vec<SshUsers>,
    pub action: SshAction,
}

/// What an SSH rule does with a connection it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshAction {
    Accept,
    /// Accept only after the connecting user has re-authenticated within the last
    /// `period_ms` milliseconds (0: on every connection, `checkPeriod: "always"`).
    Check {
        period_ms: u64,
    },
}

/// Tailscale's default `checkPeriod`.
pub const DEFAULT_CHECK_PERIOD_MS: u64 = 12 * 3600 * 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct NodeAttr {
    pub target: Vec<Alias>,
    pub attrs: Vec<String>,
}

/// One entry of `tests`: from `src`, each of `accept` must be allowed and each of `deny`
/// refused (destination and port).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyTest {
    pub pos: Pos,
    pub src: Alias,
    pub protos: Vec<u8>,
    pub accept: Vec<(Alias, u16, Pos)>,
    pub deny: Vec<(Alias, u16, Pos)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutoApprovers {
    pub routes: Vec<(IpNet, Vec<Alias>)>,
    pub exit_node: Vec<Alias>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// `group:name` → user names.
    pub groups: BTreeMap<String, BTreeSet<String>>,
    /// `tag:name` → who may put it on a node (users, groups, other tags).
    pub tag_owners: BTreeMap<String, Vec<Alias>>,
    pub rules: Vec<Rule>,
    pub ssh: Vec<SshRule>,
    pub auto_approvers: AutoApprovers,
    pub node_attrs: Vec<NodeAttr>,
    pub tests: Vec<PolicyTest>,
    /// Keys Tailscale accepts that change nothing here, each with where it is and why it
    /// is ignored (`policy check` prints them).
    pub warnings: Vec<PolicyError>,
}

/// Who or what a node is, as far as the policy cares. A tagged node is its tags and no
/// user: it belongs to the tailnet, not to whoever registered it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Principal {
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Routes the node serves (approved subnet routes; 0.0.0.0/0 and ::/0 for an exit
    /// node): a prefix naming part of them names the node as their router.
    pub routes: Vec<IpNet>,
}

impl Policy {
    /// Whether `alias` names `p`. `autogroup:self` and `autogroup:internet` name nobody
    /// on their own; see [`Policy::dst_matches`].
    pub fn matches(&self, alias: &Alias, p: &Principal) -> bool {
        match alias {
            Alias::All => true,
            Alias::User(u) => p.user.as_deref() == Some(u.as_str()),
            Alias::Group(g) => p
                .user
                .as_ref()
                .is_some_and(|u| self.groups.get(g).is_some_and(|m| m.contains(u))),
            Alias::Tag(t) => p.tags.iter().any(|x| x == t),
            Alias::Prefix(net) => {
                p.ips.iter().any(|ip| net.contains(ip))
                    || p.routes
                        .iter()
                        .any(|r| r.prefix_len() > 0 && (net.contains(r) || r.contains(net)))
            }
            Alias::Member => p.user.is_some(),
            Alias::Tagged => !p.tags.is_empty(),
            Alias::Internet => p.routes.iter().any(|r| r.prefix_len() == 0),
            Alias::OwnNodes | Alias::Role(_) => false,
        }
    }

    /// Whether destination `alias` names `dst` for traffic coming from `src`.
    pub fn dst_matches(&self, alias: &Alias, dst: &Principal, src: &Principal) -> bool {
        match alias {
            Alias::OwnNodes => dst.user.is_some() && dst.user == src.user,
            a => self.matches(a, dst),
        }
    }

    /// Whether any rule lets `src` reach `dst` on `port` over one of `protos` (the
    /// client's defaults when empty).
    pub fn allows(&self, src: &Principal, dst: &Principal, port: u16, protos: &[u8]) -> bool {
        self.allowing_rule(src, dst, port, protos).is_some()
    }

    /// The first rule that lets `src` reach `dst` on `port` over `protos`.
    pub fn allowing_rule(
        &self,
        src: &Principal,
        dst: &Principal,
        port: u16,
        protos: &[u8],
    ) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            let proto_ok = protos.is_empty()
                || r.protos.is_empty() && protos.iter().all(|p| DEFAULT_PROTOS.contains(p))
                || protos.iter().all(|p| r.protos.contains(p));
            proto_ok
                && r.src.iter().any(|a| self.matches(a, src))
                && r.dst.iter().any(|(a, ports)| {
                    self.dst_matches(a, dst, src)
                        && ports.iter().any(|p| p.first <= port && port <= p.last)
                })
        })
    }

    /// Whether `a` and `b` may talk in either direction, so each needs the other as a peer.
    pub fn connected(&self, a: &Principal, b: &Principal) -> bool {
        self.rules
            .iter()
            .any(|r| self.rule_links(r, a, b) || self.rule_links(r, b, a))
    }

    /// Whether any rule names a node by address (an address, a prefix or a `hosts` entry),
    /// so that [`Policy::connected`] may tell apart two nodes of the same user and tags.
    pub fn names_addresses(&self) -> bool {
        self.rules.iter().any(|r| {
            r.src.iter().any(|a| matches!(a, Alias::Prefix(_)))
                || r.dst.iter().any(|(a, _)| matches!(a, Alias::Prefix(_)))
        })
    }

    fn rule_links(&self, r: &Rule, src: &Principal, dst: &Principal) -> bool {
        // `*` to `*` links every pair: the common allow-all rule costs no matching (map
        // streams ask this for every peer when a policy changes).
        if r.src.contains(&Alias::All) && r.dst.iter().any(|(a, _)| *a == Alias::All) {
            return true;
        }
        r.src.iter().any(|a| self.matches(a, src))
            && r.dst.iter().any(|(a, _)| self.dst_matches(a, dst, src))
    }

    /// Whether `owner` (a node or an identity) may put `tag` on a node.
    pub fn may_own_tag(&self, owner: &Principal, tag: &str) -> bool {
        self.tag_owners
            .get(tag)
            .is_some_and(|owners| owners.iter().any(|a| self.matches(a, owner)))
    }

    /// Whether `autoApprovers` approves `route` when `p` advertises it: an exit route
    /// (0.0.0.0/0, ::/0) through `exitNode`, others through a `routes` entry containing it.
    pub fn auto_approves(&self, p: &Principal, route: &IpNet) -> bool {
        let aa = &self.auto_approvers;
        if route.prefix_len() == 0 {
            aa.exit_node.iter().any(|a| self.matches(a, p))
        } else {
            aa.routes.iter().any(|(net, owners)| {
                net.contains(route) && owners.iter().any(|a| self.matches(a, p))
            })
        }
    }

    /// Node capabilities `nodeAttrs` gives `p`.
    pub fn attrs_for(&self, p: &Principal) -> BTreeSet<&str> {
        self.node_attrs
            .iter()
            .filter(|na| na.target.iter().any(|a| self.matches(a, p)))
            .flat_map(|na| na.attrs.iter().map(String::as_str))
            .collect()
    }
}

/// Whether every two of `principals` that are connected under `a` are under `b`, and no
/// others (`None`: no policy, everyone reaches everyone). Asked when one policy replaces
/// another: an ACL edit that opens or closes ports leaves every map's peers as they were,
/// and then the server recomputes packet filters only, not every map's list of peers.
///
/// Nodes alike to both policies (same user, tags and routes, and unless a rule names
/// addresses, whatever their addresses) are asked about once per pair of kinds, so a
/// tailnet of thousands of nodes and a few dozen users costs a few thousand questions.
/// Above [`SAME_REACH_KINDS`] kinds it answers `false`, which only costs the caller the
/// slower path.
pub fn same_reach<'a>(
    a: Option<&Policy>,
    b: Option<&Policy>,
    principals: impl IntoIterator<Item = &'a Principal>,
) -> bool {
    if a == b {
        return true;
    }
    let by_address = [a, b].iter().flatten().any(|p| p.names_addresses());
    let mut seen = std::collections::HashSet::new();
    let mut kinds: Vec<&Principal> = Vec::new();
    for p in principals {
        let ips: &[IpAddr] = if by_address { &p.ips } else { &[] };
        if seen.insert((&p.user, &p.tags, &p.routes, ips)) {
            if kinds.len() == SAME_REACH_KINDS {
                return false;
            }
            kinds.push(p);
        }
    }
    let reach = |policy: Option<&Policy>, x: &Principal, y: &Principal| {
        policy.is_none_or(|p| p.connected(x, y))
    };
    kinds
        .iter()
        .enumerate()
        .all(|(i, x)| kinds[i..].iter().all(|y| reach(a, x, y) == reach(b, x, y)))
}

/// The most kinds of node [`same_reach`] compares pairwise (about 130,000 pairs).
pub const SAME_REACH_KINDS: usize = 512;

/// TCP, UDP, ICMP and ICMPv6: what the client allows when a rule names no protocol.
pub const DEFAULT_PROTOS: [u8; 4] = [6, 17, 1, 58];

/// `tag:name`, the name of letters, digits, '-' and '_' (at most 63).
pub fn valid_tag(t: &str) -> bool {
    t.strip_prefix("tag:").is_some_and(|n| {
        !n.is_empty()
            && n.len() <= 63
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}
