//! `--suite resources`: start-up time (to listening and to ready), idle memory, and recovery
//! after a restart with a large backlog of pending jobs (`--pending`, default 1,000,000),
//! each beside the reference `baseline` where it has an equivalent.

use super::{
    dir_bytes, forward_project, free_port, median, rss_kb, start_daemon, stop, wait_port, Opts,
};
use perkflow::outbox::{Job, JobKind, JobState};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `GET /readyz` until 200 (bounded): the time since `t0`.
fn ready(port: u16, t0: Instant, limit: Duration) -> Result<Duration, String> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let _ = write!(
                s,
                "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            );
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return Ok(t0.elapsed());
            }
        }
        if Instant::now() > deadline {
            return Err("not ready in time".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn config(dir: &Path, sink_port: u16) -> Result<std::path::PathBuf, String> {
    forward_project(
        dir,
        "admin_token: bench-admin-token\n",
        &format!("http://127.0.0.1:{sink_port}/sink"),
        "{ id: \"{{ event.id }}\" }",
    )
}

/// Writes `n` pending jobs (due in an hour) straight into a store in `dir`.
fn backlog(dir: &Path, n: usize) -> Result<Duration, String> {
    let t0 = Instant::now();
    let store = perkflow::store::Store::open(
        &dir.join("data"),
        perkflow::config::Durability::Batch,
        Duration::from_millis(200),
    )
    .map_err(|e| e.to_string())?;
    let due = perkflow::delivery::now_ms() + 3_600_000;
    let mut chunk = Vec::with_capacity(10_000);
    for i in 0..n {
        let job = Job {
            key: format!("pf-backlog-{i:010}"),
            event_id: perkflow::inbox::format_id(i as u64),
            pipeline: "forward".into(),
            step: "steps[0].deliver".into(),
            sink: "out".into(),
            action: "post".into(),
            with: serde_json::json!({ "id": i }),
            created_at_ms: due - 3_600_000,
            attempts: 0,
            state: JobState::Pending,
            next_at_ms: due,
            uncertain: false,
            reason: None,
            vendor_id: None,
            finished_at_ms: None,
            replays: 0,
            log: Vec::new(),
            kind: JobKind::Send,
            version: 0,
            sensitive: Vec::new(),
            keep: None,
        };
        let mut phantom = job.clone();
        phantom.state = JobState::Dropped;
        chunk.push((phantom, job));
        if chunk.len() == chunk.capacity() {
            store.write_jobs(&chunk).map_err(|e| e.to_string())?;
            chunk.clear();
        }
    }
    store.write_jobs(&chunk).map_err(|e| e.to_string())?;
    store.close().map_err(|e| e.to_string())?;
    Ok(t0.elapsed())
}

pub fn suite(perkflow: &Path, tools: &Path, o: &Opts, scratch: &Path) -> Result<(), String> {
    let sink_port = free_port();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "\nperkflow-bench resources: start-up, idle memory, restart with {} pending jobs",
        o.pending
    );

    // Start-up: a fresh data dir each time, alternating with the reference server.
    let (mut listening, mut readiness, mut base_up) = (Vec::new(), Vec::new(), Vec::new());
    let mut idle = (Vec::new(), Vec::new());
    for _ in 0..o.rounds.max(5) {
        let dir = scratch.join("resources");
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = config(&dir, sink_port)?;
        let s = start_daemon(perkflow, &cfg, "warn")?;
        let r = ready(s.port, s.started, Duration::from_secs(30));
        listening.push(s.listening.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_secs(2));
        idle.0.push(rss_kb(s.child.id()).0 as f64 / 1024.0);
        stop(s.child);
        readiness.push(r?.as_secs_f64() * 1e3);

        let port = free_port();
        let t0 = Instant::now();
        let child = Command::new(tools.join("baseline"))
            .args([
                "--addr",
                &format!("127.0.0.1:{port}"),
                "--secret",
                "bench-secret",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("baseline: {e}"))?;
        let up = wait_port(port, Duration::from_secs(10)).map(|_| t0.elapsed());
        std::thread::sleep(Duration::from_secs(2));
        idle.1.push(rss_kb(child.id()).0 as f64 / 1024.0);
        stop(child);
        base_up.push(up?.as_secs_f64() * 1e3);
    }
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    println!(
        "  start-up, perkflow: listening {:.0} ms (max {:.0}), ready {:.0} ms (max {:.0}); baseline listening {:.0} ms",
        median(listening.clone()),
        max(&listening),
        median(readiness.clone()),
        max(&readiness),
        median(base_up.clone())
    );
    println!(
        "  idle RSS, perkflow (one source, one sink, one pipeline): {:.1} MB; baseline {:.1} MB",
        median(idle.0.clone()),
        median(idle.1.clone())
    );
    println!(
        "  target start-up < 200 ms: {}; idle RSS < 30 MB: {}",
        verdict(median(readiness.clone()) < 200.0),
        verdict(median(idle.0.clone()) < 30.0)
    );

    // Restart with a backlog.
    let dir = scratch.join("backlog");
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = config(&dir, sink_port)?;
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).map_err(|e| e.to_string())? + "data_dir: data\n",
    )
    .map_err(|e| e.to_string())?;
    let wrote = backlog(&dir, o.pending)?;
    println!(
        "  backlog of {} pending jobs written in {:.1} s ({} MB on disk)",
        o.pending,
        wrote.as_secs_f64(),
        dir_bytes(&dir.join("data")) / (1 << 20)
    );
    let mut restarts = Vec::new();
    for round in 1..=o.rounds {
        let s = start_daemon(perkflow, &cfg, "warn")?;
        let r = ready(s.port, s.started, Duration::from_secs(120));
        let after = rss_kb(s.child.id()).0 / 1024;
        std::thread::sleep(Duration::from_secs(3));
        let (now, peak) = rss_kb(s.child.id());
        stop(s.child);
        let r = r?;
        println!(
            "  round {round}: restart with {} pending: listening {:.0} ms, ready {:.0} ms; RSS at ready {after} MB, 3 s later {} MB (peak {} MB)",
            o.pending,
            s.listening.as_secs_f64() * 1e3,
            r.as_secs_f64() * 1e3,
            now / 1024,
            peak / 1024
        );
        restarts.push(r.as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "  target restart with {} pending < 5 s to ready: {:.2} s ({})",
        o.pending,
        median(restarts.clone()),
        verdict(median(restarts) < 5.0)
    );
    Ok(())
}
