//! The DNS settings as the state holds them: replacing them, or seeding them once.

use super::Outcome;
use crate::state::error::StateError;
use crate::state::tailnet::Tailnet;
use crate::state::types::{Change, CommandOutput};

impl Tailnet {
    /// Replaces the DNS settings, or (`seed`) sets them only if none are set.
    pub(super) fn set_dns(&mut self, settings: &crate::state::DnsSettings, seed: bool) -> Outcome {
        if seed && self.dns.is_some() {
            return Ok((CommandOutput::Done, Vec::new()));
        }
        settings.check().map_err(|p| StateError::BadDns {
            field: p.field.to_string(),
            message: p.message,
        })?;
        if self.dns.as_ref() == Some(settings) {
            return Ok((CommandOutput::Done, Vec::new()));
        }
        self.dns = Some(settings.clone());
        Ok((CommandOutput::Done, vec![Change::DnsChanged]))
    }
}
