//! The one integration test binary: real replicas in-process, real clients as processes.

mod cluster;
mod fixtures;
mod interop;
mod monitoring;
mod packaging;
mod partition;
mod protocol;
mod rest_api;
