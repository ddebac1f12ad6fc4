//! The emulators, one function per vendor, each following its documented contract
//! (`../shared/docs/sink-apis.md`, the vendor OpenAPI files in `../shared/vendor-specs/`).

use super::{Answer, Req, Sandbox};
use serde_json::{json, Value};

pub(crate) async fn handle(sb: &Sandbox, vendor: &str, req: &Req) -> Answer {
    match vendor {
        "twilio" => twilio(sb, req),
        "sendgrid" => sendgrid(sb, req),
        "klaviyo" => klaviyo(sb, req),
        "slack" => slack(sb, req),
        "zendesk" => zendesk(sb, req),
        "hubspot" => hubspot(sb, req),
        "square" => square(sb, req),
        "quickbooks" => quickbooks(sb, req),
        "giftcard" => super::giftcard::handle(sb, req).await,
        "bookings" => super::bookings::handle(sb, req),
        "webhook" => Answer::json(
            200,
            json!({"received": true}),
            "webhook received".to_string(),
        ),
        _ => Answer::text(404, "unknown vendor", format!("no emulator for `{vendor}`")),
    }
}

fn is_e164(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or("");
    (8..=15).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Twilio Messages resource: form-encoded, Basic AccountSid:AuthToken.
fn twilio(sb: &Sandbox, req: &Req) -> Answer {
    let err = |status: u16, code: u32, message: &str| {
        Answer::json(
            status,
            json!({"code": code, "message": message, "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status}),
            format!("refused: {code} {message}"),
        )
    };
    let sid = &sb.creds.twilio_sid;
    let path = format!("/2010-04-01/Accounts/{sid}/Messages.json");
    if req.method != "POST" || req.path != path {
        return err(404, 20404, "The requested resource was not found");
    }
    // The Account SID and Auth Token, or an API key SID and its secret (the account still
    // in the path).
    let c = &sb.creds;
    match req.basic() {
        Some((u, p)) if &u == sid && p == c.twilio_token => {}
        Some((u, p)) if u == c.twilio_api_key_sid && p == c.twilio_api_key_secret => {}
        _ => return err(401, 20003, "Authenticate"),
    }
    if req.content_type() != "application/x-www-form-urlencoded" {
        return err(
            400,
            20001,
            "Content-Type must be application/x-www-form-urlencoded",
        );
    }
    let form: std::collections::HashMap<String, String> = form_urlencoded::parse(&req.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let to = form.get("To").cloned().unwrap_or_default();
    if to.is_empty() {
        return err(400, 21604, "A 'To' phone number is required.");
    }
    if !is_e164(&to) {
        return err(
            400,
            21211,
            &format!("The 'To' number {to} is not a valid phone number."),
        );
    }
    if to.ends_with("0000") {
        return err(400, 21610, "Attempt to send to unsubscribed recipient");
    }
    if !form.contains_key("From") && !form.contains_key("MessagingServiceSid") {
        return err(
            400,
            21603,
            "A 'From' or 'MessagingServiceSid' parameter is required to send a message",
        );
    }
    let body = form.get("Body").cloned().unwrap_or_default();
    if body.is_empty() && !form.contains_key("MediaUrl") {
        return err(400, 21602, "Message body is required.");
    }
    if body.chars().count() > 1600 {
        return err(
            400,
            21617,
            "The concatenated message body exceeds the 1600 character limit.",
        );
    }
    let msid = format!("SM{:032x}", sb.next_id());
    Answer::json(
        201,
        json!({"sid": msid, "status": "queued", "to": to, "from": form.get("From"), "body": body, "account_sid": sid, "num_segments": "1"}),
        format!("SMS to {to}: \"{body}\""),
    )
}

/// SendGrid v3 mail send: Bearer key, JSON; 202 with X-Message-Id.
fn sendgrid(sb: &Sandbox, req: &Req) -> Answer {
    let err = |status: u16, message: &str, field: Option<&str>| {
        Answer::json(
            status,
            json!({"errors": [{"message": message, "field": field, "help": null}]}),
            format!("refused: {message}"),
        )
    };
    if req.method != "POST" || req.path != "/v3/mail/send" {
        return err(404, "not found", None);
    }
    if req.bearer() != Some(sb.creds.sendgrid_key.as_str()) {
        return err(
            401,
            "The provided authorization grant is invalid, expired, or revoked",
            None,
        );
    }
    if req.content_type() != "application/json" {
        return err(415, "Content-Type should be application/json.", None);
    }
    let Some(b) = req.json() else {
        return err(400, "Bad Request", None);
    };
    let to: Vec<&str> = b["personalizations"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["to"].as_array().into_iter().flatten())
        .filter_map(|t| t["email"].as_str())
        .collect();
    if to.is_empty() {
        return err(
            400,
            "The personalizations field is required and must have at least one personalization.",
            Some("personalizations"),
        );
    }
    if to.iter().any(|e| !e.contains('@')) {
        return err(
            400,
            "Does not contain a valid address.",
            Some("personalizations.0.to.0.email"),
        );
    }
    if b["from"]["email"].as_str().is_none_or(|e| !e.contains('@')) {
        return err(
            400,
            "The from email does not contain a valid address.",
            Some("from.email"),
        );
    }
    let templated = b["template_id"].is_string();
    if !templated && b["subject"].as_str().is_none_or(str::is_empty) {
        return err(400, "The subject is required. You can get around this requirement if you use a template with a subject defined or if every personalization has a subject defined.", Some("subject"));
    }
    if !templated && b["content"].as_array().is_none_or(|c| c.is_empty()) {
        return err(
            400,
            "Unless a valid template_id is provided, the content parameter is required.",
            Some("content"),
        );
    }
    if let Some(args) = b["custom_args"].as_object() {
        if args.values().any(|v| !v.is_string()) {
            return err(
                400,
                "Invalid type. Expected: string, given: integer.",
                Some("custom_args"),
            );
        }
    }
    let what = b["subject"]
        .as_str()
        .map(|s| format!("\"{s}\""))
        .unwrap_or_else(|| format!("template {}", b["template_id"]));
    Answer::text(202, "", format!("email to {}: {what}", to.join(", ")))
        .header("x-message-id", format!("sg{:020x}", sb.next_id()))
}

/// Klaviyo JSON:API: `Klaviyo-API-Key`, a `revision` header, `application/vnd.api+json`.
fn klaviyo(sb: &Sandbox, req: &Req) -> Answer {
    let err = |status: u16, code: &str, detail: &str| {
        Answer::json(
            status,
            json!({"errors": [{"id": "sandbox", "status": status, "code": code, "title": code, "detail": detail, "source": {"pointer": "/data"}}]}),
            format!("refused: {code}: {detail}"),
        )
    };
    if req.header("authorization")
        != Some(format!("Klaviyo-API-Key {}", sb.creds.klaviyo_key).as_str())
    {
        return err(401, "not_authenticated", "Missing or invalid private key.");
    }
    if req.header("revision").is_none_or(|r| r.len() != 10) {
        return err(
            400,
            "invalid",
            "The `revision` header is required (YYYY-MM-DD).",
        );
    }
    if req.method == "POST" && req.content_type() != "application/vnd.api+json" {
        return err(
            415,
            "unsupported_media_type",
            "Content-Type must be application/vnd.api+json",
        );
    }
    let Some(b) = req.json() else {
        return err(400, "invalid", "The body is not JSON.");
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/api/events") => {
            let a = &b["data"]["attributes"];
            if b["data"]["type"] != "event" {
                return err(400, "invalid", "data.type must be `event`");
            }
            let metric = a["metric"]["data"]["attributes"]["name"]
                .as_str()
                .unwrap_or("");
            let profile = &a["profile"]["data"]["attributes"];
            if metric.is_empty() || !profile.is_object() || !a["properties"].is_object() {
                return err(
                    400,
                    "invalid",
                    "metric, profile and properties are required",
                );
            }
            let Some(who) = profile["email"]
                .as_str()
                .or(profile["phone_number"].as_str())
                .or(profile["external_id"].as_str())
                .or(a["profile"]["data"]["id"].as_str())
                .filter(|w| !w.is_empty())
            else {
                // Klaviyo needs one identifier of the profile.
                return err(
                    400,
                    "invalid",
                    "the profile needs an id, email, phone_number or external_id",
                );
            };
            if let Some(u) = a["unique_id"].as_str() {
                let key = format!("klaviyo:{who}:{metric}:{u}");
                let mut seen = sb.idempotency.lock().expect("sandbox lock");
                if seen.contains_key(&key) {
                    return Answer::text(
                        202,
                        "",
                        format!("event `{metric}` for {who} (repeated unique_id: recorded once)"),
                    );
                }
                seen.insert(key, Value::Null);
            }
            Answer::text(202, "", format!("event `{metric}` for {who}"))
        }
        ("POST", "/api/profile-import") => {
            let a = &b["data"]["attributes"];
            if b["data"]["type"] != "profile"
                || !(a["email"].is_string()
                    || a["phone_number"].is_string()
                    || a["external_id"].is_string())
            {
                return err(
                    400,
                    "invalid",
                    "a profile needs email, phone_number or external_id",
                );
            }
            let who = a["email"]
                .as_str()
                .or(a["phone_number"].as_str())
                .or(a["external_id"].as_str())
                .unwrap_or("?")
                .to_string();
            let key = format!("klaviyo-profile:{who}");
            let mut seen = sb.idempotency.lock().expect("sandbox lock");
            let existed = seen.contains_key(&key);
            let id = seen
                .entry(key)
                .or_insert_with(|| json!(format!("01SANDBOX{:016}", sb.next_id())))
                .clone();
            Answer::json(
                if existed { 200 } else { 201 },
                json!({"data": {"type": "profile", "id": id, "attributes": a}}),
                format!(
                    "profile {who} {}",
                    if existed { "updated" } else { "created" }
                ),
            )
        }
        _ => err(404, "not_found", "no such endpoint"),
    }
}

/// Slack: incoming webhooks (`/services/…`, text answers) and chat.postMessage (`ok` JSON).
fn slack(sb: &Sandbox, req: &Req) -> Answer {
    if req.path.starts_with("/services/") {
        if req.path.split('/').filter(|s| !s.is_empty()).count() != 4 {
            return Answer::text(404, "no_service", "refused: no_service");
        }
        let Some(b) = req.json() else {
            return Answer::text(400, "invalid_payload", "refused: invalid_payload");
        };
        let text = b["text"].as_str().unwrap_or("");
        if text.is_empty() && !b["blocks"].is_array() {
            return Answer::text(400, "no_text", "refused: no_text");
        }
        return Answer::text(200, "ok", format!("Slack post: \"{text}\""));
    }
    if req.path == "/api/chat.postMessage" {
        let fail = |e: &str| {
            Answer::json(
                200,
                json!({"ok": false, "error": e}),
                format!("refused: {e}"),
            )
        };
        if req.bearer() != Some(sb.creds.slack_bot_token.as_str()) {
            return fail("invalid_auth");
        }
        let Some(b) = req.json() else {
            return fail("invalid_json");
        };
        let channel = b["channel"].as_str().unwrap_or("");
        if channel.is_empty() {
            return fail("channel_not_found");
        }
        let text = b["text"].as_str().unwrap_or("");
        if text.is_empty() && !b["blocks"].is_array() {
            return fail("no_text");
        }
        let ts = format!("{}.{:06}", 1_800_000_000 + sb.next_id(), 0);
        return Answer::json(
            200,
            json!({"ok": true, "channel": channel, "ts": ts, "message": {"text": text}}),
            format!("Slack message in {channel}: \"{text}\""),
        );
    }
    Answer::text(404, "not_found", "refused: unknown Slack endpoint")
}

/// Zendesk ticket create with `Idempotency-Key`.
fn zendesk(sb: &Sandbox, req: &Req) -> Answer {
    let err = |status: u16, error: &str, description: &str| {
        Answer::json(
            status,
            json!({"error": error, "description": description}),
            format!("refused: {error}: {description}"),
        )
    };
    let c = &sb.creds;
    let authed = match (req.basic(), req.bearer()) {
        (Some((u, p)), _) => u == format!("{}/token", c.zendesk_email) && p == c.zendesk_token,
        (None, Some(t)) => t == c.zendesk_token,
        _ => false,
    };
    if !authed {
        return err(401, "Couldn't authenticate you", "");
    }
    let tickets_path = req.path == "/api/v2/tickets" || req.path == "/api/v2/tickets.json";
    if req.method == "GET" && tickets_path {
        // List Tickets, by `external_id` when given (it need not be unique).
        let wanted = req.query.get("external_id");
        let all = sb.idempotency.lock().expect("sandbox lock");
        let mut tickets: Vec<Value> = all
            .iter()
            .filter(|(k, _)| k.starts_with("zendesk-ticket:"))
            .map(|(_, t)| t["ticket"].clone())
            .filter(|t| wanted.is_none_or(|w| t["external_id"] == w.as_str()))
            .collect();
        tickets.sort_by_key(|t| t["id"].as_u64());
        let n = tickets.len();
        return Answer::json(
            200,
            json!({"tickets": tickets, "count": n, "next_page": null, "previous_page": null}),
            format!("{n} tickets listed"),
        )
        .read();
    }
    if req.method != "POST" || !tickets_path {
        return err(404, "InvalidEndpoint", "Not found");
    }
    if req.content_type() != "application/json" {
        return err(
            400,
            "Unprocessable Entity",
            "Content-Type must be application/json",
        );
    }
    let Some(b) = req.json() else {
        return err(400, "Unprocessable Entity", "Invalid JSON");
    };
    let t = &b["ticket"];
    let comment = t["comment"]["body"]
        .as_str()
        .or(t["comment"]["html_body"].as_str())
        .unwrap_or("");
    if comment.is_empty() {
        return err(
            422,
            "RecordInvalid",
            "Record validation errors: comment: cannot be blank",
        );
    }
    let key = req
        .header("idempotency-key")
        .map(|k| format!("zendesk:{k}"));
    let mut seen = sb.idempotency.lock().expect("sandbox lock");
    if let Some(k) = &key {
        if let Some(prior) = seen.get(k) {
            return Answer::json(
                201,
                prior.clone(),
                format!(
                    "ticket #{} (Idempotency-Key repeated: the original ticket)",
                    prior["ticket"]["id"]
                ),
            )
            .header("x-idempotency-lookup", "hit");
        }
    }
    let id = 1000 + sb.next_id();
    let ticket = json!({"ticket": {"id": id, "subject": t["subject"], "status": "new", "tags": t["tags"], "external_id": t["external_id"]}, "audit": {"id": id * 10}});
    if let Some(k) = key {
        seen.insert(k, ticket.clone());
    }
    seen.insert(format!("zendesk-ticket:{id}"), ticket.clone());
    Answer::json(
        201,
        ticket,
        format!("ticket #{id}: \"{}\"", t["subject"].as_str().unwrap_or("")),
    )
    .header("location", format!("/api/v2/tickets/{id}.json"))
    .header("x-idempotency-lookup", "miss")
}

/// The QuickBooks Online entities the sandbox company has (the fixtures the shipped
/// pipeline's tests use): `(entity, id, answer)`.
const QUICKBOOKS: &[(&str, &str, &str)] = &[
    (
        "payment",
        "118743",
        include_str!("../../fixtures/quickbooks/api/payment-118743.json"),
    ),
    (
        "invoice",
        "240611",
        include_str!("../../fixtures/quickbooks/api/invoice-240611.json"),
    ),
    (
        "customer",
        "58",
        include_str!("../../fixtures/quickbooks/api/customer-58.json"),
    ),
];

/// QuickBooks Online accounting API reads: `GET /v3/company/{realm}/{entity}/{id}` with a
/// Bearer token and `Accept: application/json`; errors are `Fault` answers.
fn quickbooks(sb: &Sandbox, req: &Req) -> Answer {
    let fault = |status: u16, code: &str, message: &str, detail: &str, kind: &str| {
        Answer::json(
            status,
            json!({"Fault": {"Error": [{"Message": message, "Detail": detail, "code": code}], "type": kind}, "time": "2026-11-20T02:15:30.000-08:00"}),
            format!("refused: {code} {message}: {detail}"),
        )
    };
    if req.bearer() != Some(sb.creds.quickbooks_token.as_str()) {
        return fault(
            401,
            "3200",
            "message=AuthenticationFailed; errorCode=003200; statusCode=401",
            "Token expired or invalid",
            "AUTHENTICATION",
        );
    }
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let (entity, id) = match parts.as_slice() {
        ["v3", "company", _realm, entity, id] if req.method == "GET" => (*entity, *id),
        _ => {
            return fault(
                400,
                "4000",
                "message=Unsupported Operation; errorCode=004000; statusCode=400",
                "the sandbox serves GET /v3/company/{realm}/{entity}/{id}",
                "ValidationFault",
            )
        }
    };
    if req.header("accept") != Some("application/json") {
        return fault(
            400,
            "4001",
            "message=Unsupported Media Type",
            "send Accept: application/json (the default answer is XML)",
            "ValidationFault",
        );
    }
    match QUICKBOOKS
        .iter()
        .find(|(e, i, _)| e.eq_ignore_ascii_case(entity) && *i == id)
    {
        Some((e, i, text)) => Answer::json(
            200,
            serde_json::from_str(text).unwrap_or(Value::Null),
            format!("read {e} {i}"),
        ),
        None => fault(
            400,
            "610",
            "Object Not Found",
            &format!("Object Not Found : Something you're trying to use has been made inactive. Check the fields with accounts, customers, items, vendors or employees. ({entity} {id})"),
            "ValidationFault",
        ),
    }
}

/// HubSpot CRM v3 contacts: PATCH by e-mail and batch upsert; property values are strings.
fn hubspot(sb: &Sandbox, req: &Req) -> Answer {
    let err = |status: u16, category: &str, message: &str| {
        Answer::json(
            status,
            json!({"status": "error", "message": message, "correlationId": "sandbox", "category": category}),
            format!("refused: {category}: {message}"),
        )
    };
    if req.bearer() != Some(sb.creds.hubspot_token.as_str()) {
        return err(
            401,
            "INVALID_AUTHENTICATION",
            "Authentication credentials not found.",
        );
    }
    let Some(b) = req.json() else {
        return err(400, "VALIDATION_ERROR", "Invalid input JSON");
    };
    let strings_only = |props: &Value| {
        props
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string))
    };
    if req.method == "POST" && req.path == "/crm/v3/objects/contacts/batch/upsert" {
        let inputs = b["inputs"].as_array().cloned().unwrap_or_default();
        if inputs.is_empty() || inputs.len() > 100 {
            return err(400, "VALIDATION_ERROR", "inputs must hold 1 to 100 items");
        }
        let mut results = Vec::new();
        let mut who = Vec::new();
        for i in &inputs {
            if i["idProperty"] != "email" || !i["id"].is_string() || !strings_only(&i["properties"])
            {
                return err(
                    400,
                    "VALIDATION_ERROR",
                    "each input needs idProperty email, an id and string property values",
                );
            }
            let email = i["id"].as_str().unwrap_or_default().to_string();
            let mut seen = sb.idempotency.lock().expect("sandbox lock");
            let key = format!("hubspot:{email}");
            let new = !seen.contains_key(&key);
            let id = seen
                .entry(key)
                .or_insert_with(|| json!((500 + sb.next_id()).to_string()))
                .clone();
            results.push(json!({"id": id, "new": new, "properties": i["properties"]}));
            who.push(email);
        }
        return Answer::json(
            200,
            json!({"status": "COMPLETE", "results": results}),
            format!("contact upsert: {}", who.join(", ")),
        );
    }
    if req.method == "PATCH" && req.path.starts_with("/crm/v3/objects/contacts/") {
        if req.query.get("idProperty").map(String::as_str) != Some("email") {
            return err(
                400,
                "VALIDATION_ERROR",
                "idProperty=email is required to address a contact by e-mail",
            );
        }
        if !strings_only(&b["properties"]) {
            return err(
                400,
                "VALIDATION_ERROR",
                "Property values were not valid: values must be strings",
            );
        }
        let email = req
            .path
            .trim_start_matches("/crm/v3/objects/contacts/")
            .to_string();
        let email = percent_decode(&email);
        let seen = sb.idempotency.lock().expect("sandbox lock");
        return match seen.get(&format!("hubspot:{email}")) {
            Some(id) => Answer::json(
                200,
                json!({"id": id, "properties": b["properties"]}),
                format!("contact {email} updated: {}", b["properties"]),
            ),
            None => err(404, "OBJECT_NOT_FOUND", "resource not found"),
        };
    }
    err(404, "OBJECT_NOT_FOUND", "no such endpoint")
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Square Loyalty: Bearer token, `Square-Version`, `idempotency_key` on every write.
/// The one customer of the sandbox's Square seller (`fixtures/square/payment-updated.json`).
const SQUARE_CUSTOMER: &str = "4VQ8D2K6ZW1T3HNM7PXR9CBY5G";

fn square(sb: &Sandbox, req: &Req) -> Answer {
    let err = |status: u16, category: &str, code: &str, detail: &str| {
        Answer::json(
            status,
            json!({"errors": [{"category": category, "code": code, "detail": detail}]}),
            format!("refused: {code}: {detail}"),
        )
    };
    if req.bearer() != Some(sb.creds.square_token.as_str()) {
        return err(
            401,
            "AUTHENTICATION_ERROR",
            "UNAUTHORIZED",
            "This request could not be authorized.",
        );
    }
    // Accumulate and redeem require a location (the Loyalty API's request schemas).
    let no_location = |b: &Value| {
        let given = b["location_id"].as_str().is_some_and(|l| !l.is_empty());
        (!given).then(|| {
            err(
                400,
                "INVALID_REQUEST_ERROR",
                "MISSING_REQUIRED_PARAMETER",
                "location_id is required",
            )
        })
    };
    if req.header("square-version").is_none() {
        return err(
            400,
            "INVALID_REQUEST_ERROR",
            "BAD_REQUEST",
            "Square-Version header is required",
        );
    }
    if let Some(id) = req.path.strip_prefix("/v2/customers/") {
        if req.method != "GET" {
            return err(
                404,
                "INVALID_REQUEST_ERROR",
                "NOT_FOUND",
                "no such endpoint",
            );
        }
        // The sandbox seller has one customer: the buyer of the shipped Square fixtures.
        if id != SQUARE_CUSTOMER {
            return err(
                404,
                "INVALID_REQUEST_ERROR",
                "NOT_FOUND",
                &format!("Customer with ID `{id}` not found."),
            );
        }
        return Answer::json(
            200,
            json!({"customer": {"id": id, "given_name": "Ada", "family_name": "Lovelace", "email_address": "ada@example.com", "phone_number": "+15555550123", "created_at": "2025-02-11T09:30:00Z", "updated_at": "2026-11-20T10:15:00Z", "preferences": {"email_unsubscribed": false}, "creation_source": "THIRD_PARTY", "version": 3}}),
            format!("read customer {id}"),
        );
    }
    let Some(b) = req.json() else {
        return err(
            400,
            "INVALID_REQUEST_ERROR",
            "INVALID_VALUE",
            "Invalid JSON",
        );
    };
    let p = req.path.as_str();
    if p == "/v2/loyalty/accounts/search" {
        let phone = b["query"]["mappings"][0]["phone_number"]
            .as_str()
            .unwrap_or("");
        if phone.is_empty() {
            return err(
                400,
                "INVALID_REQUEST_ERROR",
                "MISSING_REQUIRED_PARAMETER",
                "query.mappings or query.customer_ids is required",
            );
        }
        return Answer::json(
            200,
            json!({"loyalty_accounts": [{"id": format!("acct-{}", phone.trim_start_matches('+')), "program_id": "prog-sandbox", "balance": 120, "lifetime_points": 480, "mapping": {"phone_number": phone}}]}),
            format!("loyalty account found for {phone}"),
        )
        .read();
    }
    let Some(key) = b["idempotency_key"]
        .as_str()
        .filter(|k| (1..=128).contains(&k.len()))
    else {
        return err(
            400,
            "INVALID_REQUEST_ERROR",
            "MISSING_REQUIRED_PARAMETER",
            "idempotency_key is required (1-128 characters)",
        );
    };
    let mut seen = sb.idempotency.lock().expect("sandbox lock");
    let stored_key = format!("square:{key}");
    if let Some(prior) = seen.get(&stored_key) {
        if prior["request"] != b {
            return err(
                400,
                "INVALID_REQUEST_ERROR",
                "IDEMPOTENCY_KEY_REUSED",
                "The idempotency key was used with a different request.",
            );
        }
        return Answer::json(
            200,
            prior["response"].clone(),
            format!("repeated idempotency_key {key}: the original answer"),
        );
    }
    let id = sb.next_id();
    let (response, summary) = if let Some(acct) = p
        .strip_prefix("/v2/loyalty/accounts/")
        .and_then(|r| r.strip_suffix("/accumulate"))
    {
        let points = b["accumulate_points"]["points"].as_i64();
        if points.is_none() && !b["accumulate_points"]["order_id"].is_string() {
            return err(
                400,
                "INVALID_REQUEST_ERROR",
                "MISSING_REQUIRED_PARAMETER",
                "accumulate_points.points or order_id is required",
            );
        }
        if points.is_some_and(|p| p < 1) {
            return err(
                400,
                "INVALID_REQUEST_ERROR",
                "INVALID_VALUE",
                "accumulate_points.points must be at least 1",
            );
        }
        if let Some(missing) = no_location(&b) {
            return missing;
        }
        (
            json!({"events": [{"id": format!("lev-{id}"), "type": "ACCUMULATE_POINTS", "loyalty_account_id": acct, "accumulate_points": b["accumulate_points"]}]}),
            format!("{} points accumulated on {acct}", points.unwrap_or(0)),
        )
    } else if p == "/v2/loyalty/rewards" {
        let r = &b["reward"];
        let present = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
        if !present(&r["loyalty_account_id"]) || !present(&r["reward_tier_id"]) {
            return err(
                400,
                "INVALID_REQUEST_ERROR",
                "MISSING_REQUIRED_PARAMETER",
                "reward.loyalty_account_id and reward.reward_tier_id are required",
            );
        }
        (
            json!({"reward": {"id": format!("rwd-{id}"), "status": "ISSUED", "loyalty_account_id": r["loyalty_account_id"], "reward_tier_id": r["reward_tier_id"], "points": 100}}),
            format!("reward created on {}", r["loyalty_account_id"]),
        )
    } else if let Some(rid) = p
        .strip_prefix("/v2/loyalty/rewards/")
        .and_then(|r| r.strip_suffix("/redeem"))
    {
        if let Some(missing) = no_location(&b) {
            return missing;
        }
        (
            json!({"event": {"id": format!("lev-{id}"), "type": "REDEEM_REWARD", "redeem_reward": {"reward_id": rid}}}),
            format!("reward {rid} redeemed"),
        )
    } else {
        return err(
            404,
            "INVALID_REQUEST_ERROR",
            "NOT_FOUND",
            "no such endpoint",
        );
    };
    seen.insert(stored_key, json!({"request": b, "response": response}));
    Answer::json(200, response, summary)
}
