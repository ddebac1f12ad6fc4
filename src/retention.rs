//! Retention: with `retention: <age>` in the config, stored payloads and pipeline traces older
//! than that age are purged on a schedule, with the jobs that were delivered or dropped (their
//! `with` holds the same personal data). What stays:
//! - each event's metadata (id, source, type, vendor id, times), so a late re-delivery is
//!   still answered as a duplicate and the event still appears in listings, marked purged;
//! - dead letters (and their events), until they are replayed or dropped;
//! - anything not finished: pending events, jobs waiting or in flight, orders being tracked;
//! - the aggregated counts (metrics, and the persistent totals of what was purged).

use crate::inbox::{decode, encode, format_id};
use crate::outbox::{Job, JobState};
use crate::store::{Store, StoreError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What one purge pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub events: u64,
    pub jobs: u64,
    /// Events old enough but kept (not finished, or holding dead letters).
    pub kept: u64,
    /// The first event id the next pass needs to look at.
    pub resume_at: u64,
}

/// Events examined per pass at most (a pass is bounded; the next one continues).
const PASS: usize = 10_000;

impl Store {
    /// Purges what was received before `cutoff_ms`, starting at event id `from`.
    pub fn purge(&self, cutoff_ms: u64, now_ms: u64, from: u64) -> Result<Purged, StoreError> {
        let mut out = Purged {
            resume_at: from,
            ..Default::default()
        };
        // The oldest event kept (not finished): later passes start there.
        let mut first_kept: Option<u64> = None;
        let mut last: Option<u64> = None;
        let mut examined = 0;
        for item in self.events.range(from.to_be_bytes()..) {
            let (key, raw) = item?;
            let id = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("event key".into()))?,
            );
            let ev = decode(&raw)?;
            if ev.meta.received_at_ms >= cutoff_ms {
                // Ids grow with time: nothing later is old enough.
                out.resume_at = first_kept.unwrap_or(id);
                self.add_total("purged_events", out.events)?;
                self.add_total("purged_jobs", out.jobs)?;
                return Ok(out);
            }
            examined += 1;
            if examined > PASS {
                out.resume_at = first_kept.unwrap_or(id);
                self.add_total("purged_events", out.events)?;
                self.add_total("purged_jobs", out.jobs)?;
                return Ok(out);
            }
            last = Some(id);
            if ev.meta.purged_at_ms.is_some() {
                continue;
            }
            if self.pending.contains_key(&key)? {
                out.kept += 1;
                first_kept.get_or_insert(id);
                continue;
            }
            let jobs = self.event_jobs(&format_id(id))?;
            let unfinished = jobs
                .iter()
                .any(|j| matches!(j.state, JobState::Pending | JobState::InFlight));
            if unfinished {
                out.kept += 1;
                first_kept.get_or_insert(id);
                continue;
            }
            let dead = jobs.iter().any(|j| j.state == JobState::Dead);
            // Finished jobs go (their `with` is personal data); dead letters stay with
            // their event's payload, so that a replay can still run.
            for j in jobs
                .iter()
                .filter(|j| matches!(j.state, JobState::Delivered | JobState::Dropped))
            {
                self.remove_finished_job(id, j)?;
                out.jobs += 1;
            }
            if dead {
                out.kept += 1;
                first_kept.get_or_insert(id);
                continue;
            }
            self.traces.remove(key.as_ref())?;
            let mut meta = ev.meta.clone();
            meta.purged_at_ms = Some(now_ms);
            self.events
                .compare_and_swap(key.as_ref(), Some(raw.as_ref()), Some(encode(&meta, &[])))?
                .ok();
            out.events += 1;
        }
        out.resume_at = first_kept.unwrap_or(last.map(|l| l + 1).unwrap_or(from));
        self.add_total("purged_events", out.events)?;
        self.add_total("purged_jobs", out.jobs)?;
        Ok(out)
    }

    fn remove_finished_job(&self, event: u64, j: &Job) -> Result<(), StoreError> {
        // The job only if it is still the one read (an operator's replay would have changed
        // it); then its index entry.
        let current = self.outbox.get(j.key.as_bytes())?;
        if let Some(cur) = current {
            let still: Option<Job> = serde_json::from_slice(&cur).ok();
            if still.is_some_and(|s| s.version == j.version) {
                self.outbox
                    .compare_and_swap(j.key.as_bytes(), Some(cur), None as Option<&[u8]>)?
                    .ok();
            } else {
                return Ok(());
            }
        }
        let mut k = event.to_be_bytes().to_vec();
        k.extend_from_slice(j.key.as_bytes());
        self.event_jobs.remove(k)?;
        Ok(())
    }
}

/// Purges every `every` (and once at start) what is older than `age`, until `stop`.
pub async fn run(store: Store, age: Duration, stop: CancellationToken) {
    let every = (age / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut from = 0u64;
    loop {
        let s = store.clone();
        let now = crate::delivery::now_ms();
        let cutoff = now.saturating_sub(age.as_millis() as u64);
        let pass = tokio::task::spawn_blocking(move || s.purge(cutoff, now, from)).await;
        match pass {
            Ok(Ok(p)) => {
                from = p.resume_at;
                metrics::counter!("perkflow_retention_purged_total", "what" => "events")
                    .increment(p.events);
                metrics::counter!("perkflow_retention_purged_total", "what" => "jobs")
                    .increment(p.jobs);
                if p.events + p.jobs > 0 {
                    tracing::info!(
                        events = p.events,
                        jobs = p.jobs,
                        kept_unfinished = p.kept,
                        "retention: purged payloads and traces older than {}",
                        humantime::format_duration(age)
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "retention pass failed; trying again later"),
            Err(e) => tracing::warn!(error = %e, "retention pass failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
