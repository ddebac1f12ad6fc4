//! A scripted fake vendor on 127.0.0.1: records every request and answers from a script,
//! like svix's `TestReceiver`. Each test builds its script from the vendor's documented
//! answers (sink-apis.md). A reply can also be no answer at all: `Reply::reset()` drops the
//! connection with a TCP reset once the request was read.
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.body.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
}

/// An answer: status, headers, body, and an optional delay before answering.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Duration,
    /// No HTTP answer: the connection is reset (see `Reply::reset`).
    pub reset: bool,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
            reset: false,
        }
    }
    /// No answer: the request is read, then the connection is closed with a TCP reset (RST)
    /// before any byte of a response is written, like a vendor process crashing mid-request
    /// or a load balancer dropping the connection.
    pub fn reset() -> Reply {
        Reply {
            reset: true,
            ..Reply::new(500, "")
        }
    }
    pub fn header(mut self, k: &'static str, v: impl Into<String>) -> Reply {
        self.headers.push((k, v.into()));
        self
    }
    pub fn after(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

/// The script: every request seen so far (this one last) -> the answer.
pub type Script = Arc<dyn Fn(&[Seen]) -> Reply + Send + Sync>;

#[derive(Clone)]
struct Fake {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
}

pub struct FakeVendor {
    pub base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
    stop: tokio_util::sync::CancellationToken,
}

impl FakeVendor {
    pub async fn start(script: impl Fn(&[Seen]) -> Reply + Send + Sync + 'static) -> FakeVendor {
        let fake = Fake {
            seen: Arc::default(),
            script: Arc::new(Mutex::new(Arc::new(script))),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(fake.clone())
            .into_make_service_with_connect_info::<Conn>();
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(Resettable(listener), app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        FakeVendor {
            base,
            seen: fake.seen,
            script: fake.script,
            stop,
        }
    }

    pub fn set_script(&self, script: impl Fn(&[Seen]) -> Reply + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (bounded) until `pred` holds for the requests seen.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Seen]) -> bool,
    ) -> Vec<Seen> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen();
            if pred(&seen) {
                return seen;
            }
            if Instant::now() > deadline {
                panic!(
                    "fake vendor: timed out waiting for {what}; saw {} requests: {:#?}",
                    seen.len(),
                    seen.iter()
                        .map(|s| format!("{} {} {}", s.method, s.path, s.body))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FakeVendor {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A TCP listener whose connections a handler can reset instead of answering.
struct Resettable(TcpListener);

/// One connection, as its handlers see it: set `0` to reset it instead of answering.
#[derive(Clone, Debug)]
struct Conn(Arc<AtomicBool>);

/// A connection that fails every read and write once its `Conn` flag is set (so hyper drops
/// it without writing the response) and then closes with RST instead of FIN.
struct Io {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl axum::serve::Listener for Resettable {
    type Io = Io;
    type Addr = Conn;

    async fn accept(&mut self) -> (Io, Conn) {
        loop {
            match self.0.accept().await {
                Ok((stream, _)) => {
                    let reset = Arc::new(AtomicBool::new(false));
                    return (
                        Io {
                            stream,
                            reset: reset.clone(),
                        },
                        Conn(reset),
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Conn> {
        Ok(Conn(Arc::default()))
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Resettable>> for Conn {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Resettable>) -> Conn {
        stream.remote_addr().clone()
    }
}

impl Io {
    fn check(&self) -> std::io::Result<()> {
        if self.reset.load(Ordering::SeqCst) {
            Err(std::io::ErrorKind::ConnectionReset.into())
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            // SO_LINGER 0: closing sends RST (the peer sees "connection reset by peer").
            let _ = self.stream.set_zero_linger();
        }
    }
}

async fn handle(
    State(f): State<Fake>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        at: Instant::now(),
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let (reply, _) = {
        let mut all = f.seen.lock().unwrap();
        all.push(seen);
        let script = f.script.lock().unwrap().clone();
        (script(&all), ())
    };
    if reply.reset {
        // The response below is never written: the connection fails its next write.
        conn.0.store(true, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut r = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (k, v) in reply.headers {
        r.headers_mut().insert(k, v.parse().unwrap());
    }
    r
}
