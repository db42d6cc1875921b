//! The relay: per-connection handshake, the registry of connected clients
//! keyed by node public key, packet routing (local queue, mesh forwarder, or
//! PeerGone), mesh-peer privileges, and the counters exported as metrics.
//!
//! Each connection gets a reader (this task) and a writer task. Packets for a
//! client go through a small bounded queue and are dropped when it is full,
//! so one slow receiver never stalls senders. Control frames go through a
//! bounded queue too, so a client that pings without reading cannot grow the
//! relay's memory: a pong or a "peer not here" that does not fit is dropped
//! (the client's own ping times out, as on a lossy path). A mesh peer
//! watching presence gets a much larger queue, since a lost presence frame
//! would desynchronise it; one that still falls behind is disconnected and
//! starts over with a full flood when it reconnects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use crypto_box::aead::Aead;
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use rand::{Rng, RngCore};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::frame::{
    encode_recv_packet, read_frame, Frame, Key, PeerGoneReason, FRAME_CLIENT_INFO,
    FRAME_CLOSE_PEER, FRAME_FORWARD_PACKET, FRAME_NOTE_PREFERRED, FRAME_PING, FRAME_SEND_PACKET,
    FRAME_WATCH_CONNS, KEEP_ALIVE, KEY_LEN, MAX_CLIENT_INFO_LEN, MAX_FRAME_SIZE, MAX_PACKET_SIZE,
    NONCE_LEN, PEER_PRESENT_IS_MESH_PEER, PEER_PRESENT_IS_PROBER, PEER_PRESENT_IS_REGULAR,
};
use super::DerpError;

/// Packets queued per client before further ones are dropped.
pub const PER_CLIENT_QUEUE: usize = 32;
/// Control frames (pongs, peer-gone) queued per regular client. Go's derper keeps
/// one pending pong; a client answered this far behind is pinging faster than it reads.
pub const CONTROL_QUEUE: usize = 16;
/// Control frames queued per mesh peer: one presence frame per client of this relay
/// when it starts watching, then one per connect or disconnect. A queue this long is
/// about 7 MiB; the memory is taken only as frames queue up.
pub const MESH_CONTROL_QUEUE: usize = 1 << 17;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not drain its socket for this long is cut off rather
/// than left holding a writer task forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// NotHere replies: one per second on average, bursts of three.
const PEER_GONE_BURST: f64 = 3.0;
const PEER_GONE_PER_SEC: f64 = 1.0;

/// Relay counters, read by the metrics exporter. Gauges and counters are
/// plain atomics so the hot path never takes a lock to update them.
#[derive(Debug, Default)]
pub struct DerpStats {
    /// Gauge: clients currently registered (mesh peers included).
    pub clients_connected: AtomicU64,
    /// Counter: successful handshakes.
    pub clients_accepted: AtomicU64,
    /// Counter: connections that failed the handshake.
    pub handshake_failures: AtomicU64,
    /// Counter: packets queued to a local client.
    pub packets_relayed: AtomicU64,
    /// Counter: payload bytes queued to a local client.
    pub bytes_relayed: AtomicU64,
    /// Counter: packets handed to a mesh peer as ForwardPacket.
    pub packets_forwarded: AtomicU64,
    /// Counter: packets dropped because the destination queue was full or closed.
    pub packets_dropped_queue_full: AtomicU64,
    /// Counter: packets dropped because nobody holds the destination key.
    pub packets_dropped_unknown_dest: AtomicU64,
    /// Counter: handshakes refused because the client is not a node of the tailnet.
    pub clients_rejected: AtomicU64,
    /// Counter: pongs and peer-gone frames not queued because the client's control queue
    /// was full.
    pub pongs_dropped: AtomicU64,
    pub peer_gone_dropped: AtomicU64,
    /// Counter: mesh watchers disconnected because their control queue was full.
    pub watchers_cut: AtomicU64,
}

/// Decides whether a client key (a node key) may use the relay.
pub type ClientVerifier = Arc<dyn Fn(&Key) -> bool + Send + Sync>;

#[derive(Clone)]
struct ClientHandle {
    conn_id: u64,
    packets: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
    addr: Option<SocketAddr>,
    flags: u8,
}

/// A mesh link able to reach a key held by another relay.
#[derive(Clone)]
pub(crate) struct Forwarder {
    pub link_id: u64,
    pub tx: mpsc::Sender<Bytes>,
}

/// A mesh connection watching who connects: its control queue, and how to cut it off
/// when that is full.
struct Watcher {
    ctrl: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
}

impl Watcher {
    /// Queues `frame`; a watcher too far behind to take it is disconnected (it resyncs
    /// when it reconnects), never waited for. False if it was cut off.
    fn send(&self, frame: Bytes, stats: &DerpStats) -> bool {
        match self.ctrl.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.cancel.is_cancelled() {
                    stats.watchers_cut.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("mesh peer fell behind on presence frames; disconnecting it");
                }
                self.cancel.cancel();
                false
            }
        }
    }
}

#[derive(Default)]
struct Registry {
    clients: HashMap<Key, ClientHandle>,
    /// Mesh connections that sent WatchConns, by connection id.
    watchers: HashMap<u64, Watcher>,
    forwarders: HashMap<Key, Forwarder>,
}

struct Inner {
    private_key: [u8; 32],
    public_key: [u8; 32],
    mesh_key: Option<[u8; 32]>,
    registry: Mutex<Registry>,
    stats: DerpStats,
    next_id: AtomicU64,
    verifier: Option<ClientVerifier>,
    /// Which relays may mesh: holding the mesh key is not enough, their key must pass this.
    mesh_verifier: Option<ClientVerifier>,
}

/// The DERP relay. Cheap to clone; all clones share one registry.
#[derive(Clone)]
pub struct DerpServer {
    inner: Arc<Inner>,
}

enum Target {
    Local(mpsc::Sender<Bytes>),
    Mesh(mpsc::Sender<Bytes>),
}

#[derive(Deserialize)]
struct ClientInfoJson {
    #[serde(rename = "meshKey", default)]
    mesh_key: Option<String>,
    #[serde(rename = "IsProber", default)]
    is_prober: bool,
}

pub(crate) fn public_key_of(private_key: &[u8; 32]) -> [u8; 32] {
    *SecretKey::from(*private_key).public_key().as_bytes()
}

/// NaCl box to `peer`: returns nonce ‖ tag ‖ ciphertext, the layout Go's
/// `key.NodePrivate.SealTo` produces.
pub(crate) fn seal(private_key: &[u8; 32], peer: &Key, plaintext: &[u8]) -> Bytes {
    let b = SalsaBox::new(&PublicKey::from(*peer), &SecretKey::from(*private_key));
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let mut out = nonce.to_vec();
    // Encryption into a Vec cannot fail; an empty box would just fail to open.
    out.extend(
        b.encrypt(Nonce::from_slice(&nonce), plaintext)
            .unwrap_or_default(),
    );
    Bytes::from(out)
}

/// Opens nonce ‖ box from `peer`.
pub(crate) fn open(
    private_key: &[u8; 32],
    peer: &Key,
    sealed: &[u8],
) -> Result<Vec<u8>, DerpError> {
    if sealed.len() < NONCE_LEN {
        return Err(DerpError::Crypto);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let b = SalsaBox::new(&PublicKey::from(*peer), &SecretKey::from(*private_key));
    b.decrypt(Nonce::from_slice(nonce), ct)
        .map_err(|_| DerpError::Crypto)
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut d = 0u8;
    for (x, y) in a.iter().zip(b) {
        d |= x ^ y;
    }
    // Keeps the optimiser from turning the fold into an early-exit compare.
    std::hint::black_box(d) == 0
}

fn keepalive_interval() -> Duration {
    // Jitter keeps a restart from lining up every client's keepalive.
    KEEP_ALIVE + Duration::from_millis(rand::thread_rng().gen_range(0..5000))
}

/// Token bucket for PeerGone(NotHere), so a client spraying unknown keys
/// cannot make us amplify its traffic.
struct GoneLimiter {
    tokens: f64,
    last: Instant,
}

impl GoneLimiter {
    fn new() -> Self {
        Self {
            tokens: PEER_GONE_BURST,
            last: Instant::now(),
        }
    }
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * PEER_GONE_PER_SEC).min(PEER_GONE_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl DerpServer {
    pub fn new(private_key: [u8; 32], mesh_key: Option<[u8; 32]>) -> Self {
        Self::with_verifier(private_key, mesh_key, None)
    }

    /// A relay that admits only clients `verifier` accepts (mesh peers, which prove the
    /// mesh key, always get in): the relay of one tailnet rather than an open relay.
    pub fn with_verifier(
        private_key: [u8; 32],
        mesh_key: Option<[u8; 32]>,
        verifier: Option<ClientVerifier>,
    ) -> Self {
        Self::with_verifiers(private_key, mesh_key, verifier, None)
    }

    /// As [`DerpServer::with_verifier`], and a relay that proves the mesh key meshes only
    /// if `mesh_verifier` accepts its key too (one of the cluster's registered relays): the
    /// mesh key alone stays with whoever ever held the control key (a removed replica, a
    /// backup), the registry follows the cluster.
    pub fn with_verifiers(
        private_key: [u8; 32],
        mesh_key: Option<[u8; 32]>,
        verifier: Option<ClientVerifier>,
        mesh_verifier: Option<ClientVerifier>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                public_key: public_key_of(&private_key),
                private_key,
                mesh_key,
                registry: Mutex::new(Registry::default()),
                stats: DerpStats::default(),
                next_id: AtomicU64::new(1),
                verifier,
                mesh_verifier,
            }),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.inner.public_key
    }

    pub fn stats(&self) -> &DerpStats {
        &self.inner.stats
    }

    /// Number of clients currently registered.
    pub fn client_count(&self) -> usize {
        self.lock().clients.len()
    }

    pub(crate) fn private_key(&self) -> [u8; 32] {
        self.inner.private_key
    }

    pub(crate) fn mesh_key(&self) -> Option<[u8; 32]> {
        self.inner.mesh_key
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves plain maps behind, which are
        // still consistent enough to keep relaying.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Serves one DERP connection until it ends. `skip_101` means the HTTP
    /// 101 response has already been written (as hyper does) or must not be
    /// (fast start); otherwise the raw 101 is written first.
    pub async fn serve_conn<S>(&self, stream: S, skip_101: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_conn_with_addr(stream, skip_101, None).await
    }

    /// Like [`serve_conn`](Self::serve_conn), with the client's address for
    /// the PeerPresent frames sent to mesh watchers.
    pub async fn serve_conn_with_addr<S>(&self, stream: S, skip_101: bool, addr: Option<SocketAddr>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self.run_conn(stream, skip_101, addr).await {
            Ok(()) | Err(DerpError::Closed) => {}
            Err(e) => tracing::debug!(error = %e, ?addr, "derp connection ended"),
        }
    }

    async fn run_conn<S>(
        &self,
        stream: S,
        skip_101: bool,
        addr: Option<SocketAddr>,
    ) -> Result<(), DerpError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::new(rd);
        let mut wr = BufWriter::new(wr);
        let hs = timeout(
            HANDSHAKE_TIMEOUT,
            self.handshake(&mut rd, &mut wr, skip_101),
        )
        .await
        .unwrap_or(Err(DerpError::Timeout));
        let (key, flags) = match hs {
            Ok(v) => v,
            Err(e) => {
                self.inner
                    .stats
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let is_mesh = flags & PEER_PRESENT_IS_MESH_PEER != 0;
        self.inner
            .stats
            .clients_accepted
            .fetch_add(1, Ordering::Relaxed);

        let conn_id = self.next_id();
        let cancel = CancellationToken::new();
        let (ptx, prx) = mpsc::channel(PER_CLIENT_QUEUE);
        let (ctx, crx) = mpsc::channel(if is_mesh {
            MESH_CONTROL_QUEUE
        } else {
            CONTROL_QUEUE
        });
        // ServerInfo goes out through the writer, after registration, so a
        // client that has finished its handshake is guaranteed reachable.
        let sealed = seal(&self.inner.private_key, &key, br#"{"version":2}"#);
        let _ = ctx.try_send(Frame::ServerInfo { sealed }.encode());
        self.register(
            key,
            ClientHandle {
                conn_id,
                packets: ptx,
                cancel: cancel.clone(),
                addr,
                flags,
            },
        );
        let writer = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let r = write_loop(wr, prx, crx, &cancel).await;
                // Tear down the reader too: a dead writer means a dead conn.
                cancel.cancel();
                r
            })
        };
        let res = self
            .read_loop(&mut rd, key, conn_id, is_mesh, &ctx, &cancel)
            .await;
        self.unregister(&key, conn_id);
        cancel.cancel();
        let wres = writer.await.unwrap_or(Ok(()));
        res.and(wres)
    }

    async fn handshake<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
        skip_101: bool,
    ) -> Result<(Key, u8), DerpError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if !skip_101 {
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
                 Derp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n",
                hex::encode(self.inner.public_key)
            );
            wr.write_all(resp.as_bytes()).await?;
        }
        wr.write_all(
            &Frame::ServerKey {
                key: self.inner.public_key,
            }
            .encode(),
        )
        .await?;
        wr.flush().await?;

        let (typ, payload) = read_frame(rd, MAX_CLIENT_INFO_LEN).await?;
        if typ != FRAME_CLIENT_INFO {
            return Err(DerpError::UnexpectedFrame(typ));
        }
        let Frame::ClientInfo { key, sealed } = Frame::parse(typ, payload)? else {
            return Err(DerpError::UnexpectedFrame(typ));
        };
        let plain = open(&self.inner.private_key, &key, &sealed)?;
        let info: ClientInfoJson = serde_json::from_slice(&plain)
            .map_err(|e| DerpError::Handshake(format!("client info json: {e}")))?;
        let is_mesh = match (&self.inner.mesh_key, info.mesh_key.as_deref()) {
            (Some(ours), Some(theirs)) => {
                let mut t = [0u8; 32];
                hex::decode_to_slice(theirs, &mut t).is_ok() && ct_eq(ours, &t)
            }
            _ => false,
        };
        if is_mesh {
            if let Some(verify) = &self.inner.mesh_verifier {
                if !verify(&key) {
                    self.inner
                        .stats
                        .clients_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    // For a moment while a replica starts, its peers may not have applied
                    // its announcement yet (it retries); a removed replica stays refused.
                    tracing::info!(key = %hex::encode(key), "a relay with the mesh key but no place in the replica registry tried to mesh; refused");
                    return Err(DerpError::UnknownClient);
                }
            }
        } else {
            if let Some(verify) = &self.inner.verifier {
                if !verify(&key) {
                    self.inner
                        .stats
                        .clients_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(DerpError::UnknownClient);
                }
            }
        }
        let flags = if is_mesh {
            PEER_PRESENT_IS_MESH_PEER
        } else if info.is_prober {
            PEER_PRESENT_IS_PROBER
        } else {
            PEER_PRESENT_IS_REGULAR
        };

        Ok((key, flags))
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        key: Key,
        conn_id: u64,
        is_mesh: bool,
        ctrl: &mpsc::Sender<Bytes>,
        cancel: &CancellationToken,
    ) -> Result<(), DerpError> {
        let stats = &self.inner.stats;
        let mut gone = GoneLimiter::new();
        loop {
            let (typ, payload) = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = read_frame(rd, MAX_FRAME_SIZE) => match r {
                    Err(DerpError::Closed) => return Ok(()),
                    r => r?,
                },
            };
            match typ {
                FRAME_SEND_PACKET => {
                    if payload.len() < KEY_LEN {
                        return Err(DerpError::Malformed("short send packet"));
                    }
                    if payload.len() - KEY_LEN > MAX_PACKET_SIZE {
                        return Err(DerpError::FrameTooLarge {
                            typ,
                            len: payload.len(),
                            max: KEY_LEN + MAX_PACKET_SIZE,
                        });
                    }
                    let Frame::SendPacket { dst, packet } = Frame::parse(typ, payload)? else {
                        return Err(DerpError::UnexpectedFrame(typ));
                    };
                    if !self.route(&key, &dst, &packet, true) && gone.allow() {
                        let gone = Frame::PeerGone {
                            key: dst,
                            reason: PeerGoneReason::NotHere,
                        };
                        if ctrl.try_send(gone.encode()).is_err() {
                            stats.peer_gone_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                FRAME_FORWARD_PACKET => {
                    if !is_mesh {
                        return Err(DerpError::NotPermitted("ForwardPacket"));
                    }
                    let Frame::ForwardPacket { src, dst, packet } = Frame::parse(typ, payload)?
                    else {
                        return Err(DerpError::UnexpectedFrame(typ));
                    };
                    // Never re-forward: a packet crosses at most one mesh hop,
                    // which rules out loops between relays.
                    self.route(&src, &dst, &packet, false);
                }
                FRAME_PING => {
                    if let Frame::Ping(data) = Frame::parse(typ, payload)? {
                        if ctrl.try_send(Frame::Pong(data).encode()).is_err() {
                            stats.pongs_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                FRAME_WATCH_CONNS => {
                    if !is_mesh {
                        return Err(DerpError::NotPermitted("WatchConns"));
                    }
                    self.add_watcher(
                        conn_id,
                        Watcher {
                            ctrl: ctrl.clone(),
                            cancel: cancel.clone(),
                        },
                    );
                }
                FRAME_CLOSE_PEER => {
                    if !is_mesh {
                        return Err(DerpError::NotPermitted("ClosePeer"));
                    }
                    if let Frame::ClosePeer { key } = Frame::parse(typ, payload)? {
                        self.close_peer(&key);
                    }
                }
                // Home-region preference only matters for metrics we do not
                // keep; KeepAlive/Pong and unknown types are skipped.
                FRAME_NOTE_PREFERRED => {}
                _ => {}
            }
        }
    }

    /// Routes one packet; returns false if nobody holds `dst`.
    fn route(&self, src: &Key, dst: &Key, packet: &[u8], may_forward: bool) -> bool {
        let target = {
            let reg = self.lock();
            match reg.clients.get(dst) {
                Some(c) => Some(Target::Local(c.packets.clone())),
                None if may_forward => reg.forwarders.get(dst).map(|f| Target::Mesh(f.tx.clone())),
                None => None,
            }
        };
        let stats = &self.inner.stats;
        let (tx, frame, counter) = match target {
            Some(Target::Local(tx)) => {
                (tx, encode_recv_packet(src, packet), &stats.packets_relayed)
            }
            Some(Target::Mesh(tx)) => (
                tx,
                Frame::ForwardPacket {
                    src: *src,
                    dst: *dst,
                    packet: Bytes::copy_from_slice(packet),
                }
                .encode(),
                &stats.packets_forwarded,
            ),
            None => {
                stats
                    .packets_dropped_unknown_dest
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
        };
        if tx.try_send(frame).is_ok() {
            counter.fetch_add(1, Ordering::Relaxed);
            stats
                .bytes_relayed
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
        } else {
            stats
                .packets_dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    fn register(&self, key: Key, handle: ClientHandle) {
        let present = Frame::PeerPresent {
            key,
            addr: handle.addr,
            flags: handle.flags,
        }
        .encode();
        let mut reg = self.lock();
        match reg.clients.insert(key, handle) {
            // The newest connection for a key wins; the old one is told to go.
            Some(old) => old.cancel.cancel(),
            None => {
                self.inner
                    .stats
                    .clients_connected
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        for w in reg.watchers.values() {
            w.send(present.clone(), &self.inner.stats);
        }
    }

    fn unregister(&self, key: &Key, conn_id: u64) {
        let mut reg = self.lock();
        reg.watchers.remove(&conn_id);
        // A replaced connection must not evict its replacement.
        if reg.clients.get(key).is_some_and(|c| c.conn_id == conn_id) {
            reg.clients.remove(key);
            self.inner
                .stats
                .clients_connected
                .fetch_sub(1, Ordering::Relaxed);
            let gone = Frame::PeerGone {
                key: *key,
                reason: PeerGoneReason::Disconnected,
            }
            .encode();
            for w in reg.watchers.values() {
                w.send(gone.clone(), &self.inner.stats);
            }
        }
    }

    fn add_watcher(&self, conn_id: u64, watcher: Watcher) {
        // Flood and subscribe under one lock so no change falls in between.
        let mut reg = self.lock();
        for (key, c) in &reg.clients {
            let present = Frame::PeerPresent {
                key: *key,
                addr: c.addr,
                flags: c.flags,
            };
            if !watcher.send(present.encode(), &self.inner.stats) {
                return;
            }
        }
        reg.watchers.insert(conn_id, watcher);
    }

    /// Ends the connections of the regular clients (mesh peers stay) whose key `keep`
    /// refuses, as when their node was expired, logged out or deleted; how many ended.
    /// `keep` runs without the registry locked.
    pub fn disconnect_unless(&self, keep: impl Fn(&Key) -> bool) -> usize {
        self.disconnect_unless_of(false, keep)
    }

    /// Ends the connections of mesh peers the mesh verifier no longer admits (a relay
    /// that left the replica registry); returns how many.
    pub fn revalidate_mesh(&self) -> usize {
        match &self.inner.mesh_verifier {
            Some(admit) => self.disconnect_unless_of(true, |k| admit(k)),
            None => 0,
        }
    }

    /// Ends the connections of regular clients (`mesh`: of mesh peers) that `keep`
    /// refuses, checked outside the registry's lock.
    fn disconnect_unless_of(&self, mesh: bool, keep: impl Fn(&Key) -> bool) -> usize {
        let clients: Vec<(Key, CancellationToken)> = self
            .lock()
            .clients
            .iter()
            .filter(|(_, c)| (c.flags & PEER_PRESENT_IS_MESH_PEER != 0) == mesh)
            .map(|(k, c)| (*k, c.cancel.clone()))
            .collect();
        let mut ended = 0;
        for (key, cancel) in clients {
            if !keep(&key) {
                cancel.cancel();
                ended += 1;
            }
        }
        ended
    }

    /// Ends the connection of the regular client `key`, if one is here; whether it was.
    pub fn disconnect(&self, key: &Key) -> bool {
        match self.lock().clients.get(key) {
            Some(c) if c.flags & PEER_PRESENT_IS_MESH_PEER == 0 => {
                c.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    fn close_peer(&self, key: &Key) {
        if let Some(c) = self.lock().clients.get(key) {
            c.cancel.cancel();
        }
    }

    pub(crate) fn add_forwarder(&self, key: Key, fwd: Forwarder) {
        self.lock().forwarders.insert(key, fwd);
    }

    pub(crate) fn remove_forwarder(&self, key: &Key, link_id: u64) {
        let mut reg = self.lock();
        if reg
            .forwarders
            .get(key)
            .is_some_and(|f| f.link_id == link_id)
        {
            reg.forwarders.remove(key);
        }
    }

    pub(crate) fn remove_link(&self, link_id: u64) {
        self.lock().forwarders.retain(|_, f| f.link_id != link_id);
    }

    /// Number of remote keys reachable through mesh links.
    pub fn forwarder_count(&self) -> usize {
        self.lock().forwarders.len()
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut packets: mpsc::Receiver<Bytes>,
    mut ctrl: mpsc::Receiver<Bytes>,
    cancel: &CancellationToken,
) -> Result<(), DerpError> {
    let ka = tokio::time::sleep(keepalive_interval());
    tokio::pin!(ka);
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            Some(b) = ctrl.recv() => b,
            Some(b) = packets.recv() => b,
            _ = &mut ka => {
                ka.as_mut().reset(Instant::now() + keepalive_interval());
                Frame::KeepAlive.encode()
            }
        };
        let batch = async {
            wr.write_all(&first).await?;
            // Drain whatever is already queued so a burst costs one flush.
            while let Some(b) = ctrl.try_recv().ok().or_else(|| packets.try_recv().ok()) {
                wr.write_all(&b).await?;
            }
            wr.flush().await
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = timeout(WRITE_TIMEOUT, batch) => r.map_err(|_| DerpError::Timeout)??,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_roundtrip_and_layout() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let sealed = seal(&a, &public_key_of(&b), b"hello");
        // nonce + 16-byte tag + plaintext length
        assert_eq!(sealed.len(), NONCE_LEN + 16 + 5);
        assert_eq!(open(&b, &public_key_of(&a), &sealed).unwrap(), b"hello");
        assert!(open(&b, &public_key_of(&[3u8; 32]), &sealed).is_err());
        assert!(open(&b, &public_key_of(&a), &sealed[..10]).is_err());
    }

    #[test]
    fn box_matches_nacl_vector() {
        // The crypto_box test vector from NaCl (tests/box.c), which Go's
        // x/crypto/nacl/box reproduces: tag first, then ciphertext.
        let alicesk: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        let bobpk: [u8; 32] =
            hex::decode("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
                .unwrap()
                .try_into()
                .unwrap();
        let nonce = hex::decode("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37").unwrap();
        let msg = hex::decode(
            "be075fc53c81f2d5cf141316ebeb0c7b5228c52a4c62cbd44b66849b64244ffc\
             e5ecbaaf33bd751a1ac728d45e6c61296cdc3c01233561f41db66cce314adb31\
             0e3be8250c46f06dceea3a7fa1348057e2f6556ad6b1318a024a838f21af1fde\
             048977eb48f59ffd4924ca1c60902e52f0a089bc76897040e082f93776384864\
             5e0705",
        )
        .unwrap();
        let b = SalsaBox::new(&PublicKey::from(bobpk), &SecretKey::from(alicesk));
        let out = b.encrypt(Nonce::from_slice(&nonce), &msg[..]).unwrap();
        assert_eq!(hex::encode(&out[..16]), "f3ffc7703f9400e52a7dfb4b3d3305d9");
    }

    #[test]
    fn gone_limiter_bursts_then_limits() {
        let mut l = GoneLimiter::new();
        assert!(l.allow() && l.allow() && l.allow());
        assert!(!l.allow());
    }

    #[test]
    fn ct_eq_works() {
        assert!(ct_eq(&[5; 32], &[5; 32]));
        let mut x = [5; 32];
        x[31] = 6;
        assert!(!ct_eq(&[5; 32], &x));
    }
}
