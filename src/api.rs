//! The REST admin API under `/api/v1` on the control listener, path- and shape-compatible
//! with headscale's (grpc-gateway JSON: camelCase fields, 64-bit ids as strings, RFC 3339
//! times, errors as `{"code", "message", "details"}`), so headscale web UIs and SDKs work.
//!
//! Every request needs `Authorization: Bearer <API key>`; without a current key it is
//! answered 401 before anything else happens. Writes go through the admin gRPC service's
//! own handlers (same validation, same Raft commands), reads come from this replica's
//! applied state. What Hydrascale does not have yet answers 501 saying so.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::{Code, Request};

use crate::admin::proto;
use crate::admin::proto::admin_service_server::AdminService;
use crate::admin::Admin;
use crate::control::tailcfg_time;
use crate::state::{now_ms, Db, Tailnet};

/// A refusal in grpc-gateway's shape, with the HTTP status grpc-gateway gives its code.
pub struct ApiError(tonic::Status);

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        ApiError(s)
    }
}

fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "code": self.0.code() as i32,
            "message": self.0.message(),
            "details": [],
        });
        (http_status(self.0.code()), Json(body)).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

struct ApiState {
    db: Db,
    admin: Admin,
}

/// Routes under `/api/v1`, merged into the control listener's router.
pub fn router(db: Db) -> Router {
    let state = Arc::new(ApiState {
        admin: Admin::new(db.clone()),
        db,
    });
    Router::new()
        .route("/api/v1/user", get(list_users).post(create_user))
        .route("/api/v1/user/{id}", get(get_user).delete(delete_user))
        .route("/api/v1/user/{old_id}/rename/{new_name}", post(rename_user))
        .route("/api/v1/node", get(list_nodes))
        .route("/api/v1/node/{id}", get(get_node).delete(delete_node))
        .route("/api/v1/node/{id}/expire", post(expire_node))
        .route("/api/v1/node/{id}/rename/{new_name}", post(rename_node))
        .route("/api/v1/node/{id}/tags", post(set_tags))
        .route("/api/v1/node/{id}/approve_routes", post(approve_routes))
        .route("/api/v1/node/{id}/user", post(not_yet))
        .route("/api/v1/node/register", post(register_node))
        .route("/api/v1/node/backfillips", post(not_yet))
        .route(
            "/api/v1/preauthkey",
            get(list_preauth_keys).post(create_preauth_key),
        )
        .route("/api/v1/preauthkey/expire", post(expire_preauth_key))
        .route("/api/v1/apikey", get(list_api_keys).post(create_api_key))
        .route("/api/v1/apikey/expire", post(expire_api_key))
        .route("/api/v1/apikey/{prefix}", delete(delete_api_key))
        .route("/api/v1/policy", get(get_policy).put(set_policy))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .with_state(state)
}

async fn require_api_key(
    State(st): State<Arc<ApiState>>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let verdict = match presented {
        None => Err("this API needs an API key in `Authorization: Bearer KEY`; create one with `hydrascale apikeys create`"),
        Some(k) => crate::admin::check_api_key(&st.db.store.read(), k.trim(), now_ms()),
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err(why) => ApiError(tonic::Status::unauthenticated(why)).into_response(),
    }
}

async fn not_yet() -> ApiError {
    ApiError(tonic::Status::unimplemented(
        "Hydrascale does not support this yet; see docs/api.md",
    ))
}

fn time(ms: i64) -> Value {
    Value::String(tailcfg_time(ms))
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, time)
}

fn user_json(u: &crate::state::User) -> Value {
    json!({
        "id": u.id.to_string(),
        "name": u.name,
        "createdAt": time(u.created),
        "displayName": u.display_name,
        "email": "",
        // headscale's form of the OIDC identity: the issuer and subject as one URL path.
        "providerId": u.oidc.as_ref().map_or(String::new(), |o| format!("{}/{}", o.issuer.trim_end_matches('/'), o.subject)),
        "provider": if u.origin == crate::state::UserOrigin::Oidc { "oidc" } else { "" },
        "profilePicUrl": "",
    })
}

fn user_of(t: &Tailnet, id: u64) -> Value {
    t.users.get(&id).map_or(Value::Null, user_json)
}

fn node_json(t: &Tailnet, n: &crate::state::Node) -> Value {
    json!({
        "id": n.id.to_string(),
        "machineKey": n.machine_key,
        "nodeKey": n.node_key,
        "discoKey": n.disco_key,
        "ipAddresses": [n.ipv4.to_string(), n.ipv6.to_string()],
        "name": n.hostname,
        "givenName": n.given_name,
        "user": user_of(t, n.user_id),
        "lastSeen": opt_time(n.last_seen),
        "expiry": opt_time(n.expiry),
        "createdAt": time(n.created),
        "registerMethod": "REGISTER_METHOD_AUTH_KEY",
        "online": n.online,
        "tags": n.tags,
        "forcedTags": n.tags,
        "validTags": n.tags,
        "invalidTags": [],
        "approvedRoutes": n.approved_routes.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "availableRoutes": n.advertised_routes.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "subnetRoutes": crate::admin::carried_routes(t, n),
        "preAuthKey": Value::Null,
    })
}

fn preauth_key_json(t: &Tailnet, k: &crate::state::PreAuthKey, full: &str) -> Value {
    json!({
        "id": k.id.to_string(),
        "user": user_of(t, k.user_id),
        // The key itself exists only in the reply that created it; lists show its prefix.
        "key": if full.is_empty() { k.prefix.clone() } else { full.to_string() },
        "reusable": k.reusable,
        "ephemeral": k.ephemeral,
        "used": k.used,
        "expiration": opt_time(k.expiration),
        "createdAt": time(k.created),
        "aclTags": k.tags,
    })
}

fn api_key_json(k: &crate::state::ApiKey) -> Value {
    json!({
        "id": k.id.to_string(),
        "prefix": k.prefix,
        "expiration": opt_time(k.expiration),
        "createdAt": time(k.created),
        "lastSeen": Value::Null,
    })
}

/// A request's fields: its JSON body, or (as grpc-gateway also allows, and some clients
/// only do) its query parameters, a repeated parameter becoming a list.
fn input(query: Vec<(String, String)>, body: &[u8]) -> Result<Value, ApiError> {
    if !body.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_slice(body).map_err(|e| {
            ApiError(tonic::Status::invalid_argument(format!(
                "the request body is not JSON: {e}"
            )))
        });
    }
    let mut map = serde_json::Map::new();
    for (k, v) in query {
        match map.get_mut(&k) {
            Some(Value::Array(a)) => a.push(Value::String(v)),
            Some(prev) => {
                let first = prev.take();
                *prev = Value::Array(vec![first, Value::String(v)]);
            }
            None => {
                map.insert(k, Value::String(v));
            }
        }
    }
    Ok(Value::Object(map))
}

/// A boolean field sent as JSON `true` or as the query string's `"true"`.
fn flag(v: &Value) -> bool {
    v.as_bool().unwrap_or_else(|| v.as_str() == Some("true"))
}

/// A list field sent as a JSON array, or as one or repeated query parameters.
fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        Value::String(s) if !s.is_empty() => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// A user named by id (headscale today) or by name (older headscale clients).
fn resolve_user(t: &Tailnet, v: &Value) -> Result<u64, ApiError> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    if let Ok(id) = text.parse::<u64>() {
        if t.users.contains_key(&id) {
            return Ok(id);
        }
    }
    t.user_by_name(&text).map(|u| u.id).ok_or_else(|| {
        ApiError(tonic::Status::not_found(format!(
            "user {text:?} does not exist (give its id or name)"
        )))
    })
}

/// grpc-gateway accepts 64-bit ids as strings or numbers.
fn id_from(v: &Value, what: &str) -> Result<u64, ApiError> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| {
        ApiError(tonic::Status::invalid_argument(format!(
            "{what} must be a numeric id, got {v}"
        )))
    })
}

fn path_id(s: &str, what: &str) -> Result<u64, ApiError> {
    id_from(&Value::String(s.to_string()), what)
}

fn user_name(t: &Tailnet, id: u64) -> Result<String, ApiError> {
    t.users.get(&id).map(|u| u.name.clone()).ok_or_else(|| {
        ApiError(tonic::Status::not_found(format!(
            "user {id} does not exist"
        )))
    })
}

/// RFC 3339 time in the future -> lifetime in ms from now (0 = never expires).
fn lifetime_ms(v: Option<&Value>) -> Result<i64, ApiError> {
    let Some(Value::String(s)) = v else {
        return Ok(0);
    };
    if s.is_empty() {
        return Ok(0);
    }
    let t = ::time::OffsetDateTime::parse(s, &::time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            ApiError(tonic::Status::invalid_argument(format!(
                "expiration {s:?} is not an RFC 3339 time: {e}"
            )))
        })?;
    let at = i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    // At least a millisecond: an expiry in the past still means "expired", not "never".
    Ok(at.saturating_sub(now_ms()).max(1))
}

#[derive(Deserialize)]
struct UserQuery {
    id: Option<String>,
    name: Option<String>,
}

async fn list_users(State(st): State<Arc<ApiState>>, Query(q): Query<UserQuery>) -> ApiResult {
    let t = st.db.store.read();
    let users: Vec<Value> = t
        .users
        .values()
        .filter(|u| q.id.as_deref().is_none_or(|id| id == u.id.to_string()))
        .filter(|u| q.name.as_deref().is_none_or(|n| n == u.name))
        .map(user_json)
        .collect();
    Ok(Json(json!({ "users": users })))
}

async fn get_user(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    let t = st.db.store.read();
    let id = resolve_user(&t, &Value::String(id))?;
    Ok(Json(json!({ "user": user_of(&t, id) })))
}

async fn create_user(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let name = body["name"].as_str().unwrap_or_default().to_string();
    let display_name = body["displayName"].as_str().unwrap_or_default().to_string();
    let r = st
        .admin
        .create_user(Request::new(proto::CreateUserRequest {
            name,
            display_name,
        }))
        .await?
        .into_inner();
    let id = r.user.map(|u| u.id).unwrap_or_default();
    let t = st.db.store.read();
    Ok(Json(json!({ "user": user_of(&t, id) })))
}

async fn rename_user(
    State(st): State<Arc<ApiState>>,
    Path((old_id, new_name)): Path<(String, String)>,
) -> ApiResult {
    let (id, old_name) = {
        let t = st.db.store.read();
        let id = resolve_user(&t, &Value::String(old_id))?;
        (id, user_name(&t, id)?)
    };
    st.admin
        .rename_user(Request::new(proto::RenameUserRequest {
            old_name,
            new_name,
        }))
        .await?;
    let t = st.db.store.read();
    Ok(Json(json!({ "user": user_of(&t, id) })))
}

async fn delete_user(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    let name = {
        let t = st.db.store.read();
        let id = resolve_user(&t, &Value::String(id))?;
        user_name(&t, id)?
    };
    st.admin
        .delete_user(Request::new(proto::DeleteUserRequest { name }))
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct NodeQuery {
    user: Option<String>,
}

async fn list_nodes(State(st): State<Arc<ApiState>>, Query(q): Query<NodeQuery>) -> ApiResult {
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

fn node_reply(st: &ApiState, id: u64) -> ApiResult {
    let t = st.db.store.read();
    let n = t.nodes.get(&id).ok_or_else(|| {
        ApiError(tonic::Status::not_found(format!(
            "node {id} does not exist"
        )))
    })?;
    Ok(Json(json!({ "node": node_json(&t, n) })))
}

async fn get_node(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    node_reply(&st, path_id(&id, "node id")?)
}

async fn delete_node(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    let id = path_id(&id, "node id")?;
    st.admin
        .delete_node(Request::new(proto::NodeIdRequest { id }))
        .await?;
    Ok(Json(json!({})))
}

async fn expire_node(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    let id = path_id(&id, "node id")?;
    st.admin
        .expire_node(Request::new(proto::NodeIdRequest { id }))
        .await?;
    node_reply(&st, id)
}

async fn rename_node(
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
async fn set_tags(
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
async fn approve_routes(
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

/// headscale's policy reply: `{"policy": TEXT, "updatedAt": TIME}`.
fn policy_reply(r: &proto::PolicyReply) -> Json<Value> {
    Json(json!({ "policy": r.policy, "updatedAt": opt_time(r.updated_ms) }))
}

async fn get_policy(State(st): State<Arc<ApiState>>) -> ApiResult {
    let r = st.admin.get_policy(Request::new(proto::Empty {})).await?;
    Ok(policy_reply(r.get_ref()))
}

/// `PUT /api/v1/policy` with `{"policy": TEXT}`.
async fn set_policy(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let policy = body["policy"].as_str().unwrap_or_default().to_string();
    let r = st
        .admin
        .set_policy(Request::new(proto::SetPolicyRequest { policy }))
        .await?;
    Ok(policy_reply(r.get_ref()))
}

/// headscale's `POST /api/v1/node/register?user=U&key=ID`: finishes an interactive login
/// (`key` is the id at the end of the URL the machine shows).
async fn register_node(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let user = {
        let t = st.db.store.read();
        let id = resolve_user(&t, &body["user"])?;
        user_name(&t, id)?
    };
    let auth_id = crate::state::PendingLogin::id_from(body["key"].as_str().unwrap_or_default());
    let r = st
        .admin
        .complete_login(Request::new(proto::CompleteLoginRequest {
            auth_id: auth_id.to_string(),
            user,
        }))
        .await?
        .into_inner();
    let id = r.node.map(|n| n.id).unwrap_or_default();
    node_reply(&st, id)
}

#[derive(Deserialize)]
struct KeyQuery {
    user: Option<String>,
}

async fn list_preauth_keys(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<KeyQuery>,
) -> ApiResult {
    let t = st.db.store.read();
    let user = match q.user.as_deref().filter(|u| !u.is_empty()) {
        None => None,
        Some(u) => Some(resolve_user(&t, &Value::String(u.to_string()))?),
    };
    let keys: Vec<Value> = t
        .preauth_keys
        .values()
        .filter(|k| user.is_none_or(|u| k.user_id == u))
        .map(|k| preauth_key_json(&t, k, ""))
        .collect();
    Ok(Json(json!({ "preAuthKeys": keys })))
}

async fn create_preauth_key(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let user = {
        let t = st.db.store.read();
        let id = resolve_user(&t, &body["user"])?;
        user_name(&t, id)?
    };
    let tags = strings(&body["aclTags"]);
    let r = st
        .admin
        .create_pre_auth_key(Request::new(proto::CreatePreAuthKeyRequest {
            user,
            reusable: flag(&body["reusable"]),
            ephemeral: flag(&body["ephemeral"]),
            expiration_ms: lifetime_ms(body.get("expiration"))?,
            tags,
        }))
        .await?
        .into_inner();
    let created = r
        .key
        .ok_or_else(|| ApiError(tonic::Status::internal("no key in reply")))?;
    let t = st.db.store.read();
    let k = t
        .preauth_keys
        .get(&created.id)
        .ok_or_else(|| ApiError(tonic::Status::internal("created key not applied here")))?;
    Ok(Json(
        json!({ "preAuthKey": preauth_key_json(&t, k, &created.key) }),
    ))
}

async fn expire_preauth_key(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let (user_id, user) = {
        let t = st.db.store.read();
        let id = resolve_user(&t, &body["user"])?;
        (id, user_name(&t, id)?)
    };
    let key = body["key"].as_str().unwrap_or_default();
    // Keys are named by their stored prefix; the whole key starts with it.
    let prefix = {
        let t = st.db.store.read();
        t.preauth_keys
            .values()
            .find(|k| k.user_id == user_id && !key.is_empty() && key.starts_with(&k.prefix))
            .map(|k| k.prefix.clone())
            .unwrap_or_else(|| key.to_string())
    };
    st.admin
        .expire_pre_auth_key(Request::new(proto::ExpirePreAuthKeyRequest {
            user,
            prefix,
        }))
        .await?;
    Ok(Json(json!({})))
}

async fn list_api_keys(State(st): State<Arc<ApiState>>) -> ApiResult {
    let t = st.db.store.read();
    let keys: Vec<Value> = t.api_keys.values().map(api_key_json).collect();
    Ok(Json(json!({ "apiKeys": keys })))
}

async fn create_api_key(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let r = st
        .admin
        .create_api_key(Request::new(proto::CreateApiKeyRequest {
            expiration_ms: lifetime_ms(body.get("expiration"))?,
        }))
        .await?
        .into_inner();
    let key = r.key.map(|k| k.key).unwrap_or_default();
    Ok(Json(json!({ "apiKey": key })))
}

async fn expire_api_key(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let prefix = body["prefix"].as_str().unwrap_or_default().to_string();
    st.admin
        .expire_api_key(Request::new(proto::ApiKeyPrefixRequest { prefix }))
        .await?;
    Ok(Json(json!({})))
}

async fn delete_api_key(State(st): State<Arc<ApiState>>, Path(prefix): Path<String>) -> ApiResult {
    st.admin
        .delete_api_key(Request::new(proto::ApiKeyPrefixRequest { prefix }))
        .await?;
    Ok(Json(json!({})))
}
