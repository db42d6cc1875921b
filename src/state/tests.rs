//! Unit tests of the pure state machine.

use super::*;

const NOW: i64 = 1_800_000_000_000;

fn key_hash(k: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(k.as_bytes()))
}

fn setup() -> Tailnet {
    let mut t = Tailnet::default();
    ok(
        &mut t,
        Command::CreateUser {
            name: "alice".into(),
            display_name: String::new(),
            now: NOW,
            by_admin: true,
            profile: Default::default(),
        },
    );
    for (k, reusable, exp) in [
        ("single", false, None),
        ("multi", true, None),
        ("old", true, Some(NOW - 1)),
    ] {
        ok(
            &mut t,
            Command::CreatePreAuthKey {
                user: "alice".into(),
                prefix: k.into(),
                hash: key_hash(k),
                reusable,
                ephemeral: false,
                expiration: exp,
                tags: vec![],
                now: NOW,
            },
        );
    }
    t
}

fn ok(t: &mut Tailnet, c: Command) -> CommandOutput {
    let (r, _) = t.apply(&c);
    r.unwrap_or_else(|e| panic!("{c:?} failed: {e}"))
}

fn refused(t: &mut Tailnet, c: Command) -> StateError {
    let before = serde_json::to_string(t).expect("json");
    let (r, changes) = t.apply(&c);
    let e = r.expect_err("command should be refused");
    assert!(changes.is_empty());
    assert_eq!(
        serde_json::to_string(t).expect("json"),
        before,
        "refused command changed state"
    );
    e
}

fn reg(machine: u32, node: u32, key: &str) -> Command {
    Command::RegisterNode {
        machine_key: format!("mkey:{machine:064x}"),
        node_key: format!("nodekey:{node:064x}"),
        old_node_key: None,
        hostname: format!("Host {machine}"),
        hostinfo: "{}".into(),
        auth: RegisterAuth::PreAuthKey {
            hash: key_hash(key),
        },
        expiry: None,
        ephemeral: false,
        prefixes: Prefixes::default(),
        now: NOW,
    }
}

fn node(out: CommandOutput) -> Node {
    match out {
        CommandOutput::Node(n) => n,
        other => panic!("expected node, got {other:?}"),
    }
}

#[test]
fn preauth_key_rules() {
    let mut t = setup();
    let n = node(ok(&mut t, reg(1, 1, "single")));
    assert_eq!(n.ipv4.to_string(), "100.64.0.1");
    assert_eq!(n.ipv6.to_string(), "fd7a:115c:a1e0::1");
    assert_eq!(n.given_name, "host-1");
    assert_eq!(
        refused(&mut t, reg(2, 2, "single")),
        StateError::AuthKeyUsed
    );
    assert_eq!(
        refused(&mut t, reg(2, 2, "old")),
        StateError::AuthKeyExpired
    );
    assert_eq!(
        refused(&mut t, reg(2, 2, "nope")),
        StateError::AuthKeyUnknown
    );
    node(ok(&mut t, reg(2, 2, "multi")));
    node(ok(&mut t, reg(3, 3, "multi")));
    assert_eq!(t.nodes.len(), 3);
    // Another machine may not take over a node key.
    assert!(matches!(
        refused(&mut t, reg(4, 1, "multi")),
        StateError::NodeKeyInUse(_)
    ));
}

#[test]
fn reregistration_keeps_addresses_and_rotation_works() {
    let mut t = setup();
    let first = node(ok(&mut t, reg(1, 1, "multi")));
    // Logout, then log in again with a new node key on the same machine.
    ok(
        &mut t,
        Command::LogoutNode {
            node_key: first.node_key.clone(),
            now: NOW,
        },
    );
    let again = node(ok(&mut t, reg(1, 9, "multi")));
    assert_eq!(
        (again.id, again.ipv4, again.ipv6),
        (first.id, first.ipv4, first.ipv6)
    );
    assert_eq!(again.expiry, None);
    // Key rotation without an auth key needs the old key.
    let mut rotate = reg(1, 10, "multi");
    if let Command::RegisterNode {
        auth, old_node_key, ..
    } = &mut rotate
    {
        *auth = RegisterAuth::Existing;
        *old_node_key = Some(format!("nodekey:{:064x}", 5));
    }
    assert_eq!(refused(&mut t, rotate.clone()), StateError::NodeKeyMismatch);
    if let Command::RegisterNode { old_node_key, .. } = &mut rotate {
        *old_node_key = Some(again.node_key.clone());
    }
    let rotated = node(ok(&mut t, rotate));
    assert_eq!(rotated.node_key, format!("nodekey:{:064x}", 10));
    assert_eq!(rotated.ipv4, first.ipv4);
    // The single-use key's own registration may come again (a retry whose answer was
    // lost), but it registers no other node key and never revives a revoked node.
    let mut t = setup();
    let n = node(ok(&mut t, reg(1, 1, "single")));
    node(ok(&mut t, reg(1, 1, "single")));
    assert_eq!(
        refused(&mut t, reg(1, 2, "single")),
        StateError::AuthKeyUsed
    );
    ok(&mut t, Command::ExpireNode { id: n.id, now: NOW });
    assert_eq!(
        refused(&mut t, reg(1, 1, "single")),
        StateError::AuthKeyUsed
    );
}

/// A replayed log decides a race of two uses of one single-use key the same way on
/// every replica: the first applied wins, the second is refused and changes nothing.
#[test]
fn single_use_key_race_is_decided_by_the_log() {
    let mut a = setup();
    let mut b = setup();
    for t in [&mut a, &mut b] {
        node(ok(t, reg(1, 1, "single")));
        assert_eq!(refused(t, reg(2, 2, "single")), StateError::AuthKeyUsed);
    }
    assert_eq!(a, b);
}

fn oidc_login(auth_id: &str, sub: &str, name: &str) -> Command {
    Command::OidcLogin {
        auth_id: auth_id.into(),
        issuer: "https://idp.example".into(),
        subject: sub.into(),
        name: name.into(),
        display_name: String::new(),
        now: NOW,
        profile: Default::default(),
    }
}

/// Applies `c` (which must succeed) and returns the owner of the node it registered.
fn owner(t: &mut Tailnet, c: Command) -> User {
    let n = node(ok(t, c));
    t.users.get(&n.user_id).cloned().expect("owner")
}

#[test]
fn oidc_logins_reach_users_by_issuer_and_subject_only() {
    let mut t = setup();
    // A first login whose name is a CLI user's gets a user of its own.
    ok(&mut t, pending("a1", 1, 1, NOW));
    let u = owner(&mut t, oidc_login("a1", "s-1", "alice"));
    assert_eq!(u.name, "alice-2");
    assert_eq!(u.origin, UserOrigin::Oidc);
    let cli = t.user_by_name("alice").cloned().expect("alice");
    assert_eq!((cli.origin, cli.oidc), (UserOrigin::Admin, None));
    // The same identity comes back to that user whatever name it now brings.
    ok(&mut t, pending("a2", 2, 2, NOW));
    let again = owner(&mut t, oidc_login("a2", "s-1", "bob"));
    assert_eq!(again.id, u.id);
    // Another subject with the same name is someone else.
    ok(&mut t, pending("a3", 3, 3, NOW));
    let other = owner(&mut t, oidc_login("a3", "s-2", "alice"));
    assert_eq!(other.name, "alice-3");
    // The same subject at another issuer is someone else too.
    ok(&mut t, pending("a4", 4, 4, NOW));
    let mut foreign = oidc_login("a4", "s-1", "alice");
    if let Command::OidcLogin { issuer, .. } = &mut foreign {
        *issuer = "https://other.example/".into();
    }
    assert_ne!(owner(&mut t, foreign).id, u.id);
    // An administrator links the CLI user; the identity then reaches it.
    ok(
        &mut t,
        Command::LinkUser {
            name: "alice".into(),
            identity: Some(OidcIdentity {
                issuer: "https://idp.example/".into(),
                subject: "s-9".into(),
            }),
        },
    );
    ok(&mut t, pending("a5", 5, 5, NOW));
    assert_eq!(owner(&mut t, oidc_login("a5", "s-9", "x")).id, cli.id);
    // One identity belongs to one user, and a linked user is not silently relinked.
    let link = |name: &str, sub: &str| Command::LinkUser {
        name: name.into(),
        identity: Some(OidcIdentity {
            issuer: "https://idp.example".into(),
            subject: sub.into(),
        }),
    };
    assert_eq!(
        refused(&mut t, link("alice-2", "s-9")),
        StateError::IdentityTaken("alice".into())
    );
    assert!(matches!(
        refused(&mut t, link("alice", "s-new")),
        StateError::UserLinked { .. }
    ));
    ok(
        &mut t,
        Command::LinkUser {
            name: "alice".into(),
            identity: None,
        },
    );
    assert!(t.user_by_identity("https://idp.example", "s-9").is_none());
}

#[test]
fn oidc_login_never_binds_a_user_of_unrecorded_origin() {
    let mut t = setup();
    // A user an older version stored (its CreateUser has no `by_admin`): a CLI user or
    // an early OIDC login alike.
    let old: Command = serde_json::from_str(
        r#"{"CreateUser":{"name":"carol@example.com","display_name":"","now":1}}"#,
    )
    .expect("old command");
    ok(&mut t, old);
    let carol = t.user_by_name("carol@example.com").cloned().expect("carol");
    assert_eq!(carol.origin, UserOrigin::Unrecorded);
    ok(&mut t, pending("b1", 1, 1, NOW));
    assert!(matches!(
        refused(&mut t, oidc_login("b1", "c", "carol@example.com")),
        StateError::UnlinkedUser { .. }
    ));
    // Once linked, the login reaches it.
    ok(
        &mut t,
        Command::LinkUser {
            name: "carol@example.com".into(),
            identity: Some(OidcIdentity {
                issuer: "https://idp.example".into(),
                subject: "c".into(),
            }),
        },
    );
    assert_eq!(
        owner(&mut t, oidc_login("b1", "c", "carol@example.com")).id,
        carol.id
    );
    // A user record without the new fields (an old snapshot) reads as unrecorded.
    let u: User =
        serde_json::from_str(r#"{"id":7,"name":"x","display_name":"","created":0}"#).expect("user");
    assert_eq!((u.origin, u.oidc), (UserOrigin::Unrecorded, None));
}

#[test]
fn refused_oidc_login_creates_no_user() {
    let mut t = setup();
    // The machine's node key belongs to another machine's node: registration refuses.
    node(ok(&mut t, reg(1, 7, "multi")));
    ok(
        &mut t,
        Command::StartLogin {
            login: PendingLogin {
                auth_id: "c1".into(),
                machine_key: format!("mkey:{:064x}", 2),
                node_key: format!("nodekey:{:064x}", 7),
                hostname: "h".into(),
                hostinfo: "{}".into(),
                ephemeral: false,
                created: NOW,
                prefixes: Prefixes::default(),
                key_lifetime: None,
            },
        },
    );
    assert!(matches!(
        refused(&mut t, oidc_login("c1", "s", "dave")),
        StateError::NodeKeyInUse(_)
    ));
    // Names stay valid and unique however long the wanted one is.
    let long = "x".repeat(63);
    ok(&mut t, pending("c2", 3, 3, NOW));
    ok(&mut t, pending("c3", 4, 4, NOW));
    let first = owner(&mut t, oidc_login("c2", "s1", &long));
    let second = owner(&mut t, oidc_login("c3", "s2", &long));
    assert_eq!(first.name, long);
    assert_eq!(second.name.len(), 63);
    assert!(second.name.ends_with("-2") && valid_user_name(&second.name));
}

#[test]
fn addresses_unique_across_many_nodes_and_deletes() {
    let mut t = setup();
    for i in 0..1000u32 {
        node(ok(&mut t, reg(i + 1, i + 1, "multi")));
    }
    ok(&mut t, Command::DeleteNode { id: 10 });
    node(ok(&mut t, reg(5000, 5000, "multi")));
    let mut v4: Vec<_> = t.nodes.values().map(|n| n.ipv4).collect();
    let mut v6: Vec<_> = t.nodes.values().map(|n| n.ipv6).collect();
    let mut names: Vec<_> = t.nodes.values().map(|n| n.given_name.clone()).collect();
    let count = v4.len();
    v4.sort();
    v4.dedup();
    v6.sort();
    v6.dedup();
    names.sort();
    names.dedup();
    assert_eq!((v4.len(), v6.len(), names.len()), (count, count, count));
    assert!(!v4.contains(&"100.100.100.100".parse().expect("ip")));
}

#[test]
fn users_and_names() {
    let mut t = setup();
    assert_eq!(
        refused(
            &mut t,
            Command::CreateUser {
                name: "alice".into(),
                display_name: String::new(),
                now: NOW,
                by_admin: true,
                profile: Default::default(),
            }
        ),
        StateError::UserExists("alice".into())
    );
    assert!(matches!(
        refused(
            &mut t,
            Command::DeleteUser {
                name: "alice".into()
            }
        ),
        StateError::UserInUse { .. }
    ));
    assert!(matches!(
        refused(
            &mut t,
            Command::CreateUser {
                name: "bad name".into(),
                display_name: String::new(),
                now: NOW,
                by_admin: true,
                profile: Default::default(),
            }
        ),
        StateError::BadUserName(_)
    ));
    ok(
        &mut t,
        Command::RenameUser {
            old_name: "alice".into(),
            new_name: "alicia".into(),
        },
    );
    let a = node(ok(&mut t, reg(1, 1, "multi")));
    let b = node(ok(&mut t, reg(2, 2, "multi")));
    assert!(matches!(
        refused(
            &mut t,
            Command::RenameNode {
                id: b.id,
                new_name: a.given_name.clone()
            }
        ),
        StateError::NodeNameTaken(_)
    ));
    ok(
        &mut t,
        Command::RenameNode {
            id: b.id,
            new_name: "db".into(),
        },
    );
    assert_eq!(sanitize_hostname("My_Laptop.local"), "my-laptop-local");
    assert_eq!(sanitize_hostname("---"), "node");
}

#[test]
fn apply_is_deterministic_and_snapshot_roundtrips() {
    let cmds: Vec<Command> = {
        let mut v = vec![Command::CreateUser {
            name: "u".into(),
            display_name: "U".into(),
            now: NOW,
            by_admin: true,
            profile: Default::default(),
        }];
        v.push(Command::CreatePreAuthKey {
            user: "u".into(),
            prefix: "k".into(),
            hash: key_hash("k"),
            reusable: true,
            ephemeral: false,
            expiration: None,
            tags: vec!["tag:a".into()],
            now: NOW,
        });
        for i in 0..50 {
            v.push(reg(i, i, "k"));
            v.push(Command::SetOnline {
                node_id: u64::from(i) + 1,
                online: true,
                replica: 1,
                now: NOW + 5,
            });
        }
        v
    };
    let mut a = Tailnet::default();
    let mut b = Tailnet::default();
    for c in &cmds {
        let _ = a.apply(c);
        let _ = b.apply(c);
    }
    assert_eq!(
        serde_json::to_string(&a).expect("json"),
        serde_json::to_string(&b).expect("json")
    );
    let store = StateStore::new();
    use hydrascale_raft::Application;
    for (i, c) in cmds.iter().enumerate() {
        store
            .apply(i as u64 + 1, &serde_json::to_vec(c).expect("json"))
            .expect("applies");
    }
    assert_eq!(*store.read(), a);
    let snap = store.snapshot();
    let other = StateStore::new();
    other.restore(&snap).expect("restores");
    assert_eq!(*other.read(), a);
}

#[test]
fn online_follows_the_replica_holding_the_stream() {
    let mut t = setup();
    let id = node(ok(&mut t, reg(1, 1, "multi"))).id;
    let online = |t: &mut Tailnet, online: bool, replica: u64| {
        t.apply(&Command::SetOnline {
            node_id: id,
            online,
            replica,
            now: NOW,
        })
    };
    online(&mut t, true, 2).0.expect("online via 2");
    // The node moved to replica 3 before replica 2's stream ended: 2's "offline" is stale.
    online(&mut t, true, 3).0.expect("online via 3");
    let (_, changes) = online(&mut t, false, 2);
    assert!(changes.is_empty());
    assert!(t.nodes[&id].online);
    // Replica 2 dying changes nothing either; replica 3 dying takes the node offline.
    let (_, changes) = t.apply(&Command::ReplicaDown {
        replica: 2,
        now: NOW,
    });
    assert!(changes.is_empty() && t.nodes[&id].online);
    let (_, changes) = t.apply(&Command::ReplicaDown {
        replica: 3,
        now: NOW,
    });
    assert_eq!(changes, vec![Change::NodeUpserted(id)]);
    assert!(!t.nodes[&id].online && t.nodes[&id].online_via.is_none());
}

#[test]
fn first_control_key_wins_and_replicas_register() {
    let mut t = Tailnet::default();
    ok(
        &mut t,
        Command::SetControlKey {
            key: "privkey:aa".into(),
        },
    );
    ok(
        &mut t,
        Command::SetControlKey {
            key: "privkey:bb".into(),
        },
    );
    assert_eq!(
        t.control_key.as_ref().map(|k| k.expose()),
        Some("privkey:aa")
    );
    assert!(
        !format!("{t:?}").contains("privkey:aa"),
        "Debug shows the key"
    );
    let r = Replica {
        id: 2,
        admin_addr: "127.0.0.1:1".into(),
        derp_host: "r2.example.com".into(),
        derp_ipv4: None,
        derp_port: 443,
        stun_port: 3478,
        mesh_url: "http://10.0.0.2:8080/derp".into(),
        derp_key: "ab".repeat(32),
        command_level: super::COMMAND_LEVEL,
    };
    let reg = Command::RegisterReplica { replica: r.clone() };
    assert_eq!(t.apply(&reg).1, vec![Change::ReplicasChanged]);
    // Announcing the same thing again is not a change (replicas re-announce periodically).
    assert!(t.apply(&reg).1.is_empty());
    assert_eq!(
        t.apply(&Command::ForgetReplica { id: 2 }).1,
        vec![Change::ReplicasChanged]
    );
    assert!(t.replicas.is_empty());
}

#[test]
fn restore_seeds_only_a_new_cluster_and_keeps_its_replicas() {
    let mut old = setup();
    ok(&mut old, reg(1, 1, "multi"));
    ok(
        &mut old,
        Command::SetControlKey {
            key: "privkey:aa".into(),
        },
    );
    let id = *old.nodes.keys().next().expect("node");
    ok(
        &mut old,
        Command::SetOnline {
            node_id: id,
            online: true,
            replica: 1,
            now: NOW,
        },
    );
    let backup = serde_json::to_string(&old).expect("json");

    let mut fresh = Tailnet::default();
    let me = Replica {
        id: 7,
        admin_addr: "127.0.0.1:1".into(),
        derp_host: "r7".into(),
        derp_ipv4: None,
        derp_port: 443,
        stun_port: 3478,
        mesh_url: "http://r7/derp".into(),
        derp_key: String::new(),
        command_level: 0,
    };
    ok(&mut fresh, Command::RegisterReplica { replica: me });
    let (r, changes) = fresh.apply(&Command::Restore {
        tailnet: backup.clone(),
    });
    r.expect("restore into a new cluster");
    assert_eq!(changes, vec![Change::Reset]);
    assert_eq!(fresh.users, old.users);
    assert_eq!(fresh.preauth_keys, old.preauth_keys);
    assert_eq!(
        fresh.control_key.as_ref().map(|k| k.expose()),
        Some("privkey:aa")
    );
    assert_eq!(fresh.replicas.keys().collect::<Vec<_>>(), vec![&7]);
    let n = &fresh.nodes[&id];
    assert_eq!((n.ipv4, n.ipv6), (old.nodes[&id].ipv4, old.nodes[&id].ipv6));
    assert!(!n.online && n.online_via.is_none());
    // Counters came along: the next user does not reuse an id.
    ok(
        &mut fresh,
        Command::CreateUser {
            name: "bob".into(),
            display_name: String::new(),
            now: NOW,
            by_admin: true,
            profile: Default::default(),
        },
    );
    assert_eq!(fresh.users.len(), old.users.len() + 1);

    // Never over existing state, and never from garbage.
    assert_eq!(
        refused(&mut fresh, Command::Restore { tailnet: backup }),
        StateError::RestoreNotFresh
    );
    let mut fresh = Tailnet::default();
    assert!(matches!(
        refused(
            &mut fresh,
            Command::Restore {
                tailnet: "{\"users\":".into()
            }
        ),
        StateError::BadBackup(_)
    ));
}

#[test]
fn a_batch_applies_each_command_on_its_own() {
    let mut t = setup();
    let n = node(ok(&mut t, reg(1, 1, "multi")));
    let update = |key: String, ep: &str| Command::UpdateNode {
        node_key: key,
        disco_key: None,
        endpoints: Some(vec![ep.to_string()]),
        hostinfo: None,
        hostname: None,
        home_derp: None,
        now: NOW,
    };
    let (r, changes) = t.apply(&Command::Batch {
        commands: vec![
            update(n.node_key.clone(), "192.0.2.1:41641"),
            update(format!("nodekey:{:064x}", 99), "192.0.2.2:41641"),
            update(n.node_key.clone(), "192.0.2.3:41641"),
        ],
    });
    let CommandOutput::Batch(outs) = r.expect("a batch itself succeeds") else {
        panic!("not a batch output");
    };
    assert!(outs[0].is_ok() && outs[2].is_ok());
    assert_eq!(outs[1], Err(StateError::NodeKeyNotFound));
    assert_eq!(
        t.nodes[&n.id].endpoints,
        vec!["192.0.2.3:41641".to_string()]
    );
    assert_eq!(changes, vec![Change::NodeUpserted(n.id); 2]);
}

#[test]
fn api_keys_are_created_expired_and_deleted_by_prefix() {
    let mut t = Tailnet::default();
    let create = |prefix: &str| Command::CreateApiKey {
        prefix: prefix.into(),
        hash: key_hash(prefix),
        expiration: Some(NOW + 3_600_000),
        now: NOW,
    };
    let CommandOutput::ApiKey(k) = ok(&mut t, create("abc123")) else {
        panic!("not an API key");
    };
    assert_eq!((k.prefix.as_str(), k.created), ("abc123", NOW));
    assert_eq!(
        t.apply(&create("abc123")).0,
        Err(StateError::ApiKeyExists("abc123".into()))
    );
    let CommandOutput::ApiKey(k) = ok(
        &mut t,
        Command::ExpireApiKey {
            prefix: "abc123".into(),
            now: NOW + 10,
        },
    ) else {
        panic!("not an API key");
    };
    assert_eq!(k.expiration, Some(NOW + 10));
    // Expiring again does not move the expiry.
    ok(
        &mut t,
        Command::ExpireApiKey {
            prefix: "abc123".into(),
            now: NOW + 99,
        },
    );
    assert_eq!(t.api_keys[&k.id].expiration, Some(NOW + 10));
    ok(
        &mut t,
        Command::DeleteApiKey {
            prefix: "abc123".into(),
        },
    );
    assert!(t.api_keys.is_empty());
    assert_eq!(
        t.apply(&Command::DeleteApiKey {
            prefix: "abc123".into()
        })
        .0,
        Err(StateError::ApiKeyNotFound("abc123".into()))
    );
}

#[test]
fn idle_ephemeral_nodes_are_removed_only_if_still_idle() {
    let mut t = setup();
    let keep = node(ok(&mut t, reg(1, 1, "multi")));
    let mut eph = reg(2, 2, "multi");
    if let Command::RegisterNode { ephemeral, .. } = &mut eph {
        *ephemeral = true;
    }
    let gone = node(ok(&mut t, eph));
    let mut eph = reg(3, 3, "multi");
    if let Command::RegisterNode { ephemeral, .. } = &mut eph {
        *ephemeral = true;
    }
    let back = node(ok(&mut t, eph));
    assert!(gone.ephemeral && back.ephemeral && !keep.ephemeral);
    // `back` reconnected after the leader picked it: it stays.
    ok(
        &mut t,
        Command::SetOnline {
            node_id: back.id,
            online: true,
            replica: 1,
            now: NOW + 10,
        },
    );
    let (r, changes) = t.apply(&Command::RemoveIdleEphemeral {
        node_ids: vec![keep.id, gone.id, back.id, 99],
        cutoff: NOW + 5,
    });
    assert!(r.is_ok());
    assert_eq!(changes, vec![Change::NodeRemoved(gone.id)]);
    assert!(t.nodes.contains_key(&keep.id), "not ephemeral");
    assert!(!t.nodes.contains_key(&gone.id));
    assert!(t.nodes.contains_key(&back.id), "online again");
    // Seen after the cutoff: stays too.
    ok(
        &mut t,
        Command::SetOnline {
            node_id: back.id,
            online: false,
            replica: 1,
            now: NOW + 20,
        },
    );
    let (_, changes) = t.apply(&Command::RemoveIdleEphemeral {
        node_ids: vec![back.id],
        cutoff: NOW + 15,
    });
    assert!(changes.is_empty());
}

fn pending(auth_id: &str, machine: u32, node: u32, created: i64) -> Command {
    Command::StartLogin {
        login: PendingLogin {
            auth_id: auth_id.into(),
            machine_key: format!("mkey:{machine:064x}"),
            node_key: format!("nodekey:{node:064x}"),
            hostname: format!("Laptop {machine}"),
            hostinfo: "{}".into(),
            ephemeral: false,
            created,
            prefixes: Prefixes::default(),
            key_lifetime: None,
        },
    }
}

fn complete(auth_id: &str, user: &str, now: i64) -> Command {
    Command::CompleteLogin {
        auth_id: auth_id.into(),
        user: user.into(),
        now,
    }
}

#[test]
fn interactive_login_registers_the_waiting_machine_for_the_user() {
    let mut t = setup();
    ok(&mut t, pending("a1", 7, 7, NOW));
    assert!(matches!(
        refused(&mut t, complete("nope", "alice", NOW)),
        StateError::LoginNotFound(_)
    ));
    assert!(matches!(
        refused(&mut t, complete("a1", "mallory", NOW)),
        StateError::UserNotFound(_)
    ));
    let n = node(ok(&mut t, complete("a1", "alice", NOW + 1)));
    assert_eq!(n.user_id, t.user_by_name("alice").expect("alice").id);
    assert_eq!(n.given_name, "laptop-7");
    assert_eq!(n.auth_key_id, None);
    assert!(t.pending_logins.is_empty(), "a login completes once");
    assert!(matches!(
        refused(&mut t, complete("a1", "alice", NOW + 2)),
        StateError::LoginNotFound(_)
    ));

    // The same machine logs in again (new node key): same node, new key.
    ok(&mut t, pending("a2", 7, 8, NOW + 10));
    let again = node(ok(&mut t, complete("a2", "alice", NOW + 11)));
    assert_eq!(again.id, n.id);
    assert_eq!(again.node_key, format!("nodekey:{:064x}", 8));
    assert_eq!(again.ipv4, n.ipv4);

    // A newer login of a machine replaces its older one; old ones expire.
    ok(&mut t, pending("b1", 9, 9, NOW));
    ok(&mut t, pending("b2", 9, 10, NOW + 5));
    assert!(!t.pending_logins.contains_key("b1"));
    assert!(matches!(
        refused(&mut t, complete("b2", "alice", NOW + 5 + LOGIN_TTL_MS)),
        StateError::LoginNotFound(_)
    ));
}

#[test]
fn admin_sets_and_clears_tags() {
    let mut t = setup();
    let n = node(ok(&mut t, reg(1, 1, "multi")));
    let tagged = node(ok(
        &mut t,
        Command::SetTags {
            id: n.id,
            tags: vec!["tag:web".into(), "tag:db".into(), "tag:web".into()],
        },
    ));
    assert_eq!(
        tagged.tags,
        vec!["tag:db".to_string(), "tag:web".to_string()]
    );
    assert_eq!(
        refused(
            &mut t,
            Command::SetTags {
                id: n.id,
                tags: vec!["web".into()],
            }
        ),
        StateError::BadTag("web".into())
    );
    assert_eq!(
        refused(
            &mut t,
            Command::SetTags {
                id: 99,
                tags: vec![],
            }
        ),
        StateError::NodeNotFound(99)
    );
    let cleared = node(ok(
        &mut t,
        Command::SetTags {
            id: n.id,
            tags: vec![],
        },
    ));
    assert!(cleared.tags.is_empty());
}

#[test]
fn pending_logins_are_bounded() {
    let mut t = setup();
    for i in 0..MAX_PENDING_LOGINS as u32 {
        ok(&mut t, pending(&format!("p{i}"), 1000 + i, 1000 + i, NOW));
    }
    assert_eq!(
        refused(&mut t, pending("one-too-many", 1, 1, NOW + 1)),
        StateError::TooManyPendingLogins
    );
    // A machine asking again replaces its own login, so it is not refused.
    ok(&mut t, pending("again", 1000, 5000, NOW + 1));
    // Once the old ones expire there is room again.
    ok(&mut t, pending("later", 1, 1, NOW + LOGIN_TTL_MS + 1));
    assert_eq!(t.pending_logins.len(), 1);
}

#[test]
fn policy_is_checked_on_apply_and_a_bad_one_changes_nothing() {
    let mut t = setup();
    let good = r#"{"tagOwners": {"tag:web": ["alice@"]}, "acls": []}"#;
    ok(
        &mut t,
        Command::SetPolicy {
            text: good.into(),
            now: NOW,
        },
    );
    assert_eq!(t.policy.as_ref().map(|p| p.text.as_str()), Some(good));
    let e = refused(
        &mut t,
        Command::SetPolicy {
            text: "{\"acls\": [".into(),
            now: NOW + 1,
        },
    );
    assert!(
        matches!(&e, StateError::BadPolicy(m) if m.contains("line 1, column 11")),
        "{e}"
    );
    // Survives a snapshot: the text travels, the parsed form is rebuilt on use.
    let copy: Tailnet = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
    assert_eq!(copy, t);
    assert!(copy
        .policy
        .as_ref()
        .unwrap()
        .policy()
        .tag_owners
        .contains_key("tag:web"));
    let (_, changes) = t.apply(&Command::SetPolicy {
        text: "  ".into(),
        now: NOW + 2,
    });
    assert_eq!(changes, vec![Change::PolicyChanged]);
    assert!(t.policy.is_none());
}

#[test]
fn advertised_tags_need_an_owner_in_the_policy() {
    let mut t = setup();
    let asking = |t: &mut Tailnet, m: u32, tags: &str| {
        let mut c = reg(m, m, "multi");
        if let Command::RegisterNode { hostinfo, .. } = &mut c {
            *hostinfo = format!(r#"{{"RequestTags": {tags}}}"#);
        }
        t.apply(&c).0
    };
    // No policy: nobody owns any tag.
    assert!(matches!(
        asking(&mut t, 1, r#"["tag:web"]"#),
        Err(StateError::TagsNotPermitted { .. })
    ));
    ok(
        &mut t,
        Command::SetPolicy {
            text: r#"{"tagOwners": {"tag:web": ["alice@"], "tag:db": ["bob@"]}}"#.into(),
            now: NOW,
        },
    );
    let n = match asking(&mut t, 2, r#"["tag:web"]"#) {
        Ok(CommandOutput::Node(n)) => n,
        other => panic!("{other:?}"),
    };
    assert_eq!(n.tags, vec!["tag:web".to_string()]);
    let e = asking(&mut t, 3, r#"["tag:web", "tag:db"]"#).unwrap_err();
    assert_eq!(
        e,
        StateError::TagsNotPermitted {
            tags: vec!["tag:db".into()],
            user: "alice".into()
        }
    );
    assert!(!t.nodes.values().any(|n| n.machine_key.ends_with("3")));
}

#[test]
fn routes_are_served_when_advertised_and_approved() {
    let mut t = setup();
    let mut c = reg(1, 1, "multi");
    if let Command::RegisterNode { hostinfo, .. } = &mut c {
        *hostinfo = r#"{"RoutableIPs": ["10.1.2.0/24", "0.0.0.0/0", "::/0", "bogus"]}"#.into();
    }
    let n = node(ok(&mut t, c));
    assert_eq!(n.advertised_routes.len(), 3);
    assert!(n.served_routes().is_empty());
    assert_eq!(
        refused(
            &mut t,
            Command::ApproveRoutes {
                id: n.id,
                routes: vec!["10.1.2.0/33".into()],
            }
        ),
        StateError::BadRoute("10.1.2.0/33".into())
    );
    let n = node(ok(
        &mut t,
        Command::ApproveRoutes {
            id: n.id,
            routes: vec!["10.1.2.7/24".into(), "192.168.0.0/16".into()],
        },
    ));
    // Truncated to the prefix; approved but not advertised is kept, not served.
    assert_eq!(n.approved_routes.len(), 2);
    assert_eq!(n.served_routes(), vec!["10.1.2.0/24".parse().unwrap()]);

    // autoApprovers approve what is advertised, now and on later updates.
    ok(
        &mut t,
        Command::SetPolicy {
            text:
                r#"{"autoApprovers": {"exitNode": ["alice@"], "routes": {"10.0.0.0/8": ["bob@"]}}}"#
                    .into(),
            now: NOW,
        },
    );
    let n = t.nodes[&n.id].clone();
    assert!(n.served_routes().iter().any(is_exit_route));
    assert_eq!(n.served_routes().len(), 3);
    ok(
        &mut t,
        Command::UpdateNode {
            node_key: n.node_key.clone(),
            disco_key: None,
            endpoints: None,
            hostinfo: Some(r#"{"RoutableIPs": ["10.9.0.0/16"]}"#.into()),
            hostname: None,
            home_derp: None,
            now: NOW,
        },
    );
    // alice is no approver for 10.0.0.0/8 routes: advertised, not approved.
    let n = &t.nodes[&n.id];
    assert_eq!(n.advertised_routes, vec!["10.9.0.0/16".parse().unwrap()]);
    assert!(n.served_routes().is_empty());
}

#[test]
fn ssh_checks_are_decided_once_expire_and_approvals_end_with_the_policy() {
    let mut t = setup();
    node(ok(&mut t, reg(1, 1, "multi")));
    node(ok(&mut t, reg(2, 2, "multi")));
    let start = |id: &str, now: i64| Command::StartSshCheck {
        auth_id: id.into(),
        src: 1,
        dst: 2,
        ssh_user: "root".into(),
        now,
    };
    let decide = |id: &str, approve: bool, now: i64| Command::DecideSshCheck {
        auth_id: id.into(),
        approve,
        by: "alice".into(),
        now,
    };
    ok(&mut t, start("a", NOW));
    let (r, changes) = t.apply(&decide("a", true, NOW + 5));
    assert!(r.is_ok());
    assert_eq!(changes, vec![Change::SshCheckDecided("a".into())]);
    assert_eq!(t.ssh_approvals[&1][&2], NOW + 5);
    assert_eq!(t.ssh_checks["a"].decision, Some(true));
    // Decided already: refused, nothing changes.
    assert!(matches!(
        refused(&mut t, decide("a", false, NOW + 6)),
        StateError::SshCheckNotFound(_)
    ));
    // Expired: refused, and swept by the next start.
    ok(&mut t, start("b", NOW));
    assert!(matches!(
        refused(&mut t, decide("b", true, NOW + SSH_CHECK_TTL_MS)),
        StateError::SshCheckNotFound(_)
    ));
    ok(&mut t, start("c", NOW + SSH_CHECK_TTL_MS + 1));
    assert!(!t.ssh_checks.contains_key("b") && !t.ssh_checks.contains_key("a"));
    // Unknown nodes cannot be checked.
    let bad = Command::StartSshCheck {
        auth_id: "d".into(),
        src: 99,
        dst: 2,
        ssh_user: "root".into(),
        now: NOW,
    };
    assert!(matches!(refused(&mut t, bad), StateError::NodeNotFound(99)));
    // Snapshots carry checks and approvals.
    let copy: Tailnet = serde_json::from_slice(&serde_json::to_vec(&t).unwrap()).unwrap();
    assert_eq!(copy, t);
    // A new policy forgets approvals; deleting a node forgets its own.
    ok(
        &mut t,
        Command::SetPolicy {
            text: "{}".into(),
            now: NOW,
        },
    );
    assert!(t.ssh_approvals.is_empty());
    t.ssh_approvals.entry(1).or_default().insert(2, NOW);
    ok(&mut t, Command::DeleteNode { id: 2 });
    assert!(t.ssh_approvals[&1].is_empty());
}

/// The node index (keys, names, free addresses) answers what a scan of the nodes would,
/// through registrations, key rotation, renames, deletions, address reuse and a restore.
#[test]
fn node_index_answers_what_a_scan_would() {
    fn check(t: &Tailnet) {
        for n in t.nodes.values() {
            let first = |f: &dyn Fn(&Node) -> bool| t.nodes.values().find(|o| f(o)).map(|o| o.id);
            assert_eq!(
                t.node_by_node_key(&n.node_key).map(|o| o.id),
                first(&|o| o.node_key == n.node_key)
            );
            assert_eq!(
                t.node_by_machine_key(&n.machine_key).map(|o| o.id),
                first(&|o| o.machine_key == n.machine_key)
            );
        }
        assert!(t.node_by_node_key("nodekey:none").is_none());
    }
    let mut t = setup();
    let mut ids = Vec::new();
    for i in 1..=20 {
        ids.push(node(ok(&mut t, reg(i, i, "multi"))).id);
        check(&t);
    }
    // Node 3 frees its addresses; the next node gets them, as the lowest free ones.
    let third = t.nodes[&ids[2]].clone();
    ok(&mut t, Command::DeleteNode { id: ids[2] });
    check(&t);
    let n = node(ok(&mut t, reg(21, 21, "multi")));
    assert_eq!((n.ipv4, n.ipv6), (third.ipv4, third.ipv6));
    let n = node(ok(&mut t, reg(22, 22, "multi")));
    assert_eq!(u32::from(n.ipv4), u32::from(t.nodes[&ids[19]].ipv4) + 1);
    // A machine registering again with a new node key: the old key finds nothing.
    let mut again = reg(5, 500, "multi");
    if let Command::RegisterNode { hostname, .. } = &mut again {
        *hostname = "Host 6".into();
    }
    let moved = node(ok(&mut t, again));
    assert_eq!(moved.id, ids[4]);
    assert_eq!(moved.given_name, "host-6-1");
    assert!(t.node_by_node_key(&format!("nodekey:{:064x}", 5)).is_none());
    check(&t);
    // Its old name is free again; the name it took is not.
    ok(
        &mut t,
        Command::RenameNode {
            id: ids[0],
            new_name: "host-5".into(),
        },
    );
    let n = node(ok(&mut t, reg(23, 23, "multi")));
    assert_eq!(n.given_name, "host-23");
    let mut named = reg(24, 24, "multi");
    if let Command::RegisterNode { hostname, .. } = &mut named {
        *hostname = "Host 6".into();
    }
    assert_eq!(node(ok(&mut t, named)).given_name, "host-6-2");
    check(&t);
    // Commands touching no indexed field keep the index, which stays right.
    for cmd in [
        Command::ExpireNode { id: ids[1], now: 9 },
        Command::ApproveRoutes {
            id: ids[1],
            routes: vec![],
        },
        Command::SetPolicy {
            text: String::new(),
            now: 9,
        },
        Command::CreateUser {
            name: "carol".into(),
            display_name: String::new(),
            now: 9,
            by_admin: true,
            profile: Default::default(),
        },
    ] {
        ok(&mut t, cmd);
        check(&t);
    }
    let n = node(ok(&mut t, reg(25, 25, "multi")));
    assert_eq!(t.node_by_node_key(&n.node_key).map(|o| o.id), Some(n.id));
    check(&t);
    // A copy (as a snapshot or a restore makes) builds its own index from the nodes.
    let copy: Tailnet = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
    assert_eq!(copy, t);
    check(&copy);
}

/// headscale 0.29's shapes: a pre-auth key deleted by id (its nodes stay), a node's key
/// expiry set, disabled and set again, a waiting login turned away.
#[test]
fn keys_deleted_by_id_node_expiry_set_and_logins_rejected() {
    let mut t = setup();
    let n = node(ok(&mut t, reg(1, 1, "multi")));
    let key_id = n.auth_key_id.expect("registered with a key");
    ok(&mut t, Command::DeletePreAuthKey { id: key_id });
    assert!(!t.preauth_keys.contains_key(&key_id));
    assert!(t.nodes.contains_key(&n.id), "the key's node stays");
    assert_eq!(
        refused(&mut t, Command::DeletePreAuthKey { id: key_id }),
        StateError::PreAuthKeyIdNotFound(key_id)
    );
    assert_eq!(
        refused(&mut t, reg(2, 2, "multi")),
        StateError::AuthKeyUnknown
    );

    let later = NOW + 86_400_000;
    let set = |expiry| Command::SetNodeExpiry { id: n.id, expiry };
    assert_eq!(node(ok(&mut t, set(Some(later)))).expiry, Some(later));
    assert_eq!(node(ok(&mut t, set(None))).expiry, None);
    assert_eq!(node(ok(&mut t, set(Some(NOW)))).expiry, Some(NOW));
    assert_eq!(
        refused(
            &mut t,
            Command::SetNodeExpiry {
                id: 999,
                expiry: None
            }
        ),
        StateError::NodeNotFound(999)
    );

    ok(&mut t, pending("turned-away", 3, 3, NOW));
    ok(
        &mut t,
        Command::RejectLogin {
            auth_id: "turned-away".into(),
        },
    );
    assert!(t.pending_logins.is_empty());
    assert_eq!(
        refused(&mut t, complete("turned-away", "alice", NOW)),
        StateError::LoginNotFound("turned-away".into())
    );
    for c in [
        Command::DeletePreAuthKey { id: 1 },
        set(None),
        Command::RejectLogin {
            auth_id: "x".into(),
        },
    ] {
        assert_eq!(c.level(), 3, "{c:?}");
    }
}

/// The DNS settings: a seed is taken only while none are set, a replacement is checked
/// (a refused one changes nothing), and only a real change is announced to the streams.
#[test]
fn dns_settings_are_seeded_once_and_replaced_checked() {
    let mut t = setup();
    let first = crate::state::DnsSettings {
        nameservers: vec!["1.1.1.1".into()],
        ..Default::default()
    };
    let seed = |s: &crate::state::DnsSettings| Command::SetDns {
        settings: s.clone(),
        seed: true,
    };
    assert_eq!(t.apply(&seed(&first)).1, vec![Change::DnsChanged]);
    let other = crate::state::DnsSettings {
        magic_dns: false,
        ..Default::default()
    };
    assert!(
        t.apply(&seed(&other)).1.is_empty(),
        "a second seed changes nothing"
    );
    assert_eq!(t.dns.as_ref(), Some(&first));
    let set = |s: &crate::state::DnsSettings| Command::SetDns {
        settings: s.clone(),
        seed: false,
    };
    assert_eq!(t.apply(&set(&other)).1, vec![Change::DnsChanged]);
    assert!(
        t.apply(&set(&other)).1.is_empty(),
        "the same settings again"
    );
    let bad = crate::state::DnsSettings {
        nameservers: vec!["dns.example".into()],
        ..Default::default()
    };
    assert!(matches!(
        refused(&mut t, set(&bad)),
        StateError::BadDns { .. }
    ));
    assert_eq!(t.dns.as_ref(), Some(&other));
}

/// A user's profile is checked when an administrator gives it and refreshed (never
/// emptied) by each OIDC login; a node records how it logged in.
#[test]
fn profiles_and_register_methods() {
    let mut t = setup();
    let profile = |email: &str, picture_url: &str| crate::state::Profile {
        email: email.into(),
        picture_url: picture_url.into(),
    };
    let create = |name: &str, p: crate::state::Profile| Command::CreateUser {
        name: name.into(),
        display_name: String::new(),
        now: NOW,
        by_admin: true,
        profile: p,
    };
    let bad = refused(&mut t, create("eve", profile("not-an-address", "")));
    assert!(matches!(bad, StateError::BadProfile(_)), "{bad:?}");
    let bad = refused(&mut t, create("eve", profile("", "file:///etc/passwd")));
    assert!(matches!(bad, StateError::BadProfile(_)), "{bad:?}");
    assert!(t.user_by_name("eve").is_none());
    assert_eq!(create("eve", profile("eve@example.com", "")).level(), 3);
    assert_eq!(create("eve", profile("", "")).level(), 2);

    let n = node(ok(&mut t, reg(1, 1, "multi")));
    assert_eq!(n.register_method, crate::state::RegisterMethod::AuthKey);
    ok(&mut t, pending("by-admin", 2, 2, NOW));
    let n = node(ok(&mut t, complete("by-admin", "alice", NOW)));
    assert_eq!(n.register_method, crate::state::RegisterMethod::Cli);

    ok(&mut t, pending("o1", 3, 3, NOW));
    let mut login = oidc_login("o1", "sub-1", "olga");
    if let Command::OidcLogin { profile: p, .. } = &mut login {
        *p = profile("olga@example.com", "https://example.com/o.png");
    }
    let n = node(ok(&mut t, login));
    assert_eq!(n.register_method, crate::state::RegisterMethod::Oidc);
    let u = t.users[&n.user_id].clone();
    assert_eq!(
        u.profile,
        profile("olga@example.com", "https://example.com/o.png")
    );
    // The next login carries a new address and no picture: the picture stays.
    ok(&mut t, pending("o2", 4, 4, NOW));
    let mut again = oidc_login("o2", "sub-1", "olga");
    if let Command::OidcLogin { profile: p, .. } = &mut again {
        *p = profile("olga@new.example", "");
    }
    let (_, changes) = t.apply(&again);
    assert!(changes.contains(&Change::UserChanged(u.id)), "{changes:?}");
    assert_eq!(
        t.users[&u.id].profile,
        profile("olga@new.example", "https://example.com/o.png")
    );
}
