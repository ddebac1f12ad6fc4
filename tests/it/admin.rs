//! The admin API (`/api/events`) behind the bearer token, and the `perkflow events` CLI.

use crate::helpers::*;

const TOKEN: &str = "test-admin-token";

async fn get_auth(c: &reqwest::Client, url: &str, auth: Option<&str>) -> Answer {
    match auth {
        Some(a) => send(c.get(url).header("Authorization", a)).await,
        None => send(c.get(url)).await,
    }
}

#[tokio::test]
async fn events_are_listed_and_shown_only_with_the_token() {
    std::env::set_var("PERKFLOW_TEST_ADMIN_TOKEN", TOKEN);
    let d = Daemon::start(
        "admin_token: ${PERKFLOW_TEST_ADMIN_TOKEN}\nsources:\n  shop: { connector: shopify, secret: s }\n",
    );
    let c = client();
    let req = sign_fixture("shopify", "shopify/orders-paid.json", &keys(&["s"]), "", 0);
    let id = stored_id(&c, &d.url("/hooks/shop"), &req).await;

    let list = d.url("/api/events");
    assert_eq!(get_auth(&c, &list, None).await.status, 401);
    assert_eq!(get_auth(&c, &list, Some("Bearer wrong")).await.status, 401);
    assert_eq!(
        get_auth(&c, &list, Some(TOKEN)).await.status,
        401,
        "the Bearer scheme is required"
    );
    let a = get_auth(&c, &list, Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let page = a.json();
    assert_eq!(page["events"][0]["id"], id.as_str());
    assert_eq!(
        page["events"][0]["vendor_id"],
        "98880550-7158-44d4-b7cd-2c97c8a091b5"
    );
    // Pending until the pipeline worker has taken it (no pipeline here: at once).
    assert!(page["events"][0]["pending"].is_boolean());
    // Health and metrics stay open.
    assert_eq!(get_auth(&c, &d.url("/healthz"), None).await.status, 200);

    let a = get_auth(
        &c,
        &d.url(&format!("/api/events/{id}")),
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(a.status, 200);
    let ev = a.json();
    let fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo("fixtures/shopify/orders-paid.json")).unwrap())
            .unwrap();
    assert_eq!(ev["payload"], fixture);
    assert_eq!(ev["event_type"], "orders/paid");
    let headers = ev["headers"].to_string().to_ascii_lowercase();
    assert!(headers.contains("x-shopify-shop-domain"));
    assert!(
        !headers.contains("x-shopify-hmac-sha256"),
        "signature header stored: {headers}"
    );
    assert_eq!(
        get_auth(
            &c,
            &d.url("/api/events/ev_ffffffffffffffff"),
            Some(&format!("Bearer {TOKEN}"))
        )
        .await
        .status,
        404
    );

    // The CLI talks to the same API.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
            .args(args)
            .args(["--url", &d.base])
            .env("PERKFLOW_ADMIN_TOKEN", TOKEN)
            .current_dir(&d.dir)
            .output()
            .unwrap()
    };
    let out = cli(&["events", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&id)
            && text.contains("orders/paid")
            && (text.contains("pending") || text.contains("processed")),
        "{text}"
    );
    let out = cli(&["events", "show", &id, "--json"]);
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["id"], id.as_str());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(["events", "list", "--url", &d.base, "--token", "wrong"])
        .current_dir(&d.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

/// Without an admin_token the admin API is not served, even on loopback (a reverse proxy on
/// the same host would forward strangers).
#[tokio::test]
async fn without_a_token_the_admin_api_is_disabled() {
    let d = Daemon::start("sources:\n  shop: { connector: shopify, secret: s }\n");
    let a = get_auth(&client(), &d.url("/api/events"), None).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.json()["error"].as_str().unwrap().contains("admin_token"));
    assert_eq!(
        get_auth(&client(), &d.url("/readyz"), None).await.status,
        200
    );
}

/// Reachable from other hosts with no admin token, the daemon refuses to start (it never
/// binds: the refusal comes before).
#[test]
fn a_non_loopback_address_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("perkflow.yaml");
    std::fs::write(
        &cfg,
        "sources:\n  shop: { connector: shopify, secret: s }\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(["serve", "-c"])
        .arg(&cfg)
        .args(["--listen", "0.0.0.0:0"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "refusing to serve on 0.0.0.0:0 (not a loopback address) without an admin_token"
        ),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "it never listened");
}
