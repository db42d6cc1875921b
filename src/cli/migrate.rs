//! `hydrascale migrate`: bring another control server's tailnet over as a backup file,
//! offline.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::output::{emit, write_private};

#[derive(Subcommand)]
pub(super) enum MigrateCmd {
    /// Turn a headscale (0.23 or newer) SQLite database and Noise key into a backup file
    /// for `cluster restore`: same users, nodes, keys and addresses, so clients need no
    /// new login. Stop headscale first. Uses prefixes from --config.
    Headscale {
        /// headscale's database (`database.sqlite.path`, e.g. /var/lib/headscale/db.sqlite).
        #[arg(long)]
        db: PathBuf,
        /// headscale's Noise private key (`noise.private_key_path`).
        #[arg(long)]
        noise_key: PathBuf,
        /// Backup file to write (holds the control key: keep it secret).
        #[arg(long)]
        out: PathBuf,
        /// headscale's `oidc.issuer`, to carry its OIDC users' identities over (default:
        /// `oidc.issuer` of --config). Users it cannot place are reported, to be linked
        /// with `hydrascale users link`.
        #[arg(long)]
        oidc_issuer: Option<String>,
    },
}

pub(super) fn run(cmd: MigrateCmd, config: Option<&std::path::Path>, json: bool) -> Result<()> {
    match cmd {
        MigrateCmd::Headscale {
            db,
            noise_key,
            out,
            oidc_issuer,
        } => {
            let cfg = crate::config::Config::load(config)?;
            migrate_headscale(&db, &noise_key, &out, oidc_issuer.as_deref(), &cfg, json)
        }
    }
}

/// `migrate headscale`: headscale's tailnet as a backup file.
fn migrate_headscale(
    db: &std::path::Path,
    noise_key: &std::path::Path,
    out: &std::path::Path,
    oidc_issuer: Option<&str>,
    cfg: &crate::config::Config,
    json: bool,
) -> Result<()> {
    let issuer = oidc_issuer
        .or(Some(cfg.oidc.issuer.as_str()))
        .filter(|i| !i.is_empty());
    let (tailnet, report) = crate::migrate::from_headscale(db, noise_key, &cfg.prefixes, issuer)?;
    let b = crate::cluster::encode_backup(&tailnet, 0)?;
    write_private(out, &b.bytes)
        .with_context(|| format!("writing the backup to {}", out.display()))?;
    let summary = serde_json::json!({ "path": out.display().to_string(), "report": report });
    emit(json, &summary, || {
        println!(
            "Migrated {} users, {} nodes and {} pre-auth keys into {}",
            report.users,
            report.nodes,
            report.preauth_keys,
            out.display()
        );
        for r in &report.renamed {
            println!("Renamed: {r}");
        }
        if let Some(owner) = &report.tagged_owner {
            println!("Tagged nodes now belong to user {owner}");
        }
        if report.oidc_linked > 0 {
            println!(
                "{} OIDC users keep their identity (issuer and subject)",
                report.oidc_linked
            );
        }
        for u in &report.oidc_unlinked {
            println!("OIDC user not linked: {u}");
        }
        if report.preauth_keys_skipped > 0 {
            println!(
                "Left out {} pre-auth keys stored only as bcrypt hashes: create new ones",
                report.preauth_keys_skipped
            );
        }
        if report.api_keys_skipped > 0 {
            println!(
                "Left out {} API keys (bcrypt hashes): create new ones with `hydrascale apikeys create`",
                report.api_keys_skipped
            );
        }
        if !report.nodes_with_routes_skipped.is_empty() {
            println!(
                "Not taken over (not prefixes): approved routes of {}",
                report.nodes_with_routes_skipped.join(", ")
            );
        }
        if report.policy_taken {
            println!("Policy: taken over from headscale's database");
        }
        if let Some(why) = &report.policy_refused {
            println!("Not taken over: headscale's policy, which Hydrascale refuses ({why}); fix it and set it with `hydrascale policy set -f FILE`");
        }
        println!(
            "Restore with `hydrascale cluster restore --from {}` on a new cluster, then point clients' login URL (or DNS) at it.",
            out.display()
        );
    })
}
