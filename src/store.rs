//! sled and the inbox log: open, recover, checkpoint, close. Imported only by `inbox` (and
//! the outbox, ledger, retention); ingest sees the narrow `inbox::Inbox` interface.
//!
//! The inbox log (`wal`) is the event store: an event is acknowledged once its record is
//! synced, and read back from the log through its index (`eventlog`). The de-duplication
//! index of the events in the log is in memory (`dedup`), rebuilt when the store opens from
//! the fingerprints stored with each sealed file's index. sled holds the rest: one index
//! value per sealed log file, the de-duplication entries of events that left the log, the
//! processed watermark, and all outbox, ledger and code state. A checkpoint (every few
//! seconds while the outbox is written, and at shutdown) makes sled's files durable; opening
//! the store re-indexes from the log what a crash left behind.

use crate::config::Durability;
use crate::eventlog::{Entry, EventLog};
use crate::wal::{self, News, Wal};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const WAL_DIR: &str = "inbox-wal";
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// A log file is sealed past this size.
const SEGMENT_BYTES: u64 = 64 << 20;

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

/// The de-duplication state: its lock serialises the decision, the id and the log append.
pub(crate) type Reserved = Arc<Mutex<crate::dedup::Index>>;

/// What the indexer thread is told, in log order.
enum Indexing {
    /// File `seq` is sealed: its index goes to sled.
    Sealed(u64),
    /// Answered once everything sent before is done.
    Flush(mpsc::Sender<()>),
}

/// The sled database, its trees and the inbox log. Cloning shares it (one reference
/// count: a clone per request is cheap).
#[derive(Clone)]
pub struct Store(Arc<Shared>);

impl std::ops::Deref for Store {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What a [`Store`] shares.
pub struct Shared {
    pub(crate) db: sled::Db,
    /// Events kept in sled rather than the log: purged (metadata only), or moved out of a
    /// log file that retention dropped.
    pub(crate) events: sled::Tree,
    /// Set once `events` holds anything: until then no read looks there.
    has_kept: AtomicBool,
    /// De-duplication entries of events out of the log (moved by retention, or written
    /// before the index was kept in memory), and of keys whose fingerprint another key holds.
    pub(crate) dedup: sled::Tree,
    /// Set once `dedup` holds anything: until then no lookup looks there.
    has_cold: AtomicBool,
    /// The fingerprint of a de-duplication key (`dedup::fingerprint`; tests force
    /// collisions).
    pub(crate) fingerprint: fn(&[u8]) -> u64,
    /// Events whose runs were deferred (a lookup failed for now), below the watermark.
    pub(crate) deferred: sled::Tree,
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
    pub(crate) meta: sled::Tree,
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
    pub(crate) log: EventLog,
    pub(crate) durability: Durability,
    /// Events on their way to disk and the index of those in the log; its lock serialises
    /// the de-duplication decision, the id and the log append.
    pub(crate) reserved: Reserved,
    next_id: Arc<AtomicU64>,
    /// Every event below it is processed, but those in `deferred` (`outbox`).
    pub(crate) processed_to: Arc<AtomicU64>,
    /// Bumped by every outbox write: the checkpointer makes them durable too.
    pub(crate) job_writes: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    dir: PathBuf,
    checkpointer: Arc<Mutex<Option<Checkpointer>>>,
    indexer: mpsc::Sender<Indexing>,
}

impl Store {
    /// Opens (or creates) the store in `dir`, indexing what a crash left in the inbox log.
    pub fn open(
        dir: &Path,
        durability: Durability,
        flush_interval: Duration,
    ) -> Result<Store, StoreError> {
        Self::open_with(
            dir,
            durability,
            flush_interval,
            SEGMENT_BYTES,
            None,
            crate::dedup::fingerprint,
        )
    }

    /// `open` with a log file size, a switch that makes log writes fail, and a fingerprint
    /// function (tests).
    pub(crate) fn open_with(
        dir: &Path,
        durability: Durability,
        flush_interval: Duration,
        segment_bytes: u64,
        fault: Option<Arc<AtomicBool>>,
        fingerprint: fn(&[u8]) -> u64,
    ) -> Result<Store, StoreError> {
        let io = |what: &str, e: std::io::Error| StoreError::Io(format!("{what}: {e}"));
        std::fs::create_dir_all(dir).map_err(|e| io(&dir.display().to_string(), e))?;
        let db = open_sled(dir)?;
        let lazy_sync = match durability {
            Durability::Fsync => None,
            Durability::Batch => Some(flush_interval),
        };
        let wal_dir = dir.join(WAL_DIR);
        std::fs::create_dir_all(&wal_dir).map_err(|e| io("log dir", e))?;
        let log = EventLog::load(&wal_dir, &db)?;
        let meta = db.open_tree("meta")?;
        let leftover = wal::files(&wal_dir).map_err(|e| io("log dir", e))?;
        let healthy = Arc::new(AtomicBool::new(true));
        let last_seq = leftover.last().map(|(s, _)| *s).unwrap_or(0);
        let reserved: Reserved = Default::default();
        let dedup = db.open_tree("dedup")?;
        let (index_tx, index_rx) = mpsc::channel::<Indexing>();
        let on_news: wal::OnNews = {
            let (log, tx) = (log.clone(), Mutex::new(index_tx.clone()));
            Arc::new(move |mut news: News| match &mut news {
                News::Durable { seq, records } => {
                    log.add(
                        *seq,
                        records.iter().map(|r| {
                            let e = Entry {
                                id: r.id,
                                off: r.off,
                                len: r.len,
                            };
                            (e, r.fp)
                        }),
                    );
                    log.remember(
                        records
                            .iter_mut()
                            .map(|r| (r.id, std::mem::take(&mut r.record))),
                    );
                }
                News::Sealed { seq } => {
                    let _ = tx
                        .lock()
                        .expect("indexer sender")
                        .send(Indexing::Sealed(*seq));
                }
            })
        };
        let processed_to = meta
            .get("processed_to")?
            .and_then(|v| v.as_ref().try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let events = db.open_tree("events")?;
        let store = Store(Arc::new(Shared {
            has_kept: AtomicBool::new(!events.is_empty()),
            events,
            deferred: db.open_tree("deferred")?,
            outbox: db.open_tree("outbox")?,
            traces: db.open_tree("traces")?,
            due: db.open_tree("due")?,
            dlq: db.open_tree("dlq")?,
            event_jobs: db.open_tree("event_jobs")?,
            leases: db.open_tree("leases")?,
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
            has_cold: AtomicBool::new(!dedup.is_empty()),
            dedup,
            fingerprint,
            meta,
            wal: Wal::start(
                &wal_dir,
                last_seq + 1,
                wal::Options {
                    lazy_sync,
                    segment_bytes,
                    healthy: healthy.clone(),
                    on_news: Some(on_news),
                    fault,
                },
            )
            .map_err(|e| io("log", e))?,
            log,
            db,
            durability,
            reserved,
            next_id: Arc::new(AtomicU64::new(0)),
            processed_to: Arc::new(AtomicU64::new(processed_to)),
            job_writes: Arc::new(AtomicU64::new(0)),
            healthy,
            dir: dir.to_path_buf(),
            checkpointer: Arc::new(Mutex::new(None)),
            indexer: index_tx,
        }));
        store.migrate()?;
        store.recover(&leftover)?;
        store
            .start_indexer(index_rx)
            .map_err(|e| io("indexer thread", e))?;
        store
            .start_checkpointer()
            .map_err(|e| io("checkpoint thread", e))?;
        Ok(store)
    }

    /// A store written before the log became the event store kept every event in `events`
    /// and a `pending` mark per unprocessed one: the watermark goes past all of them and the
    /// marks become deferred entries, so nothing is processed twice or skipped.
    fn migrate(&self) -> Result<(), StoreError> {
        if !self
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == b"pending")
        {
            return Ok(());
        }
        let pending = self.db.open_tree("pending")?;
        if self.meta.get("processed_to")?.is_none() {
            let to = self
                .events
                .last()?
                .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
                .map(|l| l + 1)
                .unwrap_or(0);
            for k in pending.iter().keys() {
                self.deferred.insert(k?, &[])?;
            }
            self.meta.insert("processed_to", &to.to_be_bytes())?;
            self.processed_to.store(to, Ordering::Relaxed);
        }
        if !self.events.is_empty() {
            self.mark_kept();
        }
        self.make_sled_durable()?;
        self.db.drop_tree("pending")?;
        tracing::info!("migrated the inbox to the log-as-store layout");
        Ok(())
    }

    /// Indexes the log files a crash left without a stored index, rebuilds the
    /// de-duplication index of every event in the log, and sets the next id.
    fn recover(&self, files: &[(u64, PathBuf)]) -> Result<(), StoreError> {
        let io = |what: &str, e: std::io::Error| StoreError::Io(format!("{what}: {e}"));
        let (mut indexed, mut hinted) = (0usize, 0usize);
        // Files retention dropped whose deletion did not happen: never read back.
        let dropped = self.log.dropped()?;
        for seq in &dropped {
            if let Err(e) = self.log.delete(*seq) {
                tracing::warn!(error = %e, "a dropped inbox log file could not be deleted; retention tries again");
            }
        }
        for (seq, path) in files {
            if dropped.contains(seq) {
                continue;
            }
            let mut sealed = self.log.is_sealed(*seq)?;
            if sealed && !self.log.fits(*seq, path)? {
                // Its index names records the file does not hold (a power loss took an
                // unsynced tail): indexed again from what is there.
                tracing::warn!(file = %path.display(), "inbox log file shorter than its index; indexing it again");
                self.log.forget(*seq)?;
                sealed = false;
            }
            if sealed {
                let entries = self.log.entries(*seq)?;
                let fps = match self.log.hints(*seq)? {
                    Some(fps) if fps.len() == entries.len() => fps,
                    _ => {
                        let fps = self.fingerprint_file(path, &entries)?;
                        self.log.store_hints(*seq, &fps)?;
                        hinted += 1;
                        fps
                    }
                };
                for (e, fp) in entries.iter().zip(fps) {
                    self.index_logged(e.id, fp)?;
                }
                continue;
            }
            let mut records = Vec::new();
            for (off, raw) in wal::scan(path).map_err(|e| io("reading the log", e))? {
                match crate::inbox::decode(&raw) {
                    Ok(ev) => match crate::inbox::parse_id(&ev.meta.id) {
                        Some(id) => records.push((id, off, raw.len() as u32, ev.meta)),
                        None => break,
                    },
                    // A record that passed its checksum but does not decode was never
                    // acknowledged as anything usable: the rest of the file is skipped.
                    Err(_) => {
                        tracing::warn!(file = %path.display(), "undecodable inbox log record; the rest of this file is skipped");
                        break;
                    }
                }
            }
            if records.is_empty() {
                std::fs::remove_file(path).map_err(|e| io("removing an empty log", e))?;
                continue;
            }
            records.sort_by_key(|r| r.0);
            let fps: Vec<u64> = records
                .iter()
                .map(|(_, _, _, m)| {
                    (self.fingerprint)(&crate::inbox::dedup_key(&m.source, &m.vendor_id))
                })
                .collect();
            self.log.add(
                *seq,
                records.iter().zip(&fps).map(|((id, off, len, _), fp)| {
                    let e = Entry {
                        id: *id,
                        off: *off,
                        len: *len,
                    };
                    (e, *fp)
                }),
            );
            indexed += records.len();
            for ((id, _, _, meta), fp) in records.iter().zip(&fps) {
                if self.repair_dedup(*id, meta, *fp)? {
                    self.log.shadow(*seq, *id);
                }
            }
            self.log.seal(*seq)?;
        }
        let last = self.log.last_id().into_iter().chain(
            self.events
                .last()?
                .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes)),
        );
        // Never below the watermark: with batch durability a power loss can take log records
        // the worker had already passed; a new event must not get one of their ids.
        let next = last
            .max()
            .map(|l| l + 1)
            .unwrap_or(0)
            .max(self.processed_to.load(Ordering::Relaxed));
        self.next_id.store(next, Ordering::Relaxed);
        if indexed + hinted > 0 {
            self.make_sled_durable()?;
            tracing::info!(
                events = indexed,
                files_fingerprinted = hinted,
                "recovered the inbox log"
            );
        }
        Ok(())
    }

    /// The fingerprints of a sealed file's entries, read from the file (one written before
    /// they were stored with the index, or whose stored ones were lost). A record that does
    /// not read gets [`crate::dedup::NO_KEY`]: an older version wrote its sled entry.
    fn fingerprint_file(&self, path: &Path, entries: &[Entry]) -> Result<Vec<u64>, StoreError> {
        let records = wal::scan(path)
            .map_err(|e| StoreError::Io(format!("reading {}: {e}", path.display())))?;
        let by_offset: std::collections::HashMap<u64, u64> = records
            .iter()
            .filter_map(|(off, raw)| {
                let meta = crate::inbox::decode(raw).ok()?.meta;
                let key = crate::inbox::dedup_key(&meta.source, &meta.vendor_id);
                Some((*off, (self.fingerprint)(&key)))
            })
            .collect();
        let fps: Vec<u64> = entries
            .iter()
            .map(|e| {
                by_offset
                    .get(&e.off)
                    .copied()
                    .unwrap_or(crate::dedup::NO_KEY)
            })
            .collect();
        let unread = fps.iter().filter(|f| **f == crate::dedup::NO_KEY).count();
        if unread > 0 {
            tracing::warn!(file = %path.display(), records = unread, "inbox log records that do not read are left out of the de-duplication index");
        }
        tracing::info!(file = %path.display(), events = entries.len(), "fingerprinted an inbox log file sealed by an older version (once)");
        Ok(fps)
    }

    /// Whether sled's `dedup` tree may hold anything.
    pub(crate) fn has_cold(&self) -> bool {
        self.has_cold.load(Ordering::Acquire)
    }

    /// Called before anything is written to `dedup`.
    pub(crate) fn mark_cold(&self) {
        self.has_cold.store(true, Ordering::Release);
    }

    /// Whether any event is kept in sled (`events`).
    pub(crate) fn kept_in_sled(&self) -> bool {
        self.has_kept.load(Ordering::Acquire)
    }

    /// Called before an event is first written to `events`.
    pub(crate) fn mark_kept(&self) {
        self.has_kept.store(true, Ordering::Release);
    }

    pub(crate) fn allocate_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Stores the index of each sealed file, off the log writer's thread.
    fn start_indexer(&self, rx: mpsc::Receiver<Indexing>) -> std::io::Result<()> {
        // Not the store itself: the thread ends when the store and the log writer are gone.
        let log = self.log.clone();
        std::thread::Builder::new()
            .name("perkflow-index".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        Indexing::Sealed(seq) => {
                            if let Err(e) = log.seal(seq) {
                                tracing::error!(error = %e, seq, "storing a log file's index failed; the next start indexes it again");
                            }
                        }
                        Indexing::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(())
    }

    /// Waits until the indexer has handled everything the log reported so far.
    pub(crate) fn flush_index(&self) {
        let (tx, rx) = mpsc::channel();
        if self.indexer.send(Indexing::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }
    }

    /// Keeps new ids above one that already exists.
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

    /// sled's buffers written, then every file of sled fsynced.
    pub(crate) fn make_sled_durable(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        sync_tree(&self.dir, &self.dir.join(WAL_DIR))
            .map_err(|e| StoreError::Io(format!("syncing the store: {e}")))
    }

    /// Makes sled durable.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.make_sled_durable()
    }

    fn start_checkpointer(&self) -> std::io::Result<()> {
        let (stop, stopped) = mpsc::channel::<()>();
        let store = self.clone();
        let handle = std::thread::Builder::new().name("perkflow-checkpoint".into()).spawn(move || {
            // Events need none (the log is synced before each answer, and a file's index is
            // rebuilt from it): only the outbox's writes do.
            let generation = || store.job_writes.load(Ordering::Relaxed);
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

    /// Stops the checkpoint thread, seals the log file being written (its index goes to
    /// sled) and writes a final checkpoint (graceful shutdown).
    pub fn close(&self) -> Result<(), StoreError> {
        if let Some((stop, handle)) = self.checkpointer.lock().expect("checkpointer lock").take() {
            drop(stop);
            let _ = handle.join();
        }
        self.wal.rotate_blocking().map_err(StoreError::Io)?;
        self.flush_index();
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

/// A store in `dir` (fsync durability) with log files of `segment_bytes` and a switch that
/// makes log writes fail (tests).
#[cfg(test)]
pub(crate) fn test_store(dir: &Path, segment_bytes: u64, fault: Option<Arc<AtomicBool>>) -> Store {
    Store::open_with(
        dir,
        Durability::Fsync,
        Duration::from_millis(50),
        segment_bytes,
        fault,
        crate::dedup::fingerprint,
    )
    .expect("store opens")
}

/// `test_store` whose de-duplication keys all have one fingerprint: every key but the first
/// is a collision (tests).
#[cfg(test)]
pub(crate) fn colliding_store(dir: &Path, segment_bytes: u64) -> Store {
    Store::open_with(
        dir,
        Durability::Fsync,
        Duration::from_millis(50),
        segment_bytes,
        None,
        |_| 7,
    )
    .expect("store opens")
}

/// A Shopify order event `vid` received at `received_at_ms`, payload `{"order":"<vid>"}`
/// (tests).
#[cfg(test)]
pub(crate) fn order_event(vid: &str, received_at_ms: u64) -> crate::inbox::NewEvent {
    crate::inbox::NewEvent {
        source: "shop".into(),
        connector: "shopify".into(),
        vendor_id: vid.into(),
        event_type: "orders/paid".into(),
        event_time: None,
        received_at_ms,
        headers: vec![("x-a".into(), "b".into())],
        payload: bytes::Bytes::from(format!("{{\"order\":\"{vid}\"}}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::Inbox;

    fn ev(vid: &str) -> crate::inbox::NewEvent {
        order_event(vid, 1)
    }

    /// A log file the writer never sealed, with no stored index, as `kill -9` leaves it:
    /// the next one in `dir`'s log, holding Shopify order events (id, vendor id). Returns
    /// its sequence number.
    async fn crashed_file(dir: &Path, events: &[(u64, &str)]) -> u64 {
        let wal_dir = dir.join(WAL_DIR);
        let next = wal::files(&wal_dir).unwrap().last().unwrap().0 + 1;
        let w = Wal::start(&wal_dir, next, wal::Options::default()).unwrap();
        for (id, vid) in events {
            let meta = crate::inbox::EventMeta {
                id: crate::inbox::format_id(*id),
                source: "shop".into(),
                connector: "shopify".into(),
                vendor_id: vid.to_string(),
                event_type: "orders/paid".into(),
                event_time: None,
                received_at_ms: 1,
                headers: vec![],
                purged_at_ms: None,
            };
            w.append(crate::inbox::encode(&meta, b"{}").into())
                .await
                .unwrap()
                .unwrap();
        }
        next
    }

    /// Files fill up and are sealed; each keeps its events readable, in order, across a
    /// clean restart and across one where nothing was sealed or checkpointed.
    #[tokio::test]
    async fn sealed_and_unsealed_files_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let open = || crate::store::test_store(dir.path(), 300, None);
        let mut ids = Vec::new();
        {
            let s = open();
            for i in 0..20 {
                ids.push(
                    s.append(vec![ev(&format!("v{i}"))]).await.unwrap()[0]
                        .id
                        .clone(),
                );
            }
            s.flush_index();
            assert!(
                wal::files(s.wal.dir()).unwrap().len() > 3,
                "files were sealed by size"
            );
            tokio::task::spawn_blocking(move || s.close())
                .await
                .unwrap()
                .unwrap();
        }
        {
            let s = open();
            let got: Vec<String> = s.events().map(|e| e.unwrap().meta.id).collect();
            assert_eq!(got, ids);
            assert!(s.append(vec![ev("v3")]).await.unwrap()[0].duplicate);
            tokio::task::spawn_blocking(move || s.close())
                .await
                .unwrap()
                .unwrap();
        }
        // A crash: a file the writer never sealed, with no stored index and no
        // de-duplication entries, as `kill -9` leaves it.
        let vids: Vec<String> = (20..25).map(|i| format!("v{i}")).collect();
        let crashed: Vec<(u64, &str)> = (1020..1025u64)
            .zip(vids.iter().map(String::as_str))
            .collect();
        crashed_file(dir.path(), &crashed).await;
        ids.extend(crashed.iter().map(|(id, _)| crate::inbox::format_id(*id)));
        let s = open();
        let got: Vec<String> = s.events().map(|e| e.unwrap().meta.id).collect();
        assert_eq!(got, ids);
        assert_eq!(s.pending_len(), 25);
        assert!(s.append(vec![ev("v22")]).await.unwrap()[0].duplicate);
        let new = s.append(vec![ev("v99")]).await.unwrap()[0].id.clone();
        assert!(crate::inbox::parse_id(&new).unwrap() > 1024, "{new}");
    }

    /// A store written before the log became the event store: events in sled, a pending
    /// mark per unprocessed one. After the upgrade only those are processed.
    #[tokio::test]
    async fn an_old_store_is_migrated_without_reprocessing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let events = db.open_tree("events").unwrap();
            let pending = db.open_tree("pending").unwrap();
            for i in 0..5u64 {
                let mut e = ev(&format!("old{i}"));
                e.received_at_ms = 1;
                let meta = crate::inbox::EventMeta {
                    id: crate::inbox::format_id(i),
                    source: e.source,
                    connector: e.connector,
                    vendor_id: e.vendor_id,
                    event_type: e.event_type,
                    event_time: None,
                    received_at_ms: 1,
                    headers: vec![],
                    purged_at_ms: None,
                };
                events
                    .insert(i.to_be_bytes(), crate::inbox::encode(&meta, b"{}"))
                    .unwrap();
            }
            pending.insert(3u64.to_be_bytes(), &[]).unwrap();
            db.flush().unwrap();
        }
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        let left = s.pending_events(10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].meta.vendor_id, "old3");
        assert_eq!(s.events().count(), 5);
        let new = s.append(vec![ev("new")]).await.unwrap()[0].id.clone();
        assert_eq!(new, crate::inbox::format_id(5));
        assert_eq!(s.pending_len(), 2);
    }

    /// With batch durability a power loss can take log records the worker had passed: new
    /// ids never go below the watermark.
    #[tokio::test]
    async fn new_ids_start_at_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), Durability::Batch, Duration::from_millis(50)).unwrap();
            s.meta
                .insert("processed_to", &100u64.to_be_bytes())
                .unwrap();
            tokio::task::spawn_blocking(move || s.close())
                .await
                .unwrap()
                .unwrap();
        }
        let s = Store::open(dir.path(), Durability::Batch, Duration::from_millis(50)).unwrap();
        let id = s.append(vec![ev("after")]).await.unwrap()[0].id.clone();
        assert_eq!(id, crate::inbox::format_id(100));
        assert_eq!(s.pending_events(10).unwrap().len(), 1);
    }

    /// Every key with one fingerprint (each new key a collision): de-duplication stays
    /// exact while events are in the log, across a clean restart, after a crash left a file
    /// unsealed (with a second record of one key in it), and once retention has moved the
    /// entries out of memory.
    #[tokio::test]
    async fn deduplicates_exactly_when_every_fingerprint_collides() {
        let dir = tempfile::tempdir().unwrap();
        let open = || crate::store::colliding_store(dir.path(), 300);
        let dup = |s: &Store, vid: &str| {
            let (s, vid) = (s.clone(), vid.to_string());
            async move { s.append(vec![ev(&vid)]).await.unwrap()[0].clone() }
        };
        let s = open();
        let mut ids = Vec::new();
        for i in 0..12 {
            let a = dup(&s, &format!("c{i}")).await;
            assert!(!a.duplicate, "c{i} is new");
            ids.push(a.id);
        }
        s.flush_index();
        assert!(wal::files(s.wal.dir()).unwrap().len() > 2);
        for (i, id) in ids.iter().enumerate() {
            let again = dup(&s, &format!("c{i}")).await;
            assert!(again.duplicate && &again.id == id, "c{i}: {again:?}");
        }
        assert_eq!(
            s.reserved.lock().unwrap().keydir.len(),
            1,
            "one fingerprint"
        );
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();

        // A crash: an unsealed file with one new key and a second record of c4.
        crashed_file(dir.path(), &[(500, "c12"), (501, "c4")]).await;
        ids.push(crate::inbox::format_id(500));
        let s = open();
        for (i, id) in ids.iter().enumerate() {
            let again = dup(&s, &format!("c{i}")).await;
            assert!(again.duplicate && &again.id == id, "c{i}: {again:?}");
        }
        let second = s.event(&crate::inbox::format_id(501)).unwrap().unwrap();
        assert!(second.meta.purged_at_ms.is_some(), "never processed twice");
        assert!(!dup(&s, "c13").await.duplicate);

        // Retention drops the files: the entries move to sled, memory lets go of them.
        let batch = s.pending_events_except(100, &Default::default()).unwrap();
        let done: Vec<_> = batch.events.iter().map(|e| (e, vec![], vec![])).collect();
        s.complete(&done, &[], batch.through).unwrap();
        let files_before = wal::files(s.wal.dir()).unwrap().len();
        s.purge(u64::MAX, 5_000, 0, &mut Default::default())
            .unwrap();
        assert!(wal::files(s.wal.dir()).unwrap().len() < files_before);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                s.dedup_lookup("shop", &format!("c{i}")).unwrap().as_ref(),
                Some(id)
            );
            assert!(dup(&s, &format!("c{i}")).await.duplicate, "c{i}");
        }
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();
        let s = open();
        for (i, id) in ids.iter().enumerate() {
            let again = dup(&s, &format!("c{i}")).await;
            assert!(
                again.duplicate && &again.id == id,
                "c{i} after the drop: {again:?}"
            );
        }
        assert!(!dup(&s, "c14").await.duplicate);
    }

    /// Regression (review): a second record of a key found at recovery (marked purged) stays
    /// out of the index, so once the first record's file is dropped it still does not answer
    /// for the key, also after a restart.
    #[tokio::test]
    async fn a_second_record_found_at_recovery_never_answers_for_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let open = || crate::store::test_store(dir.path(), 1 << 20, None);
        let s = open();
        let first = s.append(vec![ev("r1")]).await.unwrap()[0].id.clone();
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();
        let wal_dir = dir.path().join(WAL_DIR);
        let first_seq = wal::files(&wal_dir).unwrap()[0].0;
        let next = crashed_file(dir.path(), &[(500, "r1"), (501, "r2")]).await;
        let s = open();
        assert_eq!(
            s.log.hints(next).unwrap(),
            Some(vec![
                crate::dedup::NO_KEY,
                (s.fingerprint)(&crate::inbox::dedup_key("shop", "r2"))
            ])
        );
        // Retention drops the first record's file only (the watermark stops after it).
        let n = crate::inbox::parse_id(&first).unwrap();
        s.complete(&[], &[], Some(n)).unwrap();
        s.purge(u64::MAX, 5_000, 0, &mut Default::default())
            .unwrap();
        assert!(!wal::path(&wal_dir, first_seq).exists(), "dropped");
        assert!(wal::path(&wal_dir, next).exists(), "kept");
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();
        let s = open();
        let again = s.append(vec![ev("r1")]).await.unwrap()[0].clone();
        assert!(again.duplicate);
        assert_eq!(again.id, first, "answered with the first record");
    }

    /// Regression (review): a record of a file sealed by an older version (no fingerprints)
    /// that does not read no longer stops the store from opening: it is left out of the
    /// index (that version wrote its sled entry) and the others are indexed.
    #[tokio::test]
    async fn an_unreadable_record_in_an_old_file_does_not_stop_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let open = || crate::store::test_store(dir.path(), 1 << 20, None);
        let s = open();
        for i in 0..3 {
            s.append(vec![ev(&format!("o{i}"))]).await.unwrap();
        }
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();
        {
            let db = open_sled(dir.path()).unwrap();
            db.open_tree("segment_hints").unwrap().clear().unwrap();
            db.flush().unwrap();
        }
        let (seq, path) = wal::files(&dir.path().join(WAL_DIR)).unwrap()[0].clone();
        let mut data = std::fs::read(&path).unwrap();
        *data.last_mut().unwrap() ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let s = open();
        let fps = s.log.hints(seq).unwrap().unwrap();
        assert_eq!(fps.len(), 3);
        assert_eq!(fps[2], crate::dedup::NO_KEY, "the damaged one");
        for v in ["o0", "o1"] {
            assert!(s.append(vec![ev(v)]).await.unwrap()[0].duplicate, "{v}");
        }
    }

    /// The in-memory index is rebuilt from the fingerprints stored with each sealed file;
    /// a file sealed without them (an older version) is read once and gets them. Retention
    /// dropping a file takes its events out of memory.
    #[tokio::test]
    async fn rebuilds_the_index_from_stored_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let open = || crate::store::test_store(dir.path(), 300, None);
        let s = open();
        for i in 0..10 {
            s.append(vec![ev(&format!("f{i}"))]).await.unwrap();
        }
        s.flush_index();
        // As an older version left them: sealed files without fingerprints.
        let hints = s.db.open_tree("segment_hints").unwrap();
        let hinted: Vec<_> = hints.iter().keys().map(|k| k.unwrap()).collect();
        assert!(hinted.len() > 2, "every sealed file has them");
        let segments = s.db.open_tree("segments").unwrap();
        assert_eq!(hinted.len(), segments.len());
        // `segments` keeps the format an older version reads (8-byte keys, 20-byte entries).
        for item in segments.iter() {
            let (k, v) = item.unwrap();
            assert!(k.len() == 8 && v.len() % 20 == 0);
        }
        drop(segments);
        hints.clear().unwrap();
        drop(hints);
        assert_eq!(s.reserved.lock().unwrap().keydir.len(), 10);
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();
        let s = open();
        assert_eq!(s.reserved.lock().unwrap().keydir.len(), 10);
        use crate::outbox::Outbox;
        assert_eq!(s.queue_stats().unwrap().dedup_index_events, 10);
        let files = wal::files(s.wal.dir()).unwrap();
        let sealed: Vec<u64> = files
            .iter()
            .map(|(seq, _)| *seq)
            .filter(|seq| s.log.is_sealed(*seq).unwrap())
            .collect();
        assert!(sealed.len() >= hinted.len());
        for seq in sealed {
            assert!(
                s.log.hints(seq).unwrap().is_some(),
                "file {seq} fingerprinted"
            );
        }
        assert!(!s.has_cold(), "sled's dedup tree is not needed");
        for i in 0..10 {
            let v = format!("f{i}");
            assert!(s.append(vec![ev(&v)]).await.unwrap()[0].duplicate, "{v}");
        }
        let batch = s.pending_events_except(100, &Default::default()).unwrap();
        let done: Vec<_> = batch.events.iter().map(|e| (e, vec![], vec![])).collect();
        s.complete(&done, &[], batch.through).unwrap();
        s.purge(u64::MAX, 5_000, 0, &mut Default::default())
            .unwrap();
        let left = s.reserved.lock().unwrap().keydir.len();
        assert!(left < 10, "{left} events still in memory");
        assert!(s.has_cold());
        for i in 0..10 {
            let v = format!("f{i}");
            assert!(s.append(vec![ev(&v)]).await.unwrap()[0].duplicate, "{v}");
        }
    }

    /// The worker's read passes over events no pipeline listens to: they count as read
    /// (`through`) but are not returned, and one read looks at a bounded number of them.
    #[tokio::test]
    async fn events_nobody_listens_to_are_passed_over() {
        let (_dir, s) = temp_store();
        let mut ids = Vec::new();
        for i in 0..10 {
            let mut e = ev(&format!("u{i}"));
            if i % 3 == 0 {
                e.event_type = "orders/create".into();
            }
            let a = s.append(vec![e]).await.unwrap();
            ids.push(crate::inbox::parse_id(&a[0].id).unwrap());
        }
        let created = |_: &str, t: &str| t == "orders/create";
        let b = s
            .pending_events_for(100, &Default::default(), &created)
            .unwrap();
        let got: Vec<&str> = b.events.iter().map(|e| e.meta.vendor_id.as_str()).collect();
        assert_eq!(got, ["u0", "u3", "u6", "u9"]);
        assert_eq!(b.through, Some(ids[9]));
        assert_eq!(b.events[1].payload, &b"{\"order\":\"u3\"}"[..]);
        let writes = s.job_writes.load(Ordering::Relaxed);
        s.complete(&[], &[], b.through).unwrap();
        assert_eq!(s.pending_len(), 0);
        assert_eq!(
            s.job_writes.load(Ordering::Relaxed),
            writes,
            "moving the watermark alone asks for no checkpoint"
        );

        for i in 0..200 {
            s.append(vec![ev(&format!("n{i}"))]).await.unwrap();
        }
        let b = s
            .pending_events_for(1, &Default::default(), &created)
            .unwrap();
        assert!(b.events.is_empty());
        assert_eq!(b.through, Some(ids[9] + 64), "64 read for a batch of one");
        // A deferral is an outbox write: it asks for one.
        s.complete(&[], &[ids[2]], None).unwrap();
        assert_eq!(s.job_writes.load(Ordering::Relaxed), writes + 1);
    }

    /// A sealed file shorter than its index (an unsynced tail lost) is indexed again from
    /// what it holds.
    #[tokio::test]
    async fn a_file_shorter_than_its_index_is_indexed_again() {
        let dir = tempfile::tempdir().unwrap();
        let open = || crate::store::test_store(dir.path(), 1 << 20, None);
        let s = open();
        for i in 0..3 {
            s.append(vec![ev(&format!("t{i}"))]).await.unwrap();
        }
        let seq = wal::files(s.wal.dir()).unwrap()[0].0;
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();
        let path = wal::path(&dir.path().join(WAL_DIR), seq);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let s = open();
        let got: Vec<String> = s.events().map(|e| e.unwrap().meta.vendor_id).collect();
        assert_eq!(got, ["t0", "t1"]);
    }
}
