//! Coalesces the control plane's high-volume writes (endpoint, disco key and hostinfo
//! updates, online/offline) into one Raft entry per round trip.
//!
//! Thousands of clients reconnecting after a replica dies, or roaming between networks,
//! would otherwise cost one log entry and one commit each. The batcher keeps exactly one
//! write in flight; whatever queues up meanwhile goes into the next entry as a
//! `Command::Batch`, so an idle tailnet pays no added latency and a busy one pays one
//! commit per batch. Each command in a batch succeeds or fails on its own.

use tokio::sync::{mpsc, oneshot};

use crate::state::{Command, CommandOutput, Db, DbError};

/// Most commands in one Raft entry; bounds entry size (hostinfo is the large part).
const MAX_BATCH: usize = 512;
/// Updates waiting for the batcher before callers feel backpressure.
const QUEUE: usize = 16 * 1024;

type Reply = oneshot::Sender<Result<CommandOutput, DbError>>;

/// Handle to the batching task of one replica. Cheap to clone.
#[derive(Clone)]
pub struct UpdateBatcher {
    tx: mpsc::Sender<(Command, Reply)>,
}

impl UpdateBatcher {
    /// Starts the task; it ends when the last handle is dropped.
    pub fn spawn(db: Db) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(db, rx));
        Self { tx }
    }

    /// Proposes `cmd` in the next batch and returns its own outcome once applied here.
    pub async fn write(&self, cmd: Command) -> Result<CommandOutput, DbError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((cmd, reply))
            .await
            .map_err(|_| DbError::Replication("the replica is shutting down".into()))?;
        rx.await
            .map_err(|_| DbError::Replication("the replica is shutting down".into()))?
    }
}

async fn run(db: Db, mut rx: mpsc::Receiver<(Command, Reply)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        if batch.len() == 1 {
            if let Some((cmd, reply)) = batch.pop() {
                let _ = reply.send(db.write(cmd).await);
            }
            continue;
        }
        let n = batch.len();
        let (commands, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().unzip();
        match db.write(Command::Batch { commands }).await {
            Ok(CommandOutput::Batch(results)) if results.len() == n => {
                for (r, reply) in results.into_iter().zip(replies) {
                    let _ = reply.send(r.map_err(DbError::State));
                }
            }
            Ok(other) => {
                tracing::error!(?other, "a batch answered with the wrong shape");
                for reply in replies {
                    let _ = reply.send(Err(DbError::Codec(
                        "batched write answered with the wrong shape".into(),
                    )));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(DbError::Replication(msg.clone())));
                }
            }
        }
    }
}
