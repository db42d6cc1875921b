//! Hydrascale: a highly available control server for Tailscale networks.
//!
//! This first cut holds the configuration and the TS2021 Noise transport; the control
//! handlers, state machine, Raft crate, DERP relay and CLI land next (see the open issues).

pub mod config;
pub mod noise;

pub use config::Config;
