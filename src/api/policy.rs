//! `/api/v1/policy`: read, check and replace the tailnet policy.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};
use tonic::Request;

use super::{input, opt_time, ApiError, ApiResult, ApiState};
use crate::admin::proto;
use crate::admin::proto::admin_service_server::AdminService;

/// headscale's policy reply: `{"policy": TEXT, "updatedAt": TIME}`.
fn policy_reply(r: &proto::PolicyReply) -> Json<Value> {
    Json(json!({ "policy": r.policy, "updatedAt": opt_time(r.updated_ms) }))
}

pub(super) async fn get_policy(State(st): State<Arc<ApiState>>) -> ApiResult {
    let r = st.admin.get_policy(Request::new(proto::Empty {})).await?;
    Ok(policy_reply(r.get_ref()))
}

/// `PUT /api/v1/policy` with `{"policy": TEXT}`.
pub(super) async fn set_policy(
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

/// `POST /api/v1/policy/check` with `{"policy": TEXT}`: whether `policy set` would take it
/// (it parses, its references resolve and its tests pass), changing nothing. A refusal
/// says what is wrong, where.
pub(super) async fn check_policy(
    Query(q): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body = input(q, &body)?;
    let policy = body["policy"].as_str().unwrap_or_default();
    if !policy.trim().is_empty() {
        crate::policy::parse(policy).map_err(|e| {
            ApiError(tonic::Status::invalid_argument(format!(
                "the policy would be refused: {e}"
            )))
        })?;
    }
    Ok(Json(json!({})))
}
