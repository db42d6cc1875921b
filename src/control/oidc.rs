//! OIDC login. When `[oidc]` is configured, the URL a machine shows for its interactive
//! login sends the person at the browser to the identity provider (authorization code
//! flow with PKCE, provider found by discovery); the callback here exchanges the code,
//! checks the ID token (signature against the provider's JWKS, issuer, audience, expiry,
//! nonce), applies `allowed_domains` / `allowed_users` / `allowed_groups`, and registers
//! the machine for the user the provider names (created on first login).
//!
//! Any replica can finish a login another replica started: the PKCE verifier and the
//! nonce are derived from the login's `state` with the cluster's shared control key, so
//! nothing is stored between the redirect and the callback.
//!
//! Who logged in is the pair (issuer, `sub`): users are found by it, never by e-mail or
//! `preferred_username`, which providers let people choose or change. An e-mail address
//! counts (for the allow lists and as the name a new user is given) only when the
//! provider says `email_verified: true`, the JSON boolean. The confirmation the person
//! gives before a machine joins their account travels as a [`Ticket`], sealed with the
//! control key and bound to the browser's login cookie.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::OidcConfig;

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider could not be used ({0}); check oidc.issuer and that this replica reaches it")]
    Provider(String),
    #[error("this login link is not valid here (it may be from another server or damaged); run `tailscale up` again")]
    BadState,
    #[error("the identity provider did not log you in: {0}")]
    Denied(String),
    #[error("the identity provider's ID token was refused: {0}")]
    BadToken(String),
    #[error("{0} may not join this tailnet (oidc.allowed_domains, allowed_users, allowed_groups); ask its administrator")]
    NotAllowed(String),
}

/// Who the provider says logged in.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The provider's issuer (without a trailing '/') and the subject it gives the person:
    /// the identity itself.
    pub issuer: String,
    pub subject: String,
    /// The e-mail address, only when the provider verified it (lowercase).
    pub email: Option<String>,
    /// The name a new user for this identity is given (made unique when applied): the
    /// verified e-mail address, else `preferred_username`, else the subject.
    pub name: String,
    pub display_name: String,
    /// The `picture` claim when it is an http(s) URL.
    pub picture: Option<String>,
}

/// What the confirmation page hands to its own form: who logged in, for which waiting
/// machine, in which browser session (`session`, the login cookie's value), until when.
/// Sealed with the control key, so any replica can take the form and none can be fooled
/// into another identity.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ticket {
    pub auth_id: String,
    pub session: String,
    pub issuer: String,
    pub subject: String,
    pub name: String,
    pub display_name: String,
    /// The verified e-mail address and the picture the provider gave (empty: none); the
    /// user's profile takes them.
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub picture_url: String,
    /// Unix milliseconds after which the ticket is refused.
    pub expires: i64,
}

/// How long the person has to confirm after logging in at the provider.
pub const TICKET_TTL_MS: i64 = 10 * 60 * 1000;

/// HMAC-SHA256 of `label` and `data` under `secret`; `None` never happens (HMAC takes
/// keys of any length) but is not unwrapped.
fn mac(secret: &[u8], label: &str, data: &str) -> Option<hmac::Hmac<Sha256>> {
    use hmac::Mac;
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(secret).ok()?;
    m.update(label.as_bytes());
    m.update(&[0]);
    m.update(data.as_bytes());
    Some(m)
}

impl Ticket {
    /// `<payload>.<mac>`, both base64url.
    pub fn seal(&self, secret: &[u8]) -> String {
        use hmac::Mac;
        let payload = b64(&serde_json::to_vec(self).unwrap_or_default());
        let tag = mac(secret, "confirm", &payload)
            .map(|m| b64(&m.finalize().into_bytes()))
            .unwrap_or_default();
        format!("{payload}.{tag}")
    }

    /// The ticket in `text` if this cluster sealed it and it has not expired at `now`.
    pub fn open(secret: &[u8], text: &str, now: i64) -> Option<Ticket> {
        use hmac::Mac;
        let (payload, tag) = text.split_once('.')?;
        let tag = B64.decode(tag).ok()?;
        mac(secret, "confirm", payload)?.verify_slice(&tag).ok()?;
        let t: Ticket = serde_json::from_slice(&B64.decode(payload).ok()?).ok()?;
        (t.expires > now).then_some(t)
    }
}

/// Equality of two secrets without an early exit on the first difference.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && std::hint::black_box(
            a.bytes()
                .zip(b.bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y)),
        ) == 0
}

/// A new random login session id (the login cookie's value and the `state`'s tail).
pub fn new_session() -> String {
    let mut random = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut random);
    b64(&random)
}

/// The login id and session of a `state`, if it has the shape this server gives it.
pub fn parse_state(state: &str) -> Option<(&str, &str)> {
    let (id, session) = state.split_once('.')?;
    let ok = !id.is_empty()
        && id.chars().all(|c| c.is_ascii_hexdigit())
        && !session.is_empty()
        && session
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    ok.then_some((id, session))
}

struct Provider {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    userinfo_endpoint: Option<String>,
    jwks_uri: String,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct Oidc {
    config: OidcConfig,
    client_secret: String,
    redirect_uri: String,
    http: HttpClient,
    provider: tokio::sync::OnceCell<Provider>,
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// HMAC-SHA256 of `label` and `state` under the control key, as PKCE verifier or nonce
/// (43 URL-safe characters).
fn derive(secret: &[u8], label: &str, state: &str) -> String {
    use hmac::Mac;
    let mut mac = match hmac::Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm is never taken.
        Err(_) => return String::new(),
    };
    mac.update(label.as_bytes());
    mac.update(&[0]);
    mac.update(state.as_bytes());
    b64(&mac.finalize().into_bytes())
}

impl Oidc {
    /// `None` when OIDC login is not configured.
    pub fn new(config: &crate::config::Config) -> Result<Option<Arc<Oidc>>, String> {
        let c = &config.oidc;
        if c.issuer.is_empty() {
            return Ok(None);
        }
        let client_secret = match &c.client_secret_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("oidc.client_secret_file {}: {e}", path.display()))?
                .trim()
                .to_string(),
            None => c.client_secret.clone(),
        };
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("TLS for OIDC: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build(tls);
        Ok(Some(Arc::new(Oidc {
            config: c.clone(),
            client_secret,
            redirect_uri: format!("{}/oidc/callback", config.server_url()),
            http,
            provider: tokio::sync::OnceCell::new(),
        })))
    }

    async fn request(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<(http::StatusCode, Value), OidcError> {
        let url = req.uri().to_string();
        let fut = self.http.request(req);
        let resp = tokio::time::timeout(std::time::Duration::from_secs(15), fut)
            .await
            .map_err(|_| OidcError::Provider(format!("{url}: no answer within 15 s")))?
            .map_err(|e| OidcError::Provider(format!("{url}: {e}")))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| OidcError::Provider(format!("{url}: {e}")))?
            .to_bytes();
        let json = serde_json::from_slice(&body)
            .map_err(|_| OidcError::Provider(format!("{url} answered {status} without JSON")))?;
        Ok((status, json))
    }

    async fn get_json(&self, url: &str, bearer: Option<&str>) -> Result<Value, OidcError> {
        let mut b = http::Request::get(url).header("accept", "application/json");
        if let Some(t) = bearer {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = b
            .body(Full::new(Bytes::new()))
            .map_err(|e| OidcError::Provider(format!("{url}: {e}")))?;
        match self.request(req).await? {
            (s, v) if s.is_success() => Ok(v),
            (s, v) => Err(OidcError::Provider(format!("{url} answered {s}: {v}"))),
        }
    }

    async fn provider(&self) -> Result<&Provider, OidcError> {
        self.provider
            .get_or_try_init(|| async {
                let issuer = self.config.issuer.trim_end_matches('/');
                let url = format!("{issuer}/.well-known/openid-configuration");
                let d = self.get_json(&url, None).await?;
                let field = |k: &str| {
                    d[k].as_str()
                        .map(str::to_string)
                        .ok_or_else(|| OidcError::Provider(format!("{url} has no {k}")))
                };
                let advertised = field("issuer")?;
                if advertised.trim_end_matches('/') != issuer {
                    return Err(OidcError::Provider(format!(
                        "the provider calls itself {advertised:?}, not {issuer:?}; set oidc.issuer to its issuer"
                    )));
                }
                Ok(Provider {
                    issuer: advertised,
                    authorization_endpoint: field("authorization_endpoint")?,
                    token_endpoint: field("token_endpoint")?,
                    userinfo_endpoint: field("userinfo_endpoint").ok(),
                    jwks_uri: field("jwks_uri")?,
                })
            })
            .await
    }

    /// Where to send the browser for login `auth_id`, in the browser session `session`
    /// (see [`new_session`]; the callback accepts the login only in that session).
    pub async fn authorize_url(
        &self,
        auth_id: &str,
        session: &str,
        secret: &[u8],
    ) -> Result<String, OidcError> {
        let p = self.provider().await?;
        let state = format!("{auth_id}.{session}");
        let verifier = derive(secret, "pkce", &state);
        let challenge = b64(&Sha256::digest(verifier.as_bytes()));
        let query = serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", self.config.client_id.as_str()),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("scope", self.config.scopes.join(" ").as_str()),
            ("state", state.as_str()),
            ("nonce", derive(secret, "nonce", &state).as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .map_err(|e| OidcError::Provider(e.to_string()))?;
        let sep = if p.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!("{}{sep}{query}", p.authorization_endpoint))
    }

    /// Finishes a login at the callback: the login id and who logged in.
    pub async fn finish(
        &self,
        code: &str,
        state: &str,
        secret: &[u8],
        now_s: i64,
    ) -> Result<(String, Identity), OidcError> {
        let auth_id = parse_state(state)
            .map(|(id, _)| id.to_string())
            .ok_or(OidcError::BadState)?;
        let p = self.provider().await?;
        let form = serde_urlencoded::to_string([
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("code_verifier", derive(secret, "pkce", state).as_str()),
        ])
        .map_err(|e| OidcError::Provider(e.to_string()))?;
        let basic = b64_std(&format!(
            "{}:{}",
            form_encode(&self.config.client_id),
            form_encode(&self.client_secret)
        ));
        let req = http::Request::post(&p.token_endpoint)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .header("authorization", format!("Basic {basic}"))
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        let (status, tokens) = self.request(req).await?;
        if !status.is_success() {
            let why = tokens["error_description"]
                .as_str()
                .or(tokens["error"].as_str())
                .unwrap_or("no reason given");
            return Err(OidcError::Denied(format!(
                "the code was not accepted ({status}: {why})"
            )));
        }
        let id_token = tokens["id_token"].as_str().ok_or_else(|| {
            OidcError::BadToken(
                "the token response has no id_token (is \"openid\" in oidc.scopes?)".into(),
            )
        })?;
        let jwks = self.get_json(&p.jwks_uri, None).await?;
        let mut claims = verify_id_token(
            id_token,
            &jwks,
            &p.issuer,
            &self.config.client_id,
            &derive(secret, "nonce", state),
            now_s,
        )?;
        // Many providers put e-mail and groups only in the userinfo answer.
        if let (Some(url), Some(access)) = (&p.userinfo_endpoint, tokens["access_token"].as_str()) {
            if let Ok(info) = self.get_json(url, Some(access)).await {
                merge_userinfo(&mut claims, &info);
            }
        }
        let identity = self.admit(&claims, &p.issuer)?;
        Ok((auth_id, identity))
    }

    /// Applies the allow lists and picks the name a new user would get.
    fn admit(&self, claims: &Value, issuer: &str) -> Result<Identity, OidcError> {
        let email = verified_email(claims);
        let username = claims["preferred_username"]
            .as_str()
            .filter(|u| !u.is_empty());
        let sub = claims["sub"].as_str().unwrap_or_default();
        let who = email
            .clone()
            .or(username.map(str::to_string))
            .unwrap_or(sub.to_string());
        let c = &self.config;
        if !c.allowed_domains.is_empty() {
            let domain = email
                .as_deref()
                .and_then(|e| e.rsplit_once('@'))
                .map(|(_, d)| d);
            if !domain.is_some_and(|d| c.allowed_domains.iter().any(|a| a.eq_ignore_ascii_case(d)))
            {
                return Err(OidcError::NotAllowed(who));
            }
        }
        // A verified address or the subject: `preferred_username` is whatever the person
        // or the provider's other tenants chose, and lets nobody in.
        if !c.allowed_users.is_empty()
            && !c
                .allowed_users
                .iter()
                .any(|u| email.as_deref().is_some_and(|e| u.eq_ignore_ascii_case(e)) || u == sub)
        {
            return Err(OidcError::NotAllowed(who));
        }
        if !c.allowed_groups.is_empty() {
            let groups: Vec<&str> = claims["groups"]
                .as_array()
                .map(|g| g.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if !groups
                .iter()
                .any(|g| c.allowed_groups.iter().any(|a| a == g))
            {
                return Err(OidcError::NotAllowed(who));
            }
        }
        // A name that cannot be a user name here becomes one the state machine makes
        // up (`user-<id>`); the identity, not the name, is who this is.
        let name = [email.as_deref(), username, Some(sub)]
            .into_iter()
            .flatten()
            .find(|n| crate::state::valid_user_name(n))
            .unwrap_or_default()
            .to_string();
        let display_name = claims["name"]
            .as_str()
            .or(claims.pointer("/attributes/name").and_then(Value::as_str))
            .unwrap_or_default()
            .to_string();
        let picture = claims["picture"]
            .as_str()
            .and_then(crate::state::Profile::checked_picture_url);
        Ok(Identity {
            issuer: issuer.trim_end_matches('/').to_string(),
            subject: sub.to_string(),
            email,
            name,
            display_name,
            picture,
        })
    }
}

/// The e-mail address of `claims` if, and only if, the provider verified it: the
/// `email_verified` claim is the JSON boolean `true` (absent, `false`, and the string
/// `"true"` some providers send all leave the address unverified).
pub fn verified_email(claims: &Value) -> Option<String> {
    let verified = claims.get("email_verified") == Some(&Value::Bool(true));
    claims["email"]
        .as_str()
        .filter(|e| verified && !e.is_empty())
        .map(str::to_lowercase)
}

/// Adds to the ID token's `claims` what the userinfo answer `info` has and they lack,
/// if `info` is about the same subject. `email` and `email_verified` come as a pair from
/// one source, so one source's address is never vouched for by the other's flag.
pub fn merge_userinfo(claims: &mut Value, info: &Value) {
    if info["sub"] != claims["sub"] {
        return;
    }
    let own_email = claims.get("email").is_some();
    if let (Some(c), Some(i)) = (claims.as_object_mut(), info.as_object()) {
        for (k, v) in i {
            if own_email && k == "email_verified" {
                continue;
            }
            c.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

fn b64_std(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// `application/x-www-form-urlencoded` for one value, as client_secret_basic wants.
fn form_encode(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|e| e.trim_start_matches('=').to_string())
        .unwrap_or_default()
}

/// Checks a compact JWS ID token against the provider's keys (RS256 or ES256) and its
/// claims (issuer, audience, expiry with one minute of leeway, nonce); the claims.
pub fn verify_id_token(
    token: &str,
    jwks: &Value,
    issuer: &str,
    client_id: &str,
    nonce: &str,
    now_s: i64,
) -> Result<Value, OidcError> {
    let bad = |m: &str| OidcError::BadToken(m.to_string());
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not a signed JWT"));
    };
    let decode = |x: &str| {
        B64.decode(x.trim_end_matches('='))
            .map_err(|_| bad("bad base64"))
    };
    let header: Value = serde_json::from_slice(&decode(h)?).map_err(|_| bad("bad header"))?;
    let claims: Value = serde_json::from_slice(&decode(p)?).map_err(|_| bad("bad claims"))?;
    let sig = decode(s)?;
    let alg = header["alg"].as_str().unwrap_or_default();
    let kid = header["kid"].as_str();
    let keys = jwks["keys"]
        .as_array()
        .ok_or_else(|| bad("the provider's JWKS has no keys"))?;
    let kty = match alg {
        "RS256" => "RSA",
        "ES256" => "EC",
        other => {
            return Err(OidcError::BadToken(format!(
                "signature algorithm {other:?} is not accepted (RS256, ES256)"
            )))
        }
    };
    let key = keys
        .iter()
        .find(|k| k["kty"] == kty && kid.is_none_or(|id| k["kid"] == id))
        .ok_or_else(|| bad("no key of the provider's JWKS matches the token"))?;
    let field = |k: &str| {
        key[k]
            .as_str()
            .ok_or_else(|| bad("incomplete key"))
            .and_then(decode)
    };
    let signed = format!("{h}.{p}");
    let ok = match alg {
        "RS256" => ring::signature::RsaPublicKeyComponents {
            n: field("n")?,
            e: field("e")?,
        }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            signed.as_bytes(),
            &sig,
        )
        .is_ok(),
        _ => {
            let mut point = vec![4u8];
            point.extend(field("x")?);
            point.extend(field("y")?);
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                point,
            )
            .verify(signed.as_bytes(), &sig)
            .is_ok()
        }
    };
    if !ok {
        return Err(bad("its signature does not verify with the provider's key"));
    }
    if claims["iss"].as_str().map(|i| i.trim_end_matches('/')) != Some(issuer.trim_end_matches('/'))
    {
        return Err(bad("it was issued by another issuer"));
    }
    let aud_ok = match &claims["aud"] {
        Value::String(a) => a == client_id,
        Value::Array(a) => a.iter().any(|x| x == client_id),
        _ => false,
    };
    if !aud_ok {
        return Err(bad("it is meant for another client (aud)"));
    }
    if claims["exp"].as_i64().is_none_or(|e| e + 60 < now_s) {
        return Err(bad("it has expired"));
    }
    if claims["nonce"].as_str() != Some(nonce) {
        return Err(bad("its nonce does not belong to this login"));
    }
    if claims["sub"].as_str().is_none_or(str::is_empty) {
        return Err(bad("it names no subject"));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_boolean_true_verifies_an_email() {
        let with = |v: Option<Value>| {
            let mut c = serde_json::json!({"sub": "s", "email": "Ann@Example.com"});
            if let Some(v) = v {
                c["email_verified"] = v;
            }
            verified_email(&c)
        };
        assert_eq!(
            with(Some(Value::Bool(true))),
            Some("ann@example.com".into())
        );
        for v in [
            None,
            Some(Value::Bool(false)),
            Some(Value::String("true".into())),
            Some(serde_json::json!(1)),
            Some(Value::Null),
        ] {
            assert_eq!(with(v.clone()), None, "{v:?}");
        }
        assert_eq!(
            verified_email(&serde_json::json!({"email": "", "email_verified": true})),
            None
        );
    }

    fn provider_with(edit: impl FnOnce(&mut OidcConfig)) -> Arc<Oidc> {
        let mut c = crate::config::Config::default();
        c.oidc.issuer = "https://idp.example".into();
        c.oidc.client_id = "h".into();
        c.oidc.client_secret = "s".into();
        edit(&mut c.oidc);
        Oidc::new(&c).expect("config").expect("oidc on")
    }

    #[test]
    fn allow_lists_and_names_count_only_verified_addresses() {
        let claims = |sub: &str, verified: Option<Value>| {
            let mut c = serde_json::json!({
                "sub": sub, "email": "ann@example.com", "preferred_username": "ann"
            });
            if let Some(v) = verified {
                c["email_verified"] = v;
            }
            c
        };
        let unverified = [None, Some(Value::Bool(false)), Some(Value::from("true"))];
        let domains = provider_with(|c| c.allowed_domains = vec!["example.com".into()]);
        let users = provider_with(|c| {
            c.allowed_users = vec!["ann@example.com".into(), "ann".into(), "s-9".into()]
        });
        for v in &unverified {
            for o in [&domains, &users] {
                let e = o.admit(&claims("s-1", v.clone()), "https://idp.example/");
                assert!(matches!(e, Err(OidcError::NotAllowed(_))), "{v:?}: {e:?}");
            }
        }
        // The subject is an identity the provider vouches for; preferred_username is not.
        let by_sub = users
            .admit(&claims("s-9", None), "https://idp.example/")
            .expect("listed subject");
        assert_eq!(
            by_sub.name, "ann",
            "an unverified address does not name the user"
        );
        assert_eq!(by_sub.email, None);
        assert_eq!(
            (by_sub.issuer.as_str(), by_sub.subject.as_str()),
            ("https://idp.example", "s-9")
        );
        let verified = domains
            .admit(
                &claims("s-1", Some(Value::Bool(true))),
                "https://idp.example",
            )
            .expect("verified address in the domain");
        assert_eq!(verified.name, "ann@example.com");
        assert_eq!(verified.email.as_deref(), Some("ann@example.com"));
    }

    #[test]
    fn userinfo_never_vouches_for_the_id_tokens_email() {
        let mut claims = serde_json::json!({"sub": "s", "email": "a@x.test"});
        merge_userinfo(
            &mut claims,
            &serde_json::json!({"sub": "s", "email": "b@y.test", "email_verified": true, "name": "A"}),
        );
        assert_eq!(verified_email(&claims), None);
        assert_eq!(claims["name"], "A");
        // Without an address of its own, the pair comes from userinfo.
        let mut claims = serde_json::json!({"sub": "s"});
        merge_userinfo(
            &mut claims,
            &serde_json::json!({"sub": "s", "email": "b@y.test", "email_verified": true}),
        );
        assert_eq!(verified_email(&claims), Some("b@y.test".into()));
        // Another subject's answer is ignored.
        let mut claims = serde_json::json!({"sub": "s"});
        merge_userinfo(
            &mut claims,
            &serde_json::json!({"sub": "t", "email": "b@y.test", "email_verified": true}),
        );
        assert_eq!(verified_email(&claims), None);
    }

    #[test]
    fn tickets_open_only_with_the_key_unchanged_and_in_time() {
        let t = Ticket {
            auth_id: "ab12".into(),
            session: "sess".into(),
            issuer: "https://idp".into(),
            subject: "s".into(),
            name: "n".into(),
            display_name: String::new(),
            email: String::new(),
            picture_url: String::new(),
            expires: 1000,
        };
        let sealed = t.seal(b"k1");
        assert_eq!(Ticket::open(b"k1", &sealed, 999), Some(t.clone()));
        assert_eq!(Ticket::open(b"k1", &sealed, 1000), None);
        assert_eq!(Ticket::open(b"k2", &sealed, 0), None);
        // Another identity in the payload, with the old tag, does not open.
        let (_, tag) = sealed.split_once('.').unwrap();
        let forged = Ticket {
            subject: "admin".into(),
            ..t
        };
        let (payload, _) = forged
            .seal(b"other")
            .split_once('.')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap();
        assert_eq!(Ticket::open(b"k1", &format!("{payload}.{tag}"), 0), None);
        assert_eq!(Ticket::open(b"k1", "garbage", 0), None);
        assert!(
            same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("ab", "abc")
        );
    }

    #[test]
    fn states_have_an_id_and_a_session() {
        assert_eq!(parse_state("0a1b.xY-_9"), Some(("0a1b", "xY-_9")));
        for bad in [
            "",
            "zz.forged",
            "0a1b.",
            ".abc",
            "0a1b",
            "0a1b.a b",
            "0a1b.a.b",
        ] {
            assert_eq!(parse_state(bad), None, "{bad}");
        }
    }

    #[test]
    fn derived_secrets_depend_on_key_label_and_state() {
        let a = derive(b"k1", "pkce", "abc.1");
        assert_eq!(a.len(), 43);
        assert_eq!(a, derive(b"k1", "pkce", "abc.1"));
        assert_ne!(a, derive(b"k2", "pkce", "abc.1"));
        assert_ne!(a, derive(b"k1", "nonce", "abc.1"));
        assert_ne!(a, derive(b"k1", "pkce", "abc.2"));
    }

    #[test]
    fn tokens_with_bad_shape_or_unknown_keys_are_refused() {
        let jwks = serde_json::json!({"keys": []});
        for t in ["", "a.b", "a.b.c.d", "!!.!!.!!"] {
            assert!(verify_id_token(t, &jwks, "i", "c", "n", 0).is_err(), "{t}");
        }
        let h = b64(br#"{"alg":"none"}"#);
        let p = b64(br#"{"iss":"i","aud":"c","exp":9999999999,"nonce":"n","sub":"s"}"#);
        let e = verify_id_token(&format!("{h}.{p}."), &jwks, "i", "c", "n", 0).unwrap_err();
        assert!(e.to_string().contains("not accepted"), "{e}");
        let h = b64(br#"{"alg":"RS256","kid":"x"}"#);
        let e = verify_id_token(&format!("{h}.{p}.AAAA"), &jwks, "i", "c", "n", 0).unwrap_err();
        assert!(e.to_string().contains("no key"), "{e}");
    }
}
