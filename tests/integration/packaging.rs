//! What the operator installs: the systemd unit passes `systemd-analyze verify`, checked
//! in a directory tree laid out as the package installs it.

use std::path::Path;
use std::process::Command;

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = crate::monitoring::require_system_tool("systemd-analyze") else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    for d in ["usr/bin", "etc/systemd/system", "lib/systemd"] {
        std::fs::create_dir_all(r.join(d)).expect("dir");
    }
    // The targets the unit orders itself against come from the host's systemd.
    let status = Command::new("cp")
        .arg("-r")
        .arg("/lib/systemd/system")
        .arg(r.join("lib/systemd/"))
        .status()
        .expect("cp");
    assert!(status.success(), "copying the host's unit files");
    std::fs::copy(
        env!("CARGO_BIN_EXE_hydrascale"),
        r.join("usr/bin/hydrascale"),
    )
    .expect("binary");
    let unit = r.join("etc/systemd/system/hydrascale.service");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/hydrascale.service");
    std::fs::copy(&shipped, &unit).expect("unit");

    let verify = |unit: &Path| {
        Command::new(&analyze)
            .arg("verify")
            .arg(format!("--root={}", r.display()))
            .arg(unit)
            .output()
            .expect("systemd-analyze")
    };
    let out = verify(&unit);
    let err = String::from_utf8_lossy(&out.stderr);
    // A directive systemd cannot parse is only a warning on stderr, so that must be empty.
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify {}: {err}",
        shipped.display()
    );

    // The check has teeth: a bad value is reported.
    let text = std::fs::read_to_string(&shipped).expect("unit text");
    let broken = r.join("etc/systemd/system/broken.service");
    std::fs::write(
        &broken,
        text.replace("ProtectHome=true", "ProtectHome=sometimes"),
    )
    .expect("broken unit");
    let out = verify(&broken);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ProtectHome")
            || String::from_utf8_lossy(&out.stderr).contains("protect home"),
        "a bad directive went unnoticed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
