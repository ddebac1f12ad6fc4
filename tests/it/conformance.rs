//! Contract conformance: the requests each sink emits validate against the vendor's own
//! OpenAPI operation (method, path, content type, request body schema), with the vendor
//! files (and their licences) copied into `fixtures/vendor-specs/`. HubSpot, Zendesk, Slack
//! webhooks and the gift-card API publish no redistributable spec; the sandbox and
//! `src/sink/tests.rs` follow sink-apis.md for them.

use perkflow::config::diagnostic::Diagnostics;
use perkflow::connector::Registry;
use perkflow::sink::request::Request;
use perkflow::sink::SinkClient;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

fn spec(file: &str) -> Value {
    let path = crate::helpers::repo(&format!("fixtures/vendor-specs/{file}"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn client(connector: &str, params: Value) -> SinkClient {
    let mut diags = Diagnostics::default();
    let reg = Registry::load(&[], &mut diags);
    let def = reg.get(connector).unwrap().sink.clone().unwrap();
    let Value::Object(params) = params else {
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

/// `a/{x}/b` matches `a/123/b`.
fn path_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(a, b)| (a.starts_with('{') && a.ends_with('}') && !b.is_empty()) || a == b)
}

fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(
            spec,
            spec.pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("unresolved {r}")),
        ),
        None => v,
    }
}

/// Validates `req` against the operation of `spec` its method and path name.
fn conforms(spec: &Value, req: &Request) {
    let url = reqwest::Url::parse(&req.url).unwrap();
    let (template, item) = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(t, _)| path_matches(t, url.path()))
        .unwrap_or_else(|| panic!("{} is not a path of the vendor's API", url.path()));
    let op = item
        .get(req.method.to_ascii_lowercase())
        .unwrap_or_else(|| panic!("{} {template} is not an operation", req.method));
    let body = resolve(spec, &op["requestBody"]);
    let ct = req
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.split(';').next().unwrap().trim().to_string())
        .expect("a content type");
    let media = body["content"].get(&ct).unwrap_or_else(|| {
        panic!(
            "{ct} is not a content type of {template}: {:?}",
            body["content"]
                .as_object()
                .map(|m| m.keys().collect::<Vec<_>>())
        )
    });
    let text = req.body_text.as_deref().unwrap_or("");
    let instance: Value = if ct == "application/x-www-form-urlencoded" {
        // Form fields are strings; a field the schema types as an array is the list of its
        // repeated keys (Twilio's MediaUrl).
        let props = &resolve(spec, &media["schema"])["properties"];
        let mut m = serde_json::Map::new();
        for (k, v) in form_urlencoded::parse(text.as_bytes()) {
            let v = Value::String(v.into_owned());
            if props[k.as_ref()]["type"] == "array" {
                m.entry(k.into_owned())
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .unwrap()
                    .push(v);
            } else {
                m.insert(k.into_owned(), v);
            }
        }
        Value::Object(m)
    } else {
        serde_json::from_str(text).unwrap()
    };
    // The schema is validated in the spec document itself, so its `$ref`s resolve.
    let mut root = spec.clone();
    let escape = |s: &str| {
        s.replace('~', "~0")
            .replace('/', "~1")
            .replace('{', "%7B")
            .replace('}', "%7D")
    };
    let schema_ref = match op["requestBody"].get("$ref") {
        Some(r) => format!("{}/content/{}/schema", r.as_str().unwrap(), escape(&ct)),
        None => format!(
            "#/paths/{}/{}/requestBody/content/{}/schema",
            escape(template),
            req.method.to_ascii_lowercase(),
            escape(&ct)
        ),
    };
    root["$ref"] = json!(schema_ref);
    assert!(media.get("schema").is_some());
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema of {template}: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{} {} does not conform:\n{}\nbody: {instance:#}",
        req.method,
        url.path(),
        errors.join("\n")
    );
}

#[test]
fn twilio_send_sms_conforms_to_the_messages_operation() {
    let s = spec("twilio/twilio_api_v2010.messages.json");
    let c = client(
        "twilio_sms",
        json!({"account_sid": "AC0123456789abcdef0123456789abcdef", "auth_token": "t", "from": "+15550100", "status_callback": "https://hooks.example.com/twilio"}),
    );
    let r = c
        .render(
            "send_sms",
            &json!({"to": "+14155550134", "body": "You earned 250 points!"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap();
    conforms(&s, &r);
    let r = c.render("send_sms", &json!({"to": "+14155550134", "body": "See", "media_url": "https://example.com/card.png"}), "pf-1", "ev_1", 1).unwrap();
    conforms(&s, &r);
}

#[test]
fn sendgrid_send_conforms_to_mail_send() {
    let s = spec("sendgrid/tsg_mail_v3.mail_send.json");
    let c = client(
        "sendgrid",
        json!({"api_key": "SG.k", "from": "rewards@example.com", "from_name": "Rewards"}),
    );
    for with in [
        json!({"to": "ada@example.com", "to_name": "Ada", "subject": "Hi", "text": "Thanks", "html": "<p>Thanks</p>"}),
        json!({"to": "ada@example.com", "template_id": "d-0123456789abcdef0123456789abcdef", "data": {"points": 250, "tier": "gold"}}),
    ] {
        conforms(&s, &c.render("send", &with, "pf-1", "ev_1", 1).unwrap());
    }
}

#[test]
fn klaviyo_requests_conform_to_events_and_profile_import() {
    let s = spec("klaviyo/klaviyo_stable.events_profiles.json");
    let c = client("klaviyo", json!({"api_key": "pk_x"}));
    conforms(&s, &c.render("track_event", &json!({"metric": "Points Earned", "email": "ada@example.com", "value": 12.5, "properties": {"points": 250}, "time": "2026-11-22T10:00:00Z"}), "pf-1", "ev_1", 1).unwrap());
    conforms(
        &s,
        &c.render(
            "track_event",
            &json!({"metric": "Points Earned", "phone": "+14155550134"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap(),
    );
    conforms(&s, &c.render("import_profile", &json!({"email": "ada@example.com", "first_name": "Ada", "properties": {"tier": "gold"}}), "pf-1", "ev_1", 1).unwrap());
}

#[test]
fn square_loyalty_requests_conform_to_the_loyalty_api() {
    let s = spec("square/square_api.loyalty.json");
    let c = client(
        "square_loyalty",
        json!({"access_token": "t", "location_id": "L1"}),
    );
    conforms(
        &s,
        &c.render(
            "search_account",
            &json!({"phone": "+14155550134"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap(),
    );
    conforms(
        &s,
        &c.render(
            "accumulate_points",
            &json!({"account_id": "acct-1", "points": 120}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap(),
    );
    conforms(
        &s,
        &c.render(
            "accumulate_points",
            &json!({"account_id": "acct-1", "order_id": "ord-9"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap(),
    );
    conforms(
        &s,
        &c.render(
            "create_reward",
            &json!({"account_id": "acct-1", "reward_tier_id": "tier-1"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap(),
    );
    conforms(
        &s,
        &c.render(
            "redeem_reward",
            &json!({"reward_id": "rwd-1"}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap(),
    );
}

/// The validator is not a rubber stamp: a body missing a required field fails.
#[test]
#[should_panic(expected = "does not conform")]
fn a_request_missing_a_required_field_is_caught() {
    let s = spec("square/square_api.loyalty.json");
    let c = client(
        "square_loyalty",
        json!({"access_token": "t", "location_id": "L1"}),
    );
    let mut r = c
        .render(
            "accumulate_points",
            &json!({"account_id": "acct-1", "points": 120}),
            "pf-1",
            "ev_1",
            1,
        )
        .unwrap();
    // Without its idempotency key and location.
    r.body_text = Some(r#"{"accumulate_points":{"points":120}}"#.into());
    conforms(&s, &r);
}
