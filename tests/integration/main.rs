//! The one integration test binary: real replicas in-process, real clients as processes.

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
