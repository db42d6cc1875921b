//! Network partitions: three replicas on their own hosts (network namespaces on a private
//! bridge), HAProxy and official clients on the router. Cutting a host's link is a real
//! partition: packets are lost, not refused.

use std::time::{Duration, Instant};

use crate::fixtures::{
    create_user_retrying, http_get, leader_of, make_certs, require_tailscale, user_names,
    user_with_reusable_key, wait_for, Haproxy, Lan, ReplicaProc, Tailscaled,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_with_the_leader_in_the_minority_and_in_the_majority() {
    let Some(bin) = require_tailscale() else {
        return;
    };
    if !nix_is_root() {
        panic!("the partition test makes network namespaces and needs root");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let lan = Lan::new(3);
    let certs = dir.path().join("certs");
    make_certs(&certs, &[1, 2, 3]);
    let lb_addr = format!("127.0.0.1:{}", crate::fixtures::free_port());
    let lb_url = format!("http://{lb_addr}");
    let mut replicas: Vec<ReplicaProc> = (0..3)
        .map(|i| {
            let mut r = ReplicaProc::on_lan(dir.path(), i as u64 + 1, &lan, i);
            r.tls_dir = Some(certs.clone());
            r
        })
        .collect();
    crate::fixtures::start_as_cluster(&mut replicas, &lb_url).await;
    let lb = Haproxy::start(dir.path(), &lb_addr, &replicas.iter().collect::<Vec<_>>());
    wait_for("load balancer up", Duration::from_secs(30), || {
        let ok = http_get(&lb.addr, "/ready").is_some_and(|(c, _)| c == 200);
        async move { ok.then_some(()) }
    })
    .await;

    let key = user_with_reusable_key(&replicas[0], "alice");
    let root = dir.path().join("clients");
    let nodes: Vec<Tailscaled> = ["p1", "p2"]
        .iter()
        .map(|n| Tailscaled::start(&bin, &root, n))
        .collect();
    for n in &nodes {
        n.up(&lb_url, &key).await;
    }
    for (a, b) in [(0, 1), (1, 0)] {
        let want = vec![(nodes[b].name.clone(), true)];
        wait_for("clients see each other", Duration::from_secs(30), || {
            let ok = nodes[a].peers_online() == want;
            async move { ok.then_some(()) }
        })
        .await;
    }

    // 1. Leader in the minority: cut the leader's host off.
    let all = [0usize, 1, 2];
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        let l = leader_of(&replicas);
        async move { l }
    })
    .await;
    let li = (leader - 1) as usize;
    let majority: Vec<usize> = all.iter().copied().filter(|i| *i != li).collect();
    let cut_at = Instant::now();
    lan.cut(li);

    // The majority elects a new leader and accepts writes.
    create_user_retrying(
        &replicas[majority[0]],
        "during-partition",
        Duration::from_secs(30),
    )
    .await;
    eprintln!(
        "leader {leader} partitioned: the majority acknowledged a write {:?} later",
        cut_at.elapsed()
    );
    let new_leader =
        leader_of(majority.iter().map(|&i| &replicas[i])).expect("a leader in the majority");
    assert_ne!(new_leader, leader);

    // The old leader refuses writes, with an error that says why, and never acknowledges one.
    let out = replicas[li].cli(&["users", "create", "minority-write"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "the partitioned old leader accepted a write"
    );
    assert!(err.contains("majority"), "unclear refusal: {err}");

    // Its clients are moved: HAProxy's health checks fail, their sessions are cut, they
    // reconnect to the majority and see each other online again.
    for (a, b) in [(0, 1), (1, 0)] {
        let want = vec![(nodes[b].name.clone(), true)];
        wait_for(
            "clients converge on the majority",
            Duration::from_secs(60),
            || {
                let ok = nodes[a].peers_online() == want;
                async move { ok.then_some(()) }
            },
        )
        .await;
    }
    let out = nodes[0].cli(&["ping", "--c", "10", "--timeout", "5s", &nodes[1].ipv4()]);
    assert!(
        out.status.success(),
        "ping during the partition: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!(
        "clients had fresh maps with every peer online {:?} after the partition",
        cut_at.elapsed()
    );

    // Heal: the old leader rejoins as a follower and catches up; its refused write is
    // nowhere.
    lan.heal(li);
    wait_for("old leader catches up", Duration::from_secs(60), || {
        let users = user_names(&replicas[li]);
        let ok = users.contains(&"during-partition".to_string());
        async move { ok.then_some(()) }
    })
    .await;
    for r in &replicas {
        assert!(!user_names(r).contains(&"minority-write".to_string()));
    }

    // 2. Leader in the majority: cut a follower; writes through the leader go on.
    let leader = wait_for("a leader after healing", Duration::from_secs(30), || {
        let l = leader_of(&replicas);
        async move { l }
    })
    .await;
    let li = (leader - 1) as usize;
    let fi = (li + 1) % 3;
    let term = replicas[li].cli_json(&["cluster", "status"])["term"].clone();
    lan.cut(fi);
    let cut_at = Instant::now();
    create_user_retrying(&replicas[li], "leader-in-majority", Duration::from_secs(30)).await;
    // Once the follower knows it is cut off (no leader heard for two leader leases, 6 s),
    // it refuses writes outright; before that it cannot know, and says a forwarded write
    // "may or may not" have landed.
    wait_for(
        "the cut-off follower gives up its leader",
        Duration::from_secs(30),
        || {
            let st = replicas[fi].cli_json(&["cluster", "status"]);
            let ok = st["leader"].is_null();
            async move { ok.then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(
        (cut_at + Duration::from_millis(6500)).saturating_duration_since(Instant::now()),
    )
    .await;
    let out = replicas[fi].cli(&["users", "create", "cut-follower-write"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a cut-off follower accepted a write");
    assert!(
        ["majority", "leader", "reachable"]
            .iter()
            .any(|w| err.contains(w)),
        "unclear refusal: {err}"
    );
    lan.heal(fi);
    let healed = Instant::now();
    wait_for("follower catches up", Duration::from_secs(60), || {
        let ok = user_names(&replicas[fi]).contains(&"leader-in-majority".to_string());
        async move { ok.then_some(()) }
    })
    .await;
    eprintln!(
        "follower healed after {:?} cut off: caught up {:?} later",
        healed - cut_at,
        healed.elapsed()
    );
    assert!(!user_names(&replicas[li]).contains(&"cut-follower-write".to_string()));
    // It did not campaign while cut off (pre-vote), so the leader it rejoined kept its
    // term and its place: no election stalled the majority's writes.
    for r in &replicas {
        let st = r.cli_json(&["cluster", "status"]);
        assert_eq!(st["leader"], serde_json::json!(leader), "{st}");
        assert_eq!(st["term"], term, "{st}");
    }

    drop(nodes);
    drop(lb);
    for r in &mut replicas {
        r.kill();
    }
    drop(lan);
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
