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

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use crate::noise::ControlKey;
use crate::state::{
    sanitize_hostname, valid_label, valid_user_name, Node, OidcIdentity, PolicyRecord, PreAuthKey,
    Prefixes, Tailnet, User, UserOrigin,
};

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

/// Column names of `table`, to read every schema version headscale has had since 0.23.
fn columns(db: &Connection, table: &str) -> Result<BTreeSet<String>, MigrateError> {
    let mut stmt = db.prepare(&format!("PRAGMA table_info({table})"))?;
    let cols = stmt
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<Result<_, _>>()?;
    Ok(cols)
}

/// `SELECT` of `wanted` from `table`, with NULL for columns this schema lacks, leaving
/// out rows GORM soft-deleted; rows as maps from column name to value.
fn rows(
    db: &Connection,
    table: &str,
    wanted: &[&str],
) -> Result<Vec<BTreeMap<String, Value>>, MigrateError> {
    let have = columns(db, table)?;
    if have.is_empty() {
        return Err(MigrateError::Query(format!("no table {table}")));
    }
    let select: Vec<String> = wanted
        .iter()
        .map(|c| {
            if have.contains(*c) {
                format!("\"{c}\"")
            } else {
                "NULL".into()
            }
        })
        .collect();
    let live = if have.contains("deleted_at") {
        " WHERE deleted_at IS NULL"
    } else {
        ""
    };
    let mut stmt = db.prepare(&format!(
        "SELECT {} FROM {table}{live} ORDER BY id",
        select.join(", ")
    ))?;
    let out = stmt
        .query_map([], |r| {
            let mut m = BTreeMap::new();
            for (i, c) in wanted.iter().enumerate() {
                m.insert((*c).to_string(), Value::from(r.get_ref(i)?));
            }
            Ok(m)
        })?
        .collect::<Result<_, _>>()?;
    Ok(out)
}

/// A column value, as SQLite stores headscale's GORM fields.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl From<ValueRef<'_>> for Value {
    fn from(v: ValueRef<'_>) -> Self {
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Int(i),
            ValueRef::Real(f) => Value::Int(f as i64),
            ValueRef::Text(t) | ValueRef::Blob(t) => {
                Value::Text(String::from_utf8_lossy(t).into_owned())
            }
        }
    }
}

impl Value {
    fn text(&self) -> Option<&str> {
        match self {
            Value::Text(t) if !t.is_empty() => Some(t),
            _ => None,
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Text(t) => t.parse().ok(),
            Value::Null => None,
        }
    }

    fn id(&self) -> Option<u64> {
        self.int().and_then(|i| u64::try_from(i).ok())
    }

    fn boolean(&self) -> bool {
        match self {
            Value::Int(i) => *i != 0,
            Value::Text(t) => matches!(t.as_str(), "1" | "true" | "TRUE" | "t"),
            Value::Null => false,
        }
    }

    /// A GORM time (`2006-01-02 15:04:05.999999999-07:00` and variants) as Unix
    /// milliseconds; NULL and Go's zero time are `None`.
    fn time_ms(&self) -> Result<Option<i64>, MigrateError> {
        let Some(text) = self.text() else {
            return Ok(self.int().map(|s| s.saturating_mul(1000)));
        };
        parse_time_ms(text)
            .map_err(|e| MigrateError::Invalid(format!("unreadable time {text:?}: {e}")))
    }

    /// A JSON column (GORM's `serializer:json`) as a list of strings; NULL and `null` are empty.
    fn string_list(&self) -> Result<Vec<String>, MigrateError> {
        match self.text() {
            None | Some("null") => Ok(Vec::new()),
            Some(t) => serde_json::from_str::<Option<Vec<String>>>(t)
                .map(Option::unwrap_or_default)
                .map_err(|e| MigrateError::Invalid(format!("unreadable list {t:?}: {e}"))),
        }
    }
}

fn parse_time_ms(text: &str) -> Result<Option<i64>, String> {
    use time::format_description::well_known::Rfc3339;
    let t = text.trim();
    // `2006-01-02 15:04:05.999 -0700 MST` (Go's String form) and `... +00:00`.
    let t = t.split(" +0000 UTC").next().unwrap_or(t);
    let mut s = t.replacen(' ', "T", 1);
    s = s.replace(' ', "");
    let has_offset = s.ends_with('Z') || {
        let tail = s.rsplit('T').next().unwrap_or("");
        tail.contains('+') || tail.contains('-')
    };
    if !has_offset {
        s.push('Z');
    }
    let dt = time::OffsetDateTime::parse(&s, &Rfc3339).map_err(|e| e.to_string())?;
    if dt.year() <= 1 {
        return Ok(None);
    }
    Ok(Some(
        i64::try_from(dt.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
    ))
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
    let mut report = Report::default();

    // Users: deleted ones (soft-deleted by GORM) are left out with their nodes.
    let mut users: BTreeMap<u64, User> = BTreeMap::new();
    let mut taken_names = BTreeSet::new();
    for r in rows(
        &db,
        "users",
        &[
            "id",
            "name",
            "display_name",
            "email",
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
        let name = unique_user_name(&original, id, &taken_names);
        if name != original {
            report.renamed.push(format!("user {original} -> {name}"));
        }
        taken_names.insert(name.clone());
        // An OIDC user keeps its identity when it can be read back; otherwise it is left
        // for an administrator to link, never bound by its name or e-mail.
        let (oidc, origin) = match r["provider_identifier"].text() {
            None => (None, UserOrigin::Admin),
            Some(pid) => match oidc_issuer.and_then(|i| split_provider_identifier(pid, i)) {
                Some(identity) => {
                    report.oidc_linked += 1;
                    (Some(identity), UserOrigin::Oidc)
                }
                None => {
                    report.oidc_unlinked.push(format!(
                        "{name}: its identity {pid:?} is not under the OIDC issuer {}; link it with `hydrascale users link --name {name} --issuer ISSUER --subject SUB`",
                        oidc_issuer.map_or_else(|| "(none given: --oidc-issuer or oidc.issuer)".to_string(), |i| format!("{i:?}"))
                    ));
                    (None, UserOrigin::Unrecorded)
                }
            },
        };
        users.insert(
            id,
            User {
                id,
                display_name: r["display_name"].text().unwrap_or(&name).to_string(),
                name,
                created: r["created_at"].time_ms()?.unwrap_or(0),
                oidc,
                origin,
            },
        );
    }

    // Pre-auth keys: legacy keys are stored in plain text, so their SHA-256 is known and
    // they keep working; bcrypt-hashed ones cannot be checked here.
    let mut keys: BTreeMap<u64, PreAuthKey> = BTreeMap::new();
    let mut key_tags: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for r in rows(
        &db,
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
        key_tags.insert(id, r["tags"].string_list()?);
        let Some(plain) = r["key"].text() else {
            report.preauth_keys_skipped += 1;
            continue;
        };
        let Some(user_id) = r["user_id"].id().filter(|u| users.contains_key(u)) else {
            report.preauth_keys_skipped += 1;
            continue;
        };
        let expiration = match (r["expiration"].time_ms()?, r["revoked"].time_ms()?) {
            (Some(e), Some(rv)) => Some(e.min(rv)),
            (e, rv) => e.or(rv),
        };
        keys.insert(
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
                tags: key_tags[&id].clone(),
            },
        );
    }
    report.preauth_keys = keys.len();
    report.api_keys_skipped = db
        .query_row("SELECT count(*) FROM api_keys", [], |r| r.get::<_, i64>(0))
        .map(|n| usize::try_from(n).unwrap_or(0))
        .unwrap_or(0);
    // The policy, when headscale kept it in its database (policy.mode = "database"); a
    // policy file on headscale's disk is set afterwards with `hydrascale policy set`.
    let mut policy = None;
    if !columns(&db, "policies")?.is_empty() {
        if let Some(r) = rows(&db, "policies", &["id", "updated_at", "data"])?.pop() {
            let text = r["data"].text().unwrap_or_default().to_string();
            if !text.trim().is_empty() {
                match crate::policy::parse(&text) {
                    Ok(parsed) => {
                        let updated = r["updated_at"].time_ms()?.unwrap_or(0);
                        policy = Some(PolicyRecord::new(text, updated, parsed));
                        report.policy_taken = true;
                    }
                    Err(e) => report.policy_refused = Some(e.to_string()),
                }
            }
        }
    }

    // Nodes.
    let mut nodes = Vec::new();
    let mut seen_keys = BTreeSet::new();
    let mut seen_v4 = BTreeSet::new();
    let mut seen_v6 = BTreeSet::new();
    let mut given_names = BTreeSet::new();
    for r in rows(
        &db,
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
        ],
    )? {
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
        for (k, prefix) in [(&machine_key, "mkey:"), (&node_key, "nodekey:")] {
            if !k.starts_with(prefix) {
                return Err(MigrateError::Invalid(format!(
                    "node {id}: {k:?} is not a {prefix}<hex> key"
                )));
            }
            if !seen_keys.insert(k.clone()) {
                return Err(MigrateError::Invalid(format!(
                    "node {id}: key {k} belongs to two nodes"
                )));
            }
        }
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
        let mut tags = r["tags"].string_list()?;
        for t in r["forced_tags"].string_list()? {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let auth_key_id = r["auth_key_id"].id();
        if tags.is_empty() {
            if let Some(k) = auth_key_id.and_then(|k| key_tags.get(&k)) {
                tags = k.clone();
            }
        }
        let user_id = match r["user_id"].id() {
            Some(u) if users.contains_key(&u) => u,
            // A user deleted in headscale takes its nodes with it (ON DELETE CASCADE).
            Some(_) => continue,
            None if !tags.is_empty() => tagged_owner(&mut users, &mut taken_names, &mut report),
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
                Err(_) => report
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
        let mut given = if valid_label(&wanted) {
            wanted.clone()
        } else {
            sanitize_hostname(&wanted)
        };
        if given_names.contains(&given) {
            given = (1u64..)
                .map(|i| format!("{given}-{i}"))
                .find(|c| !given_names.contains(c))
                .unwrap_or(given);
        }
        if given != wanted {
            report.renamed.push(format!("node {wanted} -> {given}"));
        }
        given_names.insert(given.clone());
        let ephemeral = r["ephemeral"].boolean()
            || auth_key_id
                .and_then(|k| keys.get(&k))
                .is_some_and(|k| k.ephemeral);
        nodes.push((
            id,
            ipv4,
            ipv6,
            Node {
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
                auth_key_id: auth_key_id.filter(|k| keys.contains_key(k)),
                online: false,
                online_via: None,
            },
        ));
        if let Some(a) = ipv4 {
            if !prefixes.v4.contains(&a) || !seen_v4.insert(a) {
                return Err(MigrateError::Invalid(format!(
                    "node {id}: {a} is outside prefixes.v4 {} or used twice; set prefixes.v4 to headscale's prefixes.v4",
                    prefixes.v4
                )));
            }
        }
        if let Some(a) = ipv6 {
            if !prefixes.v6.contains(&a) || !seen_v6.insert(a) {
                return Err(MigrateError::Invalid(format!(
                    "node {id}: {a} is outside prefixes.v6 {} or used twice; set prefixes.v6 to headscale's prefixes.v6",
                    prefixes.v6
                )));
            }
        }
    }
    // Hydrascale gives every node both families; a node headscale gave only one gets a
    // free address of the other (its client picks it up with its next map).
    let mut done = Vec::new();
    for (id, v4, v6, mut node) in nodes {
        (node.ipv4, node.ipv6) = match (v4, v6) {
            (Some(a4), Some(a6)) => (a4, a6),
            _ => {
                let (free4, free6) = crate::state::ipam::allocate(prefixes, &seen_v4, &seen_v6)
                    .ok_or_else(|| {
                        MigrateError::Invalid(format!("node {id}: address space exhausted"))
                    })?;
                (v4.unwrap_or(free4), v6.unwrap_or(free6))
            }
        };
        seen_v4.insert(node.ipv4);
        seen_v6.insert(node.ipv6);
        done.push(node);
    }
    report.users = users.len();
    report.nodes = done.len();
    let mut tailnet = Tailnet::from_records(
        users.into_values().collect(),
        keys.into_values().collect(),
        done,
        control.private_text(),
    );
    tailnet.policy = policy;
    Ok((tailnet, report))
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
        },
    );
    report.tagged_owner = Some(name);
    id
}

#[cfg(test)]
mod tests {
    use super::{parse_time_ms, split_provider_identifier};

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

    #[test]
    fn gorm_times_parse() {
        let ms = |s| parse_time_ms(s).expect(s);
        assert_eq!(ms("2026-11-27 15:30:00+00:00"), Some(1_795_793_400_000));
        assert_eq!(ms("2026-11-27 15:30:00.5+00:00"), Some(1_795_793_400_500));
        assert_eq!(ms("2026-11-27T16:30:00+01:00"), Some(1_795_793_400_000));
        assert_eq!(ms("2026-11-27 15:30:00"), Some(1_795_793_400_000));
        assert_eq!(
            ms("2026-11-27 15:30:00.123456789 +0000 UTC"),
            Some(1_795_793_400_123)
        );
        assert_eq!(ms("0001-01-01 00:00:00+00:00"), None);
        assert!(parse_time_ms("yesterday").is_err());
    }
}
