//! Accepting connections on the HTTP listeners (control, metrics, admin over TCP) under
//! limits no client can talk its way past.
//!
//! Every connection gets, in this order: its client's address (from a PROXY protocol
//! header when it comes from a trusted load balancer, else its TCP peer), a slot among
//! the connections of that address (at most `per_address` at once, an IPv6 /64 counting
//! as one address), and [`HEADER_TIMEOUT`] to send the PROXY header and enough of its
//! first request to tell HTTP/1 from HTTP/2. On HTTP/1, hyper then gives it
//! [`HEADER_TIMEOUT`] for each request head, also between requests on a kept-alive
//! connection. A connection refused or timed out is closed and counted
//! (`hydrascale_connections_refused_total`). What a connection does once upgraded (a Noise
//! session, DERP) is bounded by its own plane; it keeps its slot for as long as it lives.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::{ConnRefusal, Listener, Metrics};

/// What a client gets to send a request head (and, before its first, a PROXY header).
/// A real client sends its request at once; this only ends connections that never will.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections at once from one address to the admin API over TCP and to the metrics
/// listener: the CLI and Prometheus use one each.
pub const SMALL_LISTENER_PER_ADDRESS: usize = 64;

/// HTTP/2 connections (gRPC on the admin API, h2c on the others) are pinged this long after
/// the peer's last frame, and closed when it does not answer within [`H2_PING_TIMEOUT`].
const H2_PING_EVERY: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const PROXY_V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const PROXY_V1_PREFIX: &[u8] = b"PROXY ";
/// A v1 header is at most 107 bytes, CRLF included (the spec's own bound).
const PROXY_V1_MAX: usize = 107;
/// A v2 header's addresses and TLVs; HAProxy sends a few dozen bytes.
const PROXY_V2_MAX_BODY: usize = 4096;

/// Errors of a connection before it is handed to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("invalid PROXY protocol header: {0}")]
    Proxy(&'static str),
    #[error("the client sent no request within {HEADER_TIMEOUT:?}")]
    Timeout,
    #[error("the client closed the connection before its first request")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// How one listener treats its connections.
#[derive(Clone, Debug)]
pub struct Limits {
    pub listener: Listener,
    /// Connections at once from one client address; 0: no limit.
    pub per_address: usize,
    /// Peers whose connections may start with a PROXY protocol header naming the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// The address connections and logins are counted under: an IPv4 address as it is, an
/// IPv6 address by its /64 (what one customer of an ISP usually gets, so one attacker
/// cannot be a new "address" per connection), an IPv4-mapped IPv6 address as IPv4.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(Ipv6Addr::from(o))
            }
        },
    }
}

/// Things (connections, sessions) held per client address, counted by [`address_key`].
#[derive(Clone, Default, Debug)]
pub struct Slots(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One thing's place among its address's; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Slots,
    key: IpAddr,
}

impl Slots {
    /// A slot for `ip`, unless `max` (non-zero) are already taken.
    pub fn take(&self, ip: IpAddr, max: usize) -> Option<Slot> {
        let key = address_key(ip);
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key).or_insert(0);
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&address_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.slots.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// An accepted connection past its prelude: the bytes read while looking at it are
/// handed out again first, then the socket's.
pub struct Conn {
    io: TcpStream,
    read: Vec<u8>,
    pos: usize,
    client: SocketAddr,
    _slot: Slot,
}

impl Conn {
    /// The client's address (from the PROXY header, if its load balancer sent one).
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// Whether the client's first byte (read by the prelude) starts a TLS handshake.
    fn starts_tls(&self) -> bool {
        self.read.get(self.pos) == Some(&0x16)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.read.len() {
            let n = (this.read.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.read[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.read.len() {
                this.read = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.io.local_addr().ok(),
            remote_addr: Some(self.client),
        }
    }
}

/// What the first bytes of a connection from a trusted proxy say.
#[derive(Debug, PartialEq)]
enum Proxy {
    /// Not all there yet.
    More,
    /// No PROXY header: the proxy's own connection (or a client that reached this
    /// listener directly from the proxy's address).
    Absent,
    /// A header of `len` bytes; the client's address, or `None` for the proxy's own
    /// connection (v2 LOCAL, v1 UNKNOWN, or an address family other than TCP).
    Header {
        client: Option<SocketAddr>,
        len: usize,
    },
}

/// Parses a PROXY protocol header (v1 text or v2 binary) at the start of `buf`.
fn parse_proxy(buf: &[u8]) -> Result<Proxy, ListenerError> {
    let n = buf.len().min(PROXY_V2_SIGNATURE.len());
    if buf[..n] == PROXY_V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return Ok(Proxy::More);
        }
        if buf[12] >> 4 != 2 {
            return Err(ListenerError::Proxy("v2 header of an unknown version"));
        }
        let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if body > PROXY_V2_MAX_BODY {
            return Err(ListenerError::Proxy("v2 header longer than 4 KiB"));
        }
        let len = 16 + body;
        if buf.len() < len {
            return Ok(Proxy::More);
        }
        let addr = &buf[16..len];
        let client = match (buf[12] & 0x0f, buf[13]) {
            // LOCAL: the proxy's own connection (its health checks).
            (0, _) => None,
            (1, 0x11) if addr.len() >= 12 => {
                let ip: [u8; 4] = addr[0..4].try_into().unwrap_or_default();
                let port = u16::from_be_bytes([addr[8], addr[9]]);
                Some(SocketAddr::from((ip, port)))
            }
            (1, 0x21) if addr.len() >= 36 => {
                let ip: [u8; 16] = addr[0..16].try_into().unwrap_or_default();
                let port = u16::from_be_bytes([addr[32], addr[33]]);
                Some(SocketAddr::from((ip, port)))
            }
            (1, 0x11 | 0x21) => {
                return Err(ListenerError::Proxy(
                    "v2 addresses shorter than their family",
                ))
            }
            (1, _) => None,
            _ => return Err(ListenerError::Proxy("v2 header with an unknown command")),
        };
        return Ok(Proxy::Header { client, len });
    }
    let n = buf.len().min(PROXY_V1_PREFIX.len());
    if buf[..n] != PROXY_V1_PREFIX[..n] {
        return Ok(Proxy::Absent);
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= PROXY_V1_MAX {
            Err(ListenerError::Proxy("v1 header without CRLF in 107 bytes"))
        } else {
            Ok(Proxy::More)
        };
    };
    let line =
        std::str::from_utf8(&buf[..end]).map_err(|_| ListenerError::Proxy("v1 header not text"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let client = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", "TCP4" | "TCP6", src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ListenerError::Proxy("v1 source address"))?;
            let port: u16 = sport
                .parse()
                .map_err(|_| ListenerError::Proxy("v1 source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => {
            return Err(ListenerError::Proxy(
                "v1 header is not PROXY TCP4|TCP6|UNKNOWN",
            ))
        }
    };
    Ok(Proxy::Header {
        client,
        len: end + 2,
    })
}

/// Whether `buf` (non-empty) tells HTTP/1 from HTTP/2: all of the HTTP/2 preface, or a
/// byte that departs from it. hyper's own check waits for either with no deadline.
fn version_known(buf: &[u8]) -> bool {
    !buf.is_empty() && (buf.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(buf))
}

/// Reads more of the connection into `buf`; an error when it closed.
async fn read_more(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), ListenerError> {
    buf.reserve(512);
    if tcp.read_buf(buf).await? == 0 {
        return Err(ListenerError::Closed);
    }
    Ok(())
}

/// The client's address and the bytes read to learn it and the HTTP version.
async fn prelude(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    trusted: bool,
) -> Result<(SocketAddr, Vec<u8>), ListenerError> {
    let mut buf = Vec::new();
    let mut client = peer;
    if trusted {
        loop {
            if !buf.is_empty() {
                match parse_proxy(&buf)? {
                    Proxy::More => {}
                    Proxy::Absent => break,
                    Proxy::Header { client: c, len } => {
                        client = c.unwrap_or(peer);
                        buf.drain(..len);
                        break;
                    }
                }
            }
            read_more(tcp, &mut buf).await?;
        }
    }
    while !version_known(&buf) {
        read_more(tcp, &mut buf).await?;
    }
    Ok((client, buf))
}

/// What a refused HTTP client reads before the connection closes.
const REFUSED_HTTP: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: 70\r\nConnection: close\r\n\r\ntoo many connections from your address to this server; try again later";

/// Takes an accepted connection through its prelude and its address's slot.
async fn admit(
    mut tcp: TcpStream,
    peer: SocketAddr,
    limits: &Limits,
    slots: &Slots,
    metrics: &Metrics,
) -> Option<Conn> {
    let trusted = limits
        .trusted_proxies
        .iter()
        .any(|n| n.contains(&peer.ip()));
    // Before anything is read: a connection over the limit costs no reading. From a
    // trusted proxy, the client is known only after the header.
    let early = if trusted {
        None
    } else {
        match slots.take(peer.ip(), limits.per_address) {
            Some(s) => Some(s),
            None => {
                refuse(&tcp, limits.listener, metrics);
                return None;
            }
        }
    };
    let (client, read) =
        match tokio::time::timeout(HEADER_TIMEOUT, prelude(&mut tcp, peer, trusted)).await {
            Ok(Ok(v)) => v,
            Ok(Err(ListenerError::Proxy(why))) => {
                tracing::info!(%peer, why, "connection from a trusted proxy refused");
                metrics.connection_refused(limits.listener, ConnRefusal::ProxyHeader);
                return None;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection ended before its first request");
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, "connection closed: no request within the header timeout");
                metrics.connection_refused(limits.listener, ConnRefusal::HeaderTimeout);
                return None;
            }
        };
    let slot = match early {
        Some(s) => s,
        None => match slots.take(client.ip(), limits.per_address) {
            Some(s) => s,
            None => {
                refuse(&tcp, limits.listener, metrics);
                return None;
            }
        },
    };
    Some(Conn {
        io: tcp,
        read,
        pos: 0,
        client,
        _slot: slot,
    })
}

fn refuse(tcp: &TcpStream, listener: Listener, metrics: &Metrics) {
    metrics.connection_refused(listener, ConnRefusal::PerAddress);
    // Only HTTP/1 clients can read it; a gRPC client sees the connection close.
    if !matches!(listener, Listener::Admin) {
        let _ = tcp.try_write(REFUSED_HTTP);
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Whether an accept error concerns only that connection (go on at once) rather than the
/// process (out of file descriptors: wait a moment).
fn connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// TLS on a listener that answers plain HTTP too (the control listener with `[tls]` on).
/// A connection whose first byte starts a TLS handshake (0x16; no HTTP request starts
/// so) is TLS and gets the full app; any other is plain HTTP and gets `plain_app`, only
/// what is safe without TLS (`control::plain_router`: the rest redirects to https).
pub struct TlsSide {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub plain_app: axum::Router,
}

/// Serves `app` on `listener` under `limits` until `stop` turns true, then lets the
/// open HTTP connections finish their requests.
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    serve_http_tls(listener, app, None, limits, metrics, stop).await;
}

/// [`serve_http`], with TLS on the same port when `tls` is given: the limits, the PROXY
/// header and the header timeout apply to every connection before it is told TLS from
/// plain, and the TLS handshake gets [`HEADER_TIMEOUT`] too.
pub async fn serve_http_tls(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<TlsSide>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Slots::default();
    let limits = Arc::new(limits);
    let mut conns = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) if connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(listener = ?limits.listener, error = %e, "accept failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // Nagle plus the client's delayed ACKs would hold small DERP frames and map
        // deltas back by up to 40 ms; Go (the official client and derper) disables it too.
        let _ = tcp.set_nodelay(true);
        let (app, tls, limits, slots, metrics) = (
            app.clone(),
            tls.clone(),
            limits.clone(),
            slots.clone(),
            metrics.clone(),
        );
        let stop = stop.clone();
        conns.spawn(async move {
            serve_conn(tcp, peer, app, tls, &limits, &slots, &metrics, stop).await;
        });
    }
    while conns.join_next().await.is_some() {}
}

#[allow(clippy::too_many_arguments)]
async fn serve_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    tls: Option<Arc<TlsSide>>,
    limits: &Limits,
    slots: &Slots,
    metrics: &Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let conn = tokio::select! {
        c = admit(tcp, peer, limits, slots, metrics) => c,
        _ = stopped(&mut stop) => None,
    };
    let Some(conn) = conn else { return };
    let client = conn.client();
    let Some(tls) = tls else {
        return serve_io(conn, client, app, Version::Either, limits, metrics, stop).await;
    };
    if !conn.starts_tls() {
        let plain = tls.plain_app.clone();
        return serve_io(conn, client, plain, Version::Either, limits, metrics, stop).await;
    }
    let handshake = tokio::select! {
        h = tokio::time::timeout(HEADER_TIMEOUT, tls.acceptor.accept(conn)) => h,
        _ = stopped(&mut stop) => return,
    };
    let mut stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%client, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%client, "TLS handshake timed out");
            metrics.connection_refused(limits.listener, ConnRefusal::HeaderTimeout);
            return;
        }
    };
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() == Some(crate::tls::ACME_TLS_ALPN) {
        // A TLS-ALPN-01 validation: the certificate was the answer.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        return;
    }
    // ALPN tells the version, so hyper's wait for an HTTP/2 preface (which has no
    // deadline) never happens inside TLS: HTTP/1 gets the header timeout at once.
    let version = if alpn.as_deref() == Some(b"h2") {
        Version::Two
    } else {
        Version::One
    };
    serve_io(stream, client, app, version, limits, metrics, stop).await;
}

/// Which HTTP versions a connection may speak.
#[derive(Clone, Copy)]
enum Version {
    /// Told apart by hyper (the prelude already read enough to tell, within the timeout).
    Either,
    One,
    Two,
}

/// Serves HTTP on an admitted connection (plain, or inside TLS) until it ends or `stop`.
async fn serve_io<I>(
    io: I,
    client: SocketAddr,
    app: axum::Router,
    version: Version,
    limits: &Limits,
    metrics: &Metrics,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(client));
        tower::ServiceExt::oneshot(app.clone(), req)
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let builder = match version {
        Version::Either => builder,
        Version::One => builder.http1_only(),
        Version::Two => builder.http2_only(),
    };
    let serve = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(serve);
    let res = tokio::select! {
        r = serve.as_mut() => r,
        _ = stopped(&mut stop) => {
            serve.as_mut().graceful_shutdown();
            serve.await
        }
    };
    if let Err(e) = res {
        let timed_out = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out {
            metrics.connection_refused(limits.listener, ConnRefusal::HeaderTimeout);
        }
        tracing::debug!(%client, error = %e, "connection ended");
    }
}

/// The admin API's connections over TCP, admitted under `limits` as [`serve_http`] admits
/// its own, for tonic's `serve_with_incoming`. Ends when `stop` turns true.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let slots = Slots::default();
        let limits = Arc::new(limits);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) if connection_error(&e) => continue,
                    Err(e) => {
                        tracing::warn!(listener = ?limits.listener, error = %e, "accept failed; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            let (tx, limits, slots, metrics) =
                (tx.clone(), limits.clone(), slots.clone(), metrics.clone());
            tokio::spawn(async move {
                if let Some(conn) = admit(tcp, peer, &limits, &slots, &metrics).await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// HTTP/2 keep-alive for tonic servers on these connections (see [`H2_PING_EVERY`]).
pub fn h2_keepalive() -> (Duration, Duration) {
    (H2_PING_EVERY, H2_PING_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(address_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_ne!(address_key(v4), address_key("10.1.2.4".parse().unwrap()));
    }

    #[test]
    fn slots_bound_each_address_and_come_back() {
        let slots = Slots::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let held: Vec<Slot> = (0..3).filter_map(|_| slots.take(a, 3)).collect();
        assert_eq!(held.len(), 3);
        assert!(slots.take(a, 3).is_none(), "a fourth from the same address");
        let other = slots.take(b, 3);
        assert!(other.is_some(), "another address is not affected");
        drop(held);
        assert_eq!(slots.open(a), 0);
        assert!(slots.take(a, 3).is_some());
        // 0: no limit.
        let many: Vec<Slot> = (0..1000).filter_map(|_| slots.take(b, 0)).collect();
        assert_eq!(many.len(), 1000);
    }

    #[test]
    fn proxy_v1_headers() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 8080\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse_proxy(h).unwrap(),
            Proxy::Header {
                client: Some("192.0.2.7:51234".parse().unwrap()),
                len: 42
            }
        );
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 443 8080\r\n";
        assert!(matches!(
            parse_proxy(h6).unwrap(),
            Proxy::Header { client: Some(a), .. } if a == "[2001:db8::7]:443".parse().unwrap()
        ));
        assert_eq!(
            parse_proxy(b"PROXY UNKNOWN\r\n").unwrap(),
            Proxy::Header {
                client: None,
                len: 15
            }
        );
        assert_eq!(parse_proxy(b"PRO").unwrap(), Proxy::More);
        assert_eq!(parse_proxy(b"PROXY TCP4 1.2.3.4").unwrap(), Proxy::More);
        assert_eq!(parse_proxy(b"GET / HTTP/1.1\r\n").unwrap(), Proxy::Absent);
        assert!(parse_proxy(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n").is_err());
        assert!(parse_proxy(&[b"PROXY ".as_slice(), &[b'x'; 200]].concat()).is_err());
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = PROXY_V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn proxy_v2_headers() {
        let mut body = vec![192, 0, 2, 9, 10, 0, 0, 1];
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&8080u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0, 1, 0]); // a TLV, skipped
        let h = v2(1, 0x11, &body);
        let mut with_request = h.clone();
        with_request.extend_from_slice(b"GET /");
        assert_eq!(
            parse_proxy(&with_request).unwrap(),
            Proxy::Header {
                client: Some("192.0.2.9:40000".parse().unwrap()),
                len: h.len()
            }
        );
        assert_eq!(parse_proxy(&h[..10]).unwrap(), Proxy::More);
        assert_eq!(parse_proxy(&h[..20]).unwrap(), Proxy::More);
        // LOCAL (health checks): the proxy's own connection.
        assert_eq!(
            parse_proxy(&v2(0, 0, &[])).unwrap(),
            Proxy::Header {
                client: None,
                len: 16
            }
        );
        let mut b6 = vec![0x20, 0x01, 0x0d, 0xb8];
        b6.extend_from_slice(&[0; 11]);
        b6.push(7);
        b6.extend_from_slice(&[0; 16]);
        b6.extend_from_slice(&443u16.to_be_bytes());
        b6.extend_from_slice(&8080u16.to_be_bytes());
        assert!(matches!(
            parse_proxy(&v2(1, 0x21, &b6)).unwrap(),
            Proxy::Header { client: Some(a), .. } if a == "[2001:db8::7]:443".parse().unwrap()
        ));
        // Too short for its family, or an unknown command: refused.
        assert!(parse_proxy(&v2(1, 0x11, &[1, 2, 3])).is_err());
        assert!(parse_proxy(&v2(5, 0x11, &body)).is_err());
        let mut huge = PROXY_V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(parse_proxy(&huge).is_err());
    }

    #[test]
    fn the_refusal_is_a_whole_http_response() {
        let text = std::str::from_utf8(REFUSED_HTTP).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 429 "));
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
    }

    #[test]
    fn the_version_is_known_from_the_first_differing_byte() {
        assert!(!version_known(b""));
        assert!(version_known(b"G"));
        assert!(version_known(b"POST /ts2021"));
        assert!(!version_known(b"PRI * HTTP/2"));
        assert!(version_known(H2_PREFACE));
    }
}
