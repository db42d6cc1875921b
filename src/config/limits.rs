//! `[limits]`: bounds on what clients control (docs/security.md).

use serde::{Deserialize, Serialize};

/// Bounds on what one client address can hold or start (`[limits]`); see
/// `docs/security.md` for every limit, including the fixed ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections open at once to the control listener from one client address (an
    /// IPv4 address, or an IPv6 /64); 0: no limit. Every node holds two (its Noise
    /// session and its DERP connection), so a NAT with many nodes behind it, or a load
    /// balancer that does not send the PROXY protocol, needs more.
    pub max_connections_per_address: usize,
    /// Interactive logins (`tailscale up` without an auth key) waiting at once from one
    /// client address; as many may be started from it per 10 minutes.
    pub max_pending_logins_per_address: usize,
    /// Noise sessions on this replica that have not yet identified themselves (a
    /// registration or a map request of a node of this tailnet); a new one beyond this
    /// is refused with 503 and the client retries.
    pub max_unidentified_sessions: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_address: 512,
            max_pending_logins_per_address: 10,
            max_unidentified_sessions: 1024,
        }
    }
}
