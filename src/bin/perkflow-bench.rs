//! Durable-ingest benchmark: perkflow beside the reference servers of `../shared/bench-tools`,
//! measured in the same run, alternating.
//!
//! ```text
//! cargo run --release --bin perkflow-bench -- [--rounds 3] [--duration 10] [--concurrency 32] [--size 2048]
//! ```
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

const SECRET: &str = "bench-secret";

struct Opts {
    rounds: usize,
    duration: u64,
    concurrency: usize,
    size: usize,
    tools: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: perkflow-bench [--rounds N (3)] [--duration SECS (10)] [--concurrency C (32)] [--size BYTES (2048)] \
         [--tools DIR (../shared/bench-tools)]"
    );
    std::process::exit(2)
}

fn opts() -> Opts {
    let mut o = Opts {
        rounds: 3,
        duration: 10,
        concurrency: 32,
        size: 2048,
        tools: PathBuf::from("../shared/bench-tools"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--rounds" => o.rounds = v().parse().unwrap_or_else(|_| usage()),
            "--duration" => o.duration = v().parse().unwrap_or_else(|_| usage()),
            "--concurrency" => o.concurrency = v().parse().unwrap_or_else(|_| usage()),
            "--size" => o.size = v().parse().unwrap_or_else(|_| usage()),
            "--tools" => o.tools = PathBuf::from(v()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    o.rounds = o.rounds.clamp(1, 20);
    o.duration = o.duration.clamp(1, 120);
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
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
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
    let out = Command::new(bin.join("loadgen"))
        .args(["--url", url, "--secret", SECRET, "--quiet"])
        .args([
            "--concurrency",
            &o.concurrency.to_string(),
            "--duration",
            &o.duration.to_string(),
        ])
        .args([
            "--size",
            &o.size.to_string(),
            "--run-id",
            &format!("r{}", free_port()),
        ])
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
    let t0 = Instant::now();
    let mut child = Command::new(perkflow)
        .args(["serve", "-c"])
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .env("PERKFLOW_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("perkflow: {e}"))?;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
    let startup = t0.elapsed();
    std::thread::spawn(move || for _ in lines {});
    let Some(base) = first.strip_prefix("perkflow listening on ") else {
        stop(child);
        return Err(format!("perkflow did not start: {first:?}"));
    };
    std::thread::sleep(Duration::from_millis(200));
    let (idle, _) = rss_kb(child.id());
    let r = loadgen(tools, &format!("{}/hooks/shop", base.trim()), o);
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
