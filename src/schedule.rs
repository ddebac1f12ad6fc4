//! Scheduled pipelines (`on: { schedule: { cron, members, … } }`): at each fire of the cron
//! pattern, an event per matching member (every member, or those whose sign-up anniversary
//! or birthday it is), which the pipeline runs on like any other event.
//!
//! A fire is a *run* recorded in the store before its first event: the members are walked
//! in id order, a batch at a time, and the cursor is saved after each batch. Each event's id
//! is (pipeline, fire time, member), so a run resumed after a crash re-emits at most one
//! batch, which the inbox de-duplicates; deliveries then keep their idempotency keys and go
//! through each sink's rate limit like any other job. A fire missed while the daemon was
//! down runs once when it starts (the latest one only).

use crate::ledger::Member;
use crate::pipeline::expr::Engine;
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use std::str::FromStr;

/// The source of scheduled events.
pub const SOURCE: &str = "schedule";

/// Members a fire walks per step, by default.
const BATCH: usize = 500;

/// A run whose fire is older than this (the schedule was removed meanwhile and is back, or
/// the daemon was down for days) is dropped rather than finished.
const STALE_RUN_MS: u64 = 24 * 3_600_000;

/// A pipeline's schedule, as written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Five fields (minute hour day-of-month month day-of-week), six with seconds first, or
    /// `@daily`-style nicknames.
    pub cron: String,
    /// The time zone the pattern and the dates are read in (IANA name; default UTC).
    #[serde(default)]
    pub tz: Option<String>,
    #[serde(default)]
    pub members: MemberSet,
    /// Only members for whom this condition holds (an expression over `member`).
    #[serde(default, rename = "where")]
    pub filter: Option<String>,
    /// Members walked per step (default 500): a run saves its cursor after each.
    #[serde(default)]
    pub batch: Option<usize>,
}

/// Which members a fire is for.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MemberSet {
    /// Every member (a campaign).
    #[default]
    All,
    /// Members who signed up on this day of the year, a year or more ago.
    Anniversary,
    /// Members whose birthday it is.
    Birthday,
}

impl ScheduleSpec {
    /// Problems, by field.
    pub fn check(&self, engine: &Engine) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Err(e) = croner::Cron::from_str(&self.cron) {
            out.push((
                "cron",
                format!(
                    "`{}` is not a cron pattern ({e}); e.g. `0 9 * * *` (09:00 every day)",
                    self.cron
                ),
            ));
        }
        if let Err(e) = self.zone() {
            out.push(("tz", e));
        }
        if let Some(w) = &self.filter {
            if let Err(e) = engine.check_condition(w) {
                out.push(("where", e));
            }
        }
        if self.batch.is_some_and(|b| !(1..=10_000).contains(&b)) {
            out.push(("batch", "a batch is 1 to 10,000 members".into()));
        }
        out
    }

    /// The event id of `member`'s event from the fire at `fire_ms`: for anniversaries and
    /// birthdays the fire's date (a manual run the same day is the same event: nobody is
    /// celebrated twice), else the fire itself.
    fn event_id(&self, pipeline: &str, fire_ms: u64, member: &str) -> String {
        let day = match self.members {
            MemberSet::All => None,
            MemberSet::Anniversary | MemberSet::Birthday => self
                .zone()
                .ok()
                .and_then(|tz| zoned(fire_ms, &tz))
                .map(|z| z.date().to_string()),
        };
        match day {
            Some(d) => format!("{pipeline}:{d}:{member}"),
            None => format!("{pipeline}:{fire_ms}:{member}"),
        }
    }

    fn zone(&self) -> Result<jiff::tz::TimeZone, String> {
        match &self.tz {
            None => Ok(jiff::tz::TimeZone::UTC),
            Some(name) => jiff::tz::TimeZone::get(name)
                .map_err(|_| format!("unknown time zone `{name}` (an IANA name: `Europe/Paris`)")),
        }
    }

    /// The latest fire at or before `now_ms`, if the pattern ever fires.
    pub fn latest_fire(&self, now_ms: u64) -> Option<u64> {
        let cron = croner::Cron::from_str(&self.cron).ok()?;
        let now = zoned(now_ms, &self.zone().ok()?)?;
        let t = cron.find_previous_occurrence(&now, true).ok()?;
        u64::try_from(t.timestamp().as_millisecond()).ok()
    }

    /// The next fire after `now_ms`.
    pub fn next_fire(&self, now_ms: u64) -> Option<u64> {
        let cron = croner::Cron::from_str(&self.cron).ok()?;
        let now = zoned(now_ms, &self.zone().ok()?)?;
        let t = cron.find_next_occurrence(&now, false).ok()?;
        u64::try_from(t.timestamp().as_millisecond()).ok()
    }

    /// Whether a fire at `fire_ms` is for `m`, and what the event says of it besides the
    /// member (`years` since sign-up for an anniversary).
    pub fn matches(
        &self,
        m: &Member,
        fire_ms: u64,
        engine: &Engine,
        member_json: &Json,
    ) -> Result<Option<Json>, String> {
        let tz = self.zone()?;
        let fire = zoned(fire_ms, &tz)
            .ok_or("a fire time out of range")?
            .date();
        let extra = match self.members {
            MemberSet::All => json!({}),
            MemberSet::Anniversary => {
                let Some(joined) = zoned(m.created_at_ms, &tz).map(|z| z.date()) else {
                    return Ok(None);
                };
                if joined.year() >= fire.year() || !same_day(joined.month(), joined.day(), fire) {
                    return Ok(None);
                }
                json!({ "years": fire.year() - joined.year() })
            }
            MemberSet::Birthday => {
                let Some((month, day)) = m
                    .profile
                    .birthday
                    .as_deref()
                    .and_then(crate::ledger::month_day)
                else {
                    return Ok(None);
                };
                if !same_day(month, day, fire) {
                    return Ok(None);
                }
                json!({})
            }
        };
        if let Some(w) = &self.filter {
            if !engine.condition(w, &json!({ "member": member_json }))? {
                return Ok(None);
            }
        }
        Ok(Some(extra))
    }
}

/// `month`/`day` fall on `date` (29 February on the 28th in other years).
fn same_day(month: i8, day: i8, date: jiff::civil::Date) -> bool {
    if (month, day) == (2, 29) && !date.in_leap_year() {
        return (date.month(), date.day()) == (2, 28);
    }
    (date.month(), date.day()) == (month, day)
}

fn zoned(ms: u64, tz: &jiff::tz::TimeZone) -> Option<jiff::Zoned> {
    let ts = jiff::Timestamp::from_millisecond(i64::try_from(ms).ok()?).ok()?;
    Some(ts.to_zoned(tz.clone()))
}

/// A schedule's progress, kept in the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// The last fire that ran to the end (or, for a schedule first seen, when it was seen:
    /// nothing before it fires).
    pub last_fire_ms: Option<u64>,
    /// The fire being run, if any.
    pub run: Option<Run>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Run {
    pub fire_ms: u64,
    /// The last member id walked past.
    pub cursor: Option<String>,
    pub emitted: u64,
    /// Started by an operator (`perkflow schedules run`).
    #[serde(default)]
    pub manual: bool,
}

impl Store {
    /// A schedule's progress.
    pub fn schedule_state(&self, pipeline: &str) -> Result<State, StoreError> {
        match self.schedules.get(pipeline.as_bytes())? {
            Some(raw) => {
                serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string()))
            }
            None => Ok(State::default()),
        }
    }

    fn save_schedule_state(&self, pipeline: &str, st: &State) -> Result<(), StoreError> {
        let raw = serde_json::to_vec(st).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.schedules.insert(pipeline.as_bytes(), raw)?;
        self.schedules.flush()?;
        Ok(())
    }

    /// Starts a run of `pipeline`'s schedule now (an operator's campaign send). Refused
    /// while a run is under way.
    pub fn start_schedule_run(&self, pipeline: &str, now_ms: u64) -> Result<Run, String> {
        let mut st = self.schedule_state(pipeline).map_err(|e| e.to_string())?;
        if let Some(r) = &st.run {
            return Err(format!(
                "a run of `{pipeline}` is under way ({} events so far)",
                r.emitted
            ));
        }
        let run = Run {
            fire_ms: now_ms,
            cursor: None,
            emitted: 0,
            manual: true,
        };
        st.run = Some(run.clone());
        self.save_schedule_state(pipeline, &st)
            .map_err(|e| e.to_string())?;
        Ok(run)
    }

    /// Up to `n` members after `cursor`, in id order.
    fn members_after(&self, cursor: Option<&str>, n: usize) -> Result<Vec<Member>, StoreError> {
        let range = match cursor {
            Some(c) => {
                let mut start = c.as_bytes().to_vec();
                start.push(0);
                self.members.range(start..)
            }
            None => self.members.range::<&[u8], _>(..),
        };
        range
            .take(n)
            .map(|r| {
                let (_, v) = r?;
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }
}

/// The member as a scheduled event shows it.
fn member_json(m: &Member, rules: &crate::ledger::Rules) -> Json {
    json!({
        "id": m.id,
        "email": m.profile.email,
        "phone": m.profile.phone,
        "birthday": m.profile.birthday,
        "attributes": m.profile.attributes,
        "balance": m.balance,
        "pending": m.pending,
        "lifetime": m.lifetime,
        "tier": rules.tier(m.lifetime).map(|t| t.name.clone()),
        "created_at_ms": m.created_at_ms,
    })
}

/// What one step of a schedule did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Idle,
    Started(u64),
    Emitted { events: usize, done: bool },
}

/// Advances `pipeline`'s schedule by at most one batch.
async fn step(
    store: &Store,
    pipeline: &str,
    spec: &ScheduleSpec,
    rules: &crate::ledger::Rules,
    engine: &Engine,
    now_ms: u64,
) -> Result<Step, String> {
    use crate::inbox::Inbox;
    let mut st = store.schedule_state(pipeline).map_err(|e| e.to_string())?;
    if let Some(r) = &st.run {
        if !r.manual && now_ms.saturating_sub(r.fire_ms) > STALE_RUN_MS {
            tracing::warn!(pipeline, fire_ms = r.fire_ms, "dropping a schedule run older than a day (the daemon was down, or the schedule was removed and is back)");
            st.last_fire_ms = Some(r.fire_ms);
            st.run = None;
            store
                .save_schedule_state(pipeline, &st)
                .map_err(|e| e.to_string())?;
        }
    }
    let Some(mut run) = st.run.clone() else {
        let latest = spec.latest_fire(now_ms);
        match (st.last_fire_ms, latest) {
            // First seen: nothing in the past fires.
            (None, _) => {
                st.last_fire_ms = Some(now_ms);
                store
                    .save_schedule_state(pipeline, &st)
                    .map_err(|e| e.to_string())?;
                return Ok(Step::Idle);
            }
            (Some(last), Some(fire)) if fire > last => {
                st.run = Some(Run {
                    fire_ms: fire,
                    cursor: None,
                    emitted: 0,
                    manual: false,
                });
                store
                    .save_schedule_state(pipeline, &st)
                    .map_err(|e| e.to_string())?;
                return Ok(Step::Started(fire));
            }
            _ => return Ok(Step::Idle),
        }
    };
    let page = {
        let s = store.clone();
        let cursor = run.cursor.clone();
        let batch = spec.batch.unwrap_or(BATCH);
        tokio::task::spawn_blocking(move || s.members_after(cursor.as_deref(), batch))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    let mut events = Vec::new();
    for m in &page {
        let mj = member_json(m, rules);
        // One member's data failing the `where` skips that member, not the run.
        let extra = match spec.matches(m, run.fire_ms, engine, &mj) {
            Ok(Some(extra)) => extra,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(pipeline, member = %m.id, error = %e, "schedule: member skipped");
                continue;
            }
        };
        let payload = json!({
            "member": mj,
            "schedule": {
                "pipeline": pipeline,
                "fire_ms": run.fire_ms,
                "manual": run.manual,
            },
            "years": extra.get("years"),
        });
        events.push(crate::inbox::NewEvent {
            source: SOURCE.into(),
            connector: SOURCE.into(),
            vendor_id: spec.event_id(pipeline, run.fire_ms, &m.id),
            event_type: pipeline.to_string(),
            event_time: None,
            received_at_ms: now_ms,
            headers: Vec::new(),
            payload: bytes::Bytes::from(serde_json::to_vec(&payload).unwrap_or_default()),
        });
    }
    let n = events.len();
    if !events.is_empty() {
        store.append(events).await.map_err(|e| e.to_string())?;
    }
    run.emitted += n as u64;
    let done = page.len() < spec.batch.unwrap_or(BATCH);
    if done {
        tracing::info!(
            pipeline,
            events = run.emitted,
            fire_ms = run.fire_ms,
            "schedule run finished"
        );
        st.last_fire_ms = Some(st.last_fire_ms.unwrap_or(0).max(run.fire_ms));
        st.run = None;
    } else {
        run.cursor = page.last().map(|m| m.id.clone());
        st.run = Some(run);
    }
    store
        .save_schedule_state(pipeline, &st)
        .map_err(|e| e.to_string())?;
    Ok(Step::Emitted { events: n, done })
}

/// Runs the schedules of the running configuration until `stop`: each second, every
/// scheduled pipeline whose fire is due or whose run is under way advances (several batches
/// per second, each stored before the cursor moves).
pub async fn run(
    store: Store,
    runtime: impl Fn() -> std::sync::Arc<crate::app::Runtime> + Send + 'static,
    wake: std::sync::Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    let engine = Engine::new();
    loop {
        let rt = runtime();
        for p in rt.pipelines.values() {
            let Some(spec) = &p.on.schedule else {
                continue;
            };
            // Bounded: at most 20 batches per pipeline per second.
            for _ in 0..20 {
                if stop.is_cancelled() {
                    return;
                }
                match step(
                    &store,
                    &p.name,
                    spec,
                    &rt.loyalty,
                    &engine,
                    crate::delivery::now_ms(),
                )
                .await
                {
                    Ok(Step::Idle) => break,
                    Ok(Step::Started(fire)) => {
                        tracing::info!(pipeline = %p.name, fire_ms = fire, "schedule fired");
                    }
                    Ok(Step::Emitted { events, done }) => {
                        if events > 0 {
                            metrics::counter!("perkflow_schedule_events_total", "pipeline" => p.name.clone())
                                .increment(events as u64);
                            wake.notify_one();
                        }
                        if done {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(pipeline = %p.name, error = %e, "schedule run failed; trying again in a second");
                        break;
                    }
                }
            }
        }
        drop(rt);
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// A schedule as the admin API shows it.
pub fn status(store: &Store, pipeline: &str, spec: &ScheduleSpec, now_ms: u64) -> Json {
    let st = store.schedule_state(pipeline).unwrap_or_default();
    json!({
        "pipeline": pipeline,
        "cron": spec.cron,
        "tz": spec.tz.as_deref().unwrap_or("UTC"),
        "members": spec.members,
        "where": spec.filter,
        "next_fire_ms": spec.next_fire(now_ms),
        "last_fire_ms": st.last_fire_ms,
        "run": st.run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Op, Profile, Rules};
    use crate::store::temp_store;

    fn ms(s: &str) -> u64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64
    }

    fn spec(cron: &str, members: MemberSet) -> ScheduleSpec {
        ScheduleSpec {
            cron: cron.into(),
            tz: None,
            members,
            filter: None,
            batch: None,
        }
    }

    #[test]
    fn patterns_zones_and_bad_input() {
        let e = Engine::new();
        let s = spec("0 9 * * *", MemberSet::All);
        assert!(s.check(&e).is_empty());
        assert_eq!(
            s.latest_fire(ms("2026-11-22T08:59:00Z")),
            Some(ms("2026-11-21T09:00:00Z"))
        );
        assert_eq!(
            s.latest_fire(ms("2026-11-22T09:00:00Z")),
            Some(ms("2026-11-22T09:00:00Z"))
        );
        assert_eq!(
            s.next_fire(ms("2026-11-22T09:00:00Z")),
            Some(ms("2026-11-23T09:00:00Z"))
        );
        let paris = ScheduleSpec {
            tz: Some("Europe/Paris".into()),
            ..s.clone()
        };
        assert_eq!(
            paris.next_fire(ms("2026-11-22T07:00:00Z")),
            Some(ms("2026-11-22T08:00:00Z"))
        );
        let bad = ScheduleSpec {
            cron: "0 25 * * *".into(),
            tz: Some("Mars/Olympus".into()),
            members: MemberSet::All,
            filter: Some("member.tier ==".into()),
            batch: Some(0),
        };
        let fields: Vec<&str> = bad.check(&e).iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, vec!["cron", "tz", "where", "batch"]);
    }

    #[test]
    fn celebrations_are_one_event_per_member_and_day_campaigns_one_per_fire() {
        let bday = spec("0 8 * * *", MemberSet::Birthday);
        let morning = bday.event_id("b", ms("2026-11-22T08:00:00Z"), "m1");
        // An operator's run the same afternoon: the same event, so nobody gets two.
        assert_eq!(
            morning,
            bday.event_id("b", ms("2026-11-22T15:30:00Z"), "m1")
        );
        assert_ne!(
            morning,
            bday.event_id("b", ms("2026-11-23T08:00:00Z"), "m1")
        );
        let all = spec("0 8 * * *", MemberSet::All);
        assert_ne!(
            all.event_id("c", ms("2026-11-22T08:00:00Z"), "m1"),
            all.event_id("c", ms("2026-11-22T15:30:00Z"), "m1")
        );
    }

    #[test]
    fn anniversaries_and_birthdays_match_their_day_only() {
        let e = Engine::new();
        let rules = Rules::default();
        let mut m = Member {
            id: "m".into(),
            created_at_ms: ms("2024-02-29T10:00:00Z"),
            profile: Profile {
                birthday: Some("1990-11-22".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let ann = spec("0 9 * * *", MemberSet::Anniversary);
        let bday = spec("0 9 * * *", MemberSet::Birthday);
        let at = |s: &ScheduleSpec, m: &Member, when: &str| {
            s.matches(m, ms(when), &e, &member_json(m, &rules)).unwrap()
        };
        // Signed up on 29 February: the 28th in other years, never the year itself.
        assert_eq!(
            at(&ann, &m, "2025-02-28T09:00:00Z"),
            Some(json!({"years": 1}))
        );
        assert_eq!(at(&ann, &m, "2025-03-01T09:00:00Z"), None);
        assert_eq!(
            at(&ann, &m, "2028-02-29T09:00:00Z"),
            Some(json!({"years": 4}))
        );
        assert_eq!(at(&ann, &m, "2028-02-28T09:00:00Z"), None);
        assert_eq!(at(&ann, &m, "2024-02-29T11:00:00Z"), None);
        assert!(at(&bday, &m, "2026-11-22T09:00:00Z").is_some());
        assert!(at(&bday, &m, "2026-11-23T09:00:00Z").is_none());
        m.profile.birthday = None;
        assert!(at(&bday, &m, "2026-11-22T09:00:00Z").is_none());
        // `where` narrows.
        let rich = ScheduleSpec {
            filter: Some("member.balance >= 100".into()),
            ..spec("0 9 * * *", MemberSet::All)
        };
        assert!(at(&rich, &m, "2026-11-22T09:00:00Z").is_none());
        m.balance = 100;
        assert!(at(&rich, &m, "2026-11-22T09:00:00Z").is_some());
    }

    #[tokio::test]
    async fn a_run_walks_every_member_once_in_batches_and_resumes_from_its_cursor() {
        let (_d, store) = temp_store();
        let rules = Rules::default();
        let e = Engine::new();
        for i in 0..1_200 {
            store
                .ledger_apply(
                    &Op::new(
                        format!("m{i:05}"),
                        crate::ledger::Kind::Accrue,
                        1,
                        "t",
                        "t",
                        format!("k{i}"),
                    ),
                    &rules,
                )
                .unwrap();
        }
        let s = spec("0 9 * * *", MemberSet::All);
        let t0 = ms("2026-11-22T08:00:00Z");
        // First seen: nothing fires for the past.
        assert_eq!(
            step(&store, "p", &s, &rules, &e, t0).await.unwrap(),
            Step::Idle
        );
        assert_eq!(
            step(&store, "p", &s, &rules, &e, t0).await.unwrap(),
            Step::Idle
        );
        let t1 = ms("2026-11-22T09:00:05Z");
        assert_eq!(
            step(&store, "p", &s, &rules, &e, t1).await.unwrap(),
            Step::Started(ms("2026-11-22T09:00:00Z"))
        );
        assert_eq!(
            step(&store, "p", &s, &rules, &e, t1).await.unwrap(),
            Step::Emitted {
                events: 500,
                done: false
            }
        );
        // A crash here: the state says where to go on; the batch re-emitted is a duplicate.
        let mut st = store.schedule_state("p").unwrap();
        let cursor = st.run.as_ref().unwrap().cursor.clone();
        assert_eq!(cursor.as_deref(), Some("m00499"));
        st.run.as_mut().unwrap().cursor = None;
        store.save_schedule_state("p", &st).unwrap();
        assert_eq!(
            step(&store, "p", &s, &rules, &e, t1).await.unwrap(),
            Step::Emitted {
                events: 500,
                done: false
            }
        );
        assert_eq!(store.pending_len(), 500, "the same 500 events, stored once");
        assert_eq!(
            step(&store, "p", &s, &rules, &e, t1).await.unwrap(),
            Step::Emitted {
                events: 500,
                done: false
            }
        );
        assert_eq!(
            step(&store, "p", &s, &rules, &e, t1).await.unwrap(),
            Step::Emitted {
                events: 200,
                done: true
            }
        );
        assert_eq!(store.pending_len(), 1_200);
        // Done until the next fire.
        assert_eq!(
            step(&store, "p", &s, &rules, &e, t1 + 60_000)
                .await
                .unwrap(),
            Step::Idle
        );
        assert_eq!(
            store.schedule_state("p").unwrap().last_fire_ms,
            Some(ms("2026-11-22T09:00:00Z"))
        );
        // Days of downtime: one fire (the latest), not one per missed day.
        let later = ms("2026-11-25T10:00:00Z");
        assert_eq!(
            step(&store, "p", &s, &rules, &e, later).await.unwrap(),
            Step::Started(ms("2026-11-25T09:00:00Z"))
        );
        // A manual run is refused while one is under way.
        assert!(store.start_schedule_run("p", later).is_err());
    }
}
