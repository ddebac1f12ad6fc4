//! sled and the inbox log: open, recover, checkpoint, close. Imported only by `inbox` (and
//! later the outbox); everything else sees the narrow `inbox::Inbox` interface.
//!
//! Durability comes from the write-ahead log (`wal`): an event is acknowledged once its log
//! record is synced. sled holds the indexed state; a checkpoint (every few seconds while
//! there are writes, and at shutdown) makes sled's files durable and drops the log files it
//! covers. Opening the store replays any log left by a crash.

use crate::config::Durability;
use crate::wal::{self, Wal};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const WAL_DIR: &str = "inbox-wal";
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O: {0}")]
    Io(String),
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    #[error("store is shutting down")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
            other => StoreError::Io(other.to_string()),
        }
    }
}

/// The checkpoint thread: dropping the sender stops it.
type Checkpointer = (mpsc::Sender<()>, JoinHandle<()>);

/// The sled database, its trees and the inbox log.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: sled::Db,
    pub(crate) events: sled::Tree,
    pub(crate) dedup: sled::Tree,
    pub(crate) pending: sled::Tree,
    /// Sink actions to deliver, keyed by their idempotency key (`outbox`).
    pub(crate) outbox: sled::Tree,
    /// Pipeline runs per event id (`outbox`).
    pub(crate) traces: sled::Tree,
    /// Scheduled jobs by (sink, due time, key) (`outbox`).
    pub(crate) due: sled::Tree,
    /// Dead-lettered job keys (`outbox`).
    pub(crate) dlq: sled::Tree,
    /// (event id, job key) pairs (`outbox`).
    pub(crate) event_jobs: sled::Tree,
    /// Keys of jobs in flight (`outbox`): after a restart, their outcome is unknown.
    pub(crate) leases: sled::Tree,
    meta: sled::Tree,
    /// Loyalty members by external id (`ledger`).
    pub(crate) members: sled::Tree,
    /// Ledger entries by (member, sequence) (`ledger`).
    pub(crate) ledger: sled::Tree,
    /// Ledger idempotency keys -> entry key (`ledger`).
    pub(crate) ledger_keys: sled::Tree,
    /// Promo codes by code (`codes`).
    pub(crate) codes: sled::Tree,
    /// Available codes by (pool, code) (`codes`).
    pub(crate) code_pool: sled::Tree,
    /// Assignment keys -> code (`codes`).
    pub(crate) code_keys: sled::Tree,
    /// Points on hold: accrual entry key -> (points left, release time) (`ledger`).
    pub(crate) held: sled::Tree,
    /// Holds by (release time, entry key) (`ledger`).
    pub(crate) held_due: sled::Tree,
    /// Member aliases (`email:<address>`, `phone:<E.164>`) -> member id (`ledger`).
    pub(crate) aliases: sled::Tree,
    /// Schedule state per pipeline (`schedule`).
    pub(crate) schedules: sled::Tree,
    /// Sinks whose jobs of an event are cancelled, even those not created yet (`outbox`).
    pub(crate) cancels: sled::Tree,
    pub(crate) wal: Wal,
    pub(crate) durability: Durability,
    /// Dedup keys of events decided new but not yet written to sled; its lock serialises the
    /// de-duplication decision and the log append.
    pub(crate) reserved: Arc<Mutex<std::collections::HashMap<Vec<u8>, crate::inbox::Reservation>>>,
    /// Appends hold it shared from queuing a log record until their sled write is done; a
    /// checkpoint holds it exclusively while it rotates the log.
    pub(crate) checkpoint_gate: Arc<std::sync::RwLock<()>>,
    next_id: Arc<AtomicU64>,
    /// Bumped by every outbox write: the checkpointer makes them durable too.
    pub(crate) job_writes: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    dir: PathBuf,
    checkpointer: Arc<Mutex<Option<Checkpointer>>>,
}

impl Store {
    /// Opens (or creates) the store in `dir`, replaying the inbox log a crash left behind.
    pub fn open(
        dir: &Path,
        durability: Durability,
        flush_interval: Duration,
    ) -> Result<Store, StoreError> {
        let io = |what: &str, e: std::io::Error| StoreError::Io(format!("{what}: {e}"));
        std::fs::create_dir_all(dir).map_err(|e| io(&dir.display().to_string(), e))?;
        let db = open_sled(dir)?;
        let lazy_sync = match durability {
            Durability::Fsync => None,
            Durability::Batch => Some(flush_interval),
        };
        let events = db.open_tree("events")?;
        let next = match events.last()? {
            Some((k, _)) => {
                u64::from_be_bytes(
                    k.as_ref()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("event key".into()))?,
                ) + 1
            }
            None => 0,
        };
        let wal_dir = dir.join(WAL_DIR);
        std::fs::create_dir_all(&wal_dir).map_err(|e| io("log dir", e))?;
        let leftover = wal::files(&wal_dir).map_err(|e| io("log dir", e))?;
        let healthy = Arc::new(AtomicBool::new(true));
        let last_seq = leftover.last().map(|(s, _)| *s).unwrap_or(0);
        let store = Store {
            dedup: db.open_tree("dedup")?,
            pending: db.open_tree("pending")?,
            outbox: db.open_tree("outbox")?,
            traces: db.open_tree("traces")?,
            due: db.open_tree("due")?,
            dlq: db.open_tree("dlq")?,
            event_jobs: db.open_tree("event_jobs")?,
            leases: db.open_tree("leases")?,
            meta: db.open_tree("meta")?,
            members: db.open_tree("members")?,
            ledger: db.open_tree("ledger")?,
            ledger_keys: db.open_tree("ledger_keys")?,
            codes: db.open_tree("codes")?,
            code_pool: db.open_tree("code_pool")?,
            code_keys: db.open_tree("code_keys")?,
            held: db.open_tree("held")?,
            held_due: db.open_tree("held_due")?,
            aliases: db.open_tree("aliases")?,
            schedules: db.open_tree("schedules")?,
            cancels: db.open_tree("cancels")?,
            events,
            wal: Wal::start(&wal_dir, last_seq + 1, lazy_sync, healthy.clone())
                .map_err(|e| io("log", e))?,
            db,
            durability,
            reserved: Arc::new(Mutex::new(std::collections::HashMap::new())),
            checkpoint_gate: Arc::new(std::sync::RwLock::new(())),
            next_id: Arc::new(AtomicU64::new(next)),
            job_writes: Arc::new(AtomicU64::new(0)),
            healthy,
            dir: dir.to_path_buf(),
            checkpointer: Arc::new(Mutex::new(None)),
        };
        let mut replayed = 0usize;
        for (_, file) in &leftover {
            for record in wal::read_records(file).map_err(|e| io("reading the log", e))? {
                match store.apply_logged(&record) {
                    Ok(true) => replayed += 1,
                    Ok(false) => {}
                    // A record that passed its checksum but does not decode was never
                    // acknowledged as anything usable: stop this file there, keep starting.
                    Err(StoreError::Corrupt(what)) => {
                        tracing::warn!(file = %file.display(), %what, "undecodable inbox log record; the rest of this file is skipped");
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if !leftover.is_empty() {
            store.make_sled_durable()?;
            for (_, f) in &leftover {
                std::fs::remove_file(f).map_err(|e| io("removing a replayed log", e))?;
            }
            wal::sync_dir(&wal_dir).map_err(|e| io("log dir", e))?;
            tracing::info!(
                files = leftover.len(),
                events = replayed,
                "recovered the inbox log"
            );
        }
        store
            .start_checkpointer()
            .map_err(|e| io("checkpoint thread", e))?;
        Ok(store)
    }

    pub(crate) fn allocate_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Keeps new ids above one that already exists (log replay).
    pub(crate) fn observe_id(&self, id: u64) {
        self.next_id.fetch_max(id + 1, Ordering::Relaxed);
    }

    /// Writable and the last log write succeeded.
    pub fn ready(&self) -> Result<(), StoreError> {
        self.meta.insert("ready-probe", &[1u8])?;
        if !self.healthy.load(Ordering::Relaxed) {
            return Err(StoreError::Io(
                "the last write of the inbox log failed".into(),
            ));
        }
        Ok(())
    }

    /// Adds `n` to a persistent total (kept across restarts and purges).
    pub(crate) fn add_total(&self, name: &str, n: u64) -> Result<(), StoreError> {
        if n == 0 {
            return Ok(());
        }
        let key = format!("total:{name}");
        self.meta.fetch_and_update(key.as_bytes(), |old| {
            let v = old
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((v + n).to_be_bytes().to_vec())
        })?;
        Ok(())
    }

    /// A persistent total (0 if never added to).
    pub fn total(&self, name: &str) -> u64 {
        self.meta
            .get(format!("total:{name}").as_bytes())
            .ok()
            .flatten()
            .and_then(|b| b.as_ref().try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    }

    /// Bytes on disk: sled's files and the inbox log.
    pub fn size_on_disk(&self) -> u64 {
        let log: u64 = wal::files(self.wal.dir())
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        self.db.size_on_disk().unwrap_or(0) + log
    }

    /// sled's buffers written, then every file of the store fsynced.
    fn make_sled_durable(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        sync_tree(&self.dir, &self.dir.join(WAL_DIR))
            .map_err(|e| StoreError::Io(format!("syncing the store: {e}")))
    }

    /// Seals the current log file, makes sled durable, drops the log files it covers.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let sealed = {
            let _no_append_in_between = self
                .checkpoint_gate
                .write()
                .map_err(|_| StoreError::Io("checkpoint gate poisoned".into()))?;
            self.wal.rotate_blocking().map_err(StoreError::Io)?
        };
        self.make_sled_durable()?;
        let files = wal::files(self.wal.dir()).map_err(|e| StoreError::Io(e.to_string()))?;
        for (seq, f) in files.iter().filter(|(s, _)| *s <= sealed) {
            std::fs::remove_file(f)
                .map_err(|e| StoreError::Io(format!("removing log {seq}: {e}")))?;
        }
        wal::sync_dir(self.wal.dir()).map_err(|e| StoreError::Io(e.to_string()))
    }

    fn start_checkpointer(&self) -> std::io::Result<()> {
        let (stop, stopped) = mpsc::channel::<()>();
        let store = self.clone();
        let handle = std::thread::Builder::new().name("perkflow-checkpoint".into()).spawn(move || {
            let generation = || (store.next_id.load(Ordering::Relaxed), store.job_writes.load(Ordering::Relaxed));
            let mut seen = generation();
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
                let now = generation();
                if now == seen {
                    continue;
                }
                seen = now;
                if let Err(e) = store.checkpoint() {
                    tracing::warn!(error = %e, "checkpoint failed; the inbox log keeps every event meanwhile");
                }
            }
        })?;
        *self.checkpointer.lock().expect("checkpointer lock") = Some((stop, handle));
        Ok(())
    }

    /// Stops the checkpoint thread and writes a final checkpoint (graceful shutdown).
    pub fn close(&self) -> Result<(), StoreError> {
        if let Some((stop, handle)) = self.checkpointer.lock().expect("checkpointer lock").take() {
            drop(stop);
            let _ = handle.join();
        }
        self.checkpoint()
    }
}

/// Opens sled. sled releases its file lock lazily (epoch-based reclamation), so a store
/// closed a moment ago in this process may still hold it: retry briefly before giving up.
fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(32 * 1024 * 1024)
            .flush_every_ms(Some(250))
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(e) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() > deadline {
                    return Err(StoreError::Io(format!(
                        "{} is in use by another process (is a perkflow daemon already running on it?)",
                        dir.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// fsyncs every file and directory under `dir`, except `skip`.
fn sync_tree(dir: &Path, skip: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path == skip {
            continue;
        }
        if path.is_dir() {
            sync_tree(&path, skip)?;
        } else if path.is_file() {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    wal::sync_dir(dir)
}

/// A store in a new temporary directory (tests).
#[cfg(test)]
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(200))
        .expect("store opens");
    (dir, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint waits for an append that has queued its log record but not yet written
    /// sled: otherwise it could drop the only durable copy of that event.
    #[test]
    fn a_checkpoint_waits_for_appends_between_log_and_sled() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        let in_flight = s.checkpoint_gate.read().unwrap();
        let s2 = s.clone();
        let cp = std::thread::spawn(move || s2.checkpoint());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!cp.is_finished(), "the checkpoint did not wait");
        drop(in_flight);
        cp.join().unwrap().unwrap();
        s.close().unwrap();
    }
}
