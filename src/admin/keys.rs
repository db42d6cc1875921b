//! Admin calls on pre-auth keys and API keys. Keys are generated here, from the operating
//! system's randomness; only their hash goes into the replicated state.

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::convert::{api_key_msg, key_msg};
use super::{proto, status, Admin};
use crate::state::{now_ms, Command, CommandOutput, DbError, StateError};

pub(super) async fn create_pre_auth_key(
    admin: &Admin,
    req: Request<proto::CreatePreAuthKeyRequest>,
) -> Result<Response<proto::PreAuthKeyReply>, Status> {
    let r = req.into_inner();
    if r.expiration_ms < 0 {
        return Err(Status::invalid_argument("expiration must not be negative"));
    }
    let key = generate_key();
    let now = now_ms();
    let out = admin
        .write(Command::CreatePreAuthKey {
            user: r.user,
            prefix: key.chars().take(20).collect(),
            hash: hex::encode(Sha256::digest(key.as_bytes())),
            reusable: r.reusable,
            ephemeral: r.ephemeral,
            expiration: (r.expiration_ms > 0).then(|| now.saturating_add(r.expiration_ms)),
            tags: r.tags,
            now,
        })
        .await?;
    match out {
        CommandOutput::PreAuthKey(k) => {
            let t = admin.db.store.read();
            Ok(Response::new(proto::PreAuthKeyReply {
                key: Some(key_msg(&t, &k, key)),
            }))
        }
        _ => Err(Status::internal("command returned no key")),
    }
}

pub(super) async fn list_pre_auth_keys(
    admin: &Admin,
    req: Request<proto::ListPreAuthKeysRequest>,
) -> Result<Response<proto::ListPreAuthKeysReply>, Status> {
    let user = req.into_inner().user;
    let t = admin.db.store.read();
    let uid = t
        .user_by_name(&user)
        .map(|u| u.id)
        .ok_or_else(|| status(DbError::State(StateError::UserNotFound(user.clone()))))?;
    Ok(Response::new(proto::ListPreAuthKeysReply {
        keys: t
            .preauth_keys
            .values()
            .filter(|k| k.user_id == uid)
            .map(|k| key_msg(&t, k, String::new()))
            .collect(),
    }))
}

pub(super) async fn expire_pre_auth_key(
    admin: &Admin,
    req: Request<proto::ExpirePreAuthKeyRequest>,
) -> Result<Response<proto::PreAuthKeyReply>, Status> {
    let r = req.into_inner();
    match admin
        .write(Command::ExpirePreAuthKey {
            user: r.user,
            prefix: r.prefix,
            now: now_ms(),
        })
        .await?
    {
        CommandOutput::PreAuthKey(k) => {
            let t = admin.db.store.read();
            Ok(Response::new(proto::PreAuthKeyReply {
                key: Some(key_msg(&t, &k, String::new())),
            }))
        }
        _ => Err(Status::internal("command returned no key")),
    }
}

pub(super) async fn delete_pre_auth_key(
    admin: &Admin,
    req: Request<proto::PreAuthKeyIdRequest>,
) -> Result<Response<proto::Empty>, Status> {
    admin
        .write(Command::DeletePreAuthKey {
            id: req.into_inner().id,
        })
        .await?;
    Ok(Response::new(proto::Empty {}))
}

pub(super) async fn create_api_key(
    admin: &Admin,
    req: Request<proto::CreateApiKeyRequest>,
) -> Result<Response<proto::ApiKeyReply>, Status> {
    let r = req.into_inner();
    if r.expiration_ms < 0 {
        return Err(Status::invalid_argument("expiration must not be negative"));
    }
    let (key, prefix) = generate_api_key();
    let now = now_ms();
    let out = admin
        .write(Command::CreateApiKey {
            prefix,
            hash: hex::encode(Sha256::digest(key.as_bytes())),
            expiration: (r.expiration_ms > 0).then(|| now.saturating_add(r.expiration_ms)),
            now,
        })
        .await?;
    match out {
        CommandOutput::ApiKey(k) => Ok(Response::new(proto::ApiKeyReply {
            key: Some(api_key_msg(&k, key)),
        })),
        _ => Err(Status::internal("command returned no key")),
    }
}

pub(super) async fn list_api_keys(
    admin: &Admin,
    _req: Request<proto::Empty>,
) -> Result<Response<proto::ListApiKeysReply>, Status> {
    let t = admin.db.store.read();
    Ok(Response::new(proto::ListApiKeysReply {
        keys: t
            .api_keys
            .values()
            .map(|k| api_key_msg(k, String::new()))
            .collect(),
    }))
}

pub(super) async fn expire_api_key(
    admin: &Admin,
    req: Request<proto::ApiKeyPrefixRequest>,
) -> Result<Response<proto::ApiKeyReply>, Status> {
    let prefix = req.into_inner().prefix;
    match admin
        .write(Command::ExpireApiKey {
            prefix,
            now: now_ms(),
        })
        .await?
    {
        CommandOutput::ApiKey(k) => Ok(Response::new(proto::ApiKeyReply {
            key: Some(api_key_msg(&k, String::new())),
        })),
        _ => Err(Status::internal("command returned no key")),
    }
}

pub(super) async fn delete_api_key(
    admin: &Admin,
    req: Request<proto::ApiKeyPrefixRequest>,
) -> Result<Response<proto::Empty>, Status> {
    let prefix = req.into_inner().prefix;
    admin.write(Command::DeleteApiKey { prefix }).await?;
    Ok(Response::new(proto::Empty {}))
}

/// A new API key, `hskey-api-<12 hex prefix>-<48 hex secret>`, and its prefix.
fn generate_api_key() -> (String, String) {
    let mut b = [0u8; 30];
    OsRng.fill_bytes(&mut b);
    let prefix = hex::encode(&b[..6]);
    (
        format!("hskey-api-{prefix}-{}", hex::encode(&b[6..])),
        prefix,
    )
}

/// A new pre-auth key: `hskey-auth-` and 48 random hex characters.
fn generate_key() -> String {
    let mut b = [0u8; 24];
    OsRng.fill_bytes(&mut b);
    format!("hskey-auth-{}", hex::encode(b))
}
