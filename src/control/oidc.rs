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
    /// The Hydrascale user: the verified e-mail address, else `preferred_username`, else `sub`.
    pub user: String,
    pub display_name: String,
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

    /// Where to send the browser for login `auth_id`.
    pub async fn authorize_url(&self, auth_id: &str, secret: &[u8]) -> Result<String, OidcError> {
        let p = self.provider().await?;
        let mut random = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut random);
        let state = format!("{auth_id}.{}", b64(&random));
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
        let auth_id = state
            .split_once('.')
            .map(|(id, _)| id.to_string())
            .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()))
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
                if info["sub"] == claims["sub"] {
                    if let (Some(c), Some(i)) = (claims.as_object_mut(), info.as_object()) {
                        for (k, v) in i {
                            c.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                    }
                }
            }
        }
        let identity = self.admit(&claims)?;
        Ok((auth_id, identity))
    }

    /// Applies the allow lists and picks the user name.
    fn admit(&self, claims: &Value) -> Result<Identity, OidcError> {
        let email = claims["email"]
            .as_str()
            .filter(|_| claims["email_verified"].as_bool() != Some(false))
            .map(str::to_lowercase);
        let username = claims["preferred_username"].as_str();
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
        if !c.allowed_users.is_empty()
            && !c.allowed_users.iter().any(|u| {
                email.as_deref().is_some_and(|e| u.eq_ignore_ascii_case(e))
                    || Some(u.as_str()) == username
            })
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
        if !crate::state::valid_user_name(&who) {
            return Err(OidcError::BadToken(format!(
                "{who:?} cannot be a user name here (letters, digits, '.', '_', '-', '@'; at most 63)"
            )));
        }
        let display_name = claims["name"]
            .as_str()
            .or(claims.pointer("/attributes/name").and_then(Value::as_str))
            .unwrap_or_default()
            .to_string();
        Ok(Identity {
            user: who,
            display_name,
        })
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
