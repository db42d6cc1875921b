//! The Raft log, vote and committed index in RocksDB (`RaftLogStorage`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::Storage;

use super::{cf, get_json, io_read, io_write, put_json, CF_LOGS, CF_META};
use crate::TypeConfig;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Storage>,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl LogStore {
    pub fn new(db: Arc<Storage>) -> Self {
        Self { db }
    }

    fn last_purged(&self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        get_json(&self.db, CF_META, b"last_purged")
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let logs = cf(&self.db, CF_LOGS)?;
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(logs, IteratorMode::From(&key(start), Direction::Forward))
        {
            let (k, v) = item.map_err(io_read)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(io_read)?);
            if !range.contains(&idx) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(io_read)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let logs = cf(&self.db, CF_LOGS)?;
        let last = match self.db.iterator_cf(logs, IteratorMode::End).next() {
            Some(item) => {
                let (_, v) = item.map_err(io_read)?;
                let e: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(io_read)?;
                Some(e.log_id)
            }
            None => None,
        };
        let last_purged = self.last_purged()?;
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        put_json(&self.db, CF_META, b"vote", vote)?;
        self.db.flush_wal(true).map_err(io_write)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        get_json(&self.db, CF_META, b"vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        put_json(&self.db, CF_META, b"committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(get_json::<Option<LogId<u64>>>(&self.db, CF_META, b"committed")?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let logs = cf(&self.db, CF_LOGS)?;
        let mut batch = WriteBatch::default();
        for e in entries {
            let v = serde_json::to_vec(&e).map_err(io_write)?;
            batch.put_cf(logs, key(e.log_id.index), v);
        }
        self.db.write(batch).map_err(io_write)?;
        // Acknowledge only once the entries are durable: Raft's safety depends on it.
        let res = self
            .db
            .flush_wal(true)
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(res);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let logs = cf(&self.db, CF_LOGS)?;
        self.db
            .delete_range_cf(logs, key(log_id.index), key(u64::MAX))
            .map_err(io_write)?;
        self.db.flush_wal(true).map_err(io_write)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        put_json(&self.db, CF_META, b"last_purged", &log_id)?;
        let logs = cf(&self.db, CF_LOGS)?;
        self.db
            .delete_range_cf(logs, key(0), key(log_id.index.saturating_add(1)))
            .map_err(io_write)
    }
}
