//! Minimal DERP client over plain TCP + HTTP/1.1 upgrade: the handshake
//! with a node key (and optional mesh key), sending frames and receiving
//! them. Mesh links use it to reach peer relays; tests use it as a client.
//!
//! It can be split into a reader and a cloneable writer so one task can
//! receive while others send.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::timeout;

use super::frame::{read_typed, Frame, Key, MAX_FRAME_SIZE};
use super::server::{open, public_key_of, seal};
use super::DerpError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE_HEADER: u64 = 16 << 10;

pub(crate) type Reader = BufReader<ReadHalf<TcpStream>>;
pub(crate) type Writer = WriteHalf<TcpStream>;

/// Receiving half of a DERP client.
pub struct DerpReader {
    rd: Reader,
}

/// Sending half of a DERP client; clones share the connection.
#[derive(Clone)]
pub struct DerpWriter {
    wr: Arc<Mutex<Writer>>,
}

/// A connected, handshaken DERP client.
pub struct DerpClient {
    reader: DerpReader,
    writer: DerpWriter,
    public_key: Key,
    server_key: Key,
}

/// Accepts `host:port`, `http://host:port` or `http://host:port/derp`.
pub(crate) fn host_port(addr: &str) -> &str {
    let a = addr.strip_prefix("http://").unwrap_or(addr);
    a.split('/').next().unwrap_or(a)
}

/// Dials `addr` and performs the HTTP upgrade, returning the raw stream
/// halves positioned at the first DERP frame.
pub(crate) async fn dial_upgraded(addr: &str) -> Result<(Reader, Writer), DerpError> {
    let hp = host_port(addr);
    let stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(hp))
        .await
        .map_err(|_| DerpError::Timeout)??;
    // DERP frames are small and latency-sensitive.
    stream.set_nodelay(true)?;
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let req = format!(
        "GET /derp HTTP/1.1\r\nHost: {hp}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
         User-Agent: hydrascale-derp\r\n\r\n"
    );
    wr.write_all(req.as_bytes()).await?;
    wr.flush().await?;
    timeout(CONNECT_TIMEOUT, read_101(&mut rd))
        .await
        .map_err(|_| DerpError::Timeout)??;
    Ok((rd, wr))
}

async fn read_101(rd: &mut Reader) -> Result<(), DerpError> {
    // The header block is read through the same BufReader that later reads
    // frames, so bytes the server sent right after the 101 are not lost.
    let mut lim = (&mut *rd).take(MAX_RESPONSE_HEADER);
    let mut line = Vec::new();
    lim.read_until(b'\n', &mut line).await?;
    let status = String::from_utf8_lossy(&line);
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with("HTTP/1.") || code != "101" {
        return Err(DerpError::Http(format!(
            "expected 101, got {:?}",
            status.trim_end()
        )));
    }
    loop {
        line.clear();
        if lim.read_until(b'\n', &mut line).await? == 0 {
            return Err(DerpError::Http("response headers truncated".into()));
        }
        if line == b"\r\n" || line == b"\n" {
            return Ok(());
        }
    }
}

impl DerpClient {
    /// Connects to the relay at `addr` (`host:port` or `http://host:port[/derp]`)
    /// as the node whose private key is `private_key`.
    pub async fn connect(
        addr: &str,
        private_key: [u8; 32],
        mesh_key: Option<[u8; 32]>,
    ) -> Result<Self, DerpError> {
        let (mut rd, mut wr) = dial_upgraded(addr).await?;
        let public_key = public_key_of(&private_key);
        let server_key = timeout(
            CONNECT_TIMEOUT,
            client_handshake(&mut rd, &mut wr, &private_key, mesh_key),
        )
        .await
        .map_err(|_| DerpError::Timeout)??;
        Ok(Self {
            reader: DerpReader { rd },
            writer: DerpWriter {
                wr: Arc::new(Mutex::new(wr)),
            },
            public_key,
            server_key,
        })
    }

    pub fn public_key(&self) -> Key {
        self.public_key
    }

    pub fn server_public_key(&self) -> Key {
        self.server_key
    }

    pub fn split(self) -> (DerpReader, DerpWriter) {
        (self.reader, self.writer)
    }

    pub fn writer(&self) -> DerpWriter {
        self.writer.clone()
    }

    pub async fn recv(&mut self) -> Result<Frame, DerpError> {
        self.reader.recv().await
    }

    pub async fn send(&self, frame: &Frame) -> Result<(), DerpError> {
        self.writer.send(frame).await
    }

    pub async fn send_packet(&self, dst: Key, packet: &[u8]) -> Result<(), DerpError> {
        self.writer.send_packet(dst, packet).await
    }
}

async fn client_handshake(
    rd: &mut Reader,
    wr: &mut Writer,
    private_key: &[u8; 32],
    mesh_key: Option<[u8; 32]>,
) -> Result<Key, DerpError> {
    let server_key = match read_typed(rd, MAX_FRAME_SIZE).await? {
        Frame::ServerKey { key } => key,
        f => return Err(DerpError::UnexpectedFrame(f.frame_type())),
    };
    let mut info = serde_json::json!({ "version": 2, "CanAckPings": false });
    if let Some(mk) = mesh_key {
        info["meshKey"] = serde_json::Value::String(hex::encode(mk));
    }
    let sealed = seal(private_key, &server_key, info.to_string().as_bytes());
    let hello = Frame::ClientInfo {
        key: public_key_of(private_key),
        sealed,
    };
    wr.write_all(&hello.encode()).await?;
    wr.flush().await?;
    match read_typed(rd, MAX_FRAME_SIZE).await? {
        Frame::ServerInfo { sealed } => {
            // Proves the server holds the key it advertised.
            open(private_key, &server_key, &sealed)?;
        }
        f => return Err(DerpError::UnexpectedFrame(f.frame_type())),
    }
    Ok(server_key)
}

impl DerpReader {
    /// Next frame of any type, KeepAlives included.
    pub async fn recv(&mut self) -> Result<Frame, DerpError> {
        read_typed(&mut self.rd, MAX_FRAME_SIZE).await
    }
}

impl DerpWriter {
    pub async fn send(&self, frame: &Frame) -> Result<(), DerpError> {
        self.send_encoded(&frame.encode()).await
    }

    pub async fn send_packet(&self, dst: Key, packet: &[u8]) -> Result<(), DerpError> {
        self.send(&Frame::SendPacket {
            dst,
            packet: bytes::Bytes::copy_from_slice(packet),
        })
        .await
    }

    /// Writes bytes that are already one or more encoded frames.
    pub async fn send_encoded(&self, frames: &[u8]) -> Result<(), DerpError> {
        let mut wr = self.wr.lock().await;
        wr.write_all(frames).await?;
        wr.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(host_port("127.0.0.1:3340"), "127.0.0.1:3340");
        assert_eq!(host_port("http://h:80"), "h:80");
        assert_eq!(host_port("http://h:80/derp"), "h:80");
    }
}
