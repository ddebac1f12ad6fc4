//! PayPal `verify: cert` fetching the certificate over real TLS: the allowlisted host serves
//! the chain, the daemon fetches it once (then caches it), validates it against `ca_file`,
//! and answers 503 when the host cannot serve it.

use crate::helpers::*;
use perkflow::sign::SignKeys;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTPS server on 127.0.0.1: `path -> PEM body` (others: 404); counts requests.
async fn cert_server(routes: Vec<(&'static str, Vec<u8>)>) -> (Arc<AtomicUsize>, u16) {
    let pki = |f: &str| std::fs::read(repo(&format!("fixtures/paypal/pki/{f}"))).unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pki("https-server-chain.pem"))
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_slice(&pki("https-server.key")).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let routes = Arc::new(routes);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, h, routes) = (acceptor.clone(), h.clone(), routes.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                h.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&head);
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, body) = match routes.iter().find(|(p, _)| *p == path) {
                    Some((_, b)) => ("200 OK", b.clone()),
                    None if path.contains("broken") => {
                        ("500 Internal Server Error", b"oops".to_vec())
                    }
                    None => ("404 Not Found", b"not found".to_vec()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.write_all(&body).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (hits, port)
}

fn keys(key: &str) -> SignKeys {
    SignKeys {
        paypal_key_pem: Some(std::fs::read(repo(&format!("fixtures/paypal/pki/{key}"))).unwrap()),
        webhook_id: Some("WH-FETCH".into()),
        ..Default::default()
    }
}

fn signed(fixture: &str, key: &str, cert_url: &str) -> Signed {
    sign_fixture("paypal", fixture, &keys(key), "", 0).set("PAYPAL-CERT-URL", cert_url)
}

#[tokio::test]
async fn fetches_over_tls_once_validates_and_caches() {
    let chain = std::fs::read(repo("fixtures/paypal/pki/chain.pem")).unwrap();
    let untrusted = std::fs::read(repo("fixtures/paypal/pki/untrusted-chain.pem")).unwrap();
    let (hits, port) = cert_server(vec![
        ("/v1/notifications/certs/CERT-good", chain),
        ("/v1/notifications/certs/CERT-untrusted", untrusted),
    ])
    .await;
    let cfg = format!(
        "sources:\n  paypal:\n    connector: paypal\n    webhook_id: WH-FETCH\n    ca_file: {}\n    cert_hosts: [\"127.0.0.1:{port}\"]\n",
        repo("fixtures/paypal/pki/root-ca.pem").display()
    );
    let d = Daemon::start(&cfg);
    let c = client();
    let url = d.url("/hooks/paypal");
    let good = format!("https://127.0.0.1:{port}/v1/notifications/certs/CERT-good");

    let a = post(
        &c,
        &url,
        &signed("paypal/payment-capture-completed.json", "leaf.key", &good),
    )
    .await;
    assert_eq!(a.status, 200, "{}\n{}", a.body, d.log());
    let a = post(
        &c,
        &url,
        &signed("paypal/payment-sale-completed.json", "leaf.key", &good),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the certificate was not cached"
    );

    // Served over TLS from an allowed host, but not chaining to a trust anchor.
    let bad = format!("https://127.0.0.1:{port}/v1/notifications/certs/CERT-untrusted");
    let a = post(
        &c,
        &url,
        &signed(
            "paypal/payment-sale-completed.json",
            "untrusted-leaf.key",
            &bad,
        ),
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (401, ""));

    // The allowed host has no such certificate: not PayPal's request.
    let missing = format!("https://127.0.0.1:{port}/v1/notifications/certs/CERT-missing");
    let a = post(
        &c,
        &url,
        &signed("paypal/payment-sale-completed.json", "leaf.key", &missing),
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (401, ""));

    // The host fails: PayPal should retry later.
    let broken = format!("https://127.0.0.1:{port}/v1/notifications/certs/CERT-broken");
    let a = post(
        &c,
        &url,
        &signed("paypal/payment-sale-completed.json", "leaf.key", &broken),
    )
    .await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.headers.contains_key("retry-after"));
    assert!(
        d.log().contains("verification unavailable") || d.log().contains("could not be verified"),
        "{}",
        d.log()
    );
}
