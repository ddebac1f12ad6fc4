//! The gift-card rewards API (eGifter B2B v1): `POST /v1/Tokens` (headers Email +
//! AccessToken) -> bearer token; `GET /v1/Products` (paged) and `GET /v1/Products/{id}`; `POST /v1/Orders` with `PONumber` as
//! idempotency key (409 + the first order's Id on a repeat), 422 when the prefunded balance
//! is short; orders go Pending -> Completed and call `WebhookSettings.FulfillmentComplete`;
//! `GET /v1/Orders[/{id}]`.

use super::{Answer, Req, Sandbox};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const TOKEN_LIFETIME: u64 = 3600;

#[derive(Default)]
pub struct Orders {
    pub tokens: HashMap<String, Instant>,
    pub by_id: HashMap<String, Value>,
    pub by_po: HashMap<String, String>,
    /// Money spent from the prefunded account (USD).
    pub spent: f64,
}

/// The prefunded account's balance (USD).
pub const BALANCE: f64 = 5_000.0;

pub fn catalog() -> Value {
    json!([
        {"Id": "CVS", "Name": "CVS Pharmacy", "Denominations": [5, 10, 20, 25, 50], "DenominationType": "Fixed", "AvailableDeliveryTypes": ["DigitalDelivery", "Links"], "Type": "Digital", "CurrencyCode": "USD"},
        {"Id": "AMAZON", "Name": "Amazon.com", "Denominations": [10, 25, 50, 100], "DenominationType": "Fixed", "AvailableDeliveryTypes": ["DigitalDelivery", "Links"], "Type": "Digital", "CurrencyCode": "USD"},
        {"Id": "STARBUCKS", "Name": "Starbucks", "Denominations": [5, 10, 15, 25], "DenominationType": "Fixed", "AvailableDeliveryTypes": ["DigitalDelivery", "Links", "PhysicalShipment"], "Type": "Digital", "CurrencyCode": "USD"},
        {"Id": "VISA-PHYSICAL", "Name": "Visa prepaid card", "Denominations": [25, 50, 100], "DenominationType": "Fixed", "AvailableDeliveryTypes": ["PhysicalShipment"], "Type": "Physical", "CurrencyCode": "USD"}
    ])
}

fn err(status: u16, message: &str) -> Answer {
    Answer::json(
        status,
        json!({"Message": message}),
        format!("refused: {message}"),
    )
}

pub(crate) async fn handle(sb: &Sandbox, req: &Req) -> Answer {
    if req.method == "POST" && req.path == "/v1/Tokens" {
        if req.header("email") != Some(sb.creds.giftcard_email.as_str())
            || req.header("accesstoken") != Some(sb.creds.giftcard_access_token.as_str())
        {
            return err(401, "Invalid credentials");
        }
        let token = format!("gc-token-{:016x}", sb.next_id());
        sb.giftcard.lock().expect("sandbox lock").tokens.insert(
            token.clone(),
            Instant::now() + Duration::from_secs(TOKEN_LIFETIME),
        );
        return Answer::json(
            200,
            json!({"Value": token, "ExpiresIn": TOKEN_LIFETIME}),
            "token issued",
        )
        .read();
    }
    let valid = req.bearer().is_some_and(|t| {
        sb.giftcard
            .lock()
            .expect("sandbox lock")
            .tokens
            .get(t)
            .is_some_and(|until| Instant::now() < *until)
    });
    if !valid {
        return err(401, "Missing or invalid token");
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/Products") => products(req),
        ("GET", p) if p.starts_with("/v1/Products/") => {
            let id = &p["/v1/Products/".len()..];
            let all = catalog();
            match all
                .as_array()
                .and_then(|l| l.iter().find(|x| x["Id"] == id))
            {
                Some(product) => Answer::json(200, product.clone(), format!("product {id} read")),
                None => err(404, "Product not found"),
            }
        }
        ("GET", "/v1/Orders") => {
            let orders = sb.giftcard.lock().expect("sandbox lock");
            let mut list: Vec<Value> = orders.by_id.values().cloned().collect();
            if let Some(po) = req.query.get("PONumber").or(req.query.get("poNumber")) {
                list.retain(|o| o["PONumber"] == po.as_str());
            }
            Answer::json(200, Value::Array(list), "orders listed")
        }
        ("GET", p) if p.starts_with("/v1/Orders/") => {
            let id = &p["/v1/Orders/".len()..];
            match sb.giftcard.lock().expect("sandbox lock").by_id.get(id) {
                Some(o) => Answer::json(200, o.clone(), format!("order {id} is {}", o["Status"])),
                None => err(404, "Order not found"),
            }
        }
        ("POST", "/v1/Orders") => order(sb, req),
        _ => err(404, "Not found"),
    }
}

/// The product list, paged as the vendor pages it (`pageIndex` from 0, `pageSize`).
fn products(req: &Req) -> Answer {
    let all = catalog();
    let list = all.as_array().cloned().unwrap_or_default();
    let number = |k: &str, default: usize| {
        req.query
            .get(k)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(default)
    };
    let (index, size) = (number("pageIndex", 0), number("pageSize", 10).clamp(1, 100));
    let page: Vec<Value> = list.into_iter().skip(index * size).take(size).collect();
    Answer::json(200, Value::Array(page), "catalog page read")
}

fn order(sb: &Sandbox, req: &Req) -> Answer {
    if req.content_type() != "application/json" {
        return err(415, "Content-Type must be application/json");
    }
    let Some(b) = req.json() else {
        return err(400, "The request body is not valid JSON");
    };
    let Some(po) = b["PONumber"].as_str().filter(|p| !p.is_empty()) else {
        return err(400, "PONumber is required");
    };
    let kind = b["Type"].as_str().unwrap_or("");
    if !matches!(kind, "DigitalDelivery" | "Links" | "PhysicalShipment") {
        return err(
            400,
            "Type must be DigitalDelivery, Links or PhysicalShipment",
        );
    }
    let items = b["LineItems"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return err(400, "At least one line item is required");
    }
    let mut orders = sb.giftcard.lock().expect("sandbox lock");
    if let Some(id) = orders.by_po.get(po) {
        return Answer::json(
            409,
            json!({"Id": id, "Message": "Duplicate PONumber"}),
            format!("order {po} already placed (409, order {id})"),
        );
    }
    let catalog = catalog();
    let mut total = 0.0;
    let mut lines = Vec::new();
    for (i, li) in items.iter().enumerate() {
        let pid = li["ProductId"].as_str().unwrap_or("");
        let Some(product) = catalog
            .as_array()
            .and_then(|c| c.iter().find(|p| p["Id"] == pid))
        else {
            return err(400, &format!("LineItems[{i}]: unknown product `{pid}`"));
        };
        let value = li["Value"].as_f64().unwrap_or(0.0);
        let qty = li["Quantity"].as_u64().unwrap_or(0);
        if qty == 0 {
            return err(400, &format!("LineItems[{i}]: Quantity must be at least 1"));
        }
        if !product["Denominations"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x.as_f64() == Some(value)))
        {
            return err(
                400,
                &format!("LineItems[{i}]: {value} is not a denomination of {pid}"),
            );
        }
        if !product["AvailableDeliveryTypes"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == kind))
        {
            return err(
                400,
                &format!("LineItems[{i}]: {pid} cannot be delivered as {kind}"),
            );
        }
        match kind {
            "DigitalDelivery"
                if li["DigitalDeliveryAddress"]["Email"].as_str().is_none()
                    && li["DigitalDeliveryAddress"]["Phone"].as_str().is_none() =>
            {
                return err(
                    400,
                    &format!("LineItems[{i}]: DigitalDeliveryAddress needs Email or Phone"),
                );
            }
            "PhysicalShipment" if !li["ShippingAddress"].is_object() => {
                return err(
                    400,
                    &format!("LineItems[{i}]: ShippingAddress is required for PhysicalShipment"),
                );
            }
            _ => {}
        }
        total += value * qty as f64;
        lines.push(format!("{qty} x {pid} {value}"));
    }
    if orders.spent + total > BALANCE {
        return err(422, "Insufficient funds in the prefunded account");
    }
    orders.spent += total;
    let id = format!("ord-{:08}", sb.next_id());
    let links: Vec<Value> = if kind == "Links" {
        (0..items.len())
            .map(|i| json!(format!("https://claim.sandbox.invalid/{id}/{i}")))
            .collect()
    } else {
        Vec::new()
    };
    let order = json!({"Id": id, "PONumber": po, "Type": kind, "Status": "Pending", "LineItems": items, "Total": total, "ClaimLinks": links});
    orders.by_id.insert(id.clone(), order.clone());
    orders.by_po.insert(po.to_string(), id.clone());
    drop(orders);
    fulfil_later(
        sb,
        &id,
        b["WebhookSettings"]["FulfillmentComplete"]
            .as_str()
            .map(str::to_string),
    );
    let to = items[0]["DigitalDeliveryAddress"]["Email"]
        .as_str()
        .or(items[0]["DigitalDeliveryAddress"]["Phone"].as_str())
        .unwrap_or(if kind == "Links" {
            "claim link"
        } else {
            "postal address"
        });
    Answer::json(
        201,
        order,
        format!(
            "gift-card order {id} ({}) for {to}, PONumber {po}: Pending",
            lines.join(", ")
        ),
    )
}

/// Completes the order after `fulfil_after` and calls its fulfilment URL.
fn fulfil_later(sb: &Sandbox, id: &str, callback: Option<String>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let id = id.to_string();
    let delay = sb.fulfil_after;
    let http = sb.http.clone();
    let sb_orders = SandboxRef::from(sb);
    handle.spawn(async move {
        tokio::time::sleep(delay).await;
        let done = sb_orders.with(|sb| {
            let mut o = sb.giftcard.lock().expect("sandbox lock");
            o.by_id.get_mut(&id).map(|order| {
                order["Status"] = json!("Completed");
                order.clone()
            })
        });
        if let (Some(order), Some(url)) = (done, callback) {
            let _ = http.post(url).json(&json!({"OrderId": order["Id"], "PONumber": order["PONumber"], "Status": "Completed"})).send().await;
        }
    });
}

/// A clone of the sandbox's `Arc`, recovered from a reference (the handlers only get `&`).
struct SandboxRef(Option<std::sync::Arc<Sandbox>>);

impl SandboxRef {
    fn from(sb: &Sandbox) -> SandboxRef {
        SandboxRef(sb.me.upgrade())
    }
    fn with<T>(&self, f: impl FnOnce(&Sandbox) -> Option<T>) -> Option<T> {
        self.0.as_deref().and_then(f)
    }
}
