//! From HuJSON text to a checked [`Policy`]: every name resolved, every port and protocol
//! valid, every `tests` entry passing. The first problem found is reported with its place.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::hujson::{self, Spanned, Val};
use super::{
    Alias, AutoApprovers, NodeAttr, Policy, PolicyError, PolicyTest, Ports, Pos, Principal, Rule,
    SshAction, SshRule, SshUsers, ALL_PORTS, DEFAULT_CHECK_PERIOD_MS,
};

type Members<'a> = &'a [(String, Pos, Spanned)];

fn fail<T>(pos: Pos, msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError {
        pos,
        msg: msg.into(),
    })
}

fn obj<'a>(v: &'a Spanned, what: &str) -> Result<Members<'a>, PolicyError> {
    match &v.val {
        Val::Obj(m) => Ok(m),
        _ => fail(v.pos, format!("{what} must be an object, not {}", v.kind())),
    }
}

fn arr<'a>(v: &'a Spanned, what: &str) -> Result<&'a [Spanned], PolicyError> {
    match &v.val {
        Val::Arr(a) => Ok(a),
        _ => fail(v.pos, format!("{what} must be a list, not {}", v.kind())),
    }
}

fn string<'a>(v: &'a Spanned, what: &str) -> Result<&'a str, PolicyError> {
    match &v.val {
        Val::Str(s) => Ok(s),
        _ => fail(v.pos, format!("{what} must be a string, not {}", v.kind())),
    }
}

fn strings<'a>(v: &'a Spanned, what: &str) -> Result<Vec<(&'a str, Pos)>, PolicyError> {
    arr(v, what)?
        .iter()
        .map(|s| Ok((string(s, &format!("each entry of {what}"))?, s.pos)))
        .collect()
}

/// Keys Tailscale's policy format has that change nothing for a self-hosted tailnet (or
/// that Hydrascale checks itself some other way): accepted, with a warning saying why.
const IGNORED: &[(&str, &str)] = &[
    ("sshTests", "SSH policy tests are not run by Hydrascale (its \"tests\" are)"),
    ("randomizeClientPort", "clients pick their own WireGuard port here"),
    ("postures", "device posture checks are not evaluated by Hydrascale"),
    ("srcPosture", "device posture checks are not evaluated by Hydrascale"),
    ("defaultSrcPosture", "device posture checks are not evaluated by Hydrascale"),
    ("ipsets", "IP sets are not expanded by Hydrascale"),
    ("acceptEnv", "SSH sessions get no variables from the connecting side (acceptEnv is not sent to clients yet)"),
];

/// Keys of Tailscale features Hydrascale does not have: refused, naming the feature, so
/// the policy is not silently read as something it does not say.
const MISSING: &[(&str, &str)] = &[
    ("via", "routing a grant through chosen routers (\"via\")"),
    ("ipPool", "address pools for nodes (\"ipPool\")"),
    (
        "derpMap",
        "a DERP map in the policy (\"derpMap\"; use the derp settings)",
    ),
];

thread_local! {
    /// The warnings of the policy being parsed on this thread ([`parse`] takes them).
    static WARNINGS: std::cell::RefCell<Vec<PolicyError>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The members of an object, each key checked against `known` (compared without case, as
/// Tailscale does).
fn fields<'a>(
    v: &'a Spanned,
    what: &str,
    known: &[&'static str],
) -> Result<BTreeMap<&'static str, &'a Spanned>, PolicyError> {
    let mut out = BTreeMap::new();
    for (k, pos, val) in obj(v, what)? {
        let named = |table: &[(&'static str, &'static str)]| {
            table
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, why)| *why)
        };
        match known.iter().find(|n| n.eq_ignore_ascii_case(k)) {
            Some(&n) => {
                if out.insert(n, val).is_some() {
                    return fail(*pos, format!("{k:?} appears twice in {what}"));
                }
            }
            None if named(IGNORED).is_some() => {
                let why = named(IGNORED).unwrap_or_default();
                WARNINGS.with(|w| {
                    w.borrow_mut().push(PolicyError {
                        pos: *pos,
                        msg: format!("{k:?} in {what} is ignored: {why}"),
                    })
                });
            }
            None if named(MISSING).is_some() => {
                let feature = named(MISSING).unwrap_or_default();
                return fail(
                    *pos,
                    format!("{feature} is a Tailscale feature Hydrascale does not have yet; remove {k:?} from {what}"),
                );
            }
            None => {
                return fail(
                    *pos,
                    format!(
                        "unknown key {k:?} in {what}; expected one of: {}",
                        known.join(", ")
                    ),
                )
            }
        }
    }
    Ok(out)
}

const SECTIONS: &[&str] = &[
    "groups",
    "hosts",
    "tagOwners",
    "acls",
    "grants",
    "ssh",
    "autoApprovers",
    "nodeAttrs",
    "tests",
];

/// Names the policy defines, for resolving aliases.
struct Names {
    groups: BTreeMap<String, BTreeSet<String>>,
    hosts: BTreeMap<String, IpNet>,
    tags: BTreeSet<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Src,
    Dst,
    Owner,
}

fn user_alias(token: &str) -> Alias {
    Alias::User(token.strip_suffix('@').unwrap_or(token).to_string())
}

fn prefix(token: &str) -> Option<IpNet> {
    token
        .parse::<IpNet>()
        .ok()
        .or_else(|| token.parse::<IpAddr>().ok().map(IpNet::from))
}

fn alias(token: &str, pos: Pos, names: &Names, role: Role) -> Result<Alias, PolicyError> {
    let a = if token == "*" {
        Alias::All
    } else if let Some(g) = token.strip_prefix("group:") {
        if !names.groups.contains_key(token) {
            return fail(pos, format!("group {g:?} is not defined in \"groups\""));
        }
        Alias::Group(token.to_string())
    } else if token.starts_with("tag:") {
        if !names.tags.contains(token) {
            return fail(
                pos,
                format!("tag {token:?} is not defined in \"tagOwners\"; every tag needs owners"),
            );
        }
        Alias::Tag(token.to_string())
    } else if let Some(a) = token.strip_prefix("autogroup:") {
        match a {
            "member" => Alias::Member,
            "tagged" => Alias::Tagged,
            "self" if role == Role::Dst => Alias::OwnNodes,
            "internet" if role == Role::Dst => Alias::Internet,
            "self" | "internet" => {
                return fail(pos, format!("{token} can only be a destination"))
            }
            "admin" | "owner" | "it-admin" | "network-admin" | "billing-admin" | "auditor" => {
                Alias::Role(token.to_string())
            }
            _ => {
                return fail(
                    pos,
                    format!("unknown {token}; Hydrascale knows autogroup:member, autogroup:tagged, autogroup:self, autogroup:internet and the role groups (autogroup:admin, ...)"),
                )
            }
        }
    } else if token.contains('@') {
        user_alias(token)
    } else if let Some(net) = prefix(token) {
        Alias::Prefix(net.trunc())
    } else if let Some(net) = names.hosts.get(token) {
        Alias::Prefix(*net)
    } else {
        return fail(
            pos,
            format!("{token:?} is not a host defined in \"hosts\", an address or a group/tag/autogroup; users are written with an @ ({token}@)"),
        );
    };
    if role == Role::Owner
        && !matches!(
            a,
            Alias::User(_) | Alias::Group(_) | Alias::Tag(_) | Alias::Role(_)
        )
    {
        return fail(
            pos,
            format!("{token:?} cannot own anything: owners are users, groups and tags"),
        );
    }
    Ok(a)
}

fn aliases(v: &Spanned, what: &str, names: &Names, role: Role) -> Result<Vec<Alias>, PolicyError> {
    let list = strings(v, what)?;
    if list.is_empty() {
        return fail(
            v.pos,
            format!("{what} is empty; name at least one source or destination"),
        );
    }
    list.into_iter()
        .map(|(s, pos)| alias(s, pos, names, role))
        .collect()
}

fn proto_number(name: &str) -> Option<u8> {
    Some(match name.to_ascii_lowercase().as_str() {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "ipv6-icmp" | "icmpv6" => 58,
        "sctp" => 132,
        "igmp" => 2,
        "ipv4" | "ip-in-ip" => 4,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        n => return n.parse().ok(),
    })
}

/// Protocols that have ports; for the others only `*` makes sense.
fn has_ports(protos: &[u8]) -> bool {
    protos.is_empty() || protos.iter().all(|p| matches!(p, 6 | 17 | 132))
}

fn ports(text: &str, pos: Pos) -> Result<Vec<Ports>, PolicyError> {
    if text == "*" {
        return Ok(vec![ALL_PORTS]);
    }
    let one = |s: &str| {
        s.parse::<u16>().map_err(|_| PolicyError {
            pos,
            msg: format!("{s:?} is not a port (0-65535)"),
        })
    };
    text.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                let (first, last) = (one(a)?, one(b)?);
                if first > last {
                    return fail(pos, format!("port range {part:?} runs backwards"));
                }
                Ok(Ports { first, last })
            }
            None => one(part).map(|p| Ports { first: p, last: p }),
        })
        .collect()
}

/// `host:ports` (the host part may itself contain colons: `tag:web:443`, IPv6 addresses).
fn dst_with_ports(
    text: &str,
    pos: Pos,
    names: &Names,
    protos: &[u8],
) -> Result<(Alias, Vec<Ports>), PolicyError> {
    let Some((host, port_text)) = text.rsplit_once(':') else {
        return fail(
            pos,
            format!("destination {text:?} needs ports: write {text}:* or {text}:22"),
        );
    };
    let a = alias(host, pos, names, Role::Dst)?;
    let p = ports(port_text, pos)?;
    if !has_ports(protos) && port_text != "*" {
        return fail(
            pos,
            format!("{text:?}: this protocol has no ports; use {host}:*"),
        );
    }
    Ok((a, p))
}

fn protos_of(v: Option<&&Spanned>) -> Result<Vec<u8>, PolicyError> {
    match v {
        None => Ok(Vec::new()),
        Some(v) => {
            let s = string(v, "\"proto\"")?;
            match proto_number(s) {
                Some(p) => Ok(vec![p]),
                None => fail(v.pos, format!("unknown protocol {s:?}; use tcp, udp, icmp, sctp, a name from the Tailscale docs or an IP protocol number")),
            }
        }
    }
}

fn need<'a>(
    f: &BTreeMap<&'static str, &'a Spanned>,
    key: &'static str,
    pos: Pos,
    what: &str,
) -> Result<&'a Spanned, PolicyError> {
    f.get(key).copied().ok_or_else(|| PolicyError {
        pos,
        msg: format!("{what} needs \"{key}\""),
    })
}

/// An SSH `checkPeriod`: `"always"` (0) or a duration such as `"12h"`, `"1h30m"` or
/// `"90m"`, between one minute and a week.
fn check_period(text: &str) -> Result<u64, String> {
    const MIN: u64 = 60_000;
    const MAX: u64 = 168 * 3600 * 1000;
    if text == "always" {
        return Ok(0);
    }
    let bad =
        || format!("checkPeriod {text:?} is not a duration like \"12h\", \"1h30m\" or \"always\"");
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3_600_000,
            'm' => 60_000,
            's' => 1_000,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    if !(MIN..=MAX).contains(&total) {
        return Err(format!(
            "checkPeriod {text:?} must be between 1m and 168h (or \"always\")"
        ));
    }
    Ok(total)
}

/// Reads and checks a policy file.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    WARNINGS.with(|w| w.borrow_mut().clear());
    let mut policy = parse_checked(text)?;
    policy.warnings = WARNINGS.with(|w| std::mem::take(&mut *w.borrow_mut()));
    Ok(policy)
}

fn parse_checked(text: &str) -> Result<Policy, PolicyError> {
    let root = hujson::parse(text).map_err(|e| PolicyError {
        pos: e.pos,
        msg: e.msg,
    })?;
    let top = fields(&root, "the policy", SECTIONS)?;
    let mut names = Names {
        groups: BTreeMap::new(),
        hosts: BTreeMap::new(),
        tags: BTreeSet::new(),
    };
    if let Some(g) = top.get("groups") {
        for (name, pos, members) in obj(g, "\"groups\"")? {
            if !name.starts_with("group:") || name.len() == 6 {
                return fail(
                    *pos,
                    format!("group names look like group:name, not {name:?}"),
                );
            }
            let mut users = BTreeSet::new();
            for (m, mpos) in strings(members, &format!("group {name:?}"))? {
                if !m.contains('@') {
                    return fail(mpos, format!("groups hold users, written with an @ ({m}@); groups cannot contain groups or tags"));
                }
                if let Alias::User(u) = user_alias(m) {
                    users.insert(u);
                }
            }
            names.groups.insert(name.clone(), users);
        }
    }
    if let Some(h) = top.get("hosts") {
        for (name, pos, addr) in obj(h, "\"hosts\"")? {
            if name.contains(':') || name.contains('@') || name == "*" {
                return fail(
                    *pos,
                    format!("host name {name:?} may not contain ':' or '@'"),
                );
            }
            let a = string(addr, &format!("host {name:?}"))?;
            let net = prefix(a).ok_or_else(|| PolicyError {
                pos: addr.pos,
                msg: format!("host {name:?}: {a:?} is not an address or prefix"),
            })?;
            names.hosts.insert(name.clone(), net.trunc());
        }
    }
    let mut policy = Policy {
        groups: names.groups.clone(),
        ..Default::default()
    };
    if let Some(t) = top.get("tagOwners") {
        let owners = obj(t, "\"tagOwners\"")?;
        for (tag, pos, _) in owners {
            if !super::valid_tag(tag) {
                return fail(*pos, format!("tag names look like tag:name, not {tag:?}"));
            }
            names.tags.insert(tag.clone());
        }
        for (tag, _, list) in owners {
            let list = strings(list, &format!("the owners of {tag:?}"))?
                .into_iter()
                .map(|(s, pos)| alias(s, pos, &names, Role::Owner))
                .collect::<Result<_, _>>()?;
            policy.tag_owners.insert(tag.clone(), list);
        }
    }
    if let Some(acls) = top.get("acls") {
        for entry in arr(acls, "\"acls\"")? {
            let what = format!("the ACL at {}", entry.pos);
            let f = fields(entry, &what, &["action", "src", "dst", "proto"])?;
            let action = string(need(&f, "action", entry.pos, &what)?, "\"action\"")?;
            if action != "accept" {
                return fail(need(&f, "action", entry.pos, &what)?.pos, format!("ACL action must be \"accept\", not {action:?}: anything not accepted is denied"));
            }
            let protos = protos_of(f.get("proto"))?;
            let src = aliases(
                need(&f, "src", entry.pos, &what)?,
                "\"src\"",
                &names,
                Role::Src,
            )?;
            let dst_v = need(&f, "dst", entry.pos, &what)?;
            let dst = strings(dst_v, "\"dst\"")?
                .into_iter()
                .map(|(s, pos)| dst_with_ports(s, pos, &names, &protos))
                .collect::<Result<Vec<_>, _>>()?;
            if dst.is_empty() {
                return fail(dst_v.pos, "\"dst\" is empty; name at least one destination");
            }
            policy.rules.push(Rule {
                pos: entry.pos,
                src,
                dst,
                protos,
            });
        }
    }
    if let Some(grants) = top.get("grants") {
        for entry in arr(grants, "\"grants\"")? {
            let what = format!("the grant at {}", entry.pos);
            let f = fields(entry, &what, &["src", "dst", "ip", "app"])?;
            if let Some(app) = f.get("app") {
                return fail(app.pos, "application capabilities (\"app\") in grants are not supported by Hydrascale; use \"ip\"");
            }
            let src = aliases(
                need(&f, "src", entry.pos, &what)?,
                "\"src\"",
                &names,
                Role::Src,
            )?;
            let dst = aliases(
                need(&f, "dst", entry.pos, &what)?,
                "\"dst\"",
                &names,
                Role::Dst,
            )?;
            let ip = need(&f, "ip", entry.pos, &what)?;
            for (spec, pos) in strings(ip, "\"ip\"")? {
                let (protos, port_list) = match spec.split_once(':') {
                    _ if spec == "*" => (Vec::new(), vec![ALL_PORTS]),
                    Some((proto, p)) => {
                        let n = proto_number(proto).ok_or_else(|| PolicyError {
                            pos,
                            msg: format!("unknown protocol {proto:?} in {spec:?}"),
                        })?;
                        if !has_ports(&[n]) && p != "*" {
                            return fail(
                                pos,
                                format!("{spec:?}: this protocol has no ports; use {proto}:*"),
                            );
                        }
                        (vec![n], ports(p, pos)?)
                    }
                    None => (Vec::new(), ports(spec, pos)?),
                };
                policy.rules.push(Rule {
                    pos: entry.pos,
                    src: src.clone(),
                    dst: dst.iter().map(|a| (a.clone(), port_list.clone())).collect(),
                    protos,
                });
            }
        }
    }
    if let Some(ssh) = top.get("ssh") {
        for entry in arr(ssh, "\"ssh\"")? {
            let what = format!("the SSH rule at {}", entry.pos);
            let f = fields(
                entry,
                &what,
                &["action", "src", "dst", "users", "checkPeriod", "acceptEnv"],
            )?;
            let action_v = need(&f, "action", entry.pos, &what)?;
            let action = match string(action_v, "\"action\"")? {
                "accept" => {
                    if let Some(p) = f.get("checkPeriod") {
                        return fail(
                            p.pos,
                            "\"checkPeriod\" applies only to rules with \"action\": \"check\"",
                        );
                    }
                    SshAction::Accept
                }
                "check" => SshAction::Check {
                    period_ms: match f.get("checkPeriod") {
                        None => DEFAULT_CHECK_PERIOD_MS,
                        Some(p) => check_period(string(p, "\"checkPeriod\"")?)
                            .map_err(|msg| PolicyError { pos: p.pos, msg })?,
                    },
                },
                a => {
                    return fail(
                        action_v.pos,
                        format!("SSH action must be \"accept\" or \"check\", not {a:?}"),
                    )
                }
            };
            let src = aliases(
                need(&f, "src", entry.pos, &what)?,
                "\"src\"",
                &names,
                Role::Src,
            )?;
            let dst_v = need(&f, "dst", entry.pos, &what)?;
            let dst = aliases(dst_v, "\"dst\"", &names, Role::Dst)?;
            if dst
                .iter()
                .any(|a| matches!(a, Alias::All | Alias::Internet))
            {
                return fail(dst_v.pos, "SSH destinations are users, tags, autogroup:self, autogroup:member or autogroup:tagged; not * or autogroup:internet");
            }
            let users_v = need(&f, "users", entry.pos, &what)?;
            let users: Vec<SshUsers> = strings(users_v, "\"users\"")?
                .into_iter()
                .map(|(u, _)| match u {
                    "autogroup:nonroot" => SshUsers::NonRoot,
                    u => SshUsers::Named(u.to_string()),
                })
                .collect();
            if users.is_empty() {
                return fail(
                    users_v.pos,
                    "\"users\" is empty; name the local accounts to allow",
                );
            }
            policy.ssh.push(SshRule {
                pos: entry.pos,
                src,
                dst,
                users,
                action,
            });
        }
    }
    if let Some(aa) = top.get("autoApprovers") {
        let f = fields(aa, "\"autoApprovers\"", &["routes", "exitNode"])?;
        let mut approvers = AutoApprovers::default();
        if let Some(routes) = f.get("routes") {
            for (route, pos, owners) in obj(routes, "\"routes\"")? {
                let net = route.parse::<IpNet>().map_err(|_| PolicyError {
                    pos: *pos,
                    msg: format!("{route:?} is not a prefix like 10.0.0.0/24"),
                })?;
                let owners = aliases(
                    owners,
                    &format!("the approvers of {route}"),
                    &names,
                    Role::Owner,
                )?;
                approvers.routes.push((net, owners));
            }
        }
        if let Some(exit) = f.get("exitNode") {
            approvers.exit_node = aliases(exit, "\"exitNode\"", &names, Role::Owner)?;
        }
        policy.auto_approvers = approvers;
    }
    if let Some(na) = top.get("nodeAttrs") {
        for entry in arr(na, "\"nodeAttrs\"")? {
            let what = format!("the nodeAttrs entry at {}", entry.pos);
            let f = fields(entry, &what, &["target", "attr", "app"])?;
            if let Some(app) = f.get("app") {
                return fail(
                    app.pos,
                    "\"app\" in nodeAttrs is not supported by Hydrascale; use \"attr\"",
                );
            }
            let target = aliases(
                need(&f, "target", entry.pos, &what)?,
                "\"target\"",
                &names,
                Role::Src,
            )?;
            let attrs = strings(need(&f, "attr", entry.pos, &what)?, "\"attr\"")?
                .into_iter()
                .map(|(s, _)| s.to_string())
                .collect();
            policy.node_attrs.push(NodeAttr { target, attrs });
        }
    }
    if let Some(tests) = top.get("tests") {
        for entry in arr(tests, "\"tests\"")? {
            let what = format!("the test at {}", entry.pos);
            let f = fields(entry, &what, &["src", "proto", "accept", "deny"])?;
            let src_v = need(&f, "src", entry.pos, &what)?;
            let src = alias(string(src_v, "\"src\"")?, src_v.pos, &names, Role::Src)?;
            let protos = protos_of(f.get("proto"))?;
            let targets = |key: &'static str| -> Result<Vec<(Alias, u16, Pos)>, PolicyError> {
                let Some(v) = f.get(key) else {
                    return Ok(Vec::new());
                };
                strings(v, key)?
                    .into_iter()
                    .map(|(s, pos)| {
                        let (a, p) = dst_with_ports(s, pos, &names, &protos)?;
                        match p.as_slice() {
                            [one] if one.first == one.last => Ok((a, one.first, pos)),
                            _ => fail(pos, format!("a test names one port: {s:?}")),
                        }
                    })
                    .collect()
            };
            let (accept, deny) = (targets("accept")?, targets("deny")?);
            policy.tests.push(PolicyTest {
                pos: entry.pos,
                src,
                protos,
                accept,
                deny,
            });
        }
    }
    run_tests(&policy)?;
    Ok(policy)
}

/// A policy test's source or destination as an identity: a user, a tag or an address.
fn principal(a: &Alias, pos: Pos) -> Result<Principal, PolicyError> {
    Ok(match a {
        Alias::User(u) => Principal {
            user: Some(u.clone()),
            ..Default::default()
        },
        Alias::Tag(t) => Principal {
            tags: vec![t.clone()],
            ..Default::default()
        },
        Alias::Prefix(net) if net.prefix_len() == net.max_prefix_len() => Principal {
            ips: vec![net.addr()],
            ..Default::default()
        },
        _ => return fail(pos, "tests name one user (alice@), one tag or one address"),
    })
}

fn run_tests(policy: &Policy) -> Result<(), PolicyError> {
    for t in &policy.tests {
        let src = principal(&t.src, t.pos)?;
        for (dst, port, pos) in &t.accept {
            let d = principal(dst, *pos)?;
            if !policy.allows(&src, &d, *port, &t.protos) {
                return fail(
                    *pos,
                    format!(
                        "test failed: no rule lets {} reach {}:{port}",
                        show(&t.src),
                        show(dst)
                    ),
                );
            }
        }
        for (dst, port, pos) in &t.deny {
            let d = principal(dst, *pos)?;
            if let Some(rule) = policy.allowing_rule(&src, &d, *port, &t.protos) {
                return fail(
                    *pos,
                    format!(
                        "test failed: {} can reach {}:{port}, which should be denied (allowed by the rule at {})",
                        show(&t.src),
                        show(dst),
                        rule.pos
                    ),
                );
            }
        }
    }
    Ok(())
}

/// An alias as written in a policy.
pub fn show(a: &Alias) -> String {
    match a {
        Alias::All => "*".into(),
        Alias::User(u) if u.contains('@') => u.clone(),
        Alias::User(u) => format!("{u}@"),
        Alias::Group(g) | Alias::Tag(g) => g.clone(),
        Alias::Prefix(p) if p.prefix_len() == p.max_prefix_len() => p.addr().to_string(),
        Alias::Prefix(p) => p.to_string(),
        Alias::Member => "autogroup:member".into(),
        Alias::Tagged => "autogroup:tagged".into(),
        Alias::OwnNodes => "autogroup:self".into(),
        Alias::Internet => "autogroup:internet".into(),
        Alias::Role(r) => r.clone(),
    }
}
