//! `tests:` blocks of pipelines: a fixture in, expected deliveries and values out (partial
//! matching), and a readable list of differences.

use super::expr::Engine;
use super::run::{run, EventInput, Outcome, Run, Stubs};
use super::spec::{Pipeline, TestSpec};
use crate::config::Config;
use crate::ingest::identify::identify;
use crate::verify::RawRequest;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value as Json};
use std::path::Path;

/// The outcome of one test case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub pipeline: String,
    pub name: String,
    pub failures: Vec<String>,
    pub run: Option<Run>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Builds the run input from a fixture on disk, identified like ingest would (signature
/// checks do not apply: the fixture is the operator's own file).
pub fn input_from_fixture(
    cfg: &Config,
    pipeline: &Pipeline,
    fixture: &Path,
    extra: &[(String, String)],
) -> Result<EventInput, String> {
    let path = resolve(cfg, fixture);
    // An internal event (a sink's `reward.fulfilled`, the ledger's thresholds): the fixture
    // is its payload.
    let internal = cfg.sinks.contains_key(&pipeline.on.source)
        || pipeline.on.source == crate::ledger::SOURCE
        || pipeline.on.schedule.is_some();
    if !cfg.sources.contains_key(&pipeline.on.source) && internal {
        let (body, _) = crate::sign::read_fixture(&path)?;
        let event: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        return Ok(EventInput {
            source: pipeline.on.source.clone(),
            event_type: pipeline.on.events.first().cloned().unwrap_or_default(),
            event_id: event["vendor_id"].as_str().unwrap_or("fixture").to_string(),
            headers: Default::default(),
            event,
        });
    }
    let src = cfg
        .sources
        .get(&pipeline.on.source)
        .ok_or_else(|| format!("unknown source `{}`", pipeline.on.source))?;
    let (body, mut headers) = crate::sign::read_fixture(&path)?;
    headers.extend(extra.iter().cloned());
    let mut map = HeaderMap::new();
    for (k, v) in &headers {
        let name =
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name `{k}`"))?;
        let value = HeaderValue::from_str(v).map_err(|_| format!("bad value for header `{k}`"))?;
        map.insert(name, value);
    }
    let req = RawRequest::trusted_fixture(map, body.into());
    let found = identify(&src.def.identify, &req).map_err(|e| {
        let hf = crate::sign::headers_file(&path);
        let hint = if hf.exists() {
            String::new()
        } else {
            format!(
                " (a fixture's request headers are read from {}, which does not exist; \
                 or give them with `headers:` in a test, `--header` to `run`)",
                hf.display()
            )
        };
        format!("{}: {e}{hint}", path.display())
    })?;
    let first = found
        .iter()
        .find(|f| pipeline.on.events.contains(&f.event_type))
        .or(found.first())
        .ok_or_else(|| format!("{}: no event", path.display()))?;
    let hmap: Map<String, Json> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), Json::String(v.clone())))
        .collect();
    Ok(EventInput {
        source: pipeline.on.source.clone(),
        event_type: first.event_type.clone(),
        event_id: first.vendor_id.clone(),
        headers: hmap,
        event: serde_json::from_slice(&first.payload).unwrap_or(Json::Null),
    })
}

/// A fixture path as written: absolute, relative to the working directory if it exists
/// there, else relative to the config file.
fn resolve(cfg: &Config, path: &Path) -> std::path::PathBuf {
    if path.is_absolute() || path.exists() {
        path.to_path_buf()
    } else {
        cfg.base_dir.join(path)
    }
}

/// Reads a lookup answer from a JSON file.
pub fn read_answer(cfg: &Config, path: &Path) -> Result<Json, String> {
    let path = resolve(cfg, path);
    let text = std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))
}

/// The lookup answers of a test: a string is a JSON file, anything else the answer itself.
pub fn stubs(
    cfg: &Config,
    given: &indexmap::IndexMap<String, serde_yaml::Value>,
) -> Result<Stubs, String> {
    let mut out = Stubs::default();
    for (name, v) in given {
        let answer = match v {
            serde_yaml::Value::String(file) => {
                read_answer(cfg, Path::new(file)).map_err(|e| format!("lookups.{name}: {e}"))?
            }
            other => yaml_to_json(other),
        };
        out.0.insert(name.clone(), answer);
    }
    Ok(out)
}

/// Runs one test case.
pub fn run_case(cfg: &Config, engine: &Engine, p: &Pipeline, t: &TestSpec) -> CaseResult {
    let mut res = CaseResult {
        pipeline: p.name.clone(),
        name: t.name.clone(),
        failures: Vec::new(),
        run: None,
    };
    let extra: Vec<(String, String)> = t
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let input = match input_from_fixture(cfg, p, &t.fixture, &extra) {
        Ok(i) => i,
        Err(e) => {
            res.failures.push(format!("fixture: {e}"));
            return res;
        }
    };
    if !p.on.events.contains(&input.event_type) {
        res.failures.push(format!(
            "the fixture is a `{}` event; the pipeline listens to {}",
            input.event_type,
            p.on.events.join(", ")
        ));
    }
    let stubs = match stubs(cfg, &t.lookups) {
        Ok(s) => s,
        Err(e) => {
            res.failures.push(e);
            return res;
        }
    };
    let r = run(p, engine, &input, &stubs);
    match &r.outcome {
        Outcome::Failed { error, .. } => res.failures.push(format!("the run failed: {error}")),
        Outcome::Deferred { reason, .. } => {
            res.failures.push(format!("the run was deferred: {reason}"))
        }
        _ => {}
    }
    if let Some(want) = t.expect.filtered {
        let got = matches!(r.outcome, Outcome::Filtered { .. });
        if want != got {
            res.failures.push(format!(
                "filtered: expected {want}, got {got} ({:?})",
                r.outcome
            ));
        }
    }
    if let Some(expected) = &t.expect.deliveries {
        if expected.len() != r.deliveries.len() {
            let got: Vec<String> = r.deliveries.iter().map(|d| d.to()).collect();
            res.failures.push(format!(
                "deliveries: expected {} ({}), got {} ({})",
                expected.len(),
                expected
                    .iter()
                    .map(|d| d.to.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                got.len(),
                got.join(", ")
            ));
        }
        for (i, (e, d)) in expected.iter().zip(&r.deliveries).enumerate() {
            if e.to != d.to() {
                res.failures.push(format!(
                    "deliveries[{i}].to: expected `{}`, got `{}`",
                    e.to,
                    d.to()
                ));
            }
            let want = yaml_to_json(&serde_yaml::Value::Mapping(
                e.with
                    .iter()
                    .map(|(k, v)| (serde_yaml::Value::String(k.clone()), v.clone()))
                    .collect(),
            ));
            partial(
                &format!("deliveries[{i}].with"),
                &want,
                &d.with,
                &mut res.failures,
            );
        }
    }
    for (k, v) in &t.expect.values {
        match r.vars.get(k) {
            Some(got) => partial(
                &format!("values.{k}"),
                &yaml_to_json(v),
                got,
                &mut res.failures,
            ),
            None => res.failures.push(format!("values.{k}: not set by the run")),
        }
    }
    res.run = Some(r);
    res
}

fn yaml_to_json(v: &serde_yaml::Value) -> Json {
    serde_json::to_value(v).unwrap_or(Json::Null)
}

/// `want` matches `got` when every key of `want` is in `got` with a matching value (lists:
/// same length, element by element; numbers: equal in value).
pub fn partial(path: &str, want: &Json, got: &Json, out: &mut Vec<String>) {
    match (want, got) {
        (Json::Object(w), Json::Object(g)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => partial(&format!("{path}.{k}"), wv, gv, out),
                    None => out.push(format!("{path}.{k}: expected {wv}, missing")),
                }
            }
        }
        (Json::Array(w), Json::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                partial(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        (Json::Number(a), Json::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: expected {a}, got {b}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn partial_matching() {
        let mut out = Vec::new();
        partial(
            "w",
            &json!({"a": 1, "b": {"c": "x"}}),
            &json!({"a": 1.0, "b": {"c": "x", "d": 2}, "e": 3}),
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        partial(
            "w",
            &json!({"a": 2, "z": 1, "l": [1, 2]}),
            &json!({"a": 1, "l": [1]}),
            &mut out,
        );
        assert_eq!(
            out,
            [
                "w.a: expected 2, got 1",
                "w.z: expected 1, missing",
                "w.l: expected [1,2], got [1]"
            ]
        );
    }
}
