//! The one integration test binary: real replicas in-process, real clients as processes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test, with its location"
)]

mod cluster;
mod deploy;
mod fixtures;
mod identity;
mod interop;
mod limits;
mod migration;
mod monitoring;
mod oidc;
mod packaging;
mod partition;
mod policy;
mod protocol;
mod raft_security;
mod rest_api;
mod revocation;
mod routes;
mod ssh;
mod tls;
mod watched;
