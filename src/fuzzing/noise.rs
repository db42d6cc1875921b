//! Harnesses for the TS2021 transport: the handshake initiation a client sends in
//! `X-Tailscale-Handshake`, and the record stream after it.
//!
//! The peer's side is written here from the protocol (controlbase: a record is type 4, a
//! big-endian u16 length, ChaCha20-Poly1305 ciphertext under a big-endian counter nonce),
//! not with the server's code, so a record the server cannot read is a disagreement with
//! the protocol, not only with itself.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{op, take, CONTROL_SECRET};
use crate::noise::{accept_initiation, ControlKey, NoiseStream, INITIATION_LEN};

const RECORD: u8 = 4;
const HEADER: usize = 3;
const TAG: usize = 16;
/// controlbase `maxMessageSize`, header included.
const MAX_MESSAGE: usize = 4096;
const MAX_PLAINTEXT: usize = MAX_MESSAGE - HEADER - TAG;
const C2S: [u8; 32] = [0xc2; 32];
const S2C: [u8; 32] = [0x2c; 32];

fn control_key() -> &'static ControlKey {
    static KEY: OnceLock<ControlKey> = OnceLock::new();
    KEY.get_or_init(|| ControlKey::from_secret(CONTROL_SECRET))
}

/// Target `noise_handshake`: a handshake initiation as `/ts2021` passes it to
/// `accept_initiation` (the decoded header). Whatever it is, an answer or an error; an
/// accepted one is a 101-byte initiation of the version it names, answered with a 51-byte
/// response.
///
/// An input of exactly 34 bytes is also read as a client's secret key and a protocol
/// version: the initiation a Noise IK initiator makes from them is accepted, names that
/// client's key, and the keys both ends split agree.
pub fn noise_handshake(data: &[u8]) {
    let key = control_key();
    if let Ok(a) = accept_initiation(key, data) {
        assert_eq!(data.len(), INITIATION_LEN);
        assert_eq!(a.version, u16::from_be_bytes([data[0], data[1]]));
        assert_eq!(a.response.len(), 51);
        assert_eq!(a.response[..3], [2, 0, 48]);
        assert_ne!(a.rx_key, a.tx_key);
    }
    if let Ok(client) = <[u8; 34]>::try_from(data) {
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&client[..32]);
        let version = u16::from_be_bytes([client[32], client[33]]);
        initiator_is_accepted(key, &ControlKey::from_secret(secret), version);
    }
}

fn initiator_is_accepted(server: &ControlKey, client: &ControlKey, version: u16) {
    let params = "Noise_IK_25519_ChaChaPoly_BLAKE2s"
        .parse()
        .expect("noise parameters");
    let prologue = format!("Tailscale Control Protocol v{version}");
    let mut hs = snow::Builder::new(params)
        .local_private_key(client.secret())
        .and_then(|b| b.remote_public_key(server.public()))
        .and_then(|b| b.prologue(prologue.as_bytes()))
        .and_then(|b| b.build_initiator())
        .expect("initiator");
    let mut msg = [0u8; 96];
    assert_eq!(hs.write_message(&[], &mut msg).expect("initiation"), 96);
    let mut init = version.to_be_bytes().to_vec();
    init.push(1);
    init.extend_from_slice(&96u16.to_be_bytes());
    init.extend_from_slice(&msg);
    let a = accept_initiation(server, &init).expect("a real initiation is accepted");
    assert_eq!(&a.machine_key, client.public());
    assert_eq!(a.version, version);
    let mut payload = [0u8; 64];
    let n = hs
        .read_message(&a.response[3..], &mut payload)
        .expect("the client reads the response");
    assert_eq!(n, 0);
    let (c1, c2) = hs.dangerously_get_raw_split();
    assert_eq!((c1, c2), (a.rx_key, a.tx_key));
}

/// One direction of the transport as the peer runs it.
struct PeerCipher {
    aead: ChaCha20Poly1305,
    counter: u64,
}

impl PeerCipher {
    fn new(key: [u8; 32]) -> Self {
        Self {
            aead: ChaCha20Poly1305::new(Key::from_slice(&key)),
            counter: 0,
        }
    }

    fn nonce(&mut self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        n
    }

    fn seal(&mut self, plaintext: &[u8], wire: &mut Vec<u8>) {
        let mut body = plaintext.to_vec();
        let nonce = self.nonce();
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &[], &mut body)
            .expect("seal");
        let len = u16::try_from(body.len() + TAG).expect("record length");
        wire.push(RECORD);
        wire.extend_from_slice(&len.to_be_bytes());
        wire.extend_from_slice(&body);
        wire.extend_from_slice(&tag);
    }

    fn open(&mut self, record: &[u8]) -> Vec<u8> {
        let (body, tag) = record.split_at(record.len() - TAG);
        let mut body = body.to_vec();
        let nonce = self.nonce();
        self.aead
            .decrypt_in_place_detached(Nonce::from_slice(&nonce), &[], &mut body, tag.into())
            .expect("the server's record opens");
        body
    }
}

/// The socket: what the peer sent, in the pieces one read each returns, and what the
/// server wrote, taken at most `write_max` bytes a write.
struct Wire {
    reads: VecDeque<Vec<u8>>,
    at: usize,
    sent: Rc<RefCell<Vec<u8>>>,
    write_max: usize,
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(front) = this.reads.front() {
            let n = (front.len() - this.at).min(buf.remaining());
            buf.put_slice(&front[this.at..this.at + n]);
            this.at += n;
            if this.at == front.len() {
                this.reads.pop_front();
                this.at = 0;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.write_max);
        self.sent.borrow_mut().extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn ready<T>(p: Poll<T>) -> T {
    match p {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the session waits on a socket that is always ready"),
    }
}

/// Target `noise_records`: the bytes a peer sends after the handshake, written by a
/// script. The first byte sets the reader's buffer size and the socket's write size; then
/// ops, each a tag, a u16 length and (for some) that many bytes:
/// - tag % 4 == 0: a record the peer seals, carrying the op's bytes;
/// - tag % 4 == 1: a record the peer seals, carrying `length % 4078` filler bytes;
/// - tag % 4 == 2: the op's bytes as they are (garbage, a forged or broken record);
/// - tag % 4 == 3: the socket's read ends here (records cut anywhere).
///
/// The session reads out exactly the plaintext of the records the peer sealed and ends
/// cleanly, when there is no garbage; with garbage it reads a prefix of the plaintext
/// sealed before it and then fails, for good. What is read is then written back: it goes
/// out in records no larger than the protocol allows that the peer opens to the same bytes.
pub fn noise_records(data: &[u8]) {
    let Some((&cfg, mut rest)) = data.split_first() else {
        return;
    };
    let read_size = match cfg & 0x7f {
        n @ 0..=63 => usize::from(n) + 1,
        n => usize::from(n - 63) * 1024,
    };
    let write_max = if cfg & 0x80 == 0 { usize::MAX } else { 997 };
    let mut peer = PeerCipher::new(C2S);
    let mut reads = vec![Vec::new()];
    let mut expected = Vec::new();
    let mut garbage = false;
    while let Some((tag, len)) = op(&mut rest) {
        let wire = reads.last_mut().expect("a read");
        match tag % 4 {
            0 => {
                let text = take(&mut rest, len.min(MAX_PLAINTEXT));
                peer.seal(text, wire);
                if !garbage {
                    expected.extend_from_slice(text);
                }
            }
            1 => {
                let text: Vec<u8> = (0..len % (MAX_PLAINTEXT + 1))
                    .map(|i| (i % 251) as u8)
                    .collect();
                peer.seal(&text, wire);
                if !garbage {
                    expected.extend_from_slice(&text);
                }
            }
            2 => {
                let raw = take(&mut rest, len);
                garbage |= !raw.is_empty();
                wire.extend_from_slice(raw);
            }
            _ => reads.push(Vec::new()),
        }
    }
    reads.retain(|r| !r.is_empty());
    let sent = Rc::new(RefCell::new(Vec::new()));
    let wire = Wire {
        reads: reads.into(),
        at: 0,
        sent: sent.clone(),
        write_max,
    };
    let mut session = NoiseStream::new(wire, C2S, S2C);
    let mut cx = Context::from_waker(Waker::noop());
    let mut got = Vec::new();
    let mut buf = vec![0u8; read_size];
    let end = loop {
        let mut rb = ReadBuf::new(&mut buf);
        match ready(Pin::new(&mut session).poll_read(&mut cx, &mut rb)) {
            Ok(()) if rb.filled().is_empty() => break Ok(()),
            Ok(()) => got.extend_from_slice(rb.filled()),
            Err(e) => break Err(e),
        }
        assert!(got.len() <= expected.len(), "more plaintext than was sent");
    };
    if garbage {
        let e = end.expect_err("garbage from the peer went unnoticed");
        assert!(expected.starts_with(&got), "plaintext that was never sent");
        let mut rb = ReadBuf::new(&mut buf);
        let again = ready(Pin::new(&mut session).poll_read(&mut cx, &mut rb));
        assert_eq!(again.map_err(|e| e.kind()).err(), Some(e.kind()));
    } else {
        end.expect("a clean stream of records");
        assert!(got == expected, "the plaintext differs from what was sent");
    }
    // Pieces of the reader's size, but at most 64 of them: a record each is slow.
    echo(&mut session, &sent, &got, read_size.max(got.len() / 64 + 1));
}

/// Writes `text` back in pieces of `piece` bytes and checks what reached the socket.
fn echo(session: &mut NoiseStream<Wire>, socket: &RefCell<Vec<u8>>, text: &[u8], piece: usize) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut at = 0;
    while at < text.len() {
        let end = (at + piece).min(text.len());
        let n = ready(Pin::new(&mut *session).poll_write(&mut cx, &text[at..end]))
            .expect("write to a socket that takes everything");
        assert!(n > 0, "a write took nothing");
        at += n;
    }
    ready(Pin::new(&mut *session).poll_flush(&mut cx)).expect("flush");
    let sent = socket.take();
    let mut peer = PeerCipher::new(S2C);
    let mut back = Vec::new();
    let mut rest = &sent[..];
    while !rest.is_empty() {
        assert!(rest.len() >= HEADER, "a cut record");
        assert_eq!(rest[0], RECORD);
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        assert!(HEADER + len <= MAX_MESSAGE, "a record of {len} bytes");
        assert!(len >= TAG && rest.len() >= HEADER + len, "a cut record");
        back.extend(peer.open(&rest[HEADER..HEADER + len]));
        rest = &rest[HEADER + len..];
    }
    assert!(back == text, "what was written is not what went out");
}

#[cfg(test)]
mod tests {
    use super::*;
    use hydrascale_raft::fuzzing::stand_in;

    /// Stand-in for `cargo fuzz run noise_handshake`.
    #[test]
    fn noise_handshake_stand_in() {
        stand_in("noise_handshake", 10_000, noise_handshake);
    }

    /// Stand-in for `cargo fuzz run noise_records`.
    #[test]
    fn noise_records_stand_in() {
        stand_in("noise_records", 5000, noise_records);
    }
}
