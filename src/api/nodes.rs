//! `/api/v1/node`: headscale's node objects; list, get, delete, expire, rename, tag nodes,
//! approve their routes, register a machine waiting on an interactive login, and
//! headscale's debug and maintenance calls (`debug/node`, `backfillips`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::Request;

use super::users::user_of;
use super::{
    flag, input, named_user, opt_time, path_id, resolve_user, rfc3339_ms, strings, time, ApiError,
    ApiResult, ApiState,
};
use crate::admin::proto::admin_service_server::AdminService;
use crate::admin::{convert, proto};
use crate::state::{RegisterMethod, Tailnet};

/// headscale's node object: the admin API's node message, with the owner as a whole user
/// object and the disco key, which the message does not carry.
fn node_json(t: &Tailnet, n: &crate::state::Node) -> Value {
    let m = convert::node_msg(t, n);
    json!({
        "id": m.id.to_string(),
        "machineKey": m.machine_key,
        "nodeKey": m.node_key,
        "discoKey": n.disco_key,
        "ipAddresses": [m.ipv4, m.ipv6],
        "name": m.hostname,
        "givenName": m.given_name,
        "user": user_of(t, n.user_id),
        "lastSeen": opt_time(m.last_seen_ms),
        "expiry": opt_time(m.expiry_ms),
        "createdAt": time(m.created_ms),
        "registerMethod": match n.register_method {
            RegisterMethod::AuthKey => "REGISTER_METHOD_AUTH_KEY",
            RegisterMethod::Cli => "REGISTER_METHOD_CLI",
            RegisterMethod::Oidc => "REGISTER_METHOD_OIDC",
            // Nodes registered before the method was kept: a key left its id behind.
            RegisterMethod::Unrecorded if n.auth_key_id.is_some() => "REGISTER_METHOD_AUTH_KEY",
            RegisterMethod::Unrecorded => "REGISTER_METHOD_UNSPECIFIED",
        },
        "online": m.online,
        "tags": m.tags,
        "forcedTags": m.tags,
        "validTags": m.tags,
        "invalidTags": [],
        "approvedRoutes": m.approved_routes,
        "availableRoutes": m.available_routes,
        "subnetRoutes": m.subnet_routes,
        "preAuthKey": Value::Null,
    })
}

#[derive(Deserialize)]
pub(super) struct NodeQuery {
    user: Option<String>,
}

pub(super) async fn list_nodes(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<NodeQuery>,
) -> ApiResult {
    let t = st.db.store.read();
    let user = match q.user.as_deref().filter(|u| !u.is_empty()) {
        None => None,
        Some(name) => Some(t.user_by_name(name).map(|u| u.id).ok_or_else(|| {
            ApiError(tonic::Status::not_found(format!(
                "user {name:?} does not exist"
            )))
        })?),
    };
    let nodes: Vec<Value> = t
        .nodes
        .values()
        .filter(|n| user.is_none_or(|u| n.user_id == u))
        .map(|n| node_json(&t, n))
        .collect();
    Ok(Json(json!({ "nodes": nodes })))
}

pub(super) fn node_reply(st: &ApiState, id: u64) -> ApiResult {
    let t = st.db.store.read();
    let n = t.nodes.get(&id).ok_or_else(|| {
        ApiError(tonic::Status::not_found(format!(
            "node {id} does not exist"
        )))
    })?;
    Ok(Json(json!({ "node": node_json(&t, n) })))
}

pub(super) async fn get_node(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    node_reply(&st, path_id(&id, "node id")?)
}

pub(super) async fn delete_node(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult {
    let id = path_id(&id, "node id")?;
    st.admin
        .delete_node(Request::new(proto::NodeIdRequest { id }))
        .await?;
    Ok(Json(json!({})))
}

/// `POST /api/v1/node/{id}/expire`: expires the node's key now, or at `expiry` (RFC 3339),
/// or never (`disableExpiry`), as headscale 0.29.
pub(super) async fn expire_node(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let id = path_id(&id, "node id")?;
    let body = input(q, &body)?;
    let disable = flag(&body["disableExpiry"]) || flag(&body["disable_expiry"]);
    let expiry_ms = match body.get("expiry") {
        Some(Value::String(s)) if !s.is_empty() => Some(rfc3339_ms(s, "expiry")?),
        _ => None,
    };
    st.admin
        .set_node_expiry(Request::new(proto::SetNodeExpiryRequest {
            id,
            expiry_ms,
            disable,
        }))
        .await?;
    node_reply(&st, id)
}

/// `POST /api/v1/node/backfillips?confirmed=true`: gives nodes that lack an IPv4 or IPv6
/// address one. Every node here is given both at registration, so nothing ever lacks
/// one; the reply lists no change, and says so only after the caller confirmed.
pub(super) async fn backfill_ips(
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    if !flag(&body["confirmed"]) {
        return Err(ApiError(tonic::Status::invalid_argument(
            "not confirmed, aborting: send confirmed=true to backfill addresses",
        )));
    }
    Ok(Json(json!({ "changes": Vec::<String>::new() })))
}

/// `POST /api/v1/debug/node` with `{"user", "key", "name", "routes"}`: a made-up machine
/// (fresh random keys) waits on an interactive login as `key`, advertising `routes`;
/// `auth/register` (or `node/register`) with that key then makes it a node of a user.
/// The reply echoes the machine as headscale does (no id or address before it is
/// registered).
pub(super) async fn debug_create_node(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let user = {
        let t = st.db.store.read();
        let id = resolve_user(&t, &body["user"])?;
        user_of(&t, id)
    };
    let auth_id = body["key"].as_str().unwrap_or_default().to_string();
    if auth_id.is_empty()
        || auth_id.len() > 64
        || !auth_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError(tonic::Status::invalid_argument(
            "key must be 1-64 letters, digits, '-' or '_': the id the machine will wait as",
        )));
    }
    let name = body["name"].as_str().unwrap_or_default().to_string();
    if !crate::state::valid_label(&name) {
        return Err(ApiError(tonic::Status::invalid_argument(format!(
            "name {name:?} is not a valid host name: use 1-63 letters, digits and '-'"
        ))));
    }
    let mut routes = Vec::new();
    for r in strings(&body["routes"]) {
        let net: ipnet::IpNet = r.parse().map_err(|_| {
            ApiError(tonic::Status::invalid_argument(format!(
                "route {r:?} is not a prefix like 10.0.0.0/24"
            )))
        })?;
        routes.push(net.trunc().to_string());
    }
    let hostinfo = json!({ "Hostname": name, "OS": "TestOS", "RoutableIPs": routes });
    let random_key = |kind: &str| {
        let mut b = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
        format!("{kind}:{}", hex::encode(b))
    };
    let login = crate::state::PendingLogin {
        auth_id,
        machine_key: random_key("mkey"),
        node_key: random_key("nodekey"),
        hostname: name.clone(),
        hostinfo: hostinfo.to_string(),
        ephemeral: false,
        created: crate::state::now_ms(),
        prefixes: st.ctx.prefixes,
        key_lifetime: st.ctx.key_lifetime,
    };
    let echo = json!({
        "id": "0",
        "machineKey": login.machine_key,
        "nodeKey": login.node_key,
        "discoKey": "",
        "ipAddresses": [],
        "name": name,
        "givenName": "",
        "user": user,
        "online": false,
        "tags": [],
        "approvedRoutes": [],
        "availableRoutes": routes,
        "subnetRoutes": [],
        "registerMethod": "REGISTER_METHOD_UNSPECIFIED",
    });
    st.admin.start_debug_login(login).await?;
    Ok(Json(json!({ "node": echo })))
}

pub(super) async fn rename_node(
    State(st): State<Arc<ApiState>>,
    Path((id, new_name)): Path<(String, String)>,
) -> ApiResult {
    let id = path_id(&id, "node id")?;
    st.admin
        .rename_node(Request::new(proto::RenameNodeRequest { id, new_name }))
        .await?;
    node_reply(&st, id)
}

/// `POST /api/v1/node/{id}/tags` with `{"tags": [...]}`: replaces the node's tags.
pub(super) async fn set_tags(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let id = path_id(&id, "node id")?;
    let body = input(q, &body)?;
    let tags = strings(&body["tags"]);
    st.admin
        .set_tags(Request::new(proto::SetTagsRequest { id, tags }))
        .await?;
    node_reply(&st, id)
}

/// `POST /api/v1/node/{id}/approve_routes` with `{"routes": [...]}` (replaces the list).
pub(super) async fn approve_routes(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let id = path_id(&id, "node id")?;
    let body = input(q, &body)?;
    let routes = strings(&body["routes"]);
    st.admin
        .approve_routes(Request::new(proto::ApproveRoutesRequest { id, routes }))
        .await?;
    node_reply(&st, id)
}

/// headscale's `POST /api/v1/node/register?user=U&key=ID`: finishes an interactive login
/// (`key` is the id at the end of the URL the machine shows).
pub(super) async fn register_node(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    register_waiting(&st, &body["user"], body["key"].as_str().unwrap_or_default()).await
}

/// Finishes the interactive login `auth_id` (the id, or the URL the machine shows) for
/// the user `user` names: the machine becomes that user's node. Serves headscale's
/// `node/register` and `auth/register`.
pub(super) async fn register_waiting(st: &ApiState, user: &Value, auth_id: &str) -> ApiResult {
    let user = named_user(st, user)?;
    let r = st
        .admin
        .complete_login(Request::new(proto::CompleteLoginRequest {
            auth_id: crate::state::PendingLogin::id_from(auth_id).to_string(),
            user,
        }))
        .await?
        .into_inner();
    let id = r
        .node
        .map(|n| n.id)
        .ok_or_else(|| ApiError(tonic::Status::internal("no node in reply")))?;
    node_reply(st, id)
}
