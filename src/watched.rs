//! Files the leader replicates, as headscale's file modes: `policy_path` (the policy) and
//! `dns.extra_records_path` (the DNS extra records, headscale's JSON format). Operators'
//! tooling writes the file; the leader reads it every few seconds and proposes each valid
//! version that differs from what is in force. Only the leader reads it, so replicas whose
//! copies differ never fight; a version that is refused is logged once and what is in
//! force stays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use crate::state::{now_ms, Command, Db, DbError, DnsRecord};

/// How often the leader looks at the file (headscale reacts to file events; a poll works
/// on every file system, network mounts and bind-mounted config maps included).
const POLL: Duration = Duration::from_secs(2);

/// What a watched file holds.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// The policy, as `hydrascale policy set` takes it.
    Policy,
    /// The DNS extra records: a JSON list of `{"name", "type", "value"}`.
    ExtraRecords,
}

impl Source {
    fn setting(self) -> &'static str {
        match self {
            Source::Policy => "policy_path",
            Source::ExtraRecords => "dns.extra_records_path",
        }
    }

    /// The command that puts `text` in force; `Ok(None)` when it is in force already,
    /// `Err` saying why the text is refused.
    fn command(self, db: &Db, text: &str) -> Result<Option<Command>, String> {
        let t = db.store.read();
        match self {
            Source::Policy => {
                let current = t.policy.as_ref().map_or("", |p| p.text.as_str());
                if text == current {
                    return Ok(None);
                }
                if !text.trim().is_empty() {
                    crate::policy::parse(text).map_err(|e| e.to_string())?;
                }
                Ok(Some(Command::SetPolicy {
                    text: text.to_string(),
                    now: now_ms(),
                }))
            }
            Source::ExtraRecords => {
                let records: Vec<DnsRecord> = serde_json::from_str(text).map_err(|e| {
                    format!("not a JSON list of {{\"name\", \"type\", \"value\"}} records ({e})")
                })?;
                // The records replace those in the settings in force, so the file never
                // undoes a `hydrascale dns set` of the others; nothing before the
                // settings are seeded (the seed would overwrite them).
                let Some(mut settings) = t.dns.clone() else {
                    return Ok(None);
                };
                if settings.extra_records == records {
                    return Ok(None);
                }
                settings.extra_records = records;
                settings
                    .check()
                    .map_err(|p| format!("{}: {}", p.field, p.message))?;
                Ok(Some(Command::SetDns {
                    settings,
                    seed: false,
                }))
            }
        }
    }
}

/// Watches `path` on this replica while it leads, and proposes each version of it that
/// differs from what is in force and was not refused before.
pub async fn follow(db: Db, source: Source, path: PathBuf, mut stop: watch::Receiver<bool>) {
    // The last text refused: logged once, not every poll.
    let mut refused: Option<String> = None;
    let mut unreadable = false;
    loop {
        if db.raft.is_leader() {
            match tokio::fs::read_to_string(&path).await {
                Err(e) => {
                    if !unreadable {
                        tracing::warn!(
                            "{} {}: cannot read it ({e}); what is in force stays",
                            source.setting(),
                            path.display()
                        );
                    }
                    unreadable = true;
                }
                Ok(text) => {
                    unreadable = false;
                    if refused.as_deref() != Some(text.as_str()) {
                        refused = propose(&db, source, &path, text).await;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Proposes `text`; the text if it was refused for what it says (not when the cluster
/// could not take the write: that is tried again at the next poll).
async fn propose(db: &Db, source: Source, path: &Path, text: String) -> Option<String> {
    let setting = source.setting();
    let cmd = match source.command(db, &text) {
        Ok(None) => return None,
        Ok(Some(cmd)) => cmd,
        Err(why) => {
            tracing::warn!(
                "{setting} {}: the new version was refused, what is in force stays: {why}",
                path.display()
            );
            return Some(text);
        }
    };
    match db.write(cmd).await {
        Ok(_) => {
            tracing::info!("{setting} {}: the new version is in force", path.display());
            None
        }
        Err(DbError::State(e)) => {
            tracing::warn!("{setting} {}: {e}", path.display());
            Some(text)
        }
        Err(e) => {
            tracing::debug!("{setting} {}: not replicated yet: {e}", path.display());
            None
        }
    }
}
