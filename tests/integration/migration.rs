//! Moving a tailnet from headscale: `tests/fixtures/headscale-0.29.2/` holds a database
//! and Noise key that headscale 0.29.2 wrote while two official clients registered with
//! it at http://127.0.0.1:18080, and those clients' state files (see the README there).
//! `hydrascale migrate headscale` converts it, a replica on the same URL restores it, and
//! the two clients, started from their saved state without a key or a new login, come up
//! with the addresses headscale gave them and reach each other.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fixtures::{require_tailscale, wait_for, ReplicaProc, Tailscaled};

/// The URL headscale served the fixture clients on; their saved preferences name it.
const HEADSCALE_URL: &str = "http://127.0.0.1:18080";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/headscale-0.29.2")
}

fn migrate(out: &Path, extra: &[&str]) -> std::process::Output {
    crate::fixtures::hydrascale_command()
        .args(["-o", "json", "migrate", "headscale", "--db"])
        .arg(fixture().join("db.sqlite"))
        .arg("--noise-key")
        .arg(fixture().join("noise_private.key"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("hydrascale migrate headscale")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headscale_clients_move_over_without_logging_in_again() {
    let Some(ts_bin) = require_tailscale() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json"),
    )
    .expect("expected.json is JSON");

    // A key file that is not headscale's is refused before anything is written.
    let bad_out = dir.path().join("bad.backup");
    let out = crate::fixtures::hydrascale_command()
        .args(["migrate", "headscale", "--db"])
        .arg(fixture().join("db.sqlite"))
        .arg("--noise-key")
        .arg(fixture().join("expected.json"))
        .arg("--out")
        .arg(&bad_out)
        .output()
        .expect("migrate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Noise key"), "{err}");
    assert!(!bad_out.exists());

    let backup = dir.path().join("from-headscale.backup");
    let out = migrate(&backup, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let report = &report["report"];
    assert_eq!(report["users"], expected["users"], "{report}");
    assert_eq!(report["nodes"], expected["nodes"], "{report}");
    // headscale 0.29 keeps pre-auth and API keys as bcrypt hashes: reported, not taken.
    assert_eq!(report["preauth_keys"].as_u64(), Some(0), "{report}");
    assert_eq!(
        report["preauth_keys_skipped"], expected["preauth_keys"],
        "{report}"
    );
    assert_eq!(report["api_keys_skipped"], expected["api_keys"], "{report}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&backup).expect("backup").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the backup holds the control key");

    // A replica on headscale's URL, restored from the converted file.
    let mut r = ReplicaProc::new(dir.path(), 1);
    r.control = HEADSCALE_URL.trim_start_matches("http://").to_string();
    r.write_config(HEADSCALE_URL, "", true);
    r.start();
    r.wait_admin().await;
    let restored = r.cli_json(&[
        "cluster",
        "restore",
        "--from",
        backup.to_str().expect("path"),
    ]);
    assert_eq!(restored["nodes"], expected["nodes"], "{restored}");
    r.wait_ready().await;
    let key = crate::fixtures::http_get(&r.control, "/key?v=100")
        .expect("/key")
        .1;
    let key: serde_json::Value = serde_json::from_str(&key).expect("/key answers JSON");
    assert_eq!(
        key["publicKey"], expected["control_public_key"],
        "the control key is headscale's"
    );
    let listed = r.cli_json(&["nodes", "list"]);
    let users = r.cli_json(&["users", "list"]);

    // The clients, from the state headscale left them with: no `up`, no key.
    let clients: Vec<Tailscaled> = ["hs-one", "hs-two"]
        .iter()
        .map(|name| {
            let state_dir = dir.path().join(name);
            std::fs::create_dir_all(&state_dir).expect("state dir");
            std::fs::copy(
                fixture().join(format!("{name}.tailscaled.state")),
                state_dir.join("tailscaled.state"),
            )
            .expect("copy state");
            Tailscaled::start(&ts_bin, dir.path(), name)
        })
        .collect();
    for c in &clients {
        let want = expected["clients"][&c.name]["ipv4"]
            .as_str()
            .expect("expected ipv4")
            .to_string();
        wait_for(
            &format!("{} running with its headscale address", c.name),
            Duration::from_secs(60),
            || {
                let st = c.status();
                let running = st["BackendState"] == "Running";
                let ip_ok = st["Self"]["TailscaleIPs"]
                    .as_array()
                    .is_some_and(|ips| ips.iter().any(|i| i.as_str() == Some(&want)));
                let peer_online = c.peers_online().iter().any(|(_, online)| *online);
                async move { (running && ip_ok && peer_online).then_some(()) }
            },
        )
        .await;
    }
    let target = clients[1].ipv4();
    wait_for("hs-one pings hs-two", Duration::from_secs(60), || {
        let out = clients[0].cli(&["ping", "--c=1", "--timeout=5s", &target]);
        async move { out.status.success().then_some(()) }
    })
    .await;
    assert!(
        listed.to_string().contains("hs-one") && listed.to_string().contains("hs-two"),
        "{listed}"
    );
    assert!(users.to_string().contains("alice"), "{users}");
}
