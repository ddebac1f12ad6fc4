//! Connector definitions as data: `connectors/*.yaml`, compiled in, overridable by a user's
//! connectors dir. A definition only picks closed kinds (see `verify`) and fills their
//! parameters; no Rust code branches on a connector id.

use crate::config::diagnostic::Diagnostics;
use crate::config::scalar::{DurationSpec, Names};
use crate::config::yaml::Document;
use indexmap::IndexMap;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub mod sink;
pub use sink::{ActionDef, ParamDef, SinkDef};

/// The built-in definitions, as shipped in `connectors/`.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "connectors/shopify.yaml",
        include_str!("../../connectors/shopify.yaml"),
    ),
    (
        "connectors/woocommerce.yaml",
        include_str!("../../connectors/woocommerce.yaml"),
    ),
    (
        "connectors/stripe.yaml",
        include_str!("../../connectors/stripe.yaml"),
    ),
    (
        "connectors/square.yaml",
        include_str!("../../connectors/square.yaml"),
    ),
    (
        "connectors/paypal.yaml",
        include_str!("../../connectors/paypal.yaml"),
    ),
    (
        "connectors/quickbooks.yaml",
        include_str!("../../connectors/quickbooks.yaml"),
    ),
    (
        "connectors/giftcard.yaml",
        include_str!("../../connectors/giftcard.yaml"),
    ),
    (
        "connectors/twilio_sms.yaml",
        include_str!("../../connectors/twilio_sms.yaml"),
    ),
    (
        "connectors/sendgrid.yaml",
        include_str!("../../connectors/sendgrid.yaml"),
    ),
    (
        "connectors/klaviyo.yaml",
        include_str!("../../connectors/klaviyo.yaml"),
    ),
    (
        "connectors/slack.yaml",
        include_str!("../../connectors/slack.yaml"),
    ),
    (
        "connectors/zendesk.yaml",
        include_str!("../../connectors/zendesk.yaml"),
    ),
    (
        "connectors/bookings.yaml",
        include_str!("../../connectors/bookings.yaml"),
    ),
    (
        "connectors/hubspot.yaml",
        include_str!("../../connectors/hubspot.yaml"),
    ),
    (
        "connectors/square_loyalty.yaml",
        include_str!("../../connectors/square_loyalty.yaml"),
    ),
    (
        "connectors/webhook.yaml",
        include_str!("../../connectors/webhook.yaml"),
    ),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorDef {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub docs: Option<String>,
    #[serde(default)]
    pub source: Option<SourceDef>,
    #[serde(default)]
    pub sink: Option<SinkDef>,
    /// Filled in by the loader: where the definition came from.
    #[serde(skip)]
    pub file: PathBuf,
}

/// How a source's webhooks are verified and identified.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceDef {
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub verify: VerifyKind,
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub identify: IdentifyKind,
    /// Event types this source is known to emit (for did-you-mean and the docs).
    #[serde(default)]
    pub events: Vec<String>,
    /// The shape of every event type the vendor may send (an anchored regex): a pipeline may
    /// subscribe to a type not in `events` if it has this shape and is not a near-miss of a
    /// listed one (a typo).
    #[serde(default)]
    pub event_names: Option<EventNames>,
    /// An unsigned request that only checks the endpoint exists (WooCommerce's creation ping).
    #[serde(default)]
    pub ping: Option<PingDef>,
}

/// A regex every event type of a vendor matches, whole.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct EventNames(regex::Regex);

impl TryFrom<String> for EventNames {
    type Error = String;
    fn try_from(pattern: String) -> Result<Self, String> {
        regex::Regex::new(&format!("^(?:{pattern})$"))
            .map(EventNames)
            .map_err(|e| format!("`{pattern}` is not a regular expression: {e}"))
    }
}

impl SourceDef {
    /// Whether a pipeline may subscribe to `event`; else why not.
    pub fn subscribable(&self, event: &str) -> Result<(), String> {
        if self.events.iter().any(|e| e == event) {
            return Ok(());
        }
        // Within two edits of a known type: a typo, not another event.
        let near = self
            .events
            .iter()
            .filter(|e| strsim::levenshtein(e, event) <= 2)
            .min_by_key(|e| strsim::levenshtein(e, event));
        if let Some(near) = near {
            return Err(format!("did you mean `{near}`?"));
        }
        match &self.event_names {
            Some(names) if names.0.is_match(event) => Ok(()),
            Some(names) => Err(format!(
                "its event types have the shape `{}`",
                names
                    .0
                    .as_str()
                    .trim_start_matches("^(?:")
                    .trim_end_matches(")$")
            )),
            None => Err(crate::config::diagnostic::did_you_mean(
                event,
                self.events.iter().map(String::as_str),
            )
            .map(|s| format!("did you mean `{s}`?"))
            .unwrap_or_default()),
        }
    }
}

/// The closed set of verification kinds.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VerifyKind {
    /// HMAC-SHA256 of the body (or signed URL + body), in a header.
    HmacSha256(HmacDef),
    /// `t=<unix>,v1=<hex>[,v1=…]` over `t.body`, with a freshness window.
    StripeV1(StripeDef),
    /// PayPal's transmission signature: offline (`verify: cert`) or remote (`verify: api`).
    Paypal(PaypalDef),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacDef {
    /// Header names that may carry the signature (first present wins).
    pub header: Names,
    pub encoding: Encoding,
    #[serde(default)]
    pub signs: Signs,
    /// How the configured secret is turned into the key.
    #[serde(default)]
    pub key: KeyForm,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Base64,
    Hex,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Signs {
    #[default]
    Body,
    /// The notification URL exactly as registered, then the body (Square).
    UrlAndBody,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyForm {
    /// The secret's bytes as configured.
    #[default]
    Raw,
    /// HTML entities decoded first (`&amp;` -> `&`), as WordPress does before signing.
    HtmlEntityDecoded,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeDef {
    pub header: Names,
    #[serde(default = "default_tolerance")]
    pub tolerance: DurationSpec,
}

fn default_tolerance() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(300))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaypalDef {
    /// Hosts a `PAYPAL-CERT-URL` may name; anything else is refused before any fetch.
    pub cert_hosts: Vec<String>,
    /// The cert URL's path must start with this.
    pub cert_path_prefix: String,
    /// The certificate's subject CN must end with this.
    pub cert_cn_suffix: String,
    /// PayPal REST API base for `verify: api`.
    pub api_base_url: String,
}

/// How vendor event id, type and time are found in a verified request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum IdentifyKind {
    /// One event per request; each field from a header or a JSON pointer.
    Fields(FieldsDef),
    /// Intuit webhooks: a CloudEvents array, or the legacy `eventNotifications` envelope,
    /// split into one event per entity change.
    IntuitBatch {},
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldsDef {
    pub id: Selector,
    pub r#type: Selector,
    #[serde(default)]
    pub time: Option<Selector>,
}

/// Where a value is found.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Selector {
    /// The first of these headers that is present.
    Header(Names),
    /// A JSON pointer into the body (`/data/id`).
    Json(String),
    /// Several selectors joined with `:` (a composite key).
    Compose(Vec<Selector>),
    /// The first of these selectors that finds a value (bodies of several shapes).
    First(Vec<Selector>),
}

/// Where a selector looks, for messages: "header `x-a` or `x-b`", "body field `/id`".
impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Selector::Header(names) => {
                let quoted: Vec<String> = names.0.iter().map(|n| format!("`{n}`")).collect();
                write!(f, "header {}", quoted.join(" or "))
            }
            Selector::Json(pointer) => write!(f, "body field `{pointer}`"),
            Selector::Compose(parts) => {
                let all: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
                f.write_str(&all.join(", "))
            }
            Selector::First(options) => {
                let all: Vec<String> = options.iter().map(|p| p.to_string()).collect();
                f.write_str(&all.join("; or "))
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingDef {
    /// A form body of exactly this one field with a numeric value.
    pub form_field: String,
}

/// All connector definitions by id.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub defs: IndexMap<String, ConnectorDef>,
}

impl Registry {
    /// The built-in definitions, then every `*.yaml` in `dirs` (a file with the same id replaces
    /// the built-in one).
    pub fn load(dirs: &[PathBuf], diags: &mut Diagnostics) -> Registry {
        let mut reg = Registry::default();
        for (file, text) in BUILTIN {
            reg.add(Path::new(file), text, diags);
        }
        for (f, text) in crate::config::yaml_files(dirs, "connectors", diags) {
            // The shipped connectors dir holds the built-in files themselves.
            if !BUILTIN.iter().any(|(_, b)| *b == text) {
                reg.add(&f, &text, diags);
            }
        }
        reg
    }

    fn add(&mut self, file: &Path, text: &str, diags: &mut Diagnostics) {
        let doc = match Document::index(file, text) {
            Ok(d) => d,
            Err(d) => return diags.push(d),
        };
        match doc.parse::<ConnectorDef>() {
            Ok(mut def) => {
                def.file = file.to_path_buf();
                if def.source.is_none() && def.sink.is_none() {
                    diags.push(doc.at("", "a connector needs a `source:` or a `sink:` part"));
                }
                if let Some(sink) = &def.sink {
                    for name in sink.params.keys() {
                        if name == "connector"
                            || crate::config::SINK_SETTINGS.contains(&name.as_str())
                        {
                            diags.push(doc.at_key(
                                &format!("sink.params.{name}"),
                                format!("`{name}` is taken by every sink; choose another parameter name"),
                            ));
                        }
                    }
                }
                if let Some(src) = &def.source {
                    check_source_def(&doc, src, diags);
                }
                if let Some(sink) = &def.sink {
                    check_sink_def(&doc, sink, diags);
                }
                if let Some(sink) = &mut def.sink {
                    note_with_reads(text, sink);
                }
                self.defs.insert(def.id.clone(), def);
            }
            Err(d) => diags.push(d),
        }
    }

    pub fn get(&self, id: &str) -> Option<&ConnectorDef> {
        self.defs.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.defs.keys().map(|s| s.as_str())
    }

    /// Ids of the connectors that can be sources.
    pub fn source_ids(&self) -> impl Iterator<Item = &str> {
        self.defs
            .values()
            .filter(|d| d.source.is_some())
            .map(|d| d.id.as_str())
    }

    /// Ids of the connectors that can be sinks.
    pub fn sink_ids(&self) -> impl Iterator<Item = &str> {
        self.defs
            .values()
            .filter(|d| d.sink.is_some())
            .map(|d| d.id.as_str())
    }
}

/// Templates compile and name only `params`, `with` and `job`; the lease outlives the
/// timeout; the rate parses.
/// Records on each action what it reads of a deliver step's `with:` (for `check`).
fn note_with_reads(text: &str, sink: &mut SinkDef) {
    let Ok(raw) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return;
    };
    let part = &raw["sink"];
    let shared = [&part["base_url"], &part["auth"], &part["headers"]];
    for (name, action) in sink.actions.iter_mut() {
        action.reads = Some(sink::WithReads::of(
            &part["actions"][name.as_str()],
            &shared,
        ));
    }
}

fn check_sink_def(doc: &Document, sink: &SinkDef, diags: &mut Diagnostics) {
    let engine = crate::pipeline::expr::Engine::new();
    let known = ["params", "with", "job"];
    for (path, src) in sink.templates() {
        if let Err(m) = engine.field(&src) {
            diags.push(doc.at(&path, m));
            continue;
        }
        let globals = ["range", "dict", "namespace", "debug"];
        for var in engine.variable_paths(&src) {
            let mut parts = var.splitn(2, '.');
            let top = parts.next().unwrap_or_default();
            if !known.contains(&top) && !globals.contains(&top) {
                diags.push(doc.at(
                    &path,
                    format!("`{top}` is not known here; connector templates see `params`, `with` and `job`"),
                ));
            } else if top == "params" {
                if let Some(p) = parts.next() {
                    let p = p.split('.').next().unwrap_or(p);
                    if !sink.params.contains_key(p) {
                        diags.push(doc.at(
                            &path,
                            format!("`params.{p}` is not a parameter of this sink"),
                        ));
                    }
                }
            }
        }
    }
    let l = &sink.limits;
    if l.lease.0 <= l.timeout.0 {
        diags.push(doc.at(
            "sink.limits.lease",
            format!(
                "the lease ({}) must be longer than the timeout ({}): otherwise a job could be claimed again while its request is still running",
                humantime::format_duration(l.lease.0),
                humantime::format_duration(l.timeout.0)
            ),
        ));
    }
    if l.concurrency == 0 {
        diags.push(doc.at("sink.limits.concurrency", "must be at least 1"));
    }
    if let Some(r) = &l.rate {
        if crate::config::parse_rate(r).is_none() {
            diags.push(doc.at(
                "sink.limits.rate",
                format!("`{r}` is not a rate: use requests per second (`10`) or `N/s`, `N/min`, `N/10s`"),
            ));
        }
    }
    if sink.retry.max_attempts == 0 {
        diags.push(doc.at("sink.retry.max_attempts", "must be at least 1"));
    }
}

fn check_source_def(doc: &Document, src: &SourceDef, diags: &mut Diagnostics) {
    let mut check_selector = |path: &str, sel: &Selector| {
        fn walk(sel: &Selector, out: &mut Vec<String>) {
            match sel {
                Selector::Json(p) if !p.is_empty() && !p.starts_with('/') => {
                    out.push(format!("JSON pointer `{p}` must start with `/`"))
                }
                Selector::Compose(parts) if parts.is_empty() => {
                    out.push("`compose` needs at least one part".into())
                }
                Selector::First(options) if options.is_empty() => {
                    out.push("`first` needs at least one selector".into())
                }
                Selector::Compose(parts) | Selector::First(parts) => {
                    parts.iter().for_each(|p| walk(p, out))
                }
                _ => {}
            }
        }
        let mut problems = Vec::new();
        walk(sel, &mut problems);
        for p in problems {
            diags.push(doc.at(path, p));
        }
    };
    if let IdentifyKind::Fields(f) = &src.identify {
        check_selector("source.identify.fields.id", &f.id);
        check_selector("source.identify.fields.type", &f.r#type);
        if let Some(t) = &f.time {
            check_selector("source.identify.fields.time", t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any type of the vendor's shape may be subscribed to (vendors have hundreds, and add
    /// more); a near-miss of a known one, or another shape, is refused.
    #[test]
    fn pipelines_subscribe_to_any_type_of_the_vendors_shape_but_not_to_typos() {
        let mut diags = Diagnostics::default();
        let reg = Registry::load(&[], &mut diags);
        assert!(diags.is_empty(), "{diags}");
        let ok = |c: &str, ev: &str| {
            reg.get(c)
                .unwrap()
                .source
                .as_ref()
                .unwrap()
                .subscribable(ev)
        };
        for (c, ev) in [
            ("stripe", "invoice.payment_succeeded"),
            ("stripe", "product.created"),
            ("stripe", "billing.meter.error_report_triggered"),
            ("shopify", "orders/edited"),
            ("shopify", "products/update"),
            ("paypal", "CUSTOMER.DISPUTE.CREATED"),
            ("paypal", "VAULT.PAYMENT-TOKEN.CREATED"),
            ("square", "invoice.payment_made"),
            ("woocommerce", "action.woocommerce_payment_complete"),
            ("woocommerce", "product.deleted"),
            ("quickbooks", "qbo.bill.created.v1"),
        ] {
            assert_eq!(ok(c, ev), Ok(()), "{c} {ev}");
        }
        assert_eq!(
            ok("shopify", "orders/payed"),
            Err("did you mean `orders/paid`?".into())
        );
        assert_eq!(
            ok("stripe", "invoice.pad"),
            Err("did you mean `invoice.paid`?".into())
        );
        assert_eq!(
            ok("shopify", "orders.paid"),
            Err("did you mean `orders/paid`?".into())
        );
        let shape = ok("shopify", "checkout.completed").unwrap_err();
        assert!(shape.contains("`[a-z_]+/[a-z_]+`"), "{shape}");
        assert!(
            ok("woocommerce", "order.completed").is_err(),
            "a status, not a topic"
        );
        assert!(ok("paypal", "payment.capture.completed").is_err());
        assert!(ok("quickbooks", "invoice.created").is_err());
    }

    #[test]
    fn each_action_knows_what_it_reads_of_with() {
        let mut diags = Diagnostics::default();
        let reg = Registry::load(&[], &mut diags);
        let reads = |connector: &str, action: &str| {
            reg.get(connector).unwrap().sink.as_ref().unwrap().actions[action]
                .reads
                .clone()
                .unwrap()
        };
        let sms = reads("twilio_sms", "send_sms");
        assert!(!sms.whole);
        assert_eq!(
            sms.keys.iter().map(String::as_str).collect::<Vec<_>>(),
            ["body", "media_url", "to"]
        );
        // Whole-object use, shared parts and other variables that start with `with`.
        let action: serde_yaml::Value = serde_yaml::from_str(
            "path: \"/x/{{ with.id }}\"\nbody: { a: \"{{ with.deep.er }}\", b: [\"{{ without }}\"] }",
        )
        .unwrap();
        let header: serde_yaml::Value =
            serde_yaml::from_str("{ X-Key: \"{{ with.key | default('') }}\" }").unwrap();
        let r = sink::WithReads::of(&action, &[&header]);
        assert!(!r.whole);
        assert_eq!(
            r.keys.iter().map(String::as_str).collect::<Vec<_>>(),
            ["deep", "id", "key"]
        );
        let whole: serde_yaml::Value =
            serde_yaml::from_str("body: \"{{ with | tojson }}\"").unwrap();
        assert!(sink::WithReads::of(&whole, &[]).whole);
    }

    #[test]
    fn builtin_connectors_load_without_problems() {
        let mut diags = Diagnostics::default();
        let reg = Registry::load(&[], &mut diags);
        assert!(diags.is_empty(), "{diags}");
        let ids: Vec<&str> = reg.source_ids().collect();
        assert_eq!(
            ids,
            [
                "shopify",
                "woocommerce",
                "stripe",
                "square",
                "paypal",
                "quickbooks"
            ]
        );
        assert!(reg
            .defs
            .values()
            .filter_map(|d| d.source.as_ref())
            .all(|s| !s.events.is_empty()));
        let sinks: Vec<&str> = reg.sink_ids().collect();
        assert_eq!(
            sinks,
            [
                "quickbooks",
                "giftcard",
                "twilio_sms",
                "sendgrid",
                "klaviyo",
                "slack",
                "zendesk",
                "bookings",
                "hubspot",
                "square_loyalty",
                "webhook"
            ]
        );
    }

    #[test]
    fn user_dir_overrides_a_builtin_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("shopify.yaml"),
            "id: shopify\nsource:\n  verify: { hmac_sha256: { header: X-Custom, encoding: hex } }\n  identify: { fields: { id: { header: X-Id }, type: { header: X-Topic } } }\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bad.yaml"),
            "id: bad\nsource:\n  verify: { hmac_sha265: {} }\n",
        )
        .unwrap();
        let mut diags = Diagnostics::default();
        let reg = Registry::load(&[dir.path().to_path_buf()], &mut diags);
        let VerifyKind::HmacSha256(h) =
            &reg.get("shopify").unwrap().source.as_ref().unwrap().verify
        else {
            panic!("override not applied")
        };
        assert_eq!(h.encoding, Encoding::Hex);
        assert_eq!(diags.len(), 1, "{diags}");
        let d = &diags.0[0];
        assert_eq!((d.line, d.col), (3, 13), "{d}");
        assert!(d.message.contains("did you mean `hmac_sha256`"), "{d}");
    }
}
