//! Wiring: build the runtime from a checked config, open the store, serve HTTP, stop cleanly.

use crate::config::diagnostic::Diagnostics;
use crate::config::secrets::Secret;
use crate::config::Config;
use crate::connector::{Signs, SourceDef, VerifyKind};
use crate::inbox::Inbox;
use crate::ops::admin::AdminAccess;
use crate::store::Store;
use crate::verify::Verifier;
use axum::routing::{get, post};
use axum::Router;
use indexmap::IndexMap;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::{Arc, RwLock};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A source ready to take webhooks.
#[derive(Debug)]
pub struct SourceRuntime {
    pub name: String,
    pub connector: String,
    pub def: SourceDef,
    pub verifier: Verifier,
    pub max_body: usize,
    /// For URL-signing kinds: the URL the vendor signs.
    pub signed_url: Option<String>,
    /// The URL is the source's own `url:` (used as is, query included).
    pub fixed_url: bool,
    /// Lower-case names of the headers carrying the signature.
    pub signature_headers: Vec<String>,
}

/// A sink with its parameters resolved (credentials read from the environment or files).
#[derive(Debug)]
pub struct SinkRuntime {
    pub name: String,
    pub connector: String,
    pub def: Arc<crate::connector::SinkDef>,
    pub params: IndexMap<String, Secret>,
    pub base_url: Option<String>,
    pub rate: Option<f64>,
    pub concurrency: Option<usize>,
    pub timeout: Option<std::time::Duration>,
    pub max_attempts: Option<u32>,
    pub max_age: Option<std::time::Duration>,
}

impl SinkRuntime {
    /// The parameters as template values (credentials included: templates need them;
    /// everything shown to people goes through `SinkClient::redact`).
    pub fn param_values(&self) -> serde_json::Map<String, serde_json::Value> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose().to_string())))
            .collect()
    }

    /// A digest of everything that defines this sink (credential values included): equal
    /// digests across a reload mean the sink's lane (limiter, breaker, tokens) is kept.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.connector.as_bytes());
        h.update(format!("{:?}", self.def).as_bytes());
        for (k, v) in &self.params {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.expose().as_bytes());
            h.update([0]);
        }
        h.update(
            format!(
                "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
                self.base_url,
                self.rate,
                self.concurrency,
                self.timeout,
                self.max_attempts,
                self.max_age
            )
            .as_bytes(),
        );
        h.finalize().into()
    }

    pub fn timeout(&self) -> std::time::Duration {
        self.timeout.unwrap_or(self.def.limits.timeout.0)
    }

    /// The HTTP client of this sink.
    pub fn client(&self) -> Result<crate::sink::SinkClient, String> {
        crate::sink::SinkClient::build(
            &self.name,
            &self.connector,
            self.def.clone(),
            self.param_values(),
            self.base_url.as_deref(),
            self.timeout(),
        )
    }
}

/// Everything built from one config; replaced as a whole on reload.
#[derive(Debug, Default)]
pub struct Runtime {
    pub sources: IndexMap<String, SourceRuntime>,
    pub sinks: IndexMap<String, SinkRuntime>,
    pub pipelines: IndexMap<String, crate::pipeline::spec::Pipeline>,
    /// The configured personal-data fields.
    pub pii: crate::redact::Pii,
    /// Tiers and thresholds of the points program.
    pub loyalty: crate::ledger::Rules,
    /// Promo code pools.
    pub promo_codes: IndexMap<String, crate::codes::PoolSpec>,
}

impl Runtime {
    /// The pipelines subscribed to events of `event_type` from `source`.
    pub fn listeners<'a>(
        &'a self,
        source: &'a str,
        event_type: &'a str,
    ) -> impl Iterator<Item = &'a crate::pipeline::spec::Pipeline> + 'a {
        self.pipelines
            .values()
            .filter(move |p| p.on.source == source && p.on.events.iter().any(|e| e == event_type))
    }

    /// The personal data of a stored event (what to mask wherever it is shown).
    pub fn personal_data(&self, ev: &crate::inbox::StoredEvent) -> crate::redact::Values {
        if self.pii.is_empty() {
            return Default::default();
        }
        let payload = serde_json::from_slice(&ev.payload).unwrap_or(serde_json::Value::Null);
        self.pii.of(&payload)
    }
}

/// Resolves secrets and builds every verifier; every problem is reported.
pub fn build_runtime(cfg: &Config) -> Result<Runtime, Diagnostics> {
    let mut diags = Diagnostics::default();
    let mut sources = IndexMap::new();
    for src in cfg.sources.values() {
        let verifier = match crate::verify::build(src, cfg) {
            Ok(v) => v,
            Err(d) => {
                diags.push(d);
                continue;
            }
        };
        let signs_url =
            matches!(&src.def.verify, VerifyKind::HmacSha256(h) if h.signs == Signs::UrlAndBody);
        let (signed_url, fixed_url) = match (&src.spec.url, &cfg.public_url, signs_url) {
            (_, _, false) => (None, false),
            (Some(u), _, true) => (Some(u.clone()), true),
            (None, Some(p), true) => (Some(format!("{p}/hooks/{}", src.name)), false),
            (None, None, true) => (None, false),
        };
        let signature_headers = verifier
            .signature_headers()
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        sources.insert(
            src.name.clone(),
            SourceRuntime {
                name: src.name.clone(),
                connector: src.connector.clone(),
                def: src.def.clone(),
                verifier,
                max_body: src.spec.max_body.map(|b| b.0).unwrap_or(cfg.max_body),
                signed_url,
                fixed_url,
                signature_headers,
            },
        );
    }
    let mut sinks = IndexMap::new();
    for sink in cfg.sinks.values() {
        let mut params = IndexMap::new();
        for (key, value) in &sink.params {
            match value.resolve(&cfg.base_dir) {
                Ok(v) => {
                    params.insert(key.clone(), v);
                }
                Err(m) => diags.push(cfg.diag(&format!("sinks.{}.{key}", sink.name), m)),
            }
        }
        let Some(def) = cfg
            .connectors
            .get(&sink.connector)
            .and_then(|c| c.sink.clone())
        else {
            diags.push(cfg.diag(
                &format!("sinks.{}.connector", sink.name),
                format!("unknown sink connector `{}`", sink.connector),
            ));
            continue;
        };
        sinks.insert(
            sink.name.clone(),
            SinkRuntime {
                name: sink.name.clone(),
                connector: sink.connector.clone(),
                def: Arc::new(def),
                params,
                base_url: sink.base_url.clone(),
                rate: sink.rate,
                concurrency: sink.concurrency,
                timeout: sink.timeout,
                max_attempts: sink.max_attempts,
                max_age: sink.max_age,
            },
        );
    }
    if diags.is_empty() {
        Ok(Runtime {
            sources,
            sinks,
            pipelines: cfg.pipelines.clone(),
            pii: crate::redact::Pii::new(&cfg.pii_fields),
            loyalty: cfg.loyalty.clone(),
            promo_codes: cfg.promo_codes.clone(),
        })
    } else {
        Err(diags)
    }
}

/// Shared by every handler: one reference count (every request clones it).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What an [`AppState`] shares.
pub struct Shared {
    runtime: Arc<RwLock<Arc<Runtime>>>,
    pub inbox: Arc<dyn Inbox>,
    pub outbox: Arc<dyn crate::outbox::Outbox>,
    pub metrics: Option<PrometheusHandle>,
    pub admin: AdminAccess,
    /// Wakes the pipeline worker after an event is stored.
    pub wake: Arc<tokio::sync::Notify>,
    /// Wakes the delivery engine when jobs are written or replayed.
    pub jobs_ready: Arc<tokio::sync::Notify>,
    /// The delivery engine's sinks (limits, breakers), for health and status.
    pub lanes: crate::delivery::Lanes,
    /// KiB of request bodies that may be in memory at once (unverified senders included).
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// When the running configuration was loaded, and why the last reload was refused.
    reload: Arc<RwLock<ReloadStatus>>,
    /// The store itself (the ledger).
    pub store: Store,
    /// Apps allowed to call the member API.
    pub api_keys: Arc<Vec<crate::ops::members::ApiKey>>,
    /// One reload at a time.
    pub reload_lock: Arc<tokio::sync::Mutex<()>>,
    /// The config file reloads read (`None`: the defaults).
    pub config_path: Option<std::path::PathBuf>,
    /// Settings read once at start-up (a reload that changes them asks for a restart).
    pub boot: Arc<Boot>,
}

/// The settings a running daemon cannot change.
#[derive(Debug, Clone)]
pub struct Boot {
    pub listen: std::net::SocketAddr,
    pub data_dir: std::path::PathBuf,
    pub durability: crate::config::Durability,
    pub flush_interval: std::time::Duration,
    pub retention: Option<std::time::Duration>,
    pub dedup_window: Option<std::time::Duration>,
    pub header_timeout: std::time::Duration,
    pub body_timeout: std::time::Duration,
    /// Command-line settings, applied again to every reloaded config.
    pub overrides: crate::config::Overrides,
}

impl Boot {
    pub fn of(cfg: &Config) -> Boot {
        Boot {
            listen: cfg.listen,
            data_dir: cfg.data_dir.clone(),
            durability: cfg.durability,
            flush_interval: cfg.flush_interval,
            retention: cfg.retention,
            dedup_window: cfg.dedup_window,
            header_timeout: cfg.header_timeout,
            body_timeout: cfg.body_timeout,
            overrides: cfg.overrides.clone(),
        }
    }
}

/// The outcome of the last configuration (re)load.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub loaded_at_ms: u64,
    /// The last reload's problems; the previous configuration keeps running.
    pub error: Option<String>,
    pub error_at_ms: Option<u64>,
}

/// Request bodies held in memory at once, across all connections.
pub const BODY_BUDGET_KIB: usize = 256 * 1024;

impl AppState {
    pub fn new(
        runtime: Runtime,
        store: Store,
        metrics: Option<PrometheusHandle>,
        admin: AdminAccess,
    ) -> Self {
        Self::with(runtime, store, metrics, admin, |_| {})
    }

    /// `new`, with the settings `set` changes before the state is shared.
    pub fn with(
        runtime: Runtime,
        store: Store,
        metrics: Option<PrometheusHandle>,
        admin: AdminAccess,
        set: impl FnOnce(&mut Shared),
    ) -> Self {
        let inbox: Arc<dyn Inbox> = Arc::new(store.clone());
        let outbox: Arc<dyn crate::outbox::Outbox> = Arc::new(store.clone());
        let mut shared = Shared {
            store,
            api_keys: Default::default(),
            runtime: Arc::new(RwLock::new(Arc::new(runtime))),
            inbox,
            outbox,
            metrics,
            admin,
            wake: Arc::new(tokio::sync::Notify::new()),
            jobs_ready: Arc::new(tokio::sync::Notify::new()),
            lanes: Default::default(),
            body_budget: Arc::new(tokio::sync::Semaphore::new(BODY_BUDGET_KIB)),
            reload: Arc::new(RwLock::new(ReloadStatus {
                loaded_at_ms: crate::delivery::now_ms(),
                ..Default::default()
            })),
            reload_lock: Default::default(),
            config_path: None,
            boot: Arc::new(Boot {
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                data_dir: Default::default(),
                durability: Default::default(),
                flush_interval: Default::default(),
                retention: None,
                dedup_window: None,
                header_timeout: crate::http::HEADER_TIMEOUT,
                body_timeout: crate::ingest::BODY_TIMEOUT,
                overrides: Default::default(),
            }),
        };
        set(&mut shared);
        AppState(Arc::new(shared))
    }

    /// Replaces the running configuration (one swap; readers hold the old one until done).
    pub fn set_runtime(&self, rt: Runtime) {
        *self.runtime.write().expect("runtime lock") = Arc::new(rt);
    }

    /// Records a reload's outcome for the status page and `/api/connectors`.
    pub fn record_reload(&self, result: Result<(), String>) {
        let mut r = self.reload.write().expect("reload lock");
        let now = crate::delivery::now_ms();
        match result {
            Ok(()) => {
                r.loaded_at_ms = now;
                r.error = None;
                r.error_at_ms = None;
            }
            Err(e) => {
                r.error = Some(e);
                r.error_at_ms = Some(now);
            }
        }
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reload.read().expect("reload lock").clone()
    }
    /// The current runtime (cheap: one `Arc` clone).
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.read().expect("runtime lock").clone()
    }
}

/// Who may call the admin API, from the config's `admin_token` (resolved).
pub fn admin_access(cfg: &Config) -> Result<AdminAccess, String> {
    let token = match &cfg.admin_token {
        Some(t) => Some(t.resolve(&cfg.base_dir)?),
        None => None,
    };
    Ok(AdminAccess::decide(token))
}

/// The member API keys of the config, resolved; else the path of the first bad one and why.
pub fn api_keys(cfg: &Config) -> Result<Vec<crate::ops::members::ApiKey>, (String, String)> {
    let mut out = Vec::new();
    for (name, k) in &cfg.api_keys {
        let path = format!("api_keys.{name}.key");
        let key = k
            .key
            .resolve(&cfg.base_dir)
            .map_err(|m| (path.clone(), m))?;
        if key.expose().len() < 16 {
            return Err((path, "an API key is at least 16 characters".into()));
        }
        out.push(crate::ops::members::ApiKey {
            name: name.clone(),
            key,
            scopes: k.scopes.clone(),
        });
    }
    Ok(out)
}

pub fn router(state: AppState) -> Router {
    // Webhooks read their own bodies (the source's limit, the memory budget, the body
    // timeout); every other route gets its body through `bounded_body`.
    let others = Router::new()
        .route("/healthz", get(crate::ops::health::healthz))
        .route("/readyz", get(crate::ops::health::readyz))
        .route("/metrics", get(crate::ops::health::metrics))
        .merge(crate::ops::admin::routes(state.clone()))
        .merge(crate::ops::page::routes())
        .merge(crate::ops::members::routes())
        .merge(crate::ops::reports::routes())
        .layer(axum::middleware::from_fn(bounded_body));
    Router::new()
        .route("/hooks/{source}", post(crate::ingest::hook))
        .merge(others)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// The largest body of a request to the admin and member APIs or the status page's forms.
pub const OTHER_BODY: usize = 64 << 10;
/// How long such a body may take to arrive.
pub const OTHER_BODY_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the body of a request other than a webhook before anything else handles it: at
/// most `OTHER_BODY` bytes within `OTHER_BODY_TIME` (413, 408), so that nobody, with or
/// without credentials, can make the daemon hold a huge body or keep a connection open with
/// a trickle of one.
async fn bounded_body(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > OTHER_BODY as u64) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "body too large\n").into_response();
    }
    let bytes =
        match tokio::time::timeout(OTHER_BODY_TIME, axum::body::to_bytes(body, OTHER_BODY)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                return if too_large {
                    (StatusCode::PAYLOAD_TOO_LARGE, "body too large\n").into_response()
                } else {
                    (StatusCode::BAD_REQUEST, "could not read the body\n").into_response()
                };
            }
            Err(_) => {
                return (StatusCode::REQUEST_TIMEOUT, "body not received in time\n").into_response()
            }
        };
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// Installs the Prometheus recorder once per process; later calls reuse it.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                // Latencies as real histograms (buckets), not summaries: they aggregate
                // across instances and over time.
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// A daemon ready to serve: runtime built (secrets resolved) and store open.
pub struct Prepared {
    cfg: Config,
    state: AppState,
    store: Store,
    /// The pipeline worker starts once this resolves (`hold_worker`); at once without.
    worker_gate: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Resolves secrets, builds verifiers and opens the store: every start-up failure happens
/// here, before anything listens.
pub fn prepare(cfg: Config) -> anyhow::Result<Prepared> {
    let runtime =
        build_runtime(&cfg).map_err(|d| anyhow::anyhow!("invalid configuration:\n{d}"))?;
    let store = Store::open(&cfg.data_dir, cfg.durability, cfg.flush_interval)
        .map_err(|e| anyhow::anyhow!("cannot open the store in {}: {e}", cfg.data_dir.display()))?;
    let admin = admin_access(&cfg)
        .map_err(|m| anyhow::anyhow!("invalid configuration:\n{}", cfg.diag("admin_token", m)))?;
    if matches!(admin, AdminAccess::Disabled) {
        // Reachable from other hosts with no admin token: the admin API and status page would
        // be off, and an operator could not see or replay anything. Refuse rather than run
        // blind (or be tempted to open the API without protection).
        if !cfg.listen.ip().is_loopback() {
            anyhow::bail!(
                "refusing to serve on {} (not a loopback address) without an admin_token: set admin_token (e.g. admin_token: ${{PERKFLOW_ADMIN_TOKEN}}) or listen on 127.0.0.1",
                cfg.listen
            );
        }
        tracing::info!("no admin_token configured: the admin API (/api) answers 403");
    }
    let api_keys = api_keys(&cfg)
        .map_err(|(path, m)| anyhow::anyhow!("invalid configuration:\n{}", cfg.diag(&path, m)))?;
    let state = AppState::with(runtime, store.clone(), metrics_handle(), admin, |s| {
        s.api_keys = Arc::new(api_keys);
        s.config_path = cfg.file.clone();
        s.boot = Arc::new(Boot::of(&cfg));
    });
    Ok(Prepared {
        cfg,
        state,
        store,
        worker_gate: None,
    })
}

impl Prepared {
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Keeps the pipeline worker from starting until the returned sender is used or
    /// dropped: webhooks are stored meanwhile (the demo stores its samples first, so that
    /// what they cause is the same on every run).
    pub fn hold_worker(&mut self) -> tokio::sync::oneshot::Sender<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.worker_gate = Some(rx);
        tx
    }

    /// Serves on `listener` until `shutdown` is cancelled: stops accepting, finishes
    /// in-flight requests, flushes the store.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        let cfg = &self.cfg;
        tracing::info!(%addr, data_dir = %cfg.data_dir.display(), sources = cfg.sources.len(), durability = ?cfg.durability, "perkflow is serving");
        let worker_stop = CancellationToken::new();
        let worker = {
            let state = self.state.clone();
            let gate = self.worker_gate;
            let (store, wake, jobs_ready, lanes, stop) = (
                self.store.clone(),
                self.state.wake.clone(),
                self.state.jobs_ready.clone(),
                self.state.lanes.clone(),
                worker_stop.clone(),
            );
            tokio::spawn(async move {
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                crate::worker::run_worker(
                    store,
                    move || state.runtime(),
                    wake,
                    jobs_ready,
                    lanes,
                    stop,
                )
                .await
            })
        };
        let delivery_stop = CancellationToken::new();
        let delivery = {
            let state = self.state.clone();
            tokio::spawn(crate::delivery::run(
                self.store.clone(),
                move || state.runtime(),
                self.state.jobs_ready.clone(),
                Some(self.state.wake.clone()),
                self.state.lanes.clone(),
                delivery_stop.clone(),
            ))
        };
        let watcher_stop = CancellationToken::new();
        let watcher = tokio::spawn(crate::reload::watch(
            self.state.clone(),
            crate::reload::watched(cfg),
            watcher_stop.clone(),
        ));
        let retention_stop = CancellationToken::new();
        let retention = cfg.retention.map(|age| {
            tokio::spawn(crate::retention::run(
                self.store.clone(),
                age,
                cfg.dedup_window,
                retention_stop.clone(),
            ))
        });
        let expiry_stop = CancellationToken::new();
        let expiry = {
            let state = self.state.clone();
            let wake = self.state.wake.clone();
            tokio::spawn(crate::ledger::run_upkeep(
                self.store.clone(),
                move || state.runtime(),
                wake,
                expiry_stop.clone(),
            ))
        };
        let schedules = {
            let state = self.state.clone();
            let wake = self.state.wake.clone();
            tokio::spawn(crate::schedule::run(
                self.store.clone(),
                move || state.runtime(),
                wake,
                expiry_stop.clone(),
            ))
        };
        let sampler_stop = CancellationToken::new();
        let sampler = tokio::spawn(crate::ops::connectors::sampler(
            self.state.clone(),
            std::time::Duration::from_secs(10),
            sampler_stop.clone(),
        ));
        let header_timeout = self.state.boot.header_timeout;
        crate::http::serve(listener, router(self.state), shutdown, header_timeout).await?;
        sampler_stop.cancel();
        let _ = sampler.await;
        watcher_stop.cancel();
        let _ = watcher.await;
        expiry_stop.cancel();
        let _ = expiry.await;
        let _ = schedules.await;
        retention_stop.cancel();
        if let Some(r) = retention {
            let _ = r.await;
        }
        // Requests are drained; the worker finishes the event it is on; attempts in flight
        // finish (each bounded by its sink's timeout) and are recorded.
        worker_stop.cancel();
        let _ = worker.await;
        delivery_stop.cancel();
        let _ = delivery.await;
        let store = self.store;
        tokio::task::spawn_blocking(move || store.close())
            .await?
            .map_err(|e| anyhow::anyhow!("final checkpoint failed: {e}"))?;
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

/// `prepare` then `serve`.
pub async fn run(
    listener: TcpListener,
    cfg: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    prepare(cfg)?.serve(listener, shutdown).await
}
