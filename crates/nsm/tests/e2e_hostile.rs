//! Hostile input end to end, against a real Kafka-protocol broker (tansu): garbage of every
//! kind mixed into a valid stream. nsm must not crash, must count every bad message under its
//! reason on /metrics, deliver each one to the dead-letter topic, and export the valid events'
//! values exactly, including valid events that only look hostile.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// `events.max_bytes` of this test.
const MAX_BYTES: usize = 256 * 1024;
const TOPIC: &str = "hostile-events";

/// One message to produce: its partition, its payload (`None`: a tombstone, no payload at
/// all), and the rejection reason expected (`None`: valid).
struct Message {
    partition: i32,
    payload: Option<Vec<u8>>,
    reason: Option<&'static str>,
}

/// What the valid messages add up to.
#[derive(Default)]
struct Expected {
    messages: usize,
    messagers: BTreeSet<String>,
    complaints: usize,
    revenue_cents: i64,
}

/// A JSON event padded with an unread field to exactly `size` bytes.
fn padded(time: i64, size: usize) -> Vec<u8> {
    let head = format!(r#"{{"event":"message_sent","user_id":"big","timestamp":{time},"pad":""#);
    let mut payload = head.into_bytes();
    payload.resize(size - 2, b'x');
    payload.extend_from_slice(b"\"}");
    payload
}

fn stream(time: i64) -> (Vec<Message>, Expected) {
    let mut expected = Expected::default();
    let mut messages = Vec::new();
    let valid = |partition: i32, payload: String| Message {
        partition,
        payload: Some(payload.into_bytes()),
        reason: None,
    };
    // The valid stream: 40 messages of 20 users (a user stays in one partition), 6 payments
    // and 3 complaints, one second apart within one hour.
    for index in 0..40 {
        let user = index % 20;
        let time = time + index as i64 * 1000;
        messages.push(valid(
            user % 2,
            format!(r#"{{"event":"message_sent","user_id":"u{user}","timestamp":{time}}}"#),
        ));
        expected.messages += 1;
        expected.messagers.insert(format!("u{user}"));
        if index % 7 == 0 {
            let cents = 1999 + index as i64;
            messages.push(valid(
                user % 2,
                format!(
                    r#"{{"event":"payment_succeeded","user_id":"u{user}","timestamp":{time},"properties":{{"amount":{}.{:02}}}}}"#,
                    cents / 100,
                    cents % 100
                ),
            ));
            expected.revenue_cents += cents;
        }
        if index % 15 == 0 {
            messages.push(valid(
                user % 2,
                format!(r#"{{"event":"complaint_filed","user_id":"u{user}","timestamp":{time}}}"#),
            ));
            expected.complaints += 1;
        }
    }
    // Valid events that only look hostile: 100k levels of nesting in a field nsm never reads,
    // a user id with an escaped NUL character, a key nsm never reads given twice, and an event
    // exactly at the size limit.
    let deep = format!(
        r#"{{"event":"message_sent","user_id":"deep","timestamp":{time},"noise":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let nul_user =
        format!(r#"{{"event":"message_sent","user_id":"nul\u0000user","timestamp":{time}}}"#);
    let unread_twice =
        format!(r#"{{"event":"message_sent","user_id":"twice","timestamp":{time},"x":1,"x":2}}"#);
    for (partition, payload) in [(0, deep), (1, nul_user), (0, unread_twice)] {
        messages.push(valid(partition, payload));
        expected.messages += 1;
    }
    messages.push(Message {
        partition: 1,
        payload: Some(padded(time, MAX_BYTES)),
        reason: None,
    });
    expected.messages += 1;
    expected
        .messagers
        .extend(["deep", "nul\u{0}user", "twice", "big"].map(String::from));

    // The garbage, alternating between the partitions.
    let garbage: Vec<(&'static str, Option<Vec<u8>>)> = vec![
        (
            "invalid_json",
            Some(
                [
                    &br#"{"event":"message_sent","user_id":""#[..],
                    &[0xff, 0xfe, 0x80],
                    format!(r#"","timestamp":{time}}}"#).as_bytes(),
                ]
                .concat(),
            ),
        ),
        ("oversize", Some(padded(time, MAX_BYTES + 1))),
        ("oversize", Some(padded(time, 5 * 1024 * 1024))),
        ("invalid_json", Some("[".repeat(100_000).into_bytes())),
        (
            "not_an_object",
            Some(format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes()),
        ),
        (
            "wrong_type",
            Some(
                format!(
                    r#"{{"event":"message_sent","user_id":{}{},"timestamp":{time}}}"#,
                    "[".repeat(100_000),
                    "]".repeat(100_000)
                )
                .into_bytes(),
            ),
        ),
        (
            "wrong_type",
            Some(format!(r#"{{"event":42,"user_id":"u1","timestamp":{time}}}"#).into_bytes()),
        ),
        (
            "wrong_type",
            Some(
                format!(
                    r#"{{"event":"payment_succeeded","user_id":"u1","timestamp":{time},"properties":{{"amount":"12.50"}}}}"#
                )
                .into_bytes(),
            ),
        ),
        (
            "wrong_type",
            Some(
                format!(r#"{{"event":"message_sent","user_id":{{"id":1}},"timestamp":{time}}}"#)
                    .into_bytes(),
            ),
        ),
        (
            "invalid_timestamp",
            Some(br#"{"event":"message_sent","user_id":"u1","timestamp":true}"#.to_vec()),
        ),
        (
            "timestamp_out_of_range",
            Some(
                br#"{"event":"message_sent","user_id":"u1","timestamp":"9999-06-01T00:00:00Z"}"#
                    .to_vec(),
            ),
        ),
        (
            "timestamp_out_of_range",
            Some(
                br#"{"event":"message_sent","user_id":"u1","timestamp":"9999-12-31T23:59:59Z"}"#
                    .to_vec(),
            ),
        ),
        (
            "timestamp_out_of_range",
            Some(br#"{"event":"message_sent","user_id":"u1","timestamp":0}"#.to_vec()),
        ),
        (
            "timestamp_out_of_range",
            Some(
                br#"{"event":"message_sent","user_id":"u1","timestamp":"1970-01-01T00:00:00Z"}"#
                    .to_vec(),
            ),
        ),
        ("invalid_json", Some(Vec::new())),
        ("invalid_json", None),
        ("invalid_json", Some(vec![0, 0, 0])),
        (
            "invalid_json",
            Some(
                format!(r#"{{"event":"message_sent","user_id":"u1","timestamp":{time}}}"#)
                    .into_bytes()
                    .into_iter()
                    .chain([0])
                    .collect(),
            ),
        ),
        (
            "invalid_json",
            Some(
                format!("{{\"event\":\"message_sent\",\"user_id\":\"u\0\",\"timestamp\":{time}}}")
                    .into_bytes(),
            ),
        ),
        (
            "invalid_json",
            Some(
                format!(
                    r#"{{"event":"message_sent","event":"complaint_filed","user_id":"u1","timestamp":{time}}}"#
                )
                .into_bytes(),
            ),
        ),
        (
            "missing_field",
            Some(format!(r#"{{"event":"message_sent","timestamp":{time}}}"#).into_bytes()),
        ),
        (
            "missing_timestamp",
            Some(br#"{"event":"message_sent","user_id":"u1"}"#.to_vec()),
        ),
        (
            "missing_event_name",
            Some(format!(r#"{{"user_id":"u1","timestamp":{time}}}"#).into_bytes()),
        ),
    ];
    // Interleave: one bad message after every second valid one.
    let mut mixed = Vec::new();
    let mut garbage = garbage.into_iter().enumerate();
    for (index, message) in messages.into_iter().enumerate() {
        mixed.push(message);
        if index % 2 == 1 {
            if let Some((count, (reason, payload))) = garbage.next() {
                mixed.push(Message {
                    partition: count as i32 % 2,
                    payload,
                    reason: Some(reason),
                });
            }
        }
    }
    for (count, (reason, payload)) in garbage {
        mixed.push(Message {
            partition: count as i32 % 2,
            payload,
            reason: Some(reason),
        });
    }
    (mixed, expected)
}

/// Produces every message and waits for each delivery; any refusal fails the test.
fn produce(brokers: &str, messages: &[Message]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // One message per batch (the tansu 0.6 quirk e2e_tansu.rs describes).
        .set("batch.num.messages", "1")
        // Room for the 5 MiB message: the client's own limit is 1 MB by default.
        .set("message.max.bytes", "10000000")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("producer");
    for (index, message) in messages.iter().enumerate() {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(TOPIC).partition(message.partition);
        if let Some(payload) = &message.payload {
            record = record.payload(payload.as_slice());
        }
        let delivery = producer
            .send_result(record)
            .unwrap_or_else(|(error, _)| panic!("message {index} not queued: {error}"));
        match futures::executor::block_on(delivery) {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => panic!(
                "the broker refused message {index} ({} bytes): {error}",
                message.payload.as_ref().map_or(0, Vec::len)
            ),
            Err(_) => panic!("message {index}: delivery cancelled"),
        }
    }
}

#[test]
fn garbage_mixed_into_a_valid_stream_is_counted_dead_lettered_and_changes_no_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, brokers) = start_tansu(dir.path());
    nsm_tool(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        TOPIC,
        "--partitions",
        "2",
        "--file",
        "/dev/null",
    ]);

    let port = free_port();
    let config_path = dir.path().join("nsm.toml");
    let config = test_config(
        &brokers,
        TOPIC,
        &dir.path().join("state"),
        port,
        "nsm-hostile",
    );
    std::fs::write(
        &config_path,
        format!("{config}\n[events]\nmax_bytes = \"256KiB\"\n"),
    )
    .expect("config");
    let mut nsm = Process::spawn(
        "nsm",
        Command::new(NSM).args(["run", "--config", config_path.to_str().expect("utf8")]),
        dir.path(),
    );
    wait_for(
        "nsm to be ready",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let (status, _) = http_get(port, "/readyz")?;
            (status == 200).then_some(())
        },
    );

    // One hour back, so every valid event falls in one hour and one day.
    let time = hour_start_ms(1) + 60_000;
    let (messages, expected) = stream(time);
    produce(&brokers, &messages);

    let mut invalid: BTreeMap<&str, usize> = BTreeMap::new();
    for message in &messages {
        if let Some(reason) = message.reason {
            *invalid.entry(reason).or_default() += 1;
        }
    }
    let bad: usize = invalid.values().sum();
    let samples = wait_for(
        "every message consumed and every rejection published",
        Duration::from_secs(120),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            let rejected: f64 = samples
                .iter()
                .filter(|(series, _)| series.starts_with("nsm_events_invalid_total"))
                .map(|(_, value)| value)
                .sum();
            (consumed_total(&samples) == messages.len() as f64
                && rejected == bad as f64
                && samples.get("nsm_dead_letters_total{result=\"delivered\"}")
                    == Some(&(bad as f64)))
            .then_some(samples)
        },
    );
    assert!(
        nsm.child.try_wait().expect("wait").is_none(),
        "nsm stopped:\n{}",
        nsm.log_text()
    );

    for (reason, count) in &invalid {
        let series = format!("nsm_events_invalid_total{{reason=\"{reason}\"}}");
        assert_eq!(
            samples.get(&series).copied(),
            Some(*count as f64),
            "{series}"
        );
    }
    assert_eq!(
        samples
            .get("nsm_dead_letters_total{result=\"failed\"}")
            .copied(),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&samples, "messages_sent", "current"),
        Some(expected.messages as f64),
        "messages this hour"
    );
    assert_eq!(
        metric_value(&samples, "daily_active_messagers", "current"),
        Some(expected.messagers.len() as f64),
        "distinct messagers today"
    );
    assert_eq!(
        metric_value(&samples, "complaints", "current"),
        Some(expected.complaints as f64),
        "complaints today"
    );
    let revenue = metric_value(&samples, "revenue", "current").expect("revenue");
    assert!(
        (revenue - expected.revenue_cents as f64 / 100.0).abs() < 1e-9,
        "revenue {revenue}"
    );

    // The dead-letter topic holds each bad message once, under the reason it was counted by:
    // nothing crashed, so there is no redelivery to tell apart.
    let dead_letters = nsm_tool(&[
        "read",
        "--brokers",
        &brokers,
        "--topic",
        &format!("{TOPIC}-dlq"),
        "--quiet",
        "3s",
    ]);
    let records: Vec<serde_json::Value> = dead_letters
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    assert_eq!(records.len(), bad, "one dead letter per bad message");
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    let mut sources = BTreeSet::new();
    for record in &records {
        let header = |name: &str| {
            record["headers"][name]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        *by_reason.entry(header("nsm-reason")).or_default() += 1;
        sources.insert((header("nsm-source-partition"), header("nsm-source-offset")));
        assert_eq!(header("nsm-source-topic"), TOPIC);
    }
    assert_eq!(sources.len(), bad, "distinct source offsets");
    let expected_reasons: BTreeMap<String, usize> = invalid
        .iter()
        .map(|(reason, count)| (reason.to_string(), *count))
        .collect();
    assert_eq!(by_reason, expected_reasons);

    // The producer of dead letters keeps librdkafka's 1 MB message limit: the 5 MiB message
    // goes there cut to 64 KiB and marked, the one just over events.max_bytes goes whole.
    let oversize: Vec<(usize, bool)> = records
        .iter()
        .filter(|record| record["headers"]["nsm-reason"] == "oversize")
        .map(|record| {
            (
                record["payload"].as_str().expect("payload").len(),
                record["headers"]["nsm-truncated"] == "true",
            )
        })
        .collect();
    let mut oversize = oversize;
    oversize.sort();
    assert_eq!(oversize, vec![(64 * 1024, true), (MAX_BYTES + 1, false)]);

    let status = nsm.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "graceful stop failed:\n{}",
        nsm.log_text()
    );
}
