//! Reports: points issued, redeemed, expired (and released, reversed, adjusted) per source
//! and period, from the ledger; rewards per sink, action and state, from the outbox.
//! Periods are UTC days (`2026-11-22`), ISO weeks (`2026-W47`) or months (`2026-11`).

use crate::ledger::{Entry, Kind};
use crate::outbox::{Job, JobKind};
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How rows are grouped in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    #[default]
    Day,
    Week,
    Month,
}

impl std::str::FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Period, String> {
        match s {
            "day" => Ok(Period::Day),
            "week" => Ok(Period::Week),
            "month" => Ok(Period::Month),
            other => Err(format!("period `{other}`: use day, week or month")),
        }
    }
}

impl Period {
    /// The period `ms` falls in, as its label.
    pub fn label(self, ms: u64) -> String {
        let Ok(ts) = jiff::Timestamp::from_millisecond(ms as i64) else {
            return "invalid".into();
        };
        let d = ts.to_zoned(jiff::tz::TimeZone::UTC).date();
        match self {
            Period::Day => d.to_string(),
            Period::Week => {
                let w = d.iso_week_date();
                format!("{}-W{:02}", w.year(), w.week())
            }
            Period::Month => format!("{}-{:02}", d.year(), d.month()),
        }
    }
}

/// What a report covers: `[since, until)` in unix ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Range {
    pub period: Period,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

impl Range {
    fn contains(&self, ms: u64) -> bool {
        self.since_ms.is_none_or(|s| ms >= s) && self.until_ms.is_none_or(|u| ms < u)
    }
}

/// Points moved by one kind of entry from one source in one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsRow {
    pub period: String,
    /// The source the entries came from (`shopify`, `api`, `expiry`, …).
    pub source: String,
    /// issued | held | released | held_reversed | redeemed | expired | reversed | adjusted
    /// (held points count as issued once released)
    pub kind: String,
    /// Points, positive whichever way they went (`adjusted` keeps its sign).
    pub points: i64,
    pub entries: u64,
}

/// Rewards (sink actions) of one sink and action in one state and period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardsRow {
    pub period: String,
    pub sink: String,
    pub action: String,
    /// pending | in_flight | delivered | dead | dropped | cancelled
    pub state: String,
    pub count: u64,
}

fn kind_label(e: &Entry) -> &'static str {
    match e.kind {
        // Held points are issued when released.
        Kind::Accrue if e.pending => "held",
        Kind::Reverse if e.pending => "held_reversed",
        Kind::Accrue => "issued",
        Kind::Release => "released",
        Kind::Redeem => "redeemed",
        Kind::Expire => "expired",
        Kind::Reverse => "reversed",
        Kind::Adjust => "adjusted",
    }
}

/// The source part of an entry's `source` (`shopify:0000…`, `api:checkout`, `expiry`).
fn source_of(e: &Entry) -> &str {
    e.source.split(':').next().unwrap_or(&e.source)
}

impl Store {
    /// Points per period, source and kind, in that order.
    pub fn points_report(&self, range: &Range) -> Result<Vec<PointsRow>, StoreError> {
        let mut rows: BTreeMap<(String, String, &'static str), (i64, u64)> = BTreeMap::new();
        for item in self.ledger.iter() {
            let (_, v) = item?;
            let e: Entry =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if !range.contains(e.at_ms) {
                continue;
            }
            let points = if e.kind == Kind::Adjust {
                e.points
            } else {
                e.points.abs()
            };
            let r = rows
                .entry((
                    range.period.label(e.at_ms),
                    source_of(&e).to_string(),
                    kind_label(&e),
                ))
                .or_default();
            r.0 += points;
            r.1 += 1;
        }
        Ok(rows
            .into_iter()
            .map(|((period, source, kind), (points, entries))| PointsRow {
                period,
                source,
                kind: kind.to_string(),
                points,
                entries,
            })
            .collect())
    }

    /// Sink actions per period (of their creation), sink, action and state.
    pub fn rewards_report(&self, range: &Range) -> Result<Vec<RewardsRow>, StoreError> {
        let mut rows: BTreeMap<(String, String, String, String), u64> = BTreeMap::new();
        for item in self.outbox.iter() {
            let (_, v) = item?;
            let j: Job =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if j.kind != JobKind::Send || !range.contains(j.created_at_ms) {
                continue;
            }
            let state = serde_json::to_value(j.state)
                .ok()
                .and_then(|s| s.as_str().map(str::to_string))
                .unwrap_or_default();
            *rows
                .entry((range.period.label(j.created_at_ms), j.sink, j.action, state))
                .or_default() += 1;
        }
        Ok(rows
            .into_iter()
            .map(|((period, sink, action, state), count)| RewardsRow {
                period,
                sink,
                action,
                state,
                count,
            })
            .collect())
    }
}

/// Rows as CSV with a header line.
pub fn to_csv<T: Serialize>(rows: &[T]) -> Result<String, String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r).map_err(|e| e.to_string())?;
    }
    let bytes = w.into_inner().map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{keyed, Op, Reversal, Rules};
    use crate::store::temp_store;

    #[test]
    fn periods_label_days_iso_weeks_and_months() {
        let ms = "2026-01-01T10:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_millisecond() as u64;
        assert_eq!(Period::Day.label(ms), "2026-01-01");
        // 1 January 2026 is a Thursday: ISO week 1 of 2026.
        assert_eq!(Period::Week.label(ms), "2026-W01");
        assert_eq!(Period::Month.label(ms), "2026-01");
        assert!("year".parse::<Period>().is_err());
    }

    #[test]
    fn points_are_summed_per_source_and_kind_and_written_as_csv() {
        let (_d, s) = temp_store();
        let rules = Rules::default();
        let apply = |member: &str, kind: Kind, points: i64, source: &str, key: &str| {
            s.ledger_apply(&Op::new(member, kind, points, "t", source, key), &rules)
                .unwrap()
        };
        apply("a", Kind::Accrue, 100, "shopify:1", &keyed("shopify", "o1"));
        apply("b", Kind::Accrue, 50, "shopify:2", "k2");
        apply("a", Kind::Accrue, 30, "stripe:3", "k3");
        apply("a", Kind::Redeem, 40, "api:checkout", "k4");
        apply("b", Kind::Adjust, -5, "api:admin", "k5");
        s.ledger_reverse(
            &Reversal {
                of: keyed("shopify", "o1"),
                points: Some(10),
                reason: "refund".into(),
                source: "shopify:9".into(),
                idempotency_key: "r1".into(),
                cancel: Vec::new(),
                cumulative: false,
            },
            &rules,
        )
        .unwrap();
        let rows = s.points_report(&Range::default()).unwrap();
        let got: Vec<(&str, &str, i64, u64)> = rows
            .iter()
            .map(|r| (r.source.as_str(), r.kind.as_str(), r.points, r.entries))
            .collect();
        assert_eq!(
            got,
            vec![
                ("api", "adjusted", -5, 1),
                ("api", "redeemed", 40, 1),
                ("shopify", "issued", 150, 2),
                ("shopify", "reversed", 10, 1),
                ("stripe", "issued", 30, 1),
            ]
        );
        // Out of range: nothing.
        let none = Range {
            since_ms: Some(u64::MAX - 1),
            ..Default::default()
        };
        assert!(s.points_report(&none).unwrap().is_empty());
        let csv = to_csv(&rows).unwrap();
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("period,source,kind,points,entries"));
        assert!(lines.next().unwrap().ends_with(",api,adjusted,-5,1"));
    }
}
