//! The one integration test binary: real replicas in-process, real clients as processes.

mod cluster;
mod deploy;
mod fixtures;
mod interop;
mod limits;
mod migration;
mod monitoring;
mod oidc;
mod packaging;
mod partition;
mod policy;
mod protocol;
mod rest_api;
mod routes;
mod ssh;
