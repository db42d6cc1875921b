//! What the operator installs: the `.deb` built by cargo-deb from `Cargo.toml`'s
//! `[package.metadata.deb]`, unpacked into a fresh directory tree, holds the binary, the
//! unit, the configuration and the maintainer scripts; the unit in that tree passes
//! `systemd-analyze verify` against the binary in the same tree.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::monitoring::require_system_tool;

/// cargo-deb as scripts/install-deps.sh installs it (or from PATH).
fn require_cargo_deb() -> Option<PathBuf> {
    let tools = std::env::var("HYDRASCALE_TOOLS_DIR")
        .ok()
        .map(|d| PathBuf::from(d).join("bin/cargo-deb"))
        .filter(|p| p.is_file());
    tools.or_else(|| require_system_tool("cargo-deb"))
}

/// `systemd-analyze verify` of `unit` inside `root`, which must hold the binary the unit
/// starts; the host's unit files supply the targets it orders itself against. Returns
/// (success, stderr).
fn verify_unit(analyze: &Path, root: &Path, unit: &Path) -> (bool, String) {
    std::fs::create_dir_all(root.join("lib/systemd")).expect("dir");
    if !root.join("lib/systemd/system/multi-user.target").exists() {
        let status = Command::new("cp")
            .arg("-rn")
            .arg("/lib/systemd/system")
            .arg(root.join("lib/systemd/"))
            .status()
            .expect("cp");
        assert!(status.success(), "copying the host's unit files");
    }
    let out = Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .expect("systemd-analyze");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn deb_package_unpacks_into_a_working_tree() {
    let (Some(analyze), Some(cargo_deb), Some(dpkg_deb)) = (
        require_system_tool("systemd-analyze"),
        require_cargo_deb(),
        require_system_tool("dpkg-deb"),
    ) else {
        return;
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("tempdir");
    // Package the binary this test run was built with (the dev profile), not a release
    // build: the package layout is what is under test.
    let out = Command::new(&cargo_deb)
        .current_dir(manifest)
        .args([
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
            "--no-strip",
        ])
        .arg("--output")
        .arg(work.path().join("hydrascale.deb"))
        .output()
        .expect("run cargo-deb");
    assert!(
        out.status.success(),
        "cargo deb: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = work.path().join("hydrascale.deb");

    let field = |name: &str| {
        let out = Command::new(&dpkg_deb)
            .arg("--field")
            .arg(&deb)
            .arg(name)
            .output()
            .expect("dpkg-deb --field");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "hydrascale");
    assert!(field("Depends").contains("adduser"), "{}", field("Depends"));

    let root = work.path().join("root");
    let status = Command::new(&dpkg_deb)
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .expect("dpkg-deb -x");
    assert!(status.success());
    let control = work.path().join("control");
    let status = Command::new(&dpkg_deb)
        .arg("-e")
        .arg(&deb)
        .arg(&control)
        .status()
        .expect("dpkg-deb -e");
    assert!(status.success());

    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap_or_else(|e| panic!("{p} missing from the package: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("usr/bin/hydrascale"), 0o755);
    assert_eq!(mode("lib/systemd/system/hydrascale.service"), 0o644);
    assert_eq!(mode("etc/hydrascale/config.toml"), 0o640);
    for doc in [
        "usr/share/doc/hydrascale/operations.md",
        "usr/share/doc/hydrascale/prometheus/alerts.yml",
        "usr/share/doc/hydrascale/grafana/hydrascale-dashboard.json",
    ] {
        assert!(root.join(doc).is_file(), "{doc} missing from the package");
    }
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap_or_default();
    assert!(
        conffiles.contains("/etc/hydrascale/config.toml"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).expect("postinst");
    assert!(postinst.contains("adduser --system"), "{postinst}");
    let out = Command::new("sh")
        .arg("-n")
        .arg(control.join("postinst"))
        .output()
        .expect("sh -n");
    assert!(out.status.success(), "postinst does not parse");

    // The packaged binary runs and reads the packaged configuration.
    let out = Command::new(root.join("usr/bin/hydrascale"))
        .arg("--version")
        .output()
        .expect("packaged binary runs");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hydrascale "));

    // The unit, as installed, against the binary, as installed.
    let (ok, err) = verify_unit(
        &analyze,
        &root,
        &root.join("lib/systemd/system/hydrascale.service"),
    );
    assert!(ok && err.trim().is_empty(), "systemd-analyze verify: {err}");

    // The check has teeth: a value systemd cannot parse is reported.
    let text =
        std::fs::read_to_string(root.join("lib/systemd/system/hydrascale.service")).expect("unit");
    let broken = root.join("etc/systemd/system/broken.service");
    std::fs::create_dir_all(broken.parent().expect("dir")).expect("dir");
    std::fs::write(
        &broken,
        text.replace("ProtectHome=true", "ProtectHome=sometimes"),
    )
    .expect("broken unit");
    let (_, err) = verify_unit(&analyze, &root, &broken);
    assert!(
        err.contains("ProtectHome") || err.contains("protect home"),
        "a bad directive went unnoticed: {err}"
    );
}
