//! The client side of TS2021 as the official client speaks it: the HTTP upgrade to
//! `/ts2021` carrying the Noise IK initiation, the server's response, then HTTP/2 over the
//! Noise transport. Used by the load generator and the protocol tests.
//!
//! Servers may put an early payload between the handshake response and HTTP/2
//! (`control/ts2021/conn.go`: a 5-byte magic, a big-endian u32 length, JSON); headscale
//! does. [`EarlyPayload`] reads and drops it as the official client does, and hands
//! anything else to HTTP/2 untouched.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::handshake::{MSG_TYPE_RESPONSE, NOISE_PARAMS};
use super::NoiseError;

/// Capability version the client claims (what Tailscale v1.102 sends is far above this;
/// the server needs ≥ 28).
pub const CLIENT_VERSION: u16 = 142;

pub type ControlClient = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

fn hs_err(e: snow::Error) -> NoiseError {
    NoiseError::Handshake(e.to_string())
}

/// The 101-byte initiation message and the handshake state to finish it with.
pub fn initiation(
    server_public: &[u8; 32],
    machine_secret: &[u8; 32],
    version: u16,
) -> Result<(Vec<u8>, snow::HandshakeState), NoiseError> {
    let prologue = format!("Tailscale Control Protocol v{version}");
    let params = NOISE_PARAMS.parse().map_err(hs_err)?;
    let mut hs = snow::Builder::new(params)
        .local_private_key(machine_secret)
        .map_err(hs_err)?
        .remote_public_key(server_public)
        .map_err(hs_err)?
        .prologue(prologue.as_bytes())
        .map_err(hs_err)?
        .build_initiator()
        .map_err(hs_err)?;
    let mut buf = [0u8; 128];
    let n = hs.write_message(&[], &mut buf).map_err(hs_err)?;
    let mut init = version.to_be_bytes().to_vec();
    init.push(1);
    init.extend_from_slice(&96u16.to_be_bytes());
    init.extend_from_slice(&buf[..n]);
    Ok((init, hs))
}

/// Opens a TS2021 session to the control server at `addr` (`host:port`, plain HTTP) as
/// the machine with `machine_secret`; requests on the result go over HTTP/2 inside Noise.
pub async fn connect(
    addr: &str,
    server_public: &[u8; 32],
    machine_secret: &[u8; 32],
) -> Result<ControlClient, NoiseError> {
    let s = TcpStream::connect(addr).await?;
    connect_over(s, addr, server_public, machine_secret).await
}

/// Like [`connect`], over a TCP connection the caller opened (from a source address of
/// its choosing, or through a load balancer); `addr` is the `Host` it asks for.
pub async fn connect_over(
    mut s: TcpStream,
    addr: &str,
    server_public: &[u8; 32],
    machine_secret: &[u8; 32],
) -> Result<ControlClient, NoiseError> {
    use base64::Engine;
    let (init, mut hs) = initiation(server_public, machine_secret, CLIENT_VERSION)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&init);
    s.set_nodelay(true)?;
    let req = format!(
        "POST /ts2021 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {b64}\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    // The response head, byte by byte, so nothing after it is consumed.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 || head.len() > 8192 {
            break;
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        let first = String::from_utf8_lossy(&head);
        return Err(NoiseError::Handshake(format!(
            "upgrade refused: {}",
            first.lines().next().unwrap_or("no answer")
        )));
    }
    let mut resp = [0u8; 51];
    s.read_exact(&mut resp).await?;
    if resp[0] != MSG_TYPE_RESPONSE {
        return Err(NoiseError::MessageType(resp[0]));
    }
    let mut out = [0u8; 64];
    hs.read_message(&resp[3..], &mut out).map_err(hs_err)?;
    let (k1, k2) = hs.dangerously_get_raw_split();
    // The client receives with k2 and sends with k1: the mirror of the server.
    let plain = EarlyPayload::new(super::NoiseStream::new(s, k2, k1));
    // tailscaled's HTTP/2 (Go's) returns flow-control credit for every 4 KiB it reads,
    // and a replica counts that as hearing from it (`Heard`). Rust's h2 returns credit
    // once half the remaining window is read: with hyper's 2 MiB window, a client
    // reading slowly could be silent for minutes. A 256 KiB window keeps it nearer
    // tailscaled: about every 85 KiB.
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(256 * 1024)
        .handshake(TokioIo::new(plain))
        .await
        .map_err(|e| NoiseError::Handshake(format!("HTTP/2 over Noise: {e}")))?;
    tokio::spawn(conn);
    Ok(send)
}

/// What stands where the HTTP/2 SETTINGS frame's 9-byte header would otherwise be when a
/// server sends an early payload (`ts2021.EarlyPayloadMagic`), followed by a big-endian
/// u32 length.
const EARLY_PAYLOAD_MAGIC: &[u8; 5] = b"\xff\xff\xffTS";
/// The official client refuses a longer early payload.
const EARLY_PAYLOAD_MAX: usize = 10 << 20;

/// Where an [`EarlyPayload`] stands in what the server sent.
enum Early {
    /// Reading the first 9 bytes: an early payload's header, or HTTP/2's first frame's.
    Header { buf: [u8; 9], got: usize },
    /// Dropping this many more bytes of an early payload.
    Skip { left: usize },
    /// Handing the first bytes, which were HTTP/2's, on: `buf[pos..end]` are left.
    Replay {
        buf: [u8; 9],
        pos: usize,
        end: usize,
    },
    /// Everything from here on is HTTP/2's.
    Done,
}

/// The server-to-client bytes of a TS2021 session with the early payload, if the server
/// sent one, taken out. Like the official client, it looks only when HTTP/2 first reads,
/// so nothing waits for the server to speak first. Writes pass straight through.
pub struct EarlyPayload<S> {
    inner: S,
    state: Early,
}

impl<S> EarlyPayload<S> {
    pub fn new(inner: S) -> Self {
        EarlyPayload {
            inner,
            state: Early::Header {
                buf: [0; 9],
                got: 0,
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for EarlyPayload<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                Early::Header { buf, got } => {
                    if *got < buf.len() {
                        let mut rb = ReadBuf::new(&mut buf[*got..]);
                        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                        let n = rb.filled().len();
                        if n == 0 {
                            // The stream ended first: what came is HTTP/2's to judge.
                            let (buf, end) = (*buf, *got);
                            this.state = Early::Replay { buf, pos: 0, end };
                        } else {
                            *got += n;
                        }
                        continue;
                    }
                    if buf[..5] == EARLY_PAYLOAD_MAGIC[..] {
                        let len = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize;
                        if len > EARLY_PAYLOAD_MAX {
                            return Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!(
                                    "the server's early payload is {len} bytes, more than the {EARLY_PAYLOAD_MAX} a client accepts"
                                ),
                            )));
                        }
                        this.state = Early::Skip { left: len };
                    } else {
                        let buf = *buf;
                        this.state = Early::Replay {
                            buf,
                            pos: 0,
                            end: 9,
                        };
                    }
                }
                Early::Skip { left } => {
                    if *left == 0 {
                        this.state = Early::Done;
                        continue;
                    }
                    let mut scratch = [0u8; 4096];
                    let want = (*left).min(scratch.len());
                    let mut rb = ReadBuf::new(&mut scratch[..want]);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the session ended inside the server's early payload",
                        )));
                    }
                    *left -= n;
                }
                Early::Replay { buf, pos, end } => {
                    if *pos == *end {
                        this.state = Early::Done;
                        continue;
                    }
                    let n = (*end - *pos).min(out.remaining());
                    out.put_slice(&buf[*pos..*pos + n]);
                    *pos += n;
                    return Poll::Ready(Ok(()));
                }
                Early::Done => return Pin::new(&mut this.inner).poll_read(cx, out),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for EarlyPayload<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client reading through [`EarlyPayload`] gets of `sent`, which the server
    /// writes in pieces of at most `piece` bytes.
    async fn through(sent: Vec<u8>, piece: usize) -> std::io::Result<Vec<u8>> {
        let (mut server, client) = tokio::io::duplex(piece);
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(piece) {
                server.write_all(chunk).await?;
            }
            server.shutdown().await
        });
        let mut got = Vec::new();
        let read = EarlyPayload::new(client).read_to_end(&mut got).await;
        // The writer may fail once the reader gave up; the reader's result is what counts.
        let _ = writer.await;
        read.map(|_| got)
    }

    fn early(json: &[u8]) -> Vec<u8> {
        let mut v = EARLY_PAYLOAD_MAGIC.to_vec();
        v.extend_from_slice(&(json.len() as u32).to_be_bytes());
        v.extend_from_slice(json);
        v
    }

    /// HTTP/2's first frame header: a SETTINGS frame, 18 bytes long.
    const SETTINGS: &[u8] = b"\x00\x00\x12\x04\x00\x00\x00\x00\x00settings-payload..";

    /// headscale's early payload (the challenge JSON) is dropped and HTTP/2 gets exactly
    /// what followed it, however the bytes were cut into reads.
    #[tokio::test]
    async fn drops_the_early_payload_before_http2() {
        let json = br#"{"nodeKeyChallenge":"chalpub:0000000000000000000000000000000000000000000000000000000000000000"}"#;
        let mut sent = early(json);
        sent.extend_from_slice(SETTINGS);
        for piece in [1, 3, 9, 10, 4096] {
            assert_eq!(through(sent.clone(), piece).await.unwrap(), SETTINGS);
        }
        // An empty early payload is one too.
        let mut sent = early(b"");
        sent.extend_from_slice(SETTINGS);
        assert_eq!(through(sent, 2).await.unwrap(), SETTINGS);
    }

    /// A server that sends no early payload (Hydrascale, testcontrol) has every byte
    /// handed to HTTP/2, including a stream shorter than a frame header.
    #[tokio::test]
    async fn passes_http2_through_when_there_is_none() {
        for piece in [1, 4, 9, 4096] {
            assert_eq!(through(SETTINGS.to_vec(), piece).await.unwrap(), SETTINGS);
        }
        assert_eq!(
            through(b"\xff\xff\xff".to_vec(), 1).await.unwrap(),
            b"\xff\xff\xff"
        );
        assert_eq!(through(Vec::new(), 1).await.unwrap(), b"");
    }

    /// A payload longer than the official client accepts, or one cut short, is an error,
    /// not bytes handed to HTTP/2.
    #[tokio::test]
    async fn refuses_oversized_or_truncated_early_payloads() {
        let mut huge = EARLY_PAYLOAD_MAGIC.to_vec();
        huge.extend_from_slice(&((EARLY_PAYLOAD_MAX as u32) + 1).to_be_bytes());
        let e = through(huge, 64).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        let cut = early(b"{\"nodeKeyChallenge\":");
        let e = through(cut[..cut.len() - 3].to_vec(), 64)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
