//! `/api/v1/dns` (Hydrascale's own; headscale keeps DNS in its config file): the tailnet's
//! replicated DNS settings, read and replaced whole.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use tonic::Request;

use super::{ApiError, ApiResult, ApiState};
use crate::admin::proto;
use crate::admin::proto::admin_service_server::AdminService;

fn dns_reply(r: &proto::DnsReply) -> ApiResult {
    let settings: Value = serde_json::from_str(&r.settings_json)
        .map_err(|e| ApiError(tonic::Status::internal(format!("DNS settings: {e}"))))?;
    Ok(Json(json!({ "dns": settings, "replicated": r.replicated })))
}

pub(super) async fn get_dns(State(st): State<Arc<ApiState>>) -> ApiResult {
    let r = st.admin.get_dns(Request::new(proto::Empty {})).await?;
    dns_reply(r.get_ref())
}

/// `PUT /api/v1/dns` with `{"dns": {...}}` (the fields of the config file's `[dns]`;
/// absent ones take their defaults).
pub(super) async fn set_dns(State(st): State<Arc<ApiState>>, body: axum::body::Bytes) -> ApiResult {
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError(tonic::Status::invalid_argument(format!(
            "the request body is not JSON: {e}"
        )))
    })?;
    let settings = body.get("dns").cloned().unwrap_or(Value::Null);
    if !settings.is_object() {
        return Err(ApiError(tonic::Status::invalid_argument(
            "send {\"dns\": {...}} with the fields of [dns]: magic_dns, nameservers, override_local_dns, split, search_domains, extra_records",
        )));
    }
    let r = st
        .admin
        .set_dns(Request::new(proto::SetDnsRequest {
            settings_json: settings.to_string(),
        }))
        .await?;
    dns_reply(r.get_ref())
}
