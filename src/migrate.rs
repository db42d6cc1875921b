//! Migration from headscale: reads a headscale SQLite database (schemas of headscale 0.23
//! to 0.29) and its Noise private key, and makes a Hydrascale backup of the same tailnet.
//! The backup is restored into a new cluster with `cluster restore`; because the control
//! key and every node's keys and addresses come along, clients reconnect to the new URL
//! (or the same URL, moved) without logging in again.
//!
//! What headscale keeps that Hydrascale cannot take over is left out and reported: API
//! keys and new-style pre-auth keys are stored as bcrypt hashes (Hydrascale checks SHA-256
//! hashes, so they cannot be verified; create new ones), and a policy this server's
//! parser refuses (the reason is reported).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use self::sqlite::{columns, rows, Value};
use crate::noise::ControlKey;
use crate::state::{
    sanitize_hostname, valid_label, valid_user_name, Node, OidcIdentity, PolicyRecord, PreAuthKey,
    Prefixes, Tailnet, User, UserOrigin,
};

mod sqlite;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot open the headscale database {path}: {message}; give the SQLite file from headscale's `database.sqlite.path` (PostgreSQL databases are not supported)")]
    Open { path: String, message: String },
    #[error("reading the headscale database: {0}; is it a headscale 0.23 or newer database? (older ones: upgrade headscale first, it migrates its database on start)")]
    Query(String),
    #[error("the headscale Noise key {path}: {message}; give headscale's `noise.private_key_path` file (privkey:<hex>)")]
    NoiseKey { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Query(e.to_string())
    }
}

/// What was taken over and what was left out, for the operator.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub users: usize,
    pub nodes: usize,
    pub preauth_keys: usize,
    /// New-style (bcrypt) pre-auth keys: not usable here.
    pub preauth_keys_skipped: usize,
    pub api_keys_skipped: usize,
    /// Approved routes that are not prefixes (node and route), left out.
    pub nodes_with_routes_skipped: Vec<String>,
    /// The policy headscale kept in its database was taken over.
    pub policy_taken: bool,
    /// Why headscale's policy was left out, when it was.
    pub policy_refused: Option<String>,
    /// Users and nodes renamed to fit Hydrascale's naming rules, "old -> new".
    pub renamed: Vec<String>,
    /// Tagged nodes (owned by no user in headscale) were given to this user.
    pub tagged_owner: Option<String>,
    /// Users that headscale's OIDC logins made and that keep their OIDC identity here
    /// (issuer and subject), so their next OIDC login reaches them.
    pub oidc_linked: usize,
    /// OIDC users whose identity could not be taken over, "user: why"; an administrator
    /// links them with `hydrascale users link` (until then their OIDC login is refused).
    pub oidc_unlinked: Vec<String>,
}

/// headscale's `provider_identifier` of an OIDC user (its issuer and `sub` joined as a
/// URL path, `<issuer>/<sub>`) split back into issuer and subject, given the issuer
/// headscale used.
fn split_provider_identifier(identifier: &str, issuer: &str) -> Option<OidcIdentity> {
    let issuer = issuer.trim().trim_end_matches('/');
    let subject = identifier.trim().strip_prefix(issuer)?.strip_prefix('/')?;
    (!issuer.is_empty() && !subject.is_empty()).then(|| OidcIdentity {
        issuer: issuer.to_string(),
        subject: subject.to_string(),
    })
}

/// Reads headscale's database at `db_path` and Noise key at `noise_key_path` into a
/// tailnet; node addresses outside `prefixes` are refused (set `prefixes` in the config
/// to headscale's `prefixes` first). Users headscale's OIDC logins made keep their
/// identity when their `provider_identifier` is under `oidc_issuer` (headscale's
/// `oidc.issuer`); the others are reported.
pub fn from_headscale(
    db_path: &Path,
    noise_key_path: &Path,
    prefixes: &Prefixes,
    oidc_issuer: Option<&str>,
) -> Result<(Tailnet, Report), MigrateError> {
    let key_text = std::fs::read_to_string(noise_key_path).map_err(|e| MigrateError::NoiseKey {
        path: noise_key_path.display().to_string(),
        message: e.to_string(),
    })?;
    let control = ControlKey::parse(key_text.trim()).map_err(|message| MigrateError::NoiseKey {
        path: noise_key_path.display().to_string(),
        message,
    })?;
    if !db_path.is_file() {
        return Err(MigrateError::Open {
            path: db_path.display().to_string(),
            message: "no such file".into(),
        });
    }
    let db =
        Connection::open_with_flags(db_path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| {
            MigrateError::Open {
                path: db_path.display().to_string(),
                message: e.to_string(),
            }
        })?;
    let mut read = Reader::new(&db);
    read.users(oidc_issuer)?;
    read.preauth_keys()?;
    let policy = read.policy()?;
    let nodes = read.nodes(prefixes)?;
    let Reader {
        mut report,
        users,
        keys,
        ..
    } = read;
    report.users = users.len();
    report.nodes = nodes.len();
    let mut tailnet = Tailnet::from_records(
        users.into_values().collect(),
        keys.into_values().collect(),
        nodes,
        control.private_text(),
    );
    tailnet.policy = policy;
    Ok((tailnet, report))
}

/// One row of a table, by column name.
type Row = BTreeMap<String, Value>;

/// A headscale database being read, and what has been taken from it so far.
struct Reader<'a> {
    db: &'a Connection,
    report: Report,
    users: BTreeMap<u64, User>,
    /// The users' names here, each unique.
    taken_names: BTreeSet<String>,
    keys: BTreeMap<u64, PreAuthKey>,
    /// Every pre-auth key's tags, taken over or not: the nodes registered with it have them.
    key_tags: BTreeMap<u64, Vec<String>>,
}

/// A node as headscale had it, with the addresses it had (it may lack one family).
struct ReadNode {
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    node: Node,
}

/// What the nodes read so far hold that must stay unique: keys, addresses, given names.
#[derive(Default)]
struct Seen {
    keys: BTreeSet<String>,
    v4: BTreeSet<Ipv4Addr>,
    v6: BTreeSet<Ipv6Addr>,
    names: BTreeSet<String>,
}

impl<'a> Reader<'a> {
    fn new(db: &'a Connection) -> Self {
        Reader {
            db,
            report: Report::default(),
            users: BTreeMap::new(),
            taken_names: BTreeSet::new(),
            keys: BTreeMap::new(),
            key_tags: BTreeMap::new(),
        }
    }

    /// Users: deleted ones (soft-deleted by GORM) are left out with their nodes.
    fn users(&mut self, oidc_issuer: Option<&str>) -> Result<(), MigrateError> {
        for r in rows(
            self.db,
            "users",
            &[
                "id",
                "name",
                "display_name",
                "email",
                "profile_pic_url",
                "created_at",
                "provider_identifier",
            ],
        )? {
            let id = r["id"]
                .id()
                .ok_or_else(|| MigrateError::Invalid("user without id".into()))?;
            let original = r["name"]
                .text()
                .or(r["email"].text())
                .map(str::to_string)
                .unwrap_or_else(|| format!("user-{id}"));
            let name = unique_user_name(&original, id, &self.taken_names);
            if name != original {
                self.report
                    .renamed
                    .push(format!("user {original} -> {name}"));
            }
            self.taken_names.insert(name.clone());
            let (oidc, origin) = self.user_identity(&name, &r, oidc_issuer);
            self.users.insert(
                id,
                User {
                    id,
                    display_name: r["display_name"].text().unwrap_or(&name).to_string(),
                    name,
                    created: r["created_at"].time_ms()?.unwrap_or(0),
                    oidc,
                    origin,
                    profile: profile_of(&r),
                },
            );
        }
        Ok(())
    }

    /// An OIDC user keeps its identity when it can be read back; otherwise it is left for
    /// an administrator to link, never bound by its name or e-mail.
    fn user_identity(
        &mut self,
        name: &str,
        r: &Row,
        oidc_issuer: Option<&str>,
    ) -> (Option<OidcIdentity>, UserOrigin) {
        let Some(pid) = r["provider_identifier"].text() else {
            return (None, UserOrigin::Admin);
        };
        match oidc_issuer.and_then(|i| split_provider_identifier(pid, i)) {
            Some(identity) => {
                self.report.oidc_linked += 1;
                (Some(identity), UserOrigin::Oidc)
            }
            None => {
                self.report.oidc_unlinked.push(format!(
                    "{name}: its identity {pid:?} is not under the OIDC issuer {}; link it with `hydrascale users link --name {name} --issuer ISSUER --subject SUB`",
                    oidc_issuer.map_or_else(|| "(none given: --oidc-issuer or oidc.issuer)".to_string(), |i| format!("{i:?}"))
                ));
                (None, UserOrigin::Unrecorded)
            }
        }
    }

    /// Pre-auth keys: legacy keys are stored in plain text, so their SHA-256 is known and
    /// they keep working; bcrypt-hashed ones cannot be checked here, nor can API keys.
    fn preauth_keys(&mut self) -> Result<(), MigrateError> {
        for r in rows(
            self.db,
            "pre_auth_keys",
            &[
                "id",
                "key",
                "user_id",
                "reusable",
                "ephemeral",
                "used",
                "tags",
                "expiration",
                "created_at",
                "revoked",
            ],
        )? {
            let Some(id) = r["id"].id() else { continue };
            let tags = r["tags"].string_list()?;
            self.key_tags.insert(id, tags.clone());
            let Some(plain) = r["key"].text() else {
                self.report.preauth_keys_skipped += 1;
                continue;
            };
            let Some(user_id) = r["user_id"].id().filter(|u| self.users.contains_key(u)) else {
                self.report.preauth_keys_skipped += 1;
                continue;
            };
            let expiration = match (r["expiration"].time_ms()?, r["revoked"].time_ms()?) {
                (Some(e), Some(rv)) => Some(e.min(rv)),
                (e, rv) => e.or(rv),
            };
            self.keys.insert(
                id,
                PreAuthKey {
                    id,
                    user_id,
                    prefix: plain.chars().take(20).collect(),
                    hash: hex::encode(Sha256::digest(plain.as_bytes())),
                    reusable: r["reusable"].boolean(),
                    ephemeral: r["ephemeral"].boolean(),
                    used: r["used"].boolean(),
                    expiration,
                    created: r["created_at"].time_ms()?.unwrap_or(0),
                    tags,
                },
            );
        }
        self.report.preauth_keys = self.keys.len();
        self.report.api_keys_skipped = self
            .db
            .query_row("SELECT count(*) FROM api_keys", [], |r| r.get::<_, i64>(0))
            .map(|n| usize::try_from(n).unwrap_or(0))
            .unwrap_or(0);
        Ok(())
    }

    /// The policy, when headscale kept it in its database (policy.mode = "database"); a
    /// policy file on headscale's disk is set afterwards with `hydrascale policy set`.
    fn policy(&mut self) -> Result<Option<PolicyRecord>, MigrateError> {
        if columns(self.db, "policies")?.is_empty() {
            return Ok(None);
        }
        let Some(r) = rows(self.db, "policies", &["id", "updated_at", "data"])?.pop() else {
            return Ok(None);
        };
        let text = r["data"].text().unwrap_or_default().to_string();
        if text.trim().is_empty() {
            return Ok(None);
        }
        match crate::policy::parse(&text) {
            Ok(parsed) => {
                let updated = r["updated_at"].time_ms()?.unwrap_or(0);
                self.report.policy_taken = true;
                Ok(Some(PolicyRecord::new(text, updated, parsed)))
            }
            Err(e) => {
                self.report.policy_refused = Some(e.to_string());
                Ok(None)
            }
        }
    }

    /// The nodes, each with both address families.
    fn nodes(&mut self, prefixes: &Prefixes) -> Result<Vec<Node>, MigrateError> {
        let mut seen = Seen::default();
        let mut read = Vec::new();
        for r in rows(
            self.db,
            "nodes",
            &[
                "id",
                "machine_key",
                "node_key",
                "disco_key",
                "endpoints",
                "host_info",
                "ipv4",
                "ipv6",
                "hostname",
                "given_name",
                "user_id",
                "ephemeral",
                "tags",
                "forced_tags",
                "auth_key_id",
                "last_seen",
                "expiry",
                "approved_routes",
                "created_at",
                "register_method",
            ],
        )? {
            if let Some(n) = self.node(&r, &mut seen)? {
                seen.addresses(&n, prefixes)?;
                read.push(n);
            }
        }
        // Hydrascale gives every node both families; a node headscale gave only one gets a
        // free address of the other (its client picks it up with its next map).
        let mut done = Vec::new();
        for ReadNode {
            ipv4: v4,
            ipv6: v6,
            mut node,
        } in read
        {
            let id = node.id;
            (node.ipv4, node.ipv6) = match (v4, v6) {
                (Some(a4), Some(a6)) => (a4, a6),
                _ => {
                    let (free4, free6) = crate::state::ipam::allocate(prefixes, &seen.v4, &seen.v6)
                        .ok_or_else(|| {
                            MigrateError::Invalid(format!("node {id}: address space exhausted"))
                        })?;
                    (v4.unwrap_or(free4), v6.unwrap_or(free6))
                }
            };
            seen.v4.insert(node.ipv4);
            seen.v6.insert(node.ipv6);
            done.push(node);
        }
        Ok(done)
    }

    /// One row of `nodes`; none for a node whose user headscale deleted.
    fn node(&mut self, r: &Row, seen: &mut Seen) -> Result<Option<ReadNode>, MigrateError> {
        let id = r["id"]
            .id()
            .ok_or_else(|| MigrateError::Invalid("node without id".into()))?;
        let field = |name: &str| -> Result<String, MigrateError> {
            r[name]
                .text()
                .map(str::to_string)
                .ok_or_else(|| MigrateError::Invalid(format!("node {id} has no {name}")))
        };
        let machine_key = field("machine_key")?;
        let node_key = field("node_key")?;
        seen.keys(id, &machine_key, &node_key)?;
        let ipv4: Option<Ipv4Addr> = r["ipv4"]
            .text()
            .map(str::parse)
            .transpose()
            .map_err(|e| MigrateError::Invalid(format!("node {id}: IPv4 address: {e}")))?;
        let ipv6: Option<Ipv6Addr> = r["ipv6"]
            .text()
            .map(str::parse)
            .transpose()
            .map_err(|e| MigrateError::Invalid(format!("node {id}: IPv6 address: {e}")))?;
        let auth_key_id = r["auth_key_id"].id();
        let tags = self.node_tags(r, auth_key_id)?;
        let user_id = match r["user_id"].id() {
            Some(u) if self.users.contains_key(&u) => u,
            // A user deleted in headscale takes its nodes with it (ON DELETE CASCADE).
            Some(_) => return Ok(None),
            None if !tags.is_empty() => {
                tagged_owner(&mut self.users, &mut self.taken_names, &mut self.report)
            }
            None => {
                return Err(MigrateError::Invalid(format!(
                    "node {id} has neither a user nor tags"
                )))
            }
        };
        let mut approved_routes = Vec::new();
        for route in r["approved_routes"].string_list()? {
            match route.parse::<ipnet::IpNet>() {
                Ok(net) => approved_routes.push(net.trunc()),
                Err(_) => self
                    .report
                    .nodes_with_routes_skipped
                    .push(format!("{} ({route})", field("hostname")?)),
            }
        }
        let hostinfo = r["host_info"]
            .text()
            .filter(|h| *h != "null")
            .unwrap_or("{}")
            .to_string();
        let hostname = r["hostname"].text().unwrap_or("node").to_string();
        let wanted = r["given_name"].text().unwrap_or(&hostname).to_string();
        let given = seen.given_name(&wanted, &mut self.report);
        let ephemeral = r["ephemeral"].boolean()
            || auth_key_id
                .and_then(|k| self.keys.get(&k))
                .is_some_and(|k| k.ephemeral);
        let node = Node {
            id,
            stable_id: String::new(),
            machine_key,
            node_key,
            disco_key: r["disco_key"].text().unwrap_or_default().to_string(),
            user_id,
            tags,
            hostname,
            given_name: given,
            ipv4: Ipv4Addr::UNSPECIFIED,
            ipv6: Ipv6Addr::UNSPECIFIED,
            endpoints: r["endpoints"].string_list()?,
            home_derp: 0,
            advertised_routes: crate::state::routes_in_hostinfo(&hostinfo),
            approved_routes,
            hostinfo,
            created: r["created_at"].time_ms()?.unwrap_or(0),
            last_seen: r["last_seen"].time_ms()?,
            expiry: r["expiry"].time_ms()?,
            ephemeral,
            auth_key_id: auth_key_id.filter(|k| self.keys.contains_key(k)),
            online: false,
            online_via: None,
            register_method: match r["register_method"].text() {
                Some("authkey") => crate::state::RegisterMethod::AuthKey,
                Some("cli") => crate::state::RegisterMethod::Cli,
                Some("oidc") => crate::state::RegisterMethod::Oidc,
                _ => crate::state::RegisterMethod::Unrecorded,
            },
        };
        Ok(Some(ReadNode { ipv4, ipv6, node }))
    }

    /// A node's tags and forced tags, or, with neither, those of the key it registered with.
    fn node_tags(&self, r: &Row, auth_key_id: Option<u64>) -> Result<Vec<String>, MigrateError> {
        let mut tags = r["tags"].string_list()?;
        for t in r["forced_tags"].string_list()? {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        if tags.is_empty() {
            if let Some(k) = auth_key_id.and_then(|k| self.key_tags.get(&k)) {
                tags = k.clone();
            }
        }
        Ok(tags)
    }
}

impl Seen {
    /// Node `id`'s keys: well-formed, and no other node's.
    fn keys(&mut self, id: u64, machine_key: &str, node_key: &str) -> Result<(), MigrateError> {
        for (k, prefix) in [(machine_key, "mkey:"), (node_key, "nodekey:")] {
            if !k.starts_with(prefix) {
                return Err(MigrateError::Invalid(format!(
                    "node {id}: {k:?} is not a {prefix}<hex> key"
                )));
            }
            if !self.keys.insert(k.to_string()) {
                return Err(MigrateError::Invalid(format!(
                    "node {id}: key {k} belongs to two nodes"
                )));
            }
        }
        Ok(())
    }

    /// The node's addresses: inside `prefixes`, and no other node's.
    fn addresses(&mut self, n: &ReadNode, prefixes: &Prefixes) -> Result<(), MigrateError> {
        let id = n.node.id;
        if let Some(a) = n.ipv4 {
            if !prefixes.v4.contains(&a) || !self.v4.insert(a) {
                return Err(MigrateError::Invalid(format!(
                    "node {id}: {a} is outside prefixes.v4 {} or used twice; set prefixes.v4 to headscale's prefixes.v4",
                    prefixes.v4
                )));
            }
        }
        if let Some(a) = n.ipv6 {
            if !prefixes.v6.contains(&a) || !self.v6.insert(a) {
                return Err(MigrateError::Invalid(format!(
                    "node {id}: {a} is outside prefixes.v6 {} or used twice; set prefixes.v6 to headscale's prefixes.v6",
                    prefixes.v6
                )));
            }
        }
        Ok(())
    }

    /// `wanted` as a DNS label no node read so far has (reported when it changed).
    fn given_name(&mut self, wanted: &str, report: &mut Report) -> String {
        let mut given = if valid_label(wanted) {
            wanted.to_string()
        } else {
            sanitize_hostname(wanted)
        };
        if self.names.contains(&given) {
            given = (1u64..)
                .map(|i| format!("{given}-{i}"))
                .find(|c| !self.names.contains(c))
                .unwrap_or(given);
        }
        if given != wanted {
            report.renamed.push(format!("node {wanted} -> {given}"));
        }
        self.names.insert(given.clone());
        given
    }
}

fn unique_user_name(original: &str, id: u64, taken: &BTreeSet<String>) -> String {
    let mut name: String = original
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@') {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(63);
    if !valid_user_name(&name) {
        name = format!("user-{id}");
    }
    if taken.contains(&name) {
        name = format!("{}-{id}", &name[..name.len().min(50)]);
    }
    name
}

/// The user that owns headscale's tagged nodes here (Hydrascale nodes belong to a user).
fn tagged_owner(
    users: &mut BTreeMap<u64, User>,
    taken: &mut BTreeSet<String>,
    report: &mut Report,
) -> u64 {
    if let Some(name) = &report.tagged_owner {
        if let Some(u) = users.values().find(|u| &u.name == name) {
            return u.id;
        }
    }
    let id = users.keys().max().copied().unwrap_or(0) + 1;
    let name = unique_user_name("tagged-devices", id, taken);
    taken.insert(name.clone());
    users.insert(
        id,
        User {
            id,
            name: name.clone(),
            display_name: "Tagged devices (from headscale)".into(),
            created: 0,
            oidc: None,
            origin: UserOrigin::Admin,
            profile: Default::default(),
        },
    );
    report.tagged_owner = Some(name);
    id
}

/// headscale's `email` and `profile_pic_url`, each kept only if the state would take it.
fn profile_of(r: &Row) -> crate::state::Profile {
    use crate::state::Profile;
    Profile {
        email: r["email"]
            .text()
            .and_then(Profile::checked_email)
            .unwrap_or_default(),
        picture_url: r["profile_pic_url"]
            .text()
            .and_then(Profile::checked_picture_url)
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::split_provider_identifier;

    #[test]
    fn provider_identifiers_split_under_their_issuer() {
        let id = |i: &str, s: &str| {
            Some(crate::state::OidcIdentity {
                issuer: i.into(),
                subject: s.into(),
            })
        };
        let i = "https://idp.example/realms/x";
        assert_eq!(
            split_provider_identifier("https://idp.example/realms/x/abc-1", i),
            id(i, "abc-1")
        );
        assert_eq!(
            split_provider_identifier("https://idp.example/realms/x/abc-1", &format!("{i}/")),
            id(i, "abc-1")
        );
        // Another issuer's identity, or a prefix that is not a path segment, is not split.
        assert_eq!(
            split_provider_identifier("https://evil.example/abc", i),
            None
        );
        assert_eq!(
            split_provider_identifier("https://idp.example/realms/xy/abc", i),
            None
        );
        assert_eq!(split_provider_identifier(i, i), None);
    }
}
