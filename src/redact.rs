//! Personal data out of everything people read. The config's `pii_fields` names fields
//! (`email`, `phone`, `first_name`, …; matched case-insensitively at any depth). For one
//! event, the values of those fields in its payload are the event's personal data: wherever
//! the event shows up — its payload, its trace (variables, step details, error messages),
//! its jobs' `with`, a dry run's output, a log line — a field with such a name and any
//! occurrence of such a value become `[redacted]`. Jobs keep the real values in the store:
//! they are what gets sent.
//!
//! Credentials are another matter: they never reach events or traces, and every sink client
//! redacts its own (`SinkClient::redact`).

use serde_json::Value as Json;

pub const MASK: &str = "[redacted]";

/// The configured personal-data fields.
#[derive(Debug, Clone, Default)]
pub struct Pii {
    fields: Vec<String>,
}

impl Pii {
    pub fn new(fields: &[String]) -> Pii {
        Pii {
            fields: fields.iter().map(|f| f.to_ascii_lowercase()).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    fn sensitive(&self, key: &str) -> bool {
        self.fields.iter().any(|f| f.eq_ignore_ascii_case(key))
    }

    /// The personal data of one event: the values of sensitive fields in its payload.
    pub fn of(&self, payload: &Json) -> Values {
        let mut out = Vec::new();
        if !self.is_empty() {
            self.collect(payload, false, &mut out);
        }
        Values {
            pii: self.clone(),
            values: normalised(out),
        }
    }

    fn collect(&self, v: &Json, inside: bool, out: &mut Vec<String>) {
        match v {
            Json::Object(m) => {
                for (k, x) in m {
                    self.collect(x, inside || self.sensitive(k), out);
                }
            }
            Json::Array(items) => items.iter().for_each(|x| self.collect(x, inside, out)),
            Json::String(s) if inside && s.chars().count() >= 3 => out.push(s.clone()),
            Json::Number(n) if inside && n.to_string().len() >= 3 => out.push(n.to_string()),
            _ => {}
        }
    }
}

/// Each value also URL- and form-encoded (a vendor request shows `To=%2B1555…`), longest
/// first so that a value containing another is replaced whole, without repeats.
fn normalised(values: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(values.len() * 2);
    for v in values {
        let form: String = form_urlencoded::byte_serialize(v.as_bytes()).collect();
        if form != v {
            out.push(form);
        }
        out.push(v);
    }
    out.sort_by_key(|v: &String| std::cmp::Reverse(v.len()));
    out.dedup();
    out
}

/// One event's personal data, ready to mask.
#[derive(Debug, Clone, Default)]
pub struct Values {
    pii: Pii,
    values: Vec<String>,
}

impl Values {
    /// Values known to be personal data (a job's, recorded when it was created).
    pub fn listed(values: Vec<String>) -> Values {
        Values {
            pii: Pii::default(),
            values: normalised(values),
        }
    }

    /// These values and `other`'s (an event's, and what its lookups read).
    pub fn merged(&self, other: Values) -> Values {
        let mut all = self.values.clone();
        all.extend(other.values);
        Values {
            pii: if self.pii.is_empty() {
                other.pii
            } else {
                self.pii.clone()
            },
            values: normalised(all),
        }
    }

    /// The values (what a job records to mask its own reasons and answers).
    pub fn list(&self) -> &[String] {
        &self.values
    }

    /// `text` with every value masked.
    pub fn text(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), MASK);
            }
        }
        out
    }

    /// `v` with sensitive fields and every value masked.
    pub fn json(&self, v: &Json) -> Json {
        if self.pii.is_empty() && self.values.is_empty() {
            return v.clone();
        }
        match v {
            Json::Object(m) => Json::Object(
                m.iter()
                    .map(|(k, x)| {
                        let masked = if self.pii.sensitive(k) && !x.is_null() {
                            Json::String(MASK.into())
                        } else {
                            self.json(x)
                        };
                        (k.clone(), masked)
                    })
                    .collect(),
            ),
            Json::Array(items) => Json::Array(items.iter().map(|x| self.json(x)).collect()),
            Json::String(s) => Json::String(self.text(s)),
            Json::Number(n) if self.values.iter().any(|v| *v == n.to_string()) => {
                Json::String(MASK.into())
            }
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_and_their_values_are_masked_wherever_they_appear() {
        let pii = Pii::new(&["email".into(), "Phone".into(), "first_name".into()]);
        let payload = json!({
            "email": "ada@example.com",
            "total_price": "125.50",
            "customer": {"first_name": "Ada", "phone": "+15555550123", "id": 7},
            "note_attributes": [{"name": "x", "value": "y"}]
        });
        let v = pii.of(&payload);
        let masked = v.json(&payload);
        assert_eq!(masked["email"], MASK);
        assert_eq!(masked["customer"]["phone"], MASK);
        assert_eq!(masked["customer"]["first_name"], MASK);
        assert_eq!(masked["customer"]["id"], 7);
        assert_eq!(masked["total_price"], "125.50");
        // Elsewhere (a job's `with`, a step's detail, an error), by value.
        let with =
            json!({"to": "+15555550123", "body": "Hi Ada, ada@example.com earned 1255 points"});
        assert_eq!(
            v.json(&with),
            json!({"to": MASK, "body": "Hi [redacted], [redacted] earned 1255 points"})
        );
        // A job carries its event's values: its reason and answers are masked by value.
        let job = Values::listed(v.list().to_vec());
        assert_eq!(
            job.text("21211: invalid 'To' number +15555550123"),
            "21211: invalid 'To' number [redacted]"
        );
        assert_eq!(v.text("bad phone +15555550123"), "bad phone [redacted]");
        // Encoded as a vendor request carries it.
        assert_eq!(
            v.text("To=%2B15555550123&Email=ada%40example.com"),
            "To=[redacted]&Email=[redacted]"
        );
        // "Ada" is 3 characters: masked too.
        assert_eq!(v.text("Ada"), MASK);
    }

    #[test]
    fn nothing_configured_changes_nothing() {
        let v = Pii::default().of(&json!({"email": "ada@example.com"}));
        let x = json!({"email": "ada@example.com"});
        assert_eq!(v.json(&x), x);
        assert_eq!(v.text("ada@example.com"), "ada@example.com");
    }
}
