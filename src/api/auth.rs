//! `/api/v1/auth`: machines waiting on an interactive login (register one for a user, or
//! turn it away) and Tailscale SSH connections held for a check (approve or reject), as
//! headscale 0.29's `auth register|approve|reject`. An `authId` names either kind.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};
use tonic::Request;

use super::nodes::register_waiting;
use super::{input, ApiError, ApiResult, ApiState};
use crate::admin::proto;
use crate::admin::proto::admin_service_server::AdminService;
use crate::state::PendingLogin;

/// The id in an `authId` field: the id itself or the whole URL the machine or the SSH user
/// was shown (`.../register/ID`, `.../ssh/check/ID`).
fn auth_id(body: &Value) -> Result<String, ApiError> {
    let text = body["authId"]
        .as_str()
        .or_else(|| body["auth_id"].as_str())
        .unwrap_or_default()
        .trim()
        .trim_end_matches('/');
    let id = PendingLogin::id_from(text);
    let id = id.rsplit_once("/ssh/check/").map_or(id, |(_, id)| id);
    if id.is_empty() {
        return Err(ApiError(tonic::Status::invalid_argument(
            "authId is missing: give the id at the end of the URL the machine (…/register/ID) or the SSH user (…/ssh/check/ID) was shown",
        )));
    }
    Ok(id.to_string())
}

/// `POST /api/v1/auth/register` with `{"user", "authId"}`: the waiting machine becomes a
/// node of the user.
pub(super) async fn register(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let auth_id = auth_id(&body)?;
    register_waiting(&st, &body["user"], &auth_id).await
}

/// Which kind of wait `id` names, on this replica's state.
enum Waiting {
    Login,
    SshCheck,
}

fn waiting(st: &ApiState, id: &str) -> Result<Waiting, ApiError> {
    let t = st.db.store.read();
    if t.ssh_checks.contains_key(id) {
        Ok(Waiting::SshCheck)
    } else if t.pending_logins.contains_key(id) {
        Ok(Waiting::Login)
    } else {
        Err(ApiError(tonic::Status::not_found(format!(
            "nothing waits as {id:?}: no machine is waiting to log in and no SSH connection is waiting for its check with this id (they expire after an hour and 30 minutes)"
        ))))
    }
}

/// `POST /api/v1/auth/approve` with `{"authId"}`: lets a held SSH connection go on. A
/// machine waiting to log in needs a user, so it is registered with `auth/register`.
pub(super) async fn approve(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let auth_id = auth_id(&input(q, &body)?)?;
    match waiting(&st, &auth_id)? {
        Waiting::SshCheck => {
            st.admin
                .decide_ssh_check(Request::new(proto::DecideSshCheckRequest {
                    auth_id,
                    approve: true,
                }))
                .await?;
            Ok(Json(json!({})))
        }
        Waiting::Login => Err(ApiError(tonic::Status::failed_precondition(format!(
            "{auth_id:?} is a machine waiting to log in: say whose node it becomes with POST /api/v1/auth/register {{\"user\": USER, \"authId\": \"{auth_id}\"}}"
        )))),
    }
}

/// `POST /api/v1/auth/reject` with `{"authId"}`: refuses a held SSH connection, or turns
/// away a machine waiting to log in.
pub(super) async fn reject(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let auth_id = auth_id(&input(q, &body)?)?;
    match waiting(&st, &auth_id)? {
        Waiting::SshCheck => {
            st.admin
                .decide_ssh_check(Request::new(proto::DecideSshCheckRequest {
                    auth_id,
                    approve: false,
                }))
                .await?;
        }
        Waiting::Login => {
            st.admin
                .reject_login(Request::new(proto::AuthIdRequest { auth_id }))
                .await?;
        }
    }
    Ok(Json(json!({})))
}
