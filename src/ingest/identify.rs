//! Vendor event id, type and time of a verified request, per the connector's identify kind.

use crate::connector::{FieldsDef, IdentifyKind, Selector};
use crate::verify::{header, RawRequest, Verified};
use bytes::Bytes;
use serde_json::{json, Value};

/// One event found in a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Identified {
    pub vendor_id: String,
    pub event_type: String,
    pub time: Option<String>,
    /// The event's bytes: the raw body, or one element of a batch.
    pub payload: Bytes,
}

/// Only verified requests are identified: their bodies may be parsed.
pub fn identify(
    kind: &IdentifyKind,
    req: &RawRequest<Verified>,
) -> Result<Vec<Identified>, String> {
    match kind {
        IdentifyKind::Fields(f) => fields(f, req).map(|e| vec![e]),
        IdentifyKind::IntuitBatch {} => intuit(&req.body),
    }
}

fn fields(f: &FieldsDef, req: &RawRequest<Verified>) -> Result<Identified, String> {
    let mut json: Option<Value> = None;
    let mut get = |sel: &Selector| select(sel, req, &mut json);
    let vendor_id = get(&f.id)?.ok_or_else(|| format!("no event id ({})", f.id))?;
    let event_type = get(&f.r#type)?.ok_or_else(|| format!("no event type ({})", f.r#type))?;
    let time = match &f.time {
        Some(t) => get(t)?,
        None => None,
    };
    // Pipelines see the event as JSON, parsed as the worker parses it: a body that is not
    // (invalid UTF-8, nested deeper than serde_json's limit of 128) is refused here even when
    // the ids come from headers. (Skipping it as `IgnoredAny` would check neither; building
    // a `Value` would cost three times as much.)
    if json.is_none() {
        serde_json::from_slice::<ValidJson>(&req.body)
            .map_err(|e| format!("body is not JSON: {e}"))?;
    }
    Ok(Identified {
        vendor_id,
        event_type,
        time,
        payload: req.body.clone(),
    })
}

/// Any JSON value, checked as serde_json parses a `Value` (strings valid UTF-8, nesting within
/// its recursion limit, nothing after the value) without building one.
struct ValidJson;

impl<'de> serde::Deserialize<'de> for ValidJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ValidJson, D::Error> {
        d.deserialize_any(ValidJson)
    }
}

impl<'de> serde::de::Visitor<'de> for ValidJson {
    type Value = ValidJson;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_i64<E>(self, _: i64) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_u64<E>(self, _: u64) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_f64<E>(self, _: f64) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_str<E>(self, _: &str) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_unit<E>(self) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<ValidJson, A::Error> {
        while a.next_element::<ValidJson>()?.is_some() {}
        Ok(ValidJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<ValidJson, A::Error> {
        while a.next_entry::<ValidJson, ValidJson>()?.is_some() {}
        Ok(ValidJson)
    }
}

fn select(
    sel: &Selector,
    req: &RawRequest<Verified>,
    json: &mut Option<Value>,
) -> Result<Option<String>, String> {
    match sel {
        Selector::Header(names) => Ok(header(&req.headers, &names.0)
            .map(str::to_string)
            .filter(|s| !s.is_empty())),
        Selector::Json(pointer) => {
            if json.is_none() {
                *json = Some(
                    serde_json::from_slice(&req.body)
                        .map_err(|e| format!("body is not JSON: {e}"))?,
                );
            }
            Ok(json
                .as_ref()
                .and_then(|v| v.pointer(pointer))
                .and_then(scalar))
        }
        Selector::Compose(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for p in parts {
                match select(p, req, json)? {
                    Some(v) => out.push(v),
                    None => return Ok(None),
                }
            }
            Ok(Some(out.join(":")))
        }
        Selector::First(options) => {
            for o in options {
                if let Some(v) = select(o, req, json)? {
                    return Ok(Some(v));
                }
            }
            Ok(None)
        }
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Intuit: a CloudEvents array, or the legacy `eventNotifications` envelope, normalised to
/// CloudEvents-shaped events so pipelines see one shape.
fn intuit(body: &[u8]) -> Result<Vec<Identified>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let mut out = Vec::new();
    match &doc {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let id = item
                    .get("id")
                    .and_then(scalar)
                    .ok_or(format!("event {i} has no id"))?;
                let ty = item
                    .get("type")
                    .and_then(scalar)
                    .ok_or(format!("event {i} has no type"))?;
                out.push(Identified {
                    vendor_id: id,
                    event_type: ty,
                    time: item.get("time").and_then(scalar),
                    payload: Bytes::from(serde_json::to_vec(item).expect("JSON value serialises")),
                });
            }
        }
        Value::Object(o) if o.contains_key("eventNotifications") => {
            let notes = o["eventNotifications"]
                .as_array()
                .ok_or("eventNotifications is not a list")?;
            for n in notes {
                let realm = n
                    .get("realmId")
                    .and_then(scalar)
                    .ok_or("notification without realmId")?;
                let entities = n
                    .pointer("/dataChangeEvent/entities")
                    .and_then(Value::as_array)
                    .ok_or("notification without dataChangeEvent.entities")?;
                for e in entities {
                    let field = |k: &str| {
                        e.get(k)
                            .and_then(scalar)
                            .ok_or(format!("entity without {k}"))
                    };
                    let (name, id, op, updated) = (
                        field("name")?,
                        field("id")?,
                        field("operation")?,
                        field("lastUpdated")?,
                    );
                    let ty = format!("qbo.{}.{}.v1", name.to_ascii_lowercase(), past_tense(&op));
                    let vendor_id = format!("{realm}:{name}:{id}:{op}:{updated}");
                    let event = json!({
                        "specversion": "1.0",
                        "id": vendor_id,
                        "type": ty,
                        "time": updated,
                        "intuitentityid": id,
                        "intuitaccountid": realm,
                        "data": {},
                        "legacy": e,
                    });
                    out.push(Identified {
                        vendor_id,
                        event_type: ty,
                        time: Some(updated),
                        payload: Bytes::from(
                            serde_json::to_vec(&event).expect("JSON value serialises"),
                        ),
                    });
                }
            }
        }
        _ => return Err("neither a CloudEvents array nor an eventNotifications envelope".into()),
    }
    if out.is_empty() {
        return Err("no events in the body".into());
    }
    Ok(out)
}

/// Legacy operation names to the CloudEvents verbs (`Update` -> `updated`).
fn past_tense(op: &str) -> String {
    let op = op.to_ascii_lowercase();
    match op.as_str() {
        "emailed" => op,
        o if o.ends_with('e') => format!("{o}d"),
        o => format!("{o}ed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cloudevents_batches() {
        let body = br#"[{"specversion":"1.0","id":"a1","type":"qbo.invoice.updated.v1","time":"t1","intuitentityid":"1","intuitaccountid":"9","data":{}},
                        {"specversion":"1.0","id":"a2","type":"qbo.payment.created.v1","intuitentityid":"2","intuitaccountid":"9","data":{}}]"#;
        let ev = intuit(body).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(
            (
                ev[0].vendor_id.as_str(),
                ev[0].event_type.as_str(),
                ev[0].time.as_deref()
            ),
            ("a1", "qbo.invoice.updated.v1", Some("t1"))
        );
        assert_eq!(ev[1].event_type, "qbo.payment.created.v1");
        let v: Value = serde_json::from_slice(&ev[1].payload).unwrap();
        assert_eq!(v["intuitentityid"], "2");
    }

    #[test]
    fn normalises_the_legacy_envelope() {
        let body = br#"{"eventNotifications":[{"realmId":"9","dataChangeEvent":{"entities":[
            {"name":"Invoice","id":"240611","operation":"Update","lastUpdated":"2026-11-20T10:15:30.000Z"},
            {"name":"Payment","id":"7","operation":"Create","lastUpdated":"2026-11-20T10:16:00.000Z"},
            {"name":"Invoice","id":"8","operation":"Void","lastUpdated":"2026-11-20T10:17:00.000Z"}]}}]}"#;
        let ev = intuit(body).unwrap();
        let types: Vec<&str> = ev.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "qbo.invoice.updated.v1",
                "qbo.payment.created.v1",
                "qbo.invoice.voided.v1"
            ]
        );
        assert_eq!(
            ev[0].vendor_id,
            "9:Invoice:240611:Update:2026-11-20T10:15:30.000Z"
        );
        let v: Value = serde_json::from_slice(&ev[0].payload).unwrap();
        assert_eq!(v["intuitaccountid"], "9");
        assert_eq!(v["legacy"]["operation"], "Update");
    }

    #[test]
    fn a_body_that_is_not_json_is_refused_even_with_header_ids() {
        let header = |n: &str| Selector::Header(crate::config::scalar::Names(vec![n.into()]));
        let def = FieldsDef {
            id: header("x-id"),
            r#type: header("x-topic"),
            time: None,
        };
        let mut h = axum::http::HeaderMap::new();
        h.insert("x-id", "1".parse().unwrap());
        h.insert("x-topic", "orders/paid".parse().unwrap());
        let req =
            |body: &[u8]| RawRequest::trusted_fixture(h.clone(), Bytes::copy_from_slice(body));
        assert!(fields(&def, &req(b"{\"a\":1}")).is_ok());
        let bad_utf8 = fields(&def, &req(b"{\"a\":\"\xff\xfe\"}")).unwrap_err();
        assert!(bad_utf8.contains("body is not JSON"), "{bad_utf8}");
        let deep = fields(&def, &req(&b"[".repeat(100_000))).unwrap_err();
        assert!(deep.contains("recursion limit"), "{deep}");
        let nest = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let deep = fields(&def, &req(nest.as_bytes())).unwrap_err();
        assert!(deep.contains("recursion limit"), "{deep}");
        assert!(fields(&def, &req(b"")).is_err());
    }

    /// WooCommerce sends a resource, a deleted resource's `{"id"}` alone, or an action
    /// topic's `{"action", "arg"}`: each gets an id (a 400 counts as a failed delivery, and
    /// WooCommerce disables a webhook after a few).
    #[test]
    fn the_woocommerce_connector_identifies_every_body_shape() {
        let mut diags = crate::config::diagnostic::Diagnostics::default();
        let reg = crate::connector::Registry::load(&[], &mut diags);
        assert!(diags.is_empty(), "{diags}");
        let src = reg.get("woocommerce").unwrap().source.clone().unwrap();
        let id = |topic: &str, body: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert("x-wc-webhook-topic", topic.parse().unwrap());
            let req = RawRequest::trusted_fixture(h, Bytes::copy_from_slice(body.as_bytes()));
            identify(&src.identify, &req).map(|e| (e[0].vendor_id.clone(), e[0].event_type.clone()))
        };
        assert_eq!(
            id(
                "order.updated",
                r#"{"id":727,"date_modified_gmt":"2026-11-20T10:15:30","status":"completed"}"#
            ),
            Ok(("727:2026-11-20T10:15:30".into(), "order.updated".into()))
        );
        assert_eq!(
            id("order.deleted", r#"{"id":727}"#),
            Ok(("order.deleted:727".into(), "order.deleted".into()))
        );
        assert_eq!(
            id(
                "action.woocommerce_order_status_completed",
                r#"{"action":"woocommerce_order_status_completed","arg":727}"#
            ),
            Ok((
                "action.woocommerce_order_status_completed:727".into(),
                "action.woocommerce_order_status_completed".into()
            ))
        );
        assert!(id("order.updated", r#"{"status":"completed"}"#).is_err());
    }

    #[test]
    fn refuses_other_shapes() {
        assert!(intuit(b"{}").is_err());
        assert!(intuit(b"[]").is_err());
        assert!(intuit(b"[{\"type\":\"x\"}]").is_err());
        assert!(intuit(b"not json").is_err());
    }
}
