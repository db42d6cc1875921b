//! Embedded DERP relay: the encrypted-packet relay Tailscale clients fall back
//! to when no direct path exists, plus its STUN responder and HTTP endpoints.
//!
//! This module owns the wire protocol ([`frame`]), the relay itself
//! ([`server`]), the HTTP upgrade and probe endpoints ([`http`]), the mesh
//! links between relays of one region ([`mesh`]), a minimal client used by
//! mesh links and tests ([`client`]), and the STUN responder ([`stun`]).

pub mod client;
pub mod frame;
pub mod http;
pub mod mesh;
pub mod server;
pub mod stun;
#[cfg(test)]
mod tests;

pub use client::{DerpClient, DerpReader, DerpWriter};
pub use frame::{Frame, PeerGoneReason};
pub use http::router;
pub use mesh::spawn_mesh_peer;
pub use server::{ClientVerifier, DerpServer, DerpStats};
pub use stun::run_stun;

/// Everything that can go wrong on a DERP connection. Errors end only the
/// connection they occurred on; the relay itself never fails.
#[derive(Debug, thiserror::Error)]
pub enum DerpError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
    #[error("frame truncated")]
    Truncated,
    #[error("frame of type {typ:#04x} is {len} bytes, limit is {max}")]
    FrameTooLarge { typ: u8, len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("unexpected frame type {0:#04x}")]
    UnexpectedFrame(u8),
    #[error("bad DERP magic")]
    BadMagic,
    #[error("box did not open")]
    Crypto,
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("timed out")]
    Timeout,
    #[error("http upgrade: {0}")]
    Http(String),
    #[error("not permitted without the mesh key: {0}")]
    NotPermitted(&'static str),
    #[error("client key is not a current node of this tailnet (derp.verify_clients is on)")]
    UnknownClient,
}
