//! SSH checks: a held SSH connection waiting for its user to re-authenticate (or an
//! administrator to decide), and the approvals that let a source into a destination.

use super::Outcome;
use crate::state::error::StateError;
use crate::state::tailnet::Tailnet;
use crate::state::types::{Change, CommandOutput, SshCheck, MAX_SSH_CHECKS, SSH_CHECK_TTL_MS};

impl Tailnet {
    /// Holds a check of `src` into `dst` as `ssh_user`; drops the checks that ran out.
    pub(super) fn start_ssh_check(
        &mut self,
        auth_id: &str,
        src: u64,
        dst: u64,
        ssh_user: &str,
        now: i64,
    ) -> Outcome {
        for id in [src, dst] {
            if !self.nodes.contains_key(&id) {
                return Err(StateError::NodeNotFound(id));
            }
        }
        let cutoff = now.saturating_sub(SSH_CHECK_TTL_MS);
        let live = self.ssh_checks.values().filter(|c| c.created > cutoff);
        if live.count() >= MAX_SSH_CHECKS {
            return Err(StateError::TooManySshChecks);
        }
        self.ssh_checks.retain(|_, c| c.created > cutoff);
        self.ssh_checks.insert(
            auth_id.to_string(),
            SshCheck {
                auth_id: auth_id.to_string(),
                src,
                dst,
                ssh_user: ssh_user.to_string(),
                created: now,
                decision: None,
            },
        );
        Ok((CommandOutput::Done, Vec::new()))
    }

    /// Decides check `auth_id` once, while it is live; an approval is remembered for the
    /// pair of nodes.
    pub(super) fn decide_ssh_check(&mut self, auth_id: &str, approve: bool, now: i64) -> Outcome {
        let c = self
            .ssh_checks
            .get_mut(auth_id)
            .filter(|c| c.created > now.saturating_sub(SSH_CHECK_TTL_MS))
            .filter(|c| c.decision.is_none())
            .ok_or_else(|| StateError::SshCheckNotFound(auth_id.to_string()))?;
        c.decision = Some(approve);
        if approve {
            self.ssh_approvals
                .entry(c.src)
                .or_default()
                .insert(c.dst, now);
        }
        Ok((
            CommandOutput::Done,
            vec![Change::SshCheckDecided(auth_id.to_string())],
        ))
    }
}
