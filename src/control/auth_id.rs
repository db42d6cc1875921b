//! Auth ids: the random last part of a login or SSH-check link (`/register/<id>`,
//! `/ssh/check/<id>`), made here and read back from the URLs this server handed out.

use crate::state::PendingLogin;

/// The auth id in an `AuthURL` this server handed out (`<server_url>/register/<id>`).
pub(crate) fn auth_id_of(url: &str) -> Option<&str> {
    let id = PendingLogin::id_from(url.split_once("/register/")?.1);
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some(id)
}

/// A random id for a login or an SSH check: the last part of the link a user opens.
pub(super) fn new_auth_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}
