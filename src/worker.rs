//! The pipeline worker: takes stored events from the inbox, runs every pipeline subscribed
//! to their source and type, and writes the resulting jobs to the outbox together with the
//! mark that the event is processed (`Store::complete`: ordered, idempotent writes, so that
//! a crash at any point neither loses nor duplicates a job).

use crate::app::Runtime;
use crate::inbox::StoredEvent;
use crate::outbox::Job;
use crate::pipeline::expr::Engine;
use crate::pipeline::run::{run, EventInput, Outcome};
use crate::store::Store;
use serde_json::{Map, Value as Json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const BATCH: usize = 64;
const IDLE_POLL: Duration = Duration::from_millis(500);

/// The run input for a stored event.
pub fn input(ev: &StoredEvent) -> EventInput {
    let headers: Map<String, Json> = ev
        .meta
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Json::String(v.clone())))
        .collect();
    EventInput {
        source: ev.meta.source.clone(),
        event_type: ev.meta.event_type.clone(),
        event_id: ev.meta.vendor_id.clone(),
        headers,
        event: serde_json::from_slice(&ev.payload).unwrap_or(Json::Null),
    }
}

/// How many times a run whose lookup keeps failing (timeouts, 5xx, 429) is tried before it
/// fails for good, and the waits in between (2 s doubling to 10 min, jittered: about 40 min
/// in all).
const LOOKUP_TRIES: u32 = 12;
const LOOKUP_SCHEDULE: crate::delivery::schedule::Schedule = crate::delivery::schedule::Schedule {
    initial: Duration::from_secs(2),
    max_delay: Duration::from_secs(600),
    max_retry_after: Duration::from_secs(600),
};

/// What `process` did with a batch.
#[derive(Debug, Default)]
pub struct Processed {
    pub jobs: usize,
    /// Events left pending because a lookup failed for now, with the reason.
    pub deferred: Vec<(u64, String)>,
}

/// Runs the subscribed pipelines on a batch of events and completes them in the store in
/// one transaction. An event whose run was deferred (a lookup failed for now) is left
/// pending, whole. `last_try`: events whose deferrable failures now fail their runs.
pub fn process(
    store: &Store,
    runtime: &Arc<Runtime>,
    engine: &Engine,
    lookups: &crate::lookups::Clients,
    batch: &[StoredEvent],
    through: Option<u64>,
    last_try: &HashSet<u64>,
) -> Result<Processed, crate::store::StoreError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let handle = tokio::runtime::Handle::current();
    let mut done = Vec::with_capacity(batch.len());
    let mut out = Processed::default();
    'events: for ev in batch {
        let mut runs = Vec::new();
        let mut jobs = Vec::new();
        let subscribed: Vec<_> = runtime
            .listeners(&ev.meta.source, &ev.meta.event_type)
            .collect();
        let personal = runtime.personal_data(ev);
        if !subscribed.is_empty() {
            let input = input(ev);
            let id = crate::inbox::parse_id(&ev.meta.id).unwrap_or_default();
            let live = crate::lookups::Live {
                store,
                runtime,
                clients: lookups,
                handle: handle.clone(),
                last_try: last_try.contains(&id),
            };
            for p in subscribed {
                let r = run(p, engine, &input, &live);
                let outcome = match &r.outcome {
                    Outcome::Completed => "completed",
                    Outcome::Filtered { .. } => "filtered",
                    Outcome::Failed { .. } => "failed",
                    Outcome::Deferred { .. } => "deferred",
                };
                metrics::counter!("perkflow_pipeline_runs_total", "pipeline" => p.name.clone(), "outcome" => outcome)
                    .increment(1);
                match &r.outcome {
                    Outcome::Failed { error, .. } => {
                        let error = personal.text(error);
                        tracing::warn!(event = %ev.meta.id, pipeline = %p.name, %error, "pipeline run failed; the event is kept with its trace")
                    }
                    Outcome::Deferred { reason, .. } => {
                        let reason = personal.text(reason);
                        tracing::info!(event = %ev.meta.id, pipeline = %p.name, %reason, "a lookup failed for now; the event's runs are tried again later");
                        out.deferred.push((id, reason.clone()));
                        continue 'events;
                    }
                    Outcome::Filtered { step } => {
                        tracing::debug!(event = %ev.meta.id, pipeline = %p.name, %step, "filtered")
                    }
                    Outcome::Completed => {}
                }
                // What lookups read about the customer is personal data too.
                let personal = with_lookups(runtime, &personal, &r);
                jobs.extend(r.deliveries.iter().map(|d| {
                    let mut j = Job::from_delivery(ev, &p.name, d, now_ms);
                    j.sensitive = personal.list().to_vec();
                    j
                }));
                runs.push(crate::pipeline::run::redacted(&r, &personal));
            }
        }
        out.jobs += jobs.len();
        metrics::counter!("perkflow_outbox_jobs_created_total").increment(jobs.len() as u64);
        done.push((ev, runs, jobs));
    }
    // Rewards of a refunded order cancelled before they were stored: by a refund processed
    // earlier, or by one in this very batch (its run came after this event's).
    for (ev, _, jobs) in done.iter_mut() {
        if jobs.is_empty() {
            continue;
        }
        if let Some(c) = store.cancellation(&ev.meta.id)? {
            for j in jobs.iter_mut() {
                c.apply(j, now_ms);
            }
        }
    }
    let deferred: Vec<u64> = out.deferred.iter().map(|(id, _)| *id).collect();
    store.complete(&done, &deferred, through)?;
    Ok(out)
}

/// An event's personal data plus what its run's variables hold under `pii_fields` names
/// (the answers of lookup steps: a QuickBooks customer's `PrimaryEmailAddr`, …).
pub fn with_lookups(
    runtime: &Runtime,
    event: &crate::redact::Values,
    run: &crate::pipeline::run::Run,
) -> crate::redact::Values {
    if runtime.pii.is_empty() {
        return event.clone();
    }
    let vars = serde_json::to_value(&run.vars).unwrap_or(Json::Null);
    event.merged(runtime.pii.of(&vars))
}

/// Events whose runs wait for another try: when, and how many tries they had.
#[derive(Default)]
struct Deferrals(HashMap<u64, (Instant, u32)>);

impl Deferrals {
    /// Records a deferral of `id`; returns the wait before its next try.
    fn defer(&mut self, id: u64) -> Duration {
        let tries = self.0.get(&id).map(|(_, n)| *n).unwrap_or(0) + 1;
        let wait = LOOKUP_SCHEDULE
            .interval(tries)
            .mul_f64(rand::random_range(0.5..1.0));
        self.0.insert(id, (Instant::now() + wait, tries));
        wait
    }

    /// Ids not due yet, and ids due for their last try.
    fn split(&self) -> (HashSet<u64>, HashSet<u64>) {
        let now = Instant::now();
        let mut waiting = HashSet::new();
        let mut last = HashSet::new();
        for (id, (at, tries)) in &self.0 {
            if *at > now {
                waiting.insert(*id);
            } else if *tries + 1 >= LOOKUP_TRIES {
                last.insert(*id);
            }
        }
        (waiting, last)
    }

    /// The next time a deferred event becomes due.
    fn next_due(&self) -> Option<Instant> {
        self.0.values().map(|(at, _)| *at).min()
    }
}

/// Processes pending events until `shutdown`; woken by `wake` after each ingest. The work
/// runs on a thread of its own (it reads the store and blocks on lookups): handing each
/// batch to tokio's blocking pool cost two thread switches per batch.
pub async fn run_worker(
    store: Store,
    runtime: impl Fn() -> Arc<Runtime> + Send + 'static,
    wake: Arc<Notify>,
    jobs_ready: Arc<Notify>,
    lanes: crate::delivery::Lanes,
    shutdown: CancellationToken,
) {
    let handle = tokio::runtime::Handle::current();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("perkflow-worker".into())
        .spawn(move || {
            let _runtime = handle.enter();
            work(&handle, store, runtime, wake, jobs_ready, lanes, shutdown);
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            let _ = finished.await;
        }
        Err(e) => tracing::error!(error = %e, "cannot start the pipeline worker thread"),
    }
}

/// The worker's loop, on its own thread (inside the runtime's context).
fn work(
    handle: &tokio::runtime::Handle,
    store: Store,
    runtime: impl Fn() -> Arc<Runtime>,
    wake: Arc<Notify>,
    jobs_ready: Arc<Notify>,
    lanes: crate::delivery::Lanes,
    shutdown: CancellationToken,
) {
    let engine = Engine::new();
    // Lookups count against their sink's rate and concurrency, like deliveries.
    let clients = crate::lookups::Clients::limited_by(lanes);
    let mut deferrals = Deferrals::default();
    loop {
        let rt = runtime();
        let (waiting, last_try) = deferrals.split();
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || -> Result<(Vec<u64>, bool, Processed), crate::store::StoreError> {
                // Events no pipeline listens to are passed over without decoding them.
                let listened = |source: &str, event_type: &str| {
                    rt.listeners(source, event_type).next().is_some()
                };
                let batch = store.pending_events_for(BATCH, &waiting, &listened)?;
                let ids = batch
                    .events
                    .iter()
                    .filter_map(|ev| crate::inbox::parse_id(&ev.meta.id))
                    .collect();
                let done = if batch.events.is_empty() && batch.through.is_none() {
                    Processed::default()
                } else {
                    process(
                        &store,
                        &rt,
                        &engine,
                        &clients,
                        &batch.events,
                        batch.through,
                        &last_try,
                    )?
                };
                Ok((ids, batch.through.is_some(), done))
            },
        ));
        let busy = match done {
            Ok(Ok((ids, read_new, done))) => {
                if done.jobs > 0 {
                    jobs_ready.notify_one();
                }
                for id in &ids {
                    if !done.deferred.iter().any(|(d, _)| d == id) {
                        deferrals.0.remove(id);
                    }
                }
                for (id, reason) in &done.deferred {
                    let wait = deferrals.defer(*id);
                    tracing::debug!(event = %crate::inbox::format_id(*id), %reason, wait_ms = wait.as_millis() as u64, "run deferred");
                }
                // New events read: there may be more.
                ids.len() == BATCH || read_new
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "processing stored events failed; retrying shortly");
                false
            }
            Err(_) => {
                tracing::error!("the pipeline worker panicked; retrying shortly");
                false
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        if !busy {
            let idle = deferrals
                .next_due()
                .map(|at| at.saturating_duration_since(Instant::now()).min(IDLE_POLL))
                .unwrap_or(IDLE_POLL);
            let stop = handle.block_on(async {
                tokio::select! {
                    _ = wake.notified() => false,
                    _ = tokio::time::sleep(idle) => false,
                    _ = shutdown.cancelled() => true,
                }
            });
            if stop {
                return;
            }
        }
    }
}

/// What replaying one event from its trigger would change, job by job.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayItem {
    pub key: String,
    pub pipeline: String,
    pub to: String,
    /// new | changed | unchanged | dropped (no longer produced)
    pub change: &'static str,
    /// The existing job's state, if there is one.
    pub state: Option<crate::outbox::JobState>,
    pub with_before: Option<Json>,
    pub with_after: Option<Json>,
    /// Whether a confirmed replay sends it.
    pub sends: bool,
}

/// Re-runs `ev` through the current pipelines and compares the actions with the event's
/// existing jobs. New and changed actions are sent on confirmation, as are unchanged ones
/// that never got through (dead, dropped); unchanged delivered or queued ones only with
/// `resend_delivered`. Every job keeps its idempotency key. A run deferred by a lookup that
/// failed for now makes the plan an error (try again later).
pub fn plan_replay(
    runtime: &Runtime,
    engine: &Engine,
    lookups: &dyn crate::pipeline::run::Effects,
    ev: &StoredEvent,
    existing: &[Job],
    resend_delivered: bool,
) -> Result<ReplayPlan, String> {
    use crate::outbox::JobState;
    let now_ms = crate::delivery::now_ms();
    let input = input(ev);
    let mut runs = Vec::new();
    let mut items = Vec::new();
    let mut to_send = Vec::new();
    let mut produced = std::collections::HashSet::new();
    for p in runtime
        .pipelines
        .values()
        .filter(|p| p.on.source == ev.meta.source && p.on.events.contains(&ev.meta.event_type))
    {
        let r = run(p, engine, &input, lookups);
        if let Outcome::Deferred { reason, .. } = &r.outcome {
            return Err(reason.clone());
        }
        let personal = with_lookups(runtime, &runtime.personal_data(ev), &r);
        for d in &r.deliveries {
            let mut job = Job::from_delivery(ev, &p.name, d, now_ms);
            job.sensitive = personal.list().to_vec();
            produced.insert(job.key.clone());
            let old = existing.iter().find(|j| j.key == job.key);
            let (change, sends) = match old {
                // Cancelled because its order was refunded: final.
                Some(o) if o.state == JobState::Cancelled => ("cancelled", false),
                None => ("new", true),
                Some(o) if o.with != job.with => ("changed", true),
                Some(o) => (
                    "unchanged",
                    matches!(o.state, JobState::Dead | JobState::Dropped)
                        || (resend_delivered && o.state != JobState::InFlight),
                ),
            };
            items.push(ReplayItem {
                key: job.key.clone(),
                pipeline: p.name.clone(),
                to: d.to(),
                change,
                state: old.map(|o| o.state),
                with_before: old.map(|o| o.with.clone()),
                with_after: Some(job.with.clone()),
                sends,
            });
            if sends {
                to_send.push(job);
            }
        }
        runs.push(r);
    }
    for o in existing.iter().filter(|o| !produced.contains(&o.key)) {
        items.push(ReplayItem {
            key: o.key.clone(),
            pipeline: o.pipeline.clone(),
            to: format!("{}.{}", o.sink, o.action),
            change: "dropped",
            state: Some(o.state),
            with_before: Some(o.with.clone()),
            with_after: None,
            sends: false,
        });
    }
    Ok((runs, items, to_send))
}

/// The runs of a replay, what would change, and the jobs a confirmation queues.
pub type ReplayPlan = (Vec<crate::pipeline::run::Run>, Vec<ReplayItem>, Vec<Job>);
