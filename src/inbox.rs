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
    /// When retention removed the payload (the metadata stays, so re-deliveries are still
    /// recognised as duplicates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_at_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub meta: EventMeta,
    pub payload: Bytes,
}

/// A dedup key decided new and written to sled, whose log write is not confirmed yet: its id
/// and the outcome duplicates wait for.
pub(crate) type Reservation = (u64, tokio::sync::watch::Receiver<Option<bool>>);

/// An event this call decided new.
struct Fresh {
    id: u64,
    key: Vec<u8>,
    outcome: tokio::sync::watch::Sender<Option<bool>>,
}

impl Fresh {
    fn new(id: u64, key: Vec<u8>) -> Self {
        Fresh {
            id,
            key,
            outcome: tokio::sync::watch::channel(None).0,
        }
    }
}

/// What `append_now` decided and what the answer must wait for.
#[derive(Default)]
struct Staged {
    answers: Vec<Appended>,
    fresh: Vec<Fresh>,
    /// Log writes (new records, or a barrier behind stored duplicates).
    writes: Vec<crate::wal::Pending>,
    /// Outcomes of originals still in flight in other requests.
    in_flight: Vec<tokio::sync::watch::Receiver<Option<bool>>>,
    needs_barrier: bool,
}

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
    /// The pipeline runs recorded for an event.
    fn trace(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError>;
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
    /// Only events with a pipeline run that ended so: `completed`, `filtered` or `failed`.
    pub outcome: Option<String>,
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
    /// How each pipeline run ended (empty while pending, or when no pipeline listens).
    pub runs: Vec<RunSummary>,
}

/// One pipeline run of an event, in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub pipeline: String,
    pub outcome: String,
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
pub(crate) fn encode(meta: &EventMeta, payload: &[u8]) -> Vec<u8> {
    let m = serde_json::to_vec(meta).expect("event meta serialises");
    let mut out = Vec::with_capacity(4 + m.len() + payload.len());
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(payload);
    out
}

pub(crate) fn decode(raw: &[u8]) -> Result<StoredEvent, StoreError> {
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
    /// Decides, under the dedup lock, which events are new, reserves them (duplicates of an
    /// event in flight wait for its outcome; duplicates of a stored one wait for a barrier
    /// behind it) and queues their log records in decision order; then writes them to sled.
    /// The checkpoint gate keeps a checkpoint from dropping a log file in between.
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
                    purged_at_ms: None,
                };
                (
                    id,
                    dedup_key(&e.source, &e.vendor_id),
                    Bytes::from(encode(&meta, &e.payload)),
                )
            })
            .collect();
        let mut staged = Staged::default();
        // Held until the sled writes are done: a checkpoint rotates the log only while no
        // append is between queuing its record and writing sled, so it never drops a log
        // file whose events sled does not have yet.
        let _gate = self
            .checkpoint_gate
            .read()
            .map_err(|_| StoreError::Io("checkpoint gate poisoned".into()))?;
        let mut to_write = Vec::new();
        {
            let mut reserved = self
                .reserved
                .lock()
                .map_err(|_| StoreError::Io("dedup lock poisoned".into()))?;
            for ((id, key, record), e) in prepared.into_iter().zip(events) {
                if let Some((prior, outcome)) = reserved.get(&key) {
                    let own = staged.fresh.iter().any(|f| f.id == *prior);
                    staged.answers.push(Appended {
                        id: format_id(*prior),
                        duplicate: true,
                    });
                    if !own {
                        staged.in_flight.push(outcome.clone());
                    }
                    continue;
                }
                let prior = match self.live_dedup(&key) {
                    Ok(p) => p,
                    Err(err) => {
                        self.undo(&mut reserved, &staged.fresh, false);
                        return Err(err);
                    }
                };
                if let Some(prior) = prior {
                    staged.answers.push(Appended {
                        id: format_id(prior),
                        duplicate: true,
                    });
                    staged.needs_barrier = true;
                    continue;
                }
                // Reserved (duplicates now wait for this one) and queued in log order.
                staged.writes.push(match self.durability {
                    Durability::Fsync => self.wal.append(record.clone()),
                    Durability::Batch => self.wal.append_written(record.clone()),
                });
                let fresh = Fresh::new(id, key);
                reserved.insert(fresh.key.clone(), (id, fresh.outcome.subscribe()));
                to_write.push((id, fresh.key.clone(), e.received_at_ms, record));
                staged.fresh.push(fresh);
                staged.answers.push(Appended {
                    id: format_id(id),
                    duplicate: false,
                });
            }
            if staged.writes.is_empty() && staged.needs_barrier {
                staged
                    .writes
                    .push(self.wal.barrier(self.durability == Durability::Fsync));
            }
        }
        // sled outside the dedup lock: reservations keep duplicates out meanwhile.
        for (id, key, received_at_ms, record) in to_write {
            if let Err(err) = self.insert_event(id, &key, received_at_ms, &record) {
                let mut reserved = self
                    .reserved
                    .lock()
                    .map_err(|_| StoreError::Io("dedup lock poisoned".into()))?;
                self.undo(&mut reserved, &staged.fresh, false);
                return Err(err);
            }
        }
        Ok(staged)
    }

    /// Ends the reservations of `fresh`: kept on success; on failure their sled writes are
    /// undone first (a dedup entry only if it still points at the event), so a retry is not
    /// taken for a duplicate of something that never became durable.
    fn undo(
        &self,
        reserved: &mut std::collections::HashMap<Vec<u8>, Reservation>,
        fresh: &[Fresh],
        ok: bool,
    ) {
        for f in fresh {
            if !ok {
                // Dedup entry first: it must never point at a removed event.
                if let Ok(Some(v)) = self.dedup.get(&f.key) {
                    if dedup_target(&v) == Some(f.id) {
                        let _ = self.dedup.remove(&f.key);
                    }
                }
                let _ = self.events.remove(f.id.to_be_bytes());
                let _ = self.pending.remove(f.id.to_be_bytes());
            }
            if reserved.get(&f.key).is_some_and(|(id, _)| *id == f.id) {
                reserved.remove(&f.key);
            }
            f.outcome.send_replace(Some(ok));
        }
    }

    /// Event first, dedup entry last: a dedup entry always points at a written event.
    fn insert_event(
        &self,
        id: u64,
        dedup_key: &[u8],
        received_at_ms: u64,
        record: &[u8],
    ) -> Result<(), StoreError> {
        // Pending mark first, dedup entry last (sled recovers its log in order): an event
        // without a pending mark was processed; a mark without an event is dropped; a dedup
        // entry always points at a written event.
        self.pending.insert(id.to_be_bytes(), &[])?;
        self.events.insert(id.to_be_bytes(), record)?;
        let mut val = id.to_be_bytes().to_vec();
        val.extend_from_slice(&received_at_ms.to_be_bytes());
        self.dedup.insert(dedup_key, val)?;
        Ok(())
    }

    /// Replays one log record into sled (store opening). Returns whether it was missing.
    pub(crate) fn apply_logged(&self, record: &[u8]) -> Result<bool, StoreError> {
        let ev = decode(record)?;
        let id = parse_id(&ev.meta.id)
            .ok_or_else(|| StoreError::Corrupt(format!("logged event id {}", ev.meta.id)))?;
        self.observe_id(id);
        let key = dedup_key(&ev.meta.source, &ev.meta.vendor_id);
        let idb = id.to_be_bytes();
        let mut repaired = false;
        if !self.events.contains_key(idb)? {
            // Never a second event for one vendor id.
            if self.live_dedup(&key)?.is_some_and(|prior| prior != id) {
                return Ok(false);
            }
            self.pending.insert(idb, &[])?;
            self.events.insert(idb, record)?;
            repaired = true;
        }
        // (An event present without a pending mark was processed: its mark was written first.)
        // The dedup entry comes last in an append: complete it if a crash cut it off.
        if self.live_dedup(&key)?.is_none() {
            let mut val = id.to_be_bytes().to_vec();
            val.extend_from_slice(&ev.meta.received_at_ms.to_be_bytes());
            self.dedup.insert(key, val)?;
            repaired = true;
        }
        Ok(repaired)
    }

    /// The stored event a dedup key points at, if that event exists and really is the one
    /// for this key (a stale entry, or one pointing at a reused id, does not count).
    fn live_dedup(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let Some(target) = self.dedup.get(key)?.as_deref().and_then(dedup_target) else {
            return Ok(None);
        };
        let Some(raw) = self.events.get(target.to_be_bytes())? else {
            return Ok(None);
        };
        let ev = decode(&raw)?;
        Ok((dedup_key(&ev.meta.source, &ev.meta.vendor_id) == key).then_some(target))
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

    /// Ids whose first write is not confirmed yet.
    pub(crate) fn in_flight_ids(&self) -> std::collections::HashSet<u64> {
        self.reserved
            .lock()
            .map(|r| r.values().map(|(id, _)| *id).collect())
            .unwrap_or_default()
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

impl Store {
    /// The rest of an append once its records are queued: wait for the log, settle the
    /// reservations, and wait for in-flight originals of duplicates.
    async fn append_settled(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
        let mut staged = self.append_now(&events)?;
        let mut result = Ok(());
        for w in staged.writes.drain(..) {
            let r = match w.await {
                Ok(r) => r.map_err(StoreError::Io),
                Err(_) => Err(StoreError::Closed),
            };
            if result.is_ok() {
                result = r;
            }
        }
        {
            let mut reserved = self
                .reserved
                .lock()
                .map_err(|_| StoreError::Io("dedup lock poisoned".into()))?;
            self.undo(&mut reserved, &staged.fresh, result.is_ok());
        }
        for mut original in staged.in_flight.drain(..) {
            let ok = matches!(
                original.wait_for(|v| v.is_some()).await.as_deref(),
                Ok(Some(true))
            );
            if !ok && result.is_ok() {
                result = Err(StoreError::Io(
                    "the first delivery of this event could not be stored".into(),
                ));
            }
        }
        result.map(|_| staged.answers)
    }
}

impl Inbox for Store {
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Appended>, StoreError>> {
        // A task of its own: if the client goes away, the request future is dropped, but the
        // append still finishes and settles its reservations.
        let this = self.clone();
        Box::pin(async move {
            tokio::spawn(async move { this.append_settled(events).await })
                .await
                .map_err(|_| StoreError::Closed)?
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
        // A filter on run outcomes reads traces: the scan is bounded (the page then ends
        // early and `next` continues from where it stopped).
        const SCAN: usize = 50_000;
        let mut scanned = 0;
        for item in self.events.range(..upper.to_be_bytes()).rev() {
            let (key, raw) = item?;
            scanned += 1;
            if q.outcome.is_some() && scanned > SCAN {
                next = Some(format_id(
                    u64::from_be_bytes(
                        key.as_ref()
                            .try_into()
                            .map_err(|_| StoreError::Corrupt("event key".into()))?,
                    ) + 1,
                ));
                break;
            }
            let ev = decode(&raw)?;
            let matches = q.source.as_ref().is_none_or(|s| *s == ev.meta.source)
                && q.event_type
                    .as_ref()
                    .is_none_or(|t| *t == ev.meta.event_type);
            if !matches {
                continue;
            }
            let runs: Vec<RunSummary> = self
                .trace(&ev.meta.id)?
                .and_then(|t| t.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .map(|r| RunSummary {
                    pipeline: r["pipeline"].as_str().unwrap_or_default().to_string(),
                    outcome: r["outcome"]["outcome"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                })
                .collect();
            if let Some(o) = &q.outcome {
                if !runs.iter().any(|r| &r.outcome == o) {
                    continue;
                }
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
                runs,
            });
        }
        Ok(EventPage { events, next })
    }

    fn trace(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        Store::trace(self, id)
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

    /// A re-delivery that arrives while the original is still on its way to disk waits for
    /// it, and fails with it: the sender must retry, not be told "duplicate".
    #[tokio::test]
    async fn a_duplicate_shares_the_fate_of_its_in_flight_original() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        let original = s.append_now(&[ev("shop", "e1")]).unwrap();
        assert!(!original.answers[0].duplicate);
        let s2 = s.clone();
        let dup = tokio::spawn(async move { s2.append(vec![ev("shop", "e1")]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !dup.is_finished(),
            "the duplicate did not wait for its original"
        );
        // The original's log write fails: it is undone and the duplicate fails with it.
        s.undo(&mut s.reserved.lock().unwrap(), &original.fresh, false);
        assert!(dup.await.unwrap().is_err());
        assert_eq!(s.events().count(), 0);
        assert_eq!(s.dedup_lookup("shop", "e1").unwrap(), None);
        // The sender's retry is stored as new.
        let retry = s.append(vec![ev("shop", "e1")]).await.unwrap();
        assert!(!retry[0].duplicate);
        // And a duplicate of a stored event answers at once.
        assert!(s.append(vec![ev("shop", "e1")]).await.unwrap()[0].duplicate);
    }

    /// Batch durability answers once the record is in the log file (it survives a crash of
    /// the process), before any sync.
    #[tokio::test]
    async fn batch_durability_answers_after_the_log_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Durability::Batch, Duration::from_secs(60)).unwrap();
        s.append(vec![ev("shop", "b1")]).await.unwrap();
        let files = crate::wal::files(&dir.path().join("inbox-wal")).unwrap();
        let records: usize = files
            .iter()
            .map(|(_, f)| crate::wal::read_records(f).unwrap().len())
            .sum();
        assert_eq!(records, 1);
    }

    /// kill -9 can leave only some of an append's sled writes behind; the log replay
    /// completes them (else the event is never processed and a re-delivery is stored again).
    #[tokio::test]
    async fn replay_completes_a_half_written_append() {
        let dir = tempfile::tempdir().unwrap();
        let meta = EventMeta {
            id: format_id(7),
            source: "shop".into(),
            connector: "shopify".into(),
            vendor_id: "half".into(),
            event_type: "orders/paid".into(),
            event_time: None,
            received_at_ms: 5,
            headers: vec![],
            purged_at_ms: None,
        };
        let record = encode(&meta, b"{}");
        {
            let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
            // An append cut short before its dedup entry.
            s.pending.insert(7u64.to_be_bytes(), &[]).unwrap();
            s.events
                .insert(7u64.to_be_bytes(), record.as_slice())
                .unwrap();
            tokio::task::spawn_blocking(move || s.close())
                .await
                .unwrap()
                .unwrap();
        }
        let wal =
            crate::wal::Wal::start(&dir.path().join("inbox-wal"), 100, None, Default::default())
                .unwrap();
        wal.append(record.clone().into()).await.unwrap().unwrap();
        drop(wal);
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        assert_eq!(s.pending_len(), 1, "the event must still be processed");
        let again = s.append(vec![ev("shop", "half")]).await.unwrap();
        assert_eq!(
            again[0],
            Appended {
                id: format_id(7),
                duplicate: true
            }
        );
    }

    /// A client that goes away mid-append does not leave its vendor id stuck.
    #[tokio::test]
    async fn an_abandoned_append_still_settles() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        let _ =
            tokio::time::timeout(Duration::from_nanos(1), s.append(vec![ev("shop", "gone")])).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match s.append(vec![ev("shop", "gone")]).await {
                Ok(a) => {
                    assert!(a[0].duplicate);
                    break;
                }
                Err(e) => assert!(std::time::Instant::now() < deadline, "still failing: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(s.events().count(), 1);
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
            purged_at_ms: None,
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
