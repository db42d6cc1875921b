//! Errors a command can be refused with. Each says what was wrong and what to do.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum StateError {
    #[error("user {0:?} already exists; pick another name")]
    UserExists(String),
    #[error("user {0:?} does not exist; list users with `hydrascale users list`")]
    UserNotFound(String),
    #[error("user name {0:?} is not valid: use 1-63 characters of letters, digits, '.', '_', '-' or '@'")]
    BadUserName(String),
    #[error(
        "user {name:?} still has {nodes} node(s) and {keys} pre-auth key(s); delete them first"
    )]
    UserInUse {
        name: String,
        nodes: usize,
        keys: usize,
    },
    #[error("invalid auth key: it is unknown to this tailnet; create one with `hydrascale preauthkeys create --user USER`")]
    AuthKeyUnknown,
    #[error("invalid auth key: it has expired; create a new one with `hydrascale preauthkeys create --user USER`")]
    AuthKeyExpired,
    #[error("invalid auth key: it was single-use and is already used; create a reusable one with `hydrascale preauthkeys create --user USER --reusable`")]
    AuthKeyUsed,
    #[error("no pre-auth key of user {user:?} starts with {prefix:?}; see `hydrascale preauthkeys list --user {user}`")]
    PreAuthKeyNotFound { user: String, prefix: String },
    #[error("no pre-auth key has the id {0}; see `hydrascale preauthkeys list --user USER`")]
    PreAuthKeyIdNotFound(u64),
    #[error("no API key has the prefix {0:?}; see `hydrascale apikeys list`")]
    ApiKeyNotFound(String),
    #[error("an API key with the prefix {0:?} exists already; create the key again")]
    ApiKeyExists(String),
    #[error("tag {0:?} is not valid: tags look like tag:name")]
    BadTag(String),
    #[error("node {0} does not exist; list nodes with `hydrascale nodes list`")]
    NodeNotFound(u64),
    #[error("no node has this node key; register it again with `tailscale up --auth-key=KEY`")]
    NodeKeyNotFound,
    #[error(
        "this machine's node key has expired; log in again with `tailscale up --auth-key=KEY`"
    )]
    NodeKeyExpired,
    #[error("this node key is not the machine's current or previous key; log in again with a pre-auth key")]
    NodeKeyMismatch,
    #[error("node key is already used by node {0}")]
    NodeKeyInUse(u64),
    #[error("the address pool is exhausted; delete unused nodes")]
    AddressesExhausted,
    #[error("node name {0:?} is not valid: use 1-63 letters, digits and '-'")]
    BadNodeName(String),
    #[error("node name {0:?} is already taken by another node")]
    NodeNameTaken(String),
    #[error("a backup can only be restored into a new cluster, and this one already has state; start the first replica of a new cluster with an empty data directory and cluster.restore_from")]
    RestoreNotFresh,
    #[error("the backup does not decode ({0}); use a file written by `hydrascale cluster backup`")]
    BadBackup(String),
    #[error("no machine is waiting to log in with id {0:?} (it may have expired after an hour, or the machine gave up): run `tailscale up` on it again and use the id it shows")]
    LoginNotFound(String),
    #[error("requested tags {tags:?} are invalid or not permitted: the policy's tagOwners do not let {user:?} own them; add them there (`hydrascale policy set`) or log in without --advertise-tags")]
    TagsNotPermitted { tags: Vec<String>, user: String },
    #[error("no SSH connection is waiting for the check {0:?} (it may have expired after 30 minutes or been decided); connect again with `tailscale ssh` and use the link it prints")]
    SshCheckNotFound(String),
    #[error(
        "too many SSH connections are waiting for their check; let them expire and connect again"
    )]
    TooManySshChecks,
    #[error("route {0:?} is not a prefix like 10.0.0.0/24 (0.0.0.0/0 and ::/0 make an exit node)")]
    BadRoute(String),
    #[error("the policy was refused, the previous one stays in force: {0}")]
    BadPolicy(String),
    #[error("the user's profile was refused: {0}")]
    BadProfile(String),
    #[error("the DNS settings were refused, the previous ones stay in force: {field}: {message}")]
    BadDns { field: String, message: String },
    #[error("too many machines are waiting for an administrator to finish their login; finish or let expire the ones waiting, then run `tailscale up` again")]
    TooManyPendingLogins,
    #[error("user {name:?} was stored before this server recorded who created its users, so it cannot tell whether this OIDC login is that user; an administrator who knows it is links them with `hydrascale users link --name {name} --issuer {issuer} --subject {subject}` (or renames the user), then log in again")]
    UnlinkedUser {
        name: String,
        issuer: String,
        subject: String,
    },
    #[error("that OIDC identity already belongs to user {0:?}; unlink it there first (`hydrascale users unlink --name {0}`)")]
    IdentityTaken(String),
    #[error("user {name:?} is already linked to the OIDC identity {subject:?} of {issuer}; unlink it first (`hydrascale users unlink --name {name}`)")]
    UserLinked {
        name: String,
        issuer: String,
        subject: String,
    },
    #[error("an OIDC identity needs both the issuer URL and the subject (the `sub` claim)")]
    BadIdentity,
    #[error("replica {holder} holds the ACME lease until {until} (unix ms); only one replica orders the certificate at a time")]
    AcmeLeaseHeld { holder: u64, until: i64 },
    #[error("replica {0} does not hold the ACME lease (it ran out, or another replica took it); its order is void")]
    AcmeNotHolder(u64),
}
