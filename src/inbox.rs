//! (3) The inbox: verified events, de-duplicated on (source, vendor event id), stored before
//! the webhook is acknowledged. [`Inbox`] is the narrow interface ingest uses; [`Store`]
//! (sled) is the embedded implementation.

use crate::store::{Store, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
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

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The storage seam for ingest: a PostgreSQL backend implements this and nothing in ingest
/// changes.
pub trait Inbox: Send + Sync + 'static {
    /// Stores each event unless (source, vendor id) is already there, atomically for the
    /// whole batch, and resolves once the result is durable (per the durability setting).
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Appended>, StoreError>>;
    /// Writable now.
    fn ready(&self) -> Result<(), StoreError>;
}

pub fn format_id(n: u64) -> String {
    format!("ev_{n:016x}")
}

pub fn parse_id(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("ev_")?, 16).ok()
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
    fn append_now(&self, events: &[NewEvent]) -> Result<Vec<Appended>, StoreError> {
        let ids: Vec<u64> = events
            .iter()
            .map(|_| self.next_id())
            .collect::<Result<_, _>>()?;
        let records: Vec<(Vec<u8>, EventMeta)> = events
            .iter()
            .zip(&ids)
            .map(|(e, id)| {
                let meta = EventMeta {
                    id: format_id(*id),
                    source: e.source.clone(),
                    connector: e.connector.clone(),
                    vendor_id: e.vendor_id.clone(),
                    event_type: e.event_type.clone(),
                    event_time: e.event_time.clone(),
                    received_at_ms: e.received_at_ms,
                    headers: e.headers.clone(),
                };
                (encode(&meta, &e.payload), meta)
            })
            .collect();
        let result = (&self.events, &self.dedup, &self.pending).transaction(|(tev, tdd, tpd)| {
            let mut out = Vec::with_capacity(events.len());
            for ((e, id), (record, meta)) in events.iter().zip(&ids).zip(&records) {
                let key = dedup_key(&e.source, &e.vendor_id);
                if let Some(existing) = tdd.get(&key)? {
                    let prior = existing
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes);
                    let prior = prior.ok_or(ConflictableTransactionError::Abort(()))?;
                    out.push(Appended {
                        id: format_id(prior),
                        duplicate: true,
                    });
                    continue;
                }
                let mut val = id.to_be_bytes().to_vec();
                val.extend_from_slice(&e.received_at_ms.to_be_bytes());
                tdd.insert(key, val)?;
                tev.insert(&id.to_be_bytes(), record.as_slice())?;
                tpd.insert(&id.to_be_bytes(), &[])?;
                out.push(Appended {
                    id: meta.id.clone(),
                    duplicate: false,
                });
            }
            Ok(out)
        });
        match result {
            Ok(out) => Ok(out),
            Err(TransactionError::Abort(())) => Err(StoreError::Corrupt("dedup record".into())),
            Err(TransactionError::Storage(e)) => {
                self.mark_unhealthy();
                Err(e.into())
            }
        }
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
            let out = self.append_now(&events)?;
            // Duplicates wait too: the first copy may still be in flight to disk.
            self.durable().await?;
            Ok(out)
        })
    }

    fn ready(&self) -> Result<(), StoreError> {
        Store::ready(self)
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
            s.append(vec![ev("shop", "e1")]).await.unwrap()[0]
                .id
                .clone()
        };
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        assert!(s.event(&id).unwrap().is_some());
        assert!(s.append(vec![ev("shop", "e1")]).await.unwrap()[0].duplicate);
    }
}
