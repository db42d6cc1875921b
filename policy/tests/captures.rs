//! Tailscale's own verdicts on 779 policies: headscale's corpus of policies captured from
//! Tailscale's control plane (`tscap`; juanfont/headscale v0.29.2,
//! `hscontrol/policy/v2/testdata/*/`, BSD-3-Clause), each with the HTTP status Tailscale
//! answered when the policy was set (200 taken, 400 refused with its message). Kept as
//! `data/tailscale-captures.jsonl`, one policy per line with the capture ids it came from.
//! Every policy Tailscale took loads here, or is refused for a feature Hydrascale does not
//! have (named in the message), or is one of the known differences listed below, where
//! Tailscale takes something odd (whitespace in a tag, an SSH rule without "src") that
//! this parser refuses. A new difference of either kind fails the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

use hydrascale_policy::parse;

struct Capture {
    ids: Vec<String>,
    status: u64,
    error: Option<String>,
    policy: String,
}

fn captures() -> Vec<Capture> {
    include_str!("data/tailscale-captures.jsonl")
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            Capture {
                ids: v["ids"]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|i| i.as_str().expect("id").to_string())
                    .collect(),
                status: v["tailscale_status"].as_u64().expect("status"),
                error: v["tailscale_error"].as_str().map(str::to_string),
                policy: v["policy"].as_str().expect("policy").to_string(),
            }
        })
        .collect()
}

/// Policies Tailscale took that this parser refuses although no missing feature is
/// involved: Tailscale's leniency (or its later checks) that we do not copy yet.
const KNOWN_STRICTER: &[&str] = &[
    "grant-k6",
    "nodeattrs-error-e1-empty",
    "nodeattrs-error-e5-empty-target-array",
    "policytest-allpass-acls-group-src-host-dst",
    "policytest-allpass-grants-only-tag-src-ipv6-literal-dst",
    "ssh-checkperiod-null",
    "ssh-dst-trailing-whitespace",
    "ssh-malformed-action-whitespace",
    "ssh-malformed-checkperiod-too-short",
    "ssh-malformed-checkperiod-zero",
    "ssh-malformed-dst-empty",
    "ssh-malformed-dst-missing",
    "ssh-malformed-src-empty",
    "ssh-malformed-src-missing",
];

/// The most policies Tailscale refused that this parser takes (mostly checks that need
/// the tailnet: unknown users' domains, failing SSH tests, autogroup:self beside tags).
const MOST_MORE_LENIENT: usize = 45;

#[test]
fn tailscales_verdicts_on_its_captured_policies() {
    let all = captures();
    assert_eq!(all.len(), 779);
    let mut we_refuse = Vec::new();
    let mut we_take = Vec::new();
    let mut missing_features = 0;
    for c in &all {
        match (c.status == 200, parse(&c.policy)) {
            (true, Err(e))
                if e.msg.contains("does not have yet")
                    || e.msg.contains("are not supported by Hydrascale") =>
            {
                missing_features += 1
            }
            (true, Err(e)) if c.ids.iter().any(|i| KNOWN_STRICTER.contains(&i.as_str())) => {
                eprintln!("known difference, {}: {e}", c.ids.join(","))
            }
            (true, Err(e)) => we_refuse.push(format!("{}: {e}", c.ids.join(","))),
            (false, Ok(_)) => we_take.push(format!(
                "{}: Tailscale said {}",
                c.ids.join(","),
                c.error.as_deref().unwrap_or("(no message)")
            )),
            _ => {}
        }
    }
    let taken = all.iter().filter(|c| c.status == 200).count();
    eprintln!(
        "Tailscale took {taken} and refused {}; of those it took we refuse {missing_features} for a missing feature, {} known differences and {} others; we take {} it refused",
        all.len() - taken,
        KNOWN_STRICTER.len(),
        we_refuse.len(),
        we_take.len()
    );
    for t in &we_take {
        eprintln!("we take: {t}");
    }
    assert!(
        we_refuse.is_empty(),
        "policies Tailscale took and we refuse without naming a missing feature:\n{}",
        we_refuse.join("\n")
    );
    assert!(
        we_take.len() <= MOST_MORE_LENIENT,
        "{} policies Tailscale refused are taken here (at most {MOST_MORE_LENIENT} known)",
        we_take.len()
    );
}

/// Keys Tailscale has that change nothing here are taken with a warning at their place;
/// a feature Hydrascale lacks is refused by name.
#[test]
fn ignored_keys_warn_and_missing_features_are_named() {
    let p = parse(
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
            "randomizeClientPort": true,
            "sshTests": []}"#,
    )
    .expect("taken");
    let warned: Vec<&str> = p.warnings.iter().map(|w| w.msg.as_str()).collect();
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(warned[0].contains("randomizeClientPort") && warned[0].contains("ignored"));
    let e = parse(
        r#"{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "via": ["tag:exit"]}],
            "tagOwners": {"tag:exit": []}}"#,
    )
    .expect_err("via is refused");
    assert!(
        e.msg.contains("\"via\"") && e.msg.contains("does not have yet"),
        "{e}"
    );
    assert_eq!(parse("{}").expect("empty").warnings, vec![]);
}
