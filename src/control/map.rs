//! `/machine/map`: endpoint updates and the streaming long-poll of network maps.
//!
//! A stream sends one full map, then deltas as committed changes are applied on this
//! replica, coalescing bursts into one message, with a keep-alive well inside the
//! client's 120 s watchdog.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tokio::sync::{broadcast, mpsc};

use super::context::{ControlError, ControlState};
use super::keys::parse_node_key;
use super::limits::{self, MAX_MAP_BODY, MAX_STREAMS_PER_NODE};
use super::noise_peer::NoisePeer;
use crate::mapper::shared_frames::{encode_frame, keep_alive_frame};
use crate::mapper::{Resync, StreamView};
use crate::state::{now_ms, Change, Command, Node};
use crate::tailcfg::{MapRequest, MapResponse};

const KEEPALIVE: Duration = Duration::from_secs(50);

/// One stream sends at most one update per slot of this length (see [`next_update_at`]).
/// A change after a quiet spell goes out at once; changes arriving while the stream waits
/// are merged into its next message, so a join storm costs each stream a few messages a
/// second, not one per change (which, on thousands of streams, would starve the
/// replica's Raft traffic).
const MIN_UPDATE_INTERVAL: Duration = Duration::from_millis(200);

/// When a stream that last sent an update at `last` may send the next: at the start of the
/// next slot of [`MIN_UPDATE_INTERVAL`] counted from `epoch` (one for all streams of the
/// process), so at most one update per slot. In a burst of changes every stream then
/// wakes at the same instants and reads the same changes, so most send the same peers and
/// share their compressed runs (`mapper::shared_frames`); with streams free-running,
/// each woke at its own phase and sent its own mix.
fn next_update_at(epoch: tokio::time::Instant, last: tokio::time::Instant) -> tokio::time::Instant {
    let step = MIN_UPDATE_INTERVAL.as_nanos();
    let slot = last.saturating_duration_since(epoch).as_nanos() / step;
    let at = u64::try_from((slot + 1) * step).unwrap_or(u64::MAX);
    epoch + Duration::from_nanos(at)
}

fn update_epoch() -> tokio::time::Instant {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(tokio::time::Instant::now)
}

pub async fn handle(
    State(st): State<Arc<ControlState>>,
    Extension(peer): Extension<NoisePeer>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return super::register::body_refused(&st, "/machine/map", MAX_MAP_BODY, e)
                .into_response()
        }
    };
    match map(st, peer, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// What a map request may change, checked against the limits before anything is: the
/// Hostinfo as it would be stored. A refused request changes nothing.
fn checked_hostinfo(st: &ControlState, req: &MapRequest) -> Result<Option<String>, ControlError> {
    check_map_request(req).map_err(|e| match e {
        MapRequestError::Limit(r) => st.refuse(r),
        MapRequestError::Malformed(m) => ControlError::BadRequest(m.into()),
    })
}

/// Why [`check_map_request`] refused a request.
pub(crate) enum MapRequestError {
    Limit(limits::Refusal),
    Malformed(&'static str),
}

/// The handler's checks without the metrics: the fuzz harness runs exactly these.
pub(crate) fn check_map_request(req: &MapRequest) -> Result<Option<String>, MapRequestError> {
    if let Some(e) = &req.endpoints {
        limits::check_endpoints(e).map_err(MapRequestError::Limit)?;
    }
    if !req.disco_key.is_empty() {
        let hex_part = req.disco_key.strip_prefix("discokey:").unwrap_or("");
        if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(MapRequestError::Malformed(
                "DiscoKey must be discokey: and 64 hex digits",
            ));
        }
    }
    req.hostinfo
        .as_ref()
        .map(limits::hostinfo_text)
        .transpose()
        .map_err(MapRequestError::Limit)
}

async fn map(
    st: Arc<ControlState>,
    peer: NoisePeer,
    body: &[u8],
) -> Result<Response, ControlError> {
    st.check_serving()?;
    let req: MapRequest = serde_json::from_slice(body)
        .map_err(|e| ControlError::BadRequest(format!("map request is not valid JSON: {e}")))?;
    let node_key = parse_node_key(&req.node_key)?;
    let node: Node = st
        .db
        .store
        .read()
        .node_by_node_key(&node_key)
        .cloned()
        .ok_or_else(|| {
            ControlError::NotFound("node key not registered; run `tailscale up` again".into())
        })?;
    if node.machine_key != peer.machine_key {
        tracing::warn!(node = node.id, machine = %peer.machine_key, "map request for a node of another machine");
        return Err(ControlError::Unauthorized(
            "node key belongs to another machine".into(),
        ));
    }
    let now = now_ms();
    if node.expiry.is_some_and(|e| e <= now) {
        return Err(ControlError::Forbidden(
            "node key expired; log in again with `tailscale up`".into(),
        ));
    }
    // A node of this tailnet, on its own machine's session.
    peer.identity.identified();
    let hostinfo = checked_hostinfo(&st, &req)?;
    // Taken before the full map is made, so streams over the limit cost nothing more.
    let slot = if req.stream {
        Some(StreamSlot::take(&st, node.id).ok_or_else(|| {
            st.refuse(limits::Refusal {
                limit: crate::metrics::Limit::MapStreamsPerNode,
                message: format!(
                    "this node already has {MAX_STREAMS_PER_NODE} map streams open on this replica; close one first"
                ),
            })
        })?)
    } else {
        None
    };
    apply_client_update(&st, &node, &req, hostinfo, now).await?;
    if !req.stream && req.omit_peers {
        return Ok(StatusCode::OK.into_response());
    }
    let mut view = StreamView::new(node.id);
    // Subscribe before reading the state so no change between the two is missed.
    let changes = st.db.store.subscribe();
    let first = {
        let t = st.db.store.read();
        view.full(&t, &st.peers, &st.config, &st.derp_map(&t), now)
    }
    .ok_or_else(|| ControlError::NotFound("node was deleted".into()))?;
    tracing::debug!(
        node = node.id,
        seq = view.synced(),
        peers = first.peers.as_ref().map_or(0, Vec::len),
        stream = req.stream,
        "map: full map"
    );
    let first =
        encode_frame(&first, &st.frames).map_err(|e| ControlError::Internal(e.to_string()))?;
    let metrics = &st.metrics;
    metrics.map_responses_full.fetch_add(1, Ordering::Relaxed);
    metrics
        .map_bytes
        .fetch_add(first.len() as u64, Ordering::Relaxed);
    let Some(slot) = slot else {
        return Ok(Response::new(Body::from(first)));
    };
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    if tx.send(first).await.is_err() {
        return Ok(StatusCode::OK.into_response());
    }
    tokio::spawn(run_stream(st, view, changes, tx, slot));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Ok(Response::new(Body::from_stream(stream)))
}

/// Writes endpoints, disco key and hostinfo through Raft, but only when they differ,
/// so periodic identical updates cost nothing.
async fn apply_client_update(
    st: &ControlState,
    node: &Node,
    req: &MapRequest,
    hostinfo: Option<String>,
    now: i64,
) -> Result<(), ControlError> {
    if let Some(cmd) = client_update(node, req, hostinfo, now) {
        st.updates.write(cmd).await?;
    }
    Ok(())
}

/// The update a map request makes to `node`, if it changes anything.
pub(crate) fn client_update(
    node: &Node,
    req: &MapRequest,
    hostinfo: Option<String>,
    now: i64,
) -> Option<Command> {
    let disco = Some(req.disco_key.clone()).filter(|d| !d.is_empty() && *d != node.disco_key);
    let endpoints = req.endpoints.clone().filter(|e| *e != node.endpoints);
    let hostinfo = hostinfo.filter(|h| *h != node.hostinfo);
    let home_derp = req
        .hostinfo
        .as_ref()
        .and_then(|h| h.pointer("/NetInfo/PreferredDERP"))
        .and_then(|v| v.as_i64())
        .and_then(|v| i32::try_from(v).ok())
        .filter(|d| *d != node.home_derp);
    let hostname = req
        .hostinfo
        .as_ref()
        .and_then(|h| h.get("Hostname"))
        .and_then(|h| h.as_str())
        .map(str::to_string)
        .filter(|h| *h != node.hostname);
    if disco.is_none() && endpoints.is_none() && hostinfo.is_none() && home_derp.is_none() {
        return None;
    }
    Some(Command::UpdateNode {
        node_key: node.node_key.clone(),
        disco_key: disco,
        endpoints,
        hostinfo,
        hostname,
        home_derp,
        now,
    })
}

async fn set_online(st: &ControlState, node_id: u64, online: bool) {
    let res = st
        .updates
        .write(Command::SetOnline {
            node_id,
            online,
            replica: st.me.id,
            now: now_ms(),
        })
        .await;
    if let Err(e) = res {
        tracing::debug!(node = node_id, online, error = %e, "could not record online state");
    }
}

/// Counts an open map stream for as long as it lives, however its task ends.
struct StreamGauge(std::sync::Arc<crate::metrics::Metrics>);

impl StreamGauge {
    fn open(m: &std::sync::Arc<crate::metrics::Metrics>) -> Self {
        m.map_streams.fetch_add(1, Ordering::Relaxed);
        StreamGauge(m.clone())
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.map_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One of a node's map streams on this replica (at most [`MAX_STREAMS_PER_NODE`]); the
/// place is given back when the stream ends, however it ends.
struct StreamSlot {
    st: Arc<ControlState>,
    id: u64,
    /// The node's first stream here: it goes online when the stream starts.
    first: bool,
    closed: bool,
}

impl StreamSlot {
    fn take(st: &Arc<ControlState>, id: u64) -> Option<StreamSlot> {
        let mut s = st.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let c = s.entry(id).or_insert(0);
        if *c >= MAX_STREAMS_PER_NODE {
            return None;
        }
        *c += 1;
        st.sessions_changed.fetch_add(1, Ordering::AcqRel);
        Some(StreamSlot {
            st: st.clone(),
            id,
            first: *c == 1,
            closed: false,
        })
    }

    /// Gives the place back; true if it was the node's last stream here.
    fn close(&mut self) -> bool {
        self.closed = true;
        close_session(&self.st, self.id)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if !self.closed {
            close_session(&self.st, self.id);
        }
    }
}

fn close_session(st: &ControlState, id: u64) -> bool {
    let mut s = st.sessions.lock().unwrap_or_else(|p| p.into_inner());
    st.sessions_changed.fetch_add(1, Ordering::AcqRel);
    match s.get_mut(&id) {
        Some(c) if *c > 1 => {
            *c -= 1;
            false
        }
        _ => {
            s.remove(&id);
            true
        }
    }
}

/// How often a replica compares the online state with the streams it holds.
const RECONCILE: Duration = Duration::from_secs(2);

/// Keeps each node's online state true to the streams this replica holds. Opening and
/// closing a stream write it once, but that write can fail (an election is under way, the
/// quorum is out of reach), and the leader marks a silent replica's nodes offline even
/// when the replica was only paused and its streams live on. So, while in contact with
/// the quorum, nodes streaming here but recorded offline (or online elsewhere) are marked
/// online here, and nodes recorded online here without a stream are marked offline.
///
/// A pass walks every node. At rest nothing changes between passes, so a pass that found
/// nothing to correct is not repeated until the state or the streams change (the state's
/// version, the streams' count of opens and closes) or the replica regains the quorum.
pub async fn reconcile_online(st: Arc<ControlState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut clean: Option<(u64, u64)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !*st.serving.borrow() {
            clean = None;
            continue;
        }
        // Read before the pass: a change during it makes the next pass run.
        let seen = (
            st.db.store.version(),
            st.sessions_changed.load(Ordering::Acquire),
        );
        if clean == Some(seen) {
            continue;
        }
        let streaming: std::collections::HashSet<u64> = st
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        let fixes: Vec<(u64, bool)> = {
            let t = st.db.store.read();
            let me = st.me.id;
            let mut v: Vec<(u64, bool)> = streaming
                .iter()
                .filter(|id| {
                    t.nodes
                        .get(id)
                        .is_some_and(|n| !n.online || n.online_via != Some(me))
                })
                .map(|id| (*id, true))
                .collect();
            v.extend(
                t.nodes
                    .values()
                    .filter(|n| n.online && n.online_via == Some(me) && !streaming.contains(&n.id))
                    .map(|n| (n.id, false)),
            );
            v
        };
        clean = fixes.is_empty().then_some(seen);
        for (id, online) in fixes {
            // Still so? A stream may have opened or closed meanwhile.
            let streams = st
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&id);
            if streams == online {
                tracing::info!(node = id, online, "correcting the recorded online state");
                set_online(&st, id, online).await;
            }
        }
    }
}

/// Whether node `id` may no longer stream at `now`: deleted, expired or logged out.
fn revoked_at(t: &crate::state::Tailnet, id: u64, now: i64) -> bool {
    t.nodes
        .get(&id)
        .is_none_or(|n| n.expiry.is_some_and(|e| e <= now))
}

/// When to look at node `id`'s key expiry again: at the expiry, or in a day if it is
/// further off (a timer need not be exact over months); `None` when it never expires.
fn key_deadline(t: &crate::state::Tailnet, id: u64, now: i64) -> Option<tokio::time::Instant> {
    let left = match t.nodes.get(&id) {
        None => 0,
        Some(n) => n.expiry?.saturating_sub(now).clamp(0, 86_400_000),
    };
    let left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
    Some(tokio::time::Instant::now() + left)
}

/// Resolves at `deadline`; never without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What woke a stream: whether it owes a full map (its changes lagged or the state was
/// replaced) and whether the DERP map changed.
#[derive(Clone, Copy)]
struct Wake {
    full: bool,
    derp_changed: bool,
}

/// Drains the burst of announcements that began with `first`, so many changes become one
/// message; notes in `oldest_change` when the oldest was applied. Which nodes changed the
/// stream reads from the peer cache's history: the announcements only wake it, and say
/// when a full map or DERP map is due. `None` when the state's announcements ended.
fn drain_changes(
    first: Result<crate::state::StampedChange, broadcast::error::RecvError>,
    changes: &mut broadcast::Receiver<crate::state::StampedChange>,
    oldest_change: &mut Option<std::time::Instant>,
) -> Option<Wake> {
    let mut wake = Wake {
        full: false,
        derp_changed: false,
    };
    let mut pending = Some(first);
    while let Some(item) = pending.take() {
        let item = item.map(|(at, c)| {
            oldest_change.get_or_insert(at);
            c
        });
        match item {
            Ok(Change::NodeUpserted(_))
            | Ok(Change::NodeRemoved(_))
            | Ok(Change::UserChanged(_))
            | Ok(Change::PolicyChanged)
            | Ok(Change::SshCheckDecided(_))
            | Ok(Change::TlsChanged) => {}
            Ok(Change::ReplicasChanged) => wake.derp_changed = true,
            // DNS settings travel only in full maps; they change rarely.
            Ok(Change::Reset | Change::DnsChanged)
            | Err(broadcast::error::RecvError::Lagged(_)) => wake.full = true,
            Err(broadcast::error::RecvError::Closed) => return None,
        }
        pending = match changes.try_recv() {
            Ok(c) => Some(Ok(c)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                Some(Err(broadcast::error::RecvError::Lagged(n)))
            }
            Err(_) => None,
        };
    }
    Some(wake)
}

/// What a stream sends for the changes it woke up for.
struct Answer {
    /// A message of its own (none: nothing visible changed, or `shared` carries it).
    resp: Option<MapResponse>,
    /// The frame another stream made for the same changes, sent as it is.
    shared: Option<Bytes>,
    /// The key under which other streams may share what this one makes.
    share_as: Option<(u64, u64)>,
}

/// The stream's answer to `wake` from the state `t`: the delta another stream already
/// made for the same view, else its own delta, else (a lag, a reset) a full map of its
/// own; with the DERP map when that changed. `None` when the stream must end (its node
/// is gone, or no full map can be made).
fn answer_changes(
    st: &ControlState,
    view: &mut StreamView,
    t: &crate::state::Tailnet,
    wake: Wake,
    now: i64,
) -> Option<Answer> {
    let mut answer = Answer {
        resp: None,
        shared: None,
        share_as: None,
    };
    let key = if wake.full || wake.derp_changed {
        None
    } else {
        view.shared_key(t, &st.peers)
    };
    let made = key.and_then(|k| st.deltas.get(k).map(|f| (k, f)));
    let delta = if wake.full {
        Err(Resync::Full)
    } else if let Some(((_, seq), frame)) = made {
        view.advance(seq);
        answer.shared = frame;
        Ok(None)
    } else {
        answer.share_as = key;
        view.delta(t, &st.peers, &st.config, now)
    };
    answer.resp = match delta {
        Ok(r) if wake.derp_changed => {
            let mut r = r.unwrap_or_default();
            r.derp_map = Some(st.derp_map(t));
            Some(r)
        }
        Ok(r) => r,
        Err(Resync::Gone) => return None,
        Err(Resync::Full) => {
            // A full map is this stream's own, never shared.
            answer.share_as = None;
            Some(view.full(t, &st.peers, &st.config, &st.derp_map(t), now)?)
        }
    };
    Some(answer)
}

/// Encodes a message stream `id` made and offers it to the streams sharing `share_as`.
/// `None` when it cannot be encoded (the stream ends).
fn encode_own(
    st: &ControlState,
    resp: &MapResponse,
    share_as: Option<(u64, u64)>,
    id: u64,
) -> Option<Bytes> {
    if !resp.keep_alive && tracing::enabled!(tracing::Level::TRACE) {
        let ids = |l: &Option<Vec<crate::tailcfg::Shared>>| {
            l.as_ref()
                .map(|l| l.iter().map(|p| p.2).collect::<Vec<_>>())
        };
        tracing::trace!(
            node = id,
            full = ?ids(&resp.peers),
            changed = ?ids(&resp.peers_changed),
            removed = ?resp.peers_removed,
            patched = resp.peers_changed_patch.as_ref().map_or(0, Vec::len),
            shared_as = ?share_as,
            "map: made"
        );
    }
    let encoded = if resp.keep_alive {
        keep_alive_frame(&st.frames)
    } else {
        encode_frame(resp, &st.frames)
    };
    let frame = match encoded {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "encoding map response failed");
            return None;
        }
    };
    if let Some(key) = share_as {
        st.deltas.put(key, Some(frame.clone()));
    }
    Some(frame)
}

async fn run_stream(
    st: Arc<ControlState>,
    mut view: StreamView,
    mut changes: broadcast::Receiver<crate::state::StampedChange>,
    tx: mpsc::Sender<Bytes>,
    mut slot: StreamSlot,
) {
    let id = view.self_id;
    if slot.first {
        set_online(&st, id, true).await;
    }
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    let mut serving = st.serving.clone();
    let metrics = st.metrics.clone();
    let _counted = StreamGauge::open(&metrics);
    let mut last_update = tokio::time::Instant::now();
    let epoch = update_epoch();
    // The node's key expiry: the stream ends when it passes, or as soon as a change
    // expires, logs out or deletes the node (revocation ends the stream at once, on every
    // replica, instead of leaving the client its map until it reconnects).
    let mut expires = key_deadline(&st.db.store.read(), id, now_ms());
    loop {
        let mut revoked = false;
        // Let changes gather while the last update is recent (see MIN_UPDATE_INTERVAL).
        let ready_at = next_update_at(epoch, last_update);
        if tokio::time::Instant::now() < ready_at {
            tokio::select! {
                _ = tx.closed() => break,
                _ = tokio::time::sleep_until(ready_at) => {}
            }
        }
        // When the oldest change this message carries was applied here.
        let mut oldest_change = None;
        // A message made here, with the key other streams may share it under, or one
        // another stream made.
        let mut shared: Option<Bytes> = None;
        let mut share_as: Option<(u64, u64)> = None;
        let resp: Option<MapResponse> = tokio::select! {
            _ = tx.closed() => break,
            _ = until(expires) => {
                let t = st.db.store.read();
                if revoked_at(&t, id, now_ms()) {
                    tracing::info!(node = id, "closing map stream: the node key has expired");
                    break;
                }
                expires = key_deadline(&t, id, now_ms());
                continue;
            }
            // Cut off from the quorum: end the stream so the client reconnects elsewhere.
            lost = serving.wait_for(|ok| !*ok) => {
                if lost.is_ok() {
                    tracing::info!(node = id, "closing map stream: replica lost the quorum");
                }
                break;
            }
            _ = keepalive.tick() => Some(MapResponse { keep_alive: true, ..Default::default() }),
            first = changes.recv() => {
                let Some(wake) = drain_changes(first, &mut changes, &mut oldest_change) else {
                    return;
                };
                let t = st.db.store.read();
                let now = now_ms();
                expires = key_deadline(&t, id, now);
                revoked = revoked_at(&t, id, now);
                match answer_changes(&st, &mut view, &t, wake, now) {
                    Some(a) => {
                        (shared, share_as) = (a.shared, a.share_as);
                        a.resp
                    }
                    None => break,
                }
            }
        };
        let (frame, kind, keep_alive) = match (resp, shared) {
            (Some(resp), _) => match encode_own(&st, &resp, share_as, id) {
                Some(frame) => {
                    let kind = if resp.keep_alive {
                        &metrics.map_keepalives
                    } else if resp.peers.is_some() {
                        &metrics.map_responses_full
                    } else {
                        &metrics.map_responses_delta
                    };
                    (frame, kind, resp.keep_alive)
                }
                None => break,
            },
            (None, Some(frame)) => {
                tracing::trace!(node = id, seq = view.synced(), "map: shared delta");
                metrics.map_deltas_shared.fetch_add(1, Ordering::Relaxed);
                (frame, &metrics.map_responses_delta, false)
            }
            (None, None) => {
                // Nothing visible changed: the streams sharing this key need not look.
                if let Some(key) = share_as {
                    st.deltas.put(key, None);
                }
                if revoked {
                    tracing::info!(
                        node = id,
                        "closing map stream: the node was expired or logged out"
                    );
                    break;
                }
                continue;
            }
        };
        let len = frame.len() as u64;
        if !keep_alive {
            tracing::trace!(node = id, seq = view.synced(), bytes = len, "map: update");
        }
        if tx.send(frame).await.is_err() {
            break;
        }
        if !keep_alive {
            last_update = tokio::time::Instant::now();
        }
        kind.fetch_add(1, Ordering::Relaxed);
        metrics.map_bytes.fetch_add(len, Ordering::Relaxed);
        if let Some(at) = oldest_change {
            metrics.update_fanout.observe(at.elapsed());
        }
        if revoked {
            // The last message told the client its node expired; nothing more follows.
            tracing::info!(
                node = id,
                "closing map stream: the node was expired or logged out"
            );
            break;
        }
    }
    tracing::debug!(node = id, seq = view.synced(), "map: stream ended");
    if slot.close() && st.db.store.read().nodes.contains_key(&id) {
        set_online(&st, id, false).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_wait_for_the_shared_grid() {
        let epoch = tokio::time::Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        // Streams that sent at different moments of one interval wake together.
        for sent in [0, 1, 130, 199] {
            assert_eq!(next_update_at(epoch, epoch + ms(sent)), epoch + ms(200));
        }
        assert_eq!(next_update_at(epoch, epoch + ms(200)), epoch + ms(400));
        assert_eq!(next_update_at(epoch, epoch + ms(399)), epoch + ms(400));
    }
}
