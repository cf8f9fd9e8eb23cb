//! `where` beyond equality, from the TOML a user writes to the values the engine computes:
//! internal and test users excluded, amounts compared, fields present or missing, prefixes.

use nsm_core::config::Config;
use nsm_core::engine::{Engine, Plan};
use nsm_core::PartitionKey;

const NOW_MS: i64 = 1_764_000_000_000;

fn config(filters: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[time]
zone = "UTC"
[north_star]
name = "paying_customers"
kind = "distinct"
field = "user_id"
where = {{ event = "payment_succeeded", {filters} }}
window = "1d"
"#
    )
}

fn counted(filters: &str, events: &[&str]) -> f64 {
    let config = Config::from_toml(&config(filters), &|_| None).expect("valid config");
    let mut engine = Engine::new(Plan::from_config(&config));
    let key = PartitionKey::new("events", 0);
    engine.restore_partition(key.clone(), Default::default());
    for (offset, event) in events.iter().enumerate() {
        let payload = format!(r#"{{"event":"payment_succeeded","timestamp":{NOW_MS},{event}}}"#);
        engine.apply(&key, offset as i64, payload.as_bytes(), NOW_MS);
    }
    engine.metric_values(NOW_MS)[0].current.value.to_f64()
}

#[test]
fn internal_and_test_users_are_left_out() {
    let events = [
        r#""user_id":"u1","email":"ann@customer.com""#,
        r#""user_id":"u2","email":"qa@example.com""#,
        r#""user_id":"test-3","email":"bot@customer.com""#,
        r#""user_id":"u4""#,
    ];
    let filters = r#""email" = { not_any_of = ["qa@example.com"] }, user_id = { not = "x" }"#;
    assert_eq!(
        counted(filters, &events),
        3.0,
        "u2 left out; u4 has no email"
    );
    let filters = r#""email" = { not = "qa@example.com", present = true }"#;
    assert_eq!(counted(filters, &events), 2.0, "u4 has no email");
    let filters = r#""user_id" = { prefix = "test-" }"#;
    assert_eq!(counted(filters, &events), 1.0);
}

#[test]
fn amounts_are_compared_exactly() {
    let events = [
        r#""user_id":"u1","amount":9.99"#,
        r#""user_id":"u2","amount":10"#,
        r#""user_id":"u3","amount":10.00"#,
        r#""user_id":"u4","amount":250"#,
        r#""user_id":"u5","amount":"300""#,
        r#""user_id":"u6""#,
    ];
    assert_eq!(counted("amount = { gte = 10 }", &events), 3.0);
    assert_eq!(counted("amount = { gt = 10 }", &events), 1.0);
    assert_eq!(counted("amount = { gte = 10, lt = 100 }", &events), 2.0);
    assert_eq!(counted("amount = { lte = 9.99 }", &events), 1.0);
    assert_eq!(counted("amount = { present = false }", &events), 1.0);
}

#[test]
fn every_malformed_test_is_reported_with_its_path() {
    let text = config(
        r#"amount = { gte = "ten", between = [1, 2] }, plan = { present = "yes" }, id = { prefix = "" }, other = {}"#,
    );
    let errors = Config::from_toml(&text, &|_| None).expect_err("invalid config");
    let paths: Vec<String> = errors.0.iter().map(|error| error.path.clone()).collect();
    for expected in [
        "north_star.where.amount.gte",
        "north_star.where.amount.between",
        "north_star.where.plan.present",
        "north_star.where.id.prefix",
        "north_star.where.other",
    ] {
        assert!(
            paths.iter().any(|path| path == expected),
            "{expected} missing from {errors}"
        );
    }
    assert!(
        errors.to_string().contains("unknown test \"between\""),
        "{errors}"
    );
}

/// The Kafka record around each event in the tests below.
struct Record {
    key: &'static str,
    source: Option<&'static str>,
}

impl nsm_core::event::RecordMeta for Record {
    fn key(&self) -> Option<&[u8]> {
        Some(self.key.as_bytes())
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        (name == "x-source").then_some(self.source?.as_bytes())
    }

    fn timestamp_ms(&self) -> Option<i64> {
        None
    }
}

#[test]
fn the_message_key_and_headers_can_be_filtered_and_counted() {
    // Distinct message keys (producers key by account) among events not sent by the
    // load-test tool, which marks them in a header.
    let text = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[time]
zone = "UTC"
[north_star]
name = "paying_accounts"
kind = "distinct"
field = "@key"
where = { event = "payment_succeeded", "@header.x-source" = { not = "load-test" } }
window = "1d"
"#;
    let config = Config::from_toml(text, &|_| None).expect("valid config");
    let mut engine = Engine::new(Plan::from_config(&config));
    let key = PartitionKey::new("events", 0);
    engine.restore_partition(key.clone(), Default::default());
    let records = [
        Record {
            key: "acct-1",
            source: Some("web"),
        },
        Record {
            key: "acct-1",
            source: None,
        },
        Record {
            key: "acct-2",
            source: Some("load-test"),
        },
        Record {
            key: "acct-3",
            source: None,
        },
    ];
    for (offset, record) in records.iter().enumerate() {
        let payload = format!(r#"{{"event":"payment_succeeded","timestamp":{NOW_MS}}}"#);
        engine.apply_record(&key, offset as i64, payload.as_bytes(), record, NOW_MS);
    }
    assert_eq!(
        engine.metric_values(NOW_MS)[0].current.value.to_f64(),
        2.0,
        "acct-1 once, acct-2 left out, acct-3"
    );
}
