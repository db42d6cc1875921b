//! The cluster's ACME certificate: the lease that lets one replica at a time order it,
//! and the steps of that replica's order (challenge, account, certificate, failure).

use super::Outcome;
use crate::state::error::StateError;
use crate::state::tailnet::Tailnet;
use crate::state::types::{AcmeLease, AcmeStep, Change, CommandOutput};

impl Tailnet {
    /// One ACME step of replica `replica` (see [`AcmeStep`]).
    pub(super) fn acme(&mut self, replica: u64, step: &AcmeStep, now: i64) -> Outcome {
        let tls = &mut self.tls;
        let holds = tls.lease.as_ref().is_some_and(|l| l.replica == replica);
        if let AcmeStep::Lease { until } = step {
            match &tls.lease {
                Some(l) if l.replica != replica && l.until > now => {
                    return Err(StateError::AcmeLeaseHeld {
                        holder: l.replica,
                        until: l.until,
                    })
                }
                _ => {}
            }
            let since = tls
                .lease
                .as_ref()
                .filter(|_| holds)
                .map_or(now, |l| l.since);
            tls.lease = Some(AcmeLease {
                replica,
                since,
                until: *until,
            });
            return Ok((CommandOutput::Done, Vec::new()));
        }
        // Every other step is the holder's alone, even once its lease has run out: as long
        // as nobody else took it, the order it finished is still the only one.
        if !holds {
            return Err(StateError::AcmeNotHolder(replica));
        }
        let mut changes = Vec::new();
        match step {
            AcmeStep::Lease { .. } => {}
            AcmeStep::Challenge { challenge } => {
                tls.challenge = challenge.clone();
                changes.push(Change::TlsChanged);
            }
            AcmeStep::Account { account } => tls.account = Some(account.clone()),
            AcmeStep::Issued { cert } => {
                tls.cert = Some(cert.clone());
                tls.issued += 1;
                tls.failures_in_row = 0;
                tls.lease = None;
                tls.challenge = None;
                changes.push(Change::TlsChanged);
            }
            AcmeStep::Failed { error } => {
                tls.failed += 1;
                tls.failures_in_row = tls.failures_in_row.saturating_add(1);
                // The CA's problem documents can be long; the state keeps the gist.
                let error: String = error.chars().take(500).collect();
                tls.last_failure = Some((now, error));
                tls.lease = None;
                if tls.challenge.take().is_some() {
                    changes.push(Change::TlsChanged);
                }
            }
            AcmeStep::Release => {
                tls.lease = None;
                if tls.challenge.take().is_some() {
                    changes.push(Change::TlsChanged);
                }
            }
        }
        Ok((CommandOutput::Done, changes))
    }
}
