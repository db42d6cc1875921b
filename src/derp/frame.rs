//! DERP wire framing: constants, the 5-byte frame header, bounded frame
//! reads, and the typed [`Frame`] enum with its parser and encoder.
//!
//! A frame is one type byte, a big-endian u32 payload length, and the
//! payload. Lengths are checked against a caller-chosen limit *before*
//! anything is allocated so a hostile peer cannot make us reserve memory.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::DerpError;

/// `"DERP🔑"`, sent at the start of the ServerKey frame.
pub const MAGIC: [u8; 8] = *b"DERP\xf0\x9f\x94\x91";
pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 24;
pub const FRAME_HEADER_LEN: usize = 5;
/// Largest packet a client may relay.
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest frame either side accepts in general.
pub const MAX_FRAME_SIZE: usize = 1 << 20;
/// The server's tighter bound on the unauthenticated ClientInfo frame.
pub const MAX_CLIENT_INFO_LEN: usize = 256 << 10;
pub const PROTOCOL_VERSION: u32 = 2;
pub const KEEP_ALIVE: Duration = Duration::from_secs(60);

pub const FRAME_SERVER_KEY: u8 = 0x01;
pub const FRAME_CLIENT_INFO: u8 = 0x02;
pub const FRAME_SERVER_INFO: u8 = 0x03;
pub const FRAME_SEND_PACKET: u8 = 0x04;
pub const FRAME_RECV_PACKET: u8 = 0x05;
pub const FRAME_KEEP_ALIVE: u8 = 0x06;
pub const FRAME_NOTE_PREFERRED: u8 = 0x07;
pub const FRAME_PEER_GONE: u8 = 0x08;
pub const FRAME_PEER_PRESENT: u8 = 0x09;
pub const FRAME_FORWARD_PACKET: u8 = 0x0a;
pub const FRAME_WATCH_CONNS: u8 = 0x10;
pub const FRAME_CLOSE_PEER: u8 = 0x11;
pub const FRAME_PING: u8 = 0x12;
pub const FRAME_PONG: u8 = 0x13;
pub const FRAME_HEALTH: u8 = 0x14;
pub const FRAME_RESTARTING: u8 = 0x15;

/// PeerPresent flag bits.
pub const PEER_PRESENT_IS_REGULAR: u8 = 0x01;
pub const PEER_PRESENT_IS_MESH_PEER: u8 = 0x02;
pub const PEER_PRESENT_IS_PROBER: u8 = 0x04;
pub const PEER_PRESENT_NOT_IDEAL: u8 = 0x08;

pub type Key = [u8; KEY_LEN];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGoneReason {
    Disconnected,
    NotHere,
    Other(u8),
}

impl PeerGoneReason {
    fn from_byte(b: u8) -> Self {
        match b {
            0x00 => Self::Disconnected,
            0x01 => Self::NotHere,
            other => Self::Other(other),
        }
    }
    fn to_byte(self) -> u8 {
        match self {
            Self::Disconnected => 0x00,
            Self::NotHere => 0x01,
            Self::Other(b) => b,
        }
    }
}

/// One decoded DERP frame. Sealed boxes stay opaque here; the handshake code
/// owns the crypto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    ServerKey {
        key: Key,
    },
    /// `sealed` is nonce ‖ box.
    ClientInfo {
        key: Key,
        sealed: Bytes,
    },
    /// `sealed` is nonce ‖ box.
    ServerInfo {
        sealed: Bytes,
    },
    SendPacket {
        dst: Key,
        packet: Bytes,
    },
    RecvPacket {
        src: Key,
        packet: Bytes,
    },
    KeepAlive,
    NotePreferred(bool),
    PeerGone {
        key: Key,
        reason: PeerGoneReason,
    },
    PeerPresent {
        key: Key,
        addr: Option<SocketAddr>,
        flags: u8,
    },
    ForwardPacket {
        src: Key,
        dst: Key,
        packet: Bytes,
    },
    WatchConns,
    ClosePeer {
        key: Key,
    },
    Ping([u8; 8]),
    Pong([u8; 8]),
    Health(String),
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
    /// Kept so callers can skip frame types newer than this code.
    Unknown {
        typ: u8,
        payload: Bytes,
    },
}

fn key_at(b: &[u8], off: usize) -> Result<Key, DerpError> {
    b.get(off..off + KEY_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(DerpError::Malformed("short key"))
}

fn eight(b: &[u8]) -> Result<[u8; 8], DerpError> {
    b.get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or(DerpError::Malformed("short ping payload"))
}

impl Frame {
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::ServerKey { .. } => FRAME_SERVER_KEY,
            Frame::ClientInfo { .. } => FRAME_CLIENT_INFO,
            Frame::ServerInfo { .. } => FRAME_SERVER_INFO,
            Frame::SendPacket { .. } => FRAME_SEND_PACKET,
            Frame::RecvPacket { .. } => FRAME_RECV_PACKET,
            Frame::KeepAlive => FRAME_KEEP_ALIVE,
            Frame::NotePreferred(_) => FRAME_NOTE_PREFERRED,
            Frame::PeerGone { .. } => FRAME_PEER_GONE,
            Frame::PeerPresent { .. } => FRAME_PEER_PRESENT,
            Frame::ForwardPacket { .. } => FRAME_FORWARD_PACKET,
            Frame::WatchConns => FRAME_WATCH_CONNS,
            Frame::ClosePeer { .. } => FRAME_CLOSE_PEER,
            Frame::Ping(_) => FRAME_PING,
            Frame::Pong(_) => FRAME_PONG,
            Frame::Health(_) => FRAME_HEALTH,
            Frame::Restarting { .. } => FRAME_RESTARTING,
            Frame::Unknown { typ, .. } => *typ,
        }
    }

    /// Decodes a payload. Trailing bytes are tolerated where the protocol
    /// reserves room for future fields (ServerKey, PeerPresent).
    pub fn parse(typ: u8, payload: Bytes) -> Result<Frame, DerpError> {
        let p = &payload[..];
        Ok(match typ {
            FRAME_SERVER_KEY => {
                if p.len() < MAGIC.len() + KEY_LEN {
                    return Err(DerpError::Malformed("short server key"));
                }
                if p[..MAGIC.len()] != MAGIC {
                    return Err(DerpError::BadMagic);
                }
                Frame::ServerKey {
                    key: key_at(p, MAGIC.len())?,
                }
            }
            FRAME_CLIENT_INFO => {
                if p.len() < KEY_LEN + NONCE_LEN {
                    return Err(DerpError::Malformed("short client info"));
                }
                Frame::ClientInfo {
                    key: key_at(p, 0)?,
                    sealed: payload.slice(KEY_LEN..),
                }
            }
            FRAME_SERVER_INFO => {
                if p.len() < NONCE_LEN {
                    return Err(DerpError::Malformed("short server info"));
                }
                Frame::ServerInfo { sealed: payload }
            }
            FRAME_SEND_PACKET => Frame::SendPacket {
                dst: key_at(p, 0)?,
                packet: payload.slice(KEY_LEN..),
            },
            FRAME_RECV_PACKET => Frame::RecvPacket {
                src: key_at(p, 0)?,
                packet: payload.slice(KEY_LEN..),
            },
            FRAME_KEEP_ALIVE => Frame::KeepAlive,
            FRAME_NOTE_PREFERRED => Frame::NotePreferred(p.first().copied().unwrap_or(0) != 0),
            FRAME_PEER_GONE => Frame::PeerGone {
                key: key_at(p, 0)?,
                // Old servers sent no reason byte.
                reason: PeerGoneReason::from_byte(p.get(KEY_LEN).copied().unwrap_or(0)),
            },
            FRAME_PEER_PRESENT => {
                let key = key_at(p, 0)?;
                // Older servers send just the key, or key + ip + port.
                let addr = p.get(KEY_LEN..KEY_LEN + 18).map(|a| {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&a[..16]);
                    let port = u16::from_be_bytes([a[16], a[17]]);
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)).to_canonical(), port)
                });
                let flags = p.get(KEY_LEN + 18).copied().unwrap_or(0);
                Frame::PeerPresent { key, addr, flags }
            }
            FRAME_FORWARD_PACKET => {
                if p.len() < 2 * KEY_LEN {
                    return Err(DerpError::Malformed("short forward packet"));
                }
                Frame::ForwardPacket {
                    src: key_at(p, 0)?,
                    dst: key_at(p, KEY_LEN)?,
                    packet: payload.slice(2 * KEY_LEN..),
                }
            }
            FRAME_WATCH_CONNS => Frame::WatchConns,
            FRAME_CLOSE_PEER => Frame::ClosePeer { key: key_at(p, 0)? },
            FRAME_PING => Frame::Ping(eight(p)?),
            FRAME_PONG => Frame::Pong(eight(p)?),
            FRAME_HEALTH => Frame::Health(String::from_utf8_lossy(p).into_owned()),
            FRAME_RESTARTING => {
                if p.len() < 8 {
                    return Err(DerpError::Malformed("short restarting"));
                }
                Frame::Restarting {
                    reconnect_in_ms: u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
                    try_for_ms: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                }
            }
            typ => Frame::Unknown { typ, payload },
        })
    }

    /// Encodes the whole frame, header included, ready to be written.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(self.frame_type());
        b.put_u32(0); // patched below once the payload length is known
        match self {
            Frame::ServerKey { key } => {
                b.put_slice(&MAGIC);
                b.put_slice(key);
            }
            Frame::ClientInfo { key, sealed } => {
                b.put_slice(key);
                b.put_slice(sealed);
            }
            Frame::ServerInfo { sealed } => b.put_slice(sealed),
            Frame::SendPacket { dst: k, packet } | Frame::RecvPacket { src: k, packet } => {
                b.put_slice(k);
                b.put_slice(packet);
            }
            Frame::KeepAlive | Frame::WatchConns => {}
            Frame::NotePreferred(p) => b.put_u8(u8::from(*p)),
            Frame::PeerGone { key, reason } => {
                b.put_slice(key);
                b.put_u8(reason.to_byte());
            }
            Frame::PeerPresent { key, addr, flags } => {
                b.put_slice(key);
                let (ip, port) = match addr {
                    Some(SocketAddr::V4(a)) => (a.ip().to_ipv6_mapped().octets(), a.port()),
                    Some(SocketAddr::V6(a)) => (a.ip().octets(), a.port()),
                    None => ([0u8; 16], 0),
                };
                b.put_slice(&ip);
                b.put_u16(port);
                b.put_u8(*flags);
            }
            Frame::ForwardPacket { src, dst, packet } => {
                b.put_slice(src);
                b.put_slice(dst);
                b.put_slice(packet);
            }
            Frame::ClosePeer { key } => b.put_slice(key),
            Frame::Ping(d) | Frame::Pong(d) => b.put_slice(d),
            Frame::Health(s) => b.put_slice(s.as_bytes()),
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => {
                b.put_u32(*reconnect_in_ms);
                b.put_u32(*try_for_ms);
            }
            Frame::Unknown { payload, .. } => b.put_slice(payload),
        }
        let len = (b.len() - FRAME_HEADER_LEN) as u32;
        b[1..5].copy_from_slice(&len.to_be_bytes());
        b.freeze()
    }
}

/// Builds a RecvPacket frame without an intermediate [`Frame`], since this
/// is the hot path of the relay.
pub fn encode_recv_packet(src: &Key, packet: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + KEY_LEN + packet.len());
    b.put_u8(FRAME_RECV_PACKET);
    b.put_u32((KEY_LEN + packet.len()) as u32);
    b.put_slice(src);
    b.put_slice(packet);
    b.freeze()
}

/// Reads one raw frame, refusing payloads longer than `max` before
/// allocating. EOF before the first header byte is [`DerpError::Closed`];
/// EOF anywhere later is [`DerpError::Truncated`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<(u8, Bytes), DerpError> {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    let n = r.read(&mut hdr).await?;
    if n == 0 {
        return Err(DerpError::Closed);
    }
    read_exact_or_truncated(r, &mut hdr[n..]).await?;
    let typ = hdr[0];
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    if len > max {
        return Err(DerpError::FrameTooLarge { typ, len, max });
    }
    let mut payload = BytesMut::zeroed(len);
    read_exact_or_truncated(r, &mut payload).await?;
    Ok((typ, payload.freeze()))
}

async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), DerpError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(DerpError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Reads and decodes one frame.
pub async fn read_typed<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Frame, DerpError> {
    let (typ, payload) = read_frame(r, max).await?;
    Frame::parse(typ, payload)
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), DerpError> {
    w.write_all(&frame.encode()).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        let k = [7u8; 32];
        vec![
            Frame::ServerKey { key: k },
            Frame::ClientInfo {
                key: k,
                sealed: Bytes::from(vec![1u8; 40]),
            },
            Frame::ServerInfo {
                sealed: Bytes::from(vec![2u8; 40]),
            },
            Frame::SendPacket {
                dst: k,
                packet: Bytes::from_static(b"hello"),
            },
            Frame::RecvPacket {
                src: k,
                packet: Bytes::from_static(b""),
            },
            Frame::KeepAlive,
            Frame::NotePreferred(true),
            Frame::NotePreferred(false),
            Frame::PeerGone {
                key: k,
                reason: PeerGoneReason::NotHere,
            },
            Frame::PeerPresent {
                key: k,
                addr: Some("192.0.2.1:41641".parse().unwrap()),
                flags: PEER_PRESENT_IS_REGULAR,
            },
            Frame::PeerPresent {
                key: k,
                addr: Some("[2001:db8::1]:9".parse().unwrap()),
                flags: PEER_PRESENT_IS_MESH_PEER,
            },
            Frame::ForwardPacket {
                src: k,
                dst: [9u8; 32],
                packet: Bytes::from_static(b"x"),
            },
            Frame::WatchConns,
            Frame::ClosePeer { key: k },
            Frame::Ping(*b"12345678"),
            Frame::Pong(*b"87654321"),
            Frame::Health("sad".into()),
            Frame::Restarting {
                reconnect_in_ms: 5,
                try_for_ms: 600,
            },
            Frame::Unknown {
                typ: 0x7f,
                payload: Bytes::from_static(b"future"),
            },
        ]
    }

    #[tokio::test]
    async fn roundtrip_every_frame_type() {
        for f in all_frames() {
            let enc = f.encode();
            let mut r = &enc[..];
            let got = read_typed(&mut r, MAX_FRAME_SIZE).await.unwrap();
            assert_eq!(got, f);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn server_key_wire_format() {
        let enc = Frame::ServerKey { key: [1; 32] }.encode();
        assert_eq!(&enc[..5], &[0x01, 0, 0, 0, 40]);
        assert_eq!(
            &enc[5..13],
            &[0x44, 0x45, 0x52, 0x50, 0xf0, 0x9f, 0x94, 0x91]
        );
    }

    #[test]
    fn bad_magic_rejected() {
        let mut p = vec![0u8; 40];
        p[..8].copy_from_slice(b"NOTDERP!");
        assert!(matches!(
            Frame::parse(FRAME_SERVER_KEY, Bytes::from(p)),
            Err(DerpError::BadMagic)
        ));
    }

    #[test]
    fn short_payloads_rejected() {
        for typ in [
            FRAME_SERVER_KEY,
            FRAME_CLIENT_INFO,
            FRAME_SEND_PACKET,
            FRAME_RECV_PACKET,
            FRAME_PEER_GONE,
            FRAME_PEER_PRESENT,
            FRAME_FORWARD_PACKET,
            FRAME_CLOSE_PEER,
            FRAME_PING,
            FRAME_PONG,
            FRAME_RESTARTING,
        ] {
            assert!(
                Frame::parse(typ, Bytes::from_static(&[0u8; 7])).is_err(),
                "type {typ:#x}"
            );
        }
    }

    #[test]
    fn old_peer_present_and_peer_gone_accepted() {
        let f = Frame::parse(FRAME_PEER_PRESENT, Bytes::from(vec![3u8; 32])).unwrap();
        assert_eq!(
            f,
            Frame::PeerPresent {
                key: [3; 32],
                addr: None,
                flags: 0
            }
        );
        let f = Frame::parse(FRAME_PEER_GONE, Bytes::from(vec![3u8; 32])).unwrap();
        assert_eq!(
            f,
            Frame::PeerGone {
                key: [3; 32],
                reason: PeerGoneReason::Disconnected
            }
        );
    }

    #[tokio::test]
    async fn oversized_frame_rejected_before_reading_payload() {
        let mut hdr = vec![FRAME_SEND_PACKET];
        hdr.extend_from_slice(&((MAX_FRAME_SIZE + 1) as u32).to_be_bytes());
        let mut r = &hdr[..];
        match read_frame(&mut r, MAX_FRAME_SIZE).await {
            Err(DerpError::FrameTooLarge { len, max, .. }) => {
                assert_eq!(len, MAX_FRAME_SIZE + 1);
                assert_eq!(max, MAX_FRAME_SIZE);
            }
            other => panic!("unexpected {other:?}"),
        }
        // A ClientInfo over the handshake limit but under the general one.
        let mut hdr = vec![FRAME_CLIENT_INFO];
        hdr.extend_from_slice(&((MAX_CLIENT_INFO_LEN + 1) as u32).to_be_bytes());
        let mut r = &hdr[..];
        assert!(matches!(
            read_frame(&mut r, MAX_CLIENT_INFO_LEN).await,
            Err(DerpError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn truncated_frames() {
        let enc = Frame::SendPacket {
            dst: [1; 32],
            packet: Bytes::from_static(b"payload"),
        }
        .encode();
        // Cut inside the header and inside the payload.
        for cut in [2, FRAME_HEADER_LEN, enc.len() - 1] {
            let mut r = &enc[..cut];
            assert!(
                matches!(
                    read_frame(&mut r, MAX_FRAME_SIZE).await,
                    Err(DerpError::Truncated)
                ),
                "cut at {cut}"
            );
        }
        let mut r: &[u8] = &[];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME_SIZE).await,
            Err(DerpError::Closed)
        ));
    }
}
