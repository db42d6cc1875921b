//! Harnesses for the DERP relay: the frame decoder over a client's byte stream, and the
//! relay's handling of a whole connection (handshake, then frames) over an in-memory socket.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{now, op, take, CONTROL_SECRET, DERP_SECRET};
use crate::derp::frame::{
    read_frame, Frame, Key, FRAME_CLIENT_INFO, FRAME_PING, FRAME_SEND_PACKET, MAGIC,
    MAX_CLIENT_INFO_LEN, MAX_FRAME_SIZE,
};
use crate::derp::server::{open, public_key_of, seal};
use crate::derp::{ClientVerifier, DerpServer};
use crate::noise::ControlKey;

/// Target `derp_frames`: a client's byte stream, read frame by frame as the relay reads it
/// (the first frame under the ClientInfo limit, the rest under the general one). Every
/// frame that decodes encodes to a frame that decodes to the same (a PeerPresent without
/// an address comes back with the unspecified one), and that encoding is stable.
pub fn derp_frames(data: &[u8]) {
    let mut r = data;
    let mut max = MAX_CLIENT_INFO_LEN;
    while let Ok((typ, payload)) = now(read_frame(&mut r, max)) {
        assert!(payload.len() <= max);
        max = MAX_FRAME_SIZE;
        let Ok(f) = Frame::parse(typ, payload) else {
            continue;
        };
        assert_eq!(f.frame_type(), typ);
        let once = f.encode();
        let len = u32::from_be_bytes([once[1], once[2], once[3], once[4]]);
        assert_eq!(len as usize, once.len() - 5, "header length");
        let back = reparse(&once);
        let want = match f {
            Frame::PeerPresent {
                key,
                addr: None,
                flags,
            } => Frame::PeerPresent {
                key,
                addr: Some((std::net::Ipv6Addr::UNSPECIFIED, 0).into()),
                flags,
            },
            f => f,
        };
        assert_eq!(back, want, "a frame changed through encode and decode");
        assert_eq!(back.encode(), reparse(&back.encode()).encode(), "unstable");
    }
}

fn reparse(enc: &Bytes) -> Frame {
    let mut r = &enc[..];
    let (typ, payload) = now(read_frame(&mut r, MAX_FRAME_SIZE)).expect("our frame reads back");
    assert!(r.is_empty(), "bytes left after our own frame");
    Frame::parse(typ, payload).expect("our frame decodes")
}

/// The payload of the ping that ends every connection of [`derp_server`].
const LAST_PING: [u8; 8] = *b"lastping";

/// The client identities the harness seals ClientInfo with: the first is a node of the
/// tailnet, the second one the relay's verifier refuses (a removed node).
const CLIENTS: [[u8; 32]; 2] = [[0xa1; 32], [0xb2; 32]];

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime")
        });
        rt.block_on(fut)
    })
}

/// Target `derp_server`: a whole client connection to the relay, its bytes written by a
/// script of ops, each a tag, a u16 length and that many bytes:
/// - tag % 3 == 0: a ClientInfo frame sealed to the relay by one of the harness's clients
///   (`tag / 3 % 2` picks which), its JSON the op's bytes;
/// - tag % 3 == 1: the op's bytes as they are;
/// - tag % 3 == 2: a frame of type the op's first byte, its payload the rest.
///
/// The relay serves it to its end without panicking or hanging. It speaks first with its
/// key; everything it sends is a well-formed frame of a kind it may send a client; it
/// answers no more pings than it got and sends few PeerGone; a client of the harness it
/// admitted gets a ServerInfo it can open; and once the connection ends the relay holds
/// nobody.
pub fn derp_server(data: &[u8]) {
    let mut rest = data;
    let mut wire = Vec::new();
    let mut ours = None;
    while let Some((tag, len)) = op(&mut rest) {
        let body = take(&mut rest, len);
        match tag % 3 {
            0 => {
                let client = CLIENTS[usize::from(tag / 3 % 2)];
                let pubkey = public_key_of(&client);
                let sealed = seal(&client, &public_key_of(&DERP_SECRET), body);
                let f = Frame::ClientInfo {
                    key: pubkey,
                    sealed,
                };
                wire.extend_from_slice(&f.encode());
                ours.get_or_insert(client);
            }
            1 => wire.extend_from_slice(body),
            _ => {
                let (typ, payload) = body.split_first().unwrap_or((&0, &[]));
                wire.push(*typ);
                wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                wire.extend_from_slice(payload);
            }
        }
    }
    let banned = public_key_of(&CLIENTS[1]);
    let verifier: ClientVerifier = Arc::new(move |k: &Key| *k != banned);
    let mesh = crate::cluster::mesh_key(&ControlKey::from_secret(CONTROL_SECRET));
    let relay = DerpServer::with_verifier(DERP_SECRET, Some(mesh), Some(verifier));
    let started = std::time::Instant::now();
    // A last ping whose pong tells that the relay has acted on everything before it (it
    // answers in order): a client that closed its side at once would not see the answers,
    // which the relay drops when the client goes.
    wire.extend_from_slice(&Frame::Ping(LAST_PING).encode());
    let last_pong = Frame::Pong(LAST_PING).encode();
    let out = block_on(async {
        let (client, server_end) = tokio::io::duplex(64 * 1024);
        let serving = {
            let relay = relay.clone();
            tokio::spawn(async move { relay.serve_conn(server_end, true).await })
        };
        let (mut rd, mut wr) = tokio::io::split(client);
        let out = std::rc::Rc::new(RefCell::new(Vec::new()));
        let ended = std::rc::Rc::new(std::cell::Cell::new(false));
        let write = async {
            // The relay may hang up before it has read everything: that is its right.
            let _ = wr.write_all(&wire).await;
            // Until the last pong, or the end, or (the relay still inside a frame the
            // script cut short) long enough for every task to have run dry.
            for _ in 0..200 {
                let answered = ended.get() || contains(&out.borrow(), &last_pong);
                if answered {
                    break;
                }
                tokio::task::yield_now().await;
            }
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = rd.read(&mut buf).await {
                out.borrow_mut().extend_from_slice(&buf[..n]);
            }
            ended.set(true);
        };
        let session = async {
            tokio::join!(write, read);
            serving.await.expect("the connection's task");
        };
        tokio::time::timeout(Duration::from_secs(30), session)
            .await
            .expect("the relay hangs on this connection");
        out.take()
    });
    assert_eq!(relay.client_count(), 0, "a client stays registered");
    let stats = relay.stats();
    let connected = stats
        .clients_connected
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(connected, 0, "the connected gauge");
    let secs = started.elapsed().as_secs();
    check_relay_output(&out, &wire, ours, secs);
}

/// What the relay sent on one connection, against what the client sent it.
fn check_relay_output(out: &[u8], wire: &[u8], ours: Option<[u8; 32]>, secs: u64) {
    let mut r = out;
    let first = now(read_frame(&mut r, MAX_FRAME_SIZE)).expect("the relay speaks first");
    let Ok(Frame::ServerKey { key }) = Frame::parse(first.0, first.1) else {
        panic!("the relay's first frame is not its key");
    };
    assert_eq!(key, public_key_of(&DERP_SECRET));
    let hello = &out[..5 + MAGIC.len() + 32];
    assert_eq!(&hello[5..5 + MAGIC.len()], &MAGIC);
    let (mut pongs, mut gone) = (0, 0);
    // Whole frames, but for the last one: a connection torn down may cut the frame the
    // relay was writing.
    while let Ok((typ, payload)) = now(read_frame(&mut r, MAX_FRAME_SIZE)) {
        match Frame::parse(typ, payload).expect("the relay sends well-formed frames") {
            Frame::ServerInfo { sealed } => {
                if let Some(client) = ours.filter(|c| sent_client_info(wire, c)) {
                    let plain = open(&client, &key, &sealed).expect("ServerInfo opens");
                    let v: serde_json::Value =
                        serde_json::from_slice(&plain).expect("ServerInfo is JSON");
                    assert_eq!(v["version"], 2);
                }
            }
            Frame::Pong(_) => pongs += 1,
            Frame::PeerGone { .. } => gone += 1,
            Frame::RecvPacket { .. } | Frame::KeepAlive | Frame::PeerPresent { .. } => {}
            f => panic!("the relay sent a client {f:?}"),
        }
    }
    let pings = frames_sent(wire)
        .filter(|(t, p)| *t == FRAME_PING && p.len() >= 8)
        .count();
    assert!(pongs <= pings, "{pongs} pongs for {pings} pings");
    // NotHere replies: a burst of three, then one a second.
    assert!(gone <= 3 + secs + 1, "{gone} PeerGone in {secs} s");
    let sends = frames_sent(wire)
        .filter(|(t, _)| *t == FRAME_SEND_PACKET)
        .count() as u64;
    assert!(gone <= sends, "{gone} PeerGone for {sends} sends");
}

/// The frames in the client's bytes, as far as they are whole.
fn frames_sent(wire: &[u8]) -> impl Iterator<Item = (u8, Bytes)> + '_ {
    let mut r = wire;
    std::iter::from_fn(move || now(read_frame(&mut r, MAX_FRAME_SIZE)).ok())
}

/// Whether `hay` holds `needle`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether the client's first frame is a ClientInfo from `client`.
fn sent_client_info(wire: &[u8], client: &[u8; 32]) -> bool {
    frames_sent(wire).next().is_some_and(|(t, p)| {
        t == FRAME_CLIENT_INFO && p.get(..32) == Some(&public_key_of(client)[..])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hydrascale_raft::fuzzing::stand_in;

    /// Stand-in for `cargo fuzz run derp_frames`.
    #[test]
    fn derp_frames_stand_in() {
        stand_in("derp_frames", 100_000, derp_frames);
    }

    /// Stand-in for `cargo fuzz run derp_server`.
    #[test]
    fn derp_server_stand_in() {
        stand_in("derp_server", 4000, derp_server);
    }
}
