//! Hot reload: on SIGHUP, on a change in the config file or its pipelines/connectors
//! directories, and on `POST /api/reload`, the configuration is loaded and checked in full
//! (every file, every secret resolved) before it replaces the running one in one swap. A
//! configuration with problems keeps the old one running; the problems go to the log, the
//! status page and `/api/connectors`.
//!
//! Nothing in flight is lost: a webhook is handled entirely by the runtime it started with,
//! the worker takes the new one between batches, and the delivery engine keeps the lanes
//! (limiter, breaker, token cache, in-flight permits) of every sink whose definition did not
//! change; attempts already started finish on their old lane and are recorded as usual.

use crate::app::AppState;
use notify::Watcher;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    pub sources: usize,
    pub sinks: usize,
    pub pipelines: usize,
    /// Settings that changed but only take effect on a restart.
    pub need_restart: Vec<&'static str>,
}

/// Loads, checks and swaps in the configuration at `path`. On problems the running one
/// stays and the problems are recorded (and returned).
pub async fn reload(app: &AppState, trigger: &str) -> Result<Reloaded, String> {
    let _one_at_a_time = app.reload_lock.lock().await;
    let path = app.config_path.clone();
    let overrides = app.boot.overrides.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let mut cfg = crate::config::load(path.as_deref()).map_err(|d| d.to_string())?;
        cfg.override_with(overrides);
        let rt = crate::app::build_runtime(&cfg).map_err(|d| d.to_string())?;
        Ok::<_, String>((cfg, rt))
    })
    .await
    .map_err(|e| format!("reloading failed: {e}"))
    .and_then(|r| r);
    let (cfg, rt) = match loaded {
        Ok(x) => x,
        Err(problems) => {
            let problems = problems.trim_end().to_string();
            tracing::error!(%trigger, problems = %problems, "the new configuration has problems; the previous one keeps running");
            app.record_reload(Err(problems.clone()));
            metrics::counter!("perkflow_config_reloads_total", "result" => "refused").increment(1);
            return Err(problems);
        }
    };
    let boot = &app.boot;
    let mut need_restart = Vec::new();
    if cfg.listen != boot.listen {
        need_restart.push("listen");
    }
    if cfg.data_dir != boot.data_dir {
        need_restart.push("data_dir");
    }
    if cfg.durability != boot.durability || cfg.flush_interval != boot.flush_interval {
        need_restart.push("durability");
    }
    // Compared by value: a `${file:…}` token or key rewritten in its file is a change too.
    let (admin_changed, keys_changed) = credentials_changed(app, &cfg);
    if admin_changed {
        need_restart.push("admin_token");
    }
    if keys_changed {
        need_restart.push("api_keys");
    }
    if cfg.retention != boot.retention {
        need_restart.push("retention");
    }
    if cfg.dedup_window != boot.dedup_window {
        need_restart.push("dedup_window");
    }
    if cfg.header_timeout != boot.header_timeout {
        need_restart.push("header_timeout");
    }
    if cfg.body_timeout != boot.body_timeout {
        need_restart.push("body_timeout");
    }
    let summary = Reloaded {
        sources: rt.sources.len(),
        sinks: rt.sinks.len(),
        pipelines: rt.pipelines.len(),
        need_restart,
    };
    app.set_runtime(rt);
    app.record_reload(Ok(()));
    app.jobs_ready.notify_one();
    app.wake.notify_one();
    metrics::counter!("perkflow_config_reloads_total", "result" => "applied").increment(1);
    if summary.need_restart.is_empty() {
        tracing::info!(%trigger, sources = summary.sources, sinks = summary.sinks, pipelines = summary.pipelines, "configuration reloaded");
    } else {
        tracing::warn!(%trigger, sources = summary.sources, sinks = summary.sinks, pipelines = summary.pipelines, restart_for = ?summary.need_restart, "configuration reloaded; some changes take effect only after a restart");
    }
    Ok(summary)
}

/// Whether the admin token and the member API keys of `cfg` differ from the running ones
/// (they take effect at the next start; a value that does not resolve counts as changed).
fn credentials_changed(app: &AppState, cfg: &crate::config::Config) -> (bool, bool) {
    let admin_changed = crate::app::admin_access(cfg).map_or(true, |a| a != app.admin);
    let keys_changed = crate::app::api_keys(cfg).map_or(true, |k| *k != *app.api_keys);
    (admin_changed, keys_changed)
}

/// The files and directories whose changes trigger a reload.
pub fn watched(cfg: &crate::config::Config) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(f) = &cfg.file {
        out.push(f.clone());
    }
    out.extend(cfg.pipeline_dirs.iter().cloned());
    out.extend(cfg.connector_dirs.iter().cloned());
    out
}

fn relevant(event: &notify::Event, files: &[PathBuf]) -> bool {
    use notify::EventKind;
    if !matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
    ) {
        return false;
    }
    event.paths.iter().any(|p| {
        let yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
        yaml || files.iter().any(|f| same_file(f, p))
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || (a.file_name() == b.file_name() && a.parent().map(canon) == b.parent().map(canon))
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Reloads on SIGHUP and on file changes (debounced) until `stop`.
pub async fn watch(app: AppState, paths: Vec<PathBuf>, stop: CancellationToken) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let files: Vec<PathBuf> = paths.iter().filter(|p| p.is_file()).cloned().collect();
    let mut watcher = {
        let files = files.clone();
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if relevant(&ev, &files) {
                    let _ = tx.send(());
                }
            }
        })
    };
    match &mut watcher {
        Ok(w) => {
            for p in &paths {
                // A file is watched through its directory (editors replace files on save).
                let target = if p.is_file() {
                    p.parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| p.clone())
                } else {
                    p.clone()
                };
                if !target.exists() {
                    continue;
                }
                if let Err(e) = w.watch(&target, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(path = %target.display(), error = %e, "cannot watch for configuration changes; SIGHUP and POST /api/reload still reload");
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for configuration changes; SIGHUP and POST /api/reload still reload")
        }
    }
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hangup => {
                let _ = reload(&app, "SIGHUP").await;
            }
            Some(()) = rx.recv() => {
                // Debounce: an editor's save or a `cp -r` is many events.
                let quiet = Duration::from_millis(300);
                loop {
                    tokio::select! {
                        more = rx.recv() => if more.is_none() { return },
                        _ = tokio::time::sleep(quiet) => break,
                    }
                }
                let _ = reload(&app, "file change").await;
            }
        }
    }
}

/// `POST /api/reload`: 200 with what was loaded, or 422 with every problem.
pub async fn reload_endpoint(
    axum::extract::State(app): axum::extract::State<AppState>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match reload(&app, "POST /api/reload").await {
        Ok(r) => axum::Json(serde_json::json!({ "reloaded": true, "summary": r })).into_response(),
        Err(problems) => (
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(serde_json::json!({
                "reloaded": false,
                "error": "the new configuration has problems; the previous one keeps running",
                "problems": problems.lines().collect::<Vec<_>>(),
            })),
        )
            .into_response(),
    }
}
