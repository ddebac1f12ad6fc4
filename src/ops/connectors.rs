//! Connector health: for each source and sink, what happened lately (successes and failures
//! per minute over the last hour, the last of each with its reason), what waits (queue depth,
//! how overdue the oldest job is, dead letters), and a state an operator reads at a glance:
//! `ok`, `degraded`, `down`, `circuit_open` or `credentials_failing`.
//!
//! Ingest, the delivery engine and lookups report outcomes to one process-wide registry
//! (like the metrics recorder); `GET /api/connectors`, the status page and `perkflow status`
//! read it.

use crate::app::AppState;
use crate::outbox::QueueStats;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};

/// Minutes of history kept per connector.
const MINUTES: usize = 60;
/// A job overdue longer than this makes its sink `degraded`.
const OVERDUE_MS: u64 = 5 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Source,
    Sink,
}

#[derive(Debug, Default)]
struct Stats {
    /// (minute since the epoch, successes, failures), oldest first.
    minutes: VecDeque<(u64, u32, u32)>,
    last_success_ms: Option<u64>,
    last_failure: Option<(u64, String)>,
    /// The last failure was refused credentials (401/403 from the vendor, or signatures
    /// that do not verify), and nothing succeeded since.
    credentials_failing: bool,
}

impl Stats {
    fn record(&mut self, now_ms: u64, ok: bool) {
        let minute = now_ms / 60_000;
        match self.minutes.back_mut() {
            Some((m, s, f)) if *m == minute => {
                if ok {
                    *s += 1
                } else {
                    *f += 1
                }
            }
            _ => {
                self.minutes
                    .push_back((minute, u32::from(ok), u32::from(!ok)));
                while self.minutes.len() > MINUTES {
                    self.minutes.pop_front();
                }
            }
        }
    }

    /// (successes, failures) over the last `minutes` minutes.
    fn window(&self, now_ms: u64, minutes: u64) -> (u64, u64) {
        let from = (now_ms / 60_000).saturating_sub(minutes - 1);
        self.minutes
            .iter()
            .filter(|(m, _, _)| *m >= from)
            .fold((0, 0), |(s, f), (_, a, b)| (s + *a as u64, f + *b as u64))
    }
}

/// Outcomes per connector, since the process started.
#[derive(Default)]
pub struct Registry {
    stats: Mutex<HashMap<Kind, HashMap<String, Stats>>>,
}

/// The stats of one connector, created on first use (no allocation on the ingest path once
/// it exists).
fn stats_of<'a>(
    all: &'a mut HashMap<Kind, HashMap<String, Stats>>,
    kind: Kind,
    name: &str,
) -> &'a mut Stats {
    let by_name = all.entry(kind).or_default();
    if !by_name.contains_key(name) {
        by_name.insert(name.to_string(), Stats::default());
    }
    by_name.get_mut(name).expect("just inserted")
}

/// The process-wide registry.
pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

impl Registry {
    /// A success.
    pub fn ok(&self, kind: Kind, name: &str, now_ms: u64) {
        let mut all = self.stats.lock().expect("health lock");
        let s = stats_of(&mut all, kind, name);
        s.record(now_ms, true);
        s.last_success_ms = Some(now_ms);
        s.credentials_failing = false;
    }

    /// A failure, with what an operator needs to know (no secrets, no customer data).
    pub fn failed(&self, kind: Kind, name: &str, now_ms: u64, reason: &str, credentials: bool) {
        let mut all = self.stats.lock().expect("health lock");
        let s = stats_of(&mut all, kind, name);
        s.record(now_ms, false);
        let mut reason = reason.to_string();
        if reason.len() > 300 {
            let mut cut = 300;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push('…');
        }
        s.last_failure = Some((now_ms, reason));
        s.credentials_failing = credentials;
    }

    fn view(&self, kind: Kind, name: &str, now_ms: u64) -> Activity {
        let all = self.stats.lock().expect("health lock");
        let Some(s) = all.get(&kind).and_then(|m| m.get(name)) else {
            return Activity::default();
        };
        let rate = |(ok, failed): (u64, u64)| {
            (ok + failed > 0).then(|| (ok as f64 / (ok + failed) as f64 * 1000.0).round() / 1000.0)
        };
        let w5 = s.window(now_ms, 5);
        let w60 = s.window(now_ms, 60);
        Activity {
            last_success_ms: s.last_success_ms,
            last_failure_ms: s.last_failure.as_ref().map(|(t, _)| *t),
            last_failure_reason: s.last_failure.as_ref().map(|(_, r)| r.clone()),
            ok_5m: w5.0,
            failed_5m: w5.1,
            success_rate_5m: rate(w5),
            ok_1h: w60.0,
            failed_1h: w60.1,
            success_rate_1h: rate(w60),
            credentials_failing: s.credentials_failing,
        }
    }
}

/// What happened lately.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Activity {
    pub last_success_ms: Option<u64>,
    pub last_failure_ms: Option<u64>,
    pub last_failure_reason: Option<String>,
    pub ok_5m: u64,
    pub failed_5m: u64,
    /// Successes over attempts, when there were any.
    pub success_rate_5m: Option<f64>,
    pub ok_1h: u64,
    pub failed_1h: u64,
    pub success_rate_1h: Option<f64>,
    pub credentials_failing: bool,
}

/// One connector's health.
#[derive(Debug, Clone, Serialize)]
pub struct Connector {
    pub kind: Kind,
    pub name: String,
    pub connector: String,
    /// ok | degraded | down | circuit_open | credentials_failing
    pub state: &'static str,
    /// Why it is not ok.
    pub why: Option<String>,
    #[serde(flatten)]
    pub activity: Activity,
    /// Sinks: jobs waiting, how long the first due one has been overdue, dead letters.
    pub queue_depth: Option<usize>,
    pub oldest_overdue_ms: Option<u64>,
    pub dead_letters: Option<usize>,
    pub in_flight: Option<usize>,
    /// Sinks: closed | open | half_open.
    pub circuit: Option<&'static str>,
    pub paused_until_ms: Option<u64>,
}

/// Everything `/api/connectors` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub now_ms: u64,
    pub connectors: Vec<Connector>,
    pub events_pending: usize,
    /// The queue counts stopped at `outbox::STATS_SCAN_LIMIT` entries: they are lower bounds.
    pub queue_counts_truncated: bool,
    pub store_bytes: u64,
    /// Payloads and finished jobs purged by retention, since the store was created.
    pub purged_events: u64,
    pub purged_jobs: u64,
    /// The last reload was refused: the old configuration keeps running.
    pub config_error: Option<String>,
    pub config_loaded_at_ms: u64,
}

/// The state a source is in, from its recent webhooks.
fn source_state(a: &Activity) -> (&'static str, Option<String>) {
    let reason = || a.last_failure_reason.clone();
    if a.credentials_failing && a.failed_5m >= 3 && a.ok_5m == 0 {
        return ("credentials_failing", reason());
    }
    if a.failed_5m >= 3 && a.ok_5m == 0 {
        return ("down", reason());
    }
    match a.success_rate_5m {
        Some(r) if r < 0.9 => ("degraded", reason()),
        _ => ("ok", None),
    }
}

/// The state a sink is in: its circuit, its credentials, its recent attempts, its queue.
fn sink_state(
    a: &Activity,
    circuit: &'static str,
    paused_until_ms: Option<u64>,
    overdue_ms: Option<u64>,
) -> (&'static str, Option<String>) {
    let reason = || a.last_failure_reason.clone();
    // Refused credentials first: they open the circuit too, and they say what to fix.
    if a.credentials_failing {
        return ("credentials_failing", reason());
    }
    if circuit != "closed" {
        return ("circuit_open", reason());
    }
    if a.failed_5m >= 3 && a.ok_5m == 0 {
        return ("down", reason());
    }
    if paused_until_ms.is_some() {
        return (
            "degraded",
            Some(format!(
                "paused by the vendor (rate limit or quota){}",
                reason().map(|r| format!(": {r}")).unwrap_or_default()
            )),
        );
    }
    if let Some(r) = a.success_rate_5m.filter(|r| *r < 0.9) {
        return (
            "degraded",
            Some(format!(
                "{:.0}% of attempts succeeded in 5 min{}",
                r * 100.0,
                reason()
                    .map(|r| format!("; last failure: {r}"))
                    .unwrap_or_default()
            )),
        );
    }
    if let Some(o) = overdue_ms.filter(|o| *o > OVERDUE_MS) {
        return (
            "degraded",
            Some(format!(
                "the oldest waiting job is {} overdue",
                humantime::format_duration(std::time::Duration::from_secs(o / 1000))
            )),
        );
    }
    ("ok", None)
}

/// The health of every configured source and sink.
pub fn report(app: &AppState, queues: &QueueStats, now_ms: u64) -> Report {
    let rt = app.runtime();
    let reg = registry();
    let lanes = app.lanes.sinks.lock().expect("lanes lock").clone();
    let mut connectors = Vec::new();
    for s in rt.sources.values() {
        let activity = reg.view(Kind::Source, &s.name, now_ms);
        let (state, why) = source_state(&activity);
        connectors.push(Connector {
            kind: Kind::Source,
            name: s.name.clone(),
            connector: s.connector.clone(),
            state,
            why,
            activity,
            queue_depth: None,
            oldest_overdue_ms: None,
            dead_letters: None,
            in_flight: None,
            circuit: None,
            paused_until_ms: None,
        });
    }
    for s in rt.sinks.values() {
        let activity = reg.view(Kind::Sink, &s.name, now_ms);
        let q = queues.sinks.get(&s.name).cloned().unwrap_or_default();
        let overdue = q
            .next_due_ms
            .map(|d| now_ms.saturating_sub(d))
            .filter(|o| *o > 0);
        let lane = lanes.get(&s.name);
        let circuit = lane
            .map(|l| l.breaker.lock().expect("breaker lock").label())
            .unwrap_or("closed");
        let paused = lane.and_then(|l| l.paused_until(now_ms));
        let (mut state, mut why) = sink_state(&activity, circuit, paused, overdue);
        if lane.is_none() {
            state = "down";
            why = Some("the sink could not be built (see the log); its jobs wait".into());
        }
        connectors.push(Connector {
            kind: Kind::Sink,
            name: s.name.clone(),
            connector: s.connector.clone(),
            state,
            why,
            activity,
            queue_depth: Some(q.depth),
            oldest_overdue_ms: Some(overdue.unwrap_or(0)),
            dead_letters: Some(q.dead),
            in_flight: Some(lane.map(|l| l.in_flight()).unwrap_or(0)),
            circuit: Some(circuit),
            paused_until_ms: paused,
        });
    }
    let reload = app.reload_status();
    Report {
        now_ms,
        connectors,
        events_pending: queues.events_pending,
        queue_counts_truncated: queues.truncated,
        store_bytes: queues.store_bytes,
        purged_events: queues.purged_events,
        purged_jobs: queues.purged_jobs,
        config_error: reload.error,
        config_loaded_at_ms: reload.loaded_at_ms,
    }
}

/// Publishes the queue figures as metrics (called by the sampler and on each report): for
/// every configured sink, zero when nothing waits (a gauge left at its last value would keep
/// an alert firing).
pub fn publish(app: &AppState, queues: &QueueStats, now_ms: u64) {
    let configured: Vec<String> = app.runtime().sinks.keys().cloned().collect();
    let empty = crate::outbox::SinkQueue::default();
    let all = configured
        .iter()
        .map(|s| (s, queues.sinks.get(s).unwrap_or(&empty)))
        .chain(queues.sinks.iter().filter(|(s, _)| !configured.contains(s)));
    for (sink, q) in all {
        metrics::gauge!("perkflow_queue_depth", "sink" => sink.clone()).set(q.depth as f64);
        let overdue = q.next_due_ms.map(|d| now_ms.saturating_sub(d)).unwrap_or(0);
        metrics::gauge!("perkflow_queue_oldest_overdue_seconds", "sink" => sink.clone())
            .set(overdue as f64 / 1000.0);
        metrics::gauge!("perkflow_dead_letters", "sink" => sink.clone()).set(q.dead as f64);
    }
    metrics::gauge!("perkflow_events_pending").set(queues.events_pending as f64);
    metrics::gauge!("perkflow_dedup_index_events").set(queues.dedup_index_events as f64);
    metrics::gauge!("perkflow_retention_purged", "what" => "events")
        .set(queues.purged_events as f64);
    metrics::gauge!("perkflow_retention_purged", "what" => "jobs").set(queues.purged_jobs as f64);
    metrics::gauge!("perkflow_store_bytes").set(queues.store_bytes as f64);
}

/// Reads the queue figures off the async threads.
pub async fn queues(app: &AppState) -> QueueStats {
    let outbox = app.outbox.clone();
    tokio::task::spawn_blocking(move || outbox.queue_stats())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// Refreshes the queue metrics every `every` until `stop` (a scan that takes long spaces the
/// next one out, so a huge backlog never costs more than ~5% of a core).
pub async fn sampler(
    app: AppState,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let started = std::time::Instant::now();
        let q = queues(&app).await;
        publish(&app, &q, crate::delivery::now_ms());
        let wait = every.max(started.elapsed() * 20);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// `GET /api/connectors`
pub async fn connectors(
    axum::extract::State(app): axum::extract::State<AppState>,
) -> axum::Json<Report> {
    let q = queues(&app).await;
    let now = crate::delivery::now_ms();
    publish(&app, &q, now);
    axum::Json(report(&app, &q, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_the_last_minutes_only() {
        let mut s = Stats::default();
        let t0 = 100 * 60_000;
        s.record(t0, true);
        s.record(t0 + 1, false);
        s.record(t0 + 10 * 60_000, true);
        assert_eq!(s.window(t0 + 10 * 60_000, 5), (1, 0));
        assert_eq!(s.window(t0 + 10 * 60_000, 60), (2, 1));
        // History older than an hour is dropped.
        for i in 0..100u64 {
            s.record(t0 + (20 + i) * 60_000, true);
        }
        assert_eq!(s.minutes.len(), MINUTES);
    }

    fn activity(ok: u64, failed: u64, credentials: bool) -> Activity {
        Activity {
            ok_5m: ok,
            failed_5m: failed,
            success_rate_5m: (ok + failed > 0).then(|| ok as f64 / (ok + failed) as f64),
            credentials_failing: credentials,
            last_failure_reason: (failed > 0).then(|| "HTTP 503".to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn sink_states_in_order_of_urgency() {
        let quiet = activity(0, 0, false);
        assert_eq!(sink_state(&quiet, "closed", None, None).0, "ok");
        assert_eq!(sink_state(&quiet, "open", None, None).0, "circuit_open");
        assert_eq!(
            sink_state(&quiet, "half_open", None, None).0,
            "circuit_open"
        );
        assert_eq!(
            sink_state(&activity(0, 1, true), "open", None, None).0,
            "credentials_failing"
        );
        assert_eq!(
            sink_state(&activity(0, 3, false), "closed", None, None).0,
            "down"
        );
        assert_eq!(
            sink_state(&activity(8, 2, false), "closed", None, None).0,
            "degraded"
        );
        assert_eq!(
            sink_state(&activity(99, 1, false), "closed", None, None).0,
            "ok"
        );
        assert_eq!(sink_state(&quiet, "closed", Some(1), None).0, "degraded");
        let (state, why) = sink_state(&quiet, "closed", None, Some(OVERDUE_MS + 60_000));
        assert_eq!(state, "degraded");
        assert_eq!(why.unwrap(), "the oldest waiting job is 6m overdue");
    }

    #[test]
    fn source_states() {
        assert_eq!(source_state(&activity(10, 0, false)).0, "ok");
        assert_eq!(source_state(&activity(0, 3, true)).0, "credentials_failing");
        assert_eq!(source_state(&activity(0, 3, false)).0, "down");
        assert_eq!(source_state(&activity(5, 2, false)).0, "degraded");
    }

    #[test]
    fn failures_keep_a_short_reason_and_a_success_clears_credentials() {
        let r = Registry::default();
        r.failed(Kind::Sink, "sms", 1_000, &"x".repeat(1000), true);
        let v = r.view(Kind::Sink, "sms", 1_000);
        assert!(v.credentials_failing);
        assert_eq!(v.last_failure_reason.unwrap().chars().count(), 301);
        r.ok(Kind::Sink, "sms", 2_000);
        let v = r.view(Kind::Sink, "sms", 2_000);
        assert!(!v.credentials_failing);
        assert_eq!((v.ok_5m, v.failed_5m), (1, 1));
        assert_eq!(v.success_rate_5m, Some(0.5));
        assert_eq!(v.last_success_ms, Some(2_000));
    }
}
