//! (3) The inbox: verified events, de-duplicated on (source, vendor event id), stored before
//! the webhook is acknowledged. [`Inbox`] is the narrow interface ingest uses; [`Store`]
//! (sled) is the embedded implementation.

use crate::config::Durability;
use crate::store::{Store, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

/// An event to store.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: String,
    pub connector: String,
    pub vendor_id: String,
    pub event_type: String,
    pub event_time: Option<String>,
    pub received_at_ms: u64,
    /// Request headers, lower-case names, signature headers removed.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

/// What storing one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub id: String,
    pub duplicate: bool,
}

/// A stored event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventMeta {
    pub id: String,
    pub source: String,
    pub connector: String,
    pub vendor_id: String,
    pub event_type: String,
    pub event_time: Option<String>,
    pub received_at_ms: u64,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub meta: EventMeta,
    pub payload: Bytes,
}

/// What `append_now` did: the answers, the ids inserted (for rollback), and the log write
/// to wait for.
type Staged = (Vec<Appended>, Vec<u64>, Option<crate::wal::Pending>);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The storage seam for ingest: a PostgreSQL backend implements this and nothing in ingest
/// changes.
pub trait Inbox: Send + Sync + 'static {
    /// Stores each event unless (source, vendor id) is already there, atomically for the
    /// whole batch, and resolves once the result is durable (per the durability setting).
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Appended>, StoreError>>;
    /// Writable now.
    fn ready(&self) -> Result<(), StoreError>;
    /// A page of stored events, newest first.
    fn list(&self, query: &EventQuery) -> Result<EventPage, StoreError>;
    /// One stored event and whether it still waits for processing.
    fn get(&self, id: &str) -> Result<Option<(StoredEvent, bool)>, StoreError>;
}

/// Filters for [`Inbox::list`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EventQuery {
    pub source: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Only events older than this id (the previous page's `next`).
    pub before: Option<String>,
    pub limit: Option<usize>,
}

/// One page of events, newest first; `next` continues the listing.
#[derive(Debug, Clone, Serialize)]
pub struct EventPage {
    pub events: Vec<EventSummary>,
    pub next: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventSummary {
    #[serde(flatten)]
    pub meta: EventMeta,
    pub pending: bool,
    pub payload_bytes: usize,
}

pub fn format_id(n: u64) -> String {
    format!("ev_{n:016x}")
}

pub fn parse_id(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("ev_")?, 16).ok()
}

/// The event id a dedup entry points at.
fn dedup_target(value: &[u8]) -> Option<u64> {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

fn dedup_key(source: &str, vendor_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(source.len() + vendor_id.len() + 1);
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(vendor_id.as_bytes());
    k
}

/// `[u32 BE meta length][meta JSON][payload]`: the payload stays byte-exact.
fn encode(meta: &EventMeta, payload: &[u8]) -> Vec<u8> {
    let m = serde_json::to_vec(meta).expect("event meta serialises");
    let mut out = Vec::with_capacity(4 + m.len() + payload.len());
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(payload);
    out
}

fn decode(raw: &[u8]) -> Result<StoredEvent, StoreError> {
    let bad = || StoreError::Corrupt("event record".into());
    let len = u32::from_be_bytes(
        raw.get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let meta_bytes = raw.get(4..4 + len).ok_or_else(bad)?;
    let meta: EventMeta = serde_json::from_slice(meta_bytes).map_err(|_| bad())?;
    Ok(StoredEvent {
        meta,
        payload: Bytes::copy_from_slice(&raw[4 + len..]),
    })
}

impl Store {
    /// Decides, under the reservation lock, which events are new, reserves their dedup keys
    /// and queues their log records (so log order is decision order, and a duplicate's
    /// barrier is queued after its original's record); then writes the new ones to sled
    /// outside the lock. Returns the answers, the ids written (for rollback) and the log
    /// write to wait for.
    fn append_now(&self, events: &[NewEvent]) -> Result<Staged, StoreError> {
        // Ids and records are prepared before taking the lock; an id unused by a duplicate
        // is simply skipped.
        let prepared: Vec<(u64, Vec<u8>, Bytes)> = events
            .iter()
            .map(|e| {
                let id = self.allocate_id();
                let meta = EventMeta {
                    id: format_id(id),
                    source: e.source.clone(),
                    connector: e.connector.clone(),
                    vendor_id: e.vendor_id.clone(),
                    event_type: e.event_type.clone(),
                    event_time: e.event_time.clone(),
                    received_at_ms: e.received_at_ms,
                    headers: e.headers.clone(),
                };
                (
                    id,
                    dedup_key(&e.source, &e.vendor_id),
                    Bytes::from(encode(&meta, &e.payload)),
                )
            })
            .collect();
        let mut out = Vec::with_capacity(events.len());
        let mut fresh = Vec::new();
        let mut last = None;
        {
            let mut reserved = self
                .reserved
                .lock()
                .map_err(|_| StoreError::Io("dedup lock poisoned".into()))?;
            for (id, key, record) in &prepared {
                if let Some(prior) = reserved.get(key) {
                    out.push(Appended {
                        id: format_id(*prior),
                        duplicate: true,
                    });
                    continue;
                }
                if let Some(prior) = self.dedup.get(key)?.as_deref().and_then(dedup_target) {
                    // A dedup entry whose event is missing (a crash between unacknowledged
                    // writes) does not count.
                    if self.events.contains_key(prior.to_be_bytes())? {
                        out.push(Appended {
                            id: format_id(prior),
                            duplicate: true,
                        });
                        continue;
                    }
                }
                reserved.insert(key.clone(), *id);
                last = Some(match self.durability {
                    Durability::Fsync => Some(self.wal.append(record.clone())),
                    Durability::Batch => {
                        self.wal.append_nowait(record.clone());
                        None
                    }
                });
                fresh.push((*id, key, record, events[out.len()].received_at_ms));
                out.push(Appended {
                    id: format_id(*id),
                    duplicate: false,
                });
            }
        }
        let mut written = Vec::with_capacity(fresh.len());
        for (id, key, record, received_at_ms) in fresh {
            let result = self.insert_event(id, key, received_at_ms, record);
            self.reserved
                .lock()
                .map_err(|_| StoreError::Io("dedup lock poisoned".into()))?
                .remove(key);
            if let Err(err) = result {
                self.rollback(&written);
                return Err(err);
            }
            written.push(id);
        }
        let wait = match (last, self.durability) {
            (Some(w), _) => w,
            // Only duplicates: their originals may still be on the way to disk.
            (None, Durability::Fsync) => Some(self.wal.barrier()),
            (None, Durability::Batch) => None,
        };
        Ok((out, written, wait))
    }

    /// Event first, dedup entry last: a dedup entry always points at a written event.
    fn insert_event(
        &self,
        id: u64,
        dedup_key: &[u8],
        received_at_ms: u64,
        record: &[u8],
    ) -> Result<(), StoreError> {
        self.events.insert(id.to_be_bytes(), record)?;
        self.pending.insert(id.to_be_bytes(), &[])?;
        let mut val = id.to_be_bytes().to_vec();
        val.extend_from_slice(&received_at_ms.to_be_bytes());
        self.dedup.insert(dedup_key, val)?;
        Ok(())
    }

    /// Undoes the inserts of a batch whose log write failed, so a retry is not taken for a
    /// duplicate of something that never became durable.
    fn rollback(&self, ids: &[u64]) {
        for id in ids {
            let key = id.to_be_bytes();
            if let Ok(Some(raw)) = self.events.remove(key) {
                if let Ok(ev) = decode(&raw) {
                    let _ = self
                        .dedup
                        .remove(dedup_key(&ev.meta.source, &ev.meta.vendor_id));
                }
            }
            let _ = self.pending.remove(key);
        }
    }

    /// Replays one log record into sled (store opening). Returns whether it was missing.
    pub(crate) fn apply_logged(&self, record: &[u8]) -> Result<bool, StoreError> {
        let ev = decode(record)?;
        let id = parse_id(&ev.meta.id)
            .ok_or_else(|| StoreError::Corrupt(format!("logged event id {}", ev.meta.id)))?;
        self.observe_id(id);
        if self.events.contains_key(id.to_be_bytes())? {
            return Ok(false);
        }
        let key = dedup_key(&ev.meta.source, &ev.meta.vendor_id);
        self.insert_event(id, &key, ev.meta.received_at_ms, record)?;
        Ok(true)
    }

    /// One stored event by id.
    pub fn event(&self, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let Some(n) = parse_id(id) else {
            return Ok(None);
        };
        self.events
            .get(n.to_be_bytes())?
            .map(|raw| decode(&raw))
            .transpose()
    }

    /// Every stored event, oldest first.
    pub fn events(&self) -> impl Iterator<Item = Result<StoredEvent, StoreError>> + '_ {
        self.events
            .iter()
            .map(|r| r.map_err(StoreError::from).and_then(|(_, v)| decode(&v)))
    }

    /// How many events wait for processing.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The event id stored for (source, vendor id), if any.
    pub fn dedup_lookup(
        &self,
        source: &str,
        vendor_id: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .dedup
            .get(dedup_key(source, vendor_id))?
            .and_then(|v| {
                v.get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
            })
            .map(format_id))
    }
}

impl Inbox for Store {
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Appended>, StoreError>> {
        Box::pin(async move {
            let (out, inserted, wait) = self.append_now(&events)?;
            if let Some(wait) = wait {
                let synced = match wait.await {
                    Ok(r) => r.map_err(StoreError::Io),
                    Err(_) => Err(StoreError::Closed),
                };
                if let Err(e) = synced {
                    self.rollback(&inserted);
                    return Err(e);
                }
            }
            Ok(out)
        })
    }

    fn ready(&self) -> Result<(), StoreError> {
        Store::ready(self)
    }

    fn list(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        const MAX: usize = 500;
        let limit = q.limit.unwrap_or(50).clamp(1, MAX);
        let upper = match &q.before {
            Some(b) => match parse_id(b) {
                Some(n) => n,
                None => {
                    return Ok(EventPage {
                        events: vec![],
                        next: None,
                    })
                }
            },
            None => u64::MAX,
        };
        let mut events = Vec::new();
        let mut next = None;
        for item in self.events.range(..upper.to_be_bytes()).rev() {
            let (key, raw) = item?;
            let ev = decode(&raw)?;
            let matches = q.source.as_ref().is_none_or(|s| *s == ev.meta.source)
                && q.event_type
                    .as_ref()
                    .is_none_or(|t| *t == ev.meta.event_type);
            if !matches {
                continue;
            }
            if events.len() == limit {
                next = events.last().map(|e: &EventSummary| e.meta.id.clone());
                break;
            }
            let pending = self.pending.contains_key(&key)?;
            events.push(EventSummary {
                payload_bytes: ev.payload.len(),
                meta: ev.meta,
                pending,
            });
        }
        Ok(EventPage { events, next })
    }

    fn get(&self, id: &str) -> Result<Option<(StoredEvent, bool)>, StoreError> {
        let Some(ev) = self.event(id)? else {
            return Ok(None);
        };
        let n = parse_id(id).unwrap_or_default();
        let pending = self.pending.contains_key(n.to_be_bytes())?;
        Ok(Some((ev, pending)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use std::time::Duration;

    fn ev(source: &str, vid: &str) -> NewEvent {
        NewEvent {
            source: source.into(),
            connector: "shopify".into(),
            vendor_id: vid.into(),
            event_type: "orders/paid".into(),
            event_time: None,
            received_at_ms: 1,
            headers: vec![("x-a".into(), "b".into())],
            payload: Bytes::from_static(b"{\"id\":1}\n\xff"),
        }
    }

    #[tokio::test]
    async fn dedups_per_source_and_keeps_payload_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        let a = s.append(vec![ev("shop", "e1")]).await.unwrap();
        assert!(!a[0].duplicate);
        let b = s.append(vec![ev("shop", "e1")]).await.unwrap();
        assert_eq!(
            b[0],
            Appended {
                id: a[0].id.clone(),
                duplicate: true
            }
        );
        let c = s.append(vec![ev("other", "e1")]).await.unwrap();
        assert!(!c[0].duplicate);
        // Within one batch, the second copy is a duplicate of the first.
        let d = s
            .append(vec![ev("shop", "e2"), ev("shop", "e2")])
            .await
            .unwrap();
        assert!(!d[0].duplicate && d[1].duplicate && d[0].id == d[1].id);
        assert_eq!(s.events().count(), 3);
        assert_eq!(s.pending_len(), 3);
        let got = s.event(&a[0].id).unwrap().unwrap();
        assert_eq!(&got.payload[..], b"{\"id\":1}\n\xff");
        assert_eq!(got.meta.vendor_id, "e1");
        assert_eq!(s.dedup_lookup("shop", "e1").unwrap(), Some(a[0].id.clone()));
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
            let id = s.append(vec![ev("shop", "e1")]).await.unwrap()[0]
                .id
                .clone();
            tokio::task::spawn_blocking(move || s.close())
                .await
                .unwrap()
                .unwrap();
            id
        };
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        assert!(s.event(&id).unwrap().is_some());
        assert!(s.append(vec![ev("shop", "e1")]).await.unwrap()[0].duplicate);
    }

    #[tokio::test]
    async fn lists_newest_first_with_filters_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        for i in 0..5 {
            s.append(vec![ev(
                if i % 2 == 0 { "shop" } else { "woo" },
                &format!("v{i}"),
            )])
            .await
            .unwrap();
        }
        let all = s
            .list(&EventQuery {
                limit: Some(2),
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<&str> = all
            .events
            .iter()
            .map(|e| e.meta.vendor_id.as_str())
            .collect();
        assert_eq!(ids, ["v4", "v3"]);
        let rest = s
            .list(&EventQuery {
                before: all.next.clone(),
                limit: Some(10),
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<&str> = rest
            .events
            .iter()
            .map(|e| e.meta.vendor_id.as_str())
            .collect();
        assert_eq!(ids, ["v2", "v1", "v0"]);
        assert_eq!(rest.next, None);
        let woo = s
            .list(&EventQuery {
                source: Some("woo".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(woo.events.len(), 2);
        assert!(woo
            .events
            .iter()
            .all(|e| e.pending && e.payload_bytes == 10));
        let (got, pending) = s.get(&all.events[0].meta.id).unwrap().unwrap();
        assert!(pending);
        assert_eq!(got.meta.vendor_id, "v4");
        assert!(s.get("ev_ffffffffffffffff").unwrap().is_none());
        assert!(s.get("nonsense").unwrap().is_none());
    }

    /// A crash after the log record was synced but before sled wrote anything: opening the
    /// store replays the log.
    #[tokio::test]
    async fn replays_the_log_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("inbox-wal");
        std::fs::create_dir_all(&wal_dir).unwrap();
        let meta = EventMeta {
            id: format_id(41),
            source: "shop".into(),
            connector: "shopify".into(),
            vendor_id: "e-logged".into(),
            event_type: "orders/paid".into(),
            event_time: None,
            received_at_ms: 5,
            headers: vec![],
        };
        let wal = crate::wal::Wal::start(&wal_dir, 1, None, Default::default()).unwrap();
        wal.append(encode(&meta, b"{\"logged\":true}").into())
            .await
            .unwrap()
            .unwrap();
        drop(wal);
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        let got = s.event("ev_0000000000000029").unwrap().expect("replayed");
        assert_eq!(&got.payload[..], b"{\"logged\":true}");
        assert_eq!(s.pending_len(), 1);
        assert!(s.append(vec![ev("shop", "e-logged")]).await.unwrap()[0].duplicate);
        // New ids continue after the replayed one.
        let new = s.append(vec![ev("shop", "e-new")]).await.unwrap()[0]
            .id
            .clone();
        assert!(parse_id(&new).unwrap() > 41, "{new}");
        // The replayed log was checkpointed away.
        assert_eq!(crate::wal::files(&wal_dir).unwrap().len(), 1);
    }
}
