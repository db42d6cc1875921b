//! What the chaos workload asked the cluster and what it was told, with the fault in force
//! at the time, and the checks made on that record once the faults have healed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub enum Kind {
    /// `hydrascale users create NAME` through one replica's admin API.
    CreateUser { name: String },
    /// A node registering over TS2021 with a pre-auth key at one replica.
    Register { node_key: String },
    /// A write sent to a replica while it was cut off from the quorum.
    MinorityWrite { name: String },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Outcome {
    /// Acknowledged: it must survive everything that follows.
    Ok,
    /// Refused, or no answer in time: it may or may not have happened.
    NotAcknowledged(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub kind: Kind,
    /// The replica the client talked to.
    pub via: u64,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub outcome: Outcome,
    /// The fault in force when the operation started ("" between faults).
    pub during: String,
}

pub struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    fault: Mutex<String>,
}

impl History {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            fault: Mutex::new(String::new()),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn fault(&self) -> String {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_fault(&self, name: &str) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
    }

    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One node of the committed state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct NodeRow {
    pub id: u64,
    pub node_key: String,
    pub ipv4: String,
    pub ipv6: String,
}

/// The state every replica agrees on after the faults healed.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Committed {
    pub users: BTreeSet<String>,
    pub nodes: Vec<NodeRow>,
}

/// Everything the history and the committed state must satisfy; one line per violation.
pub fn check(ops: &[Op], c: &Committed) -> Vec<String> {
    let mut bad = Vec::new();
    let keys: BTreeSet<&str> = c.nodes.iter().map(|n| n.node_key.as_str()).collect();
    for op in ops {
        let acked = op.outcome == Outcome::Ok;
        match &op.kind {
            Kind::CreateUser { name } if acked && !c.users.contains(name) => bad.push(format!(
                "acknowledged write lost: user {name} (via replica {} at {} ms, during {:?})",
                op.via, op.ended_ms, op.during
            )),
            Kind::Register { node_key } if acked && !keys.contains(node_key.as_str()) => {
                bad.push(format!(
                    "acknowledged registration lost: {node_key} (via replica {} at {} ms, during {:?})",
                    op.via, op.ended_ms, op.during
                ))
            }
            Kind::MinorityWrite { name } => {
                if acked {
                    bad.push(format!(
                        "replica {} acknowledged user {name} while cut off from the quorum",
                        op.via
                    ));
                }
                if c.users.contains(name) {
                    bad.push(format!(
                        "user {name}, written to replica {} while it was cut off, was committed",
                        op.via
                    ));
                }
            }
            _ => {}
        }
    }
    let mut twice = |what: &str, values: Vec<String>| {
        let mut seen = BTreeMap::<String, usize>::new();
        for v in values {
            *seen.entry(v).or_default() += 1;
        }
        for (v, n) in seen.into_iter().filter(|(_, n)| *n > 1) {
            bad.push(format!("{what} {v} assigned to {n} nodes"));
        }
    };
    twice(
        "IPv4 address",
        c.nodes.iter().map(|n| n.ipv4.clone()).collect(),
    );
    twice(
        "IPv6 address",
        c.nodes.iter().map(|n| n.ipv6.clone()).collect(),
    );
    twice(
        "node key",
        c.nodes.iter().map(|n| n.node_key.clone()).collect(),
    );
    twice(
        "node id",
        c.nodes.iter().map(|n| n.id.to_string()).collect(),
    );
    bad
}

/// Per fault: operations acknowledged and not, and the longest stretch without an
/// acknowledged write while it was in force (what a user would feel). Each stretch is
/// measured within one window of the fault (operations in start order, split where the
/// fault in force changes), so the quiet windows between faults do not span the faults.
pub fn summary(ops: &[Op]) -> BTreeMap<String, (usize, usize, u64)> {
    let mut out = BTreeMap::<String, (usize, usize, u64)>::new();
    let mut sorted: Vec<&Op> = ops
        .iter()
        .filter(|o| !matches!(o.kind, Kind::MinorityWrite { .. }))
        .collect();
    sorted.sort_by_key(|o| o.started_ms);
    for window in sorted.chunk_by(|a, b| a.during == b.during) {
        let mut acked: Vec<u64> = window
            .iter()
            .filter(|o| o.outcome == Outcome::Ok)
            .map(|o| o.ended_ms)
            .collect();
        acked.sort_unstable();
        let first = window.iter().map(|o| o.started_ms).min().unwrap_or(0);
        let last = window.iter().map(|o| o.ended_ms).max().unwrap_or(0);
        let mut gap = 0;
        let mut prev = first;
        for t in acked.iter().copied().chain([last]) {
            gap = gap.max(t.saturating_sub(prev));
            prev = prev.max(t);
        }
        let e = out.entry(window[0].during.clone()).or_default();
        e.0 += acked.len();
        e.1 += window.len() - acked.len();
        e.2 = e.2.max(gap);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind, outcome: Outcome) -> Op {
        Op {
            kind,
            via: 1,
            started_ms: 0,
            ended_ms: 1,
            outcome,
            during: "kill-leader".into(),
        }
    }

    fn node(id: u64, key: &str, ip: &str) -> NodeRow {
        NodeRow {
            id,
            node_key: key.into(),
            ipv4: ip.into(),
            ipv6: format!("fd7a::{id}"),
        }
    }

    #[test]
    fn the_checker_catches_each_kind_of_violation() {
        let user = |n: &str| Kind::CreateUser { name: n.into() };
        let mut c = Committed::default();
        c.users.insert("kept".into());
        c.nodes = vec![node(1, "k1", "100.64.0.1"), node(2, "k2", "100.64.0.2")];
        let ops = vec![
            op(user("kept"), Outcome::Ok),
            op(user("maybe"), Outcome::NotAcknowledged("timeout".into())),
            op(
                Kind::Register {
                    node_key: "k1".into(),
                },
                Outcome::Ok,
            ),
        ];
        assert_eq!(check(&ops, &c), Vec::<String>::new());

        let mut lost = ops.clone();
        lost.push(op(user("gone"), Outcome::Ok));
        lost.push(op(
            Kind::Register {
                node_key: "k9".into(),
            },
            Outcome::Ok,
        ));
        let v = check(&lost, &c);
        assert!(v[0].contains("user gone") && v[1].contains("k9"), "{v:?}");

        let minority = vec![op(
            Kind::MinorityWrite {
                name: "kept".into(),
            },
            Outcome::Ok,
        )];
        assert_eq!(check(&minority, &c).len(), 2);

        let mut dup = c.clone();
        dup.nodes.push(node(3, "k1", "100.64.0.1"));
        let v = check(&[], &dup);
        assert!(
            v.iter()
                .any(|l| l.contains("IPv4 address 100.64.0.1 assigned to 2"))
                && v.iter().any(|l| l.contains("node key k1")),
            "{v:?}"
        );
    }

    #[test]
    fn summary_measures_the_longest_wait_for_an_acknowledged_write() {
        let mut ops = Vec::new();
        for (start, end, ok) in [
            (0, 10, true),
            (10, 500, false),
            (500, 2500, true),
            (2500, 2600, true),
        ] {
            let mut o = op(
                Kind::CreateUser {
                    name: format!("u{start}"),
                },
                if ok {
                    Outcome::Ok
                } else {
                    Outcome::NotAcknowledged("refused".into())
                },
            );
            o.started_ms = start;
            o.ended_ms = end;
            ops.push(o);
        }
        assert_eq!(summary(&ops)["kill-leader"], (3, 1, 2490));
    }
}
