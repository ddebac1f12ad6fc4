//! One expression/template engine for pipelines: minijinja.
//!
//! - A field that is exactly one `{{ expr }}` keeps the expression's type (numbers stay
//!   numbers, lists stay lists); any other string with `{{ }}`/`{% %}` renders to a string;
//!   a string without them is a literal.
//! - Conditions (`when`) are bare expressions; a missing field there is simply false.
//! - Values are strict: using a missing field is an error, never a silent empty string.
//! - Evaluation is sandboxed (no loader, no I/O) and bounded: by fuel (instructions), by
//!   minijinja's recursion limit, by [`MAX_VALUE`] (a template's output, an expression's
//!   value, and what the built-ins that multiply sizes by a number would make; see
//!   `filters::register_bounded`).

use super::numeric_mul;
use minijinja::value::ValueKind;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use serde_json::Value as Json;

/// Instructions an evaluation may run before it is stopped.
pub const FUEL: u64 = 100_000;

/// The largest template output or expression value, in bytes: what one field may hand to a
/// sink request, a trace or the outbox.
pub const MAX_VALUE: usize = 1 << 20;

/// Macro and call nesting (minijinja's default is 500).
const RECURSION_LIMIT: usize = 100;

fn too_large() -> String {
    format!("the value is larger than {} KiB", MAX_VALUE / 1024)
}

/// A template's output, refused past [`MAX_VALUE`] as it is written.
#[derive(Default)]
struct Capped {
    out: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > MAX_VALUE {
            self.overflowed = true;
            return Err(std::io::Error::other(too_large()));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `v` fits in `budget` bytes (strings by their length, anything else at least one
/// byte), looking at no more of it than that.
fn fits(v: &Value, budget: &mut usize, depth: usize) -> bool {
    let cost = v.as_str().map_or(1, |s| s.len().max(1));
    if cost > *budget || depth > RECURSION_LIMIT {
        return false;
    }
    *budget -= cost;
    match v.kind() {
        ValueKind::Seq | ValueKind::Iterable => match v.try_iter() {
            Ok(items) => items.into_iter().all(|i| fits(&i, budget, depth + 1)),
            Err(_) => true,
        },
        ValueKind::Map => match v.try_iter() {
            Ok(keys) => keys.into_iter().all(|k| {
                let item = v.get_item(&k).unwrap_or_default();
                fits(&k, budget, depth + 1) && fits(&item, budget, depth + 1)
            }),
            Err(_) => true,
        },
        _ => true,
    }
}

/// A filter or test, in [`Engine::unknown_filters_and_tests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Filter,
    Test,
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            NameKind::Filter => "filter",
            NameKind::Test => "test",
        })
    }
}

/// A filter or test the engine does not have, with the closest one it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    pub kind: NameKind,
    pub name: String,
    pub suggestion: Option<String>,
}

/// Filter names offered as did-you-mean suggestions (minijinja's and perkflow's own; a unit
/// test checks that the engine has each).
const FILTER_NAMES: &[&str] = &[
    "abs",
    "attr",
    "batch",
    "bool",
    "capitalize",
    "count",
    "default",
    "dictsort",
    "escape",
    "first",
    "float",
    "groupby",
    "indent",
    "int",
    "items",
    "join",
    "last",
    "length",
    "lines",
    "list",
    "lower",
    "map",
    "max",
    "min",
    "pprint",
    "reject",
    "rejectattr",
    "replace",
    "reverse",
    "round",
    "select",
    "selectattr",
    "slice",
    "sort",
    "split",
    "string",
    "sum",
    "title",
    "tojson",
    "trim",
    "unique",
    "upper",
    "urlencode",
    "money",
    "round_to",
    "sha256",
    "b64encode",
    "stringify_values",
    "email",
    "e164",
    "datetime",
    "add_days",
    "add_hours",
    "strftime",
    "unix",
];

/// Test names offered as suggestions (minijinja's).
const TEST_NAMES: &[&str] = &[
    "defined",
    "undefined",
    "none",
    "odd",
    "even",
    "number",
    "integer",
    "float",
    "string",
    "sequence",
    "mapping",
    "iterable",
    "startingwith",
    "endingwith",
    "in",
    "true",
    "false",
    "boolean",
    "divisibleby",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "lower",
    "upper",
    "sameas",
];

/// The environments (strict for values, lenient for conditions). They are process-wide, so
/// compiled expressions and templates can be cached across runs (`compiled`).
pub struct Engine {
    strict: &'static Environment<'static>,
    lenient: &'static Environment<'static>,
}

fn strict_env() -> &'static Environment<'static> {
    static ENV: std::sync::LazyLock<Environment<'static>> =
        std::sync::LazyLock::new(|| environment(UndefinedBehavior::Strict));
    &ENV
}

fn lenient_env() -> &'static Environment<'static> {
    static ENV: std::sync::LazyLock<Environment<'static>> =
        std::sync::LazyLock::new(|| environment(UndefinedBehavior::Chainable));
    &ENV
}

/// Compiled sources kept for reuse: pipelines and connectors evaluate the same few hundred
/// fields for every event. Bounded: past the limit, sources are compiled per use.
const CACHE_LIMIT: usize = 8192;

type Expr = minijinja::Expression<'static, 'static>;
type Tmpl = minijinja::Template<'static, 'static>;

#[derive(Default)]
struct Compiled {
    exprs: std::collections::HashMap<(bool, String), std::sync::Arc<Expr>>,
    tmpls: std::collections::HashMap<String, std::sync::Arc<Tmpl>>,
}

fn compiled() -> &'static std::sync::Mutex<Compiled> {
    static C: std::sync::LazyLock<std::sync::Mutex<Compiled>> =
        std::sync::LazyLock::new(Default::default);
    &C
}

/// The compiled expression of `src` (cached).
fn expression(lenient: bool, src: &str) -> Result<std::sync::Arc<Expr>, minijinja::Error> {
    let key = (lenient, src.to_string());
    if let Some(e) = compiled().lock().expect("cache lock").exprs.get(&key) {
        return Ok(e.clone());
    }
    let env = if lenient { lenient_env() } else { strict_env() };
    let e = std::sync::Arc::new(env.compile_expression_owned(guarded(src, true)?)?);
    let mut c = compiled().lock().expect("cache lock");
    if c.exprs.len() < CACHE_LIMIT {
        c.exprs.insert(key, e.clone());
    }
    Ok(e)
}

/// Renders the template `src`, compiled once and cached (a cached source is kept for the
/// process's life, which the cache limit bounds; past it, sources are compiled per use).
/// Output past [`MAX_VALUE`] stops the rendering.
fn render_template(src: &str, ctx: Value) -> Result<String, String> {
    let render = |t: &minijinja::Template<'_, '_>| render_capped(t, ctx);
    let cached = compiled()
        .lock()
        .expect("cache lock")
        .tmpls
        .get(src)
        .cloned();
    if let Some(t) = cached {
        return render(&t);
    }
    let mut c = compiled().lock().expect("cache lock");
    if c.tmpls.len() >= CACHE_LIMIT {
        drop(c);
        let source = guarded(src, false).map_err(|e| describe(&e))?;
        let t = strict_env()
            .template_from_str(&source)
            .map_err(|e| describe(&e))?;
        return render(&t);
    }
    // Compiled before it is leaked: a source that does not compile is not kept.
    let source = guarded(src, false).map_err(|e| describe(&e))?;
    strict_env()
        .template_from_str(&source)
        .map_err(|e| describe(&e))?;
    let leaked: &'static str = Box::leak(source.into_boxed_str());
    let t = std::sync::Arc::new(
        strict_env()
            .template_from_str(leaked)
            .map_err(|e| describe(&e))?,
    );
    c.tmpls.insert(src.to_string(), t.clone());
    drop(c);
    render(&t)
}

/// Renders `t`, stopping once its output passes [`MAX_VALUE`].
fn render_capped(t: &minijinja::Template<'_, '_>, ctx: Value) -> Result<String, String> {
    let mut out = Capped::default();
    match t.render_captured_to(ctx, &mut out) {
        Ok(_) => String::from_utf8(out.out).map_err(|e| e.to_string()),
        Err(_) if out.overflowed => Err(format!("template output: {}", too_large())),
        Err(e) => Err(describe(&e)),
    }
}

/// A field of a step, as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// No `{{`: used as is.
    Literal(Json),
    /// Exactly one `{{ expr }}`: the expression's value, typed.
    Expr(String),
    /// Text with `{{ }}`/`{% %}`: rendered to a string.
    Template(String),
}

fn environment(undefined: UndefinedBehavior) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(undefined);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    crate::pipeline::filters::register(&mut env);
    crate::pipeline::filters::register_bounded(&mut env);
    env.add_function(numeric_mul::GUARD, numeric_mul::guard);
    env
}

/// `src` as the engine compiles it: `*` restricted to numbers (`numeric_mul`), and refused
/// if it captures output (`capture`).
fn guarded(src: &str, expr: bool) -> Result<String, minijinja::Error> {
    let invalid = |e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e);
    if !expr {
        super::capture::refuse(src).map_err(invalid)?;
    }
    numeric_mul::guarded(src, expr)
        .map(|s| s.into_owned())
        .map_err(invalid)
}

/// `{{ x }}` alone (ignoring surrounding spaces) -> `Some("x")`.
fn single_expression(src: &str) -> Option<&str> {
    let inner = src.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    // Whitespace control (`{{- x -}}`) means nothing for a lone expression.
    let inner = inner.strip_prefix(['-', '+']).unwrap_or(inner);
    let inner = inner.strip_suffix(['-', '+']).unwrap_or(inner);
    (!inner.contains("{{") && !inner.contains("}}") && !inner.contains("{%"))
        .then_some(inner.trim())
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

impl Engine {
    pub fn new() -> Engine {
        Engine {
            strict: strict_env(),
            lenient: lenient_env(),
        }
    }

    /// Classifies and compiles a string field (compile errors are returned as text).
    pub fn field(&self, src: &str) -> Result<Field, String> {
        if let Some(expr) = single_expression(src) {
            let source = guarded(expr, true).map_err(|e| describe(&e))?;
            self.strict
                .compile_expression(&source)
                .map_err(|e| describe(&e))?;
            return Ok(Field::Expr(expr.to_string()));
        }
        if src.contains("{{") || src.contains("{%") {
            let source = guarded(src, false).map_err(|e| describe(&e))?;
            self.strict
                .template_from_str(&source)
                .map_err(|e| describe(&e))?;
            return Ok(Field::Template(src.to_string()));
        }
        Ok(Field::Literal(Json::String(src.to_string())))
    }

    /// Evaluates a field against `ctx` (a JSON object of variables).
    pub fn eval(&self, field: &Field, ctx: &Json) -> Result<Json, String> {
        let ctx = Value::from(minijinja::value::Serde(ctx));
        match field {
            Field::Literal(v) => Ok(v.clone()),
            Field::Expr(src) => {
                let expr = expression(false, src).map_err(|e| describe(&e))?;
                let v = expr.eval(ctx).map_err(|e| describe(&e))?;
                to_json(&v)
            }
            Field::Template(src) => render_template(src, ctx).map(Json::String),
        }
    }

    /// Top-level names a field or condition reads that are neither given to it nor globals
    /// of the engine (`range`, `dict`, …): almost always a typo.
    pub fn unknown_names(
        &self,
        src: &str,
        condition: bool,
        known: &std::collections::HashSet<String>,
    ) -> Vec<String> {
        let env = if condition {
            &self.lenient
        } else {
            &self.strict
        };
        // Compiled guarded (`numeric_mul`), as for evaluation: a constant `*` would
        // otherwise be folded at compile time.
        let used = if condition {
            guarded(strip_braces(src), true)
                .and_then(|g| {
                    env.compile_expression(&g)
                        .map(|e| e.undeclared_variables(false))
                })
                .unwrap_or_default()
        } else {
            match self.field(src) {
                Ok(Field::Expr(e)) => guarded(&e, true)
                    .and_then(|g| {
                        env.compile_expression(&g)
                            .map(|x| x.undeclared_variables(false))
                    })
                    .unwrap_or_default(),
                Ok(Field::Template(t)) => guarded(&t, false)
                    .and_then(|g| {
                        env.template_from_str(&g)
                            .map(|x| x.undeclared_variables(false))
                    })
                    .unwrap_or_default(),
                _ => Default::default(),
            }
        };
        let globals: std::collections::HashSet<&str> = env.globals().map(|(n, _)| n).collect();
        let mut out: Vec<String> = used
            .into_iter()
            .filter(|n| !known.contains(n) && !globals.contains(n.as_str()))
            .collect();
        out.sort();
        out
    }

    /// Filters and tests `src` names that the engine does not have: minijinja finds out
    /// only when it applies one, so without this a typo (`| lowr`) passes `check` and fails
    /// every run. The names are read off minijinja's own tokens (`| name`, `is [not] name`,
    /// `{% filter name %}`); whether one exists is asked of the engine.
    pub fn unknown_filters_and_tests(&self, src: &str, condition: bool) -> Vec<UnknownName> {
        use minijinja::machinery::{tokenize, Token};
        let (text, in_expr) = if condition {
            (strip_braces(src), true)
        } else {
            match self.field(src) {
                Ok(Field::Expr(_) | Field::Template(_)) => (src, false),
                _ => return Vec::new(),
            }
        };
        let tokens: Vec<Token> = match tokenize(text, in_expr, Default::default())
            .map(|t| t.map(|(tok, _)| tok))
            .collect()
        {
            Ok(t) => t,
            Err(_) => return Vec::new(),
        };
        let ident = |i: usize| match tokens.get(i) {
            Some(Token::Ident(n)) => Some(*n),
            _ => None,
        };
        let mut out: Vec<UnknownName> = Vec::new();
        for i in 0..tokens.len() {
            let found = match &tokens[i] {
                Token::Pipe => ident(i + 1).map(|n| (NameKind::Filter, n)),
                Token::Ident("filter")
                    if matches!(tokens.get(i.wrapping_sub(1)), Some(Token::BlockStart)) =>
                {
                    ident(i + 1).map(|n| (NameKind::Filter, n))
                }
                Token::Ident("is") => match ident(i + 1) {
                    Some("not") => ident(i + 2).map(|n| (NameKind::Test, n)),
                    other => other.map(|n| (NameKind::Test, n)),
                },
                _ => None,
            };
            let Some((kind, name)) = found else { continue };
            if self.has(kind, name) || out.iter().any(|u| u.kind == kind && u.name == name) {
                continue;
            }
            let known = match kind {
                NameKind::Filter => FILTER_NAMES,
                NameKind::Test => TEST_NAMES,
            };
            out.push(UnknownName {
                kind,
                name: name.to_string(),
                suggestion: crate::config::diagnostic::did_you_mean(name, known.iter().copied())
                    .map(str::to_string),
            });
        }
        out
    }

    /// Whether the engine has a filter or test of that name (applying an unknown one is the
    /// only error of its kind).
    fn has(&self, kind: NameKind, name: &str) -> bool {
        let (probe, unknown) = match kind {
            NameKind::Filter => (
                format!("none | {name}"),
                minijinja::ErrorKind::UnknownFilter,
            ),
            NameKind::Test => (format!("none is {name}"), minijinja::ErrorKind::UnknownTest),
        };
        match self.strict.compile_expression(&probe) {
            Ok(e) => !matches!(e.eval(()), Err(err) if err.kind() == unknown),
            Err(_) => true,
        }
    }

    /// Variables a value field reads, with their attribute paths (`params.account_sid`).
    pub fn variable_paths(&self, src: &str) -> Vec<String> {
        let mut out: Vec<String> = match self.field(src) {
            Ok(Field::Expr(e)) => guarded(&e, true)
                .and_then(|g| {
                    self.strict
                        .compile_expression(&g)
                        .map(|x| x.undeclared_variables(true))
                })
                .unwrap_or_default(),
            Ok(Field::Template(t)) => guarded(&t, false)
                .and_then(|g| {
                    self.strict
                        .template_from_str(&g)
                        .map(|x| x.undeclared_variables(true))
                })
                .unwrap_or_default(),
            _ => Default::default(),
        }
        .into_iter()
        .filter(|p| p != numeric_mul::GUARD)
        .collect();
        out.sort();
        out
    }

    /// Checks that a condition compiles.
    pub fn check_condition(&self, src: &str) -> Result<(), String> {
        let source = guarded(strip_braces(src), true).map_err(|e| describe(&e))?;
        self.lenient
            .compile_expression(&source)
            .map(|_| ())
            .map_err(|e| describe(&e))
    }

    /// Evaluates a condition: its truthiness; missing fields are false, errors are errors.
    pub fn condition(&self, src: &str, ctx: &Json) -> Result<bool, String> {
        let expr = expression(true, strip_braces(src)).map_err(|e| describe(&e))?;
        expr.eval(Value::from(minijinja::value::Serde(ctx)))
            .map(|v| v.is_true())
            .map_err(|e| describe(&e))
    }
}

/// Conditions are bare expressions; `{{ … }}` around one is tolerated.
fn strip_braces(src: &str) -> &str {
    single_expression(src).unwrap_or(src)
}

fn to_json(v: &Value) -> Result<Json, String> {
    if v.is_undefined() {
        return Err("the expression is undefined".into());
    }
    let mut budget = MAX_VALUE;
    if !fits(v, &mut budget, 0) {
        return Err(too_large());
    }
    serde_json::to_value(v).map_err(|e| format!("cannot represent the value: {e}"))
}

/// A minijinja error as one line, with its detail.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(detail) = e.detail() {
        if !s.contains(detail) {
            s.push_str(": ");
            s.push_str(detail);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_filters_and_tests_the_engine_does_not_have() {
        let e = Engine::new();
        let names = |src: &str, cond: bool| -> Vec<(NameKind, String, Option<String>)> {
            e.unknown_filters_and_tests(src, cond)
                .into_iter()
                .map(|u| (u.kind, u.name, u.suggestion))
                .collect()
        };
        assert_eq!(
            names("{{ event.email | lowr }}", false),
            [(NameKind::Filter, "lowr".into(), Some("lower".into()))]
        );
        assert_eq!(
            names(
                "Hi {{ name | tittle }}, {{ n | money('USD') | nope(1) }}",
                false
            ),
            [
                (NameKind::Filter, "tittle".into(), Some("title".into())),
                (NameKind::Filter, "nope".into(), None)
            ]
        );
        assert_eq!(
            names("event.x is not definedd and event.y is nosuchtest", true),
            [
                (NameKind::Test, "definedd".into(), Some("defined".into())),
                (NameKind::Test, "nosuchtest".into(), None)
            ]
        );
        // A filter block is refused as a whole (`capture`), before its name matters.
        assert!(e.field("{% filter uper %}x{% endfilter %}").is_err());
        // Known names, `|` inside strings, `or` (not a pipe), literals: nothing.
        assert!(names("{{ event.email | email | lower | sha256 }}", false).is_empty());
        assert!(names("{{ 'a | b' ~ x | default('is nope') }}", false).is_empty());
        assert!(names("x is defined and y is not none or z", true).is_empty());
        assert!(names("plain text", false).is_empty());
        assert!(names("{{ broken | }}", false).is_empty());
    }

    #[test]
    fn every_suggested_name_exists() {
        let e = Engine::new();
        for f in FILTER_NAMES {
            assert!(e.has(NameKind::Filter, f), "filter {f}");
        }
        for t in TEST_NAMES {
            assert!(e.has(NameKind::Test, t), "test {t}");
        }
        assert!(!e.has(NameKind::Filter, "lowr"));
        assert!(!e.has(NameKind::Test, "nosuchtest"));
    }

    use serde_json::json;

    fn ctx() -> Json {
        json!({
            "event": {"total_price": "125.50", "currency": "USD", "items": [1, 2, 3],
                      "customer": {"email": " Ada@Example.COM ", "phone": null}},
            "points": 1255
        })
    }

    #[test]
    fn single_expressions_keep_their_type() {
        let e = Engine::new();
        let cases: &[(&str, Json)] = &[
            ("{{ points }}", json!(1255)),
            ("{{ points * 2 }}", json!(2510)),
            ("{{ event.items }}", json!([1, 2, 3])),
            ("{{ event.items | length }}", json!(3)),
            ("{{ event.customer.phone }}", json!(null)),
            (
                "{{ (event.total_price | float * 10) | round | int }}",
                json!(1255),
            ),
            ("  {{ event.currency }}  ", json!("USD")),
            ("{{- points -}}", json!(1255)),
            (
                "You earned {{ points }} points!",
                json!("You earned 1255 points!"),
            ),
            (
                "{% if points > 1000 %}gold{% else %}silver{% endif %}",
                json!("gold"),
            ),
            ("plain text", json!("plain text")),
        ];
        for (src, want) in cases {
            let f = e.field(src).unwrap_or_else(|m| panic!("{src}: {m}"));
            assert_eq!(
                &e.eval(&f, &ctx()).unwrap_or_else(|m| panic!("{src}: {m}")),
                want,
                "{src}"
            );
        }
    }

    #[test]
    fn missing_fields_fail_values_but_are_false_in_conditions() {
        let e = Engine::new();
        let f = e.field("{{ event.nope }}").unwrap();
        assert!(e.eval(&f, &ctx()).is_err());
        let f = e.field("Hi {{ event.customer.name }}").unwrap();
        assert!(
            e.eval(&f, &ctx()).is_err(),
            "a missing field must not render as empty"
        );
        assert!(!e.condition("event.customer.name", &ctx()).unwrap());
        assert!(!e.condition("event.customer.phone", &ctx()).unwrap());
        assert!(e.condition("points >= 1000", &ctx()).unwrap());
        assert!(e.condition("{{ points >= 1000 }}", &ctx()).unwrap());
        assert!(e.check_condition("points >=").is_err());
        assert!(e.field("{{ points + }}").is_err());
        assert!(e.field("{% if %}").is_err());
    }

    #[test]
    fn runaway_templates_are_stopped() {
        let e = Engine::new();
        let f = e
            .field(
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            )
            .unwrap();
        let err = e.eval(&f, &ctx()).unwrap_err();
        assert!(err.contains("fuel") || err.contains("range"), "{err}");
    }

    #[test]
    fn guarded_multiplication_computes_what_minijinja_computes() {
        // The same numbers, with and without the guards around `*`'s operands.
        let plain = minijinja::Environment::new();
        let e = Engine::new();
        let c = ctx();
        for src in [
            "points * 2",
            "points * 2 + 1 * 3",
            "(points + 1) * (2 - 5)",
            "2 * 3 ** 2 * 4",
            "-points * -1.5",
            "(event.total_price | float * 10) | round | int",
            "(event.items | length) * (event.items | sum) * 7 // 2",
            "event.items[1] * event.items[2] * 1.0",
            "[1, 2][0] * 10 if points * 0 == 0 else 5 * 5",
            "range(3) | map('abs') | list | length * 3",
            "(points) | int * 2",
            "9223372036854775807 * 2",
            "0.1 * 3",
        ] {
            let want = plain
                .compile_expression(src)
                .unwrap()
                .eval(Value::from(minijinja::value::Serde(&c)))
                .map(|v| to_json(&v));
            let got = e.eval(&e.field(&format!("{{{{ {src} }}}}")).unwrap(), &c);
            assert_eq!(got.ok(), want.ok().map(|v| v.unwrap()), "{src}");
        }
    }

    #[test]
    fn exploding_templates_and_values_are_refused() {
        let e = Engine::new();
        let cases: &[(&str, &str)] = &[
            // Output past MAX_VALUE stops the rendering (`range(100000) | join` is 489 KB).
            (
                "{{ (range(100000) | join) ~ (range(100000) | join) ~ (range(100000) | join) }}!",
                "larger than 1024 KiB",
            ),
            (
                "{% for i in range(3000) %}{{ range(1000) | join }}{% endfor %}",
                "larger than 1024 KiB",
            ),
            (
                "{% set a = range(100000) | join %}{% set a = a ~ a ~ a %}{{ a }}!",
                "larger than 1024 KiB",
            ),
            // A value past MAX_VALUE is refused before it is converted.
            (
                "{{ (range(100000) | join) ~ (range(100000) | join) ~ (range(100000) | join) }}",
                "larger than 1024 KiB",
            ),
            // `*` multiplies numbers only: no string or list repeated in one operation (the
            // fuzzer's 1.7 GB unit was `99*items*50728 ~ …`), not even a constant one.
            ("{{ [1] * 2000000 }}", "`*` multiplies numbers"),
            ("{{ 'x' * 100000000 }}", "`*` multiplies numbers"),
            (
                "{{ 99 * event.items * 50728 ~ 'x' }}",
                "`*` multiplies numbers",
            ),
            (
                "{{ (event.items | length) * event.items }}",
                "`*` multiplies numbers",
            ),
            (
                "{% set n = 3 %}{{ n * event.currency }}",
                "`*` multiplies numbers",
            ),
            ("{{ event * 2 }}", "`*` multiplies numbers"),
            ("{{ __perkflow_number(1) }}", "reserved"),
            // Built-ins that multiply sizes by a number check it first.
            ("{{ 'a' | indent(99999999999) }}", "indent"),
            ("{{ (range(100000) | join('\n')) | indent(100) }}", "indent"),
            ("{{ [1, 2] | slice(99999999999) }}", "slice"),
            ("{{ [1] | batch(10000000000, 0) }}", "batch"),
            ("{{ range(100000) | join(range(100000) | join) }}", "join"),
            (
                "{% macro m() %}{{ caller() }}{% endmacro %}{% call(s = event.currency * 30000000) m() %}{{ s | length }}{% endcall %}",
                "is not available in perkflow fields",
            ),
            (
                "{{ (range(300) | join) | replace('', range(700) | join) }}",
                "replace",
            ),
            ("{{ points | tojson(indent=99999999999) }}", "at most 16"),
            // `format`'s widths live in its format string: not available.
            ("{{ '%99999999999s' | format('x') }}", "format"),
            // Recursion stops at the limit.
            (
                "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
                "recursion",
            ),
        ];
        for (src, want) in cases {
            let err = match e.field(src) {
                Ok(f) => e.eval(&f, &ctx()).expect_err(src),
                Err(compile) => compile,
            };
            assert!(err.contains(want), "{src}: {err}");
        }
        // The fuzzer's slow units, as it ran them (its context has a top-level `items`).
        let fuzz_ctx = json!({ "items": [1, 2, 3], "points": 1255 });
        for src in [
            "7927~999*items*9999",
            "E728~08099*items*7~07~099*items*50728~08099*items*7~07~099*items*50",
        ] {
            let f = e.field(&format!("{{{{ {src} }}}}")).unwrap();
            let err = e.eval(&f, &fuzz_ctx).unwrap_err();
            assert!(err.contains("`*` multiplies numbers"), "{src}: {err}");
        }
        // What stays within the limits still works.
        for (src, want) in [
            ("{{ 'ab' | indent(2, true) }}", json!("  ab")),
            ("{{ [1, 2, 3] | slice(2) | list }}", json!([[1, 2], [3]])),
            ("{{ 'a-b' | replace('-', '+') }}", json!("a+b")),
            (
                "{{ [1, 2, 3] | batch(2, 0) | list }}",
                json!([[1, 2], [3, 0]]),
            ),
            ("{{ event.items | join(', ') }}", json!("1, 2, 3")),
            ("{{ range(3) | join }}", json!("012")),
            ("{{ event.items | tojson }}", json!("[1, 2, 3]")),
            ("{{ range(1000) | length }}", json!(1000)),
            ("{{ (event.items | length) * 2.5 * points }}", json!(9412.5)),
            ("{{ ((event.items | length) * -2) | abs }}", json!(6)),
        ] {
            let f = e.field(src).unwrap();
            assert_eq!(e.eval(&f, &ctx()).unwrap(), want, "{src}");
        }
    }
}
