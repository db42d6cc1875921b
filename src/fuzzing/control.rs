//! Harness for what a registered or registering client sends over Noise: the JSON bodies
//! of `/machine/register` and `/machine/map`, decoded and checked as the handlers do, the
//! commands they lead to applied to a replica's state, and the maps rendered from it.
//!
//! The handlers themselves need a replica (Raft, RocksDB) per request, far too slow for a
//! fuzzer; so [`register`] walks `register::register`'s decisions with its own parsing
//! functions, and the map side uses `map::client_update`, the handler's own. Keep
//! [`register`] in step with the handler when the handler changes.

use std::sync::Arc;

use hydrascale_raft::Application;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::control::auth_id::auth_id_of;
use crate::control::keys::{is_zero_key, parse_node_key};
use crate::control::map::{check_map_request, client_update};
use crate::control::register::requested_expiry_ms;
use crate::mapper::shared_frames::{encode_frame, FrameCache};
use crate::mapper::{PeerCache, StreamView};
use crate::state::{
    sample, valid_label, Command, Node, PendingLogin, RegisterAuth, StateStore, Tailnet,
};
use crate::tailcfg::{MapRequest, MapResponse, RegisterRequest};

/// The pre-auth key the harness's tailnet holds (reusable); seeds use it as `AuthKey`.
pub const AUTH_KEY: &str = "hskey-auth-fuzzing-0123456789abcdef";
/// The machine key the Noise handshake gave the client.
pub const MACHINE: &str = "mkey:00000000000000000000000000000000000000000000000000000000000fa2e0";
/// The harness's clock: every command is made at this time.
const NOW: i64 = 1_750_000_000_000;

/// A replica's state and what the map plane keeps beside it.
struct Replica {
    store: StateStore,
    config: Arc<Config>,
    peers: Arc<PeerCache>,
    frames: FrameCache,
}

impl Replica {
    /// A tailnet with user `alice`, a reusable pre-auth key [`AUTH_KEY`] of hers, and one
    /// node of hers (id 1) to be the client's peer.
    fn new() -> Self {
        let metrics = crate::metrics::Metrics::new();
        let store = StateStore::with_meters(metrics.clone());
        let config = Arc::new(Config::default());
        let peers = PeerCache::new(config.clone());
        store.observe(peers.clone());
        let frames = FrameCache::new(metrics);
        let r = Replica {
            store,
            config,
            peers,
            frames,
        };
        r.apply(&Command::CreateUser {
            name: "alice".into(),
            display_name: "Alice".into(),
            by_admin: true,
            now: NOW,
            profile: Default::default(),
        });
        r.apply(&Command::CreatePreAuthKey {
            user: "alice".into(),
            prefix: "hskey-auth-fuzzing".into(),
            hash: hex::encode(Sha256::digest(AUTH_KEY.as_bytes())),
            reusable: true,
            ephemeral: false,
            expiration: None,
            tags: Vec::new(),
            now: NOW,
        });
        let [key, node] = sample::registration(
            "alice",
            Vec::new(),
            1,
            "peer".into(),
            r#"{"Hostname":"peer","RoutableIPs":["10.1.0.0/16"]}"#.into(),
        );
        r.apply(&key);
        r.apply(&node);
        r
    }

    /// Applies `cmd` as Raft would: serialized, as a log entry.
    fn apply(&self, cmd: &Command) {
        let bytes = serde_json::to_vec(cmd).expect("a command serializes");
        // A command the harness made itself always decodes; a refusal inside the
        // state machine comes back as an answer, not as an error.
        assert!(
            self.store.apply(0, &bytes).is_ok(),
            "a command the harness encoded does not decode"
        );
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tailnet> {
        self.store.read()
    }
}

/// Target `control_requests`: a request body from the client with machine key
/// [`MACHINE`], taken first as a `/machine/register` body, then as a `/machine/map` body.
/// Nothing panics; every node the client ends up with is well-formed; and the maps a
/// stream of the client and of its peer would send, before and after, encode to messages
/// that decode to JSON.
pub fn control_requests(body: &[u8]) {
    let r = Replica::new();
    let mut peer_view = StreamView::new(1);
    render(&r, &mut peer_view);
    if let Ok(req) = serde_json::from_slice::<RegisterRequest>(body) {
        let cmds = register(&r.read(), &r.config, &req);
        for cmd in &cmds {
            r.apply(cmd);
        }
    }
    check_node(&r.read());
    if let Ok(req) = serde_json::from_slice::<MapRequest>(body) {
        map(&r, &req);
    }
    check_node(&r.read());
    let t = r.read();
    match peer_view.delta(&t, &r.peers, &r.config, NOW) {
        Ok(Some(d)) => encoded(&r, &d),
        Ok(None) => {}
        Err(_) => {
            let full = peer_view.full(&t, &r.peers, &r.config, &serde_json::json!({}), NOW);
            encoded(&r, &full.expect("the peer is still there"));
        }
    }
}

/// The commands `register::register` would propose for `req` from [`MACHINE`], an
/// administrator's approval included where it would start an interactive login.
fn register(t: &Tailnet, config: &Config, req: &RegisterRequest) -> Vec<Command> {
    let Ok(node_key) = parse_node_key(&req.node_key) else {
        return Vec::new();
    };
    let old_node_key = if is_zero_key(&req.old_node_key) {
        None
    } else {
        match parse_node_key(&req.old_node_key) {
            Ok(k) => Some(k),
            Err(_) => return Vec::new(),
        }
    };
    let hostinfo = req
        .hostinfo
        .as_ref()
        .map(|h| h.to_string())
        .unwrap_or_else(|| "{}".into());
    let hostname = req
        .hostinfo
        .as_ref()
        .and_then(|h| h.get("Hostname"))
        .and_then(|h| h.as_str())
        .unwrap_or("node")
        .to_string();
    let existing = t.node_by_machine_key(MACHINE);
    if let Some(exp) = requested_expiry_ms(&req.expiry) {
        if exp <= NOW {
            return match existing.filter(|n| n.node_key == node_key) {
                Some(n) if n.ephemeral => vec![Command::DeleteNode { id: n.id }],
                Some(_) => vec![Command::LogoutNode { node_key, now: NOW }],
                None => Vec::new(),
            };
        }
    }
    let auth_key = req
        .auth
        .as_ref()
        .map(|a| a.auth_key.trim())
        .filter(|k| !k.is_empty());
    if let Some(key) = auth_key {
        return vec![Command::RegisterNode {
            machine_key: MACHINE.into(),
            node_key,
            old_node_key,
            hostname,
            hostinfo,
            auth: RegisterAuth::PreAuthKey {
                hash: hex::encode(Sha256::digest(key.as_bytes())),
            },
            expiry: config.node_expiry_ms().map(|d| NOW + d),
            ephemeral: req.ephemeral,
            prefixes: config.prefixes,
            now: NOW,
        }];
    }
    let known =
        existing.filter(|n| n.node_key == node_key || old_node_key.as_deref() == Some(&n.node_key));
    let login = || {
        // A follow-up names the login it waits for; here it is approved at once.
        let auth_id = auth_id_of(&req.followup)
            .unwrap_or("0123456789abcdef01234567")
            .to_string();
        vec![
            Command::StartLogin {
                login: PendingLogin {
                    auth_id: auth_id.clone(),
                    machine_key: MACHINE.into(),
                    node_key: node_key.clone(),
                    hostname: hostname.clone(),
                    hostinfo: hostinfo.clone(),
                    ephemeral: req.ephemeral,
                    created: NOW,
                    prefixes: config.prefixes,
                    key_lifetime: config.node_expiry_ms(),
                },
            },
            Command::CompleteLogin {
                auth_id,
                user: "alice".into(),
                now: NOW,
            },
        ]
    };
    match known {
        None => login(),
        Some(n) if n.node_key == node_key => Vec::new(),
        Some(n) if n.expiry.is_some_and(|e| e <= NOW) => login(),
        Some(n) => vec![Command::RegisterNode {
            machine_key: MACHINE.into(),
            node_key: node_key.clone(),
            old_node_key,
            hostname,
            hostinfo,
            auth: RegisterAuth::Existing,
            expiry: n.expiry,
            ephemeral: n.ephemeral,
            prefixes: config.prefixes,
            now: NOW,
        }],
    }
}

/// `map::map` for `req` from [`MACHINE`]: the checks, the update, and the first message.
fn map(r: &Replica, req: &MapRequest) {
    let Ok(node_key) = parse_node_key(&req.node_key) else {
        return;
    };
    let node: Node = match r.read().node_by_node_key(&node_key) {
        Some(n) if n.machine_key == MACHINE && n.expiry.is_none_or(|e| e > NOW) => n.clone(),
        _ => return,
    };
    let Ok(hostinfo) = check_map_request(req) else {
        return;
    };
    if let Some(cmd) = client_update(&node, req, hostinfo, NOW) {
        r.apply(&cmd);
    }
    if !req.stream && req.omit_peers {
        return;
    }
    let mut view = StreamView::new(node.id);
    render(r, &mut view);
}

/// The full map `view`'s stream sends first, encoded.
fn render(r: &Replica, view: &mut StreamView) {
    let t = r.read();
    let derp = serde_json::json!({});
    if let Some(full) = view.full(&t, &r.peers, &r.config, &derp, NOW) {
        encoded(r, &full);
    }
}

/// A map message as the stream sends it: a length, then zstd frames of its JSON.
fn encoded(r: &Replica, resp: &MapResponse) {
    let frame = encode_frame(resp, &r.frames).expect("a map message encodes");
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    assert_eq!(len, frame.len() - 4, "the message's length");
    let json = zstd::decode_all(&frame[4..]).expect("the message decompresses");
    let v: serde_json::Value = serde_json::from_slice(&json).expect("the message is JSON");
    assert!(v.is_object());
}

/// What the state holds for the client's node, if it has one, whatever the client sent.
fn check_node(t: &Tailnet) {
    let Some(n) = t.node_by_machine_key(MACHINE) else {
        return;
    };
    assert!(parse_node_key(&n.node_key).is_ok_and(|k| k == n.node_key));
    assert!(valid_label(&n.given_name), "given name {:?}", n.given_name);
    let same_name = t
        .nodes
        .values()
        .filter(|o| o.given_name == n.given_name)
        .count();
    assert_eq!(same_name, 1, "two nodes named {:?}", n.given_name);
    let prefixes = crate::state::Prefixes::default();
    assert!(prefixes.v4.contains(&n.ipv4) && prefixes.v6.contains(&n.ipv6));
    assert!(serde_json::from_str::<serde_json::Value>(&n.hostinfo).is_ok());
}

#[cfg(test)]
mod tests {
    use super::*;
    use hydrascale_raft::fuzzing::stand_in;

    /// Stand-in for `cargo fuzz run control_requests`.
    #[test]
    fn control_requests_stand_in() {
        stand_in("control_requests", 3000, control_requests);
    }
}
