//! The tailnet policy as the state holds it: replacing it, and approving the routes its
//! autoApprovers allow.

use super::Outcome;
use crate::state::error::StateError;
use crate::state::tailnet::Tailnet;
use crate::state::types::{Change, CommandOutput, PolicyRecord};

impl Tailnet {
    /// Replaces the policy with `text`, parsed again here (blank removes it). SSH
    /// approvals start over, and every node gets the routes the new autoApprovers allow.
    pub(super) fn set_policy(&mut self, text: &str, now: i64) -> Outcome {
        self.policy = if text.trim().is_empty() {
            None
        } else {
            let parsed =
                hydrascale_policy::parse(text).map_err(|e| StateError::BadPolicy(e.to_string()))?;
            Some(PolicyRecord::new(text.to_string(), now, parsed))
        };
        // A new policy may have new check periods: check again.
        self.ssh_approvals.clear();
        // New autoApprovers approve what nodes already advertise.
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let mut changes = vec![Change::PolicyChanged];
        for id in ids {
            if self.auto_approve(id) {
                changes.push(Change::NodeUpserted(id));
            }
        }
        Ok((CommandOutput::Done, changes))
    }

    /// Approves the routes node `id` advertises that the policy's autoApprovers allow it;
    /// whether anything was added.
    pub(super) fn auto_approve(&mut self, id: u64) -> bool {
        let (Some(record), Some(n)) = (self.policy.as_ref(), self.nodes.get(&id)) else {
            return false;
        };
        let policy = record.policy();
        let who = self.principal(n);
        let new: Vec<ipnet::IpNet> = n
            .advertised_routes
            .iter()
            .filter(|r| !n.approved_routes.contains(r) && policy.auto_approves(&who, r))
            .copied()
            .collect();
        match self.nodes.get_mut(&id) {
            Some(n) if !new.is_empty() => {
                n.approved_routes.extend(new);
                n.approved_routes.sort();
                true
            }
            _ => false,
        }
    }
}
