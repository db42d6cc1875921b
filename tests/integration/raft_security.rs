//! Attacks on the Raft port of real `hydrascale serve` processes: a forged `ClientWrite`,
//! `AppendEntries`, `InstallSnapshot` and `TimeoutNow`, and a `LeaderView` read, sent
//! without a certificate, with a certificate from a foreign CA, in another member's name,
//! and from a replica removed from the cluster. Each is refused, and nothing in the
//! tailnet changes. Also what a lone replica on embedded defaults leaves on disk: an
//! owner-only data directory.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::fixtures::{http_json, leader_of, wait_for, ReplicaProc};

#[derive(Clone, PartialEq, prost::Message)]
struct Payload {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TimeoutNowRequest {
    #[prost(uint64, tag = "1")]
    leader: u64,
    #[prost(uint64, tag = "2")]
    delay_ms: u64,
}

/// How an attacker connects to a Raft port.
#[derive(Clone)]
enum Caller {
    /// h2c, no TLS at all.
    Plaintext,
    /// TLS, trusting the cluster CA, presenting no certificate.
    NoCertificate { ca: String },
    /// TLS presenting `cert`/`key` (from any CA), trusting the cluster CA.
    Certificate {
        ca: String,
        cert: String,
        key: String,
    },
}

async fn channel(addr: &str, caller: &Caller) -> Result<Channel, String> {
    let (scheme, tls) = match caller {
        Caller::Plaintext => ("http", None),
        Caller::NoCertificate { ca } => (
            "https",
            Some(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("hydrascale-raft"),
            ),
        ),
        Caller::Certificate { ca, cert, key } => (
            "https",
            Some(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("hydrascale-raft")
                    .identity(Identity::from_pem(cert, key)),
            ),
        ),
    };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).map_err(|e| e.to_string())?;
    }
    ep.connect().await.map_err(|e| format!("{e:?}"))
}

/// One unary call on the Raft service, as a replica would make it; `Err` with the status
/// code and message, or the transport's failure.
async fn raft_call<M: prost::Message + Default + Send + Sync + 'static>(
    addr: &str,
    caller: &Caller,
    method: &'static str,
    msg: M,
) -> Result<Vec<u8>, String> {
    let ch = channel(addr, caller).await?;
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.map_err(|e| format!("{e:?}"))?;
    let path = http::uri::PathAndQuery::from_static(method);
    grpc.unary(
        tonic::Request::new(msg),
        path,
        tonic_prost::ProstCodec::<M, Payload>::default(),
    )
    .await
    .map(|r| r.into_inner().data)
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// A `CreateApiKey` command for a key the attacker chose: if it is ever applied, the key
/// opens the REST API.
fn forged_api_key() -> (String, Vec<u8>) {
    use sha2::Digest;
    let key = "hskey-api-forged01-0123456789abcdef0123456789abcdef".to_string();
    let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    let cmd = serde_json::json!({"CreateApiKey": {
        "prefix": "forged01", "hash": hash, "expiration": null, "now": 1
    }});
    (key, serde_json::to_vec(&cmd).expect("json"))
}

/// An append from "leader `leader`" at a term far ahead: admitted, it would unseat the
/// real leader.
fn forged_append(leader: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "vote": {"leader_id": {"term": 99, "node_id": leader}, "committed": true},
        "prev_log_id": null, "leader_commit": null, "entries": []
    }))
    .expect("json")
}

/// A snapshot from "leader `leader`" replacing the whole tailnet with one that holds the
/// forged API key.
fn forged_snapshot(leader: u64) -> Vec<u8> {
    use sha2::Digest;
    let (key, _) = forged_api_key();
    let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    let tailnet = serde_json::json!({
        "users": {}, "nodes": {}, "preauth_keys": {},
        "api_keys": {"1": {"id": 1, "prefix": "forged01", "hash": hash, "expiration": null, "created": 1}},
        "next_user_id": 1, "next_node_id": 1, "next_key_id": 1
    });
    serde_json::to_vec(&serde_json::json!({
        "vote": {"leader_id": {"term": 99, "node_id": leader}, "committed": true},
        "meta": {
            "last_log_id": {"leader_id": {"term": 99, "node_id": leader}, "index": 1000},
            "last_membership": {"log_id": null, "membership": {"configs": [[leader]], "nodes": {leader.to_string(): {"addr": "127.0.0.1:1"}}}},
            "snapshot_id": "forged"
        },
        "offset": 0,
        "data": serde_json::to_vec(&tailnet).expect("json"),
        "done": true
    }))
    .expect("json")
}

/// Sends every forged message to `addr` as `caller`, speaking for replica `claims`
/// (and the `ClientWrite`, which speaks for nobody, if `write`); returns each outcome by
/// name.
async fn attack(
    addr: &str,
    caller: &Caller,
    claims: u64,
    write: bool,
) -> Vec<(&'static str, Result<Vec<u8>, String>)> {
    let (_, create_key) = forged_api_key();
    let mut outcomes = Vec::new();
    if write {
        outcomes.push((
            "ClientWrite",
            raft_call(
                addr,
                caller,
                "/hydrascale.raft.v1.RaftService/ClientWrite",
                Payload { data: create_key },
            )
            .await,
        ));
        // A read, but of the cluster's replication state: members only, like the rest.
        outcomes.push((
            "LeaderView",
            raft_call(
                addr,
                caller,
                "/hydrascale.raft.v1.RaftService/LeaderView",
                Payload { data: Vec::new() },
            )
            .await,
        ));
    }
    outcomes.extend([
        (
            "AppendEntries",
            raft_call(
                addr,
                caller,
                "/hydrascale.raft.v1.RaftService/AppendEntries",
                Payload {
                    data: forged_append(claims),
                },
            )
            .await,
        ),
        (
            "InstallSnapshot",
            raft_call(
                addr,
                caller,
                "/hydrascale.raft.v1.RaftService/InstallSnapshot",
                Payload {
                    data: forged_snapshot(claims),
                },
            )
            .await,
        ),
        (
            "TimeoutNow",
            raft_call(
                addr,
                caller,
                "/hydrascale.raft.v1.RaftService/TimeoutNow",
                TimeoutNowRequest {
                    leader: claims,
                    delay_ms: 0,
                },
            )
            .await,
        ),
    ]);
    outcomes
}

/// Asserts every outcome is a refusal whose text contains one of `why`.
fn all_refused(outcomes: &[(&str, Result<Vec<u8>, String>)], who: &str, why: &[&str]) {
    for (rpc, r) in outcomes {
        match r {
            Ok(_) => panic!("{who}: {rpc} was accepted"),
            Err(e) => assert!(
                why.iter().any(|w| e.contains(w)),
                "{who}: {rpc} refused for another reason than {why:?}: {e}"
            ),
        }
    }
}

fn by_id(replicas: &[ReplicaProc], id: u64) -> &ReplicaProc {
    replicas.iter().find(|r| r.id == id).expect("replica")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A replica certificate for `id` from a CA of the attacker's own.
fn foreign_certificate(root: &Path, id: u64) -> (String, String) {
    let dir = root.join("foreign");
    crate::fixtures::make_certs(&dir, &[id]);
    let r = dir.join(format!("replica-{id}"));
    (read(&r.join("replica.pem")), read(&r.join("replica.key")))
}

/// What a forged write would have changed, read from the outside: the REST API's answer
/// to the forged key, the API keys, the users, and Raft's term.
fn tailnet_view(r: &ReplicaProc) -> (u16, usize, usize, u64) {
    let (key, _) = forged_api_key();
    let (code, _) = http_json(&r.control, "GET", "/api/v1/user", Some(&key), None);
    let keys = r.cli_json(&["apikeys", "list"]);
    let users = r.cli_json(&["users", "list"]);
    let term = r.cli_json(&["cluster", "status"])["term"]
        .as_u64()
        .unwrap_or(0);
    (
        code,
        keys.as_array().map_or(0, Vec::len),
        users.as_array().map_or(0, Vec::len),
        term,
    )
}

/// The report's attack: on embedded defaults (one replica, nothing configured), a local
/// process sends a `ClientWrite` with a `CreateApiKey` of its own to the Raft port. The
/// port speaks mutual TLS with the replica's own CA, so plaintext, no certificate and a
/// foreign CA's certificate all fail, and the made-up key opens nothing. The data
/// directory and everything in it is its owner's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_replica_takes_no_raft_call_from_outside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{}", crate::fixtures::free_port());
    let mut r = ReplicaProc::new(dir.path(), 1);
    r.write_config(&url, "", false);
    r.start();
    r.wait_ready().await;
    r.cli_json(&["users", "create", "alice"]);
    let before = tailnet_view(&r);
    assert_eq!(before.0, 401, "the forged key worked before any attack");

    let data = r.dir.join("data");
    let ca = read(&data.join("raft-tls/ca.pem"));
    let (cert, key) = foreign_certificate(dir.path(), 1);
    for (who, caller) in [
        ("plaintext", Caller::Plaintext),
        ("no certificate", Caller::NoCertificate { ca: ca.clone() }),
        (
            "foreign CA",
            Caller::Certificate {
                ca: ca.clone(),
                cert,
                key,
            },
        ),
    ] {
        let outcomes = attack(&r.raft, &caller, 1, true).await;
        // Refused in the handshake: there is no gRPC status to read, only a broken
        // connection.
        for (rpc, o) in &outcomes {
            assert!(o.is_err(), "{who}: {rpc} was accepted");
        }
    }
    assert_eq!(tailnet_view(&r), before, "the tailnet changed");

    // Owner-only, all the way down: the control key, the Raft CA's key, RocksDB's files.
    use std::os::unix::fs::PermissionsExt;
    let mut open = Vec::new();
    let mut stack = vec![data.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            let meta = std::fs::symlink_metadata(&p).expect("metadata");
            if meta.is_dir() {
                stack.push(p.clone());
            }
            // The admin socket's own mode bits are not what guards it on Linux (connect
            // checks the directory's), but it is owner-only too.
            if meta.permissions().mode() & 0o077 != 0 {
                open.push(format!(
                    "{} {:o}",
                    p.display(),
                    meta.permissions().mode() & 0o777
                ));
            }
        }
    }
    let mode = std::fs::metadata(&data).expect("data").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data directory mode");
    assert!(open.is_empty(), "readable by others: {open:?}");

    // The control private key leaves only through an explicit backup.
    let backup = dir.path().join("tailnet.backup");
    let out = r.cli(&[
        "cluster",
        "backup",
        "--out",
        backup.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let backup: serde_json::Value = serde_json::from_str(&read(&backup)).expect("backup is JSON");
    let secret = backup["tailnet"]["control_key"]
        .as_str()
        .and_then(|k| k.strip_prefix("privkey:"))
        .expect("the backup holds the control key")
        .to_string();
    let mut seen = Vec::new();
    for args in [
        vec!["cluster", "status"],
        vec!["users", "list"],
        vec!["nodes", "list"],
        vec!["apikeys", "list"],
        vec!["policy", "get"],
    ] {
        seen.push(String::from_utf8_lossy(&r.cli(&args).stdout).to_string());
    }
    let api_key = r.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    for path in [
        "/api/v1/user",
        "/api/v1/node",
        "/api/v1/apikey",
        "/api/v1/policy",
    ] {
        seen.push(
            http_json(&r.control, "GET", path, Some(&api_key), None)
                .1
                .to_string(),
        );
    }
    seen.push(
        crate::fixtures::http_get(&r.metrics, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default(),
    );
    seen.push(read(&r.dir.join("hydrascale.log")));
    for text in &seen {
        assert!(!text.contains(&secret), "the control key leaked: {text}");
    }
}

/// A three-replica cluster takes Raft calls only from its current members, each in its own
/// name: a foreign CA's certificate fails the handshake, a member's certificate speaking
/// for another member is refused, and once replica 3 is removed its certificate is
/// refused by both the leader and the remaining follower. None of it changes the tailnet
/// or unseats the leader. The same `ClientWrite` from a member is applied: what stops the
/// others is who sent it, not what it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_takes_calls_only_from_current_members_in_their_own_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{}", crate::fixtures::free_port());
    let mut replicas = crate::cluster::start_cluster(dir.path(), &url).await;
    // Replica 3 plays the member that goes rogue, then is removed: not the leader.
    let mut leader = leader_of(&replicas).expect("a leader");
    if leader == 3 {
        let out = by_id(&replicas, 3).cli(&["cluster", "transfer-leader", "--to", "1"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        leader = 1;
    }
    let follower = if leader == 1 { 2 } else { 1 };
    let certs = dir.path().join("certs");
    let ca = read(&certs.join("ca/ca.pem"));
    let identity = |id: u64| {
        let d = certs.join(format!("replica-{id}"));
        Caller::Certificate {
            ca: ca.clone(),
            cert: read(&d.join("replica.pem")),
            key: read(&d.join("replica.key")),
        }
    };
    let before = tailnet_view(by_id(&replicas, leader));

    // A foreign CA's certificate naming a member: the handshake fails.
    let (cert, key) = foreign_certificate(dir.path(), leader);
    let foreign = Caller::Certificate {
        ca: ca.clone(),
        cert,
        key,
    };
    for target in [leader, follower] {
        let outcomes = attack(&by_id(&replicas, target).raft, &foreign, leader, true).await;
        for (rpc, o) in &outcomes {
            assert!(
                o.is_err(),
                "foreign CA: {rpc} to replica {target} was accepted"
            );
        }
    }
    // A member (replica 3) speaking in the leader's name.
    let outcomes = attack(
        &by_id(&replicas, follower).raft,
        &identity(3),
        leader,
        false,
    )
    .await;
    for (rpc, o) in &outcomes {
        let e = o
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{rpc} in another's name was accepted"));
        assert!(
            e.contains(&format!("in the name of replica {leader}")),
            "{rpc}: {e}"
        );
    }

    // Replica 3 leaves the cluster; its certificate stays valid from the CA.
    let out = by_id(&replicas, leader).cli(&["cluster", "remove", "--id", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Still running, the removed replica's relay holds the mesh key: its link is closed
    // and it cannot mesh again (its relay key left the registry).
    let l = by_id(&replicas, leader);
    wait_for("the removed relay refused", Duration::from_secs(30), || {
        let refused = std::fs::read_to_string(l.dir.join("hydrascale.log"))
            .unwrap_or_default()
            .contains("no place in the replica registry");
        async move { refused.then_some(()) }
    })
    .await;
    if let Some(r3) = replicas.iter_mut().find(|r| r.id == 3) {
        r3.stop();
    }
    let leader = wait_for("a leader among 1 and 2", Duration::from_secs(30), || {
        let l = leader_of(replicas.iter().filter(|r| r.id != 3));
        async move { l }
    })
    .await;
    let follower = if leader == 1 { 2 } else { 1 };
    let removed_before = tailnet_view(by_id(&replicas, leader));
    for target in [leader, follower] {
        for claims in [3, leader] {
            let outcomes = attack(&by_id(&replicas, target).raft, &identity(3), claims, true).await;
            all_refused(
                &outcomes,
                &format!("removed replica 3 to replica {target}, speaking for {claims}"),
                &["not a member", "in the name of"],
            );
        }
    }
    let after = tailnet_view(by_id(&replicas, leader));
    assert_eq!(
        after, removed_before,
        "a removed replica changed the tailnet"
    );
    assert_eq!(after.0, 401);
    assert_eq!((after.1, after.2), (before.1, before.2));
    assert_eq!(
        leader_of(replicas.iter().filter(|r| r.id != 3)),
        Some(leader),
        "the leader was unseated"
    );

    // The same write from a current member, in its own name, is applied.
    let (forged_key, create_key) = forged_api_key();
    let res = raft_call(
        &by_id(&replicas, leader).raft,
        &identity(follower),
        "/hydrascale.raft.v1.RaftService/ClientWrite",
        Payload { data: create_key },
    )
    .await;
    assert!(res.is_ok(), "a member's forwarded write: {res:?}");
    let l = by_id(&replicas, leader);
    wait_for(
        "the member's write applied",
        Duration::from_secs(10),
        || {
            let code = http_json(&l.control, "GET", "/api/v1/user", Some(&forged_key), None).0;
            async move { (code == 200).then_some(()) }
        },
    )
    .await;
}
