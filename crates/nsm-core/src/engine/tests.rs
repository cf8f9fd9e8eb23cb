use super::plan::{DedupSettings, EngineSettings};
use super::*;
use crate::decimal::Decimal;
use crate::metric::{Clause, FieldPath, Filter, FilterField, Literal, MetricDef, MetricKind, Role};
use crate::reject::RejectReason;
use crate::window::{Calendar, CalendarUnit};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const MINUTE: i64 = 60_000;

fn ms(text: &str) -> i64 {
    text.parse::<jiff::Timestamp>()
        .expect("timestamp")
        .as_millisecond()
}

fn metric(name: &str, kind: MetricKind, event: Option<&str>, window: CalendarUnit) -> MetricDef {
    let clauses = event
        .map(|event| {
            vec![Clause {
                field: FilterField::EventName,
                any_of: vec![Literal::Text(event.into())],
            }]
        })
        .unwrap_or_default();
    MetricDef {
        name: name.into(),
        role: Role::Input,
        owner: None,
        description: String::new(),
        kind,
        filter: Filter {
            clauses,
            ..Filter::default()
        },
        window,
        trailing: None,
        segments: None,
    }
}

fn path(text: &str) -> FieldPath {
    FieldPath::parse(text).expect("path")
}

fn test_plan() -> Plan {
    let metrics = vec![
        metric(
            "active_users",
            MetricKind::Distinct {
                field: path("user_id"),
            },
            Some("message_sent"),
            CalendarUnit::Day,
        ),
        metric(
            "messages",
            MetricKind::Count,
            Some("message_sent"),
            CalendarUnit::Hour,
        ),
        metric(
            "revenue",
            MetricKind::Sum {
                field: path("properties.amount"),
            },
            Some("payment"),
            CalendarUnit::Week,
        ),
    ];
    Plan::new(
        metrics,
        EngineSettings {
            event_name_field: path("event"),
            timestamp_field: path("timestamp"),
            timestamp_format: Default::default(),
            calendar: Calendar::new("Europe/Berlin", jiff::civil::Weekday::Monday).expect("zone"),
            allowed_lateness_ms: HOUR,
            retention_ms: 35 * DAY,
            max_future_skew_ms: HOUR,
            max_event_bytes: 4096,
            dedup: Some(DedupSettings {
                id_field: path("event_id"),
                horizon_ms: 10 * MINUTE,
                across_partitions: false,
            }),
            message_key: None,
        },
    )
}

fn key() -> PartitionKey {
    PartitionKey::new("events", 0)
}

fn engine() -> Engine {
    let mut engine = Engine::new(test_plan());
    engine.restore_partition(key(), PartitionSnapshot::default());
    engine
}

fn event(name: &str, user: &str, time: &str) -> Vec<u8> {
    format!(r#"{{"event":"{name}","user_id":"{user}","timestamp":"{time}"}}"#).into_bytes()
}

fn payment(amount: &str, time: &str) -> Vec<u8> {
    format!(r#"{{"event":"payment","user_id":"u","timestamp":"{time}","properties":{{"amount":{amount}}}}}"#).into_bytes()
}

const NOW: &str = "2026-11-23T12:00:00Z";

fn values(engine: &Engine) -> Vec<(f64, f64)> {
    engine
        .metric_values(ms(NOW))
        .iter()
        .map(|values| {
            (
                values.current.value.to_f64(),
                values.previous.value.to_f64(),
            )
        })
        .collect()
}

fn reason(outcome: Outcome) -> Option<RejectReason> {
    match outcome {
        Outcome::Rejected(rejection) => Some(rejection.reason),
        _ => None,
    }
}

#[test]
fn counts_sums_and_distinct_users_per_window() {
    let mut engine = engine();
    let now = ms(NOW);
    let stream = [
        event("message_sent", "ana", "2026-11-23T09:10:00Z"),
        event("message_sent", "ana", "2026-11-23T09:20:00Z"),
        event("message_sent", "bo", "2026-11-23T09:30:00Z"),
        event("page_viewed", "cy", "2026-11-23T09:40:00Z"),
        payment("19.99", "2026-11-23T09:45:00Z"),
        payment("0.01", "2026-11-23T09:50:00Z"),
        event("message_sent", "cy", "2026-11-23T10:05:00Z"),
    ];
    for (offset, payload) in stream.iter().enumerate() {
        let outcome = engine.apply(&key(), offset as i64, payload, now);
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
    // Current hour (10:00-11:00 UTC is 11:00-12:00 Berlin) holds one message; the previous
    // hour three. Today 3 distinct users sent messages; revenue is 20.00 this week.
    assert_eq!(values(&engine), vec![(3.0, 0.0), (1.0, 3.0), (20.0, 0.0)]);
}

#[test]
fn a_checkpoint_is_due_once_enough_entries_are_written() {
    let mut engine = Engine::new(test_plan()).with_max_checkpoint_entries(3);
    engine.restore_partition(key(), PartitionSnapshot::default());
    let now = ms(NOW);
    let mut offset = 0;
    let mut send = |engine: &mut Engine, user: &str| {
        let outcome = engine.apply(&key(), offset, &event("message_sent", user, NOW), now);
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
        offset += 1;
    };
    // One entry per new member of the day; repeated members and counts write none.
    send(&mut engine, "a");
    send(&mut engine, "b");
    send(&mut engine, "b");
    assert!(!engine.checkpoint_due(), "two entries written");
    send(&mut engine, "c");
    assert!(engine.checkpoint_due(), "three entries written");
    assert_eq!(engine.take_changes().partitions[0].members.len(), 3);
    assert!(!engine.checkpoint_due(), "stored: none written since");
}

#[test]
fn late_events_are_rejected_but_lateness_allows_corrections() {
    let mut engine = engine();
    let now = ms(NOW);
    engine.apply(
        &key(),
        0,
        &event("message_sent", "ana", "2026-11-23T10:00:00Z"),
        now,
    );
    // 50 minutes behind the watermark: within the hour of lateness, corrects its window.
    let outcome = engine.apply(
        &key(),
        1,
        &event("message_sent", "bo", "2026-11-23T09:10:00Z"),
        now,
    );
    assert!(matches!(outcome, Outcome::Applied { .. }));
    // 61 minutes behind: late, not applied.
    let outcome = engine.apply(
        &key(),
        2,
        &event("message_sent", "cy", "2026-11-23T08:59:00Z"),
        now,
    );
    assert_eq!(reason(outcome), Some(RejectReason::Late));
    assert_eq!(values(&engine)[0], (2.0, 0.0));
    assert_eq!(values(&engine)[1], (1.0, 1.0));
}

#[test]
fn replaying_last_month_is_not_late() {
    let mut engine = engine();
    let now = ms(NOW);
    // Three weeks of history, oldest first, long after it happened: lateness is measured
    // against the stream's own watermark, so none of it is late.
    for (offset, day) in (1..=21).enumerate() {
        let time = format!("2026-11-{day:02}T12:00:00Z");
        let outcome = engine.apply(
            &key(),
            offset as i64,
            &event("message_sent", "ana", &time),
            now,
        );
        assert!(
            matches!(outcome, Outcome::Applied { .. }),
            "{time}: {outcome:?}"
        );
    }
}

#[test]
fn bad_events_are_rejected_with_bounded_reasons_and_change_nothing() {
    let mut engine = engine();
    let now = ms(NOW);
    let cases: Vec<(Vec<u8>, RejectReason)> = vec![
        (b"not json".to_vec(), RejectReason::InvalidJson),
        (vec![0xff, 0xfe, b'{'], RejectReason::InvalidJson),
        (b"[1,2]".to_vec(), RejectReason::NotAnObject),
        (
            br#"{"user_id":"a","timestamp":"2026-11-23T10:00:00Z"}"#.to_vec(),
            RejectReason::MissingEventName,
        ),
        (
            br#"{"event":"message_sent","user_id":"a"}"#.to_vec(),
            RejectReason::MissingTimestamp,
        ),
        (
            br#"{"event":"message_sent","user_id":"a","timestamp":"yesterday"}"#.to_vec(),
            RejectReason::InvalidTimestamp,
        ),
        (
            br#"{"event":"message_sent","user_id":"a","timestamp":"9999-01-01T00:00:00Z"}"#
                .to_vec(),
            RejectReason::TimestampOutOfRange,
        ),
        (
            br#"{"event":"message_sent","user_id":"a","timestamp":0}"#.to_vec(),
            RejectReason::TimestampOutOfRange,
        ),
        (
            br#"{"event":"message_sent","timestamp":"2026-11-23T10:00:00Z"}"#.to_vec(),
            RejectReason::MissingField,
        ),
        (
            br#"{"event":"message_sent","user_id":{"id":1},"timestamp":"2026-11-23T10:00:00Z"}"#
                .to_vec(),
            RejectReason::WrongType,
        ),
        (
            payment("\"12\"", "2026-11-23T10:00:00Z"),
            RejectReason::WrongType,
        ),
        (
            payment("1e300", "2026-11-23T10:00:00Z"),
            RejectReason::WrongType,
        ),
        (vec![b' '; 5000], RejectReason::Oversize),
        // Well-formed, but past the last instant a timestamp can hold (found by fuzzing).
        (
            br#"{"event":"message_sent","user_id":"a","timestamp":"9999-12-31T23:59:59Z"}"#
                .to_vec(),
            RejectReason::TimestampOutOfRange,
        ),
        // A field the engine reads, given twice (found by fuzzing).
        (
            br#"{"event":"message_sent","user_id":"a","user_id":"b","timestamp":0}"#.to_vec(),
            RejectReason::InvalidJson,
        ),
    ];
    for (offset, (payload, expected)) in cases.into_iter().enumerate() {
        let outcome = engine.apply(&key(), offset as i64, &payload, now);
        assert_eq!(
            reason(outcome),
            Some(expected),
            "{}",
            String::from_utf8_lossy(&payload)
        );
    }
    assert_eq!(values(&engine), vec![(0.0, 0.0), (0.0, 0.0), (0.0, 0.0)]);
    // The partition moved on past every bad message.
    assert_eq!(engine.next_offset(&key()), Some(15));
}

#[test]
fn epoch_millisecond_timestamps_are_accepted() {
    let mut engine = engine();
    let time = ms("2026-11-23T10:30:00Z");
    let payload = format!(r#"{{"event":"message_sent","user_id":7,"timestamp":{time}}}"#);
    let outcome = engine.apply(&key(), 0, payload.as_bytes(), ms(NOW));
    assert_eq!(
        outcome,
        Outcome::Applied {
            event_time_ms: time,
            matched: 2,
            forward: Forwards::default(),
        }
    );
}

#[test]
fn restart_from_changes_restores_exact_state_and_skips_applied_offsets() {
    let mut engine = engine();
    let now = ms(NOW);
    engine.apply(
        &key(),
        0,
        &event("message_sent", "ana", "2026-11-23T10:00:00Z"),
        now,
    );
    engine.apply(&key(), 1, &payment("5.5", "2026-11-23T10:01:00Z"), now);
    let changes = engine.take_changes();
    assert_eq!(changes.partitions.len(), 1);
    let part = &changes.partitions[0];
    assert_eq!(part.next_offset, Some(2));
    assert_eq!(part.members.len(), 1);
    assert_eq!(part.upserts.len(), 3);
    assert!(engine.take_changes().is_empty(), "nothing changed since");

    let snapshot = snapshot_of(&changes);
    // Members are not in the snapshot: the restored engine reads them from the store.
    let stored = MemoryReader::default();
    stored.write(part);
    let mut restored = Engine::with_reader(test_plan(), Box::new(stored), 16);
    restored.restore_partition(key(), snapshot);
    assert_eq!(values(&restored), values(&engine));
    // Kafka may redeliver offset 1: it is skipped, not counted twice.
    assert_eq!(
        restored.apply(&key(), 1, &payment("5.5", "2026-11-23T10:01:00Z"), now),
        Outcome::AlreadyApplied
    );
    // Ana again the same day: still one distinct user.
    restored.apply(
        &key(),
        2,
        &event("message_sent", "ana", "2026-11-23T10:02:00Z"),
        now,
    );
    assert_eq!(values(&restored)[0], (1.0, 0.0));
    assert_eq!(values(&restored)[2], (5.5, 0.0));
}

/// `minutes` after `base`, as RFC 3339.
fn at_minutes(base: &str, minutes: i64) -> String {
    jiff::Timestamp::from_millisecond(ms(base) + minutes * MINUTE)
        .expect("in range")
        .to_string()
}

#[test]
fn one_event_stamped_ahead_of_the_clock_makes_no_on_time_event_late() {
    // A client stamping local time as UTC: 59 minutes ahead, within max_future_skew.
    let mut engine = engine();
    let now = ms(NOW);
    let mut offset = 0;
    let mut send = |engine: &mut Engine, time: &str, user: &str| {
        let outcome = engine.apply(&key(), offset, &event("message_sent", user, time), now);
        offset += 1;
        outcome
    };
    for user in 0..100 {
        let outcome = send(&mut engine, NOW, &format!("on-time-{user}"));
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
    let ahead = send(&mut engine, &at_minutes(NOW, 59), "ahead");
    assert!(matches!(ahead, Outcome::Applied { .. }), "{ahead:?}");
    for user in 0..100 {
        let outcome = send(&mut engine, &at_minutes(NOW, -2), &format!("early-{user}"));
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
    // Every event counted; the instance clock stayed on the wall clock's hour and day.
    let day = &engine.metric_values(now)[0];
    assert_eq!(day.current.value, AggValue::Distinct(201));
    let hours = &engine.metric_values(now)[1];
    assert_eq!(hours.current.bounds.start_ms, ms(NOW));
    // 12:00 to 13:00 holds the on-time events and the one ahead; the hour before, the rest.
    assert_eq!(hours.current.value, AggValue::Count(101));
    assert_eq!(hours.previous.value, AggValue::Count(100));
    let status = &engine.partition_status()[0];
    assert_eq!(status.watermark_ms, Some(now));
    assert_eq!(status.max_event_time_ms, Some(now + 59 * MINUTE));
    // The same holds after a restart from what was stored.
    let changes = engine.take_changes();
    let mut restarted = Engine::new(test_plan());
    restarted.restore_partition(key(), snapshot_of(&changes));
    let outcome = restarted.apply(
        &key(),
        201,
        &event("message_sent", "after-restart", &at_minutes(NOW, -3)),
        now,
    );
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
}

#[test]
fn a_backfill_after_an_idle_stall_is_not_late() {
    // Events stop at 10:00; an hour-long idle moves the clock so windows roll over and
    // complete; then the producer backfills the stalled hour.
    let mut engine = engine();
    let stall_start = "2026-11-23T10:00:00Z";
    let outcome = engine.apply(
        &key(),
        0,
        &event("message_sent", "ana", stall_start),
        ms(stall_start),
    );
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    let resumed = ms(stall_start) + 3 * HOUR;
    engine.advance_idle(&key(), resumed - HOUR);
    engine.advance_idle(&key(), resumed);
    // The idle clock moved the current hour on.
    let hours = &engine.metric_values(resumed)[1];
    assert_eq!(hours.current.bounds.start_ms, ms("2026-11-23T13:00:00Z"));
    // The backfill: one message every 10 minutes of the stalled hours, all counted.
    for step in 1..18 {
        let time = at_minutes(stall_start, step * 10);
        let outcome = engine.apply(
            &key(),
            step,
            &event("message_sent", &format!("u{step}"), &time),
            resumed,
        );
        assert!(
            matches!(outcome, Outcome::Applied { .. }),
            "{time}: {outcome:?}"
        );
    }
    let day = &engine.metric_values(resumed)[0];
    assert_eq!(day.current.value, AggValue::Distinct(18));
    // An event beyond the lateness behind the events themselves is still late.
    let outcome = engine.apply(
        &key(),
        18,
        &event("message_sent", "too-late", "2026-11-23T11:30:00Z"),
        resumed,
    );
    assert_eq!(reason(outcome), Some(RejectReason::Late));
}

#[test]
fn idle_partitions_move_to_the_wall_clock_and_complete_windows() {
    let mut engine = engine();
    let now = ms("2026-11-23T10:20:00Z");
    engine.apply(
        &key(),
        0,
        &event("message_sent", "ana", "2026-11-23T10:10:00Z"),
        now,
    );
    let before = &engine.metric_values(now)[1];
    assert_eq!(before.current.value, AggValue::Count(1));
    assert!(!before.previous.complete || before.previous.value == AggValue::Count(0));
    // Traffic dies; two hours later the partition is idle and time moves on.
    let later = ms("2026-11-23T12:20:00Z");
    engine.advance_idle(&key(), later);
    let after = &engine.metric_values(later)[1];
    assert_eq!(
        after.current.value,
        AggValue::Count(0),
        "the current hour drained"
    );
    assert_eq!(after.current.bounds.start_ms, ms("2026-11-23T12:00:00Z"));
    // 10:00-11:00 UTC is complete: the watermark passed its end by more than the lateness.
    let hour = engine
        .plan()
        .calendar()
        .window_of(CalendarUnit::Hour, ms("2026-11-23T10:10:00Z"))
        .expect("w");
    assert!(engine.plan().is_complete(hour.end_ms, Some(later)));
    let changes = engine.take_changes();
    assert_eq!(changes.partitions[0].idle_floor_ms, Some(later));
}

#[test]
fn windows_past_retention_are_deleted() {
    let mut engine = engine();
    engine.apply(
        &key(),
        0,
        &event("message_sent", "ana", "2026-10-01T10:00:00Z"),
        ms("2026-10-02T00:00:00Z"),
    );
    engine.take_changes();
    let now = ms(NOW);
    engine.apply(
        &key(),
        1,
        &event("message_sent", "ana", "2026-11-20T10:00:00Z"),
        now,
    );
    let changes = engine.take_changes();
    let deletes = &changes.partitions[0].deletes;
    assert_eq!(
        deletes.len(),
        2,
        "the October day and hour windows: {deletes:?}"
    );
    assert!(deletes
        .iter()
        .all(|d| d.start_ms < ms("2026-10-02T00:00:00Z")));
}

#[test]
fn sums_are_exact_decimals() {
    let mut engine = engine();
    let now = ms(NOW);
    for offset in 0..10 {
        engine.apply(&key(), offset, &payment("0.1", "2026-11-23T10:00:00Z"), now);
    }
    let value = engine.metric_values(now)[2].current.value;
    assert_eq!(value, AggValue::Sum(Decimal::from_integer(1)));
}

#[test]
fn an_amount_beyond_the_exact_range_of_its_window_is_rejected_not_lost() {
    let mut engine = engine();
    let now = ms(NOW);
    let largest = "170000000000000000000000000000";
    let time = "2026-11-23T10:00:00Z";
    let outcome = engine.apply(&key(), 0, &payment(largest, time), now);
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    // Adding it again does not fit the week's sum: before, the event was applied and its
    // amount silently dropped.
    let outcome = engine.apply(&key(), 1, &payment(largest, time), now);
    assert_eq!(reason(outcome), Some(RejectReason::WrongType));
    let outcome = engine.apply(&key(), 2, &payment(&format!("-{largest}"), time), now);
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    assert_eq!(
        engine.metric_values(now)[2].current.value,
        AggValue::Sum(Decimal::ZERO)
    );
}

#[test]
fn a_ratio_divides_its_parts_of_the_same_window_and_keeps_no_state() {
    let mut metrics = test_plan().metrics().to_vec();
    metrics.push(metric(
        "resolved",
        MetricKind::Count,
        Some("resolved"),
        CalendarUnit::Day,
    ));
    metrics.push(metric(
        "started",
        MetricKind::Count,
        Some("started"),
        CalendarUnit::Day,
    ));
    metrics.push(metric(
        "resolution_rate",
        MetricKind::Ratio {
            numerator: "resolved".into(),
            denominator: "started".into(),
        },
        None,
        CalendarUnit::Day,
    ));
    let plan = Plan::new(metrics, test_plan().settings().clone());
    let mut engine = Engine::new(plan);
    engine.restore_partition(key(), PartitionSnapshot::default());
    let rate = |engine: &Engine| engine.metric_values(ms(NOW))[5].current.value;
    assert!(rate(&engine).to_f64().is_nan(), "0/0 is undefined, not 0");
    let stream = [
        // Yesterday's resolution belongs to yesterday's ratio.
        ("resolved", "2026-11-22T20:00:00Z"),
        ("started", "2026-11-23T09:00:00Z"),
        ("started", "2026-11-23T09:01:00Z"),
        ("started", "2026-11-23T09:02:00Z"),
        ("started", "2026-11-23T09:03:00Z"),
        ("resolved", "2026-11-23T09:30:00Z"),
    ];
    for (offset, (name, time)) in stream.iter().enumerate() {
        let outcome = engine.apply(&key(), offset as i64, &event(name, "ana", time), ms(NOW));
        assert!(
            matches!(outcome, Outcome::Applied { matched: 1, .. }),
            "{outcome:?}: a ratio is never matched itself"
        );
    }
    assert_eq!(
        rate(&engine),
        AggValue::Ratio {
            numerator: Decimal::from_integer(1),
            denominator: Decimal::from_integer(4)
        }
    );
    assert_eq!(rate(&engine).to_f64(), 0.25);
    let previous = engine.metric_values(ms(NOW))[5].previous.value;
    assert_eq!(
        previous,
        AggValue::Ratio {
            numerator: Decimal::from_integer(1),
            denominator: Decimal::ZERO
        }
    );
    assert!(previous.to_f64().is_nan());
    let changes = engine.take_changes();
    assert!(changes.partitions[0]
        .upserts
        .iter()
        .all(|upsert| upsert.metric != 5));
}

fn message(id: &str, user: &str, time: &str) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{id}","event":"message_sent","user_id":"{user}","timestamp":"{time}"}}"#
    )
    .into_bytes()
}

#[test]
fn a_repeated_event_id_counts_once_within_the_horizon_and_again_after_it() {
    let mut engine = engine();
    let now = ms(NOW);
    let messages = |engine: &Engine| engine.metric_values(now)[1].current.value;
    let apply = |engine: &mut Engine, offset: i64, payload: Vec<u8>| {
        engine.apply(&key(), offset, &payload, now)
    };
    assert!(matches!(
        apply(&mut engine, 0, message("e1", "ana", "2026-11-23T11:00:00Z")),
        Outcome::Applied { .. }
    ));
    // A producer retry: same id, same payload.
    assert!(matches!(
        apply(&mut engine, 1, message("e1", "ana", "2026-11-23T11:00:00Z")),
        Outcome::Duplicate { .. }
    ));
    // Same id, other content: still the same event (the first one wins).
    assert!(matches!(
        apply(&mut engine, 2, message("e1", "bob", "2026-11-23T11:05:00Z")),
        Outcome::Duplicate { .. }
    ));
    // Events without an id cannot be deduplicated; they all count.
    apply(
        &mut engine,
        3,
        event("message_sent", "cem", "2026-11-23T11:06:00Z"),
    );
    apply(
        &mut engine,
        4,
        event("message_sent", "cem", "2026-11-23T11:06:00Z"),
    );
    assert_eq!(messages(&engine), AggValue::Count(3));

    // The watermark moves 10 minutes past e1: it is forgotten, and counts again.
    apply(&mut engine, 5, message("e2", "dan", "2026-11-23T11:10:00Z"));
    assert!(matches!(
        apply(&mut engine, 6, message("e1", "ana", "2026-11-23T11:00:00Z")),
        Outcome::Applied { .. }
    ));
    assert_eq!(messages(&engine), AggValue::Count(5));

    // Remembered ids survive a restart from the stored changes, and old periods are deleted.
    let changes = engine.take_changes();
    let part = &changes.partitions[0];
    let ids = test_plan().ids_namespace();
    let stored_ids = part.members.iter().filter(|m| m.metric == ids).count();
    assert_eq!(stored_ids, 2, "e1 (applied again) and e2");
    assert_eq!(
        part.windows_before,
        vec![WindowsBefore {
            metric: ids,
            // Periods of the 10-minute horizon before the one holding 11:00.
            before_ms: ms("2026-11-23T11:00:00Z"),
        }]
    );
    let stored = MemoryReader::default();
    stored.write(part);
    let mut restarted = Engine::with_reader(test_plan(), Box::new(stored), 16);
    restarted.restore_partition(
        key(),
        PartitionSnapshot {
            next_offset: part.next_offset,
            max_event_ms: part.max_event_ms,
            event_watermark_ms: part.event_watermark_ms,
            ..PartitionSnapshot::default()
        },
    );
    assert!(matches!(
        restarted.apply(
            &key(),
            7,
            &message("e2", "dan", "2026-11-23T11:10:00Z"),
            now
        ),
        Outcome::Duplicate { .. }
    ));
}

#[test]
fn returning_users_count_in_order_and_out_of_order_across_the_day_boundary() {
    let mut metrics = test_plan().metrics().to_vec();
    metrics.push(metric(
        "returning_users",
        MetricKind::Retention {
            of: "active_users".into(),
        },
        None,
        CalendarUnit::Day,
    ));
    let plan = Plan::new(metrics, test_plan().settings().clone());
    let mut engine = Engine::new(plan);
    engine.restore_partition(key(), PartitionSnapshot::default());
    let now = ms("2026-11-23T00:30:00+01:00");
    let stream = [
        // Ana and Bo on Sunday; Ana again on Monday: she returns.
        ("ana", "2026-11-22T20:00:00+01:00"),
        ("bo", "2026-11-22T21:00:00+01:00"),
        ("ana", "2026-11-23T00:10:00+01:00"),
        // Cy on Monday first, then a late Sunday event: Cy returns on Monday too.
        ("cy", "2026-11-23T00:15:00+01:00"),
        ("cy", "2026-11-22T23:50:00+01:00"),
        // Dan only on Monday: new, not returning.
        ("dan", "2026-11-23T00:20:00+01:00"),
    ];
    for (offset, (user, time)) in stream.iter().enumerate() {
        let outcome = engine.apply(
            &key(),
            offset as i64,
            &event("message_sent", user, time),
            now,
        );
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
    let retention = engine.metric_values(now)[3].clone();
    // 2 of Sunday's 3 users (ana, bo, cy) came back on Monday.
    assert_eq!(
        retention.current.value,
        AggValue::Ratio {
            numerator: Decimal::from_integer(2),
            denominator: Decimal::from_integer(3)
        }
    );
    let stored = engine.take_changes();
    assert!(stored.partitions[0]
        .upserts
        .iter()
        .any(|upsert| upsert.metric == 3 && upsert.value == AggValue::Count(2)));
}

#[test]
fn a_trailing_window_moves_with_the_clock_and_drains_when_traffic_stops() {
    let mut engine = Engine::new(trailing_plan());
    engine.restore_partition(key(), PartitionSnapshot::default());
    let now = ms("2026-11-23T10:40:00Z");
    let stream = [
        ("ana", "2026-11-23T10:00:00Z"),
        ("bo", "2026-11-23T10:20:00Z"),
        ("ana", "2026-11-23T10:25:00Z"),
        ("cy", "2026-11-23T10:29:30Z"),
    ];
    for (offset, (user, time)) in stream.iter().enumerate() {
        engine.apply(
            &key(),
            offset as i64,
            &event("message_sent", user, time),
            now,
        );
    }
    let recent = |engine: &Engine, now: i64| engine.metric_values(now)[3].clone();
    // The clock is 10:29:30: the 30 minutes ending with its minute, [10:00, 10:30).
    let at_end = recent(&engine, now);
    assert_eq!(at_end.current.value, AggValue::Distinct(3), "ana once");
    assert_eq!(at_end.current.bounds.start_ms, ms("2026-11-23T10:00:00Z"));
    // Traffic stops; the idle partition follows the wall clock and the window drains.
    engine.advance_idle(&key(), ms("2026-11-23T10:52:10Z"));
    let later = recent(&engine, now);
    assert_eq!(later.current.bounds.start_ms, ms("2026-11-23T10:23:00Z"));
    assert_eq!(
        later.current.value,
        AggValue::Distinct(2),
        "ana at 10:25 and cy"
    );
    assert_eq!(
        later.previous.value,
        AggValue::Distinct(2),
        "ana and bo before 10:23"
    );
    engine.advance_idle(&key(), ms("2026-11-23T11:30:00Z"));
    assert_eq!(recent(&engine, now).current.value, AggValue::Distinct(0));
}

#[test]
fn a_trailing_threshold_counts_teams_with_k_users_in_the_moving_window() {
    let mut metrics = test_plan().metrics().to_vec();
    let mut busy = metric(
        "teams_with_two_messagers",
        MetricKind::Threshold {
            entity: path("team_id"),
            actor: Some(path("user_id")),
            at_least: 2,
        },
        Some("message_sent"),
        CalendarUnit::Hour,
    );
    busy.trailing = crate::window::Trailing::new(30 * MINUTE);
    metrics.push(busy);
    let plan = Plan::new(metrics, test_plan().settings().clone());
    let mut engine = Engine::new(plan);
    engine.restore_partition(key(), PartitionSnapshot::default());
    let now = ms("2026-11-23T11:00:00Z");
    let message = |user: &str, team: &str, time: &str| {
        format!(r#"{{"event":"message_sent","user_id":"{user}","team_id":"{team}","timestamp":"{time}"}}"#)
            .into_bytes()
    };
    let stream = [
        ("ana", "red", "2026-11-23T10:00:00Z"),
        ("ana", "red", "2026-11-23T10:10:00Z"),
        ("bo", "red", "2026-11-23T10:20:00Z"),
        ("cy", "blue", "2026-11-23T10:21:00Z"),
        // Late: dy joins blue at 10:05, within 30 minutes of cy.
        ("dy", "blue", "2026-11-23T10:05:00Z"),
    ];
    for (offset, (user, team, time)) in stream.iter().enumerate() {
        let outcome = engine.apply(&key(), offset as i64, &message(user, team, time), now);
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
    let busy = |engine: &Engine| engine.metric_values(now)[3].clone();
    // The clock is 10:21: the 30 minutes ending with its minute, [09:52, 10:22).
    let shown = busy(&engine);
    assert_eq!(shown.current.bounds.start_ms, ms("2026-11-23T09:52:00Z"));
    assert_eq!(shown.current.value, AggValue::Distinct(2), "red and blue");
    // Later the ranges lose ana at 10:10 (red) and dy at 10:05 (blue).
    engine.advance_idle(&key(), ms("2026-11-23T10:36:30Z"));
    assert_eq!(busy(&engine).current.value, AggValue::Distinct(1), "red");
    engine.advance_idle(&key(), ms("2026-11-23T10:40:00Z"));
    let drained = busy(&engine);
    assert_eq!(drained.current.value, AggValue::Distinct(0));
    // [09:41, 10:11): ana alone in red, dy alone in blue.
    assert_eq!(drained.previous.value, AggValue::Distinct(0));
    let stored = engine.take_changes();
    let windows = stored.partitions[0]
        .upserts
        .iter()
        .filter(|upsert| upsert.metric == 3 && upsert.value != AggValue::Distinct(0))
        .count();
    // Red qualifies in the ranges ending 10:20 to 10:39, blue in those ending 10:21 to 10:34.
    assert_eq!(windows, 20, "a window per bucket with a qualifying team");
}

#[test]
fn segments_beyond_the_cap_of_a_window_are_kept_together_in_the_overflow() {
    // Users who sent at least one message, by user: every event opens a new segment.
    let mut users = metric(
        "messagers",
        MetricKind::Threshold {
            entity: path("user_id"),
            actor: None,
            at_least: 1,
        },
        Some("message_sent"),
        CalendarUnit::Day,
    );
    users.segments = Some(crate::metric::Segmentation {
        by: vec![path("user_id")],
        top: 3,
    });
    let plan = Plan::new(vec![users], test_plan().settings().clone());
    let mut engine = Engine::new(plan);
    engine.restore_partition(key(), PartitionSnapshot::default());
    let beyond = 5;
    let total = segment::MAX_SEGMENTS_PER_WINDOW + beyond;
    for user in 0..total {
        let payload = event("message_sent", &format!("u{user}"), "2026-11-23T10:00:00Z");
        let outcome = engine.apply(&key(), user as i64, &payload, ms(NOW));
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
    let shown = &engine.metric_values(ms(NOW))[0];
    assert_eq!(shown.current.value, AggValue::Distinct(total as u64));
    // The state keeps the cap and one overflow segment, whatever the data.
    let changes = engine.take_changes();
    let stored = &changes.partitions[0].segments;
    assert_eq!(stored.len(), segment::MAX_SEGMENTS_PER_WINDOW + 1);
    let overflow = stored
        .iter()
        .find(|upsert| &*upsert.segment == segment::OVERFLOW_KEY)
        .map(|upsert| upsert.value);
    assert_eq!(overflow, Some(AggValue::Distinct(beyond as u64)));
    // Exported: the top 3, then `__other__` with the rest, the overflow's users included.
    let labels: Vec<&str> = shown
        .current_segments
        .iter()
        .map(|segment| segment.label.as_str())
        .collect();
    assert_eq!(labels.len(), 4);
    assert_eq!(labels[3], OVERFLOW_LABEL);
    assert_eq!(
        shown.current_segments[3].value,
        AggValue::Distinct(total as u64 - 3)
    );
}

/// Values that used to share a label (the string "3" and the number 3, a missing field and
/// the string "(none)", values holding `/`, long values with one prefix) are segments of
/// their own, each with its own value and label, and long values are kept capped.
#[test]
fn segments_with_look_alike_values_are_kept_and_labelled_apart() {
    let mut users = metric(
        "users_by_plan",
        MetricKind::Distinct {
            field: path("user_id"),
        },
        Some("message_sent"),
        CalendarUnit::Day,
    );
    users.segments = Some(crate::metric::Segmentation {
        by: vec![path("properties.plan")],
        top: 20,
    });
    let mut messages = metric(
        "messages_by_plan_and_tier",
        MetricKind::Count,
        Some("message_sent"),
        CalendarUnit::Day,
    );
    messages.segments = Some(crate::metric::Segmentation {
        by: vec![path("properties.plan"), path("properties.tier")],
        top: 20,
    });
    let plan = Plan::new(vec![users, messages], test_plan().settings().clone());
    let mut engine = Engine::new(plan);
    engine.restore_partition(key(), PartitionSnapshot::default());
    let long = |last: char| format!("\"{}{last}\"", "L".repeat(300));
    let (long_one, long_two) = (long('1'), long('2'));
    let stream: [(&str, &str); 12] = [
        ("u1", r#""plan":"3""#),
        ("u2", r#""plan":3"#),
        ("u3", r#""plan":3.0"#),
        ("u4", ""),
        ("u5", r#""plan":"(none)""#),
        ("u6", r#""plan":"a/b","tier":"c""#),
        ("u7", r#""plan":"a","tier":"b/c""#),
        ("u8", r#""plan":{"x":1}"#),
        ("u9", &format!(r#""plan":{long_one}"#)),
        ("u10", &format!(r#""plan":{long_two}"#)),
        ("u11", r#""plan":"__other__""#),
        ("u12", r#""plan":null"#),
    ];
    for (offset, (user, properties)) in stream.iter().enumerate() {
        let payload = format!(
            r#"{{"event":"message_sent","user_id":"{user}","timestamp":"2026-11-23T10:00:00Z","properties":{{{properties}}}}}"#
        );
        let outcome = engine.apply(&key(), offset as i64, payload.as_bytes(), ms(NOW));
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
    let shown = engine.metric_values(ms(NOW));
    let labelled = |metric: usize| -> std::collections::BTreeMap<String, f64> {
        shown[metric]
            .current_segments
            .iter()
            .map(|segment| (segment.label.clone(), segment.value.to_f64()))
            .collect()
    };
    let users = labelled(0);
    let expected_users = [
        ("\"3\"", 1.0),
        ("3", 2.0),
        ("(none)", 2.0),
        ("\"(none)\"", 1.0),
        ("a/b", 1.0),
        ("a", 1.0),
        ("(composite)", 1.0),
        ("\"__other__\"", 1.0),
    ];
    for (label, value) in expected_users {
        assert_eq!(users.get(label), Some(&value), "{label} in {users:?}");
    }
    assert_eq!(users.len(), expected_users.len() + 2, "{users:?}");
    let long_labels: Vec<&String> = users
        .keys()
        .filter(|label| label.starts_with("LLLL"))
        .collect();
    assert_eq!(long_labels.len(), 2, "{users:?}");
    assert!(long_labels
        .iter()
        .all(|label| label.len() <= segment::MAX_LABEL_BYTES));
    assert_eq!(users.values().sum::<f64>(), 12.0);

    let messages = labelled(1);
    assert_eq!(messages.get("\"a/b\"/c"), Some(&1.0), "{messages:?}");
    assert_eq!(messages.get("a/\"b/c\""), Some(&1.0), "{messages:?}");
    assert_eq!(messages.get("\"3\"/(none)"), Some(&1.0), "{messages:?}");
    assert_eq!(messages.get("3/(none)"), Some(&2.0), "{messages:?}");
    assert_eq!(messages.len(), 10, "{messages:?}");

    // What is stored is bounded whatever the values: segment keys and the segments' members.
    let changes = engine.take_changes();
    let bound = 2 * (2 + segment::MAX_SEGMENT_VALUE_BYTES);
    let stored = &changes.partitions[0];
    assert_eq!(stored.segments.len(), 10 + 10);
    assert!(stored
        .segments
        .iter()
        .all(|upsert| upsert.segment.len() <= bound));
    assert!(stored
        .members
        .iter()
        .all(|entry| entry.member.len() <= bound + 16));
}

#[test]
fn the_memory_for_entries_is_split_evenly_between_the_owned_partitions() {
    let mut engine = Engine::with_reader(test_plan(), Box::new(MemoryReader::default()), 1200);
    let partition = |index| PartitionKey::new("events", index);
    let budgets = |engine: &Engine| -> Vec<usize> {
        engine
            .partitions
            .values()
            .map(|state| state.members.budget())
            .collect()
    };
    for index in 0..4 {
        engine.restore_partition(partition(index), PartitionSnapshot::default());
    }
    assert_eq!(
        budgets(&engine),
        vec![300; 4],
        "a quarter each, not a share of what the earlier ones left"
    );
    engine.remove_partition(&partition(0));
    assert_eq!(budgets(&engine), vec![400; 3]);
}

/// The plan of the trailing tests: `recent_messagers`, metric 3, the distinct users of the
/// last 30 minutes, in buckets of a minute.
fn trailing_plan() -> Plan {
    let mut metrics = test_plan().metrics().to_vec();
    let mut recent = metric(
        "recent_messagers",
        MetricKind::Distinct {
            field: path("user_id"),
        },
        Some("message_sent"),
        CalendarUnit::Hour,
    );
    recent.trailing = crate::window::Trailing::new(30 * MINUTE);
    metrics.push(recent);
    Plan::new(metrics, test_plan().settings().clone())
}

/// What the store would restore of the changes: windows, gap histograms and the clock.
fn snapshot_of(changes: &ChangeSet) -> PartitionSnapshot {
    let part = &changes.partitions[0];
    PartitionSnapshot {
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
    }
}

#[test]
fn trailing_occurrences_stored_in_format_3_are_read_and_extended_exactly() {
    let now = ms("2026-11-23T10:40:00Z");
    let apply = |engine: &mut Engine, from: usize, stream: &[(&str, &str)]| {
        for (offset, (user, time)) in stream.iter().enumerate() {
            let payload = event("message_sent", user, time);
            let outcome = engine.apply(&key(), (from + offset) as i64, &payload, now);
            assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
        }
    };
    let before = [
        ("ana", "2026-11-23T10:00:00Z"),
        ("ana", "2026-11-23T10:05:00Z"),
        ("bo", "2026-11-23T10:06:10Z"),
    ];
    // A repeat, a late occurrence before a last of format 3, one after it, and a late one
    // before a last of format 4.
    let after = [
        ("ana", "2026-11-23T10:05:30Z"),
        ("ana", "2026-11-23T10:03:00Z"),
        ("ana", "2026-11-23T10:10:00Z"),
        ("bo", "2026-11-23T10:12:20Z"),
        ("ana", "2026-11-23T10:07:00Z"),
    ];

    // The first events, stored, then rewritten as format 3 kept them: every occurrence an
    // entry of its own (its previous one), the last per period its bucket alone.
    let reader = MemoryReader::default();
    let mut first = Engine::with_reader(trailing_plan(), Box::new(reader.clone()), 64);
    first.restore_partition(key(), PartitionSnapshot::default());
    apply(&mut first, 0, &before);
    let changes = first.take_changes();
    reader.write(&changes.partitions[0]);
    let mut format_3 = Vec::new();
    for (_, metric, start_ms, member) in reader.entries() {
        let Some((&0, occurrence)) = member.split_first().filter(|_| metric == 3) else {
            continue;
        };
        let value = reader
            .member(&key(), metric, start_ms, &member)
            .expect("read")
            .expect("stored");
        let last = trailing::Last::decode(&value, start_ms, MINUTE).expect("a last occurrence");
        let previous = last
            .previous_ms
            .expect("format 4 keeps the previous occurrence");
        let previous = if previous == NO_PREVIOUS {
            Box::default()
        } else {
            Box::from(previous.to_be_bytes())
        };
        let bucket = last.bucket_ms.to_be_bytes();
        for (start_ms, member, value) in [
            (last.bucket_ms, occurrence.into(), previous),
            (start_ms, member.clone(), Box::from(bucket)),
        ] {
            format_3.push(MemberInsert {
                metric,
                start_ms,
                member,
                value: EntryValue::new(&value),
            });
        }
    }
    assert_eq!(format_3.len(), 4, "ana's and bo's last occurrences");
    reader.write_members(&key(), &format_3, &[]);

    let mut resumed = Engine::with_reader(trailing_plan(), Box::new(reader), 64);
    resumed.restore_partition(key(), snapshot_of(&changes));
    apply(&mut resumed, before.len(), &after);
    let mut fresh = Engine::new(trailing_plan());
    fresh.restore_partition(key(), PartitionSnapshot::default());
    apply(&mut fresh, 0, &[&before[..], &after[..]].concat());

    // The same values as the events applied afresh, as the window moves on: ana counts once.
    let recent = |engine: &Engine| {
        let values = engine.metric_values(now)[3].clone();
        (values.current.value, values.previous.value)
    };
    assert_eq!(
        recent(&resumed),
        (AggValue::Distinct(2), AggValue::Distinct(0))
    );
    for idle in [
        "10:31:00", "10:33:30", "10:35:00", "10:36:30", "10:37:30", "10:40:30", "10:42:30",
        "11:05:00",
    ] {
        let clock = ms(&format!("2026-11-23T{idle}Z"));
        resumed.advance_idle(&key(), clock);
        fresh.advance_idle(&key(), clock);
        assert_eq!(recent(&resumed), recent(&fresh), "at {idle}");
    }
}

#[test]
fn an_in_order_trailing_occurrence_writes_one_entry_and_reads_none_back() {
    let mut settings = trailing_plan().settings().clone();
    settings.allowed_lateness_ms = MINUTE;
    let plan = Plan::new(trailing_plan().metrics().to_vec(), settings);
    let now = ms("2026-11-23T10:40:00Z");
    let reader = MemoryReader::default();
    let counting = CountingReader::new(reader.clone());
    let reads = counting.reads();
    let mut engine = Engine::with_reader(plan, Box::new(counting), 64 << 20);
    engine.restore_partition(key(), PartitionSnapshot::default());
    let mut offset = 0;
    // Each round: every user once, then a checkpoint; the entries of the trailing count
    // written, and the entries read back from the store.
    let mut round = |minute: u32| {
        for user in 0..100 {
            let time = format!("2026-11-23T10:{minute:02}:00Z");
            let outcome = engine.apply(
                &key(),
                offset,
                &event("message_sent", &format!("u{user}"), &time),
                now,
            );
            assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
            offset += 1;
        }
        let changes = engine.take_changes();
        reader.write(&changes.partitions[0]);
        let written = changes.partitions[0]
            .members
            .iter()
            .filter(|member| member.metric == 3)
            .count();
        let read = reads.swap(0, std::sync::atomic::Ordering::Relaxed);
        (written, read)
    };
    // The last occurrence per period holds its previous one, so an occurrence is one entry;
    // the one it replaces gets its own only while an event can still land in its bucket.
    assert_eq!(round(0), (100, 0));
    assert_eq!(
        round(0),
        (0, 0),
        "repeats: known from the last occurrences in memory"
    );
    assert_eq!(
        round(5),
        (100, 0),
        "minute 0 is beyond the lateness of minute 5"
    );
    assert_eq!(round(5), (0, 0));
    assert_eq!(
        round(6),
        (200, 0),
        "minute 5 is within the lateness of minute 6"
    );
    let values = engine.metric_values(now)[3].clone();
    assert_eq!(values.current.value, AggValue::Distinct(100));
}
