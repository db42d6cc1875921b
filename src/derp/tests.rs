//! End-to-end tests of the relay over real sockets: axum router, HTTP
//! upgrade, handshake, relaying, error isolation, and meshing.

use std::net::SocketAddr;
use std::time::Duration;

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

use super::client::dial_upgraded;
use super::frame::{read_typed, Frame, PeerGoneReason, FRAME_SEND_PACKET, MAX_FRAME_SIZE};
use super::*;

const WAIT: Duration = Duration::from_secs(5);

fn rand_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    k
}

async fn start(mesh_key: Option<[u8; 32]>) -> (DerpServer, SocketAddr) {
    let server = DerpServer::new(rand_key(), mesh_key);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(server.clone()).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (server, addr)
}

async fn connect(addr: SocketAddr) -> DerpClient {
    timeout(
        WAIT,
        DerpClient::connect(&addr.to_string(), rand_key(), None),
    )
    .await
    .unwrap()
    .unwrap()
}

/// Next frame that is not a KeepAlive.
async fn next(c: &mut DerpClient) -> Frame {
    loop {
        match timeout(WAIT, c.recv()).await.unwrap().unwrap() {
            Frame::KeepAlive => continue,
            f => return f,
        }
    }
}

async fn assert_relay(a: &DerpClient, b: &mut DerpClient, len: usize) {
    let pkt: Vec<u8> = (0..len).map(|i| i as u8).collect();
    a.send_packet(b.public_key(), &pkt).await.unwrap();
    match next(b).await {
        Frame::RecvPacket { src, packet } => {
            assert_eq!(src, a.public_key());
            assert_eq!(&packet[..], &pkt[..]);
        }
        f => panic!("unexpected {f:?}"),
    }
}

async fn assert_closed(c: &mut DerpClient) {
    loop {
        match timeout(WAIT, c.recv()).await.unwrap() {
            Ok(Frame::KeepAlive) => continue,
            Ok(f) => panic!("expected close, got {f:?}"),
            Err(_) => return,
        }
    }
}

#[tokio::test]
async fn relays_between_two_clients() {
    let (server, addr) = start(None).await;
    let a = connect(addr).await;
    let mut b = connect(addr).await;
    assert_eq!(a.server_public_key(), server.public_key());
    assert_relay(&a, &mut b, 1400).await;
    assert_eq!(server.client_count(), 2);
    let st = server.stats();
    assert_eq!(
        st.packets_relayed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        st.bytes_relayed.load(std::sync::atomic::Ordering::Relaxed),
        1400
    );
    assert_eq!(
        st.clients_connected
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // Ping is echoed.
    a.send(&Frame::Ping(*b"pingpong")).await.unwrap();
    let mut a = a;
    assert_eq!(next(&mut a).await, Frame::Pong(*b"pingpong"));

    // Unknown frame types are skipped, not fatal.
    a.send(&Frame::Unknown {
        typ: 0x7e,
        payload: bytes::Bytes::from_static(b"future"),
    })
    .await
    .unwrap();
    assert_relay(&a, &mut b, 10).await;

    drop(b);
    for _ in 0..100 {
        if server.client_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.client_count(), 1);
}

#[tokio::test]
async fn unknown_destination_gets_peer_gone() {
    let (_server, addr) = start(None).await;
    let mut a = connect(addr).await;
    let nobody = rand_key();
    a.send_packet(nobody, b"hello").await.unwrap();
    assert_eq!(
        next(&mut a).await,
        Frame::PeerGone {
            key: nobody,
            reason: PeerGoneReason::NotHere
        }
    );
}

#[tokio::test]
async fn newer_connection_replaces_older() {
    let (server, addr) = start(None).await;
    let key = rand_key();
    let mut old = DerpClient::connect(&addr.to_string(), key, None)
        .await
        .unwrap();
    let mut new = DerpClient::connect(&addr.to_string(), key, None)
        .await
        .unwrap();
    assert_closed(&mut old).await;
    let a = connect(addr).await;
    assert_relay(&a, &mut new, 100).await;
    assert_eq!(server.client_count(), 2);
}

#[tokio::test]
async fn bad_client_info_closes_only_that_connection() {
    let (server, addr) = start(None).await;
    let a = connect(addr).await;
    let mut b = connect(addr).await;

    let (mut rd, mut wr) = dial_upgraded(&addr.to_string()).await.unwrap();
    assert!(matches!(
        read_typed(&mut rd, MAX_FRAME_SIZE).await.unwrap(),
        Frame::ServerKey { .. }
    ));
    let mut junk = vec![0u8; 24 + 48];
    rand::thread_rng().fill_bytes(&mut junk);
    let hello = Frame::ClientInfo {
        key: rand_key(),
        sealed: junk.into(),
    };
    wr.write_all(&hello.encode()).await.unwrap();
    let r = timeout(WAIT, read_typed(&mut rd, MAX_FRAME_SIZE))
        .await
        .unwrap();
    assert!(r.is_err(), "expected close, got {r:?}");

    assert_relay(&a, &mut b, 1400).await;
    assert_eq!(
        server
            .stats()
            .handshake_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn oversized_frame_closes_only_that_connection() {
    let (_server, addr) = start(None).await;
    let a = connect(addr).await;
    let mut b = connect(addr).await;
    let mut c = connect(addr).await;
    let mut hdr = vec![FRAME_SEND_PACKET];
    hdr.extend_from_slice(&(2u32 << 20).to_be_bytes());
    c.writer().send_encoded(&hdr).await.unwrap();
    assert_closed(&mut c).await;
    assert_relay(&a, &mut b, 1400).await;

    // A SendPacket under the frame limit but over the packet limit too.
    let mut d = connect(addr).await;
    d.send_packet(b.public_key(), &vec![0u8; 65 << 10])
        .await
        .unwrap();
    assert_closed(&mut d).await;
    assert_relay(&a, &mut b, 64).await;
}

#[tokio::test]
async fn truncated_frame_closes_only_that_connection() {
    let (server, addr) = start(None).await;
    let a = connect(addr).await;
    let mut b = connect(addr).await;
    let c = connect(addr).await;
    // A SendPacket header promising 1,432 bytes, then only 100 of them and EOF.
    let mut partial = vec![FRAME_SEND_PACKET];
    partial.extend_from_slice(&(32u32 + 1400).to_be_bytes());
    partial.extend_from_slice(&b.public_key());
    partial.extend_from_slice(&[7u8; 68]);
    c.writer().send_encoded(&partial).await.unwrap();
    drop(c);
    // The half frame is never delivered to b, and b still gets the next packet.
    assert_relay(&a, &mut b, 1400).await;
    tokio::time::timeout(WAIT, async {
        while server.client_count() != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the truncated connection is dropped from the client table");
}

#[tokio::test]
async fn slow_receiver_does_not_stall_others() {
    use std::sync::atomic::Ordering::Relaxed;
    let (server, addr) = start(None).await;
    let a = connect(addr).await;
    let mut b = connect(addr).await;
    // `slow` never reads: its socket buffers and then its bounded queue fill.
    let slow = connect(addr).await;
    let pkt = vec![1u8; 1400];
    // 28 MB: more than the kernel buffers of one stalled loopback socket hold.
    for _ in 0..20_000 {
        timeout(WAIT, a.send_packet(slow.public_key(), &pkt))
            .await
            .expect("sending to a slow receiver must not block the sender")
            .unwrap();
    }
    // The sender and everyone else keep flowing...
    assert_relay(&a, &mut b, 1400).await;
    // ...and the excess was dropped, not buffered without bound.
    assert!(server.stats().packets_dropped_queue_full.load(Relaxed) > 0);
    drop(slow);
}

#[tokio::test]
async fn mesh_frames_need_mesh_key() {
    let mesh = rand_key();
    let (_server, addr) = start(Some(mesh)).await;
    // Wrong mesh key: an ordinary client, which may not watch.
    let mut c = DerpClient::connect(&addr.to_string(), rand_key(), Some(rand_key()))
        .await
        .unwrap();
    c.send(&Frame::WatchConns).await.unwrap();
    assert_closed(&mut c).await;

    // Right key: gets a PeerPresent flood including an existing client.
    let a = connect(addr).await;
    let mut w = DerpClient::connect(&addr.to_string(), rand_key(), Some(mesh))
        .await
        .unwrap();
    w.send(&Frame::WatchConns).await.unwrap();
    let mut seen = false;
    while !seen {
        if let Frame::PeerPresent { key, addr, .. } = next(&mut w).await {
            if key == a.public_key() {
                assert!(addr.is_some_and(|a| a.ip().is_loopback()));
                seen = true;
            }
        }
    }
    // ...then live updates.
    let a_key = a.public_key();
    drop(a);
    loop {
        if let Frame::PeerGone { key, reason } = next(&mut w).await {
            if key == a_key {
                assert_eq!(reason, PeerGoneReason::Disconnected);
                break;
            }
        }
    }
}

#[tokio::test]
async fn meshed_servers_relay_across() {
    let mesh = rand_key();
    let (s1, addr1) = start(Some(mesh)).await;
    let (s2, addr2) = start(Some(mesh)).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let l1 = spawn_mesh_peer(s1.clone(), format!("http://{addr2}/derp"), stop_rx.clone());
    let l2 = spawn_mesh_peer(s2.clone(), addr1.to_string(), stop_rx);

    let a = connect(addr1).await;
    let mut b = connect(addr2).await;
    // s1 learns about b through its watch on s2.
    for _ in 0..250 {
        if s1.forwarder_count() == 1 && s2.forwarder_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s1.forwarder_count(), 1, "only b, not mesh links");
    assert_relay(&a, &mut b, 1400).await;
    let mut a = a;
    assert_relay(&b, &mut a, 1400).await;
    assert_eq!(
        s1.stats()
            .packets_forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Bursts queue up on the mesh link and go out several frames to a write: each frame
    // still arrives whole and in order. (Sixteen at a time stays within b's queue.)
    for burst in 0..20u16 {
        for i in 0..16u16 {
            let n = burst * 16 + i;
            let pkt: Vec<u8> = n
                .to_be_bytes()
                .into_iter()
                .chain((0..100 + usize::from(n) % 1200).map(|j| (j as u16 ^ n) as u8))
                .collect();
            b.send_packet(a.public_key(), &pkt).await.unwrap();
        }
        for i in 0..16u16 {
            let n = burst * 16 + i;
            match next(&mut a).await {
                Frame::RecvPacket { src, packet } => {
                    assert_eq!(src, b.public_key());
                    assert_eq!(packet[..2], n.to_be_bytes(), "packet {n} out of order");
                    assert_eq!(packet.len(), 2 + 100 + usize::from(n) % 1200);
                    assert!(packet[2..]
                        .iter()
                        .enumerate()
                        .all(|(j, v)| *v == (j as u16 ^ n) as u8));
                }
                f => panic!("unexpected {f:?}"),
            }
        }
    }

    // b leaves: s1 withdraws the forwarder, and a gets NotHere.
    let b_key = b.public_key();
    drop(b);
    for _ in 0..250 {
        if s1.forwarder_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s1.forwarder_count(), 0);
    a.send_packet(b_key, b"x").await.unwrap();
    assert!(matches!(
        next(&mut a).await,
        Frame::PeerGone {
            reason: PeerGoneReason::NotHere,
            ..
        }
    ));

    stop_tx.send(true).unwrap();
    timeout(WAIT, l1).await.unwrap().unwrap();
    timeout(WAIT, l2).await.unwrap().unwrap();
}

async fn http_get(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).to_lowercase()
}

#[tokio::test]
async fn http_endpoints() {
    let (server, addr) = start(None).await;
    let r = http_get(
        addr,
        "GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: abc.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("http/1.1 204"), "{r}");
    assert!(r.contains("x-tailscale-response: response abc.1"), "{r}");
    assert!(r.contains("cache-control: no-cache"), "{r}");

    let r = http_get(
        addr,
        "GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: a b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(!r.contains("x-tailscale-response"), "{r}");

    for path in ["/derp/probe", "/derp/latency-check"] {
        for method in ["GET", "HEAD"] {
            let r = http_get(
                addr,
                &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert!(r.starts_with("http/1.1 200"), "{method} {path}: {r}");
            assert!(r.contains("access-control-allow-origin: *"), "{r}");
        }
    }

    let r = http_get(
        addr,
        "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("http/1.1 426"), "{r}");

    // Header casing of the upgrade token does not matter; headers are right.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: dErP\r\nConnection: upgrade\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: derp"), "{head}");
    assert!(head.contains("derp-version: 2"), "{head}");
    assert!(
        head.contains(&format!(
            "derp-public-key: {}",
            hex::encode(server.public_key())
        )),
        "{head}"
    );
}

#[tokio::test]
async fn serve_conn_writes_raw_101_when_asked() {
    let server = DerpServer::new(rand_key(), None);
    let (ours, mut theirs) = tokio::io::duplex(4096);
    let s = server.clone();
    tokio::spawn(async move { s.serve_conn(ours, false).await });
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = timeout(WAIT, theirs.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(text.contains("Derp-Public-Key: "));
}

#[tokio::test]
async fn verify_clients_admits_only_known_keys_and_mesh_peers() {
    let mesh = rand_key();
    let known = rand_key();
    let known_pub = super::server::public_key_of(&known);
    let verifier: ClientVerifier = std::sync::Arc::new(move |k: &[u8; 32]| *k == known_pub);
    let server = DerpServer::with_verifier(rand_key(), Some(mesh), Some(verifier));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(server.clone()).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let stranger = timeout(
        WAIT,
        DerpClient::connect(&addr.to_string(), rand_key(), None),
    )
    .await
    .unwrap();
    assert!(stranger.is_err(), "an unknown key got a relay session");
    assert_eq!(
        server
            .stats()
            .clients_rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let mut node = DerpClient::connect(&addr.to_string(), known, None)
        .await
        .unwrap();
    let peer = DerpClient::connect(&addr.to_string(), rand_key(), Some(mesh))
        .await
        .unwrap();
    assert_relay(&peer, &mut node, 1400).await;
    assert_eq!(server.client_count(), 2);
}

/// Revocation: the relay ends the sessions of keys that are no longer current, and only
/// those; mesh peers and the other clients keep relaying.
#[tokio::test]
async fn disconnect_ends_only_revoked_regular_clients() {
    let mesh = rand_key();
    let (server, addr) = start(Some(mesh)).await;
    let mut revoked = connect(addr).await;
    let mut kept = connect(addr).await;
    let peer = DerpClient::connect(&addr.to_string(), rand_key(), Some(mesh))
        .await
        .unwrap();
    let gone = revoked.public_key();
    let ended = server.disconnect_unless(|k| *k != gone);
    assert_eq!(ended, 1);
    assert_closed(&mut revoked).await;
    assert_relay(&peer, &mut kept, 100).await;
    // The same by key; a mesh peer's key is never disconnected this way.
    assert!(server.disconnect(&kept.public_key()));
    assert_closed(&mut kept).await;
    assert!(!server.disconnect(&peer.public_key()));
    assert_eq!(server.disconnect_unless(|_| false), 0);
}

/// A client that pings without ever reading: the relay keeps at most a small queue of
/// pongs for it, drops (and counts) the rest instead of holding them, and goes on
/// relaying for everyone else.
#[tokio::test]
async fn a_client_that_pings_without_reading_cannot_queue_pongs_without_bound() {
    use std::sync::atomic::Ordering::Relaxed;
    let (server, addr) = start(None).await;
    let pinger = connect(addr).await.writer();
    let a = connect(addr).await;
    let mut b = connect(addr).await;
    let ping = Frame::Ping(*b"pingpong").encode();
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 10_000)
        .collect();
    // 2,000,000 pings (26 MB): far more pongs than the sockets' buffers hold.
    let sender = tokio::spawn(async move {
        for _ in 0..200 {
            if pinger.send_encoded(&batch).await.is_err() {
                break;
            }
        }
    });
    let stats = server.stats();
    for _ in 0..200 {
        if stats.pongs_dropped.load(Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        stats.pongs_dropped.load(Relaxed) > 0,
        "pongs were queued, not dropped"
    );
    assert_relay(&a, &mut b, 1400).await;
    sender.abort();
}
