//! Exact baselines of the window still filling (see [`super::baseline`]).

use super::*;
use crate::decimal::Decimal;
use crate::Config;

/// Weekly metrics of every kind, a daily count and a trailing count; 6 hours of lateness so
/// a late event can move a member's first step by hours.
const WEEKLY: &str = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[time]
zone = "UTC"
allowed_lateness = "6h"
max_future_skew = "1h"
[north_star]
name = "weekly_users"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1w"
[[inputs]]
name = "messages"
kind = "count"
where = { event = "message_sent" }
window = "1w"
[[inputs]]
name = "revenue"
kind = "sum"
field = "amount"
where = { event = "payment" }
window = "1w"
[[inputs]]
name = "revenue_per_message"
kind = "ratio"
numerator = "revenue"
denominator = "messages"
window = "1w"
[[inputs]]
name = "returning_users"
kind = "retention"
of = "weekly_users"
[[inputs]]
name = "chatty_users"
kind = "threshold"
entity = "user_id"
at_least = 2
where = { event = "message_sent" }
window = "1w"
[[inputs]]
name = "messages_7d"
kind = "count"
where = { event = "message_sent" }
trailing = "7d"
"#;

/// Mondays: 2026-11-23 is one.
const NOW: &str = "2026-11-23T03:30:00Z";

fn ms(text: &str) -> i64 {
    text.parse::<jiff::Timestamp>()
        .expect("timestamp")
        .as_millisecond()
}

fn plan_of(toml: &str) -> Plan {
    let config = Config::from_toml(toml, &|_| None).expect("a valid config");
    Plan::from_config(&config)
}

fn key() -> PartitionKey {
    PartitionKey::new("events", 0)
}

/// `(event, user, time, amount)`.
type Event<'a> = (&'a str, &'a str, &'a str, Option<&'a str>);

fn payload((event, user, time, amount): Event<'_>) -> Vec<u8> {
    let amount = amount.map_or(String::new(), |amount| format!(r#","amount":{amount}"#));
    format!(r#"{{"event":"{event}","user_id":"{user}","timestamp":"{time}"{amount}}}"#).into_bytes()
}

/// Applies `events` from offset `from`, each of them accepted.
fn apply(engine: &mut Engine, from: usize, events: &[Event<'_>]) {
    for (offset, event) in events.iter().enumerate() {
        let outcome = engine.apply(&key(), (from + offset) as i64, &payload(*event), ms(NOW));
        assert!(
            matches!(outcome, Outcome::Applied { .. }),
            "{event:?}: {outcome:?}"
        );
    }
}

fn message<'a>(user: &'a str, time: &'a str) -> Event<'a> {
    ("message_sent", user, time, None)
}

fn payment<'a>(amount: &'a str, time: &'a str) -> Event<'a> {
    ("payment", "payer", time, Some(amount))
}

/// The week before the last: u2, u3 and u7 active.
const WEEK_BEFORE: [Event<'static>; 3] = [
    ("message_sent", "u2", "2026-11-09T10:00:00Z", None),
    ("message_sent", "u3", "2026-11-09T11:00:00Z", None),
    ("message_sent", "u7", "2026-11-09T12:00:00Z", None),
];

/// Last week, up to the late event: u3 first seen at 05:30 (step 5).
fn last_week() -> Vec<Event<'static>> {
    vec![
        message("u1", "2026-11-16T00:30:00Z"),
        payment("10.5", "2026-11-16T00:45:00Z"),
        message("u2", "2026-11-16T01:10:00Z"),
        message("u1", "2026-11-16T01:50:00Z"),
        payment("2.25", "2026-11-16T03:19:59Z"),
        // Step 20 (03:20 to 03:30): after the elapsed point of the current window's baseline.
        payment("100", "2026-11-16T03:20:00Z"),
        message("u3", "2026-11-16T05:30:00Z"),
        message("u4", "2026-11-16T06:00:00Z"),
    ]
}

/// Late but accepted: moves u3's earliest event of last week from step 5 to step 2.
const LATE: Event<'static> = ("message_sent", "u3", "2026-11-16T02:40:00Z", None);

/// After the late event: the rest of last week, and the current week up to 03:20 on Monday.
fn later() -> Vec<Event<'static>> {
    vec![
        message("u5", "2026-11-17T10:00:00Z"),
        message("u1", "2026-11-23T00:10:00Z"),
        message("u6", "2026-11-23T01:00:00Z"),
        message("u2", "2026-11-23T03:20:00Z"),
    ]
}

fn all_events() -> Vec<Event<'static>> {
    let mut events = WEEK_BEFORE.to_vec();
    events.extend(last_week());
    events.push(LATE);
    events.extend(later());
    events
}

fn engine_with(plan: Plan, events: &[Event<'_>]) -> Engine {
    let mut engine = Engine::new(plan);
    engine.restore_partition(key(), PartitionSnapshot::default());
    apply(&mut engine, 0, events);
    engine
}

fn values_of<'v>(engine: &Engine, values: &'v [MetricValues], name: &str) -> &'v MetricValues {
    let index = engine
        .plan()
        .metrics()
        .iter()
        .position(|metric| metric.name == name)
        .expect("a metric of the config");
    values
        .iter()
        .find(|values| values.metric == index)
        .expect("values of the metric")
}

fn baseline_of(engine: &Engine, name: &str) -> Option<Baseline> {
    let values = engine.metric_values(ms(NOW));
    values_of(engine, &values, name).baseline.clone()
}

/// The one point of a weekly baseline: last week, read at 3h20 (the clock is at 03:20, the
/// start of the 21st step of 10 minutes).
fn weekly_point(engine: &Engine, name: &str) -> AggValue {
    let baseline = baseline_of(engine, name).expect("a baseline");
    assert_eq!(baseline.elapsed_ms, 200 * 60_000);
    let [point] = baseline.points.as_slice() else {
        panic!("one point: {baseline:?}");
    };
    assert_eq!(point.weeks_back, None);
    assert_eq!(point.bounds.start_ms, ms("2026-11-16T00:00:00Z"));
    point.value
}

#[test]
fn weekly_baselines_are_last_weeks_values_at_the_same_elapsed_point() {
    let engine = engine_with(plan_of(WEEKLY), &all_events());
    // Before 03:20 last week: four messages, by u1, u2 and u3 (moved to 02:40 by the late
    // event), and 10.5 + 2.25 of revenue (the payment at 03:20 is in the next step).
    assert_eq!(weekly_point(&engine, "messages"), AggValue::Count(4));
    assert_eq!(weekly_point(&engine, "weekly_users"), AggValue::Distinct(3));
    assert_eq!(
        weekly_point(&engine, "revenue"),
        AggValue::Sum(Decimal::parse("12.75").expect("decimal"))
    );
    assert_eq!(
        weekly_point(&engine, "revenue_per_message"),
        AggValue::Ratio {
            numerator: Decimal::parse("12.75").expect("decimal"),
            denominator: Decimal::from_count(4),
        }
    );
    // u2 and u3 (from 02:40, after the late event) returned from the week before, whose
    // three users are the denominator, as the current rate divides by last week's users.
    assert_eq!(
        weekly_point(&engine, "returning_users"),
        AggValue::Ratio {
            numerator: Decimal::from_count(2),
            denominator: Decimal::from_count(3),
        }
    );
    assert_eq!(
        baseline_of(&engine, "messages").map(|b| b.value()),
        Some(4.0)
    );
    // A threshold keeps no progress record: no baseline rather than a wrong one.
    assert_eq!(baseline_of(&engine, "chatty_users"), None);
    // A trailing metric's baseline is its previous range.
    let values = engine.metric_values(ms(NOW));
    let trailing = values_of(&engine, &values, "messages_7d");
    let baseline = trailing.baseline.as_ref().expect("a trailing baseline");
    assert_eq!(baseline.points[0].value, trailing.previous.value);
    assert_eq!(baseline.points[0].bounds, trailing.previous.bounds);
}

#[test]
fn a_late_event_moves_a_members_first_step_and_its_return() {
    let mut events = WEEK_BEFORE.to_vec();
    events.extend(last_week());
    events.extend(later());
    // Without the late event, u3 first came at 05:30: not in the baseline at 3 hours.
    let engine = engine_with(plan_of(WEEKLY), &events);
    assert_eq!(weekly_point(&engine, "weekly_users"), AggValue::Distinct(2));
    assert_eq!(
        weekly_point(&engine, "returning_users"),
        AggValue::Ratio {
            numerator: Decimal::from_count(1),
            denominator: Decimal::from_count(3),
        }
    );
    // A later event of a member already counted moves nothing.
    let mut engine = engine;
    apply(
        &mut engine,
        events.len(),
        &[message("u1", "2026-11-23T03:25:00Z")],
    );
    assert_eq!(weekly_point(&engine, "weekly_users"), AggValue::Distinct(2));
}

#[test]
fn a_window_with_no_past_peer_has_no_baseline() {
    // Only the current week has events: last week is absent, not zero.
    let engine = engine_with(plan_of(WEEKLY), &later()[1..]);
    for name in ["messages", "weekly_users", "revenue", "revenue_per_message"] {
        assert_eq!(baseline_of(&engine, name), None, "{name}");
    }
}

#[test]
fn a_restart_from_stored_state_gives_the_same_baselines() {
    let plan = plan_of(WEEKLY);
    let uninterrupted = engine_with(plan.clone(), &all_events());

    // Stored after last week's first part, restored, then the late event and the rest.
    let memory = MemoryReader::default();
    let mut first = Engine::with_reader(plan.clone(), Box::new(memory.clone()), 1024);
    first.restore_partition(key(), PartitionSnapshot::default());
    let mut before: Vec<Event<'_>> = WEEK_BEFORE.to_vec();
    before.extend(last_week());
    apply(&mut first, 0, &before);
    let changes = first.take_changes();
    let part = &changes.partitions[0];
    memory.write(part);
    let snapshot = PartitionSnapshot {
        next_offset: part.next_offset,
        max_event_ms: part.max_event_ms,
        event_watermark_ms: part.event_watermark_ms,
        idle_floor_ms: part.idle_floor_ms,
        metric_since: Vec::new(),
        no_stored_members: false,
        upstream: None,
        windows: part
            .upserts
            .iter()
            .map(|upsert| StoredWindow {
                metric: upsert.metric,
                start_ms: upsert.start_ms,
                end_ms: upsert.end_ms,
                value: upsert.value,
                progress: upsert.progress.clone(),
            })
            .collect(),
        segments: Vec::new(),
        gaps: part.gaps.clone(),
    };
    let mut restored = Engine::with_reader(plan, Box::new(memory.clone()), 1024);
    restored.restore_partition(key(), snapshot);
    let mut rest = vec![LATE];
    rest.extend(later());
    apply(&mut restored, before.len(), &rest);

    assert_eq!(
        restored.metric_values(ms(NOW)),
        uninterrupted.metric_values(ms(NOW))
    );
    assert_eq!(
        weekly_point(&restored, "weekly_users"),
        AggValue::Distinct(3)
    );
}

#[test]
fn windows_stored_without_progress_give_no_baseline() {
    // As a window of state format 5 is restored: its value, no record.
    let plan = plan_of(WEEKLY);
    let mut engine = Engine::new(plan.clone());
    let messages = plan
        .metrics()
        .iter()
        .position(|metric| metric.name == "messages")
        .expect("messages");
    engine.restore_partition(
        key(),
        PartitionSnapshot {
            windows: vec![StoredWindow {
                metric: messages,
                start_ms: ms("2026-11-16T00:00:00Z"),
                end_ms: ms("2026-11-23T00:00:00Z"),
                value: AggValue::Count(10),
                progress: None,
            }],
            ..PartitionSnapshot::default()
        },
    );
    apply(&mut engine, 0, &later()[1..]);
    assert_eq!(baseline_of(&engine, "messages"), None);
    assert!(baseline_of(&engine, "weekly_users").is_none());
}

const DAILY: &str = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[time]
zone = "Europe/Berlin"
[north_star]
name = "daily_messages"
kind = "count"
where = { event = "message_sent" }
window = "1d"
[[inputs]]
name = "daily_users"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1d"
"#;

/// `count` messages by distinct users on a day, from 01:00 local time a minute apart, and one
/// at 20:00 (after the elapsed point of the baseline).
fn day_of_messages(day: &str, count: usize) -> Vec<(String, String)> {
    let mut events: Vec<(String, String)> = (0..count)
        .map(|n| {
            let time = format!("{day}T01:{n:02}:00+01:00");
            (format!("u{n}"), time)
        })
        .collect();
    events.push(("late-riser".into(), format!("{day}T20:00:00+01:00")));
    events
}

#[test]
fn a_daily_baseline_is_the_median_of_the_same_weekday_four_weeks_back() {
    let mut engine = Engine::new(plan_of(DAILY));
    engine.restore_partition(key(), PartitionSnapshot::default());
    // Mondays 4, 3, 2 and 1 weeks back (Europe/Berlin, after the DST change of October),
    // then the current Monday up to 02:00.
    let mut events = Vec::new();
    for (day, count) in [
        ("2026-10-26", 10),
        ("2026-11-02", 3),
        ("2026-11-09", 1),
        ("2026-11-16", 5),
    ] {
        events.extend(day_of_messages(day, count));
    }
    events.push(("u0".into(), "2026-11-23T02:00:00+01:00".into()));
    let events: Vec<Event<'_>> = events
        .iter()
        .map(|(user, time)| ("message_sent", user.as_str(), time.as_str(), None))
        .collect();
    apply(&mut engine, 0, &events);

    // At 02:00 local, 12 steps of 10 minutes: each Monday's morning messages, not 20:00's.
    let baseline = baseline_of(&engine, "daily_messages").expect("a baseline");
    assert_eq!(baseline.elapsed_ms, 2 * 3_600_000);
    let points: Vec<(Option<u8>, AggValue)> = baseline
        .points
        .iter()
        .map(|point| (point.weeks_back, point.value))
        .collect();
    assert_eq!(
        points,
        vec![
            (Some(1), AggValue::Count(5)),
            (Some(2), AggValue::Count(1)),
            (Some(3), AggValue::Count(3)),
            (Some(4), AggValue::Count(10)),
        ]
    );
    assert_eq!(
        baseline.points[3].bounds.start_ms,
        ms("2026-10-26T00:00:00+01:00")
    );
    // The median of 1, 3, 5 and 10.
    assert_eq!(baseline.value(), 4.0);
    let users = baseline_of(&engine, "daily_users").expect("a baseline");
    assert_eq!(users.value(), 4.0);
}

#[test]
fn a_seasonal_baseline_takes_the_median_of_the_weeks_the_state_holds() {
    let mut engine = Engine::new(plan_of(DAILY));
    engine.restore_partition(key(), PartitionSnapshot::default());
    let mut events = Vec::new();
    for (day, count) in [("2026-11-02", 3), ("2026-11-09", 1), ("2026-11-16", 5)] {
        events.extend(day_of_messages(day, count));
    }
    events.push(("u0".into(), "2026-11-23T02:00:00+01:00".into()));
    let events: Vec<Event<'_>> = events
        .iter()
        .map(|(user, time)| ("message_sent", user.as_str(), time.as_str(), None))
        .collect();
    apply(&mut engine, 0, &events);
    let baseline = baseline_of(&engine, "daily_messages").expect("a baseline");
    assert_eq!(baseline.points.len(), 3);
    assert_eq!(baseline.value(), 3.0);
}
