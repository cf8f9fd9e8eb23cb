//! Event times as producers send them, from the config a user writes to what the engine
//! counts: epoch seconds to nanoseconds, local times in a zone, the Kafka record's time.

use nsm_core::config::Config;
use nsm_core::engine::{Engine, Outcome, Plan};
use nsm_core::event::NoRecord;
use nsm_core::reject::RejectReason;
use nsm_core::PartitionKey;

/// 2025-12-06T10:00:00Z.
const NOW_MS: i64 = 1_765_015_200_000;

fn engine_with(events: &str) -> Engine {
    let text = format!(
        r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[events]
{events}
[time]
zone = "UTC"
[north_star]
name = "messages"
kind = "count"
where = {{ event = "message_sent" }}
window = "1d"
"#
    );
    let config = Config::from_toml(&text, &|_| None).expect("valid config");
    let mut engine = Engine::new(Plan::from_config(&config));
    engine.restore_partition(key(), Default::default());
    engine
}

fn key() -> PartitionKey {
    PartitionKey::new("events", 0)
}

fn apply(engine: &mut Engine, offset: i64, timestamp: &str, kafka_ms: Option<i64>) -> Outcome {
    let payload = format!(r#"{{"event":"message_sent"{timestamp}}}"#);
    let record = NoRecord {
        timestamp_ms: kafka_ms,
    };
    engine.apply_record(&key(), offset, payload.as_bytes(), &record, NOW_MS)
}

fn rejected(outcome: &Outcome) -> Option<(RejectReason, String)> {
    match outcome {
        Outcome::Rejected(rejection) => Some((rejection.reason, rejection.detail.clone())),
        _ => None,
    }
}

fn counted(engine: &Engine) -> f64 {
    engine.metric_values(NOW_MS)[0].current.value.to_f64()
}

#[test]
fn epoch_seconds_integer_or_fractional_and_milliseconds_refused_saying_why() {
    let mut engine = engine_with(r#"timestamp_unit = "s""#);
    assert!(rejected(&apply(&mut engine, 0, r#","timestamp":1765015200"#, None)).is_none());
    assert!(rejected(&apply(
        &mut engine,
        1,
        r#","timestamp":1765015100.75"#,
        None
    ))
    .is_none());
    let (reason, detail) = rejected(&apply(
        &mut engine,
        2,
        r#","timestamp":1765015200000"#,
        None,
    ))
    .expect("refused");
    assert_eq!(reason, RejectReason::InvalidTimestamp);
    assert!(detail.contains("looks like epoch milliseconds"), "{detail}");
    assert_eq!(counted(&engine), 2.0);

    let mut engine = engine_with(r#"timestamp_unit = "ns""#);
    assert!(rejected(&apply(
        &mut engine,
        0,
        r#","timestamp":1765015200123456789"#,
        None
    ))
    .is_none());
    assert_eq!(counted(&engine), 1.0);
}

#[test]
fn local_times_are_read_in_the_configured_zone() {
    // 11:30 in Paris is 10:30 UTC: the same day in UTC, not an hour in the future.
    let mut engine = engine_with(r#"timestamp_zone = "Europe/Paris""#);
    assert!(rejected(&apply(
        &mut engine,
        0,
        r#","timestamp":"2025-12-06T10:30:00""#,
        None
    ))
    .is_none());
    assert!(rejected(&apply(
        &mut engine,
        1,
        r#","timestamp":"2025-12-06 09:45:00.250""#,
        None
    ))
    .is_none());
    let (reason, _) = rejected(&apply(
        &mut engine,
        2,
        r#","timestamp":"2025-12-06T12:30:00""#,
        None,
    ))
    .expect("11:30 UTC is beyond the future skew of an hour");
    assert_eq!(reason, RejectReason::TimestampOutOfRange);
    assert_eq!(counted(&engine), 2.0);

    let mut engine = engine_with("");
    let (reason, detail) = rejected(&apply(
        &mut engine,
        0,
        r#","timestamp":"2025-12-06T10:30:00""#,
        None,
    ))
    .expect("no zone configured");
    assert_eq!(reason, RejectReason::InvalidTimestamp);
    assert!(detail.contains("events.timestamp_zone"), "{detail}");
}

#[test]
fn the_kafka_record_time_as_the_source_or_the_fallback() {
    let mut engine = engine_with(r#"timestamp = "@kafka""#);
    assert!(rejected(&apply(&mut engine, 0, "", Some(NOW_MS - 1_000))).is_none());
    let (reason, _) = rejected(&apply(&mut engine, 1, "", None)).expect("no record time");
    assert_eq!(reason, RejectReason::MissingTimestamp);
    assert_eq!(counted(&engine), 1.0);

    let mut engine = engine_with(r#"timestamp_fallback = "@kafka""#);
    assert!(rejected(&apply(
        &mut engine,
        0,
        r#","timestamp":1765015100000"#,
        None
    ))
    .is_none());
    assert!(rejected(&apply(&mut engine, 1, "", Some(NOW_MS))).is_none());
    assert!(rejected(&apply(&mut engine, 2, r#","timestamp":null"#, Some(NOW_MS))).is_none());
    // The field wins when present (half an hour before the record time).
    assert!(rejected(&apply(
        &mut engine,
        3,
        r#","timestamp":1765013400000"#,
        Some(NOW_MS)
    ))
    .is_none());
    assert_eq!(counted(&engine), 4.0);
}

#[test]
fn every_bad_timestamp_setting_is_reported_with_its_path() {
    let text = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[events]
timestamp = "@kafka"
timestamp_unit = "minutes"
timestamp_zone = "Mars/Olympus"
timestamp_fallback = "@kafka"
[north_star]
name = "messages"
kind = "count"
window = "1d"
"#;
    let errors = Config::from_toml(text, &|_| None).expect_err("invalid");
    let paths: Vec<&str> = errors.0.iter().map(|error| error.path.as_str()).collect();
    for expected in [
        "events.timestamp_unit",
        "events.timestamp_zone",
        "events.timestamp_fallback",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {errors}"
        );
    }
}
