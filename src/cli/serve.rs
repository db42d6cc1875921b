//! `hydrascale serve`: run a replica, and print the commands to take next the way this
//! process was started.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub(super) async fn run(config: Option<&Path>, set: &[String]) -> Result<()> {
    let mut overrides = Vec::new();
    for kv in set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        overrides.push((k.to_string(), v.to_string()));
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = crate::config::Config::load_with(config, &env, &overrides)?;
    let cargo = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let admin = admin_flag(config, &cfg, cargo.as_deref());
    let handle = crate::server::run_server(cfg).await?;
    print!(
        "{}",
        next_steps(&handle.server_url, cargo.as_deref(), admin.as_deref())
    );
    handle.wait_for_shutdown_signal().await?;
    Ok(())
}

/// What the admin commands need to find this replica's admin socket, beyond the defaults,
/// when run in `run_dir` (this process's directory if `None`): the same --config, or
/// (settings given only as --set or environment, or a relative data directory seen from
/// another directory) the socket itself.
fn admin_flag(
    config: Option<&Path>,
    cfg: &crate::config::Config,
    run_dir: Option<&Path>,
) -> Option<String> {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if let Some(file) = config {
        return Some(format!("--config {}", abs(file).display()));
    }
    let elsewhere = cfg.data_dir.is_relative()
        && run_dir.is_some_and(|d| std::env::current_dir().ok().as_deref() != Some(d));
    (cfg.data_dir != crate::config::Config::default().data_dir || elsewhere).then(|| {
        format!(
            "--admin-addr unix:{}",
            abs(&cfg.data_dir.join("admin.sock")).display()
        )
    })
}

/// What `serve` prints once the replica is up: the login URL and the next three commands
/// (a user, a pre-auth key, a client), written the way this process was started: under
/// `cargo run` (`manifest_dir`: cargo sets CARGO_MANIFEST_DIR for what it runs) as cargo
/// commands, otherwise as `hydrascale` ones.
fn next_steps(server_url: &str, manifest_dir: Option<&Path>, admin: Option<&str>) -> String {
    let (prefix, place) = match manifest_dir {
        Some(dir) => (
            "cargo run -q --".to_string(),
            format!(" in {}", dir.display()),
        ),
        None => ("hydrascale".to_string(), String::new()),
    };
    let prefix = match admin {
        Some(flag) => format!("{prefix} {flag}"),
        None => prefix,
    };
    let mut out = format!(
        "Hydrascale is running: clients log in at {server_url}\n\
         Next, in another shell{place}:\n  \
         {prefix} users create alice\n  \
         {prefix} preauthkeys create --user alice --reusable --expiration 24h\n  \
         tailscale up --login-server={server_url} --auth-key=KEY   (KEY: the key the previous command printed)\n"
    );
    if server_url.starts_with("http://") {
        out.push_str(
            "This server has no TLS, so its DERP relay speaks plain HTTP: start each client's tailscaled with TS_DEBUG_USE_DERP_HTTP=1 in its environment (README.md shows two clients on one machine).\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_prints_the_next_commands_as_it_was_started() {
        let url = "http://127.0.0.1:8080";
        let cargo = next_steps(url, Some(Path::new("/src/hydrascale")), None);
        assert!(
            cargo.starts_with("Hydrascale is running: clients log in at http://127.0.0.1:8080\n")
        );
        assert!(cargo.contains("in another shell in /src/hydrascale:"));
        assert!(cargo.contains("\n  cargo run -q -- users create alice\n"));
        assert!(cargo.contains(
            "\n  cargo run -q -- preauthkeys create --user alice --reusable --expiration 24h\n"
        ));
        assert!(cargo.contains("tailscale up --login-server=http://127.0.0.1:8080 --auth-key=KEY"));
        assert!(cargo.contains("TS_DEBUG_USE_DERP_HTTP=1"));
        let installed = next_steps(
            "https://login.example.com",
            None,
            Some("--config /etc/hydrascale/config.toml"),
        );
        assert!(installed
            .contains("\n  hydrascale --config /etc/hydrascale/config.toml users create alice\n"));
        assert!(
            !installed.contains("TS_DEBUG_USE_DERP_HTTP"),
            "with TLS the client needs no DERP-over-HTTP switch"
        );
        let cfg = crate::config::Config {
            data_dir: PathBuf::from("/var/tmp/hs"),
            ..Default::default()
        };
        assert_eq!(
            admin_flag(None, &cfg, None).as_deref(),
            Some("--admin-addr unix:/var/tmp/hs/admin.sock")
        );
        let defaults = crate::config::Config::default();
        assert_eq!(admin_flag(None, &defaults, None), None);
        let here = std::env::current_dir().expect("cwd");
        assert_eq!(admin_flag(None, &defaults, Some(&here)), None);
        // `cargo run --manifest-path` from elsewhere: the commands run in the checkout, and
        // the data directory is relative to here.
        assert_eq!(
            admin_flag(None, &defaults, Some(Path::new("/elsewhere"))),
            Some(format!(
                "--admin-addr unix:{}",
                here.join("hydrascale-data/admin.sock").display()
            ))
        );
    }
}
