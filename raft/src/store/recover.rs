//! Reading a stopped replica's storage without Raft: the state it knew to be committed,
//! for recovering a cluster that lost its majority (nothing can be written through Raft
//! then, so `cluster backup` cannot run).

use std::collections::BTreeMap;
use std::path::Path;

use openraft::{BasicNode, EntryPayload, StoredMembership};
use rocksdb::{Direction, IteratorMode};

use super::state_machine::StoredSnapshot;
use super::{cf, get_json, CF_LOGS, CF_META, CF_SM};
use crate::error::{storage, RaftError};
use crate::Application;

/// What [`recover_committed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Highest index this replica knew to be committed: `app` holds the state up to it.
    pub committed_index: u64,
    /// Last index in its log; entries after `committed_index` were never known to be
    /// committed and are left out.
    pub last_log_index: u64,
    /// Voters of the last membership up to the committed index, id to Raft address.
    pub voters: BTreeMap<u64, String>,
}

/// Rebuilds into `app` the state of the replica whose Raft store is `path`: its snapshot,
/// then every log entry up to the committed index it recorded. The replica must be
/// stopped (RocksDB's lock refuses a second opener).
pub fn recover_committed(path: &Path, app: &dyn Application) -> Result<Recovered, RaftError> {
    if !path.join("CURRENT").is_file() {
        return Err(RaftError::Open {
            path: path.display().to_string(),
            message: "no Raft store here (expected <data_dir>/raft of a replica)".into(),
        });
    }
    let (db, _closed) = super::open(path)?;
    let snapshot = get_json::<StoredSnapshot>(&db, CF_SM, b"snapshot").map_err(storage)?;
    let mut membership: StoredMembership<u64, BasicNode> = StoredMembership::default();
    let mut applied = 0;
    // openraft's first entry (the initial membership) is at index 0.
    let mut start = 0;
    if let Some(snap) = snapshot {
        app.restore(&snap.data)
            .map_err(|e| RaftError::Storage(format!("the snapshot cannot be read: {e}")))?;
        if let Some(last) = snap.meta.last_log_id {
            applied = last.index;
            start = last.index + 1;
        }
        membership = snap.meta.last_membership;
    }
    let committed = get_json::<Option<openraft::LogId<u64>>>(&db, CF_META, b"committed")
        .map_err(storage)?
        .flatten()
        .map(|l| l.index)
        .unwrap_or(0);
    let logs = cf(&db, CF_LOGS).map_err(storage)?;
    let mut last_log_index = applied;
    let start = start.to_be_bytes();
    for item in db.iterator_cf(logs, IteratorMode::From(&start, Direction::Forward)) {
        let (_, value) = item.map_err(storage)?;
        let entry = super::log::decode_entry(&value).map_err(storage)?;
        last_log_index = entry.log_id.index;
        if entry.log_id.index > committed {
            continue;
        }
        match entry.payload {
            EntryPayload::Normal(cmd) => {
                app.apply(entry.log_id.index, &cmd).map_err(|e| {
                    RaftError::Storage(format!(
                        "log entry {} cannot be applied: {e}",
                        entry.log_id.index
                    ))
                })?;
            }
            EntryPayload::Membership(m) => {
                membership = StoredMembership::new(Some(entry.log_id), m);
            }
            EntryPayload::Blank => {}
        }
        applied = entry.log_id.index;
    }
    let m = membership.membership();
    let voters = m
        .voter_ids()
        .filter_map(|id| m.get_node(&id).map(|n| (id, n.addr.clone())))
        .collect();
    Ok(Recovered {
        committed_index: applied,
        last_log_index,
        voters,
    })
}
