//! sled: open, trees, durable flush with group commit. Imported only by `inbox` (and later
//! the outbox); everything else sees the narrow `inbox::Inbox` interface.
//!
//! sled makes writes durable on `flush`. Many tasks awaiting `flush_async` at once can hang
//! (measured on sled 0.34.7), and one flush per request would cost throughput, so exactly one
//! flusher thread drains every waiting writer, calls `Db::flush` once, then wakes them all:
//! concurrent requests share one fsync.

use crate::config::Durability;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::sync::oneshot;

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

/// A writer waiting for a flush; it carries the database so the flusher thread holds it only
/// while flushing (dropping the last `Store` closes the database at once).
type Waiter = (sled::Db, oneshot::Sender<Result<(), String>>);

/// The sled database with its trees and the group-commit flusher.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: sled::Db,
    pub(crate) events: sled::Tree,
    pub(crate) dedup: sled::Tree,
    pub(crate) pending: sled::Tree,
    meta: sled::Tree,
    durability: Durability,
    flusher: mpsc::Sender<Waiter>,
    healthy: Arc<AtomicBool>,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(
        dir: &Path,
        durability: Durability,
        flush_interval: Duration,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        let every = match durability {
            Durability::Fsync => 1000,
            Durability::Batch => flush_interval.as_millis().clamp(1, 60_000) as u64,
        };
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(32 * 1024 * 1024)
            .flush_every_ms(Some(every))
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Io(format!(
                    "{} is in use by another process (is a perkflow daemon already running on it?)",
                    dir.display()
                ))
                }
                other => StoreError::from(other),
            })?;
        let healthy = Arc::new(AtomicBool::new(true));
        let (tx, rx) = mpsc::channel::<Waiter>();
        {
            let healthy = healthy.clone();
            std::thread::Builder::new()
                .name("perkflow-flusher".into())
                .spawn(move || flusher(rx, healthy))
                .map_err(|e| StoreError::Io(format!("cannot start flusher: {e}")))?;
        }
        Ok(Store {
            events: db.open_tree("events")?,
            dedup: db.open_tree("dedup")?,
            pending: db.open_tree("pending")?,
            meta: db.open_tree("meta")?,
            db,
            durability,
            flusher: tx,
            healthy,
        })
    }

    /// Waits until everything written before this call is on disk (fsync durability), or
    /// returns at once (batch durability: the periodic flush covers it).
    pub async fn durable(&self) -> Result<(), StoreError> {
        if self.durability == Durability::Batch {
            return Ok(());
        }
        self.flush_shared().await
    }

    /// One shared flush covering every write made before the call.
    pub async fn flush_shared(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.flusher
            .send((self.db.clone(), tx))
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Io(e)),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Writable and the last flush succeeded.
    pub fn ready(&self) -> Result<(), StoreError> {
        self.meta.insert("ready-probe", &[1u8])?;
        if !self.healthy.load(Ordering::Relaxed) {
            return Err(StoreError::Io("the last flush to disk failed".into()));
        }
        Ok(())
    }

    /// A blocking flush (shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub(crate) fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    pub(crate) fn mark_unhealthy(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }
}

fn flusher(rx: mpsc::Receiver<Waiter>, healthy: Arc<AtomicBool>) {
    while let Ok((db, first)) = rx.recv() {
        let mut waiters = vec![first];
        waiters.extend(rx.try_iter().map(|(_, w)| w));
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        healthy.store(result.is_ok(), Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!(error = %e, "flushing the store to disk failed; webhooks are refused with 503 until it works");
        }
        drop(db);
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(100)).unwrap();
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.events.insert(i.to_be_bytes(), &[0u8; 16]).unwrap();
                s.durable().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.events.len(), 64);
        store.ready().unwrap();
    }
}
