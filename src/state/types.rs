//! The records of the tailnet: users, pre-auth keys and nodes.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// The prefixes node addresses come from. Tailscale clients only accept subsets of
/// 100.64.0.0/10 and fd7a:115c:a1e0::/48.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Prefixes {
    pub v4: Ipv4Net,
    pub v6: Ipv6Net,
}

impl Default for Prefixes {
    fn default() -> Self {
        Self {
            v4: Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10),
            v6: Ipv6Net::new_assert(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: u64,
    pub name: String,
    pub display_name: String,
    pub created: i64,
    /// The OIDC identity this user is: an OIDC login reaches this user only with exactly
    /// this issuer and subject, never by e-mail or user name. Set when an OIDC login
    /// created the user, by `users link`, or by a migration that carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcIdentity>,
    /// Who made the user; users stored before this was recorded are `Unrecorded`.
    #[serde(default)]
    pub origin: UserOrigin,
    /// E-mail address and picture, as an administrator gave them or the OIDC provider
    /// last said (a verified address only).
    #[serde(default, skip_serializing_if = "Profile::is_empty")]
    pub profile: Profile,
}

/// A user's e-mail address and picture URL (headscale's `email` and `profile_pic_url`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub email: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub picture_url: String,
}

impl Profile {
    pub fn is_empty(&self) -> bool {
        self.email.is_empty() && self.picture_url.is_empty()
    }

    /// A profile an admin API client, a provider or a migrated database could make huge
    /// or nonsensical is refused, saying which field is wrong. The one check for all of
    /// them (`apply`, OIDC claims, headscale migration).
    pub fn check(&self) -> Result<(), crate::state::StateError> {
        let bad = |m: String| Err(crate::state::StateError::BadProfile(m));
        for (field, v) in [("email", &self.email), ("picture URL", &self.picture_url)] {
            if v.len() > MAX_PROFILE_FIELD || v.chars().any(char::is_control) {
                return bad(format!(
                    "the {field} must be at most {MAX_PROFILE_FIELD} characters without control characters"
                ));
            }
        }
        if !self.email.is_empty() && !self.email.contains('@') {
            return bad(format!("{:?} is not an e-mail address", self.email));
        }
        let web = |u: &str| u.starts_with("https://") || u.starts_with("http://");
        if !(self.picture_url.is_empty() || web(&self.picture_url)) {
            return bad(format!(
                "the picture URL {:?} must start with https:// or http://",
                self.picture_url
            ));
        }
        Ok(())
    }

    /// `email` alone, if [`Profile::check`] takes it.
    pub fn checked_email(email: &str) -> Option<String> {
        let p = Profile {
            email: email.to_string(),
            ..Default::default()
        };
        p.check().is_ok().then_some(p.email)
    }

    /// `picture_url` alone, if [`Profile::check`] takes it.
    pub fn checked_picture_url(url: &str) -> Option<String> {
        let p = Profile {
            picture_url: url.to_string(),
            ..Default::default()
        };
        p.check().is_ok().then_some(p.picture_url)
    }
}

/// Longest e-mail address or picture URL a profile keeps.
pub const MAX_PROFILE_FIELD: usize = 2048;

/// An identity at an OIDC provider: the provider's issuer URL and the `sub` it gives the
/// person, which the provider never reassigns (OIDC Core 5.7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcIdentity {
    pub issuer: String,
    pub subject: String,
}

impl OidcIdentity {
    /// Issuers compare without a trailing '/', as discovery and ID tokens are checked.
    pub fn same(&self, issuer: &str, subject: &str) -> bool {
        self.subject == subject && self.issuer.trim_end_matches('/') == issuer.trim_end_matches('/')
    }
}

/// How a user came to be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserOrigin {
    /// Stored by a version that did not record it (a CLI user or an early OIDC login
    /// alike): no OIDC login is bound to it by name; an administrator links it.
    #[default]
    Unrecorded,
    /// Created by an administrator (CLI, admin or REST API) or carried over by a migration.
    Admin,
    /// Created by the first OIDC login of its identity.
    Oidc,
}

/// A pre-auth key; only its SHA-256 hash is stored, the key itself is shown once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreAuthKey {
    pub id: u64,
    pub user_id: u64,
    /// The first characters of the key, enough to name it in lists and `expire`.
    pub prefix: String,
    /// Hex SHA-256 of the whole key.
    pub hash: String,
    pub reusable: bool,
    pub ephemeral: bool,
    pub used: bool,
    pub expiration: Option<i64>,
    pub created: i64,
    pub tags: Vec<String>,
}

/// An admin API key; only its SHA-256 hash is stored, the key itself is shown once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: u64,
    /// The key's public part (`hskey-api-<prefix>-...`), to name it in lists and commands.
    pub prefix: String,
    /// Hex SHA-256 of the whole key.
    pub hash: String,
    pub expiration: Option<i64>,
    pub created: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: u64,
    pub stable_id: String,
    /// `mkey:<hex>`: binds the node to the machine that registered it.
    pub machine_key: String,
    /// `nodekey:<hex>`: the WireGuard key, rotated by the client.
    pub node_key: String,
    pub disco_key: String,
    pub user_id: u64,
    pub tags: Vec<String>,
    /// The host name the client asked for.
    pub hostname: String,
    /// The unique DNS label the node is known by.
    pub given_name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub endpoints: Vec<String>,
    pub home_derp: i32,
    /// Raw `Hostinfo` JSON as the client sent it.
    pub hostinfo: String,
    pub created: i64,
    pub last_seen: Option<i64>,
    /// Key expiry; a time at or before now means expired or logged out.
    pub expiry: Option<i64>,
    pub ephemeral: bool,
    pub auth_key_id: Option<u64>,
    pub online: bool,
    /// The replica holding the node's map stream while it is online, so the leader can
    /// mark it offline when that replica dies.
    #[serde(default)]
    pub online_via: Option<u64>,
    /// Routes the client advertises (`Hostinfo.RoutableIPs`: `--advertise-routes`, and
    /// 0.0.0.0/0 with ::/0 for `--advertise-exit-node`), kept apart from the raw hostinfo
    /// so map builders need not parse it.
    #[serde(default)]
    pub advertised_routes: Vec<ipnet::IpNet>,
    /// Routes an administrator or the policy's autoApprovers approved; served only while
    /// also advertised.
    #[serde(default)]
    pub approved_routes: Vec<ipnet::IpNet>,
    /// How the node last logged in (unrecorded for nodes registered before this was kept).
    #[serde(default, skip_serializing_if = "RegisterMethod::is_unrecorded")]
    pub register_method: RegisterMethod,
}

/// How a node logged in: headscale's `registerMethod`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegisterMethod {
    #[default]
    Unrecorded,
    /// With a pre-auth key.
    AuthKey,
    /// An administrator let a waiting machine in (`hydrascale auth register`, REST).
    Cli,
    /// The person logged in at the OIDC provider.
    Oidc,
}

impl RegisterMethod {
    pub fn is_unrecorded(&self) -> bool {
        *self == RegisterMethod::Unrecorded
    }
}

/// A machine waiting for an administrator to finish its interactive login
/// (`tailscale up` without a key): it asked at `created` and was shown
/// `<server_url>/register/<auth_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingLogin {
    pub auth_id: String,
    pub machine_key: String,
    pub node_key: String,
    pub hostname: String,
    pub hostinfo: String,
    pub ephemeral: bool,
    pub created: i64,
    /// The address prefixes and node key lifetime of the replica the machine asked.
    pub prefixes: Prefixes,
    pub key_lifetime: Option<i64>,
}

impl PendingLogin {
    /// The auth id in `text`: the part after `/register/` of the login URL the machine
    /// shows, or `text` itself when it is only the id.
    pub fn id_from(text: &str) -> &str {
        text.rsplit_once("/register/").map_or(text, |(_, id)| id)
    }
}

/// How long an interactive login waits for an administrator (as Tailscale's own).
pub const LOGIN_TTL_MS: i64 = 60 * 60 * 1000;

/// At most this many interactive logins wait at once: anyone who can reach the login URL
/// can start one, so their number (and the replicated state they take) has a bound.
pub const MAX_PENDING_LOGINS: usize = 1000;

/// A default route: `--advertise-exit-node` advertises 0.0.0.0/0 and ::/0.
pub fn is_exit_route(r: &ipnet::IpNet) -> bool {
    r.prefix_len() == 0
}

/// The routes in a client's `Hostinfo` JSON (`RoutableIPs`), each truncated to its prefix.
pub fn routes_in_hostinfo(hostinfo: &str) -> Vec<ipnet::IpNet> {
    let mut routes: Vec<ipnet::IpNet> = serde_json::from_str::<serde_json::Value>(hostinfo)
        .ok()
        .and_then(|h| h.get("RoutableIPs").cloned())
        .and_then(|v| serde_json::from_value::<Vec<String>>(v).ok())
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.parse::<ipnet::IpNet>().ok().map(|n| n.trunc()))
        .collect();
    routes.sort();
    routes.dedup();
    routes
}

impl Node {
    /// Approved and advertised: the routes this node may serve.
    pub fn served_routes(&self) -> Vec<ipnet::IpNet> {
        self.approved_routes
            .iter()
            .filter(|r| self.advertised_routes.contains(r))
            .copied()
            .collect()
    }

    /// An ephemeral node that is offline and was last seen at or before `cutoff`: the
    /// leader proposes its removal, and `RemoveIdleEphemeral` checks it again when applied.
    pub fn idle_ephemeral(&self, cutoff: i64) -> bool {
        self.ephemeral && !self.online && self.last_seen.is_none_or(|t| t <= cutoff)
    }
}

/// A replica as the rest of the cluster needs to know it: its DERP node in the DERP map,
/// the URL other relays mesh with, and where its admin API listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub id: u64,
    pub admin_addr: String,
    pub derp_host: String,
    pub derp_ipv4: Option<String>,
    pub derp_port: u16,
    pub stun_port: u16,
    pub mesh_url: String,
    /// Its relay's public key (hex): the only key the other relays let mesh with them.
    /// Empty from replicas of versions before it.
    #[serde(default)]
    pub derp_key: String,
    /// The highest command level it reads ([`COMMAND_LEVEL`] of its version; 0 from
    /// versions before levels, which read level 1).
    #[serde(default)]
    pub command_level: u32,
}

impl Replica {
    /// The highest command level this replica reads.
    pub fn command_level(&self) -> u32 {
        self.command_level.max(1)
    }
}

/// The highest level of command this version reads. Every kind of [`Command`] belongs to
/// the level of the version that introduced it ([`Command::level`]); a replica announces
/// its level in the registry, and a command is proposed only once every member reads its
/// level (`Db::check_level`), so a rolling upgrade never stops a replica not yet upgraded.
/// Raise it with the first new kind of command of a version (or a new field whose loss
/// an older replica would not notice), and give that kind the new level.
pub const COMMAND_LEVEL: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RegisterAuth {
    PreAuthKey {
        hash: String,
    },
    /// Re-login of a known machine with its current or previous node key.
    Existing,
}

/// Every change to the tailnet. Time and random values are inside, so `apply` is pure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    CreateUser {
        name: String,
        display_name: String,
        now: i64,
        /// Set by this version's administrator paths; absent in commands older versions
        /// wrote (some of which an OIDC login proposed), whose users stay `Unrecorded`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        by_admin: bool,
        #[serde(default, skip_serializing_if = "Profile::is_empty")]
        profile: Profile,
    },
    RenameUser {
        old_name: String,
        new_name: String,
    },
    DeleteUser {
        name: String,
    },
    CreatePreAuthKey {
        user: String,
        prefix: String,
        hash: String,
        reusable: bool,
        ephemeral: bool,
        expiration: Option<i64>,
        tags: Vec<String>,
        now: i64,
    },
    ExpirePreAuthKey {
        user: String,
        prefix: String,
        now: i64,
    },
    CreateApiKey {
        prefix: String,
        hash: String,
        expiration: Option<i64>,
        now: i64,
    },
    ExpireApiKey {
        prefix: String,
        now: i64,
    },
    DeleteApiKey {
        prefix: String,
    },
    RegisterNode {
        machine_key: String,
        node_key: String,
        old_node_key: Option<String>,
        hostname: String,
        hostinfo: String,
        auth: RegisterAuth,
        expiry: Option<i64>,
        ephemeral: bool,
        /// Where a new node's addresses come from (the proposing replica's config).
        #[serde(default)]
        prefixes: Prefixes,
        now: i64,
    },
    UpdateNode {
        node_key: String,
        disco_key: Option<String>,
        endpoints: Option<Vec<String>>,
        hostinfo: Option<String>,
        hostname: Option<String>,
        home_derp: Option<i32>,
        now: i64,
    },
    /// A map stream on `replica` started (`online`) or ended. An "offline" from a replica
    /// that no longer holds the node's stream is ignored: the node moved elsewhere.
    SetOnline {
        node_id: u64,
        online: bool,
        #[serde(default)]
        replica: u64,
        now: i64,
    },
    /// The leader lost contact with `replica`: nodes streaming from it are offline.
    ReplicaDown {
        replica: u64,
        now: i64,
    },
    /// The cluster's control (Noise) key; the first one proposed wins, later ones are ignored.
    SetControlKey {
        key: String,
    },
    /// Several commands in one log entry (see `control::write_batch`); each is applied on its
    /// own, in order, and has its own outcome.
    Batch {
        commands: Vec<Command>,
    },
    /// Seeds a new cluster with the tailnet of a backup (the JSON of a [`Tailnet`]),
    /// control key included, so clients keep trusting the server. Only valid as a new
    /// cluster's first state: refused once a control key, user or node exists. This
    /// cluster's replica registry is kept and every node starts offline.
    ///
    /// [`Tailnet`]: crate::state::Tailnet
    Restore {
        tailnet: String,
    },
    /// A replica announces (or updates) how it is reached.
    RegisterReplica {
        replica: Replica,
    },
    /// A replica left the cluster for good.
    ForgetReplica {
        id: u64,
    },
    LogoutNode {
        node_key: String,
        now: i64,
    },
    DeleteNode {
        id: u64,
    },
    /// A machine starts an interactive login; replaces an earlier one of the same machine
    /// and drops logins older than [`LOGIN_TTL_MS`].
    StartLogin {
        login: PendingLogin,
    },
    /// An administrator finishes the login `auth_id` for `user`: the machine is registered
    /// (or re-registered with its new node key) as that user's node.
    CompleteLogin {
        auth_id: String,
        user: String,
        now: i64,
    },
    /// An administrator sets a node's tags (replacing them; empty removes them).
    SetTags {
        id: u64,
        tags: Vec<String>,
    },
    /// Removes those of `node_ids` that are ephemeral, offline and last seen at or before
    /// `cutoff` (checked here, so a node that reconnected meanwhile stays).
    RemoveIdleEphemeral {
        node_ids: Vec<u64>,
        cutoff: i64,
    },
    ExpireNode {
        id: u64,
        now: i64,
    },
    RenameNode {
        id: u64,
        new_name: String,
    },
    /// An administrator sets the routes a node may serve (replacing them; empty removes
    /// them). Routes it does not advertise are kept but not served until it does.
    ApproveRoutes {
        id: u64,
        routes: Vec<String>,
    },
    /// Replaces the tailnet policy (checked again here; a policy that does not parse is
    /// refused and the previous one stays). Blank text removes it: everyone reaches everyone.
    SetPolicy {
        text: String,
        now: i64,
    },
    /// A node holds an SSH connection from `src` until the check `auth_id` is decided;
    /// drops checks older than [`SSH_CHECK_TTL_MS`].
    StartSshCheck {
        auth_id: String,
        src: u64,
        dst: u64,
        ssh_user: String,
        now: i64,
    },
    /// The connecting user re-authenticated (`by` is who they proved to be), or an
    /// administrator decided. An approval lets `src` into `dst` for the rule's
    /// `checkPeriod`.
    DecideSshCheck {
        auth_id: String,
        approve: bool,
        by: String,
        now: i64,
    },
    /// The person at the browser logged in at the OIDC provider as (`issuer`, `subject`)
    /// and confirmed that the machine waiting as `auth_id` joins their account: the
    /// machine is registered for the user bound to that identity, or for a new user
    /// created for it, named `name` or, when that is taken, `name-2`, `name-3`, ...
    /// Refused (changing nothing) when `name` is a user stored before user origins were
    /// recorded: only an administrator can say whether it is this person.
    OidcLogin {
        auth_id: String,
        issuer: String,
        subject: String,
        name: String,
        display_name: String,
        now: i64,
        /// What the provider says now: the user's profile takes it (fields given only).
        #[serde(default, skip_serializing_if = "Profile::is_empty")]
        profile: Profile,
    },
    /// An administrator binds user `name` to an OIDC identity (an OIDC login as that
    /// identity then reaches this user), or unbinds it (`identity: None`).
    LinkUser {
        name: String,
        identity: Option<OidcIdentity>,
    },
    /// One step of the cluster's ACME certificate (`tls.acme_*`, see [`AcmeStep`]). Only
    /// the replica holding the lease may publish a challenge, record the account or
    /// install a certificate, so the cluster places one order per renewal however
    /// leadership moves while it runs.
    Acme {
        replica: u64,
        step: AcmeStep,
        now: i64,
    },
    /// An administrator deletes pre-auth key `id` (nodes it registered stay; the key can no
    /// longer register any).
    DeletePreAuthKey {
        id: u64,
    },
    /// An administrator sets node `id`'s key expiry: a time (in the past: expired now), or
    /// `None` for a key that never expires.
    SetNodeExpiry {
        id: u64,
        expiry: Option<i64>,
    },
    /// An administrator turns away the machine waiting to log in as `auth_id`: its login
    /// is dropped (the machine is shown a new login URL if it asks again).
    RejectLogin {
        auth_id: String,
    },
    /// Replaces the tailnet's DNS settings (checked here; refused settings change
    /// nothing). `seed`: only if none are set yet (a replica's `[dns]` at founding).
    SetDns {
        settings: crate::state::DnsSettings,
        seed: bool,
    },
}

impl Command {
    /// The command level this kind of command was introduced at ([`COMMAND_LEVEL`]): a
    /// replica that reads a lower level cannot apply it.
    pub fn level(&self) -> u32 {
        match self {
            Command::Batch { commands } => commands.iter().map(Command::level).max().unwrap_or(1),
            // A profile an older replica would drop without noticing.
            Command::CreateUser { profile, .. } | Command::OidcLogin { profile, .. }
                if !profile.is_empty() =>
            {
                3
            }
            // OIDC identities: users bound to (issuer, subject) and how they came to be.
            Command::CreateUser { by_admin: true, .. }
            | Command::OidcLogin { .. }
            | Command::LinkUser { .. } => 2,
            // The cluster's ACME certificate, in the replicated state.
            Command::Acme { .. } => 2,
            // headscale 0.29's REST shapes: keys deleted by id, node expiry set or disabled.
            Command::DeletePreAuthKey { .. }
            | Command::SetNodeExpiry { .. }
            | Command::RejectLogin { .. }
            | Command::SetDns { .. } => 3,
            _ => 1,
        }
    }

    /// The command's kind as written in the log, e.g. `CreateUser`, for messages.
    pub fn kind(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| match v {
                serde_json::Value::Object(o) => o.keys().next().cloned(),
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| "this command".into())
    }
}

/// Text that must never be shown: a private key. It is serialized as it is (the
/// replicated state, Raft's log and snapshots, and backups hold it), and `Debug` prints
/// only its length, so no log line or debug dump carries it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Self {
        Self(text)
    }

    /// The secret itself, for the one place that uses it (a TLS handshake, an ACME request).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret([redacted, {} bytes])", self.0.len())
    }
}

/// The certificate every replica serves on its control listener, obtained by ACME by
/// one replica and shared with its private key, so every replica (and a load balancer
/// passing TLS through) presents the same name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsCertRecord {
    pub hostname: String,
    /// The certificate chain, leaf first, PEM.
    pub chain_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: Secret,
    /// Validity of the leaf, unix milliseconds.
    pub not_before: i64,
    pub not_after: i64,
    /// The leaf's serial number in hex.
    pub serial: String,
    /// The replica that ordered it, and when it was installed.
    pub issued_by: u64,
    pub installed: i64,
}

/// Which replica may order a certificate, until when. Taken before an order, extended
/// while it runs, released when it ends; one that runs out (its holder died) can be taken
/// by another replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeLease {
    pub replica: u64,
    pub since: i64,
    pub until: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcmeChallengeKind {
    /// `http://<hostname>/.well-known/acme-challenge/<token>` answers the key authorization.
    Http01,
    /// A TLS handshake for `<hostname>` with ALPN `acme-tls/1` presents a certificate
    /// carrying the key authorization's digest.
    TlsAlpn01,
}

/// The challenge of the order in progress, answered by every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeChallengeRecord {
    pub kind: AcmeChallengeKind,
    pub hostname: String,
    pub token: String,
    pub key_authorization: String,
}

/// The ACME account the cluster orders with (Let's Encrypt limits new accounts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeAccountRecord {
    pub directory: String,
    /// The account's id and private key (instant-acme's `AccountCredentials`, JSON).
    pub credentials: Secret,
}

/// One replica's step in ordering the cluster's certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AcmeStep {
    /// Take (or extend) the lease until `until`: granted when no lease is held, when the
    /// one held has run out at `now`, or when this replica holds it.
    Lease { until: i64 },
    /// The holder publishes the challenge every replica answers (`None` withdraws it).
    Challenge {
        challenge: Option<AcmeChallengeRecord>,
    },
    /// The holder records the account later orders use.
    Account { account: AcmeAccountRecord },
    /// The holder installs the certificate it obtained; the lease ends.
    Issued { cert: TlsCertRecord },
    /// The holder's order failed (`error` says why); the lease ends and the next try
    /// waits out a back-off that grows with the failures in a row.
    Failed { error: String },
    /// The holder gives the lease back without ordering (the certificate was renewed
    /// meanwhile).
    Release,
}

/// The cluster's certificate and the ACME bookkeeping around it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsState {
    pub cert: Option<TlsCertRecord>,
    pub lease: Option<AcmeLease>,
    pub challenge: Option<AcmeChallengeRecord>,
    pub account: Option<AcmeAccountRecord>,
    /// Certificates installed, and orders that failed, since the cluster began.
    pub issued: u64,
    pub failed: u64,
    /// Failures since the last certificate, and the last one's time and reason.
    pub failures_in_row: u32,
    pub last_failure: Option<(i64, String)>,
}

/// The tailnet policy as the administrator wrote it (comments included), and its parsed
/// form, read once per replica and shared by every map stream.
#[derive(Clone, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub text: String,
    pub updated: i64,
    #[serde(skip)]
    parsed: std::sync::Arc<
        std::sync::OnceLock<Result<hydrascale_policy::Policy, hydrascale_policy::PolicyError>>,
    >,
}

impl PolicyRecord {
    pub fn new(text: String, updated: i64, parsed: hydrascale_policy::Policy) -> Self {
        Self {
            text,
            updated,
            parsed: std::sync::Arc::new(std::sync::OnceLock::from(Ok(parsed))),
        }
    }

    /// The parsed policy. A stored policy that no longer parses (a stricter later
    /// version) denies everything rather than opening the tailnet; the error is logged.
    pub fn policy(&self) -> &hydrascale_policy::Policy {
        static DENY_ALL: std::sync::OnceLock<hydrascale_policy::Policy> =
            std::sync::OnceLock::new();
        match self
            .parsed
            .get_or_init(|| hydrascale_policy::parse(&self.text))
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "the stored policy does not parse; denying all traffic until a new one is set");
                DENY_ALL.get_or_init(hydrascale_policy::Policy::default)
            }
        }
    }
}

impl PartialEq for PolicyRecord {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text && self.updated == other.updated
    }
}

impl std::fmt::Debug for PolicyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyRecord")
            .field("updated", &self.updated)
            .field("bytes", &self.text.len())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// One value per applied command, never held in bulk: boxing the node would only add an
// allocation to every registration and update.
#[allow(clippy::large_enum_variant)]
pub enum CommandOutput {
    User(User),
    PreAuthKey(PreAuthKey),
    ApiKey(ApiKey),
    Node(Node),
    Done,
    Batch(Vec<Result<CommandOutput, crate::state::StateError>>),
}

/// A Tailscale SSH connection held by the destination node until the connecting user
/// re-authenticates (an SSH rule with `"action": "check"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SshCheck {
    pub auth_id: String,
    /// Node ids of the connecting node and of the node holding the connection.
    pub src: u64,
    pub dst: u64,
    pub ssh_user: String,
    pub created: i64,
    /// `Some(true)` once approved, `Some(false)` once refused.
    pub decision: Option<bool>,
}

/// How long a held SSH connection waits for its check (the client gives up after 30 min).
pub const SSH_CHECK_TTL_MS: i64 = 30 * 60 * 1000;
/// Most SSH checks waiting at once.
pub const MAX_SSH_CHECKS: usize = 1000;

/// What an applied command touched, for the map streams.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    NodeUpserted(u64),
    NodeRemoved(u64),
    UserChanged(u64),
    /// The set of replicas changed: the DERP map changed.
    ReplicasChanged,
    /// The whole state was replaced (snapshot install): streams resend full maps.
    Reset,
    /// The policy changed: every node's filter and peer list may differ.
    PolicyChanged,
    /// An SSH check was approved or refused: the held connection may go on.
    SshCheckDecided(String),
    /// The cluster's certificate or ACME challenge changed: replicas serve the new one.
    TlsChanged,
    /// The DNS settings changed: every client gets the new `DNSConfig`.
    DnsChanged,
}
