//! RocksDB storage for openraft: one database, three column families.
//!
//! `logs` holds entries keyed by big-endian index (so iteration is in log order), `meta`
//! holds the vote, the committed log id and the last purged log id, and `sm` holds the
//! latest snapshot. The application's state itself lives in memory in the application and
//! is rebuilt from the snapshot plus the committed log on start.

pub mod log;
pub mod recover;
pub mod state_machine;

use std::path::Path;
use std::sync::Arc;

use openraft::{AnyError, StorageError, StorageIOError};
use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use crate::error::RaftError;

pub(crate) const CF_LOGS: &str = "logs";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_SM: &str = "sm";

/// The database plus a signal that fires after it is closed (RocksDB's file lock released).
/// Field order matters: `db` drops before `_closed`.
pub(crate) struct Storage {
    db: DB,
    _closed: tokio::sync::watch::Sender<()>,
}

impl std::ops::Deref for Storage {
    type Target = DB;
    fn deref(&self) -> &DB {
        &self.db
    }
}

/// Opens the database; the receiver reports closed once the last handle is gone.
pub(crate) fn open(
    path: &Path,
) -> Result<(Arc<Storage>, tokio::sync::watch::Receiver<()>), RaftError> {
    std::fs::create_dir_all(path).map_err(|e| RaftError::Open {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = [CF_LOGS, CF_META, CF_SM]
        .into_iter()
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| RaftError::Open {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(());
    Ok((
        Arc::new(Storage {
            db,
            _closed: closed_tx,
        }),
        closed_rx,
    ))
}

pub(crate) fn io_read(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::read(AnyError::error(e.to_string())).into()
}

pub(crate) fn io_write(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::write(AnyError::error(e.to_string())).into()
}

pub(crate) fn cf<'a>(
    db: &'a DB,
    name: &str,
) -> Result<&'a rocksdb::ColumnFamily, StorageError<u64>> {
    db.cf_handle(name)
        .ok_or_else(|| io_read(format!("column family {name} missing")))
}

pub(crate) fn get_json<T: serde::de::DeserializeOwned>(
    db: &DB,
    cf_name: &str,
    key: &[u8],
) -> Result<Option<T>, StorageError<u64>> {
    let cf = cf(db, cf_name)?;
    match db.get_cf(cf, key).map_err(io_read)? {
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(io_read),
        None => Ok(None),
    }
}

pub(crate) fn put_json<T: serde::Serialize>(
    db: &DB,
    cf_name: &str,
    key: &[u8],
    value: &T,
) -> Result<(), StorageError<u64>> {
    let cf = cf(db, cf_name)?;
    let bytes = serde_json::to_vec(value).map_err(io_write)?;
    db.put_cf(cf, key, bytes).map_err(io_write)
}
