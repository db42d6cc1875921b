//! The replicated tailnet state: its records, the commands that change it, the pure
//! `apply`, and the glue that runs commands through Raft (`Db`).

mod api_keys;
mod apply;
mod dns;
mod error;
mod index;
pub mod ipam;
#[doc(hidden)]
pub mod sample;
mod store;
mod tailnet;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_acme;
mod types;

pub use dns::{valid_domain, valid_resolver, DnsProblem, DnsRecord, DnsSettings, MAX_DNS_ENTRIES};
pub use error::StateError;
pub use store::{now_ms, Db, DbError, Meters, Observer, StampedChange, StateStore};
pub use tailnet::{sanitize_hostname, valid_label, valid_tag, valid_user_name, Tailnet};
pub use types::{
    is_exit_route, routes_in_hostinfo, AcmeAccountRecord, AcmeChallengeKind, AcmeChallengeRecord,
    AcmeLease, AcmeStep, ApiKey, Change, Command, CommandOutput, Node, OidcIdentity, PendingLogin,
    PolicyRecord, PreAuthKey, Prefixes, Profile, RegisterAuth, RegisterMethod, Replica, Secret,
    SshCheck, TlsCertRecord, TlsState, User, UserOrigin, COMMAND_LEVEL, LOGIN_TTL_MS,
    MAX_PENDING_LOGINS, MAX_PROFILE_FIELD, SSH_CHECK_TTL_MS,
};
