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

/// The internal source the ledger's events come from (`on: { source: loyalty, … }`).
pub const SOURCE: &str = "loyalty";
pub const THRESHOLD_CROSSED: &str = "loyalty.threshold_crossed";
pub const TIER_CHANGED: &str = "loyalty.tier_changed";

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
        let delta = match op.kind {
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
        let now = now_ms();
        let result = (&self.members, &self.ledger, &self.ledger_keys).transaction(
            |(members, ledger, keys)| {
                if let Some(seen) = keys.get(op.idempotency_key.as_bytes())? {
                    let Some(raw) = ledger.get(&seen)? else {
                        return Err(ConflictableTransactionError::Abort(LedgerError::Store(
                            "an idempotency key points at no entry".into(),
                        )));
                    };
                    let entry: Entry = serde_json::from_slice(&raw).map_err(|e| {
                        ConflictableTransactionError::Abort(LedgerError::Store(e.to_string()))
                    })?;
                    if entry.member != op.member || entry.kind != op.kind {
                        return Err(ConflictableTransactionError::Abort(LedgerError::KeyReused(
                            op.idempotency_key.clone(),
                        )));
                    }
                    return Ok(Applied {
                        entry,
                        duplicate: true,
                    });
                }
                let mut m: Member = match members.get(op.member.as_bytes())? {
                    Some(raw) => serde_json::from_slice(&raw).map_err(|e| {
                        ConflictableTransactionError::Abort(LedgerError::Store(e.to_string()))
                    })?,
                    None => Member {
                        id: op.member.clone(),
                        created_at_ms: now,
                        ..Default::default()
                    },
                };
                // An accrual earns the tier's percentage (integer points, rounded down).
                let base = delta;
                let delta = match (op.kind, rules.tier(m.lifetime)) {
                    (Kind::Accrue, Some(t)) if t.earn_percent != 100 => {
                        (delta * t.earn_percent / 100).max(1)
                    }
                    _ => delta,
                };
                let before = (m.balance, m.lifetime);
                let balance = m.balance + delta;
                if balance < 0 {
                    return Err(ConflictableTransactionError::Abort(
                        LedgerError::Insufficient {
                            balance: m.balance,
                            wanted: -delta,
                        },
                    ));
                }
                m.balance = balance;
                match op.kind {
                    Kind::Accrue => {
                        m.lifetime += delta;
                        m.last_earned_at_ms = Some(now);
                    }
                    Kind::Reverse => m.lifetime = (m.lifetime - op.points).max(0),
                    _ => {}
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
                m.entries += 1;
                m.updated_at_ms = now;
                let entry = Entry {
                    member: op.member.clone(),
                    seq: m.entries,
                    kind: op.kind,
                    points: delta,
                    balance_after: m.balance,
                    lifetime_after: m.lifetime,
                    reason: op.reason.clone(),
                    source: op.source.clone(),
                    idempotency_key: op.idempotency_key.clone(),
                    at_ms: now,
                    base_points: (base != delta).then_some(base),
                    crossed,
                    tier_change,
                };
                let key = entry_key(&op.member, entry.seq);
                ledger.insert(key.clone(), enc(&entry)?)?;
                members.insert(op.member.as_bytes(), enc(&m)?)?;
                if let Some(extra) = &op.also_index {
                    keys.insert(extra.as_bytes(), key.clone())?;
                }
                keys.insert(op.idempotency_key.as_bytes(), key)?;
                Ok(Applied {
                    entry,
                    duplicate: false,
                })
            },
        );
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
        let Some(at) = self.ledger_keys.get(r.of.as_bytes())? else {
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
                "`{}` is a {:?} entry; only accruals are reversed",
                r.of, original.kind
            )));
        }
        // What was reversed of it already (every reversal of an entry is indexed under it).
        let prefix = format!("{}\u{0}reversal\u{0}", r.of);
        let mut reversed = 0i64;
        for item in self.ledger_keys.scan_prefix(prefix.as_bytes()) {
            let (_, v) = item?;
            if let Some(raw) = self.ledger.get(&v)? {
                let e: Entry =
                    serde_json::from_slice(&raw).map_err(|e| LedgerError::Store(e.to_string()))?;
                reversed += -e.points;
            }
        }
        let left = (original.points - reversed).max(0);
        let wanted = r.points.map(|p| p.min(left)).unwrap_or(left);
        let balance = self
            .member(&original.member)?
            .map(|m| m.balance)
            .unwrap_or(0);
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
        let applied = self.ledger_apply(
            &Op {
                member: original.member.clone(),
                kind: Kind::Reverse,
                points,
                reason,
                source: r.source.clone(),
                idempotency_key: r.idempotency_key.clone(),
                also_index: Some(format!("{prefix}{}", r.idempotency_key)),
            },
            rules,
        )?;
        Ok(Some(applied))
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
            let op = Op {
                member: m.id.clone(),
                kind: Kind::Expire,
                points: m.balance,
                reason: format!("no points earned for {}", humantime::format_duration(after)),
                source: "expiry".into(),
                idempotency_key: format!("expire:{}:{}", m.id, m.entries),
                also_index: None,
            };
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

/// Expires inactive balances on a schedule (every tenth of `expire_after`, between 1 s and
/// 1 h), with the rules of the running configuration, until `stop`.
pub async fn run_expiry(
    store: Store,
    runtime: impl Fn() -> std::sync::Arc<crate::app::Runtime> + Send + 'static,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let rules = runtime().loyalty.clone();
        let wait = match rules.expire_after {
            Some(after) => {
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
                    Err(e) => {
                        tracing::warn!(error = %e, "expiring points failed; trying again later")
                    }
                }
                (after / 10).clamp(
                    std::time::Duration::from_secs(1),
                    std::time::Duration::from_secs(3600),
                )
            }
            None => std::time::Duration::from_secs(60),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::temp_store as store;

    fn op(kind: Kind, points: i64, key: &str) -> Op {
        Op {
            member: "m-1".into(),
            kind,
            points,
            reason: "test".into(),
            source: "test".into(),
            idempotency_key: key.into(),
            also_index: None,
        }
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
