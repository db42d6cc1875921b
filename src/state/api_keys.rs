//! Checking an API key a caller presents against the tailnet's stored key hashes. Both
//! admin APIs over the network (gRPC over TCP, REST) and the web login page's API-key
//! form ask here, so a key means the same everywhere.

use sha2::{Digest, Sha256};

use super::Tailnet;

impl Tailnet {
    /// Whether `presented` (the whole key) is a current API key of this tailnet. The
    /// answer is the same for an unknown, a wrong and an expired key except for the hint.
    pub fn check_api_key(&self, presented: &str, now: i64) -> Result<(), &'static str> {
        let unknown = "the API key is not valid; create one with `hydrascale apikeys create` on a replica (over its local admin socket)";
        let prefix = presented
            .strip_prefix("hskey-api-")
            .and_then(|rest| rest.split_once('-'))
            .map(|(p, _)| p)
            .ok_or(unknown)?;
        let key = self
            .api_keys
            .values()
            .find(|k| k.prefix == prefix)
            .ok_or(unknown)?;
        let hash = hex::encode(Sha256::digest(presented.as_bytes()));
        // Constant time: how much of the hash matched must not show in the answer's timing.
        let same = hash.len() == key.hash.len()
            && hash
                .bytes()
                .zip(key.hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(unknown);
        }
        if key.expiration.is_some_and(|e| e <= now) {
            return Err(
                "the API key has expired; create a new one with `hydrascale apikeys create`",
            );
        }
        Ok(())
    }
}
