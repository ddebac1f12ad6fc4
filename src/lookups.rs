//! `lookup` steps in the daemon: reads through the configured sinks' connectors (auth,
//! timeouts and answer classification as for deliveries), called from the pipeline worker's
//! blocking thread.

use crate::app::Runtime;
use crate::pipeline::run::{Effects, LookupCall, LookupError, Reversed};
use crate::sink::classify::Outcome;
use crate::sink::SinkClient;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One HTTP client per sink, rebuilt when the runtime (the config) changes.
#[derive(Default)]
pub struct Clients {
    /// The runtime the clients were built from (held, so that its address cannot be reused
    /// by a later one), and the clients.
    inner: Mutex<Built>,
    /// Sinks whose last lookup failed for now, until when they are not asked again (a
    /// vendor that times out costs one timeout per pause, not one per waiting event).
    resting: Mutex<HashMap<String, (std::time::Instant, String)>>,
    /// The delivery engine's lanes: a lookup counts against its sink's rate and concurrency
    /// like a delivery (none in dry runs and replay plans).
    lanes: Option<crate::delivery::Lanes>,
}

impl Clients {
    /// Clients whose lookups go through the delivery engine's limits.
    pub fn limited_by(lanes: crate::delivery::Lanes) -> Clients {
        Clients {
            lanes: Some(lanes),
            ..Default::default()
        }
    }
}

/// How long a sink whose lookup failed for now is not asked again.
const REST: std::time::Duration = std::time::Duration::from_secs(5);

/// The runtime the clients were built from, and the clients by sink name.
type Built = (Option<Arc<Runtime>>, HashMap<String, Arc<SinkClient>>);

impl Clients {
    fn get(&self, runtime: &Arc<Runtime>, sink: &str) -> Result<Arc<SinkClient>, String> {
        let mut guard = self.inner.lock().map_err(|_| "lookup clients poisoned")?;
        if !guard.0.as_ref().is_some_and(|r| Arc::ptr_eq(r, runtime)) {
            *guard = (Some(runtime.clone()), HashMap::new());
        }
        if let Some(c) = guard.1.get(sink) {
            return Ok(c.clone());
        }
        let s = runtime
            .sinks
            .get(sink)
            .ok_or_else(|| format!("sink `{sink}` is not configured (the config changed?)"))?;
        let client = Arc::new(s.client()?);
        guard.1.insert(sink.to_string(), client.clone());
        Ok(client)
    }
}

/// Lookups through the live sinks. `last_try`: a failure worth retrying fails the run
/// instead of deferring it.
pub struct Live<'a> {
    /// The ledger `loyalty.*` steps write.
    pub store: &'a crate::store::Store,
    pub runtime: &'a Arc<Runtime>,
    pub clients: &'a Clients,
    pub handle: tokio::runtime::Handle,
    pub last_try: bool,
}

impl Live<'_> {
    /// Stores the events an entry emits (thresholds, tier changes). Their ids come from the
    /// entry, so emitting again (a re-run after a crash, a replay) stores nothing new.
    fn emit(&self, a: &crate::ledger::Applied) -> Result<(), LookupError> {
        use crate::inbox::Inbox;
        let events = a
            .entry
            .events(&self.runtime.loyalty, crate::delivery::now_ms());
        if events.is_empty() {
            return Ok(());
        }
        self.handle
            .block_on(self.store.append(events))
            .map(|_| ())
            .map_err(|e| LookupError::Retry(format!("storing the ledger's events: {e}")))
    }
}

impl Live<'_> {
    /// The stored events an accrual caused: the one it came from, and the ledger's events
    /// (thresholds, tiers) it and its release emitted.
    fn caused_by(&self, accrual: &crate::ledger::Entry) -> Result<Vec<String>, String> {
        let mut ids: Vec<String> = accrual
            .source
            .rsplit_once(':')
            .map(|(_, id)| id.to_string())
            .into_iter()
            .collect();
        let mut entries = vec![accrual.clone()];
        let release = format!("release:{}:{}", accrual.member, accrual.seq);
        if let Some(e) = self
            .store
            .keyed_entry(&release)
            .map_err(|e| e.to_string())?
        {
            entries.push(e);
        }
        for e in entries {
            for ev in e.events(&self.runtime.loyalty, 0) {
                if let Some(id) = self
                    .store
                    .dedup_lookup(&ev.source, &ev.vendor_id)
                    .map_err(|e| e.to_string())?
                {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }
}

impl Effects for Live<'_> {
    fn issue_code(
        &self,
        pool: &str,
        member: &str,
        key: &str,
        order: Option<&str>,
    ) -> Result<Json, LookupError> {
        use crate::codes::CodeError;
        let spec = self.runtime.promo_codes.get(pool).ok_or_else(|| {
            LookupError::Fail(format!("no promo code pool `{pool}` (the config changed?)"))
        })?;
        let (c, duplicate) = self
            .store
            .assign_code(pool, spec, member, key, order, crate::delivery::now_ms())
            .map_err(|e| match e {
                CodeError::Store(s) => LookupError::Retry(s),
                other => LookupError::Fail(other.to_string()),
            })?;
        Ok(serde_json::json!({
            "code": c.code, "pool": c.pool, "expires_at_ms": c.expires_at_ms, "duplicate": duplicate,
        }))
    }

    fn reverse(&self, r: &crate::ledger::Reversal) -> Result<Reversed, LookupError> {
        use crate::ledger::LedgerError;
        let ledger_err = |e: LedgerError| match e {
            LedgerError::Store(s) => LookupError::Retry(s),
            other => LookupError::Fail(other.to_string()),
        };
        let rules = &self.runtime.loyalty;
        let outcome = self.store.ledger_reverse(r, rules);
        if let Err(LedgerError::Store(s)) = &outcome {
            return Err(LookupError::Retry(s.clone()));
        }
        if let Ok(Some(a)) = &outcome {
            self.emit(a)?;
        }
        // A refund in full (no `points`: everything is taken back, whatever was spent
        // already), or once nothing of the order's points is left, voids its unused codes
        // and cancels the unsent rewards it caused. Both are idempotent.
        let accrual = self.store.accrual_left(&r.of).map_err(ledger_err)?;
        let mut done = Reversed::default();
        if r.points.is_none() || accrual.as_ref().is_none_or(|(_, _, left)| *left == 0) {
            let now = crate::delivery::now_ms();
            let why = format!("voided: {}", r.reason);
            done.voided = self
                .store
                .void_order_codes(&r.of, &why, now)
                .map_err(|e| LookupError::Retry(e.to_string()))?;
            if let (Some((_, entry, _)), false) = (&accrual, r.cancel.is_empty()) {
                let events = self.caused_by(entry).map_err(LookupError::Retry)?;
                done.cancelled = self
                    .store
                    .cancel_unsent(&events, &r.cancel, &format!("cancelled: {}", r.reason), now)
                    .map_err(|e| LookupError::Retry(e.to_string()))?;
                if !done.cancelled.is_empty() {
                    tracing::info!(order = %r.of, jobs = ?done.cancelled, "cancelled the unsent rewards of a refunded order");
                }
            }
        }
        done.applied = outcome.map_err(ledger_err)?;
        Ok(done)
    }

    fn enroll(
        &self,
        member: &str,
        profile: crate::ledger::Profile,
    ) -> Result<crate::ledger::Member, LookupError> {
        use crate::ledger::LedgerError;
        self.store
            .set_profile(member, profile)
            .map_err(|e| match e {
                LedgerError::Store(s) => LookupError::Retry(s),
                other => LookupError::Fail(other.to_string()),
            })
    }

    fn ledger(&self, op: &crate::ledger::Op) -> Result<crate::ledger::Applied, LookupError> {
        use crate::ledger::LedgerError;
        let applied = self
            .store
            .ledger_apply(op, &self.runtime.loyalty)
            .map_err(|e| match e {
                LedgerError::Store(s) => LookupError::Retry(s),
                other => LookupError::Fail(other.to_string()),
            })?;
        self.emit(&applied)?;
        Ok(applied)
    }

    fn fetch(&self, call: &LookupCall) -> Result<Json, LookupError> {
        let resting = self
            .clients
            .resting
            .lock()
            .map_err(|_| LookupError::Retry("lookup state poisoned".into()))?
            .get(call.sink)
            .filter(|(until, _)| *until > std::time::Instant::now())
            .cloned();
        if let Some((until, why)) = resting {
            let secs = until
                .saturating_duration_since(std::time::Instant::now())
                .as_secs();
            if !self.last_try {
                return Err(LookupError::Retry(format!(
                    "not asked: `{}` failed moments ago ({why}); asking again in {secs}s",
                    call.sink
                )));
            }
        }
        let client = self
            .clients
            .get(self.runtime, call.sink)
            .map_err(LookupError::Fail)?;
        let key = format!("lookup:{}:{}:{}", call.event_id, call.pipeline, call.name);
        let lane = self.clients.lanes.as_ref().and_then(|l| {
            l.sinks
                .lock()
                .ok()
                .and_then(|sinks| sinks.get(call.sink).cloned())
        });
        let _permit = match &lane {
            Some(lane) => match self.handle.block_on(lane.admit(crate::delivery::now_ms())) {
                Ok(p) => Some(p),
                Err(until) => {
                    return Err(LookupError::Retry(format!(
                        "not asked: `{}` asked perkflow to wait until {}",
                        call.sink,
                        crate::sign::rfc3339((until / 1000) as i64)
                    )))
                }
            },
            None => None,
        };
        let sent = self.handle.block_on(client.attempt(
            call.action,
            call.with,
            &key,
            call.event_id,
            1,
            false,
        ));
        let outcome = match &sent.outcome {
            Outcome::Delivered { .. } => "ok",
            Outcome::Retry { .. } => "retry",
            Outcome::Reject { .. } => "failed",
        };
        metrics::counter!("perkflow_lookups_total", "sink" => call.sink.to_string(), "outcome" => outcome)
            .increment(1);
        crate::delivery::report_health(call.sink, &sent, &Default::default());
        if let Ok(mut resting) = self.clients.resting.lock() {
            match &sent.outcome {
                Outcome::Retry { reason, .. } => {
                    resting.insert(
                        call.sink.to_string(),
                        (std::time::Instant::now() + REST, reason.clone()),
                    );
                }
                _ => {
                    resting.remove(call.sink);
                }
            }
        }
        let status = sent
            .status
            .map(|s| format!("HTTP {s}: "))
            .unwrap_or_default();
        match sent.outcome {
            Outcome::Delivered { .. } => sent
                .answer
                .ok_or_else(|| LookupError::Fail(format!("{status}the answer is not JSON"))),
            Outcome::Retry { reason, .. } if self.last_try => Err(LookupError::Fail(format!(
                "{status}{reason} (gave up after the last try)"
            ))),
            Outcome::Retry { reason, .. } => Err(LookupError::Retry(format!("{status}{reason}"))),
            Outcome::Reject { reason } => Err(LookupError::Fail(format!("{status}{reason}"))),
        }
    }
}
