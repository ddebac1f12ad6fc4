//! The points ledger: members keyed by an external id, an append-only log of entries
//! (accrue, redeem, adjust, expire, reverse), each with a reason, a source and an idempotency
//! key; the balance and lifetime points derived with it. Integer points only.
//!
//! Every operation is one sled transaction over the member, the entry and the idempotency
//! index, and is made durable before it is answered: a balance never goes below zero (a
//! redeem larger than the balance is refused), concurrent operations on one member serialise,
//! and an operation repeated with the same idempotency key returns the first one's result
//! without a second entry.

use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

/// The points program's rules (`loyalty:` in the config).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Tiers on lifetime points, lowest first (the first one starts at 0).
    #[serde(default)]
    pub tiers: Vec<Tier>,
    /// Balances whose crossing (upwards) emits `loyalty.threshold_crossed`.
    #[serde(default)]
    pub thresholds: Vec<i64>,
    /// A member who earns nothing for this long loses the balance (an `expire` entry).
    #[serde(default, with = "crate::codes::humantime_serde_opt")]
    pub expire_after: Option<std::time::Duration>,
}

/// A tier: from `from` lifetime points on, accruals earn `earn_percent` % of their points.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub name: String,
    pub from: i64,
    #[serde(default = "hundred")]
    pub earn_percent: i64,
}

fn hundred() -> i64 {
    100
}

impl Rules {
    /// What `check` reports about the rules.
    pub fn check(&self) -> Result<(), String> {
        if let Some(first) = self.tiers.first() {
            if first.from != 0 {
                return Err(format!(
                    "the first tier (`{}`) starts at 0 lifetime points",
                    first.name
                ));
            }
        }
        for w in self.tiers.windows(2) {
            if w[1].from <= w[0].from {
                return Err(format!(
                    "tiers go up: `{}` starts at {}, not above `{}` ({})",
                    w[1].name, w[1].from, w[0].name, w[0].from
                ));
            }
        }
        if let Some(t) = self
            .tiers
            .iter()
            .find(|t| !(1..=1000).contains(&t.earn_percent))
        {
            return Err(format!(
                "tier `{}`: earn_percent is 1 to 1000 (100 = the points as computed)",
                t.name
            ));
        }
        if let Some(t) = self.thresholds.iter().find(|t| **t <= 0) {
            return Err(format!("threshold {t}: thresholds are positive"));
        }
        if self.expire_after.is_some_and(|d| d.is_zero()) {
            return Err("expire_after is a positive duration (`365d`)".into());
        }
        Ok(())
    }

    /// The tier for `lifetime` points (none without tiers).
    pub fn tier(&self, lifetime: i64) -> Option<&Tier> {
        self.tiers.iter().rev().find(|t| lifetime >= t.from)
    }
}

/// What an entry does to the balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Earned (counts towards lifetime points).
    Accrue,
    /// Spent.
    Redeem,
    /// A correction by an operator, either way.
    Adjust,
    /// Expired points.
    Expire,
    /// Takes back an earlier entry (a refund reverses what its order earned).
    Reverse,
    /// Points held by an accrual (`hold:`) become spendable.
    Release,
}

/// One ledger operation, as asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    pub member: String,
    pub kind: Kind,
    /// Positive; the kind says which way it goes (`Adjust` may be negative).
    pub points: i64,
    pub reason: String,
    /// The stored event it comes from, or the API caller.
    pub source: String,
    /// The same key twice is the same operation.
    pub idempotency_key: String,
    /// A second key to index the entry under, in the same transaction (a reversal is
    /// indexed under the entry it reverses).
    #[serde(skip)]
    pub also_index: Option<String>,
    /// An accrual held (pending) until then: it counts as pending points, not balance, until
    /// it is released (a return window).
    #[serde(skip)]
    pub hold_until_ms: Option<u64>,
    /// The entry (its key) a `Release`, or a reversal of held points, applies to.
    #[serde(skip)]
    pub target: Option<Vec<u8>>,
}

impl Op {
    /// An operation with no hold, target or second index.
    pub fn new(
        member: impl Into<String>,
        kind: Kind,
        points: i64,
        reason: impl Into<String>,
        source: impl Into<String>,
        idempotency_key: impl Into<String>,
    ) -> Op {
        Op {
            member: member.into(),
            kind,
            points,
            reason: reason.into(),
            source: source.into(),
            idempotency_key: idempotency_key.into(),
            also_index: None,
            hold_until_ms: None,
            target: None,
        }
    }
}

/// A member's account.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub balance: i64,
    /// Points ever earned (accruals, less what was reversed).
    pub lifetime: i64,
    pub entries: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The last accrual (expiry counts from it).
    #[serde(default)]
    pub last_earned_at_ms: Option<u64>,
    /// Points earned but held (a return window): not spendable until released.
    #[serde(default)]
    pub pending: i64,
    /// The member's profile (`loyalty.enroll`): aliases and what schedules match on.
    #[serde(default, flatten)]
    pub profile: Profile,
}

/// What is known of a member besides points. The e-mail address and phone number are
/// aliases: a pipeline or API call naming the member by either finds the same account.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Profile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// E.164 (`+14155550100`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// `MM-DD` or `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthday: Option<String>,
    /// Free-form values (a sink action's result stored on the member, a name).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

impl Profile {
    /// Normalises and validates what a caller gave.
    pub fn normalised(mut self) -> Result<Profile, LedgerError> {
        if let Some(e) = self.email.take() {
            let e = e.trim().to_lowercase();
            if !e.is_empty() {
                if e.len() > 254 || !e.contains('@') || e.chars().any(|c| c.is_whitespace()) {
                    return Err(LedgerError::Invalid(format!(
                        "`{e}` is not an e-mail address"
                    )));
                }
                self.email = Some(e);
            }
        }
        if let Some(p) = self.phone.take() {
            let p = p.trim().to_string();
            if !p.is_empty() {
                let digits = p.strip_prefix('+').unwrap_or("");
                if !(8..=15).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit())
                {
                    return Err(LedgerError::Invalid(format!(
                        "`{p}` is not an E.164 phone number (`+14155550100`; the `e164` filter makes one)"
                    )));
                }
                self.phone = Some(p);
            }
        }
        if let Some(b) = self.birthday.take() {
            let b = b.trim().to_string();
            if !b.is_empty() {
                if month_day(&b).is_none() {
                    return Err(LedgerError::Invalid(format!(
                        "birthday `{b}` is `MM-DD` or `YYYY-MM-DD`"
                    )));
                }
                self.birthday = Some(b);
            }
        }
        Ok(self)
    }
}

/// The (month, day) of `MM-DD` or `YYYY-MM-DD`, if it is a date.
pub fn month_day(s: &str) -> Option<(i8, i8)> {
    let full = if s.len() == 5 {
        format!("2000-{s}")
    } else {
        s.to_string()
    };
    let d: jiff::civil::Date = full.parse().ok()?;
    Some((d.month(), d.day()))
}

fn alias_keys(p: &Profile) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = &p.email {
        out.push(format!("email:{e}"));
    }
    if let Some(ph) = &p.phone {
        out.push(format!("phone:{ph}"));
    }
    out
}

/// An entry of the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub member: String,
    pub seq: u64,
    pub kind: Kind,
    /// Signed: what it did to the balance.
    pub points: i64,
    pub balance_after: i64,
    pub lifetime_after: i64,
    pub reason: String,
    pub source: String,
    pub idempotency_key: String,
    pub at_ms: u64,
    /// An accrual multiplied by the tier: the points asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_points: Option<i64>,
    /// Thresholds the balance crossed upwards with this entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crossed: Vec<i64>,
    /// The tier before and after, when this entry changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_change: Option<(String, String)>,
    /// The points are held (an accrual with a hold, or a reversal of held points): they
    /// moved the pending points, not the balance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// When held points are released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_at_ms: Option<u64>,
    /// Pending points after the entry.
    #[serde(default)]
    pub pending_after: i64,
    /// The member's tier after the entry (none without tiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_after: Option<String>,
}

impl Entry {
    /// The internal events this entry emits (`loyalty.threshold_crossed`,
    /// `loyalty.tier_changed`), with ids derived from the entry: emitted again (after a
    /// crash, on a replay) they are de-duplicated by the inbox, so each happens once.
    pub fn events(&self, rules: &Rules, now_ms: u64) -> Vec<crate::inbox::NewEvent> {
        let tier = rules.tier(self.lifetime_after).map(|t| t.name.clone());
        let mut out = Vec::new();
        let mut push = |vendor_id: String, event_type: &str, payload: serde_json::Value| {
            out.push(crate::inbox::NewEvent {
                source: SOURCE.into(),
                connector: SOURCE.into(),
                vendor_id,
                event_type: event_type.into(),
                event_time: None,
                received_at_ms: now_ms,
                headers: Vec::new(),
                payload: bytes::Bytes::from(serde_json::to_vec(&payload).unwrap_or_default()),
            })
        };
        for t in &self.crossed {
            push(
                format!("{}:threshold:{t}:{}", self.member, self.seq),
                THRESHOLD_CROSSED,
                serde_json::json!({
                    "member": self.member, "threshold": t, "balance": self.balance_after,
                    "lifetime": self.lifetime_after, "tier": tier, "entry": self.seq,
                    "reason": self.reason,
                }),
            );
        }
        if let Some((from, to)) = &self.tier_change {
            push(
                format!("{}:tier:{}", self.member, self.seq),
                TIER_CHANGED,
                serde_json::json!({
                    "member": self.member, "from": from, "to": to,
                    "up": rules.tiers.iter().position(|t| &t.name == to) > rules.tiers.iter().position(|t| &t.name == from),
                    "lifetime": self.lifetime_after, "balance": self.balance_after, "entry": self.seq,
                }),
            );
        }
        out
    }
}

/// Bounds of a member's profile attributes (their count, and keys plus values in bytes).
pub const MAX_ATTRIBUTES: usize = 100;
pub const MAX_ATTRIBUTE_BYTES: usize = 16 << 10;

/// The largest number of points one operation may move (an adjustment either way).
pub const MAX_POINTS: i64 = 1_000_000_000_000;

/// The internal source the ledger's events come from (`on: { source: loyalty, … }`).
pub const SOURCE: &str = "loyalty";
pub const THRESHOLD_CROSSED: &str = "loyalty.threshold_crossed";
pub const TIER_CHANGED: &str = "loyalty.tier_changed";
/// A delivered action's answer was stored on a member (`keep:`).
pub const ATTRIBUTE_STORED: &str = "loyalty.attribute_stored";

/// The outcome of an operation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Applied {
    pub entry: Entry,
    /// The key was seen before: this is the first operation's entry, nothing was changed.
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("insufficient points: the balance is {balance}, {wanted} asked")]
    Insufficient { balance: i64, wanted: i64 },
    #[error("{0}")]
    Invalid(String),
    #[error("the idempotency key `{0}` was used for a different operation")]
    KeyReused(String),
    #[error("store: {0}")]
    Store(String),
}

impl From<StoreError> for LedgerError {
    fn from(e: StoreError) -> Self {
        LedgerError::Store(e.to_string())
    }
}

impl From<sled::Error> for LedgerError {
    fn from(e: sled::Error) -> Self {
        LedgerError::Store(e.to_string())
    }
}

/// The idempotency key of an operation named by a step's own `key` (an order id), within
/// its source: the same key in another pipeline of that source names the same award (a
/// refund pipeline reverses it by that key).
pub fn keyed(source: &str, key: &str) -> String {
    format!("{source}:key:{key}")
}

/// A reversal of an earlier entry (a refund taking back what its order earned).
#[derive(Debug, Clone)]
pub struct Reversal {
    /// The idempotency key of the entry to reverse.
    pub of: String,
    /// At most this many points (a partial refund); default: all it earned, less what was
    /// reversed already.
    pub points: Option<i64>,
    pub reason: String,
    pub source: String,
    /// The reversal's own key (the refund).
    pub idempotency_key: String,
    /// Sinks whose unsent deliveries caused by the reversed entry are cancelled.
    pub cancel: Vec<String>,
    /// `points` is the total to have taken back by now (a vendor's running refund total),
    /// not this reversal's share.
    pub cumulative: bool,
}

/// A hold's value: the points still held and when they are released.
fn encode_hold(points: i64, until_ms: u64) -> Vec<u8> {
    let mut v = points.to_be_bytes().to_vec();
    v.extend_from_slice(&until_ms.to_be_bytes());
    v
}

fn decode_hold(v: &[u8]) -> Result<(i64, u64), String> {
    match (v.get(..8), v.get(8..16)) {
        (Some(p), Some(u)) => Ok((
            i64::from_be_bytes(p.try_into().map_err(|_| "hold".to_string())?),
            u64::from_be_bytes(u.try_into().map_err(|_| "hold".to_string())?),
        )),
        _ => Err("a corrupt hold".into()),
    }
}

fn due_key(at_ms: u64, entry: &[u8]) -> Vec<u8> {
    let mut k = at_ms.to_be_bytes().to_vec();
    k.extend_from_slice(entry);
    k
}

/// The points reversed so far of the accrual entry `target` (in `ledger_keys`, apart from
/// idempotency keys by its leading NUL), updated in the reversal's transaction.
fn reversed_key(target: &[u8]) -> Vec<u8> {
    let mut k = b"\0reversed\0".to_vec();
    k.extend_from_slice(target);
    k
}

/// Where the reversals of the entry keyed `of` are indexed.
fn reversal_prefix(of: &str) -> String {
    format!("{of}\u{0}reversal\u{0}")
}

fn entry_key(member: &str, seq: u64) -> Vec<u8> {
    let mut k = member.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn now_ms() -> u64 {
    crate::delivery::now_ms()
}

/// Member ids are external ids (a customer id, an e-mail): printable, bounded.
pub fn check_member_id(id: &str) -> Result<(), LedgerError> {
    if id.is_empty() || id.len() > 200 || id.chars().any(|c| c.is_control()) {
        return Err(LedgerError::Invalid(
            "a member id is 1 to 200 printable characters".into(),
        ));
    }
    Ok(())
}

impl Store {
    /// Applies `op` (see the module docs). Blocking: call it off the async threads.
    pub fn ledger_apply(&self, op: &Op, rules: &Rules) -> Result<Applied, LedgerError> {
        check_member_id(&op.member)?;
        if op.idempotency_key.is_empty() || op.idempotency_key.len() > 256 {
            return Err(LedgerError::Invalid(
                "an idempotency key is 1 to 256 characters".into(),
            ));
        }
        if op.points.unsigned_abs() > MAX_POINTS as u64 {
            return Err(LedgerError::Invalid(format!(
                "points are at most {MAX_POINTS} in one operation"
            )));
        }
        let delta = match op.kind {
            // A release's points are what is still held, read in the transaction.
            Kind::Release => 0,
            Kind::Accrue | Kind::Redeem | Kind::Expire | Kind::Reverse if op.points <= 0 => {
                return Err(LedgerError::Invalid(
                    "points must be a positive integer".into(),
                ))
            }
            Kind::Adjust if op.points == 0 => {
                return Err(LedgerError::Invalid("an adjustment of 0 points".into()))
            }
            Kind::Accrue | Kind::Adjust => op.points,
            Kind::Redeem | Kind::Expire | Kind::Reverse => -op.points,
        };
        if op.kind == Kind::Release && op.target.is_none() {
            return Err(LedgerError::Invalid("a release names its accrual".into()));
        }
        // A member named by an alias (e-mail, phone) is that member.
        let member_id = self.resolve_member(&op.member)?;
        let now = now_ms();
        let result = (
            &self.members,
            &self.ledger,
            &self.ledger_keys,
            &self.held,
            &self.held_due,
        )
            .transaction(|(members, ledger, keys, held, held_due)| {
                let store_err =
                    |e: String| ConflictableTransactionError::Abort(LedgerError::Store(e));
                if let Some(seen) = keys.get(op.idempotency_key.as_bytes())? {
                    let Some(raw) = ledger.get(&seen)? else {
                        return Err(store_err("an idempotency key points at no entry".into()));
                    };
                    let entry: Entry =
                        serde_json::from_slice(&raw).map_err(|e| store_err(e.to_string()))?;
                    if entry.member != member_id || entry.kind != op.kind {
                        return Err(ConflictableTransactionError::Abort(LedgerError::KeyReused(
                            op.idempotency_key.clone(),
                        )));
                    }
                    return Ok(Applied {
                        entry,
                        duplicate: true,
                    });
                }
                let mut m: Member = match members.get(member_id.as_bytes())? {
                    Some(raw) => {
                        serde_json::from_slice(&raw).map_err(|e| store_err(e.to_string()))?
                    }
                    None => Member {
                        id: member_id.clone(),
                        created_at_ms: now,
                        ..Default::default()
                    },
                };
                // Held points the operation applies to (a release, a reversal of a hold).
                let hold = match &op.target {
                    Some(t) if matches!(op.kind, Kind::Release | Kind::Reverse) => {
                        match held.get(t)? {
                            Some(v) => Some((t.clone(), decode_hold(&v).map_err(store_err)?)),
                            None if op.kind == Kind::Release => {
                                return Err(ConflictableTransactionError::Abort(
                                    LedgerError::Invalid(
                                        "nothing held: released or reversed already".into(),
                                    ),
                                ))
                            }
                            None => None,
                        }
                    }
                    _ => None,
                };
                // An accrual earns the tier's percentage (integer points, rounded down).
                let base = delta;
                let mut delta = match (op.kind, rules.tier(m.lifetime)) {
                    (Kind::Accrue, Some(t)) if t.earn_percent != 100 => {
                        (delta * t.earn_percent / 100).max(1)
                    }
                    _ => delta,
                };
                let before = (m.balance, m.lifetime);
                let mut pending = false;
                let mut release_at_ms = None;
                let seq = m.entries + 1;
                let key = entry_key(&member_id, seq);
                // A reversal never takes back more than its accrual earned in all: the running
                // total of what was reversed of it is read and written here, in the same
                // transaction, so concurrent reversals of one accrual cannot both take it.
                let (reversible, reversed_before) = match (&op.target, op.kind) {
                    (Some(t), Kind::Reverse) => {
                        let Some(raw) = ledger.get(t)? else {
                            return Err(store_err("a reversal names no entry".into()));
                        };
                        let original: Entry = serde_json::from_slice(&raw)
                            .map_err(|e| store_err(e.to_string()))?;
                        let done = keys
                            .get(reversed_key(t))?
                            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes))
                            .unwrap_or(0);
                        ((original.points - done).max(0), done)
                    }
                    _ => (i64::MAX, 0),
                };
                match (op.kind, &hold) {
                    (Kind::Accrue, _) if op.hold_until_ms.is_some() => {
                        let until = op.hold_until_ms.unwrap_or(now);
                        m.pending = m.pending.saturating_add(delta);
                        m.last_earned_at_ms = Some(now);
                        pending = true;
                        release_at_ms = Some(until);
                        held.insert(key.clone(), encode_hold(delta, until))?;
                        held_due.insert(due_key(until, &key), &[])?;
                    }
                    (Kind::Release, Some((t, (left, _)))) => {
                        // The due entry stays until the release's events are stored
                        // (`release_done`).
                        let left = *left;
                        delta = left;
                        m.pending -= left;
                        m.balance += left;
                        m.lifetime += left;
                        // Expiry counts from when points became spendable.
                        m.last_earned_at_ms = Some(now);
                        held.remove(t.clone())?;
                    }
                    (Kind::Reverse, Some((t, (left, until)))) => {
                        // A refund within the hold takes the points back from pending.
                        let p = (-delta).min(*left).min(reversible);
                        if p <= 0 {
                            return Err(ConflictableTransactionError::Abort(
                                LedgerError::Invalid("reversed in full already".into()),
                            ));
                        }
                        delta = -p;
                        m.pending -= p;
                        pending = true;
                        if p == *left {
                            held.remove(t.clone())?;
                            held_due.remove(due_key(*until, t))?;
                        } else {
                            held.insert(t.clone(), encode_hold(left - p, *until))?;
                        }
                    }
                    (Kind::Reverse, None) => {
                        // What is left of the accrual and of the balance (points already
                        // spent stay spent).
                        let p = (-delta).min(reversible).min(m.balance);
                        if p <= 0 {
                            return Err(ConflictableTransactionError::Abort(
                                LedgerError::Invalid(if reversible <= 0 {
                                    "reversed in full already".into()
                                } else {
                                    format!(
                                        "nothing to take back: the member's balance is {} (the points were spent)",
                                        m.balance
                                    )
                                }),
                            ));
                        }
                        delta = -p;
                        m.balance -= p;
                        m.lifetime = (m.lifetime - p).max(0);
                    }
                    _ => {
                        // Bounded points make an overflow need millions of the largest
                        // operations; it saturates rather than wraps.
                        let balance = m.balance.saturating_add(delta);
                        if balance < 0 {
                            return Err(ConflictableTransactionError::Abort(
                                LedgerError::Insufficient {
                                    balance: m.balance,
                                    wanted: -delta,
                                },
                            ));
                        }
                        m.balance = balance;
                        if op.kind == Kind::Accrue {
                            m.lifetime = m.lifetime.saturating_add(delta);
                            m.last_earned_at_ms = Some(now);
                        }
                    }
                }
                let crossed: Vec<i64> = rules
                    .thresholds
                    .iter()
                    .copied()
                    .filter(|t| before.0 < *t && m.balance >= *t)
                    .collect();
                let tier_change = match (rules.tier(before.1), rules.tier(m.lifetime)) {
                    (Some(a), Some(b)) if a.name != b.name => {
                        Some((a.name.clone(), b.name.clone()))
                    }
                    _ => None,
                };
                m.entries = seq;
                m.updated_at_ms = now;
                let entry = Entry {
                    member: member_id.clone(),
                    seq,
                    kind: op.kind,
                    points: delta,
                    balance_after: m.balance,
                    lifetime_after: m.lifetime,
                    reason: op.reason.clone(),
                    source: op.source.clone(),
                    idempotency_key: op.idempotency_key.clone(),
                    at_ms: now,
                    base_points: (op.kind == Kind::Accrue && base != delta).then_some(base),
                    crossed,
                    tier_change,
                    pending,
                    release_at_ms,
                    pending_after: m.pending,
                    tier_after: rules.tier(m.lifetime).map(|t| t.name.clone()),
                };
                if let (Some(t), Kind::Reverse) = (&op.target, op.kind) {
                    keys.insert(
                        reversed_key(t),
                        (reversed_before - delta).to_be_bytes().to_vec(),
                    )?;
                }
                ledger.insert(key.clone(), enc(&entry)?)?;
                members.insert(member_id.as_bytes(), enc(&m)?)?;
                if let Some(extra) = &op.also_index {
                    keys.insert(extra.as_bytes(), key.clone())?;
                }
                keys.insert(op.idempotency_key.as_bytes(), key)?;
                Ok(Applied {
                    entry,
                    duplicate: false,
                })
            });
        let applied = match result {
            Ok(a) => a,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(LedgerError::Store(e.to_string())),
        };
        if !applied.duplicate {
            // Money: durable before anyone is told.
            self.db
                .flush()
                .map_err(|e| LedgerError::Store(e.to_string()))?;
        }
        Ok(applied)
    }

    /// The member id `id` names: itself when it is a member (or nobody's alias), else the
    /// member whose e-mail address or phone number it is.
    pub fn resolve_member(&self, id: &str) -> Result<String, LedgerError> {
        if self.members.contains_key(id.as_bytes())? {
            return Ok(id.to_string());
        }
        let alias = if id.contains('@') {
            format!("email:{}", id.trim().to_lowercase())
        } else if id.starts_with('+') {
            format!("phone:{}", id.trim())
        } else {
            return Ok(id.to_string());
        };
        Ok(match self.aliases.get(alias.as_bytes())? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => id.to_string(),
        })
    }

    /// Creates the member if new and merges `profile` into it (fields given replace the old
    /// ones; attributes are merged). An e-mail address or phone number that is another
    /// member's alias is refused.
    pub fn set_profile(&self, member: &str, profile: Profile) -> Result<Member, LedgerError> {
        check_member_id(member)?;
        let profile = profile.normalised()?;
        let member = self.resolve_member(member)?;
        let now = now_ms();
        let result = (&self.members, &self.aliases).transaction(|(members, aliases)| {
            let abort = |e: LedgerError| ConflictableTransactionError::Abort(e);
            let mut m: Member = match members.get(member.as_bytes())? {
                Some(raw) => serde_json::from_slice(&raw)
                    .map_err(|e| abort(LedgerError::Store(e.to_string())))?,
                None => Member {
                    id: member.clone(),
                    created_at_ms: now,
                    ..Default::default()
                },
            };
            // An address that is another member's id would be shadowed by that member.
            for v in [&profile.email, &profile.phone].into_iter().flatten() {
                if v != &member && members.get(v.as_bytes())?.is_some() {
                    return Err(abort(LedgerError::Invalid(format!(
                        "`{v}` is the id of another member: merge the two accounts first"
                    ))));
                }
            }
            for a in alias_keys(&profile) {
                if let Some(owner) = aliases.get(a.as_bytes())? {
                    if owner.as_ref() != member.as_bytes() {
                        return Err(abort(LedgerError::Invalid(format!(
                            "{} belongs to member `{}`",
                            a.replace(':', " "),
                            String::from_utf8_lossy(&owner)
                        ))));
                    }
                }
            }
            let old = alias_keys(&m.profile);
            let p = &mut m.profile;
            if profile.email.is_some() {
                p.email = profile.email.clone();
            }
            if profile.phone.is_some() {
                p.phone = profile.phone.clone();
            }
            if profile.birthday.is_some() {
                p.birthday = profile.birthday.clone();
            }
            for (k, v) in &profile.attributes {
                p.attributes.insert(k.clone(), v.clone());
            }
            // Merged, never replaced: bounded, so that no caller can grow a member (rewritten
            // whole on every ledger write) without limit.
            let size: usize = p.attributes.iter().map(|(k, v)| k.len() + v.to_string().len()).sum();
            if p.attributes.len() > MAX_ATTRIBUTES || size > MAX_ATTRIBUTE_BYTES {
                return Err(abort(LedgerError::Invalid(format!(
                    "a member has at most {MAX_ATTRIBUTES} attributes of {MAX_ATTRIBUTE_BYTES} bytes in all"
                ))));
            }
            let new = alias_keys(&m.profile);
            for a in old.iter().filter(|a| !new.contains(a)) {
                aliases.remove(a.as_bytes())?;
            }
            for a in &new {
                aliases.insert(a.as_bytes(), member.as_bytes())?;
            }
            m.updated_at_ms = now;
            members.insert(
                member.as_bytes(),
                serde_json::to_vec(&m).map_err(|e| abort(LedgerError::Store(e.to_string())))?,
            )?;
            Ok(m)
        });
        let m = match result {
            Ok(m) => m,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(LedgerError::Store(e.to_string())),
        };
        self.db
            .flush()
            .map_err(|e| LedgerError::Store(e.to_string()))?;
        Ok(m)
    }

    /// Releases the holds due by `now_ms` (at most `limit`), oldest first. Each comes with
    /// its due entry, to remove (`release_done`) once the events the release emits are
    /// stored: a release whose events a crash lost is found again and answered with its
    /// entry (`duplicate`), so they are emitted again.
    pub fn release_due(
        &self,
        rules: &Rules,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Applied)>, LedgerError> {
        let mut out = Vec::new();
        for item in self
            .held_due
            .range(..due_key(now_ms.saturating_add(1), &[]))
        {
            let (k, _) = item?;
            let target = k[8..].to_vec();
            let Some(raw) = self.ledger.get(&target)? else {
                self.held_due.remove(&k)?;
                continue;
            };
            let accrual: Entry =
                serde_json::from_slice(&raw).map_err(|e| LedgerError::Store(e.to_string()))?;
            let mut op = Op::new(
                accrual.member.clone(),
                Kind::Release,
                0,
                format!("held points of entry {} released", accrual.seq),
                accrual.source.clone(),
                format!("release:{}:{}", accrual.member, accrual.seq),
            );
            op.target = Some(target);
            match self.ledger_apply(&op, rules) {
                Ok(a) => out.push((k.to_vec(), a)),
                // Reversed in full meanwhile: nothing to release.
                Err(LedgerError::Invalid(_)) => {
                    self.held_due.remove(&k)?;
                }
                Err(e) => return Err(e),
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Forgets releases whose events are stored.
    pub fn release_done(&self, due: &[Vec<u8>]) -> Result<(), LedgerError> {
        for k in due {
            self.held_due.remove(k.as_slice())?;
        }
        Ok(())
    }

    /// Reverses (part of) an earlier accrual: never more than it earned in all, and never
    /// below a zero balance (points already spent cannot be taken back: the reversal takes
    /// what is left and its entry says so). `Ok(None)`: there is no such entry.
    pub fn ledger_reverse(
        &self,
        r: &Reversal,
        rules: &Rules,
    ) -> Result<Option<Applied>, LedgerError> {
        if let Some(seen) = self.ledger_keys.get(r.idempotency_key.as_bytes())? {
            let raw = self
                .ledger
                .get(&seen)?
                .ok_or_else(|| LedgerError::Store("a key points at no entry".into()))?;
            let entry: Entry =
                serde_json::from_slice(&raw).map_err(|e| LedgerError::Store(e.to_string()))?;
            return Ok(Some(Applied {
                entry,
                duplicate: true,
            }));
        }
        let Some((at, original, left)) = self.accrual_left(&r.of)? else {
            return Ok(None);
        };
        let prefix = reversal_prefix(&r.of);
        // `points` are in the accrual's own units (a point per currency unit); a tier's
        // multiplier applied to the accrual applies to its reversal too.
        let scaled = r.points.map(|p| match original.base_points {
            Some(base) if base > 0 => p.saturating_mul(original.points) / base,
            _ => p,
        });
        // Cumulative (Stripe's `amount_refunded`): the total to have taken back by now.
        let reversed = original.points - left;
        let wanted = match (scaled, r.cumulative) {
            (None, _) => left,
            (Some(p), false) => p.min(left),
            (Some(p), true) => (p - reversed).clamp(0, left),
        };
        if wanted == 0 && r.cumulative && reversed > 0 {
            // This total was taken back already (the vendor repeats itself): the latest
            // reversal is the answer.
            let last = self
                .ledger_keys
                .scan_prefix(prefix.as_bytes())
                .values()
                .filter_map(Result::ok)
                .filter_map(|k| self.ledger.get(k).ok().flatten())
                .filter_map(|raw| serde_json::from_slice::<Entry>(&raw).ok())
                .max_by_key(|e| e.seq);
            if let Some(entry) = last {
                return Ok(Some(Applied {
                    entry,
                    duplicate: true,
                }));
            }
        }
        // Points still held are taken back from pending; else from the balance.
        let held = match self.held.get(&at)? {
            Some(v) => Some(decode_hold(&v).map_err(LedgerError::Store)?.0),
            None => None,
        };
        let balance = match held {
            Some(h) => h,
            None => self
                .member(&original.member)?
                .map(|m| m.balance)
                .unwrap_or(0),
        };
        let points = wanted.min(balance);
        if points <= 0 {
            return Err(LedgerError::Invalid(if left == 0 {
                format!("`{}` was reversed in full already", r.of)
            } else {
                format!(
                    "nothing to take back: the member's balance is {balance} (the points were spent)"
                )
            }));
        }
        let reason = if points < wanted {
            format!(
                "{} ({} of {wanted} points: the rest was spent)",
                r.reason, points
            )
        } else {
            r.reason.clone()
        };
        let mut op = Op::new(
            original.member.clone(),
            Kind::Reverse,
            points,
            reason,
            r.source.clone(),
            r.idempotency_key.clone(),
        );
        op.also_index = Some(format!("{prefix}{}", r.idempotency_key));
        op.target = Some(at.to_vec());
        let applied = self.ledger_apply(&op, rules)?;
        Ok(Some(applied))
    }

    /// The accrual indexed under `key`, its entry key, and the points of it not reversed
    /// yet (every reversal of an entry is indexed under it).
    pub fn accrual_left(&self, key: &str) -> Result<Option<(sled::IVec, Entry, i64)>, LedgerError> {
        let Some(at) = self.ledger_keys.get(key.as_bytes())? else {
            return Ok(None);
        };
        let original: Entry = match self.ledger.get(&at)? {
            Some(raw) => {
                serde_json::from_slice(&raw).map_err(|e| LedgerError::Store(e.to_string()))?
            }
            None => return Ok(None),
        };
        if original.kind != Kind::Accrue {
            return Err(LedgerError::Invalid(format!(
                "`{key}` is a {:?} entry; only accruals are reversed",
                original.kind
            )));
        }
        let reversed = self
            .ledger_keys
            .get(reversed_key(&at))?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes))
            .unwrap_or(0);
        let left = (original.points - reversed).max(0);
        Ok(Some((at, original, left)))
    }

    /// Expires the balance of every member who earned nothing for `after` (at most `limit`
    /// members per call). The entry's key names the member's last entry, so an inactivity
    /// period expires once whatever the repeats; earning again starts a new period.
    pub fn expire_inactive(
        &self,
        rules: &Rules,
        after: std::time::Duration,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Applied>, LedgerError> {
        let cutoff = now_ms.saturating_sub(after.as_millis() as u64);
        let mut out = Vec::new();
        for item in self.members.iter() {
            let (_, raw) = item?;
            let m: Member =
                serde_json::from_slice(&raw).map_err(|e| LedgerError::Store(e.to_string()))?;
            let since = m.last_earned_at_ms.unwrap_or(m.created_at_ms);
            if m.balance <= 0 || since > cutoff {
                continue;
            }
            let op = Op::new(
                m.id.clone(),
                Kind::Expire,
                m.balance,
                format!("no points earned for {}", humantime::format_duration(after)),
                "expiry",
                format!("expire:{}:{}", m.id, m.entries),
            );
            match self.ledger_apply(&op, rules) {
                Ok(a) => out.push(a),
                // Spent meanwhile: next pass.
                Err(LedgerError::Insufficient { .. }) => {}
                Err(e) => return Err(e),
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The entry indexed under an idempotency key.
    pub fn keyed_entry(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let Some(at) = self.ledger_keys.get(key.as_bytes())? else {
            return Ok(None);
        };
        self.ledger
            .get(&at)?
            .map(|raw| serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    /// A member's account, if it has one.
    pub fn member(&self, id: &str) -> Result<Option<Member>, StoreError> {
        self.members
            .get(id.as_bytes())?
            .map(|raw| serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    /// A member's entries, newest first, at most `limit`.
    pub fn member_entries(&self, id: &str, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut prefix = id.as_bytes().to_vec();
        prefix.push(0);
        self.ledger
            .scan_prefix(prefix)
            .rev()
            .take(limit)
            .map(|r| {
                let (_, v) = r?;
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, ConflictableTransactionError<LedgerError>> {
    serde_json::to_vec(v)
        .map_err(|e| ConflictableTransactionError::Abort(LedgerError::Store(e.to_string())))
}

/// The ledger's upkeep until `stop`, with the rules of the running configuration: releases
/// held points when their hold ends (every second; the events they emit are stored and the
/// worker woken), and expires inactive balances (every tenth of `expire_after`, between 1 s
/// and 1 h).
pub async fn run_upkeep(
    store: Store,
    runtime: impl Fn() -> std::sync::Arc<crate::app::Runtime> + Send + 'static,
    wake: std::sync::Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    use crate::inbox::Inbox;
    let mut next_expiry = std::time::Instant::now();
    loop {
        let rules = runtime().loyalty.clone();
        let s = store.clone();
        let r = rules.clone();
        match tokio::task::spawn_blocking(move || s.release_due(&r, now_ms(), 10_000)).await {
            Ok(Ok(done)) if !done.is_empty() => {
                let fresh = done.iter().filter(|(_, a)| !a.duplicate).count();
                let points: i64 = done
                    .iter()
                    .filter(|(_, a)| !a.duplicate)
                    .map(|(_, a)| a.entry.points)
                    .sum();
                metrics::counter!("perkflow_points_released_total").increment(points as u64);
                let events: Vec<_> = done
                    .iter()
                    .flat_map(|(_, a)| a.entry.events(&rules, now_ms()))
                    .collect();
                let stored = events.is_empty() || store.append(events).await.is_ok();
                if stored {
                    wake.notify_one();
                    let keys: Vec<Vec<u8>> = done.into_iter().map(|(k, _)| k).collect();
                    if let Err(e) = store.release_done(&keys) {
                        tracing::warn!(error = %e, "releasing held points failed; trying again");
                    }
                } else {
                    tracing::warn!("storing the events of released points failed; trying again");
                }
                if fresh > 0 {
                    tracing::info!(entries = fresh, points, "released held points");
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing held points failed; trying again"),
            Err(e) => tracing::warn!(error = %e, "releasing held points failed; trying again"),
        }
        if let (Some(after), true) = (rules.expire_after, std::time::Instant::now() >= next_expiry)
        {
            let s = store.clone();
            let now = now_ms();
            let rules2 = rules.clone();
            match tokio::task::spawn_blocking(move || {
                s.expire_inactive(&rules2, after, now, 10_000)
            })
            .await
            {
                Ok(Ok(done)) if !done.is_empty() => {
                    let points: i64 = done.iter().map(|a| -a.entry.points).sum();
                    metrics::counter!("perkflow_points_expired_total").increment(points as u64);
                    tracing::info!(
                        members = done.len(),
                        points,
                        "expired the balances of members who earned nothing for {}",
                        humantime::format_duration(after)
                    );
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "expiring points failed; trying again later")
                }
                Err(e) => tracing::warn!(error = %e, "expiring points failed; trying again later"),
            }
            next_expiry = std::time::Instant::now()
                + (after / 10).clamp(
                    std::time::Duration::from_secs(1),
                    std::time::Duration::from_secs(3600),
                );
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::temp_store as store;

    fn op(kind: Kind, points: i64, key: &str) -> Op {
        Op::new("m-1", kind, points, "test", "test", key)
    }

    #[test]
    fn balances_lifetime_and_idempotency() {
        let (_d, s) = store();
        let a = s
            .ledger_apply(&op(Kind::Accrue, 500, "a"), &Rules::default())
            .unwrap();
        assert_eq!((a.entry.balance_after, a.entry.lifetime_after), (500, 500));
        // The same key again: the first entry, nothing changed.
        let again = s
            .ledger_apply(&op(Kind::Accrue, 500, "a"), &Rules::default())
            .unwrap();
        assert!(again.duplicate);
        assert_eq!(again.entry, a.entry);
        let r = s
            .ledger_apply(&op(Kind::Redeem, 200, "r"), &Rules::default())
            .unwrap();
        assert_eq!(
            (
                r.entry.points,
                r.entry.balance_after,
                r.entry.lifetime_after
            ),
            (-200, 300, 500)
        );
        assert_eq!(
            s.ledger_apply(&op(Kind::Redeem, 301, "r2"), &Rules::default())
                .unwrap_err(),
            LedgerError::Insufficient {
                balance: 300,
                wanted: 301
            }
        );
        let v = s
            .ledger_apply(&op(Kind::Reverse, 100, "v"), &Rules::default())
            .unwrap();
        assert_eq!((v.entry.balance_after, v.entry.lifetime_after), (200, 400));
        assert_eq!(
            s.ledger_apply(&op(Kind::Redeem, 5, "a"), &Rules::default())
                .unwrap_err(),
            LedgerError::KeyReused("a".into())
        );
        assert!(matches!(
            s.ledger_apply(&op(Kind::Accrue, 0, "z"), &Rules::default()),
            Err(LedgerError::Invalid(_))
        ));
        let m = s.member("m-1").unwrap().unwrap();
        assert_eq!((m.balance, m.lifetime, m.entries), (200, 400, 3));
        let h = s.member_entries("m-1", 10).unwrap();
        assert_eq!(h.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 2, 1]);
    }

    #[test]
    fn reversals_take_back_at_most_what_was_earned_and_what_is_left() {
        let (_d, s) = store();
        s.ledger_apply(
            &op(Kind::Accrue, 100, &keyed("shop", "order-1")),
            &Rules::default(),
        )
        .unwrap();
        let rev = |points: Option<i64>, key: &str| Reversal {
            of: keyed("shop", "order-1"),
            points,
            reason: "refund".into(),
            source: "test".into(),
            idempotency_key: key.into(),
            cancel: Vec::new(),
            cumulative: false,
        };
        // A partial refund, then the same again (duplicate), then the rest.
        let a = s
            .ledger_reverse(&rev(Some(30), "refund-1"), &Rules::default())
            .unwrap()
            .unwrap();
        assert_eq!((a.entry.points, a.entry.balance_after), (-30, 70));
        assert!(
            s.ledger_reverse(&rev(Some(30), "refund-1"), &Rules::default())
                .unwrap()
                .unwrap()
                .duplicate
        );
        // 20 points are spent meanwhile: only 50 are left to take back of the 70.
        s.ledger_apply(&op(Kind::Redeem, 20, "spend"), &Rules::default())
            .unwrap();
        let b = s
            .ledger_reverse(&rev(None, "refund-2"), &Rules::default())
            .unwrap()
            .unwrap();
        assert_eq!((b.entry.points, b.entry.balance_after), (-50, 0));
        assert!(
            b.entry
                .reason
                .contains("50 of 70 points: the rest was spent"),
            "{}",
            b.entry.reason
        );
        // Nothing more: 80 of 100 reversed, but the balance is 0.
        assert!(matches!(
            s.ledger_reverse(&rev(None, "refund-3"), &Rules::default()),
            Err(LedgerError::Invalid(m)) if m.contains("the points were spent")
        ));
        // An unknown order: nothing to reverse.
        let none = Reversal {
            of: keyed("shop", "order-9"),
            ..rev(None, "refund-4")
        };
        assert!(s
            .ledger_reverse(&none, &Rules::default())
            .unwrap()
            .is_none());
        // In full: refused.
        s.ledger_apply(
            &op(Kind::Accrue, 10, &keyed("shop", "order-2")),
            &Rules::default(),
        )
        .unwrap();
        let full = |k: &str| Reversal {
            of: keyed("shop", "order-2"),
            ..rev(None, k)
        };
        assert_eq!(
            s.ledger_reverse(&full("r5"), &Rules::default())
                .unwrap()
                .unwrap()
                .entry
                .points,
            -10
        );
        assert!(matches!(
            s.ledger_reverse(&full("r6"), &Rules::default()),
            Err(LedgerError::Invalid(m)) if m.contains("reversed in full already")
        ));
    }

    #[test]
    fn tiers_multiply_accruals_and_crossings_are_recorded_once() {
        let (_d, s) = store();
        let rules = Rules {
            tiers: vec![
                Tier {
                    name: "Bronze".into(),
                    from: 0,
                    earn_percent: 100,
                },
                Tier {
                    name: "Silver".into(),
                    from: 1000,
                    earn_percent: 150,
                },
            ],
            thresholds: vec![500, 1000],
            expire_after: None,
        };
        assert!(rules.check().is_ok());
        let a = s
            .ledger_apply(&op(Kind::Accrue, 1200, "a"), &rules)
            .unwrap()
            .entry;
        // Bronze when it happened: 100 %; both thresholds crossed at once; now Silver.
        assert_eq!((a.points, a.base_points), (1200, None));
        assert_eq!(a.crossed, [500, 1000]);
        assert_eq!(a.tier_change, Some(("Bronze".into(), "Silver".into())));
        assert_eq!(a.tier_after.as_deref(), Some("Silver"));
        let b = s
            .ledger_apply(&op(Kind::Accrue, 100, "b"), &rules)
            .unwrap()
            .entry;
        assert_eq!(
            (b.points, b.base_points),
            (150, Some(100)),
            "Silver earns 150 %"
        );
        assert!(b.crossed.is_empty() && b.tier_change.is_none());
        // Down below and up again: a new crossing (a new entry, so a new event id).
        s.ledger_apply(&op(Kind::Redeem, 1000, "r"), &rules)
            .unwrap();
        let c = s
            .ledger_apply(&op(Kind::Accrue, 400, "c"), &rules)
            .unwrap()
            .entry;
        assert_eq!(c.crossed, [500]);
        let ids: Vec<String> = c
            .events(&rules, 0)
            .iter()
            .map(|e| e.vendor_id.clone())
            .collect();
        assert_eq!(ids, ["m-1:threshold:500:4"]);
        // The same operation again: the same entry, so the same event ids (de-duplicated).
        let again = s.ledger_apply(&op(Kind::Accrue, 400, "c"), &rules).unwrap();
        assert!(again.duplicate);
        assert_eq!(again.entry.events(&rules, 0)[0].vendor_id, ids[0]);
        let events = a.events(&rules, 0);
        assert_eq!(
            events
                .iter()
                .map(|e| (e.event_type.as_str(), e.vendor_id.as_str()))
                .collect::<Vec<_>>(),
            [
                (THRESHOLD_CROSSED, "m-1:threshold:500:1"),
                (THRESHOLD_CROSSED, "m-1:threshold:1000:1"),
                (TIER_CHANGED, "m-1:tier:1")
            ]
        );
        let bad = Rules {
            tiers: vec![Tier {
                name: "A".into(),
                from: 5,
                earn_percent: 100,
            }],
            thresholds: vec![],
            expire_after: None,
        };
        assert!(bad.check().unwrap_err().contains("starts at 0"));
    }

    #[test]
    fn held_points_are_pending_until_released_and_a_refund_in_the_hold_takes_them_back() {
        let (_d, s) = store();
        let rules = Rules {
            thresholds: vec![100],
            ..Default::default()
        };
        let held = |points: i64, key: &str, until: u64| {
            let mut o = Op::new(
                "m-1",
                Kind::Accrue,
                points,
                "order",
                "shop:1",
                keyed("shop", key),
            );
            o.hold_until_ms = Some(until);
            s.ledger_apply(&o, &rules).unwrap()
        };
        let a = held(80, "o1", 1_000);
        assert!(a.entry.pending);
        assert_eq!(
            (
                a.entry.balance_after,
                a.entry.pending_after,
                a.entry.lifetime_after
            ),
            (0, 80, 0)
        );
        held(50, "o2", 2_000);
        // Held points cannot be spent.
        assert!(matches!(
            s.ledger_apply(&op(Kind::Redeem, 10, "r1"), &rules),
            Err(LedgerError::Insufficient { balance: 0, .. })
        ));
        // A refund within the hold takes part of o2 back from pending.
        let r = |points: Option<i64>, key: &str| Reversal {
            of: keyed("shop", "o2"),
            points,
            reason: "refund".into(),
            source: "shop:2".into(),
            idempotency_key: key.into(),
            cancel: Vec::new(),
            cumulative: false,
        };
        let rev = s
            .ledger_reverse(&r(Some(20), "refund-1"), &rules)
            .unwrap()
            .unwrap();
        assert!(rev.entry.pending);
        assert_eq!(
            (
                rev.entry.points,
                rev.entry.balance_after,
                rev.entry.pending_after
            ),
            (-20, 0, 110)
        );
        // Nothing is due yet.
        assert!(s.release_due(&rules, 999, 100).unwrap().is_empty());
        // o1 is released: spendable, counts as earned, and crosses no threshold (80 < 100).
        let done = s.release_due(&rules, 1_000, 100).unwrap();
        assert_eq!(done.len(), 1);
        let rel = &done[0].1.entry;
        assert_eq!(
            (
                rel.kind,
                rel.points,
                rel.balance_after,
                rel.pending_after,
                rel.lifetime_after
            ),
            (Kind::Release, 80, 80, 30, 80)
        );
        // Its due entry stays until its events are stored: asked again, the same release.
        let again = s.release_due(&rules, 1_500, 100).unwrap();
        assert!(again[0].1.duplicate && again[0].1.entry == *rel);
        s.release_done(&[again[0].0.clone()]).unwrap();
        assert!(s.release_due(&rules, 1_500, 100).unwrap().is_empty());
        // o2's 30 left are released and cross 100.
        let done = s.release_due(&rules, 5_000, 100).unwrap();
        let rel = &done[0].1.entry;
        assert_eq!(
            (rel.points, rel.balance_after, rel.pending_after),
            (30, 110, 0)
        );
        assert_eq!(rel.crossed, vec![100]);
        // After the release a refund takes from the balance, never more than is left of o2.
        let rev = s
            .ledger_reverse(&r(None, "refund-2"), &rules)
            .unwrap()
            .unwrap();
        assert!(!rev.entry.pending);
        assert_eq!((rev.entry.points, rev.entry.balance_after), (-30, 80));
        let m = s.member("m-1").unwrap().unwrap();
        assert_eq!((m.balance, m.pending, m.lifetime), (80, 0, 80));
    }

    #[test]
    fn reversals_scale_with_the_tier_total_up_cumulatively_and_never_exceed_the_accrual() {
        let (_d, s) = store();
        let rules = Rules {
            tiers: vec![
                Tier {
                    name: "Bronze".into(),
                    from: 0,
                    earn_percent: 100,
                },
                Tier {
                    name: "Silver".into(),
                    from: 10,
                    earn_percent: 125,
                },
            ],
            ..Default::default()
        };
        // Into Silver first; then a 40-unit payment earns 50.
        s.ledger_apply(&op(Kind::Accrue, 10, "first"), &rules)
            .unwrap();
        let a = Op::new(
            "m-1",
            Kind::Accrue,
            40,
            "pay",
            "stripe:1",
            keyed("stripe", "pi"),
        );
        assert_eq!(s.ledger_apply(&a, &rules).unwrap().entry.points, 50);
        let rev = |points: i64, key: &str, cumulative: bool| Reversal {
            of: keyed("stripe", "pi"),
            points: Some(points),
            reason: "refund".into(),
            source: "stripe:2".into(),
            idempotency_key: key.into(),
            cancel: Vec::new(),
            cumulative,
        };
        // Running totals of 16, 16 (repeated), 32 and 40 units: 20, nothing, 20, 10 points.
        let r1 = s
            .ledger_reverse(&rev(16, "r1", true), &rules)
            .unwrap()
            .unwrap();
        assert_eq!(r1.entry.points, -20);
        let r2 = s
            .ledger_reverse(&rev(16, "r2", true), &rules)
            .unwrap()
            .unwrap();
        assert!(r2.duplicate && r2.entry == r1.entry);
        let r3 = s
            .ledger_reverse(&rev(32, "r3", true), &rules)
            .unwrap()
            .unwrap();
        assert_eq!(r3.entry.points, -20);
        let r4 = s
            .ledger_reverse(&rev(40, "r4", true), &rules)
            .unwrap()
            .unwrap();
        assert_eq!(r4.entry.points, -10);
        assert_eq!(
            s.accrual_left(&keyed("stripe", "pi")).unwrap().unwrap().2,
            0
        );
        assert_eq!(s.member("m-1").unwrap().unwrap().balance, 10);

        // Many reversals of one accrual under different keys, at once: never more than it
        // earned in all.
        let b = Op::new(
            "m-2",
            Kind::Accrue,
            100,
            "order",
            "shop:1",
            keyed("shop", "o"),
        );
        s.ledger_apply(&b, &Rules::default()).unwrap();
        let taken = std::sync::atomic::AtomicI64::new(0);
        std::thread::scope(|t| {
            for i in 0..16 {
                let (s, taken) = (&s, &taken);
                t.spawn(move || {
                    let r = Reversal {
                        of: keyed("shop", "o"),
                        points: Some(30),
                        reason: "refund".into(),
                        source: "shop:2".into(),
                        idempotency_key: format!("refund-{i}"),
                        cancel: Vec::new(),
                        cumulative: false,
                    };
                    if let Ok(Some(a)) = s.ledger_reverse(&r, &Rules::default()) {
                        taken.fetch_add(-a.entry.points, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(taken.into_inner(), 100);
        let m = s.member("m-2").unwrap().unwrap();
        assert_eq!((m.balance, m.lifetime), (0, 0));
    }

    #[test]
    fn a_hold_reversed_in_full_is_never_released() {
        let (_d, s) = store();
        let rules = Rules::default();
        let mut o = Op::new(
            "m-1",
            Kind::Accrue,
            40,
            "order",
            "shop:1",
            keyed("shop", "o1"),
        );
        o.hold_until_ms = Some(1_000);
        s.ledger_apply(&o, &rules).unwrap();
        let r = Reversal {
            of: keyed("shop", "o1"),
            points: None,
            reason: "refund".into(),
            source: "shop:2".into(),
            idempotency_key: "refund".into(),
            cancel: Vec::new(),
            cumulative: false,
        };
        s.ledger_reverse(&r, &rules).unwrap().unwrap();
        assert!(s.release_due(&rules, 10_000, 100).unwrap().is_empty());
        let m = s.member("m-1").unwrap().unwrap();
        assert_eq!((m.balance, m.pending, m.lifetime), (0, 0, 0));
    }

    #[test]
    fn members_are_found_by_their_aliases() {
        let (_d, s) = store();
        let rules = Rules::default();
        s.set_profile(
            "cust-1",
            Profile {
                email: Some(" Sarah@Example.com ".into()),
                phone: Some("+14155550100".into()),
                birthday: Some("02-29".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.resolve_member("sarah@example.com").unwrap(), "cust-1");
        assert_eq!(s.resolve_member("SARAH@example.com").unwrap(), "cust-1");
        assert_eq!(s.resolve_member("+14155550100").unwrap(), "cust-1");
        assert_eq!(
            s.resolve_member("nobody@example.com").unwrap(),
            "nobody@example.com"
        );
        // Points earned through the phone number land on the member.
        let mut a = op(Kind::Accrue, 10, "sq-1");
        a.member = "+14155550100".into();
        assert_eq!(s.ledger_apply(&a, &rules).unwrap().entry.member, "cust-1");
        assert_eq!(s.member("cust-1").unwrap().unwrap().balance, 10);
        // Another member cannot take the alias; a changed e-mail frees the old one.
        let taken = s.set_profile(
            "cust-2",
            Profile {
                email: Some("sarah@example.com".into()),
                ..Default::default()
            },
        );
        assert!(matches!(taken, Err(LedgerError::Invalid(m)) if m.contains("cust-1")));
        s.set_profile(
            "cust-1",
            Profile {
                email: Some("sarah@new.example".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            s.resolve_member("sarah@example.com").unwrap(),
            "sarah@example.com"
        );
        // An address that is another member's id is refused (it would be shadowed).
        s.ledger_apply(
            &Op::new("bo@example.com", Kind::Accrue, 5, "t", "t", "bo"),
            &rules,
        )
        .unwrap();
        let shadowed = s.set_profile(
            "cust-1",
            Profile {
                email: Some("bo@example.com".into()),
                ..Default::default()
            },
        );
        assert!(matches!(shadowed, Err(LedgerError::Invalid(m)) if m.contains("another member")));
        let m = s.member("cust-1").unwrap().unwrap();
        assert_eq!(m.profile.phone.as_deref(), Some("+14155550100"));
        // Bad values are refused with the reason.
        for bad in [
            Profile {
                email: Some("not-an-address".into()),
                ..Default::default()
            },
            Profile {
                phone: Some("4155550100".into()),
                ..Default::default()
            },
            Profile {
                birthday: Some("13-01".into()),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                s.set_profile("cust-3", bad),
                Err(LedgerError::Invalid(_))
            ));
        }
    }

    /// Attributes are merged, never replaced: their count and size are bounded.
    #[test]
    fn a_members_attributes_are_bounded() {
        let (_d, s) = store();
        let batch = |from: usize| Profile {
            attributes: (from..from + 50)
                .map(|i| (format!("a{i}"), serde_json::json!("v")))
                .collect(),
            ..Default::default()
        };
        s.set_profile("m-9", batch(0)).unwrap();
        s.set_profile("m-9", batch(50)).unwrap();
        assert!(matches!(
            s.set_profile("m-9", batch(100)),
            Err(LedgerError::Invalid(m)) if m.contains("at most 100 attributes")
        ));
        // Nothing of the refused update was kept; updating existing ones still works.
        assert_eq!(
            s.member("m-9").unwrap().unwrap().profile.attributes.len(),
            100
        );
        s.set_profile("m-9", batch(0)).unwrap();
        let big = Profile {
            attributes: [("big".to_string(), serde_json::json!("x".repeat(20_000)))]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        assert!(s.set_profile("m-10", big).is_err());
    }

    #[test]
    fn inactive_balances_expire_once_per_inactivity() {
        let (_d, s) = store();
        let rules = Rules::default();
        let day = std::time::Duration::from_secs(86_400);
        s.ledger_apply(&op(Kind::Accrue, 300, "a"), &rules).unwrap();
        // Not inactive long enough yet.
        let now = now_ms();
        assert!(s.expire_inactive(&rules, day, now, 10).unwrap().is_empty());
        // A day later: expired, once.
        let later = now + 86_400_001;
        let done = s.expire_inactive(&rules, day, later, 10).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(
            (
                done[0].entry.kind,
                done[0].entry.points,
                done[0].entry.balance_after
            ),
            (Kind::Expire, -300, 0)
        );
        assert_eq!(done[0].entry.reason, "no points earned for 1day");
        assert!(s
            .expire_inactive(&rules, day, later, 10)
            .unwrap()
            .is_empty());
        let m = s.member("m-1").unwrap().unwrap();
        assert_eq!((m.balance, m.lifetime), (0, 300), "lifetime points stay");
    }

    #[test]
    fn concurrent_redeems_never_overspend() {
        let (_d, s) = store();
        s.ledger_apply(&op(Kind::Accrue, 100, "seed"), &Rules::default())
            .unwrap();
        let ok = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|t| {
            for i in 0..8 {
                let (s, ok) = (&s, &ok);
                t.spawn(move || {
                    for j in 0..10 {
                        if s.ledger_apply(
                            &op(Kind::Redeem, 3, &format!("r-{i}-{j}")),
                            &Rules::default(),
                        )
                        .is_ok()
                        {
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let m = s.member("m-1").unwrap().unwrap();
        let ok = ok.into_inner() as i64;
        assert_eq!(ok, 33, "100 points / 3 per redeem");
        assert_eq!(m.balance, 100 - 3 * ok);
        assert_eq!(m.entries as i64, 1 + ok);
    }
}
