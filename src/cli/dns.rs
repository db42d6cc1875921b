//! `hydrascale dns`: show and change the tailnet's DNS settings (replicated: one change
//! reaches clients on every replica).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::client::{grpc_error, Target};
use super::output::emit;
use crate::admin::proto;
use crate::state::{DnsRecord, DnsSettings};

#[derive(Subcommand)]
pub(super) enum DnsCmd {
    /// Print the DNS settings clients get.
    Show,
    /// Change some of the settings; the others stay as they are.
    Set {
        /// MagicDNS on or off (`true`/`false`).
        #[arg(long)]
        magic_dns: Option<bool>,
        /// Resolvers for every name, comma-separated (IP, IP:port, or https:// URL); an
        /// empty value removes them.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        nameservers: Option<Vec<String>>,
        /// true: clients use the nameservers instead of their own; false: only as fallback.
        #[arg(long)]
        override_local_dns: Option<bool>,
        /// Search domains, comma-separated; an empty value removes them.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        search_domains: Option<Vec<String>>,
        /// Split DNS for a domain: DOMAIN=RESOLVER[,RESOLVER...] (DOMAIN= alone: answered
        /// only from the extra records). Repeat for more domains.
        #[arg(long)]
        split: Vec<String>,
        /// Remove split DNS for DOMAIN. Repeat for more domains.
        #[arg(long)]
        remove_split: Vec<String>,
        /// Replace the extra records with those of FILE: a JSON list of
        /// {"name", "type", "value"} (headscale's extra_records format).
        #[arg(long)]
        extra_records: Option<PathBuf>,
    },
}

pub(super) async fn run(cmd: DnsCmd, target: &Target, json: bool) -> Result<()> {
    let mut c = super::client::connect(target).await?;
    let current = c
        .get_dns(proto::Empty {})
        .await
        .map_err(grpc_error)?
        .into_inner();
    let reply = match cmd {
        DnsCmd::Show => current,
        DnsCmd::Set {
            magic_dns,
            nameservers,
            override_local_dns,
            search_domains,
            split,
            remove_split,
            extra_records,
        } => {
            let mut s: DnsSettings = serde_json::from_str(&current.settings_json)
                .context("the server sent DNS settings this CLI cannot read")?;
            if let Some(v) = magic_dns {
                s.magic_dns = v;
            }
            if let Some(v) = nameservers {
                s.nameservers = v.into_iter().filter(|n| !n.is_empty()).collect();
            }
            if let Some(v) = override_local_dns {
                s.override_local_dns = v;
            }
            if let Some(v) = search_domains {
                s.search_domains = v.into_iter().filter(|n| !n.is_empty()).collect();
            }
            for entry in split {
                let (domain, resolvers) = entry.split_once('=').with_context(|| {
                    format!("--split {entry:?}: write DOMAIN=RESOLVER[,RESOLVER...]")
                })?;
                let resolvers = resolvers
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(str::to_string)
                    .collect();
                s.split.insert(domain.to_string(), resolvers);
            }
            for domain in remove_split {
                s.split.remove(&domain);
            }
            if let Some(file) = extra_records {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                s.extra_records =
                    serde_json::from_str::<Vec<DnsRecord>>(&text).with_context(|| {
                        format!(
                            "{} is not a JSON list of {{\"name\", \"type\", \"value\"}} records",
                            file.display()
                        )
                    })?;
            }
            c.set_dns(proto::SetDnsRequest {
                settings_json: serde_json::to_string(&s)?,
            })
            .await
            .map_err(grpc_error)?
            .into_inner()
        }
    };
    let settings: serde_json::Value = serde_json::from_str(&reply.settings_json)?;
    emit(json, &settings, || {
        if !reply.replicated {
            println!("(not seeded yet: each replica serves its own [dns] until one seeds the tailnet's settings)");
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&settings).unwrap_or_default()
        );
    })
}
