//! `hydrascale policy`: print and replace the tailnet policy, and check a policy file
//! offline.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;

use super::client::{grpc_error, Target};
use super::output::emit;
use crate::admin::proto;

#[derive(Subcommand)]
pub(super) enum PolicyCmd {
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

pub(super) async fn run(cmd: PolicyCmd, target: &Target, json: bool) -> Result<()> {
    if let PolicyCmd::Check { file } = &cmd {
        return check(file);
    }
    let mut c = super::client::connect(target).await?;
    match cmd {
        PolicyCmd::Get => {
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
        PolicyCmd::Set { file } => {
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
        PolicyCmd::Check { .. } => {}
    }
    Ok(())
}

/// `policy check`: parses FILE and runs its tests as `policy set` would, offline.
fn check(file: &Path) -> Result<()> {
    let text = read_policy(file)?;
    let policy =
        crate::policy::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    for w in &policy.warnings {
        eprintln!("{}: warning: {w}", file.display());
    }
    println!("{}: the policy is valid and its tests pass", file.display());
    Ok(())
}

fn read_policy(file: &Path) -> Result<String> {
    std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the policy file {}", file.display()))
}
