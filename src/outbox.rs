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

/// A sink action and its delivery state.
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
    /// Attempts started.
    pub attempts: u32,
    pub state: JobState,
    /// Pending: when it is due. In flight: when its lease ends.
    #[serde(default)]
    pub next_at_ms: u64,
    /// The last attempt may have taken effect without us knowing (timeout after sending, or
    /// the daemon stopped mid-request): reconcile, or resend only if the action is
    /// idempotent.
    #[serde(default)]
    pub uncertain: bool,
    /// Why it is waiting again or dead.
    #[serde(default)]
    pub reason: Option<String>,
    /// The vendor's id of what was created.
    #[serde(default)]
    pub vendor_id: Option<String>,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    #[serde(default)]
    pub replays: u32,
    /// The latest attempts, oldest first (at most `ATTEMPTS_KEPT`).
    #[serde(default)]
    pub log: Vec<AttemptLog>,
    #[serde(default)]
    pub kind: JobKind,
    /// Bumped by every write: a write whose `before` is not what the store holds is skipped
    /// (compare-and-swap), so an operator's replay and a finishing attempt never interleave.
    #[serde(default)]
    pub version: u64,
    /// Its event's personal data (`pii_fields` values): masked wherever the job is shown or
    /// logged (reasons, vendor answers); `with` keeps the real values, which get sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitive: Vec<String>,
    /// A value of the vendor's answer to store on a member once delivered (a booking's
    /// promo code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<Keep>,
}

/// Sinks whose jobs of an event are cancelled (its order was refunded).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cancellation {
    pub sinks: Vec<String>,
    pub reason: String,
}

impl Cancellation {
    /// Creates `job` cancelled when its sink is one of these.
    pub fn apply(&self, job: &mut Job, now_ms: u64) {
        if self.sinks.contains(&job.sink) && job.state == JobState::Pending {
            job.state = JobState::Cancelled;
            job.reason = Some(self.reason.clone());
            job.finished_at_ms = Some(now_ms);
        }
    }
}

/// Where a delivered job's answer goes: `attribute` of `member` gets the value at
/// `pointer` (a JSON pointer) in the vendor's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Keep {
    pub member: String,
    pub attribute: String,
    pub pointer: String,
}

/// What a job does.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Send the action's request.
    #[default]
    Send,
    /// Poll what a delivered action created (`vendor_id`) until it is final, then emit an
    /// internal event.
    Track,
}

impl Job {
    /// The tracking job that follows a delivered job.
    pub fn tracking(&self, vendor_id: &str, first_poll_ms: u64) -> Job {
        Job {
            key: format!("{}.track", self.key),
            kind: JobKind::Track,
            vendor_id: Some(vendor_id.to_string()),
            attempts: 0,
            state: JobState::Pending,
            next_at_ms: first_poll_ms,
            created_at_ms: first_poll_ms,
            uncertain: false,
            reason: None,
            finished_at_ms: None,
            replays: 0,
            log: Vec::new(),
            version: 0,
            ..self.clone()
        }
    }
}

/// Attempts kept on a job.
pub const ATTEMPTS_KEPT: usize = 20;

/// One attempt, for the trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptLog {
    pub at_ms: u64,
    pub latency_ms: u64,
    #[serde(default)]
    pub status: Option<u16>,
    /// delivered | retry | rejected | dead
    pub outcome: String,
    #[serde(default)]
    pub reason: Option<String>,
    /// The start of the vendor's answer, secrets redacted.
    #[serde(default)]
    pub excerpt: Option<String>,
    #[serde(default)]
    pub reconciled: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    InFlight,
    Delivered,
    /// In the dead-letter queue.
    Dead,
    /// Dropped from the dead-letter queue by an operator.
    Dropped,
    /// Cancelled before it was sent (the order it rewarded was refunded).
    Cancelled,
}

impl JobState {
    /// Waiting for (or in) an attempt: indexed by due time.
    fn scheduled(self) -> bool {
        matches!(self, JobState::Pending | JobState::InFlight)
    }
}

/// Which dead letters to list, replay or drop.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeadFilter {
    pub sink: Option<String>,
    /// A substring of the reason.
    pub reason: Option<String>,
    /// Dead-lettered at or after (Unix ms).
    pub since_ms: Option<u64>,
    /// Dead-lettered before (Unix ms).
    pub until_ms: Option<u64>,
}

impl DeadFilter {
    pub fn matches(&self, j: &Job) -> bool {
        let at = j.finished_at_ms.unwrap_or(0);
        self.sink.as_ref().is_none_or(|s| &j.sink == s)
            && self
                .reason
                .as_ref()
                .is_none_or(|r| j.reason.as_deref().unwrap_or("").contains(r.as_str()))
            && self.since_ms.is_none_or(|t| at >= t)
            && self.until_ms.is_none_or(|t| at < t)
    }
}

/// An index entry that has not matched its job for this long is dropped (a write in
/// progress adds its entries a moment before the job itself).
const STALE_AFTER_MS: u64 = 10 * 60 * 1000;

fn due_key(sink: &str, at_ms: u64, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(sink.len() + 9 + key.len());
    k.extend_from_slice(sink.as_bytes());
    k.push(0);
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

fn event_job_key(event: u64, key: &str) -> Vec<u8> {
    let mut k = event.to_be_bytes().to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn decode(v: &[u8]) -> Result<Job, StoreError> {
    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("outbox job".into()))
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
            next_at_ms: now_ms,
            uncertain: false,
            reason: None,
            vendor_id: None,
            finished_at_ms: None,
            replays: 0,
            log: Vec::new(),
            kind: JobKind::Send,
            version: 0,
            sensitive: Vec::new(),
            keep: d.keep.clone(),
        }
    }
}

/// The outbox as the admin API and the delivery engine's operators see it: a narrow
/// interface, so another backend can stand in for sled.
pub trait Outbox: Send + Sync {
    fn job(&self, key: &str) -> Result<Option<Job>, StoreError>;
    /// Outbox jobs in key order, at most `limit`.
    fn jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError>;
    fn dead_letters(&self, filter: &DeadFilter, limit: usize) -> Result<Vec<Job>, StoreError>;
    /// Puts dead letters back in the queue (due now, attempts reset, same idempotency key).
    fn replay_dead(&self, keys: &[String], now_ms: u64) -> Result<usize, StoreError>;
    /// Removes dead letters from the queue (kept, marked dropped).
    fn drop_dead(&self, keys: &[String], now_ms: u64) -> Result<usize, StoreError>;
    fn event_jobs(&self, event_id: &str) -> Result<Vec<Job>, StoreError>;
    /// Queues these jobs (new, or replacing the job with the same key) due now.
    fn requeue(&self, jobs: &[Job], now_ms: u64) -> Result<usize, StoreError>;
    /// Queue depth, next due time and dead letters per sink; events waiting; store size.
    fn queue_stats(&self) -> Result<QueueStats, StoreError>;
}

/// What waits in the store, per sink (bounded scans: see [`STATS_SCAN_LIMIT`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueStats {
    pub sinks: std::collections::BTreeMap<String, SinkQueue>,
    /// Stored events not processed yet.
    pub events_pending: usize,
    /// Events in the in-memory de-duplication index (those in the log: its memory is about
    /// 27 bytes each).
    pub dedup_index_events: usize,
    /// Bytes on disk (sled and the inbox log).
    pub store_bytes: u64,
    /// The scan stopped at the limit: the counts are lower bounds.
    pub truncated: bool,
    /// Purged by retention since the store was created.
    pub purged_events: u64,
    pub purged_jobs: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkQueue {
    /// Jobs waiting (pending, retrying, in flight).
    pub depth: usize,
    /// When the first of them is due (unix ms).
    pub next_due_ms: Option<u64>,
    pub dead: usize,
}

/// Index entries read at most per stats call: past it the counts are lower bounds
/// (`truncated`). A full walk of a backlog of a million jobs would pull the whole index
/// through sled's cache every sample (~300 MB of memory for 1 M jobs).
pub const STATS_SCAN_LIMIT: usize = 100_000;

/// Events for the worker to process.
#[derive(Debug, Default)]
pub struct PendingBatch {
    pub events: Vec<StoredEvent>,
    /// The highest id read from the watermark on: once the batch is complete, every event
    /// up to it is processed (or deferred).
    pub through: Option<u64>,
}

impl Outbox for Store {
    fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let mut out = QueueStats {
            events_pending: self.pending_len(),
            dedup_index_events: self.dedup_index_len(),
            store_bytes: self.size_on_disk(),
            purged_events: self.total("purged_events"),
            purged_jobs: self.total("purged_jobs"),
            ..Default::default()
        };
        let mut seen = 0usize;
        for item in self.due.iter().keys() {
            let k = item?;
            seen += 1;
            if seen > STATS_SCAN_LIMIT {
                out.truncated = true;
                break;
            }
            let Some(split) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let sink = String::from_utf8_lossy(&k[..split]);
            let at = k
                .get(split + 1..split + 9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            let q = match out.sinks.get_mut(sink.as_ref()) {
                Some(q) => q,
                None => out.sinks.entry(sink.into_owned()).or_default(),
            };
            q.depth += 1;
            // Keys are ordered by time within a sink: the first is the earliest.
            if q.next_due_ms.is_none() {
                q.next_due_ms = at;
            }
        }
        for item in self.dlq.iter().keys() {
            let k = item?;
            seen += 1;
            if seen > STATS_SCAN_LIMIT {
                out.truncated = true;
                break;
            }
            if let Some(j) = self.job(&String::from_utf8_lossy(&k))? {
                if j.state == JobState::Dead {
                    out.sinks.entry(j.sink).or_default().dead += 1;
                }
            }
        }
        Ok(out)
    }
    fn job(&self, key: &str) -> Result<Option<Job>, StoreError> {
        Store::job(self, key)
    }
    fn jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        Store::jobs(self, limit)
    }
    fn dead_letters(&self, filter: &DeadFilter, limit: usize) -> Result<Vec<Job>, StoreError> {
        Store::dead_letters(self, filter, limit)
    }
    fn replay_dead(&self, keys: &[String], now_ms: u64) -> Result<usize, StoreError> {
        self.transition_dead(keys, |j| {
            j.state = JobState::Pending;
            j.attempts = 0;
            j.uncertain = false;
            j.next_at_ms = now_ms;
            j.finished_at_ms = None;
            j.replays += 1;
            // Its age (max_age) counts from the replay.
            j.created_at_ms = now_ms;
        })
    }
    fn drop_dead(&self, keys: &[String], now_ms: u64) -> Result<usize, StoreError> {
        self.transition_dead(keys, |j| {
            j.state = JobState::Dropped;
            j.finished_at_ms = Some(now_ms);
        })
    }
    fn event_jobs(&self, event_id: &str) -> Result<Vec<Job>, StoreError> {
        Store::event_jobs(self, event_id)
    }
    fn requeue(&self, jobs: &[Job], now_ms: u64) -> Result<usize, StoreError> {
        let mut changes = Vec::with_capacity(jobs.len());
        for new in jobs {
            let before = Store::job(self, &new.key)?;
            let mut after = new.clone();
            after.state = JobState::Pending;
            after.attempts = 0;
            after.uncertain = false;
            after.next_at_ms = now_ms;
            after.finished_at_ms = None;
            after.reason = None;
            let before = match before {
                Some(b) if b.state == JobState::InFlight => {
                    return Err(StoreError::Io(format!(
                        "job {} is being delivered right now; try again in a moment",
                        b.key
                    )))
                }
                Some(b) => {
                    after.log = b.log.clone();
                    after.replays = b.replays + 1;
                    after.created_at_ms = now_ms;
                    after.kind = b.kind;
                    after.vendor_id = b.vendor_id.clone();
                    b
                }
                None => {
                    let mut phantom = new.clone();
                    phantom.state = JobState::Dropped;
                    phantom
                }
            };
            changes.push((before, after));
        }
        let skipped = self.write_jobs(&changes)?;
        self.flush_jobs()?;
        Ok(changes.len() - skipped.len())
    }
}

impl Store {
    fn transition_dead(&self, keys: &[String], f: impl Fn(&mut Job)) -> Result<usize, StoreError> {
        let mut changes = Vec::new();
        for key in keys {
            if let Some(j) = Store::job(self, key)? {
                if j.state == JobState::Dead {
                    let mut after = j.clone();
                    f(&mut after);
                    changes.push((j, after));
                }
            }
        }
        if changes.is_empty() {
            return Ok(0);
        }
        let mut done = 0;
        for chunk in changes.chunks(500) {
            let skipped = self.write_jobs(chunk)?;
            done += chunk.len() - skipped.len();
        }
        self.flush_jobs()?;
        Ok(done)
    }

    /// Up to `limit` events waiting for processing (deferred ones first, then new ones
    /// oldest first).
    pub fn pending_events(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self
            .pending_events_except(limit, &Default::default())?
            .events)
    }

    /// Deferred events not in `skip` (their runs wait to be tried again), then events from
    /// the processed watermark on, in id order: only acknowledged ones are in the log's
    /// index, so nothing whose write may yet fail is read. Purged records (a second copy
    /// found at recovery) are passed over.
    pub fn pending_events_except(
        &self,
        limit: usize,
        skip: &std::collections::HashSet<u64>,
    ) -> Result<PendingBatch, StoreError> {
        self.pending_events_for(limit, skip, &|_, _| true)
    }

    /// `pending_events_except`, where new events of a (source, type) that `wanted` refuses
    /// (no pipeline listens) are passed over, processed, without decoding more of them
    /// than those two fields. At most `limit` events, and at most 64 times that many read.
    pub fn pending_events_for(
        &self,
        limit: usize,
        skip: &std::collections::HashSet<u64>,
        wanted: &dyn Fn(&str, &str) -> bool,
    ) -> Result<PendingBatch, StoreError> {
        let mut out = PendingBatch::default();
        let mut deferred = std::collections::HashSet::new();
        for key in self.deferred.iter().keys() {
            let key = key?;
            let id = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("deferred key".into()))?,
            );
            deferred.insert(id);
            if skip.contains(&id) || out.events.len() >= limit {
                continue;
            }
            match self.event_by_id(id)? {
                Some(ev) if ev.meta.purged_at_ms.is_none() => out.events.push(ev),
                _ => {
                    self.deferred.remove(&key)?;
                }
            }
        }
        let from = self.processed_to.load(std::sync::atomic::Ordering::Relaxed);
        for (read, id) in self.event_ids(from, u64::MAX, false).enumerate() {
            if out.events.len() >= limit || read >= limit.saturating_mul(64) {
                break;
            }
            let id = id?;
            out.through = Some(id);
            if deferred.contains(&id) {
                continue;
            }
            if let Some(ev) = self.event_if(id, wanted)? {
                out.events.push(ev);
            }
        }
        Ok(out)
    }

    /// Marks a batch of events processed, records their runs and writes their jobs, as one
    /// crash-safe unit: the writes are ordered (see below) and keyed so that replaying them
    /// after a crash at any point yields each job exactly once. A job whose key exists
    /// already is kept as it is (re-processing never duplicates an action). Events no
    /// pipeline listened to leave no trace. `deferred`: events of the batch whose runs wait
    /// for another try; `through`: the batch's `PendingBatch::through`.
    pub fn complete(
        &self,
        done: &[(&StoredEvent, Vec<Run>, Vec<Job>)],
        deferred: &[u64],
        through: Option<u64>,
    ) -> Result<(), StoreError> {
        struct Row {
            id: u64,
            trace: Option<Vec<u8>>,
            jobs: Vec<(String, Vec<u8>, Option<Vec<u8>>)>,
        }
        let watermark = self.processed_to.load(std::sync::atomic::Ordering::Relaxed);
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
                .map(|j| {
                    serde_json::to_vec(j).map(|v| {
                        (
                            j.key.clone(),
                            v,
                            j.state
                                .scheduled()
                                .then(|| due_key(&j.sink, j.next_at_ms, &j.key)),
                        )
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(|e| StoreError::Io(e.to_string()))?;
            rows.push(Row { id, trace, jobs });
        }
        // No transaction (sled's take a process-wide lock): the writes are ordered so that a
        // crash anywhere leaves a state the next run repairs. Each job's index entries go
        // first, then the job (only if its key is new: the same event processed again yields
        // the same keys), the trace, then the deferred marks, and last the watermark. A crash
        // before the watermark moves processes the events again; index entries without
        // their job are dropped by the readers.
        for r in &rows {
            for (key, value, due_at) in &r.jobs {
                if self.outbox.get(key.as_bytes())?.is_some() {
                    continue;
                }
                if let Some(d) = due_at {
                    self.due.insert(d.as_slice(), &[])?;
                }
                self.event_jobs.insert(event_job_key(r.id, key), &[])?;
                let _ = self.outbox.compare_and_swap(
                    key.as_bytes(),
                    None as Option<&[u8]>,
                    Some(value.as_slice()),
                )?;
            }
            if let Some(t) = &r.trace {
                self.traces.insert(r.id.to_be_bytes(), t.as_slice())?;
            }
            // A deferred event tried again (new events are at or above the watermark).
            if r.id < watermark {
                self.deferred.remove(r.id.to_be_bytes())?;
            }
        }
        for id in deferred {
            self.deferred.insert(id.to_be_bytes(), &[])?;
        }
        if let Some(t) = through {
            let to = t + 1;
            let before = self
                .processed_to
                .fetch_max(to, std::sync::atomic::Ordering::Relaxed);
            if to > before {
                self.meta.insert("processed_to", &to.to_be_bytes())?;
            }
        }
        // A batch that only moved the watermark asks for no checkpoint (sled's own flush
        // follows within 250 ms; a crash before it processes those events again).
        let wrote = !deferred.is_empty()
            || rows
                .iter()
                .any(|r| r.trace.is_some() || !r.jobs.is_empty() || r.id < watermark);
        if wrote {
            self.job_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
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

    pub fn job(&self, key: &str) -> Result<Option<Job>, StoreError> {
        self.outbox
            .get(key.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Up to `limit` jobs of `sink` due at `now_ms`, oldest first, skipping `busy` keys (in
    /// flight in this process). Also says when the next one is due.
    pub fn due_jobs(
        &self,
        sink: &str,
        now_ms: u64,
        limit: usize,
        busy: &std::collections::HashSet<String>,
    ) -> Result<(Vec<Job>, Option<u64>), StoreError> {
        let mut prefix = sink.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        let mut next = None;
        for item in self.due.scan_prefix(&prefix) {
            let (k, _) = item?;
            let rest = &k[prefix.len()..];
            if rest.len() < 8 {
                continue;
            }
            let at = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
            let key = String::from_utf8_lossy(&rest[8..]).into_owned();
            if busy.contains(&key) {
                continue;
            }
            if at > now_ms {
                next = Some(at);
                break;
            }
            if out.len() >= limit {
                next = Some(at);
                break;
            }
            match self.job(&key)? {
                Some(j)
                    if j.state.scheduled()
                        && j.next_at_ms == at
                        && !out.iter().any(|o: &Job| o.key == j.key) =>
                {
                    out.push(j)
                }
                Some(j) if j.state.scheduled() && j.next_at_ms == at => {}
                // An entry that does not match its job: written just before the job (a
                // write in progress), or left by a crash. Only an old one is dropped.
                _ if at + STALE_AFTER_MS < now_ms => {
                    self.due.remove(&k)?;
                }
                _ => {}
            }
        }
        Ok((out, next))
    }

    /// Writes job transitions `(before, after)` and their index entries in one transaction.
    /// A transition whose `before` is not the stored version (the job changed meanwhile: an
    /// operator's replay) is skipped; the keys skipped are returned. A key not stored yet is
    /// written whatever `before` says (a new job). `after` is stored with the next version.
    pub fn write_jobs(&self, changes: &[(Job, Job)]) -> Result<Vec<String>, StoreError> {
        let rows = changes
            .iter()
            .map(|(before, after)| {
                let mut stored = after.clone();
                stored.version = before.version + 1;
                serde_json::to_vec(&stored).map(|v| {
                    (
                        after.key.clone(),
                        v,
                        before.version,
                        before
                            .state
                            .scheduled()
                            .then(|| due_key(&before.sink, before.next_at_ms, &before.key)),
                        after
                            .state
                            .scheduled()
                            .then(|| due_key(&after.sink, after.next_at_ms, &after.key)),
                        after.state == JobState::Dead,
                        after.state == JobState::InFlight,
                        parse_id(&after.event_id).map(|id| event_job_key(id, &after.key)),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?;
        #[derive(Deserialize)]
        struct Version {
            #[serde(default)]
            version: u64,
        }
        // No transaction (see `complete`): per job, the index entries the new state needs go
        // first, then the job itself with a compare-and-swap on the version, then the entries
        // the old state had are removed. Readers drop index entries that do not match their
        // job, so a crash between any two writes is harmless.
        let mut skipped = Vec::new();
        for (key, value, expected, old_due, new_due, dead, leased, event_key) in rows {
            let current = self.outbox.get(key.as_bytes())?;
            let stale = current.as_ref().is_some_and(|c| {
                serde_json::from_slice::<Version>(c)
                    .map(|v| v.version)
                    .unwrap_or(u64::MAX)
                    != expected
            });
            if stale {
                skipped.push(key);
                continue;
            }
            if let Some(k) = &event_key {
                self.event_jobs.insert(k.as_slice(), &[])?;
            }
            if let Some(k) = &new_due {
                self.due.insert(k.as_slice(), &[])?;
            }
            if leased {
                self.leases.insert(key.as_bytes(), &[])?;
            }
            if dead {
                self.dlq.insert(key.as_bytes(), &[])?;
            }
            let swapped = self.outbox.compare_and_swap(
                key.as_bytes(),
                current.as_ref().map(|c| c.as_ref()),
                Some(value.as_slice()),
            )?;
            if swapped.is_err() {
                // Changed between the read and the swap: undo what the new state added.
                if let Some(k) = &new_due {
                    if old_due.as_ref() != Some(k) {
                        self.due.remove(k.as_slice())?;
                    }
                }
                skipped.push(key);
                continue;
            }
            if let Some(k) = &old_due {
                if new_due.as_ref() != Some(k) {
                    self.due.remove(k.as_slice())?;
                }
            }
            if !leased {
                self.leases.remove(key.as_bytes())?;
            }
            if !dead {
                self.dlq.remove(key.as_bytes())?;
            }
        }
        self.job_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(skipped)
    }

    /// Cancels the jobs of `event_ids` on `sinks` that were never sent and cannot have taken
    /// effect (pending, no uncertain attempt); a job in flight, delivered, dead or uncertain
    /// is left as it is. Returns the keys cancelled.
    pub fn cancel_unsent(
        &self,
        event_ids: &[String],
        sinks: &[String],
        reason: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        // First the tombstones, so that jobs the events' runs create later (a threshold
        // event not processed yet) are created cancelled.
        for id in event_ids {
            let mut c = self.cancellation(id)?.unwrap_or_default();
            for s in sinks {
                if !c.sinks.contains(s) {
                    c.sinks.push(s.clone());
                }
            }
            c.reason = reason.to_string();
            self.cancels
                .insert(id.as_bytes(), serde_json::to_vec(&c).map_err(io)?)?;
        }
        let mut changes = Vec::new();
        for id in event_ids {
            for j in Store::event_jobs(self, id)? {
                if j.kind == JobKind::Send
                    && j.state == JobState::Pending
                    && !j.uncertain
                    && sinks.contains(&j.sink)
                {
                    let mut after = j.clone();
                    after.state = JobState::Cancelled;
                    after.reason = Some(reason.to_string());
                    after.finished_at_ms = Some(now_ms);
                    changes.push((j, after));
                }
            }
        }
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let skipped = self.write_jobs(&changes)?;
        self.flush_jobs()?;
        Ok(changes
            .into_iter()
            .map(|(_, a)| a.key)
            .filter(|k| !skipped.contains(k))
            .collect())
    }

    /// The sinks whose jobs of `event_id` are cancelled, and why.
    pub fn cancellation(&self, event_id: &str) -> Result<Option<Cancellation>, StoreError> {
        self.cancels
            .get(event_id.as_bytes())?
            .map(|raw| serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    /// Jobs left in flight by a process that is gone (this one just started).
    pub fn leased_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        for item in self.leases.iter() {
            let (k, _) = item?;
            match self.job(&String::from_utf8_lossy(&k))? {
                Some(j) if j.state == JobState::InFlight => out.push(j),
                _ => {
                    self.leases.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    /// Makes every write so far durable (sled's log fsynced).
    pub fn flush_jobs(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Dead letters matching `filter`, newest first, at most `limit`.
    pub fn dead_letters(&self, filter: &DeadFilter, limit: usize) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        for item in self.dlq.iter() {
            let (k, _) = item?;
            if let Some(j) = self.job(&String::from_utf8_lossy(&k))? {
                if j.state == JobState::Dead && filter.matches(&j) {
                    out.push(j);
                }
            }
        }
        out.sort_by_key(|j| std::cmp::Reverse(j.finished_at_ms));
        out.truncate(limit);
        Ok(out)
    }

    pub fn dead_letter_count(&self) -> usize {
        self.dlq.len()
    }

    /// Jobs of one event, in key order.
    pub fn event_jobs(&self, event_id: &str) -> Result<Vec<Job>, StoreError> {
        let Some(id) = parse_id(event_id) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self.event_jobs.scan_prefix(id.to_be_bytes()) {
            let (k, _) = item?;
            if let Some(j) = self.job(&String::from_utf8_lossy(&k[8..]))? {
                out.push(j);
            }
        }
        Ok(out)
    }

    /// Scheduled jobs (pending or in flight).
    pub fn scheduled_len(&self) -> usize {
        self.due.len()
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

#[cfg(test)]
mod race_tests {
    use crate::config::Durability;
    use crate::inbox::{Inbox, NewEvent};
    use crate::store::Store;
    use std::time::Duration;

    /// Regression: a worker scanning pending marks while appends run must never drop the
    /// mark of an event whose append is between its two writes (seen in the e2e benchmark
    /// as 2 of 5,000 events never processed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_concurrent_scan_never_drops_the_mark_of_an_append_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Durability::Batch, Duration::from_millis(5)).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scanner = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = std::collections::HashSet::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for ev in s.pending_events(1000).unwrap() {
                        seen.insert(ev.meta.id.clone());
                    }
                }
                for ev in s.pending_events(100_000).unwrap() {
                    seen.insert(ev.meta.id.clone());
                }
                seen
            })
        };
        let mut tasks = Vec::new();
        for t in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..250 {
                    let e = NewEvent {
                        source: "shop".into(),
                        connector: "shopify".into(),
                        vendor_id: format!("{t}-{i}"),
                        event_type: "orders/paid".into(),
                        event_time: None,
                        received_at_ms: 1,
                        headers: vec![],
                        payload: bytes::Bytes::from_static(b"{}"),
                    };
                    ids.push(s.append(vec![e]).await.unwrap()[0].id.clone());
                }
                ids
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = scanner.join().unwrap();
        let lost: Vec<_> = all.iter().filter(|id| !seen.contains(*id)).collect();
        assert!(
            lost.is_empty(),
            "{} events lost their pending mark: {lost:?}",
            lost.len()
        );
        assert_eq!(s.pending_len(), all.len());
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();
    }
}

#[cfg(test)]
mod cas_tests {
    use super::*;
    use crate::config::Durability;
    use std::time::Duration;

    fn job(key: &str) -> Job {
        Job {
            key: key.into(),
            event_id: "ev_0000000000000001".into(),
            pipeline: "p".into(),
            step: "steps[0]".into(),
            sink: "sms".into(),
            action: "send_sms".into(),
            with: serde_json::json!({}),
            created_at_ms: 1,
            attempts: 0,
            state: JobState::Pending,
            next_at_ms: 1,
            uncertain: false,
            reason: None,
            vendor_id: None,
            finished_at_ms: None,
            replays: 0,
            log: Vec::new(),
            kind: JobKind::Send,
            version: 0,
            sensitive: Vec::new(),
            keep: None,
        }
    }

    /// A transition from a version the store no longer holds is skipped, and the due index
    /// keeps exactly one entry per scheduled job.
    #[test]
    fn a_stale_transition_is_skipped_and_the_index_stays_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Durability::Fsync, Duration::from_millis(50)).unwrap();
        let j0 = job("pf-a");
        let mut phantom = j0.clone();
        phantom.state = JobState::Dropped;
        assert!(s.write_jobs(&[(phantom, j0.clone())]).unwrap().is_empty());
        let stored = s.job("pf-a").unwrap().unwrap();
        assert_eq!(stored.version, 1);
        // An operator moves it (version 1 -> 2) while an attempt holds version 1.
        let mut replayed = stored.clone();
        replayed.next_at_ms = 50;
        assert!(s
            .write_jobs(&[(stored.clone(), replayed.clone())])
            .unwrap()
            .is_empty());
        let mut done = stored.clone();
        done.state = JobState::Delivered;
        assert_eq!(s.write_jobs(&[(stored, done)]).unwrap(), ["pf-a"]);
        let now = s.job("pf-a").unwrap().unwrap();
        assert_eq!(
            (now.state, now.next_at_ms, now.version),
            (JobState::Pending, 50, 2)
        );
        let (due, _) = s.due_jobs("sms", 100, 10, &Default::default()).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(s.due.len(), 1, "one index entry");
        s.close().unwrap();
    }
}
