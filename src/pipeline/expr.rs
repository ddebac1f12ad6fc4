//! One expression/template engine for pipelines: minijinja.
//!
//! - A field that is exactly one `{{ expr }}` keeps the expression's type (numbers stay
//!   numbers, lists stay lists); any other string with `{{ }}`/`{% %}` renders to a string;
//!   a string without them is a literal.
//! - Conditions (`when`) are bare expressions; a missing field there is simply false.
//! - Values are strict: using a missing field is an error, never a silent empty string.
//! - Evaluation is sandboxed (no loader, no I/O) and bounded by fuel.

use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use serde_json::Value as Json;

/// Instructions an evaluation may run before it is stopped.
pub const FUEL: u64 = 100_000;

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
    let e = std::sync::Arc::new(env.compile_expression_owned(src.to_string())?);
    let mut c = compiled().lock().expect("cache lock");
    if c.exprs.len() < CACHE_LIMIT {
        c.exprs.insert(key, e.clone());
    }
    Ok(e)
}

/// Renders the template `src`, compiled once and cached (a cached source is kept for the
/// process's life, which the cache limit bounds; past it, sources are compiled per use).
fn render_template(src: &str, ctx: Value) -> Result<String, minijinja::Error> {
    let cached = compiled()
        .lock()
        .expect("cache lock")
        .tmpls
        .get(src)
        .cloned();
    if let Some(t) = cached {
        return t.render(ctx);
    }
    let mut c = compiled().lock().expect("cache lock");
    if c.tmpls.len() >= CACHE_LIMIT {
        drop(c);
        return strict_env().template_from_str(src)?.render(ctx);
    }
    // Compiled before it is leaked: a source that does not compile is not kept.
    strict_env().template_from_str(src)?;
    let leaked: &'static str = Box::leak(src.to_string().into_boxed_str());
    let t = std::sync::Arc::new(strict_env().template_from_str(leaked)?);
    c.tmpls.insert(src.to_string(), t.clone());
    drop(c);
    t.render(ctx)
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
    env.set_auto_escape_callback(|_| AutoEscape::None);
    crate::pipeline::filters::register(&mut env);
    env
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
            self.strict
                .compile_expression(expr)
                .map_err(|e| describe(&e))?;
            return Ok(Field::Expr(expr.to_string()));
        }
        if src.contains("{{") || src.contains("{%") {
            self.strict
                .template_from_str(src)
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
            Field::Template(src) => render_template(src, ctx)
                .map(Json::String)
                .map_err(|e| describe(&e)),
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
        let used = if condition {
            env.compile_expression(strip_braces(src))
                .map(|e| e.undeclared_variables(false))
                .unwrap_or_default()
        } else {
            match self.field(src) {
                Ok(Field::Expr(e)) => env
                    .compile_expression(&e)
                    .map(|x| x.undeclared_variables(false))
                    .unwrap_or_default(),
                Ok(Field::Template(t)) => env
                    .template_from_str(&t)
                    .map(|x| x.undeclared_variables(false))
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

    /// Variables a value field reads, with their attribute paths (`params.account_sid`).
    pub fn variable_paths(&self, src: &str) -> Vec<String> {
        let mut out: Vec<String> = match self.field(src) {
            Ok(Field::Expr(e)) => self
                .strict
                .compile_expression(&e)
                .map(|x| x.undeclared_variables(true))
                .unwrap_or_default(),
            Ok(Field::Template(t)) => self
                .strict
                .template_from_str(&t)
                .map(|x| x.undeclared_variables(true))
                .unwrap_or_default(),
            _ => Default::default(),
        }
        .into_iter()
        .collect();
        out.sort();
        out
    }

    /// Checks that a condition compiles.
    pub fn check_condition(&self, src: &str) -> Result<(), String> {
        self.lenient
            .compile_expression(strip_braces(src))
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
}
