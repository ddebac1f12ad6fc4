//! The pipeline worker: takes stored events from the inbox, runs every pipeline subscribed
//! to their source and type, and writes the resulting jobs to the outbox in the transaction
//! that marks the event processed (`Store::complete`).

use crate::app::Runtime;
use crate::inbox::StoredEvent;
use crate::outbox::Job;
use crate::pipeline::expr::Engine;
use crate::pipeline::run::{run, EventInput, Outcome};
use crate::store::Store;
use serde_json::{Map, Value as Json};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
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

/// Runs the subscribed pipelines on a batch of events and completes them in the store in
/// one transaction. Returns the number of jobs written.
pub fn process(
    store: &Store,
    runtime: &Runtime,
    engine: &Engine,
    batch: &[StoredEvent],
) -> Result<usize, crate::store::StoreError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut done = Vec::with_capacity(batch.len());
    let mut n = 0;
    for ev in batch {
        let mut runs = Vec::new();
        let mut jobs = Vec::new();
        let subscribed: Vec<_> = runtime
            .pipelines
            .values()
            .filter(|p| p.on.source == ev.meta.source && p.on.events.contains(&ev.meta.event_type))
            .collect();
        if !subscribed.is_empty() {
            let input = input(ev);
            for p in subscribed {
                let r = run(p, engine, &input);
                let outcome = match &r.outcome {
                    Outcome::Completed => "completed",
                    Outcome::Filtered { .. } => "filtered",
                    Outcome::Failed { .. } => "failed",
                };
                metrics::counter!("perkflow_pipeline_runs_total", "pipeline" => p.name.clone(), "outcome" => outcome)
                    .increment(1);
                match &r.outcome {
                    Outcome::Failed { error, .. } => {
                        tracing::warn!(event = %ev.meta.id, pipeline = %p.name, %error, "pipeline run failed; the event is kept with its trace")
                    }
                    Outcome::Filtered { step } => {
                        tracing::debug!(event = %ev.meta.id, pipeline = %p.name, %step, "filtered")
                    }
                    Outcome::Completed => {}
                }
                jobs.extend(
                    r.deliveries
                        .iter()
                        .map(|d| Job::from_delivery(ev, &p.name, d, now_ms)),
                );
                runs.push(r);
            }
        }
        n += jobs.len();
        metrics::counter!("perkflow_outbox_jobs_created_total").increment(jobs.len() as u64);
        done.push((ev, runs, jobs));
    }
    store.complete(&done)?;
    Ok(n)
}

/// Processes pending events until `shutdown`; woken by `wake` after each ingest.
pub async fn run_worker(
    store: Store,
    runtime: impl Fn() -> Arc<Runtime> + Send + 'static,
    wake: Arc<Notify>,
    jobs_ready: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let engine = Arc::new(Engine::new());
    loop {
        let rt = runtime();
        let (s, e) = (store.clone(), engine.clone());
        let done = tokio::task::spawn_blocking(
            move || -> Result<(usize, usize), crate::store::StoreError> {
                let batch = s.pending_events(BATCH)?;
                let jobs = if batch.is_empty() {
                    0
                } else {
                    process(&s, &rt, &e, &batch)?
                };
                Ok((batch.len(), jobs))
            },
        )
        .await;
        let busy = match done {
            Ok(Ok((n, jobs))) => {
                if jobs > 0 {
                    jobs_ready.notify_one();
                }
                n == BATCH
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "processing stored events failed; retrying shortly");
                false
            }
            Err(err) => {
                tracing::error!(error = %err, "the pipeline worker panicked; retrying shortly");
                false
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        if !busy {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = shutdown.cancelled() => return,
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
/// `resend_delivered`. Every job keeps its idempotency key.
pub fn plan_replay(
    runtime: &Runtime,
    engine: &Engine,
    ev: &StoredEvent,
    existing: &[Job],
    resend_delivered: bool,
) -> (Vec<crate::pipeline::run::Run>, Vec<ReplayItem>, Vec<Job>) {
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
        let r = run(p, engine, &input);
        for d in &r.deliveries {
            let job = Job::from_delivery(ev, &p.name, d, now_ms);
            produced.insert(job.key.clone());
            let old = existing.iter().find(|j| j.key == job.key);
            let (change, sends) = match old {
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
    (runs, items, to_send)
}
