//! TS2021 transport: the control (Noise) key, the IK handshake and controlbase records.
//!
//! Owns everything between the raw upgraded TCP stream and the plaintext byte stream that
//! HTTP/2 runs on. The handshake uses `snow`; transport records are done here because
//! Tailscale's nonce is a big-endian counter where Noise (and `snow`) use little-endian.

pub mod client;
mod conn;
mod handshake;
mod key;

pub use conn::{until_silent, Heard, NoiseStream};
pub use handshake::{accept_initiation, Accepted, INITIATION_LEN};
pub use key::ControlKey;

/// Errors in the Noise layer; every one of them closes that client's connection only.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("wrong handshake initiation size {0}, want {INITIATION_LEN}")]
    InitiationSize(usize),
    #[error("unexpected handshake message type {0}")]
    MessageType(u8),
    #[error("handshake initiation payload length {0}, want 96")]
    PayloadLength(u16),
    #[error("handshake failed: {0} (is the client using this server's /key?)")]
    Handshake(String),
    #[error("record too large: {0} bytes")]
    RecordTooLarge(usize),
    #[error("record decryption failed")]
    Decrypt,
    #[error("nonce counter exhausted")]
    NonceExhausted,
    #[error("control key file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
