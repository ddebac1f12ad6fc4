//! The HTTP/1.1 server loop, with the limits a stranger's connection gets: request headers
//! must arrive within the header timeout (`header_timeout`, default [`HEADER_TIMEOUT`]) and
//! fit in `MAX_HEADER_BYTES`; bodies are limited per source by ingest. Graceful shutdown stops accepting, lets in-flight requests finish (up
//! to `DRAIN_TIMEOUT`) and closes idle keep-alive connections.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The default `header_timeout`.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections at once; past it new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains. A connection whose
/// request headers are not all there within `header_timeout` is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    header_timeout: Duration,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let service = TowerToHyperService::new(app);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the open connections.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many open connections; closing a new one");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_header_size(MAX_HEADER_BYTES)
            .serve_connection(TokioIo::new(stream), service.clone());
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "in-flight requests did not finish within {DRAIN_TIMEOUT:?}; stopping anyway"
        );
    }
    Ok(())
}
