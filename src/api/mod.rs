//! The REST admin API under `/api/v1` on the control listener, path- and shape-compatible
//! with headscale's (grpc-gateway JSON: camelCase fields, 64-bit ids as strings, RFC 3339
//! times, errors as `{"code", "message", "details"}`), so headscale web UIs and SDKs work.
//!
//! Every request needs `Authorization: Bearer <API key>`; without a current key it is
//! answered 401 before anything else happens. Writes go through the admin gRPC service's
//! own handlers (same validation, same Raft commands), reads come from this replica's
//! applied state. What Hydrascale does not have yet answers 501 saying so.
//! `openapi.yaml` describes every route; a test checks the two agree.

mod auth;
mod dns;
mod keys;
mod nodes;
mod policy;
mod users;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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

/// What the API needs from the replica besides its state: its readiness (`/health`) and
/// the settings a machine added with `/debug/node` would have been given at login.
pub struct ApiContext {
    pub serving: tokio::sync::watch::Receiver<bool>,
    pub prefixes: crate::state::Prefixes,
    pub key_lifetime: Option<i64>,
}

struct ApiState {
    db: Db,
    admin: Admin,
    ctx: ApiContext,
}

/// The OpenAPI document of these routes, served at `/api/v1/openapi.yaml`.
pub const OPENAPI: &str = include_str!("openapi.yaml");

/// Routes under `/api/v1`, merged into the control listener's router.
pub fn router(db: Db, ctx: ApiContext) -> Router {
    let state = Arc::new(ApiState {
        admin: Admin::new(db.clone()),
        db,
        ctx,
    });
    let open = Router::new().route(
        "/api/v1/openapi.yaml",
        get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "application/yaml")],
                OPENAPI,
            )
        }),
    );
    routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .with_state(state)
        .merge(open)
}

/// One route: the method named once, for the router and for the OpenAPI check.
macro_rules! route {
    ($method:ident $path:literal => $handler:expr) => {
        (
            stringify!($method),
            $path,
            axum::routing::on(axum::routing::MethodFilter::$method, $handler),
        )
    };
}

type Route = (
    &'static str,
    &'static str,
    axum::routing::MethodRouter<Arc<ApiState>>,
);

/// Every route that needs an API key (all but the OpenAPI document).
fn routes() -> Vec<Route> {
    vec![
        route!(GET "/api/v1/user" => users::list_users),
        route!(POST "/api/v1/user" => users::create_user),
        route!(GET "/api/v1/user/{id}" => users::get_user),
        route!(DELETE "/api/v1/user/{id}" => users::delete_user),
        route!(POST "/api/v1/user/{old_id}/rename/{new_name}" => users::rename_user),
        route!(GET "/api/v1/node" => nodes::list_nodes),
        route!(GET "/api/v1/node/{id}" => nodes::get_node),
        route!(DELETE "/api/v1/node/{id}" => nodes::delete_node),
        route!(POST "/api/v1/node/{id}/expire" => nodes::expire_node),
        route!(POST "/api/v1/node/{id}/rename/{new_name}" => nodes::rename_node),
        route!(POST "/api/v1/node/{id}/tags" => nodes::set_tags),
        route!(POST "/api/v1/node/{id}/approve_routes" => nodes::approve_routes),
        route!(POST "/api/v1/node/{id}/user" => not_yet),
        route!(POST "/api/v1/node/register" => nodes::register_node),
        route!(POST "/api/v1/node/backfillips" => nodes::backfill_ips),
        route!(POST "/api/v1/debug/node" => nodes::debug_create_node),
        route!(POST "/api/v1/auth/register" => auth::register),
        route!(POST "/api/v1/auth/approve" => auth::approve),
        route!(POST "/api/v1/auth/reject" => auth::reject),
        route!(GET "/api/v1/health" => health),
        route!(GET "/api/v1/preauthkey" => keys::list_preauth_keys),
        route!(POST "/api/v1/preauthkey" => keys::create_preauth_key),
        route!(DELETE "/api/v1/preauthkey" => keys::delete_preauth_key),
        route!(POST "/api/v1/preauthkey/expire" => keys::expire_preauth_key),
        route!(GET "/api/v1/apikey" => keys::list_api_keys),
        route!(POST "/api/v1/apikey" => keys::create_api_key),
        route!(POST "/api/v1/apikey/expire" => keys::expire_api_key),
        route!(DELETE "/api/v1/apikey/{prefix}" => keys::delete_api_key),
        route!(GET "/api/v1/policy" => policy::get_policy),
        route!(PUT "/api/v1/policy" => policy::set_policy),
        route!(POST "/api/v1/policy/check" => policy::check_policy),
        route!(GET "/api/v1/dns" => dns::get_dns),
        route!(PUT "/api/v1/dns" => dns::set_dns),
    ]
}

/// headscale's health check: `databaseConnectivity` is whether this replica can serve
/// its state (in contact with the majority and caught up); when not, 503 says why.
async fn health(State(st): State<Arc<ApiState>>) -> ApiResult {
    crate::cluster::readiness(&st.db, &st.ctx.serving)
        .map_err(|why| ApiError(tonic::Status::unavailable(why)))?;
    Ok(Json(json!({ "databaseConnectivity": true })))
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

/// The name of the user `v` names (by id or name), as the admin calls take it.
fn named_user(st: &ApiState, v: &Value) -> Result<String, ApiError> {
    let t = st.db.store.read();
    let id = resolve_user(&t, v)?;
    user_name(&t, id)
}

fn user_name(t: &Tailnet, id: u64) -> Result<String, ApiError> {
    t.users.get(&id).map(|u| u.name.clone()).ok_or_else(|| {
        ApiError(tonic::Status::not_found(format!(
            "user {id} does not exist"
        )))
    })
}

/// An RFC 3339 time field, in ms since the epoch.
fn rfc3339_ms(s: &str, field: &str) -> Result<i64, ApiError> {
    let t = ::time::OffsetDateTime::parse(s, &::time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            ApiError(tonic::Status::invalid_argument(format!(
                "{field} {s:?} is not an RFC 3339 time (2027-01-31T12:00:00Z): {e}"
            )))
        })?;
    Ok(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
}

/// RFC 3339 time in the future -> lifetime in ms from now (0 = never expires).
fn lifetime_ms(v: Option<&Value>) -> Result<i64, ApiError> {
    let Some(Value::String(s)) = v else {
        return Ok(0);
    };
    if s.is_empty() {
        return Ok(0);
    }
    let at = rfc3339_ms(s, "expiration")?;
    // At least a millisecond: an expiry in the past still means "expired", not "never".
    Ok(at.saturating_sub(now_ms()).max(1))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// (METHOD, path) of every operation in the OpenAPI document: paths are the keys
    /// indented by two spaces under `paths:`, operations the method keys under them.
    fn documented() -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        let mut in_paths = false;
        let mut path = None;
        for line in super::OPENAPI.lines() {
            if !line.starts_with(' ') && !line.trim().is_empty() {
                in_paths = line.trim_end() == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /") {
                path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
            } else if let Some(m) = line.strip_prefix("    ") {
                let m = m.trim_end().trim_end_matches(':');
                if ["get", "post", "put", "delete", "patch"].contains(&m) {
                    let p = path.clone().expect("an operation outside a path");
                    out.insert((m.to_uppercase(), p));
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented_and_every_documented_route_exists() {
        let routed: BTreeSet<(String, String)> = super::routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .chain([("GET".into(), "/api/v1/openapi.yaml".into())])
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes without a description in openapi.yaml: {undocumented:?}; described but not routed: {unrouted:?}"
        );
        assert!(routed.len() > 30, "{routed:?}");
    }

    #[test]
    fn every_operation_has_a_summary_and_responses() {
        let text = super::OPENAPI;
        let ops = text
            .lines()
            .filter(|l| {
                ["    get:", "    post:", "    put:", "    delete:"].contains(&l.trim_end())
            })
            .count();
        let summaries = text
            .lines()
            .filter(|l| l.starts_with("      summary: "))
            .count();
        let responses = text
            .lines()
            .filter(|l| l.trim_end() == "      responses:")
            .count();
        assert_eq!(ops, summaries, "an operation without a summary");
        assert_eq!(ops, responses, "an operation without responses");
    }
}
