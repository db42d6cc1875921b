//! The subset of Tailscale's `tailcfg` JSON types that the control protocol exchanges.
//!
//! Field names follow Go's JSON encoding (`PascalCase` unless the Go tag says otherwise).
//! Incoming types are lenient (unknown fields ignored, most fields optional) because
//! clients add fields over time; outgoing types omit what Go would omit.
//!
//! A leaf: it knows the wire only, nothing of the control plane, the map plane or state.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// RFC 3339 text of a unix-millisecond time, as `tailcfg` carries times (`Created`,
/// `KeyExpiry`, `LastSeen`); out-of-range times show as the unix epoch.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RegisterRequest {
    #[serde(rename = "Version")]
    pub version: i64,
    #[serde(rename = "NodeKey")]
    pub node_key: String,
    #[serde(rename = "OldNodeKey")]
    pub old_node_key: String,
    #[serde(rename = "Auth")]
    pub auth: Option<RegisterAuth>,
    #[serde(rename = "Expiry")]
    pub expiry: Option<String>,
    #[serde(rename = "Followup")]
    pub followup: String,
    #[serde(rename = "Hostinfo")]
    pub hostinfo: Option<Value>,
    #[serde(rename = "Ephemeral")]
    pub ephemeral: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RegisterAuth {
    #[serde(rename = "AuthKey")]
    pub auth_key: String,
}

#[derive(Debug, Default, Serialize)]
pub struct RegisterResponse {
    #[serde(rename = "User")]
    pub user: RegisterUser,
    #[serde(rename = "Login")]
    pub login: Login,
    #[serde(rename = "NodeKeyExpired")]
    pub node_key_expired: bool,
    #[serde(rename = "MachineAuthorized")]
    pub machine_authorized: bool,
    #[serde(rename = "AuthURL")]
    pub auth_url: String,
    #[serde(rename = "NodeKeySignature")]
    pub node_key_signature: Option<String>,
    #[serde(rename = "Error")]
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct RegisterUser {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "DisplayName")]
    pub display_name: String,
    #[serde(rename = "ProfilePicURL")]
    pub profile_pic_url: String,
    #[serde(rename = "Created")]
    pub created: String,
}

impl Default for RegisterUser {
    /// Go parses `Created` as a time even in error replies, so it is the zero time, not "".
    fn default() -> Self {
        Self {
            id: 0,
            display_name: String::new(),
            profile_pic_url: String::new(),
            created: "0001-01-01T00:00:00Z".into(),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Login {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "Provider")]
    pub provider: String,
    #[serde(rename = "LoginName")]
    pub login_name: String,
    #[serde(rename = "DisplayName")]
    pub display_name: String,
    #[serde(rename = "ProfilePicURL")]
    pub profile_pic_url: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MapRequest {
    #[serde(rename = "Version")]
    pub version: i64,
    #[serde(rename = "Compress")]
    pub compress: String,
    #[serde(rename = "KeepAlive")]
    pub keep_alive: bool,
    #[serde(rename = "NodeKey")]
    pub node_key: String,
    #[serde(rename = "DiscoKey")]
    pub disco_key: String,
    #[serde(rename = "Stream")]
    pub stream: bool,
    #[serde(rename = "Hostinfo")]
    pub hostinfo: Option<Value>,
    #[serde(rename = "Endpoints")]
    pub endpoints: Option<Vec<String>>,
    #[serde(rename = "OmitPeers")]
    pub omit_peers: bool,
}

/// `tailcfg.Node`: a node as its peers (and the node itself) see it. Rendered into a
/// [`Value`] once per change (see `mapper::peers`), so it carries only what Go would not
/// omit.
#[derive(Debug, Serialize)]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "StableID")]
    pub stable_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "User")]
    pub user: u64,
    #[serde(rename = "Key")]
    pub key: String,
    #[serde(rename = "KeyExpiry", skip_serializing_if = "Option::is_none")]
    pub key_expiry: Option<String>,
    /// Set when the key has expired by the renderer's clock.
    #[serde(rename = "Expired", skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
    #[serde(rename = "Machine")]
    pub machine: String,
    #[serde(rename = "DiscoKey", skip_serializing_if = "String::is_empty")]
    pub disco_key: String,
    #[serde(rename = "Addresses")]
    pub addresses: Vec<String>,
    #[serde(rename = "AllowedIPs")]
    pub allowed_ips: Vec<String>,
    #[serde(rename = "Endpoints")]
    pub endpoints: Vec<String>,
    #[serde(rename = "HomeDERP", skip_serializing_if = "Option::is_none")]
    pub home_derp: Option<i32>,
    /// The legacy form of `HomeDERP` (`127.3.3.40:<region>`), for older clients.
    #[serde(rename = "DERP", skip_serializing_if = "Option::is_none")]
    pub derp: Option<String>,
    /// The client's own `Hostinfo`, passed on as it sent it.
    #[serde(rename = "Hostinfo")]
    pub hostinfo: Value,
    #[serde(rename = "Created")]
    pub created: String,
    #[serde(rename = "Tags", skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(rename = "PrimaryRoutes")]
    pub primary_routes: Vec<String>,
    /// Only while offline.
    #[serde(rename = "LastSeen", skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(rename = "Online")]
    pub online: bool,
    #[serde(rename = "MachineAuthorized")]
    pub machine_authorized: bool,
    #[serde(rename = "CapMap")]
    pub cap_map: BTreeMap<String, Vec<Value>>,
}

/// `tailcfg.UserProfile`.
#[derive(Debug, Serialize)]
pub struct UserProfile {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "LoginName")]
    pub login_name: String,
    #[serde(rename = "DisplayName")]
    pub display_name: String,
}

/// `tailcfg.DNSConfig`. Exactly one of `Resolvers` (override the node's own DNS) and
/// `FallbackResolvers` is sent, even when empty.
#[derive(Debug, Serialize)]
pub struct DnsConfig {
    #[serde(rename = "Resolvers", skip_serializing_if = "Option::is_none")]
    pub resolvers: Option<Vec<DnsResolver>>,
    #[serde(rename = "FallbackResolvers", skip_serializing_if = "Option::is_none")]
    pub fallback_resolvers: Option<Vec<DnsResolver>>,
    /// Split DNS: resolvers per domain.
    #[serde(rename = "Routes", skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, Vec<DnsResolver>>,
    #[serde(rename = "Domains")]
    pub domains: Vec<String>,
    /// MagicDNS.
    #[serde(rename = "Proxied")]
    pub proxied: bool,
    #[serde(rename = "ExtraRecords", skip_serializing_if = "Vec::is_empty")]
    pub extra_records: Vec<DnsRecord>,
}

/// `dnstype.Resolver`.
#[derive(Debug, Serialize)]
pub struct DnsResolver {
    #[serde(rename = "Addr")]
    pub addr: String,
}

/// `tailcfg.DNSRecord`.
#[derive(Debug, Serialize)]
pub struct DnsRecord {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Type")]
    pub record_type: String,
    #[serde(rename = "Value")]
    pub value: String,
}

/// `tailcfg.Debug`; only its `DisableLogTail` is sent (the client then uploads no logs
/// to Tailscale's log service for the rest of its process's life).
#[derive(Debug, Serialize)]
pub struct DebugSettings {
    #[serde(rename = "DisableLogTail")]
    pub disable_log_tail: bool,
}

/// One message of the map stream. Every field is optional: absent means "unchanged".
#[derive(Debug, Default, Serialize)]
pub struct MapResponse {
    #[serde(rename = "KeepAlive", skip_serializing_if = "std::ops::Not::not")]
    pub keep_alive: bool,
    #[serde(rename = "Node", skip_serializing_if = "Option::is_none")]
    pub node: Option<Value>,
    #[serde(rename = "DERPMap", skip_serializing_if = "Option::is_none")]
    pub derp_map: Option<Value>,
    /// `Peers`: written by [`encode`] from each peer's text, not by serde.
    #[serde(skip)]
    pub peers: Option<Vec<Shared>>,
    /// `PeersChanged`, likewise.
    #[serde(skip)]
    pub peers_changed: Option<Vec<Shared>>,
    /// `PeersRemoved`: written by [`encode`] as one text, which a long list removed from
    /// many maps at once shares between them (see [`encode_pieces_with`]).
    #[serde(skip)]
    pub peers_removed: Option<Vec<u64>>,
    #[serde(rename = "PeersChangedPatch", skip_serializing_if = "Option::is_none")]
    pub peers_changed_patch: Option<Vec<Value>>,
    #[serde(rename = "DNSConfig", skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<DnsConfig>,
    #[serde(rename = "Domain", skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// `PacketFilter`: written by [`encode`] from its parts' text, not by serde.
    #[serde(skip)]
    pub packet_filter: Option<PacketFilter>,
    #[serde(rename = "SSHPolicy", skip_serializing_if = "Option::is_none")]
    pub ssh_policy: Option<Value>,
    #[serde(rename = "UserProfiles", skip_serializing_if = "Option::is_none")]
    pub user_profiles: Option<Vec<UserProfile>>,
    #[serde(rename = "CollectServices", skip_serializing_if = "Option::is_none")]
    pub collect_services: Option<bool>,
    #[serde(rename = "ControlTime", skip_serializing_if = "Option::is_none")]
    pub control_time: Option<String>,
    #[serde(rename = "Debug", skip_serializing_if = "Option::is_none")]
    pub debug: Option<DebugSettings>,
}

/// `tailcfg.DERPMap` with one self-hosted region per cluster.
#[derive(Debug, Clone, Serialize)]
pub struct DerpMap {
    #[serde(rename = "Regions")]
    pub regions: BTreeMap<String, DerpRegion>,
    #[serde(rename = "omitDefaultRegions")]
    pub omit_default_regions: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DerpRegion {
    #[serde(rename = "RegionID")]
    pub region_id: i32,
    #[serde(rename = "RegionCode")]
    pub region_code: String,
    #[serde(rename = "RegionName")]
    pub region_name: String,
    #[serde(rename = "Nodes")]
    pub nodes: Vec<DerpNode>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DerpNode {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "RegionID")]
    pub region_id: i32,
    #[serde(rename = "HostName")]
    pub host_name: String,
    /// The name the relay's TLS certificate is checked against when it is not
    /// `HostName` (a replica dialled at its own address serving the cluster's name).
    #[serde(rename = "CertName", skip_serializing_if = "Option::is_none")]
    pub cert_name: Option<String>,
    #[serde(rename = "IPv4", skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(rename = "IPv6", skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    #[serde(rename = "STUNPort")]
    pub stun_port: i32,
    #[serde(rename = "DERPPort")]
    pub derp_port: u16,
    #[serde(
        rename = "InsecureForTests",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub insecure_for_tests: bool,
    #[serde(rename = "STUNTestIP", skip_serializing_if = "Option::is_none")]
    pub stun_test_ip: Option<String>,
}

/// A node's packet filter (`[]tailcfg.FilterRule`) as JSON text in parts. A rule's
/// sources are the same text in the filter of every node the rule applies to, made once
/// per state and shared (a rule naming every member of a tailnet of 10,000 nodes can be
/// thousands of addresses and ranges); only the destinations are the node's own. So a
/// policy change costs each map stream its destinations, not a copy of every source list,
/// and the frame cache compresses each shared source list once for all streams.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PacketFilter(pub Vec<FilterRule>);

#[derive(Debug, Clone, PartialEq)]
pub struct FilterRule {
    /// The `SrcIPs` array's JSON text.
    pub src: Arc<str>,
    /// The members after it, each with its leading comma: `,"DstPorts":[...]` and, when
    /// the rule names protocols, `,"IPProto":[...]`.
    pub rest: String,
}

impl PacketFilter {
    /// The filter that lets everything in, sent when there is no policy: without any rule
    /// the client drops all inbound traffic.
    pub fn allow_all() -> Self {
        PacketFilter(vec![FilterRule {
            src: Arc::from(r#"["*"]"#),
            rest: r#","DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}]"#.into(),
        }])
    }

    /// The filter as a JSON value (for tests and debugging; streams send the text).
    pub fn to_value(&self) -> Value {
        let mut own = Vec::new();
        let mut pieces = Vec::new();
        self.write_pieces(&mut own, &mut pieces);
        pieces.push(Piece::Own(own));
        let mut text = Vec::new();
        for p in &pieces {
            p.write(&mut text);
        }
        serde_json::from_slice(&text).unwrap_or(Value::Null)
    }

    /// Appends the filter's JSON array: its own text to `own`, and each source list as a
    /// [`Piece::Run`] of its one text (the frame encoder inlines short ones).
    fn write_pieces(&self, own: &mut Vec<u8>, pieces: &mut Vec<Piece>) {
        own.push(b'[');
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                own.push(b',');
            }
            own.extend_from_slice(b"{\"SrcIPs\":");
            pieces.push(Piece::Own(std::mem::take(own)));
            pieces.push(Piece::Run {
                peers: vec![r.src.clone()],
                comma: false,
            });
            own.extend_from_slice(r.rest.as_bytes());
            own.push(b'}');
        }
        own.push(b']');
    }
}

/// A peer as every map stream sends it: its `tailcfg.Node` and that value's JSON text,
/// both made once and shared, so a full map of N peers is N copies of text, not N
/// serializations; and its node id (`ID`, `u64::MAX` if it has none), which cuts
/// messages into runs without a lookup in the value for every peer of every full map.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared(pub std::sync::Arc<Value>, pub std::sync::Arc<str>, pub u64);

impl Shared {
    pub fn new(v: Value) -> Self {
        let text = serde_json::to_string(&v).unwrap_or_else(|_| "{}".into());
        let id = v.get("ID").and_then(Value::as_u64).unwrap_or(u64::MAX);
        Shared(std::sync::Arc::new(v), text.into(), id)
    }
}

/// Node ids per run of peers (see [`Piece::Run`]). Runs are cut by id, not by position,
/// so that one peer more or less (a newcomer leaves itself out of its own map) changes
/// only the run it falls in.
pub const RUN_IDS: u64 = 64;

/// A part of a map message's JSON text, in order.
#[derive(Debug)]
pub enum Piece {
    /// Text of this message alone.
    Own(Vec<u8>),
    /// The peers of one block of [`RUN_IDS`] ids: their texts, joined by commas, and a
    /// comma after them when more peers follow. The same in every message that sends the
    /// same peers in the same versions, whoever it is for, which is what lets it be
    /// compressed once for many streams. A packet filter rule's source list (see
    /// [`PacketFilter`]) is a run of one text, shared the same way.
    Run { peers: Vec<Arc<str>>, comma: bool },
}

impl Piece {
    /// Appends this piece's text to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Piece::Own(b) => out.extend_from_slice(b),
            Piece::Run { peers, comma } => write_run(peers, *comma, out),
        }
    }
}

/// Appends the text of a run: the peers' texts joined by commas, and one after them when
/// `comma`.
pub fn write_run(peers: &[Arc<str>], comma: bool, out: &mut Vec<u8>) {
    for (i, p) in peers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(p.as_bytes());
    }
    if comma {
        out.push(b',');
    }
}

/// The JSON of `resp`: serde for the fields, then `Peers`, `PeersChanged` and
/// `PacketFilter` spliced in from their shared text.
pub fn encode(resp: &MapResponse) -> Result<Vec<u8>, serde_json::Error> {
    let mut json = Vec::new();
    for p in encode_pieces(resp)? {
        p.write(&mut json);
    }
    Ok(json)
}

/// A list of node ids as its JSON text.
pub fn ids_text(ids: &[u64]) -> Arc<str> {
    // Writing integers cannot fail.
    serde_json::to_string(ids)
        .unwrap_or_else(|_| "[]".into())
        .into()
}

/// [`encode`], as pieces: the message's own text, its runs of peers and its filter's
/// source lists.
pub fn encode_pieces(resp: &MapResponse) -> Result<Vec<Piece>, serde_json::Error> {
    encode_pieces_with(resp, &mut ids_text)
}

/// [`encode_pieces`], with `PeersRemoved` as a [`Piece::Run`] of the text `removed` gives
/// for the list: a policy change that hides a thousand servers from nine thousand members
/// sends the same list to each, which the frame encoder then compresses once.
pub fn encode_pieces_with(
    resp: &MapResponse,
    removed: &mut dyn FnMut(&[u64]) -> Arc<str>,
) -> Result<Vec<Piece>, serde_json::Error> {
    let mut own = serde_json::to_vec(resp)?;
    let mut pieces = Vec::new();
    for (key, list) in [
        ("Peers", &resp.peers),
        ("PeersChanged", &resp.peers_changed),
    ] {
        let Some(list) = list else { continue };
        open_member(&mut own, &pieces, key);
        own.push(b'[');
        let mut run: Option<(u64, Vec<Arc<str>>)> = None;
        for p in list {
            let block = p.2 / RUN_IDS;
            match &mut run {
                Some((b, peers)) if *b == block => peers.push(p.1.clone()),
                _ => {
                    if let Some((_, peers)) = run.take() {
                        pieces.push(Piece::Own(std::mem::take(&mut own)));
                        pieces.push(Piece::Run { peers, comma: true });
                    }
                    run = Some((block, vec![p.1.clone()]));
                }
            }
        }
        if let Some((_, peers)) = run {
            pieces.push(Piece::Own(std::mem::take(&mut own)));
            pieces.push(Piece::Run {
                peers,
                comma: false,
            });
        }
        own.extend_from_slice(b"]}");
    }
    if let Some(ids) = &resp.peers_removed {
        open_member(&mut own, &pieces, "PeersRemoved");
        pieces.push(Piece::Own(std::mem::take(&mut own)));
        pieces.push(Piece::Run {
            peers: vec![removed(ids)],
            comma: false,
        });
        own.push(b'}');
    }
    if let Some(filter) = &resp.packet_filter {
        open_member(&mut own, &pieces, "PacketFilter");
        filter.write_pieces(&mut own, &mut pieces);
        own.push(b'}');
    }
    pieces.push(Piece::Own(own));
    pieces.retain(|p| !matches!(p, Piece::Own(b) if b.is_empty()));
    Ok(pieces)
}

/// Reopens the object the message's text so far ends with (drops its closing brace) and
/// starts member `key`, whose value and the brace the caller writes.
fn open_member(own: &mut Vec<u8>, pieces: &[Piece], key: &str) {
    own.pop();
    if own.len() > 1 || !pieces.is_empty() {
        own.push(b',');
    }
    own.extend_from_slice(format!("\"{key}\":").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn peers_are_spliced_in_from_their_text() {
        let peer = |id: u64| Shared::new(json!({ "ID": id, "Name": format!("n{id}.") }));
        let full = MapResponse {
            node: Some(json!({ "ID": 1 })),
            peers: Some(vec![peer(2), peer(3)]),
            peers_changed: Some(vec![peer(4)]),
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(&encode(&full).unwrap()).unwrap();
        assert_eq!(
            v,
            json!({
                "Node": { "ID": 1 },
                "Peers": [{ "ID": 2, "Name": "n2." }, { "ID": 3, "Name": "n3." }],
                "PeersChanged": [{ "ID": 4, "Name": "n4." }],
            })
        );
        // Nothing else in the message: the spliced member is the only one.
        let only = MapResponse {
            peers_changed: Some(vec![peer(5)]),
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(&encode(&only).unwrap()).unwrap();
        assert_eq!(v, json!({ "PeersChanged": [{ "ID": 5, "Name": "n5." }] }));
        let none = MapResponse::default();
        assert_eq!(encode(&none).unwrap(), b"{}");
    }

    /// The filter's source lists are pieces of their own, shared by reference, and the
    /// message reads back as the filter it was made from.
    #[test]
    fn filter_sources_are_spliced_in_from_their_text() {
        let everyone: Arc<str> = Arc::from(r#"["100.64.0.1-100.64.0.9","fd7a:115c:a1e0::1"]"#);
        let filter = PacketFilter(vec![
            FilterRule {
                src: everyone.clone(),
                rest: r#","DstPorts":[{"IP":"100.64.0.5","Ports":{"First":22,"Last":22}}]"#.into(),
            },
            FilterRule {
                src: everyone.clone(),
                rest: r#","DstPorts":[{"IP":"*","Ports":{"First":80,"Last":80}}],"IPProto":[6]"#
                    .into(),
            },
        ]);
        let want = json!([
            {
                "SrcIPs": ["100.64.0.1-100.64.0.9", "fd7a:115c:a1e0::1"],
                "DstPorts": [{"IP": "100.64.0.5", "Ports": {"First": 22, "Last": 22}}],
            },
            {
                "SrcIPs": ["100.64.0.1-100.64.0.9", "fd7a:115c:a1e0::1"],
                "DstPorts": [{"IP": "*", "Ports": {"First": 80, "Last": 80}}],
                "IPProto": [6],
            },
        ]);
        assert_eq!(filter.to_value(), want);
        let resp = MapResponse {
            node: Some(json!({ "ID": 1 })),
            peers_changed: Some(vec![Shared::new(json!({ "ID": 2 }))]),
            packet_filter: Some(filter.clone()),
            ..Default::default()
        };
        let pieces = encode_pieces(&resp).unwrap();
        let shared = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Run { peers, .. } if Arc::ptr_eq(&peers[0], &everyone)))
            .count();
        assert_eq!(shared, 2);
        let v: Value = serde_json::from_slice(&encode(&resp).unwrap()).unwrap();
        assert_eq!(v["PacketFilter"], want);
        assert_eq!(v["PeersChanged"][0]["ID"], 2);
        assert_eq!(v["Node"]["ID"], 1);
        let alone = MapResponse {
            packet_filter: Some(PacketFilter::allow_all()),
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(&encode(&alone).unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"PacketFilter": [{
                "SrcIPs": ["*"],
                "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}],
            }]})
        );
    }

    /// Runs follow blocks of ids, take the comma after them when more peers follow, and
    /// together with the message's own text make up exactly the message.
    #[test]
    fn peer_runs_are_cut_by_id_block() {
        let peer = |id: u64| Shared::new(json!({ "ID": id }));
        let ids = [1, 2, RUN_IDS, RUN_IDS + 5, 3 * RUN_IDS];
        let resp = MapResponse {
            node: Some(json!({ "ID": 9 })),
            peers: Some(ids.iter().map(|i| peer(*i)).collect()),
            peers_changed: Some(vec![peer(7)]),
            ..Default::default()
        };
        let pieces = encode_pieces(&resp).unwrap();
        let text = |p: &Piece| {
            let mut b = Vec::new();
            p.write(&mut b);
            String::from_utf8(b).unwrap()
        };
        let runs: Vec<String> = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Run { .. }))
            .map(text)
            .collect();
        assert_eq!(
            runs,
            [
                r#"{"ID":1},{"ID":2},"#.to_string(),
                format!(r#"{{"ID":{}}},{{"ID":{}}},"#, RUN_IDS, RUN_IDS + 5),
                format!(r#"{{"ID":{}}}"#, 3 * RUN_IDS),
                r#"{"ID":7}"#.to_string(),
            ]
        );
        let whole: String = pieces.iter().map(text).collect();
        let v: Value = serde_json::from_str(&whole).unwrap();
        assert_eq!(v["Peers"].as_array().unwrap().len(), 5);
        assert_eq!(v["PeersChanged"][0]["ID"], 7);
        assert_eq!(v["Node"]["ID"], 9);
    }
}
