//! The `hydrascale` command line: `serve`, and admin commands that talk to a running
//! server's admin API (never to its files).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::admin::proto::{self, admin_service_client::AdminServiceClient};

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
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Print the policy in force, as it was written.
    Get,
    /// Replace the policy with FILE; refused (with line and column) if it does not
    /// parse or its tests fail, and then the previous one stays. An empty file removes it.
    Set {
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
    /// Check FILE as `set` would, without a server and without changing anything.
    Check {
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuthCmd {
    /// Let a machine that ran `tailscale up` without a key in, as a node of USER. The id
    /// is the last part of the URL it printed (…/register/ID).
    Register {
        #[arg(long)]
        user: String,
        #[arg(long)]
        auth_id: String,
    },
    /// Let a Tailscale SSH connection held by a `check` rule go on (or refuse it with
    /// --reject). The id is the last part of the link the ssh user was shown
    /// (…/ssh/check/ID); the whole link works too.
    ApproveSsh {
        #[arg(long)]
        auth_id: String,
        #[arg(long)]
        reject: bool,
    },
}

#[derive(Subcommand)]
enum MigrateCmd {
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

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, roles, term, log and applied indexes, and (on the leader) each member's
    /// replication lag and contact age.
    Status,
    /// Add a running replica (started with cluster.join = true) as a non-voting learner;
    /// returns once it has caught up.
    AddLearner {
        /// The new replica's node_id.
        #[arg(long)]
        id: u64,
        /// The new replica's Raft address (HOST:PORT).
        #[arg(long)]
        raft_addr: String,
    },
    /// Make a learner a voter.
    Promote {
        #[arg(long)]
        id: u64,
    },
    /// Remove a replica from the cluster (voter or learner).
    Remove {
        #[arg(long)]
        id: u64,
    },
    /// Build a Raft snapshot now (compacts the log).
    Snapshot,
    /// Create the cluster CA (or reuse one) and a directory per replica holding only the CA
    /// certificate and that replica's certificate and key: give replica N the directory
    /// OUT/replica-N as cluster.tls_dir. Offline.
    Certs {
        /// Where OUT/ca (the CA: keep it off the replicas) and OUT/replica-ID go.
        #[arg(long)]
        out: PathBuf,
        /// Replica node_ids to issue certificates for, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u64>,
        /// An existing CA directory (ca.pem, ca.key) to issue from, e.g. the data
        /// directory's raft-ca of a replica that started alone; default OUT/ca (made if
        /// missing).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Start a new cluster on the replica at --admin-addr, which must have been started with
    /// cluster.join = true and an empty data directory. Alone, or with --peers (also
    /// started with cluster.join = true); a majority must be running to finish.
    Init {
        /// The other voters, e.g. 2=10.0.0.2:50444,3=10.0.0.3:50444.
        #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
        peers: Vec<(u64, String)>,
    },
    /// Like `init`, but the new cluster starts with the state of a backup (same users,
    /// nodes, addresses and control key, so clients keep working unchanged).
    Restore {
        /// A file written by `hydrascale cluster backup`.
        #[arg(long)]
        from: PathBuf,
        /// The other voters, e.g. 2=10.0.0.2:50444,3=10.0.0.3:50444.
        #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
        peers: Vec<(u64, String)>,
    },
    /// Add a running replica (started with cluster.join = true) as a voter: add-learner,
    /// wait until it has caught up, promote. Send to the leader.
    Join {
        /// The new replica's node_id.
        #[arg(long)]
        id: u64,
        /// The new replica's Raft address (HOST:PORT).
        #[arg(long)]
        raft_addr: String,
    },
    /// Hand leadership to another voter (send to the leader), e.g. before stopping the
    /// leader for maintenance. Writes pause for about one election timeout.
    TransferLeader {
        /// The voter to hand over to; without it, the most caught-up other voter.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Write the whole tailnet state (users, nodes, keys, control key) to a file. Restore
    /// it with `cluster restore` (or cluster.restore_from on a new founding replica).
    Backup {
        /// File to write (replaced atomically); it holds the control key: keep it secret.
        #[arg(long)]
        out: PathBuf,
    },
    /// Offline, on a stopped replica: write the state it knew to be committed as a backup
    /// file, read straight from its data directory (found through --config). For a
    /// cluster that lost its majority for good; restore the file into a new cluster with
    /// `cluster restore`.
    Recover {
        /// File to write (replaced atomically); it holds the control key: keep it secret.
        #[arg(long)]
        out: PathBuf,
        /// The replica's data_dir, if not the one in --config.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ApiKeysCmd {
    /// Create a key; it is shown once, only its hash is stored.
    Create {
        /// Lifetime such as 30m, 1h, 90d; 0 = never expires.
        #[arg(long, short = 'e', default_value = "90d")]
        expiration: String,
    },
    List,
    /// Make a key invalid from now on (it stays listed).
    Expire {
        /// The key's prefix as shown by `apikeys list`.
        prefix: String,
    },
    Delete {
        prefix: String,
    },
}

#[derive(Subcommand)]
enum UsersCmd {
    Create {
        name: String,
        #[arg(long, default_value = "")]
        display_name: String,
    },
    List,
    Rename {
        old: String,
        new: String,
    },
    Delete {
        name: String,
    },
    /// Bind user NAME to an OIDC identity: an OIDC login as exactly this issuer and
    /// subject (the `sub` claim; shown on the page of a refused login) then reaches it.
    /// A first OIDC login never joins an existing user by itself.
    Link {
        #[arg(long)]
        name: String,
        /// The provider's issuer URL, as in oidc.issuer.
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        subject: String,
    },
    /// Remove user NAME's OIDC identity: no OIDC login reaches it any more.
    Unlink {
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    Create {
        #[arg(long, short = 'u')]
        user: String,
        #[arg(long)]
        reusable: bool,
        #[arg(long)]
        ephemeral: bool,
        /// Lifetime such as 30m, 1h, 90d; 0 = never expires.
        #[arg(long, short = 'e', default_value = "1h")]
        expiration: String,
        /// Comma-separated tags, e.g. tag:server,tag:prod.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    List {
        #[arg(long, short = 'u')]
        user: String,
    },
    Expire {
        #[arg(long, short = 'u')]
        user: String,
        /// The key's prefix as shown by `preauthkeys list`.
        prefix: String,
    },
}

#[derive(Subcommand)]
enum NodesCmd {
    List {
        #[arg(long, short = 'u', default_value = "")]
        user: String,
    },
    Delete {
        #[arg(long, short = 'i')]
        identifier: u64,
    },
    Expire {
        #[arg(long, short = 'i')]
        identifier: u64,
    },
    Rename {
        #[arg(long, short = 'i')]
        identifier: u64,
        new_name: String,
    },
    /// Replace a node's tags, e.g. --tags tag:server,tag:prod (no --tags removes them).
    Tag {
        #[arg(long, short = 'i')]
        identifier: u64,
        #[arg(long, short = 't', value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// Set the routes a node may serve, e.g. --routes 10.0.0.0/24 or 0.0.0.0/0,::/0 for an
    /// exit node (no --routes removes them). The node must also advertise them.
    ApproveRoutes {
        #[arg(long, short = 'i')]
        identifier: u64,
        #[arg(long, short = 'r', value_delimiter = ',')]
        routes: Vec<String>,
    },
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

/// `ID=HOST:PORT` for --peers.
fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NODE_ID=HOST:PORT"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {id:?} is not a node_id"))?;
    if addr.rsplit_once(':').is_none() {
        return Err(format!("{s:?}: {addr:?} is not HOST:PORT"));
    }
    Ok((id, addr.trim().to_string()))
}

fn fmt_ms(ms: Option<i64>) -> String {
    ms.map(crate::control::tailcfg_time)
        .unwrap_or_else(|| "-".into())
}

/// Prints `v` as JSON for `-o json`, or runs `human` for the table/sentence form.
fn emit<T: serde::Serialize>(json: bool, v: &T, human: impl FnOnce()) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        human();
    }
    Ok(())
}

fn make_certs(out: &std::path::Path, ids: &[u64], ca_dir: Option<&Path>) -> Result<()> {
    use hydrascale_raft::tls;
    let default_ca = out.join("ca");
    let ca_dir = ca_dir.unwrap_or(&default_ca);
    // Certificates of earlier versions kept the CA beside them, as OUT/ca.pem and ca.key.
    let (flat_cert, flat_key) = (out.join(tls::CA_CERT_FILE), out.join(tls::CA_KEY_FILE));
    let ca = if ca_dir.join(tls::CA_KEY_FILE).exists() {
        println!("Using the existing CA in {}", ca_dir.display());
        tls::CaPem::load_dir(ca_dir)?
    } else if ca_dir == default_ca && flat_cert.exists() && flat_key.exists() {
        println!(
            "Using the existing CA {} (moving it to {})",
            flat_cert.display(),
            default_ca.display()
        );
        let ca = tls::CaPem {
            cert_pem: std::fs::read_to_string(&flat_cert)
                .with_context(|| format!("reading {}", flat_cert.display()))?,
            key_pem: std::fs::read_to_string(&flat_key)
                .with_context(|| format!("reading {}", flat_key.display()))?,
        };
        ca.write_dir(&default_ca)?;
        std::fs::remove_file(&flat_key)
            .with_context(|| format!("removing {}", flat_key.display()))?;
        ca
    } else if ca_dir != default_ca {
        anyhow::bail!(
            "{} holds no CA (ca.pem and ca.key); leave out --ca to make a new one in {}",
            ca_dir.display(),
            default_ca.display()
        );
    } else {
        let ca = tls::generate_ca()?;
        ca.write_dir(ca_dir)?;
        println!(
            "Created the cluster CA in {} (keep ca.key off the replicas: it can certify new ones)",
            ca_dir.display()
        );
        ca
    };
    for id in ids {
        let dir = out.join(format!("replica-{id}"));
        tls::write_replica_dir(&ca, *id, &dir).with_context(|| {
            format!(
                "issuing the certificate of replica {id} (is {} the key of {}?)",
                ca_dir.join(tls::CA_KEY_FILE).display(),
                ca_dir.join(tls::CA_CERT_FILE).display()
            )
        })?;
        println!(
            "Replica {id}: cluster.tls_dir = \"{}\" (give replica {id} only this directory)",
            dir.display()
        );
    }
    Ok(())
}

/// `nodes list` as a table. Tags and routes are lists of any length, so every column is as
/// wide as its longest cell. A route column shows "-" for none.
fn nodes_table(nodes: &[proto::Node]) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    let header = [
        "ID",
        "NAME",
        "USER",
        "IPV4",
        "IPV6",
        "ONLINE",
        "EXPIRES",
        "TAGS",
        "ROUTES APPROVED",
        "ROUTES ADVERTISED",
    ];
    let rows: Vec<[String; 10]> = nodes
        .iter()
        .map(|n| {
            [
                n.id.to_string(),
                n.given_name.clone(),
                n.user.clone(),
                n.ipv4.clone(),
                n.ipv6.clone(),
                n.online.to_string(),
                fmt_ms(n.expiry_ms),
                list(&n.tags),
                list(&n.approved_routes),
                list(&n.available_routes),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = cells
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(&mut header.iter().copied());
    for row in &rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// `cluster status` in words and a table: this replica's Raft state, then every member
/// with its lag and last contact as the leader sees them, and DOWN for one that does not
/// answer.
fn cluster_status_text(r: &proto::ClusterStatusReply) -> String {
    use std::fmt::Write;
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replica {} is {} in term {}; leader {}; log {} applied {} snapshot {}",
        r.id,
        r.role,
        r.term,
        opt(r.leader),
        opt(r.last_log_index),
        opt(r.applied_index),
        opt(r.snapshot_index)
    );
    match r.view_of {
        Some(l) if l != r.id => {
            let _ = writeln!(
                out,
                "lag, contact and state as the leader, replica {l}, sees them (asked over Raft)"
            );
        }
        _ => {}
    }
    if !r.note.is_empty() {
        let _ = writeln!(out, "{}", r.note);
    }
    let _ = writeln!(
        out,
        "{:<4} {:<8} {:<6} {:<22} {:<22} {:<22} {:<6} CONTACT",
        "ID", "ROLE", "STATE", "RAFT", "ADMIN", "DERP", "LAG"
    );
    for m in &r.members {
        let role = if Some(m.id) == r.leader {
            "leader"
        } else if m.voter {
            "voter"
        } else {
            "learner"
        };
        let state = if m.down {
            "DOWN"
        } else if r.view_of.is_some() {
            "up"
        } else {
            "?"
        };
        let contact = m
            .last_contact_ms
            .map_or("-".to_string(), |ms| format!("{ms} ms ago"));
        // Entries the leader has that the member does not.
        let lag = match (r.view_last_log_index, m.matched_index) {
            (Some(last), Some(matched)) => last.saturating_sub(matched).to_string(),
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<4} {:<8} {:<6} {:<22} {:<22} {:<22} {lag:<6} {contact}",
            m.id, role, state, m.raft_addr, m.admin_addr, m.derp
        );
    }
    out
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

/// `cluster recover`: the committed state of the stopped replica in `data_dir`, as a backup.
fn recover(data_dir: &std::path::Path, out: &std::path::Path, json: bool) -> Result<()> {
    let (b, r) = crate::cluster::recover_backup(data_dir)?;
    write_private(out, &b.bytes)
        .with_context(|| format!("writing the backup to {}", out.display()))?;
    let summary = serde_json::json!({
        "path": out.display().to_string(),
        "committed_index": r.committed_index,
        "last_log_index": r.last_log_index,
        "voters": r.voters,
        "users": b.users,
        "nodes": b.nodes,
        "preauth_keys": b.preauth_keys,
    });
    emit(json, &summary, || {
        println!(
            "Recovered {} users, {} nodes, {} pre-auth keys, committed up to log index {} (voters then: {:?}), written to {}",
            b.users, b.nodes, b.preauth_keys, r.committed_index, r.voters, out.display()
        );
        if r.last_log_index > r.committed_index {
            println!(
                "Left out: log entries {}..={} were never known to be committed here.",
                r.committed_index + 1,
                r.last_log_index
            );
        }
        println!(
            "Of several survivors, use the one with the highest committed index. Restore with `hydrascale cluster restore --from {}` on a new cluster.",
            out.display()
        );
    })
}

/// Writes `bytes` to `path` readable by its owner only, via a temporary file and a
/// rename so a crash never leaves half a backup under the final name.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Adds the API key, if any, to every admin call.
#[derive(Clone)]
struct ApiKeyHeader(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for ApiKeyHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type AdminClient = AdminServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ApiKeyHeader>,
>;

/// Connects to the admin API named by --admin-addr, or by default the local admin socket
/// (no key needed), or TCP on loopback when only an API key is given.
async fn connect(cli: &Cli) -> Result<AdminClient> {
    let target = match (&cli.admin_addr, &cli.api_key) {
        (Some(a), _) => a.clone(),
        (None, Some(_)) => "http://127.0.0.1:50443".into(),
        (None, None) => {
            let cfg = crate::config::Config::load(cli.config.as_deref())?;
            format!("unix:{}", cfg.data_dir.join("admin.sock").display())
        }
    };
    let channel = if let Some(path) = target.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        let dial = path.clone();
        // The URI is required by the API and unused: the connector dials the socket.
        tonic::transport::Endpoint::from_static("http://admin.socket")
            .connect_with_connector(tower::service_fn(move |_| {
                let dial = dial.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(dial).await?,
                    ))
                }
            }))
            .await
            .with_context(|| {
                format!(
                    "cannot reach the admin socket {}; is `hydrascale serve` running with this config (--config / HYDRASCALE_CONFIG), and are you its user? For a remote replica pass --admin-addr http://HOST:PORT and --api-key",
                    path.display()
                )
            })?
    } else {
        tonic::transport::Endpoint::from_shared(target.clone())
            .with_context(|| format!("--admin-addr {target:?} is not a URL like http://HOST:PORT or unix:PATH"))?
            .connect()
            .await
            .with_context(|| {
                format!("cannot reach the admin API at {target}; is `hydrascale serve` running? (set --admin-addr)")
            })?
    };
    let header = cli
        .api_key
        .as_deref()
        .map(|k| format!("Bearer {}", k.trim()).parse())
        .transpose()
        .context("the API key holds characters an HTTP header cannot carry")?;
    // Node lists and backups of large tailnets exceed tonic's 4 MiB default.
    Ok(
        AdminServiceClient::with_interceptor(channel, ApiKeyHeader(header))
            .max_decoding_message_size(usize::MAX),
    )
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

/// An admin call's failure as the user sees it. The server's statuses already say what
/// happened and what to do (`admin::raft_status` and the state errors); a status tonic
/// made itself, from a transport error, means the call got no answer at all.
fn grpc_error(e: tonic::Status) -> anyhow::Error {
    let mut cause = std::error::Error::source(&e);
    if cause.is_none() {
        return anyhow::anyhow!("{}", e.message());
    }
    let mut causes = vec![e.message().to_string()];
    while let Some(c) = cause {
        let text = c.to_string();
        if !causes.iter().any(|seen| seen.contains(&text)) {
            causes.push(text);
        }
        cause = c.source();
    }
    anyhow::anyhow!(
        "the admin API gave no answer ({}): is the replica still running? Retry, or ask another replica (--admin-addr, or --config of another replica)",
        causes.join(": ")
    )
}

fn read_policy(file: &Path) -> Result<String> {
    std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the policy file {}", file.display()))
}

async fn run(cli: Cli) -> Result<()> {
    if let Cmd::Cluster(ClusterCmd::Certs { out, ids, ca }) = &cli.command {
        return make_certs(out, ids, ca.as_deref());
    }
    if let Cmd::Migrate(MigrateCmd::Headscale {
        db,
        noise_key,
        out,
        oidc_issuer,
    }) = &cli.command
    {
        let cfg = crate::config::Config::load(cli.config.as_deref())?;
        let json = cli.output == Output::Json;
        return migrate_headscale(db, noise_key, out, oidc_issuer.as_deref(), &cfg, json);
    }
    if let Cmd::Cluster(ClusterCmd::Recover { out, data_dir }) = &cli.command {
        let data_dir = match data_dir {
            Some(d) => d.clone(),
            None => crate::config::Config::load(cli.config.as_deref())?.data_dir,
        };
        return recover(&data_dir, out, cli.output == Output::Json);
    }
    if let Cmd::Policy(PolicyCmd::Check { file }) = &cli.command {
        let text = read_policy(file)?;
        crate::policy::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        println!("{}: the policy is valid and its tests pass", file.display());
        return Ok(());
    }
    if let Cmd::Serve { set } = &cli.command {
        let mut overrides = Vec::new();
        for kv in set {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
            overrides.push((k.to_string(), v.to_string()));
        }
        let env: Vec<(String, String)> = std::env::vars().collect();
        let cfg = crate::config::Config::load_with(cli.config.as_deref(), &env, &overrides)?;
        let cargo = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
        let admin = admin_flag(cli.config.as_deref(), &cfg, cargo.as_deref());
        let handle = crate::server::run_server(cfg).await?;
        print!(
            "{}",
            next_steps(&handle.server_url, cargo.as_deref(), admin.as_deref())
        );
        handle.wait_for_shutdown_signal().await?;
        return Ok(());
    }
    let mut c = connect(&cli).await?;
    let json = cli.output == Output::Json;
    match cli.command {
        Cmd::Serve { .. } => {}
        Cmd::Users(cmd) => match cmd {
            UsersCmd::Create { name, display_name } => {
                let r = c
                    .create_user(proto::CreateUserRequest { name, display_name })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let u = r.user.context("no user in reply")?;
                emit(json, &u, || {
                    println!("User {} created (id {})", u.name, u.id);
                })?;
            }
            UsersCmd::List => {
                let r = c
                    .list_users(proto::Empty {})
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                emit(json, &r.users, || {
                    println!(
                        "{:<6} {:<24} {:<24} {:<20} {:<10} OIDC SUBJECT",
                        "ID", "NAME", "DISPLAY NAME", "CREATED", "ORIGIN"
                    );
                    for u in &r.users {
                        println!(
                            "{:<6} {:<24} {:<24} {:<20} {:<10} {}",
                            u.id,
                            u.name,
                            u.display_name,
                            fmt_ms(Some(u.created_ms)),
                            u.origin,
                            u.oidc_subject
                        );
                    }
                })?;
            }
            UsersCmd::Rename { old, new } => {
                let r = c
                    .rename_user(proto::RenameUserRequest {
                        old_name: old,
                        new_name: new,
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let u = r.user.context("no user in reply")?;
                emit(json, &u, || {
                    println!("User renamed to {}", u.name);
                })?;
            }
            UsersCmd::Link {
                name,
                issuer,
                subject,
            } => {
                if issuer.trim().is_empty() || subject.trim().is_empty() {
                    anyhow::bail!("--issuer and --subject must not be empty (to unbind a user, use `hydrascale users unlink`)");
                }
                let r = c
                    .link_user(proto::LinkUserRequest {
                        name,
                        issuer,
                        subject,
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let u = r.user.context("no user in reply")?;
                emit(json, &u, || {
                    println!(
                        "User {} is now the OIDC identity {} of {}",
                        u.name, u.oidc_subject, u.oidc_issuer
                    );
                })?;
            }
            UsersCmd::Unlink { name } => {
                let r = c
                    .link_user(proto::LinkUserRequest {
                        name,
                        issuer: String::new(),
                        subject: String::new(),
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let u = r.user.context("no user in reply")?;
                emit(json, &u, || {
                    println!("User {} has no OIDC identity now", u.name);
                })?;
            }
            UsersCmd::Delete { name } => {
                c.delete_user(proto::DeleteUserRequest { name: name.clone() })
                    .await
                    .map_err(grpc_error)?;
                emit(json, &serde_json::json!({ "deleted": name }), || {
                    println!("User {name} deleted");
                })?;
            }
        },
        Cmd::Preauthkeys(cmd) => match cmd {
            KeysCmd::Create {
                user,
                reusable,
                ephemeral,
                expiration,
                tags,
            } => {
                let expiration_ms = crate::config::parse_duration_ms(&expiration)
                    .map_err(|e| anyhow::anyhow!("--expiration: {e}"))?;
                let r = c
                    .create_pre_auth_key(proto::CreatePreAuthKeyRequest {
                        user,
                        reusable,
                        ephemeral,
                        expiration_ms,
                        tags,
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let k = r.key.context("no key in reply")?;
                emit(json, &k, || {
                    println!("{}", k.key);
                    eprintln!("(shown once; only its hash is stored)");
                })?;
            }
            KeysCmd::List { user } => {
                let r = c
                    .list_pre_auth_keys(proto::ListPreAuthKeysRequest { user })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                emit(json, &r.keys, || {
                    println!(
                        "{:<6} {:<22} {:<8} {:<9} {:<5} {:<22} TAGS",
                        "ID", "PREFIX", "REUSABLE", "EPHEMERAL", "USED", "EXPIRES"
                    );
                    for k in &r.keys {
                        println!(
                            "{:<6} {:<22} {:<8} {:<9} {:<5} {:<22} {}",
                            k.id,
                            k.prefix,
                            k.reusable,
                            k.ephemeral,
                            k.used,
                            fmt_ms(k.expiration_ms),
                            k.tags.join(",")
                        );
                    }
                })?;
            }
            KeysCmd::Expire { user, prefix } => {
                let r = c
                    .expire_pre_auth_key(proto::ExpirePreAuthKeyRequest { user, prefix })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let k = r.key.context("no key in reply")?;
                emit(json, &k, || {
                    println!("Key {} expired", k.prefix);
                })?;
            }
        },
        Cmd::Apikeys(cmd) => match cmd {
            ApiKeysCmd::Create { expiration } => {
                let expiration_ms = crate::config::parse_duration_ms(&expiration)
                    .map_err(|e| anyhow::anyhow!("--expiration: {e}"))?;
                let r = c
                    .create_api_key(proto::CreateApiKeyRequest { expiration_ms })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let k = r.key.context("no key in reply")?;
                emit(json, &k, || {
                    println!("{}", k.key);
                    eprintln!("(shown once; only its hash is stored)");
                })?;
            }
            ApiKeysCmd::List => {
                let r = c
                    .list_api_keys(proto::Empty {})
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                emit(json, &r.keys, || {
                    println!("{:<6} {:<14} {:<22} CREATED", "ID", "PREFIX", "EXPIRES");
                    for k in &r.keys {
                        println!(
                            "{:<6} {:<14} {:<22} {}",
                            k.id,
                            k.prefix,
                            fmt_ms(k.expiration_ms),
                            fmt_ms(Some(k.created_ms))
                        );
                    }
                })?;
            }
            ApiKeysCmd::Expire { prefix } => {
                let r = c
                    .expire_api_key(proto::ApiKeyPrefixRequest { prefix })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let k = r.key.context("no key in reply")?;
                emit(json, &k, || println!("API key {} expired", k.prefix))?;
            }
            ApiKeysCmd::Delete { prefix } => {
                c.delete_api_key(proto::ApiKeyPrefixRequest {
                    prefix: prefix.clone(),
                })
                .await
                .map_err(grpc_error)?;
                println!("API key {prefix} deleted");
            }
        },
        Cmd::Nodes(cmd) => match cmd {
            NodesCmd::List { user } => {
                let r = c
                    .list_nodes(proto::ListNodesRequest { user })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                emit(json, &r.nodes, || print!("{}", nodes_table(&r.nodes)))?;
            }
            NodesCmd::Delete { identifier } => {
                c.delete_node(proto::NodeIdRequest { id: identifier })
                    .await
                    .map_err(grpc_error)?;
                emit(json, &serde_json::json!({ "deleted": identifier }), || {
                    println!("Node {identifier} deleted");
                })?;
            }
            NodesCmd::Expire { identifier } => {
                let r = c
                    .expire_node(proto::NodeIdRequest { id: identifier })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let n = r.node.context("no node in reply")?;
                emit(json, &n, || {
                    println!("Node {} expired", n.given_name);
                })?;
            }
            NodesCmd::Rename {
                identifier,
                new_name,
            } => {
                let r = c
                    .rename_node(proto::RenameNodeRequest {
                        id: identifier,
                        new_name,
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let n = r.node.context("no node in reply")?;
                emit(json, &n, || {
                    println!("Node {} renamed to {}", n.id, n.given_name);
                })?;
            }
            NodesCmd::Tag { identifier, tags } => {
                let r = c
                    .set_tags(proto::SetTagsRequest {
                        id: identifier,
                        tags,
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let n = r.node.context("no node in reply")?;
                emit(json, &n, || {
                    println!("Node {} tags: {}", n.id, n.tags.join(","));
                })?;
            }
            NodesCmd::ApproveRoutes { identifier, routes } => {
                let r = c
                    .approve_routes(proto::ApproveRoutesRequest {
                        id: identifier,
                        routes,
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                let n = r.node.context("no node in reply")?;
                emit(json, &n, || {
                    println!(
                        "Node {} approved routes: {} (advertised: {}; carried now: {})",
                        n.id,
                        n.approved_routes.join(","),
                        n.available_routes.join(","),
                        n.subnet_routes.join(",")
                    );
                })?;
            }
        },
        Cmd::Policy(PolicyCmd::Get) => {
            let r = c
                .get_policy(proto::Empty {})
                .await
                .map_err(grpc_error)?
                .into_inner();
            emit(json, &r, || {
                if r.policy.is_empty() {
                    eprintln!("No policy is set: every node may reach every other.");
                } else {
                    print!("{}", r.policy);
                    if !r.policy.ends_with('\n') {
                        println!();
                    }
                }
            })?;
        }
        Cmd::Policy(PolicyCmd::Set { file }) => {
            let policy = read_policy(&file)?;
            let r = c
                .set_policy(proto::SetPolicyRequest { policy })
                .await
                .map_err(grpc_error)?
                .into_inner();
            emit(json, &r, || {
                if r.policy.is_empty() {
                    println!("Policy removed: every node may reach every other.");
                } else {
                    println!("Policy set from {}", file.display());
                }
            })?;
        }
        Cmd::Policy(PolicyCmd::Check { .. }) => {}
        Cmd::Auth(AuthCmd::Register { user, auth_id }) => {
            // Accept the whole URL too: it is what the user has in front of them.
            let auth_id = crate::state::PendingLogin::id_from(&auth_id).to_string();
            let r = c
                .complete_login(proto::CompleteLoginRequest { auth_id, user })
                .await
                .map_err(grpc_error)?
                .into_inner();
            let n = r.node.context("no node in reply")?;
            emit(json, &n, || {
                println!(
                    "Node {} ({}) registered, address {}",
                    n.id, n.given_name, n.ipv4
                );
            })?;
        }
        Cmd::Auth(AuthCmd::ApproveSsh { auth_id, reject }) => {
            let auth_id = auth_id
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(&auth_id)
                .to_string();
            c.decide_ssh_check(proto::DecideSshCheckRequest {
                auth_id: auth_id.clone(),
                approve: !reject,
            })
            .await
            .map_err(grpc_error)?;
            let verdict = if reject { "refused" } else { "approved" };
            emit(
                json,
                &serde_json::json!({ "auth_id": auth_id, "decision": verdict }),
                || {
                    println!("SSH check {auth_id} {verdict}");
                },
            )?;
        }
        Cmd::Migrate(_) => unreachable!("offline; handled before connecting"),
        Cmd::Cluster(cmd) => match cmd {
            ClusterCmd::Status => {
                let r = c
                    .cluster_status(proto::Empty {})
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                emit(json, &r, || print!("{}", cluster_status_text(&r)))?;
            }
            ClusterCmd::AddLearner { id, raft_addr } => {
                c.add_learner(proto::AddLearnerRequest {
                    id,
                    raft_addr: raft_addr.clone(),
                })
                .await
                .map_err(grpc_error)?;
                println!("Replica {id} ({raft_addr}) added as a learner and caught up; promote it with `hydrascale cluster promote --id {id}`");
            }
            ClusterCmd::Promote { id } => {
                c.promote(proto::MemberIdRequest { id })
                    .await
                    .map_err(grpc_error)?;
                println!("Replica {id} is now a voter");
            }
            ClusterCmd::Remove { id } => {
                c.remove_member(proto::MemberIdRequest { id })
                    .await
                    .map_err(grpc_error)?;
                println!("Replica {id} removed from the cluster; stop its process");
            }
            ClusterCmd::Snapshot => {
                c.snapshot(proto::Empty {}).await.map_err(grpc_error)?;
                println!("Snapshot taken");
            }
            ClusterCmd::Certs { out, ids, ca } => make_certs(&out, &ids, ca.as_deref())?,
            ClusterCmd::Recover { .. } => unreachable!("offline; handled before connecting"),
            ClusterCmd::Init { peers } => {
                let r = c
                    .init_cluster(proto::InitClusterRequest {
                        peers: peers.into_iter().collect(),
                        backup: Vec::new(),
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                emit(json, &r, || {
                    println!("New cluster started; control key {}", r.control_key);
                })?;
            }
            ClusterCmd::Restore { from, peers } => {
                let backup = std::fs::read(&from)
                    .with_context(|| format!("reading the backup {}", from.display()))?;
                let r = c
                    .init_cluster(proto::InitClusterRequest {
                        peers: peers.into_iter().collect(),
                        backup,
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                emit(json, &r, || {
                    println!(
                        "New cluster started from {}: {} users, {} nodes; control key {}",
                        from.display(),
                        r.users,
                        r.nodes,
                        r.control_key
                    );
                })?;
            }
            ClusterCmd::Join { id, raft_addr } => {
                c.add_learner(proto::AddLearnerRequest {
                    id,
                    raft_addr: raft_addr.clone(),
                })
                .await
                .map_err(grpc_error)?;
                c.promote(proto::MemberIdRequest { id })
                    .await
                    .map_err(grpc_error)
                    .with_context(|| format!("replica {id} was added as a learner and caught up, but promoting it failed; retry with `hydrascale cluster promote --id {id}`"))?;
                println!("Replica {id} ({raft_addr}) joined the cluster as a voter");
            }
            ClusterCmd::TransferLeader { to } => {
                let r = c
                    .transfer_leader(proto::TransferLeaderRequest {
                        to: to.unwrap_or(0),
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                emit(json, &r, || {
                    println!(
                        "Replica {} is the leader now (writes paused {} ms)",
                        r.leader, r.paused_ms
                    );
                })?;
            }
            ClusterCmd::Backup { out } => {
                let r = c
                    .backup(proto::Empty {})
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                write_private(&out, &r.backup)
                    .with_context(|| format!("writing the backup to {}", out.display()))?;
                let summary = serde_json::json!({
                    "path": out.display().to_string(),
                    "applied_index": r.applied_index,
                    "users": r.users,
                    "nodes": r.nodes,
                    "preauth_keys": r.preauth_keys,
                    "bytes": r.backup.len(),
                });
                emit(json, &summary, || {
                    println!(
                        "Backup of {} users, {} nodes, {} pre-auth keys (log index {}) written to {}",
                        r.users,
                        r.nodes,
                        r.preauth_keys,
                        r.applied_index,
                        out.display()
                    );
                })?;
            }
        },
    }
    Ok(())
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

    #[test]
    fn nodes_table_shows_tags_and_routes() {
        let node = |id: u64, name: &str, tags: &[&str], approved: &[&str], adv: &[&str]| {
            let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            proto::Node {
                id,
                given_name: name.into(),
                user: "alice".into(),
                ipv4: format!("100.64.0.{id}"),
                ipv6: format!("fd7a:115c:a1e0::{id}"),
                online: true,
                tags: v(tags),
                approved_routes: v(approved),
                available_routes: v(adv),
                ..Default::default()
            }
        };
        let table = nodes_table(&[
            node(
                1,
                "router",
                &["tag:router", "tag:prod"],
                &["10.0.0.0/24"],
                &["10.0.0.0/24", "192.168.1.0/24"],
            ),
            node(2, "laptop", &[], &[], &[]),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        for h in ["TAGS", "ROUTES APPROVED", "ROUTES ADVERTISED"] {
            assert!(lines[0].contains(h), "{table}");
        }
        assert!(
            lines[1].ends_with("tag:router,tag:prod  10.0.0.0/24      10.0.0.0/24,192.168.1.0/24"),
            "{table}"
        );
        // Columns line up: every row's TAGS cell starts where the header's does.
        let col = lines[0].find("TAGS").expect("TAGS");
        assert_eq!(lines[1].find("tag:router"), Some(col), "{table}");
        assert_eq!(&lines[2][col..col + 1], "-", "{table}");
    }

    #[test]
    fn cluster_status_on_a_follower_names_whose_view_it_shows() {
        let member =
            |id: u64, down: bool, matched: Option<u64>, contact: Option<u64>| proto::Member {
                id,
                raft_addr: format!("10.0.0.{id}:50444"),
                admin_addr: format!("10.0.0.{id}:50443"),
                derp: format!("10.0.0.{id}:443"),
                voter: true,
                matched_index: matched,
                last_contact_ms: contact,
                down,
            };
        let reply = proto::ClusterStatusReply {
            id: 2,
            role: "Follower".into(),
            term: 3,
            leader: Some(1),
            last_log_index: Some(40),
            view_of: Some(1),
            view_last_log_index: Some(42),
            members: vec![
                member(1, false, Some(42), None),
                member(2, false, Some(40), Some(120)),
                member(3, true, Some(30), Some(9000)),
            ],
            ..Default::default()
        };
        let text = cluster_status_text(&reply);
        assert!(
            text.contains("as the leader, replica 1, sees them"),
            "{text}"
        );
        let row = |id: &str| {
            text.lines()
                .find(|l| l.starts_with(id))
                .unwrap_or_else(|| panic!("{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(row("1 ")[1..3], ["leader", "up"]);
        assert_eq!(row("2 ")[2], "up");
        // Lag counts from the leader's last index, not this follower's.
        assert_eq!(row("2 ")[6], "2");
        assert_eq!(row("3 ")[2], "DOWN");
        assert_eq!(row("3 ")[6..], ["12", "9000", "ms", "ago"]);
        let lost = proto::ClusterStatusReply {
            view_of: None,
            note: "replica 2 knows no leader".into(),
            ..reply
        };
        let text = cluster_status_text(&lost);
        assert!(text.contains("replica 2 knows no leader"), "{text}");
        assert!(!text.contains("sees them"), "{text}");
    }
}
