//! The tailnet's DNS settings between the config file and the replicated state: a replica
//! seeds the state with its `[dns]` once, when none are set (the founding replica, or the
//! first upgraded one of an older cluster); after that `[dns]` is not read, and a replica
//! whose file differs says where the live settings are.

use std::time::Duration;

use tokio::sync::watch;

use tokio::sync::broadcast::error::RecvError;

use crate::state::{Change, Command, Db, DnsSettings};

/// How often a replica retries seeding while the cluster cannot take the write (no leader
/// yet, not a member yet, or an older replica that cannot read the command).
const SEED_RETRY: Duration = Duration::from_secs(3);

/// Seeds the replicated DNS settings with `file` (this replica's `[dns]`) if none are set,
/// retrying until the write is taken or another replica's seed is applied: at once when the
/// replica registry changes (the last replica announcing that it reads the command), and
/// on a timer.
pub async fn seed(db: Db, file: DnsSettings, mut stop: watch::Receiver<bool>) {
    let mut changes = db.store.subscribe();
    loop {
        let live = db.store.read().dns.clone();
        match live {
            Some(live) => {
                if live != file {
                    tracing::info!(
                        "the [dns] section of this replica's config file is not used: the tailnet's DNS settings are replicated; see them with `hydrascale dns show`, change them with `hydrascale dns set`"
                    );
                }
                return;
            }
            None => match db
                .write(Command::SetDns {
                    settings: file.clone(),
                    seed: true,
                })
                .await
            {
                Ok(_) => {
                    if db.store.read().dns.as_ref() == Some(&file) {
                        tracing::info!("DNS settings seeded from this replica's [dns] section");
                    }
                    continue;
                }
                Err(e) => tracing::debug!("DNS settings not seeded yet: {e}"),
            },
        }
        let wait = tokio::time::sleep(SEED_RETRY);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = stop.changed() => return,
                change = changes.recv() => match change {
                    Ok((_, Change::ReplicasChanged | Change::DnsChanged | Change::Reset))
                    | Err(RecvError::Lagged(_)) => break,
                    Ok(_) => {}
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }
}
