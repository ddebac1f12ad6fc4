//! `pipelines/*.yaml`: one pipeline per file, parsed step by step (every problem reported
//! with `file:line:col`) and checked against the config (source, event types, sinks) and the
//! expression engine (every template compiles).

use super::expr::{Engine, Field};
use crate::config::diagnostic::{listed, suggestion, Diagnostic, Diagnostics};
use crate::config::yaml::{join, Document};
use crate::config::{Sink, Source};
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineSpec {
    pipeline: String,
    on: OnSpec,
    // Parsed entry by entry below.
    #[allow(dead_code)]
    steps: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    tests: Vec<serde::de::IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnSpec {
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub events: Vec<String>,
    /// A cron-style trigger instead of a source: an event per matching member at each fire
    /// (source `schedule`, event type the pipeline's name).
    #[serde(default)]
    pub schedule: Option<crate::schedule::ScheduleSpec>,
}

/// One step, as written: a single-key map.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum StepSpec {
    /// A condition: false ends the run (recorded as filtered).
    When(String),
    /// Named variables, evaluated in order.
    Set(IndexMap<String, serde_yaml::Value>),
    /// The first case whose `when` holds runs its steps; else `default`.
    Switch(SwitchSpec),
    /// A read through a sink connector (an HTTP GET, or a search the connector marks
    /// read-only); its answer becomes a variable.
    Lookup(LookupSpec),
    /// A sink action.
    Deliver(DeliverSpec),
    /// Points earned (the ledger; idempotent per event and step).
    #[serde(rename = "loyalty.accrue")]
    LoyaltyAccrue(LedgerSpec),
    /// Points spent; refused (the run fails) beyond the balance.
    #[serde(rename = "loyalty.redeem")]
    LoyaltyRedeem(LedgerSpec),
    /// A correction, either way.
    #[serde(rename = "loyalty.adjust")]
    LoyaltyAdjust(LedgerSpec),
    /// Takes back what an earlier keyed accrual earned (a refund).
    #[serde(rename = "loyalty.reverse")]
    LoyaltyReverse(ReverseSpec),
    /// Assigns a unique promo code from a pool to a member (once per event and step).
    #[serde(rename = "loyalty.issue_code")]
    LoyaltyIssueCode(IssueCodeSpec),
    /// Creates the member if new and records its profile (e-mail and phone aliases,
    /// birthday, attributes).
    #[serde(rename = "loyalty.enroll")]
    LoyaltyEnroll(EnrollSpec),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollSpec {
    member: serde_yaml::Value,
    #[serde(default)]
    email: Option<serde_yaml::Value>,
    #[serde(default)]
    phone: Option<serde_yaml::Value>,
    #[serde(default)]
    birthday: Option<serde_yaml::Value>,
    #[serde(default)]
    attributes: IndexMap<String, serde_yaml::Value>,
    #[serde(default)]
    when: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueCodeSpec {
    pool: String,
    member: serde_yaml::Value,
    /// The order the code is for: a refund of that order (`loyalty.reverse` with the same
    /// key) voids it while it is unused.
    #[serde(default)]
    key: Option<serde_yaml::Value>,
    #[serde(default)]
    when: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReverseSpec {
    /// The `key` of the accrual to take back (an order id).
    key: serde_yaml::Value,
    /// At most this many points (a partial refund); default: all it earned.
    #[serde(default)]
    points: Option<serde_yaml::Value>,
    #[serde(default)]
    reason: Option<serde_yaml::Value>,
    /// What makes two reversals the same (default: the event and the step): a refund id, so
    /// the vendor's several events about one refund reverse once.
    #[serde(default)]
    id: Option<serde_yaml::Value>,
    /// Sinks whose not-yet-sent deliveries for the order (and for the rewards its points
    /// triggered) are cancelled: pending gift-card orders of a refunded order.
    #[serde(default)]
    cancel: Vec<String>,
    /// `points` is the running total refunded so far (Stripe's `amount_refunded`): each
    /// reversal takes back what that total adds to the earlier ones.
    #[serde(default)]
    cumulative: bool,
    #[serde(default)]
    when: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerSpec {
    member: serde_yaml::Value,
    points: serde_yaml::Value,
    #[serde(default)]
    reason: Option<serde_yaml::Value>,
    /// What makes two operations the same (default: the event and the step). An order id
    /// here awards an order once even when the vendor sends it again as a new event.
    #[serde(default)]
    key: Option<serde_yaml::Value>,
    /// Accruals only: the points stay pending this long (`14d`, a return window) before
    /// they can be spent.
    #[serde(default)]
    hold: Option<String>,
    #[serde(default)]
    when: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupSpec {
    /// `<sink>.<action>`; the action must only read.
    from: String,
    /// The variable that receives the vendor's JSON answer.
    #[serde(rename = "as")]
    name: String,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    with: IndexMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchSpec {
    cases: Vec<CaseSpec>,
    #[serde(default)]
    default: Vec<serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseSpec {
    when: String,
    steps: Vec<serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliverSpec {
    to: String,
    /// A stable name for this delivery (default `<sink>.<action>#<n>`).
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    with: IndexMap<String, serde_yaml::Value>,
    /// Stores a value of the vendor's answer on a member once delivered (a booking API's
    /// promo code), and emits `loyalty.attribute_stored`.
    #[serde(default)]
    keep: Option<KeepSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeepSpec {
    member: serde_yaml::Value,
    /// The attribute's name on the member.
    #[serde(rename = "as")]
    name: String,
    /// A JSON pointer into the answer (`/promo_code`).
    from: String,
}

/// A checked `keep`: the member, the attribute, the pointer.
#[derive(Debug, Clone, PartialEq)]
pub struct Keep {
    pub member: Tmpl,
    pub name: String,
    pub from: String,
}

/// Reads an enum written as a single-key map (`- when: "…"`), keeping exact error places.
struct SingleKey<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for SingleKey<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_yaml::with::singleton_map_recursive::deserialize(d).map(SingleKey)
    }
}

/// A value tree whose strings are compiled fields.
#[derive(Debug, Clone, PartialEq)]
pub enum Tmpl {
    Field(Field),
    List(Vec<Tmpl>),
    Map(IndexMap<String, Tmpl>),
    Literal(Json),
}

/// A checked step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    When {
        path: String,
        expr: String,
    },
    Set {
        path: String,
        vars: IndexMap<String, Tmpl>,
    },
    Switch {
        path: String,
        cases: Vec<(String, Vec<Step>)>,
        default: Vec<Step>,
    },
    Lookup {
        path: String,
        /// The variable set to the answer.
        name: String,
        sink: String,
        action: String,
        when: Option<String>,
        with: IndexMap<String, Tmpl>,
    },
    Deliver {
        path: String,
        id: String,
        sink: String,
        action: String,
        keep: Option<Keep>,
        when: Option<String>,
        with: IndexMap<String, Tmpl>,
    },
    /// Assigns a code of `pool` to `member`; the result is `code` for later steps.
    IssueCode {
        path: String,
        pool: String,
        member: Tmpl,
        key: Option<Tmpl>,
        when: Option<String>,
    },
    /// Creates or updates a member's profile; the result is `loyalty` for later steps.
    Enroll {
        path: String,
        member: Tmpl,
        email: Option<Tmpl>,
        phone: Option<Tmpl>,
        birthday: Option<Tmpl>,
        attributes: IndexMap<String, Tmpl>,
        when: Option<String>,
    },
    /// Takes back what the accrual with this `key` earned.
    Reverse {
        path: String,
        key: Tmpl,
        id: Option<Tmpl>,
        points: Option<Tmpl>,
        reason: Option<Tmpl>,
        cancel: Vec<String>,
        cumulative: bool,
        when: Option<String>,
    },
    /// A ledger operation; its result is `balance`, `lifetime` and `loyalty` for later steps.
    Ledger {
        path: String,
        kind: crate::ledger::Kind,
        member: Tmpl,
        points: Tmpl,
        reason: Option<Tmpl>,
        key: Option<Tmpl>,
        hold: Option<std::time::Duration>,
        when: Option<String>,
    },
}

/// A pipeline test case, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestSpec {
    pub name: String,
    pub fixture: PathBuf,
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// The answers of `lookup` steps, by variable name: a JSON file (a string) or the
    /// answer written inline.
    #[serde(default)]
    pub lookups: IndexMap<String, serde_yaml::Value>,
    #[serde(default)]
    pub expect: ExpectSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSpec {
    /// Exactly these deliveries, in order; each `with` matched partially.
    #[serde(default)]
    pub deliveries: Option<Vec<ExpectedDelivery>>,
    /// Variables after the run, matched partially.
    #[serde(default)]
    pub values: IndexMap<String, serde_yaml::Value>,
    /// The run ends in a `when` that is false.
    #[serde(default)]
    pub filtered: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedDelivery {
    pub to: String,
    #[serde(default)]
    pub with: IndexMap<String, serde_yaml::Value>,
}

/// A checked pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    pub on: OnSpec,
    pub steps: Vec<Step>,
    pub tests: Vec<TestSpec>,
}

/// What a pipeline may refer to.
pub struct Scope<'a> {
    pub sources: &'a IndexMap<String, Source>,
    pub sinks: &'a IndexMap<String, Sink>,
    pub connectors: &'a crate::connector::Registry,
    /// Promo code pools (`loyalty.issue_code`).
    pub pools: &'a IndexMap<String, crate::codes::PoolSpec>,
    pub engine: &'a Engine,
    /// Sources, sinks and pools the config names but could not accept (`sources.x`,
    /// `sinks.x`, `promo_codes.x`): their own problems are reported there, so a reference to
    /// one is not reported again as unknown.
    pub invalid: std::collections::HashSet<String>,
    /// Per pipeline file: deliver steps seen so far, and their ids.
    pub deliver_count: std::cell::Cell<usize>,
    pub deliver_ids: std::cell::RefCell<std::collections::HashSet<String>>,
    /// Names a step may read: the run's own and the variables set before it.
    pub known: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl Scope<'_> {
    /// Whether `section.name` is in the config but was refused there.
    fn invalid(&self, section: &str, name: &str) -> bool {
        self.invalid.contains(&format!("{section}.{name}"))
    }

    /// The definition of `action` on the sink named `sink`, if both exist.
    fn action(&self, sink: &str, action: &str) -> Option<&crate::connector::sink::ActionDef> {
        let k = self.sinks.get(sink)?;
        self.connectors
            .get(&k.connector)?
            .sink
            .as_ref()?
            .actions
            .get(action)
    }

    /// Reports `with:` keys the action never reads (a typo there would leave the vendor
    /// request without the value, found only when an event comes).
    fn check_with_keys<'k>(
        &self,
        doc: &Document,
        path: &str,
        sink: &str,
        action: &str,
        keys: impl Iterator<Item = &'k String>,
        diags: &mut Diagnostics,
    ) {
        let Some(reads) = self.action(sink, action).and_then(|a| a.reads.as_ref()) else {
            return;
        };
        if reads.whole {
            return;
        }
        for key in keys {
            if reads.keys.contains(key) {
                continue;
            }
            let hint = suggestion(key, reads.keys.iter().map(String::as_str));
            let known: Vec<&str> = reads.keys.iter().map(String::as_str).collect();
            diags.push(doc.at_key(
                &join(&join(path, "with"), key),
                format!(
                    "`{sink}.{action}` does not read `{key}`{hint}; it reads: {}",
                    listed(&known, "nothing")
                ),
            ));
        }
    }

    /// Reports names `src` reads that nothing provides (with a did-you-mean).
    fn check_names(
        &self,
        doc: &Document,
        path: &str,
        src: &str,
        condition: bool,
        diags: &mut Diagnostics,
    ) {
        let known = self.known.borrow();
        for name in self.engine.unknown_names(src, condition, &known) {
            let hint = suggestion(&name, known.iter().map(String::as_str));
            diags.push(doc.at(
                path,
                format!(
                    "unknown variable `{name}`{hint}: only {} and the variables of earlier `set` and `lookup` steps exist",
                    super::run::RESERVED.join(", ")
                ),
            ));
        }
        for u in self.engine.unknown_filters_and_tests(src, condition) {
            let hint = u
                .suggestion
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            diags.push(doc.at(path, format!("unknown {} `{}`{hint}", u.kind, u.name)));
        }
    }
}

/// Loads every `*.yaml` in `dirs`; problems go to `diags`.
pub fn load_dirs(
    dirs: &[PathBuf],
    scope: &Scope,
    diags: &mut Diagnostics,
) -> IndexMap<String, Pipeline> {
    let mut out: IndexMap<String, Pipeline> = IndexMap::new();
    for (f, text) in crate::config::yaml_files(dirs, "pipelines", diags) {
        let Some(p) = load_one(&f, &text, scope, diags) else {
            continue;
        };
        if let Some(prev) = out.get(&p.name) {
            let msg = format!(
                "pipeline `{}` is also defined in {}",
                p.name,
                prev.file.display()
            );
            // At the name, as every other problem is at its place.
            let at = Document::index(&f, &text).map(|doc| doc.at("pipeline", msg.clone()));
            diags.push(at.unwrap_or_else(|_| Diagnostic::new(&f, 1, 1, "pipeline", msg)));
            continue;
        }
        out.insert(p.name.clone(), p);
    }
    out
}

/// Parses and checks one pipeline file.
pub fn load_one(
    file: &Path,
    text: &str,
    scope: &Scope,
    diags: &mut Diagnostics,
) -> Option<Pipeline> {
    let doc = match Document::index(file, text) {
        Ok(d) => d,
        Err(d) => {
            diags.push(d);
            return None;
        }
    };
    let mut spec: PipelineSpec = match doc.parse() {
        Ok(s) => s,
        Err(d) => {
            diags.push(d);
            return None;
        }
    };
    let before = diags.len();
    if let Some(sched) = &spec.on.schedule {
        if !spec.on.source.is_empty() || !spec.on.events.is_empty() {
            diags.push(doc.at(
                "on.schedule",
                "a scheduled pipeline has no `source` or `events`: its events are the schedule's",
            ));
        }
        for (field, problem) in sched.check(scope.engine) {
            diags.push(doc.at(&format!("on.schedule.{field}"), problem));
        }
        spec.on.source = crate::schedule::SOURCE.to_string();
        spec.on.events = vec![spec.pipeline.clone()];
    }
    scope.deliver_count.set(0);
    scope.deliver_ids.borrow_mut().clear();
    *scope.known.borrow_mut() = super::run::RESERVED.iter().map(|s| s.to_string()).collect();
    check_on(&doc, &spec.on, scope, diags);
    let steps = parse_steps(&doc, "steps", scope, diags);
    let mut tests = Vec::new();
    for i in 0..spec.tests.len() {
        match doc.parse_at::<TestSpec>(&format!("tests[{i}]")) {
            Ok(t) => tests.push(t),
            Err(d) => diags.push(d),
        }
    }
    (diags.len() == before).then(|| Pipeline {
        name: spec.pipeline,
        file: file.to_path_buf(),
        on: spec.on,
        steps,
        tests,
    })
}

fn check_on(doc: &Document, on: &OnSpec, scope: &Scope, diags: &mut Diagnostics) {
    if on.schedule.is_some() {
        return; // checked on parsing
    }
    // The ledger's own events.
    if on.source == crate::ledger::SOURCE && !scope.sources.contains_key(&on.source) {
        let emits = [
            crate::ledger::THRESHOLD_CROSSED,
            crate::ledger::TIER_CHANGED,
            crate::ledger::ATTRIBUTE_STORED,
        ];
        for (i, ev) in on.events.iter().enumerate() {
            if !emits.contains(&ev.as_str()) {
                let hint = suggestion(ev, emits.iter().copied());
                diags.push(doc.at(
                    &format!("on.events[{i}]"),
                    format!(
                        "the ledger does not emit `{ev}`{hint}; it emits: {}",
                        emits.join(", ")
                    ),
                ));
            }
        }
        if on.events.is_empty() {
            diags.push(doc.at("on.events", "list at least one event type"));
        }
        return;
    }
    // A sink that follows what it created emits internal events under its own name.
    if !scope.sources.contains_key(&on.source) {
        if let Some(sink) = scope.sinks.get(&on.source) {
            let emits = scope
                .connectors
                .get(&sink.connector)
                .and_then(|c| c.sink.as_ref())
                .map(|s| s.emits())
                .unwrap_or_default();
            if emits.is_empty() {
                diags.push(doc.at(
                    "on.source",
                    format!(
                        "`{}` is a sink (connector `{}`) that emits no events",
                        on.source, sink.connector
                    ),
                ));
            }
            for (i, ev) in on.events.iter().enumerate() {
                if !emits.contains(ev) {
                    diags.push(doc.at(
                        &format!("on.events[{i}]"),
                        format!(
                            "sink `{}` does not emit `{ev}`; it emits: {}",
                            on.source,
                            emits.join(", ")
                        ),
                    ));
                }
            }
            if on.events.is_empty() {
                diags.push(doc.at("on.events", "list at least one event type"));
            }
            return;
        }
    }
    let Some(src) = scope.sources.get(&on.source) else {
        if scope.invalid("sources", &on.source) {
            return;
        }
        let hint = suggestion(&on.source, scope.sources.keys().map(String::as_str));
        diags.push(doc.at(
            "on.source",
            format!(
                "unknown source `{}`{hint}: sources are defined in the config",
                on.source
            ),
        ));
        return;
    };
    if on.events.is_empty() {
        diags.push(doc.at("on.events", "list at least one event type"));
    }
    for (i, ev) in on.events.iter().enumerate() {
        if let Err(why) = src.def.subscribable(ev) {
            let why = if why.is_empty() {
                String::new()
            } else {
                format!(" ({why})")
            };
            diags.push(doc.at(
                &format!("on.events[{i}]"),
                format!(
                    "connector `{}` does not emit `{ev}`{why}; it is known to emit: {}",
                    src.connector,
                    src.def.events.join(", ")
                ),
            ));
        }
    }
}

/// The steps of the list at `path`, each parsed on its own.
fn parse_steps(doc: &Document, path: &str, scope: &Scope, diags: &mut Diagnostics) -> Vec<Step> {
    let mut steps = Vec::new();
    for i in 0.. {
        let spath = format!("{path}[{i}]");
        if !doc.loc.has(&spath) {
            break;
        }
        match doc.parse_at::<SingleKey<StepSpec>>(&spath) {
            Ok(SingleKey(spec)) => {
                if let Some(step) = check_step(doc, &spath, spec, scope, diags) {
                    steps.push(step);
                }
            }
            Err(d) => diags.push(d),
        }
    }
    steps
}

fn check_step(
    doc: &Document,
    path: &str,
    spec: StepSpec,
    scope: &Scope,
    diags: &mut Diagnostics,
) -> Option<Step> {
    let before = diags.len();
    let step = match spec {
        StepSpec::When(expr) => {
            let p = join(path, "when");
            match scope.engine.check_condition(&expr) {
                Err(m) => diags.push(doc.at(&p, m)),
                Ok(()) => scope.check_names(doc, &p, &expr, true, diags),
            }
            Step::When { path: p, expr }
        }
        StepSpec::Set(vars) => {
            let mut out = IndexMap::new();
            for (k, v) in vars {
                let p = join(&join(path, "set"), &k);
                if super::run::RESERVED.contains(&k.as_str()) {
                    diags.push(doc.at_key(
                        &p,
                        format!("`{k}` is provided by every run and cannot be set"),
                    ));
                }
                out.insert(k.clone(), compile_tree(doc, &p, &v, scope, diags));
                scope.known.borrow_mut().insert(k);
            }
            Step::Set {
                path: join(path, "set"),
                vars: out,
            }
        }
        StepSpec::Switch(sw) => {
            let spath = join(path, "switch");
            let mut cases = Vec::new();
            for (i, c) in sw.cases.iter().enumerate() {
                let cpath = format!("{spath}.cases[{i}]");
                scope.check_names(doc, &join(&cpath, "when"), &c.when, true, diags);
                if let Err(m) = scope.engine.check_condition(&c.when) {
                    diags.push(doc.at(&join(&cpath, "when"), m));
                }
                let _ = &c.steps;
                cases.push((
                    c.when.clone(),
                    parse_steps(doc, &join(&cpath, "steps"), scope, diags),
                ));
            }
            let default = if sw.default.is_empty() {
                Vec::new()
            } else {
                parse_steps(doc, &join(&spath, "default"), scope, diags)
            };
            Step::Switch {
                path: spath,
                cases,
                default,
            }
        }
        StepSpec::Lookup(l) => {
            let lpath = join(path, "lookup");
            let (sink, action) = check_target(doc, &join(&lpath, "from"), &l.from, scope, diags)?;
            if let Some(act) = scope.action(&sink, &action) {
                if !act.reads_only() {
                    diags.push(doc.at(
                        &join(&lpath, "from"),
                        format!(
                            "`{}` is a {} that changes something at the vendor; a lookup may only read (use `deliver` to send it)",
                            l.from, act.method
                        ),
                    ));
                }
            }
            let when = check_when(doc, &lpath, l.when, scope, diags);
            scope.check_with_keys(doc, &lpath, &sink, &action, l.with.keys(), diags);
            let with = compile_with(doc, &lpath, l.with, scope, diags);
            let name_path = join(&lpath, "as");
            if super::run::RESERVED.contains(&l.name.as_str()) {
                diags.push(doc.at(
                    &name_path,
                    format!("`{}` is provided by every run and cannot be set", l.name),
                ));
            } else if !is_identifier(&l.name) {
                diags.push(doc.at(
                    &name_path,
                    format!("`{}`: a variable name is letters, digits and `_`, not starting with a digit", l.name),
                ));
            }
            scope.known.borrow_mut().insert(l.name.clone());
            Step::Lookup {
                path: lpath,
                name: l.name,
                sink,
                action,
                when,
                with,
            }
        }
        spec @ (StepSpec::LoyaltyAccrue(_)
        | StepSpec::LoyaltyRedeem(_)
        | StepSpec::LoyaltyAdjust(_)) => {
            let (name, kind, l) = match spec {
                StepSpec::LoyaltyAccrue(l) => ("loyalty.accrue", crate::ledger::Kind::Accrue, l),
                StepSpec::LoyaltyRedeem(l) => ("loyalty.redeem", crate::ledger::Kind::Redeem, l),
                StepSpec::LoyaltyAdjust(l) => ("loyalty.adjust", crate::ledger::Kind::Adjust, l),
                _ => unreachable!("matched above"),
            };
            let lpath = join(path, name);
            let when = check_when(doc, &lpath, l.when, scope, diags);
            let member = compile_tree(doc, &join(&lpath, "member"), &l.member, scope, diags);
            let points = compile_tree(doc, &join(&lpath, "points"), &l.points, scope, diags);
            let reason = l
                .reason
                .as_ref()
                .map(|r| compile_tree(doc, &join(&lpath, "reason"), r, scope, diags));
            let key = l
                .key
                .as_ref()
                .map(|k| compile_tree(doc, &join(&lpath, "key"), k, scope, diags));
            let hold = match (&l.hold, kind) {
                (None, _) => None,
                (Some(h), crate::ledger::Kind::Accrue) => match humantime::parse_duration(h) {
                    Ok(d) if !d.is_zero() => Some(d),
                    _ => {
                        diags.push(doc.at(
                            &join(&lpath, "hold"),
                            format!("`{h}` is not a positive duration (`14d`, `36h`)"),
                        ));
                        None
                    }
                },
                (Some(_), _) => {
                    diags.push(doc.at(
                        &join(&lpath, "hold"),
                        format!("only accruals are held (this is `{name}`)"),
                    ));
                    None
                }
            };
            {
                let mut known = scope.known.borrow_mut();
                for v in ["balance", "lifetime", "loyalty"] {
                    known.insert(v.to_string());
                }
            }
            Step::Ledger {
                path: lpath,
                kind,
                member,
                points,
                reason,
                key,
                hold,
                when,
            }
        }
        StepSpec::LoyaltyEnroll(e) => {
            let epath = join(path, "loyalty.enroll");
            let when = check_when(doc, &epath, e.when, scope, diags);
            let member = compile_tree(doc, &join(&epath, "member"), &e.member, scope, diags);
            let opt = |name: &str, v: &Option<serde_yaml::Value>, diags: &mut Diagnostics| {
                v.as_ref()
                    .map(|v| compile_tree(doc, &join(&epath, name), v, scope, diags))
            };
            let email = opt("email", &e.email, diags);
            let phone = opt("phone", &e.phone, diags);
            let birthday = opt("birthday", &e.birthday, diags);
            let apath = join(&epath, "attributes");
            let attributes = e
                .attributes
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        compile_tree(doc, &join(&apath, k), v, scope, diags),
                    )
                })
                .collect();
            scope.known.borrow_mut().insert("loyalty".to_string());
            Step::Enroll {
                path: epath,
                member,
                email,
                phone,
                birthday,
                attributes,
                when,
            }
        }
        StepSpec::LoyaltyIssueCode(c) => {
            let cpath = join(path, "loyalty.issue_code");
            if !scope.pools.contains_key(&c.pool) && !scope.invalid("promo_codes", &c.pool) {
                let hint = suggestion(&c.pool, scope.pools.keys().map(String::as_str));
                let known: Vec<&str> = scope.pools.keys().map(String::as_str).collect();
                diags.push(doc.at(
                    &join(&cpath, "pool"),
                    format!(
                        "unknown promo code pool `{}`{hint}; pools (promo_codes: in the config): {}",
                        c.pool,
                        listed(&known, "none")
                    ),
                ));
            }
            let when = check_when(doc, &cpath, c.when, scope, diags);
            let member = compile_tree(doc, &join(&cpath, "member"), &c.member, scope, diags);
            let key = c
                .key
                .as_ref()
                .map(|k| compile_tree(doc, &join(&cpath, "key"), k, scope, diags));
            scope.known.borrow_mut().insert("code".to_string());
            Step::IssueCode {
                path: cpath,
                pool: c.pool,
                member,
                key,
                when,
            }
        }
        StepSpec::LoyaltyReverse(r) => {
            let rpath = join(path, "loyalty.reverse");
            let when = check_when(doc, &rpath, r.when, scope, diags);
            let key = compile_tree(doc, &join(&rpath, "key"), &r.key, scope, diags);
            let id =
                r.id.as_ref()
                    .map(|x| compile_tree(doc, &join(&rpath, "id"), x, scope, diags));
            let points = r
                .points
                .as_ref()
                .map(|p| compile_tree(doc, &join(&rpath, "points"), p, scope, diags));
            let reason = r
                .reason
                .as_ref()
                .map(|x| compile_tree(doc, &join(&rpath, "reason"), x, scope, diags));
            if r.cumulative && r.points.is_none() {
                diags.push(doc.at(
                    &join(&rpath, "cumulative"),
                    "a cumulative reversal needs `points` (the running total refunded)",
                ));
            }
            for (i, sink) in r.cancel.iter().enumerate() {
                if !scope.sinks.contains_key(sink) && !scope.invalid("sinks", sink) {
                    let hint = suggestion(sink, scope.sinks.keys().map(String::as_str));
                    diags.push(doc.at(
                        &format!("{}[{i}]", join(&rpath, "cancel")),
                        format!("unknown sink `{sink}`{hint}"),
                    ));
                }
            }
            {
                let mut known = scope.known.borrow_mut();
                for v in ["balance", "lifetime", "loyalty"] {
                    known.insert(v.to_string());
                }
            }
            Step::Reverse {
                path: rpath,
                key,
                id,
                points,
                reason,
                cancel: r.cancel,
                cumulative: r.cumulative,
                when,
            }
        }
        StepSpec::Deliver(d) => {
            let dpath = join(path, "deliver");
            let (sink, action) = check_target(doc, &join(&dpath, "to"), &d.to, scope, diags)?;
            let when = check_when(doc, &dpath, d.when, scope, diags);
            scope.check_with_keys(doc, &dpath, &sink, &action, d.with.keys(), diags);
            let with = compile_with(doc, &dpath, d.with, scope, diags);
            let n = scope.deliver_count.get();
            scope.deliver_count.set(n + 1);
            let id = d.id.clone().unwrap_or_else(|| format!("{}#{n}", d.to));
            if !scope.deliver_ids.borrow_mut().insert(id.clone()) {
                diags.push(doc.at(
                    &join(&dpath, "id"),
                    format!("another deliver step of this pipeline is `{id}`"),
                ));
            }
            let keep = d.keep.as_ref().map(|k| {
                let kpath = join(&dpath, "keep");
                let valid = !k.name.is_empty()
                    && k.name.len() <= 64
                    && k.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    diags.push(doc.at(
                        &join(&kpath, "as"),
                        format!(
                            "`{}`: an attribute name is 1 to 64 letters, digits or `_`",
                            k.name
                        ),
                    ));
                }
                if !k.from.starts_with('/') {
                    diags.push(doc.at(
                        &join(&kpath, "from"),
                        format!(
                            "`{}` is not a JSON pointer into the answer (`/promo_code`)",
                            k.from
                        ),
                    ));
                }
                Keep {
                    member: compile_tree(doc, &join(&kpath, "member"), &k.member, scope, diags),
                    name: k.name.clone(),
                    from: k.from.clone(),
                }
            });
            Step::Deliver {
                path: dpath,
                id,
                sink,
                action,
                keep,
                when,
                with,
            }
        }
    };
    (diags.len() == before).then_some(step)
}

/// Resolves `<sink>.<action>` (written at `path`) against the config and the sink's
/// connector, reporting unknown names with a did-you-mean.
fn check_target(
    doc: &Document,
    path: &str,
    target: &str,
    scope: &Scope,
    diags: &mut Diagnostics,
) -> Option<(String, String)> {
    let Some((sink, action)) = target.split_once('.') else {
        diags.push(doc.at(
            path,
            format!("`{target}`: write the target as `<sink>.<action>`"),
        ));
        return None;
    };
    if scope.invalid("sinks", sink) {
        return None;
    }
    if !scope.sinks.contains_key(sink) {
        let hint = suggestion(sink, scope.sinks.keys().map(String::as_str));
        let known: Vec<&str> = scope.sinks.keys().map(String::as_str).collect();
        diags.push(doc.at(
            path,
            format!(
                "unknown sink `{sink}`{hint}; sinks in the config: {}",
                listed(&known, "none")
            ),
        ));
    }
    let actions = scope
        .sinks
        .get(sink)
        .and_then(|k| scope.connectors.get(&k.connector))
        .and_then(|c| c.sink.as_ref())
        .map(|d| (&d.actions, scope.sinks[sink].connector.as_str()));
    if let Some((actions, connector)) = actions {
        if !actions.contains_key(action) {
            let hint = suggestion(action, actions.keys().map(String::as_str));
            let known: Vec<&str> = actions.keys().map(String::as_str).collect();
            diags.push(doc.at(
                path,
                format!(
                    "sink connector `{connector}` has no action `{action}`{hint}; actions: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    Some((sink.to_string(), action.to_string()))
}

/// Checks a step's own `when` (at `<path>.when`).
fn check_when(
    doc: &Document,
    path: &str,
    when: Option<String>,
    scope: &Scope,
    diags: &mut Diagnostics,
) -> Option<String> {
    if let Some(w) = &when {
        let p = join(path, "when");
        scope.check_names(doc, &p, w, true, diags);
        if let Err(m) = scope.engine.check_condition(w) {
            diags.push(doc.at(&p, m));
        }
    }
    when
}

/// Compiles a step's `with` map (at `<path>.with`).
fn compile_with(
    doc: &Document,
    path: &str,
    with: IndexMap<String, serde_yaml::Value>,
    scope: &Scope,
    diags: &mut Diagnostics,
) -> IndexMap<String, Tmpl> {
    let mut out = IndexMap::new();
    for (k, v) in with {
        let p = join(&join(path, "with"), &k);
        out.insert(k, compile_tree(doc, &p, &v, scope, diags));
    }
    out
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Compiles every string of a YAML value as a field (reporting at its own place).
fn compile_tree(
    doc: &Document,
    path: &str,
    v: &serde_yaml::Value,
    scope: &Scope,
    diags: &mut Diagnostics,
) -> Tmpl {
    let engine = scope.engine;
    match v {
        serde_yaml::Value::String(s) => match engine.field(&crate::config::yaml::restore(s)) {
            Ok(f) => {
                scope.check_names(doc, path, &crate::config::yaml::restore(s), false, diags);
                Tmpl::Field(f)
            }
            Err(m) => {
                diags.push(doc.at(path, m));
                Tmpl::Literal(Json::Null)
            }
        },
        serde_yaml::Value::Sequence(items) => Tmpl::List(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| compile_tree(doc, &format!("{path}[{i}]"), x, scope, diags))
                .collect(),
        ),
        serde_yaml::Value::Mapping(m) => Tmpl::Map(
            m.iter()
                .map(|(k, x)| {
                    let key = match k {
                        serde_yaml::Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    };
                    let t = compile_tree(doc, &join(path, &key), x, scope, diags);
                    (key, t)
                })
                .collect(),
        ),
        other => Tmpl::Literal(serde_json::to_value(other).unwrap_or(Json::Null)),
    }
}
