//! Retention: with `retention: <age>` in the config, stored payloads and pipeline traces older
//! than that age are purged on a schedule, with the jobs that were delivered or dropped (their
//! `with` holds the same personal data). What stays:
//! - each event's metadata (id, source, type, vendor id, times; not its request headers), so
//!   a late re-delivery is still answered as a duplicate and the event still appears in
//!   listings, marked purged;
//! - dead letters, with their event's payload and every other job of that event (so that a
//!   replay still knows what was delivered), until they are replayed or dropped;
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
    /// The first new event id the next pass looks at.
    pub resume_at: u64,
}

/// New events examined per pass at most (a pass is bounded; the next one continues).
const PASS: usize = 10_000;

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Purged,
    /// Not finished, or holding dead letters: looked at again next pass.
    Kept,
    /// Already purged, or no longer there.
    Gone,
}

impl Store {
    /// Purges what was received before `cutoff_ms`: first the events kept by earlier passes
    /// (`recheck`: unfinished then, or holding dead letters), then new ones from event id
    /// `from` on, at most `PASS` of them. Events kept this time are added to `recheck`.
    pub fn purge(
        &self,
        cutoff_ms: u64,
        now_ms: u64,
        from: u64,
        recheck: &mut std::collections::BTreeSet<u64>,
    ) -> Result<Purged, StoreError> {
        let mut out = Purged {
            resume_at: from,
            ..Default::default()
        };
        for id in recheck.clone() {
            match self.purge_one(id, now_ms, &mut out)? {
                Verdict::Kept => {}
                Verdict::Purged | Verdict::Gone => {
                    recheck.remove(&id);
                }
            }
        }
        for (examined, item) in self.events.range(from.to_be_bytes()..).enumerate() {
            let (key, raw) = item?;
            let id = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("event key".into()))?,
            );
            // Ids grow with time: nothing from here on is old enough yet.
            if decode(&raw)?.meta.received_at_ms >= cutoff_ms || examined == PASS {
                break;
            }
            out.resume_at = id + 1;
            if self.purge_one(id, now_ms, &mut out)? == Verdict::Kept {
                recheck.insert(id);
            }
        }
        out.kept = recheck.len() as u64;
        self.add_total("purged_events", out.events)?;
        self.add_total("purged_jobs", out.jobs)?;
        Ok(out)
    }

    /// Purges one event old enough, unless it is unfinished or holds dead letters.
    fn purge_one(&self, id: u64, now_ms: u64, out: &mut Purged) -> Result<Verdict, StoreError> {
        let key = id.to_be_bytes();
        let Some(raw) = self.events.get(key)? else {
            return Ok(Verdict::Gone);
        };
        let ev = decode(&raw)?;
        if ev.meta.purged_at_ms.is_some() {
            return Ok(Verdict::Gone);
        }
        if self.pending.contains_key(key)? {
            return Ok(Verdict::Kept);
        }
        let jobs = self.event_jobs(&format_id(id))?;
        // Unfinished work, or a dead letter (kept with its event's payload and every other
        // job of the event, so that a replay still knows what was delivered): kept whole.
        let keep = jobs.iter().any(|j| {
            matches!(
                j.state,
                JobState::Pending | JobState::InFlight | JobState::Dead
            )
        });
        if keep {
            return Ok(Verdict::Kept);
        }
        // Finished jobs go (their `with` is personal data), then the trace and the payload.
        for j in &jobs {
            if self.remove_finished_job(id, j)? {
                out.jobs += 1;
            }
        }
        self.traces.remove(key)?;
        let mut meta = ev.meta.clone();
        meta.purged_at_ms = Some(now_ms);
        // The request headers go with the payload: only what de-duplication and listings
        // need stays (the soak measured ~1 KB per event kept with them).
        meta.headers.clear();
        let swapped =
            self.events
                .compare_and_swap(key, Some(raw.as_ref()), Some(encode(&meta, &[])))?;
        if swapped.is_ok() {
            out.events += 1;
            Ok(Verdict::Purged)
        } else {
            // Changed meanwhile: looked at again next pass.
            Ok(Verdict::Kept)
        }
    }

    /// Removes a finished job if it is still the one read (an operator's replay would have
    /// changed it), then its index entry. Returns whether it was removed.
    fn remove_finished_job(&self, event: u64, j: &Job) -> Result<bool, StoreError> {
        let mut removed = false;
        if let Some(cur) = self.outbox.get(j.key.as_bytes())? {
            let still: Option<Job> = serde_json::from_slice(&cur).ok();
            if still.is_none_or(|s| s.version != j.version) {
                return Ok(false);
            }
            removed = self
                .outbox
                .compare_and_swap(j.key.as_bytes(), Some(cur), None as Option<&[u8]>)?
                .is_ok();
        }
        let mut k = event.to_be_bytes().to_vec();
        k.extend_from_slice(j.key.as_bytes());
        self.event_jobs.remove(k)?;
        Ok(removed)
    }
}

/// Purges every `every` (and once at start) what is older than `age`, until `stop`.
pub async fn run(store: Store, age: Duration, stop: CancellationToken) {
    let every = (age / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut from = 0u64;
    let mut recheck = std::collections::BTreeSet::new();
    loop {
        let s = store.clone();
        let now = crate::delivery::now_ms();
        let cutoff = now.saturating_sub(age.as_millis() as u64);
        let mut kept = std::mem::take(&mut recheck);
        let pass = tokio::task::spawn_blocking(move || {
            let r = s.purge(cutoff, now, from, &mut kept);
            (r, kept)
        })
        .await;
        match pass {
            Ok((Ok(p), kept)) => {
                recheck = kept;
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
            Ok((Err(e), kept)) => {
                recheck = kept;
                tracing::warn!(error = %e, "retention pass failed; trying again later")
            }
            Err(e) => tracing::warn!(error = %e, "retention pass failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
