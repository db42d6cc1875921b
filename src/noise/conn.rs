//! controlbase transport records over an established handshake.
//!
//! [`NoiseStream`] is the plaintext byte stream HTTP/2 runs on: what is written to it is
//! sealed into records and sent, what arrives is opened and read. It does the work inside
//! the caller's own polls (hyper's connection task), with no task or pipe of its own, so
//! a message costs one task's wake-up and one socket write, and an idle session holds no
//! buffers.

use std::cell::RefCell;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

#[cfg(test)]
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    #[cfg(test)]
    fn seal_record(&mut self, plaintext: &[u8], wire: &mut Vec<u8>) -> Result<(), NoiseError> {
        let start = record_header(wire, plaintext.len());
        wire.extend_from_slice(plaintext);
        self.seal_in_place(wire, start)
    }

    /// Encrypts `wire[start..]`, a record's plaintext after its header, in place and
    /// appends the tag.
    fn seal_in_place(&mut self, wire: &mut Vec<u8>, start: usize) -> Result<(), NoiseError> {
        let nonce = self.next_nonce()?;
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

/// Appends the header of a record carrying `len` bytes of plaintext (at most
/// [`MAX_PLAINTEXT`], so its length fits in u16); returns where the plaintext goes.
fn record_header(wire: &mut Vec<u8>, len: usize) -> usize {
    let len = (len + TAG_LEN) as u16;
    wire.push(MSG_TYPE_RECORD);
    wire.extend_from_slice(&len.to_be_bytes());
    wire.len()
}

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

/// Bytes one socket read may bring in (after room for a record begun by the read before):
/// a whole batch of records from a peer that writes them together.
const READ_CHUNK: usize = 64 * 1024;

/// Sealed bytes held for the socket before a writer is made to wait: what HTTP/2 writes
/// between two flushes goes out in one socket write, up to this much.
const OUT_LIMIT: usize = 64 * 1024;

/// Capacity of the outgoing buffer kept once it is drained: enough for the keep-alives and
/// PINGs of a session at rest, so they need no allocation; larger buffers are let go.
const OUT_KEPT: usize = 1024;

thread_local! {
    /// Where socket reads land and records are opened, one per thread: only a record the
    /// read cut off, or plaintext the reader had no room for, stays with the session.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn invalid(e: NoiseError) -> std::io::Error {
    match e {
        NoiseError::Io(e) => e,
        e => std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    }
}

/// The plaintext end of a TS2021 session over `S` (the upgraded TCP connection).
///
/// Reading opens the records that arrived; writing seals records, which go to the socket
/// at the next flush (or once [`OUT_LIMIT`] is reached), so the frames HTTP/2 writes
/// between two flushes are one socket write. A record that fails to open, or one that is
/// not a record, makes this and every later read fail: the session is over.
pub struct NoiseStream<S> {
    io: S,
    rx: CipherState,
    tx: CipherState,
    heard: Heard,
    /// The start of a record that the last read did not bring whole.
    partial: Vec<u8>,
    /// Plaintext opened but not yet read, from `plain_at` on: the reader had no room.
    plain: Vec<u8>,
    plain_at: usize,
    /// Sealed records not yet written, from `out_at` on.
    out: Vec<u8>,
    out_at: usize,
    /// The socket reached its end.
    eof: bool,
    /// Why reading failed, once it has: the receive counter is out of step from then on.
    broken: Option<std::io::ErrorKind>,
}

impl<S> NoiseStream<S> {
    /// A session over `io` after the handshake: `rx_key` opens what the peer sends,
    /// `tx_key` seals what is written here.
    pub fn new(io: S, rx_key: [u8; 32], tx_key: [u8; 32]) -> Self {
        Self {
            io,
            rx: CipherState::new(&rx_key),
            tx: CipherState::new(&tx_key),
            heard: Heard::new(),
            partial: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            out: Vec::new(),
            out_at: 0,
            eof: false,
            broken: None,
        }
    }

    /// When the peer was last heard from.
    pub fn heard(&self) -> Heard {
        self.heard.clone()
    }

    fn unsent(&self) -> usize {
        self.out.len() - self.out_at
    }

    /// Seals `len` bytes of `bufs` as records of at most [`MAX_PLAINTEXT`] each, filled
    /// across the slices (HTTP/2 hands a frame's head and its payload as two), onto `out`.
    fn seal(&mut self, bufs: &[IoSlice<'_>], len: usize) -> Result<(), NoiseError> {
        if self.out_at > 0 {
            // Written already (the socket took part of a batch): only under backpressure.
            self.out.drain(..self.out_at);
            self.out_at = 0;
        }
        let records = len.div_ceil(MAX_PLAINTEXT);
        self.out.reserve(len + records * (HEADER_LEN + TAG_LEN));
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = &[];
        let mut left = len;
        while left > 0 {
            let n = left.min(MAX_PLAINTEXT);
            let start = record_header(&mut self.out, n);
            let mut need = n;
            while need > 0 {
                if cur.is_empty() {
                    cur = slices.next().unwrap_or_default();
                    if cur.is_empty() {
                        break;
                    }
                }
                let take = need.min(cur.len());
                self.out.extend_from_slice(&cur[..take]);
                cur = &cur[take..];
                need -= take;
            }
            // `len` never exceeds what the slices hold; were it to, the header would still
            // say what the record carries.
            let carried = ((self.out.len() - start + TAG_LEN) as u16).to_be_bytes();
            self.out[start - 2..start].copy_from_slice(&carried);
            self.tx.seal_in_place(&mut self.out, start)?;
            left -= n;
        }
        Ok(())
    }
}

impl<S: AsyncWrite + Unpin> NoiseStream<S> {
    /// Writes what is sealed to the socket; ready once all of it is written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.out_at = 0;
        if self.out.capacity() > OUT_KEPT {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> NoiseStream<S> {
    /// One socket read: opens every whole record it completes, plaintext into `buf` as
    /// far as it has room and into `plain` beyond. Ready(true) when any plaintext came.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<bool>> {
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            if scratch.len() < MAX_MESSAGE_SIZE + READ_CHUNK {
                scratch.resize(MAX_MESSAGE_SIZE + READ_CHUNK, 0);
            }
            // Read no more than the reader can take (so its plaintext seldom has to wait in
            // `plain`), but at least a whole record.
            let want = buf.remaining().clamp(MAX_MESSAGE_SIZE, READ_CHUNK);
            let got = {
                let mut rb = ReadBuf::new(&mut scratch[MAX_MESSAGE_SIZE..MAX_MESSAGE_SIZE + want]);
                ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
                rb.filled().len()
            };
            if got == 0 {
                self.eof = true;
                return Poll::Ready(Ok(false));
            }
            // A record begun by the last read goes just before what this one brought.
            let start = MAX_MESSAGE_SIZE - self.partial.len();
            scratch[start..MAX_MESSAGE_SIZE].copy_from_slice(&self.partial);
            let end = MAX_MESSAGE_SIZE + got;
            let mut at = start;
            let mut any = false;
            let mut opened = false;
            while let Some(n) = complete_record(&scratch[at..end]).map_err(invalid)? {
                let record = &mut scratch[at + HEADER_LEN..at + n];
                self.rx.open_in_place(record).map_err(invalid)?;
                let text = &record[..n - HEADER_LEN - TAG_LEN];
                let fits = text.len().min(buf.remaining());
                buf.put_slice(&text[..fits]);
                self.plain.extend_from_slice(&text[fits..]);
                any |= !text.is_empty();
                opened = true;
                at += n;
            }
            self.partial.clear();
            self.partial.extend_from_slice(&scratch[at..end]);
            if self.partial.is_empty() && self.partial.capacity() > 0 {
                self.partial = Vec::new();
            }
            if opened {
                self.heard.mark();
            }
            Poll::Ready(Ok(any))
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NoiseStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(kind) = this.broken {
                return Poll::Ready(Err(kind.into()));
            }
            if this.plain_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_at);
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(if this.partial.is_empty() {
                    Ok(())
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                });
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.poll_fill(cx, buf)) {
                // Plaintext came: into `buf`, which had room for some of it at least (the
                // rest waits in `plain`).
                Ok(true) => return Poll::Ready(Ok(())),
                // Only empty records, or a record still incomplete: read on. At the end
                // of the stream, the next turn says so.
                Ok(false) => {}
                Err(e) => {
                    this.broken = Some(e.kind());
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NoiseStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.unsent() >= OUT_LIMIT {
            // A full batch waits for the socket; nothing more is taken until it is out.
            ready!(this.poll_drain(cx))?;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let take = total.min(OUT_LIMIT - this.unsent());
        if take == 0 {
            return Poll::Ready(Ok(0));
        }
        this.seal(bufs, take).map_err(invalid)?;
        Poll::Ready(Ok(take))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A record from the peer, whatever it carries, counts as hearing from it; what we
    /// send does not.
    #[tokio::test(start_paused = true)]
    async fn the_peer_is_heard_from_by_its_records_alone() {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let mut plain = NoiseStream::new(ours, [1; 32], [2; 32]);
        let heard = plain.heard();
        tokio::time::sleep(Duration::from_secs(40)).await;
        plain.write_all(b"ping from us").await.expect("write");
        plain.flush().await.expect("flush");
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
        let mut app = NoiseStream::new(server_side, k_c2s, k_s2c);
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
        app.flush().await.expect("flush");
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

    /// What is written between two flushes, a message of several records in several
    /// writes (a frame's head and its payload, as HTTP/2 writes them), goes to the socket
    /// in one write; records still no bigger than the protocol allows, and in order.
    #[tokio::test]
    async fn a_message_of_several_records_is_one_write() {
        let (server_side, mut client_side) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicU64::new(0));
        let mut app = NoiseStream::new(Counted(server_side, writes.clone()), [1; 32], [2; 32]);
        let msg: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let (head, rest) = msg.split_at(9);
        let (a, b) = rest.split_at(7_000);
        let n = app
            .write_vectored(&[IoSlice::new(head), IoSlice::new(a)])
            .await
            .expect("write");
        assert_eq!(n, 9 + 7_000);
        app.write_all(b).await.expect("write");
        assert_eq!(
            writes.load(Ordering::Relaxed),
            0,
            "nothing sent before the flush"
        );
        app.flush().await.expect("flush");
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
        let mut app = NoiseStream::new(server_side, [1; 32], [2; 32]);
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
        let mut app = NoiseStream::new(server_side, [1u8; 32], [2u8; 32]);
        let mut c_tx = CipherState::new(&[1u8; 32]);
        let mut ct = c_tx.seal(b"hello").expect("seal");
        ct[0] ^= 0xff;
        let mut f = vec![MSG_TYPE_RECORD];
        f.extend_from_slice(&(ct.len() as u16).to_be_bytes());
        f.extend_from_slice(&ct);
        client_side.write_all(&f).await.expect("write");
        let mut buf = [0u8; 8];
        let e = app.read(&mut buf).await.expect_err("a tampered record");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        // And so is everything after it: the receive counter is out of step.
        let e = app
            .read(&mut buf)
            .await
            .expect_err("after a tampered record");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    /// A stream that ends inside a record is an error, not a clean end.
    #[tokio::test]
    async fn an_end_inside_a_record_is_an_error() {
        let (server_side, mut client_side) = tokio::io::duplex(1 << 16);
        let mut app = NoiseStream::new(server_side, [1; 32], [2; 32]);
        let mut wire = Vec::new();
        CipherState::new(&[1; 32])
            .seal_record(b"cut short", &mut wire)
            .expect("seal");
        client_side
            .write_all(&wire[..wire.len() - 3])
            .await
            .expect("write");
        drop(client_side);
        let mut buf = [0u8; 32];
        let e = app.read(&mut buf).await.expect_err("cut record");
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    /// Two ends over a socket that takes 997 bytes at a time, writing in pieces of every
    /// size and reading into small buffers, both ways at once: every byte arrives, in
    /// order, the writer waits for the socket instead of buffering without bound, and
    /// plaintext the reader had no room for waits for it. Afterwards neither end holds a
    /// buffer beyond the small one kept for keep-alives.
    #[tokio::test]
    async fn both_ways_at_once_through_a_narrow_socket() {
        let (a, b) = tokio::io::duplex(997);
        let a = NoiseStream::new(a, [1; 32], [2; 32]);
        let b = NoiseStream::new(b, [2; 32], [1; 32]);
        let data = |seed: u32| -> Vec<u8> {
            (0..300_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
                .collect()
        };
        async fn talk(
            mut me: NoiseStream<DuplexStream>,
            send: Vec<u8>,
            expect: Vec<u8>,
        ) -> NoiseStream<DuplexStream> {
            let (mut r, mut w) = tokio::io::split(&mut me);
            let write = async {
                let sizes = [1usize, 9, 4_077, 4_078, 17, 70_000, 3];
                let (mut at, mut i) = (0, 0);
                while at < send.len() {
                    let n = sizes[i % sizes.len()].min(send.len() - at);
                    w.write_all(&send[at..at + n]).await.expect("write");
                    if i % 3 == 0 {
                        w.flush().await.expect("flush");
                    }
                    at += n;
                    i += 1;
                }
                w.flush().await.expect("flush");
            };
            let read = async {
                let mut got = Vec::with_capacity(expect.len());
                let mut buf = [0u8; 333];
                while got.len() < expect.len() {
                    let n = r.read(&mut buf).await.expect("read");
                    assert!(n > 0, "ended early at {}", got.len());
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got == expect, "bytes differ");
            };
            tokio::join!(write, read);
            me
        }
        let (da, db) = (data(1), data(2));
        let (a, b) = tokio::join!(talk(a, da.clone(), db.clone()), talk(b, db, da));
        for end in [&a, &b] {
            assert_eq!(end.unsent(), 0);
            assert!(end.out.capacity() <= OUT_KEPT, "{}", end.out.capacity());
            assert_eq!((end.plain.capacity(), end.partial.capacity()), (0, 0));
        }
    }

    /// A writer that outpaces the socket is held back once [`OUT_LIMIT`] is sealed and
    /// unsent, not buffered without bound.
    #[tokio::test]
    async fn a_writer_waits_for_the_socket() {
        let (a, _b) = tokio::io::duplex(4096);
        let mut a = NoiseStream::new(a, [1; 32], [2; 32]);
        let big = vec![7u8; 1 << 20];
        let wrote = tokio::time::timeout(Duration::from_millis(200), a.write_all(&big)).await;
        assert!(wrote.is_err(), "a megabyte went into a 4 KiB socket");
        assert!(a.unsent() <= OUT_LIMIT + MAX_MESSAGE_SIZE, "{}", a.unsent());
    }
}
