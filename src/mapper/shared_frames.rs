//! Compressing map messages, with the bulk of the work shared between streams.
//!
//! Compression was most of a replica's CPU in a join storm: every newcomer's first map
//! holds every peer, and every open stream gets the same few new peers, each compressed
//! once per stream. But a zstd decoder decodes a run of concatenated frames as the
//! concatenation of their contents (the official client's decoder, klauspost's
//! `DecodeAll`, loops over frames; so do ours). So a message is cut into its own text and
//! runs of peers (see [`Piece`]); each run is compressed once, and its frame reused by
//! every stream that sends the same run. A packet filter rule's source list, the same for
//! every node the rule applies to, is a run of one text.
//!
//! A run is known by the peers' shared texts themselves (the `Arc<str>` each peer is
//! rendered into once per change, see `peers`): the same allocations in the same order are
//! the same bytes, since the texts never change, and the cache holds the `Arc`s of what
//! it keeps, so no other text can take their place. A peer rendered for one reader alone
//! (`Expired` by that reader's clock) has a text of its own, hence a run of its own.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::metrics::Metrics;
use crate::tailcfg::{self, MapResponse, Piece};

/// zstd level: compressed once and sent many times, a run is worth the better ratio.
const LEVEL: i32 = 3;
/// Runs shorter than this go into the stream's own frames: a frame's own header and the
/// cache lookup cost about what compressing a few hundred bytes does.
const MIN_SHARED: usize = 512;
/// Bytes the cache may hold: each run's compressed frame plus the text of its peers (whose
/// `Arc`s its key keeps alive, old versions included). A full map of 10,000 peers is
/// about 10 MB of text and 1 MB compressed.
const BUDGET: usize = 32 << 20;

/// A run of peers, by the identity of their texts.
struct RunKey {
    peers: Vec<Arc<str>>,
    comma: bool,
}

impl PartialEq for RunKey {
    fn eq(&self, other: &Self) -> bool {
        self.comma == other.comma
            && self.peers.len() == other.peers.len()
            && self
                .peers
                .iter()
                .zip(&other.peers)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl Eq for RunKey {}

impl Hash for RunKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.comma.hash(state);
        for p in &self.peers {
            std::ptr::hash(Arc::as_ptr(p), state);
        }
    }
}

impl RunKey {
    fn write(&self, out: &mut Vec<u8>) {
        tailcfg::write_run(&self.peers, self.comma, out);
    }

    fn len(&self) -> usize {
        (self.peers.iter().map(|p| p.len() + 1).sum::<usize>())
            .saturating_sub(usize::from(!self.comma))
    }
}

/// Lists of removed peers this long or longer are made into text once for every stream
/// that sends the same list (see [`FrameCache::removed_text`]); shorter ones cost less to
/// write than to look up.
const SHARED_REMOVALS: usize = 64;
/// Distinct long lists of removed peers kept: a policy change makes one per kind of node
/// that loses sight of others.
const REMOVALS_KEPT: usize = 16;

/// A list of removed peers and its shared text.
type Removal = (Box<[u64]>, Arc<str>);

/// Compressed runs of peers, by their peers' texts; one per replica, shared by its streams.
pub struct FrameCache {
    slots: Mutex<Slots>,
    /// Recent long `PeersRemoved` lists and their text, most recent last.
    removals: Mutex<std::collections::VecDeque<Removal>>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Slots {
    map: HashMap<Arc<RunKey>, Slot>,
    bytes: usize,
    clock: u64,
}

struct Slot {
    frame: Bytes,
    /// What it counts against [`BUDGET`].
    cost: usize,
    used: u64,
}

impl FrameCache {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            slots: Mutex::new(Slots::default()),
            removals: Mutex::new(std::collections::VecDeque::with_capacity(REMOVALS_KEPT)),
            metrics,
        }
    }

    /// The text of a `PeersRemoved` list: for a long one, the same allocation as for every
    /// equal list sent lately, so that its frame is compressed once (a run of one text,
    /// like a filter's source list). When a policy change hid 1,000 servers from 9,000
    /// members at 10,000 nodes, each stream wrote and compressed that list itself: with
    /// sorting, most of what the change cost the replicas.
    fn removed_text(&self, ids: &[u64]) -> Arc<str> {
        if ids.len() < SHARED_REMOVALS {
            return tailcfg::ids_text(ids);
        }
        let mut kept = self.removals.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, text)) = kept.iter().rev().find(|(list, _)| **list == *ids) {
            return text.clone();
        }
        let text = tailcfg::ids_text(ids);
        if kept.len() >= REMOVALS_KEPT {
            kept.pop_front();
        }
        kept.push_back((ids.into(), text.clone()));
        text
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The compressed frame of `run`, from the cache or compressed now and kept.
    fn run(&self, run: RunKey) -> Result<Bytes, std::io::Error> {
        {
            let mut s = self.lock();
            s.clock += 1;
            let now = s.clock;
            if let Some(slot) = s.map.get_mut(&run) {
                slot.used = now;
                self.metrics.map_runs_shared.fetch_add(1, Ordering::Relaxed);
                return Ok(slot.frame.clone());
            }
        }
        // Compressed outside the lock: two streams may both compress a new run, which
        // costs one compression more but never makes one stream wait for another.
        let mut text = Vec::with_capacity(run.len());
        run.write(&mut text);
        let frame = Bytes::from(compress(&text)?);
        self.metrics
            .map_runs_compressed
            .fetch_add(1, Ordering::Relaxed);
        let cost = frame.len() + text.len();
        let mut s = self.lock();
        let used = s.clock;
        s.bytes += cost;
        if let Some(old) = s.map.insert(
            Arc::new(run),
            Slot {
                frame: frame.clone(),
                cost,
                used,
            },
        ) {
            s.bytes -= old.cost;
        }
        if s.bytes > BUDGET {
            s.evict();
        }
        Ok(frame)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

impl Slots {
    /// Drops the least recently used runs down to three quarters of the budget, so
    /// eviction (a sort of the slots) happens once per many insertions.
    fn evict(&mut self) {
        let mut by_age: Vec<(Arc<RunKey>, u64, usize)> = self
            .map
            .iter()
            .map(|(k, s)| (k.clone(), s.used, s.cost))
            .collect();
        by_age.sort_unstable_by_key(|(_, used, _)| *used);
        for (key, _, len) in by_age {
            if self.bytes <= BUDGET / 4 * 3 {
                break;
            }
            self.map.remove(&key);
            self.bytes -= len;
        }
    }
}

/// Whole delta messages that many streams send alike (see `StreamView::shared_key`), by
/// key, most recent last. In a burst without a policy most streams of a replica wake in
/// the same slot, caught up to the same point: the first computes, encodes and compresses
/// the delta, the others send the same bytes.
pub struct SharedDeltas {
    recent: Mutex<Recent>,
}

/// (key, the delta's frame or `None` for nothing to send), most recent last.
type Recent = std::collections::VecDeque<((u64, u64), Option<Bytes>)>;

/// Keys kept: a few slots' worth of distinct points streams can be caught up to.
const RECENT: usize = 64;

impl Default for SharedDeltas {
    fn default() -> Self {
        Self {
            recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT)),
        }
    }
}

impl SharedDeltas {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The delta under `key`, if a stream has made it: `Some(None)` when it found nothing
    /// to send.
    pub fn get(&self, key: (u64, u64)) -> Option<Option<Bytes>> {
        self.lock()
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, f)| f.clone())
    }

    pub fn put(&self, key: (u64, u64), frame: Option<Bytes>) {
        let mut recent = self.lock();
        if recent.iter().any(|(k, _)| *k == key) {
            return;
        }
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back((key, frame));
    }
}

thread_local! {
    /// One compression context per thread, reused: making one per message cost an
    /// allocation and the clearing of its tables every time.
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

fn compress(data: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    ZSTD.with(|cell| {
        let mut cell = cell.borrow_mut();
        let c = match &mut *cell {
            Some(c) => c,
            None => cell.insert(zstd::bulk::Compressor::new(LEVEL)?),
        };
        c.compress(data)
    })
}

/// The keep-alive message, made once: the same bytes for every stream, every time. At
/// rest it is nearly all a stream sends (one a stream every 50 s), and encoding and
/// compressing it each time was most of what a resting stream cost. (It holds no runs of
/// peers, so `cache` is only passed through.)
pub fn keep_alive_frame(cache: &FrameCache) -> Result<Bytes, std::io::Error> {
    static FRAME: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    if let Some(f) = FRAME.get() {
        return Ok(f.clone());
    }
    let frame = encode_frame(
        &MapResponse {
            keep_alive: true,
            ..Default::default()
        },
        cache,
    )?;
    Ok(FRAME.get_or_init(|| frame).clone())
}

/// Encodes one map message: 4-byte little-endian length, then zstd frames that decode,
/// in order, to the message's JSON. Runs of peers come from (and go into) `cache`.
pub fn encode_frame(resp: &MapResponse, cache: &FrameCache) -> Result<Bytes, std::io::Error> {
    let pieces = tailcfg::encode_pieces_with(resp, &mut |ids| cache.removed_text(ids))
        .map_err(std::io::Error::other)?;
    let mut out = vec![0u8; 4];
    let mut own = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Run { peers, comma } => {
                let run = RunKey { peers, comma };
                if run.len() < MIN_SHARED {
                    run.write(&mut own);
                    continue;
                }
                if !own.is_empty() {
                    out.extend_from_slice(&compress(&own)?);
                    own.clear();
                }
                out.extend_from_slice(&cache.run(run)?);
            }
            own_text => own_text.write(&mut own),
        }
    }
    if !own.is_empty() {
        out.extend_from_slice(&compress(&own)?);
    }
    let len = u32::try_from(out.len() - 4).map_err(std::io::Error::other)?;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailcfg::Shared;
    use serde_json::{json, Value};

    fn peer(id: u64) -> Shared {
        // Big enough that each run of peers is shared.
        Shared::new(
            json!({ "ID": id, "Hostinfo": { "Hostname": format!("host-{id}-{}", "x".repeat(200)) } }),
        )
    }

    fn decode(frame: &[u8]) -> Value {
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        serde_json::from_slice(&zstd::decode_all(&frame[4..]).unwrap()).unwrap()
    }

    /// Two newcomers' full maps leave out different nodes (themselves) but share every
    /// other run, and each still decodes to exactly its own message.
    #[test]
    fn full_maps_share_runs_and_decode_to_their_own_json() {
        let cache = FrameCache::new(Metrics::new());
        // Rendered once, as the peer cache does, and sent by every stream.
        let peers: Vec<Shared> = (1..=300).map(peer).collect();
        let map_for = |me: u64| MapResponse {
            node: Some(json!({ "ID": me })),
            peers: Some(peers.iter().filter(|p| p.0["ID"] != me).cloned().collect()),
            ..Default::default()
        };
        for me in [5, 290] {
            let resp = map_for(me);
            let frame = encode_frame(&resp, &cache).unwrap();
            let want: Value = serde_json::from_slice(&tailcfg::encode(&resp).unwrap()).unwrap();
            assert_eq!(decode(&frame), want);
        }
        // Ids 1..=300 make 5 blocks of 64; the two maps differ in the first and last.
        let m = &cache.metrics;
        assert_eq!(m.map_runs_compressed.load(Ordering::Relaxed), 5 + 2);
        assert_eq!(m.map_runs_shared.load(Ordering::Relaxed), 3);
        assert_eq!(cache.len(), 7);
    }

    /// A peer rendered anew (here `Expired` for one reader) makes a run of its own, and a
    /// run shorter than [`MIN_SHARED`] stays in the message's own frame.
    #[test]
    fn runs_are_known_by_their_peers_texts() {
        let cache = FrameCache::new(Metrics::new());
        let (one, two, three) = (peer(1), peer(2), peer(3));
        let mut expired = (*two.0).clone();
        expired["Expired"] = json!(true);
        for p in [two.clone(), two, Shared::new(expired)] {
            let resp = MapResponse {
                peers_changed: Some(vec![one.clone(), p, three.clone()]),
                ..Default::default()
            };
            let want: Value = serde_json::from_slice(&tailcfg::encode(&resp).unwrap()).unwrap();
            assert_eq!(decode(&encode_frame(&resp, &cache).unwrap()), want);
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.metrics.map_runs_shared.load(Ordering::Relaxed), 1);
        let small = MapResponse {
            peers_changed: Some(vec![Shared::new(json!({ "ID": 4 }))]),
            ..Default::default()
        };
        let want: Value = serde_json::from_slice(&tailcfg::encode(&small).unwrap()).unwrap();
        assert_eq!(decode(&encode_frame(&small, &cache).unwrap()), want);
        assert_eq!(cache.len(), 2);
    }

    /// Streams removing the same long list of peers send one shared frame for it, and
    /// each message still decodes to its own JSON; a short list stays in the own frame.
    #[test]
    fn long_removals_are_compressed_once_for_all_streams() {
        let cache = FrameCache::new(Metrics::new());
        let servers: Vec<u64> = (1..=1000).map(|i| i * 10).collect();
        for me in [3u64, 4, 5] {
            let resp = MapResponse {
                node: Some(json!({ "ID": me })),
                peers_removed: Some(servers.clone()),
                ..Default::default()
            };
            let got = decode(&encode_frame(&resp, &cache).unwrap());
            assert_eq!(
                got,
                json!({ "Node": { "ID": me }, "PeersRemoved": servers })
            );
        }
        let m = &cache.metrics;
        assert_eq!(m.map_runs_compressed.load(Ordering::Relaxed), 1);
        assert_eq!(m.map_runs_shared.load(Ordering::Relaxed), 2);
        let few = MapResponse {
            peers_removed: Some(vec![7, 9]),
            packet_filter: Some(tailcfg::PacketFilter::allow_all()),
            ..Default::default()
        };
        let want: Value = serde_json::from_slice(&tailcfg::encode(&few).unwrap()).unwrap();
        assert_eq!(want["PeersRemoved"], json!([7, 9]));
        assert_eq!(decode(&encode_frame(&few, &cache).unwrap()), want);
        assert_eq!(m.map_runs_compressed.load(Ordering::Relaxed), 1);
    }

    /// The keep-alive made once is the message the stream would have encoded itself.
    #[test]
    fn the_keep_alive_frame_is_the_encoded_keep_alive() {
        let resp = MapResponse {
            keep_alive: true,
            ..Default::default()
        };
        let cache = FrameCache::new(Metrics::new());
        let made = encode_frame(&resp, &cache).unwrap();
        let once = keep_alive_frame(&cache).unwrap();
        assert_eq!(decode(&once), decode(&made));
        assert_eq!(decode(&once), json!({ "KeepAlive": true }));
        assert_eq!(keep_alive_frame(&cache).unwrap(), once);
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used() {
        let mut s = Slots::default();
        let keys: Vec<Arc<RunKey>> = (0..10u64)
            .map(|i| {
                Arc::new(RunKey {
                    peers: vec![peer(i).1],
                    comma: false,
                })
            })
            .collect();
        for (i, k) in keys.iter().enumerate() {
            s.map.insert(
                k.clone(),
                Slot {
                    frame: Bytes::new(),
                    cost: BUDGET / 8,
                    used: i as u64,
                },
            );
            s.bytes += BUDGET / 8;
        }
        s.evict();
        assert!(s.bytes <= BUDGET / 4 * 3);
        assert_eq!(s.map.len(), 6);
        assert!(s.map.contains_key(&keys[9]) && !s.map.contains_key(&keys[3]));
    }
}
