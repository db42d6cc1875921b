//! HTTP surface of the relay, mounted on the control server's router:
//! the `/derp` upgrade, the `/derp/probe` and `/derp/latency-check` probes,
//! and the `/generate_204` captive-portal check.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::TokioIo;

use super::server::DerpServer;

const CHALLENGE_HEADER: &str = "X-Tailscale-Challenge";
const RESPONSE_HEADER: &str = "X-Tailscale-Response";

/// Routes for the relay; merge into the main router. Upgrades need the
/// server to be run with `axum::serve` (which enables HTTP/1.1 upgrades).
pub fn router(server: DerpServer) -> Router {
    Router::new()
        .route("/derp", get(derp_upgrade))
        .route("/derp/probe", get(probe).head(probe))
        .route("/derp/latency-check", get(probe).head(probe))
        .route("/generate_204", get(generate_204))
        .with_state(server)
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, tokens: &[&str]) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                tokens
                    .iter()
                    .any(|want| t.trim().eq_ignore_ascii_case(want))
            })
        })
    })
}

async fn derp_upgrade(State(server): State<DerpServer>, mut req: Request) -> Response {
    let headers = req.headers();
    // "websocket" is accepted like Go's handler does, but the stream is
    // spoken as raw DERP: WebSocket framing is not implemented here.
    if !header_has_token(headers, header::UPGRADE, &["derp", "websocket"])
        || !header_has_token(headers, header::CONNECTION, &["upgrade"])
    {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "DERP requires connection upgrade",
        )
            .into_response();
    }
    // Derp-Fast-Start is ignored: hyper always writes the 101, so the client
    // gets the normal path, which it also accepts.
    let addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let public_key = server.public_key();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                server
                    .serve_conn_with_addr(TokioIo::new(upgraded), true, addr)
                    .await
            }
            Err(e) => tracing::debug!(error = %e, "derp upgrade failed"),
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("DERP"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert("Derp-Version", HeaderValue::from_static("2"));
    if let Ok(v) = HeaderValue::from_str(&hex::encode(public_key)) {
        h.insert("Derp-Public-Key", v);
    }
    resp
}

async fn probe() -> impl IntoResponse {
    (StatusCode::OK, [(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")])
}

fn valid_challenge(c: &str) -> bool {
    c.len() <= 64
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

async fn generate_204(headers: HeaderMap) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    if let Some(c) = headers.get(CHALLENGE_HEADER).and_then(|v| v.to_str().ok()) {
        if !c.is_empty() && valid_challenge(c) {
            if let Ok(v) = HeaderValue::from_str(&format!("response {c}")) {
                h.insert(RESPONSE_HEADER, v);
            }
        }
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate, no-transform, max-age=0"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_rules() {
        assert!(valid_challenge("abc.DEF_1:2-3"));
        assert!(!valid_challenge("bad challenge"));
        assert!(!valid_challenge(&"a".repeat(65)));
        assert!(valid_challenge(&"a".repeat(64)));
    }
}
