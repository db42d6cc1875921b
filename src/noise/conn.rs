//! controlbase transport records over an established handshake.
//!
//! Two pump tasks translate between the encrypted stream and an in-memory duplex pipe
//! whose other end carries plaintext for HTTP/2. Keeping the crypto in straight-line
//! tasks avoids hand-written `poll_*` state machines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[cfg(test)]
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use super::NoiseError;

const MSG_TYPE_RECORD: u8 = 4;
const HEADER_LEN: usize = 3;
/// controlbase `maxMessageSize`: header included.
const MAX_MESSAGE_SIZE: usize = 4096;
const TAG_LEN: usize = 16;
const MAX_PLAINTEXT: usize = MAX_MESSAGE_SIZE - HEADER_LEN - TAG_LEN;

/// One direction of the transport: a key and its counter.
struct CipherState {
    aead: ChaCha20Poly1305,
    counter: u64,
}

impl CipherState {
    fn new(key: &[u8; 32]) -> Self {
        Self {
            aead: ChaCha20Poly1305::new(Key::from_slice(key)),
            counter: 0,
        }
    }

    /// Tailscale's nonce: 4 zero bytes, then the counter big-endian (Noise says little-endian).
    fn next_nonce(&mut self) -> Result<[u8; 12], NoiseError> {
        if self.counter == u64::MAX {
            return Err(NoiseError::NonceExhausted);
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Ok(n)
    }

    /// Appends `plaintext` to `wire` as one record: header, ciphertext, tag, encrypted in
    /// place (no buffer of its own per record).
    fn seal_record(&mut self, plaintext: &[u8], wire: &mut Vec<u8>) -> Result<(), NoiseError> {
        let nonce = self.next_nonce()?;
        // plaintext.len() <= MAX_PLAINTEXT, so the length fits in u16 by construction.
        let len = (plaintext.len() + TAG_LEN) as u16;
        wire.push(MSG_TYPE_RECORD);
        wire.extend_from_slice(&len.to_be_bytes());
        let start = wire.len();
        wire.extend_from_slice(plaintext);
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &[], &mut wire[start..])
            .map_err(|_| NoiseError::Decrypt)?;
        wire.extend_from_slice(&tag);
        Ok(())
    }

    /// Decrypts one record's ciphertext (tag last) in place; the plaintext is `record`
    /// without its last [`TAG_LEN`] bytes.
    fn open_in_place(&mut self, record: &mut [u8]) -> Result<(), NoiseError> {
        let nonce = self.next_nonce()?;
        let split = record
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(NoiseError::Decrypt)?;
        let (body, tag) = record.split_at_mut(split);
        self.aead
            .decrypt_in_place_detached(Nonce::from_slice(&nonce), &[], body, Tag::from_slice(tag))
            .map_err(|_| NoiseError::Decrypt)
    }

    #[cfg(test)]
    fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let nonce = self.next_nonce()?;
        self.aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &[],
                },
            )
            .map_err(|_| NoiseError::Decrypt)
    }

    #[cfg(test)]
    fn open(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let nonce = self.next_nonce()?;
        self.aead
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: ciphertext,
                    aad: &[],
                },
            )
            .map_err(|_| NoiseError::Decrypt)
    }
}

/// Plaintext bytes the pipe between HTTP/2 and the record pumps holds in each direction.
const PIPE_BUFFER: usize = 32 * 1024;

/// Records written to the socket in one write: what the pipe holds, encrypted. A map
/// message of 16 KiB is four records; each had been a write of its own (a syscall and, on
/// loopback, a segment through the receiver's stack), a quarter of a replica's CPU while
/// a policy change went out to 10,000 nodes.
const MAX_WRITE: usize = PIPE_BUFFER + PIPE_BUFFER / MAX_PLAINTEXT * (HEADER_LEN + TAG_LEN) + 64;

/// The length of the first record in `buf`, header included, if it is all there; an
/// error for a record that is not one.
fn complete_record(buf: &[u8]) -> Result<Option<usize>, NoiseError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[0] != MSG_TYPE_RECORD {
        return Err(NoiseError::MessageType(buf[0]));
    }
    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
    if len + HEADER_LEN > MAX_MESSAGE_SIZE {
        return Err(NoiseError::RecordTooLarge(len));
    }
    Ok((buf.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
}

/// When the peer was last heard from: the arrival of its last valid record, whatever it
/// carried (a request, a PING's answer, a WINDOW_UPDATE as it reads what it was sent).
///
/// A live peer that reads slowly still sends WINDOW_UPDATEs; a dead one sends nothing.
/// HTTP/2's own keep-alive cannot tell them apart: hyper stops reading while its PING
/// waits behind a full write buffer, and times the PING from when it was queued.
#[derive(Clone, Debug)]
pub struct Heard(Arc<HeardAt>);

#[derive(Debug)]
struct HeardAt {
    start: tokio::time::Instant,
    /// Milliseconds from `start` to the last record.
    last_ms: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Heard(Arc::new(HeardAt {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }))
    }

    fn mark(&self) {
        let ms = u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago the last record arrived (or the transport started).
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed));
        self.0.start.elapsed().saturating_sub(last)
    }
}

/// Drives `conn` (the session over a transport whose peer is `heard`) to its end, or until
/// the peer has sent nothing for `limit`: then `None`, and dropping `conn` closes the
/// session.
///
/// A peer cannot have been silent for `limit` before `limit` has passed since its last
/// record, so this sleeps until then and looks again. Every wake-up of this task also
/// polls the whole HTTP/2 connection; at rest, with thousands of sessions a replica, a
/// check at a fixed interval (it was every 15 s) woke each session several times for
/// every ping its client answered.
pub async fn until_silent<F: std::future::Future>(
    conn: F,
    heard: &Heard,
    limit: Duration,
) -> Option<F::Output> {
    use std::future::Future;
    use std::task::Poll;
    tokio::pin!(conn);
    let sleep = tokio::time::sleep(limit.saturating_sub(heard.silent_for()));
    tokio::pin!(sleep);
    // By hand rather than `select!` in a loop, which would poll `conn` once more each
    // time the sleep is set again.
    std::future::poll_fn(|cx| {
        // A session that ended tells how, however long its peer was quiet.
        if let Poll::Ready(out) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        while sleep.as_mut().poll(cx).is_ready() {
            let wait = limit.saturating_sub(heard.silent_for());
            if wait.is_zero() {
                return Poll::Ready(None);
            }
            sleep.as_mut().reset(tokio::time::Instant::now() + wait);
        }
        Poll::Pending
    })
    .await
}

/// Starts the record pumps over `stream` and returns the plaintext end.
///
/// The connection ends (both pumps stop) when either side closes or a record is invalid.
pub fn spawn_transport<S>(stream: S, rx_key: [u8; 32], tx_key: [u8; 32]) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    spawn_heard_transport(stream, rx_key, tx_key).0
}

/// [`spawn_transport`], also saying when the peer was last heard from.
pub fn spawn_heard_transport<S>(
    stream: S,
    rx_key: [u8; 32],
    tx_key: [u8; 32],
) -> (DuplexStream, Heard)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let heard = Heard::new();
    let heard_in = heard.clone();
    // The pipe's buffer keeps the largest size it ever grew to, for the whole session: at
    // 256 KiB, a full map of 10,000 peers left each of a replica's 3,333 sessions holding
    // about that much, most of its 1.2 GB. The TCP socket does the real buffering.
    let (app_end, pump_end) = tokio::io::duplex(PIPE_BUFFER);
    let (mut net_r, mut net_w) = tokio::io::split(stream);
    let (mut plain_r, mut plain_w) = tokio::io::split(pump_end);
    let inbound = async move {
        let mut rx = CipherState::new(&rx_key);
        let r: Result<(), NoiseError> = async {
            // Whatever the socket has is read at once, and every record complete in it
            // decrypted in place and handed on in one write, instead of two reads and two
            // buffers per record. The buffer is let go whenever it is drained, so an idle
            // session holds none; a read that fills it makes the next one larger.
            let mut buf = bytes::BytesMut::new();
            let mut want = MAX_MESSAGE_SIZE;
            loop {
                buf.reserve(want);
                let room = buf.capacity() - buf.len();
                let got = net_r.read_buf(&mut buf).await?;
                want = if got == room {
                    (want * 2).min(MAX_WRITE)
                } else {
                    MAX_MESSAGE_SIZE
                };
                if got == 0 {
                    return if buf.is_empty() {
                        Ok(())
                    } else {
                        Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
                    };
                }
                let mut plain = bytes::BytesMut::new();
                let mut opened = false;
                while let Some(n) = complete_record(&buf)? {
                    let mut record = buf.split_to(n);
                    rx.open_in_place(&mut record[HEADER_LEN..])?;
                    plain.extend_from_slice(&record[HEADER_LEN..n - TAG_LEN]);
                    opened = true;
                }
                if !opened {
                    continue;
                }
                heard_in.mark();
                plain_w.write_all(&plain).await?;
                if buf.is_empty() {
                    buf = bytes::BytesMut::new();
                }
            }
        }
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "noise inbound closed");
        }
        let _ = plain_w.shutdown().await;
    };
    let outbound = async move {
        let mut tx = CipherState::new(&tx_key);
        let mut plain = vec![0u8; MAX_PLAINTEXT];
        let r: Result<(), NoiseError> = async {
            loop {
                let n = plain_r.read(&mut plain).await?;
                if n == 0 {
                    return Ok(());
                }
                // Made for each write and dropped after it, so an idle session holds none.
                let mut wire = Vec::with_capacity(MAX_WRITE);
                tx.seal_record(&plain[..n], &mut wire)?;
                // What else is in the pipe already goes out in the same write; nothing
                // waits for more.
                let mut ended = false;
                while wire.len() + MAX_MESSAGE_SIZE <= MAX_WRITE {
                    match plain_r.read(&mut plain).now_or_never() {
                        Some(Ok(0)) => {
                            ended = true;
                            break;
                        }
                        Some(Ok(n)) => tx.seal_record(&plain[..n], &mut wire)?,
                        Some(Err(e)) => return Err(e.into()),
                        None => break,
                    }
                }
                net_w.write_all(&wire).await?;
                net_w.flush().await?;
                if ended {
                    return Ok(());
                }
            }
        }
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "noise outbound closed");
        }
        let _ = net_w.shutdown().await;
    };
    tokio::spawn(async move {
        // Whichever direction ends first tears the connection down.
        tokio::select! {
            _ = inbound => {}
            _ = outbound => {}
        }
    });
    (app_end, heard)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record from the peer, whatever it carries, counts as hearing from it; what we
    /// send does not.
    #[tokio::test(start_paused = true)]
    async fn the_peer_is_heard_from_by_its_records_alone() {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let (mut plain, heard) = spawn_heard_transport(ours, [1; 32], [2; 32]);
        tokio::time::sleep(Duration::from_secs(40)).await;
        plain.write_all(b"ping from us").await.expect("write");
        let mut rec = [0u8; 64];
        let _ = theirs.read(&mut rec).await.expect("our record");
        assert!(heard.silent_for() >= Duration::from_secs(40));
        let mut tx = CipherState::new(&[1; 32]);
        let ct = tx.seal(b"window update").expect("seal");
        let mut frame = vec![MSG_TYPE_RECORD];
        frame.extend_from_slice(&(ct.len() as u16).to_be_bytes());
        frame.extend_from_slice(&ct);
        theirs.write_all(&frame).await.expect("their record");
        let mut got = [0u8; 13];
        plain.read_exact(&mut got).await.expect("plaintext");
        assert_eq!(&got, b"window update");
        assert!(heard.silent_for() < Duration::from_secs(1));
    }

    /// A session ends once its peer is silent for the limit, and not while it keeps
    /// sending, however long the session lasts.
    #[tokio::test(start_paused = true)]
    async fn sessions_end_when_the_peer_falls_silent() {
        let heard = Heard::new();
        let limit = Duration::from_secs(90);
        let start = tokio::time::Instant::now();
        let chatty = heard.clone();
        let talk = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(60)).await;
                chatty.mark();
            }
        });
        let out = until_silent(std::future::pending::<()>(), &heard, limit).await;
        assert!(out.is_none());
        let lasted = start.elapsed();
        // Ten minutes of marks every minute, then silence for the limit.
        assert!(lasted >= Duration::from_secs(600) + limit, "{lasted:?}");
        assert!(
            lasted <= Duration::from_secs(600) + limit + Duration::from_secs(1),
            "{lasted:?}"
        );
        talk.await.expect("talker");
        let done = until_silent(async { 7 }, &heard, limit).await;
        assert_eq!(done, Some(7));
    }

    /// Polls of the session it drives: each is a wake-up of the task.
    struct Polls(Arc<AtomicU64>);

    impl std::future::Future for Polls {
        type Output = ();
        fn poll(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            std::task::Poll::Pending
        }
    }

    /// A client answering a ping every 30 s wakes its session about once per answer
    /// window, not at a fixed rate: 10 minutes of it, then silence, cost a dozen polls
    /// at most (the fixed 15 s check cost 93).
    #[tokio::test(start_paused = true)]
    async fn a_live_session_is_not_woken_between_answers() {
        let heard = Heard::new();
        let chatty = heard.clone();
        let talk = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_secs(30)).await;
                chatty.mark();
            }
        });
        let polls = Arc::new(AtomicU64::new(0));
        let out = until_silent(Polls(polls.clone()), &heard, Duration::from_secs(90)).await;
        assert!(out.is_none());
        let polls = polls.load(Ordering::Relaxed);
        assert!(polls <= 12, "{polls} polls");
        talk.await.expect("talker");
    }

    #[test]
    fn nonce_is_big_endian() {
        let mut c = CipherState::new(&[7u8; 32]);
        c.counter = 1;
        let n = c.next_nonce().expect("nonce");
        assert_eq!(n, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    }

    #[tokio::test]
    async fn records_roundtrip_across_many_messages() {
        let (server_side, mut client_side) = tokio::io::duplex(1 << 20);
        let k_c2s = [1u8; 32];
        let k_s2c = [2u8; 32];
        let mut app = spawn_transport(server_side, k_c2s, k_s2c);
        let mut c_tx = CipherState::new(&k_c2s);
        let mut c_rx = CipherState::new(&k_s2c);
        for i in 0..5u8 {
            let ct = c_tx.seal(&[i; 10]).expect("seal");
            let mut f = vec![MSG_TYPE_RECORD];
            f.extend_from_slice(&(ct.len() as u16).to_be_bytes());
            f.extend_from_slice(&ct);
            client_side.write_all(&f).await.expect("write");
        }
        let mut got = vec![0u8; 50];
        app.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[40..], &[4u8; 10]);
        // A large write is split into records no bigger than 4096 bytes.
        app.write_all(&vec![9u8; 10_000]).await.expect("write");
        let mut total = Vec::new();
        while total.len() < 10_000 {
            let mut hdr = [0u8; 3];
            client_side.read_exact(&mut hdr).await.expect("hdr");
            let len = u16::from_be_bytes([hdr[1], hdr[2]]) as usize;
            assert!(len + 3 <= MAX_MESSAGE_SIZE);
            let mut ct = vec![0u8; len];
            client_side.read_exact(&mut ct).await.expect("ct");
            total.extend(c_rx.open(&ct).expect("open"));
        }
        assert_eq!(total, vec![9u8; 10_000]);
    }

    /// A socket that counts the writes made to it.
    struct Counted(DuplexStream, Arc<AtomicU64>);

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.1.fetch_add(1, Ordering::Relaxed);
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A message of several records, all in the pipe, goes to the socket in one write;
    /// records still no bigger than the protocol allows, and in order.
    #[tokio::test]
    async fn a_message_of_several_records_is_one_write() {
        let (server_side, mut client_side) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicU64::new(0));
        let mut app = spawn_transport(Counted(server_side, writes.clone()), [1; 32], [2; 32]);
        let msg: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        app.write_all(&msg).await.expect("write");
        let mut c_rx = CipherState::new(&[2; 32]);
        let mut total = Vec::new();
        let mut records = 0;
        while total.len() < msg.len() {
            let mut hdr = [0u8; 3];
            client_side.read_exact(&mut hdr).await.expect("hdr");
            let len = u16::from_be_bytes([hdr[1], hdr[2]]) as usize;
            assert!(len + 3 <= MAX_MESSAGE_SIZE);
            let mut ct = vec![0u8; len];
            client_side.read_exact(&mut ct).await.expect("ct");
            total.extend(c_rx.open(&ct).expect("open"));
            records += 1;
        }
        assert_eq!(total, msg);
        assert!(records >= 5, "{records} records");
        assert_eq!(
            writes.load(Ordering::Relaxed),
            1,
            "records written one by one"
        );
    }

    /// Records arriving in pieces of any size, several in one read or one across many,
    /// come out as the plaintext, whole and in order.
    #[tokio::test]
    async fn records_cut_anywhere_by_the_socket_come_out_whole() {
        let (server_side, mut client_side) = tokio::io::duplex(1 << 20);
        let mut app = spawn_transport(server_side, [1; 32], [2; 32]);
        let mut c_tx = CipherState::new(&[1; 32]);
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for i in 0..40u32 {
            // Empty records too, and full ones.
            let len = [0, 1, 17, MAX_PLAINTEXT][i as usize % 4];
            let pt: Vec<u8> = (0..len).map(|j| (i as usize * 7 + j) as u8).collect();
            c_tx.seal_record(&pt, &mut wire).expect("seal");
            want.extend(pt);
        }
        let writer = tokio::spawn(async move {
            for (i, piece) in wire.chunks(10).enumerate() {
                client_side.write_all(piece).await.expect("piece");
                if i % 3 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            client_side
        });
        let mut got = vec![0u8; want.len()];
        app.read_exact(&mut got).await.expect("plaintext");
        assert_eq!(got, want);
        drop(writer.await.expect("writer"));
        let mut rest = [0u8; 1];
        assert_eq!(app.read(&mut rest).await.expect("end"), 0);
    }

    #[tokio::test]
    async fn tampered_record_closes_connection() {
        let (server_side, mut client_side) = tokio::io::duplex(1 << 16);
        let mut app = spawn_transport(server_side, [1u8; 32], [2u8; 32]);
        let mut c_tx = CipherState::new(&[1u8; 32]);
        let mut ct = c_tx.seal(b"hello").expect("seal");
        ct[0] ^= 0xff;
        let mut f = vec![MSG_TYPE_RECORD];
        f.extend_from_slice(&(ct.len() as u16).to_be_bytes());
        f.extend_from_slice(&ct);
        client_side.write_all(&f).await.expect("write");
        let mut buf = [0u8; 8];
        let n = app.read(&mut buf).await.expect("read");
        assert_eq!(n, 0, "plaintext side sees EOF");
    }
}
