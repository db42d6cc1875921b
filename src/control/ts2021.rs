//! `POST /ts2021`: the HTTP/1.1 upgrade into a Noise session carrying HTTP/2.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;

use super::context::ControlState;
use super::limits::{
    session_places, SessionIdentity, IDENTIFY_WITHIN, MAX_MAP_BODY, MAX_REGISTER_BODY,
};
use super::noise_peer::NoisePeer;
use super::{map, register, ssh_check};
use crate::metrics::SessionEnd;
use crate::noise::{accept_initiation, until_silent, NoiseStream};

const UPGRADE_PROTO: &str = "tailscale-control-protocol";
const HANDSHAKE_HEADER: &str = "x-tailscale-handshake";
/// hyper pings a session's peer this long after its last answer, so a live peer that has
/// nothing else to say is still heard from twice a minute.
const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// A session whose peer sent nothing at all for this long (two pings unanswered, no
/// WINDOW_UPDATE for what it was sent) is closed, so its node goes offline.
const SILENCE: std::time::Duration = std::time::Duration::from_secs(90);
/// hyper's own limit on an unanswered ping, only a backstop now: a ping queued behind a
/// full write buffer to a peer that reads slowly is late, not lost (see `noise::Heard`).
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// Bodies of the other routes inside a session (none takes one today).
const MAX_OTHER_BODY: usize = 16 << 10;

pub async fn upgrade(
    State(st): State<Arc<ControlState>>,
    ConnectInfo(addr): ConnectInfo<std::net::SocketAddr>,
    mut req: Request,
) -> Response {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTO));
    if !wants_upgrade {
        return (
            StatusCode::BAD_REQUEST,
            "this endpoint needs `Upgrade: tailscale-control-protocol` (it is for Tailscale clients)",
        )
            .into_response();
    }
    let Some(init_b64) = req
        .headers()
        .get(HANDSHAKE_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "missing X-Tailscale-Handshake header",
        )
            .into_response();
    };
    let init = match base64::engine::general_purpose::STANDARD.decode(init_b64.trim()) {
        Ok(b) => b,
        Err(_) => {
            return (
                StatusCode::BAD_REQUEST,
                "X-Tailscale-Handshake is not base64",
            )
                .into_response()
        }
    };
    // A place among the sessions not yet identified, before the handshake's work.
    let place = match session_places(&st.unidentified, &st.unidentified_by_address, addr.ip()) {
        Ok(p) => p,
        Err(r) => {
            st.count_refusal(&r);
            return (StatusCode::SERVICE_UNAVAILABLE, r.message).into_response();
        }
    };
    let accepted = match accept_initiation(&st.key, &init) {
        Ok(a) => a,
        Err(e) => {
            st.metrics.handshake(false);
            // Counted (`hydrascale_noise_handshakes_total{result="failed"}`); anyone can
            // send these, so they are not logged at info.
            tracing::debug!(error = %e, "noise handshake refused");
            return (StatusCode::BAD_REQUEST, e.to_string()).into_response();
        }
    };
    st.metrics.handshake(true);
    let identity = SessionIdentity::new(place);
    let peer = NoisePeer {
        machine_key: format!("mkey:{}", hex::encode(accepted.machine_key)),
        version: accepted.version,
        addr,
        identity: identity.clone(),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let state = st.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "ts2021 upgrade failed");
                return;
            }
        };
        let mut io = TokioIo::new(upgraded);
        if let Err(e) = io.write_all(&accepted.response).await {
            tracing::debug!(error = %e, "writing handshake response failed");
            return;
        }
        let plain = NoiseStream::new(io, accepted.rx_key, accepted.tx_key);
        let heard = plain.heard();
        tracing::debug!(machine = %peer.machine_key, version = peer.version, "noise session open");
        let metrics = state.metrics.clone();
        let svc = TowerToHyperService::new(noise_router(state, peer));
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        // The pings make a live peer speak; `SILENCE` decides when one is dead. hyper's
        // own timeout (20 s by default, then 60 s here) closed thousands of live sessions
        // at 10,000 nodes on two cores (KeepAliveTimedOut), each then a reconnect and a
        // full map: its ping waited behind data the peer was still reading.
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(PING_EVERY))
            .keep_alive_timeout(PING_TIMEOUT);
        let conn = builder.serve_connection(TokioIo::new(plain), svc);
        let unidentified = async {
            tokio::select! {
                _ = identity.wait() => std::future::pending::<()>().await,
                _ = tokio::time::sleep(IDENTIFY_WITHIN) => {}
            }
        };
        let ended = tokio::select! {
            r = until_silent(conn, &heard, SILENCE) => r,
            _ = unidentified => {
                metrics.session_ended(SessionEnd::Unidentified);
                tracing::debug!(within = ?IDENTIFY_WITHIN, "noise session closed: it did not identify itself");
                return;
            }
        };
        match ended {
            // hyper shows only "http2 error"; its Debug names the cause (a keep-alive
            // that timed out, the peer going away, an I/O error).
            Some(Err(e)) => {
                metrics.session_ended(SessionEnd::Failed);
                tracing::debug!(error = ?e, "noise http/2 session ended")
            }
            Some(Ok(())) => metrics.session_ended(SessionEnd::Closed),
            None => {
                metrics.session_ended(SessionEnd::Silent);
                tracing::debug!(silent = ?SILENCE, "noise session closed: the peer fell silent")
            }
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTO));
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp
}

/// The HTTP/2 routes available inside one Noise session.
fn noise_router(st: Arc<ControlState>, peer: NoisePeer) -> Router {
    Router::new()
        .route(
            "/machine/register",
            post(register::handle).layer(axum::extract::DefaultBodyLimit::max(MAX_REGISTER_BODY)),
        )
        .route(
            "/machine/map",
            post(map::handle).layer(axum::extract::DefaultBodyLimit::max(MAX_MAP_BODY)),
        )
        .route(
            "/machine/ssh/action/{src}/to/{dst}",
            axum::routing::get(ssh_check::action),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_IMPLEMENTED,
                "not implemented by this control server",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_OTHER_BODY))
        .layer(Extension(peer))
        .with_state(st)
}
