//! Sample nodes for tests and benchmarks: the commands that register node `n` through a
//! one-off pre-auth key, so that unit tests and `benches/` build tailnets the same way.
//! Not for the server itself, which takes its commands from clients.

use super::{Command, RegisterAuth};

/// The two commands that register node `n` for `user` with `tags`: a one-off pre-auth
/// key (`k{n}`, hash `h{n}`), then the node with machine and node keys made of `n`.
pub fn registration(
    user: &str,
    tags: Vec<String>,
    n: u64,
    hostname: String,
    hostinfo: String,
) -> [Command; 2] {
    [
        Command::CreatePreAuthKey {
            user: user.into(),
            prefix: format!("k{n}"),
            hash: format!("h{n}"),
            reusable: false,
            ephemeral: false,
            expiration: None,
            tags,
            now: 1,
        },
        Command::RegisterNode {
            machine_key: format!("mkey:{n:064x}"),
            node_key: format!("nodekey:{n:064x}"),
            old_node_key: None,
            hostname,
            hostinfo,
            auth: RegisterAuth::PreAuthKey {
                hash: format!("h{n}"),
            },
            expiry: None,
            ephemeral: false,
            prefixes: Default::default(),
            now: 2,
        },
    ]
}
