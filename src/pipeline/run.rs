//! Running a pipeline on one event, every step recorded. Pure except `lookup` and
//! `loyalty.*` steps, which go through the `Effects` the caller provides (the live sinks and
//! the ledger in the worker; stubs and an in-memory ledger in tests and dry runs).

use super::expr::Engine;
use super::spec::{Pipeline, Step, Tmpl};
use indexmap::IndexMap;
use serde::Serialize;
use serde_json::{json, Map, Value as Json};

/// Names every run provides; `set` cannot overwrite them.
pub const RESERVED: &[&str] = &["event", "source", "type", "event_id", "headers"];

/// The event a run starts from.
#[derive(Debug, Clone, Serialize)]
pub struct EventInput {
    pub source: String,
    pub event_type: String,
    pub event_id: String,
    pub headers: Map<String, Json>,
    /// The payload parsed as JSON (`null` when it is not JSON).
    pub event: Json,
}

/// A sink action a run asks for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub step: String,
    /// Stable name of the deliver step (its `id:`, or `<sink>.<action>#<n>`): part of the
    /// job's idempotency key, unaffected by steps added elsewhere.
    pub id: String,
    pub sink: String,
    pub action: String,
    pub with: Json,
    /// What of the vendor's answer is stored on a member once delivered.
    pub keep: Option<crate::outbox::Keep>,
}

impl Delivery {
    pub fn to(&self) -> String {
        format!("{}.{}", self.sink, self.action)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    /// A `when` was false.
    Filtered {
        step: String,
    },
    /// A field could not be evaluated, or a lookup failed for good: the run delivers
    /// nothing.
    Failed {
        step: String,
        error: String,
    },
    /// A lookup failed for now (timeout, 5xx, 429): the run delivers nothing and is run
    /// again later.
    Deferred {
        step: String,
        reason: String,
    },
}

/// One `lookup` step's request.
#[derive(Debug, Clone)]
pub struct LookupCall<'a> {
    /// The variable the answer goes to.
    pub name: &'a str,
    pub sink: &'a str,
    pub action: &'a str,
    pub with: &'a Json,
    pub pipeline: &'a str,
    pub event_id: &'a str,
}

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq)]
pub enum LookupError {
    /// Worth trying again later (the run is deferred).
    Retry(String),
    /// It will not work (not found, refused, bad request): the run fails.
    Fail(String),
}

/// What a run's side effects go through: `lookup` steps read, `loyalty.*` steps write the
/// ledger.
pub trait Effects {
    fn fetch(&self, call: &LookupCall) -> Result<Json, LookupError>;
    /// Applies a ledger operation (idempotent on `op.idempotency_key`). The default keeps an
    /// in-memory ledger per run: dry runs and tests write nothing.
    fn ledger(&self, op: &crate::ledger::Op) -> Result<crate::ledger::Applied, LookupError> {
        dry_ledger(op)
    }
    /// Assigns a promo code of `pool` to `member` under `key` (the same key: the same code),
    /// for the order `order` (a refund voids it). The default (dry runs, tests) makes up a
    /// placeholder.
    fn issue_code(
        &self,
        pool: &str,
        member: &str,
        key: &str,
        order: Option<&str>,
    ) -> Result<Json, LookupError> {
        let _ = (member, key, order);
        Ok(
            json!({"code": format!("{}-DRY-RUN", pool.to_uppercase()), "pool": pool, "duplicate": false}),
        )
    }
    /// Reverses a keyed accrual (`applied` is `None` when there is none), voids the unused
    /// promo codes issued for the order and cancels the listed sinks' unsent deliveries it
    /// caused. The default (dry runs, tests) finds nothing to take back.
    fn reverse(&self, r: &crate::ledger::Reversal) -> Result<Reversed, LookupError> {
        let _ = r;
        Ok(Reversed::default())
    }
    /// Creates the member if new and records its profile. The default (dry runs, tests)
    /// stores nothing and answers a new member with that profile.
    fn enroll(
        &self,
        member: &str,
        profile: crate::ledger::Profile,
    ) -> Result<crate::ledger::Member, LookupError> {
        let profile = profile
            .normalised()
            .map_err(|e| LookupError::Fail(e.to_string()))?;
        Ok(crate::ledger::Member {
            id: member.to_string(),
            profile,
            ..Default::default()
        })
    }
}

/// What a reversal did.
#[derive(Debug, Default, Clone)]
pub struct Reversed {
    pub applied: Option<crate::ledger::Applied>,
    /// Promo codes voided (unused codes issued for the order).
    pub voided: Vec<String>,
    /// Deliveries cancelled before they were sent (their job keys).
    pub cancelled: Vec<String>,
}

/// A ledger that starts every member at 0 and forgets: what dry runs and tests see.
fn dry_ledger(op: &crate::ledger::Op) -> Result<crate::ledger::Applied, LookupError> {
    use crate::ledger::{Entry, Kind};
    let points = match op.kind {
        Kind::Accrue | Kind::Adjust => op.points,
        _ => -op.points,
    };
    if points < 0 {
        return Err(LookupError::Fail(format!(
            "insufficient points: the balance is 0, {} asked (dry run: every member starts at 0)",
            -points
        )));
    }
    Ok(crate::ledger::Applied {
        entry: Entry {
            member: op.member.clone(),
            seq: 1,
            kind: op.kind,
            points,
            balance_after: points,
            lifetime_after: if op.kind == Kind::Accrue { points } else { 0 },
            reason: op.reason.clone(),
            source: op.source.clone(),
            idempotency_key: op.idempotency_key.clone(),
            at_ms: 0,
            base_points: None,
            crossed: Vec::new(),
            tier_change: None,
            pending: op.hold_until_ms.is_some(),
            release_at_ms: op.hold_until_ms,
            pending_after: 0,
            tier_after: None,
        },
        duplicate: false,
    })
}

/// Answers given in advance, by variable name (pipeline tests, `perkflow run --lookup`).
#[derive(Debug, Default, Clone)]
pub struct Stubs(pub IndexMap<String, Json>);

impl Effects for Stubs {
    fn fetch(&self, call: &LookupCall) -> Result<Json, LookupError> {
        self.0.get(call.name).cloned().ok_or_else(|| {
            LookupError::Fail(format!(
                "no answer given for lookup `{}` ({}.{}): dry runs and tests make no calls; give one (`lookups: {{ {}: … }}` in a test, `--lookup {}=FILE` for `perkflow run`)",
                call.name, call.sink, call.action, call.name, call.name
            ))
        })
    }
}

/// One step's record in the trace.
#[derive(Debug, Clone, Serialize)]
pub struct StepTrace {
    pub step: String,
    pub detail: Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub pipeline: String,
    pub outcome: Outcome,
    pub steps: Vec<StepTrace>,
    pub vars: IndexMap<String, Json>,
    pub deliveries: Vec<Delivery>,
}

/// `run` as shown to people: personal data masked in variables, step details, errors and
/// deliveries (the trace, a dry run's output).
pub fn redacted(run: &Run, personal: &crate::redact::Values) -> Run {
    let mut r = run.clone();
    for v in r.vars.values_mut() {
        *v = personal.json(v);
    }
    for s in &mut r.steps {
        s.detail = personal.json(&s.detail);
    }
    for d in &mut r.deliveries {
        d.with = personal.json(&d.with);
    }
    match &mut r.outcome {
        Outcome::Failed { error, .. } => *error = personal.text(error),
        Outcome::Deferred { reason, .. } => *reason = personal.text(reason),
        _ => {}
    }
    r
}

struct State<'a> {
    engine: &'a Engine,
    effects: &'a dyn Effects,
    source: &'a str,
    event_id: &'a str,
    pipeline: &'a str,
    ctx: Map<String, Json>,
    vars: IndexMap<String, Json>,
    steps: Vec<StepTrace>,
    deliveries: Vec<Delivery>,
}

enum Flow {
    Continue,
    Stop(Outcome),
}

/// Runs `p` on `input`, reading `lookup` steps through `lookups`. A failed or deferred run
/// delivers nothing.
pub fn run(p: &Pipeline, engine: &Engine, input: &EventInput, lookups: &dyn Effects) -> Run {
    // A bug in a filter must fail this run, not the worker that runs every event.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_unguarded(p, engine, input, lookups)
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Run {
            pipeline: p.name.clone(),
            outcome: Outcome::Failed {
                step: "?".into(),
                error: format!("pipeline `{}`: internal error: {what}", p.name),
            },
            steps: Vec::new(),
            vars: IndexMap::new(),
            deliveries: Vec::new(),
        }
    })
}

fn run_unguarded(p: &Pipeline, engine: &Engine, input: &EventInput, lookups: &dyn Effects) -> Run {
    let mut ctx = Map::new();
    ctx.insert("event".into(), input.event.clone());
    ctx.insert("source".into(), json!(input.source));
    ctx.insert("type".into(), json!(input.event_type));
    ctx.insert("event_id".into(), json!(input.event_id));
    ctx.insert("headers".into(), Json::Object(input.headers.clone()));
    let mut st = State {
        engine,
        effects: lookups,
        source: &input.source,
        event_id: &input.event_id,
        pipeline: &p.name,
        ctx,
        vars: IndexMap::new(),
        steps: Vec::new(),
        deliveries: Vec::new(),
    };
    let outcome = match run_steps(&mut st, &p.steps) {
        Flow::Continue => Outcome::Completed,
        Flow::Stop(o) => o,
    };
    if matches!(outcome, Outcome::Failed { .. } | Outcome::Deferred { .. }) {
        st.deliveries.clear();
    }
    Run {
        pipeline: p.name.clone(),
        outcome,
        steps: st.steps,
        vars: st.vars,
        deliveries: st.deliveries,
    }
}

fn run_steps(st: &mut State, steps: &[Step]) -> Flow {
    for step in steps {
        if let Flow::Stop(o) = run_step(st, step) {
            return Flow::Stop(o);
        }
    }
    Flow::Continue
}

fn fail(st: &State, step: &str, error: String) -> Flow {
    Flow::Stop(Outcome::Failed {
        step: step.to_string(),
        error: format!("pipeline `{}`, {step}: {error}", st.pipeline),
    })
}

/// A step's own `when`: `Ok(true)` to go on, `Ok(false)` when it skips the step (recorded),
/// `Err` when the condition fails the run.
fn step_when(st: &mut State, path: &str, when: &Option<String>, ctx: &Json) -> Result<bool, Flow> {
    let Some(w) = when else {
        return Ok(true);
    };
    match st.engine.condition(w, ctx) {
        Ok(true) => Ok(true),
        Ok(false) => {
            st.steps.push(StepTrace {
                step: path.to_string(),
                detail: json!({"skipped": w}),
            });
            Ok(false)
        }
        Err(e) => Err(fail(st, &format!("{path}.when"), e)),
    }
}

/// An identifier evaluated from the step's `field` (a non-empty string; a number is taken
/// as text); `refused` words the error for anything else.
fn id_field(
    st: &State,
    path: &str,
    field: &str,
    t: &Tmpl,
    ctx: &Json,
    refused: fn(&Json) -> String,
) -> Result<String, Flow> {
    match eval_tree(st.engine, t, ctx) {
        Ok(Json::String(m)) if !m.is_empty() => Ok(m),
        Ok(Json::Number(n)) => Ok(n.to_string()),
        Ok(other) => Err(fail(st, &format!("{path}.{field}"), refused(&other))),
        Err(e) => Err(fail(st, &format!("{path}.{field}"), e)),
    }
}

/// A member id evaluated from the step's `member`.
fn member_id(st: &State, path: &str, t: &Tmpl, ctx: &Json) -> Result<String, Flow> {
    id_field(st, path, "member", t, ctx, |v| {
        format!("a member id is a non-empty string, not {v}")
    })
}

/// The step's `reason` as text, or `default`.
fn reason_text(
    st: &State,
    path: &str,
    reason: &Option<Tmpl>,
    ctx: &Json,
    default: impl FnOnce() -> String,
) -> Result<String, Flow> {
    match reason.as_ref().map(|r| eval_tree(st.engine, r, ctx)) {
        Some(Ok(Json::String(r))) => Ok(r),
        Some(Ok(other)) => Ok(other.to_string()),
        Some(Err(e)) => Err(fail(st, &format!("{path}.reason"), e)),
        None => Ok(default()),
    }
}

/// A step's `with` map, evaluated field by field (an error names the field).
fn eval_with(
    st: &State,
    path: &str,
    with: &IndexMap<String, Tmpl>,
    ctx: &Json,
) -> Result<Json, Flow> {
    let mut out = Map::new();
    for (k, t) in with {
        match eval_tree(st.engine, t, ctx) {
            Ok(v) => {
                out.insert(k.clone(), v);
            }
            Err(e) => return Err(fail(st, &format!("{path}.with.{k}"), e)),
        }
    }
    Ok(Json::Object(out))
}

/// Sets a variable for later steps (and the run's values).
fn set_var(st: &mut State, name: &str, v: Json) {
    st.ctx.insert(name.into(), v.clone());
    st.vars.insert(name.into(), v);
}

/// A ledger entry's outcome for later steps: `balance`, `lifetime` and `loyalty`.
fn ledger_result(
    st: &mut State,
    path: &str,
    a: &crate::ledger::Applied,
    found: Option<bool>,
) -> Flow {
    // A duplicate is a key another event applied first. This event's own entry (its run
    // again: after a crash, a deferred lookup, a replay) is not: the deliveries that follow
    // keep their job keys, so nothing is sent twice, and guarding them with
    // `not loyalty.duplicate` must not drop them.
    let ours = a.entry.source == format!("{}:{}", st.source, st.event_id);
    let mut result = json!({
        "member": a.entry.member,
        "points": a.entry.points,
        "balance": a.entry.balance_after,
        "lifetime": a.entry.lifetime_after,
        "pending": a.entry.pending_after,
        "held": a.entry.pending,
        "tier": a.entry.tier_after,
        "duplicate": a.duplicate && !ours,
    });
    if let Some(f) = found {
        result["found"] = json!(f);
    }
    set_var(st, "balance", json!(a.entry.balance_after));
    set_var(st, "lifetime", json!(a.entry.lifetime_after));
    set_var(st, "loyalty", result.clone());
    st.steps.push(StepTrace {
        step: path.to_string(),
        detail: result,
    });
    Flow::Continue
}

/// The run's outcome when a ledger or code operation failed: for now (the store), deferred;
/// for good, failed.
fn effect_failed(st: &State, path: &str, what: &str, e: LookupError) -> Flow {
    match e {
        LookupError::Fail(e) => fail(st, path, format!("{what}: {e}")),
        LookupError::Retry(reason) => Flow::Stop(Outcome::Deferred {
            step: path.to_string(),
            reason: format!("pipeline `{}`, {path}: {what}: {reason}", st.pipeline),
        }),
    }
}

fn run_step(st: &mut State, step: &Step) -> Flow {
    let ctx = Json::Object(st.ctx.clone());
    match step {
        Step::When { path, expr } => match st.engine.condition(expr, &ctx) {
            Ok(true) => {
                st.steps.push(StepTrace {
                    step: path.clone(),
                    detail: json!({"when": expr, "result": true}),
                });
                Flow::Continue
            }
            Ok(false) => {
                st.steps.push(StepTrace {
                    step: path.clone(),
                    detail: json!({"when": expr, "result": false}),
                });
                Flow::Stop(Outcome::Filtered { step: path.clone() })
            }
            Err(e) => fail(st, path, e),
        },
        Step::Set { path, vars } => {
            let mut done = Map::new();
            for (name, t) in vars {
                let ctx = Json::Object(st.ctx.clone());
                match eval_tree(st.engine, t, &ctx) {
                    Ok(v) => {
                        st.ctx.insert(name.clone(), v.clone());
                        st.vars.insert(name.clone(), v.clone());
                        done.insert(name.clone(), v);
                    }
                    Err(e) => return fail(st, &format!("{path}.{name}"), e),
                }
            }
            st.steps.push(StepTrace {
                step: path.clone(),
                detail: Json::Object(done),
            });
            Flow::Continue
        }
        Step::Switch {
            path,
            cases,
            default,
        } => {
            for (i, (cond, steps)) in cases.iter().enumerate() {
                match st.engine.condition(cond, &ctx) {
                    Ok(true) => {
                        st.steps.push(StepTrace {
                            step: path.clone(),
                            detail: json!({"case": i, "when": cond}),
                        });
                        return run_steps(st, steps);
                    }
                    Ok(false) => {}
                    Err(e) => return fail(st, &format!("{path}.cases[{i}].when"), e),
                }
            }
            st.steps.push(StepTrace {
                step: path.clone(),
                detail: json!({"case": "default"}),
            });
            run_steps(st, default)
        }
        Step::Lookup {
            path,
            name,
            sink,
            action,
            when,
            with,
        } => {
            let to = format!("{sink}.{action}");
            if let Some(w) = when {
                match st.engine.condition(w, &ctx) {
                    Ok(true) => {}
                    Ok(false) => {
                        // Skipped: the variable exists, as null.
                        st.ctx.insert(name.clone(), Json::Null);
                        st.vars.insert(name.clone(), Json::Null);
                        st.steps.push(StepTrace {
                            step: path.clone(),
                            detail: json!({"from": to, "skipped": w}),
                        });
                        return Flow::Continue;
                    }
                    Err(e) => return fail(st, &format!("{path}.when"), e),
                }
            }
            let args = match eval_with(st, path, with, &ctx) {
                Ok(a) => a,
                Err(flow) => return flow,
            };
            let call = LookupCall {
                name,
                sink,
                action,
                with: &args,
                pipeline: st.pipeline,
                event_id: st.event_id,
            };
            match st.effects.fetch(&call) {
                Ok(answer) => {
                    st.steps.push(StepTrace {
                        step: path.clone(),
                        detail: json!({"from": to, "with": args, "as": name}),
                    });
                    st.ctx.insert(name.clone(), answer.clone());
                    st.vars.insert(name.clone(), answer);
                    Flow::Continue
                }
                Err(LookupError::Fail(e)) => fail(st, path, format!("lookup `{to}`: {e}")),
                Err(LookupError::Retry(reason)) => {
                    st.steps.push(StepTrace {
                        step: path.clone(),
                        detail: json!({"from": to, "with": args, "deferred": reason}),
                    });
                    Flow::Stop(Outcome::Deferred {
                        step: path.clone(),
                        reason: format!(
                            "pipeline `{}`, {path}: lookup `{to}`: {reason}",
                            st.pipeline
                        ),
                    })
                }
            }
        }
        Step::Ledger {
            path,
            kind,
            member,
            points,
            reason,
            key,
            hold,
            when,
        } => {
            match step_when(st, path, when, &ctx) {
                Ok(true) => {}
                Ok(false) => return Flow::Continue,
                Err(flow) => return flow,
            }
            let member = match member_id(st, path, member, &ctx) {
                Ok(m) => m,
                Err(flow) => return flow,
            };
            let points = match eval_tree(st.engine, points, &ctx) {
                Ok(v) => match v.as_i64() {
                    Some(p) => p,
                    None => {
                        return fail(
                            st,
                            &format!("{path}.points"),
                            format!("points are a whole number, not {v}"),
                        )
                    }
                },
                Err(e) => return fail(st, &format!("{path}.points"), e),
            };
            let reason = match reason_text(st, path, reason, &ctx, || {
                format!("pipeline {}", st.pipeline)
            }) {
                Ok(r) => r,
                Err(flow) => return flow,
            };
            if points == 0 && *kind != crate::ledger::Kind::Adjust {
                // Nothing earned or spent: no entry.
                st.steps.push(StepTrace {
                    step: path.clone(),
                    detail: json!({"member": member, "points": 0, "skipped": "0 points"}),
                });
                return Flow::Continue;
            }
            // One entry per event, pipeline and step, whatever the retries and replays; or
            // per the step's own `key` (an order id) within the source and pipeline.
            let idempotency_key = match key.as_ref().map(|k| eval_tree(st.engine, k, &ctx)) {
                None => format!("{}:{}:{}:{path}", st.source, st.event_id, st.pipeline),
                Some(Ok(k)) if !k.is_null() && k != json!("") => {
                    let k = k
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| k.to_string());
                    crate::ledger::keyed(st.source, &k)
                }
                Some(Ok(k)) => {
                    return fail(st, &format!("{path}.key"), format!("an empty key ({k})"))
                }
                Some(Err(e)) => return fail(st, &format!("{path}.key"), e),
            };
            let mut op = crate::ledger::Op::new(
                member,
                *kind,
                points,
                reason,
                format!("{}:{}", st.source, st.event_id),
                idempotency_key,
            );
            op.hold_until_ms =
                hold.map(|h| crate::delivery::now_ms().saturating_add(h.as_millis() as u64));
            match st.effects.ledger(&op) {
                Ok(a) => ledger_result(st, path, &a, None),
                Err(e) => effect_failed(st, path, "ledger", e),
            }
        }
        Step::Enroll {
            path,
            member,
            email,
            phone,
            birthday,
            attributes,
            when,
        } => {
            match step_when(st, path, when, &ctx) {
                Ok(true) => {}
                Ok(false) => return Flow::Continue,
                Err(flow) => return flow,
            }
            let member = match member_id(st, path, member, &ctx) {
                Ok(m) => m,
                Err(flow) => return flow,
            };
            let text = |name: &str, t: &Option<Tmpl>| -> Result<Option<String>, Flow> {
                match t.as_ref().map(|t| eval_tree(st.engine, t, &ctx)) {
                    None | Some(Ok(Json::Null)) => Ok(None),
                    Some(Ok(Json::String(s))) => Ok(Some(s)),
                    Some(Ok(other)) => Ok(Some(other.to_string())),
                    Some(Err(e)) => Err(fail(st, &format!("{path}.{name}"), e)),
                }
            };
            let (email, phone, birthday) = match (
                text("email", email),
                text("phone", phone),
                text("birthday", birthday),
            ) {
                (Ok(e), Ok(p), Ok(b)) => (e, p, b),
                (Err(f), _, _) | (_, Err(f), _) | (_, _, Err(f)) => return f,
            };
            let attributes = match eval_with(st, &format!("{path}.attributes"), attributes, &ctx) {
                Ok(Json::Object(m)) => m,
                Ok(_) => Map::new(),
                Err(flow) => return flow,
            };
            let profile = crate::ledger::Profile {
                email,
                phone,
                birthday,
                attributes,
            };
            match st.effects.enroll(&member, profile) {
                Ok(m) => {
                    let result = json!({
                        "member": m.id, "balance": m.balance, "lifetime": m.lifetime,
                        "pending": m.pending, "profile": m.profile,
                    });
                    set_var(st, "loyalty", result.clone());
                    st.steps.push(StepTrace {
                        step: path.clone(),
                        detail: result,
                    });
                    Flow::Continue
                }
                Err(e) => effect_failed(st, path, "member profile", e),
            }
        }
        Step::IssueCode {
            path,
            pool,
            member,
            key: order,
            when,
        } => {
            match step_when(st, path, when, &ctx) {
                Ok(true) => {}
                Ok(false) => {
                    set_var(st, "code", Json::Null);
                    return Flow::Continue;
                }
                Err(flow) => return flow,
            }
            let member = match member_id(st, path, member, &ctx) {
                Ok(m) => m,
                Err(flow) => return flow,
            };
            let order = match order
                .as_ref()
                .map(|k| id_field(st, path, "key", k, &ctx, |v| format!("an empty key ({v})")))
            {
                None => None,
                Some(Ok(k)) => Some(crate::ledger::keyed(st.source, &k)),
                Some(Err(flow)) => return flow,
            };
            let key = format!("{}:{}:{}:{path}", st.source, st.event_id, st.pipeline);
            match st.effects.issue_code(pool, &member, &key, order.as_deref()) {
                Ok(code) => {
                    set_var(st, "code", code.clone());
                    st.steps.push(StepTrace {
                        step: path.clone(),
                        detail: json!({"pool": pool, "member": member, "code": code}),
                    });
                    Flow::Continue
                }
                Err(e) => effect_failed(st, path, "promo code", e),
            }
        }
        Step::Reverse {
            path,
            key,
            id,
            points,
            reason,
            cancel,
            cumulative,
            when,
        } => {
            match step_when(st, path, when, &ctx) {
                Ok(true) => {}
                Ok(false) => return Flow::Continue,
                Err(flow) => return flow,
            }
            let key = match id_field(st, path, "key", key, &ctx, |v| {
                format!("an empty key ({v})")
            }) {
                Ok(k) => k,
                Err(flow) => return flow,
            };
            let points = match points.as_ref().map(|p| eval_tree(st.engine, p, &ctx)) {
                None => None,
                Some(Ok(v)) => match v.as_i64() {
                    Some(p) if p > 0 => Some(p),
                    _ => {
                        return fail(
                            st,
                            &format!("{path}.points"),
                            format!("points are a positive whole number, not {v}"),
                        )
                    }
                },
                Some(Err(e)) => return fail(st, &format!("{path}.points"), e),
            };
            let reason = match reason_text(st, path, reason, &ctx, || {
                format!("pipeline {}: reversal of {key}", st.pipeline)
            }) {
                Ok(r) => r,
                Err(flow) => return flow,
            };
            // One reversal per event and step, or per the step's own `id` (a refund id).
            let idempotency_key = match id
                .as_ref()
                .map(|t| id_field(st, path, "id", t, &ctx, |v| format!("an empty id ({v})")))
            {
                None => format!("{}:{}:{}:{path}", st.source, st.event_id, st.pipeline),
                Some(Ok(i)) => format!("{}:reversal:{i}", st.source),
                Some(Err(flow)) => return flow,
            };
            let r = crate::ledger::Reversal {
                of: crate::ledger::keyed(st.source, &key),
                points,
                reason,
                source: format!("{}:{}", st.source, st.event_id),
                idempotency_key,
                cancel: cancel.clone(),
                cumulative: *cumulative,
            };
            match st.effects.reverse(&r) {
                Ok(done) => {
                    let flow = match &done.applied {
                        Some(a) => ledger_result(st, path, a, Some(true)),
                        None => {
                            let result = json!({"found": false, "key": key, "points": 0});
                            set_var(st, "loyalty", result.clone());
                            st.steps.push(StepTrace {
                                step: path.clone(),
                                detail: result,
                            });
                            Flow::Continue
                        }
                    };
                    let mut loyalty = st.ctx.get("loyalty").cloned().unwrap_or(json!({}));
                    loyalty["voided_codes"] = json!(done.voided);
                    loyalty["cancelled"] = json!(done.cancelled);
                    set_var(st, "loyalty", loyalty);
                    if let Some(t) = st.steps.last_mut() {
                        t.detail["voided_codes"] = json!(done.voided);
                        t.detail["cancelled"] = json!(done.cancelled);
                    }
                    flow
                }
                Err(e) => effect_failed(st, path, "ledger", e),
            }
        }
        Step::Deliver {
            path,
            id,
            sink,
            action,
            keep,
            when,
            with,
        } => {
            if let Some(w) = when {
                match st.engine.condition(w, &ctx) {
                    Ok(true) => {}
                    Ok(false) => {
                        st.steps.push(StepTrace {
                            step: path.clone(),
                            detail: json!({"to": format!("{sink}.{action}"), "skipped": w}),
                        });
                        return Flow::Continue;
                    }
                    Err(e) => return fail(st, &format!("{path}.when"), e),
                }
            }
            let out = match eval_with(st, path, with, &ctx) {
                Ok(o) => o,
                Err(flow) => return flow,
            };
            let keep = match keep {
                None => None,
                Some(k) => match member_id(st, &format!("{path}.keep"), &k.member, &ctx) {
                    Ok(member) => Some(crate::outbox::Keep {
                        member,
                        attribute: k.name.clone(),
                        pointer: k.from.clone(),
                    }),
                    Err(flow) => return flow,
                },
            };
            let d = Delivery {
                step: path.clone(),
                id: id.clone(),
                sink: sink.clone(),
                action: action.clone(),
                with: out,
                keep,
            };
            st.steps.push(StepTrace {
                step: path.clone(),
                detail: json!({"to": d.to(), "with": d.with}),
            });
            st.deliveries.push(d);
            Flow::Continue
        }
    }
}

fn eval_tree(engine: &Engine, t: &Tmpl, ctx: &Json) -> Result<Json, String> {
    match t {
        Tmpl::Field(f) => engine.eval(f, ctx),
        Tmpl::Literal(v) => Ok(v.clone()),
        Tmpl::List(items) => items
            .iter()
            .map(|x| eval_tree(engine, x, ctx))
            .collect::<Result<Vec<_>, _>>()
            .map(Json::Array),
        Tmpl::Map(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                out.insert(k.clone(), eval_tree(engine, x, ctx)?);
            }
            Ok(Json::Object(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::diagnostic::Diagnostics;
    use crate::pipeline::spec::{load_one, Scope};
    use serde_json::json;

    fn pipeline(steps: &str) -> Pipeline {
        let cfg = crate::config::load_text(
            std::path::Path::new("perkflow.yaml"),
            true,
            "sources:\n  shop: { connector: shopify, secret: s }\nsinks:\n  sms: { connector: twilio_sms, account_sid: a, auth_token: b }\n  books: { connector: quickbooks, access_token: t }\npipelines: []\n",
        )
        .unwrap();
        let engine = Engine::new();
        let scope = Scope {
            sources: &cfg.sources,
            sinks: &cfg.sinks,
            connectors: &cfg.connectors,
            pools: &cfg.promo_codes,
            engine: &engine,
            invalid: Default::default(),
            deliver_count: Default::default(),
            deliver_ids: Default::default(),
            known: Default::default(),
        };
        let text =
            format!("pipeline: t\non: {{ source: shop, events: [orders/paid] }}\nsteps:\n{steps}");
        let mut diags = Diagnostics::default();
        load_one(std::path::Path::new("t.yaml"), &text, &scope, &mut diags)
            .unwrap_or_else(|| panic!("{diags}"))
    }

    fn input(total: &str, phone: Json) -> EventInput {
        EventInput {
            source: "shop".into(),
            event_type: "orders/paid".into(),
            event_id: "e1".into(),
            headers: Map::new(),
            event: json!({"total_price": total, "currency": "USD", "customer": {"phone": phone}}),
        }
    }

    const STEPS: &str = r#"  - set: { cents: "{{ (event.total_price | money(event.currency)).minor }}" }
  - switch:
      cases:
        - when: "cents >= 10000"
          steps: [ { set: { tier: gold } } ]
        - when: "cents >= 5000"
          steps: [ { set: { tier: silver } } ]
      default: [ { set: { tier: bronze } } ]
  - deliver: { to: sms.send_sms, when: "event.customer.phone", with: { to: "{{ event.customer.phone }}", body: "{{ tier }}" } }
  - when: "tier != 'bronze'"
  - set: { done: true }
"#;

    #[test]
    fn switch_picks_the_first_matching_case_and_deliveries_obey_their_when() {
        let e = Engine::new();
        let p = pipeline(STEPS);
        let r = run(
            &p,
            &e,
            &input("125.00", json!("+15555550123")),
            &Stubs::default(),
        );
        assert_eq!(r.outcome, Outcome::Completed);
        assert_eq!(r.vars["tier"], json!("gold"));
        assert_eq!(r.vars["done"], json!(true));
        assert_eq!(r.deliveries.len(), 1);
        assert_eq!(
            r.deliveries[0].with,
            json!({"to": "+15555550123", "body": "gold"})
        );
        let r = run(&p, &e, &input("60.00", Json::Null), &Stubs::default());
        assert_eq!(r.vars["tier"], json!("silver"));
        assert!(r.deliveries.is_empty(), "the SMS needs a phone");
        let r = run(
            &p,
            &e,
            &input("10.00", json!("+15555550123")),
            &Stubs::default(),
        );
        assert_eq!(
            r.outcome,
            Outcome::Filtered {
                step: "steps[3].when".into()
            }
        );
        assert_eq!(r.deliveries.len(), 1, "deliveries before the filter stand");
        assert!(!r.vars.contains_key("done"));
    }

    #[test]
    fn deliver_ids_do_not_move_when_other_steps_are_added() {
        let e = Engine::new();
        let ids = |steps: &str| -> Vec<String> {
            run(
                &pipeline(steps),
                &e,
                &input("1.00", json!("+15555550123")),
                &Stubs::default(),
            )
            .deliveries
            .iter()
            .map(|d| d.id.clone())
            .collect()
        };
        let two = "  - deliver: { to: sms.send_sms, with: { body: a } }\n  - deliver: { to: sms.send_sms, id: thanks, with: { body: b } }\n";
        assert_eq!(ids(two), ["sms.send_sms#0", "thanks"]);
        let more = format!("  - set: {{ x: 1 }}\n  - when: \"x == 1\"\n{two}");
        assert_eq!(ids(&more), ["sms.send_sms#0", "thanks"]);
    }

    #[test]
    fn a_failing_field_fails_the_run_visibly_and_delivers_nothing() {
        let e = Engine::new();
        let p = pipeline(STEPS);
        let r = run(
            &p,
            &e,
            &input("not money", json!("+15555550123")),
            &Stubs::default(),
        );
        match &r.outcome {
            Outcome::Failed { step, error } => {
                assert_eq!(step, "steps[0].set.cents");
                assert!(
                    error.starts_with("pipeline `t`, steps[0].set.cents: "),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(r.deliveries.is_empty());
    }

    /// A ledger that remembers keys (the entry of a key's first operation answers again).
    #[derive(Default)]
    struct Remembering(
        std::cell::RefCell<std::collections::HashMap<String, crate::ledger::Applied>>,
    );

    impl Effects for Remembering {
        fn fetch(&self, _: &LookupCall) -> Result<Json, LookupError> {
            Err(LookupError::Retry("unavailable".into()))
        }
        fn ledger(&self, op: &crate::ledger::Op) -> Result<crate::ledger::Applied, LookupError> {
            let mut seen = self.0.borrow_mut();
            if let Some(first) = seen.get(&op.idempotency_key) {
                return Ok(crate::ledger::Applied {
                    duplicate: true,
                    ..first.clone()
                });
            }
            let a = dry_ledger(op)?;
            seen.insert(op.idempotency_key.clone(), a.clone());
            Ok(a)
        }
    }

    /// `loyalty.duplicate` is a key another event applied: the same event's run again
    /// (after a crash, a deferred lookup, a replay) still delivers (with the same job keys).
    #[test]
    fn the_same_events_run_again_is_not_a_duplicate_another_events_is() {
        let e = Engine::new();
        let p = pipeline(
            "  - loyalty.accrue: { member: a@example.com, points: 5, key: \"order-1\" }\n  - deliver: { to: sms.send_sms, when: \"not loyalty.duplicate\", with: { to: \"+15555550123\", body: hi } }\n",
        );
        let ledger = Remembering::default();
        let first = input("1", Json::Null);
        for _ in 0..2 {
            let r = run(&p, &e, &first, &ledger);
            assert_eq!(r.vars["loyalty"]["duplicate"], false);
            assert_eq!(r.deliveries.len(), 1);
        }
        let other = EventInput {
            event_id: "e2".into(),
            ..input("1", Json::Null)
        };
        let r = run(&p, &e, &other, &ledger);
        assert_eq!(r.vars["loyalty"]["duplicate"], true);
        assert!(r.deliveries.is_empty());
    }

    /// Answers by variable name; counts the calls.
    struct Scripted(
        std::collections::HashMap<&'static str, Result<Json, LookupError>>,
        std::cell::Cell<usize>,
    );

    impl Effects for Scripted {
        fn fetch(&self, call: &LookupCall) -> Result<Json, LookupError> {
            self.1.set(self.1.get() + 1);
            assert_eq!(call.event_id, "e1");
            assert_eq!(call.pipeline, "t");
            self.0[call.name].clone()
        }
    }

    const LOOKUP: &str = r#"  - lookup:
      from: books.customer
      when: "event.customer.phone"
      with: { realm: "9", id: "{{ event.total_price }}" }
      as: c
  - deliver: { to: sms.send_sms, with: { to: "{{ event.customer.phone }}", body: "{{ c.Customer.GivenName if c else 'none' }}" } }
"#;

    #[test]
    fn a_lookup_answer_is_a_variable_for_later_steps() {
        let e = Engine::new();
        let p = pipeline(LOOKUP);
        let l = Scripted(
            [("c", Ok(json!({"Customer": {"GivenName": "Dana"}})))].into(),
            Default::default(),
        );
        let r = run(&p, &e, &input("58", json!("+15555550123")), &l);
        assert_eq!(r.outcome, Outcome::Completed);
        assert_eq!(r.vars["c"], json!({"Customer": {"GivenName": "Dana"}}));
        assert_eq!(r.deliveries[0].with["body"], "Dana");
        assert_eq!(
            r.steps[0].detail,
            json!({"from": "books.customer", "with": {"realm": "9", "id": "58"}, "as": "c"})
        );
        // A false `when` skips the call; the variable is null.
        let r = run(&p, &e, &input("58", Json::Null), &l);
        assert_eq!(l.1.get(), 1);
        assert_eq!(r.vars["c"], Json::Null);
        assert_eq!(r.deliveries[0].with["body"], "none");
    }

    #[test]
    fn a_lookup_that_fails_for_now_defers_the_run_and_one_that_fails_for_good_fails_it() {
        let e = Engine::new();
        let p = pipeline(LOOKUP);
        let later = Scripted(
            [("c", Err(LookupError::Retry("HTTP 503: unavailable".into())))].into(),
            Default::default(),
        );
        let r = run(&p, &e, &input("58", json!("+15555550123")), &later);
        assert_eq!(
            r.outcome,
            Outcome::Deferred {
                step: "steps[0].lookup".into(),
                reason:
                    "pipeline `t`, steps[0].lookup: lookup `books.customer`: HTTP 503: unavailable"
                        .into()
            }
        );
        assert!(r.deliveries.is_empty());
        let never = Scripted(
            [(
                "c",
                Err(LookupError::Fail("HTTP 400: Object Not Found".into())),
            )]
            .into(),
            Default::default(),
        );
        let r = run(&p, &e, &input("58", json!("+15555550123")), &never);
        assert_eq!(
            r.outcome,
            Outcome::Failed {
                step: "steps[0].lookup".into(),
                error: "pipeline `t`, steps[0].lookup: lookup `books.customer`: HTTP 400: Object Not Found".into()
            }
        );
        assert!(r.deliveries.is_empty());
        // Stubs without an answer fail, saying how to give one.
        let r = run(
            &p,
            &e,
            &input("58", json!("+15555550123")),
            &Stubs::default(),
        );
        assert!(
            matches!(&r.outcome, Outcome::Failed { error, .. } if error.contains("--lookup c=FILE")),
            "{:?}",
            r.outcome
        );
    }
}
