//! Users: creating, renaming and deleting them, and linking one to an OIDC identity.

use super::Outcome;
use crate::state::error::StateError;
use crate::state::tailnet::{valid_user_name, Tailnet};
use crate::state::types::{Change, CommandOutput, OidcIdentity, Profile, User, UserOrigin};

impl Tailnet {
    pub(super) fn create_user(
        &mut self,
        name: &str,
        display_name: &str,
        now: i64,
        by_admin: bool,
        profile: &Profile,
    ) -> Outcome {
        if !valid_user_name(name) {
            return Err(StateError::BadUserName(name.to_string()));
        }
        profile.check()?;
        if self.user_by_name(name).is_some() {
            return Err(StateError::UserExists(name.to_string()));
        }
        self.next_user_id += 1;
        let u = User {
            id: self.next_user_id,
            name: name.to_string(),
            display_name: display_name.to_string(),
            created: now,
            oidc: None,
            origin: if by_admin {
                UserOrigin::Admin
            } else {
                UserOrigin::Unrecorded
            },
            profile: profile.clone(),
        };
        self.users.insert(u.id, u.clone());
        Ok((
            CommandOutput::User(u.clone()),
            vec![Change::UserChanged(u.id)],
        ))
    }

    pub(super) fn rename_user(&mut self, old_name: &str, new_name: &str) -> Outcome {
        let id = self.user_id(old_name)?;
        if !valid_user_name(new_name) {
            return Err(StateError::BadUserName(new_name.to_string()));
        }
        if self.user_by_name(new_name).is_some() {
            return Err(StateError::UserExists(new_name.to_string()));
        }
        let u = self
            .users
            .get_mut(&id)
            .ok_or(StateError::UserNotFound(old_name.to_string()))?;
        u.name = new_name.to_string();
        let u = u.clone();
        Ok((CommandOutput::User(u), vec![Change::UserChanged(id)]))
    }

    /// Only a user with no nodes and no pre-auth keys left goes.
    pub(super) fn delete_user(&mut self, name: &str) -> Outcome {
        let id = self.user_id(name)?;
        let nodes = self.nodes.values().filter(|n| n.user_id == id).count();
        let keys = self
            .preauth_keys
            .values()
            .filter(|k| k.user_id == id)
            .count();
        if nodes > 0 || keys > 0 {
            return Err(StateError::UserInUse {
                name: name.to_string(),
                nodes,
                keys,
            });
        }
        self.users.remove(&id);
        Ok((CommandOutput::Done, vec![Change::UserChanged(id)]))
    }

    /// Binds user `name` to `identity`, or unbinds it (none). An identity belongs to one
    /// user at most, and a bound user is unbound before it is bound to another.
    pub(super) fn link_user(&mut self, name: &str, identity: Option<&OidcIdentity>) -> Outcome {
        let id = self.user_id(name)?;
        if let Some(want) = identity {
            if want.issuer.is_empty() || want.subject.is_empty() {
                return Err(StateError::BadIdentity);
            }
            if let Some(other) = self.user_by_identity(&want.issuer, &want.subject) {
                if other.id != id {
                    return Err(StateError::IdentityTaken(other.name.clone()));
                }
            }
            let current = self.users.get(&id).and_then(|u| u.oidc.as_ref());
            if let Some(cur) = current.filter(|c| !c.same(&want.issuer, &want.subject)) {
                return Err(StateError::UserLinked {
                    name: name.to_string(),
                    issuer: cur.issuer.clone(),
                    subject: cur.subject.clone(),
                });
            }
        }
        let u = self
            .users
            .get_mut(&id)
            .ok_or_else(|| StateError::UserNotFound(name.to_string()))?;
        u.oidc = identity.cloned();
        Ok((
            CommandOutput::User(u.clone()),
            vec![Change::UserChanged(id)],
        ))
    }
}
