//! Pre-auth keys (creating and expiring them, and checking one at registration) and API
//! keys (creating, expiring, deleting).

use super::register::Grant;
use super::Outcome;
use crate::state::error::StateError;
use crate::state::tailnet::{valid_tag, Tailnet};
use crate::state::types::{ApiKey, CommandOutput, PreAuthKey};

impl Tailnet {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_preauth_key(
        &mut self,
        user: &str,
        prefix: &str,
        hash: &str,
        reusable: bool,
        ephemeral: bool,
        expiration: Option<i64>,
        tags: &[String],
        now: i64,
    ) -> Outcome {
        let user_id = self.user_id(user)?;
        if let Some(bad) = tags.iter().find(|t| !valid_tag(t)) {
            return Err(StateError::BadTag(bad.clone()));
        }
        self.next_key_id += 1;
        let k = PreAuthKey {
            id: self.next_key_id,
            user_id,
            prefix: prefix.to_string(),
            hash: hash.to_string(),
            reusable,
            ephemeral,
            used: false,
            expiration,
            created: now,
            tags: tags.to_vec(),
        };
        self.preauth_keys.insert(k.id, k.clone());
        Ok((CommandOutput::PreAuthKey(k), Vec::new()))
    }

    pub(super) fn expire_preauth_key(&mut self, user: &str, prefix: &str, now: i64) -> Outcome {
        let user_id = self.user_id(user)?;
        let k = self
            .preauth_keys
            .values_mut()
            .find(|k| k.user_id == user_id && k.prefix.starts_with(prefix) && !prefix.is_empty())
            .ok_or_else(|| StateError::PreAuthKeyNotFound {
                user: user.to_string(),
                prefix: prefix.to_string(),
            })?;
        k.expiration = Some(now);
        Ok((CommandOutput::PreAuthKey(k.clone()), Vec::new()))
    }

    pub(super) fn delete_preauth_key(&mut self, id: u64) -> Outcome {
        self.preauth_keys
            .remove(&id)
            .ok_or(StateError::PreAuthKeyIdNotFound(id))?;
        Ok((CommandOutput::Done, Vec::new()))
    }

    /// The pre-auth key with SHA-256 `hash`, if `machine_key` may register `node_key`
    /// with it now.
    pub(super) fn key_grant(
        &self,
        hash: &str,
        machine_key: &str,
        node_key: &str,
        now: i64,
    ) -> Result<Grant, StateError> {
        let k = self
            .preauth_keys
            .values()
            .find(|k| k.hash == hash)
            .ok_or(StateError::AuthKeyUnknown)?;
        if k.expiration.is_some_and(|e| e <= now) {
            return Err(StateError::AuthKeyExpired);
        }
        // A used single-use key is refused, except for the very registration it made
        // coming again (a client that retries because the answer was lost: same machine,
        // same node key, node still valid). It never brings back a node that was expired
        // or logged out, nor registers a new node key.
        let reuse_by_owner = self.node_by_machine_key(machine_key).is_some_and(|n| {
            n.auth_key_id == Some(k.id)
                && n.node_key == node_key
                && n.expiry.is_none_or(|e| e > now)
        });
        if k.used && !k.reusable && !reuse_by_owner {
            return Err(StateError::AuthKeyUsed);
        }
        Ok(Grant::from(k))
    }

    pub(super) fn create_api_key(
        &mut self,
        prefix: &str,
        hash: &str,
        expiration: Option<i64>,
        now: i64,
    ) -> Outcome {
        if prefix.is_empty() || self.api_keys.values().any(|k| k.prefix == prefix) {
            return Err(StateError::ApiKeyExists(prefix.to_string()));
        }
        self.next_api_key_id += 1;
        let k = ApiKey {
            id: self.next_api_key_id,
            prefix: prefix.to_string(),
            hash: hash.to_string(),
            expiration,
            created: now,
        };
        self.api_keys.insert(k.id, k.clone());
        Ok((CommandOutput::ApiKey(k), Vec::new()))
    }

    pub(super) fn expire_api_key(&mut self, prefix: &str, now: i64) -> Outcome {
        let k = self
            .api_keys
            .values_mut()
            .find(|k| k.prefix == prefix)
            .ok_or_else(|| StateError::ApiKeyNotFound(prefix.to_string()))?;
        // Expiring an expired key keeps its original expiry.
        if k.expiration.is_none_or(|e| e > now) {
            k.expiration = Some(now);
        }
        Ok((CommandOutput::ApiKey(k.clone()), Vec::new()))
    }

    pub(super) fn delete_api_key(&mut self, prefix: &str) -> Outcome {
        let id = self
            .api_keys
            .values()
            .find(|k| k.prefix == prefix)
            .map(|k| k.id)
            .ok_or_else(|| StateError::ApiKeyNotFound(prefix.to_string()))?;
        self.api_keys.remove(&id);
        Ok((CommandOutput::Done, Vec::new()))
    }
}
