//! The promo-code bookings API of the loyalty platform (seed 004): `POST /api/bookings`
//! with `email`, `external_id` (the member id), names and `package_specifications` creates
//! a booking standing for the member's account and answers it with a generated, unique
//! `promo_code`; `GET /api/bookings/{id}` reads one back. Bearer API key.

use super::{Answer, Req, Sandbox};
use serde_json::{json, Value};

fn err(status: u16, message: &str, errors: Value) -> Answer {
    Answer::json(
        status,
        json!({"message": message, "errors": errors}),
        format!("refused: {message}"),
    )
}

pub(crate) fn handle(sb: &Sandbox, req: &Req) -> Answer {
    if req.bearer() != Some(sb.creds.bookings_key.as_str()) {
        return err(401, "Unauthenticated.", json!({}));
    }
    if req.method == "GET" {
        let Some(id) = req.path.strip_prefix("/api/bookings/") else {
            return err(404, "Not found.", json!({}));
        };
        let found = sb
            .bookings
            .lock()
            .expect("sandbox lock")
            .iter()
            .find(|b| b["id"] == id)
            .cloned();
        return match found {
            Some(b) => Answer::json(200, json!({ "data": b }), format!("booking {id} read")).read(),
            None => err(404, "Booking not found.", json!({})),
        };
    }
    if req.method != "POST" || req.path != "/api/bookings" {
        return err(404, "Not found.", json!({}));
    }
    if req.content_type() != "application/json" {
        return err(415, "The request body must be JSON.", json!({}));
    }
    let Some(body) = req.json() else {
        return err(400, "The request body is not valid JSON.", json!({}));
    };
    let mut errors = serde_json::Map::new();
    let email = body["email"].as_str().unwrap_or("");
    if !email.contains('@') || email.contains(char::is_whitespace) {
        errors.insert(
            "email".into(),
            json!(["The email must be a valid email address."]),
        );
    }
    let external_id = body["external_id"].as_str().unwrap_or("");
    if external_id.is_empty() {
        errors.insert(
            "external_id".into(),
            json!(["The external id field is required."]),
        );
    }
    match body["package_specifications"].as_array() {
        Some(specs) if !specs.is_empty() => {
            for (i, s) in specs.iter().enumerate() {
                let resolvable = s["package_id"].is_string()
                    || s["size"].is_string()
                    || s["destination"].is_string();
                if !resolvable {
                    errors.insert(
                        format!("package_specifications.{i}"),
                        json!([
                            "Each package specification needs a package_id, size or destination."
                        ]),
                    );
                }
            }
        }
        _ => {
            errors.insert(
                "package_specifications".into(),
                json!(["The package specifications field must be a non-empty array."]),
            );
        }
    }
    if !errors.is_empty() {
        return err(422, "The given data was invalid.", Value::Object(errors));
    }
    let n = sb.next_id();
    let booking = json!({
        "id": format!("bk_{n:08}"),
        "external_id": external_id,
        "email": email,
        "first_name": body["first_name"],
        "last_name": body["last_name"],
        "package_specifications": body["package_specifications"],
        "promo_code": format!("PROMO-{:08X}", (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32),
        "status": "confirmed",
    });
    sb.bookings
        .lock()
        .expect("sandbox lock")
        .push(booking.clone());
    let summary = format!(
        "booking {} for {external_id}: promo code {}",
        booking["id"].as_str().unwrap_or(""),
        booking["promo_code"].as_str().unwrap_or("")
    );
    Answer::json(201, json!({ "data": booking }), summary)
}
