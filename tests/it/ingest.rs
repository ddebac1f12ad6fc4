//! `POST /hooks/{source}` for each of the six sources: valid, tampered body, wrong secret,
//! missing header, stale timestamp (Stripe), duplicate, rotated secret; plus the edge cases
//! every source shares (404, 413, ping, forged ids not blocking genuine ones).

use crate::helpers::*;
use perkflow::sign::SignKeys;

const PAYPAL_CERT_URL: &str =
    "https://api.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-7a8abba8";

/// How to give a fixture a fresh vendor event id, so one daemon can accept several variants.
enum IdAt {
    Header(&'static str),
    /// A JSON string member `"key":"value"` of the body (its value is extended textually,
    /// keeping every other byte).
    Body(&'static str, &'static str),
}

struct Case {
    source: &'static str,
    connector: &'static str,
    fixture: &'static str,
    id_at: IdAt,
    /// The header whose removal must be refused.
    sig_header: &'static str,
}

const CASES: &[Case] = &[
    Case {
        source: "shop",
        connector: "shopify",
        fixture: "shopify/orders-paid.json",
        id_at: IdAt::Header("X-Shopify-Event-Id"),
        sig_header: "X-Shopify-Hmac-Sha256",
    },
    Case {
        source: "woo",
        connector: "woocommerce",
        fixture: "woocommerce/order-updated-completed.json",
        id_at: IdAt::Body("date_modified_gmt", "2026-11-20T10:15:30"),
        sig_header: "X-WC-Webhook-Signature",
    },
    Case {
        source: "stripe",
        connector: "stripe",
        fixture: "stripe/invoice-paid.json",
        id_at: IdAt::Body("id", "evt_1QpGa6Pf7TeSt0AcXn3Ko5Pw"),
        sig_header: "Stripe-Signature",
    },
    Case {
        source: "square",
        connector: "square",
        fixture: "square/payment-updated.json",
        id_at: IdAt::Body("event_id", "6a1c2f9e-3b8d-4f57-a0e4-7c2d9b5e1f38"),
        sig_header: "x-square-hmacsha256-signature",
    },
    Case {
        source: "qbo",
        connector: "quickbooks",
        fixture: "quickbooks/cloudevents-payment-created.json",
        id_at: IdAt::Body("id", "f1b3c5d7-2e4a-4c6b-8d0f-1a3b5c7d9e2f"),
        sig_header: "intuit-signature",
    },
];

fn config(extra: &str) -> String {
    let sources = r#"public_url: https://hooks.example.com
sources:
  shop: { connector: shopify, secrets: [old-shop, new-shop] }
  woo: { connector: woocommerce, secrets: [old-woo, new-woo] }
  stripe: { connector: stripe, secrets: [whsec_old, whsec_new] }
  square: { connector: square, secrets: [old-sq, new-sq] }
  qbo: { connector: quickbooks, secrets: [old-qbo, new-qbo] }
"#;
    format!("{sources}{extra}")
}

fn secrets(source: &str) -> (&'static str, &'static str) {
    match source {
        "shop" => ("old-shop", "new-shop"),
        "woo" => ("old-woo", "new-woo"),
        "stripe" => ("whsec_old", "whsec_new"),
        "square" => ("old-sq", "new-sq"),
        _ => ("old-qbo", "new-qbo"),
    }
}

/// The fixture with variant `n` of its event id, signed with `secret`.
fn variant(case: &Case, n: u32, secret: &str, now: i64) -> Signed {
    let (mut body, mut headers) =
        perkflow::sign::read_fixture(&repo(&format!("fixtures/{}", case.fixture))).unwrap();
    match case.id_at {
        IdAt::Header(h) => {
            let v = format!("evt-variant-{n}");
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case(h));
            headers.push((h.to_string(), v));
        }
        IdAt::Body(key, value) => {
            let text = String::from_utf8(body).unwrap();
            let member = [
                format!("\"{key}\":\"{value}\""),
                format!("\"{key}\": \"{value}\""),
            ]
            .into_iter()
            .find(|m| text.contains(m.as_str()))
            .unwrap_or_else(|| panic!("{} has no {key}: {value}", case.fixture));
            let fresh = member.replace(value, &format!("{value}-v{n}"));
            body = text.replacen(&member, &fresh, 1).into_bytes();
        }
    }
    let url = format!("https://hooks.example.com/hooks/{}", case.source);
    sign_body(case.connector, body, headers, &keys(&[secret]), &url, now)
}

#[tokio::test]
async fn every_hmac_source_verifies_dedups_and_rotates() {
    let d = Daemon::start(&config(""));
    let c = client();
    for case in CASES {
        let url = d.url(&format!("/hooks/{}", case.source));
        let (old, new) = secrets(case.source);
        let now = now_unix();
        let ctx = |what: &str| format!("{} ({}): {what}", case.source, case.connector);

        // Valid, with the new secret.
        let req = variant(case, 1, new, now);
        let a = post(&c, &url, &req).await;
        assert_eq!(a.status, 200, "{}: {}", ctx("valid"), a.body);
        let first = a.json();
        assert_eq!(first["duplicate"], false, "{}", ctx("valid"));
        let id = first["id"].as_str().unwrap().to_string();

        // Re-delivery: 200, duplicate, same id.
        let a = post(&c, &url, &req).await;
        assert_eq!(a.status, 200, "{}", ctx("duplicate"));
        assert_eq!(a.json()["duplicate"], true, "{}", ctx("duplicate"));
        assert_eq!(a.json()["id"], id.as_str(), "{}", ctx("duplicate"));

        // Rotation: the old secret is still accepted.
        let a = post(&c, &url, &variant(case, 2, old, now)).await;
        assert_eq!(
            a.status,
            200,
            "{}: {}",
            ctx("old secret during rotation"),
            a.body
        );
        assert_eq!(
            a.json()["duplicate"],
            false,
            "{}",
            ctx("old secret during rotation")
        );

        // Tampered body: one byte changed after signing.
        let mut t = variant(case, 3, new, now);
        let pos = t.body.iter().rposition(|b| b.is_ascii_digit()).unwrap();
        t.body[pos] = if t.body[pos] == b'9' {
            b'8'
        } else {
            t.body[pos] + 1
        };
        let a = post(&c, &url, &t).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (401, ""),
            "{}",
            ctx("tampered")
        );

        // Wrong secret.
        let a = post(&c, &url, &variant(case, 4, "not-the-secret", now)).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (401, ""),
            "{}",
            ctx("wrong secret")
        );

        // Missing signature header.
        let a = post(
            &c,
            &url,
            &variant(case, 5, new, now).without(case.sig_header),
        )
        .await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (401, ""),
            "{}",
            ctx("missing header")
        );

        // A forged request carrying a real event id must not block the genuine one.
        let forged = variant(case, 6, "forger", now);
        assert_eq!(
            post(&c, &url, &forged).await.status,
            401,
            "{}",
            ctx("forged")
        );
        let a = post(&c, &url, &variant(case, 6, new, now)).await;
        assert_eq!(a.status, 200, "{}", ctx("genuine after forged"));
        assert_eq!(
            a.json()["duplicate"],
            false,
            "{}",
            ctx("genuine after forged")
        );
    }
    let mut d = d;
    let data = d.dir.join("data");
    assert!(
        d.terminate().success(),
        "graceful stop failed:\n{}",
        d.log()
    );
    let stored = stored_events(&data);
    // Per source: variants 1, 2 and 6 were accepted; nothing rejected was stored.
    assert_eq!(stored.len(), CASES.len() * 3, "{stored:?}");
    let mut seen = std::collections::HashSet::new();
    for (source, vendor_id, _) in &stored {
        assert!(
            seen.insert((source.clone(), vendor_id.clone())),
            "stored twice: {source} {vendor_id}"
        );
    }
}

#[tokio::test]
async fn stripe_refuses_stale_and_accepts_one_v1_per_secret() {
    let d = Daemon::start(&config(""));
    let c = client();
    let url = d.url("/hooks/stripe");
    let case = &CASES[2];
    let stale = variant(case, 1, "whsec_new", now_unix() - 301);
    let a = post(&c, &url, &stale).await;
    assert_eq!((a.status, a.body.as_str()), (401, ""));
    assert!(d.log().contains("stale"), "reason not logged:\n{}", d.log());
    // A fresh copy of the same event is accepted afterwards (the stale one left no trace).
    let fresh = variant(case, 1, "whsec_new", now_unix());
    assert_eq!(post(&c, &url, &fresh).await.json()["duplicate"], false);
    // During Stripe's own rotation one request carries one v1 per secret.
    let (body, headers) =
        perkflow::sign::read_fixture(&repo("fixtures/stripe/payment-intent-succeeded.json"))
            .unwrap();
    let both = sign_body(
        "stripe",
        body,
        headers,
        &keys(&["whsec_unknown", "whsec_old"]),
        "",
        now_unix(),
    );
    assert!(both
        .headers
        .iter()
        .any(|(_, v)| v.matches("v1=").count() == 2));
    assert_eq!(post(&c, &url, &both).await.status, 200);
}

#[tokio::test]
async fn answers_404_413_and_the_woocommerce_ping_without_storing() {
    let d = Daemon::start(&format!("max_body: 64KiB\n{}", config("")));
    let c = client();
    let a = post(
        &c,
        &d.url("/hooks/nope"),
        &Signed {
            body: b"{}".to_vec(),
            headers: vec![],
        },
    )
    .await;
    assert_eq!(a.status, 404);
    let big = Signed {
        body: vec![b'x'; 70 * 1024],
        headers: vec![],
    };
    assert_eq!(post(&c, &d.url("/hooks/shop"), &big).await.status, 413);
    // A chunked upload without Content-Length is cut off at the limit too.
    assert!(chunked_upload(&d.base, "/hooks/shop", 200 * 1024)
        .await
        .starts_with("HTTP/1.1 413"));
    // A client that writes its whole body before reading the answer (Python's urllib) gets
    // the 413 too, not a reset connection.
    let answer = tokio::task::spawn_blocking({
        let addr = d.base.trim_start_matches("http://").to_string();
        move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let body = vec![b'x'; 3 << 20];
            let head = format!(
                "POST /hooks/shop HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&body).expect("the whole body is taken");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer
        }
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // WooCommerce's creation ping: unsigned form body, answered 200, not stored.
    let (body, headers) =
        perkflow::sign::read_fixture(&repo("fixtures/woocommerce/webhook-ping.form")).unwrap();
    let a = post(&c, &d.url("/hooks/woo"), &Signed { body, headers }).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // The same body on another source is just unsigned: 401.
    let a = post(
        &c,
        &d.url("/hooks/shop"),
        &Signed {
            body: b"webhook_id=17".to_vec(),
            headers: vec![],
        },
    )
    .await;
    assert_eq!(a.status, 401);
    // A verified request without an event id: 400, nothing stored.
    let no_id = sign_fixture(
        "shopify",
        "shopify/orders-paid.json",
        &keys(&["new-shop"]),
        "",
        now_unix(),
    )
    .without("X-Shopify-Event-Id")
    .without("X-Shopify-Webhook-Id");
    assert_eq!(post(&c, &d.url("/hooks/shop"), &no_id).await.status, 400);
    let mut d = d;
    let data = d.dir.join("data");
    assert!(d.terminate().success());
    assert!(stored_events(&data).is_empty());
}

/// The words of a command line as `perkflow sign` prints it (single-quoted, `'\''` inside).
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut in_word) = (Vec::new(), String::new(), false, false);
    for ch in line.chars() {
        match ch {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if !quoted => {}
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Runs `perkflow sign ARGS` (with `stdin` as its input) and sends the request it prints.
async fn signed_by_cli(d: &Daemon, args: &[&str], stdin: Option<&[u8]>) -> Answer {
    use std::io::Write;
    let config = d.dir.join("perkflow.yaml");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .arg("sign")
        .args(args)
        .args(["-c", config.to_str().unwrap(), "--url", &d.base])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let words = shell_words(line.trim_end());
    assert_eq!(words[..4], ["curl", "-sS", "-X", "POST"], "{line}");
    let mut r = client().post(&words[4]);
    let mut rest = words[5..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().unwrap();
        match flag.as_str() {
            "-H" => {
                let (k, v) = value.split_once(": ").unwrap();
                r = r.header(k, v);
            }
            "--data-binary" => {
                r = r.body(match value.strip_prefix('@') {
                    Some(file) => std::fs::read(file).unwrap(),
                    None => value.clone().into_bytes(),
                })
            }
            other => panic!("unexpected {other} in {line}"),
        }
    }
    send(r).await
}

/// `perkflow sign` prints a request the daemon accepts: a fixture with its headers file, a
/// header given on the command line, and a body from standard input.
#[tokio::test]
async fn the_sign_command_prints_requests_the_daemon_accepts() {
    let d = Daemon::start(&config(""));
    let fixture = repo("fixtures/shopify/orders-paid.json");
    let fixture = fixture.to_str().unwrap();
    let a = signed_by_cli(&d, &["shop", fixture], None).await;
    assert_eq!(
        (a.status, a.json()["duplicate"].clone()),
        (200, false.into()),
        "{}",
        a.body
    );
    let a = signed_by_cli(&d, &["shop", fixture], None).await;
    assert_eq!(a.json()["duplicate"], true, "{}", a.body);
    let a = signed_by_cli(
        &d,
        &[
            "shop",
            fixture,
            "--header",
            "X-Shopify-Event-Id: from-the-cli",
        ],
        None,
    )
    .await;
    assert_eq!(a.json()["duplicate"], false, "another event id: {}", a.body);
    // From standard input, with one of the rotated secrets given explicitly.
    let body = std::fs::read(repo("fixtures/stripe/invoice-paid.json")).unwrap();
    let a = signed_by_cli(
        &d,
        &[
            "stripe",
            "--secret",
            "whsec_old",
            "--header",
            "Content-Type: application/json",
        ],
        Some(&body),
    )
    .await;
    assert_eq!(
        (a.status, a.json()["duplicate"].clone()),
        (200, false.into()),
        "{}",
        a.body
    );
    // A wrong secret signs a request the daemon refuses.
    let a = signed_by_cli(&d, &["stripe", "--secret", "whsec_nope"], Some(&body)).await;
    assert_eq!(a.status, 401);
}

/// WooCommerce's deleted-resource (`{"id"}`) and action-topic (`{"action","arg"}`) bodies
/// are stored once each (WooCommerce disables a webhook whose deliveries keep failing).
#[tokio::test]
async fn woocommerce_deleted_and_action_topics_are_stored_once() {
    let mut d = Daemon::start(&config(""));
    let c = client();
    let send = |topic: &str, body: &str| {
        let headers = vec![
            ("Content-Type".to_string(), "application/json".to_string()),
            ("X-WC-Webhook-Topic".to_string(), topic.to_string()),
            (
                "X-WC-Webhook-Delivery-ID".to_string(),
                format!("{topic}-{}", body.len()),
            ),
        ];
        sign_body(
            "woocommerce",
            body.as_bytes().to_vec(),
            headers,
            &keys(&["new-woo"]),
            "",
            0,
        )
    };
    let deleted = send("order.deleted", r#"{"id":727}"#);
    let action = send(
        "action.woocommerce_order_status_completed",
        r#"{"action":"woocommerce_order_status_completed","arg":727}"#,
    );
    for req in [&deleted, &action] {
        let a = post(&c, &d.url("/hooks/woo"), req).await;
        assert_eq!(
            (a.status, a.json()["duplicate"].clone()),
            (200, false.into()),
            "{}",
            a.body
        );
        let again = post(&c, &d.url("/hooks/woo"), req).await;
        assert_eq!(again.json()["duplicate"], true, "{}", again.body);
    }
    let data = d.dir.join("data");
    assert!(d.terminate().success());
    let mut stored: Vec<(String, String)> = stored_events(&data)
        .into_iter()
        .map(|(source, vendor_id, _)| (source, vendor_id))
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        [
            (
                "woo".into(),
                "action.woocommerce_order_status_completed:727".into()
            ),
            ("woo".into(), "order.deleted:727".into()),
        ]
    );
}

/// Sends `size` bytes with `Transfer-Encoding: chunked` on a raw socket and returns what the
/// server answered (it may answer before the upload ends; write errors are expected then).
async fn chunked_upload(base: &str, path: &str, size: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'y'; 8192];
    for _ in 0..size / chunk.len() {
        let frame = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        if s.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn square_signs_the_configured_url() {
    // `url:` overrides public_url + path.
    let cfg = "sources:\n  square: { connector: square, secret: k, url: \"https://proxy.example.com/sq?x=1\" }\n";
    let d = Daemon::start(cfg);
    let c = client();
    let right = sign_fixture(
        "square",
        "square/payment-updated.json",
        &keys(&["k"]),
        "https://proxy.example.com/sq?x=1",
        0,
    );
    let wrong = sign_fixture(
        "square",
        "square/payment-updated.json",
        &keys(&["k"]),
        "https://hooks.example.com/hooks/square",
        0,
    );
    assert_eq!(post(&c, &d.url("/hooks/square"), &wrong).await.status, 401);
    assert_eq!(post(&c, &d.url("/hooks/square"), &right).await.status, 200);
}

#[tokio::test]
async fn quickbooks_batches_and_legacy_payloads_are_split_per_entity() {
    let d = Daemon::start(&config(""));
    let c = client();
    let url = d.url("/hooks/qbo");
    let batch = sign_fixture(
        "quickbooks",
        "quickbooks/cloudevents-batch.json",
        &keys(&["new-qbo"]),
        "",
        0,
    );
    let a = post(&c, &url, &batch).await.json();
    assert_eq!(a["events"].as_array().map(Vec::len), Some(2), "{a}");
    let legacy = sign_fixture(
        "quickbooks",
        "quickbooks/legacy-invoice.json",
        &keys(&["old-qbo"]),
        "",
        0,
    );
    let a = post(&c, &url, &legacy).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(post(&c, &url, &legacy).await.json()["duplicate"], true);
    let mut d = d;
    let data = d.dir.join("data");
    assert!(d.terminate().success());
    let stored = stored_events(&data);
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert!(stored.iter().any(|(_, v, _)| v == "9341453172471531:Invoice:240611:Update:2026-11-20T10:15:30.000Z"), "{stored:?}");
}

fn paypal_keys(key: &str) -> SignKeys {
    SignKeys {
        paypal_key_pem: Some(std::fs::read(repo(&format!("fixtures/paypal/pki/{key}"))).unwrap()),
        webhook_id: Some("WH-TEST".into()),
        ..Default::default()
    }
}

fn paypal_config(chain: &str, extra_hosts: &str) -> String {
    format!(
        "sources:\n  paypal:\n    connector: paypal\n    webhook_id: WH-TEST\n    ca_file: {root}\n    cert_hosts: [api.paypal.com{extra_hosts}]\n    cert_pins:\n      \"{PAYPAL_CERT_URL}\": {chain}\n",
        root = repo("fixtures/paypal/pki/root-ca.pem").display(),
        chain = repo(&format!("fixtures/paypal/pki/{chain}")).display(),
    )
}

#[tokio::test]
async fn paypal_cert_verification() {
    let d = Daemon::start(&paypal_config("chain.pem", ""));
    let c = client();
    let url = d.url("/hooks/paypal");
    let good = sign_fixture(
        "paypal",
        "paypal/payment-capture-completed.json",
        &paypal_keys("leaf.key"),
        "",
        0,
    );
    let a = post(&c, &url, &good).await;
    assert_eq!(a.status, 200, "{}\n{}", a.body, d.log());
    assert_eq!(post(&c, &url, &good).await.json()["duplicate"], true);
    let mut tampered = sign_fixture(
        "paypal",
        "paypal/payment-sale-completed.json",
        &paypal_keys("leaf.key"),
        "",
        0,
    );
    tampered.body.push(b' ');
    assert_eq!(post(&c, &url, &tampered).await.status, 401);
    // Signed by a key that is not the pinned certificate's.
    let wrong = sign_fixture(
        "paypal",
        "paypal/payment-sale-completed.json",
        &paypal_keys("untrusted-leaf.key"),
        "",
        0,
    );
    assert_eq!(post(&c, &url, &wrong).await.status, 401);
    let missing = sign_fixture(
        "paypal",
        "paypal/payment-sale-completed.json",
        &paypal_keys("leaf.key"),
        "",
        0,
    )
    .without("PAYPAL-TRANSMISSION-SIG");
    assert_eq!(post(&c, &url, &missing).await.status, 401);
    // Signed for another webhook id.
    let mut other = paypal_keys("leaf.key");
    other.webhook_id = Some("WH-SOMEONE-ELSE".into());
    let other = sign_fixture(
        "paypal",
        "paypal/payment-sale-completed.json",
        &other,
        "",
        0,
    );
    assert_eq!(post(&c, &url, &other).await.status, 401);
    let sale = sign_fixture(
        "paypal",
        "paypal/payment-sale-completed.json",
        &paypal_keys("leaf.key"),
        "",
        0,
    );
    assert_eq!(post(&c, &url, &sale).await.status, 200);
}

#[tokio::test]
async fn paypal_refuses_a_chain_that_does_not_lead_to_a_trust_anchor() {
    let d = Daemon::start(&paypal_config("untrusted-chain.pem", ""));
    let c = client();
    let req = sign_fixture(
        "paypal",
        "paypal/payment-capture-completed.json",
        &paypal_keys("untrusted-leaf.key"),
        "",
        0,
    );
    let a = post(&c, &d.url("/hooks/paypal"), &req).await;
    assert_eq!((a.status, a.body.as_str()), (401, ""));
    assert!(d.log().contains("cert_invalid"), "{}", d.log());
}

#[tokio::test]
async fn paypal_refuses_foreign_cert_hosts_without_fetching() {
    let (hits, addr) = counting_server().await;
    let d = Daemon::start(&paypal_config("chain.pem", ""));
    let c = client();
    for cert_url in [
        format!("https://{addr}/v1/notifications/certs/CERT-1"),
        format!("http://{addr}/v1/notifications/certs/CERT-1"),
        "https://evil.example/v1/notifications/certs/CERT-1".to_string(),
    ] {
        let req = sign_fixture(
            "paypal",
            "paypal/payment-capture-completed.json",
            &paypal_keys("leaf.key"),
            "",
            0,
        )
        .set("PAYPAL-CERT-URL", &cert_url);
        let a = post(&c, &d.url("/hooks/paypal"), &req).await;
        assert_eq!(a.status, 401, "{cert_url}");
    }
    assert!(d.log().contains("cert_url_refused"), "{}", d.log());
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the daemon fetched a refused URL"
    );
}

/// A local HTTP server that counts every request it gets.
async fn counting_server() -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::net::SocketAddr,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (hits, addr)
}

#[tokio::test]
async fn health_readiness_and_graceful_shutdown() {
    let mut d = Daemon::start(&config(""));
    let c = client();
    assert_eq!(get(&c, &d.url("/healthz")).await.status, 200);
    let r = get(&c, &d.url("/readyz")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["store"], "ok");
    let m = get(&c, &d.url("/metrics")).await;
    assert_eq!(m.status, 200);
    let status = d.terminate();
    assert!(status.success(), "exit {status:?}\n{}", d.log());
    assert!(d.log().contains("stopped cleanly"));
}

/// A client that never finishes its headers is disconnected, and the daemon keeps serving.
#[tokio::test]
async fn slow_headers_are_cut_off_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Daemon::start(&config(""));
    let addr = d.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /hooks/shop HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // Meanwhile a normal webhook is answered.
    let ok = sign_fixture(
        "shopify",
        "shopify/orders-paid.json",
        &keys(&["new-shop"]),
        "",
        0,
    );
    assert_eq!(
        post(&client(), &d.url("/hooks/shop"), &ok).await.status,
        200
    );
    let limit = perkflow::http::HEADER_TIMEOUT + std::time::Duration::from_secs(5);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(limit, slow.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the slow connection was still open after {limit:?}"
    );
    // Oversized headers (sent in pieces, as they arrive over a network) are refused too.
    let mut big = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /hooks/shop HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    for piece in head.as_bytes().chunks(8 * 1024) {
        if big.write_all(piece).await.is_err() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        big.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
}
