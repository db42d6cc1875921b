//! The `hydrascale` command line: `serve`, and admin commands that talk to a running
//! server's admin API (never to its files). This module owns the top-level flags and the
//! dispatch; each resource's subcommands, their calls and their output live in the module
//! named after it, the admin API connection in `client`, shared output helpers in `output`.

mod apikeys;
mod auth;
mod client;
mod cluster;
mod dns;
mod migrate;
mod nodes;
mod output;
mod policy;
mod preauthkeys;
mod serve;
mod users;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use apikeys::ApiKeysCmd;
use auth::AuthCmd;
use cluster::ClusterCmd;
use dns::DnsCmd;
use migrate::MigrateCmd;
use nodes::NodesCmd;
use policy::PolicyCmd;
use preauthkeys::KeysCmd;
use users::UsersCmd;

#[derive(Parser)]
#[command(
    name = "hydrascale",
    version,
    about = "Highly available control server for Tailscale networks"
)]
struct Cli {
    /// TOML configuration file (embedded defaults without it). `serve` runs with it; the
    /// admin commands use its data_dir to find the local admin socket.
    #[arg(long, short = 'c', global = true, env = "HYDRASCALE_CONFIG")]
    config: Option<PathBuf>,
    /// Admin API to manage: http://HOST:PORT (needs --api-key) or unix:PATH. Default: the
    /// admin socket in the config's data_dir, or http://127.0.0.1:50443 with --api-key.
    #[arg(long, global = true, env = "HYDRASCALE_ADMIN_ADDR")]
    admin_addr: Option<String>,
    /// API key for the admin API over TCP (`hydrascale apikeys create`).
    #[arg(
        long,
        global = true,
        env = "HYDRASCALE_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a replica (with --config FILE, or on embedded defaults).
    Serve {
        /// Override one setting, e.g. --set server_url=https://login.example.com (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Manage pre-auth keys.
    #[command(subcommand, alias = "preauthkey")]
    Preauthkeys(KeysCmd),
    /// Manage nodes.
    #[command(subcommand, alias = "node")]
    Nodes(NodesCmd),
    /// Manage API keys for the admin API over TCP.
    #[command(subcommand, alias = "apikey")]
    Apikeys(ApiKeysCmd),
    /// Manage the replicas of the cluster (membership changes go to the leader).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Bring a tailnet over from another control server (offline).
    #[command(subcommand)]
    Migrate(MigrateCmd),
    /// Interactive logins (`tailscale up` without a key).
    #[command(subcommand)]
    Auth(AuthCmd),
    /// The tailnet policy (Tailscale's policy file format, HuJSON).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The tailnet's DNS settings (MagicDNS, resolvers, split DNS, extra records).
    #[command(subcommand)]
    Dns(DnsCmd),
}

pub fn main_entry() -> Result<()> {
    // Every file this process makes (RocksDB's, keys, backups) is its owner's alone: the
    // data directory holds the tailnet's keys.
    // SAFETY: umask only sets the process's file creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HYDRASCALE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.output == Output::Json;
    let target = client::Target {
        config: cli.config,
        admin_addr: cli.admin_addr,
        api_key: cli.api_key,
    };
    match cli.command {
        Cmd::Serve { set } => serve::run(target.config.as_deref(), &set).await,
        Cmd::Users(cmd) => users::run(cmd, &target, json).await,
        Cmd::Preauthkeys(cmd) => preauthkeys::run(cmd, &target, json).await,
        Cmd::Nodes(cmd) => nodes::run(cmd, &target, json).await,
        Cmd::Apikeys(cmd) => apikeys::run(cmd, &target, json).await,
        Cmd::Cluster(cmd) => cluster::run(cmd, &target, json).await,
        Cmd::Migrate(cmd) => migrate::run(cmd, target.config.as_deref(), json),
        Cmd::Auth(cmd) => auth::run(cmd, &target, json).await,
        Cmd::Policy(cmd) => policy::run(cmd, &target, json).await,
        Cmd::Dns(cmd) => dns::run(cmd, &target, json).await,
    }
}
