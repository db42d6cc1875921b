//! Hydrascale: a highly available control server for Tailscale networks.
//!
//! The library owns every plane of a replica; `main.rs` only parses the command line.
//! Tests call [`server::run_server`] to start real replicas in-process.

pub mod admin;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod derp;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod listener;
pub mod mapper;
pub mod metrics;
pub mod migrate;
pub mod noise;
pub mod policy;
pub mod server;
pub mod state;
pub mod tailcfg;
pub mod tls;
pub mod watched;

pub use config::Config;
pub use server::{run_server, ServerHandle};
