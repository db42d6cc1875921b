//! The REST admin API under `/api/v1` on the control listener, path- and shape-compatible
//! with headscale's (grpc-gateway JSON: camelCase fields, 64-bit ids as strings, RFC 3339
//! times, errors as `{"code", "message", "details"}`), so headscale web UIs and SDKs work.
//!
//! Every request needs `Authorization: Bearer <API key>`; without a current key it is
//! answered 401 before anything else happens. Writes go through the admin gRPC service's
//! own handlers (same validation, same Raft commands), reads come from this replica's
//! applied state. What Hydrascale does not have yet answers 501 saying so.

mod keys;
mod nodes;
mod policy;
mod users;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tonic::Code;

use crate::admin::Admin;
use crate::state::{now_ms, Db, Tailnet};
use crate::tailcfg::rfc3339;

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
        .route(
            "/api/v1/user",
            get(users::list_users).post(users::create_user),
        )
        .route(
            "/api/v1/user/{id}",
            get(users::get_user).delete(users::delete_user),
        )
        .route(
            "/api/v1/user/{old_id}/rename/{new_name}",
            post(users::rename_user),
        )
        .route("/api/v1/node", get(nodes::list_nodes))
        .route(
            "/api/v1/node/{id}",
            get(nodes::get_node).delete(nodes::delete_node),
        )
        .route("/api/v1/node/{id}/expire", post(nodes::expire_node))
        .route(
            "/api/v1/node/{id}/rename/{new_name}",
            post(nodes::rename_node),
        )
        .route("/api/v1/node/{id}/tags", post(nodes::set_tags))
        .route(
            "/api/v1/node/{id}/approve_routes",
            post(nodes::approve_routes),
        )
        .route("/api/v1/node/{id}/user", post(not_yet))
        .route("/api/v1/node/register", post(nodes::register_node))
        .route("/api/v1/node/backfillips", post(not_yet))
        .route(
            "/api/v1/preauthkey",
            get(keys::list_preauth_keys).post(keys::create_preauth_key),
        )
        .route("/api/v1/preauthkey/expire", post(keys::expire_preauth_key))
        .route(
            "/api/v1/apikey",
            get(keys::list_api_keys).post(keys::create_api_key),
        )
        .route("/api/v1/apikey/expire", post(keys::expire_api_key))
        .route("/api/v1/apikey/{prefix}", delete(keys::delete_api_key))
        .route(
            "/api/v1/policy",
            get(policy::get_policy).put(policy::set_policy),
        )
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
        Some(k) => st.db.store.read().check_api_key(k.trim(), now_ms()),
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
    Value::String(rfc3339(ms))
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, time)
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
