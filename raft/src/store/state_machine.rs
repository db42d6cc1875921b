//! The state machine adapter: hands committed entries to the `Application`, keeps the
//! applied log id and membership, and stores snapshots in RocksDB.

use std::io::Cursor;
use std::sync::Arc;

use super::Storage;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{get_json, put_json, CF_SM};
use crate::{Application, TypeConfig};

#[derive(Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub(crate) meta: SnapshotMeta<u64, BasicNode>,
    pub(crate) data: Vec<u8>,
}

pub struct StateMachineStore {
    db: Arc<Storage>,
    app: Arc<dyn Application>,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    snapshot_seq: u64,
    /// Highest index applied, published so writers can wait for their entry.
    applied_tx: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachineStore {
    /// Restores the application from the stored snapshot, if any. Entries after it are
    /// re-applied by openraft from the log up to the committed index.
    pub fn open(
        db: Arc<Storage>,
        app: Arc<dyn Application>,
        applied_tx: Arc<tokio::sync::watch::Sender<u64>>,
    ) -> Result<Self, StorageError<u64>> {
        let mut sm = Self {
            db,
            app,
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot_seq: 0,
            applied_tx,
        };
        if let Some(snap) = get_json::<StoredSnapshot>(&sm.db, CF_SM, b"snapshot")? {
            sm.app.restore(&snap.data).map_err(|e| {
                super::io_read(format!(
                    "the stored snapshot (up to {:?}) cannot be read: {e}",
                    snap.meta.last_log_id.map(|l| l.index)
                ))
            })?;
            sm.last_applied = snap.meta.last_log_id;
            sm.membership = snap.meta.last_membership.clone();
            sm.publish();
        }
        Ok(sm)
    }

    fn publish(&self) {
        let idx = self.last_applied.map(|l| l.index).unwrap_or(0);
        self.applied_tx.send_replace(idx);
    }
}

/// A snapshot taken when openraft asks for a builder. openraft runs `build_snapshot` in a
/// separate task while entries keep being applied, so the application's state is copied
/// here, where it is consistent with `last_applied`, and only persisted later.
pub struct PreparedSnapshot {
    db: Arc<Storage>,
    stored: Option<StoredSnapshot>,
}

impl RaftSnapshotBuilder<TypeConfig> for PreparedSnapshot {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let stored = self
            .stored
            .take()
            .ok_or_else(|| super::io_write("snapshot builder used twice"))?;
        put_json(&self.db, CF_SM, b"snapshot", &stored)?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = PreparedSnapshot;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<u8>>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for e in entries {
            match e.payload {
                EntryPayload::Blank => out.push(Vec::new()),
                EntryPayload::Normal(cmd) => match self.app.apply(e.log_id.index, &cmd) {
                    Ok(r) => out.push(r),
                    Err(why) => {
                        // `last_applied` stays before this entry: on the next start the
                        // replica stops here again instead of skipping it.
                        self.publish();
                        tracing::error!(index = e.log_id.index, error = %why, "cannot apply a committed entry; stopping Raft on this replica");
                        return Err(super::io_read(format!(
                            "log entry {} cannot be applied: {why}",
                            e.log_id.index
                        )));
                    }
                },
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Vec::new());
                }
            }
            self.last_applied = Some(e.log_id);
        }
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                self.last_applied.map(|l| l.index).unwrap_or(0),
                self.snapshot_seq
            ),
        };
        PreparedSnapshot {
            db: self.db.clone(),
            stored: Some(StoredSnapshot {
                meta,
                data: self.app.snapshot(),
            }),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        self.app.restore(&data).map_err(|e| {
            super::io_read(format!(
                "the snapshot sent by the leader (up to {:?}) cannot be read: {e}",
                meta.last_log_id.map(|l| l.index)
            ))
        })?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        put_json(
            &self.db,
            CF_SM,
            b"snapshot",
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        Ok(
            get_json::<StoredSnapshot>(&self.db, CF_SM, b"snapshot")?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}
