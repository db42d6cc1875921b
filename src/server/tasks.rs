//! A replica's own upkeep tasks that `run_server` supervises: handing freed memory back
//! to the system, and ending the DERP sessions of nodes that stop being current.

use tokio::sync::watch;

use crate::state::Db;

/// When to hand freed memory back: once what the allocator keeps free has grown by
/// [`TrimPolicy::KEPT`] since its lowest point after the last hand-back.
///
/// What it keeps free counts memory already handed back (the pages are gone, the free
/// chunks stay), so "more than 64 MiB free" stayed true after a 10,000-node join storm and
/// the replica handed the same pages back every 30 s at rest: a tenth of its idle CPU,
/// walking every arena and `madvise`-ing pages it no longer had.
#[derive(Debug, Default)]
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
struct TrimPolicy {
    /// The least free memory seen since the last hand-back (or the start).
    low: Option<usize>,
}

impl TrimPolicy {
    const KEPT: usize = 64 << 20;

    /// Whether to hand back now, with `free` bytes kept free by the allocator.
    fn due(&mut self, free: usize) -> bool {
        let low = self.low.map_or(free, |l| l.min(free));
        self.low = Some(low);
        free > low.saturating_add(Self::KEPT)
    }

    /// After a hand-back, with `free` bytes still counted free.
    fn trimmed(&mut self, free: usize) {
        self.low = Some(free);
    }
}

/// Gives memory freed after a burst back to the system. glibc keeps freed memory in its
/// arenas: after 10,000 nodes joined, a replica had 0.5 GiB of heap in use and 1.2 GiB
/// resident, and the difference stayed at rest.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) async fn return_freed_memory(mut stop: watch::Receiver<bool>) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(30);
    // SAFETY: mallinfo2 reads the allocator's counters; no preconditions.
    let free = || unsafe { libc::mallinfo2() }.fordblks;
    let mut policy = TrimPolicy::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if policy.due(free()) {
            // It walks every arena, locking each in turn: not on a runtime thread.
            // SAFETY: malloc_trim has no preconditions.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
            policy.trimmed(free());
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) async fn return_freed_memory(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// How often the relay's sessions are checked against the state for keys that expired
/// with no command (a command's revocation takes effect at once).
const DERP_EXPIRY_SWEEP: std::time::Duration = std::time::Duration::from_secs(15);

/// Ends this replica's DERP sessions of nodes that stop being current: expired or logged
/// out (their key is looked up when the change names the node) and deleted (their key is
/// gone from the state, so every session is checked against `current`, the relay's
/// verifier). Every replica applies the same commands, so each ends its own sessions
/// within moments of the write; the client cannot come back, as the verifier refuses it.
/// Keys that expire by themselves (`node_expiry`), with no command, are swept every
/// [`DERP_EXPIRY_SWEEP`].
pub(super) async fn revoke_derp_sessions(
    derp: crate::derp::DerpServer,
    db: Db,
    current: crate::derp::ClientVerifier,
    mut stop: watch::Receiver<bool>,
) {
    use crate::state::Change;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let mut changes = db.store.subscribe();
    let mut timer = tokio::time::interval(DERP_EXPIRY_SWEEP);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            c = changes.recv() => c,
            _ = timer.tick() => {
                let ended = derp.disconnect_unless(|k| current(k));
                if ended > 0 {
                    tracing::info!(ended, "ended the DERP sessions of expired node keys");
                }
                continue;
            }
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut sweep = false;
        let mut touched = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Ok((_, Change::NodeUpserted(id))) => touched.push(id),
                Ok((_, Change::NodeRemoved(_) | Change::Reset)) | Err(RecvError::Lagged(_)) => {
                    sweep = true
                }
                Ok(_) => {}
                Err(RecvError::Closed) => return,
            }
            next = match changes.try_recv() {
                Ok(c) => Some(Ok(c)),
                Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                Err(_) => None,
            };
        }
        if sweep {
            let ended = derp.disconnect_unless(|k| current(k));
            if ended > 0 {
                tracing::info!(ended, "ended the DERP sessions of removed nodes");
            }
            continue;
        }
        let now = crate::state::now_ms();
        let revoked: Vec<[u8; 32]> = {
            let t = db.store.read();
            touched
                .iter()
                .filter_map(|id| t.nodes.get(id))
                .filter(|n| n.expiry.is_some_and(|e| e <= now))
                .filter_map(|n| {
                    let hex_key = n.node_key.strip_prefix("nodekey:")?;
                    let mut key = [0u8; 32];
                    hex::decode_to_slice(hex_key, &mut key).ok()?;
                    Some(key)
                })
                .collect()
        };
        for key in revoked {
            if derp.disconnect(&key) {
                tracing::info!(key = %hex::encode(key), "ended the DERP session of an expired node");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TrimPolicy;

    const MIB: usize = 1 << 20;

    /// Memory is handed back once after a burst frees it, not again and again at rest
    /// while the same free chunks (already handed back) stay counted; a second burst that
    /// takes memory and frees it again is handed back too.
    #[test]
    fn freed_memory_is_handed_back_once_per_burst() {
        let mut p = TrimPolicy::default();
        // Start: little free.
        assert!(!p.due(10 * MIB));
        // A join storm frees 500 MiB: hand it back.
        assert!(p.due(510 * MIB));
        p.trimmed(480 * MIB);
        // At rest the count stays where it was: nothing more to do, however long.
        for _ in 0..100 {
            assert!(!p.due(480 * MIB));
        }
        // Memory taken again (the free count falls), then freed (it rises): handed back
        // once it is more than 64 MiB above where it fell to.
        assert!(!p.due(100 * MIB));
        assert!(!p.due(160 * MIB));
        assert!(p.due(170 * MIB));
        p.trimmed(170 * MIB);
        assert!(!p.due(170 * MIB));
    }
}
