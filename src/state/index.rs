//! Lookups into `Tailnet::nodes` by node key, machine key, name and address.
//!
//! Registrations, endpoint updates and map requests look nodes up by key, and a new node
//! needs a free name and address. Scanning every node for each made applying a join storm
//! O(N²) on every replica's state machine, the one thread all commits go through. The
//! index is derived data, never serialized: it is built from the nodes on first use
//! (after a snapshot, a restore, or any command that may change keys, names or addresses)
//! and kept up to date by the commands that come by the thousand, so each lookup answers
//! exactly what the scan it replaces would have.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use super::types::{Node, Prefixes};

#[derive(Default)]
pub(super) struct NodeIndex {
    /// Node ids by each key and name, lowest first (a scan in id order finds the first).
    by_node_key: HashMap<String, Vec<u64>>,
    by_machine_key: HashMap<String, Vec<u64>>,
    by_name: HashMap<String, Vec<u64>>,
    pub used4: BTreeSet<Ipv4Addr>,
    pub used6: BTreeSet<Ipv6Addr>,
    /// Every address offset below this one is taken in these prefixes: where the search
    /// for a free one starts. Only ever raised by an allocation at exactly this offset.
    free_from: Option<(Prefixes, u64)>,
}

fn put(map: &mut HashMap<String, Vec<u64>>, key: &str, id: u64) {
    let ids = map.entry(key.to_string()).or_default();
    if let Err(at) = ids.binary_search(&id) {
        ids.insert(at, id);
    }
}

impl NodeIndex {
    fn build(nodes: &BTreeMap<u64, Node>) -> Self {
        let mut ix = NodeIndex::default();
        for n in nodes.values() {
            ix.add(n);
        }
        ix
    }

    fn add(&mut self, n: &Node) {
        put(&mut self.by_node_key, &n.node_key, n.id);
        put(&mut self.by_machine_key, &n.machine_key, n.id);
        put(&mut self.by_name, &n.given_name, n.id);
        self.used4.insert(n.ipv4);
        self.used6.insert(n.ipv6);
    }

    pub fn by_node_key(&self, k: &str) -> Option<u64> {
        self.by_node_key.get(k).and_then(|ids| ids.first().copied())
    }

    pub fn by_machine_key(&self, k: &str) -> Option<u64> {
        self.by_machine_key
            .get(k)
            .and_then(|ids| ids.first().copied())
    }

    /// Whether a node other than `except` has the name `name`.
    pub fn name_taken(&self, name: &str, except: Option<u64>) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|ids| ids.iter().any(|id| Some(*id) != except))
    }

    /// Where to start looking for a free address in `prefixes`.
    pub fn free_from(&self, prefixes: &Prefixes) -> u64 {
        match &self.free_from {
            Some((p, from)) if p == prefixes => *from,
            _ => 1,
        }
    }
}

/// The index as a field of `Tailnet`: empty until first used, and never part of its
/// serialized form or its equality.
#[derive(Default)]
pub(super) struct Index(OnceLock<NodeIndex>);

impl Index {
    pub fn get(&self, nodes: &BTreeMap<u64, Node>) -> &NodeIndex {
        self.0.get_or_init(|| NodeIndex::build(nodes))
    }

    /// Forgets everything; the next lookup rebuilds from the nodes.
    pub fn clear(&mut self) {
        self.0 = OnceLock::new();
    }

    /// Records a node just inserted, which was given the address at offset `offset` of
    /// `prefixes`, found by a search that started at `free_from(prefixes)`.
    pub fn added(&mut self, n: &Node, prefixes: &Prefixes, offset: u64) {
        if let Some(ix) = self.0.get_mut() {
            // The search found the lowest free offset at or after a point below which all
            // were taken: now all up to and including `offset` are.
            ix.free_from = Some((*prefixes, offset + 1));
            ix.add(n);
        }
    }
}

impl Clone for Index {
    /// A clone rebuilds its own index when first asked, rather than copying this one.
    fn clone(&self) -> Self {
        Index::default()
    }
}

impl PartialEq for Index {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Index")
    }
}
