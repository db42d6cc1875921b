//! The page behind an interactive login's URL (`<server_url>/register/<auth_id>`): says
//! which machine is waiting and how an administrator lets it in, with the CLI or with the
//! form on the page (a user name and an API key, checked like the REST API's). With OIDC
//! configured it sends the browser to the identity provider instead (`?admin` still shows
//! the page), and `/oidc/callback` finishes the login for the user the provider names.
//!
//! The same goes for Tailscale SSH checks (`<server_url>/ssh/check/<auth_id>`): with OIDC
//! the connecting user logs in at the provider and must be the owner of the connecting
//! node; without it an administrator approves (CLI, or the form with an API key).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::ControlState;
use crate::state::{
    now_ms, Command, CommandOutput, DbError, SshCheck, LOGIN_TTL_MS, SSH_CHECK_TTL_MS,
};

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;max-width:40em;margin:3em auto;line-height:1.5}}\
         code{{background:#eee;padding:.1em .3em}}input{{margin:.2em 0 .8em}}</style></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    );
    (status, Html(html)).into_response()
}

#[derive(Deserialize)]
pub struct ShowQuery {
    admin: Option<String>,
}

/// `GET /register/{auth_id}`.
pub async fn show(
    State(st): State<Arc<ControlState>>,
    Path(auth_id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let waiting = st
        .db
        .store
        .read()
        .pending_logins
        .get(&auth_id)
        .filter(|p| p.created > now_ms().saturating_sub(LOGIN_TTL_MS))
        .cloned();
    let Some(p) = waiting else {
        return page(
            StatusCode::NOT_FOUND,
            "Login not found",
            "<p>No machine is waiting to log in with this link. It may have expired (after an \
             hour) or been completed. Run <code>tailscale up</code> on the machine again and \
             open the link it prints.</p>",
        );
    };
    if let (Some(oidc), None) = (&st.oidc, &q.admin) {
        return match oidc.authorize_url(&auth_id, st.key.secret()).await {
            Ok(url) => axum::response::Redirect::to(&url).into_response(),
            Err(e) => page(
                StatusCode::BAD_GATEWAY,
                "Login unavailable",
                &format!("<p>{}</p>", escape(&e.to_string())),
            ),
        };
    }
    let id = escape(&auth_id);
    page(
        StatusCode::OK,
        "Machine waiting to join",
        &format!(
            "<p>The machine <b>{host}</b> asked to join this tailnet (machine key \
             <code>{mkey}</code>).</p>\
             <p>An administrator lets it in on a replica with:</p>\
             <pre><code>hydrascale auth register --user USER --auth-id {id}</code></pre>\
             <p>or here, with an API key (<code>hydrascale apikeys create</code>):</p>\
             <form method=\"post\">\
             <label>User<br><input name=\"user\" required></label><br>\
             <label>API key<br><input name=\"api_key\" type=\"password\" required size=\"60\"></label><br>\
             <button type=\"submit\">Register the machine</button></form>",
            host = escape(&p.hostname),
            mkey = escape(&p.machine_key),
        ),
    )
}

#[derive(Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /oidc/callback`: the identity provider sends the browser back here.
pub async fn oidc_callback(
    State(st): State<Arc<ControlState>>,
    Query(cb): Query<Callback>,
) -> Response {
    let refused =
        |status, why: String| page(status, "Not logged in", &format!("<p>{}</p>", escape(&why)));
    let Some(oidc) = &st.oidc else {
        return refused(
            StatusCode::NOT_FOUND,
            "OIDC login is not configured on this server".into(),
        );
    };
    if let Some(e) = cb.error {
        let why = cb.error_description.unwrap_or(e);
        return refused(
            StatusCode::FORBIDDEN,
            format!("the identity provider said: {why}"),
        );
    }
    let (Some(code), Some(state)) = (cb.code, cb.state) else {
        return refused(
            StatusCode::BAD_REQUEST,
            "the callback lacks code or state; start again with `tailscale up`".into(),
        );
    };
    let now = now_ms();
    let (auth_id, who) = match oidc
        .finish(&code, &state, st.key.secret(), now / 1000)
        .await
    {
        Ok(v) => v,
        Err(e @ super::oidc::OidcError::NotAllowed(_)) => {
            return refused(StatusCode::FORBIDDEN, e.to_string())
        }
        Err(e @ super::oidc::OidcError::Provider(_)) => {
            return refused(StatusCode::BAD_GATEWAY, e.to_string())
        }
        Err(e) => return refused(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(check) = waiting_check(&st, &auth_id) {
        return ssh_check_passed(&st, check, &who.user, now).await;
    }
    // First login of this person: their user is created.
    let create = Command::CreateUser {
        name: who.user.clone(),
        display_name: who.display_name.clone(),
        now,
    };
    match st.db.write(create).await {
        Ok(_) | Err(DbError::State(crate::state::StateError::UserExists(_))) => {}
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    complete(&st, auth_id, who.user, now).await
}

/// The page refusing an administrator's form whose API key is not valid, titled `title`;
/// `None` when the key is good.
fn bad_api_key(st: &ControlState, api_key: &str, now: i64, title: &str) -> Option<Response> {
    let checked = crate::admin::check_api_key(&st.db.store.read(), api_key.trim(), now);
    checked.err().map(|why| {
        page(
            StatusCode::UNAUTHORIZED,
            title,
            &format!("<p>{}</p>", escape(why)),
        )
    })
}

#[derive(Deserialize)]
pub struct Approval {
    user: String,
    api_key: String,
}

/// `POST /register/{auth_id}`: the form above.
pub async fn approve(
    State(st): State<Arc<ControlState>>,
    Path(auth_id): Path<String>,
    Form(form): Form<Approval>,
) -> Response {
    let now = now_ms();
    if let Some(refused) = bad_api_key(&st, &form.api_key, now, "Not registered") {
        return refused;
    }
    complete(&st, auth_id, form.user.trim().to_string(), now).await
}

/// Registers the waiting machine `auth_id` for `user` and says how it went.
async fn complete(st: &ControlState, auth_id: String, user: String, now: i64) -> Response {
    let cmd = Command::CompleteLogin { auth_id, user, now };
    match st.db.write(cmd).await {
        Ok(CommandOutput::Node(n)) => page(
            StatusCode::OK,
            "Machine registered",
            &format!(
                "<p><b>{}</b> is now in the tailnet as <code>{}</code> ({}). It connects by itself; \
                 you can close this page.</p>",
                escape(&n.hostname),
                escape(&n.given_name),
                n.ipv4
            ),
        ),
        Ok(_) => page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Not registered",
            "<p>The server returned no node; try again.</p>",
        ),
        Err(e) => write_failed("Not registered", e),
    }
}

/// The page for a write the cluster refused (400: the request was wrong) or could not
/// make (503: try again), titled `title`.
fn write_failed(title: &str, e: DbError) -> Response {
    let status = match e {
        DbError::State(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    page(status, title, &format!("<p>{}</p>", escape(&e.to_string())))
}

/// The SSH check `auth_id` if a connection still waits for it.
fn waiting_check(st: &ControlState, auth_id: &str) -> Option<SshCheck> {
    st.db
        .store
        .read()
        .ssh_checks
        .get(auth_id)
        .filter(|c| c.decision.is_none())
        .filter(|c| c.created > now_ms().saturating_sub(SSH_CHECK_TTL_MS))
        .cloned()
}

/// `GET /ssh/check/{auth_id}`: the link a held SSH connection shows its user.
pub async fn show_ssh_check(
    State(st): State<Arc<ControlState>>,
    Path(auth_id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let Some(check) = waiting_check(&st, &auth_id) else {
        return page(
            StatusCode::NOT_FOUND,
            "SSH check not found",
            "<p>No SSH connection is waiting for this check. It may have been decided, or \
             expired (after 30 minutes). Connect again with <code>tailscale ssh</code>.</p>",
        );
    };
    if let (Some(oidc), None) = (&st.oidc, &q.admin) {
        return match oidc.authorize_url(&auth_id, st.key.secret()).await {
            Ok(url) => axum::response::Redirect::to(&url).into_response(),
            Err(e) => page(
                StatusCode::BAD_GATEWAY,
                "Check unavailable",
                &format!("<p>{}</p>", escape(&e.to_string())),
            ),
        };
    }
    let (src, dst) = {
        let t = st.db.store.read();
        let name = |id: u64| {
            t.nodes
                .get(&id)
                .map(|n| n.given_name.clone())
                .unwrap_or_else(|| format!("node {id}"))
        };
        (name(check.src), name(check.dst))
    };
    let id = escape(&auth_id);
    page(
        StatusCode::OK,
        "SSH connection waiting for a check",
        &format!(
            "<p><b>{src}</b> is connecting to <b>{dst}</b> as <code>{user}</code>, and the \
             tailnet policy asks for a check first.</p>\
             <p>An administrator lets it in on a replica with:</p>\
             <pre><code>hydrascale auth approve-ssh --auth-id {id}</code></pre>\
             <p>or here, with an API key (<code>hydrascale apikeys create</code>):</p>\
             <form method=\"post\">\
             <label>API key<br><input name=\"api_key\" type=\"password\" required size=\"60\"></label><br>\
             <button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button> \
             <button type=\"submit\" name=\"decision\" value=\"reject\">Refuse</button></form>",
            src = escape(&src),
            dst = escape(&dst),
            user = escape(&check.ssh_user),
        ),
    )
}

#[derive(Deserialize)]
pub struct SshDecision {
    api_key: String,
    decision: String,
}

/// `POST /ssh/check/{auth_id}`: the form above.
pub async fn decide_ssh_check(
    State(st): State<Arc<ControlState>>,
    Path(auth_id): Path<String>,
    Form(form): Form<SshDecision>,
) -> Response {
    let now = now_ms();
    if let Some(refused) = bad_api_key(&st, &form.api_key, now, "Not decided") {
        return refused;
    }
    let approve = form.decision == "approve";
    decide(&st, auth_id, approve, "administrator".into(), now).await
}

/// The connecting user proved to be `user` at the identity provider: the check passes if
/// they own the connecting node.
async fn ssh_check_passed(st: &ControlState, check: SshCheck, user: &str, now: i64) -> Response {
    let owner = {
        let t = st.db.store.read();
        t.nodes
            .get(&check.src)
            .filter(|n| n.tags.is_empty())
            .and_then(|n| t.users.get(&n.user_id))
            .map(|u| u.name.clone())
    };
    match owner {
        Some(o) if o.eq_ignore_ascii_case(user) => {
            decide(st, check.auth_id, true, user.to_string(), now).await
        }
        Some(_) => page(
            StatusCode::FORBIDDEN,
            "Not approved",
            &format!(
                "<p>You logged in as {}, but the connecting device belongs to someone else. \
                 Log in as its owner, or ask an administrator.</p>",
                escape(user)
            ),
        ),
        None => page(
            StatusCode::FORBIDDEN,
            "Not approved",
            "<p>The connecting device is tagged (it belongs to no person), so no login can \
             vouch for it; an administrator decides with <code>hydrascale auth approve-ssh</code>.</p>",
        ),
    }
}

async fn decide(
    st: &ControlState,
    auth_id: String,
    approve: bool,
    by: String,
    now: i64,
) -> Response {
    let cmd = Command::DecideSshCheck {
        auth_id,
        approve,
        by,
        now,
    };
    match st.db.write(cmd).await {
        Ok(_) if approve => page(
            StatusCode::OK,
            "SSH connection approved",
            "<p>The connection goes on by itself; you can close this page.</p>",
        ),
        Ok(_) => page(
            StatusCode::OK,
            "SSH connection refused",
            "<p>The connection was refused.</p>",
        ),
        Err(e) => write_failed("Not decided", e),
    }
}
