use nsm_core::engine::{AggValue, Engine, Outcome};
use nsm_core::Config;

use super::*;

const CONFIG: &str = r#"
[kafka]
brokers = "localhost:9092"
topics = ["events"]
[time]
zone = "Europe/Berlin"
[north_star]
name = "active_users"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1d"
[[inputs]]
name = "messages"
owner = "team"
kind = "count"
where = { event = "message_sent" }
window = "1h"
[revenue]
name = "revenue"
kind = "sum"
field = "amount"
where = { event = "payment" }
window = "1w"
"#;

fn plan_from(text: &str) -> Plan {
    let config = Config::from_toml(text, &|_| None).expect("valid config");
    Plan::from_config(&config)
}

fn key(partition: i32) -> PartitionKey {
    PartitionKey::new("events", partition)
}

const NOW: i64 = 1_795_000_000_000; // 2026-11-18

fn event(name: &str, user: &str, minutes: i64) -> Vec<u8> {
    let time = NOW - 3_600_000 + minutes * 60_000;
    format!(r#"{{"event":"{name}","user_id":"{user}","timestamp":{time},"amount":2.5}}"#)
        .into_bytes()
}

fn feed(engine: &mut Engine, partition: i32, from_offset: i64, events: &[Vec<u8>]) {
    for (index, payload) in events.iter().enumerate() {
        let outcome = engine.apply(&key(partition), from_offset + index as i64, payload, NOW);
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
}

fn options() -> StoreOptions {
    StoreOptions::default()
}

/// An engine reading stored members from `store`, as the pipeline runs it.
fn engine_on(store: &Store, plan: &Plan) -> Engine {
    Engine::with_reader(plan.clone(), Box::new(store.clone()), 1024)
}

#[test]
fn written_changes_restore_the_same_values_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(CONFIG);
    let (store, discarded) = Store::open(dir.path(), &plan, &options()).expect("open");
    assert!(discarded.is_empty());
    let mut engine = engine_on(&store, &plan);
    for partition in [0, 1] {
        engine.restore_partition(
            key(partition),
            store.load_partition(&key(partition)).expect("load"),
        );
    }
    feed(
        &mut engine,
        0,
        0,
        &[
            event("message_sent", "ana", 1),
            event("message_sent", "bo", 2),
            event("payment", "ana", 3),
        ],
    );
    feed(&mut engine, 1, 0, &[event("message_sent", "cy", 4)]);
    store.write(&engine.take_changes()).expect("write");
    feed(&mut engine, 0, 3, &[event("message_sent", "ana", 5)]);
    store.write(&engine.take_changes()).expect("write");
    let expected = engine.metric_values(NOW);
    // The engine reads members through the store: close both.
    drop((store, engine));

    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("reopen");
    assert_eq!(
        store.stored_partitions().expect("partitions"),
        vec![key(0), key(1)]
    );
    let mut restored = engine_on(&store, &plan);
    for partition in [0, 1] {
        let snapshot = store.load_partition(&key(partition)).expect("load");
        restored.restore_partition(key(partition), snapshot);
    }
    assert_eq!(restored.metric_values(NOW), expected);
    assert_eq!(restored.next_offset(&key(0)), Some(4));
    assert_eq!(restored.next_offset(&key(1)), Some(1));
    let values: Vec<AggValue> = expected.iter().map(|v| v.current.value).collect();
    assert_eq!(values[0], AggValue::Distinct(3));
    assert_eq!(
        values[2],
        AggValue::Sum(nsm_core::decimal::Decimal::parse("2.5").expect("2.5"))
    );
    let windows = store.windows(&key(0), Some(1)).expect("windows");
    assert_eq!(
        windows.iter().map(|w| w.value).collect::<Vec<_>>(),
        vec![AggValue::Count(3)]
    );
    // Members are read from RocksDB, not loaded: bo again is no new user, dan is.
    feed(
        &mut restored,
        0,
        4,
        &[
            event("message_sent", "bo", 6),
            event("message_sent", "dan", 7),
        ],
    );
    assert_eq!(
        restored.metric_values(NOW)[0].current.value,
        AggValue::Distinct(4)
    );
}

#[test]
fn changed_metric_definitions_discard_only_that_metric() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(CONFIG);
    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), PartitionSnapshot::default());
    feed(
        &mut engine,
        0,
        0,
        &[event("message_sent", "ana", 1), event("payment", "ana", 2)],
    );
    store.write(&engine.take_changes()).expect("write");
    // The engine reads members through the store: close both.
    drop((store, engine));

    let changed = CONFIG.replace("window = \"1h\"", "window = \"1d\"");
    let changed_plan = plan_from(&changed);
    let (store, discarded) = Store::open(dir.path(), &changed_plan, &options()).expect("reopen");
    assert_eq!(
        discarded,
        vec![DiscardedMetric {
            name: "messages".into(),
            reason: "its definition changed"
        }]
    );
    let snapshot = store.load_partition(&key(0)).expect("load");
    let metrics: Vec<usize> = snapshot.windows.iter().map(|w| w.metric).collect();
    assert_eq!(
        metrics,
        vec![0, 2],
        "active_users and revenue kept, messages dropped"
    );
    assert_eq!(store.stored_member_count(&key(0)).expect("count"), 1);
}

#[test]
fn expired_windows_are_deleted_with_their_members() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(CONFIG);
    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), PartitionSnapshot::default());
    feed(&mut engine, 0, 0, &[event("message_sent", "ana", 1)]);
    store.write(&engine.take_changes()).expect("write");
    // 40 days later the old windows are past the 35-day retention.
    let later = NOW + 40 * 86_400_000;
    let payload = format!(r#"{{"event":"message_sent","user_id":"bo","timestamp":{later}}}"#);
    engine.apply(&key(0), 1, payload.as_bytes(), later);
    store.write(&engine.take_changes()).expect("write");
    let snapshot = store.load_partition(&key(0)).expect("load");
    assert!(
        snapshot.windows.iter().all(|w| w.start_ms > NOW),
        "{:?}",
        snapshot.windows
    );
    assert_eq!(
        store.stored_member_count(&key(0)).expect("count"),
        1,
        "only bo's membership remains"
    );
}

#[test]
fn an_incompatible_format_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(CONFIG);
    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("open");
    store
        .db
        .put_cf(
            store.cf(CF_META),
            format::FORMAT_VERSION_KEY,
            99u32.to_be_bytes(),
        )
        .expect("put");
    // The engine reads members through the store: close both.
    drop(store);
    let error = Store::open(dir.path(), &plan, &options())
        .err()
        .expect("refused");
    let message = error.to_string();
    assert!(
        message.contains("format 99") && message.contains("reads format 2"),
        "{message}"
    );
}

#[test]
fn an_unwritable_directory_fails_to_open_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").expect("write");
    let error = Store::open(&file, &plan_from(CONFIG), &options())
        .err()
        .expect("refused");
    assert!(error.to_string().contains("not-a-directory"), "{error}");
}

fn with_id(id: &str, minutes: i64) -> Vec<u8> {
    let time = NOW - 3_600_000 + minutes * 60_000;
    format!(r#"{{"event_id":"{id}","event":"message_sent","user_id":"u","timestamp":{time}}}"#)
        .into_bytes()
}

#[test]
fn event_ids_within_the_horizon_survive_a_reopen_and_expired_ones_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(&CONFIG.replace("[time]", "[events]\ndedup_horizon = \"10m\"\n[time]"));
    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    feed(&mut engine, 0, 0, &[with_id("a", 0), with_id("b", 15)]);
    store.write(&engine.take_changes()).expect("write");
    // The watermark moves to minute 24: "a" (minute 0) is past the 10-minute horizon, and
    // so is its whole period of ids.
    feed(&mut engine, 0, 2, &[with_id("c", 24)]);
    store.write(&engine.take_changes()).expect("write");
    // The engine reads members through the store: close both.
    drop((store, engine));

    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("reopen");
    let period_of = |minutes: i64| {
        let time = NOW - 3_600_000 + minutes * 60_000;
        time.div_euclid(600_000) * 600_000
    };
    let stored_id = |minutes: i64, id: &[u8]| {
        store
            .member(&key(0), plan.ids_namespace(), period_of(minutes), id)
            .expect("read")
    };
    assert_eq!(stored_id(0, b"sa"), None, "a was forgotten on disk");
    assert!(stored_id(15, b"sb").is_some());
    assert!(stored_id(24, b"sc").is_some());
    let mut restored = engine_on(&store, &plan);
    restored.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    assert!(matches!(
        restored.apply(&key(0), 3, &with_id("b", 15), NOW),
        Outcome::Duplicate { .. }
    ));
    assert!(matches!(
        restored.apply(&key(0), 4, &with_id("a", 16), NOW),
        Outcome::Applied { .. }
    ));
}

#[test]
fn conversion_funnels_survive_a_reopen_so_a_late_start_still_converts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "{CONFIG}[[guardrails]]\nname = \"paid_after_messaging\"\nkind = \"conversion\"\n\
         from = {{ event = \"message_sent\" }}\nwhere = {{ event = \"payment\" }}\n\
         within = \"30m\"\nwindow = \"1d\"\n"
    );
    let plan = plan_from(&text);
    let conversion = plan.metric_index("paid_after_messaging").expect("metric");
    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    // Ana pays at minute 20 before any message of hers has arrived.
    feed(&mut engine, 0, 0, &[event("payment", "ana", 20)]);
    store.write(&engine.take_changes()).expect("write");
    // The engine reads members through the store: close both.
    drop((store, engine));

    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("reopen");
    let mut restored = engine_on(&store, &plan);
    restored.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    // Her message from minute 5 arrives late: the stored pending payment converts.
    feed(&mut restored, 0, 1, &[event("message_sent", "ana", 5)]);
    let value = restored.metric_values(NOW)[conversion].current.value;
    assert_eq!(value, AggValue::Distinct(1));
    // Bo's payment at minute 50 is 45 minutes after his message: too late, not converted.
    feed(
        &mut restored,
        0,
        2,
        &[event("message_sent", "bo", 5), event("payment", "bo", 50)],
    );
    let value = restored.metric_values(NOW)[conversion].current.value;
    assert_eq!(value, AggValue::Distinct(1));
}

#[test]
fn trailing_distinct_counts_survive_a_reopen_with_members_on_disk() {
    let config = CONFIG.replace(
        "[[inputs]]",
        "[[inputs]]\nname = \"users_2h\"\nowner = \"team\"\nkind = \"distinct\"\nfield = \"user_id\"\nwhere = { event = \"message_sent\" }\ntrailing = \"2h\"\n\n[[inputs]]",
    );
    let plan = plan_from(&config);
    let trailing = plan.metric_index("users_2h").expect("trailing metric");
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), PartitionSnapshot::default());
    // Ana twice, bo once, in the last hour.
    feed(
        &mut engine,
        0,
        0,
        &[
            event("message_sent", "ana", 1),
            event("message_sent", "bo", 20),
            event("message_sent", "ana", 40),
        ],
    );
    store.write(&engine.take_changes()).expect("write");
    let expected = engine.metric_values(NOW);
    assert_eq!(expected[trailing].current.value, AggValue::Distinct(2));
    drop((store, engine));

    let (store, _) = Store::open(dir.path(), &plan, &options()).expect("reopen");
    let mut restored = engine_on(&store, &plan);
    restored.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    assert_eq!(restored.metric_values(NOW), expected);
    // Ana again, read from disk as a known member: still two; cy is the third.
    feed(
        &mut restored,
        0,
        3,
        &[
            event("message_sent", "ana", 50),
            event("message_sent", "cy", 55),
        ],
    );
    assert_eq!(
        restored.metric_values(NOW)[trailing].current.value,
        AggValue::Distinct(3)
    );
}
