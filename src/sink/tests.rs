//! Each connector's requests, rendered from sample `with` values, against the vendors'
//! documented shapes (sink-apis.md).

use super::*;
use crate::config::diagnostic::Diagnostics;
use crate::connector::Registry;
use serde_json::json;

fn client(connector: &str, params: Json) -> SinkClient {
    let mut diags = Diagnostics::default();
    let reg = Registry::load(&[], &mut diags);
    let def = reg.get(connector).unwrap().sink.clone().unwrap();
    let Json::Object(params) = params else {
        panic!()
    };
    SinkClient::build(
        connector,
        connector,
        Arc::new(def),
        params,
        None,
        Duration::from_secs(5),
    )
    .unwrap()
}

fn body(r: &Request) -> Json {
    serde_json::from_str(r.body_text.as_deref().unwrap()).unwrap()
}

fn header<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn hubspot_upsert_and_update_send_string_properties_by_email() {
    let c = client("hubspot", json!({"access_token": "tok"}));
    let w = json!({"email": "ada@example.com", "properties": {"loyalty_points": 1200, "vip": true, "tier": "gold"}});
    let r = c.render("upsert_contact", &w, "pf-1", "ev_1", 1).unwrap();
    assert_eq!(
        (r.method.as_str(), r.url.as_str()),
        (
            "POST",
            "https://api.hubapi.com/crm/v3/objects/contacts/batch/upsert"
        )
    );
    assert_eq!(
        body(&r),
        json!({"inputs": [{"idProperty": "email", "id": "ada@example.com", "properties": {"loyalty_points": "1200", "vip": "true", "tier": "gold"}}]})
    );
    assert_eq!(header(&r, "authorization"), Some("[redacted]"));
    let r = c.render("update_contact", &w, "pf-1", "ev_1", 1).unwrap();
    assert_eq!(
        (r.method.as_str(), r.url.as_str()),
        (
            "PATCH",
            "https://api.hubapi.com/crm/v3/objects/contacts/ada%40example.com?idProperty=email"
        )
    );
}

#[test]
fn twilio_sends_a_form_under_the_account_with_optional_fields_left_out() {
    let c = client(
        "twilio_sms",
        json!({"account_sid": "ACx", "auth_token": "secret-token", "from": "+15550100"}),
    );
    let r = c
        .render(
            "send_sms",
            &json!({"to": "+14155550134", "body": "Hi & welcome"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap();
    assert_eq!(
        r.url,
        "https://api.twilio.com/2010-04-01/Accounts/ACx/Messages.json"
    );
    assert_eq!(
        header(&r, "content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        r.body_text.as_deref(),
        Some("To=%2B14155550134&From=%2B15550100&Body=Hi+%26+welcome")
    );
    assert!(
        !format!("{r:?}").contains("secret-token"),
        "credentials never show in a rendered request"
    );
}

#[test]
fn sendgrid_builds_plain_and_template_mails_with_string_custom_args() {
    let c = client(
        "sendgrid",
        json!({"api_key": "SG.k", "from": "rewards@example.com"}),
    );
    let r = c
        .render(
            "send",
            &json!({"to": "ada@example.com", "subject": "Hi", "text": "Thanks"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap();
    assert_eq!(
        body(&r),
        json!({"personalizations": [{"to": [{"email": "ada@example.com"}]}], "from": {"email": "rewards@example.com"}, "subject": "Hi", "content": [{"type": "text/plain", "value": "Thanks"}], "custom_args": {"perkflow_job": "pf-1", "perkflow_event": "ev_1"}})
    );
    let r = c
        .render(
            "send",
            &json!({"to": "ada@example.com", "template_id": "d-123", "data": {"points": 250}}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap();
    let b = body(&r);
    assert_eq!(b["template_id"], "d-123");
    assert_eq!(
        b["personalizations"][0]["dynamic_template_data"],
        json!({"points": 250})
    );
    assert!(
        b.get("content").is_none() && b.get("subject").is_none(),
        "{b}"
    );
}

#[test]
fn klaviyo_event_carries_the_job_key_as_unique_id_and_the_revision_header() {
    let c = client("klaviyo", json!({"api_key": "pk_x"}));
    let r = c.render("track_event", &json!({"metric": "Points Earned", "email": "ada@example.com", "properties": {"points": 250}}), "pf-9", "ev_1", 1).unwrap();
    assert_eq!(r.url, "https://a.klaviyo.com/api/events");
    assert_eq!(header(&r, "content-type"), Some("application/vnd.api+json"));
    assert_eq!(header(&r, "revision"), Some("2026-07-15"));
    let a = &body(&r)["data"]["attributes"];
    assert_eq!(a["unique_id"], "pf-9");
    assert_eq!(a["metric"]["data"]["attributes"]["name"], "Points Earned");
    assert_eq!(
        a["profile"]["data"]["attributes"],
        json!({"email": "ada@example.com"})
    );
}

#[test]
fn slack_posts_to_the_webhook_url_or_the_web_api_with_a_channel() {
    let c = client(
        "slack",
        json!({"webhook_url": "https://hooks.slack.com/services/T1/B1/abc", "bot_token": "xoxb-1", "channel": "C123"}),
    );
    let r = c
        .render("post", &json!({"text": "hi"}), "pf-1", "ev_1", 1)
        .unwrap();
    assert_eq!(r.url, "https://hooks.slack.com/services/T1/B1/abc");
    assert_eq!(body(&r), json!({"text": "hi"}));
    let r = c
        .render("post_message", &json!({"text": "hi"}), "pf-1", "ev_1", 1)
        .unwrap();
    assert_eq!(r.url, "https://slack.com/api/chat.postMessage");
    assert_eq!(body(&r), json!({"channel": "C123", "text": "hi"}));
}

#[test]
fn square_writes_carry_the_job_key_as_idempotency_key() {
    let c = client(
        "square_loyalty",
        json!({"access_token": "t", "location_id": "L1"}),
    );
    let r = c
        .render(
            "accumulate_points",
            &json!({"account_id": "acct 1", "points": 120}),
            "pf-7",
            "ev_1",
            1,
        )
        .unwrap();
    assert_eq!(
        r.url,
        "https://connect.squareup.com/v2/loyalty/accounts/acct%201/accumulate"
    );
    assert_eq!(header(&r, "square-version"), Some("2025-08-20"));
    assert_eq!(
        body(&r),
        json!({"accumulate_points": {"points": 120}, "idempotency_key": "pf-7", "location_id": "L1"})
    );
}

#[test]
fn giftcard_orders_cover_the_three_delivery_types() {
    let c = client("giftcard", json!({"email": "e", "access_token": "t"}));
    let links = c
        .render(
            "order",
            &json!({"product": "CVS", "value": 20, "po_number": "P-1", "delivery": "links"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap();
    assert_eq!(
        body(&links),
        json!({"Type": "Links", "PONumber": "P-1", "LineItems": [{"ProductId": "CVS", "Value": 20, "Quantity": 1}]})
    );
    let post = c.render("order", &json!({"product": "VISA-PHYSICAL", "value": 50, "po_number": "P-2", "delivery": "physical", "address": {"Line1": "1 Main St", "City": "Springfield", "PostalCode": "12345", "Country": "US"}}), "pf-1", "ev_1", 1).unwrap();
    let b = body(&post);
    assert_eq!(b["Type"], "PhysicalShipment");
    assert_eq!(b["LineItems"][0]["ShippingAddress"]["City"], "Springfield");
    let sms = c.render("order", &json!({"product": "CVS", "value": 5, "po_number": "P-3", "delivery": "sms", "phone": "+14155550134"}), "pf-1", "ev_1", 1).unwrap();
    assert_eq!(
        body(&sms)["LineItems"][0]["DigitalDeliveryAddress"],
        json!({"Phone": "+14155550134"})
    );
    assert_eq!(header(&sms, "authorization"), Some("Bearer [redacted]"));
}

#[test]
fn a_missing_with_field_is_a_clear_error() {
    let c = client(
        "twilio_sms",
        json!({"account_sid": "ACx", "auth_token": "t", "from": "+15550100"}),
    );
    let e = c
        .render(
            "send_sms",
            &json!({"to": "+14155550134"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap_err();
    assert!(e.contains("body.Body") && e.contains("undefined"), "{e}");
}
