//! The headscale-compatible REST API on the control listener: shapes, status codes and
//! API-key checks with our own requests, then a third-party headscale SDK from PyPI
//! (`headscale-api`, run by `tests/sdk/headscale_api_client.py`) against it.

use std::path::PathBuf;

use crate::fixtures::{http_json, TestServer};

/// The Python environment scripts/install-deps.sh prepares with the SDK.
fn sdk_python() -> Option<PathBuf> {
    let candidates = [
        std::env::var("HYDRASCALE_TOOLS_DIR")
            .ok()
            .map(|d| PathBuf::from(d).join("pyvenv/bin/python")),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/pyvenv/bin/python")),
    ];
    match candidates.into_iter().flatten().find(|p| p.is_file()) {
        Some(p) => Some(p),
        None if std::env::var("HYDRASCALE_INTEROP").is_ok() => {
            panic!("the headscale SDK's Python environment is missing; run scripts/install-deps.sh")
        }
        None => {
            eprintln!("SKIPPED: headscale SDK not installed (run scripts/test.sh)");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_is_headscale_compatible_and_needs_a_key() {
    let server = TestServer::start().await;
    let addr = server.handle().control_addr.to_string();
    let key = server.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let call = |method: &str, path: &str, body: Option<&str>| {
        http_json(&addr, method, path, Some(&key), body)
    };

    // No key, a wrong key: 401 in grpc-gateway's error shape, and nothing happens.
    let (code, err) = http_json(
        &addr,
        "POST",
        "/api/v1/user",
        None,
        Some(r#"{"name":"eve"}"#),
    );
    assert_eq!(code, 401, "{err}");
    assert_eq!(err["code"], 16, "{err}");
    assert!(err["message"]
        .as_str()
        .unwrap_or_default()
        .contains("API key"));
    let wrong = format!("hskey-api-000000000000-{}", "0".repeat(48));
    let (code, _) = http_json(
        &addr,
        "POST",
        "/api/v1/user",
        Some(&wrong),
        Some(r#"{"name":"eve"}"#),
    );
    assert_eq!(code, 401);
    assert_eq!(
        call("GET", "/api/v1/user", None).1["users"],
        serde_json::json!([])
    );

    // Users: ids are strings, times RFC 3339.
    let (code, created) = call(
        "POST",
        "/api/v1/user",
        Some(r#"{"name":"alice","displayName":"Alice"}"#),
    );
    assert_eq!(code, 200, "{created}");
    let uid = created["user"]["id"]
        .as_str()
        .expect("id as string")
        .to_string();
    assert_eq!(created["user"]["name"], "alice");
    assert_eq!(created["user"]["displayName"], "Alice");
    assert!(created["user"]["createdAt"]
        .as_str()
        .unwrap_or_default()
        .ends_with('Z'));
    let (code, dup) = call("POST", "/api/v1/user", Some(r#"{"name":"alice"}"#));
    assert_eq!((code, dup["code"].as_i64()), (409, Some(6)), "{dup}");
    let (code, renamed) = call("POST", &format!("/api/v1/user/{uid}/rename/bob"), None);
    assert_eq!((code, renamed["user"]["name"].as_str()), (200, Some("bob")));
    let listed = call("GET", "/api/v1/user?name=bob", None).1;
    assert_eq!(listed["users"][0]["id"].as_str(), Some(uid.as_str()));

    // Pre-auth keys: the key once, its prefix in lists; expire by the whole key.
    let (code, pak) = call(
        "POST",
        "/api/v1/preauthkey",
        Some(&format!(
            r#"{{"user":"{uid}","reusable":true,"ephemeral":false,"expiration":"2099-01-01T00:00:00Z","aclTags":["tag:web"]}}"#
        )),
    );
    assert_eq!(code, 200, "{pak}");
    let full = pak["preAuthKey"]["key"].as_str().expect("key").to_string();
    assert!(full.starts_with("hskey-auth-"), "{pak}");
    assert_eq!(pak["preAuthKey"]["user"]["name"], "bob");
    assert_eq!(pak["preAuthKey"]["aclTags"], serde_json::json!(["tag:web"]));
    assert_eq!(pak["preAuthKey"]["expiration"], "2099-01-01T00:00:00Z");
    let keys = call("GET", &format!("/api/v1/preauthkey?user={uid}"), None).1;
    let listed_key = keys["preAuthKeys"][0]["key"].as_str().unwrap_or_default();
    assert!(
        full.starts_with(listed_key) && listed_key.len() < full.len(),
        "{keys}"
    );
    let (code, _) = call(
        "POST",
        "/api/v1/preauthkey/expire",
        Some(&format!(r#"{{"user":"{uid}","key":"{full}"}}"#)),
    );
    assert_eq!(code, 200);
    let keys = call("GET", &format!("/api/v1/preauthkey?user={uid}"), None).1;
    assert_ne!(keys["preAuthKeys"][0]["expiration"], "2099-01-01T00:00:00Z");
    // A user with keys cannot be deleted: 400 with the reason.
    let (code, err) = call("DELETE", &format!("/api/v1/user/{uid}"), None);
    assert_eq!(code, 400, "{err}");
    assert!(err["message"]
        .as_str()
        .unwrap_or_default()
        .contains("pre-auth key"));

    // Nodes: none yet; unknown ids are 404; what is not built yet says so (501).
    assert_eq!(
        call("GET", "/api/v1/node", None).1["nodes"],
        serde_json::json!([])
    );
    assert_eq!(call("GET", "/api/v1/node/42", None).0, 404);
    assert_eq!(call("POST", "/api/v1/node/42/expire", None).0, 404);
    let (code, err) = call(
        "POST",
        "/api/v1/node/1/approve_routes",
        Some(r#"{"routes":[]}"#),
    );
    assert_eq!((code, err["code"].as_i64()), (404, Some(5)), "{err}");
    let (code, err) = call("POST", "/api/v1/node/1/user", Some(r#"{"user":"x"}"#));
    assert_eq!((code, err["code"].as_i64()), (501, Some(12)), "{err}");

    // API keys: create over REST, use it, expire it, delete it.
    let (code, made) = call(
        "POST",
        "/api/v1/apikey",
        Some(r#"{"expiration":"2099-01-01T00:00:00Z"}"#),
    );
    assert_eq!(code, 200, "{made}");
    let second = made["apiKey"].as_str().expect("apiKey").to_string();
    let prefix = second.split('-').nth(2).expect("prefix").to_string();
    assert_eq!(
        http_json(&addr, "GET", "/api/v1/apikey", Some(&second), None).0,
        200
    );
    let (code, _) = call(
        "POST",
        "/api/v1/apikey/expire",
        Some(&format!(r#"{{"prefix":"{prefix}"}}"#)),
    );
    assert_eq!(code, 200);
    assert_eq!(
        http_json(&addr, "GET", "/api/v1/apikey", Some(&second), None).0,
        401
    );
    assert_eq!(
        call("DELETE", &format!("/api/v1/apikey/{prefix}"), None).0,
        200
    );
    let listed = call("GET", "/api/v1/apikey", None).1;
    assert_eq!(
        listed["apiKeys"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );

    // A third-party headscale SDK drives the same API.
    let Some(python) = sdk_python() else {
        return;
    };
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/headscale_api_client.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(server.url())
        .arg(&key)
        .output()
        .expect("run the SDK");
    assert!(
        out.status.success(),
        "headscale SDK: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("SDK prints JSON");
    assert_eq!(seen["health"], true, "{seen}");
    assert_eq!(
        (seen["key_ok"].as_bool(), seen["wrong_key_ok"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(
        seen["users"],
        serde_json::json!(["bob", "sdk-user"]),
        "{seen}"
    );
    assert_eq!(seen["got_user"], "sdk-user");
    assert_eq!(seen["new_api_key_works"], true);
    assert_eq!(seen["expired_api_key_works"], false);
    assert_eq!(
        seen["users_after_rename"],
        serde_json::json!(["bob", "sdk-renamed"])
    );
    assert_eq!(seen["delete_missing"], 404);
    assert_eq!(seen["users_after_delete"], serde_json::json!(["bob"]));
    // What the SDK did is in the replicated state, as the CLI sees it.
    let names: Vec<String> = server
        .cli_json(&["users", "list"])
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, vec!["bob".to_string()]);
    let prefix = seen["new_api_key_prefix"].as_str().unwrap_or_default();
    let keys = server.cli_json(&["apikeys", "list"]);
    assert!(
        keys.as_array()
            .is_some_and(|a| a.iter().any(|k| k["prefix"] == prefix)),
        "{keys}"
    );
}

/// headscale 0.29's remaining endpoints, each with the CLI's view of what it did: keys
/// expired and deleted by id, node expiry set and disabled, the debug machine registered
/// through `auth/register`, logins turned away, policy checked without being set, health,
/// backfill, and the OpenAPI document. Without a key each is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_covers_headscale_0_29() {
    let server = TestServer::start().await;
    let addr = server.handle().control_addr.to_string();
    let key = server.cli_json(&["apikeys", "create"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let call = |method: &str, path: &str, body: Option<&str>| {
        http_json(&addr, method, path, Some(&key), body)
    };
    server.cli_json(&["users", "create", "ops"]);
    // Users with every field headscale's CreateUser takes, found again by e-mail.
    let (code, r) = call(
        "POST",
        "/api/v1/user",
        Some(
            r#"{"name":"pat","displayName":"Pat","email":"pat@example.com","pictureUrl":"https://example.com/pat.png"}"#,
        ),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["user"]["email"], "pat@example.com");
    assert_eq!(r["user"]["profilePicUrl"], "https://example.com/pat.png");
    let found = call("GET", "/api/v1/user?email=PAT@example.com", None).1;
    assert_eq!(found["users"].as_array().map(Vec::len), Some(1), "{found}");
    assert_eq!(found["users"][0]["name"], "pat");
    let (code, r) = call(
        "POST",
        "/api/v1/user",
        Some(r#"{"name":"quinn","pictureUrl":"javascript:alert(1)"}"#),
    );
    assert_eq!(code, 400, "{r}");
    assert!(!server
        .cli_json(&["users", "list"])
        .to_string()
        .contains("quinn"));
    let key_ids = || -> Vec<(u64, bool)> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        server
            .cli_json(&["preauthkeys", "list", "--user", "ops"])
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| {
                let expired = k["expiration_ms"].as_i64().is_some_and(|e| e <= now);
                (k["id"].as_u64().expect("id"), expired)
            })
            .collect()
    };

    // Pre-auth keys by id: expire, then delete; the older shape (user + key) deletes too.
    let mut made = Vec::new();
    for _ in 0..2 {
        let (code, pak) = call(
            "POST",
            "/api/v1/preauthkey",
            Some(r#"{"user":"ops","reusable":true,"expiration":"2099-01-01T00:00:00Z"}"#),
        );
        assert_eq!(code, 200, "{pak}");
        made.push((
            pak["preAuthKey"]["id"].as_str().expect("id").to_string(),
            pak["preAuthKey"]["key"].as_str().expect("key").to_string(),
        ));
    }
    let first: u64 = made[0].0.parse().expect("numeric id");
    let (code, err) = http_json(
        &addr,
        "DELETE",
        &format!("/api/v1/preauthkey?id={first}"),
        None,
        None,
    );
    assert_eq!(code, 401, "{err}");
    let (code, err) = http_json(
        &addr,
        "POST",
        "/api/v1/preauthkey/expire",
        None,
        Some(&format!(r#"{{"id":"{first}"}}"#)),
    );
    assert_eq!(code, 401, "{err}");
    assert_eq!(key_ids().len(), 2, "refused calls changed nothing");
    assert!(key_ids().iter().all(|(_, expired)| !expired));
    let (code, r) = call(
        "POST",
        "/api/v1/preauthkey/expire",
        Some(&format!(r#"{{"id":"{first}"}}"#)),
    );
    assert_eq!(code, 200, "{r}");
    assert!(key_ids().contains(&(first, true)), "{:?}", key_ids());
    let (code, r) = call("DELETE", &format!("/api/v1/preauthkey?id={first}"), None);
    assert_eq!(code, 200, "{r}");
    assert!(!key_ids().iter().any(|(id, _)| *id == first));
    let (code, r) = call("DELETE", &format!("/api/v1/preauthkey?id={first}"), None);
    assert_eq!((code, r["code"].as_i64()), (404, Some(5)), "{r}");
    let (code, r) = call(
        "DELETE",
        &format!("/api/v1/preauthkey?user=ops&key={}", made[1].1),
        None,
    );
    assert_eq!(code, 200, "{r}");
    assert!(key_ids().is_empty(), "{:?}", key_ids());

    // A made-up machine waits on an interactive login, and auth/register makes it a node.
    let (code, r) = call(
        "POST",
        "/api/v1/debug/node",
        Some(r#"{"user":"ops","key":"debug-one","name":"debug-box","routes":["10.9.0.0/24"]}"#),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["node"]["name"], "debug-box");
    assert_eq!(r["node"]["user"]["name"], "ops");
    let (code, r) = call(
        "POST",
        "/api/v1/auth/approve",
        Some(r#"{"authId":"debug-one"}"#),
    );
    assert_eq!(code, 400, "a login needs a user: {r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or_default()
            .contains("auth/register"),
        "{r}"
    );
    let (code, r) = http_json(
        &addr,
        "POST",
        "/api/v1/auth/register",
        None,
        Some(r#"{"user":"ops","authId":"debug-one"}"#),
    );
    assert_eq!(code, 401, "{r}");
    let (code, r) = call(
        "POST",
        "/api/v1/auth/register",
        Some(r#"{"user":"ops","authId":"debug-one"}"#),
    );
    assert_eq!(code, 200, "{r}");
    let node = &r["node"];
    assert_eq!(node["user"]["name"], "ops");
    assert_eq!(node["availableRoutes"], serde_json::json!(["10.9.0.0/24"]));
    assert_eq!(node["registerMethod"], "REGISTER_METHOD_CLI");
    let id = node["id"].as_str().expect("id").to_string();
    let cli_node = |id: &str| {
        server
            .cli_json(&["nodes", "list"])
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["id"].as_u64().map(|i| i.to_string()).as_deref() == Some(id))
            .cloned()
            .expect("the node in the CLI's list")
    };
    assert_eq!(cli_node(&id)["hostname"], "debug-box");

    // Node expiry: a time, disabled, both (refused), now.
    let (code, r) = call(
        "POST",
        &format!("/api/v1/node/{id}/expire?expiry=2099-06-01T00:00:00Z"),
        None,
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["node"]["expiry"], "2099-06-01T00:00:00Z");
    assert_eq!(cli_node(&id)["expiry_ms"].as_i64(), Some(4_083_955_200_000));
    let (code, r) = call(
        "POST",
        &format!("/api/v1/node/{id}/expire?disableExpiry=true"),
        None,
    );
    assert_eq!(code, 200, "{r}");
    assert!(r["node"]["expiry"].is_null(), "{r}");
    assert!(cli_node(&id)["expiry_ms"].is_null());
    let (code, r) = call(
        "POST",
        &format!("/api/v1/node/{id}/expire?disableExpiry=true&expiry=2099-06-01T00:00:00Z"),
        None,
    );
    assert_eq!(code, 400, "{r}");
    assert!(
        cli_node(&id)["expiry_ms"].is_null(),
        "a refused call changed nothing"
    );
    let (code, r) = call("POST", &format!("/api/v1/node/{id}/expire"), None);
    assert_eq!(code, 200, "{r}");
    assert!(cli_node(&id)["expiry_ms"].as_i64().is_some());
    // The CLI's own forms.
    let n = server.cli_json(&["nodes", "expire", "-i", &id, "--disable"]);
    assert!(n["expiry_ms"].is_null(), "{n}");
    let n = server.cli_json(&[
        "nodes",
        "expire",
        "-i",
        &id,
        "--expiry",
        "2099-06-01T00:00:00Z",
    ]);
    assert_eq!(n["expiry_ms"].as_i64(), Some(4_083_955_200_000), "{n}");

    // A second made-up machine is turned away: its login is gone.
    let (code, _) = call(
        "POST",
        "/api/v1/debug/node",
        Some(r#"{"user":"ops","key":"debug-two","name":"debug-two"}"#),
    );
    assert_eq!(code, 200);
    let (code, r) = call(
        "POST",
        "/api/v1/auth/reject",
        Some(r#"{"authId":"debug-two"}"#),
    );
    assert_eq!(code, 200, "{r}");
    let (code, r) = call(
        "POST",
        "/api/v1/auth/register",
        Some(r#"{"user":"ops","authId":"debug-two"}"#),
    );
    assert_eq!(code, 404, "{r}");
    let (code, r) = call(
        "POST",
        "/api/v1/auth/reject",
        Some(r#"{"authId":"nobody"}"#),
    );
    assert_eq!(code, 404, "{r}");

    // Policy check: a mistake is refused and says where; nothing is set either way.
    let before = call("GET", "/api/v1/policy", None).1;
    let bad = serde_json::json!({ "policy": "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:nope\"]}\n  ]\n}\n" });
    let (code, r) = call("POST", "/api/v1/policy/check", Some(&bad.to_string()));
    assert_eq!(code, 400, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or_default()
            .contains("would be refused"),
        "{r}"
    );
    let good = serde_json::json!({ "policy": "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}" });
    let (code, r) = call("POST", "/api/v1/policy/check", Some(&good.to_string()));
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        call("GET", "/api/v1/policy", None).1,
        before,
        "check set nothing"
    );

    // Health, backfill, the document.
    let (code, r) = call("GET", "/api/v1/health", None);
    assert_eq!(
        (code, &r),
        (200, &serde_json::json!({ "databaseConnectivity": true }))
    );
    assert_eq!(http_json(&addr, "GET", "/api/v1/health", None, None).0, 401);
    let (code, r) = call("POST", "/api/v1/node/backfillips", None);
    assert_eq!(code, 400, "{r}");
    let (code, r) = call("POST", "/api/v1/node/backfillips?confirmed=true", None);
    assert_eq!((code, &r), (200, &serde_json::json!({ "changes": [] })));
    let (code, text) = crate::fixtures::http_get(&addr, "/api/v1/openapi.yaml").expect("GET");
    assert_eq!(code, 200);
    assert!(text.contains("openapi: 3.0.3") && text.contains("/api/v1/auth/register:"));
}
