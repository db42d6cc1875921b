//! Raft traffic over gRPC: the server side (`server`) and the outgoing connections
//! openraft uses to reach other replicas (`client`).

pub mod client;
pub mod server;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("hydrascale.raft.v1");
}

use serde::{Deserialize, Serialize};

/// The answer of a leader to a forwarded client write.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardResult {
    Ok { index: u64, data: Vec<u8> },
    NotLeader { leader: Option<u64> },
    Failed(String),
}
