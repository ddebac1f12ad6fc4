//! Durable-ingest benchmark: perkflow beside the reference servers of `../shared/bench-tools`,
//! measured in the same run, alternating.
//!
//! ```text
//! cargo run --release --bin perkflow-bench -- [--suite ingest|e2e|resources|all] [--rounds 3] [--duration 10] [--concurrency 32] [--size 2048] [--pending 1000000]
//! ```
//!
//! `--suite soak` is a bounded steady run (`--soak-minutes`, `--rate`) through a faulty sink,
//! sampling memory, open files and disk, and checking that nothing is lost.
//!
//! `--suite resources` measures start-up (to listening, to ready), idle RSS beside the
//! reference server's, and the time to ready after a restart with `--pending` jobs waiting.
//!
//! `--suite e2e` measures webhook -> sink latency instead: open-loop load at 200/s and
//! 1,000/s, the fast `sink` of the bench tools recording the time from the load generator's
//! send to its receipt; perkflow (fsync, one pipeline delivering every order to the sink
//! through the `webhook` connector) beside `baseline --durable --forward` (persist with group
//! commit, then forward), alternating. It also reports lost and duplicated deliveries.
//!
//! Each round runs, in turn: `baseline` (verify only: this machine's HTTP+HMAC ceiling),
//! `baseline --durable` (group-commit fdatasync reference) and `perkflow serve` (release, one
//! Shopify source) with `durability: fsync` and then `batch`, each under the same `loadgen`
//! closed loop of signed 2 KB Shopify webhooks. It prints every run and the medians, with the targets.
//! Everything binds to 127.0.0.1 and every run is bounded in time.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod resources;
mod soak;

const SECRET: &str = "bench-secret";

struct Opts {
    suite: String,
    rounds: usize,
    duration: u64,
    concurrency: usize,
    size: usize,
    tools: PathBuf,
    /// Jobs waiting in the store for the restart measurement.
    pending: usize,
    /// The soak run's length and rate.
    soak_minutes: u64,
    rate: u32,
}

fn usage() -> ! {
    eprintln!(
        "usage: perkflow-bench [--suite ingest|e2e|resources|soak|all (ingest; all = ingest, e2e, resources)] [--rounds N (3)] [--duration SECS (10)] [--concurrency C (32)] [--size BYTES (2048)] \
         [--pending JOBS (1000000)] [--soak-minutes M (30)] [--rate R/s (50)] [--tools DIR (../shared/bench-tools)]"
    );
    std::process::exit(2)
}

fn opts() -> Opts {
    let mut o = Opts {
        suite: "ingest".into(),
        rounds: 3,
        duration: 10,
        concurrency: 32,
        size: 2048,
        tools: PathBuf::from("../shared/bench-tools"),
        pending: 1_000_000,
        soak_minutes: 30,
        rate: 50,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--suite" => o.suite = v(),
            "--rounds" => o.rounds = v().parse().unwrap_or_else(|_| usage()),
            "--duration" => o.duration = v().parse().unwrap_or_else(|_| usage()),
            "--concurrency" => o.concurrency = v().parse().unwrap_or_else(|_| usage()),
            "--size" => o.size = v().parse().unwrap_or_else(|_| usage()),
            "--tools" => o.tools = PathBuf::from(v()),
            "--pending" => o.pending = v().parse().unwrap_or_else(|_| usage()),
            "--soak-minutes" => o.soak_minutes = v().parse().unwrap_or_else(|_| usage()),
            "--rate" => o.rate = v().parse().unwrap_or_else(|_| usage()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if !matches!(
        o.suite.as_str(),
        "ingest" | "e2e" | "resources" | "soak" | "all"
    ) {
        usage()
    }
    o.rounds = o.rounds.clamp(1, 20);
    o.duration = o.duration.clamp(1, 120);
    o.pending = o.pending.clamp(1, 10_000_000);
    o.soak_minutes = o.soak_minutes.clamp(1, 240);
    o.rate = o.rate.clamp(1, 5_000);
    o
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

/// Copies the bench tools into target/ and builds them (release), as their README says.
fn build_tools(tools: &Path, target: &Path) -> Result<PathBuf, String> {
    if !tools.join("Cargo.toml").exists() {
        return Err(format!(
            "bench tools not found at {} (use --tools DIR)",
            tools.display()
        ));
    }
    // Sources are copied over (their build output in copy/target is kept, so a rebuild is
    // incremental).
    let copy = target.join("bench-tools");
    std::fs::create_dir_all(&copy).map_err(|e| format!("{}: {e}", copy.display()))?;
    run(Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", tools.display()))
        .arg(&copy))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building bench tools (release)...");
    run(Command::new(&cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(copy.join("Cargo.toml")))?;
    Ok(copy.join("target/release"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_port(port: u16, limit: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!(
        "nothing listening on 127.0.0.1:{port} after {limit:?}"
    ))
}

fn stop(mut child: Child) {
    // The daemon runs in a process group of its own (`start_daemon`): a wrapper and the
    // daemon under it are stopped together. Other children are stopped alone.
    let pid = child.id().to_string();
    let group = Command::new("kill")
        .args(["-INT", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    if !group.is_ok_and(|s| s.success()) {
        let _ = Command::new("kill").args(["-INT", &pid]).status();
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// kB of resident memory now and at peak, from /proc.
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Sample {
    rps: f64,
    p50: f64,
    p99: f64,
    ok: u64,
    errors: u64,
    extra: String,
}

fn loadgen(bin: &Path, url: &str, o: &Opts) -> Result<Sample, String> {
    loadgen_with(bin, url, o, None, &format!("r{}", free_port()))
}

/// Closed loop at `o.concurrency`, or open loop at `rate` per second.
fn loadgen_with(
    bin: &Path,
    url: &str,
    o: &Opts,
    rate: Option<u32>,
    run_id: &str,
) -> Result<Sample, String> {
    let load = match rate {
        Some(r) => ["--rate".to_string(), r.to_string()],
        None => ["--concurrency".to_string(), o.concurrency.to_string()],
    };
    let out = Command::new(bin.join("loadgen"))
        .args(["--url", url, "--secret", SECRET, "--quiet"])
        .args(&load)
        .args(["--duration", &o.duration.to_string()])
        .args(["--size", &o.size.to_string(), "--run-id", run_id])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("loadgen: {e}"))?;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("loadgen output {line:?}: {e}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(Sample {
        rps: f("ok_rps"),
        p50: f("p50_ms"),
        p99: f("p99_ms"),
        ok: v["ok"].as_u64().unwrap_or(0),
        errors: v["errors"].as_u64().unwrap_or(0) + v["completed"].as_u64().unwrap_or(0)
            - v["ok"].as_u64().unwrap_or(0),
        extra: String::new(),
    })
}

/// A perkflow daemon started for a run.
struct Daemon {
    child: Child,
    /// `http://127.0.0.1:<port>`
    base: String,
    port: u16,
    /// When it was started, and how long it took to print its listening line.
    started: Instant,
    listening: Duration,
}

/// Starts `perkflow serve -c cfg` on a free loopback port (`PERKFLOW_LOG=log`) and waits for
/// its listening line; stdout is drained after that.
///
/// `PERKFLOW_BENCH_WRAP` (words split on spaces, e.g. `heaptrack -o soak`) runs the
/// daemon under a profiler; the memory figures are then the wrapper's process, not the
/// daemon's, so use it to find causes, not to take figures.
fn start_daemon(perkflow: &Path, cfg: &Path, log: &str) -> Result<Daemon, String> {
    let started = Instant::now();
    let wrap = std::env::var("PERKFLOW_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(w) => {
            let mut c = Command::new(w);
            c.args(words).arg(perkflow);
            c
        }
        None => Command::new(perkflow),
    };
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .process_group(0)
        .args(["serve", "-c"])
        .arg(cfg)
        .args(["--listen", "127.0.0.1:0"])
        .env("PERKFLOW_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("perkflow: {e}"))?;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // A wrapper may print lines of its own first.
    let first = lines
        .by_ref()
        .take(20)
        .map_while(Result::ok)
        .find(|l| l.starts_with("perkflow listening on "))
        .unwrap_or_default();
    let listening = started.elapsed();
    std::thread::spawn(move || for _ in lines {});
    let base = first
        .strip_prefix("perkflow listening on ")
        .map(|b| b.trim().to_string());
    let port = base
        .as_deref()
        .and_then(|b| b.strip_prefix("http://127.0.0.1:"))
        .and_then(|p| p.parse().ok());
    match (base, port) {
        (Some(base), Some(port)) => Ok(Daemon {
            child,
            base,
            port,
            started,
            listening,
        }),
        _ => {
            stop(child);
            Err(format!("perkflow did not start: {first:?}"))
        }
    }
}

fn bench_baseline(tools: &Path, o: &Opts, durable: Option<&Path>) -> Result<Sample, String> {
    let port = free_port();
    let mut cmd = Command::new(tools.join("baseline"));
    cmd.args(["--addr", &format!("127.0.0.1:{port}"), "--secret", SECRET])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(f) = durable {
        let _ = std::fs::remove_file(f);
        cmd.arg("--durable").arg(f);
    }
    let child = cmd.spawn().map_err(|e| format!("baseline: {e}"))?;
    let r = wait_port(port, Duration::from_secs(10))
        .and_then(|_| loadgen(tools, &format!("http://127.0.0.1:{port}/webhook"), o));
    stop(child);
    r
}

fn bench_perkflow(
    perkflow: &Path,
    tools: &Path,
    o: &Opts,
    dir: &Path,
    durability: &str,
) -> Result<Sample, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let cfg = dir.join("perkflow.yaml");
    std::fs::write(
        &cfg,
        format!(
            "durability: {durability}\nsources:\n  shop: {{ connector: shopify, secret: {SECRET} }}\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let Daemon {
        child,
        base,
        listening: startup,
        ..
    } = start_daemon(perkflow, &cfg, "warn")?;
    std::thread::sleep(Duration::from_millis(200));
    let (idle, _) = rss_kb(child.id());
    let r = loadgen(tools, &format!("{base}/hooks/shop"), o);
    let (_, peak) = rss_kb(child.id());
    stop(child);
    r.map(|mut s| {
        s.extra = format!(
            "start-up {:.0} ms, RSS idle {} MB, peak {} MB",
            startup.as_secs_f64() * 1e3,
            idle / 1024,
            peak / 1024
        );
        s
    })
}

/// What the fast sink saw of one run.
struct E2e {
    ack_p99: f64,
    acked: u64,
    delivered: u64,
    duplicates: u64,
    p50: f64,
    p99: f64,
}

fn http_get(port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Waits (bounded) until the sink has seen `acked` ids of `run_id`, then reads its stats.
fn sink_stats(port: u16, run_id: &str, acked: u64) -> Result<E2e, String> {
    let t0 = Instant::now();
    loop {
        let body = http_get(port, &format!("/stats?prefix={run_id}-"))?;
        let v: Value =
            serde_json::from_str(body.trim()).map_err(|e| format!("sink stats {body:?}: {e}"))?;
        let unique = v["unique_ids"].as_u64().unwrap_or(0);
        if unique >= acked || t0.elapsed() > Duration::from_secs(30) {
            return Ok(E2e {
                ack_p99: 0.0,
                acked,
                delivered: unique,
                duplicates: v["duplicates"].as_u64().unwrap_or(0),
                p50: v["p50_ms"].as_f64().unwrap_or(0.0),
                p99: v["p99_ms"].as_f64().unwrap_or(0.0),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn e2e_baseline(tools: &Path, o: &Opts, rate: u32, sink: u16, wal: &Path) -> Result<E2e, String> {
    let port = free_port();
    let _ = std::fs::remove_file(wal);
    let child = Command::new(tools.join("baseline"))
        .args(["--addr", &format!("127.0.0.1:{port}"), "--secret", SECRET])
        .arg("--durable")
        .arg(wal)
        .args(["--forward", &format!("http://127.0.0.1:{sink}/ingest")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("baseline: {e}"))?;
    let run_id = format!("b{}", free_port());
    let r = wait_port(port, Duration::from_secs(10)).and_then(|_| {
        loadgen_with(
            tools,
            &format!("http://127.0.0.1:{port}/webhook"),
            o,
            Some(rate),
            &run_id,
        )
    });
    let r = r.and_then(|s| {
        sink_stats(sink, &run_id, s.ok).map(|e| E2e {
            ack_p99: s.p99,
            ..e
        })
    });
    stop(child);
    r
}

fn e2e_perkflow(
    perkflow: &Path,
    tools: &Path,
    o: &Opts,
    rate: u32,
    sink: u16,
    dir: &Path,
) -> Result<E2e, String> {
    let cfg = forward_project(
        dir,
        "durability: fsync\n",
        &format!("http://127.0.0.1:{sink}/ingest"),
        "{ id: \"{{ event.id }}\", sent_us: \"{{ event.sent_us }}\" }",
    )?;
    let Daemon { child, base, .. } = start_daemon(perkflow, &cfg, "warn")?;
    let run_id = format!("p{}", free_port());
    let r =
        loadgen_with(tools, &format!("{base}/hooks/shop"), o, Some(rate), &run_id).and_then(|s| {
            sink_stats(sink, &run_id, s.ok).map(|e| E2e {
                ack_p99: s.p99,
                ..e
            })
        });
    stop(child);
    r
}

fn suite_e2e(perkflow: &Path, tools: &Path, o: &Opts, scratch: &Path) {
    let sink_port = free_port();
    let sink = match Command::new(tools.join("sink"))
        .args(["--addr", &format!("127.0.0.1:{sink_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sink: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = wait_port(sink_port, Duration::from_secs(10)) {
        eprintln!("{e}");
        std::process::exit(1);
    }
    println!(
        "\nperkflow-bench e2e: webhook -> sink latency, open loop, {} s per run, {} rounds (alternating), {} B bodies",
        o.duration, o.rounds, o.size
    );
    let mut failed = false;
    for rate in [200u32, 1000] {
        let mut rows: [Vec<E2e>; 2] = [Vec::new(), Vec::new()];
        for round in 1..=o.rounds {
            for (i, name) in [
                "baseline --durable --forward",
                "perkflow (fsync) -> webhook sink",
            ]
            .iter()
            .enumerate()
            {
                let r = if i == 0 {
                    e2e_baseline(tools, o, rate, sink_port, &scratch.join("baseline.wal"))
                } else {
                    e2e_perkflow(
                        perkflow,
                        tools,
                        o,
                        rate,
                        sink_port,
                        &scratch.join("perkflow-e2e"),
                    )
                };
                match r {
                    Ok(e) => {
                        println!(
                            "round {round} {rate:>5}/s {name:<34} e2e p50 {:>7.2} ms  p99 {:>8.2} ms  (ack p99 {:>7.2} ms)  acked {} delivered {} lost {} duplicates {}",
                            e.p50, e.p99, e.ack_p99, e.acked, e.delivered, e.acked.saturating_sub(e.delivered), e.duplicates
                        );
                        rows[i].push(e);
                    }
                    Err(e) => {
                        eprintln!("round {round} {name}: {e}");
                        failed = true;
                    }
                }
            }
        }
        let med = |v: &[E2e], f: fn(&E2e) -> f64| median(v.iter().map(f).collect());
        let (bp50, bp99) = (med(&rows[0], |e| e.p50), med(&rows[0], |e| e.p99));
        let (pp50, pp99) = (med(&rows[1], |e| e.p50), med(&rows[1], |e| e.p99));
        let lost: u64 = rows[1]
            .iter()
            .map(|e| e.acked.saturating_sub(e.delivered))
            .sum();
        let dups: u64 = rows[1].iter().map(|e| e.duplicates).sum();
        let limit = if rate == 200 { 3.0 } else { 10.0 };
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!("  medians at {rate}/s: baseline p50 {bp50:.2} ms p99 {bp99:.2} ms; perkflow p50 {pp50:.2} ms p99 {pp99:.2} ms");
        println!("  target p50 < {limit} ms: {}", verdict(pp50 < limit));
        println!(
            "  target p99 <= 2x the durable baseline's ({:.2} ms): {}",
            2.0 * bp99,
            verdict(pp99 <= 2.0 * bp99)
        );
        println!(
            "  lost {lost}, delivered twice {dups}: {}",
            verdict(lost == 0 && dups == 0)
        );
    }
    stop(sink);
    if failed {
        std::process::exit(1);
    }
}

/// A project in `dir` (emptied first): `settings` (top-level config lines), one Shopify
/// source, and a pipeline that forwards every order to `sink_url` through the `webhook`
/// connector with `with` (a YAML flow map). Returns the config file.
fn forward_project(
    dir: &Path,
    settings: &str,
    sink_url: &str,
    with: &str,
) -> Result<PathBuf, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("pipelines")).map_err(|e| e.to_string())?;
    let cfg = dir.join("perkflow.yaml");
    std::fs::write(
        &cfg,
        format!(
            "{settings}sources:\n  shop: {{ connector: shopify, secret: {SECRET} }}\nsinks:\n  out: {{ connector: webhook, url: \"{sink_url}\" }}\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("pipelines/forward.yaml"),
        format!("pipeline: forward\non: {{ source: shop, events: [orders/paid] }}\nsteps:\n  - deliver: {{ to: out.post, with: {with} }}\n"),
    )
    .map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Bytes in `dir` and below.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            total += if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            };
        }
    }
    total
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn main() {
    let o = opts();
    let exe = std::env::current_exe().expect("current exe");
    let release_dir = exe.parent().expect("exe dir").to_path_buf();
    let target = release_dir.parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if let Err(e) =
        run(Command::new(&cargo).args(["build", "--release", "--quiet", "--bin", "perkflow"]))
    {
        eprintln!("cannot build perkflow: {e}");
        std::process::exit(1);
    }
    let perkflow = release_dir.join("perkflow");
    let tools = match build_tools(&o.tools, &target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let scratch = target.join("bench-scratch");
    let _ = std::fs::create_dir_all(&scratch);
    if o.suite == "e2e" || o.suite == "all" {
        suite_e2e(&perkflow, &tools, &o, &scratch);
        if o.suite == "e2e" {
            let _ = std::fs::remove_dir_all(&scratch);
            return;
        }
    }
    if o.suite == "soak" {
        let r = soak::suite(&perkflow, &tools, &o, &scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        if let Err(e) = r {
            eprintln!("soak: {e}");
            std::process::exit(1);
        }
        return;
    }
    if o.suite == "resources" || o.suite == "all" {
        if let Err(e) = resources::suite(&perkflow, &tools, &o, &scratch) {
            eprintln!("resources: {e}");
            std::process::exit(1);
        }
        if o.suite == "resources" {
            let _ = std::fs::remove_dir_all(&scratch);
            return;
        }
    }
    println!(
        "perkflow-bench: signed Shopify webhooks of {} B, closed loop c={}, {} s per run, {} rounds (alternating)",
        o.size, o.concurrency, o.duration, o.rounds
    );
    let names = [
        "baseline (verify, no persist)",
        "baseline --durable (fdatasync)",
        "perkflow (durability: fsync)",
        "perkflow (durability: batch)",
    ];
    let mut results: Vec<Vec<Sample>> = names.iter().map(|_| Vec::new()).collect();
    for round in 1..=o.rounds {
        for (i, name) in names.iter().enumerate() {
            let r = match i {
                0 => bench_baseline(&tools, &o, None),
                1 => bench_baseline(&tools, &o, Some(&scratch.join("baseline.wal"))),
                2 => bench_perkflow(&perkflow, &tools, &o, &scratch.join("perkflow"), "fsync"),
                _ => bench_perkflow(&perkflow, &tools, &o, &scratch.join("perkflow"), "batch"),
            };
            match r {
                Ok(s) => {
                    println!(
                        "round {round} {name:<32} {:>9.0} req/s  ack p50 {:>6.2} ms  p99 {:>6.2} ms  ok {} non-2xx/errors {} {}",
                        s.rps, s.p50, s.p99, s.ok, s.errors, s.extra
                    );
                    results[i].push(s);
                }
                Err(e) => {
                    eprintln!("round {round} {name}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("\nmedians over {} rounds:", o.rounds);
    let med: Vec<(f64, f64, f64)> = results
        .iter()
        .map(|r| {
            (
                median(r.iter().map(|s| s.rps).collect()),
                median(r.iter().map(|s| s.p50).collect()),
                median(r.iter().map(|s| s.p99).collect()),
            )
        })
        .collect();
    for (name, (rps, p50, p99)) in names.iter().zip(&med) {
        println!("  {name:<32} {rps:>9.0} req/s  ack p50 {p50:>6.2} ms  p99 {p99:>6.2} ms");
    }
    let (base, durable, pf) = (med[0], med[1], med[2]);
    println!(
        "  (the batch row is for comparison: it acknowledges before the sync; targets use fsync)"
    );
    let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * a / b } else { 0.0 };
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("\ntargets:");
    println!(
        "  perkflow durable >= 70% of the no-persist baseline: {:.0}% ({})",
        pct(pf.0, base.0),
        verdict(pf.0 >= 0.7 * base.0)
    );
    println!(
        "  perkflow durable >= durable baseline:              {:.0}% ({})",
        pct(pf.0, durable.0),
        verdict(pf.0 >= durable.0)
    );
    println!(
        "  ack p99 <= 1.5x durable baseline's:                {:.2} ms vs {:.2} ms ({})",
        pf.2,
        1.5 * durable.2,
        verdict(pf.2 <= 1.5 * durable.2)
    );
}
