//! Rendering a sink action into the exact HTTP request: pure (no I/O), so `perkflow run`
//! shows it and the tests compare it against the vendors' contracts.

use crate::connector::sink::{ActionDef, BodyEncoding, SinkDef};
use crate::pipeline::expr::Engine;
use serde::Serialize;
use serde_json::{Map, Value as Json};

/// A request ready to send.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub body: Option<Vec<u8>>,
    /// The body as text, for traces and dry runs.
    pub body_text: Option<String>,
}

impl Request {
    /// A bare GET (lookups, status polls, catalogs).
    pub fn get(url: String) -> Request {
        Request {
            method: "GET".into(),
            url,
            headers: Vec::new(),
            body: None,
            body_text: None,
        }
    }
}

/// What the templates of one request see.
pub fn context(
    params: &Map<String, Json>,
    with: &Json,
    key: &str,
    event_id: &str,
    attempt: u32,
) -> Json {
    serde_json::json!({
        "params": params,
        "with": with,
        "job": { "key": key, "event_id": event_id, "attempt": attempt, "vendor_id": "" },
    })
}

pub fn render_str(engine: &Engine, src: &str, ctx: &Json) -> Result<Json, String> {
    let field = engine.field(src)?;
    engine.eval(&field, ctx)
}

fn render_text(
    engine: &Engine,
    what: &str,
    src: &str,
    ctx: &Json,
) -> Result<Option<String>, String> {
    match render_str(engine, src, ctx).map_err(|e| format!("{what}: {e}"))? {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s)),
        other => Ok(Some(other.to_string())),
    }
}

/// Renders a YAML template tree; map entries that render to null are left out.
pub fn render_tree(
    engine: &Engine,
    v: &serde_yaml::Value,
    ctx: &Json,
    path: &str,
) -> Result<Json, String> {
    Ok(match v {
        serde_yaml::Value::String(s) => {
            render_str(engine, s, ctx).map_err(|e| format!("{path}: {e}"))?
        }
        serde_yaml::Value::Sequence(items) => Json::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| render_tree(engine, x, ctx, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        serde_yaml::Value::Mapping(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                let key = k.as_str().map(str::to_string).unwrap_or_else(|| {
                    serde_yaml::to_string(k)
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                });
                let value = render_tree(engine, x, ctx, &format!("{path}.{key}"))?;
                if !value.is_null() {
                    out.insert(key, value);
                }
            }
            Json::Object(out)
        }
        other => serde_json::to_value(other).unwrap_or(Json::Null),
    })
}

/// Drops null map entries at every depth (an optional field left out, also inside values a
/// single expression built).
fn prune(v: Json) -> Json {
    match v {
        Json::Object(m) => Json::Object(
            m.into_iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, x)| (k, prune(x)))
                .collect(),
        ),
        Json::Array(a) => Json::Array(a.into_iter().map(prune).collect()),
        other => other,
    }
}

/// `base` + the rendered path, or the path itself when it renders an absolute URL.
pub fn url(
    engine: &Engine,
    base: Option<&str>,
    path: &str,
    query: &indexmap::IndexMap<String, String>,
    ctx: &Json,
) -> Result<String, String> {
    let p = render_text(engine, "path", path, ctx)?.unwrap_or_default();
    let mut url = if p.starts_with("https://") || p.starts_with("http://") {
        p
    } else {
        let base = base.ok_or("the sink has no base_url")?;
        format!("{}{}", base.trim_end_matches('/'), p)
    };
    let mut parsed = reqwest::Url::parse(&url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !query.is_empty() {
        let mut pairs = parsed.query_pairs_mut();
        for (k, v) in query {
            if let Some(v) = render_text(engine, &format!("query.{k}"), v, ctx)? {
                pairs.append_pair(k, &v);
            }
        }
    }
    url = parsed.to_string();
    Ok(url)
}

/// Renders the request of `action` (auth headers excluded: they are added when sending).
pub fn render(
    engine: &Engine,
    def: &SinkDef,
    base: Option<&str>,
    action: &ActionDef,
    ctx: &Json,
) -> Result<Request, String> {
    let url = url(engine, base, &action.path, &action.query, ctx)?;
    let mut headers = Vec::new();
    for (k, v) in def.headers.iter().chain(action.headers.iter()) {
        if let Some(v) = render_text(engine, &format!("headers.{k}"), v, ctx)? {
            headers.push((k.clone(), v));
        }
    }
    let body = match &action.body {
        None => None,
        Some(tree) => Some(prune(render_tree(engine, tree, ctx, "body")?)),
    };
    let (body, content_type) = match (body, action.encoding) {
        (None, _) => (None, None),
        (Some(b), BodyEncoding::Json) => (
            Some(serde_json::to_vec(&b).map_err(|e| e.to_string())?),
            Some("application/json"),
        ),
        (Some(b), BodyEncoding::JsonApi) => (
            Some(serde_json::to_vec(&b).map_err(|e| e.to_string())?),
            Some("application/vnd.api+json"),
        ),
        (Some(b), BodyEncoding::Form) => (
            Some(form(&b)?.into_bytes()),
            Some("application/x-www-form-urlencoded"),
        ),
    };
    if let Some(ct) = content_type {
        headers.push(("Content-Type".into(), ct.into()));
    }
    let body_text = body
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).into_owned());
    Ok(Request {
        method: action.method.to_ascii_uppercase(),
        url,
        headers,
        body,
        body_text,
    })
}

/// A flat map as `application/x-www-form-urlencoded`; a list repeats its key.
fn form(body: &Json) -> Result<String, String> {
    let Json::Object(map) = body else {
        return Err("a form body must be a map".into());
    };
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in map {
        let items: Vec<&Json> = match v {
            Json::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for item in items {
            let text = match item {
                Json::String(s) => s.clone(),
                Json::Number(n) => n.to_string(),
                Json::Bool(b) => b.to_string(),
                Json::Null => continue,
                _ => return Err(format!("form field `{k}` must be a single value")),
            };
            out.append_pair(k, &text);
        }
    }
    Ok(out.finish())
}
