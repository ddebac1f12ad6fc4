//! The sink side of a connector: how a vendor is called (base URL, auth, one request per
//! action), how fast (rate, concurrency, timeout, lease), how often (retry policy) and how its
//! answers are read (`classify`). Strings in `base_url`, `headers`, `path`, `query` and
//! `body` are minijinja templates over `params` (the sink's configured values), `with` (what
//! the pipeline's deliver step gave) and `job` (`key`, `event_id`, `attempt`).

use crate::config::scalar::DurationSpec;
use indexmap::IndexMap;
use serde::Deserialize;
use std::time::Duration;

/// A sink's side of a connector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkDef {
    pub params: IndexMap<String, ParamDef>,
    /// Where requests go unless the sink sets `base_url:` (a template over `params`).
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    pub auth: AuthDef,
    /// Headers on every request (templates).
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    #[serde(default)]
    pub limits: LimitsDef,
    #[serde(default)]
    pub retry: RetryDef,
    #[serde(default)]
    pub classify: ClassifyDef,
    /// What a pipeline may ask of the sink (`deliver: { to: <sink>.<action> }`).
    pub actions: IndexMap<String, ActionDef>,
}

/// One sink parameter.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamDef {
    #[serde(default)]
    pub required: bool,
    /// A credential: resolved from `${ENV}`/`${file:…}` like any value, never printed.
    #[serde(default)]
    pub secret: bool,
    #[serde(default)]
    pub doc: Option<String>,
}

/// The closed set of authentication kinds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthDef {
    /// The URL or a header template carries the credential (Slack incoming webhooks).
    #[default]
    None,
    /// HTTP Basic.
    Basic { username: String, password: String },
    /// `Authorization: Bearer <token>`.
    Bearer { token: String },
    /// `Authorization: <scheme> <token>`-style or any other single header.
    Header { name: String, value: String },
    /// A token minted by a call (`POST /v1/Tokens`), cached until shortly before it expires,
    /// refreshed once when the vendor answers 401; sent as `Authorization: Bearer <token>`.
    TokenExchange(TokenExchangeDef),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenExchangeDef {
    #[serde(default = "post")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// JSON pointer to the token in the answer.
    pub token: String,
    /// JSON pointer to its lifetime in seconds.
    #[serde(default)]
    pub expires_in: Option<String>,
}

fn post() -> String {
    "POST".into()
}

/// Rate, concurrency and time limits of one sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsDef {
    /// Vendor default rate (`10/s`, `100/10s`, `600/min`); a sink's `rate:` overrides it.
    #[serde(default)]
    pub rate: Option<String>,
    /// Requests allowed in a burst above the rate (default: one second's worth, at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Time allowed for one request, from connect to the last byte of the answer.
    #[serde(default = "default_timeout")]
    pub timeout: DurationSpec,
    /// How long a claimed job belongs to its worker; must exceed `timeout`.
    #[serde(default = "default_lease")]
    pub lease: DurationSpec,
}

fn default_concurrency() -> usize {
    8
}
fn default_timeout() -> DurationSpec {
    DurationSpec(Duration::from_secs(10))
}
fn default_lease() -> DurationSpec {
    DurationSpec(Duration::from_secs(60))
}

impl Default for LimitsDef {
    fn default() -> Self {
        LimitsDef {
            rate: None,
            burst: None,
            concurrency: default_concurrency(),
            timeout: default_timeout(),
            lease: default_lease(),
        }
    }
}

/// When to give up, and how long to wait in between.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryDef {
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// A job older than this is dead-lettered at its next failure.
    #[serde(default = "default_max_age")]
    pub max_age: DurationSpec,
    /// First backoff interval (full jitter: the wait is uniform in [0, interval]).
    #[serde(default = "default_initial")]
    pub initial: DurationSpec,
    /// Cap of the backoff interval.
    #[serde(default = "default_max_delay")]
    pub max_delay: DurationSpec,
    /// Cap of a vendor's `Retry-After` or reset header.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after: DurationSpec,
    /// Consecutive failures that open the circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker waits before it lets one probe through.
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown: DurationSpec,
}

fn default_max_attempts() -> u32 {
    12
}
fn default_max_age() -> DurationSpec {
    DurationSpec(Duration::from_secs(24 * 3600))
}
fn default_initial() -> DurationSpec {
    DurationSpec(Duration::from_secs(1))
}
fn default_max_delay() -> DurationSpec {
    DurationSpec(Duration::from_secs(600))
}
fn default_max_retry_after() -> DurationSpec {
    DurationSpec(Duration::from_secs(3600))
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> DurationSpec {
    DurationSpec(Duration::from_secs(30))
}

impl Default for RetryDef {
    fn default() -> Self {
        RetryDef {
            max_attempts: default_max_attempts(),
            max_age: default_max_age(),
            initial: default_initial(),
            max_delay: default_max_delay(),
            max_retry_after: default_max_retry_after(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown: default_breaker_cooldown(),
        }
    }
}

/// How a vendor's answer becomes an outcome. Without rules: 2xx delivered; 408, 425, 429
/// and 5xx retried; any other status permanent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyDef {
    /// Non-2xx statuses that mean "done" (the gift-card API's 409 for a known PONumber).
    #[serde(default)]
    pub success: Vec<u16>,
    /// Extra retryable statuses (Zendesk's 409 conflict).
    #[serde(default)]
    pub retry: Vec<u16>,
    /// Statuses that are permanent failures although 2xx or 5xx (HubSpot's 207 Multi-Status
    /// for a batch of one).
    #[serde(default)]
    pub permanent: Vec<u16>,
    /// JSON pointers where the vendor puts its error code (first present wins).
    #[serde(default)]
    pub error_code: Vec<String>,
    /// JSON pointers where the vendor puts a human message.
    #[serde(default)]
    pub error_message: Vec<String>,
    /// Vendor codes that are permanent whatever the status (Twilio 21211).
    #[serde(default)]
    pub permanent_codes: Vec<String>,
    /// Vendor codes that are retryable whatever the status.
    #[serde(default)]
    pub retry_codes: Vec<String>,
    /// Retryable statuses that, without a vendor error code in the answer, leave it unknown
    /// whether the request took effect (Twilio's bare 5xx).
    #[serde(default)]
    pub uncertain_status: Vec<u16>,
    /// Vendor codes after which the request may have taken effect (Slack's request_timeout).
    #[serde(default)]
    pub uncertain_codes: Vec<String>,
    /// Retry after a fixed, long wait (the gift-card API's 422 insufficient funds; HubSpot's
    /// DAILY limit), beside the normal schedule.
    #[serde(default)]
    pub slow: Vec<SlowRule>,
    /// A header telling when the rate-limit window resets.
    #[serde(default)]
    pub reset_header: Option<ResetHeader>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowRule {
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub code: Option<String>,
    pub after: DurationSpec,
    /// Why, for the trace and the health page.
    pub reason: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetHeader {
    pub name: String,
    /// `epoch` (Unix seconds of the reset) or `seconds` (seconds from now).
    pub form: ResetForm,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResetForm {
    Epoch,
    Seconds,
}

/// One sink action: a single HTTP request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionDef {
    #[serde(default)]
    pub doc: Option<String>,
    #[serde(default = "post")]
    pub method: String,
    /// Appended to the base URL; a template that renders an absolute `https://` URL is used
    /// as is (Slack's webhook URL).
    pub path: String,
    #[serde(default)]
    pub query: IndexMap<String, String>,
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    #[serde(default)]
    pub encoding: BodyEncoding,
    /// The request body as a template tree; map entries that render to null are left out.
    #[serde(default)]
    pub body: Option<serde_yaml::Value>,
    /// The request carries the job's key where the vendor de-duplicates on it
    /// (`Idempotency-Key`, `idempotency_key`, `PONumber`, `unique_id`), or the call is an
    /// upsert: resending after an unknown outcome cannot create a second effect.
    #[serde(default)]
    pub idempotent: bool,
    /// How to find out whether an attempt with an unknown outcome took effect, before any
    /// resend.
    #[serde(default)]
    pub reconcile: Option<ReconcileDef>,
    /// Checks against the vendor's catalog before anything is sent (the gift-card product,
    /// its denominations and delivery types): a failed check is a permanent error.
    #[serde(default)]
    pub catalog: Option<CatalogDef>,
    /// A 2xx answer is only a success when this JSON pointer is `true` (Slack's `ok`).
    #[serde(default)]
    pub ok_field: Option<String>,
    /// Follow what was created to a final state (the gift-card order: Pending -> Completed)
    /// and emit an internal event pipelines can subscribe to.
    #[serde(default)]
    pub track: Option<TrackDef>,
    /// Where the vendor's id of what was created is (recorded on the job).
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    pub record: Option<RecordDef>,
    /// The action only reads (a search sent as POST): pipelines may use it in a `lookup`
    /// step. Default: true for GET, false otherwise.
    #[serde(default)]
    pub read_only: Option<bool>,
    /// The `with.<key>`s the action's templates read, found by the loader
    /// ([`WithReads::of`]); `None` until then.
    #[serde(skip)]
    pub reads: Option<WithReads>,
}

/// What a sink action reads of a deliver step's `with:`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WithReads {
    /// The keys read as `with.<key>` (or `with['<key>']`).
    pub keys: std::collections::BTreeSet<String>,
    /// `with` is also read as a whole (`{{ with | tojson }}`, `with[name]`): any key may
    /// matter.
    pub whole: bool,
}

impl WithReads {
    /// Collected from every template of `action` (a YAML subtree of the connector) and of
    /// the sink's shared parts (`shared`: base URL, auth, headers).
    pub fn of(action: &serde_yaml::Value, shared: &[&serde_yaml::Value]) -> WithReads {
        fn strings<'v>(v: &'v serde_yaml::Value, out: &mut Vec<&'v str>) {
            match v {
                serde_yaml::Value::String(s) => out.push(s),
                serde_yaml::Value::Sequence(items) => items.iter().for_each(|i| strings(i, out)),
                serde_yaml::Value::Mapping(m) => m.values().for_each(|i| strings(i, out)),
                serde_yaml::Value::Tagged(t) => strings(&t.value, out),
                _ => {}
            }
        }
        let mut all = Vec::new();
        strings(action, &mut all);
        for s in shared {
            strings(s, &mut all);
        }
        let engine = crate::pipeline::expr::Engine::new();
        let mut reads = WithReads::default();
        for src in all {
            for path in engine.variable_paths(src) {
                if path == "with" {
                    reads.whole = true;
                } else if let Some(key) = path.strip_prefix("with.") {
                    // `with.a.b` reads `a`; `without` is another variable.
                    let key = key.split('.').next().unwrap_or(key);
                    reads.keys.insert(key.to_string());
                }
            }
        }
        reads
    }
}

impl ActionDef {
    /// Whether a `lookup` step may call this action.
    pub fn reads_only(&self) -> bool {
        self.read_only
            .unwrap_or_else(|| self.method.eq_ignore_ascii_case("GET"))
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BodyEncoding {
    #[default]
    Json,
    Form,
    /// `application/vnd.api+json` (JSON:API, Klaviyo).
    JsonApi,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileDef {
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub query: IndexMap<String, String>,
    /// JSON pointer to a list in the answer (`""`: the answer is the list); the item whose
    /// `match_field` equals `match_value` is the earlier attempt's effect. Without it the
    /// answer itself is the object.
    #[serde(default)]
    pub items: Option<String>,
    #[serde(default)]
    pub match_field: Option<String>,
    /// Template: the value that identifies our request (the PONumber).
    #[serde(default)]
    pub match_value: Option<String>,
    /// JSON pointer (within the item) to the vendor id; present means "it took effect".
    /// A 404 or an absent value means it did not.
    pub found: String,
}

fn get() -> String {
    "GET".into()
}

/// Polling what an action created until it reaches a final state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackDef {
    /// Template over `job.vendor_id` (the recorded id): `/v1/Orders/{{ job.vendor_id }}`.
    pub path: String,
    /// JSON pointer to the status in the answer (and in the creation answer).
    pub status: String,
    /// Statuses that mean done, and failed.
    pub done: Vec<String>,
    #[serde(default)]
    pub failed: Vec<String>,
    /// First poll after this; the wait doubles, up to 10 minutes.
    #[serde(default = "default_track_every")]
    pub every: DurationSpec,
    /// Stop following after this (the tracking job is dead-lettered).
    #[serde(default = "default_track_give_up")]
    pub give_up: DurationSpec,
    /// Internal event types emitted, with the sink's name as their source.
    pub emit: EmitDef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmitDef {
    pub done: String,
    pub failed: String,
}

fn default_track_every() -> DurationSpec {
    DurationSpec(Duration::from_secs(5))
}
fn default_track_give_up() -> DurationSpec {
    DurationSpec(Duration::from_secs(7 * 24 * 3600))
}

/// A catalog read once per `ttl` (a list of items), the item a job names, and what that item
/// must allow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogDef {
    /// The list (`/v1/Products`), or one item when it names it (a template,
    /// `/v1/Products/{{ with.product }}`: a 404 then means the catalog lacks it). Each
    /// rendered URL is read at most once per `ttl`.
    pub path: String,
    #[serde(default)]
    pub query: IndexMap<String, String>,
    /// JSON pointer to the list in the answer (`""`: the answer is the list).
    #[serde(default)]
    pub items: String,
    /// The item field that identifies an item (`Id`).
    pub key: String,
    /// Template: the key the job asks for (`{{ with.product }}`).
    pub find: String,
    #[serde(default = "default_catalog_ttl")]
    pub ttl: DurationSpec,
    /// Each rule: the item's list at `field` must contain the rendered `value`.
    #[serde(default)]
    pub require: Vec<CatalogRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogRule {
    /// JSON pointer into the item (`/Denominations`).
    pub field: String,
    /// Template: the value the job needs (`{{ with.value }}`).
    pub value: String,
    /// What the refusal says, e.g. "is not a denomination of".
    pub message: String,
}

fn default_catalog_ttl() -> DurationSpec {
    DurationSpec(Duration::from_secs(24 * 3600))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RecordDef {
    Json(String),
    Header(String),
}

impl SinkDef {
    /// Internal event types this sink emits (tracking).
    pub fn emits(&self) -> Vec<String> {
        let mut out = Vec::new();
        for a in self.actions.values() {
            if let Some(t) = &a.track {
                for e in [&t.emit.done, &t.emit.failed] {
                    if !out.contains(e) {
                        out.push(e.clone());
                    }
                }
            }
        }
        out
    }

    /// Every template string of the definition with its path, for checking.
    pub fn templates(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(b) = &self.base_url {
            out.push(("sink.base_url".into(), b.clone()));
        }
        match &self.auth {
            AuthDef::None => {}
            AuthDef::Basic { username, password } => {
                out.push(("sink.auth.basic.username".into(), username.clone()));
                out.push(("sink.auth.basic.password".into(), password.clone()));
            }
            AuthDef::Bearer { token } => out.push(("sink.auth.bearer.token".into(), token.clone())),
            AuthDef::Header { name: _, value } => {
                out.push(("sink.auth.header.value".into(), value.clone()))
            }
            AuthDef::TokenExchange(t) => {
                out.push(("sink.auth.token_exchange.path".into(), t.path.clone()));
                for (k, v) in &t.headers {
                    out.push((format!("sink.auth.token_exchange.headers.{k}"), v.clone()));
                }
            }
        }
        for (k, v) in &self.headers {
            out.push((format!("sink.headers.{k}"), v.clone()));
        }
        for (name, a) in &self.actions {
            let p = format!("sink.actions.{name}");
            out.push((format!("{p}.path"), a.path.clone()));
            for (k, v) in &a.query {
                out.push((format!("{p}.query.{k}"), v.clone()));
            }
            for (k, v) in &a.headers {
                out.push((format!("{p}.headers.{k}"), v.clone()));
            }
            if let Some(body) = &a.body {
                strings(&format!("{p}.body"), body, &mut out);
            }
            if let Some(c) = &a.catalog {
                out.push((format!("{p}.catalog.path"), c.path.clone()));
                out.push((format!("{p}.catalog.find"), c.find.clone()));
                for (i, r) in c.require.iter().enumerate() {
                    out.push((format!("{p}.catalog.require[{i}].value"), r.value.clone()));
                }
            }
            if let Some(t) = &a.track {
                out.push((format!("{p}.track.path"), t.path.clone()));
            }
            if let Some(r) = &a.reconcile {
                out.push((format!("{p}.reconcile.path"), r.path.clone()));
                if let Some(v) = &r.match_value {
                    out.push((format!("{p}.reconcile.match_value"), v.clone()));
                }
                for (k, v) in &r.query {
                    out.push((format!("{p}.reconcile.query.{k}"), v.clone()));
                }
            }
        }
        out
    }
}

fn strings(path: &str, v: &serde_yaml::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_yaml::Value::String(s) => out.push((path.to_string(), s.clone())),
        serde_yaml::Value::Sequence(items) => {
            for (i, x) in items.iter().enumerate() {
                strings(&format!("{path}[{i}]"), x, out);
            }
        }
        serde_yaml::Value::Mapping(m) => {
            for (k, x) in m {
                if let Some(k) = k.as_str() {
                    strings(&format!("{path}.{k}"), x, out);
                }
            }
        }
        _ => {}
    }
}

impl LimitsDef {
    pub fn timeout(&self) -> Duration {
        self.timeout.0
    }
}
