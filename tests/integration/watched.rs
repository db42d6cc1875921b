//! Files the leader follows (headscale's file modes): `policy_path` and
//! `dns.extra_records_path`. Each valid version is replicated; a refused one changes
//! nothing and the next good one is taken.

use std::time::Duration;

use crate::fixtures::{wait_for, TestServer};

/// `policy_path` (headscale's file mode): the leader replicates each valid version of the
/// file; a version that does not parse is refused and the policy in force stays, and a
/// change through the API is replaced by the file's text (the file is the source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_mode_replicates_each_valid_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.hujson");
    let v1 =
        "// v1\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:22\"]}]}\n";
    std::fs::write(&file, v1).expect("write v1");
    let path = file.clone();
    let server = TestServer::start_with(move |c| c.policy_path = Some(path)).await;
    let in_force = || {
        server.cli_json(&["policy", "get"])["policy"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    wait_for("v1 in force", Duration::from_secs(30), || {
        let ok = in_force() == v1;
        async move { ok.then_some(()) }
    })
    .await;

    // A mistake in the file: refused, v1 stays (two polls of the file pass first).
    std::fs::write(
        &file,
        "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:nope\"]}]}",
    )
    .expect("write bad");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        in_force(),
        v1,
        "a version that does not parse changed the policy"
    );

    let v2 =
        "// v2\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}\n";
    std::fs::write(&file, v2).expect("write v2");
    wait_for("v2 in force", Duration::from_secs(30), || {
        let ok = in_force() == v2;
        async move { ok.then_some(()) }
    })
    .await;

    // A policy set through the CLI is replaced by the file's text.
    let other = dir.path().join("other.hujson");
    std::fs::write(&other, "{\"acls\": []}").expect("write other");
    server.cli_json(&["policy", "set", "--file", other.to_str().expect("utf-8")]);
    wait_for(
        "the file's text back in force",
        Duration::from_secs(30),
        || {
            let ok = in_force() == v2;
            async move { ok.then_some(()) }
        },
    )
    .await;
}

/// `dns.extra_records_path`: the records in the file replace those in force (the other
/// DNS settings stay), a file that is not a list of records is refused, and formatting
/// alone changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_records_file_replaces_the_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("records.json");
    std::fs::write(
        &file,
        r#"[{"name": "grafana.ts.test", "type": "A", "value": "100.64.0.9"}]"#,
    )
    .expect("write records");
    let path = file.clone();
    let server = TestServer::start_with(move |c| {
        c.dns.nameservers = vec!["1.1.1.1".into()];
        c.dns.extra_records_path = Some(path);
    })
    .await;
    let records = || server.cli_json(&["dns", "show"])["extra_records"].clone();
    wait_for(
        "the file's record in force",
        Duration::from_secs(30),
        || {
            let ok = records()[0]["name"] == "grafana.ts.test";
            async move { ok.then_some(()) }
        },
    )
    .await;
    assert_eq!(
        server.cli_json(&["dns", "show"])["nameservers"],
        serde_json::json!(["1.1.1.1"]),
        "the other settings stay"
    );
    std::fs::write(&file, r#"{"name": "not a list"}"#).expect("write bad");
    // A negative check: two polls of the file pass, and nothing may change.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(records()[0]["name"], "grafana.ts.test");
    std::fs::write(
        &file,
        "[\n  {\"name\": \"wiki.ts.test\", \"type\": \"AAAA\", \"value\": \"fd7a:115c:a1e0::9\"}\n]\n",
    )
    .expect("write v2");
    wait_for("the new record in force", Duration::from_secs(30), || {
        let r = records();
        let ok = r.as_array().map(Vec::len) == Some(1) && r[0]["name"] == "wiki.ts.test";
        async move { ok.then_some(()) }
    })
    .await;
}
