//! `--suite soak`: a bounded run (`--soak-minutes`, default 30) at a steady open-loop rate
//! (`--rate`, default 50/s) through perkflow to a faulty sink (every 5th request 503, every
//! 200th 429 with `Retry-After: 1`, which pauses the whole sink for a second), with retention at 2 minutes and a 4-minute de-duplication window. Every 30 s it samples the
//! daemon's resident memory, open files and data-dir size; at the end it waits for the
//! backlog to drain and checks that every acknowledged webhook reached the sink.

use super::{dir_bytes, forward_project, rss_kb, stop, Opts, SECRET};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Sink {
    requests: AtomicU64,
    refused: AtomicU64,
    ids: Mutex<HashSet<String>>,
    duplicates: AtomicU64,
}

async fn receive(
    axum::extract::State(s): axum::extract::State<Arc<Sink>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let n = s.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if n % 5 == 0 {
        s.refused.fetch_add(1, Ordering::Relaxed);
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "try later").into_response();
    }
    if n % 200 == 1 {
        s.refused.fetch_add(1, Ordering::Relaxed);
        return (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "slow down",
        )
            .into_response();
    }
    let id = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .unwrap_or_default();
    if !s.ids.lock().expect("sink lock").insert(id) {
        s.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    (axum::http::StatusCode::OK, "ok").into_response()
}

/// The faulty sink on 127.0.0.1, in a runtime of its own; its port.
fn start_sink(sink: Arc<Sink>) -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new()
                .route("/sink", axum::routing::post(receive))
                .with_state(sink);
            let _ = axum::serve(listener, app).await;
        });
    });
    Ok(port)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn suite(perkflow: &Path, tools: &Path, o: &Opts, scratch: &Path) -> Result<(), String> {
    let sink = Arc::new(Sink::default());
    let sink_port = start_sink(sink.clone())?;
    let dir = scratch.join("soak");
    let cfg = forward_project(
        &dir,
        "data_dir: data\nretention: 2m\ndedup_window: 4m\n",
        &format!("http://127.0.0.1:{sink_port}/sink"),
        "{ id: \"{{ event.id }}\" }",
    )?;
    let super::Daemon { child, base, .. } = super::start_daemon(perkflow, &cfg, "error")?;
    let url = format!("{base}/hooks/shop");
    let pid = child.id();
    println!(
        "\nperkflow-bench soak: {} min at {}/s, faulty sink (20 % 503, 0.5 % 429 + Retry-After 1 s), retention 2 min, de-duplication window 4 min",
        o.soak_minutes, o.rate
    );
    println!("  minute  RSS MB  files  data MB  acked  delivered  sink refusals");
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let load = {
        let (tools, url, acked, errors) = (
            tools.to_path_buf(),
            url.clone(),
            acked.clone(),
            errors.clone(),
        );
        let (minutes, rate) = (o.soak_minutes, o.rate);
        std::thread::spawn(move || {
            for m in 0..minutes {
                let out = Command::new(tools.join("loadgen"))
                    .args(["--url", &url, "--secret", SECRET, "--quiet"])
                    .args(["--rate", &rate.to_string(), "--duration", "60"])
                    .args(["--size", "2048", "--run-id", &format!("soak{m}")])
                    .output();
                let v: serde_json::Value = out
                    .ok()
                    .and_then(|o| serde_json::from_slice(&o.stdout).ok())
                    .unwrap_or_default();
                let ok = v["ok"].as_u64().unwrap_or(0);
                acked.fetch_add(ok, Ordering::Relaxed);
                errors.fetch_add(
                    v["completed"].as_u64().unwrap_or(0).saturating_sub(ok)
                        + v["errors"].as_u64().unwrap_or(0),
                    Ordering::Relaxed,
                );
            }
        })
    };
    let t0 = Instant::now();
    let mut samples: Vec<(f64, u64, usize, u64)> = Vec::new();
    let sample = |samples: &mut Vec<(f64, u64, usize, u64)>| {
        let s = (
            t0.elapsed().as_secs_f64() / 60.0,
            rss_kb(pid).0 / 1024,
            open_files(pid),
            dir_bytes(&dir.join("data")) / (1 << 20),
        );
        println!(
            "  {:>6.1}  {:>6}  {:>5}  {:>7}  {:>5}  {:>9}  {:>13}",
            s.0,
            s.1,
            s.2,
            s.3,
            acked.load(Ordering::Relaxed),
            sink.ids.lock().map(|i| i.len()).unwrap_or(0),
            sink.refused.load(Ordering::Relaxed)
        );
        samples.push(s);
    };
    while !load.is_finished() {
        std::thread::sleep(Duration::from_secs(30));
        sample(&mut samples);
    }
    let _ = load.join();
    // Drain: every acknowledged webhook reaches the sink (retries included), bounded.
    let total = acked.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(180);
    while (sink.ids.lock().map(|i| i.len()).unwrap_or(0) as u64) < total
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_secs(1));
    }
    sample(&mut samples);
    stop(child);
    let delivered = sink.ids.lock().map(|i| i.len()).unwrap_or(0) as u64;
    let dups = sink.duplicates.load(Ordering::Relaxed);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    // Flat: after a warm-up third (the first log file fills, is sealed and dropped), the
    // last third's peak within 25 % of the middle third's (memory, data) and 10 more open
    // files at most.
    let third = (samples.len() / 3).max(1);
    let early = &samples[third.min(samples.len() - 1)..(2 * third).min(samples.len())];
    let late = &samples[samples.len() - third..];
    let max = |s: &[(f64, u64, usize, u64)], f: fn(&(f64, u64, usize, u64)) -> u64| {
        s.iter().map(f).max().unwrap_or(0)
    };
    let (rss_a, rss_b) = (max(early, |s| s.1), max(late, |s| s.1));
    let (fd_a, fd_b) = (max(early, |s| s.2 as u64), max(late, |s| s.2 as u64));
    let (disk_a, disk_b) = (max(early, |s| s.3), max(late, |s| s.3));
    let flat = |a: u64, b: u64| b as f64 <= a as f64 * 1.25 + 2.0;
    println!(
        "  acknowledged {total}, load errors {}, delivered {delivered}, lost {}, delivered twice {dups}",
        errors.load(Ordering::Relaxed),
        total.saturating_sub(delivered)
    );
    println!(
        "  peaks after warm-up, middle third -> last third: memory {rss_a} -> {rss_b} MB: {}; open files {fd_a} -> {fd_b}: {}; data {disk_a} -> {disk_b} MB: {}",
        verdict(flat(rss_a, rss_b)),
        verdict(fd_b <= fd_a + 10),
        verdict(flat(disk_a, disk_b)),
    );
    println!(
        "  nothing lost, nothing twice: {}",
        verdict(total == delivered && dups == 0)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
