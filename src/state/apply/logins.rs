//! Interactive logins: a machine's login waiting for an administrator (or an OIDC
//! provider), and its completion, which registers the machine for a user (for OIDC, a
//! user found by identity or made for it).

use super::register::{Grant, Registration};
use super::Outcome;
use crate::state::error::StateError;
use crate::state::tailnet::Tailnet;
use crate::state::types::{
    Change, CommandOutput, OidcIdentity, PendingLogin, Profile, RegisterMethod, User, UserOrigin,
    LOGIN_TTL_MS, MAX_PENDING_LOGINS,
};

impl Tailnet {
    /// Keeps `login` waiting; drops the logins that ran out and an older one of the same
    /// machine.
    pub(super) fn start_login(&mut self, login: &PendingLogin) -> Outcome {
        let cutoff = login.created.saturating_sub(LOGIN_TTL_MS);
        let keep = |p: &PendingLogin| p.created > cutoff && p.machine_key != login.machine_key;
        if self.pending_logins.values().filter(|p| keep(p)).count() >= MAX_PENDING_LOGINS {
            return Err(StateError::TooManyPendingLogins);
        }
        self.pending_logins.retain(|_, p| keep(p));
        self.pending_logins
            .insert(login.auth_id.clone(), login.clone());
        Ok((CommandOutput::Done, Vec::new()))
    }

    /// An administrator approves login `auth_id` as `user`.
    pub(super) fn complete_login_as(&mut self, auth_id: &str, user: &str, now: i64) -> Outcome {
        let p = self.pending_login(auth_id, now)?;
        let user_id = self.user_id(user)?;
        self.complete_login(&p, user_id, now, RegisterMethod::Cli)
    }

    /// An administrator turns the login `auth_id` away.
    pub(super) fn reject_login(&mut self, auth_id: &str) -> Outcome {
        self.pending_logins
            .remove(auth_id)
            .ok_or_else(|| StateError::LoginNotFound(auth_id.to_string()))?;
        Ok((CommandOutput::Done, Vec::new()))
    }

    /// The OIDC provider vouches for login `auth_id` as (`issuer`, `subject`): the user
    /// bound to that identity, else a new one named after `name`, unless a user of that
    /// name predates identities (an administrator links it first).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn oidc_login(
        &mut self,
        auth_id: &str,
        issuer: &str,
        subject: &str,
        name: &str,
        display_name: &str,
        now: i64,
        profile: &Profile,
    ) -> Outcome {
        let p = self.pending_login(auth_id, now)?;
        // A provider's odd claim costs the profile, never the login.
        let profile = if profile.check().is_ok() {
            profile.clone()
        } else {
            Profile::default()
        };
        if let Some(id) = self.user_by_identity(issuer, subject).map(|u| u.id) {
            let before = self.users.get(&id).map(|u| u.profile.clone());
            let out = self.complete_login(&p, id, now, RegisterMethod::Oidc)?;
            let (out, mut changes) = out;
            if let Some(u) = self.users.get_mut(&id) {
                if !profile.email.is_empty() {
                    u.profile.email = profile.email.clone();
                }
                if !profile.picture_url.is_empty() {
                    u.profile.picture_url = profile.picture_url.clone();
                }
                if before.as_ref() != Some(&u.profile) {
                    changes.insert(0, Change::UserChanged(id));
                }
            }
            return Ok((out, changes));
        }
        if let Some(u) = self
            .user_by_name(name)
            .filter(|u| u.origin == UserOrigin::Unrecorded && u.oidc.is_none())
        {
            return Err(StateError::UnlinkedUser {
                name: u.name.clone(),
                issuer: issuer.to_string(),
                subject: subject.to_string(),
            });
        }
        let user = User {
            id: self.next_user_id + 1,
            name: self.free_user_name(name),
            display_name: display_name.to_string(),
            created: now,
            oidc: Some(OidcIdentity {
                issuer: issuer.to_string(),
                subject: subject.to_string(),
            }),
            origin: UserOrigin::Oidc,
            profile,
        };
        let id = user.id;
        // The registration validates before it changes anything; if it refuses,
        // the user made for it goes too, so the command changes nothing.
        self.users.insert(id, user);
        self.next_user_id = id;
        match self.complete_login(&p, id, now, RegisterMethod::Oidc) {
            Ok((out, mut changes)) => {
                changes.insert(0, Change::UserChanged(id));
                Ok((out, changes))
            }
            Err(e) => {
                self.users.remove(&id);
                self.next_user_id = id - 1;
                Err(e)
            }
        }
    }

    /// The interactive login `auth_id`, if it is still waiting at `now`.
    fn pending_login(&self, auth_id: &str, now: i64) -> Result<PendingLogin, StateError> {
        self.pending_logins
            .get(auth_id)
            .filter(|p| p.created > now.saturating_sub(LOGIN_TTL_MS))
            .cloned()
            .ok_or_else(|| StateError::LoginNotFound(auth_id.to_string()))
    }

    /// Registers the machine of login `p` as a node of user `user_id` and drops the login.
    fn complete_login(
        &mut self,
        p: &PendingLogin,
        user_id: u64,
        now: i64,
        method: RegisterMethod,
    ) -> Outcome {
        let grant = Grant {
            method,
            user_id,
            tags: Vec::new(),
            ephemeral: p.ephemeral,
            key_id: None,
        };
        let registration = Registration {
            machine_key: &p.machine_key,
            node_key: &p.node_key,
            old_node_key: None,
            hostname: &p.hostname,
            hostinfo: &p.hostinfo,
            expiry: p.key_lifetime.map(|l| now.saturating_add(l)),
            ephemeral: p.ephemeral,
            prefixes: &p.prefixes,
            now,
        };
        let out = self.register(&registration, Some(grant))?;
        self.pending_logins.remove(&p.auth_id);
        Ok(out)
    }
}
