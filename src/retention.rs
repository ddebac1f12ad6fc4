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
        for (examined, item) in self.event_ids(from, u64::MAX, false).enumerate() {
            let id = item?;
            let Some(ev) = self.event_by_id(id)? else {
                continue;
            };
            // Ids grow with time: nothing from here on is old enough yet.
            if ev.meta.received_at_ms >= cutoff_ms || examined == PASS {
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
        self.drop_log_files(out.resume_at)?;
        Ok(out)
    }

    /// Drops what is left of purged events received before `before_ms` (their metadata and
    /// de-duplication entry: a re-delivery is then stored as new), from event id `from` on,
    /// at most `PASS` of them. Events kept whole (unfinished, dead letters) are left alone.
    /// Returns how many were dropped and the id the next pass starts at.
    pub fn forget(&self, before_ms: u64, from: u64) -> Result<(u64, u64), StoreError> {
        let (mut dropped, mut next) = (0u64, from);
        // A kept event is looked at again by later passes (it may be purged by then).
        let mut first_kept = None;
        for (examined, item) in self.events.range(from.to_be_bytes()..).enumerate() {
            let (key, raw) = item?;
            let id = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("event key".into()))?,
            );
            let ev = decode(&raw)?;
            // Ids grow with time: nothing from here on is old enough yet.
            if ev.meta.received_at_ms >= before_ms || examined == PASS {
                break;
            }
            next = id + 1;
            // Kept whole, or purged but still in a log file that retention has not dropped
            // yet: that drop tells purged events (metadata here) from kept ones (moved
            // here) by this entry, so it stays until the file is gone.
            if ev.meta.purged_at_ms.is_none() || self.log.locate(id)?.is_some() {
                first_kept.get_or_insert(id);
                continue;
            }
            // The entry goes only if it still names this event; then the metadata.
            let dedup_key = crate::inbox::dedup_key(&ev.meta.source, &ev.meta.vendor_id);
            let _ = self.dedup.compare_and_swap(
                &dedup_key,
                Some(&id.to_be_bytes()[..]),
                None as Option<&[u8]>,
            )?;
            if self
                .events
                .compare_and_swap(key, Some(raw), None as Option<&[u8]>)?
                .is_ok()
            {
                dropped += 1;
            }
        }
        self.add_total("forgotten_events", dropped)?;
        Ok((dropped, first_kept.unwrap_or(next)))
    }

    /// Deletes the sealed log files whose events are all below `below` (every one of them
    /// purged, or kept): a kept event's record is first moved into sled, durably. An event
    /// with no entry in sled is a kept one: a purged one has its metadata there, which
    /// `forget` leaves until the file is gone.
    fn drop_log_files(&self, below: u64) -> Result<(), StoreError> {
        // Never a file the worker has not passed yet: it reads new events from the log.
        let below = below.min(self.processed_to.load(std::sync::atomic::Ordering::Relaxed));
        // A file dropped earlier whose deletion failed: deleted now.
        for seq in self.log.dropped()? {
            self.log.delete(seq)?;
        }
        for seq in self.log.sealed_below(below) {
            let entries = self.log.entries(seq)?;
            for e in &entries {
                let key = e.id.to_be_bytes();
                if !self.events.contains_key(key)? {
                    let record = self.log.read(seq, *e)?;
                    self.mark_kept();
                    let _ =
                        self.events
                            .compare_and_swap(key, None as Option<&[u8]>, Some(record))?;
                }
            }
            // Their de-duplication entries move from memory to sled with them.
            let ids: Vec<u64> = entries.iter().map(|e| e.id).collect();
            let moved = self.dedup_leaving_log(&ids)?;
            self.log.forget(seq)?;
            self.make_sled_durable()?;
            self.dedup_left_log(&moved);
            self.log.delete(seq)?;
        }
        Ok(())
    }

    /// Purges one event old enough, unless it is unfinished or holds dead letters.
    fn purge_one(&self, id: u64, now_ms: u64, out: &mut Purged) -> Result<Verdict, StoreError> {
        let key = id.to_be_bytes();
        let Some((raw, kept_in_sled)) = self.event_record(id)? else {
            return Ok(Verdict::Gone);
        };
        let ev = decode(&raw)?;
        if ev.meta.purged_at_ms.is_some() {
            return Ok(Verdict::Gone);
        }
        if self.is_pending(id, &ev.meta)? {
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
        let old = kept_in_sled.then_some(raw.as_slice());
        self.mark_kept();
        let swapped = self
            .events
            .compare_and_swap(key, old, Some(encode(&meta, &[])))?;
        if swapped.is_ok() {
            out.events += 1;
            Ok(Verdict::Purged)
        } else {
            // Changed meanwhile: looked at again next pass.
            Ok(Verdict::Kept)
        }
    }

    /// `purge_one` of one event at `now_ms` 5,000 (tests).
    #[cfg(test)]
    fn purge_one_for_test(&self, id: u64) {
        self.purge_one(id, 5_000, &mut Purged::default()).unwrap();
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

/// Purges every `every` (and once at start) what is older than `age`, and with a
/// `dedup_window` drops what is left of purged events older than it, until `stop`.
pub async fn run(
    store: Store,
    age: Duration,
    dedup_window: Option<Duration>,
    stop: CancellationToken,
) {
    let every = (age / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut from = 0u64;
    let mut forget_from = 0u64;
    let mut recheck = std::collections::BTreeSet::new();
    loop {
        let s = store.clone();
        let now = crate::delivery::now_ms();
        let cutoff = now.saturating_sub(age.as_millis() as u64);
        let forget_before = dedup_window.map(|w| now.saturating_sub(w.as_millis() as u64));
        let mut kept = std::mem::take(&mut recheck);
        let pass = tokio::task::spawn_blocking(move || {
            let r = s.purge(cutoff, now, from, &mut kept);
            let f = forget_before.map(|before| s.forget(before, forget_from));
            (r, kept, f)
        })
        .await;
        let pass = pass.map(|(r, kept, f)| {
            match f {
                Some(Ok((n, next))) => {
                    forget_from = next;
                    metrics::counter!("perkflow_retention_purged_total", "what" => "dedup_entries")
                        .increment(n);
                    if n > 0 {
                        tracing::info!(events = n, "retention: dropped what was left of events past the de-duplication window");
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "dropping events past the de-duplication window failed; trying again later"),
                None => {}
            }
            (r, kept)
        });
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

#[cfg(test)]
mod tests {
    use crate::inbox::{Inbox, NewEvent};
    use crate::store::Store;

    fn ev(vid: &str) -> NewEvent {
        crate::store::order_event(vid, 1_000)
    }

    /// Sealed log files whose events are all purged or kept are deleted; a kept (still
    /// pending) event moves into sled whole, purged ones keep their metadata, and every one
    /// is still a duplicate for a late re-delivery, also after a restart.
    #[tokio::test]
    async fn drops_log_files_and_keeps_what_is_unfinished() {
        let dir = tempfile::tempdir().unwrap();
        let open = || crate::store::test_store(dir.path(), 200, None);
        let s = open();
        let mut ids = Vec::new();
        for i in 0..12 {
            ids.push(
                s.append(vec![ev(&format!("v{i}"))]).await.unwrap()[0]
                    .id
                    .clone(),
            );
        }
        s.flush_index();
        let files_before = crate::wal::files(s.log.dir()).unwrap().len();
        assert!(files_before > 3);
        // The first 10 are processed; the last two stay pending.
        let batch = s.pending_events_except(10, &Default::default()).unwrap();
        let done: Vec<_> = batch.events.iter().map(|e| (e, vec![], vec![])).collect();
        s.complete(&done, &[], batch.through).unwrap();
        assert_eq!(s.pending_len(), 2);
        let mut recheck = Default::default();
        let p = s.purge(2_000, 5_000, 0, &mut recheck).unwrap();
        assert_eq!((p.events, p.kept), (10, 2));
        let files_after = crate::wal::files(s.log.dir()).unwrap().len();
        assert!(
            files_after < files_before,
            "{files_after} files of {files_before}"
        );
        let check = |s: &Store| {
            let all: Vec<_> = s.events().map(|e| e.unwrap()).collect();
            assert_eq!(
                all.iter().map(|e| e.meta.id.clone()).collect::<Vec<_>>(),
                ids
            );
            for e in &all[..10] {
                assert_eq!(e.meta.purged_at_ms, Some(5_000));
                assert!(e.payload.is_empty() && e.meta.headers.is_empty());
            }
            for e in &all[10..] {
                assert_eq!(e.meta.purged_at_ms, None);
                assert_eq!(
                    &e.payload[..],
                    format!("{{\"order\":\"{}\"}}", e.meta.vendor_id).as_bytes()
                );
            }
            assert_eq!(s.pending_len(), 2);
        };
        check(&s);
        assert!(s.append(vec![ev("v0")]).await.unwrap()[0].duplicate);
        assert!(s.append(vec![ev("v11")]).await.unwrap()[0].duplicate);
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();
        let s = open();
        check(&s);
        assert!(s.append(vec![ev("v3")]).await.unwrap()[0].duplicate);
        let left = s.pending_events(10).unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left[1].meta.id, ids[11]);
        // Past the de-duplication window, what was left of the purged events goes (the
        // pending ones stay whole); a re-delivery is then stored as new.
        // (The window passing before the file is dropped is covered below.)
        let (dropped, next) = s.forget(2_000, 0).unwrap();
        assert_eq!(dropped, 10);
        assert_eq!(
            next,
            crate::inbox::parse_id(&ids[10]).unwrap(),
            "the kept one is looked at again"
        );
        assert_eq!(s.events().count(), 2);
        assert_eq!(s.dedup_lookup("shop", "v0").unwrap(), None);
        assert!(!s.append(vec![ev("v0")]).await.unwrap()[0].duplicate);
        assert!(s.append(vec![ev("v11")]).await.unwrap()[0].duplicate);
        assert_eq!(s.forget(2_000, next).unwrap().0, 0);
    }

    /// A dropped log file whose deletion failed is never read back as a crashed file: its
    /// events were moved to sled, and those past the de-duplication window are gone for
    /// good (payload, metadata and key). It is deleted at the next pass or start.
    #[tokio::test]
    async fn a_dropped_file_whose_deletion_failed_is_never_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let open = || crate::store::test_store(dir.path(), 200, None);
        let s = open();
        let mut ids = Vec::new();
        for i in 0..12 {
            let id = s.append(vec![ev(&format!("d{i}"))]).await.unwrap()[0]
                .id
                .clone();
            ids.push(id);
        }
        s.flush_index();
        let files_before = crate::wal::files(s.log.dir()).unwrap();
        let batch = s.pending_events_except(12, &Default::default()).unwrap();
        let done: Vec<_> = batch.events.iter().map(|e| (e, vec![], vec![])).collect();
        s.complete(&done, &[], batch.through).unwrap();
        s.log.fail_deletes(true);
        assert!(s.purge(2_000, 5_000, 0, &mut Default::default()).is_err());
        // (The log writer may have opened a new file meanwhile.)
        assert!(files_before.iter().all(|(_, path)| path.exists()));
        assert_eq!(
            s.log.dropped().unwrap(),
            [files_before[0].0],
            "the first file"
        );
        // The window passes for the events of the dropped file (the others are still in
        // their files, which were not dropped).
        let (gone, _) = s.forget(2_000, 0).unwrap();
        assert!(gone > 0 && gone < 12, "{gone}");
        let left = ids[gone as usize..].to_vec();
        let check = |s: &Store| {
            let all: Vec<_> = s.events().map(|e| e.unwrap()).collect();
            assert_eq!(
                all.iter().map(|e| e.meta.id.clone()).collect::<Vec<_>>(),
                left
            );
            for e in &all {
                assert!(e.payload.is_empty(), "{} got its payload back", e.meta.id);
            }
            assert_eq!(s.pending_len(), 0);
        };
        check(&s);
        tokio::task::spawn_blocking(move || s.close())
            .await
            .unwrap()
            .unwrap();
        // Restarted: the file is deleted, not indexed again.
        let s = open();
        assert!(!files_before[0].1.exists());
        assert_eq!(s.log.dropped().unwrap(), Vec::<u64>::new());
        check(&s);
        assert!(!s.append(vec![ev("d0")]).await.unwrap()[0].duplicate);
        assert!(s.append(vec![ev("d11")]).await.unwrap()[0].duplicate);
        // A later pass deletes what a failed deletion left, without a restart.
        s.log.fail_deletes(true);
        assert!(s.purge(2_000, 6_000, 0, &mut Default::default()).is_err());
        let failed = s.log.dropped().unwrap();
        assert_eq!(failed.len(), 1);
        s.log.fail_deletes(false);
        s.purge(2_000, 7_000, 0, &mut Default::default()).unwrap();
        assert_eq!(s.log.dropped().unwrap(), Vec::<u64>::new());
        assert!(!crate::wal::path(s.log.dir(), failed[0]).exists());
    }

    /// Regression (soak): the window passing while the purged events' log file is still
    /// there left them with nothing in sled, and dropping the file then took them for kept
    /// ones and copied their whole records (payloads retention had purged) into sled.
    #[tokio::test]
    async fn the_window_waits_for_the_log_file_and_purged_payloads_stay_purged() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::test_store(dir.path(), 200, None);
        for i in 0..12 {
            s.append(vec![ev(&format!("w{i}"))]).await.unwrap();
        }
        s.flush_index();
        let batch = s.pending_events_except(12, &Default::default()).unwrap();
        let done: Vec<_> = batch.events.iter().map(|e| (e, vec![], vec![])).collect();
        s.complete(&done, &[], batch.through).unwrap();
        // Purged, then the window passes before any file is dropped.
        let mut recheck = Default::default();
        for i in 0..12u64 {
            s.purge_one_for_test(i);
        }
        assert_eq!(s.events.len(), 12);
        let (dropped, next) = s.forget(2_000, 0).unwrap();
        assert_eq!(
            (dropped, next),
            (0, 0),
            "still in the log: kept until the file goes"
        );
        // Now the files go: nothing is moved (all purged), and then the metadata can go.
        let p = s.purge(2_000, 5_000, 0, &mut recheck).unwrap();
        assert_eq!(p.kept, 0);
        for e in s.events.iter().values() {
            let e = crate::inbox::decode(&e.unwrap()).unwrap();
            assert!(e.payload.is_empty(), "a purged payload came back");
        }
        let (dropped, _) = s.forget(2_000, 0).unwrap();
        // Those of a file still being written (if the last one is not sealed yet) stay until
        // it is sealed and dropped.
        assert!(dropped > 0, "{dropped}");
        for e in s.events.iter().values() {
            let e = crate::inbox::decode(&e.unwrap()).unwrap();
            assert!(e.payload.is_empty(), "a purged payload came back");
        }
    }
}
