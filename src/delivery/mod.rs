//! (6) Delivery: claim due jobs from the outbox, send them through their sink within its
//! limits, record the outcome. The outbox is the only retry state: a failed attempt writes
//! its next due time and returns; no task sleeps holding a delivery, and a restart loses
//! nothing.
//!
//! One dispatcher claims jobs (a lease written, made durable before a request whose
//! duplicate could not be recognised goes out), one task per attempt sends, one recorder
//! writes outcomes in batches with one flush (group commit).

pub mod breaker;
pub mod schedule;

use crate::app::{Runtime, SinkRuntime};
use crate::outbox::{AttemptLog, Job, JobKind, JobState, ATTEMPTS_KEPT};
use crate::sink::{Outcome, Sent, SinkClient};
use crate::store::Store;
use breaker::{Breaker, Signal};
use governor::{Quota, RateLimiter};
use schedule::Schedule;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Jobs claimed per sink per round at most.
const CLAIM_BATCH: usize = 256;
/// Longest sleep of an idle dispatcher.
const IDLE: Duration = Duration::from_secs(1);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// When to give up on a job.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub schedule: Schedule,
    pub max_attempts: u32,
    pub max_age: Duration,
}

/// One sink's client, limits and breaker.
pub struct Lane {
    /// The sink definition it was built from (`SinkRuntime::fingerprint`).
    fingerprint: [u8; 32],
    pub client: SinkClient,
    limiter: governor::DefaultDirectRateLimiter,
    permits: Arc<Semaphore>,
    pub concurrency: usize,
    pub breaker: Mutex<Breaker>,
    pub policy: Policy,
    lease: Duration,
    /// Unix ms before which nothing is sent (the vendor asked the whole sink to wait).
    paused_until: std::sync::atomic::AtomicU64,
}

impl Lane {
    pub fn build(s: &SinkRuntime) -> Result<Lane, String> {
        let def = &s.def;
        let rate = s
            .rate
            .or_else(|| {
                def.limits
                    .rate
                    .as_deref()
                    .and_then(crate::config::parse_rate)
            })
            .unwrap_or(100.0);
        let burst = def
            .limits
            .burst
            .unwrap_or_else(|| rate.ceil().clamp(1.0, 10_000.0) as u32)
            .max(1);
        let period = Duration::from_secs_f64(1.0 / rate.max(1e-6));
        let quota = Quota::with_period(period)
            .ok_or("rate too high")?
            .allow_burst(NonZeroU32::new(burst).expect("burst >= 1"));
        let concurrency = s.concurrency.unwrap_or(def.limits.concurrency).max(1);
        let retry = &def.retry;
        Ok(Lane {
            fingerprint: s.fingerprint(),
            client: s.client()?,
            limiter: RateLimiter::direct(quota),
            permits: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            breaker: Mutex::new(Breaker::new(
                retry.breaker_failures,
                retry.breaker_cooldown.0,
            )),
            policy: Policy {
                schedule: Schedule {
                    initial: retry.initial.0,
                    max_delay: retry.max_delay.0,
                    max_retry_after: retry.max_retry_after.0,
                },
                max_attempts: s.max_attempts.unwrap_or(retry.max_attempts),
                max_age: s.max_age.unwrap_or(retry.max_age.0),
            },
            lease: def.limits.lease.0.max(s.timeout() + Duration::from_secs(5)),
            paused_until: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Its lease is written and flushed before the request goes out: a duplicate could not
    /// be recognised by the vendor, or it must be looked up after a crash.
    pub fn guarded(&self, job: &Job) -> bool {
        job.kind == JobKind::Send
            && self
                .client
                .action(&job.action)
                .is_none_or(|a| !a.idempotent || a.reconcile.is_some())
    }

    pub fn pause(&self, until_ms: u64) {
        self.paused_until
            .fetch_max(until_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the sink may send again, if it may not now (paused, or the breaker is open).
    pub fn blocked_until(&self, now_ms: u64) -> Option<u64> {
        let paused = self.paused_until.load(std::sync::atomic::Ordering::Relaxed);
        let open = self
            .breaker
            .lock()
            .expect("breaker lock")
            .blocked_until()
            .unwrap_or(0);
        let until = paused.max(open);
        (until > now_ms).then_some(until)
    }

    /// Until when the vendor asked the whole sink to wait, if that is still ahead.
    pub fn paused_until(&self, now_ms: u64) -> Option<u64> {
        let p = self.paused_until.load(std::sync::atomic::Ordering::Relaxed);
        (p > now_ms).then_some(p)
    }

    pub fn in_flight(&self) -> usize {
        self.concurrency - self.permits.available_permits()
    }

    /// Admits one request outside the dispatcher (a pipeline's lookup) under the same
    /// limits as deliveries: the sink's rate, its concurrency, and a pause the vendor asked
    /// for (`Err(until_ms)`). The permit is held until the request is done.
    pub async fn admit(&self, now_ms: u64) -> Result<tokio::sync::OwnedSemaphorePermit, u64> {
        if let Some(until) = self.paused_until(now_ms) {
            return Err(until);
        }
        self.limiter.until_ready().await;
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| now_ms)
    }
}

/// What the breaker learns from an attempt.
fn signal(sent: &Sent) -> Signal {
    match &sent.outcome {
        // Credentials refused: every job would fail the same way.
        Outcome::Reject { .. } if matches!(sent.status, Some(401 | 403)) => Signal::Failing,
        // Refused here (catalog, render, unknown outcome): the vendor was not asked.
        Outcome::Reject { .. } if sent.status.is_none() => Signal::Neutral,
        Outcome::Delivered { .. } | Outcome::Reject { .. } => Signal::Healthy,
        Outcome::Retry { .. } if matches!(sent.status, Some(429)) => Signal::Neutral,
        Outcome::Retry { .. } if sent.status.is_some_and(|s| s < 500) => Signal::Neutral,
        Outcome::Retry { .. } => Signal::Failing,
    }
}

/// The job after an attempt: delivered, due again, or dead. `unit` is a uniform sample in
/// [0, 1) for the jitter.
pub fn settle(job: &Job, sent: &Sent, policy: &Policy, now_ms: u64, unit: f64) -> Job {
    let mut j = job.clone();
    record_attempt(&mut j, sent, now_ms);
    match &sent.outcome {
        Outcome::Delivered { vendor_id } => {
            j.state = JobState::Delivered;
            j.vendor_id = vendor_id.clone().or(j.vendor_id);
            j.uncertain = false;
            j.reason = None;
            j.finished_at_ms = Some(now_ms);
        }
        Outcome::Reject { reason } => {
            j.state = JobState::Dead;
            j.reason = Some(reason.clone());
            j.finished_at_ms = Some(now_ms);
        }
        Outcome::Retry {
            after,
            reason,
            uncertain,
        } => {
            j.uncertain |= *uncertain;
            // A 429 says "not now", nothing about the job: it costs no attempt. Nor does a
            // wait the vendor asks of the whole sink (a quota used up, an account out of
            // funds): the job is not what fails, so it neither dies of attempts nor of age
            // meanwhile (the sink is paused and the alarm is up until someone acts).
            let held = sink_wide_wait(sent).is_some();
            if sent.status == Some(429) || held {
                j.attempts = j.attempts.saturating_sub(1);
            }
            let age = Duration::from_millis(now_ms.saturating_sub(j.created_at_ms));
            if !held && j.attempts >= policy.max_attempts {
                j.state = JobState::Dead;
                j.reason = Some(format!("gave up after {} attempts: {reason}", j.attempts));
                j.finished_at_ms = Some(now_ms);
            } else if !held && age >= policy.max_age {
                j.state = JobState::Dead;
                j.reason = Some(format!(
                    "older than max_age ({}): {reason}",
                    humantime::format_duration(policy.max_age)
                ));
                j.finished_at_ms = Some(now_ms);
            } else {
                let wait = policy.schedule.delay(j.attempts, *after, unit);
                j.state = JobState::Pending;
                j.next_at_ms = now_ms + wait.as_millis() as u64;
                j.reason = Some(reason.clone());
            }
        }
    }
    j
}

/// Appends one attempt to the job's log (keeping the latest `ATTEMPTS_KEPT`).
fn record_attempt(j: &mut Job, sent: &Sent, now_ms: u64) {
    j.log.push(AttemptLog {
        at_ms: now_ms.saturating_sub(sent.latency.as_millis() as u64),
        latency_ms: sent.latency.as_millis() as u64,
        status: sent.status,
        outcome: sent.outcome.label().to_string(),
        reason: match &sent.outcome {
            Outcome::Retry { reason, .. } | Outcome::Reject { reason } => Some(reason.clone()),
            Outcome::Delivered { .. } => None,
        },
        excerpt: sent.excerpt.clone(),
        reconciled: sent.reconciled,
    });
    if j.log.len() > ATTEMPTS_KEPT {
        let extra = j.log.len() - ATTEMPTS_KEPT;
        j.log.drain(..extra);
    }
}

/// The job after a status poll: done (the event is emitted by the recorder), or polled again
/// later (the wait doubles from `every`, up to 10 minutes), or dead after `give_up`.
pub fn settle_track(
    job: &Job,
    sent: &Sent,
    t: &crate::connector::sink::TrackDef,
    now_ms: u64,
) -> Job {
    let mut j = job.clone();
    record_attempt(&mut j, sent, now_ms);
    match &sent.outcome {
        Outcome::Delivered { .. } => {
            j.state = JobState::Delivered;
            j.reason = None;
            j.finished_at_ms = Some(now_ms);
        }
        Outcome::Reject { reason } => {
            j.state = JobState::Dead;
            j.reason = Some(reason.clone());
            j.finished_at_ms = Some(now_ms);
        }
        Outcome::Retry { reason, .. } => {
            if now_ms.saturating_sub(j.created_at_ms) >= t.give_up.0.as_millis() as u64 {
                j.state = JobState::Dead;
                j.reason = Some(format!(
                    "not final after {}: {reason}",
                    humantime::format_duration(t.give_up.0)
                ));
                j.finished_at_ms = Some(now_ms);
            } else {
                let wait = t
                    .every
                    .0
                    .saturating_mul(1 << j.attempts.saturating_sub(1).min(16))
                    .min(Duration::from_secs(600));
                j.state = JobState::Pending;
                j.next_at_ms = now_ms + wait.as_millis() as u64;
                j.reason = Some(reason.clone());
            }
        }
    }
    j
}

/// The internal event announcing that what `job` created reached a final state.
fn internal_event(
    lane: &Lane,
    job: &Job,
    t: &crate::connector::sink::TrackDef,
    answer: Option<&serde_json::Value>,
    now_ms: u64,
) -> Option<crate::inbox::NewEvent> {
    let answer = answer?;
    let status = answer.pointer(&t.status)?.as_str()?.to_string();
    let event_type = if t.done.contains(&status) {
        t.emit.done.clone()
    } else {
        t.emit.failed.clone()
    };
    let vendor_id = job.vendor_id.clone().unwrap_or_default();
    let payload = serde_json::json!({
        "vendor_id": vendor_id,
        "status": status,
        "answer": answer,
        "job": {"key": job.key.trim_end_matches(".track"), "event_id": job.event_id, "pipeline": job.pipeline, "with": job.with},
    });
    Some(crate::inbox::NewEvent {
        source: lane.client.name.clone(),
        connector: lane.client.connector.clone(),
        vendor_id: format!("{vendor_id}:{event_type}"),
        event_type,
        event_time: None,
        received_at_ms: now_ms,
        headers: Vec::new(),
        payload: bytes::Bytes::from(serde_json::to_vec(&payload).unwrap_or_default()),
    })
}

/// An attempt that finished, on its way to the recorder.
struct Done {
    lane: Arc<Lane>,
    /// The job as the store holds it.
    stored: Job,
    /// The job as claimed (attempt counted).
    job: Job,
    sent: Sent,
}

/// Lanes for one runtime: the lane of a sink whose definition did not change is kept (its
/// limiter, breaker, pause, token cache and in-flight permits carry over a reload).
fn lanes(rt: &Runtime, old: &HashMap<String, Arc<Lane>>) -> HashMap<String, Arc<Lane>> {
    let mut out = HashMap::new();
    for s in rt.sinks.values() {
        if let Some(kept) = old
            .get(&s.name)
            .filter(|l| l.fingerprint == s.fingerprint())
        {
            out.insert(s.name.clone(), kept.clone());
            continue;
        }
        match Lane::build(s) {
            Ok(l) => {
                out.insert(s.name.clone(), Arc::new(l));
            }
            Err(e) => {
                tracing::error!(sink = %s.name, error = %e, "sink cannot be built; its jobs wait")
            }
        }
    }
    out
}

/// Shared view of the delivery engine (health, status, the admin API).
#[derive(Clone, Default)]
pub struct Lanes {
    pub sinks: Arc<Mutex<HashMap<String, Arc<Lane>>>>,
    /// Keys of the jobs being attempted right now (their in-process lease).
    pub busy: Arc<Mutex<HashSet<String>>>,
}

impl Lanes {
    pub fn is_busy(&self, key: &str) -> bool {
        self.busy.lock().expect("busy lock").contains(key)
    }
}

/// Runs the delivery engine until `shutdown`; then lets in-flight attempts finish and
/// records them. `wake` is notified when new jobs are written.
pub async fn run(
    store: Store,
    runtime: impl Fn() -> Arc<Runtime> + Send + 'static,
    wake: Arc<Notify>,
    inbox_wake: Option<Arc<Notify>>,
    shared: Lanes,
    shutdown: CancellationToken,
) {
    let mut current_rt = runtime();
    let mut lanes_by_sink = lanes(&current_rt, &HashMap::new());
    *shared.sinks.lock().expect("lanes lock") = lanes_by_sink.clone();
    let busy = shared.busy.clone();
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    let recorder = tokio::spawn(record(
        store.clone(),
        done_rx,
        busy.clone(),
        wake.clone(),
        inbox_wake,
    ));
    let attempts = TaskTracker::new();
    // Nothing is claimed before the jobs a dead process left in flight are marked uncertain.
    let mut delay = Duration::from_millis(100);
    while let Err(e) = recover(&store).await {
        tracing::error!(error = %e, "recovering in-flight jobs failed; retrying before any delivery");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let rt = runtime();
        if !Arc::ptr_eq(&rt, &current_rt) {
            current_rt = rt;
            lanes_by_sink = lanes(&current_rt, &lanes_by_sink);
            *shared.sinks.lock().expect("lanes lock") = lanes_by_sink.clone();
        }
        let now = now_ms();
        for (name, lane) in &lanes_by_sink {
            let open = lane.breaker.lock().expect("breaker lock").label() != "closed";
            metrics::gauge!("perkflow_circuit_open", "sink" => name.clone()).set(if open {
                1.0
            } else {
                0.0
            });
            metrics::gauge!("perkflow_deliveries_in_flight", "sink" => name.clone())
                .set(lane.in_flight() as f64);
            metrics::gauge!("perkflow_sink_paused", "sink" => name.clone()).set(
                if lane.paused_until(now).is_some() {
                    1.0
                } else {
                    0.0
                },
            );
        }
        let mut next_wake = now + IDLE.as_millis() as u64;
        let mut claims: Vec<Claim> = Vec::new();
        let busy_now = busy.lock().expect("busy lock").clone();
        for (name, lane) in &lanes_by_sink {
            let free = lane.permits.available_permits().min(CLAIM_BATCH);
            if free == 0 {
                continue;
            }
            if let Some(until) = lane.blocked_until(now) {
                next_wake = next_wake.min(until);
                continue;
            }
            let (jobs, next) = match store.due_jobs(name, now, free, &busy_now) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(sink = %name, error = %e, "reading due jobs failed; retrying shortly");
                    continue;
                }
            };
            if let Some(n) = next {
                next_wake = next_wake.min(n);
            }
            for job in jobs {
                if let Err(not_until) = lane.limiter.check() {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ));
                    next_wake = next_wake.min(now + wait.as_millis() as u64 + 1);
                    metrics::counter!("perkflow_delivery_rate_limited_total", "sink" => name.clone())
                        .increment(1);
                    break;
                }
                let probe = match lane.breaker.lock().expect("breaker lock").admit(now) {
                    breaker::Admit::No => break,
                    breaker::Admit::Yes => false,
                    breaker::Admit::Probe => true,
                };
                let Ok(permit) = lane.permits.clone().try_acquire_owned() else {
                    if probe {
                        lane.breaker.lock().expect("breaker lock").release_probe();
                    }
                    break;
                };
                let mut claimed = job.clone();
                // Claimed again after its lease ran out (a flush failed, or recovery could
                // not run): its last attempt's outcome is unknown.
                if job.state == JobState::InFlight {
                    claimed.uncertain = true;
                }
                claimed.state = JobState::InFlight;
                claimed.attempts += 1;
                claimed.next_at_ms = now + lane.lease.as_millis() as u64;
                let guarded = lane.guarded(&job);
                claims.push(Claim {
                    lane: lane.clone(),
                    stored: job,
                    claimed,
                    permit,
                    probe,
                    guarded,
                });
            }
        }
        if claims.is_empty() {
            let wait = Duration::from_millis(next_wake.saturating_sub(now_ms()).max(1));
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        {
            let mut b = busy.lock().expect("busy lock");
            for c in &claims {
                b.insert(c.stored.key.clone());
            }
        }
        // An idempotent action needs no stored lease: in this process the busy set is its
        // lease, and after a crash it is simply due again (a resend with the same key is
        // harmless), so its claim costs no write and it starts at once. Any other action
        // gets a lease written and made durable before its request goes out, so that after a
        // crash its outcome is known to be unknown.
        let (guarded, free): (Vec<Claim>, Vec<Claim>) = claims.into_iter().partition(|c| c.guarded);
        for c in free {
            start_attempt(&attempts, c, &done_tx);
        }
        if guarded.is_empty() {
            continue;
        }
        // The leases are written and flushed in a task of their own: a slow disk holds back
        // these attempts only, never the dispatcher or the other sinks.
        let (s, busy2, tracker, tx, wake2) = (
            store.clone(),
            busy.clone(),
            attempts.clone(),
            done_tx.clone(),
            wake.clone(),
        );
        attempts.spawn(async move {
            let changes: Vec<(Job, Job)> = guarded
                .iter()
                .map(|c| (c.stored.clone(), c.claimed.clone()))
                .collect();
            let written = tokio::task::spawn_blocking(move || {
                let skipped = s.write_jobs(&changes)?;
                s.flush_jobs()?;
                Ok::<Vec<String>, crate::store::StoreError>(skipped)
            })
            .await;
            let skipped: Vec<String> = match written {
                Ok(Ok(skipped)) => skipped,
                other => {
                    tracing::warn!(error = ?other, "claiming jobs failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let keys: Vec<String> = guarded.iter().map(|c| c.stored.key.clone()).collect();
                    release(&busy2, guarded, &keys);
                    wake2.notify_one();
                    return;
                }
            };
            let (lost, won): (Vec<Claim>, Vec<Claim>) = guarded
                .into_iter()
                .partition(|c| skipped.contains(&c.stored.key));
            if !lost.is_empty() {
                // Changed by an operator between the read and the claim: not sent; read again.
                let keys: Vec<String> = lost.iter().map(|c| c.stored.key.clone()).collect();
                release(&busy2, lost, &keys);
                wake2.notify_one();
            }
            for mut c in won {
                c.claimed.version = c.stored.version + 1;
                c.stored = c.claimed.clone();
                start_attempt(&tracker, c, &tx);
            }
        });
    }
    // Let in-flight attempts finish (each is bounded by its lease) and record them.
    attempts.close();
    attempts.wait().await;
    drop(done_tx);
    let _ = recorder.await;
}

/// A job claimed for one attempt.
struct Claim {
    lane: Arc<Lane>,
    /// The job as the store holds it.
    stored: Job,
    claimed: Job,
    permit: OwnedSemaphorePermit,
    /// This attempt is the breaker's half-open probe.
    probe: bool,
    /// Its lease is written and flushed before it is sent.
    guarded: bool,
}

/// Gives claims back unsent: busy marks, permits, probe slots.
fn release(busy: &Mutex<HashSet<String>>, claims: Vec<Claim>, keys: &[String]) {
    {
        let mut b = busy.lock().expect("busy lock");
        for k in keys {
            b.remove(k);
        }
    }
    for c in claims {
        if c.probe {
            c.lane.breaker.lock().expect("breaker lock").release_probe();
        }
    }
}

/// Runs one attempt in its own task, bounded by the lease, and hands the result to the
/// recorder (a panic becomes a retry, never a job stuck in flight).
fn start_attempt(tracker: &TaskTracker, c: Claim, done: &mpsc::UnboundedSender<Done>) {
    let tx = done.clone();
    tracker.spawn(async move {
        let Claim {
            lane,
            stored,
            claimed,
            permit,
            ..
        } = c;
        let limit = lane.lease.saturating_sub(Duration::from_secs(2));
        let (l, j) = (lane.clone(), claimed.clone());
        let work = tokio::spawn(async move {
            match j.kind {
                JobKind::Track => {
                    l.client
                        .track(&j.action, &j.key, &j.event_id, j.vendor_id.as_deref().unwrap_or_default())
                        .await
                }
                JobKind::Send => {
                    l.client
                        .attempt(&j.action, &j.with, &j.key, &j.event_id, j.attempts, j.uncertain)
                        .await
                }
            }
        });
        let abort = work.abort_handle();
        let sent = match tokio::time::timeout(limit, work).await {
            Ok(Ok(sent)) => sent,
            Ok(Err(e)) => Sent::failed(format!("internal error during the attempt: {e}"), true),
            Err(_) => {
                abort.abort();
                Sent::failed(format!("the attempt took longer than its lease allows ({limit:?})"), true)
            }
        };
        lane.breaker
            .lock()
            .expect("breaker lock")
            .record(signal(&sent), now_ms());
        let name = lane.client.name.clone();
        if let Some(after) = sink_wide_wait(&sent) {
            lane.pause(now_ms() + after.as_millis() as u64);
            let status = sent.status.map(|s| s.to_string()).unwrap_or_default();
            metrics::counter!("perkflow_sink_paused_total", "sink" => name.clone(), "status" => status)
                .increment(1);
            // At once, not at the dispatcher's next round (which clears it when the pause ends).
            metrics::gauge!("perkflow_sink_paused", "sink" => name.clone()).set(1.0);
            let reason = match &sent.outcome {
                Outcome::Retry { reason, .. } => reason.as_str(),
                _ => "",
            };
            if sent.status == Some(429) {
                tracing::warn!(sink = %name, pause_s = after.as_secs(), %reason, "the vendor rate-limits this sink: its deliveries wait");
            } else {
                // Not a passing rate limit (a quota used up, an account out of funds): someone
                // has to act; the deliveries wait and are retried slowly meanwhile.
                tracing::error!(sink = %name, pause_s = after.as_secs(), %reason, "the vendor refuses this sink's deliveries for now: its deliveries are paused and retried slowly");
            }
        }
        metrics::counter!("perkflow_deliveries_total", "sink" => name.clone(), "outcome" => sent.outcome.label())
            .increment(1);
        metrics::histogram!("perkflow_delivery_duration_seconds", "sink" => name)
            .record(sent.latency.as_secs_f64());
        drop(permit);
        let _ = tx.send(Done {
            lane,
            stored,
            job: claimed,
            sent,
        });
    });
}

/// A wait the vendor asked of the whole sink (429 with Retry-After, a slow rule): no other
/// job of the sink is sent before it ends.
fn sink_wide_wait(sent: &Sent) -> Option<Duration> {
    match &sent.outcome {
        Outcome::Retry { after: Some(a), .. }
            if sent.status == Some(429) || sent.status == Some(422) || a.as_secs() >= 60 =>
        {
            Some((*a).min(Duration::from_secs(3600)))
        }
        _ => None,
    }
}

/// Jobs a previous process left in flight: their outcome is unknown. They are due now and
/// marked uncertain, so the next attempt reconciles (or resends only if idempotent).
async fn recover(store: &Store) -> Result<(), String> {
    let s = store.clone();
    let done = tokio::task::spawn_blocking(move || {
        let leased = s.leased_jobs()?;
        let now = now_ms();
        let changes: Vec<(Job, Job)> = leased
            .into_iter()
            .map(|j| {
                let mut after = j.clone();
                after.state = JobState::Pending;
                after.uncertain = true;
                after.next_at_ms = now;
                after.reason = Some("the daemon stopped during an attempt: outcome unknown".into());
                (j, after)
            })
            .collect();
        let n = changes.len();
        if n > 0 {
            s.write_jobs(&changes)?;
            s.flush_jobs()?;
        }
        Ok::<usize, crate::store::StoreError>(n)
    })
    .await;
    match done {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(n)) => {
            tracing::warn!(
                jobs = n,
                "jobs were in flight when the daemon stopped; each is reconciled before any resend"
            );
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes outcomes in batches, one flush per batch; frees the jobs for the dispatcher.
async fn record(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Done>,
    busy: Arc<Mutex<HashSet<String>>>,
    wake: Arc<Notify>,
    inbox_wake: Option<Arc<Notify>>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let now = now_ms();
        let mut changes: Vec<(Job, Job)> = Vec::with_capacity(batch.len());
        let mut emitted = Vec::new();
        let mut kept = Vec::new();
        for d in &batch {
            let track = d
                .lane
                .client
                .action(&d.job.action)
                .and_then(|a| a.track.clone());
            let mut after = match (&track, d.job.kind) {
                (Some(t), JobKind::Track) => settle_track(&d.job, &d.sent, t, now),
                _ => settle(&d.job, &d.sent, &d.lane.policy, now, rand::random::<f64>()),
            };
            log_outcome(&d.lane, &after, &d.sent);
            // What the action created is followed to a final state, then announced.
            if let (Some(t), JobState::Delivered) = (&track, after.state) {
                let status = d
                    .sent
                    .answer
                    .as_ref()
                    .and_then(|a| a.pointer(&t.status))
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string);
                let final_now = status
                    .as_ref()
                    .filter(|s| t.done.contains(s) || t.failed.contains(s));
                match (d.job.kind, final_now, &after.vendor_id) {
                    (JobKind::Track, _, _) | (JobKind::Send, Some(_), _) => {
                        if let Some(ev) =
                            internal_event(&d.lane, &after, t, d.sent.answer.as_ref(), now)
                        {
                            emitted.push(ev);
                        }
                    }
                    (JobKind::Send, None, Some(vendor_id)) => {
                        let follow = after.tracking(vendor_id, now + t.every.0.as_millis() as u64);
                        let mut phantom = follow.clone();
                        phantom.state = JobState::Dropped;
                        changes.push((phantom, follow));
                    }
                    (JobKind::Send, None, None) => {}
                }
            }
            // A value of the answer kept on a member (a booking's promo code).
            if let (Some(k), JobState::Delivered, JobKind::Send) =
                (&d.job.keep, after.state, d.job.kind)
            {
                match d.sent.answer.as_ref().and_then(|a| a.pointer(&k.pointer)) {
                    Some(v) if !v.is_null() => kept.push((k.clone(), v.clone(), after.clone())),
                    _ => {
                        // Delivered (the vendor did it), but what was to be kept is not in
                        // the answer: said on the job, where operators look.
                        after.reason = Some(format!(
                            "delivered, but the answer has nothing at {} to keep as `{}`",
                            k.pointer, k.attribute
                        ));
                        tracing::warn!(sink = %d.lane.client.name, job = %after.key, pointer = %k.pointer, "the answer has nothing to keep at this pointer")
                    }
                }
            }
            changes.push((d.stored.clone(), after));
        }
        if !kept.is_empty() {
            emitted.extend(keep_on_members(&store, kept, now).await);
        }
        // The internal events are stored (durably, de-duplicated on the vendor's id and
        // status) before the jobs that announce them are marked done: a crash in between
        // announces again, which the inbox turns into a duplicate.
        if !emitted.is_empty() {
            use crate::inbox::Inbox;
            let mut delay = Duration::from_millis(100);
            loop {
                match store.append(emitted.clone()).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "storing internal events failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
            if let Some(w) = &inbox_wake {
                w.notify_one();
            }
        }
        // Outcomes of idempotent actions are made durable by the next checkpoint (losing one
        // to a crash means one harmless resend with the same key); any other outcome is
        // flushed now, or a crash would turn a delivered message into an "unknown outcome".
        let flush = batch.iter().any(|d| {
            d.lane
                .client
                .action(&d.job.action)
                .is_none_or(|a| !a.idempotent || a.reconcile.is_some())
        });
        let mut delay = Duration::from_millis(100);
        loop {
            let s = store.clone();
            let c = changes.clone();
            let written = tokio::task::spawn_blocking(move || {
                let skipped = s.write_jobs(&c)?;
                if flush {
                    s.flush_jobs()?;
                }
                Ok::<Vec<String>, crate::store::StoreError>(skipped)
            })
            .await;
            match written {
                Ok(Ok(skipped)) => {
                    for key in skipped {
                        // Cancelled (its order refunded) while its request was out, and
                        // delivered anyway: what the vendor did wins.
                        let delivered = changes
                            .iter()
                            .find(|(_, a)| a.key == key && a.state == JobState::Delivered);
                        let current = store.job(&key).ok().flatten();
                        if let (Some((_, after)), Some(cur)) = (delivered, current) {
                            if cur.state == JobState::Cancelled {
                                let mut after = after.clone();
                                after.reason = Some(
                                    "delivered: the request was out when the cancellation came"
                                        .into(),
                                );
                                let s = store.clone();
                                let _ = tokio::task::spawn_blocking(move || {
                                    s.write_jobs(&[(cur, after)])
                                })
                                .await;
                                tracing::warn!(job = %key, "a cancelled job had been sent already: recorded as delivered");
                                continue;
                            }
                        }
                        tracing::info!(job = %key, "the job changed while it was attempted (an operator replayed it); the newer state wins");
                    }
                    break;
                }
                other => {
                    tracing::error!(result = ?other, "recording delivery outcomes failed; retrying (the jobs stay claimed)");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        {
            let mut b = busy.lock().expect("busy lock");
            for (j, _) in &changes {
                b.remove(&j.key);
            }
        }
        wake.notify_one();
    }
}

fn log_outcome(lane: &Lane, job: &Job, sent: &Sent) {
    let sink = &lane.client.name;
    // The event's personal data stays out of logs and health (a vendor's reason may quote
    // the phone number it refused).
    let personal = crate::redact::Values::listed(job.sensitive.clone());
    report_health(sink, sent, &personal);
    let reason = job
        .reason
        .as_deref()
        .map(|r| personal.text(r))
        .unwrap_or_default();
    match job.state {
        JobState::Dead => {
            metrics::counter!("perkflow_dead_letters_total", "sink" => sink.clone()).increment(1);
            tracing::error!(%sink, job = %job.key, event = %job.event_id, attempts = job.attempts, %reason, "dead-lettered: replay it once the cause is fixed");
        }
        JobState::Pending => {
            tracing::warn!(%sink, job = %job.key, attempts = job.attempts, due_in_ms = job.next_at_ms.saturating_sub(now_ms()), %reason, "delivery failed; retry scheduled")
        }
        _ => {
            tracing::debug!(%sink, job = %job.key, latency_ms = sent.latency.as_millis() as u64, "delivered")
        }
    }
}

/// Stores kept values on their members (before the jobs are marked delivered: a crash in
/// between delivers again or reconciles, and stores again), and returns the
/// `loyalty.attribute_stored` events to emit.
async fn keep_on_members(
    store: &Store,
    kept: Vec<(crate::outbox::Keep, serde_json::Value, Job)>,
    now: u64,
) -> Vec<crate::inbox::NewEvent> {
    let s = store.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        for (k, value, job) in kept {
            let mut profile = crate::ledger::Profile::default();
            profile.attributes.insert(k.attribute.clone(), value.clone());
            match s.set_profile(&k.member, profile) {
                Ok(m) => {
                    let payload = serde_json::json!({
                        "member": m.id, "attribute": k.attribute, "value": value,
                        "sink": job.sink, "action": job.action, "job": job.key,
                        "email": m.profile.email, "phone": m.profile.phone,
                    });
                    events.push(crate::inbox::NewEvent {
                        source: crate::ledger::SOURCE.into(),
                        connector: crate::ledger::SOURCE.into(),
                        vendor_id: format!("{}:kept:{}", job.key, k.attribute),
                        event_type: crate::ledger::ATTRIBUTE_STORED.into(),
                        event_time: None,
                        received_at_ms: now,
                        headers: Vec::new(),
                        payload: bytes::Bytes::from(serde_json::to_vec(&payload).unwrap_or_default()),
                    });
                }
                Err(e) => tracing::error!(member = %k.member, attribute = %k.attribute, job = %job.key, error = %e, "storing a delivered answer on the member failed; the vendor has it (do not replay: that would create another)"),
            }
        }
        events
    })
    .await;
    result.unwrap_or_default()
}

/// Tells connector health how an attempt (or a lookup) went, `personal` data masked.
pub fn report_health(sink: &str, sent: &Sent, personal: &crate::redact::Values) {
    let health = crate::ops::connectors::registry();
    let kind = crate::ops::connectors::Kind::Sink;
    let now = now_ms();
    match &sent.outcome {
        Outcome::Delivered { .. } => health.ok(kind, sink, now),
        Outcome::Retry { reason, .. } | Outcome::Reject { reason } => {
            let status = sent
                .status
                .filter(|_| !reason.starts_with("HTTP "))
                .map(|s| format!("HTTP {s}: "))
                .unwrap_or_default();
            let credentials = matches!(sent.outcome, Outcome::Reject { .. })
                && matches!(sent.status, Some(401 | 403));
            let why = personal.text(&format!("{status}{reason}"));
            health.failed(kind, sink, now, &why, credentials);
        }
    }
}

#[cfg(test)]
mod tests;
