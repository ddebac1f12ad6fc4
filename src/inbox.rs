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

/// A dedup key decided new whose record is not durable yet: its id and the outcome of its
/// log write, which duplicates wait for (`Some(true)` once durable).
pub(crate) type Reservation = (u64, tokio::sync::watch::Receiver<Option<bool>>);

/// An event this call decided new.
struct Fresh {
    id: u64,
    key: Vec<u8>,
    fp: u64,
    outcome: tokio::sync::watch::Sender<Option<bool>>,
}

/// What `append_now` decided and what the answer must wait for.
#[derive(Default)]
struct Staged {
    answers: Vec<Appended>,
    fresh: Vec<Fresh>,
    /// Log writes of the new records.
    writes: Vec<crate::wal::Pending>,
    /// Outcomes of originals still in flight in other requests.
    in_flight: Vec<tokio::sync::watch::Receiver<Option<bool>>>,
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

pub(crate) fn dedup_key(source: &str, vendor_id: &str) -> Vec<u8> {
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

/// `encode` of a new event's metadata (id 0, not purged), straight from the request's
/// fields: the same bytes, without copying each field into an `EventMeta` first.
fn encode_new(e: &NewEvent) -> Vec<u8> {
    /// `EventMeta`'s fields, in its order, borrowed.
    #[derive(Serialize)]
    struct Borrowed<'a> {
        id: &'a str,
        source: &'a str,
        connector: &'a str,
        vendor_id: &'a str,
        event_type: &'a str,
        event_time: &'a Option<String>,
        received_at_ms: u64,
        headers: &'a [(String, String)],
    }
    let id = format_id(0);
    let meta = Borrowed {
        id: &id,
        source: &e.source,
        connector: &e.connector,
        vendor_id: &e.vendor_id,
        event_type: &e.event_type,
        event_time: &e.event_time,
        received_at_ms: e.received_at_ms,
        headers: &e.headers,
    };
    // One buffer: the length is written in once the metadata is.
    let guess: usize = 160
        + e.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>();
    let mut out = Vec::with_capacity(4 + guess + e.payload.len());
    out.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut out, &meta).expect("event meta serialises");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&e.payload);
    out
}

/// Where the 16 hex digits of the id sit in an encoded record (`id` is the first field).
const ID_AT: std::ops::Range<usize> = 4 + 10..4 + 26;

/// Writes `id` into a record encoded with a placeholder id.
fn set_id(record: &mut [u8], id: u64) {
    debug_assert_eq!(&record[4..ID_AT.start], br#"{"id":"ev_"#);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in record[ID_AT].iter_mut().enumerate() {
        *b = HEX[((id >> (60 - 4 * i)) & 0xf) as usize];
    }
}

pub(crate) fn decode(raw: &[u8]) -> Result<StoredEvent, StoreError> {
    let (meta, at) = decode_meta(raw)?;
    Ok(StoredEvent {
        meta,
        payload: Bytes::copy_from_slice(&raw[at..]),
    })
}

/// `decode` of a shared record: the payload is a slice of it, not a copy.
fn decode_shared(raw: &Bytes) -> Result<StoredEvent, StoreError> {
    let (meta, at) = decode_meta(raw)?;
    Ok(StoredEvent {
        meta,
        payload: raw.slice(at..),
    })
}

/// A record's metadata JSON, and where its payload starts.
fn meta_json(raw: &[u8]) -> Result<(&[u8], usize), StoreError> {
    let bad = || StoreError::Corrupt("event record".into());
    let len = u32::from_be_bytes(
        raw.get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    Ok((raw.get(4..4 + len).ok_or_else(bad)?, 4 + len))
}

/// A record's metadata, and where its payload starts.
/// The few metadata fields read without decoding a whole record (borrowed where they can
/// be; the rest is skipped, not copied): who sent it, and whether anyone listens.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    source: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    vendor_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    event_type: std::borrow::Cow<'a, str>,
    #[serde(default)]
    purged_at_ms: Option<u64>,
}

impl<'a> Peek<'a> {
    fn of(raw: &'a [u8]) -> Result<Peek<'a>, StoreError> {
        serde_json::from_slice(meta_json(raw)?.0)
            .map_err(|_| StoreError::Corrupt("event record".into()))
    }
}

fn decode_meta(raw: &[u8]) -> Result<(EventMeta, usize), StoreError> {
    let (meta_bytes, at) = meta_json(raw)?;
    let meta: EventMeta = serde_json::from_slice(meta_bytes)
        .map_err(|_| StoreError::Corrupt("event record".into()))?;
    Ok((meta, at))
}

impl Store {
    /// Decides, under the dedup lock, which events are new; gives each new one the next id
    /// and queues their log records in one write, so that ids grow in log order and an
    /// append is durable (or fails) as a whole. Duplicates of an event in
    /// flight wait for its outcome. Once the record is durable, `settle` puts it in the
    /// de-duplication index; until then the reservation answers for it.
    fn append_now(&self, events: &[NewEvent]) -> Result<Staged, StoreError> {
        // Encoded before taking the lock, with a placeholder id written in under it.
        let prepared: Vec<(Vec<u8>, Vec<u8>)> = events
            .iter()
            .map(|e| (dedup_key(&e.source, &e.vendor_id), encode_new(e)))
            .collect();
        let fps: Vec<u64> = prepared
            .iter()
            .map(|(key, _)| (self.fingerprint)(key))
            .collect();
        let mut staged = Staged::default();
        let mut reserved = self.dedup_state()?;
        // Every decision first (the only step that can fail), then ids and one log write
        // for all the new records: an error leaves nothing queued.
        enum Decided {
            New,
            /// A copy of the `n`th event of this batch.
            Again(usize),
            Prior(u64, Option<tokio::sync::watch::Receiver<Option<bool>>>),
        }
        let mut decided = Vec::with_capacity(prepared.len());
        for (i, (key, _)) in prepared.iter().enumerate() {
            if let Some(first) = prepared[..i].iter().position(|(k, _)| k == key) {
                decided.push(Decided::Again(first));
            } else if let Some((prior, outcome)) = reserved.inflight.get(key) {
                decided.push(Decided::Prior(*prior, Some(outcome.clone())));
            } else {
                match self.find(&reserved.keydir, key, fps[i])? {
                    Some(prior) => decided.push(Decided::Prior(prior, None)),
                    None => decided.push(Decided::New),
                }
            }
        }
        let mut records = Vec::new();
        let mut ids = Vec::with_capacity(prepared.len());
        for (((key, mut record), d), fp) in prepared.into_iter().zip(decided).zip(fps) {
            let (id, duplicate) = match d {
                Decided::Again(first) => (ids[first], true),
                Decided::Prior(prior, outcome) => {
                    staged.in_flight.extend(outcome);
                    (prior, true)
                }
                Decided::New => {
                    let id = self.allocate_id();
                    set_id(&mut record, id);
                    records.push((Bytes::from(record), crate::wal::Tag { id, fp }));
                    let outcome = tokio::sync::watch::channel(None).0;
                    reserved
                        .inflight
                        .insert(key.clone(), (id, outcome.subscribe()));
                    staged.fresh.push(Fresh {
                        id,
                        key,
                        fp,
                        outcome,
                    });
                    (id, false)
                }
            };
            ids.push(id);
            staged.answers.push(Appended {
                id: format_id(id),
                duplicate,
            });
        }
        if !records.is_empty() {
            staged.writes.push(
                self.wal
                    .append_tagged(records, self.durability == Durability::Fsync),
            );
        }
        Ok(staged)
    }

    /// Tells the duplicates waiting for `fresh` how their log write ended. A failed one
    /// leaves no trace, so the sender's retry is stored as new; a durable one goes into the
    /// de-duplication index, and leaves its reservation once it is there.
    fn settle(&self, d: &mut crate::dedup::Index, fresh: &[Fresh], ok: bool) {
        for f in fresh {
            let reserved = d.inflight.get(&f.key).is_some_and(|(id, _)| *id == f.id);
            if ok {
                match self.index_new(&mut d.keydir, &f.key, f.fp, f.id) {
                    Ok(()) if reserved => {
                        d.inflight.remove(&f.key);
                    }
                    Ok(()) => {}
                    // The reservation keeps answering for it; the next start indexes it.
                    Err(e) => {
                        tracing::error!(error = %e, "writing a de-duplication entry failed; it is kept in memory")
                    }
                }
            } else if reserved {
                d.inflight.remove(&f.key);
            }
            f.outcome.send_replace(Some(ok));
        }
    }

    /// The stored event for a de-duplication key, if any: the event holding its
    /// fingerprint if that event is this key's, else sled's entry (events out of the log,
    /// and keys whose fingerprint another key holds).
    fn find(
        &self,
        keydir: &crate::dedup::Keydir,
        key: &[u8],
        fp: u64,
    ) -> Result<Option<u64>, StoreError> {
        if let Some(id) = keydir.get(fp) {
            if self.key_of(id)?.as_deref() == Some(key) {
                return Ok(Some(id));
            }
        }
        if self.has_cold() {
            return self.cold_dedup(key);
        }
        Ok(None)
    }

    /// Indexes a new event: its fingerprint, or, if another key's event holds it, a sled
    /// entry.
    fn index_new(
        &self,
        keydir: &mut crate::dedup::Keydir,
        key: &[u8],
        fp: u64,
        id: u64,
    ) -> Result<(), StoreError> {
        match keydir.claim(fp, id) {
            Ok(()) => Ok(()),
            Err(holder) if holder == id => Ok(()),
            Err(holder) => {
                if self.record_bytes(holder)?.is_none() {
                    keydir.replace(fp, id);
                    return Ok(());
                }
                self.keep_in_sled(key, id)
            }
        }
    }

    /// Indexes an event of a sealed log file (store opening). A fingerprint another event
    /// holds is either a second record of the same key (the first one stays the event) or a
    /// collision, kept in sled.
    pub(crate) fn index_logged(&self, id: u64, fp: u64) -> Result<(), StoreError> {
        if fp == crate::dedup::NO_KEY {
            return Ok(());
        }
        let mut d = self.dedup_state()?;
        let holder = match d.keydir.claim(fp, id) {
            Ok(()) => return Ok(()),
            Err(holder) if holder == id => return Ok(()),
            Err(holder) => holder,
        };
        let Some(key) = self.key_of(id)? else {
            return Ok(());
        };
        match self.key_of(holder)? {
            None => d.keydir.replace(fp, id),
            Some(theirs) if theirs == key => {}
            Some(_) => {
                if self.cold_dedup(&key)?.is_none() {
                    self.keep_in_sled(&key, id)?;
                }
            }
        }
        Ok(())
    }

    /// Indexes an event read back from a log file a crash left unsealed (store opening),
    /// in log order. A second record for a key that already has an event (a write that
    /// failed and was not cut back) is marked purged, so it is never processed; returns
    /// true for it (it must stay out of the index: `EventLog::shadow`).
    pub(crate) fn repair_dedup(
        &self,
        id: u64,
        meta: &EventMeta,
        fp: u64,
    ) -> Result<bool, StoreError> {
        self.observe_id(id);
        let key = dedup_key(&meta.source, &meta.vendor_id);
        let mut d = self.dedup_state()?;
        match self.find(&d.keydir, &key, fp)? {
            Some(prior) if prior == id => Ok(false),
            Some(_) => {
                let mut gone = meta.clone();
                gone.purged_at_ms = Some(crate::delivery::now_ms());
                gone.headers.clear();
                self.mark_kept();
                self.events.insert(id.to_be_bytes(), encode(&gone, &[]))?;
                Ok(true)
            }
            None => self.index_new(&mut d.keydir, &key, fp, id).map(|_| false),
        }
    }

    /// Moves the de-duplication entries of events leaving the log (retention drops their
    /// file; each is kept in sled's `events` by now) into sled's `dedup` tree. Returns their
    /// fingerprints, for `dedup_left_log` once the file is forgotten.
    pub(crate) fn dedup_leaving_log(&self, ids: &[u64]) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let Some(raw) = self.events.get(id.to_be_bytes())? else {
                continue;
            };
            let (meta, _) = decode_meta(&raw)?;
            let key = dedup_key(&meta.source, &meta.vendor_id);
            let fp = (self.fingerprint)(&key);
            let d = self.dedup_state()?;
            match self.find(&d.keydir, &key, fp)? {
                // A second record of a key: the first one answers for it.
                Some(other) if other != id => {}
                _ => self.keep_in_sled(&key, id)?,
            }
            out.push((fp, id));
        }
        Ok(out)
    }

    /// How many events the in-memory de-duplication index holds.
    pub fn dedup_index_len(&self) -> usize {
        self.reserved.lock().map(|d| d.keydir.len()).unwrap_or(0)
    }

    /// Lets the in-memory index forget events whose file is gone (their entries are in
    /// sled since `dedup_leaving_log`).
    pub(crate) fn dedup_left_log(&self, moved: &[(u64, u64)]) {
        if let Ok(mut d) = self.reserved.lock() {
            for (fp, id) in moved {
                d.keydir.release(*fp, *id);
            }
        }
    }

    /// The de-duplication state, locked.
    fn dedup_state(&self) -> Result<std::sync::MutexGuard<'_, crate::dedup::Index>, StoreError> {
        self.reserved
            .lock()
            .map_err(|_| StoreError::Io("dedup lock poisoned".into()))
    }

    /// Writes a key's de-duplication entry to sled's `dedup` tree (marked first, so that
    /// lookups look there).
    fn keep_in_sled(&self, key: &[u8], id: u64) -> Result<(), StoreError> {
        self.mark_cold();
        self.dedup.insert(key, &id.to_be_bytes())?;
        Ok(())
    }

    /// The event sled's `dedup` tree names for a key, if that event exists and really is
    /// the one for this key (a stale entry does not count).
    fn cold_dedup(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let Some(target) = self.dedup.get(key)?.as_deref().and_then(dedup_target) else {
            return Ok(None);
        };
        Ok((self.key_of(target)?.as_deref() == Some(key)).then_some(target))
    }

    /// One stored event by id.
    pub fn event(&self, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        match parse_id(id) {
            Some(n) => self.event_by_id(n),
            None => Ok(None),
        }
    }

    /// One stored event: kept in sled (purged, or moved out of a dropped log file), else
    /// read from the log.
    pub(crate) fn event_by_id(&self, n: u64) -> Result<Option<StoredEvent>, StoreError> {
        match self.record_bytes(n)? {
            Some(raw) => decode_shared(&raw).map(Some),
            None => Ok(None),
        }
    }

    /// Event `n`'s record: kept in sled (purged, or moved out of a dropped log file), else
    /// one of the latest, else read from the log.
    fn record_bytes(&self, n: u64) -> Result<Option<Bytes>, StoreError> {
        if self.kept_in_sled() {
            if let Some(raw) = self.events.get(n.to_be_bytes())? {
                return Ok(Some(Bytes::copy_from_slice(&raw)));
            }
        }
        if let Some(record) = self.log.recent(n) {
            return Ok(Some(record));
        }
        Ok(self.event_in_log(n)?.map(Bytes::from))
    }

    /// Event `n` if it is not purged and `wanted` takes its (source, type); only those two
    /// fields are decoded of the others.
    pub(crate) fn event_if(
        &self,
        n: u64,
        wanted: &dyn Fn(&str, &str) -> bool,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let Some(raw) = self.record_bytes(n)? else {
            return Ok(None);
        };
        let peek = Peek::of(&raw)?;
        if peek.purged_at_ms.is_some() || !wanted(&peek.source, &peek.event_type) {
            return Ok(None);
        }
        decode_shared(&raw).map(Some)
    }

    /// The de-duplication key of stored event `n` (only its source and vendor id are
    /// decoded: this runs under the de-duplication lock).
    fn key_of(&self, n: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(raw) = self.record_bytes(n)? else {
            return Ok(None);
        };
        let peek = Peek::of(&raw)?;
        Ok(Some(dedup_key(&peek.source, &peek.vendor_id)))
    }

    /// An event's record read from the log; if retention moved it into sled meanwhile (the
    /// file is gone), from there.
    fn event_in_log(&self, n: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let found = match self.log.locate(n)? {
            Some((seq, e)) => match self.log.read(seq, e) {
                Ok(raw) => return Ok(Some(raw)),
                Err(err) => Err(err),
            },
            None => Ok(None),
        };
        if self.kept_in_sled() {
            if let Some(raw) = self.events.get(n.to_be_bytes())? {
                return Ok(Some(raw.to_vec()));
            }
        }
        found
    }

    /// An event's record as stored, and whether it is kept in sled (not in the log).
    pub(crate) fn event_record(&self, n: u64) -> Result<Option<(Vec<u8>, bool)>, StoreError> {
        if self.kept_in_sled() {
            if let Some(raw) = self.events.get(n.to_be_bytes())? {
                return Ok(Some((raw.to_vec(), true)));
            }
        }
        Ok(self.event_in_log(n)?.map(|raw| (raw, false)))
    }

    /// Event ids in `lo..hi`, ascending (descending with `rev`): those of the log merged with
    /// those kept in sled.
    pub(crate) fn event_ids(
        &self,
        lo: u64,
        hi: u64,
        rev: bool,
    ) -> impl Iterator<Item = Result<u64, StoreError>> + '_ {
        let (lo_kept, hi_kept) = if self.kept_in_sled() {
            (lo, hi)
        } else {
            (0, 0)
        };
        let kept = self
            .events
            .range(lo_kept.to_be_bytes()..hi_kept.to_be_bytes())
            .keys()
            .map(|k| {
                let k = k?;
                k.as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("event key".into()))
            });
        let kept: Box<dyn Iterator<Item = Result<u64, StoreError>>> = if rev {
            Box::new(kept.rev())
        } else {
            Box::new(kept)
        };
        Merged {
            a: kept.peekable(),
            b: self.log.ids(lo, hi, rev).peekable(),
            rev,
        }
    }

    /// Every stored event, oldest first.
    pub fn events(&self) -> impl Iterator<Item = Result<StoredEvent, StoreError>> + '_ {
        self.event_ids(0, u64::MAX, false)
            .filter_map(|id| id.and_then(|id| self.event_by_id(id)).transpose())
    }

    /// Whether an event still waits for processing: above the watermark (and not purged),
    /// or deferred.
    pub(crate) fn is_pending(&self, id: u64, meta: &EventMeta) -> Result<bool, StoreError> {
        if id >= self.processed_to.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(meta.purged_at_ms.is_none());
        }
        Ok(self.deferred.contains_key(id.to_be_bytes())?)
    }

    /// How many events wait for processing.
    pub fn pending_len(&self) -> usize {
        let from = self.processed_to.load(std::sync::atomic::Ordering::Relaxed);
        // Events kept in sled above the watermark (moved out of a dropped file) count unless
        // the log still has them too, or they were purged.
        let kept = self
            .events
            .range(from.to_be_bytes()..)
            .filter_map(|r| r.ok())
            .filter(|(k, v)| {
                let id = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                decode_meta(v).is_ok_and(|(m, _)| m.purged_at_ms.is_none())
                    && self.log.locate(id).ok().flatten().is_none()
            })
            .count();
        self.log.count_from(from).unwrap_or(0) + kept + self.deferred.len()
    }

    /// The event id stored for (source, vendor id), if any.
    pub fn dedup_lookup(
        &self,
        source: &str,
        vendor_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let key = dedup_key(source, vendor_id);
        let fp = (self.fingerprint)(&key);
        let d = self.dedup_state()?;
        let durable = d
            .inflight
            .get(&key)
            .filter(|(_, o)| *o.borrow() == Some(true))
            .map(|(id, _)| *id);
        if let Some(id) = durable {
            return Ok(Some(format_id(id)));
        }
        Ok(self.find(&d.keydir, &key, fp)?.map(format_id))
    }
}

/// Two ascending (or descending) id streams merged, each id once.
struct Merged<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
    rev: bool,
}

impl<A, B> Iterator for Merged<A, B>
where
    A: Iterator<Item = Result<u64, StoreError>>,
    B: Iterator<Item = Result<u64, StoreError>>,
{
    type Item = Result<u64, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let pick_a = match (self.a.peek(), self.b.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) | (Some(_), None) => true,
            (_, Some(Err(_))) | (None, Some(_)) => false,
            (Some(Ok(x)), Some(Ok(y))) => {
                if x == y {
                    self.b.next();
                    true
                } else {
                    (x < y) != self.rev
                }
            }
        };
        if pick_a {
            self.a.next()
        } else {
            self.b.next()
        }
    }
}

/// The log writes of an append's new records, settled exactly once: by the append, or, if
/// the request goes away first (its future dropped mid-wait), by a task that waits for the
/// writes in its place. A reservation must never end before its write does: a retry would
/// then be stored as new while the first copy may still become durable.
struct Unsettled {
    store: Store,
    writes: Vec<crate::wal::Pending>,
    fresh: Vec<Fresh>,
}

impl Unsettled {
    /// Waits for every write; `Ok` if all of them are durable.
    async fn wait(writes: &mut [crate::wal::Pending]) -> Result<(), StoreError> {
        let mut result = Ok(());
        for w in writes.iter_mut() {
            let r = match w.await {
                Ok(r) => r.map_err(StoreError::Io),
                Err(_) => Err(StoreError::Closed),
            };
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    fn settle(&mut self, ok: bool) {
        let fresh = std::mem::take(&mut self.fresh);
        match self.store.reserved.lock() {
            Ok(mut reserved) => self.store.settle(&mut reserved, &fresh, ok),
            Err(_) => tracing::error!("dedup lock poisoned"),
        }
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if self.fresh.is_empty() {
            return;
        }
        let mut rest = Unsettled {
            store: self.store.clone(),
            writes: std::mem::take(&mut self.writes),
            fresh: std::mem::take(&mut self.fresh),
        };
        let finish = async move {
            let ok = Unsettled::wait(&mut rest.writes).await.is_ok();
            rest.settle(ok);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(finish);
            }
            Err(_) => {
                let _ = std::thread::Builder::new()
                    .name("perkflow-settle".into())
                    .spawn(move || {
                        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() {
                            rt.block_on(finish);
                        }
                    });
            }
        }
    }
}

impl Store {
    /// The rest of an append once its records are queued: wait for the log, settle the
    /// reservations, and wait for in-flight originals of duplicates.
    async fn append_settled(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
        let mut staged = self.append_now(&events)?;
        let mut unsettled = Unsettled {
            store: self.clone(),
            writes: std::mem::take(&mut staged.writes),
            fresh: std::mem::take(&mut staged.fresh),
        };
        let mut result = Unsettled::wait(&mut unsettled.writes).await;
        unsettled.settle(result.is_ok());
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
        // If the client goes away, the request future is dropped; `Unsettled` still settles
        // the reservations once the writes end.
        Box::pin(self.append_settled(events))
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
        for item in self.event_ids(0, upper, true) {
            let id = item?;
            scanned += 1;
            if q.outcome.is_some() && scanned > SCAN {
                next = Some(format_id(id + 1));
                break;
            }
            let Some(ev) = self.event_by_id(id)? else {
                continue; // dropped by retention meanwhile
            };
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
            let pending = self.is_pending(id, &ev.meta)?;
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
        let pending = self.is_pending(n, &ev.meta)?;
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

    #[test]
    fn a_new_event_encodes_as_its_stored_metadata_does() {
        let mut e = ev("shop", "e\"1");
        e.event_time = Some("2026-11-22T10:00:00Z".into());
        let meta = EventMeta {
            id: format_id(0),
            source: e.source.clone(),
            connector: e.connector.clone(),
            vendor_id: e.vendor_id.clone(),
            event_type: e.event_type.clone(),
            event_time: e.event_time.clone(),
            received_at_ms: e.received_at_ms,
            headers: e.headers.clone(),
            purged_at_ms: None,
        };
        assert_eq!(encode_new(&e), encode(&meta, &e.payload));
        let back = decode(&encode_new(&e)).unwrap();
        assert_eq!((back.meta, &back.payload[..]), (meta, &e.payload[..]));
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
        let fault = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let s = crate::store::test_store(dir.path(), 64 << 20, Some(fault.clone()));
        let mut original = s.append_now(&[ev("shop", "e1")]).unwrap();
        assert!(!original.answers[0].duplicate);
        let s2 = s.clone();
        let dup = tokio::spawn(async move { s2.append(vec![ev("shop", "e1")]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !dup.is_finished(),
            "the duplicate did not wait for its original"
        );
        // The original's log write fails: the duplicate fails with it.
        let written = original.writes.pop().unwrap().await.unwrap();
        assert!(written.is_err());
        s.settle(&mut s.reserved.lock().unwrap(), &original.fresh, false);
        assert!(dup.await.unwrap().is_err());
        fault.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(s.events().count(), 0);
        assert_eq!(s.dedup_lookup("shop", "e1").unwrap(), None);
        // The sender's retry is stored as new.
        let retry = s.append(vec![ev("shop", "e1")]).await.unwrap();
        assert!(!retry[0].duplicate);
        // And a duplicate of a stored event answers at once.
        assert!(s.append(vec![ev("shop", "e1")]).await.unwrap()[0].duplicate);
        assert_eq!(s.events().count(), 1);
        assert_eq!(s.pending_len(), 1);
    }

    /// Regression (review): an append whose de-duplication check fails part-way leaves
    /// nothing queued (it used to write the records decided before the failure), and an
    /// append of several events is written whole or not at all.
    #[tokio::test]
    async fn a_failed_append_leaves_no_event_behind() {
        let dir = tempfile::tempdir().unwrap();
        let fault = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = crate::store::test_store(dir.path(), 64 << 20, Some(fault.clone()));
        // A de-duplication entry whose event cannot be read (its file is missing).
        let fp = (s.fingerprint)(&dedup_key("shop", "broken"));
        s.reserved.lock().unwrap().keydir.claim(fp, 999).unwrap();
        s.log.add(
            7_777,
            [(
                crate::eventlog::Entry {
                    id: 999,
                    off: 0,
                    len: 10,
                },
                fp,
            )],
        );
        assert!(s
            .append(vec![ev("shop", "fresh"), ev("shop", "broken")])
            .await
            .is_err());
        fault.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(s
            .append(vec![ev("shop", "a"), ev("shop", "b")])
            .await
            .is_err());
        fault.store(false, std::sync::atomic::Ordering::Relaxed);
        s.flush_index();
        // (The broken entry itself reads as an error.)
        let stored = || s.events().filter_map(Result::ok).count();
        assert_eq!(stored(), 0, "nothing of the failed appends is stored");
        let again = s
            .append(vec![ev("shop", "fresh"), ev("shop", "a"), ev("shop", "b")])
            .await
            .unwrap();
        assert!(again.iter().all(|a| !a.duplicate));
        assert_eq!(stored(), 3);
    }

    /// Regression (review): an event whose file retention deletes between finding it in the
    /// index and reading it is read from sled, where it was moved first.
    #[tokio::test]
    async fn an_event_moved_out_of_a_deleted_file_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::test_store(dir.path(), 64 << 20, None);
        let id = s.append(vec![ev("shop", "moved")]).await.unwrap()[0]
            .id
            .clone();
        let n = parse_id(&id).unwrap();
        let (seq, entry) = s.log.locate(n).unwrap().unwrap();
        let record = s.log.read(seq, entry).unwrap();
        s.mark_kept();
        s.events.insert(n.to_be_bytes(), record).unwrap();
        // The file gone while the index still names it (read past the recent window).
        std::fs::remove_file(crate::wal::path(s.log.dir(), seq)).unwrap();
        assert_eq!(
            s.event_in_log(n)
                .unwrap()
                .map(|r| decode(&r).unwrap().meta.vendor_id),
            Some("moved".to_string())
        );
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
        let wal = crate::wal::Wal::start(&wal_dir, 1, Default::default()).unwrap();
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
        // The recovered file stays (it is the event store), indexed; a new one is written.
        assert_eq!(crate::wal::files(&wal_dir).unwrap().len(), 2);
        assert!(s.log.is_sealed(1).unwrap());
    }
}
