//! `perkflow demo`, the README's main command: runs to completion and shows a delivery for
//! every sink of the shipped config.

use crate::helpers::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_delivers_to_every_shipped_sink_and_stops_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args([
            "demo",
            "--exit",
            "--listen",
            "127.0.0.1:0",
            "--sandbox",
            "127.0.0.1:0",
        ])
        .current_dir(REPO)
        .env("PERKFLOW_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "{stdout}\n{stderr}");
    for (vendor, what) in [
        ("twilio", "SMS to +15555550123"),
        ("sendgrid", "email to zoe@example.com"),
        ("klaviyo", "event `Placed Order` for ada@example.com"),
        ("hubspot", "contact upsert: ada@example.com"),
        ("slack", "Slack post"),
        ("sendgrid", "A thank-you for order #1042"),
        // A tier upgrade books a promo code on the loyalty platform.
        ("bookings", "promo code PROMO-"),
        ("zendesk", "ticket #"),
        ("giftcard", "gift-card order"),
        ("giftcard", "is \"Completed\""),
        ("sendgrid", "gift card has been delivered"),
        // QuickBooks webhooks carry ids: the pipeline reads the payment, invoice and customer.
        ("quickbooks", "read payment 118743"),
        ("quickbooks", "read invoice 240611"),
        ("quickbooks", "read customer 58"),
        ("sendgrid", "email to dana@harborstreetbakery.example"),
        // Square: customer and loyalty account looked up, points accrued, an SMS.
        ("square", "read customer 4VQ8D2K6ZW1T3HNM7PXR9CBY5G"),
        ("square", "loyalty account found for +15555550123"),
        ("square", "45 points accumulated on acct-15555550123"),
        ("twilio", "You earned 45 points (balance 165)"),
        (
            "klaviyo",
            "event `Reward Threshold Reached` for ada@example.com",
        ),
        // A referred signup: a gift card to each, then the e-mails once they are delivered.
        (
            "giftcard",
            "(1 x STARBUCKS 10) for ben.referrer@example.com",
        ),
        ("giftcard", "(1 x STARBUCKS 5) for claim link, PONumber FRIEND-7390211358771"),
        ("sendgrid", "email to ben.referrer@example.com"),
        // The friend's card is a claim link, texted once the order completes.
        ("twilio", "SMS to +15555550188: \"Your 5 USD STARBUCKS gift card is ready: https://claim.sandbox.invalid/"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!("✓ {vendor}")) && l.contains(what)),
            "no delivery to {vendor} ({what}) in:\n{stdout}"
        );
    }
    assert!(stdout.contains("21 deliveries to 9 vendors"), "{stdout}");
    // The refund of ada's order cancelled the gift card its 1,000 points triggered (not sent
    // yet when the refund ran): no CVS 10 card.
    assert!(!stdout.contains("(1 x CVS 10)"), "{stdout}");
    // With --exit the daemon stops at once: no addresses that would answer nothing.
    assert!(!stdout.contains("look around"), "{stdout}");
    assert!(
        !stdout.contains("✗"),
        "a vendor refused something:\n{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("demo stopped cleanly"),
        "{stdout}"
    );
    // Every sample webhook was accepted.
    assert_eq!(stdout.matches("\"duplicate\":false").count(), 8, "{stdout}");
}
