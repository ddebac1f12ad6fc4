//! Crash safety of the inbox, against the daemon as a real process:
//!
//! - `kill -9` while 32 senders are mid-stream, restart on the same data dir: every webhook
//!   that got a 2xx is stored exactly once (with the id it was answered with), de-duplication
//!   survives the crash, and the daemon starts cleanly.
//! - SIGTERM while 32 senders are mid-stream: every webhook answered 200 is stored and the
//!   daemon exits successfully.

use crate::helpers::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "crash-secret";
const CONFIG: &str =
    "durability: fsync\nsources:\n  shop: { connector: shopify, secret: crash-secret }\n";
const EVENT_ID_HEADER: &str = "X-Shopify-Event-Id";
const CONCURRENCY: usize = 32;

/// The Shopify fixture, signed once: Shopify signs only the body, so each request differs
/// from it only by its `X-Shopify-Event-Id`.
fn template() -> Signed {
    let (body, headers) =
        perkflow::sign::read_fixture(&repo("fixtures/shopify/orders-paid.json")).expect("fixture");
    sign_body("shopify", body, headers, &keys(&[SECRET]), "", now_unix())
}

fn request(template: &Signed, vendor_id: &str) -> Signed {
    template.clone().set(EVENT_ID_HEADER, vendor_id)
}

/// What happened to one request.
#[derive(Debug, Clone)]
enum Outcome {
    /// Never taken by a sender.
    NotSent,
    /// 200 with this event id.
    Acked { id: String, duplicate: bool },
    /// Answered, but not 200.
    Status(u16, String),
    /// No answer (connection refused, reset, timeout ...). `after_stop`: the daemon had
    /// already been told to stop (killed or SIGTERM) when the failure was seen.
    Failed {
        error: String,
        /// The connection was never established (the daemon was already gone).
        connect: bool,
        after_stop: bool,
    },
}

/// One POST that never panics: transport errors are an outcome, not a test failure.
async fn send(
    c: &reqwest::Client,
    url: &str,
    req: &Signed,
) -> Result<(u16, String), reqwest::Error> {
    let mut r = c.post(url).body(req.body.clone());
    for (k, v) in &req.headers {
        r = r.header(k.as_str(), v.as_str());
    }
    let resp = r.send().await?;
    let status = resp.status().as_u16();
    let body = resp.text().await?;
    Ok((status, body))
}

/// `concurrency` senders sharing one counter over indices `0..n`, vendor ids `{tag}-{i}`.
struct Fleet {
    n: usize,
    tag: &'static str,
    next: AtomicUsize,
    /// Requests that got any HTTP answer.
    answered: AtomicUsize,
    /// Requests sent and not yet answered or failed.
    in_flight: AtomicUsize,
    /// Set just before the daemon is killed / told to stop.
    stopped: AtomicBool,
    /// 200s that arrived after `stopped` was set.
    acked_after_stop: AtomicUsize,
    outcomes: Mutex<Vec<Outcome>>,
}

impl Fleet {
    fn vendor_id(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }

    fn start(
        base: &str,
        tag: &'static str,
        n: usize,
        concurrency: usize,
    ) -> (Arc<Fleet>, Vec<tokio::task::JoinHandle<()>>) {
        let fleet = Arc::new(Fleet {
            n,
            tag,
            next: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            acked_after_stop: AtomicUsize::new(0),
            outcomes: Mutex::new(vec![Outcome::NotSent; n]),
        });
        let template = Arc::new(template());
        let url = format!("{base}/hooks/shop");
        let c = client();
        let workers = (0..concurrency)
            .map(|_| {
                let (fleet, template, url, c) =
                    (fleet.clone(), template.clone(), url.clone(), c.clone());
                tokio::spawn(async move {
                    loop {
                        let i = fleet.next.fetch_add(1, Ordering::SeqCst);
                        if i >= fleet.n {
                            break;
                        }
                        let req = request(&template, &fleet.vendor_id(i));
                        fleet.in_flight.fetch_add(1, Ordering::SeqCst);
                        let result = send(&c, &url, &req).await;
                        fleet.in_flight.fetch_sub(1, Ordering::SeqCst);
                        let after_stop = fleet.stopped.load(Ordering::SeqCst);
                        let outcome = match result {
                            Ok((200, body)) => {
                                let v: serde_json::Value = serde_json::from_str(&body)
                                    .unwrap_or_else(|e| panic!("200 not JSON ({e}): {body:?}"));
                                if after_stop {
                                    fleet.acked_after_stop.fetch_add(1, Ordering::SeqCst);
                                }
                                Outcome::Acked {
                                    id: v["id"].as_str().expect("id").to_string(),
                                    duplicate: v["duplicate"].as_bool().expect("duplicate"),
                                }
                            }
                            Ok((status, body)) => Outcome::Status(status, body),
                            Err(e) => Outcome::Failed {
                                error: format!("{e:?}"),
                                connect: e.is_connect(),
                                after_stop,
                            },
                        };
                        if !matches!(outcome, Outcome::Failed { .. }) {
                            fleet.answered.fetch_add(1, Ordering::SeqCst);
                        }
                        fleet.outcomes.lock().unwrap()[i] = outcome;
                    }
                })
            })
            .collect();
        (fleet, workers)
    }

    /// Waits (bounded) until `count` requests were answered; false if the senders ran out
    /// of work or time first.
    async fn wait_answered(&self, count: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.answered.load(Ordering::SeqCst) >= count {
                return true;
            }
            if self.next.load(Ordering::SeqCst) >= self.n
                && self.in_flight.load(Ordering::SeqCst) == 0
            {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        false
    }

    fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }
}

/// The senders' outcomes, checked: nothing failed before the stop, every answer was a 200,
/// and the stop cut off at least one request.
struct Tally {
    /// No answer: cut off mid-request (the connection was up).
    cut_off: usize,
    /// No answer: the connection was refused (the daemon was gone).
    refused: usize,
}

impl Tally {
    fn check(outcomes: &[Outcome], log: &str) -> Tally {
        let mut t = Tally {
            cut_off: 0,
            refused: 0,
        };
        let mut problems = Vec::new();
        let mut first_error = None;
        for (i, o) in outcomes.iter().enumerate() {
            match o {
                Outcome::Status(status, body) => problems.push(format!("#{i}: {status} {body}")),
                Outcome::Failed {
                    error,
                    after_stop: false,
                    ..
                } => problems.push(format!("#{i} failed before the stop: {error}")),
                Outcome::Failed { error, connect, .. } => {
                    first_error.get_or_insert_with(|| error.clone());
                    if *connect {
                        t.refused += 1;
                    } else {
                        t.cut_off += 1;
                    }
                }
                Outcome::Acked { .. } | Outcome::NotSent => {}
            }
        }
        assert!(
            problems.is_empty(),
            "{} unexpected outcomes, e.g. {:?}\n{log}",
            problems.len(),
            &problems[..problems.len().min(5)]
        );
        assert!(
            t.failed() > 0,
            "every request was answered: the stop did not interrupt the stream (raise N or stop earlier)"
        );
        eprintln!(
            "first failure after the stop: {}",
            first_error.unwrap_or_default()
        );
        t
    }

    fn failed(&self) -> usize {
        self.cut_off + self.refused
    }
}

/// Polls `/readyz` until 200 (bounded).
async fn wait_ready(d: &Daemon) {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        match c.get(d.url("/readyz")).send().await {
            Ok(r) if r.status() == 200 => return,
            Ok(r) => last = format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => last = format!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("daemon never became ready: {last}\n{}", d.log());
}

/// Stored events of source `shop` by vendor id, after the daemon stopped.
fn stored_by_vendor(data_dir: &Path) -> (usize, HashMap<String, Vec<String>>) {
    let all = stored_events(data_dir);
    let mut by_vendor: HashMap<String, Vec<String>> = HashMap::new();
    for (source, vendor, id) in &all {
        assert_eq!(source, "shop", "unexpected source for {vendor} {id}");
        by_vendor
            .entry(vendor.clone())
            .or_default()
            .push(id.clone());
    }
    (all.len(), by_vendor)
}

/// Asserts the inbox invariants common to both tests; returns (acked, stored-but-unacked).
fn check_stored(
    fleet: &Fleet,
    outcomes: &[Outcome],
    stored: &HashMap<String, Vec<String>>,
    extra: &[&str],
) -> (usize, usize) {
    let dups: Vec<_> = stored.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(
        dups.is_empty(),
        "vendor ids stored more than once: {dups:?}"
    );
    let mut acked = 0;
    let mut lost = Vec::new();
    let mut stored_unacked = 0;
    for (i, o) in outcomes.iter().enumerate() {
        let vendor = fleet.vendor_id(i);
        let got = stored.get(&vendor);
        match o {
            Outcome::Acked { id, duplicate } => {
                acked += 1;
                assert!(
                    !duplicate,
                    "{vendor}: first delivery answered as a duplicate"
                );
                match got {
                    Some(ids) if ids == std::slice::from_ref(id) => {}
                    other => lost.push(format!("{vendor}: answered {id}, stored {other:?}")),
                }
            }
            Outcome::Failed { .. } => stored_unacked += usize::from(got.is_some()),
            Outcome::NotSent | Outcome::Status(..) => assert!(
                got.is_none(),
                "{vendor} was never accepted ({o:?}) but is stored as {got:?}"
            ),
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged webhooks are missing or changed, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let known = |v: &str| {
        extra.contains(&v)
            || v.strip_prefix(fleet.tag)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.parse::<usize>().ok())
                .is_some_and(|i| i < fleet.n)
    };
    let strangers: Vec<_> = stored.keys().filter(|v| !known(v)).collect();
    assert!(
        strangers.is_empty(),
        "stored events nobody sent: {strangers:?}"
    );
    (acked, stored_unacked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_loses_no_acknowledged_webhook() {
    const N: usize = 3000;
    // Kill once 2,000 were answered: >= 2,000 webhooks reached the live daemon, and ~1,000
    // (about a second of traffic) are still to come, so the kill lands mid-stream.
    const KILL_AFTER: usize = 2000;
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    tokio::time::timeout(Duration::from_secs(120), async move {
        let mut d = Daemon::start_in(&dir, CONFIG).expect("daemon starts");
        wait_ready(&d).await;

        let (fleet, workers) = Fleet::start(&d.base, "crash", N, CONCURRENCY);
        let reached = fleet
            .wait_answered(KILL_AFTER, Duration::from_secs(60))
            .await;
        assert!(
            reached,
            "only {} of {N} answered before the senders stopped; log:\n{}",
            fleet.answered.load(Ordering::SeqCst),
            d.log()
        );
        fleet.stopped.store(true, Ordering::SeqCst);
        let answered_at_kill = fleet.answered.load(Ordering::SeqCst);
        let in_flight_at_kill = fleet.in_flight.load(Ordering::SeqCst);
        let first_log = d.log();
        d.kill9();
        for w in workers {
            w.await.expect("sender task");
        }
        let outcomes = fleet.outcomes();
        // The kill really interrupted a stream: some requests got no answer.
        let tally = Tally::check(&outcomes, &first_log);
        assert!(answered_at_kill < N, "all {N} answered before the kill");
        let acked_ids: Vec<(usize, String)> = outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                Outcome::Acked { id, .. } => Some((i, id.clone())),
                _ => None,
            })
            .collect();

        // Restart on the same data dir: clean start, dedup survived, new events accepted.
        let mut d = Daemon::start_in(&dir, CONFIG)
            .unwrap_or_else(|e| panic!("daemon did not restart after kill -9: {e}"));
        wait_ready(&d).await;
        let c = client();
        let url = d.url("/hooks/shop");
        let t = template();
        let probes = [
            acked_ids.first().unwrap(),
            &acked_ids[acked_ids.len() / 2],
            acked_ids.last().unwrap(),
        ];
        for (i, id) in probes {
            let a = post(&c, &url, &request(&t, &fleet.vendor_id(*i))).await;
            assert_eq!(a.status, 200, "re-delivery of crash-{i}: {}", a.body);
            assert_eq!(a.json()["duplicate"], true, "crash-{i} after restart: {}", a.body);
            assert_eq!(a.json()["id"], id.as_str(), "crash-{i} after restart");
        }
        let a = post(&c, &url, &request(&t, "crash-new")).await;
        assert_eq!(a.status, 200, "new event after restart: {}", a.body);
        assert_eq!(a.json()["duplicate"], false, "{}", a.body);
        let new_id = a.json()["id"].as_str().unwrap().to_string();
        let status = d.terminate();
        let second_log = d.log();
        assert!(status.success(), "exit {status:?} after restart\n{second_log}");
        assert!(second_log.contains("stopped cleanly"), "{second_log}");
        assert!(
            !second_log.contains("ERROR") && !second_log.contains("panicked"),
            "restart logged errors:\n{second_log}"
        );

        let (stored_count, stored) = stored_by_vendor(&dir.join("data"));
        assert_eq!(stored.get("crash-new"), Some(&vec![new_id]));
        let (acked, stored_unacked) = check_stored(&fleet, &outcomes, &stored, &["crash-new"]);
        assert!(stored_count > acked, "stored {stored_count} < acked {acked} + 1");
        assert_eq!(stored_count, acked + stored_unacked + 1);
        eprintln!(
            "crash: sent {N}, acked {acked}, stored {stored_count} (1 after restart, {stored_unacked} unacked), \
             lost-unacked {} (cut off {}, refused {}), answered at kill {answered_at_kill}, \
             in flight at kill {in_flight_at_kill}, {:.1} s",
            tally.failed() - stored_unacked,
            tally.cut_off,
            tally.refused,
            started.elapsed().as_secs_f64()
        );
    })
    .await
    .expect("crash test took longer than 120 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_stream_stores_every_acknowledged_webhook() {
    const N: usize = 1500;
    const STOP_AFTER: usize = 500;
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    tokio::time::timeout(Duration::from_secs(120), async move {
        let d = Daemon::start_in(&dir, CONFIG).expect("daemon starts");
        wait_ready(&d).await;
        let (fleet, workers) = Fleet::start(&d.base, "term", N, CONCURRENCY);
        assert!(
            fleet
                .wait_answered(STOP_AFTER, Duration::from_secs(60))
                .await,
            "only {} answered; log:\n{}",
            fleet.answered.load(Ordering::SeqCst),
            d.log()
        );
        fleet.stopped.store(true, Ordering::SeqCst);
        let answered_at_term = fleet.answered.load(Ordering::SeqCst);
        // `terminate` blocks until the exit status (bounded to 20 s); senders keep going.
        let (d, status) = tokio::task::spawn_blocking(move || {
            let mut d = d;
            let s = d.terminate();
            (d, s)
        })
        .await
        .expect("terminate");
        for w in workers {
            w.await.expect("sender task");
        }
        let log = d.log();
        assert!(status.success(), "exit {status:?} after SIGTERM\n{log}");
        assert!(log.contains("stopped cleanly"), "{log}");
        let outcomes = fleet.outcomes();
        let tally = Tally::check(&outcomes, &log);

        let (stored_count, stored) = stored_by_vendor(&dir.join("data"));
        let (acked, stored_unacked) = check_stored(&fleet, &outcomes, &stored, &[]);
        assert_eq!(stored_count, acked + stored_unacked);
        eprintln!(
            "sigterm: sent {N}, acked {acked} ({} after SIGTERM), stored {stored_count} ({stored_unacked} unacked), \
             no answer {} (cut off {}, refused {}), answered at SIGTERM {answered_at_term}, {:.1} s",
            fleet.acked_after_stop.load(Ordering::SeqCst),
            tally.failed(),
            tally.cut_off,
            tally.refused,
            started.elapsed().as_secs_f64()
        );
    })
    .await
    .expect("SIGTERM test took longer than 120 s");
}
