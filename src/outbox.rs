//! (5) The outbox: sink actions produced by pipeline runs, written in the same sled
//! transaction that marks their event processed, so a crash at any point neither loses nor
//! duplicates a job. Each job's key is its idempotency key, derived from (source, vendor
//! event id, pipeline, deliver id): the same for every run of the same vendor event, whatever
//! re-deliveries, restarts or replays happen.

use crate::inbox::{parse_id, StoredEvent};
use crate::pipeline::run::{Delivery, Run};
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

/// A sink action waiting to be delivered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// Idempotency key (also the outbox key).
    pub key: String,
    pub event_id: String,
    pub pipeline: String,
    pub step: String,
    pub sink: String,
    pub action: String,
    pub with: serde_json::Value,
    pub created_at_ms: u64,
    pub attempts: u32,
    pub state: JobState,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
}

/// The idempotency key of one action of one vendor event: (source, vendor event id,
/// pipeline, deliver id).
pub fn job_key(source: &str, vendor_id: &str, pipeline: &str, deliver: &str) -> String {
    let mut h = Sha256::new();
    for part in [source, vendor_id, pipeline, deliver] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    format!("pf-{}", &hex::encode(h.finalize())[..32])
}

impl Job {
    pub fn from_delivery(ev: &StoredEvent, pipeline: &str, d: &Delivery, now_ms: u64) -> Job {
        Job {
            key: job_key(&ev.meta.source, &ev.meta.vendor_id, pipeline, &d.id),
            event_id: ev.meta.id.clone(),
            pipeline: pipeline.to_string(),
            step: d.step.clone(),
            sink: d.sink.clone(),
            action: d.action.clone(),
            with: d.with.clone(),
            created_at_ms: now_ms,
            attempts: 0,
            state: JobState::Pending,
        }
    }
}

impl Store {
    /// Up to `limit` events waiting for processing, oldest first, skipping those whose
    /// acknowledgement is still in flight (their write may yet be undone).
    pub fn pending_events(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let in_flight = self.in_flight_ids();
        let mut out = Vec::new();
        for item in self.pending.iter() {
            let (key, _) = item?;
            let id = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("pending key".into()))?,
            );
            if in_flight.contains(&id) {
                continue;
            }
            match self.event(&crate::inbox::format_id(id))? {
                Some(ev) => out.push(ev),
                None => {
                    // A pending mark whose event is gone (undone): drop the mark.
                    self.pending.remove(&key)?;
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Marks a batch of events processed, records their runs and writes their jobs, in one
    /// transaction. A job whose key exists already is kept as it is (re-processing never
    /// duplicates an action). Events no pipeline listened to leave no trace.
    pub fn complete(&self, done: &[(&StoredEvent, Vec<Run>, Vec<Job>)]) -> Result<(), StoreError> {
        struct Row {
            id: u64,
            trace: Option<Vec<u8>>,
            jobs: Vec<(String, Vec<u8>)>,
        }
        let mut rows = Vec::with_capacity(done.len());
        for (event, runs, jobs) in done {
            let id = parse_id(&event.meta.id)
                .ok_or_else(|| StoreError::Corrupt(format!("event id {}", event.meta.id)))?;
            let trace = if runs.is_empty() {
                None
            } else {
                Some(serde_json::to_vec(runs).map_err(|e| StoreError::Io(e.to_string()))?)
            };
            let jobs = jobs
                .iter()
                .map(|j| serde_json::to_vec(j).map(|v| (j.key.clone(), v)))
                .collect::<Result<_, _>>()
                .map_err(|e| StoreError::Io(e.to_string()))?;
            rows.push(Row { id, trace, jobs });
        }
        if rows.iter().all(|r| r.trace.is_none() && r.jobs.is_empty()) {
            // Nothing to record: clearing the marks needs no transaction.
            for r in &rows {
                self.pending.remove(r.id.to_be_bytes())?;
            }
            return Ok(());
        }
        let result =
            (&self.pending, &self.outbox, &self.traces).transaction(|(pending, outbox, traces)| {
                for r in &rows {
                    pending.remove(&r.id.to_be_bytes())?;
                    if let Some(t) = &r.trace {
                        traces.insert(&r.id.to_be_bytes(), t.as_slice())?;
                    }
                    for (key, value) in &r.jobs {
                        if outbox.get(key.as_bytes())?.is_none() {
                            outbox.insert(key.as_bytes(), value.as_slice())?;
                        }
                    }
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => Err(StoreError::Io("transaction aborted".into())),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Jobs in the outbox (key order), at most `limit`.
    pub fn jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.outbox
            .iter()
            .take(limit)
            .map(|r| {
                let (_, v) = r?;
                serde_json::from_slice(&v).map_err(|_| StoreError::Corrupt("outbox job".into()))
            })
            .collect()
    }

    pub fn jobs_len(&self) -> usize {
        self.outbox.len()
    }

    /// The pipeline runs recorded for an event.
    pub fn trace(&self, event_id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let Some(id) = parse_id(event_id) else {
            return Ok(None);
        };
        Ok(self
            .traces
            .get(id.to_be_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_keys_are_stable_and_distinct() {
        let a = job_key("shop", "evt-1", "points", "steps[2].deliver");
        assert_eq!(a, job_key("shop", "evt-1", "points", "steps[2].deliver"));
        assert_ne!(a, job_key("shop", "evt-1", "points", "steps[3].deliver"));
        assert_ne!(a, job_key("shop", "evt-2", "points", "steps[2].deliver"));
        // No ambiguity from concatenation.
        assert_ne!(job_key("ab", "c", "p", "s"), job_key("a", "bc", "p", "s"));
        assert_eq!(a.len(), 35);
    }
}
