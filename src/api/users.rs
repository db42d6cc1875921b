//! `/api/v1/user`: headscale's user objects; list, get, create, rename, delete users.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::Request;

use super::{input, resolve_user, time, user_name, ApiResult, ApiState};
use crate::admin::proto::admin_service_server::AdminService;
use crate::admin::{convert, proto};
use crate::state::Tailnet;

/// headscale's user object, from the admin API's user message.
fn user_json(u: &proto::User) -> Value {
    // headscale's form of the OIDC identity: the issuer and subject as one URL path.
    let provider_id = if u.oidc_issuer.is_empty() && u.oidc_subject.is_empty() {
        String::new()
    } else {
        format!("{}/{}", u.oidc_issuer.trim_end_matches('/'), u.oidc_subject)
    };
    json!({
        "id": u.id.to_string(),
        "name": u.name,
        "createdAt": time(u.created_ms),
        "displayName": u.display_name,
        "email": u.email,
        "providerId": provider_id,
        "provider": if u.origin == "oidc" { "oidc" } else { "" },
        "profilePicUrl": u.picture_url,
    })
}

pub(super) fn user_of(t: &Tailnet, id: u64) -> Value {
    t.users
        .get(&id)
        .map_or(Value::Null, |u| user_json(&convert::user_msg(u)))
}

#[derive(Deserialize)]
pub(super) struct UserQuery {
    id: Option<String>,
    name: Option<String>,
    email: Option<String>,
}

pub(super) async fn list_users(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<UserQuery>,
) -> ApiResult {
    let t = st.db.store.read();
    let users: Vec<Value> = t
        .users
        .values()
        .filter(|u| q.id.as_deref().is_none_or(|id| id == u.id.to_string()))
        .filter(|u| q.name.as_deref().is_none_or(|n| n == u.name))
        .filter(|u| {
            q.email
                .as_deref()
                .is_none_or(|e| e.eq_ignore_ascii_case(&u.profile.email))
        })
        .map(|u| user_json(&convert::user_msg(u)))
        .collect();
    Ok(Json(json!({ "users": users })))
}

pub(super) async fn get_user(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    let t = st.db.store.read();
    let id = resolve_user(&t, &Value::String(id))?;
    Ok(Json(json!({ "user": user_of(&t, id) })))
}

pub(super) async fn create_user(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let name = body["name"].as_str().unwrap_or_default().to_string();
    let text = |k: &str| body[k].as_str().unwrap_or_default().to_string();
    let r = st
        .admin
        .create_user(Request::new(proto::CreateUserRequest {
            name,
            display_name: text("displayName"),
            email: text("email"),
            picture_url: text("pictureUrl"),
        }))
        .await?
        .into_inner();
    let id = r.user.map(|u| u.id).unwrap_or_default();
    let t = st.db.store.read();
    Ok(Json(json!({ "user": user_of(&t, id) })))
}

pub(super) async fn rename_user(
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

pub(super) async fn delete_user(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult {
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
