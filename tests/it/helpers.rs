//! Test harness: start `perkflow serve` as a real process on a free port with its own temp
//! dir, sign fixtures like the vendors do, and talk to it over HTTP.
#![allow(dead_code)]

use perkflow::connector::{Registry, SourceDef};
use perkflow::sign::{signature_headers, SignKeys};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A path inside the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(REPO).join(rel)
}

pub struct Daemon {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    stderr_log: PathBuf,
}

impl Daemon {
    /// Writes `config` (YAML; `data_dir` defaults to `<tmp>/data`) into a new temp dir and
    /// starts the daemon on a free port.
    pub fn start(config: &str) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut d =
            Daemon::start_in(&dir, config).unwrap_or_else(|e| panic!("daemon did not start: {e}"));
        d._tmp = Some(tmp);
        d
    }

    /// Starts the daemon with `config` in `dir` (reusing its data dir if present).
    pub fn start_in(dir: &Path, config: &str) -> Result<Daemon, String> {
        Daemon::start_in_with(dir, config, |_| {})
    }

    /// `start_in`, with `prepare` adjusting the daemon's command first (limits, environment).
    pub fn start_in_with(
        dir: &Path,
        config: &str,
        prepare: impl FnOnce(&mut Command),
    ) -> Result<Daemon, String> {
        std::fs::write(dir.join("perkflow.yaml"), config).map_err(|e| e.to_string())?;
        let stderr_log = dir.join(format!("daemon-{}.log", now_unix_nanos()));
        let err = std::fs::File::create(&stderr_log).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_perkflow"));
        cmd.args(["serve", "-c"])
            .arg(dir.join("perkflow.yaml"))
            .args(["--listen", "127.0.0.1:0"])
            .env("PERKFLOW_LOG", "perkflow=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        prepare(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {} // keep draining so the daemon never blocks on stdout
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no listening line; log:\n{}",
                    std::fs::read_to_string(&stderr_log).unwrap_or_default()
                ));
            }
        };
        let base = line
            .strip_prefix("perkflow listening on ")
            .ok_or_else(|| format!("unexpected first line {line:?}"))?
            .trim()
            .to_string();
        Ok(Daemon {
            child: Some(child),
            base,
            dir: dir.to_path_buf(),
            _tmp: None,
            stderr_log,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("daemon did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far (for assertions and failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn now_unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The built-in definition of a source connector.
pub fn source_def(connector: &str) -> SourceDef {
    let mut diags = Default::default();
    let reg = Registry::load(&[], &mut diags);
    reg.get(connector)
        .and_then(|c| c.source.clone())
        .unwrap_or_else(|| panic!("no connector {connector}"))
}

/// A request ready to send: body and all headers (fixture headers + signature).
#[derive(Clone, Debug)]
pub struct Signed {
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Signed {
    /// Replaces (or adds) a header.
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    /// Removes a header.
    pub fn without(mut self, name: &str) -> Self {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self
    }
}

/// Reads `fixtures/<rel>` (+ its headers file) and signs it for `connector`.
/// `url` is the URL the vendor signs (Square); `now` the signing time (Stripe).
pub fn sign_fixture(connector: &str, rel: &str, keys: &SignKeys, url: &str, now: i64) -> Signed {
    let (body, headers) =
        perkflow::sign::read_fixture(&repo(&format!("fixtures/{rel}"))).expect("fixture");
    sign_body(connector, body, headers, keys, url, now)
}

pub fn sign_body(
    connector: &str,
    body: Vec<u8>,
    mut headers: Vec<(String, String)>,
    keys: &SignKeys,
    url: &str,
    now: i64,
) -> Signed {
    let sig =
        signature_headers(&source_def(connector), keys, url, &body, &headers, now).expect("sign");
    for (k, v) in sig {
        headers.retain(|(h, _)| !h.eq_ignore_ascii_case(&k));
        headers.push((k, v));
    }
    Signed { body, headers }
}

pub fn keys(secrets: &[&str]) -> SignKeys {
    SignKeys {
        secrets: secrets.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A plain HTTP client (no proxy from the environment, bounded time).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: reqwest::header::HeaderMap,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub async fn post(c: &reqwest::Client, url: &str, req: &Signed) -> Answer {
    let mut r = c.post(url).body(req.body.clone());
    for (k, v) in &req.headers {
        r = r.header(k.as_str(), v.as_str());
    }
    send(r).await
}

/// Posts a signed webhook that must be accepted; returns the stored event's id.
pub async fn stored_id(c: &reqwest::Client, url: &str, req: &Signed) -> String {
    let a = post(c, url, req).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()["id"].as_str().expect("an event id").to_string()
}

/// Waits (bounded) until every pipeline has run on event `id` (`pending` is false: its
/// jobs, trace and the worker's watermark are all written by then); returns the event.
pub async fn processed(
    c: &reqwest::Client,
    d: &Daemon,
    token: &str,
    id: &str,
    timeout: std::time::Duration,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let a = send(
            c.get(d.url(&format!("/api/events/{id}")))
                .bearer_auth(token),
        )
        .await;
        let ev = a.json();
        if a.status == 200 && ev["pending"] == false {
            return ev;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "event {id} was not processed: {}\n{}",
            a.body,
            d.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub async fn get(c: &reqwest::Client, url: &str) -> Answer {
    send(c.get(url)).await
}

/// Sends a request and collects status, headers and body.
pub async fn send(r: reqwest::RequestBuilder) -> Answer {
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap_or_default();
    Answer {
        status,
        body,
        headers,
    }
}

/// Opens the daemon's store after it stopped and lists (source, vendor id, event id) of
/// every stored event.
pub fn stored_events(data_dir: &Path) -> Vec<(String, String, String)> {
    let store = perkflow::store::Store::open(
        data_dir,
        perkflow::config::Durability::Fsync,
        Duration::from_millis(100),
    )
    .expect("open store");
    store
        .events()
        .map(|e| e.expect("event"))
        .map(|e| (e.meta.source, e.meta.vendor_id, e.meta.id))
        .collect()
}

/// The vendor sandbox on 127.0.0.1 (in this test's runtime): its state, its URL, and the
/// token that stops it.
pub async fn sandbox() -> (
    std::sync::Arc<perkflow::sandbox::Sandbox>,
    String,
    tokio_util::sync::CancellationToken,
) {
    let sb = perkflow::sandbox::Sandbox::new(perkflow::sandbox::Credentials::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(perkflow::sandbox::serve(sb.clone(), listener, stop.clone()));
    (sb, url, stop)
}
