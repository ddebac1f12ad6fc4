//! Unique single-use promo codes: generated from the operating system's CSPRNG (through
//! `rand`'s `ThreadRng`) over an alphabet without look-alikes (no 0/O, 1/I/L), with a
//! configurable prefix and length, in pools (`promo_codes:` in the config); generated in bulk
//! ahead or on demand, assigned to a member (idempotently: a step run again gets the same
//! code), redeemed exactly once (one sled transaction per redemption), voided, expired.

use crate::store::{Store, StoreError};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::time::Duration;

/// Characters a person reads without confusion.
pub const ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";

/// A pool's settings (`promo_codes.<pool>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    #[serde(default)]
    pub prefix: String,
    /// Random characters after the prefix (at least 8: 31^8 ≈ 8.5e11 codes).
    #[serde(default = "ten")]
    pub length: usize,
    /// How long a code stays valid after it is generated.
    #[serde(default, with = "humantime_serde_opt")]
    pub expires_after: Option<Duration>,
}

fn ten() -> usize {
    10
}

/// An optional duration written as `90d`, `12h`.
pub(crate) mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
    /// As every duration of the config (`DurationSpec`): an error names the expected form
    /// and is reported at the value.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<crate::config::scalar::DurationSpec> = Option::deserialize(d)?;
        Ok(s.map(|s| s.0))
    }
}

impl PoolSpec {
    pub fn check(&self, name: &str) -> Result<(), String> {
        if !(8..=32).contains(&self.length) {
            return Err(format!(
                "pool `{name}`: length is 8 to 32 random characters"
            ));
        }
        if self.prefix.len() > 32
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "pool `{name}`: a prefix is up to 32 letters, digits, `-` or `_`"
            ));
        }
        Ok(())
    }

    /// A new random code.
    pub fn generate(&self) -> String {
        let mut rng = rand::rng();
        let mut code = self.prefix.clone();
        for _ in 0..self.length {
            code.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
        }
        code
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeState {
    Available,
    Assigned,
    Redeemed,
    Void,
}

/// One code.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Code {
    pub code: String,
    pub pool: String,
    pub state: CodeState,
    pub member: Option<String>,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub assigned_at_ms: Option<u64>,
    pub redeemed_at_ms: Option<u64>,
    /// Who redeemed it (the API caller) and why it was voided.
    pub note: Option<String>,
    /// The order it was issued for (a refund of the order voids it while unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voided_at_ms: Option<u64>,
}

/// The index entry of a code issued for an order (in `code_keys`, apart from assignment
/// keys by its leading NUL).
fn order_key(order: &str, code: &str) -> Vec<u8> {
    let mut k = b"\0order\0".to_vec();
    k.extend_from_slice(order.as_bytes());
    k.push(0);
    k.extend_from_slice(code.as_bytes());
    k
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    #[error("no such code")]
    NotFound,
    #[error("the code was redeemed already")]
    Redeemed,
    #[error("the code expired")]
    Expired,
    #[error("the code was voided")]
    Void,
    #[error("{0}")]
    Invalid(String),
    #[error("store: {0}")]
    Store(String),
}

impl From<sled::Error> for CodeError {
    fn from(e: sled::Error) -> Self {
        CodeError::Store(e.to_string())
    }
}

impl From<StoreError> for CodeError {
    fn from(e: StoreError) -> Self {
        CodeError::Store(e.to_string())
    }
}

fn abort(e: CodeError) -> ConflictableTransactionError<CodeError> {
    ConflictableTransactionError::Abort(e)
}

fn read(raw: &[u8]) -> Result<Code, ConflictableTransactionError<CodeError>> {
    serde_json::from_slice(raw).map_err(|e| abort(CodeError::Store(e.to_string())))
}

fn write(c: &Code) -> Result<Vec<u8>, ConflictableTransactionError<CodeError>> {
    serde_json::to_vec(c).map_err(|e| abort(CodeError::Store(e.to_string())))
}

fn available_key(pool: &str, code: &str) -> Vec<u8> {
    let mut k = pool.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(code.as_bytes());
    k
}

/// Codes are written uppercase; people type them any way.
pub fn normalise(code: &str) -> String {
    code.trim().to_ascii_uppercase()
}

impl Store {
    /// Generates `count` new available codes in `pool`.
    pub fn generate_codes(
        &self,
        pool: &str,
        spec: &PoolSpec,
        count: usize,
        now_ms: u64,
    ) -> Result<Vec<String>, CodeError> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let code = spec.generate();
            let c = Code {
                code: code.clone(),
                pool: pool.to_string(),
                state: CodeState::Available,
                member: None,
                created_at_ms: now_ms,
                expires_at_ms: spec.expires_after.map(|d| now_ms + d.as_millis() as u64),
                assigned_at_ms: None,
                redeemed_at_ms: None,
                note: None,
                order: None,
                voided_at_ms: None,
            };
            let raw = serde_json::to_vec(&c).map_err(|e| CodeError::Store(e.to_string()))?;
            // A collision (vanishingly rare) is simply drawn again.
            if self
                .codes
                .compare_and_swap(code.as_bytes(), None as Option<&[u8]>, Some(raw))?
                .is_ok()
            {
                self.code_pool.insert(available_key(pool, &code), &[])?;
                out.push(code);
            }
        }
        self.db.flush()?;
        Ok(out)
    }

    /// The code assigned under `key` (a step of one event), taken from the pool's available
    /// codes or generated; the same key again returns the same code.
    pub fn assign_code(
        &self,
        pool: &str,
        spec: &PoolSpec,
        member: &str,
        key: &str,
        order: Option<&str>,
        now_ms: u64,
    ) -> Result<(Code, bool), CodeError> {
        if let Some(code) = self.code_keys.get(key.as_bytes())? {
            let c = self
                .codes
                .get(&code)?
                .ok_or_else(|| CodeError::Store("a key points at no code".into()))?;
            let c: Code =
                serde_json::from_slice(&c).map_err(|e| CodeError::Store(e.to_string()))?;
            return Ok((c, true));
        }
        for _ in 0..16 {
            // An available one first (skipping expired ones), else a new one.
            let candidate = self
                .code_pool
                .scan_prefix(available_key(pool, ""))
                .keys()
                .next()
                .transpose()?
                .map(|k| String::from_utf8_lossy(&k[pool.len() + 1..]).into_owned());
            let code = match candidate {
                Some(c) => c,
                None => self.generate_codes(pool, spec, 1, now_ms)?.remove(0),
            };
            let result = (&self.codes, &self.code_pool, &self.code_keys).transaction(
                |(codes, avail, keys)| {
                    if keys.get(key.as_bytes())?.is_some() {
                        return Err(abort(CodeError::Invalid("assigned concurrently".into())));
                    }
                    let Some(raw) = codes.get(code.as_bytes())? else {
                        return Ok(None);
                    };
                    let mut c = read(&raw)?;
                    avail.remove(available_key(pool, &code))?;
                    if c.state != CodeState::Available
                        || c.expires_at_ms.is_some_and(|e| e <= now_ms)
                    {
                        return Ok(None); // taken meanwhile, or expired: try another
                    }
                    c.state = CodeState::Assigned;
                    c.member = Some(member.to_string());
                    c.assigned_at_ms = Some(now_ms);
                    c.order = order.map(str::to_string);
                    codes.insert(code.as_bytes(), write(&c)?)?;
                    keys.insert(key.as_bytes(), code.as_bytes())?;
                    if let Some(o) = order {
                        keys.insert(order_key(o, &code), code.as_bytes())?;
                    }
                    Ok(Some(c))
                },
            );
            match result {
                Ok(Some(c)) => {
                    self.db.flush()?;
                    return Ok((c, false));
                }
                Ok(None) => continue,
                Err(TransactionError::Abort(CodeError::Invalid(_))) => {
                    return self.assign_code(pool, spec, member, key, order, now_ms)
                }
                Err(TransactionError::Abort(e)) => return Err(e),
                Err(TransactionError::Storage(e)) => return Err(e.into()),
            }
        }
        Err(CodeError::Store("could not assign a code".into()))
    }

    /// Voids the codes issued for `order` that are not redeemed yet; returns them.
    pub fn void_order_codes(
        &self,
        order: &str,
        why: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, CodeError> {
        let prefix = order_key(order, "");
        let mut voided = Vec::new();
        for item in self.code_keys.scan_prefix(&prefix) {
            let (_, code) = item?;
            let result = (&self.codes, &self.code_pool).transaction(|(codes, avail)| {
                let Some(raw) = codes.get(&code)? else {
                    return Ok(false);
                };
                let mut c = read(&raw)?;
                if c.state != CodeState::Assigned {
                    return Ok(false);
                }
                avail.remove(available_key(&c.pool, &c.code))?;
                c.state = CodeState::Void;
                c.note = Some(why.to_string());
                c.voided_at_ms = Some(now_ms);
                codes.insert(&code, write(&c)?)?;
                Ok(true)
            });
            match result {
                Ok(true) => voided.push(String::from_utf8_lossy(&code).into_owned()),
                Ok(false) => {}
                Err(TransactionError::Abort(e)) => return Err(e),
                Err(TransactionError::Storage(e)) => return Err(e.into()),
            }
        }
        if !voided.is_empty() {
            self.db.flush()?;
        }
        Ok(voided)
    }

    /// Redeems `code` exactly once.
    pub fn redeem_code(&self, code: &str, by: &str, now_ms: u64) -> Result<Code, CodeError> {
        let code = normalise(code);
        let result = (&self.codes, &self.code_pool).transaction(|(codes, avail)| {
            let Some(raw) = codes.get(code.as_bytes())? else {
                return Err(abort(CodeError::NotFound));
            };
            let mut c = read(&raw)?;
            match c.state {
                CodeState::Redeemed => return Err(abort(CodeError::Redeemed)),
                CodeState::Void => return Err(abort(CodeError::Void)),
                _ if c.expires_at_ms.is_some_and(|e| e <= now_ms) => {
                    return Err(abort(CodeError::Expired))
                }
                _ => {}
            }
            avail.remove(available_key(&c.pool, &c.code))?;
            c.state = CodeState::Redeemed;
            c.redeemed_at_ms = Some(now_ms);
            c.note = Some(format!("redeemed by {by}"));
            codes.insert(code.as_bytes(), write(&c)?)?;
            Ok(c)
        });
        let c = match result {
            Ok(c) => c,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        self.db.flush()?;
        Ok(c)
    }

    /// One code.
    pub fn code(&self, code: &str) -> Result<Option<Code>, CodeError> {
        self.codes
            .get(normalise(code).as_bytes())?
            .map(|raw| serde_json::from_slice(&raw).map_err(|e| CodeError::Store(e.to_string())))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::temp_store as store;

    fn spec() -> PoolSpec {
        PoolSpec {
            prefix: "WELCOME-".into(),
            length: 10,
            expires_after: Some(Duration::from_secs(3600)),
        }
    }

    #[test]
    fn codes_are_unambiguous_unique_assigned_once_and_redeemed_once() {
        let (_d, s) = store();
        let codes = s.generate_codes("welcome", &spec(), 200, 1_000).unwrap();
        let unique: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(unique.len(), 200);
        for c in &codes {
            let body = c.strip_prefix("WELCOME-").unwrap();
            assert_eq!(body.len(), 10);
            assert!(body.bytes().all(|b| ALPHABET.contains(&b)), "{c}");
            assert!(!body.contains(['0', 'O', '1', 'I', 'L']), "{c}");
        }
        let (a, again) = s
            .assign_code("welcome", &spec(), "m-1", "ev:1", None, 2_000)
            .unwrap();
        assert!(!again);
        assert_eq!(
            (a.state, a.member.as_deref()),
            (CodeState::Assigned, Some("m-1"))
        );
        let (b, again) = s
            .assign_code("welcome", &spec(), "m-1", "ev:1", None, 2_000)
            .unwrap();
        assert!(again);
        assert_eq!(a.code, b.code, "the same step gets the same code");
        let r = s
            .redeem_code(&a.code.to_lowercase(), "checkout", 3_000)
            .unwrap();
        assert_eq!(r.state, CodeState::Redeemed);
        assert_eq!(
            s.redeem_code(&a.code, "checkout", 3_000),
            Err(CodeError::Redeemed)
        );
        assert_eq!(
            s.redeem_code("WELCOME-NOPE", "x", 3_000),
            Err(CodeError::NotFound)
        );
        // Expired (a code of the pool other than the one redeemed above: which one the
        // member got is random).
        let unused = codes.iter().rev().find(|c| **c != a.code).unwrap();
        assert_eq!(
            s.redeem_code(unused, "x", 1_000 + 3_600_001),
            Err(CodeError::Expired)
        );
        // An empty pool generates on demand.
        let (c, _) = s
            .assign_code("vip", &spec(), "m-2", "ev:2", None, 2_000)
            .unwrap();
        assert!(c.code.starts_with("WELCOME-"));
    }

    #[test]
    fn a_refund_voids_the_unused_codes_of_its_order_only() {
        let (_d, s) = store();
        let (a, _) = s
            .assign_code("p", &spec(), "m-1", "ev:1", Some("shop:key:9"), 10)
            .unwrap();
        let (b, _) = s
            .assign_code("p", &spec(), "m-1", "ev:2", Some("shop:key:9"), 10)
            .unwrap();
        let (other, _) = s
            .assign_code("p", &spec(), "m-1", "ev:3", Some("shop:key:90"), 10)
            .unwrap();
        s.redeem_code(&b.code, "till", 20).unwrap();
        let voided = s
            .void_order_codes("shop:key:9", "order refunded", 30)
            .unwrap();
        assert_eq!(
            voided,
            vec![a.code.clone()],
            "the redeemed one stays redeemed"
        );
        assert_eq!(s.code(&a.code).unwrap().unwrap().state, CodeState::Void);
        assert_eq!(s.redeem_code(&a.code, "till", 40), Err(CodeError::Void));
        assert_eq!(s.code(&b.code).unwrap().unwrap().state, CodeState::Redeemed);
        assert_eq!(
            s.code(&other.code).unwrap().unwrap().state,
            CodeState::Assigned
        );
        // Again: nothing more.
        assert!(s
            .void_order_codes("shop:key:9", "again", 50)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_code_redeemed_by_fifty_callers_at_once_succeeds_once() {
        let (_d, s) = store();
        let code = s.generate_codes("p", &spec(), 1, 0).unwrap().remove(0);
        let ok = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|t| {
            for i in 0..50 {
                let (s, ok, code) = (&s, &ok, &code);
                t.spawn(move || {
                    if s.redeem_code(code, &format!("caller-{i}"), 10).is_ok() {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(ok.into_inner(), 1);
    }
}
