//! `hydrascale preauthkeys`: create, list, expire and delete pre-auth keys.

use anyhow::{Context, Result};
use clap::Subcommand;

use super::client::{grpc_error, Target};
use super::output::emit;
use super::output::fmt_ms;
use crate::admin::proto;

#[derive(Subcommand)]
pub(super) enum KeysCmd {
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
    /// Delete a key by its id (the ID column of `preauthkeys list`); the nodes it
    /// registered stay.
    Delete {
        #[arg(long)]
        id: u64,
    },
}

pub(super) async fn run(cmd: KeysCmd, target: &Target, json: bool) -> Result<()> {
    let mut c = super::client::connect(target).await?;
    match cmd {
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
        KeysCmd::Delete { id } => {
            c.delete_pre_auth_key(proto::PreAuthKeyIdRequest { id })
                .await
                .map_err(grpc_error)?;
            emit(json, &serde_json::json!({ "deleted": id }), || {
                println!("Key {id} deleted");
            })?;
        }
    }
    Ok(())
}
