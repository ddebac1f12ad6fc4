//! Domain filters for loyalty integrators: money in every vendor format, decimal rounding
//! modes, dates in time zones, hashing, e-mail and phone normalisation. Pure functions; an
//! input they cannot handle is an error, never a guess.

use crate::pipeline::expr::MAX_VALUE;
use minijinja::value::{Kwargs, StringInput, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};
use sha2::{Digest, Sha256};
use std::str::FromStr;

pub fn register(env: &mut Environment<'static>) {
    env.add_filter("money", money);
    env.add_filter("round_to", round_to);
    env.add_filter("sha256", sha256);
    env.add_filter("b64encode", b64encode);
    env.add_filter("stringify_values", stringify_values);
    env.add_filter("email", email);
    env.add_filter("e164", e164);
    env.add_filter("datetime", datetime);
    env.add_filter("add_days", add_days);
    env.add_filter("add_hours", add_hours);
    env.add_filter("strftime", strftime);
    env.add_filter("unix", unix);
}

/// minijinja's built-ins whose result grows with a number they are given rather than with
/// their input get that number checked against [`MAX_VALUE`] first; the work stays
/// minijinja's. `format` is removed: its widths and precisions, inside the format string, are
/// unbounded.
pub fn register_bounded(env: &mut Environment<'static>) {
    env.add_filter("indent", indent);
    env.add_filter("tojson", tojson);
    env.add_filter("slice", slice);
    env.add_filter("replace", replace);
    env.add_filter("batch", batch);
    env.add_filter("join", join);
    env.remove_filter("format");
}

/// `slice` and `batch` make (or fill up to) `count` items: as many as `range` allows.
fn at_most_lists(what: &str, count: usize) -> Result<(), Error> {
    if count > 100_000 {
        return Err(too_large(what));
    }
    Ok(())
}

/// `batch(count, fill)`: lists of `count` items, the last one filled up to `count`.
fn batch(
    state: &State,
    value: Value,
    count: usize,
    fill_with: Option<Value>,
) -> Result<Value, Error> {
    at_most_lists("batch", count)?;
    minijinja::filters::batch(state, value, count, fill_with)
}

/// `join(separator)`: the separator goes between every two items.
fn join(
    state: &mut State,
    value: &Value,
    joiner: Option<StringInput<'_>>,
    attribute: Option<&str>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let sep = joiner.as_ref().map_or(0, |j| j.as_str().len());
    if sep > 0 {
        let items = match value.len() {
            Some(n) => n,
            None => value
                .try_iter()
                .map(|i| i.take(MAX_VALUE + 1).count())
                .unwrap_or(0),
        };
        if items.saturating_sub(1).saturating_mul(sep) > MAX_VALUE {
            return Err(too_large("join"));
        }
    }
    minijinja::filters::join(state, value, joiner, attribute, kwargs)
}

fn too_large(what: &str) -> Error {
    bad(format!(
        "{what}: the result would be larger than {} KiB",
        MAX_VALUE / 1024
    ))
}

/// `indent(width)`: every line gets `width` spaces.
fn indent(
    value: StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let w = match width {
        Some(w) => w,
        None => kwargs.get::<Option<usize>>("width")?.unwrap_or(4),
    };
    let lines = value.as_str().bytes().filter(|&b| b == b'\n').count() + 1;
    let size = lines
        .checked_mul(w)
        .and_then(|n| n.checked_add(value.as_str().len()));
    if size.is_none_or(|n| n > MAX_VALUE) {
        return Err(too_large("indent"));
    }
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

/// `tojson(indent)`: each nesting level gets `indent` spaces per line.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let width = match &indent {
        Some(i) => Some(i.clone()),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    if let Some(w) = width.filter(|w| w.kind() == ValueKind::Number) {
        if w.as_usize().is_none_or(|n| n > 16) {
            return Err(bad("tojson: indent is at most 16"));
        }
    }
    minijinja::filters::tojson(value, indent, kwargs)
}

/// `slice(count)`: `count` lists.
fn slice(
    state: &State,
    value: Value,
    count: usize,
    fill_with: Option<Value>,
) -> Result<Value, Error> {
    at_most_lists("slice", count)?;
    minijinja::filters::slice(state, value, count, fill_with)
}

/// `replace(from, to)`: every occurrence of `from` (between any two characters when it is
/// empty) becomes `to`.
fn replace(
    state: &mut State,
    value: StringInput<'_>,
    from: StringInput<'_>,
    to: StringInput<'_>,
) -> Result<Value, Error> {
    let (text, f, t) = (value.as_str(), from.as_str(), to.as_str());
    if t.len() > f.len() {
        let hits = if f.is_empty() {
            text.chars().count() + 1
        } else {
            text.matches(f).count()
        };
        let size = hits
            .checked_mul(t.len() - f.len())
            .and_then(|n| n.checked_add(text.len()));
        if size.is_none_or(|n| n > MAX_VALUE) {
            return Err(too_large("replace"));
        }
    }
    minijinja::filters::replace(state, value, from, to)
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// Digits after the decimal point of an ISO 4217 currency (USD 2, JPY 0, KWD 3).
fn exponent(currency: &str) -> Result<u32, Error> {
    let c = iso_currency::Currency::from_code(&currency.to_ascii_uppercase())
        .ok_or_else(|| bad(format!("unknown currency `{currency}`")))?;
    Ok(c.exponent().unwrap_or(0) as u32)
}

fn decimal(v: &Value) -> Result<Decimal, Error> {
    match v.kind() {
        ValueKind::String => Decimal::from_str(v.as_str().unwrap_or_default().trim())
            .map_err(|_| bad(format!("`{v}` is not a decimal number"))),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                Ok(Decimal::from(i))
            } else {
                Decimal::from_str(&v.to_string())
                    .map_err(|_| bad(format!("`{v}` is not a decimal number")))
            }
        }
        _ => Err(bad(format!("`{v}` is not a number"))),
    }
}

fn field(map: &Value, key: &str) -> Option<Value> {
    map.get_attr(key)
        .ok()
        .filter(|v| !v.is_undefined() && !v.is_none())
}

/// An amount in any vendor format -> `{minor, currency, major}` (`minor` an exact integer).
///
/// - `"123.45" | money("USD")` — Shopify, WooCommerce decimal strings (major units);
/// - `4599 | money("usd")` — Stripe and Square integers are minor units;
/// - `{amount, currency}` (Square `amount_money`), `{value, currency_code}` (PayPal v2),
///   `{total, currency}` (PayPal v1), or a `money` result itself.
fn money(v: Value, currency: Option<String>) -> Result<Value, Error> {
    // Major units (a decimal string) -> exact minor units, without overflow.
    let to_minor = |major: &Value, code: &str| -> Result<Decimal, Error> {
        decimal(major)?
            .checked_mul(Decimal::from(10i64.pow(exponent(code)?)))
            .ok_or_else(|| bad(format!("`{major}` is out of range")))
    };
    let (minor, code) = if v.kind() == ValueKind::Map {
        let c = field(&v, "currency")
            .or_else(|| field(&v, "currency_code"))
            .map(|c| c.to_string());
        if let (Some(minor), Some(c)) = (field(&v, "minor"), c.clone()) {
            (decimal(&minor)?, c)
        } else if let (Some(amount), Some(c)) = (field(&v, "amount"), c.clone()) {
            // Square's integer `amount` is in minor units; a decimal string (Shopify's
            // `{amount, currency_code}`) is in major units.
            if amount.kind() == ValueKind::String {
                (to_minor(&amount, &c)?, c)
            } else {
                (decimal(&amount)?, c)
            }
        } else {
            match (field(&v, "value").or_else(|| field(&v, "total")), c) {
                (Some(m), Some(c)) => (to_minor(&m, &c)?, c),
                _ => return Err(bad(format!("`{v}` has no amount and currency"))),
            }
        }
    } else {
        let code = currency.ok_or_else(|| bad("money needs a currency: `x | money('USD')`"))?;
        match v.kind() {
            ValueKind::String => (to_minor(&v, &code)?, code),
            ValueKind::Number if v.as_i64().is_some() => (decimal(&v)?, code),
            _ => {
                return Err(bad(format!(
                    "`{v}`: use a decimal string (major units) or an integer (minor units)"
                )))
            }
        }
    };
    let exp = exponent(&code)?;
    if minor.fract() != Decimal::ZERO {
        return Err(bad(format!("`{v}` has more decimals than {code} allows")));
    }
    let minor = minor
        .to_i64()
        .ok_or_else(|| bad(format!("`{v}` is out of range")))?;
    let major = Decimal::new(minor, exp).to_string();
    Ok(Value::from(minijinja::value::Serde(serde_json::json!({
        "minor": minor,
        "currency": code.to_ascii_uppercase(),
        "major": major,
    }))))
}

/// `x | round_to(places=0, mode="half_even")`; modes: half_even, half_up, half_down, floor,
/// ceil, down (toward zero), up (away from zero). Integer when `places` is 0.
fn round_to(v: Value, places: Option<u32>, mode: Option<String>) -> Result<Value, Error> {
    let d = if v.kind() == ValueKind::Map {
        field(&v, "major").map(|m| decimal(&m)).transpose()?
    } else {
        None
    };
    let d = match d {
        Some(d) => d,
        None => decimal(&v)?,
    };
    let strategy = match mode.as_deref().unwrap_or("half_even") {
        "half_even" => RoundingStrategy::MidpointNearestEven,
        "half_up" => RoundingStrategy::MidpointAwayFromZero,
        "half_down" => RoundingStrategy::MidpointTowardZero,
        "floor" => RoundingStrategy::ToNegativeInfinity,
        "ceil" => RoundingStrategy::ToPositiveInfinity,
        "down" => RoundingStrategy::ToZero,
        "up" => RoundingStrategy::AwayFromZero,
        other => {
            return Err(bad(format!(
            "unknown rounding mode `{other}`: half_even, half_up, half_down, floor, ceil, down, up"
        )))
        }
    };
    let places = places.unwrap_or(0);
    let r = d.round_dp_with_strategy(places, strategy);
    if places == 0 {
        r.to_i64()
            .map(Value::from)
            .ok_or_else(|| bad("result out of range"))
    } else {
        r.to_f64()
            .map(Value::from)
            .ok_or_else(|| bad("result out of range"))
    }
}

fn sha256(v: Value) -> String {
    let text = v
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string());
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Standard base64 of the text (HTTP Basic credentials).
fn b64encode(v: Value) -> String {
    use base64::Engine;
    let text = v
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string());
    base64::engine::general_purpose::STANDARD.encode(text.as_bytes())
}

/// A map with every value as a string (HubSpot properties): numbers as decimals, booleans
/// as `true`/`false`. A none is left out: HubSpot clears a property given "", and a field the
/// event lacks (a customer without a last name) must not erase what the CRM knows. Write
/// `""` to clear one on purpose.
fn stringify_values(v: Value) -> Result<Value, Error> {
    if v.kind() != ValueKind::Map {
        return Err(bad(format!("`{v}` is not a map")));
    }
    let mut out: indexmap::IndexMap<Value, Value> = indexmap::IndexMap::new();
    for key in v.try_iter()? {
        let item = v.get_item(&key)?;
        let text = match item.kind() {
            ValueKind::None | ValueKind::Undefined => continue,
            ValueKind::String => item.as_str().unwrap_or_default().to_string(),
            ValueKind::Bool => item.is_true().to_string(),
            ValueKind::Map | ValueKind::Seq => {
                return Err(bad(format!("property `{key}` is not a single value")))
            }
            _ => item.to_string(),
        };
        out.insert(key.clone(), Value::from(text));
    }
    Ok(Value::from_object(out))
}

/// Trimmed, lower-cased e-mail address; an error if it is not one.
fn email(v: Value) -> Result<String, Error> {
    let s = v
        .as_str()
        .ok_or_else(|| bad(format!("`{v}` is not an e-mail address")))?
        .trim()
        .to_lowercase();
    let valid = matches!(s.split_once('@'), Some((local, domain))
        if !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
            && !s.contains(char::is_whitespace) && s.matches('@').count() == 1);
    if valid {
        Ok(s)
    } else {
        Err(bad(format!("`{s}` is not an e-mail address")))
    }
}

/// A phone number in E.164 (`+15555550123`); `region` (ISO 3166, default US) for national
/// formats. It normalises the format; it does not decide whether the number is assigned.
fn e164(v: Value, region: Option<String>) -> Result<String, Error> {
    let raw = v
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string());
    let region = region.unwrap_or_else(|| "US".into());
    let id = phonenumber::country::Id::from_str(&region.to_ascii_uppercase())
        .map_err(|_| bad(format!("unknown region `{region}`")))?;
    let n = phonenumber::parse(Some(id), raw.trim())
        .map_err(|_| bad(format!("`{raw}` is not a phone number")))?;
    // Formatting only: whether a number is assigned is the SMS provider's call (fictional
    // 555-01xx numbers, new ranges), but a number too short to dial is an error.
    let e164 = n.format().mode(phonenumber::Mode::E164).to_string();
    // An international number must keep every digit it was given.
    if raw.trim().starts_with('+') {
        let given: String = raw.chars().filter(char::is_ascii_digit).collect();
        if e164.trim_start_matches('+') != given {
            return Err(bad(format!("`{raw}` is not a well-formed phone number")));
        }
    }
    if n.national().value().to_string().len() < 7 {
        return Err(bad(format!("`{raw}` is too short to be a phone number")));
    }
    Ok(n.format().mode(phonenumber::Mode::E164).to_string())
}

/// RFC 3339 text or Unix seconds -> a zoned time.
fn zoned(v: &Value, tz: &str) -> Result<jiff::Zoned, Error> {
    let ts = match v.kind() {
        ValueKind::Number => {
            let secs = v
                .as_i64()
                .ok_or_else(|| bad(format!("`{v}` is not Unix seconds")))?;
            jiff::Timestamp::from_second(secs).map_err(|e| bad(e.to_string()))?
        }
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            s.parse::<jiff::Timestamp>()
                .map_err(|e| bad(format!("`{s}` is not an RFC 3339 time: {e}")))?
        }
        _ => return Err(bad(format!("`{v}` is not a time"))),
    };
    let zone = jiff::tz::TimeZone::get(tz).map_err(|_| bad(format!("unknown time zone `{tz}`")))?;
    Ok(ts.to_zoned(zone))
}

/// `t | datetime(tz="UTC")`: RFC 3339 in `tz`.
fn datetime(v: Value, tz: Option<String>) -> Result<String, Error> {
    let tz = tz.unwrap_or_else(|| "UTC".into());
    Ok(zoned(&v, &tz)?
        .timestamp()
        .display_with_offset(zoned(&v, &tz)?.offset())
        .to_string())
}

/// `t | add_days(n, tz="UTC")`: calendar days in `tz` (a day across a DST change is 23 or 25 h).
fn add_days(v: Value, n: i64, tz: Option<String>) -> Result<String, Error> {
    let tz = tz.unwrap_or_else(|| "UTC".into());
    let z = zoned(&v, &tz)?;
    let later = z
        .checked_add(
            jiff::Span::new()
                .try_days(n)
                .map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
    Ok(later
        .timestamp()
        .display_with_offset(later.offset())
        .to_string())
}

fn add_hours(v: Value, n: i64) -> Result<String, Error> {
    let z = zoned(&v, "UTC")?;
    let later = z
        .checked_add(
            jiff::Span::new()
                .try_hours(n)
                .map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
    Ok(later.timestamp().to_string())
}

/// `t | strftime("%Y-%m-%d", tz="UTC")`.
fn strftime(v: Value, fmt: String, tz: Option<String>) -> Result<String, Error> {
    let z = zoned(&v, &tz.unwrap_or_else(|| "UTC".into()))?;
    jiff::fmt::strtime::format(fmt.as_str(), &z).map_err(|e| bad(format!("format `{fmt}`: {e}")))
}

/// `t | unix`: seconds since the epoch.
fn unix(v: Value) -> Result<i64, Error> {
    Ok(zoned(&v, "UTC")?.timestamp().as_second())
}

#[cfg(test)]
mod tests {
    use crate::pipeline::expr::Engine;
    use serde_json::{json, Value as Json};

    fn eval(src: &str, ctx: Json) -> Result<Json, String> {
        let e = Engine::new();
        let f = e.field(src)?;
        e.eval(&f, &ctx)
    }

    #[test]
    fn stringify_values_makes_strings_and_leaves_out_nones() {
        let got = eval(
            "{{ p | stringify_values }}",
            json!({"p": {"a": null, "b": 1, "c": true, "d": "", "e": 2.5}}),
        )
        .unwrap();
        assert_eq!(got, json!({"b": "1", "c": "true", "d": "", "e": "2.5"}));
        assert!(eval("{{ p | stringify_values }}", json!({"p": {"x": [1]}})).is_err());
    }

    #[test]
    fn money_reads_every_vendor_format_exactly() {
        let ctx = json!({
            "shopify": {"total_price": "125.50", "currency": "USD"},
            "stripe": {"amount_paid": 2999, "currency": "usd"},
            "square": {"amount_money": {"amount": 4599, "currency": "USD"}},
            "paypal2": {"amount": {"value": "59.00", "currency_code": "EUR"}},
            "paypal1": {"amount": {"total": "19.99", "currency": "USD"}},
            "yen": "1200", "kwd": "1.234"
        });
        let cases: &[(&str, Json)] = &[
            (
                "{{ (shopify.total_price | money(shopify.currency)).minor }}",
                json!(12550),
            ),
            (
                "{{ (stripe.amount_paid | money(stripe.currency)).major }}",
                json!("29.99"),
            ),
            ("{{ (square.amount_money | money).minor }}", json!(4599)),
            ("{{ (paypal2.amount | money).minor }}", json!(5900)),
            ("{{ (paypal2.amount | money).currency }}", json!("EUR")),
            ("{{ (paypal1.amount | money).minor }}", json!(1999)),
            (
                "{{ ({'amount': '12.30', 'currency_code': 'USD'} | money).minor }}",
                json!(1230),
            ),
            ("{{ (yen | money('JPY')).minor }}", json!(1200)),
            ("{{ (kwd | money('KWD')).minor }}", json!(1234)),
            (
                "{{ (shopify.total_price | money('USD') | money).minor }}",
                json!(12550),
            ),
        ];
        for (src, want) in cases {
            assert_eq!(
                &eval(src, ctx.clone()).unwrap_or_else(|e| panic!("{src}: {e}")),
                want,
                "{src}"
            );
        }
        for bad in [
            "{{ '12.345' | money('USD') }}",
            "{{ 'abc' | money('USD') }}",
            "{{ '1.00' | money('XXY') }}",
            "{{ '1.00' | money }}",
            "{{ 1.5 | money('USD') }}",
            "{{ '79228162514264337593543950335' | money('KWD') }}",
        ] {
            assert!(eval(bad, json!({})).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn rounding_modes() {
        let cases: &[(&str, Json)] = &[
            ("{{ '2.5' | round_to }}", json!(2)),
            ("{{ '3.5' | round_to }}", json!(4)),
            ("{{ '2.5' | round_to(0, 'half_up') }}", json!(3)),
            ("{{ '2.5' | round_to(0, 'half_down') }}", json!(2)),
            ("{{ '-2.5' | round_to(0, 'floor') }}", json!(-3)),
            ("{{ '2.1' | round_to(0, 'ceil') }}", json!(3)),
            ("{{ '-2.9' | round_to(0, 'down') }}", json!(-2)),
            ("{{ '2.1' | round_to(0, 'up') }}", json!(3)),
            ("{{ '1.005' | round_to(2, 'half_up') }}", json!(1.01)),
            ("{{ (125.5 * 10) | round_to }}", json!(1255)),
            (
                "{{ ('125.55' | money('USD')) | round_to(0, 'floor') }}",
                json!(125),
            ),
        ];
        for (src, want) in cases {
            assert_eq!(
                &eval(src, json!({})).unwrap_or_else(|e| panic!("{src}: {e}")),
                want,
                "{src}"
            );
        }
        assert!(eval("{{ 1 | round_to(0, 'sideways') }}", json!({})).is_err());
    }

    #[test]
    fn identity_filters() {
        let cases: &[(&str, Json)] = &[
            (
                "{{ ' Ada@Example.COM ' | email }}",
                json!("ada@example.com"),
            ),
            ("{{ '(415) 555-2671' | e164 }}", json!("+14155552671")),
            ("{{ '030 1234567' | e164('DE') }}", json!("+49301234567")),
            ("{{ '+44 20 7946 0958' | e164 }}", json!("+442079460958")),
            ("{{ '+1 555-555-0123' | e164 }}", json!("+15555550123")),
            (
                "{{ 'abc' | sha256 }}",
                json!("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            ),
        ];
        for (src, want) in cases {
            assert_eq!(
                &eval(src, json!({})).unwrap_or_else(|e| panic!("{src}: {e}")),
                want,
                "{src}"
            );
        }
        for bad in [
            "{{ 'not-an-email' | email }}",
            "{{ 'a@b' | email }}",
            "{{ '123' | e164 }}",
            "{{ '+800 1234 5678' | e164 }}",
            "{{ 'x' | e164('ZZ') }}",
        ] {
            assert!(eval(bad, json!({})).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn dates_in_time_zones() {
        let ctx = json!({"t": "2026-03-07T23:30:00Z", "created": 1700000000});
        let cases: &[(&str, Json)] = &[
            (
                "{{ t | datetime('America/New_York') }}",
                json!("2026-03-07T18:30:00-05:00"),
            ),
            (
                "{{ t | add_days(1, 'America/New_York') }}",
                json!("2026-03-08T18:30:00-04:00"),
            ),
            ("{{ t | add_hours(2) }}", json!("2026-03-08T01:30:00Z")),
            (
                "{{ t | strftime('%Y-%m-%d', 'Asia/Tokyo') }}",
                json!("2026-03-08"),
            ),
            (
                "{{ created | datetime }}",
                json!("2023-11-14T22:13:20+00:00"),
            ),
            ("{{ t | unix }}", json!(1772926200)),
        ];
        for (src, want) in cases {
            assert_eq!(
                &eval(src, ctx.clone()).unwrap_or_else(|e| panic!("{src}: {e}")),
                want,
                "{src}"
            );
        }
        assert!(eval("{{ t | datetime('Mars/Olympus') }}", ctx.clone()).is_err());
        assert!(eval("{{ t | add_days(99999999999) }}", ctx.clone()).is_err());
        assert!(eval("{{ t | add_hours(99999999999) }}", ctx.clone()).is_err());
        assert!(eval("{{ 'yesterday' | unix }}", ctx).is_err());
    }
}
