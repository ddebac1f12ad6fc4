//! `perkflow.yaml` + `connectors/` -> a validated [`Config`], in two phases.
//!
//! **Parse** reads each file with serde (strict: unknown fields are errors) and **check** runs
//! pure cross-field checks; both collect every problem as a [`Diagnostic`] with
//! `file:line:col`. Neither reads a secret or touches the network: secrets are resolved when
//! the daemon builds its runtime (`crate::app`).

pub mod diagnostic;
pub mod scalar;
pub mod secrets;
pub mod yaml;

use crate::connector::{Registry, Signs, SourceDef, VerifyKind};
use diagnostic::{suggestion, Diagnostic, Diagnostics};
use indexmap::IndexMap;
use scalar::{ByteSize, DurationSpec};
use secrets::Interpolated;
use serde::de::IgnoredAny;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use yaml::{join, Document, Locations};

pub const DEFAULT_FILE: &str = "perkflow.yaml";
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// An app allowed to call the member API, and what it may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    pub key: Interpolated,
    /// `members:read` (balance, tier, history), `members:redeem`, `members:write` (profile),
    /// `codes:redeem`, `reports:read`.
    pub scopes: Vec<String>,
}

/// The scopes an API key may have.
pub const API_SCOPES: &[&str] = &[
    "members:read",
    "members:redeem",
    "members:write",
    "codes:redeem",
    "reports:read",
];

/// Top level of `perkflow.yaml`. Sources and sinks are parsed entry by entry afterwards.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopSpec {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    durability: Option<Durability>,
    flush_interval: Option<DurationSpec>,
    admin_token: Option<Interpolated>,
    pipelines: Option<Vec<PathBuf>>,
    connectors: Option<Vec<PathBuf>>,
    public_url: Option<String>,
    max_body: Option<ByteSize>,
    /// Field names whose values are personal data: shown as `[redacted]` in traces, the
    /// admin API, the status page, dry runs and logs.
    pii_fields: Option<Vec<String>>,
    /// Stored payloads, traces and finished jobs older than this are purged (default: kept).
    retention: Option<DurationSpec>,
    /// What retention leaves of an event (its metadata and de-duplication entry) is dropped
    /// this long after it was received (default: kept).
    dedup_window: Option<DurationSpec>,
    /// A request's headers must arrive within this (default 10 s).
    header_timeout: Option<DurationSpec>,
    /// A webhook's body must arrive within this (default 30 s).
    body_timeout: Option<DurationSpec>,
    /// Keys of the apps that call the member API (checkout, self-service portal).
    api_keys: Option<IndexMap<String, ApiKeySpec>>,
    /// Tiers and thresholds of the points program.
    loyalty: Option<crate::ledger::Rules>,
    /// Promo code pools.
    promo_codes: Option<IndexMap<String, crate::codes::PoolSpec>>,
    // Only their shape (a map) is checked here; entries are parsed one by one in `load_text`.
    #[allow(dead_code)]
    sources: Option<IndexMap<String, IgnoredAny>>,
    #[allow(dead_code)]
    sinks: Option<IndexMap<String, IgnoredAny>>,
}

/// When a webhook is acknowledged relative to the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Acknowledge only after the write is flushed to disk (group-committed).
    #[default]
    Fsync,
    /// Acknowledge after the in-memory write; the log is synced at most `flush_interval`
    /// (default 200 ms) later.
    Batch,
}

/// One entry of `sources:`. Which fields apply depends on the connector's verify kind;
/// `check_source` refuses the ones that do not.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub connector: String,
    pub secret: Option<Interpolated>,
    pub secrets: Option<Vec<Interpolated>>,
    pub tolerance: Option<DurationSpec>,
    pub url: Option<String>,
    pub max_body: Option<ByteSize>,
    // PayPal
    pub webhook_id: Option<Interpolated>,
    pub verify: Option<PaypalMode>,
    pub cert_hosts: Option<Vec<String>>,
    pub ca_file: Option<PathBuf>,
    pub cert_pins: Option<IndexMap<String, PathBuf>>,
    pub client_id: Option<Interpolated>,
    pub client_secret: Option<Interpolated>,
    pub base_url: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaypalMode {
    #[default]
    Cert,
    Api,
}

/// One entry of `sinks:`. Sink parameters are declared by sink connectors.
#[derive(Debug, Clone, Deserialize)]
pub struct SinkSpec {
    pub connector: String,
    #[serde(flatten)]
    pub params: IndexMap<String, serde_yaml::Value>,
}

/// A sink that passed every check. Its parameters are resolved when the daemon builds.
#[derive(Debug, Clone)]
pub struct Sink {
    pub name: String,
    pub connector: String,
    pub params: IndexMap<String, Interpolated>,
    pub base_url: Option<String>,
    /// Requests per second, overriding the connector's default.
    pub rate: Option<f64>,
    /// Overrides of the connector's limits and retry policy.
    pub concurrency: Option<usize>,
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
    pub max_age: Option<Duration>,
}

/// A source that passed every check.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub connector: String,
    pub def: SourceDef,
    pub spec: SourceSpec,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The config file, when there is one.
    pub file: Option<PathBuf>,
    /// Relative paths in the config resolve against this directory.
    pub base_dir: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub flush_interval: Duration,
    pub admin_token: Option<Interpolated>,
    pub public_url: Option<String>,
    pub max_body: usize,
    /// Field names whose values are personal data (see `redact`).
    pub pii_fields: Vec<String>,
    /// Payloads, traces and finished jobs older than this are purged (`None`: kept).
    pub retention: Option<Duration>,
    /// Purged events' metadata and de-duplication entries older than this are dropped
    /// (`None`: kept): a re-delivery after it is stored as new.
    pub dedup_window: Option<Duration>,
    /// Slow senders: headers and a webhook's body must arrive within these.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// Member API keys by app name.
    pub api_keys: IndexMap<String, ApiKeySpec>,
    /// Tiers and thresholds of the points program.
    pub loyalty: crate::ledger::Rules,
    /// Promo code pools by name.
    pub promo_codes: IndexMap<String, crate::codes::PoolSpec>,
    pub connector_dirs: Vec<PathBuf>,
    pub pipeline_dirs: Vec<PathBuf>,
    pub sources: IndexMap<String, Source>,
    pub sinks: IndexMap<String, Sink>,
    pub pipelines: IndexMap<String, crate::pipeline::spec::Pipeline>,
    pub connectors: Registry,
    /// Where each value of the config file is, for problems found when building.
    pub locations: Locations,
    /// Settings given on the command line (`serve --listen/--data-dir`).
    pub overrides: Overrides,
}

/// Settings given on the command line: they win over the file's, at start and at every
/// reload (a reload then does not take them for changes that need a restart).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// Applies command-line settings, and keeps them for reloads.
    pub fn override_with(&mut self, o: Overrides) {
        if let Some(l) = o.listen {
            self.listen = l;
        }
        if let Some(d) = &o.data_dir {
            self.data_dir = d.clone();
        }
        self.overrides = o;
    }

    /// A diagnostic at `path` in the config file (for problems found after checking).
    pub fn diag(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        let file = self
            .file
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_FILE));
        let (line, col) = self.locations.value(path);
        Diagnostic::new(&file, line, col, path, message)
    }
}

/// Loads and checks the config at `path`, or `./perkflow.yaml` when it exists, or defaults.
pub fn load(path: Option<&Path>) -> Result<Config, Diagnostics> {
    let file = match path {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.exists()),
    };
    let text = match &file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| {
            Diagnostics(vec![Diagnostic::new(
                f,
                0,
                0,
                "",
                format!("cannot read config: {e}"),
            )])
        })?,
        None => String::new(),
    };
    let shown = file.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_FILE));
    load_text(&shown, file.is_some(), &text)
}

/// A listen address: `IP:PORT` (`[::1]:8080` for IPv6), or `localhost:PORT` (the loopback
/// address, resolved without any lookup).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    match s.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => port
            .parse::<u16>()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .map_err(|_| format!("`{s}`: the port must be a number up to 65535")),
        _ => Err(format!(
            "`{s}` is not an address like 127.0.0.1:8080 (0.0.0.0:8080 for every interface, \
             localhost:8080 for this machine only)"
        )),
    }
}

/// Parses and checks a config text (`file` names it in diagnostics and anchors relative paths).
pub fn load_text(file: &Path, from_file: bool, text: &str) -> Result<Config, Diagnostics> {
    let mut diags = Diagnostics::default();
    let doc = Document::index(file, text).map_err(|d| Diagnostics(vec![d]))?;
    let top = parse_top(&doc, &mut diags);
    let base_dir = match file.parent() {
        Some(p) if from_file && !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::new(),
    };

    let listen = match &top.listen {
        None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        Some(s) => parse_listen(s).unwrap_or_else(|m| {
            diags.push(doc.at("listen", m));
            SocketAddr::from(([127, 0, 0, 1], 8080))
        }),
    };
    if let Some(rules) = &top.loyalty {
        if let Err(m) = rules.check() {
            diags.push(doc.at("loyalty", m));
        }
    }
    for (name, pool) in top.promo_codes.iter().flatten() {
        if let Err(m) = pool.check(name) {
            diags.push(doc.at(&format!("promo_codes.{name}"), m));
        }
    }
    for (name, k) in top.api_keys.iter().flatten() {
        for (i, scope) in k.scopes.iter().enumerate() {
            if !API_SCOPES.contains(&scope.as_str()) {
                let hint = diagnostic::suggestion(scope, API_SCOPES.iter().copied());
                diags.push(doc.at(
                    &format!("api_keys.{name}.scopes[{i}]"),
                    format!(
                        "unknown scope `{scope}`{hint}; scopes: {}",
                        API_SCOPES.join(", ")
                    ),
                ));
            }
        }
    }
    for (key, t) in [
        ("header_timeout", &top.header_timeout),
        ("body_timeout", &top.body_timeout),
    ] {
        if t.as_ref().is_some_and(|t| t.0 < Duration::from_secs(1)) {
            diags.push(doc.at(key, "a timeout is at least 1s"));
        }
    }
    match (&top.dedup_window, &top.retention) {
        (Some(_), None) => diags.push(doc.at(
            "dedup_window",
            "applies to what retention leaves of an event: set `retention:` too",
        )),
        (Some(w), Some(r)) if w.0 < r.0 => diags.push(doc.at(
            "dedup_window",
            format!(
                "is shorter than `retention` ({}): events are de-duplicated at least as long as their payload is kept",
                humantime::format_duration(r.0)
            ),
        )),
        _ => {}
    }
    if let Some(u) = &top.public_url {
        if let Err(m) = check_url(u) {
            diags.push(doc.at("public_url", m));
        }
    }
    let connector_dirs: Vec<PathBuf> = match &top.connectors {
        Some(dirs) => dirs.iter().map(|d| base_dir.join(d)).collect(),
        None => vec![base_dir.join("connectors")],
    };
    let pipeline_dirs: Vec<PathBuf> = match &top.pipelines {
        Some(dirs) => dirs.iter().map(|d| base_dir.join(d)).collect(),
        None => vec![base_dir.join("pipelines")],
    };
    let connectors = Registry::load(&connector_dirs, &mut diags);

    let mut sources = IndexMap::new();
    for name in doc.keys_of("sources") {
        let path = join("sources", &name);
        if !valid_source_name(&name) {
            diags.push(doc.at_key(
                &path,
                "a source name is its URL path: use letters, digits, `-`, `_` and `.`",
            ));
        }
        match doc.parse_at::<SourceSpec>(&path) {
            Ok(spec) => {
                if let Some(src) = check_source(
                    &doc,
                    &path,
                    &name,
                    spec,
                    &top,
                    &connectors,
                    &base_dir,
                    &mut diags,
                ) {
                    sources.insert(name, src);
                }
            }
            Err(d) => diags.push(d),
        }
    }
    let mut sinks = IndexMap::new();
    for name in doc.keys_of("sinks") {
        let path = join("sinks", &name);
        match doc.parse_at::<SinkSpec>(&path) {
            Ok(spec) => {
                if let Some(sink) = check_sink(&doc, &path, &name, spec, &connectors, &mut diags) {
                    sinks.insert(name, sink);
                }
            }
            Err(d) => diags.push(d),
        }
    }

    let engine = crate::pipeline::expr::Engine::new();
    let no_pools = IndexMap::new();
    let pools = top.promo_codes.as_ref().unwrap_or(&no_pools);
    let mut invalid = std::collections::HashSet::new();
    let accepted: [(&str, Vec<&String>); 3] = [
        ("sources", sources.keys().collect()),
        ("sinks", sinks.keys().collect()),
        ("promo_codes", pools.keys().collect()),
    ];
    for (section, names) in accepted {
        for name in doc.keys_of(section) {
            if !names.contains(&&name) {
                invalid.insert(join(section, &name));
            }
        }
    }
    let scope = crate::pipeline::spec::Scope {
        sources: &sources,
        sinks: &sinks,
        connectors: &connectors,
        pools,
        engine: &engine,
        invalid,
        deliver_count: Default::default(),
        deliver_ids: Default::default(),
        known: Default::default(),
    };
    let pipelines = crate::pipeline::spec::load_dirs(&pipeline_dirs, &scope, &mut diags);

    if !diags.is_empty() {
        diags
            .0
            .sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
        return Err(diags);
    }
    Ok(Config {
        file: from_file.then(|| file.to_path_buf()),
        data_dir: top
            .data_dir
            .as_ref()
            .map(|d| base_dir.join(d))
            .unwrap_or_else(|| base_dir.join("data")),
        base_dir,
        listen,
        durability: top.durability.unwrap_or_default(),
        flush_interval: top
            .flush_interval
            .map(|d| d.0)
            .unwrap_or(Duration::from_millis(200)),
        admin_token: top.admin_token,
        public_url: top.public_url.map(|u| u.trim_end_matches('/').to_string()),
        max_body: top.max_body.map(|b| b.0).unwrap_or(DEFAULT_MAX_BODY),
        pii_fields: top.pii_fields.unwrap_or_default(),
        retention: top.retention.map(|d| d.0),
        dedup_window: top.dedup_window.map(|d| d.0),
        header_timeout: top
            .header_timeout
            .map_or(crate::http::HEADER_TIMEOUT, |d| d.0),
        body_timeout: top
            .body_timeout
            .map_or(crate::ingest::BODY_TIMEOUT, |d| d.0),
        api_keys: top.api_keys.unwrap_or_default(),
        loyalty: top.loyalty.unwrap_or_default(),
        promo_codes: top.promo_codes.unwrap_or_default(),
        connector_dirs,
        pipeline_dirs,
        sources,
        sinks,
        pipelines,
        connectors,
        locations: doc.loc,
        overrides: Overrides::default(),
    })
}

/// The top level. When it does not parse as a whole, its keys are parsed one by one, so a typo
/// there (`durabilty:`) neither hides the other top-level problems nor stops the sources from
/// being checked.
fn parse_top(doc: &Document, diags: &mut Diagnostics) -> TopSpec {
    let first = match doc.parse::<TopSpec>() {
        Ok(top) => return top,
        Err(d) => d,
    };
    let keys = doc.keys_of("");
    // Only a block mapping at column 1 (the usual file) can be cut into entries.
    if keys.is_empty() || keys.iter().any(|k| doc.loc.key(k).1 != 1) {
        diags.push(first);
        return TopSpec::default();
    }
    let mut top = TopSpec::default();
    let mut found = Vec::new();
    for key in keys {
        match doc.parse_entry::<TopSpec>(&key) {
            Ok(one) => top.merge(one),
            Err(d) => found.push(d),
        }
    }
    if !found
        .iter()
        .any(|d| (d.line, d.col, &d.message) == (first.line, first.col, &first.message))
    {
        found.push(first);
    }
    diags.0.extend(found);
    top
}

impl TopSpec {
    fn merge(&mut self, one: TopSpec) {
        let TopSpec {
            listen,
            data_dir,
            durability,
            flush_interval,
            admin_token,
            pipelines,
            connectors,
            public_url,
            max_body,
            pii_fields,
            retention,
            dedup_window,
            header_timeout,
            body_timeout,
            api_keys,
            loyalty,
            promo_codes,
            sources,
            sinks,
        } = one;
        self.listen = self.listen.take().or(listen);
        self.data_dir = self.data_dir.take().or(data_dir);
        self.durability = self.durability.take().or(durability);
        self.flush_interval = self.flush_interval.take().or(flush_interval);
        self.admin_token = self.admin_token.take().or(admin_token);
        self.pipelines = self.pipelines.take().or(pipelines);
        self.connectors = self.connectors.take().or(connectors);
        self.public_url = self.public_url.take().or(public_url);
        self.max_body = self.max_body.take().or(max_body);
        self.pii_fields = self.pii_fields.take().or(pii_fields);
        self.retention = self.retention.take().or(retention);
        self.dedup_window = self.dedup_window.take().or(dedup_window);
        self.header_timeout = self.header_timeout.take().or(header_timeout);
        self.body_timeout = self.body_timeout.take().or(body_timeout);
        self.api_keys = self.api_keys.take().or(api_keys);
        self.loyalty = self.loyalty.take().or(loyalty);
        self.promo_codes = self.promo_codes.take().or(promo_codes);
        self.sources = self.sources.take().or(sources);
        self.sinks = self.sinks.take().or(sinks);
    }
}

/// Every `*.yaml`/`*.yml` file in `dirs` (sorted per dir) with its text; a missing dir is
/// no problem (the defaults name dirs that may not exist), an unreadable one is.
pub fn yaml_files(dirs: &[PathBuf], what: &str, diags: &mut Diagnostics) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                diags.push(Diagnostic::new(
                    dir,
                    0,
                    0,
                    "",
                    format!("cannot read {what} dir: {e}"),
                ));
                continue;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        for f in files {
            match std::fs::read_to_string(&f) {
                Ok(text) => out.push((f, text)),
                Err(e) => diags.push(Diagnostic::new(&f, 0, 0, "", format!("cannot read: {e}"))),
            }
        }
    }
    out
}

fn valid_source_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `url::ParseError` (reqwest does not re-export it by name).
type UrlError = <reqwest::Url as std::str::FromStr>::Err;

fn check_url(u: &str) -> Result<(), String> {
    match reqwest::Url::parse(u) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        Ok(_) => Err(format!("`{u}` must be an http(s) URL with a host")),
        Err(UrlError::RelativeUrlWithoutBase) => Err(format!(
            "`{u}` is not an absolute URL: start it with `https://` (or `http://`)"
        )),
        Err(e) => Err(format!("`{u}` is not a URL: {e}")),
    }
}

fn check_sink(
    doc: &Document,
    path: &str,
    name: &str,
    spec: SinkSpec,
    connectors: &Registry,
    diags: &mut Diagnostics,
) -> Option<Sink> {
    let before = diags.len();
    let Some(def) = connectors.get(&spec.connector).and_then(|c| c.sink.clone()) else {
        let hint = suggestion(&spec.connector, connectors.sink_ids());
        let known: Vec<&str> = connectors.sink_ids().collect();
        diags.push(doc.at(
            &join(path, "connector"),
            format!(
                "unknown sink connector `{}`{hint}; known: {}",
                spec.connector,
                known.join(", ")
            ),
        ));
        return None;
    };
    let mut params = IndexMap::new();
    let (mut base_url, mut rate) = (None, None);
    let (mut concurrency, mut timeout, mut max_attempts, mut max_age) = (None, None, None, None);
    for (key, value) in &spec.params {
        let vpath = join(path, key);
        let text = match value {
            serde_yaml::Value::String(s) => Some(yaml::restore(s).into_owned()),
            serde_yaml::Value::Number(n) => Some(n.to_string()),
            serde_yaml::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        let Some(text) = text else {
            diags.push(doc.at(
                &vpath,
                format!("`{key}` must be a single value, not a list or a map"),
            ));
            continue;
        };
        match key.as_str() {
            "base_url" => match check_url(&text) {
                Ok(()) => base_url = Some(text.trim_end_matches('/').to_string()),
                Err(m) => diags.push(doc.at(&vpath, m)),
            },
            "rate" => match parse_rate(&text) {
                Some(r) => rate = Some(r),
                None => diags.push(doc.at(
                    &vpath,
                    format!("`{text}` is not a rate: use requests per second (`10`) or `N/s`, `N/min`, `N/10s`"),
                )),
            },
            "concurrency" => match text.parse::<usize>() {
                Ok(n) if n > 0 => concurrency = Some(n),
                _ => diags.push(doc.at(&vpath, format!("`{text}` is not a positive number of requests"))),
            },
            "max_attempts" => match text.parse::<u32>() {
                Ok(n) if n > 0 => max_attempts = Some(n),
                _ => diags.push(doc.at(&vpath, format!("`{text}` is not a positive number of attempts"))),
            },
            "timeout" | "max_age" => match humantime::parse_duration(&text) {
                Ok(d) if !d.is_zero() => {
                    if key == "timeout" {
                        if d >= def.limits.lease.0 {
                            diags.push(doc.at(
                                &vpath,
                                format!(
                                    "the timeout must be shorter than the connector's lease ({}): a job could otherwise be claimed twice",
                                    humantime::format_duration(def.limits.lease.0)
                                ),
                            ));
                        }
                        timeout = Some(d);
                    } else {
                        max_age = Some(d);
                    }
                }
                _ => diags.push(doc.at(&vpath, format!("`{text}` is not a duration such as `30s` or `24h`"))),
            },
            _ if def.params.contains_key(key) => match Interpolated::parse(&text) {
                Ok(v) => {
                    params.insert(key.clone(), v);
                }
                Err(m) => diags.push(doc.at(&vpath, m)),
            },
            _ => {
                let mut expected: Vec<&str> = def.params.keys().map(String::as_str).collect();
                expected.extend(SINK_SETTINGS);
                let hint = suggestion(key, expected.iter().copied());
                diags.push(doc.at_key(
                    &vpath,
                    format!(
                        "unknown parameter `{key}` for sink connector `{}`{hint}; expected one of {}",
                        spec.connector,
                        expected.iter().map(|e| format!("`{e}`")).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
    for (pname, p) in &def.params {
        if p.required && !spec.params.contains_key(pname) {
            diags.push(doc.at(
                path,
                format!("sink connector `{}` needs `{pname}:`", spec.connector),
            ));
        }
    }
    (diags.len() == before).then(|| Sink {
        name: name.to_string(),
        connector: spec.connector.clone(),
        params,
        base_url,
        rate,
        concurrency,
        timeout,
        max_attempts,
        max_age,
    })
}

/// Settings every `sinks:` entry takes beside its connector's parameters.
pub const SINK_SETTINGS: [&str; 6] = [
    "base_url",
    "rate",
    "concurrency",
    "timeout",
    "max_attempts",
    "max_age",
];

/// `10`, `10/s`, `600/min`, `100/10s` -> requests per second.
pub fn parse_rate(text: &str) -> Option<f64> {
    let (n, per) = match text.split_once('/') {
        Some((n, per)) => (n.trim(), per.trim()),
        None => (text.trim(), "s"),
    };
    let n: f64 = n.parse().ok().filter(|n: &f64| *n > 0.0 && n.is_finite())?;
    let secs = match per {
        "s" | "sec" | "second" => 1.0,
        "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        other => humantime::parse_duration(other).ok()?.as_secs_f64(),
    };
    (secs > 0.0).then(|| n / secs)
}

#[allow(clippy::too_many_arguments)]
fn check_source(
    doc: &Document,
    path: &str,
    name: &str,
    spec: SourceSpec,
    top: &TopSpec,
    connectors: &Registry,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> Option<Source> {
    let before = diags.len();
    let cpath = join(path, "connector");
    let Some(def) = connectors
        .get(&spec.connector)
        .and_then(|c| c.source.clone())
    else {
        let hint = suggestion(&spec.connector, connectors.source_ids());
        let known: Vec<&str> = connectors.source_ids().collect();
        diags.push(doc.at(
            &cpath,
            format!(
                "unknown source connector `{}`{hint}; known: {}",
                spec.connector,
                known.join(", ")
            ),
        ));
        return None;
    };
    let refuse = |diags: &mut Diagnostics, field: &str, present: bool, why: &str| {
        if present {
            diags.push(doc.at_key(&join(path, field), format!("`{field}` {why}")));
        }
    };
    let kind = match &def.verify {
        VerifyKind::HmacSha256(_) => "hmac_sha256",
        VerifyKind::StripeV1(_) => "stripe_v1",
        VerifyKind::Paypal(_) => "paypal",
    };
    let not_for = format!(
        "does not apply to connector `{}` (verify kind `{kind}`)",
        spec.connector
    );
    match &def.verify {
        VerifyKind::HmacSha256(_) | VerifyKind::StripeV1(_) => {
            match (&spec.secret, &spec.secrets) {
                (None, None) => diags.push(doc.at(
                    path,
                    "needs `secret:` (or `secrets: [old, new]` while rotating)",
                )),
                (Some(_), Some(_)) => diags.push(doc.at_key(
                    &join(path, "secrets"),
                    "give either `secret` or `secrets`, not both",
                )),
                (None, Some(list)) if list.is_empty() => {
                    diags.push(doc.at(&join(path, "secrets"), "needs at least one secret"))
                }
                _ => {}
            }
            let paypal_only = [
                ("webhook_id", spec.webhook_id.is_some()),
                ("verify", spec.verify.is_some()),
                ("cert_hosts", spec.cert_hosts.is_some()),
                ("ca_file", spec.ca_file.is_some()),
                ("cert_pins", spec.cert_pins.is_some()),
                ("client_id", spec.client_id.is_some()),
                ("client_secret", spec.client_secret.is_some()),
                ("base_url", spec.base_url.is_some()),
            ];
            for (field, present) in paypal_only {
                refuse(diags, field, present, &not_for);
            }
        }
        VerifyKind::Paypal(_) => {
            refuse(diags, "secret", spec.secret.is_some(), &not_for);
            refuse(diags, "secrets", spec.secrets.is_some(), &not_for);
            if spec.webhook_id.is_none() {
                diags.push(doc.at(
                    path,
                    "needs `webhook_id:` (the id PayPal gave your webhook subscription)",
                ));
            }
            let mode = spec.verify.unwrap_or_default();
            let cert_only = "applies only to `verify: cert`";
            let api_only = "applies only to `verify: api`";
            match mode {
                PaypalMode::Cert => {
                    refuse(diags, "client_id", spec.client_id.is_some(), api_only);
                    refuse(
                        diags,
                        "client_secret",
                        spec.client_secret.is_some(),
                        api_only,
                    );
                    refuse(diags, "base_url", spec.base_url.is_some(), api_only);
                    if let Some(ca) = &spec.ca_file {
                        if !base_dir.join(ca).is_file() {
                            diags.push(doc.at(
                                &join(path, "ca_file"),
                                format!("no such file: {}", ca.display()),
                            ));
                        }
                    }
                    for (url, pem) in spec.cert_pins.iter().flatten() {
                        let p = join(&join(path, "cert_pins"), url);
                        if reqwest::Url::parse(url).is_err() {
                            diags.push(doc.at_key(&p, format!("`{url}` is not a URL")));
                        }
                        if !base_dir.join(pem).is_file() {
                            diags.push(doc.at(&p, format!("no such file: {}", pem.display())));
                        }
                    }
                    if spec.cert_hosts.as_ref().is_some_and(|h| h.is_empty()) {
                        diags.push(doc.at(
                            &join(path, "cert_hosts"),
                            "an empty allowlist refuses every certificate",
                        ));
                    }
                }
                PaypalMode::Api => {
                    refuse(diags, "cert_hosts", spec.cert_hosts.is_some(), cert_only);
                    refuse(diags, "ca_file", spec.ca_file.is_some(), cert_only);
                    refuse(diags, "cert_pins", spec.cert_pins.is_some(), cert_only);
                    let needs = match (&spec.client_id, &spec.client_secret) {
                        (None, None) => Some("`client_id:` and `client_secret:`"),
                        (None, Some(_)) => Some("`client_id:`"),
                        (Some(_), None) => Some("`client_secret:`"),
                        (Some(_), Some(_)) => None,
                    };
                    if let Some(needs) = needs {
                        diags.push(doc.at(
                            path,
                            format!("`verify: api` needs {needs} (PayPal REST app credentials)"),
                        ));
                    }
                    if let Some(u) = &spec.base_url {
                        if let Err(m) = check_url(u) {
                            diags.push(doc.at(&join(path, "base_url"), m));
                        }
                    }
                }
            }
        }
    }
    if spec.tolerance.is_some() && !matches!(def.verify, VerifyKind::StripeV1(_)) {
        diags.push(doc.at_key(
            &join(path, "tolerance"),
            format!("`tolerance` {not_for}: its signature has no timestamp"),
        ));
    }
    let signs_url =
        matches!(&def.verify, VerifyKind::HmacSha256(h) if h.signs == Signs::UrlAndBody);
    match (&spec.url, signs_url) {
        (Some(_), false) => diags.push(doc.at_key(&join(path, "url"), format!("`url` {not_for}: it does not sign the URL"))),
        (Some(u), true) => {
            if let Err(m) = check_url(u) {
                diags.push(doc.at(&join(path, "url"), m));
            }
        }
        (None, true) if top.public_url.is_none() => diags.push(doc.at(
            path,
            format!("connector `{}` signs the notification URL: set `url:` here or `public_url:` at the top", spec.connector),
        )),
        _ => {}
    }
    (diags.len() == before).then(|| Source {
        name: name.to_string(),
        connector: spec.connector.clone(),
        def,
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `text` without the repository's own `pipelines/` dir (appended last, so line
    /// numbers stay).
    fn load(text: &str, from_file: bool) -> Result<Config, Diagnostics> {
        load_text(
            Path::new("perkflow.yaml"),
            from_file,
            &format!("{text}\npipelines: []\n"),
        )
    }

    fn errors(text: &str) -> String {
        match load(text, true) {
            Ok(_) => String::new(),
            Err(d) => d.to_string(),
        }
    }

    #[test]
    fn listen_takes_an_ip_address_or_localhost() {
        assert_eq!(
            parse_listen("0.0.0.0:9000").unwrap().to_string(),
            "0.0.0.0:9000"
        );
        assert_eq!(
            parse_listen("[::1]:9000").unwrap().to_string(),
            "[::1]:9000"
        );
        assert_eq!(
            parse_listen("localhost:9000").unwrap().to_string(),
            "127.0.0.1:9000"
        );
        assert!(parse_listen("localhost:99999")
            .unwrap_err()
            .contains("port"));
        assert!(parse_listen("example.com:80")
            .unwrap_err()
            .contains("0.0.0.0:8080"));
        let c = load("listen: localhost:8181\n", false).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8181");
        let e = load("listen: nowhere\n", false).unwrap_err().to_string();
        assert!(
            e.contains(":1:9: listen: `nowhere` is not an address"),
            "{e}"
        );
    }

    #[test]
    fn empty_config_uses_defaults() {
        let c = load("", false).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.durability, Durability::Fsync);
        assert_eq!(c.max_body, 1 << 20);
        assert!(c.sources.is_empty());
    }

    #[test]
    fn collects_every_problem_across_sources() {
        let text = "\
sources:
  shop:
    connector: shopfy
    secret: x
  stripe:
    connector: stripe
    secert: y
  sq:
    connector: square
    secret: z
  pp:
    connector: paypal
    secret: nope
    webhook_id: WH1
";
        let out = errors(text);
        assert_eq!(
            out,
            "perkflow.yaml:3:16: sources.shop.connector: unknown source connector `shopfy` (did you mean `shopify`?); known: shopify, woocommerce, stripe, square, paypal, quickbooks\n\
perkflow.yaml:7:5: sources.stripe.secert: unknown field `secert`, expected one of `connector`, `secret`, `secrets`, `tolerance`, `url`, `max_body`, `webhook_id`, `verify`, `cert_hosts`, `ca_file`, `cert_pins`, `client_id`, `client_secret`, `base_url` (did you mean `secret`?)\n\
perkflow.yaml:9:5: sources.sq: connector `square` signs the notification URL: set `url:` here or `public_url:` at the top\n\
perkflow.yaml:13:5: sources.pp.secret: `secret` does not apply to connector `paypal` (verify kind `paypal`)\n"
        );
    }

    #[test]
    fn the_dedup_window_needs_retention_and_is_not_shorter() {
        assert_eq!(
            errors("dedup_window: 30d\n"),
            "perkflow.yaml:1:15: dedup_window: applies to what retention leaves of an event: set `retention:` too\n"
        );
        assert_eq!(
            errors("retention: 30d\ndedup_window: 7d\n"),
            "perkflow.yaml:2:15: dedup_window: is shorter than `retention` (30days): events are de-duplicated at least as long as their payload is kept\n"
        );
        let c = load("retention: 30d\ndedup_window: 90d\n", false).unwrap();
        assert_eq!(c.dedup_window, Some(Duration::from_secs(90 * 86_400)));
    }

    #[test]
    fn top_level_unknown_key_has_position_and_suggestion() {
        let out = errors("listen: 127.0.0.1:9\ndurabilty: fsync\n");
        assert!(
            out.starts_with("perkflow.yaml:2:1: durabilty: unknown field `durabilty`"),
            "{out}"
        );
        assert!(out.contains("(did you mean `durability`?)"), "{out}");
    }

    #[test]
    fn a_top_level_problem_does_not_hide_the_rest() {
        let text = "\
listen: nowhere
durabilty: batch
public_url: https://hooks.example.com
max_body: lots
sources:
  sq: { connector: square, secret: k }
  shop:
    connector: shopify
    secert: x
";
        let out = errors(text);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(
            lines[0],
            "perkflow.yaml:1:9: listen: `nowhere` is not an address like 127.0.0.1:8080 (0.0.0.0:8080 for every interface, localhost:8080 for this machine only)"
        );
        assert!(
            lines[1].starts_with("perkflow.yaml:2:1: durabilty: unknown field `durabilty`")
                && lines[1].ends_with("(did you mean `durability`?)"),
            "{out}"
        );
        assert!(
            lines[2].starts_with("perkflow.yaml:4:11: max_body: invalid value"),
            "{out}"
        );
        // public_url was still read: square's URL is known, so only the typo below is reported.
        assert!(
            lines[3].starts_with("perkflow.yaml:9:5: sources.shop.secert: unknown field `secert`"),
            "{out}"
        );
        // A document that is not a mapping keeps its single error.
        let not_a_map = load_text(Path::new("perkflow.yaml"), true, "- a\n")
            .unwrap_err()
            .to_string();
        assert!(
            not_a_map.starts_with("perkflow.yaml:1:1: invalid type"),
            "{not_a_map}"
        );
    }

    #[test]
    fn bad_scalars_point_at_the_value() {
        let out =
            errors("sources:\n  s:\n    connector: stripe\n    secret: a\n    tolerance: soon\n");
        assert!(
            out.starts_with(
                "perkflow.yaml:5:16: sources.s.tolerance: invalid value: string \"soon\""
            ),
            "{out}"
        );
        let out = errors("listen: nowhere\n");
        assert_eq!(
            out,
            "perkflow.yaml:1:9: listen: `nowhere` is not an address like 127.0.0.1:8080 (0.0.0.0:8080 for every interface, localhost:8080 for this machine only)\n"
        );
        let out = errors("sources:\n  s:\n    connector: shopify\n    secret: ${BAD-NAME}\n");
        assert!(
            out.starts_with(
                "perkflow.yaml:4:13: sources.s.secret: `${BAD-NAME}` is not a valid reference"
            ),
            "{out}"
        );
    }

    #[test]
    fn accepts_the_product_contract_shape() {
        let text = "\
listen: 127.0.0.1:8080
data_dir: ./data
durability: fsync
admin_token: ${PERKFLOW_ADMIN_TOKEN}
public_url: https://hooks.example.com
sources:
  shop-main:
    connector: shopify
    secret: ${SHOPIFY_WEBHOOK_SECRET}
  stripe:   { connector: stripe, secret: ${STRIPE_WEBHOOK_SECRET}, tolerance: 300s }
  square:   { connector: square, secret: ${SQUARE_SIGNATURE_KEY} }
  paypal:   { connector: paypal, webhook_id: ${PAYPAL_WEBHOOK_ID}, verify: cert }
  paypal2:  { connector: paypal, webhook_id: WH-2, verify: api, client_id: a, client_secret: b }
  qbo:      { connector: quickbooks, secret: ${QBO_VERIFIER_TOKEN} }
  woo:      { connector: woocommerce, secrets: [old, new] }
sinks:
  sms:      { connector: twilio_sms, account_sid: ${TWILIO_ACCOUNT_SID}, auth_token: ${TWILIO_AUTH_TOKEN}, from: \"+15550100\" }
  rewards:  { connector: giftcard, email: ${GC_EMAIL}, access_token: ${GC_ACCESS_TOKEN} }
";
        let c = load(text, true).unwrap();
        assert_eq!(c.sources.len(), 7);
        assert_eq!(c.sinks.len(), 2);
        assert_eq!(c.public_url.as_deref(), Some("https://hooks.example.com"));
    }

    #[test]
    fn sinks_are_checked_against_their_connector_params() {
        let ok = "sinks:\n  sms: { connector: twilio_sms, account_sid: ${A}, auth_token: ${B}, from: \"+15550100\", rate: 5/s }\n  rewards: { connector: giftcard, email: ${GC_EMAIL}, access_token: ${GC_ACCESS_TOKEN}, base_url: https://stage.example.com/ }\n";
        let c = load(ok, true).unwrap();
        assert_eq!(c.sinks["sms"].rate, Some(5.0));
        assert_eq!(
            c.sinks["rewards"].base_url.as_deref(),
            Some("https://stage.example.com")
        );
        let out = errors("sinks:\n  sms:\n    connector: twilio_sms\n    account_sid: a\n    auth_tokn: b\n    rate: fast\n  x: { connector: twilio }\n");
        assert_eq!(
            out,
            "perkflow.yaml:3:5: sinks.sms: sink connector `twilio_sms` needs `auth_token:`\n\
perkflow.yaml:5:5: sinks.sms.auth_tokn: unknown parameter `auth_tokn` for sink connector `twilio_sms` (did you mean `auth_token`?); expected one of `account_sid`, `auth_token`, `api_key_sid`, `from`, `messaging_service_sid`, `status_callback`, `base_url`, `rate`, `concurrency`, `timeout`, `max_attempts`, `max_age`\n\
perkflow.yaml:6:11: sinks.sms.rate: `fast` is not a rate: use requests per second (`10`) or `N/s`, `N/min`, `N/10s`\n\
perkflow.yaml:7:19: sinks.x.connector: unknown sink connector `twilio` (did you mean `twilio_sms`?); known: quickbooks, giftcard, twilio_sms, sendgrid, klaviyo, slack, zendesk, bookings, hubspot, square_loyalty, webhook\n"
        );
        // Square requires a location on accumulate and redeem.
        assert_eq!(
            errors("sinks:\n  l: { connector: square_loyalty, access_token: t }\n"),
            "perkflow.yaml:2:6: sinks.l: sink connector `square_loyalty` needs `location_id:`\n"
        );
        assert_eq!(parse_rate("100/10s"), Some(10.0));
        assert_eq!(parse_rate("600/min"), Some(10.0));
        assert_eq!(parse_rate("0"), None);
    }

    #[test]
    fn paypal_mode_fields_are_checked() {
        let out = errors("sources:\n  pp:\n    connector: paypal\n    webhook_id: W\n    verify: api\n    cert_hosts: [a]\n");
        assert_eq!(
            out,
            "perkflow.yaml:3:5: sources.pp: `verify: api` needs `client_id:` and `client_secret:` (PayPal REST app credentials)\n\
perkflow.yaml:6:5: sources.pp.cert_hosts: `cert_hosts` applies only to `verify: cert`\n"
        );
    }
}
