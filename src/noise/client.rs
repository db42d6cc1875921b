//! The client side of TS2021 as the official client speaks it: the HTTP upgrade to
//! `/ts2021` carrying the Noise IK initiation, the server's response, then HTTP/2 over the
//! Noise transport. Used by the load generator and the protocol tests.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let plain = super::NoiseStream::new(s, k2, k1);
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
