//! `[derp]`: the embedded DERP relay and STUN server.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The embedded DERP relay and STUN server, and how it appears in the DERP map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DerpConfig {
    pub enabled: bool,
    pub region_id: i32,
    pub region_code: String,
    pub region_name: String,
    /// Host name clients dial for DERP; defaults to the host of `server_url`.
    pub hostname: Option<String>,
    /// Port clients dial for DERP; defaults to the port of `server_url`.
    pub port: Option<u16>,
    /// Literal IPv4 address advertised in the DERP map (optional).
    pub ipv4: Option<String>,
    /// UDP address of the STUN listener.
    pub stun_listen_addr: SocketAddr,
    /// Mark the DERP node `InsecureForTests` (self-signed TLS in tests only).
    pub insecure_for_tests: bool,
    /// Relay only for nodes of this tailnet (current, unexpired node keys); off makes the
    /// relay open to anyone who can reach it.
    pub verify_clients: bool,
    /// A DERP map in Tailscale's JSON form whose regions are added to the map clients get
    /// (e.g. your own external relays, or Tailscale's public ones as a fallback).
    pub extra_regions_file: Option<std::path::PathBuf>,
}

impl Default for DerpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            region_id: 900,
            region_code: "hydrascale".into(),
            region_name: "Hydrascale".into(),
            hostname: None,
            port: None,
            ipv4: None,
            stun_listen_addr: SocketAddr::from(([127, 0, 0, 1], 3478)),
            insecure_for_tests: false,
            verify_clients: true,
            extra_regions_file: None,
        }
    }
}
