//! State types as the admin API's proto messages, once: the admin gRPC service replies
//! with them, and the REST API (`crate::api`) builds its headscale-shaped JSON from them.

use super::proto;
use crate::state::Tailnet;

/// A user, with its OIDC identity (if any) and how it came to be.
pub fn user_msg(u: &crate::state::User) -> proto::User {
    let (oidc_issuer, oidc_subject) = u
        .oidc
        .as_ref()
        .map(|o| (o.issuer.clone(), o.subject.clone()))
        .unwrap_or_default();
    proto::User {
        id: u.id,
        name: u.name.clone(),
        display_name: u.display_name.clone(),
        created_ms: u.created,
        oidc_issuer,
        oidc_subject,
        origin: match u.origin {
            crate::state::UserOrigin::Admin => "admin",
            crate::state::UserOrigin::Oidc => "oidc",
            crate::state::UserOrigin::Unrecorded => "unrecorded",
        }
        .into(),
        email: u.profile.email.clone(),
        picture_url: u.profile.picture_url.clone(),
    }
}

/// A pre-auth key, owned by its user's name; `full_key` is the key itself in the reply
/// that created it, empty elsewhere (only its hash is stored).
pub fn key_msg(t: &Tailnet, k: &crate::state::PreAuthKey, full_key: String) -> proto::PreAuthKey {
    proto::PreAuthKey {
        id: k.id,
        user: t
            .users
            .get(&k.user_id)
            .map(|u| u.name.clone())
            .unwrap_or_default(),
        prefix: k.prefix.clone(),
        reusable: k.reusable,
        ephemeral: k.ephemeral,
        used: k.used,
        expiration_ms: k.expiration,
        created_ms: k.created,
        tags: k.tags.clone(),
        key: full_key,
    }
}

/// A node, owned by its user's name, with the routes it advertises, may serve and carries.
pub fn node_msg(t: &Tailnet, n: &crate::state::Node) -> proto::Node {
    proto::Node {
        id: n.id,
        given_name: n.given_name.clone(),
        hostname: n.hostname.clone(),
        user: t
            .users
            .get(&n.user_id)
            .map(|u| u.name.clone())
            .unwrap_or_default(),
        ipv4: n.ipv4.to_string(),
        ipv6: n.ipv6.to_string(),
        machine_key: n.machine_key.clone(),
        node_key: n.node_key.clone(),
        online: n.online,
        last_seen_ms: n.last_seen,
        expiry_ms: n.expiry,
        ephemeral: n.ephemeral,
        tags: n.tags.clone(),
        created_ms: n.created,
        available_routes: n.advertised_routes.iter().map(|r| r.to_string()).collect(),
        approved_routes: n.approved_routes.iter().map(|r| r.to_string()).collect(),
        subnet_routes: carried_routes(t, n),
    }
}

/// The routes `n` carries now: its primary subnet routes and the exit routes it serves.
pub fn carried_routes(t: &Tailnet, n: &crate::state::Node) -> Vec<String> {
    if n.approved_routes.is_empty() {
        return Vec::new();
    }
    let primary = crate::mapper::primary_routes(t);
    n.served_routes()
        .iter()
        .filter(|r| crate::state::is_exit_route(r) || primary.get(r) == Some(&n.id))
        .map(|r| r.to_string())
        .collect()
}

/// The policy in force as it was written, and when it was set.
pub fn policy_msg(t: &Tailnet) -> proto::PolicyReply {
    proto::PolicyReply {
        policy: t
            .policy
            .as_ref()
            .map(|p| p.text.clone())
            .unwrap_or_default(),
        updated_ms: t.policy.as_ref().map(|p| p.updated),
    }
}

/// An API key; `key` is the key itself in the reply that created it, empty elsewhere.
pub fn api_key_msg(k: &crate::state::ApiKey, key: String) -> proto::ApiKey {
    proto::ApiKey {
        id: k.id,
        prefix: k.prefix.clone(),
        expiration_ms: k.expiration,
        created_ms: k.created,
        key,
    }
}
