//! The identity of a Noise session's client, as the handlers inside the session see it
//! (an axum extension set by `ts2021`). Its own file so that the handlers need not
//! import the upgrade code that calls them.

use std::sync::Arc;

use super::limits::SessionIdentity;

/// Who is on the other end of a Noise session, learned from the handshake.
#[derive(Clone, Debug)]
pub struct NoisePeer {
    /// `mkey:<hex>` of the client's machine key.
    pub machine_key: String,
    pub version: u16,
    /// The client's address (from the PROXY header behind a trusted load balancer).
    pub addr: std::net::SocketAddr,
    /// Whether the session has said who it is (see `limits::SessionIdentity`).
    pub identity: Arc<SessionIdentity>,
}
