//! `/api/v1/preauthkey` and `/api/v1/apikey`: headscale's key objects; list, create,
//! expire and delete. Pre-auth keys are named by `id` (headscale 0.28+) or, as older
//! headscale clients do, by `user` and `key`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::Request;

use super::users::user_of;
use super::{
    flag, id_from, input, lifetime_ms, named_user, opt_time, resolve_user, strings, time,
    user_name, ApiError, ApiResult, ApiState,
};
use crate::admin::proto::admin_service_server::AdminService;
use crate::admin::{convert, proto};
use crate::state::Tailnet;

/// headscale's pre-auth key object, with the owner as a whole user object.
fn preauth_key_json(t: &Tailnet, k: &crate::state::PreAuthKey, full: &str) -> Value {
    let m = convert::key_msg(t, k, full.to_string());
    json!({
        "id": m.id.to_string(),
        "user": user_of(t, k.user_id),
        // The key itself exists only in the reply that created it; lists show its prefix.
        "key": if m.key.is_empty() { m.prefix } else { m.key },
        "reusable": m.reusable,
        "ephemeral": m.ephemeral,
        "used": m.used,
        "expiration": opt_time(m.expiration_ms),
        "createdAt": time(m.created_ms),
        "aclTags": m.tags,
    })
}

fn api_key_json(k: &crate::state::ApiKey) -> Value {
    let m = convert::api_key_msg(k, String::new());
    json!({
        "id": m.id.to_string(),
        "prefix": m.prefix,
        "expiration": opt_time(m.expiration_ms),
        "createdAt": time(m.created_ms),
        "lastSeen": Value::Null,
    })
}

#[derive(Deserialize)]
pub(super) struct KeyQuery {
    user: Option<String>,
}

pub(super) async fn list_preauth_keys(
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

pub(super) async fn create_preauth_key(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let user = named_user(&st, &body["user"])?;
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

/// The pre-auth key a request names: `id`, or `user` and the whole `key` (or its prefix).
fn named_preauth_key(st: &ApiState, body: &Value) -> Result<(u64, String, String), ApiError> {
    let t = st.db.store.read();
    let found = if let Some(v) = body
        .get("id")
        .filter(|v| !v.is_null() && v.as_str() != Some(""))
    {
        let id = id_from(v, "id")?;
        t.preauth_keys.get(&id).ok_or_else(|| {
            ApiError(tonic::Status::not_found(format!(
                "no pre-auth key has the id {id}; list them with GET /api/v1/preauthkey"
            )))
        })?
    } else {
        let user_id = resolve_user(&t, &body["user"])?;
        let key = body["key"].as_str().unwrap_or_default();
        // Keys are named by their stored prefix; the whole key starts with it.
        t.preauth_keys
            .values()
            .find(|k| {
                k.user_id == user_id
                    && !key.is_empty()
                    && (key.starts_with(&k.prefix) || k.prefix.starts_with(key))
            })
            .ok_or_else(|| {
                ApiError(tonic::Status::not_found(format!(
                    "user {} has no pre-auth key {key:?}; name the key by `id` (GET /api/v1/preauthkey lists them)",
                    body["user"]
                )))
            })?
    };
    Ok((
        found.id,
        user_name(&t, found.user_id)?,
        found.prefix.clone(),
    ))
}

/// `POST /api/v1/preauthkey/expire` with `{"id"}` (or `{"user", "key"}`).
pub(super) async fn expire_preauth_key(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let (_, user, prefix) = named_preauth_key(&st, &body)?;
    st.admin
        .expire_pre_auth_key(Request::new(proto::ExpirePreAuthKeyRequest {
            user,
            prefix,
        }))
        .await?;
    Ok(Json(json!({})))
}

/// `DELETE /api/v1/preauthkey?id=N` (or `?user=U&key=K`).
pub(super) async fn delete_preauth_key(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let (id, _, _) = named_preauth_key(&st, &body)?;
    st.admin
        .delete_pre_auth_key(Request::new(proto::PreAuthKeyIdRequest { id }))
        .await?;
    Ok(Json(json!({})))
}

pub(super) async fn list_api_keys(State(st): State<Arc<ApiState>>) -> ApiResult {
    let t = st.db.store.read();
    let keys: Vec<Value> = t.api_keys.values().map(api_key_json).collect();
    Ok(Json(json!({ "apiKeys": keys })))
}

pub(super) async fn create_api_key(
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

pub(super) async fn expire_api_key(
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

pub(super) async fn delete_api_key(
    State(st): State<Arc<ApiState>>,
    Path(prefix): Path<String>,
) -> ApiResult {
    st.admin
        .delete_api_key(Request::new(proto::ApiKeyPrefixRequest { prefix }))
        .await?;
    Ok(Json(json!({})))
}
