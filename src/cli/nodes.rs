//! `hydrascale nodes`: list (as a table), delete, expire, rename, tag nodes and approve
//! their routes.

use anyhow::{Context, Result};
use clap::Subcommand;

use super::client::{grpc_error, Target};
use super::output::emit;
use super::output::fmt_ms;
use crate::admin::proto;

#[derive(Subcommand)]
pub(super) enum NodesCmd {
    List {
        #[arg(long, short = 'u', default_value = "")]
        user: String,
    },
    Delete {
        #[arg(long, short = 'i')]
        identifier: u64,
    },
    /// Expire a node's key now, or set when it expires (--expiry), or let it never expire
    /// (--disable).
    Expire {
        #[arg(long, short = 'i')]
        identifier: u64,
        /// When the key expires: an RFC 3339 time (2027-01-31T12:00:00Z) or a lifetime
        /// from now (90d, 12h).
        #[arg(long, conflicts_with = "disable")]
        expiry: Option<String>,
        /// The node's key never expires.
        #[arg(long)]
        disable: bool,
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

pub(super) async fn run(cmd: NodesCmd, target: &Target, json: bool) -> Result<()> {
    let mut c = super::client::connect(target).await?;
    match cmd {
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
        NodesCmd::Expire {
            identifier,
            expiry,
            disable,
        } => {
            let r = if expiry.is_none() && !disable {
                c.expire_node(proto::NodeIdRequest { id: identifier }).await
            } else {
                let expiry_ms = expiry.as_deref().map(expiry_time).transpose()?;
                c.set_node_expiry(proto::SetNodeExpiryRequest {
                    id: identifier,
                    expiry_ms,
                    disable,
                })
                .await
            }
            .map_err(grpc_error)?
            .into_inner();
            let n = r.node.context("no node in reply")?;
            emit(json, &n, || match n.expiry_ms {
                None => println!("Node {} never expires", n.given_name),
                Some(at) if at <= crate::state::now_ms() => {
                    println!("Node {} expired", n.given_name)
                }
                Some(at) => println!("Node {} expires at {}", n.given_name, fmt_ms(Some(at))),
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

/// `--expiry`: an RFC 3339 time, or a lifetime from now such as 90d.
fn expiry_time(text: &str) -> Result<i64> {
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX));
    }
    let lifetime = crate::config::parse_duration_ms(text).map_err(|e| {
        anyhow::anyhow!(
            "--expiry {text:?} is neither an RFC 3339 time (2027-01-31T12:00:00Z) nor a lifetime (90d): {e}"
        )
    })?;
    Ok(crate::state::now_ms().saturating_add(lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
