//! The Raft log, vote and committed index in RocksDB (`RaftLogStorage`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
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

/// First byte of an entry stored in the compact form; JSON (the original form, which
/// every entry that is not a command still uses) starts with `{`.
const COMPACT: u8 = 1;

/// How an entry is stored. A command is `COMPACT`, its log id's JSON length (u32,
/// big-endian), that JSON, then the command's bytes as they are: JSON would spell each
/// byte as a decimal number, close to four times the size. Blank and membership entries
/// (rare and small) stay JSON, as every entry was before, so a store written by an older
/// version reads unchanged.
pub(crate) fn encode_entry(e: &Entry<TypeConfig>) -> Result<Vec<u8>, serde_json::Error> {
    match &e.payload {
        EntryPayload::Normal(command) => {
            let id = serde_json::to_vec(&e.log_id)?;
            let mut out = Vec::with_capacity(5 + id.len() + command.len());
            out.push(COMPACT);
            // A log id's JSON is a few dozen bytes.
            out.extend_from_slice(&(id.len() as u32).to_be_bytes());
            out.extend_from_slice(&id);
            out.extend_from_slice(command);
            Ok(out)
        }
        _ => serde_json::to_vec(e),
    }
}

/// Reads an entry in either stored form.
pub(crate) fn decode_entry(v: &[u8]) -> Result<Entry<TypeConfig>, String> {
    match v.split_first() {
        Some((&COMPACT, rest)) => {
            let (len, rest) = rest
                .split_first_chunk::<4>()
                .ok_or("truncated compact log entry")?;
            let len = u32::from_be_bytes(*len) as usize;
            if rest.len() < len {
                return Err("truncated compact log entry".into());
            }
            let (id, command) = rest.split_at(len);
            Ok(Entry {
                log_id: serde_json::from_slice(id).map_err(|e| e.to_string())?,
                payload: EntryPayload::Normal(command.to_vec()),
            })
        }
        _ => serde_json::from_slice(v).map_err(|e| e.to_string()),
    }
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
            out.push(decode_entry(&v).map_err(io_read)?);
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
                let e = decode_entry(&v).map_err(io_read)?;
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
            let v = encode_entry(&e).map_err(io_write)?;
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

#[cfg(test)]
mod tests {
    use super::{decode_entry, encode_entry};
    use crate::TypeConfig;
    use openraft::{BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership};
    use std::collections::{BTreeMap, BTreeSet};

    fn id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 2), index)
    }

    #[test]
    fn commands_are_stored_compactly_and_every_entry_reads_back() {
        let command: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let normal = Entry::<TypeConfig> {
            log_id: id(7, 42),
            payload: EntryPayload::Normal(command.clone()),
        };
        let stored = encode_entry(&normal).expect("encode");
        let old = serde_json::to_vec(&normal).expect("json");
        assert!(
            stored.len() < command.len() + 64,
            "{} bytes for a 1000-byte command",
            stored.len()
        );
        assert!(
            old.len() > 3 * command.len(),
            "the JSON form spells every byte out"
        );
        for bytes in [&stored, &old] {
            let e = decode_entry(bytes).expect("decode");
            assert_eq!(e.log_id, normal.log_id);
            assert!(matches!(e.payload, EntryPayload::Normal(ref c) if *c == command));
        }

        let voters = BTreeSet::from([1u64, 2, 3]);
        let nodes: BTreeMap<u64, BasicNode> = voters
            .iter()
            .map(|i| (*i, BasicNode::new(format!("10.0.0.{i}:7000"))))
            .collect();
        let membership = Entry::<TypeConfig> {
            log_id: id(7, 43),
            payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
        };
        let blank = Entry::<TypeConfig> {
            log_id: id(8, 44),
            payload: EntryPayload::Blank,
        };
        for e in [membership, blank] {
            let stored = encode_entry(&e).expect("encode");
            assert_eq!(stored, serde_json::to_vec(&e).expect("json"), "stays JSON");
            let back = decode_entry(&stored).expect("decode");
            assert_eq!(back.log_id, e.log_id);
            assert_eq!(
                serde_json::to_value(&back.payload).expect("json"),
                serde_json::to_value(&e.payload).expect("json")
            );
        }
    }

    #[test]
    fn a_damaged_compact_entry_is_an_error_not_a_panic() {
        for bad in [
            &[1u8][..],
            &[1, 0, 0, 0, 200, b'{'],
            &[1, 0, 0, 0, 2, b'{', b'}'],
        ] {
            assert!(decode_entry(bad).is_err(), "{bad:?}");
        }
    }
}
