//! The page behind an interactive login's URL (`<server_url>/register/<auth_id>`): says
//! which machine is waiting and how an administrator lets it in, with the CLI or with the
//! form on the page (a user name and an API key, checked like the REST API's).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::ControlState;
use crate::state::{now_ms, Command, CommandOutput, DbError, LOGIN_TTL_MS};

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

/// `GET /register/{auth_id}`.
pub async fn show(State(st): State<Arc<ControlState>>, Path(auth_id): Path<String>) -> Response {
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
    let checked = crate::admin::check_api_key(&st.db.store.read(), form.api_key.trim(), now);
    if let Err(why) = checked {
        return page(
            StatusCode::UNAUTHORIZED,
            "Not registered",
            &format!("<p>{}</p>", escape(why)),
        );
    }
    let cmd = Command::CompleteLogin {
        auth_id,
        user: form.user.trim().to_string(),
        now,
    };
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
        Err(DbError::State(e)) => page(
            StatusCode::BAD_REQUEST,
            "Not registered",
            &format!("<p>{}</p>", escape(&e.to_string())),
        ),
        Err(e) => page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Not registered",
            &format!("<p>{}</p>", escape(&e.to_string())),
        ),
    }
}
