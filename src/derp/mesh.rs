//! Mesh links to the other relays of this region: for each peer we dial its
//! `/derp` as a client holding the shared mesh key, send WatchConns, and
//! turn the PeerPresent/PeerGone stream into forwarders in our registry, so
//! a local SendPacket for a key held on the peer becomes a ForwardPacket.
//!
//! Links reconnect with capped exponential backoff; a broken link's
//! forwarders are withdrawn at once so senders get NotHere instead of
//! packets vanishing into a dead socket.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::client::DerpClient;
use super::frame::{Frame, PEER_PRESENT_IS_MESH_PEER};
use super::server::{DerpServer, Forwarder};
use super::DerpError;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Frames queued toward one peer relay before forwarded packets are dropped.
const LINK_QUEUE: usize = 1024;
/// A burst of queued frames goes out in one write of up to this many bytes.
const LINK_BATCH: usize = 64 << 10;

/// Keeps a mesh link to `peer` (`host:port` or `http://host:port[/derp]`)
/// until `shutdown` turns true or its sender is dropped. The server must
/// have been built with a mesh key; without one the task exits at once.
pub fn spawn_mesh_peer(
    server: DerpServer,
    peer: String,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if server.mesh_key().is_none() {
            tracing::warn!(%peer, "mesh peer configured without a mesh key; not dialing");
            return;
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let link_id = server.next_id();
            let mut connected = false;
            let res = tokio::select! {
                r = run_link(&server, &peer, link_id, &mut connected) => r,
                _ = shutdown.changed() => {
                    server.remove_link(link_id);
                    return;
                }
            };
            server.remove_link(link_id);
            if connected {
                backoff = BACKOFF_MIN;
            }
            if let Err(e) = res {
                tracing::debug!(%peer, error = %e, ?backoff, "mesh link down");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    })
}

async fn run_link(
    server: &DerpServer,
    peer: &str,
    link_id: u64,
    connected: &mut bool,
) -> Result<(), DerpError> {
    let client = DerpClient::connect(peer, server.private_key(), server.mesh_key()).await?;
    *connected = true;
    let self_key = server.public_key();
    let (mut rd, wr) = client.split();
    wr.send(&Frame::WatchConns).await?;
    tracing::info!(%peer, "mesh link up");

    let (tx, mut rx) = mpsc::channel::<Bytes>(LINK_QUEUE);
    let writer = async {
        // One write (one syscall, one TCP segment train) for whatever is queued: written
        // one frame at a time, a packet across the mesh cost about four times the CPU of
        // one through a single relay (benches/derp_relay.rs).
        let mut batch = Vec::with_capacity(LINK_BATCH);
        while let Some(b) = rx.recv().await {
            batch.clear();
            batch.extend_from_slice(&b);
            while batch.len() < LINK_BATCH {
                match rx.try_recv() {
                    Ok(b) => batch.extend_from_slice(&b),
                    Err(_) => break,
                }
            }
            wr.send_encoded(&batch).await?;
        }
        Ok::<(), DerpError>(())
    };
    let reader = async {
        loop {
            match rd.recv().await? {
                // Our own link and other relays' links are not endpoints.
                Frame::PeerPresent { key, flags, .. }
                    if key != self_key && flags & PEER_PRESENT_IS_MESH_PEER == 0 =>
                {
                    server.add_forwarder(
                        key,
                        Forwarder {
                            link_id,
                            tx: tx.clone(),
                        },
                    );
                }
                Frame::PeerGone { key, .. } => server.remove_forwarder(&key, link_id),
                _ => {}
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}
