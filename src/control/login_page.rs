//! The page behind an interactive login's URL (`<server_url>/register/<auth_id>`): says
//! which machine is waiting and how an administrator lets it in, with the CLI or with the
//! form on the page (a user name and an API key, checked like the REST API's). With OIDC
//! configured it sends the browser to the identity provider instead (`?admin` still shows
//! the page), and `/oidc/callback` finishes the login for the user the provider names.
//!
//! The same goes for Tailscale SSH checks (`<server_url>/ssh/check/<auth_id>`): with OIDC
//! the connecting user logs in at the provider and must be the owner of the connecting
//! node; without it an administrator approves (CLI, or the form with an API key).
//!
//! After an OIDC login nothing joins an account yet: the person sees which machine is
//! waiting and for which account, and approves or cancels with a form (`POST
//! /oidc/confirm`), so a login link someone else sent cannot add their machine to your
//! account unseen. The redirect to the provider sets a login cookie (`SameSite=Lax`,
//! `HttpOnly`) whose random value is also the tail of the OIDC `state`: the callback and
//! the confirmation are accepted only in the browser that started the login, and the
//! form's ticket is sealed with the control key and names that cookie. Every page here
//! forbids framing (`X-Frame-Options: DENY`, CSP `frame-ancestors 'none'`; see
//! `control::router`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::context::ControlState;
use super::oidc::{self, Identity, Ticket};
use crate::state::{
    now_ms, Command, CommandOutput, DbError, Profile, SshCheck, StateError, UserOrigin,
    LOGIN_TTL_MS, SSH_CHECK_TTL_MS,
};

/// The policy of every HTML page: nothing loads but its own inline style, forms post
/// only here, and no other site may frame it.
const PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                        base-uri 'none'; frame-ancestors 'none'";

/// The login cookie of login `auth_id` (one per login, so two logins in one browser do
/// not overwrite each other).
fn cookie_name(auth_id: &str) -> String {
    format!("hydrascale_login_{auth_id}")
}

/// The value of cookie `name` the browser sent.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether the browser holds login `auth_id`'s cookie with value `session`.
fn in_session(headers: &HeaderMap, auth_id: &str, session: &str) -> bool {
    cookie(headers, &cookie_name(auth_id)).is_some_and(|c| oidc::same_secret(&c, session))
}

fn set_cookie(st: &ControlState, resp: &mut Response, auth_id: &str, value: &str, max_age: i64) {
    let secure = if st.config.server_url().starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let text = format!(
        "{}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}",
        cookie_name(auth_id)
    );
    if let Ok(v) = HeaderValue::from_str(&text) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// Sends the browser to the identity provider for login (or SSH check) `auth_id`, in a
/// new login session.
async fn to_provider(
    st: &ControlState,
    oidc: &oidc::Oidc,
    auth_id: &str,
    failed: &str,
) -> Response {
    let session = oidc::new_session();
    match oidc.authorize_url(auth_id, &session, st.key.secret()).await {
        Ok(url) => {
            let mut r = axum::response::Redirect::to(&url).into_response();
            set_cookie(st, &mut r, auth_id, &session, LOGIN_TTL_MS / 1000);
            r
        }
        Err(e) => page(
            StatusCode::BAD_GATEWAY,
            failed,
            &format!("<p>{}</p>", escape(&e.to_string())),
        ),
    }
}

/// Whether a form post comes from this server's own pages: browsers name the page's
/// origin in `Origin`; a post without one (not from a browser) still needs the ticket
/// and the cookie.
fn same_origin(st: &ControlState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let url = st.config.server_url();
    let ours = match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.split('/').next().unwrap_or(rest)),
        None => url.to_string(),
    };
    origin.to_str().is_ok_and(|o| o.eq_ignore_ascii_case(&ours))
}

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
    let mut r = (status, Html(html)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    // Confirmation tickets and login results are for this browser, now.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
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
        return to_provider(&st, oidc, &auth_id, "Login unavailable").await;
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

/// `GET /oidc/callback`: the identity provider sends the browser back here. Nothing is
/// written yet: the person confirms on the page this answers with.
pub async fn oidc_callback(
    State(st): State<Arc<ControlState>>,
    headers: HeaderMap,
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
    let Some((started, session)) = oidc::parse_state(&state) else {
        return refused(
            StatusCode::BAD_REQUEST,
            oidc::OidcError::BadState.to_string(),
        );
    };
    // The login must come back to the browser that started it (else a link to someone
    // else's provider login could log this browser in as them). Checked before the code
    // is spent at the provider.
    if !in_session(&headers, started, session) {
        return refused(
            StatusCode::FORBIDDEN,
            "this login was started in another browser, or its cookie expired; open the link `tailscale up` printed again, in this browser".into(),
        );
    }
    let session = session.to_string();
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
        return ssh_check_passed(&st, check, &who, now).await;
    }
    confirm_page(&st, auth_id, session, who, now)
}

/// "Add this device to <user>'s account?", with the ticket its form sends back.
fn confirm_page(
    st: &ControlState,
    auth_id: String,
    session: String,
    who: Identity,
    now: i64,
) -> Response {
    let Some(p) = st
        .db
        .store
        .read()
        .pending_logins
        .get(&auth_id)
        .filter(|p| p.created > now.saturating_sub(LOGIN_TTL_MS))
        .cloned()
    else {
        return page(
            StatusCode::NOT_FOUND,
            "Login not found",
            "<p>No machine is waiting to log in with this link any more. It may have \
             expired (after an hour) or been completed. Run <code>tailscale up</code> on the \
             machine again and open the link it prints.</p>",
        );
    };
    let (account, is_new) = {
        let t = st.db.store.read();
        match t.user_by_identity(&who.issuer, &who.subject) {
            Some(u) => (u.name.clone(), false),
            None => {
                let unlinked = t
                    .user_by_name(&who.name)
                    .filter(|u| u.origin == UserOrigin::Unrecorded && u.oidc.is_none());
                if unlinked.is_some() {
                    let e = StateError::UnlinkedUser {
                        name: who.name.clone(),
                        issuer: who.issuer.clone(),
                        subject: who.subject.clone(),
                    };
                    return page(
                        StatusCode::FORBIDDEN,
                        "Not added",
                        &format!("<p>{}</p>", escape(&e.to_string())),
                    );
                }
                (t.free_user_name(&who.name), true)
            }
        }
    };
    let ticket = Ticket {
        auth_id,
        session,
        issuer: who.issuer.clone(),
        subject: who.subject.clone(),
        name: who.name.clone(),
        display_name: who.display_name.clone(),
        email: who.email.clone().unwrap_or_default(),
        picture_url: who.picture.clone().unwrap_or_default(),
        expires: now.saturating_add(oidc::TICKET_TTL_MS),
    }
    .seal(st.key.secret());
    let me = match (&who.display_name, &who.email) {
        (d, Some(e)) if !d.is_empty() => format!("{d} ({e})"),
        (d, _) if !d.is_empty() => d.clone(),
        (_, Some(e)) => e.clone(),
        _ => who.name.clone(),
    };
    let question = if is_new {
        format!(
            "<p>You have no account here yet: a new one, <b>{a}</b>, is made for you.</p>\
             <p>Add the device <b>{h}</b> to <b>{a}</b>'s account?</p>",
            a = escape(&account),
            h = escape(&p.hostname),
        )
    } else {
        format!(
            "<p>Add the device <b>{h}</b> to <b>{a}</b>'s account?</p>",
            a = escape(&account),
            h = escape(&p.hostname),
        )
    };
    page(
        StatusCode::OK,
        "Add this device?",
        &format!(
            "<p>You logged in as <b>{me}</b>.</p>{question}\
             <p>The device has the machine key <code>{mkey}</code>. Approve only if you \
             just ran <code>tailscale up</code> on it yourself: whoever holds the device \
             reaches the tailnet as you.</p>\
             <form method=\"post\" action=\"/oidc/confirm\">\
             <input type=\"hidden\" name=\"ticket\" value=\"{ticket}\">\
             <button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button> \
             <button type=\"submit\" name=\"decision\" value=\"cancel\">Cancel</button></form>",
            me = escape(&me),
            mkey = escape(&p.machine_key),
            ticket = escape(&ticket),
        ),
    )
}

#[derive(Deserialize)]
pub struct Confirmation {
    #[serde(default)]
    ticket: String,
    #[serde(default)]
    decision: String,
}

/// `POST /oidc/confirm`: the confirmation page's form. Refused, changing nothing, unless
/// it carries a ticket this cluster sealed, within its ten minutes, from the browser
/// holding that login's cookie (and, when the browser names one, from this origin).
pub async fn oidc_confirm(
    State(st): State<Arc<ControlState>>,
    headers: HeaderMap,
    Form(form): Form<Confirmation>,
) -> Response {
    let now = now_ms();
    let refused = |why: &str| {
        page(
            StatusCode::FORBIDDEN,
            "Not added",
            &format!("<p>{}</p>", escape(why)),
        )
    };
    if !same_origin(&st, &headers) {
        return refused("this form was sent from another site; nothing was changed");
    }
    let Some(t) = Ticket::open(st.key.secret(), &form.ticket, now) else {
        return refused(
            "the confirmation is missing, damaged or older than ten minutes; nothing was changed. Open the link `tailscale up` printed again",
        );
    };
    if !in_session(&headers, &t.auth_id, &t.session) {
        return refused(
            "this confirmation does not belong to the login in this browser; nothing was changed",
        );
    }
    let mut resp = match form.decision.as_str() {
        "approve" => {
            let cmd = Command::OidcLogin {
                auth_id: t.auth_id.clone(),
                issuer: t.issuer,
                subject: t.subject,
                name: t.name,
                display_name: t.display_name,
                now,
                profile: Profile {
                    email: t.email,
                    picture_url: t.picture_url,
                },
            };
            match st.db.write(cmd).await {
                Err(DbError::State(e @ StateError::UnlinkedUser { .. })) => {
                    return refused(&e.to_string())
                }
                done => registered(done),
            }
        }
        "cancel" => page(
            StatusCode::OK,
            "Device not added",
            "<p>Nothing was changed; the device stays out of the tailnet. You can close \
             this page.</p>",
        ),
        _ => return refused("the form says neither approve nor cancel; nothing was changed"),
    };
    // The login is done with either way.
    set_cookie(&st, &mut resp, &t.auth_id, "", 0);
    resp
}

/// The page refusing an administrator's form whose API key is not valid, titled `title`;
/// `None` when the key is good.
fn bad_api_key(st: &ControlState, api_key: &str, now: i64, title: &str) -> Option<Response> {
    let checked = st.db.store.read().check_api_key(api_key.trim(), now);
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
    registered(st.db.write(cmd).await)
}

/// The page for the outcome of a write that registers a waiting machine.
fn registered(done: Result<CommandOutput, DbError>) -> Response {
    match done {
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
        return to_provider(&st, oidc, &auth_id, "Check unavailable").await;
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

/// The connecting user proved to be `who` at the identity provider: the check passes if
/// the connecting node's owner is that identity (by issuer and subject, not by name).
async fn ssh_check_passed(
    st: &ControlState,
    check: SshCheck,
    who: &Identity,
    now: i64,
) -> Response {
    let owner = {
        let t = st.db.store.read();
        t.nodes
            .get(&check.src)
            .filter(|n| n.tags.is_empty())
            .and_then(|n| t.users.get(&n.user_id))
            .map(|u| {
                let same = u
                    .oidc
                    .as_ref()
                    .is_some_and(|o| o.same(&who.issuer, &who.subject));
                (u.name.clone(), same)
            })
    };
    match owner {
        Some((name, true)) => decide(st, check.auth_id, true, name, now).await,
        Some(_) => page(
            StatusCode::FORBIDDEN,
            "Not approved",
            &format!(
                "<p>You logged in as {}, but the connecting device belongs to someone else. \
                 Log in as its owner, or ask an administrator.</p>",
                escape(&who.name)
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
