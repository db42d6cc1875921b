//! `hydrascale cluster`: status, membership changes, leadership transfer, snapshots,
//! backups, starting a cluster (empty or from a backup), and the offline commands: the
//! replicas' TLS certificates and recovering a stopped replica's committed state.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;

use super::client::{grpc_error, AdminClient, Target};
use super::output::{emit, write_private};
use crate::admin::proto;

#[derive(Subcommand)]
pub(super) enum ClusterCmd {
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

pub(super) async fn run(cmd: ClusterCmd, target: &Target, json: bool) -> Result<()> {
    match cmd {
        ClusterCmd::Certs { out, ids, ca } => make_certs(&out, &ids, ca.as_deref()),
        ClusterCmd::Recover { out, data_dir } => {
            let data_dir = match data_dir {
                Some(d) => d,
                None => crate::config::Config::load(target.config.as_deref())?.data_dir,
            };
            recover(&data_dir, &out, json)
        }
        cmd => online(cmd, super::client::connect(target).await?, json).await,
    }
}

/// The subcommands that ask a running replica.
async fn online(cmd: ClusterCmd, mut c: AdminClient, json: bool) -> Result<()> {
    match cmd {
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
        ClusterCmd::Certs { .. } | ClusterCmd::Recover { .. } => {
            unreachable!("offline; handled before connecting")
        }
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
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
