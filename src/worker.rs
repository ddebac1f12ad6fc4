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
    shutdown: CancellationToken,
) {
    let engine = Arc::new(Engine::new());
    loop {
        let rt = runtime();
        let (s, e) = (store.clone(), engine.clone());
        let done =
            tokio::task::spawn_blocking(move || -> Result<usize, crate::store::StoreError> {
                let batch = s.pending_events(BATCH)?;
                if !batch.is_empty() {
                    process(&s, &rt, &e, &batch)?;
                }
                Ok(batch.len())
            })
            .await;
        let busy = match done {
            Ok(Ok(n)) => n == BATCH,
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
