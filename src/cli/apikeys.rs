//! `hydrascale apikeys`: create, list, expire and delete API keys of the admin API.

use anyhow::{Context, Result};
use clap::Subcommand;

use super::client::{grpc_error, Target};
use super::output::emit;
use super::output::fmt_ms;
use crate::admin::proto;

#[derive(Subcommand)]
pub(super) enum ApiKeysCmd {
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

pub(super) async fn run(cmd: ApiKeysCmd, target: &Target, json: bool) -> Result<()> {
    let mut c = super::client::connect(target).await?;
    match cmd {
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
    }
    Ok(())
}
