//! The `perkflow` command line. Exit codes: 0 ok, 1 problems found (check) or runtime
//! failure, 2 usage error.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use perkflow::config;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: perkflow::alloc::Allocator = perkflow::alloc::Allocator;

/// Transparent huge pages off for this process: mimalloc's arenas would otherwise be backed
/// by 2 MiB pages as soon as they are touched (measured: 47 MB of huge pages at idle) for no
/// gain at this heap size.
fn small_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) only sets a flag of this process; it takes
    // no pointers, and failure (an old kernel) changes nothing.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// The local commands that only print (`check`, `test`, `run`, `sign`) end quietly when
/// their output is closed (`perkflow run … | head`), as Unix tools do, instead of panicking
/// on a failed print. Not for commands that talk over sockets: a closed connection must
/// stay an error there, not end the process.
fn quiet_broken_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread exists; it
    // takes no pointers.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[derive(Parser)]
#[command(
    name = "perkflow",
    version,
    about = "Loyalty and reward programs from signed commerce webhooks",
    long_about = "perkflow verifies signed webhooks from Shopify, WooCommerce, Stripe, Square, PayPal and \
QuickBooks, stores each event durably before answering, and de-duplicates re-deliveries. Pipelines \
turn events into points on a ledger (tiers, thresholds, holds, expiry, refunds), promo codes and \
rewards, delivered to SMS, e-mail, CRM and gift-card APIs with retries and dead letters; schedules \
run campaigns, anniversaries and birthdays.\n\n\
Configuration: perkflow.yaml (optional; defaults work), connectors/*.yaml (built in, overridable), \
pipelines/*.yaml. Secrets come from ${ENV_VAR} or ${file:/path}, never from the command line of the daemon."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: POST /hooks/{source}, /healthz, /readyz, /metrics.
    Serve {
        /// Config file (default: ./perkflow.yaml when present, else built-in defaults).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Listen address, overriding `listen:` (use 127.0.0.1:0 for any free port).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory, overriding `data_dir:`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate the config, connectors and pipelines without secrets or network; print every
    /// problem as file:line:col; exit 1 on any.
    Check {
        /// Config file (default: ./perkflow.yaml when present, else built-in defaults).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Run the `tests:` blocks of pipelines (all, or the named ones); ends with
    /// `N passed, N failed`; exit 1 on any failure.
    Test {
        /// Pipeline names (default: every pipeline).
        pipelines: Vec<String>,
        /// Config file (default: ./perkflow.yaml when present, else built-in defaults).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Dry-run a pipeline on a fixture: every step's values and decisions, and the sink
    /// actions it would ask for. Sends nothing.
    ///
    /// Exits 1 when the run fails or a request cannot be built.
    Run {
        /// The pipeline's name (`pipeline:` in its file).
        pipeline: String,
        /// The event body (its headers from the sibling `<name>.headers.yaml`).
        #[arg(long)]
        fixture: PathBuf,
        /// A request header of the event, as 'Name: value' (added to, or replacing, the
        /// headers file's); repeatable. Vendors such as Shopify send the event id and type
        /// only in headers.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// The answer of a `lookup` step, as NAME=FILE (a JSON file); repeatable. Dry runs
        /// make no calls: they print the request each lookup would send.
        #[arg(long = "lookup", value_name = "NAME=FILE")]
        lookups: Vec<String>,
        /// Config file (default: ./perkflow.yaml when present, else built-in defaults).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// The embedded default: the vendor sandbox, the daemon with the shipped pipelines (sled
    /// in a temp dir), signed sample webhooks for every source, and what every sink received.
    Demo {
        /// Config file (default: ./perkflow.yaml when present, else built-in defaults).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Daemon address (default: the config's listen).
        #[arg(long)]
        listen: Option<String>,
        /// Vendor sandbox address.
        #[arg(long, default_value = "127.0.0.1:8090")]
        sandbox: String,
        /// Exit once the deliveries are done instead of waiting for Ctrl-C.
        #[arg(long)]
        exit: bool,
    },
    /// Local emulators of every sink vendor (Twilio, SendGrid, Klaviyo, Slack, Zendesk,
    /// HubSpot, Square Loyalty, gift cards, bookings, QuickBooks reads) on one port, one path prefix per
    /// vendor; they accept the shipped config's development credentials. `GET /_sandbox/received` lists
    /// what they got; `POST /_sandbox/faults` injects failures.
    Sandbox {
        /// Address to listen on (loopback by default).
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: String,
    },
    /// Inspect and replay stored events through a running daemon's admin API.
    Events {
        #[command(subcommand)]
        command: perkflow::ops::client::EventsCommand,
    },
    /// Connector health of a running daemon, as a table: each source and sink with its state
    /// (ok, degraded, down, circuit_open, credentials_failing), last success and failure,
    /// success rates, queue and dead letters. Exits 1 if any is not ok.
    Status {
        #[command(flatten)]
        admin: perkflow::ops::client::AdminClient,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// The dead-letter queue of a running daemon: list, show, replay, drop.
    Dlq {
        #[command(subcommand)]
        command: perkflow::ops::client::DlqCommand,
    },
    /// Scheduled pipelines (anniversaries, birthdays, campaigns): list them, or run one now.
    Schedules {
        #[command(subcommand)]
        command: perkflow::ops::client_loyalty::SchedulesCommand,
    },
    /// The loyalty program's figures per day, week or month: points issued, redeemed and
    /// expired per source; rewards per sink and status. As a table, CSV or JSON.
    Reports {
        #[command(subcommand)]
        command: perkflow::ops::client_loyalty::ReportsCommand,
    },
    /// Print a correctly signed request (a curl command) for a fixture, to test a deployment.
    ///
    /// The fixture's headers are read from FILE's sibling `<name>.headers.yaml`, and from
    /// --header. Without FILE, the body is read from standard input and put in the curl
    /// command itself. Without --secret, the source's secrets from the config are used.
    Sign {
        /// The source name in the config (its connector decides the signature scheme).
        source: String,
        /// The body to sign (byte-exact); standard input when absent.
        file: Option<PathBuf>,
        /// A request header to send, as 'Name: value' (added to, or replacing, the headers
        /// file's); repeatable.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// Config file (default: ./perkflow.yaml when present, else built-in defaults).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Signing secret; repeat for Stripe's one-v1-per-secret rotation.
        #[arg(long)]
        secret: Vec<String>,
        /// PayPal: PKCS#8 PEM private key of the signing certificate.
        #[arg(long)]
        key: Option<PathBuf>,
        /// PayPal: webhook id (default: the source's `webhook_id`).
        #[arg(long)]
        webhook_id: Option<String>,
        /// Base URL of the daemon (default: http://<listen>).
        #[arg(long)]
        url: Option<String>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PERKFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    perkflow::alloc::init();
    small_pages();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Check { .. } | Command::Test { .. } | Command::Run { .. } | Command::Sign { .. }
    ) {
        quiet_broken_pipe();
    }
    init_logs(cli.log_format);
    let result = match cli.command {
        Command::Check { config } => return check(config),
        Command::Serve {
            config,
            listen,
            data_dir,
        } => serve(config, listen, data_dir),
        Command::Events { command } => perkflow::ops::client::events(command),
        Command::Demo {
            config,
            listen,
            sandbox,
            exit,
        } => demo(perkflow::demo::Options {
            config,
            listen,
            sandbox,
            exit,
        }),
        Command::Sandbox { listen } => sandbox(listen),
        Command::Dlq { command } => perkflow::ops::client::dlq(command),
        Command::Schedules { command } => perkflow::ops::client_loyalty::schedules(command),
        Command::Reports { command } => perkflow::ops::client_loyalty::reports(command),
        Command::Status { admin, json } => match perkflow::ops::client::status(admin, json) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Test { pipelines, config } => return test_pipelines(config, pipelines),
        Command::Run {
            pipeline,
            fixture,
            headers,
            lookups,
            config,
        } => dry_run(config, pipeline, fixture, headers, lookups),
        Command::Sign {
            source,
            file,
            headers,
            config,
            secret,
            key,
            webhook_id,
            url,
        } => sign(source, file, headers, config, secret, key, webhook_id, url),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn check(path: Option<PathBuf>) -> ExitCode {
    match config::load(path.as_deref()) {
        Ok(cfg) => {
            let file = cfg
                .file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "defaults".into());
            println!(
                "{file}: ok ({} sources, {} sinks, {} pipelines, {} connectors)",
                cfg.sources.len(),
                cfg.sinks.len(),
                cfg.pipelines.len(),
                cfg.connectors.defs.len()
            );
            ExitCode::SUCCESS
        }
        Err(diags) => {
            eprint!("{diags}");
            eprintln!(
                "{} problem{} found",
                diags.len(),
                if diags.len() == 1 { "" } else { "s" }
            );
            ExitCode::from(1)
        }
    }
}

fn serve(
    path: Option<PathBuf>,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut cfg = config::load(path.as_deref())
        .map_err(|d| anyhow::anyhow!("invalid configuration:\n{d}"))?;
    let listen = listen
        .map(|l| config::parse_listen(&l).map_err(|m| anyhow::anyhow!("--listen {m}")))
        .transpose()?;
    cfg.override_with(config::Overrides { listen, data_dir });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let prepared = perkflow::app::prepare(cfg)?;
        let cfg = prepared.config();
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        // One line on stdout that scripts (and tests) can wait for: printed once serving is
        // certain to start.
        println!("perkflow listening on http://{addr}");
        for s in cfg.sources.values() {
            println!(
                "  source {:<14} {:<12} POST http://{addr}/hooks/{}",
                s.name, s.connector, s.name
            );
        }
        if let Some(s) = cfg.sources.values().find(|s| s.connector == "shopify") {
            println!(
                "try:  perkflow sign {} fixtures/shopify/orders-paid.json | sh",
                s.name
            );
        }
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: finishing in-flight requests");
            token.cancel();
        });
        prepared.serve(listener, shutdown).await
    })
}

fn demo(opts: perkflow::demo::Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            token.cancel();
        });
        perkflow::demo::run(opts, shutdown).await
    })
}

fn sandbox(listen: String) -> anyhow::Result<()> {
    if !listen.starts_with("127.")
        && !listen.starts_with("[::1]")
        && !listen.starts_with("localhost")
    {
        anyhow::bail!("the sandbox binds to loopback only (got {listen})");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        println!("perkflow sandbox listening on http://{addr}");
        let sb = perkflow::sandbox::Sandbox::new(perkflow::sandbox::Credentials::default());
        let mut arrivals = sb.subscribe();
        tokio::spawn(async move {
            while let Ok(r) = arrivals.recv().await {
                println!(
                    "{:<9} {} {} {} {}",
                    r.vendor, r.method, r.path, r.status, r.summary
                );
            }
        });
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            token.cancel();
        });
        perkflow::sandbox::serve(sb, listener, shutdown).await?;
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// "no pipeline `x`", with the closest name or else every name.
fn no_pipeline(cfg: &config::Config, name: &str) -> String {
    let known = cfg.pipelines.keys().map(String::as_str);
    match config::diagnostic::did_you_mean(name, known.clone()) {
        Some(s) => format!("no pipeline `{name}` (did you mean `{s}`?)"),
        None => format!(
            "no pipeline `{name}`; known: {}",
            known.collect::<Vec<_>>().join(", ")
        ),
    }
}

fn test_pipelines(path: Option<PathBuf>, names: Vec<String>) -> ExitCode {
    use perkflow::pipeline::{expr::Engine, test_case::run_case};
    let cfg = match config::load(path.as_deref()) {
        Ok(c) => c,
        Err(d) => {
            eprint!("{d}");
            return ExitCode::from(1);
        }
    };
    for n in &names {
        if !cfg.pipelines.contains_key(n) {
            eprintln!("error: {}", no_pipeline(&cfg, n));
            return ExitCode::from(2);
        }
    }
    let engine = Engine::new();
    let (mut passed, mut failed) = (0, 0);
    for p in cfg
        .pipelines
        .values()
        .filter(|p| names.is_empty() || names.contains(&p.name))
    {
        for t in &p.tests {
            let r = run_case(&cfg, &engine, p, t);
            if r.passed() {
                passed += 1;
                println!("ok    {} :: {}", p.name, t.name);
            } else {
                failed += 1;
                println!("FAIL  {} :: {}", p.name, t.name);
                for f in &r.failures {
                    println!("        {f}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Stub answers for a dry run that remember what was asked, to print the requests.
struct DryLookups {
    stubs: perkflow::pipeline::run::Stubs,
    asked: std::cell::RefCell<Vec<(String, String, String, serde_json::Value)>>,
}

impl perkflow::pipeline::run::Effects for DryLookups {
    fn fetch(
        &self,
        call: &perkflow::pipeline::run::LookupCall,
    ) -> Result<serde_json::Value, perkflow::pipeline::run::LookupError> {
        self.asked.borrow_mut().push((
            call.name.to_string(),
            call.sink.to_string(),
            call.action.to_string(),
            call.with.clone(),
        ));
        self.stubs.fetch(call)
    }
}

fn dry_run(
    path: Option<PathBuf>,
    name: String,
    fixture: PathBuf,
    headers: Vec<String>,
    lookups: Vec<String>,
) -> anyhow::Result<()> {
    use perkflow::pipeline::{
        expr::Engine,
        run::run,
        test_case::{input_from_fixture, read_answer},
    };
    let cfg = config::load(path.as_deref())
        .map_err(|d| anyhow::anyhow!("invalid configuration:\n{d}"))?;
    let p = cfg
        .pipelines
        .get(&name)
        .with_context(|| no_pipeline(&cfg, &name))?;
    let extra = parse_headers(&headers)?;
    let input = input_from_fixture(&cfg, p, &fixture, &extra).map_err(anyhow::Error::msg)?;
    println!(
        "event: {} {} (vendor id {})",
        input.source, input.event_type, input.event_id
    );
    if !p.on.events.contains(&input.event_type) {
        println!(
            "note: pipeline `{name}` listens to {}, not {}",
            p.on.events.join(", "),
            input.event_type
        );
    }
    let mut stubs = perkflow::pipeline::run::Stubs::default();
    for l in &lookups {
        let (n, file) = l
            .split_once('=')
            .with_context(|| format!("--lookup {l}: write NAME=FILE"))?;
        let answer = read_answer(&cfg, std::path::Path::new(file)).map_err(anyhow::Error::msg)?;
        stubs.0.insert(n.to_string(), answer);
    }
    let dry = DryLookups {
        stubs,
        asked: Default::default(),
    };
    let mut unbuildable = 0;
    let r = run(p, &Engine::new(), &input, &dry);
    // Personal data (`pii_fields`) is masked in everything printed; the requests shown are
    // otherwise exact.
    let personal = perkflow::redact::Pii::new(&cfg.pii_fields).of(&input.event);
    let shown = perkflow::pipeline::run::redacted(&r, &personal);
    for s in &shown.steps {
        println!("step  {:<28} {}", s.step, s.detail);
    }
    for (n, sink, action, with) in dry.asked.borrow().iter() {
        let given = if dry.stubs.0.contains_key(n) {
            "answer from --lookup"
        } else {
            "no answer given"
        };
        println!("lookup {n} = {sink}.{action} ({given})");
        match render_request(&cfg, sink, action, with, "dry-run") {
            Ok(req) => println!("  {} {}", req.method, personal.text(&req.url)),
            Err(e) => {
                println!("  cannot build the request: {e}");
                unbuildable += 1;
            }
        }
    }
    println!("outcome: {}", serde_json::to_string(&shown.outcome)?);
    for (d, masked) in r.deliveries.iter().zip(&shown.deliveries) {
        println!(
            "deliver {} {}",
            d.to(),
            serde_json::to_string_pretty(&masked.with)?
        );
        let key = perkflow::outbox::job_key(&input.source, &input.event_id, &p.name, &d.id);
        match render_request(&cfg, &d.sink, &d.action, &d.with, &key) {
            Ok(req) => {
                println!("  {} {}", req.method, personal.text(&req.url));
                for (k, v) in &req.headers {
                    println!("  {k}: {}", personal.text(v));
                }
                if let Some(b) = &req.body_text {
                    println!("  {}", personal.text(b));
                }
            }
            Err(e) => {
                println!("  cannot build the request: {e}");
                unbuildable += 1;
            }
        }
    }
    println!("(dry run: nothing was sent; credentials are shown as [redacted])");
    if let perkflow::pipeline::run::Outcome::Failed { step, error } = &shown.outcome {
        anyhow::bail!("the run failed at {step}: {error}");
    }
    if unbuildable > 0 {
        anyhow::bail!("{unbuildable} request(s) cannot be built (above)");
    }
    Ok(())
}

/// The exact request a delivery would send (credentials that cannot be resolved here are
/// left as their `${…}` reference; auth headers are redacted).
fn render_request(
    cfg: &config::Config,
    sink: &str,
    action: &str,
    with: &serde_json::Value,
    key: &str,
) -> anyhow::Result<perkflow::sink::request::Request> {
    let s = cfg.sinks.get(sink).context("unknown sink")?;
    let def = cfg
        .connectors
        .get(&s.connector)
        .and_then(|c| c.sink.clone())
        .context("unknown sink connector")?;
    let params = s
        .params
        .iter()
        .map(|(k, v)| {
            let value = v
                .resolve(&cfg.base_dir)
                .map(|x| x.expose().to_string())
                .unwrap_or_else(|_| v.as_written());
            (k.clone(), serde_json::Value::String(value))
        })
        .collect();
    let client = perkflow::sink::SinkClient::build(
        sink,
        &s.connector,
        std::sync::Arc::new(def),
        params,
        s.base_url.as_deref(),
        std::time::Duration::from_secs(10),
    )
    .map_err(anyhow::Error::msg)?;
    let req = client
        .render(action, with, key, "ev_dry_run", 1)
        .map_err(anyhow::Error::msg)?;
    let redact = |t: &str| client.redact(t);
    Ok(perkflow::sink::request::Request {
        url: redact(&req.url),
        headers: req
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), redact(v)))
            .collect(),
        body_text: req.body_text.as_deref().map(redact),
        ..req
    })
}

/// `--header 'Name: value'` options.
fn parse_headers(given: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    given
        .iter()
        .map(|h| match h.split_once(':') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(anyhow::anyhow!("--header `{h}`: write it as 'Name: value'")),
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn sign(
    source: String,
    file: Option<PathBuf>,
    extra: Vec<String>,
    path: Option<PathBuf>,
    secrets: Vec<String>,
    key: Option<PathBuf>,
    webhook_id: Option<String>,
    url: Option<String>,
) -> anyhow::Result<()> {
    use perkflow::sign;
    let cfg = config::load(path.as_deref())
        .map_err(|d| anyhow::anyhow!("invalid configuration:\n{d}"))?;
    let src = cfg.sources.get(&source).with_context(|| {
        let known: Vec<&str> = cfg.sources.keys().map(String::as_str).collect();
        format!(
            "no source `{source}` in the config; known: {}",
            known.join(", ")
        )
    })?;
    let (body, mut headers) = match &file {
        Some(file) => sign::read_fixture(file).map_err(anyhow::Error::msg)?,
        None => {
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
                .context("reading the body from standard input")?;
            (body, Vec::new())
        }
    };
    for (k, v) in parse_headers(&extra)? {
        headers.retain(|(h, _)| !h.eq_ignore_ascii_case(&k));
        headers.push((k, v));
    }
    let resolve = |v: &perkflow::config::secrets::Interpolated| {
        v.resolve(&cfg.base_dir).map(|s| s.expose().to_string())
    };
    let mut keys = sign::SignKeys {
        secrets,
        ..Default::default()
    };
    if keys.secrets.is_empty() {
        for s in src
            .spec
            .secret
            .iter()
            .chain(src.spec.secrets.iter().flatten())
        {
            keys.secrets.push(resolve(s).map_err(anyhow::Error::msg)?);
        }
    }
    keys.webhook_id = match webhook_id {
        Some(w) => Some(w),
        None => src
            .spec
            .webhook_id
            .as_ref()
            .map(resolve)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    if let Some(k) = key {
        keys.paypal_key_pem =
            Some(std::fs::read(&k).with_context(|| format!("--key {}", k.display()))?);
    }
    let base = url.unwrap_or_else(|| format!("http://{}", cfg.listen));
    let target = format!("{}/hooks/{source}", base.trim_end_matches('/'));
    let signed_url = match (&src.spec.url, &cfg.public_url) {
        (Some(u), _) => u.clone(),
        (None, Some(p)) => format!("{p}/hooks/{source}"),
        (None, None) => target.clone(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let sig = sign::signature_headers(&src.def, &keys, &signed_url, &body, &headers, now)
        .map_err(anyhow::Error::msg)?;
    let mut line = format!("curl -sS -X POST {}", sign::shell_quote(&target));
    let mut all: Vec<(String, String)> = headers;
    for (k, v) in sig {
        all.retain(|(h, _)| !h.eq_ignore_ascii_case(&k));
        all.push((k, v));
    }
    for (k, v) in all {
        line.push_str(&format!(" -H {}", sign::shell_quote(&format!("{k}: {v}"))));
    }
    match &file {
        Some(file) => line.push_str(&format!(
            " --data-binary @{}",
            sign::shell_quote(&file.display().to_string())
        )),
        None => {
            let text = std::str::from_utf8(&body)
                .ok()
                .filter(|t| !t.contains('\0'))
                .context("the body read from standard input is not text: give it as FILE")?;
            line.push_str(&format!(" --data-binary {}", sign::shell_quote(text)));
        }
    }
    println!("{line}");
    Ok(())
}
