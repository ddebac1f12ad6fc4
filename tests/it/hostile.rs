//! Hostile input: oversized bodies and headers, slow clients, invalid UTF-8, deeply nested
//! JSON, templates that loop or explode, a full disk. Each gets a clear error or a 4xx/503,
//! nothing is stored half-way, the daemon does not crash and keeps serving the other sources.

use crate::helpers::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "hostile-test-admin-token";
const SHOP: &str = "shop-secret";
const STRIPE: &str = "whsec_hostile";
const STRIPE_ID: &str = "evt_1QpGa6Pf7TeSt0AcXn3Ko5Pw";

fn config(extra: &str) -> String {
    format!(
        "admin_token: {ADMIN}\nsources:\n  shop: {{ connector: shopify, secret: {SHOP} }}\n  stripe: {{ connector: stripe, secret: {STRIPE} }}\n{extra}"
    )
}

/// `body` as a Shopify webhook with event id `id`, correctly signed.
fn shop(id: &str, body: Vec<u8>) -> Signed {
    let (_, headers) =
        perkflow::sign::read_fixture(&repo("fixtures/shopify/orders-paid.json")).unwrap();
    sign_body("shopify", body, headers, &keys(&[SHOP]), "", 0).set("X-Shopify-Event-Id", id)
}

/// A JSON body of about `size` bytes.
fn padded(size: usize) -> Vec<u8> {
    format!(
        "{{\"id\":1,\"pad\":\"{}\"}}",
        "x".repeat(size.saturating_sub(20))
    )
    .into_bytes()
}

/// Stripe's fixture with event id variant `n` and its body passed through `edit`, signed now.
fn stripe_with(n: &str, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) -> Signed {
    let (body, headers) =
        perkflow::sign::read_fixture(&repo("fixtures/stripe/invoice-paid.json")).unwrap();
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains(STRIPE_ID));
    let body = text
        .replacen(STRIPE_ID, &format!("{STRIPE_ID}-{n}"), 1)
        .into_bytes();
    sign_body(
        "stripe",
        edit(body),
        headers,
        &keys(&[STRIPE]),
        "",
        now_unix(),
    )
}

/// The ids of every stored event (the admin API).
async fn stored(d: &Daemon) -> Vec<String> {
    let a = send(
        client()
            .get(d.url("/api/events?limit=500"))
            .bearer_auth(ADMIN),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

/// The daemon is alive and serves the other source: `/healthz` answers 200 and a fresh
/// signed Stripe webhook is stored (200, not a duplicate). Returns its event id.
async fn still_serving(d: &Daemon, n: &str) -> String {
    let c = client();
    assert_eq!(get(&c, &d.url("/healthz")).await.status, 200, "{}", d.log());
    let a = post(&c, &d.url("/hooks/stripe"), &stripe_with(n, |b| b)).await;
    assert_eq!(a.status, 200, "{}\n{}", a.body, d.log());
    assert_eq!(a.json()["duplicate"], false);
    a.json()["id"].as_str().unwrap().to_string()
}

fn addr(d: &Daemon) -> String {
    d.base.trim_start_matches("http://").to_string()
}

/// Sends `head` and then `body` in `chunk`-byte pieces on a new connection; returns what the
/// server answered before it closed (write errors are expected once it answers early).
async fn raw(d: &Daemon, head: &str, body: &[u8], chunk: usize) -> String {
    let mut s = TcpStream::connect(addr(d)).await.unwrap();
    let _ = s.write_all(head.as_bytes()).await;
    for piece in body.chunks(chunk.max(1)) {
        if s.write_all(piece).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `req` to `/hooks/shop` with `Transfer-Encoding: chunked`, in `chunk`-byte chunks: the
/// head and the encoded body.
fn chunked_request(d: &Daemon, req: &Signed, chunk: usize) -> (String, Vec<u8>) {
    let mut head = format!("POST /hooks/shop HTTP/1.1\r\nHost: {}\r\n", addr(d));
    for (k, v) in &req.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    let mut body = Vec::new();
    for piece in req.body.chunks(chunk) {
        body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        body.extend_from_slice(piece);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    (head, body)
}

#[tokio::test]
async fn oversized_bodies_and_headers_are_refused_and_nothing_is_stored() {
    let d = Daemon::start(&config("max_body: 64KiB\n"));
    let c = client();
    let url = d.url("/hooks/shop");
    // Correctly signed, over the limit: 413 on the declared length.
    let big = shop("big-1", padded(70 * 1024));
    let a = post(&c, &url, &big).await;
    assert_eq!(a.status, 413, "{}", a.body);
    // The same without a Content-Length (chunked): cut off while reading, 413.
    let (head, chunked) = chunked_request(&d, &big, 8192);
    let answer = raw(&d, &head, &chunked, 8192).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    // Within the limit, in many chunks arriving apart: joined byte-exact (the signature
    // verifies) and stored.
    let fits = shop("chunked-fits", padded(20 * 1024));
    let (head, chunked) = chunked_request(&d, &fits, 3000);
    let answer = raw(&d, &head, &chunked, 1000).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let fits_id = answer
        .split("\"id\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();

    // One huge header (100 KiB > 64 KiB): 431 where hyper can still answer, else closed.
    let huge = format!(
        "POST /hooks/shop HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        "a".repeat(100 * 1024)
    );
    let answer = raw(&d, &huge, b"", 1).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer:?}"
    );
    // Very many small headers (500, each a few bytes): 431.
    let mut many = String::from("POST /hooks/shop HTTP/1.1\r\nHost: x\r\n");
    for i in 0..500 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("Content-Length: 2\r\n\r\n{}");
    let answer = raw(&d, &many, b"", 1).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    // The daemon serves the other source, and only that event was stored.
    let ok = still_serving(&d, "after-oversized").await;
    assert_eq!(stored(&d).await, vec![ok, fits_id], "newest first");
}

/// What one slow connection sends: a prefix at once, then one byte every 100 ms forever.
#[derive(Clone, Copy)]
enum Slow {
    /// Connects and sends nothing.
    Silent,
    /// Request line and headers a byte at a time, never ending them.
    Headers,
    /// Complete headers declaring a 100 KB body, then the body a byte at a time.
    Body,
}

/// Runs one slow client until the daemon closes its connection (or `give_up`): how long
/// that took, and what the daemon answered.
async fn slow_client(addr: String, kind: Slow, give_up: Duration) -> (Option<Duration>, String) {
    let start = Instant::now();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let (prefix, drip): (Vec<u8>, &[u8]) = match kind {
        Slow::Silent => (Vec::new(), b""),
        Slow::Headers => (Vec::new(), b"POST /hooks/shop HTTP/1.1\r\nHost: x\r\nX-Slow: "),
        Slow::Body => (
            b"POST /hooks/shop HTTP/1.1\r\nHost: x\r\nX-Shopify-Hmac-Sha256: AAAA\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"pad\":\""
                .to_vec(),
            b"",
        ),
    };
    if s.write_all(&prefix).await.is_err() {
        return (Some(start.elapsed()), String::new());
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut sent = 0usize;
    while start.elapsed() < give_up {
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    Some(start.elapsed()),
                    String::from_utf8_lossy(&answer).into_owned(),
                )
            }
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(_) => {}
        }
        let byte = match kind {
            Slow::Silent => continue,
            Slow::Headers => drip.get(sent).copied().unwrap_or(b'a'),
            Slow::Body => b'x',
        };
        if s.write_all(&[byte]).await.is_err() {
            // Closed while we were writing: read whatever answer came first.
            let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut answer)).await;
            return (
                Some(start.elapsed()),
                String::from_utf8_lossy(&answer).into_owned(),
            );
        }
        sent += 1;
    }
    (None, String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_do_not_hold_up_others() {
    // Short timeouts keep the test short; the defaults are 10 s and 30 s.
    let d = Daemon::start(&config("header_timeout: 2s\nbody_timeout: 3s\n"));
    let give_up = Duration::from_secs(12);
    let mut slow = Vec::new();
    for (kind, n) in [(Slow::Headers, 16), (Slow::Silent, 4), (Slow::Body, 4)] {
        for _ in 0..n {
            slow.push((kind, tokio::spawn(slow_client(addr(&d), kind, give_up))));
        }
    }
    // Meanwhile, webhooks are answered promptly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ok = Vec::new();
    for n in 0..3 {
        let t = Instant::now();
        ok.push(still_serving(&d, &format!("during-slowloris-{n}")).await);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a webhook took {:?} while slow clients were connected",
            t.elapsed()
        );
    }
    // Each slow connection is closed by the daemon once its timeout passes.
    for (kind, task) in slow {
        let (closed, answer) = task.await.unwrap();
        let closed =
            closed.unwrap_or_else(|| panic!("a slow connection was still open after {give_up:?}"));
        match kind {
            Slow::Silent | Slow::Headers => {
                assert!(closed < Duration::from_secs(6), "closed after {closed:?}");
                assert!(
                    answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
                    "{answer:?}"
                );
            }
            Slow::Body => {
                assert!(closed < Duration::from_secs(7), "closed after {closed:?}");
                assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
            }
        }
    }
    // Nothing of the slow requests was stored, and the daemon still serves.
    ok.push(still_serving(&d, "after-slowloris").await);
    let mut got = stored(&d).await;
    got.sort();
    ok.sort();
    assert_eq!(got, ok);
}

#[tokio::test]
async fn invalid_utf8_in_a_signed_body_is_refused_with_a_reason() {
    let d = Daemon::start(&config(""));
    let c = client();
    // Shopify names the event in headers: the body is only checked for being JSON.
    let bad = b"{\"id\":1,\"email\":\"\xff\xfe@example.com\"}".to_vec();
    let a = post(&c, &d.url("/hooks/shop"), &shop("utf8-1", bad)).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("not JSON"), "{}", a.body);
    // Stripe names it in the body.
    let a = post(
        &c,
        &d.url("/hooks/stripe"),
        &stripe_with("utf8-2", |b| {
            let text = String::from_utf8(b).unwrap();
            let mut b = text
                .replacen("Perkflow Coffee Co.", "Perkflow \u{0}", 1)
                .into_bytes();
            let at = b.iter().position(|&x| x == 0).unwrap();
            b[at] = 0xc3; // a lead byte without its continuation
            b
        }),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("not JSON"), "{}", a.body);
    assert!(
        d.log().contains("not JSON"),
        "no reason in the log:\n{}",
        d.log()
    );
    let ok = still_serving(&d, "after-utf8").await;
    assert_eq!(stored(&d).await, vec![ok]);
}

#[tokio::test]
async fn deeply_nested_json_is_refused_without_a_stack_overflow() {
    let d = Daemon::start(&config(""));
    let c = client();
    let deep = |open: &str| open.repeat(100_000).into_bytes();
    for (n, body) in [deep("["), deep("{\"a\":")].into_iter().enumerate() {
        let a = post(&c, &d.url("/hooks/shop"), &shop(&format!("deep-{n}"), body)).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(a.body.contains("recursion limit"), "{}", a.body);
    }
    // Nested inside a body whose ids are fine.
    let a = post(
        &c,
        &d.url("/hooks/stripe"),
        &stripe_with("deep-2", |b| {
            let text = String::from_utf8(b).unwrap();
            let nest = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
            text.replacen("\"livemode\": false", &format!("\"livemode\": {nest}"), 1)
                .into_bytes()
        }),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    let ok = still_serving(&d, "after-deep").await;
    assert_eq!(stored(&d).await, vec![ok]);
}

/// Pipelines on `shop` whose `set` field loops, explodes or recurses, each with the error its
/// run must fail with, and one that is fine.
const RUNAWAY: &[(&str, &str, &str)] = &[
    (
        "loop",
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "fuel",
    ),
    (
        "huge-range",
        "{% for i in range(100000000) %}x{% endfor %}",
        "too many elements",
    ),
    // `*` multiplies numbers only: no string or list repeated.
    ("repeat", "{{ 'x' * 1000000000 }}", "`*` multiplies numbers"),
    ("list", "{{ [0] * 2000000 }}", "`*` multiplies numbers"),
    (
        "payload-factor",
        "{{ event.email * (event.total_price | int) }}",
        "`*` multiplies numbers",
    ),
    (
        "output",
        "{{ (range(100000) | join) ~ (range(100000) | join) ~ (range(100000) | join) }}!",
        "larger than 1024 KiB",
    ),
    (
        "doubling",
        "{% set a = range(100000) | join %}{% set a = a ~ a ~ a %}{{ a }}!",
        "larger than 1024 KiB",
    ),
    (
        "join",
        "{{ range(100000) | join(range(100000) | join) }}",
        "join",
    ),
    (
        "recursion",
        "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
        "recursion",
    ),
    (
        "indent",
        "{{ event.email | indent(99999999999) }}",
        "indent",
    ),
];

#[tokio::test]
async fn runaway_templates_fail_their_run_cleanly_and_the_rest_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("pipelines")).unwrap();
    let pipeline = |name: &str, field: &str| {
        format!(
            "pipeline: {name}\non: {{ source: shop, events: [orders/paid] }}\nsteps:\n  - set:\n      x: {}\n",
            serde_json::to_string(field).unwrap()
        )
    };
    for (name, field, _) in RUNAWAY {
        std::fs::write(
            dir.join(format!("pipelines/{name}.yaml")),
            pipeline(name, field),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("pipelines/fine.yaml"),
        pipeline("fine", "{{ event.email | email }}"),
    )
    .unwrap();
    // They compile, so `perkflow check` accepts them: the limits act when they run.
    std::fs::write(dir.join("perkflow.yaml"), config("")).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(["check", "-c"])
        .arg(dir.join("perkflow.yaml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let d = Daemon::start_in(dir, &config("")).unwrap();
    let c = client();
    let req = sign_fixture("shopify", "shopify/orders-paid.json", &keys(&[SHOP]), "", 0);
    let started = Instant::now();
    let id = stored_id(&c, &d.url("/hooks/shop"), &req).await;
    // The worker runs every pipeline on it; wait (bounded) until it has.
    let ev = loop {
        let a = send(
            c.get(d.url(&format!("/api/events/{id}")))
                .bearer_auth(ADMIN),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        let ev = a.json();
        if ev["pending"] == false {
            break ev;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the runs did not finish:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let runs = ev["trace"]["runs"]
        .as_array()
        .or_else(|| ev["trace"].as_array())
        .unwrap_or_else(|| panic!("no runs in {}", ev["trace"]))
        .clone();
    let run = |name: &str| {
        runs.iter()
            .find(|r| r["pipeline"] == name)
            .unwrap_or_else(|| panic!("no run of {name} in {runs:?}"))
            .clone()
    };
    for (name, _, want) in RUNAWAY {
        let r = run(name);
        let text = r.to_string();
        assert!(text.contains("failed"), "{name}: {r}");
        assert!(text.contains(want), "{name}: expected `{want}` in {r}");
    }
    assert!(
        !run("fine").to_string().contains("failed"),
        "{}",
        run("fine")
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "runaway templates took {:?}",
        started.elapsed()
    );
    // The daemon keeps serving.
    let ok = still_serving(&d, "after-runaway").await;
    let mut got = stored(&d).await;
    got.sort();
    let mut want = vec![id, ok];
    want.sort();
    assert_eq!(got, want);
}

/// A small filesystem for the data dir: an 8 MiB tmpfs where we may mount one (root), else
/// a file size limit on the daemon (`RLIMIT_FSIZE`, with SIGXFSZ ignored so writes fail with
/// EFBIG instead of killing it). `PERKFLOW_TEST_DISK=fsize` forces the second.
enum SmallDisk {
    Tmpfs(std::path::PathBuf),
    FileSizeLimit(u64),
}

impl SmallDisk {
    fn new(dir: &std::path::Path) -> SmallDisk {
        let forced = std::env::var("PERKFLOW_TEST_DISK").is_ok_and(|v| v == "fsize");
        let mounted = !forced
            && std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
                .arg(dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if mounted {
            SmallDisk::Tmpfs(dir.to_path_buf())
        } else {
            SmallDisk::FileSizeLimit(4 << 20)
        }
    }

    /// Makes room again (a bigger tmpfs; the limit only ever applied to the daemon).
    fn grow(&self) {
        if let SmallDisk::Tmpfs(dir) = self {
            let ok = std::process::Command::new("mount")
                .args(["-o", "remount,size=256m"])
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot grow the tmpfs");
        }
    }

    fn apply(&self, cmd: &mut std::process::Command) {
        if let SmallDisk::FileSizeLimit(bytes) = *self {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                        return Err(std::io::Error::last_os_error());
                    }
                    let lim = libc::rlimit {
                        rlim_cur: bytes as libc::rlim_t,
                        rlim_max: bytes as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let SmallDisk::Tmpfs(dir) = self {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&*dir)
                .status();
        }
    }
}

#[tokio::test]
async fn a_full_disk_gets_503_and_never_a_2xx_for_an_unstored_event() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let disk = SmallDisk::new(&data);
    let cfg = config(&format!("max_body: 256KiB\ndata_dir: {}\n", data.display()));
    let mut d = Daemon::start_in_with(tmp.path(), &cfg, |cmd| disk.apply(cmd)).unwrap();
    let c = client();
    let started = Instant::now();
    let mut acked: Vec<String> = Vec::new();
    let mut refused = 0;
    let mut n = 0;
    // Fill it: 200 KiB webhooks until several in a row are refused (bounded in count and time).
    while refused < 5 && n < 400 && started.elapsed() < Duration::from_secs(12) {
        n += 1;
        let vendor_id = format!("disk-{n}");
        let a = post(
            &c,
            &d.url("/hooks/shop"),
            &shop(&vendor_id, padded(200 * 1024)),
        )
        .await;
        match a.status {
            200 => {
                acked.push(vendor_id);
                refused = 0;
            }
            503 => {
                assert!(
                    a.headers.contains_key("retry-after"),
                    "503 without Retry-After"
                );
                refused += 1;
            }
            other => panic!("webhook {n}: {other} {}\n{}", a.body, d.log()),
        }
    }
    assert!(
        refused >= 5,
        "the disk never filled ({n} webhooks, {} acknowledged)",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "nothing was stored before the disk filled"
    );
    eprintln!(
        "{}: {} of {n} webhooks acknowledged before the disk was full",
        match disk {
            SmallDisk::Tmpfs(_) => "tmpfs",
            SmallDisk::FileSizeLimit(_) => "RLIMIT_FSIZE",
        },
        acked.len()
    );
    // Still alive: liveness answers, readiness may say not ready, the other source is told
    // to retry (or stored, if a checkpoint freed room meanwhile).
    assert_eq!(get(&c, &d.url("/healthz")).await.status, 200, "{}", d.log());
    let ready = get(&c, &d.url("/readyz")).await.status;
    assert!(ready == 200 || ready == 503, "readyz {ready}");
    let other = post(
        &c,
        &d.url("/hooks/stripe"),
        &stripe_with("full-disk", |b| b),
    )
    .await;
    assert!(
        other.status == 200 || other.status == 503,
        "{} {}",
        other.status,
        other.body
    );
    assert!(
        !d.log().contains("panicked"),
        "the daemon panicked:\n{}",
        d.log()
    );
    // Every acknowledged event survives a kill -9: open the store with room to spare.
    d.kill9();
    disk.grow();
    let kept: std::collections::HashSet<String> = stored_events(&data)
        .into_iter()
        .map(|(_, vendor_id, _)| vendor_id)
        .collect();
    for id in &acked {
        assert!(kept.contains(id), "{id} was acknowledged but is not stored");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Bodies of the other routes (the status page's login, the admin and member APIs) are
/// bounded too, before any credential is checked: a huge one is refused at once, and one
/// that trickles in is cut off (the connection does not stay held).
#[tokio::test]
async fn other_routes_bound_their_bodies_in_size_and_time() {
    let d = Daemon::start(&config(""));
    let c = client();
    let huge = send(
        c.post(d.url("/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={}", "a".repeat(1 << 20))),
    )
    .await;
    assert_eq!(huge.status, 413, "{}", huge.body);
    // Chunked, no Content-Length: cut off while reading.
    let head = format!(
        "POST /login HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        addr(&d)
    );
    let mut chunked = Vec::new();
    for _ in 0..40 {
        chunked.extend_from_slice(format!("{:x}\r\n", 4096).as_bytes());
        chunked.extend_from_slice(&[b'a'; 4096]);
        chunked.extend_from_slice(b"\r\n");
    }
    let answer = raw(&d, &head, &chunked, 4096).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    // A trickle to the member API, with no key at all: 408 within the body time.
    let started = Instant::now();
    let mut s = TcpStream::connect(addr(&d)).await.unwrap();
    s.write_all(
        format!(
            "POST /api/members/m1/redeem HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 16000\r\n\r\n{{",
            addr(&d)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if s.write_all(b" ").await.is_err() {
                break;
            }
            let mut buf = [0u8; 512];
            match tokio::time::timeout(Duration::from_millis(10), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    out.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(_) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "still held after {:?}", started.elapsed());
    let answer = String::from_utf8_lossy(&out);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // Normal requests still work.
    let ok = send(c.get(d.url("/api/events")).bearer_auth(ADMIN)).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // Wrong sign-ins: each refused and counted, but the log takes at most 10 a minute.
    for _ in 0..30 {
        let a = send(
            c.post(d.url("/login"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("token=guess"),
        )
        .await;
        assert_eq!(a.status, 401);
    }
    let logged = d.log().matches("sign-in with a wrong token").count();
    assert!((1..=10).contains(&logged), "{logged} lines");
    let m = get(&c, &d.url("/metrics")).await.body;
    assert!(
        m.contains("perkflow_status_page_failed_sign_ins_total 30"),
        "{m}"
    );
}
