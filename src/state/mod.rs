//! The replicated tailnet state: its records, the commands that change it, the pure
//! `apply`, and the glue that runs commands through Raft (`Db`).

mod error;
mod ipam;
mod store;
mod tailnet;
#[cfg(test)]
mod tests;
mod types;

pub use error::StateError;
pub use store::{now_ms, Db, DbError, StampedChange, StateStore};
pub use tailnet::{sanitize_hostname, Tailnet};
pub use types::{
    ApiKey, Change, Command, CommandOutput, Node, PreAuthKey, Prefixes, RegisterAuth, Replica, User,
};
