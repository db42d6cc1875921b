//! The stream's full maps and deltas against the shared peer cache, over the sample tailnet.

use super::*;
use std::sync::Arc;

/// The sample tailnet, and a peer cache in step with it.
fn sample_with_cache() -> (Config, Tailnet, Arc<PeerCache>) {
    use crate::state::Observer;
    let config = Config::default();
    let t = crate::policy::compile::sample_tailnet();
    let cache = PeerCache::new(Arc::new(config.clone()));
    cache.reset(&t);
    (config, t, cache)
}

/// Applies `cmd` to `t` and tells `cache`, as the state store does.
fn apply_to(cache: &PeerCache, t: &mut Tailnet, cmd: crate::state::Command) {
    use crate::state::Observer;
    let (r, changes) = t.apply(&cmd);
    r.unwrap();
    cache.applied(t, &changes);
}

/// A stream's deltas come from the shared cache alone: patches for endpoint-only
/// changes (several merged when the stream fell behind), whole nodes otherwise,
/// removals when a peer goes or the policy hides it, and nothing per peer kept.
#[test]
fn deltas_from_the_shared_peer_cache() {
    use crate::state::Command;
    let (config, mut t, cache) = sample_with_cache();
    let apply = |t: &mut Tailnet, cmd: Command| apply_to(&cache, t, cmd);
    let mut view = StreamView::new(1);
    let full = view.full(&t, &cache, &config, &json!({}), 10).unwrap();
    let ids: Vec<u64> = full
        .peers
        .unwrap()
        .iter()
        .map(|p| p.0["ID"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [2, 3]);

    let update = |id: u64, endpoints: Option<&str>, disco: Option<&str>, hostinfo: Option<&str>| {
        Command::UpdateNode {
            node_key: format!("nodekey:{id:064x}"),
            disco_key: disco.map(str::to_string),
            endpoints: endpoints.map(|e| vec![e.to_string()]),
            hostinfo: hostinfo.map(str::to_string),
            hostname: None,
            home_derp: None,
            now: 11,
        }
    };
    apply(&mut t, update(2, Some("192.0.2.2:1"), None, None));
    let d = view.delta(&t, &cache, &config, 12).unwrap().unwrap();
    assert!(d.peers_changed.is_none());
    let p = &d.peers_changed_patch.unwrap()[0];
    assert_eq!(
        (&p["NodeID"], &p["Endpoints"]),
        (&json!(2), &json!(["192.0.2.2:1"]))
    );
    assert!(p.get("DiscoKey").is_none());

    // Two changes before the stream catches up: one patch with both.
    apply(&mut t, update(2, Some("192.0.2.2:2"), None, None));
    apply(&mut t, update(2, None, Some("discokey:ab"), None));
    let d = view.delta(&t, &cache, &config, 13).unwrap().unwrap();
    let p = &d.peers_changed_patch.unwrap()[0];
    assert_eq!(p["Endpoints"], json!(["192.0.2.2:2"]));
    assert_eq!(p["DiscoKey"], "discokey:ab");
    // Changes to several peers before the stream reads the cache all go out in its
    // next message: it reads the cache's history, not the announcements that woke it
    // (the cache may have moved on between the two).
    apply(&mut t, update(2, Some("192.0.2.2:3"), None, None));
    apply(&mut t, update(3, Some("192.0.2.3:3"), None, None));
    let d = view.delta(&t, &cache, &config, 13).unwrap().unwrap();
    let ids: Vec<u64> = d
        .peers_changed_patch
        .unwrap()
        .iter()
        .map(|p| p["NodeID"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [2, 3]);
    // Nothing new: nothing sent.
    assert!(view.delta(&t, &cache, &config, 14).unwrap().is_none());

    // Hostinfo is not patchable: the whole node.
    apply(&mut t, update(3, None, None, Some(r#"{"OS":"linux"}"#)));
    let d = view.delta(&t, &cache, &config, 15).unwrap().unwrap();
    assert_eq!(d.peers_changed.unwrap()[0].0["ID"], 3);

    // A policy hiding node 3 (tag:web) from alice's node 1; then removing its tag
    // (it becomes alice's again) brings it back, and deleting node 2 removes it.
    let policy = r#"{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}]}"#;
    apply(
        &mut t,
        Command::SetPolicy {
            text: policy.into(),
            now: 16,
        },
    );
    // A policy change is a delta on the open stream: the peer it now hides is removed,
    // and the node's packet filter replaced.
    let d = view.delta(&t, &cache, &config, 16).unwrap().unwrap();
    assert_eq!(d.peers_removed.unwrap(), [3]);
    assert!(d.peers_changed.is_none() && d.packet_filter.is_some());
    assert!(view.delta(&t, &cache, &config, 16).unwrap().is_none());
    apply(
        &mut t,
        Command::SetTags {
            id: 3,
            tags: vec![],
        },
    );
    let d = view.delta(&t, &cache, &config, 17).unwrap().unwrap();
    assert_eq!(d.peers_changed.unwrap()[0].0["ID"], 3);
    apply(&mut t, Command::DeleteNode { id: 2 });
    let d = view.delta(&t, &cache, &config, 18).unwrap().unwrap();
    assert_eq!(d.peers_removed.unwrap(), [2]);
}

/// Streams caught up to the same point get the same delta, and say so with the same
/// key; not the stream whose own node changed, and nobody under a policy.
#[test]
fn streams_alike_share_a_key_for_the_same_delta() {
    use crate::state::Command;
    let (config, mut t, cache) = sample_with_cache();
    let apply = |t: &mut Tailnet, cmd: Command| apply_to(&cache, t, cmd);
    let update = |id: u64| Command::UpdateNode {
        node_key: format!("nodekey:{id:064x}"),
        disco_key: None,
        endpoints: Some(vec![format!("192.0.2.{id}:41641")]),
        hostinfo: None,
        hostname: None,
        home_derp: None,
        now: 11,
    };
    let mut views: Vec<StreamView> = [1, 2, 3].map(StreamView::new).into();
    for v in &mut views {
        v.full(&t, &cache, &config, &json!({}), 10).unwrap();
    }
    apply(&mut t, update(3));
    let keys: Vec<_> = views.iter().map(|v| v.shared_key(&t, &cache)).collect();
    assert!(keys[0].is_some() && keys[0] == keys[1], "{keys:?}");
    assert_eq!(keys[2], None, "node 3 itself changed");
    let text = |v: &mut StreamView| {
        let d = v.delta(&t, &cache, &config, 12).unwrap().unwrap();
        crate::tailcfg::encode(&d).unwrap()
    };
    let (a, b) = (text(&mut views[0]), text(&mut views[1]));
    assert_eq!(a, b);
    // Moved on by a shared delta, a stream carries on from where it was sent to.
    let mut late = StreamView::new(2);
    late.full(&t, &cache, &config, &json!({}), 12).unwrap();
    apply(&mut t, update(1));
    let key = late.shared_key(&t, &cache).unwrap();
    late.advance(key.1);
    assert!(late.delta(&t, &cache, &config, 13).unwrap().is_none());

    let policy = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
    apply(
        &mut t,
        Command::SetPolicy {
            text: policy.into(),
            now: 14,
        },
    );
    for v in &mut views {
        let _ = v.delta(&t, &cache, &config, 14);
    }
    apply(&mut t, update(3));
    assert!(views.iter().all(|v| v.shared_key(&t, &cache).is_none()));
}

/// A policy edit that connects the same pairs of nodes (a port opened, an attribute
/// given) costs each stream its packet filter and the nodes whose rendering changed,
/// not a walk over every node; an edit that hides a peer still removes it.
#[test]
fn port_edits_replace_filters_and_leave_peers_alone() {
    use crate::state::Command;
    let (config, mut t, cache) = sample_with_cache();
    let set = |t: &mut Tailnet, text: &str, now: i64| {
        apply_to(
            &cache,
            t,
            Command::SetPolicy {
                text: text.into(),
                now,
            },
        )
    };
    let all = r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#;
    let port = r#"{"action": "accept", "src": ["*"], "dst": ["*:4242"]}"#;
    set(&mut t, &format!(r#"{{"acls": [{all}]}}"#), 10);
    let mut view = StreamView::new(1);
    let full = view.full(&t, &cache, &config, &json!({}), 10).unwrap();
    let peers = full.peers.unwrap().len();

    set(&mut t, &format!(r#"{{"acls": [{all}, {port}]}}"#), 11);
    {
        let p = cache.read();
        let since = p.since(p.seq - 1).unwrap();
        assert!(since.filters && !since.everything && since.ids.is_empty());
    }
    let d = view.delta(&t, &cache, &config, 11).unwrap().unwrap();
    assert!(d
        .packet_filter
        .unwrap()
        .to_value()
        .to_string()
        .contains("4242"));
    assert!(d.peers_changed.is_none() && d.peers_removed.is_none() && d.node.is_none());

    // An attribute for every node: each one's rendering (CapMap) changes, so each is
    // resent, the stream's own node included; the filter stays as it was.
    let attrs = r#""nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}]"#;
    set(
        &mut t,
        &format!(r#"{{"acls": [{all}, {port}], {attrs}}}"#),
        12,
    );
    let d = view.delta(&t, &cache, &config, 12).unwrap().unwrap();
    assert!(d.node.unwrap()["CapMap"].get("funnel").is_some());
    assert_eq!(d.peers_changed.unwrap().len(), peers);
    assert!(d.packet_filter.is_none());

    // Members only: the tagged node 3 goes.
    let members =
        r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}"#;
    set(&mut t, &format!(r#"{{"acls": [{members}], {attrs}}}"#), 13);
    {
        let p = cache.read();
        let since = p.since(p.seq - 1).unwrap();
        assert!(since.reach && !since.everything);
    }
    let d = view.delta(&t, &cache, &config, 13).unwrap().unwrap();
    assert_eq!(d.peers_removed.unwrap(), [3]);
    assert!(d.packet_filter.is_some());

    // A node deleted, then a policy change connecting other pairs: the deleted one is
    // in no kind of node any more, and must still be removed; node 3 comes back.
    apply_to(&cache, &mut t, Command::DeleteNode { id: 2 });
    set(&mut t, &format!(r#"{{"acls": [{all}], {attrs}}}"#), 14);
    let d = view.delta(&t, &cache, &config, 14).unwrap().unwrap();
    assert_eq!(d.peers_removed.unwrap(), [2]);
    assert_eq!(d.peers_changed.unwrap()[0].0["ID"], 3);
}

/// Nodes of a kind that stops seeing its own kind all send one and the same removal
/// list, their own ids included, so that it is made and compressed once.
#[test]
fn a_kind_hidden_from_itself_sends_one_removal_list() {
    let (config, mut t, cache) = sample_with_cache();
    for id in [4u8, 5] {
        let changes = compile::add_sample_node(&mut t, "bob", vec!["tag:db".into()], id);
        crate::state::Observer::applied(&*cache, &t, &changes);
    }
    let owners = r#""tagOwners": {"tag:db": ["bob@"]}"#;
    let set = |t: &mut Tailnet, acl: &str, now: i64| {
        let text = format!(r#"{{{owners}, "acls": [{acl}]}}"#);
        apply_to(&cache, t, crate::state::Command::SetPolicy { text, now });
    };
    set(
        &mut t,
        r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#,
        10,
    );
    let mut views: Vec<StreamView> = [4, 5].map(StreamView::new).into();
    for v in &mut views {
        v.full(&t, &cache, &config, &json!({}), 10).unwrap();
    }
    set(
        &mut t,
        r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}"#,
        11,
    );
    let lists: Vec<Vec<u64>> = views
        .iter_mut()
        .map(|v| {
            let d = v.delta(&t, &cache, &config, 11).unwrap().unwrap();
            assert!(d.peers_changed.is_none());
            d.peers_removed.unwrap()
        })
        .collect();
    let everyone: Vec<u64> = t.nodes.keys().copied().collect();
    assert_eq!(lists[0], everyone);
    assert_eq!(lists[1], everyone);
}

/// Clients kept up to date by deltas hold the peers a full map would give them, through
/// policy changes that connect other pairs (asked by kind of node, or node by node
/// when a rule names an address), with nodes joining, going and changing tags in
/// between, and streams falling behind by several changes.
#[test]
fn deltas_through_reach_changes_hold_what_a_full_map_would() {
    use crate::state::{Command, Observer};
    use std::collections::{BTreeMap, BTreeSet};
    let (config, mut t, cache) = sample_with_cache();
    let more = [
        ("alice", vec![]),
        ("bob", vec!["tag:db"]),
        ("bob", vec![]),
        ("alice", vec!["tag:web"]),
    ];
    for (i, (user, tags)) in more.into_iter().enumerate() {
        let tags = tags.into_iter().map(String::from).collect();
        let changes = compile::add_sample_node(&mut t, user, tags, 4 + i as u8);
        cache.applied(&t, &changes);
    }
    let owners = r#""tagOwners": {"tag:web": ["alice@"], "tag:db": ["bob@"]}"#;
    let rules = [
        r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}"#
            .to_string(),
        r#"{"action": "accept", "src": ["alice@"], "dst": ["tag:web:443", "tag:db:5432"]}"#
            .to_string(),
        r#"{"action": "accept", "src": ["bob@"], "dst": ["autogroup:self:*"]}"#.to_string(),
        format!(
            r#"{{"action": "accept", "src": ["{}/32"], "dst": ["tag:db:*"]}}"#,
            t.nodes[&2].ipv4
        ),
        r#"{"action": "accept", "src": ["tag:web"], "dst": ["alice@:22"]}"#.to_string(),
        r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#.to_string(),
    ];
    let ids = |list: &Option<Vec<Shared>>| -> Vec<u64> {
        list.iter()
            .flatten()
            .filter_map(|p| p.0["ID"].as_u64())
            .collect()
    };
    let mut views: BTreeMap<u64, (StreamView, BTreeSet<u64>)> = BTreeMap::new();
    let mut now = 20;
    for step in 0..30usize {
        now += 1;
        let rule = &rules[step % rules.len()];
        let text = format!(r#"{{{owners}, "acls": [{rule}]}}"#);
        apply_to(&cache, &mut t, Command::SetPolicy { text, now });
        match step % 7 {
            2 => {
                let tags = if step % 2 == 0 {
                    vec!["tag:db".into()]
                } else {
                    vec![]
                };
                apply_to(&cache, &mut t, Command::SetTags { id: 6, tags });
            }
            4 if t.nodes.contains_key(&5) => {
                apply_to(&cache, &mut t, Command::DeleteNode { id: 5 });
            }
            5 if !t.nodes.contains_key(&9) => {
                let changes = compile::add_sample_node(&mut t, "bob", vec![], 9);
                cache.applied(&t, &changes);
            }
            _ => {}
        }
        for id in t.nodes.keys().copied().collect::<Vec<_>>() {
            // Node n catches up every (n % 3 + 1)th step, so falls behind by up to
            // three policy changes.
            if !(step as u64).is_multiple_of(id % 3 + 1) {
                continue;
            }
            let (view, held) = views
                .entry(id)
                .or_insert_with(|| (StreamView::new(id), BTreeSet::new()));
            let delta = if view.synced == 0 {
                Err(Resync::Full)
            } else {
                view.delta(&t, &cache, &config, now)
            };
            match delta {
                Ok(d) => {
                    if let Some(d) = d {
                        // Its own id may be among the removed (a no-op for the
                        // client), never among the peers.
                        let named = ids(&d.peers_changed);
                        assert!(!named.contains(&id), "node {id} sent as its own peer");
                        held.extend(ids(&d.peers_changed));
                        for gone in d.peers_removed.iter().flatten() {
                            held.remove(gone);
                        }
                    }
                }
                Err(_) => {
                    let full = view.full(&t, &cache, &config, &json!({}), now).unwrap();
                    *held = ids(&full.peers).into_iter().collect();
                }
            }
            let want = StreamView::new(id)
                .full(&t, &cache, &config, &json!({}), now)
                .unwrap();
            let want: BTreeSet<u64> = ids(&want.peers).into_iter().collect();
            assert_eq!(*held, want, "node {id} after step {step}");
        }
    }
}

/// Every stream's filter reads the rules' sources resolved once; a node joining (or
/// becoming someone else to the policy) makes them be resolved again.
#[test]
fn filters_follow_nodes_joining_under_a_policy() {
    use crate::state::{Command, Observer};
    let (config, mut t, cache) = sample_with_cache();
    let policy = r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["*:*"]}]}"#;
    apply_to(
        &cache,
        &mut t,
        Command::SetPolicy {
            text: policy.into(),
            now: 10,
        },
    );
    let sources = |f: Option<PacketFilter>| f.unwrap().to_value()[0]["SrcIPs"].to_string();
    let mut bob = StreamView::new(2);
    let full = bob.full(&t, &cache, &config, &json!({}), 10).unwrap();
    let alice1 = t.nodes[&1].ipv4.to_string();
    assert_eq!(
        sources(full.packet_filter),
        format!("[\"{alice1}\",\"{}\"]", t.nodes[&1].ipv6)
    );

    let changes = crate::policy::compile::add_sample_node(&mut t, "alice", vec![], 4);
    cache.applied(&t, &changes);
    let d = bob.delta(&t, &cache, &config, 11).unwrap().unwrap();
    assert_eq!(d.peers_changed.unwrap()[0].0["ID"], 4);
    let alice2 = &t.nodes[&4];
    // Nodes 2 and 3 sit between alice's two nodes' addresses: one entry each.
    assert!(sources(d.packet_filter).contains(&format!("\"{}\"", alice2.ipv4)));
}

#[test]
fn patch_names_follow_the_patchable_fields() {
    for (field, name) in PATCHABLE.iter().zip(PATCH_NAMES) {
        let want = match *field {
            "HomeDERP" => Some("DERPRegion"),
            "DERP" => None,
            f => Some(f),
        };
        assert_eq!(name, want);
    }
}
