//! What one replica's map plane spends on a change, at N nodes with a third of them
//! streaming from it: the applied change reaching the peer cache, then every stream's
//! delta, encoded as it would go out (before compression). No network: this isolates
//! the per-replica work from the protocol and the other replicas that
//! `scripts/bench-control-plane.sh` measures end to end.
//!
//! Changes timed, each on its own from the same starting point:
//! * `join`: one node registers;
//! * `policy-port`: an ACL edit opening a port to `autogroup:member` (every filter
//!   changes, who sees whom does not);
//! * `policy-reach`: an edit letting members reach only members (tagged nodes drop out
//!   of every member's map);
//! * `join-under-policy`: one node registers while a group policy is in force (every
//!   stream's filter gains the new node).
//!
//! Run with `cargo bench --bench map_updates`; `MAP_BENCH_NODES` (default 10000),
//! `MAP_BENCH_ROUNDS` (default 3; the best round is reported, as the least disturbed) and
//! `MAP_BENCH_ONLY` (one change by name).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark, not the server: it stops on the first failure"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hydrascale::config::Config;
use hydrascale::mapper::{PeerCache, StreamView};
use hydrascale::state::{sample, Command, Observer, Tailnet};
use hydrascale::tailcfg::encode;

const USERS: usize = 20;

/// One change to time, made to a tailnet and its peer cache.
type Change<'a> = dyn Fn(&mut Tailnet, &PeerCache) + 'a;

fn apply(t: &mut Tailnet, cache: &PeerCache, cmd: Command) {
    let (r, changes) = t.apply(&cmd);
    if let Err(e) = r {
        panic!("{e}");
    }
    cache.applied(t, &changes);
}

fn register(t: &mut Tailnet, cache: &PeerCache, n: usize) {
    // One node in ten is a tagged server, the rest belong to one of the users.
    let (user, tags) = if n % 10 == 9 {
        ("u0".to_string(), vec!["tag:server".to_string()])
    } else {
        (format!("u{}", n % USERS), vec![])
    };
    let hostinfo = format!(r#"{{"Hostname":"node-{n}","OS":"linux","GoArch":"amd64"}}"#);
    for cmd in sample::registration(&user, tags, n as u64, format!("node-{n}"), hostinfo) {
        apply(t, cache, cmd);
    }
}

fn set_policy(t: &mut Tailnet, cache: &PeerCache, text: &str) {
    apply(
        t,
        cache,
        Command::SetPolicy {
            text: text.into(),
            now: 3,
        },
    );
}

const ALL: &str = r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#;

fn groups() -> String {
    let eng: Vec<String> = (0..USERS / 2).map(|u| format!("\"u{u}@\"")).collect();
    format!(
        r#""groups": {{"group:eng": [{}]}}, "tagOwners": {{"tag:server": ["u0@"]}}"#,
        eng.join(",")
    )
}

/// A tailnet of `nodes`, a peer cache in step, streams for every third node caught up.
fn setup(nodes: usize, policy: Option<&str>) -> (Config, Tailnet, Arc<PeerCache>, Vec<StreamView>) {
    let config = Config::default();
    let mut t = Tailnet::default();
    let cache = PeerCache::new(Arc::new(config.clone()));
    cache.reset(&t);
    for u in 0..USERS {
        apply(
            &mut t,
            &cache,
            Command::CreateUser {
                name: format!("u{u}"),
                display_name: String::new(),
                now: 1,
                by_admin: true,
                profile: Default::default(),
            },
        );
    }
    for n in 1..=nodes {
        register(&mut t, &cache, n);
    }
    if let Some(p) = policy {
        set_policy(&mut t, &cache, p);
    }
    let mut views: Vec<StreamView> = t
        .nodes
        .keys()
        .filter(|id| *id % 3 == 0)
        .map(|id| StreamView::new(*id))
        .collect();
    for v in &mut views {
        v.full(&t, &cache, &config, &serde_json::json!({}), 10);
    }
    (config, t, cache, views)
}

struct Timing {
    apply: Duration,
    deltas: Duration,
    sent: usize,
    bytes: usize,
}

fn run(nodes: usize, policy: Option<&str>, change: &dyn Fn(&mut Tailnet, &PeerCache)) -> Timing {
    let (config, mut t, cache, mut views) = setup(nodes, policy);
    let start = Instant::now();
    change(&mut t, &cache);
    let apply = start.elapsed();
    let start = Instant::now();
    let (mut sent, mut bytes) = (0, 0);
    for v in &mut views {
        if let Ok(Some(d)) = v.delta(&t, &cache, &config, 11) {
            sent += 1;
            bytes += encode(&d).map(|b| b.len()).unwrap_or(0);
        }
    }
    Timing {
        apply,
        deltas: start.elapsed(),
        sent,
        bytes,
    }
}

fn main() {
    let nodes: usize = std::env::var("MAP_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rounds: usize = std::env::var("MAP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let group_policy = format!(
        r#"{{{}, "acls": [{{"action": "accept", "src": ["group:eng"], "dst": ["*:*"]}}, {{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*", "tag:server:443"]}}]}}"#,
        groups()
    );
    let all = format!(r#"{{"acls": [{ALL}]}}"#);
    let port = format!(
        r#"{{"acls": [{ALL}, {{"action": "accept", "src": ["autogroup:member"], "dst": ["*:4242"]}}]}}"#
    );
    let reach = r#"{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}]}"#;
    let cases: Vec<(&str, Option<&str>, Box<Change<'_>>)> = vec![
        (
            "join",
            None,
            Box::new(move |t, c| register(t, c, nodes + 1)),
        ),
        (
            "policy-port",
            Some(&all),
            Box::new(|t, c| set_policy(t, c, &port)),
        ),
        (
            "policy-reach",
            Some(&all),
            Box::new(move |t, c| set_policy(t, c, reach)),
        ),
        (
            "join-under-policy",
            Some(&group_policy),
            Box::new(move |t, c| register(t, c, nodes + 1)),
        ),
    ];
    println!(
        "{nodes} nodes, {} streams on this replica, best of {rounds}",
        nodes / 3
    );
    println!(
        "| change | apply + peer cache | every stream's delta | per stream | sent | bytes (JSON) |"
    );
    println!("|---|---|---|---|---|---|");
    let only = std::env::var("MAP_BENCH_ONLY").ok();
    for (name, policy, change) in &cases {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        let best = (0..rounds)
            .map(|_| run(nodes, *policy, change.as_ref()))
            .min_by_key(|r| r.apply + r.deltas);
        if let Some(r) = best {
            println!(
                "| {name} | {:.1} ms | {:.1} ms | {:.1} µs | {} | {} |",
                r.apply.as_secs_f64() * 1e3,
                r.deltas.as_secs_f64() * 1e3,
                r.deltas.as_secs_f64() * 1e6 / (nodes / 3).max(1) as f64,
                r.sent,
                r.bytes
            );
        }
    }
}
