//! `perkflow demo`: the embedded default. Starts the vendor sandbox and the daemon (shipped
//! config and pipelines, sled in a temp dir, every sink pointed at the sandbox), fires a
//! signed sample webhook per source from `fixtures/`, prints what every sink received as it
//! arrives, then where to look next.

use crate::config::{self, Config};
use crate::sandbox::{Credentials, Received, Sandbox};
use crate::sign::{self, SignKeys};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The sandbox address the shipped config points its sinks at.
pub const SANDBOX_URL: &str = "http://127.0.0.1:8090";

/// Sample webhooks: (connector, fixture relative to the config's directory).
const SAMPLES: &[(&str, &str)] = &[
    ("shopify", "fixtures/shopify/orders-paid.json"),
    ("shopify", "fixtures/shopify/refunds-create.json"),
    ("shopify", "fixtures/shopify/customers-create-referral.json"),
    (
        "woocommerce",
        "fixtures/woocommerce/order-updated-completed.json",
    ),
    ("stripe", "fixtures/stripe/invoice-paid.json"),
    ("square", "fixtures/square/payment-updated.json"),
    ("paypal", "fixtures/paypal/payment-sale-completed.json"),
    (
        "quickbooks",
        "fixtures/quickbooks/cloudevents-payment-created.json",
    ),
];

/// The PayPal test certificate's key (the shipped config pins its chain).
const PAYPAL_KEY: &str = "fixtures/paypal/pki/leaf.key";

pub struct Options {
    pub config: Option<PathBuf>,
    /// Daemon address (default: the config's `listen`).
    pub listen: Option<String>,
    /// Sandbox address (default 127.0.0.1:8090).
    pub sandbox: String,
    /// Stop by itself once the deliveries are quiet (for CI); otherwise wait for Ctrl-C.
    pub exit: bool,
}

/// Loads the config with every sink URL of the shipped sandbox moved to `sandbox_url`.
fn load_for_sandbox(
    path: Option<&Path>,
    sandbox_url: &str,
    data_dir: &Path,
) -> anyhow::Result<Config> {
    let file = match path {
        Some(p) => p.to_path_buf(),
        None => PathBuf::from("perkflow.yaml"),
    };
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "{}: the demo needs the shipped perkflow.yaml (run it from the repository, or pass -c)",
            file.display()
        )
    })?;
    let text = text.replace(SANDBOX_URL, sandbox_url);
    let mut cfg = config::load_text(&file, true, &text)
        .map_err(|d| anyhow::anyhow!("invalid configuration:\n{d}"))?;
    cfg.data_dir = data_dir.to_path_buf();
    Ok(cfg)
}

pub async fn run(opts: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    let sandbox = Sandbox::new(Credentials::default());
    let sb_listener = tokio::net::TcpListener::bind(&opts.sandbox)
        .await
        .with_context(|| format!("cannot start the vendor sandbox on {}", opts.sandbox))?;
    let sb_url = format!("http://{}", sb_listener.local_addr()?);
    let sb_stop = CancellationToken::new();
    let sb_task = tokio::spawn(crate::sandbox::serve(
        sandbox.clone(),
        sb_listener,
        sb_stop.clone(),
    ));
    let mut arrivals = sandbox.subscribe();

    let tmp = tempfile::tempdir().context("temp dir for the demo's store")?;
    let mut cfg = load_for_sandbox(opts.config.as_deref(), &sb_url, tmp.path())?;
    if let Some(l) = &opts.listen {
        cfg.listen = crate::config::parse_listen(l).map_err(|m| anyhow::anyhow!("--listen {m}"))?;
    }
    let base_dir = cfg.base_dir.clone();
    let admin_token = cfg
        .admin_token
        .as_ref()
        .and_then(|t| t.resolve(&cfg.base_dir).ok())
        .map(|s| s.expose().to_string());
    let sources: Vec<_> = cfg.sources.values().cloned().collect();
    let public_url = cfg.public_url.clone();
    let pipelines = cfg.pipelines.len();
    let mut prepared = crate::app::prepare(cfg)?;
    // Every sample is stored before the pipelines run on any: the refund then always
    // finds the order's points, and the gift card they would trigger, still unsent.
    let start_worker = prepared.hold_worker();
    let listener = tokio::net::TcpListener::bind(prepared.config().listen)
        .await
        .with_context(|| format!("cannot listen on {}", prepared.config().listen))?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let daemon_stop = CancellationToken::new();
    let daemon = tokio::spawn(prepared.serve(listener, daemon_stop.clone()));

    println!("perkflow demo");
    println!(
        "  daemon         {base}  ({} sources, {pipelines} pipelines, sled in a temp dir)",
        sources.len()
    );
    println!("  vendor sandbox {sb_url}  (Twilio, SendGrid, Klaviyo, Slack, Zendesk, HubSpot, Square, gift cards, bookings, QuickBooks)");
    println!();
    println!("sending signed sample webhooks:");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    for (connector, rel) in SAMPLES {
        let Some(src) = sources.iter().find(|s| s.connector == *connector) else {
            continue;
        };
        let file = base_dir.join(rel);
        let (body, headers) = sign::read_fixture(&file).map_err(anyhow::Error::msg)?;
        let resolve = |v: &crate::config::secrets::Interpolated| {
            v.resolve(&base_dir).map(|s| s.expose().to_string())
        };
        let mut keys = SignKeys::default();
        for s in src
            .spec
            .secret
            .iter()
            .chain(src.spec.secrets.iter().flatten())
        {
            keys.secrets.push(resolve(s).map_err(anyhow::Error::msg)?);
        }
        keys.webhook_id = src
            .spec
            .webhook_id
            .as_ref()
            .map(resolve)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        if *connector == "paypal" {
            keys.paypal_key_pem = std::fs::read(base_dir.join(PAYPAL_KEY)).ok();
        }
        let target = format!("{base}/hooks/{}", src.name);
        let signed_url = match (&src.spec.url, &public_url) {
            (Some(u), _) => u.clone(),
            (None, Some(p)) => format!("{p}/hooks/{}", src.name),
            (None, None) => target.clone(),
        };
        let sig = sign::signature_headers(&src.def, &keys, &signed_url, &body, &headers, now)
            .map_err(anyhow::Error::msg)?;
        let mut req = http.post(&target).body(body);
        for (k, v) in headers
            .iter()
            .filter(|(k, _)| !sig.iter().any(|(s, _)| s.eq_ignore_ascii_case(k)))
        {
            req = req.header(k.as_str(), v.as_str());
        }
        for (k, v) in &sig {
            req = req.header(k.as_str(), v.as_str());
        }
        let answer = match req.send().await {
            Ok(r) => format!(
                "{} {}",
                r.status().as_u16(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) => format!("failed: {e}"),
        };
        println!("  {:<12} {:<48} -> {answer}", src.name, rel);
    }
    let _ = start_worker.send(());
    println!();
    println!("what the vendors received (as it arrives):");
    let quiet = Duration::from_secs(4);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Instant::now();
    let mut count = 0usize;
    let mut vendors = std::collections::BTreeSet::new();
    loop {
        let wait = quiet
            .saturating_sub(last.elapsed())
            .min(deadline.saturating_duration_since(Instant::now()));
        tokio::select! {
            r = arrivals.recv() => match r {
                Ok(r) => {
                    print_arrival(&r);
                    if r.status < 300 && !r.read {
                        vendors.insert(r.vendor.clone());
                        count += 1;
                    }
                    last = Instant::now();
                }
                Err(_) => break,
            },
            _ = tokio::time::sleep(wait) => break,
            _ = shutdown.cancelled() => break,
        }
    }
    println!();
    println!(
        "{count} deliveries to {} vendors: {}",
        vendors.len(),
        vendors.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    let token = admin_token.as_deref().unwrap_or("<admin_token>");
    // With --exit the daemon stops now: the addresses below would answer nothing.
    if !opts.exit {
        println!();
        println!("look around (admin token `{token}`):");
        println!("  {base}/                 the status page (sign in with the token): connectors, failed runs, dead letters");
        println!("  perkflow status --url {base} --token {token}      connector health as a table");
        println!("  perkflow events list --url {base} --token {token}");
        println!("  perkflow events show <id> --url {base} --token {token}     every step and delivery attempt");
        println!("  perkflow dlq list --url {base} --token {token}");
        println!("  curl -s {base}/metrics        curl -s {sb_url}/_sandbox/received");
        println!();
        println!("running until Ctrl-C; send more with: perkflow sign shop-main fixtures/shopify/orders-paid.json --url {base} | sh");
        loop {
            tokio::select! {
                r = arrivals.recv() => match r { Ok(r) => print_arrival(&r), Err(_) => break },
                _ = shutdown.cancelled() => break,
            }
        }
    }
    daemon_stop.cancel();
    daemon.await??;
    sb_stop.cancel();
    let _ = sb_task.await;
    println!("demo stopped cleanly");
    Ok(())
}

/// `path` in at most `max` characters: the end is kept (ids are at the end) and the cut is
/// marked.
fn shorten(path: &str, max: usize) -> String {
    let n = path.chars().count();
    if n <= max {
        return path.to_string();
    }
    let tail: String = path.chars().skip(n - (max - 1)).collect();
    format!("…{tail}")
}

fn print_arrival(r: &Received) {
    let mark = if r.status < 300 { "✓" } else { "✗" };
    println!(
        "  {mark} {:<10} {:<5} {:<40} {} {}",
        r.vendor,
        r.method,
        shorten(&r.path, 40),
        r.status,
        r.summary
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_paths_keep_their_end() {
        assert_eq!(super::shorten("/v1/x", 40), "/v1/x");
        let p = "/quickbooks/v3/company/9341453172471531/payment/118743";
        let s = super::shorten(p, 40);
        assert_eq!(s.chars().count(), 40);
        assert!(s.starts_with('…') && s.ends_with("/payment/118743"), "{s}");
    }
}
