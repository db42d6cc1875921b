//! Three `hydrascale serve` processes behind the shipped HAProxy config, with official
//! clients logging in through the load-balanced URL: losing the leader, losing the
//! replica a client streams from, losing the majority, and restarting.

use std::time::{Duration, Instant};

use crate::fixtures::{
    create_user_retrying, http_get, leader_of, require_tailscale, user_names,
    user_with_reusable_key, wait_for, Haproxy, ReplicaProc, Tailscaled,
};

/// Starts replicas 1-3 as one new cluster whose clients log in at `server_url`, Raft over
/// mutual TLS with certificates from `hydrascale cluster certs` in `root/certs`; returns
/// once every replica is ready.
pub async fn start_cluster(root: &std::path::Path, server_url: &str) -> Vec<ReplicaProc> {
    let certs = root.join("certs");
    crate::fixtures::make_certs(&certs, &[1, 2, 3]);
    let mut replicas: Vec<ReplicaProc> = (1..=3)
        .map(|id| {
            let mut r = ReplicaProc::new(root, id);
            r.tls_dir = Some(certs.clone());
            r
        })
        .collect();
    crate::fixtures::start_as_cluster(&mut replicas, server_url).await;
    replicas
}

/// Two clients on different replicas, direct paths forbidden by the client's own debug
/// switch: packets go client -> relay of replica 1 -> mesh -> relay of replica 2 -> client
/// (each replica lists its own relay first in the DERP map it serves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_different_replicas_relay_through_the_derp_mesh() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let lb_url = format!("http://127.0.0.1:{}", crate::fixtures::free_port());
    let replicas = start_cluster(dir.path(), &lb_url).await;
    let key = user_with_reusable_key(&replicas[0], "bob");
    let root = dir.path().join("clients");
    let derp_only = [("TS_DEBUG_ALWAYS_USE_DERP", "1")];
    let a = Tailscaled::start_with_env(&bin, &root, "relay-a", &derp_only);
    let b = Tailscaled::start_with_env(&bin, &root, "relay-b", &derp_only);
    a.up(&format!("http://{}", replicas[0].control), &key).await;
    b.up(&format!("http://{}", replicas[1].control), &key).await;
    wait_for("relay-a to see relay-b", Duration::from_secs(30), || {
        let ok = a.peer_names() == ["relay-b"];
        async move { ok.then_some(()) }
    })
    .await;
    let target = b.ipv4();
    let text = wait_for("a ping through DERP", Duration::from_secs(60), || {
        let out = a.cli(&[
            "ping",
            "--until-direct=false",
            "--c",
            "3",
            "--timeout",
            "5s",
            &target,
        ]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let ok = text.contains("via DERP(hydrascale)");
        async move { ok.then_some(text) }
    })
    .await;
    assert!(
        !text.contains("via 127.0.0.1"),
        "a direct path was used although DERP was forced: {text}"
    );
    eprintln!(
        "relay-a -> relay-b: {}",
        text.lines().last().unwrap_or_default()
    );

    // netcheck runs STUN against the DERP map the node got from its replica.
    let out = a.cli(&["netcheck", "--format=json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "netcheck printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(report["UDP"], true, "STUN answered: {report}");
    assert_eq!(report["PreferredDERP"], 900, "{report}");
    let latency = report["RegionLatency"]["900"]
        .as_u64()
        .unwrap_or_else(|| panic!("no latency for region 900: {report}"));
    assert!(latency > 0, "{report}");
    eprintln!("netcheck: region 900 latency {latency} ns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_behind_haproxy_survive_losing_replicas() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // The load balancer's address must be known before the replicas' configs are written.
    let lb_addr = format!("127.0.0.1:{}", crate::fixtures::free_port());
    let lb_url = format!("http://{lb_addr}");
    let mut replicas = start_cluster(dir.path(), &lb_url).await;

    // One control key for the whole cluster: /key answers the same everywhere.
    let keys: Vec<String> = replicas
        .iter()
        .map(|r| http_get(&r.control, "/key?v=100").expect("/key").1)
        .collect();
    assert!(keys[0].contains("mkey:"), "{}", keys[0]);
    assert!(keys.iter().all(|k| *k == keys[0]), "keys differ: {keys:?}");

    // Every replica's relay is in the DERP map, the serving replica's first.
    wait_for(
        "all replicas in the DERP map",
        Duration::from_secs(30),
        || {
            let ok = replicas.iter().all(|r| {
                let Some((200, body)) = http_get(&r.control, "/derpmap/default") else {
                    return false;
                };
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let nodes = v["Regions"]["900"]["Nodes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let port: Option<u64> =
                    r.control.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
                nodes.len() == 3 && nodes[0]["DERPPort"].as_u64() == port
            });
            async move { ok.then_some(()) }
        },
    )
    .await;

    let lb = Haproxy::start(dir.path(), &lb_addr, &replicas.iter().collect::<Vec<_>>());
    wait_for("load balancer up", Duration::from_secs(30), || {
        let ok = http_get(&lb.addr, "/ready").is_some_and(|(c, _)| c == 200);
        async move { ok.then_some(()) }
    })
    .await;

    // Writes work on any replica (followers forward to the leader).
    let key = user_with_reusable_key(&replicas[1], "alice");

    let root = dir.path().join("clients");
    let nodes: Vec<Tailscaled> = ["n1", "n2"]
        .iter()
        .map(|n| Tailscaled::start(&bin, &root, n))
        .collect();
    for n in &nodes {
        n.up(&lb_url, &key).await;
    }
    for (a, b) in [(0, 1), (1, 0)] {
        let want = vec![(nodes[b].name.clone(), true)];
        wait_for(
            &format!("{} to see {} online", nodes[a].name, nodes[b].name),
            Duration::from_secs(30),
            || {
                let ok = nodes[a].peers_online() == want;
                async move { ok.then_some(()) }
            },
        )
        .await;
    }

    // Kill -9 the leader in the middle of a burst of writes sent to a follower.
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        let l = leader_of(&replicas);
        async move { l }
    })
    .await;
    let li = replicas
        .iter()
        .position(|r| r.id == leader)
        .expect("leader");
    let fi = (li + 1) % 3;
    let mut acked = Vec::new();
    let mut killed_at = None;
    let mut first_ack_after_kill = None;
    for i in 0..30 {
        if i == 5 {
            replicas[li].kill();
            killed_at = Some(Instant::now());
        }
        // Like a real client, retry a refused write (no leader during the election).
        let name = format!("burst{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = replicas[fi].cli(&["users", "create", &name]);
            if out.status.success() {
                acked.push(name);
                if let (Some(k), None) = (killed_at, first_ack_after_kill) {
                    first_ack_after_kill = Some(k.elapsed());
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let failover = first_ack_after_kill.expect("writes succeed again after the leader died");
    eprintln!(
        "leader {leader} killed: next acknowledged write after {:?}; {} of 30 writes acknowledged within 30 s each",
        failover,
        acked.len()
    );
    let new_leader = wait_for("a new leader", Duration::from_secs(30), || {
        let l = leader_of(&replicas).filter(|l| *l != leader);
        async move { l }
    })
    .await;
    let users = user_names(&replicas[fi]);
    for name in &acked {
        assert!(users.contains(name), "acknowledged {name} lost: {users:?}");
    }

    // Whichever client streamed from the dead replica reconnects through the load
    // balancer: a node registered now reaches both, and every node is online again.
    let killed_at = killed_at.expect("killed");
    let n3 = Tailscaled::start(&bin, &root, "n3");
    n3.up(&lb_url, &key).await;
    for n in nodes.iter().chain(std::iter::once(&n3)) {
        let want: Vec<(String, bool)> = ["n1", "n2", "n3"]
            .iter()
            .filter(|x| **x != n.name)
            .map(|x| (x.to_string(), true))
            .collect();
        wait_for(
            &format!("{} to see the others online", n.name),
            Duration::from_secs(60),
            || {
                let ok = n.peers_online() == want;
                async move { ok.then_some(()) }
            },
        )
        .await;
    }
    eprintln!(
        "after the leader kill every client had a fresh map with all peers online {:?} later",
        killed_at.elapsed()
    );
    let target = nodes[1].ipv4();
    let out = nodes[0].cli(&["ping", "--c", "10", "--timeout", "5s", &target]);
    assert!(
        out.status.success(),
        "n1 -> n2 after failover: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The old leader comes back and catches up.
    replicas[li].start();
    replicas[li].wait_ready().await;
    wait_for("old leader caught up", Duration::from_secs(30), || {
        let users = user_names(&replicas[li]);
        let ok = acked.iter().all(|a| users.contains(a));
        async move { ok.then_some(()) }
    })
    .await;

    // Lose the majority: the last replica standing refuses writes with a clear error and
    // stops serving clients (its /ready turns 503, so the load balancer drops it).
    let survivor = replicas
        .iter()
        .position(|r| r.id == new_leader)
        .expect("new leader");
    let lost_at = Instant::now();
    for (i, r) in replicas.iter_mut().enumerate() {
        if i != survivor {
            r.kill();
        }
    }
    wait_for("minority stops serving", Duration::from_secs(30), || {
        let ok = http_get(&replicas[survivor].control, "/ready").is_some_and(|(c, _)| c == 503);
        async move { ok.then_some(()) }
    })
    .await;
    eprintln!(
        "majority lost: the survivor stopped serving clients {:?} later",
        lost_at.elapsed()
    );
    let out = replicas[survivor].cli(&["users", "create", "minority"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a minority accepted a write");
    assert!(err.contains("majority"), "unclear error: {err}");

    // Everything comes back, with every acknowledged write.
    for (i, r) in replicas.iter_mut().enumerate() {
        if i != survivor {
            r.start();
        }
    }
    for r in &replicas {
        r.wait_ready().await;
    }
    let users = user_names(&replicas[0]);
    for name in &acked {
        assert!(users.contains(name), "{name} lost after restarts");
    }
    assert!(!users.contains(&"minority".to_string()));
    let out = nodes[1].cli(&["ping", "--c", "10", "--timeout", "5s", &nodes[0].ipv4()]);
    assert!(
        out.status.success(),
        "n2 -> n1 after restarts: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Rolling restart, one replica at a time (SIGTERM, as an upgrade would), with a write
    // through another replica while each is down: nothing is lost, clients stay up.
    let mut rolling = Vec::new();
    for i in 0..replicas.len() {
        replicas[i].stop();
        let other = (i + 1) % replicas.len();
        let name = format!("rolling{i}");
        create_user_retrying(&replicas[other], &name, Duration::from_secs(30)).await;
        rolling.push(name);
        replicas[i].start();
        replicas[i].wait_ready().await;
    }
    for r in &replicas {
        wait_for(
            &format!("replica {} holds every write", r.id),
            Duration::from_secs(30),
            || {
                let users = user_names(r);
                let ok = acked.iter().chain(&rolling).all(|a| users.contains(a));
                async move { ok.then_some(()) }
            },
        )
        .await;
    }
    let out = nodes[0].cli(&["ping", "--c", "10", "--timeout", "5s", &nodes[1].ipv4()]);
    assert!(
        out.status.success(),
        "n1 -> n2 after the rolling restart: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Backup, then restore into a brand-new cluster: same nodes, same addresses, same
    // control key (so the clients' view of the server does not change).
    let backup = dir.path().join("tailnet.backup");
    let b = replicas[0].cli_json(&["cluster", "backup", "--out", backup.to_str().expect("path")]);
    assert_eq!(b["nodes"].as_u64(), Some(3), "{b}");
    let node_view = |r: &ReplicaProc| -> Vec<(String, String, String, String)> {
        let mut v: Vec<(String, String, String, String)> = r
            .cli_json(&["nodes", "list"])
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|n| {
                        let f = |k: &str| n[k].as_str().unwrap_or_default().to_string();
                        (f("given_name"), f("ipv4"), f("ipv6"), f("node_key"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let before = node_view(&replicas[0]);
    let mut fresh = ReplicaProc::new(&dir.path().join("restored"), 1);
    fresh.write_config(&lb_url, "", false);
    fresh.start_with(&[
        "--set",
        &format!("cluster.restore_from={}", backup.display()),
    ]);
    fresh.wait_ready().await;
    assert_eq!(node_view(&fresh), before);
    let users = user_names(&fresh);
    for name in acked.iter().chain(&rolling) {
        assert!(
            users.contains(name),
            "{name} missing from the restored cluster"
        );
    }
    assert_eq!(
        http_get(&fresh.control, "/key?v=100").expect("/key").1,
        keys[0],
        "the restored cluster serves the old control key"
    );
    // Restoring over state is refused: the file is ignored once the cluster has state.
    fresh.stop();
    fresh.start_with(&[
        "--set",
        &format!("cluster.restore_from={}", backup.display()),
    ]);
    fresh.wait_ready().await;
    assert_eq!(node_view(&fresh), before);

    drop(n3);
    drop(nodes);
    drop(lb);
}

fn members(r: &ReplicaProc) -> Vec<(u64, bool)> {
    let st = r.cli_json(&["cluster", "status"]);
    let mut v: Vec<(u64, bool)> = st["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| Some((m["id"].as_u64()?, m["voter"].as_bool().unwrap_or(false))))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Replacing a replica: a fourth joins as a learner, is promoted, an original one is
/// removed; the new voter then carries a quorum on its own with one old replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_replica_with_learner_promote_and_remove() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{}", crate::fixtures::free_port());
    let mut replicas = start_cluster(dir.path(), &url).await;
    replicas[0].cli_json(&["users", "create", "before-join"]);
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        let l = leader_of(&replicas);
        async move { l }
    })
    .await;
    let li = replicas
        .iter()
        .position(|r| r.id == leader)
        .expect("leader");
    let (fa, fb) = ((li + 1) % 3, (li + 2) % 3);

    // A certificate for the new replica from the same CA.
    let certs = dir.path().join("certs");
    crate::fixtures::make_certs(&certs, &[4]);
    let mut r4 = ReplicaProc::new(dir.path(), 4);
    r4.tls_dir = Some(certs);
    r4.write_config(&url, "", true);
    r4.start();

    // Membership changes go to the leader; a follower says where it is.
    let out = replicas[fa].cli(&[
        "cluster",
        "add-learner",
        "--id",
        "4",
        "--raft-addr",
        &r4.raft,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&replicas[li].admin), "unhelpful: {err}");

    let out = replicas[li].cli(&[
        "cluster",
        "add-learner",
        "--id",
        "4",
        "--raft-addr",
        &r4.raft,
    ]);
    assert!(
        out.status.success(),
        "add-learner: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    r4.wait_ready().await;
    assert!(user_names(&r4).contains(&"before-join".to_string()));
    // A backup can be taken on a follower.
    let backup = dir.path().join("from-follower.backup");
    let b = replicas[fa].cli_json(&["cluster", "backup", "--out", backup.to_str().expect("path")]);
    assert!(b["users"].as_u64() >= Some(1), "{b}");
    assert_eq!(
        members(&replicas[li]),
        vec![(1, true), (2, true), (3, true), (4, false)]
    );

    // The leader reports each member's replication lag; all catch up to zero.
    wait_for(
        "every member caught up (lag 0)",
        Duration::from_secs(30),
        || {
            let st = replicas[li].cli_json(&["cluster", "status"]);
            let last = st["last_log_index"].as_u64();
            let ok = last.is_some()
                && st["members"].as_array().is_some_and(|m| {
                    m.len() == 4 && m.iter().all(|m| m["matched_index"].as_u64() == last)
                });
            async move { ok.then_some(()) }
        },
    )
    .await;
    // A learner cannot lead.
    let out = replicas[li].cli(&["cluster", "transfer-leader", "--to", "4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("promote"), "{err}");
    let out = replicas[li].cli(&["cluster", "promote", "--id", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = replicas[fa].id;
    let out = replicas[li].cli(&["cluster", "remove", "--id", &gone.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    replicas[fa].stop();
    let mut want: Vec<(u64, bool)> = [replicas[li].id, replicas[fb].id, 4]
        .iter()
        .map(|id| (*id, true))
        .collect();
    want.sort();
    assert_eq!(members(&replicas[li]), want);

    // Its relay leaves the DERP map every replica serves.
    wait_for(
        "removed replica leaves the DERP map",
        Duration::from_secs(30),
        || {
            let ok = http_get(&r4.control, "/derpmap/default").is_some_and(|(c, body)| {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                c == 200 && v["Regions"]["900"]["Nodes"].as_array().map(Vec::len) == Some(3)
            });
            async move { ok.then_some(()) }
        },
    )
    .await;

    // Hand leadership to the new replica while a write arrives at the other follower:
    // the write waits for the handover and lands.
    let (fb_admin, fb_id) = (replicas[fb].admin_target(), replicas[fb].id);
    let during = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let out = crate::fixtures::cli_at(&fb_admin, &["users", "create", "during-handover"]);
        (out, started.elapsed())
    });
    let t = Instant::now();
    let moved = replicas[li].cli_json(&["cluster", "transfer-leader", "--to", "4"]);
    let took = t.elapsed();
    assert_eq!(moved["leader"].as_u64(), Some(4), "{moved}");
    let (out, write_took) = during.join().expect("writer thread");
    assert!(
        out.status.success(),
        "write through replica {fb_id} during the handover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "transfer-leader took {took:?} (writes paused {} ms); a write during it took {write_took:?}",
        moved["paused_ms"]
    );
    for r in [&replicas[li], &replicas[fb], &r4] {
        let st = r.cli_json(&["cluster", "status"]);
        assert_eq!(st["leader"].as_u64(), Some(4), "replica {}: {st}", r.id);
    }
    // Writes through the new replica are forwarded and replicated.
    r4.cli_json(&["users", "create", "after-replace"]);
    // Kill the old leader: the new voter and the remaining original are a majority.
    replicas[li].kill();
    // With the new voter in the majority, writes go on.
    create_user_retrying(&r4, "new-majority", Duration::from_secs(30)).await;
    wait_for(
        "every write on the remaining original",
        Duration::from_secs(30),
        || {
            let users = user_names(&replicas[fb]);
            let ok = [
                "before-join",
                "during-handover",
                "after-replace",
                "new-majority",
            ]
            .iter()
            .all(|u| users.contains(&u.to_string()));
            async move { ok.then_some(()) }
        },
    )
    .await;
}

/// The CLI way to build and rebuild clusters, on replicas started with `cluster.join`:
/// `init` a new one, `join` a replica as a voter, `transfer-leader`, and `restore` a
/// backup into a new two-replica cluster; a bad backup leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_join_transfer_and_restore_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{}", crate::fixtures::free_port());
    let waiting = |root: &std::path::Path, id: u64| {
        let mut r = ReplicaProc::new(root, id);
        r.write_config(&url, "", true);
        r.start();
        r
    };
    let r1 = waiting(dir.path(), 1);
    r1.wait_admin().await;
    let init = r1.cli_json(&["cluster", "init"]);
    let key = init["control_key"]
        .as_str()
        .expect("control key")
        .to_string();
    assert!(key.starts_with("mkey:"), "{init}");
    r1.wait_ready().await;
    r1.cli_json(&["users", "create", "alice"]);
    let out = r1.cli(&["cluster", "init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already belongs"),
        "{err}"
    );

    let r2 = waiting(dir.path(), 2);
    let out = r1.cli(&["cluster", "join", "--id", "2", "--raft-addr", &r2.raft]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    r2.wait_ready().await;
    assert_eq!(members(&r1), vec![(1, true), (2, true)]);
    assert!(user_names(&r2).contains(&"alice".to_string()));
    let moved = r1.cli_json(&["cluster", "transfer-leader"]);
    assert_eq!(moved["leader"].as_u64(), Some(2), "{moved}");
    assert_eq!(leader_of([&r1, &r2]), Some(2));
    // Through the old leader, now a follower.
    r1.cli_json(&["users", "create", "bob"]);

    let backup = dir.path().join("two.backup");
    r1.cli_json(&["cluster", "backup", "--out", backup.to_str().expect("path")]);
    let old_key = http_get(&r1.control, "/key?v=100").expect("/key").1;

    // A file that is not a backup is refused before anything is created.
    let root = dir.path().join("restored");
    let n1 = waiting(&root, 1);
    let n2 = waiting(&root, 2);
    n1.wait_admin().await;
    n2.wait_admin().await;
    let junk = dir.path().join("junk.backup");
    std::fs::write(&junk, b"{\"format\": 1}").expect("junk");
    let out = n1.cli(&["cluster", "restore", "--from", junk.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a Hydrascale backup"),
        "{err}"
    );

    let peers = format!("2={}", n2.raft);
    let restored = n1.cli_json(&[
        "cluster",
        "restore",
        "--from",
        backup.to_str().expect("path"),
        "--peers",
        &peers,
    ]);
    assert_eq!(restored["users"].as_u64(), Some(2), "{restored}");
    n1.wait_ready().await;
    n2.wait_ready().await;
    assert_eq!(members(&n1), vec![(1, true), (2, true)]);
    for r in [&n1, &n2] {
        let users = user_names(r);
        assert!(
            users.contains(&"alice".to_string()) && users.contains(&"bob".to_string()),
            "replica {}: {users:?}",
            r.id
        );
        assert_eq!(
            http_get(&r.control, "/key?v=100").expect("/key").1,
            old_key,
            "the restored cluster serves the old control key"
        );
    }
}

/// `hydrascale cluster recover` on the last replica of a cluster that lost two of three
/// for good: refused while that replica runs, then, once it is stopped, its committed
/// state becomes a backup that a new cluster restores with the same users, keys and
/// control key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_a_cluster_that_lost_its_majority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{}", crate::fixtures::free_port());
    let mut replicas = start_cluster(dir.path(), &url).await;
    user_with_reusable_key(&replicas[0], "alice");
    create_user_retrying(&replicas[1], "bob", Duration::from_secs(10)).await;
    wait_for(
        "replica 3 applied both users",
        Duration::from_secs(20),
        || {
            let users = user_names(&replicas[2]);
            let ok = users.contains(&"alice".to_string()) && users.contains(&"bob".to_string());
            async move { ok.then_some(()) }
        },
    )
    .await;
    let old_key = http_get(&replicas[2].control, "/key?v=100")
        .expect("/key")
        .1;
    replicas[0].kill();
    replicas[1].kill();

    let config = replicas[2].dir.join("hydrascale.toml");
    let backup = dir.path().join("survivor.backup");
    let recover = || {
        crate::fixtures::hydrascale_command()
            .arg("--config")
            .arg(&config)
            .args(["-o", "json", "cluster", "recover", "--out"])
            .arg(&backup)
            .output()
            .expect("hydrascale cluster recover")
    };
    let out = recover();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another hydrascale process"),
        "recover against a running replica: {err}"
    );
    assert!(!backup.exists());
    replicas[2].stop();
    let out = recover();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(summary["users"].as_u64(), Some(2), "{summary}");
    assert_eq!(summary["preauth_keys"].as_u64(), Some(1), "{summary}");
    assert_eq!(summary["voters"].as_object().map(|v| v.len()), Some(3));
    assert!(summary["committed_index"].as_u64().unwrap_or(0) > 0);

    let mut fresh = ReplicaProc::new(&dir.path().join("new"), 1);
    fresh.write_config(&url, "", true);
    fresh.start();
    fresh.wait_admin().await;
    let restored = fresh.cli_json(&[
        "cluster",
        "restore",
        "--from",
        backup.to_str().expect("path"),
    ]);
    assert_eq!(restored["users"].as_u64(), Some(2), "{restored}");
    fresh.wait_ready().await;
    let users = user_names(&fresh);
    assert!(
        users.contains(&"alice".to_string()) && users.contains(&"bob".to_string()),
        "{users:?}"
    );
    let keys = fresh.cli_json(&["preauthkeys", "list", "--user", "alice"]);
    assert_eq!(keys.as_array().map(Vec::len), Some(1), "{keys}");
    assert_eq!(
        http_get(&fresh.control, "/key?v=100").expect("/key").1,
        old_key,
        "the new cluster serves the old control key"
    );
    // The new cluster takes writes.
    fresh.cli_json(&["users", "create", "carol"]);
}

/// During an election (the leader killed with `kill -9`), a write sent to a follower
/// fails with what is going on and what to do, "no leader yet ... retry", not with advice
/// about certificates, and succeeds once a new leader is elected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_an_election_says_no_leader_yet_retry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut replicas = start_cluster(tmp.path(), "http://127.0.0.1:9").await;
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        let l = leader_of(&replicas);
        async move { l }
    })
    .await;
    let li = replicas
        .iter()
        .position(|r| r.id == leader)
        .expect("leader");
    let fi = (li + 1) % 3;
    create_user_retrying(&replicas[fi], "before", Duration::from_secs(30)).await;
    replicas[li].kill();
    let killed_at = Instant::now();
    let mut refusals = Vec::new();
    let mut n = 0;
    let ok_after = loop {
        n += 1;
        let out = replicas[fi].cli(&["users", "create", &format!("during{n}")]);
        if out.status.success() {
            break killed_at.elapsed();
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The message, without a backtrace (RUST_BACKTRACE in a developer's environment).
        let message = stderr
            .split("\n\nStack backtrace")
            .next()
            .unwrap_or_default();
        refusals.push(message.trim().to_string());
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "no write succeeded within 60 s of the leader's death: {refusals:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "leader {leader} killed; {} writes refused, the next succeeded after {ok_after:?}; refusals: {refusals:#?}",
        refusals.len()
    );
    assert!(
        !refusals.is_empty(),
        "a write right after the leader's death found a leader already"
    );
    for r in &refusals {
        assert!(
            r.contains("no leader yet") && r.contains("retry"),
            "a refusal during the election does not say so: {r}"
        );
        assert!(
            !r.contains("certificate") && !r.contains(" CA"),
            "a refusal during the election blames certificates: {r}"
        );
    }
}

/// `cluster status` asked on a follower shows the leader's view (asked over the Raft
/// channel): every member's lag and last contact, and a member that stopped answering as
/// DOWN; once the leader itself is gone, it says so instead of showing stale numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_on_a_follower_shows_the_leaders_view_and_down_members() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut replicas = start_cluster(tmp.path(), "http://127.0.0.1:9").await;
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        let l = leader_of(&replicas);
        async move { l }
    })
    .await;
    let li = replicas
        .iter()
        .position(|r| r.id == leader)
        .expect("leader");
    let (fi, gi) = ((li + 1) % 3, (li + 2) % 3);
    let (f, g) = (replicas[fi].id, replicas[gi].id);
    // Every member answers and has a contact age in the leader's view, seen from f.
    let st = wait_for(
        "the leader's view on a follower",
        Duration::from_secs(30),
        || {
            let st = replicas[fi].cli_json(&["cluster", "status"]);
            let complete = st["view_of"].as_u64() == Some(leader)
                && st["members"].as_array().is_some_and(|m| {
                    m.len() == 3
                        && m.iter().all(|m| {
                            m["down"].as_bool() == Some(false)
                                && m["matched_index"].as_u64().is_some()
                                && (m["id"].as_u64() == Some(leader)
                                    || m["last_contact_ms"].as_u64().is_some())
                        })
                });
            async move { complete.then_some(st) }
        },
    )
    .await;
    assert_eq!(st["id"].as_u64(), Some(f), "{st}");
    let text =
        String::from_utf8_lossy(&replicas[fi].cli(&["cluster", "status"]).stdout).to_string();
    assert!(
        text.contains(&format!("as the leader, replica {leader}, sees them")),
        "{text}"
    );

    // g stops answering: the leader's view, asked on f, marks it DOWN.
    replicas[gi].kill();
    let text = wait_for("g marked down on f", Duration::from_secs(30), || {
        let st = replicas[fi].cli_json(&["cluster", "status"]);
        let down: Vec<u64> = st["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter(|m| m["down"].as_bool() == Some(true))
                    .filter_map(|m| m["id"].as_u64())
                    .collect()
            })
            .unwrap_or_default();
        let text =
            String::from_utf8_lossy(&replicas[fi].cli(&["cluster", "status"]).stdout).to_string();
        async move { (down == [g]).then_some(text) }
    })
    .await;
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("{g} ")))
        .unwrap_or_else(|| panic!("no row for replica {g}: {text}"));
    assert!(row.contains("DOWN"), "{text}");

    // The leader goes too: f has no leader's view, says why, and shows no lag or contact.
    replicas[li].kill();
    let st = wait_for("f without its leader", Duration::from_secs(30), || {
        let st = replicas[fi].cli_json(&["cluster", "status"]);
        let gone = st["view_of"].is_null() && !st["note"].as_str().unwrap_or("").is_empty();
        async move { gone.then_some(st) }
    })
    .await;
    let note = st["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("does not answer") || note.contains("knows no leader"),
        "{note}"
    );
    for m in st["members"].as_array().expect("members") {
        assert!(
            m["last_contact_ms"].is_null() && m["matched_index"].is_null(),
            "{st}"
        );
    }
    if note.contains("does not answer") {
        let leader_row = st["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["id"].as_u64() == Some(leader)))
            .expect("leader row");
        assert_eq!(leader_row["down"].as_bool(), Some(true), "{st}");
    }
}

/// DNS settings are tailnet state: seeded by the founding replicas, changed through
/// replica 1 (CLI) and replica 3 (REST), and an official client streaming from replica 2
/// gets each change on its open stream: its resolver answers the new extra record and it
/// shows the new nameserver and split domain. A refused change leaves them as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_settings_changed_through_one_replica_reach_clients_on_another() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let lb_url = format!("http://127.0.0.1:{}", crate::fixtures::free_port());
    let replicas = start_cluster(dir.path(), &lb_url).await;
    let seeded = wait_for("the DNS settings seeded", Duration::from_secs(30), || {
        let r = replicas[1].cli_json(&["dns", "show"]);
        async move { (r["magic_dns"] == true).then_some(r) }
    })
    .await;
    assert_eq!(seeded["nameservers"], serde_json::json!([]), "{seeded}");
    let key = user_with_reusable_key(&replicas[0], "dora");
    let root = dir.path().join("clients");
    let client = Tailscaled::start(&bin, &root, "dns-b");
    client
        .up(&format!("http://{}", replicas[1].control), &key)
        .await;
    let out = client.cli(&["set", "--accept-dns=true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let records = dir.path().join("records.json");
    std::fs::write(
        &records,
        r#"[{"name": "wiki.corp.test", "type": "A", "value": "100.64.0.77"}]"#,
    )
    .expect("write records");
    let set = replicas[0].cli_json(&[
        "dns",
        "set",
        "--nameservers",
        "127.0.0.1:5397",
        "--split",
        "corp.test=127.0.0.1:5396",
        "--extra-records",
        records.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(
        set["nameservers"],
        serde_json::json!(["127.0.0.1:5397"]),
        "{set}"
    );
    let query = |name: &str| {
        let out = client.cli(&["dns", "query", name, "A"]);
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    wait_for(
        "the client on replica 2 resolves the new record",
        Duration::from_secs(30),
        || {
            let ok = query("wiki.corp.test.").contains("100.64.0.77");
            async move { ok.then_some(()) }
        },
    )
    .await;
    let status =
        String::from_utf8_lossy(&client.cli(&["dns", "status", "--json"]).stdout).to_string();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
    assert_eq!(v["CurrentTailnet"]["MagicDNSEnabled"], true, "{status}");
    eprintln!("the client on replica 2 after the change through replica 1: {status}");
    for want in ["127.0.0.1:5397", "127.0.0.1:5396", "corp.test"] {
        assert!(status.contains(want), "dns status lacks {want}: {status}");
    }

    // A refused change (a nameserver that is a name, not an address) changes nothing.
    let out = replicas[2].cli(&["dns", "set", "--nameservers", "dns.example"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nameservers") && err.contains("dns.example"),
        "{err}"
    );
    assert_eq!(
        replicas[1].cli_json(&["dns", "show"])["nameservers"],
        serde_json::json!(["127.0.0.1:5397"])
    );

    // Through the REST API of replica 3: MagicDNS off reaches the client on replica 2.
    let api_key = replicas[2].cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let mut dns = replicas[2].cli_json(&["dns", "show"]);
    dns["magic_dns"] = serde_json::json!(false);
    let (code, reply) = crate::fixtures::http_json(
        &replicas[2].control.to_string(),
        "PUT",
        "/api/v1/dns",
        Some(&api_key),
        Some(&serde_json::json!({ "dns": dns }).to_string()),
    );
    assert_eq!(code, 200, "{reply}");
    assert_eq!(reply["dns"]["magic_dns"], false, "{reply}");
    wait_for(
        "MagicDNS off reaches the client on replica 2",
        Duration::from_secs(30),
        || {
            let status = String::from_utf8_lossy(&client.cli(&["dns", "status", "--json"]).stdout)
                .to_string();
            let v: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
            let ok = v["CurrentTailnet"]["MagicDNSEnabled"] == false;
            async move { ok.then_some(()) }
        },
    )
    .await;
}
