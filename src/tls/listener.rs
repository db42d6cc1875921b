//! The control listener with TLS on: one TCP port, two kinds of connection.
//!
//! A connection whose first byte is a TLS handshake record (0x16) is TLS: the handshake
//! runs here (with its own timeout, so a slow or silent client holds only its own task)
//! and the connection is handed to the full control router. Anything else is plain HTTP
//! (no HTTP method starts with 0x16) and goes to the plain router, which serves only what
//! is safe without TLS (see `control::plain_router`) and redirects the rest to https.
//! A TLS-ALPN-01 validation is answered by the handshake itself and then closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::ACME_TLS_ALPN;

/// How long a new connection may take to send its first byte and finish a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections classified but not yet taken by their router.
const QUEUE: usize = 256;

/// One kind of connection of the control listener, as `axum::serve` takes a listener.
pub struct Conns<S> {
    rx: mpsc::Receiver<(S, SocketAddr)>,
    local: SocketAddr,
}

impl<S> axum::serve::Listener for Conns<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Io = S;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (S, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended (shutdown): the server's graceful shutdown ends it.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Splits `listener` into its plain-HTTP and its TLS connections; runs until `stop`.
pub fn split(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<(Conns<TcpStream>, Conns<TlsStream<TcpStream>>)> {
    let local = listener.local_addr()?;
    let (plain_tx, plain_rx) = mpsc::channel(QUEUE);
    let (tls_tx, tls_rx) = mpsc::channel(QUEUE);
    tokio::spawn(accept_loop(
        listener,
        TlsAcceptor::from(tls),
        plain_tx,
        tls_tx,
        stop,
    ));
    Ok((
        Conns {
            rx: plain_rx,
            local,
        },
        Conns { rx: tls_rx, local },
    ))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    plain: mpsc::Sender<(TcpStream, SocketAddr)>,
    tls: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((tcp, addr)) => {
                tokio::spawn(classify(
                    tcp,
                    addr,
                    acceptor.clone(),
                    plain.clone(),
                    tls.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "accepting on the control listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn classify(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    plain: mpsc::Sender<(TcpStream, SocketAddr)>,
    tls: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    // Nagle plus the client's delayed ACKs would hold small DERP frames and map deltas
    // back by up to 40 ms; Go (the official client and derper) disables it too.
    let _ = tcp.set_nodelay(true);
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    if first[0] != 0x16 {
        let _ = plain.send((tcp, addr)).await;
        return;
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(mut stream)) => {
            if stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                // A TLS-ALPN-01 validation: the certificate was the answer.
                let _ = stream.shutdown().await;
                return;
            }
            let _ = tls.send((stream, addr)).await;
        }
        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
    }
}
