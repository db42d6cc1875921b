//! The cluster's own records: its replicas (joining, leaving, going down with the
//! nodes they streamed to), its control key, and a restore from a backup.

use super::Outcome;
use crate::state::error::StateError;
use crate::state::tailnet::Tailnet;
use crate::state::types::{Change, CommandOutput, Replica, Secret};

impl Tailnet {
    /// Marks offline the nodes whose stream replica `replica` held.
    pub(super) fn replica_down(&mut self, replica: u64, now: i64) -> Outcome {
        let mut changes = Vec::new();
        for n in self.nodes.values_mut() {
            if n.online && n.online_via == Some(replica) {
                n.online = false;
                n.online_via = None;
                n.last_seen = Some(now);
                changes.push(Change::NodeUpserted(n.id));
            }
        }
        Ok((CommandOutput::Done, changes))
    }

    pub(super) fn register_replica(&mut self, replica: &Replica) -> Outcome {
        if self.replicas.get(&replica.id) == Some(replica) {
            return Ok((CommandOutput::Done, Vec::new()));
        }
        self.replicas.insert(replica.id, replica.clone());
        Ok((CommandOutput::Done, vec![Change::ReplicasChanged]))
    }

    /// Forgets replica `id`; the nodes it streamed to go offline.
    pub(super) fn forget_replica(&mut self, id: u64) -> Outcome {
        if self.replicas.remove(&id).is_none() {
            return Ok((CommandOutput::Done, Vec::new()));
        }
        let mut changes = vec![Change::ReplicasChanged];
        for n in self.nodes.values_mut() {
            if n.online && n.online_via == Some(id) {
                n.online = false;
                n.online_via = None;
                changes.push(Change::NodeUpserted(n.id));
            }
        }
        Ok((CommandOutput::Done, changes))
    }

    /// The first control key proposed is the cluster's; later ones change nothing.
    pub(super) fn set_control_key(&mut self, key: &str) -> Outcome {
        if self.control_key.is_none() {
            self.control_key = Some(Secret::new(key.to_string()));
        }
        Ok((CommandOutput::Done, Vec::new()))
    }

    /// Replaces a fresh state with the backup `tailnet` (JSON), keeping this cluster's
    /// replicas; nodes start offline and no ACME order is in flight.
    pub(super) fn restore(&mut self, tailnet: &str) -> Outcome {
        if self.control_key.is_some() || !self.users.is_empty() || !self.nodes.is_empty() {
            return Err(StateError::RestoreNotFresh);
        }
        let mut restored: Tailnet =
            serde_json::from_str(tailnet).map_err(|e| StateError::BadBackup(e.to_string()))?;
        if restored.control_key.is_none() {
            return Err(StateError::BadBackup("it holds no control key".into()));
        }
        restored.replicas = std::mem::take(&mut self.replicas);
        // An order in flight belonged to the old cluster's replicas.
        restored.tls.lease = None;
        restored.tls.challenge = None;
        for n in restored.nodes.values_mut() {
            n.online = false;
            n.online_via = None;
        }
        *self = restored;
        Ok((CommandOutput::Done, vec![Change::Reset]))
    }
}
