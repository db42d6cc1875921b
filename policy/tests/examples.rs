//! Policies written the way the Tailscale documentation writes them (its policy syntax
//! reference and ACL samples: allow all, users' own devices, hosts, tags, groups,
//! individual users, the starter plan, production access with tests, VPC access with
//! auto approvers, a contractor, SSH, grants, node attributes) all load, and what they
//! say holds. Names are the documentation's placeholders.

use hydrascale_policy::{parse, Principal};

fn user(u: &str) -> Principal {
    Principal {
        user: Some(u.into()),
        ..Default::default()
    }
}

fn tagged(t: &str) -> Principal {
    Principal {
        tags: vec![t.into()],
        ..Default::default()
    }
}

/// (what the example shows, the policy)
const EXAMPLES: &[(&str, &str)] = &[
    (
        "allow all",
        r#"{
  "acls": [
    // Allow all connections.
    { "action": "accept", "src": ["*"], "dst": ["*:*"] },
  ],
  "ssh": [
    {
      "action": "accept",
      "src": ["autogroup:member"],
      "dst": ["autogroup:self"],
      "users": ["autogroup:nonroot", "root"],
    },
  ],
}"#,
    ),
    ("deny all", r#"{ "acls": [] }"#),
    (
        "users can access their own devices",
        r#"{
  "acls": [
    { "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"] },
  ],
}"#,
    ),
    (
        "resource-level access with hosts",
        r#"{
  "hosts": {
    "my-server": "100.101.102.103",
    "my-subnet": "192.0.2.0/24",
  },
  "acls": [
    { "action": "accept", "src": ["alice@example.com"], "dst": ["my-server:22", "my-subnet:*"] },
  ],
}"#,
    ),
    (
        "restrict based on purpose (tags)",
        r#"{
  "tagOwners": {
    "tag:webserver": ["group:engineering"],
    "tag:database": ["group:engineering"],
  },
  "groups": {
    "group:engineering": ["dave@example.com", "laura@example.com"],
  },
  "acls": [
    { "action": "accept", "src": ["tag:webserver"], "dst": ["tag:database:5432"] },
    { "action": "accept", "src": ["group:engineering"], "dst": ["tag:webserver:443", "tag:database:*"] },
  ],
}"#,
    ),
    (
        "restrict based on group",
        r#"{
  "groups": {
    "group:engineering": ["dave@example.com", "laura@example.com"],
    "group:sales": ["brad@example.com", "alice@example.com"],
  },
  "acls": [
    { "action": "accept", "src": ["group:engineering"], "dst": ["group:engineering:*"] },
    { "action": "accept", "src": ["group:sales"], "dst": ["192.0.2.10:443"] },
  ],
}"#,
    ),
    (
        "restrict based on individual users",
        r#"{
  "acls": [
    { "action": "accept", "src": ["amelie@example.com"], "dst": ["laura@example.com:*", "192.0.2.0/24:80,443"] },
  ],
}"#,
    ),
    (
        "starter plan",
        r#"{
  "tagOwners": {
    "tag:corp": ["autogroup:admin"],
    "tag:prod": ["autogroup:admin"],
  },
  "acls": [
    // Employees can access their own devices and corp devices.
    { "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*", "tag:corp:*"] },
    // Admins can access corp and prod devices.
    { "action": "accept", "src": ["autogroup:admin"], "dst": ["tag:corp:*", "tag:prod:*"] },
  ],
}"#,
    ),
    (
        "remote access to a production environment, with tests",
        r#"{
  "groups": {
    "group:dev": ["alice@example.com", "bob@example.com"],
    "group:devops": ["amelie@example.com"],
  },
  "tagOwners": {
    "tag:dev": ["group:devops"],
    "tag:prod": ["group:devops"],
  },
  "acls": [
    { "action": "accept", "src": ["group:dev"], "dst": ["tag:dev:*"] },
    { "action": "accept", "src": ["group:devops"], "dst": ["tag:dev:*", "tag:prod:*"] },
  ],
  "tests": [
    { "src": "alice@example.com", "accept": ["tag:dev:80"], "deny": ["tag:prod:80"] },
    { "src": "amelie@example.com", "accept": ["tag:dev:80", "tag:prod:80"] },
  ],
}"#,
    ),
    (
        "VPC access with auto approvers",
        r#"{
  "groups": {
    "group:infra": ["amelie@example.com"],
    "group:dev": ["alice@example.com", "bob@example.com"],
  },
  "tagOwners": {
    "tag:vpc-router": ["group:infra"],
  },
  "autoApprovers": {
    "routes": {
      "192.0.2.0/24": ["tag:vpc-router"],
    },
  },
  "acls": [
    { "action": "accept", "src": ["group:dev"], "dst": ["192.0.2.0/24:*"] },
  ],
}"#,
    ),
    (
        "share access with a contractor",
        r#"{
  "groups": {
    "group:dev": ["alice@example.com"],
    "group:contractors": ["carl@partner.example"],
  },
  "tagOwners": { "tag:dev": ["group:dev"] },
  "acls": [
    { "action": "accept", "src": ["group:dev"], "dst": ["tag:dev:*"] },
    { "action": "accept", "src": ["group:contractors"], "dst": ["tag:dev:443"], "proto": "tcp" },
  ],
  "tests": [
    { "src": "carl@partner.example", "proto": "tcp", "accept": ["tag:dev:443"], "deny": ["tag:dev:22"] },
  ],
}"#,
    ),
    (
        "exit nodes and autogroup:internet",
        r#"{
  "tagOwners": { "tag:exit": ["autogroup:admin"] },
  "autoApprovers": { "exitNode": ["tag:exit"] },
  "acls": [
    { "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:internet:*"] },
  ],
}"#,
    ),
    (
        "Tailscale SSH to tagged servers",
        r#"{
  "groups": { "group:sre": ["alice@example.com"] },
  "tagOwners": { "tag:prod": ["group:sre"] },
  "acls": [
    { "action": "accept", "src": ["group:sre"], "dst": ["tag:prod:22"] },
  ],
  "ssh": [
    { "action": "accept", "src": ["group:sre"], "dst": ["tag:prod"], "users": ["ubuntu", "root"] },
    { "action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot", "root"] },
    { "action": "check", "src": ["group:sre"], "dst": ["tag:prod"], "users": ["admin"], "checkPeriod": "always" },
    { "action": "check", "src": ["group:sre"], "dst": ["tag:prod"], "users": ["backup"], "checkPeriod": "1h30m" },
  ],
}"#,
    ),
    (
        "grants with IP protocols and ports",
        r#"{
  "groups": { "group:eng": ["alice@example.com"] },
  "tagOwners": { "tag:web": ["group:eng"], "tag:dns": ["group:eng"] },
  "grants": [
    { "src": ["group:eng"], "dst": ["tag:web"], "ip": ["tcp:443", "80"] },
    { "src": ["*"], "dst": ["tag:dns"], "ip": ["udp:53", "icmp:*"] },
  ],
}"#,
    ),
    (
        "node attributes",
        r#"{
  "nodeAttrs": [
    { "target": ["autogroup:member"], "attr": ["funnel"] },
  ],
}"#,
    ),
];

#[test]
fn documentation_examples_load() {
    for (what, text) in EXAMPLES {
        if let Err(e) = parse(text) {
            panic!("{what}: {e}");
        }
    }
}

#[test]
fn documentation_examples_mean_what_they_say() {
    let p = parse(EXAMPLES[4].1).unwrap();
    let dave = user("dave@example.com");
    assert!(p.allows(&dave, &tagged("tag:webserver"), 443, &[6]));
    assert!(!p.allows(&dave, &tagged("tag:webserver"), 22, &[6]));
    assert!(p.allows(&tagged("tag:webserver"), &tagged("tag:database"), 5432, &[]));
    assert!(!p.allows(&tagged("tag:database"), &tagged("tag:webserver"), 443, &[]));
    assert!(p.may_own_tag(&dave, "tag:webserver"));
    assert!(!p.may_own_tag(&user("eve@example.com"), "tag:webserver"));

    let own = parse(EXAMPLES[2].1).unwrap();
    assert!(own.allows(&user("a@x"), &user("a@x"), 22, &[]));
    assert!(!own.allows(&user("a@x"), &user("b@x"), 22, &[]));
    assert!(!own.connected(&user("a@x"), &tagged("tag:x")));

    let deny = parse(EXAMPLES[1].1).unwrap();
    assert!(!deny.connected(&user("a@x"), &user("a@x")));

    let grants = parse(EXAMPLES[13].1).unwrap();
    let alice = user("alice@example.com");
    assert!(grants.allows(&alice, &tagged("tag:web"), 443, &[6]));
    assert!(!grants.allows(&alice, &tagged("tag:web"), 443, &[17]));
    assert!(grants.allows(&alice, &tagged("tag:web"), 80, &[17]));
    assert!(grants.allows(&user("z@x"), &tagged("tag:dns"), 53, &[17]));
    assert!(!grants.allows(&user("z@x"), &tagged("tag:dns"), 53, &[6]));

    let attrs = parse(EXAMPLES[14].1).unwrap();
    assert!(attrs.attrs_for(&alice).contains("funnel"));
    assert!(attrs.attrs_for(&tagged("tag:x")).is_empty());
}

#[test]
fn mistakes_are_refused_with_their_place() {
    for (text, line, col, what) in [
        (
            r#"{"acls": [{"action": "accept", "src": ["group:nope"], "dst": ["*:*"]}]}"#,
            1,
            40,
            "not defined",
        ),
        (
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:x:22"]}]}"#,
            1,
            54,
            "tagOwners",
        ),
        (
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:99999"]}]}"#,
            1,
            54,
            "not a port",
        ),
        (
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*"]}]}"#,
            1,
            54,
            "needs ports",
        ),
        (
            r#"{"acls": [{"action": "accept", "src": ["alice"], "dst": ["*:*"]}]}"#,
            1,
            40,
            "alice@",
        ),
        (
            r#"{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}"#,
            1,
            22,
            "accept",
        ),
        (
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": "xyz"}]}"#,
            1,
            71,
            "protocol",
        ),
        (
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"], "proto": "icmp"}]}"#,
            1,
            54,
            "no ports",
        ),
        (
            r#"{"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]}"#,
            1,
            40,
            "only be a destination",
        ),
        (r#"{"acl": []}"#, 1, 2, "unknown key"),
        (
            r#"{"groups": {"group:a": ["group:b"]}}"#,
            1,
            25,
            "cannot contain groups",
        ),
        (
            r#"{"ssh": [{"action": "check", "src": ["*"], "dst": ["autogroup:self"], "users": ["root"], "checkPeriod": "30s"}]}"#,
            1,
            105,
            "between 1m and 168h",
        ),
        (
            r#"{"grants": [{"src": ["*"], "dst": ["*"], "app": {}}]}"#,
            1,
            49,
            "app",
        ),
        (
            r#"{"tests": [{"src": "a@", "accept": ["b@:22"]}]}"#,
            1,
            37,
            "test failed",
        ),
        (
            "{\n  \"hosts\": {\"db\": \"10.0.0.300\"}\n}",
            2,
            19,
            "not an address",
        ),
    ] {
        let e = parse(text).expect_err(text);
        assert_eq!((e.pos.line, e.pos.col), (line, col), "{text}: {e}");
        assert!(e.msg.contains(what), "{text}: {e}");
    }
}

/// A cheap stand-in for the fuzzer that runs with every test: thousands of damaged copies
/// of the examples (characters dropped, repeated, swapped for JSON punctuation) each give
/// a policy or an error with a place, never a panic. `cargo fuzz run policy_parse` in
/// `fuzz/` explores much further.
#[test]
fn damaged_policies_never_panic() {
    const NOISE: &[char] = &[
        '{', '}', '[', ']', '"', ',', ':', '/', '*', '\\', '\n', '@', '-', '9',
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from(seed >> 33).unwrap_or(0) % n.max(1)
    };
    for (_, text) in EXAMPLES {
        let chars: Vec<char> = text.chars().collect();
        for _ in 0..400 {
            let mut c = chars.clone();
            for _ in 0..=next(3) {
                let at = next(c.len());
                match next(3) {
                    0 => {
                        c.remove(at);
                    }
                    1 => c.insert(at, c[at]),
                    _ => c[at] = NOISE[next(NOISE.len())],
                }
            }
            let damaged: String = c.into_iter().collect();
            if let Err(e) = parse(&damaged) {
                assert!(e.pos.line >= 1 && e.pos.col >= 1, "{damaged}: {e}");
            }
        }
    }
}

/// An ACL edit that only opens a port keeps every pair of nodes connected as before; one
/// that narrows who reaches whom does not, also when only addresses tell nodes apart.
#[test]
fn same_reach_tells_port_edits_from_reach_changes() {
    use hydrascale_policy::{same_reach, SAME_REACH_KINDS};
    let p = |text: &str| parse(text).unwrap();
    let all = p(r#"{ "acls": [{ "action": "accept", "src": ["*"], "dst": ["*:*"] }] }"#);
    let all_and_port = p(r#"{ "acls": [
        { "action": "accept", "src": ["*"], "dst": ["*:*"] },
        { "action": "accept", "src": ["*"], "dst": ["*:4242"] } ] }"#);
    let eng = p(r#"{ "groups": { "group:eng": ["alice@example.com"] },
        "acls": [{ "action": "accept", "src": ["group:eng"], "dst": ["group:eng:*"] }] }"#);
    let eng_port = p(r#"{ "groups": { "group:eng": ["alice@example.com"] },
        "acls": [{ "action": "accept", "src": ["group:eng"], "dst": ["group:eng:22"] }] }"#);
    let people = [
        user("alice@example.com"),
        user("alice@example.com"),
        user("bob@example.com"),
        tagged("tag:server"),
    ];

    assert!(same_reach(Some(&all), Some(&all_and_port), &people));
    assert!(same_reach(None, Some(&all), &people));
    assert!(same_reach(Some(&eng), Some(&eng_port), &people));
    assert!(!same_reach(Some(&all), Some(&eng), &people));
    assert!(!same_reach(
        None,
        Some(&p(r#"{ "acls": [] }"#)),
        &people[..1]
    ));

    // Two of alice's nodes, told apart by address only.
    let at = |ip: &str| Principal {
        ips: vec![ip.parse().unwrap()],
        ..user("alice@example.com")
    };
    let nodes = [at("100.64.0.1"), at("100.64.0.2"), at("100.64.0.3")];
    let from = |ip: &str| {
        p(&format!(
            r#"{{ "acls": [{{ "action": "accept", "src": ["{ip}"], "dst": ["*:*"] }}] }}"#
        ))
    };
    assert!(!same_reach(
        Some(&from("100.64.0.1")),
        Some(&from("100.64.0.2")),
        &nodes
    ));
    assert!(same_reach(
        Some(&from("100.64.0.1")),
        Some(&from("100.64.0.1/32")),
        &nodes
    ));

    // Too many kinds to compare: the caller takes the slow path.
    let many: Vec<Principal> = (0..=SAME_REACH_KINDS)
        .map(|i| user(&format!("u{i}@example.com")))
        .collect();
    assert!(!same_reach(Some(&all), Some(&all_and_port), &many));
}
