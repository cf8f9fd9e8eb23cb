use std::collections::BTreeMap;

use nsm_core::engine::{AggValue, Engine, MetricValues, Outcome, MEMBER_SHARDS};
use nsm_core::Config;

use super::*;

mod backfill;
mod frames;

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

/// Takes a partition as the pipeline does; the metrics whose data was discarded.
fn adopt(store: &Store, partition: i32, tail: &[Vec<u8>]) -> Vec<DiscardedMetric> {
    let (adoption, discarded) = store
        .prepare_keyed_adoption(&key(partition), tail, false, new_epoch(store, None))
        .expect("adopt");
    store.commit_keyed(adoption, &[]).expect("commit");
    discarded
}

/// The epoch to take partition 0 with after a restore that read `seen`.
fn new_epoch(store: &Store, seen: Option<u64>) -> u64 {
    store.adoption_epoch(&key(0), seen).expect("epoch")
}

/// An engine reading stored members from `store`, as the pipeline runs it.
fn engine_on(store: &Store, plan: &Plan) -> Engine {
    Engine::with_reader(plan.clone(), Box::new(store.clone()), 1024)
}

/// The test config with one more input metric, given by its TOML lines.
fn plan_with_input(input: &str) -> Plan {
    plan_from(&CONFIG.replace("[[inputs]]", &format!("[[inputs]]\n{input}\n\n[[inputs]]")))
}

/// Opens a new store at `dir`, takes partition 0 as the pipeline does, applies `events` to it
/// from offset 0 and writes them; the engine's values then. Store and engine are closed on
/// return, so the test reopens what is on disk.
fn write_events(dir: &Path, plan: &Plan, events: &[Vec<u8>]) -> Vec<MetricValues> {
    let store = Store::open(dir, plan, &options()).expect("open");
    assert!(adopt(&store, 0, &[]).is_empty());
    let mut engine = engine_on(&store, plan);
    engine.restore_partition(key(0), PartitionSnapshot::default());
    feed(&mut engine, 0, 0, events);
    let changes = engine.take_changes();
    // Tests make older layouts of what it wrote from format 6's keys.
    store.learn_legacy_keys(&changes);
    store.write(&changes).expect("write");
    engine.metric_values(NOW)
}

#[test]
fn written_changes_restore_the_same_values_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(CONFIG);
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
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

    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
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
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    // Taking a partition stores the definitions its data is computed with.
    assert!(adopt(&store, 0, &[]).is_empty());
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
    let store = Store::open(dir.path(), &changed_plan, &options()).expect("reopen");
    let discarded = adopt(&store, 0, &[]);
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
    // The changed metric starts at the partition's watermark: its window holding it lacks
    // the events before, and says so; the others are whole.
    assert_eq!(
        snapshot.metric_since.len(),
        1,
        "{:?}",
        snapshot.metric_since
    );
    assert_eq!(snapshot.metric_since[0].0, 1, "messages");
    let mut engine = engine_on(&store, &changed_plan);
    engine.restore_partition(key(0), snapshot);
    let values = engine.metric_values(NOW);
    let partial: Vec<bool> = values.iter().map(|v| v.current.partial).collect();
    assert_eq!(
        partial,
        vec![false, true, false],
        "only messages is partial"
    );
    // Taken again (a restart), it stays partial: the record is kept, not rewritten.
    drop(engine);
    assert!(adopt(&store, 0, &[]).is_empty());
    let again = store.load_partition(&key(0)).expect("load");
    assert_eq!(again.metric_since, vec![(1, snapshot_watermark(&store))]);
}

/// Takes a partition of the repartition topic as the pipeline does; the metrics discarded.
fn adopt_key(store: &Store, partition: &PartitionKey) -> Vec<DiscardedMetric> {
    let epoch = store.adoption_epoch(partition, None).expect("epoch");
    let (adoption, discarded) = store
        .prepare_keyed_adoption(partition, &[], false, epoch)
        .expect("adopt");
    store.commit_keyed(adoption, &[]).expect("commit");
    discarded
}

#[test]
fn a_repartition_partitions_marks_of_its_sources_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let teams = plan_with_input(
        "name = \"active_teams\"\nowner = \"team\"\nkind = \"distinct\"\n\
         field = \"team_id\"\nwhere = { event = \"message_sent\" }\nwindow = \"1d\"",
    );
    let mut settings = teams.settings().clone();
    settings.message_key = Some(nsm_core::engine::MessageKey {
        field: nsm_core::metric::FieldPath::parse("user_id").expect("path"),
        nested: Vec::new(),
    });
    let plan = Plan::new(teams.metrics().to_vec(), settings);
    let repartition = PartitionKey::new("nsm-repartition", 0);
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    assert!(adopt_key(&store, &repartition).is_empty());
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(repartition.clone(), PartitionSnapshot::default());
    let forwarded = nsm_core::engine::Forwarded {
        group: 0,
        group_field: "team_id",
        topic: "events",
        partition: 0,
        offset: 7,
        epoch: nsm_core::engine::Epoch {
            resumed_from: 3,
            taken_at_ms: NOW - 60_000,
        },
        watermark_ms: Some(NOW - 120_000),
        clock_ms: Some(NOW - 60_000),
        topics: nsm_core::engine::Inputs::parse("events:1").expect("well formed"),
    };
    let payload = format!(
        r#"{{"event":"message_sent","user_id":"ana","team_id":"red","timestamp":{}}}"#,
        NOW - 120_000
    );
    let outcome = engine.apply_forwarded(
        &repartition,
        0,
        payload.as_bytes(),
        &nsm_core::event::NoRecord::default(),
        &forwarded,
        NOW,
    );
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    store.write(&engine.take_changes()).expect("write");
    drop((store, engine));

    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
    assert!(
        adopt_key(&store, &repartition).is_empty(),
        "the marks are not taken for a metric that left the config"
    );
    let snapshot = store.load_partition(&repartition).expect("load");
    let upstream = snapshot.upstream.expect("the marks");
    assert_eq!(upstream.topics.get("events"), Some(&1));
    let mark = *upstream.mark("events", 0, "team_id").expect("the mark");
    assert_eq!(mark.next_offset, 8);
    assert_eq!(mark.epoch, forwarded.epoch);
    assert_eq!(mark.watermark_ms, Some(NOW - 120_000));
    assert_eq!(snapshot.event_watermark_ms, Some(NOW - 120_000));
}

fn snapshot_watermark(store: &Store) -> i64 {
    let snapshot = store.load_partition(&key(0)).expect("load");
    snapshot
        .event_watermark_ms
        .or(snapshot.max_event_ms)
        .expect("a watermark")
}

#[test]
fn expired_windows_are_deleted_with_their_members() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(CONFIG);
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
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

/// Bytes of the write-ahead log files in a store's directory.
fn wal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read the state directory")
        .map(|entry| entry.expect("directory entry"))
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "log"))
        .map(|entry| entry.metadata().expect("metadata").len())
        .sum()
}

#[test]
fn the_write_ahead_log_a_restart_replays_stays_bounded() {
    // Each checkpoint writes a little to `windows` and much to `members`; `windows` never
    // fills a memtable, so without the bound every log file since the first stays.
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(CONFIG);
    let limit = 1024 * 1024;
    let store = Store::open(
        dir.path(),
        &plan,
        &StoreOptions {
            max_wal_bytes: limit,
            ..options()
        },
    )
    .expect("open");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), PartitionSnapshot::default());
    let padding = "u".repeat(200);
    let mut offset = 0;
    for checkpoint in 0..160 {
        let events: Vec<_> = (0..200)
            .map(|user| event("message_sent", &format!("{padding}-{checkpoint}-{user}"), 1))
            .collect();
        feed(&mut engine, 0, offset, &events);
        offset += events.len() as i64;
        store.write(&engine.take_changes()).expect("write");
    }
    // About 8 MiB was written; flushes and the deletion of old logs run in the background,
    // slowly on a loaded machine (20 s was not always enough with two test binaries running).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while wal_bytes(dir.path()) > 2 * limit && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        wal_bytes(dir.path()) <= 2 * limit,
        "{} bytes of logs kept with a bound of {limit}",
        wal_bytes(dir.path())
    );
    drop(engine);
    drop(store);
    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
    assert_eq!(store.stored_member_count(&key(0)).expect("count"), 32_000);
}

#[test]
fn an_incompatible_format_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(CONFIG);
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
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
        message.contains("format 99")
            && message.contains(&format!("reads format {FORMAT_VERSION}")),
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
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
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

    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
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
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    // Ana pays at minute 20 before any message of hers has arrived.
    feed(&mut engine, 0, 0, &[event("payment", "ana", 20)]);
    store.write(&engine.take_changes()).expect("write");
    // The engine reads members through the store: close both.
    drop((store, engine));

    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
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
    // By user too: each segment keeps gap histograms of its own.
    let plan = plan_with_input(
        "name = \"users_2h\"\nowner = \"team\"\nkind = \"distinct\"\nfield = \"user_id\"\nwhere = { event = \"message_sent\" }\ntrailing = \"2h\"\nby = [\"user_id\"]",
    );
    let trailing = plan.metric_index("users_2h").expect("trailing metric");
    let dir = tempfile::tempdir().expect("tempdir");
    // Ana twice, bo once, in the last hour.
    let expected = write_events(
        dir.path(),
        &plan,
        &[
            event("message_sent", "ana", 1),
            event("message_sent", "bo", 20),
            event("message_sent", "ana", 40),
        ],
    );
    assert_eq!(expected[trailing].current.value, AggValue::Distinct(2));
    let segments = &expected[trailing].current_segments;
    let ones: Vec<(&str, AggValue)> = segments
        .iter()
        .map(|segment| (segment.label.as_str(), segment.value))
        .collect();
    assert_eq!(
        ones,
        vec![
            ("ana", AggValue::Distinct(1)),
            ("bo", AggValue::Distinct(1))
        ]
    );

    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
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

#[test]
fn trailing_thresholds_survive_a_reopen_with_counts_on_disk() {
    let plan = plan_with_input(
        "name = \"chatty_2h\"\nowner = \"team\"\nkind = \"threshold\"\nentity = \"user_id\"\nat_least = 2\nwhere = { event = \"message_sent\" }\ntrailing = \"2h\"",
    );
    let chatty = plan.metric_index("chatty_2h").expect("trailing threshold");
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = write_events(
        dir.path(),
        &plan,
        &[
            event("message_sent", "ana", 1),
            event("message_sent", "bo", 20),
        ],
    );
    assert_eq!(expected[chatty].current.value, AggValue::Distinct(0));

    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
    let mut restored = engine_on(&store, &plan);
    restored.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    assert_eq!(restored.metric_values(NOW), expected);
    // Ana's second message, and bo's, late: their first ones are read from disk.
    feed(
        &mut restored,
        0,
        2,
        &[
            event("message_sent", "ana", 40),
            event("message_sent", "bo", 10),
        ],
    );
    assert_eq!(
        restored.metric_values(NOW)[chatty].current.value,
        AggValue::Distinct(2)
    );
}

/// A changelog record: offset, key, value (none: a tombstone), epoch (none: without one).
type TopicRecord = (i64, Vec<u8>, Option<Vec<u8>>, Option<u64>);

/// A changelog partition, appended in send order.
#[derive(Default)]
struct Topic(Vec<TopicRecord>);

impl Topic {
    fn append(&mut self, key: &[u8], value: Option<&[u8]>, epoch: Option<u64>) {
        let offset = self.0.len() as i64;
        self.0
            .push((offset, key.to_vec(), value.map(<[u8]>::to_vec), epoch));
    }

    /// Appends a partition's records of a write, its end marker aside; returns how many.
    fn append_records(&mut self, store: &Store, partition: &PartitionRecords) -> u64 {
        store
            .each_record(partition, |key, value| {
                self.append(key, value, Some(partition.epoch));
                Ok::<_, StateError>(())
            })
            .expect("records")
    }

    /// Appends a partition's end marker of a write.
    fn append_end(&mut self, partition: &PartitionRecords) {
        self.append(
            &partition.end.key,
            partition.end.value.as_deref(),
            Some(partition.epoch),
        );
    }

    /// Sends a prepared write as the pipeline does (records, then the end marker) and returns
    /// the positions to commit with it.
    fn send(&mut self, store: &Store, prepared: &KeyedWrite) -> Vec<(PartitionKey, i64)> {
        prepared
            .partitions
            .iter()
            .map(|partition| {
                self.append_records(store, partition);
                self.append_end(partition);
                (partition.partition.clone(), self.0.len() as i64)
            })
            .collect()
    }

    /// What log compaction keeps: the last record of each key, in offset order.
    fn compacted(&self) -> Topic {
        let mut last = HashMap::new();
        for (offset, key, _, _) in &self.0 {
            last.insert(key.clone(), *offset);
        }
        Topic(
            self.0
                .iter()
                .filter(|(offset, key, _, _)| last[key] == *offset)
                .cloned()
                .collect(),
        )
    }
}

/// Everything a store holds for a partition, family by family.
fn dump(store: &Store, partition: i32) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let prefix = partition_prefix(&key(partition));
    let mut out = Vec::new();
    for (_, family) in changelog::FAMILIES {
        for item in store.entries_under(family, &prefix) {
            let (stored_key, value) = item.expect("read");
            out.push((family, stored_key.to_vec(), value.to_vec()));
        }
    }
    out
}

fn restore(store: &Store, topic: &Topic, from: i64) -> RestoreOutcome {
    let mut restore = PartitionRestore::new(store, &key(0), from).expect("restore");
    for (offset, record_key, value, epoch) in topic.0.iter().filter(|r| r.0 >= from) {
        restore
            .record(*offset, record_key, value.as_deref(), *epoch)
            .expect("apply");
    }
    restore.finish().expect("finish")
}

/// Runs a stream through an engine on `store`, sending every checkpoint to `topic`: a day
/// of events, then one 40 days later that expires the first day's windows and members.
fn run_with_changelog(store: &Store, plan: &Plan, topic: &mut Topic) {
    let (adoption, _) = store
        .prepare_keyed_adoption(&key(0), &[], false, new_epoch(store, None))
        .expect("adopt");
    let positions = topic.send(store, &adoption);
    store.commit_keyed(adoption, &positions).expect("commit");
    let mut engine = engine_on(store, plan);
    engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    let users = ["ana", "bo", "cy", "di"];
    for round in 0..3 {
        let events: Vec<Vec<u8>> = users
            .iter()
            .map(|user| event("message_sent", user, round * 10))
            .chain([event("payment", "ana", round * 10 + 1)])
            .collect();
        feed(&mut engine, 0, round * 5, &events);
        let prepared = store
            .prepare_keyed(&engine.take_changes())
            .expect("prepare");
        let positions = topic.send(store, &prepared);
        store.commit_keyed(prepared, &positions).expect("commit");
    }
    let later = NOW + 40 * 86_400_000;
    let payload = format!(r#"{{"event":"message_sent","user_id":"eve","timestamp":{later}}}"#);
    engine.apply(&key(0), 15, payload.as_bytes(), later);
    let prepared = store
        .prepare_keyed(&engine.take_changes())
        .expect("prepare");
    let positions = topic.send(store, &prepared);
    store.commit_keyed(prepared, &positions).expect("commit");
}

#[test]
fn a_partition_restored_from_its_changelog_equals_the_store_that_wrote_it() {
    let plan = plan_from(CONFIG);
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let original = Store::open(dirs[0].path(), &plan, &options()).expect("open");
    let mut topic = Topic::default();
    run_with_changelog(&original, &plan, &mut topic);
    assert_eq!(
        original.stored_member_count(&key(0)).expect("count"),
        1,
        "only eve is left"
    );
    let tombstones = topic.0.iter().filter(|r| r.2.is_none()).count();
    assert!(
        tombstones >= 4,
        "the expired members are deleted in the changelog too"
    );

    for (dir, topic) in [(&dirs[1], &topic), (&dirs[2], &topic.compacted())] {
        let copy = Store::open(dir.path(), &plan, &options()).expect("open");
        let RestoreOutcome::Restored { tail, .. } = restore(&copy, topic, 0) else {
            panic!("a small changelog restores in one pass");
        };
        assert!(tail.is_empty());
        assert_eq!(dump(&copy, 0), dump(&original, 0));
        assert_eq!(
            copy.changelog_position(&key(0))
                .expect("position")
                .map(|position| position.offset),
            Some(topic.0.last().expect("records").0 + 1)
        );
    }
}

#[test]
fn an_unfinished_write_is_never_restored_and_the_next_owner_reverts_it() {
    let plan = plan_from(CONFIG);
    let dir = tempfile::tempdir().expect("tempdir");
    let original = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut topic = Topic::default();
    run_with_changelog(&original, &plan, &mut topic);
    let whole = dump(&original, 0);
    let finished = topic.0.len() as i64;

    // A write that stopped half-way: some records, no end marker, nothing stored locally.
    let mut engine = engine_on(&original, &plan);
    engine.restore_partition(key(0), original.load_partition(&key(0)).expect("load"));
    let later = NOW + 40 * 86_400_000 + 60_000;
    let events: Vec<Vec<u8>> = ["fay", "gus", "eve"]
        .iter()
        .map(|user| {
            format!(r#"{{"event":"message_sent","user_id":"{user}","timestamp":{later}}}"#)
                .into_bytes()
        })
        .collect();
    for (index, payload) in events.iter().enumerate() {
        engine.apply(&key(0), 16 + index as i64, payload, later);
    }
    let unfinished = original
        .prepare_keyed(&engine.take_changes())
        .expect("prepare");
    let unfinished_records = topic.append_records(&original, &unfinished.partitions[0]);

    // The next owner restores the finished writes only, and its first write reverts the rest.
    let next_dir = tempfile::tempdir().expect("tempdir");
    let next = Store::open(next_dir.path(), &plan, &options()).expect("open");
    let RestoreOutcome::Restored { tail, .. } = restore(&next, &topic, 0) else {
        panic!("one pass");
    };
    assert_eq!(tail.len() as u64, unfinished_records);
    assert_eq!(dump(&next, 0), whole);
    assert_eq!(
        next.changelog_position(&key(0))
            .expect("position")
            .map(|position| position.offset),
        Some(finished)
    );
    let (adoption, _) = next
        .prepare_keyed_adoption(&key(0), &tail, false, new_epoch(&next, None))
        .expect("adopt");
    let positions = topic.send(&next, &adoption);
    next.commit_keyed(adoption, &positions).expect("commit");

    // From the start, compacted or not, the changelog now reads as the finished state.
    for topic in [&topic, &topic.compacted()] {
        let dir = tempfile::tempdir().expect("tempdir");
        let third = Store::open(dir.path(), &plan, &options()).expect("open");
        let RestoreOutcome::Restored { tail, .. } = restore(&third, topic, 0) else {
            panic!("one pass");
        };
        assert!(tail.is_empty());
        assert_eq!(dump(&third, 0), whole);
    }
    // The original instance, restarting from its own position, catches up the same way.
    let RestoreOutcome::Restored { tail, .. } = restore(&original, &topic, finished) else {
        panic!("one pass");
    };
    assert!(tail.is_empty());
    assert_eq!(dump(&original, 0), whole);
}

#[test]
fn a_metric_that_changed_is_deleted_from_the_changelog_too() {
    let plan = plan_from(CONFIG);
    let dir = tempfile::tempdir().expect("tempdir");
    let original = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut topic = Topic::default();
    run_with_changelog(&original, &plan, &mut topic);
    drop(original);

    let changed_plan = plan_from(&CONFIG.replace("window = \"1h\"", "window = \"1d\""));
    let store = Store::open(dir.path(), &changed_plan, &options()).expect("reopen");
    let (adoption, discarded) = store
        .prepare_keyed_adoption(&key(0), &[], false, new_epoch(&store, None))
        .expect("adopt");
    assert_eq!(discarded.len(), 1, "{discarded:?}");
    let positions = topic.send(&store, &adoption);
    store.commit_keyed(adoption, &positions).expect("commit");

    let copy_dir = tempfile::tempdir().expect("tempdir");
    let copy = Store::open(copy_dir.path(), &changed_plan, &options()).expect("open");
    restore(&copy, &topic.compacted(), 0);
    assert_eq!(dump(&copy, 0), dump(&store, 0));
    let (_, discarded) = copy
        .prepare_keyed_adoption(&key(0), &[], false, new_epoch(&copy, None))
        .expect("adopt");
    assert!(
        discarded.is_empty(),
        "the restored copy already has the new definition"
    );
}

#[test]
fn seeding_a_changelog_sends_each_stored_entry_once_and_drops_a_changed_metric() {
    let plan = plan_from(CONFIG);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    adopt(&store, 0, &[]);
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), PartitionSnapshot::default());
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
    // Kept without a changelog, then reopened with the hourly count now daily.
    let changes = engine.take_changes();
    store.learn_legacy_keys(&changes);
    store.write(&changes).expect("write");
    drop((store, engine));
    let changed_plan = plan_from(&CONFIG.replace("window = \"1h\"", "window = \"1d\""));
    let store = Store::open(dir.path(), &changed_plan, &options()).expect("reopen");

    // A stored member that is also the tail of an unfinished write: sent once, as stored.
    let (_, member, value) = dump(&store, 0)
        .into_iter()
        .find(|(family, _, _)| *family == CF_ENTRIES)
        .expect("a stored member");
    let legacy = keyed::legacy_member_key(&member).expect("a member key");
    let tail_key = [&[changelog::OLDER_MEMBER_BYTE][..], &legacy].concat();
    let (seed, discarded) = store
        .prepare_keyed_adoption(
            &key(0),
            std::slice::from_ref(&tail_key),
            true,
            new_epoch(&store, None),
        )
        .expect("seed");
    assert_eq!(
        discarded
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
        ["messages"]
    );
    let mut topic = Topic::default();
    let positions = topic.send(&store, &seed);
    store.commit_keyed(seed, &positions).expect("commit");

    let sent: Vec<_> = topic
        .0
        .iter()
        .filter(|(_, key, _, _)| *key == tail_key)
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].2.as_deref(), Some(&*value));
    // Every key goes once, so the broker may keep them in any order: the discarded metric's
    // entries as tombstones only, not as copies first.
    let mut keys: Vec<_> = topic.0.iter().map(|(_, key, _, _)| key).collect();
    let total = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), total, "a key sent twice");
    assert!(
        dump(&store, 0)
            .iter()
            .filter(|(family, _, _)| *family != CF_FINGERPRINTS)
            .all(|(_, key, _)| !key.windows(8).any(|name| name == b"messages")),
        "the hourly count's data is gone (its new definition is stored)"
    );
    // What a restore makes of the topic, as sent and compacted, is the store.
    for topic in [&topic, &topic.compacted()] {
        let copy_dir = tempfile::tempdir().expect("tempdir");
        let copy = Store::open(copy_dir.path(), &changed_plan, &options()).expect("open");
        restore(&copy, topic, 0);
        assert_eq!(dump(&copy, 0), dump(&store, 0));
    }
}

#[test]
fn a_format_2_store_gets_its_metric_definitions_per_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_from(CONFIG);
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), PartitionSnapshot::default());
    feed(&mut engine, 0, 0, &[event("message_sent", "ana", 1)]);
    let changes = engine.take_changes();
    store.learn_legacy_keys(&changes);
    store.write(&changes).expect("write");
    // Format 2 kept one fingerprint per metric in `meta`, none per partition.
    let mut batch = WriteBatch::default();
    for metric in plan.metrics() {
        batch.put_cf(
            store.cf(CF_META),
            format!("metric/{}", metric.name),
            metric.fingerprint(),
        );
    }
    batch.put_cf(
        store.cf(CF_META),
        format::FORMAT_VERSION_KEY,
        2u32.to_be_bytes(),
    );
    store.db.write(batch).expect("write");
    drop((store, engine));
    move_entries_to_format(dir.path(), 6);

    let store = Store::open(dir.path(), &plan, &options()).expect("migrated");
    assert!(
        adopt(&store, 0, &[]).is_empty(),
        "the definitions carried over: nothing discarded"
    );
    assert_eq!(store.stored_member_count(&key(0)).expect("count"), 1);
    assert_eq!(stored_version(&store), FORMAT_VERSION);
}

#[test]
fn a_large_unfinished_tail_after_a_stored_position_keeps_what_came_before() {
    let plan = plan_from(CONFIG);
    let dir = tempfile::tempdir().expect("tempdir");
    let original = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut topic = Topic::default();
    run_with_changelog(&original, &plan, &mut topic);
    let whole = dump(&original, 0);
    let position = topic.0.len() as i64;
    // An unfinished write of a few records after the store's own position.
    for user in ["fay", "gus"] {
        let mut record_key = vec![b'm'];
        record_key.extend_from_slice(&window_key(&partition_prefix(&key(0)), "active_users", NOW));
        record_key.extend_from_slice(user.as_bytes());
        topic
            .0
            .push((topic.0.len() as i64, record_key, Some(Vec::new()), None));
    }
    // Held back at most one byte: the tail is written out, so the restore needs a second pass,
    // which applies everything up to the store's position and nothing after.
    let mut restore = PartitionRestore::new(&original, &key(0), position)
        .expect("restore")
        .hold_back_at_most(1);
    for (offset, record_key, value, epoch) in topic.0.iter().filter(|r| r.0 >= position) {
        restore
            .record(*offset, record_key, value.as_deref(), *epoch)
            .expect("apply");
    }
    let RestoreOutcome::RestartThrough(through) = restore.finish().expect("finish") else {
        panic!("a spilled tail needs a second pass");
    };
    assert_eq!(through, Some(position - 1));
    original.clear_partition(&key(0)).expect("clear");
    let mut second = PartitionRestore::new(&original, &key(0), 0)
        .expect("restore")
        .through(through);
    for (offset, record_key, value, epoch) in &topic.0 {
        second
            .record(*offset, record_key, value.as_deref(), *epoch)
            .expect("apply");
    }
    let RestoreOutcome::Restored { tail, .. } = second.finish().expect("finish") else {
        panic!("the second pass settles");
    };
    assert_eq!(tail.len(), 2);
    assert_eq!(dump(&original, 0), whole);
}

/// One checkpoint of `events` from `offset` on, by an engine loaded from `store`'s copy of
/// partition 0: the write, prepared and not yet sent.
fn checkpoint_of(store: &Store, plan: &Plan, offset: i64, events: &[Vec<u8>]) -> KeyedWrite {
    let mut engine = engine_on(store, plan);
    engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    feed(&mut engine, 0, offset, events);
    store
        .prepare_keyed(&engine.take_changes())
        .expect("prepare")
}

fn send_and_commit(store: &Store, topic: &mut Topic, write: KeyedWrite) {
    let positions = topic.send(store, &write);
    store.commit_keyed(write, &positions).expect("commit");
}

fn messages(users: &[&str], minutes: i64) -> Vec<Vec<u8>> {
    users
        .iter()
        .map(|user| event("message_sent", user, minutes))
        .collect()
}

/// The values an engine shows from a store's copy of partition 0.
fn values_of(store: &Store, plan: &Plan) -> Vec<MetricValues> {
    let mut engine = engine_on(store, plan);
    engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    engine.metric_values(NOW)
}

#[test]
fn records_of_an_owner_that_lost_the_partition_are_fenced_off_by_their_epoch() {
    let plan = plan_from(CONFIG);
    let dirs: Vec<_> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut topic = Topic::default();

    // A takes the partition and stores three messages.
    let a = Store::open(dirs[0].path(), &plan, &options()).expect("open");
    let (adoption, _) = a
        .prepare_keyed_adoption(&key(0), &[], false, new_epoch(&a, None))
        .expect("adopt");
    send_and_commit(&a, &mut topic, adoption);
    let write = checkpoint_of(&a, &plan, 0, &messages(&["ana", "bo", "cy"], 1));
    send_and_commit(&a, &mut topic, write);
    // A is cut off with its next write in flight, which the network delivers much later.
    let late = checkpoint_of(&a, &plan, 3, &messages(&["di"], 2));
    let late = &late.partitions[0];

    // B takes the partition over from what A stored, and goes on from A's stored offset.
    let b = Store::open(dirs[1].path(), &plan, &options()).expect("open");
    let RestoreOutcome::Restored {
        tail,
        epoch: seen,
        fenced,
        ..
    } = restore(&b, &topic, 0)
    else {
        panic!("one pass");
    };
    assert!(tail.is_empty());
    assert_eq!(fenced, 0);
    assert_eq!(seen, Some(late.epoch));
    let b_epoch = new_epoch(&b, seen);
    assert!(
        b_epoch > late.epoch,
        "a new owner writes above every epoch it read"
    );
    let (adoption, _) = b
        .prepare_keyed_adoption(&key(0), &tail, false, b_epoch)
        .expect("adopt");
    send_and_commit(&b, &mut topic, adoption);
    send_and_commit(
        &b,
        &mut topic,
        checkpoint_of(&b, &plan, 3, &messages(&["di", "eve"], 2)),
    );
    assert_eq!(b.changelog_epoch(&key(0)).expect("epoch"), Some(b_epoch));

    // A's write lands after B's, records and end marker, and B goes on with a payment: the
    // hour's messages, which A's late records also hold (4 where B has 5), are not written
    // again. Taken as they come, A's late records would be finished by B's next end marker.
    let before_late = topic.0.len();
    topic.append_records(&a, late);
    topic.append_end(late);
    let after_late_end = topic.0.len();
    send_and_commit(
        &b,
        &mut topic,
        checkpoint_of(&b, &plan, 5, &[event("payment", "ana", 3)]),
    );

    // A restore from the start is B's copy, whatever A's late records say.
    let copy = Store::open(dirs[2].path(), &plan, &options()).expect("open");
    let RestoreOutcome::Restored {
        tail,
        fenced,
        epoch,
        ..
    } = restore(&copy, &topic, 0)
    else {
        panic!("one pass");
    };
    assert!(tail.is_empty());
    assert!(fenced > 0, "A's late records are left out");
    assert_eq!(epoch, Some(b_epoch));
    assert_eq!(dump(&copy, 0), dump(&b, 0));
    assert_eq!(values_of(&copy, &plan), values_of(&b, &plan));
    assert_eq!(copy.stored_next_offset(&key(0)).expect("offset"), Some(6));
    assert_eq!(copy.changelog_epoch(&key(0)).expect("epoch"), Some(b_epoch));

    // So is a copy that had read up to them and catches up from its position: it kept the
    // epoch it had read with its position.
    let caught_up = Store::open(dirs[3].path(), &plan, &options()).expect("open");
    restore(&caught_up, &Topic(topic.0[..before_late].to_vec()), 0);
    let RestoreOutcome::Restored { fenced, .. } = restore(&caught_up, &topic, before_late as i64)
    else {
        panic!("one pass");
    };
    assert!(fenced > 0);
    assert_eq!(dump(&caught_up, 0), dump(&b, 0));

    // A probe of the changelog as it was right after A's late end marker finds B's write
    // the last finished one, not A's.
    let mut probe = ChangelogProbe::new(&key(0));
    for (_, record_key, value, epoch) in &topic.0[..after_late_end] {
        probe.record(record_key, value.as_deref(), *epoch);
    }
    assert_eq!(probe.finished_offset(), Some(Some(5)));
    assert_eq!(probe.epoch(), Some(b_epoch));

    // Compacted, A's late records replaced B's earlier ones of the same keys: left alone of
    // their keys, they are applied rather than lose the keys, and B's last end marker stands.
    let compacted_dir = tempfile::tempdir().expect("tempdir");
    let compacted = Store::open(compacted_dir.path(), &plan, &options()).expect("open");
    restore(&compacted, &topic.compacted(), 0);
    let keys = |store: &Store| -> Vec<(&'static str, Vec<u8>)> {
        dump(store, 0)
            .into_iter()
            .map(|(family, key, _)| (family, key))
            .collect()
    };
    assert_eq!(keys(&compacted), keys(&b));
    assert_eq!(
        compacted.stored_next_offset(&key(0)).expect("offset"),
        Some(6)
    );
}

#[test]
fn records_without_an_epoch_are_never_fenced_off() {
    // An nsm before epochs writes without them: during an upgrade it may take a partition
    // from one that writes with them, and its writes must count.
    let plan = plan_from(CONFIG);
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut topic = Topic::default();
    let new = Store::open(dirs[0].path(), &plan, &options()).expect("open");
    let (adoption, _) = new
        .prepare_keyed_adoption(&key(0), &[], false, new_epoch(&new, None))
        .expect("adopt");
    send_and_commit(&new, &mut topic, adoption);
    send_and_commit(
        &new,
        &mut topic,
        checkpoint_of(&new, &plan, 0, &messages(&["ana", "bo"], 1)),
    );

    let old = Store::open(dirs[1].path(), &plan, &options()).expect("open");
    restore(&old, &topic, 0);
    let write = checkpoint_of(&old, &plan, 2, &messages(&["cy"], 2));
    let part = &write.partitions[0];
    old.each_record(part, |key, value| {
        topic.append(key, value, None);
        Ok::<_, StateError>(())
    })
    .expect("records");
    topic.append(&part.end.key, part.end.value.as_deref(), None);
    old.commit_keyed(write, &[]).expect("commit");

    let copy = Store::open(dirs[2].path(), &plan, &options()).expect("open");
    let RestoreOutcome::Restored { fenced, .. } = restore(&copy, &topic, 0) else {
        panic!("one pass");
    };
    assert_eq!(fenced, 0);
    assert_eq!(values_of(&copy, &plan), values_of(&old, &plan));
    assert_eq!(copy.stored_next_offset(&key(0)).expect("offset"), Some(3));
}

#[test]
fn a_format_3_store_keeps_its_trailing_counts_and_becomes_format_4() {
    let plan = plan_with_input(
        "name = \"users_2h\"\nowner = \"team\"\nkind = \"distinct\"\nfield = \"user_id\"\nwhere = { event = \"message_sent\" }\ntrailing = \"2h\"",
    );
    let trailing = plan.metric_index("users_2h").expect("trailing metric");
    assert_ne!(
        plan.fingerprint(trailing),
        plan.format_3_fingerprint(trailing),
        "a format-3 nsm must not take format 4's occurrences for its own"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = write_events(
        dir.path(),
        &plan,
        &[
            event("message_sent", "ana", 1),
            event("message_sent", "bo", 20),
        ],
    );
    // As format 3 left it: its version, and its fingerprint for the trailing count.
    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
    let mut fingerprint_key = partition_prefix(&key(0));
    fingerprint_key.extend_from_slice(b"users_2h");
    let mut batch = WriteBatch::default();
    batch.put_cf(
        store.cf(CF_FINGERPRINTS),
        &fingerprint_key,
        plan.format_3_fingerprint(trailing),
    );
    batch.put_cf(
        store.cf(CF_META),
        format::FORMAT_VERSION_KEY,
        3u32.to_be_bytes(),
    );
    store.db.write(batch).expect("write");
    drop(store);
    move_entries_to_format(dir.path(), 6);

    let store = Store::open(dir.path(), &plan, &options()).expect("a format 3 store opens");
    assert_eq!(stored_version(&store), FORMAT_VERSION);
    assert!(
        adopt(&store, 0, &[]).is_empty(),
        "format 3's trailing data is kept"
    );
    let stored = store
        .db
        .get_cf(store.cf(CF_FINGERPRINTS), &fingerprint_key)
        .expect("read")
        .expect("fingerprint");
    assert_eq!(stored, plan.fingerprint(trailing).as_bytes());
    let mut restored = engine_on(&store, &plan);
    restored.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    assert_eq!(restored.metric_values(NOW), expected);
    feed(&mut restored, 0, 2, &[event("message_sent", "ana", 50)]);
    assert_eq!(
        restored.metric_values(NOW)[trailing].current.value,
        AggValue::Distinct(2),
        "ana again, known from the stored state"
    );
}

#[test]
fn a_format_4_store_takes_its_newest_event_as_the_watermark_and_becomes_format_5() {
    let plan = plan_from(CONFIG);
    let dir = tempfile::tempdir().expect("tempdir");
    write_events(
        dir.path(),
        &plan,
        &[
            event("message_sent", "ana", 1),
            event("message_sent", "bo", 20),
        ],
    );
    // As format 4 left it: its version, and a meta record without a watermark.
    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
    let prefix = partition_prefix(&key(0));
    let meta = store
        .db
        .get_cf(store.cf(CF_PARTITIONS), &prefix)
        .expect("read")
        .expect("meta");
    let mut batch = WriteBatch::default();
    batch.put_cf(store.cf(CF_PARTITIONS), &prefix, &meta[..27]);
    batch.put_cf(
        store.cf(CF_META),
        format::FORMAT_VERSION_KEY,
        4u32.to_be_bytes(),
    );
    store.db.write(batch).expect("write");
    drop(store);
    move_entries_to_format(dir.path(), 6);

    let store = Store::open(dir.path(), &plan, &options()).expect("a format 4 store opens");
    assert_eq!(stored_version(&store), FORMAT_VERSION);
    let snapshot = store.load_partition(&key(0)).expect("load");
    let newest = NOW - 3_600_000 + 20 * 60_000;
    assert_eq!(snapshot.max_event_ms, Some(newest));
    assert_eq!(snapshot.event_watermark_ms, None);
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), snapshot);
    assert_eq!(engine.partition_status()[0].watermark_ms, Some(newest));
    assert_eq!(engine.partition_status()[0].next_offset, Some(2));
}

#[test]
fn windows_and_segments_are_read_only_in_a_range_of_starts_and_up_to_a_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan_with_input(
        "name = \"by_user\"\nowner = \"team\"\nkind = \"count\"\n\
         where = { event = \"message_sent\" }\nwindow = \"1h\"\nby = [\"user_id\"]",
    );
    // One message an hour for ten hours, each by another user.
    let events: Vec<Vec<u8>> = (0..10)
        .map(|hour| event("message_sent", &format!("u{hour}"), -540 + 60 * hour))
        .collect();
    write_events(dir.path(), &plan, &events);
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    let metric = plan.metric_index("by_user").expect("metric");
    let starts_of = |windows: &[StoredWindow]| -> Vec<i64> {
        windows.iter().map(|window| window.start_ms).collect()
    };

    let all = store
        .windows_in(&key(0), metric, i64::MIN..i64::MAX, usize::MAX)
        .expect("windows");
    let starts = starts_of(&all);
    assert_eq!(starts.len(), 10, "{all:?}");
    // The other hourly metric's windows are not among them.
    assert!(all.iter().all(|window| window.metric == metric));
    let between = store
        .windows_in(&key(0), metric, starts[2]..starts[5], usize::MAX)
        .expect("windows");
    assert_eq!(starts_of(&between), starts[2..5]);
    let limited = store
        .windows_in(&key(0), metric, starts[2] - 1..i64::MAX, 2)
        .expect("windows");
    assert_eq!(starts_of(&limited), starts[2..4]);

    let segments = store
        .segments(&key(0), metric, starts[2]..starts[5])
        .expect("segments");
    let segment_starts: Vec<i64> = segments.iter().map(|segment| segment.start_ms).collect();
    assert_eq!(segment_starts, starts[2..5], "one user's segment an hour");
}

#[test]
fn baselines_survive_a_restart_and_windows_of_format_5_give_none() {
    let plan = plan_from(CONFIG);
    let dir = tempfile::tempdir().expect("tempdir");
    let week = 7 * 24 * 60;
    // Last week, two hours before the same elapsed point, and now.
    let expected = write_events(
        dir.path(),
        &plan,
        &[
            event("payment", "ana", -week - 120),
            event("message_sent", "ana", -week - 119),
            event("payment", "bo", -week - 118),
            event("payment", "cy", 30),
            event("message_sent", "bo", 31),
        ],
    );
    let revenue = plan.metric_index("revenue").expect("revenue");
    let baseline_of = |values: &[MetricValues], metric: usize| {
        let values = values.iter().find(|values| values.metric == metric);
        values.and_then(|values| values.baseline.clone())
    };
    let baseline = baseline_of(&expected, revenue).expect("a weekly baseline");
    assert_eq!(baseline.value(), 5.0, "{baseline:?}");

    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
    let mut restored = engine_on(&store, &plan);
    restored.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    assert_eq!(restored.metric_values(NOW), expected);

    // As format 5 left it: windows without records, its version and fingerprints.
    let mut batch = WriteBatch::default();
    for item in store
        .db
        .iterator_cf(store.cf(CF_WINDOWS), IteratorMode::Start)
    {
        let (key, value) = item.expect("read");
        let (end_ms, value, _) = decode_window_record(&value).expect("a window");
        batch.put_cf(
            store.cf(CF_WINDOWS),
            key,
            encode_window_value(end_ms, value),
        );
    }
    for (index, metric) in plan.metrics().iter().enumerate() {
        let mut fingerprint_key = partition_prefix(&key(0));
        fingerprint_key.extend_from_slice(metric.name.as_bytes());
        let fingerprint = plan.format_3_fingerprint(index);
        batch.put_cf(store.cf(CF_FINGERPRINTS), fingerprint_key, fingerprint);
    }
    batch.put_cf(
        store.cf(CF_META),
        format::FORMAT_VERSION_KEY,
        5u32.to_be_bytes(),
    );
    store.db.write(batch).expect("write");
    drop((store, restored));
    move_entries_to_format(dir.path(), 6);

    let store = Store::open(dir.path(), &plan, &options()).expect("a format 5 store opens");
    assert_eq!(stored_version(&store), FORMAT_VERSION);
    assert!(adopt(&store, 0, &[]).is_empty(), "format 5 data is kept");
    let snapshot = store.load_partition(&key(0)).expect("load");
    assert!(snapshot
        .windows
        .iter()
        .all(|window| window.progress.is_none()));
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), snapshot);
    let values = engine.metric_values(NOW);
    assert_eq!(
        baseline_of(&values, revenue),
        None,
        "no record, no baseline"
    );
    let current = |values: &[MetricValues]| -> Vec<AggValue> {
        values.iter().map(|values| values.current.value).collect()
    };
    assert_eq!(current(&values), current(&expected));
}

/// The format version a store holds.
fn stored_version(store: &Store) -> u32 {
    let bytes = store
        .db
        .get_cf(store.cf(CF_META), format::FORMAT_VERSION_KEY)
        .expect("read")
        .expect("version");
    u32::from_be_bytes(bytes.try_into().expect("4 bytes"))
}

/// Moves a closed store's member entries back to where an older format kept them, as an nsm
/// of that format left them (the caller sets the version): format 6's `members`, keyed by the
/// entry's bytes, or format 7's `entries`, by its shard then its bytes.
fn move_entries_to_format(path: &Path, version: u32) {
    let (family, of_format_7) = match version {
        6 => (CF_MEMBERS, false),
        7 => (CF_SHARDED_ENTRIES, true),
        _ => unreachable!("formats 6 and 7 only"),
    };
    let mut options = rocksdb::Options::default();
    options.create_missing_column_families(true);
    let mut families = DB::list_cf(&options, path).expect("families");
    families.push(family.to_string());
    let db = DB::open_cf(&options, path, &families).expect("open");
    let entries = db.cf_handle(CF_ENTRIES).expect("entries");
    let older = db.cf_handle(family).expect("older entries");
    let mut batch = WriteBatch::default();
    for item in db.iterator_cf(entries, IteratorMode::Start) {
        let (key, value) = item.expect("read");
        let older_key = if of_format_7 {
            format_7_key(&key)
        } else {
            keyed::legacy_member_key(&key).expect("a member key written by the test")
        };
        batch.put_cf(older, older_key, value);
        batch.delete_cf(entries, key);
    }
    db.write(batch).expect("write");
}

/// Format 7's key of a stored member key (format 8) whose entry the test wrote: its place, its
/// shard, then the rest of the entry.
fn format_7_key(key: &[u8]) -> Vec<u8> {
    let legacy = keyed::legacy_member_key(key).expect("a member key written by the test");
    let place = codec::member_shard_position(key).expect("a member key");
    let shard = codec::stored_member_shard(key).expect("a member key");
    [&key[..place], &shard.to_be_bytes(), &legacy[place..]].concat()
}

/// Opens a closed store as RocksDB alone, with every family it has.
fn raw_db(path: &Path) -> DB {
    let options = rocksdb::Options::default();
    let families = DB::list_cf(&options, path).expect("families");
    DB::open_cf(&options, path, &families).expect("open")
}

fn set_raw_version(path: &Path, version: u32) {
    let db = raw_db(path);
    let meta = db.cf_handle(CF_META).expect("meta");
    db.put_cf(meta, format::FORMAT_VERSION_KEY, version.to_be_bytes())
        .expect("version");
}

/// Every kind of member entry: distinct members, trailing occurrences, conversion funnels
/// (keyed by period) and event ids.
fn every_entry_plan() -> Plan {
    let text = format!(
        "{CONFIG}[[guardrails]]\nname = \"paid_after_messaging\"\nkind = \"conversion\"\n\
         from = {{ event = \"message_sent\" }}\nwhere = {{ event = \"payment\" }}\n\
         within = \"30m\"\nwindow = \"1d\"\n"
    )
    .replace("[time]", "[events]\ndedup_horizon = \"10m\"\n[time]")
    .replace(
        "[[inputs]]",
        "[[inputs]]\nname = \"users_2h\"\nowner = \"team\"\nkind = \"distinct\"\n\
         field = \"user_id\"\nwhere = { event = \"message_sent\" }\ntrailing = \"2h\"\n\n[[inputs]]",
    );
    plan_from(&text)
}

fn every_entry_events() -> Vec<Vec<u8>> {
    vec![
        event("payment", "ana", 20),
        event("message_sent", "bo", 5),
        with_id("x", 16),
        with_id("y", 17),
        event("message_sent", "cy", 8),
        event("payment", "bo", 9),
    ]
}

fn stored_entries(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .db
        .iterator_cf(store.cf(CF_ENTRIES), IteratorMode::Start)
        .map(|item| {
            let (key, value) = item.expect("read");
            (key.to_vec(), value.to_vec())
        })
        .collect()
}

#[test]
fn stores_of_formats_6_and_7_are_rewritten_in_format_8_and_show_the_same_values() {
    let plan = every_entry_plan();
    for version in [6, 7] {
        let dir = tempfile::tempdir().expect("tempdir");
        let expected = write_events(dir.path(), &plan, &every_entry_events());
        let before = stored_entries(&Store::open(dir.path(), &plan, &options()).expect("open"));
        assert!(
            before
                .iter()
                .any(|(key, _)| key.windows(20).any(|name| name == b"paid_after_messaging")),
            "funnel entries are among them"
        );
        move_entries_to_format(dir.path(), version);
        set_raw_version(dir.path(), version);

        let store = Store::open(dir.path(), &plan, &options()).expect("an older store opens");
        assert_eq!(stored_version(&store), FORMAT_VERSION);
        for older in [CF_MEMBERS, CF_SHARDED_ENTRIES] {
            assert!(store.db.cf_handle(older).is_none(), "{older} dropped");
        }
        assert_eq!(stored_entries(&store), before, "format {version}");
        assert!(
            adopt(&store, 0, &[]).is_empty(),
            "the older format's data is kept"
        );
        assert_eq!(values_of(&store, &plan), expected);
        // Entries read one at a time are found: ana's pending payment converts.
        let mut engine = engine_on(&store, &plan);
        engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
        let conversion = plan.metric_index("paid_after_messaging").expect("metric");
        assert_eq!(
            engine.metric_values(NOW)[conversion].current.value,
            AggValue::Distinct(1),
            "bo converted"
        );
        feed(&mut engine, 0, 6, &[event("message_sent", "ana", 10)]);
        assert_eq!(
            engine.metric_values(NOW)[conversion].current.value,
            AggValue::Distinct(2),
            "ana's payment, stored before her message, converts"
        );
        assert!(matches!(
            engine.apply(&key(0), 7, &with_id("y", 17), NOW),
            Outcome::Duplicate { .. }
        ));
    }
}

/// A stored member key's place as the member index names it: metric, window start and funnel
/// period; then its digest.
fn place_and_digest(store: &Store, key: &[u8]) -> ((usize, i64, u64), u128) {
    let at = codec::member_shard_position(key).expect("a member key");
    let (_, rest) = codec::split_partition_prefix(key).expect("a partition");
    let separator = rest
        .iter()
        .position(|byte| *byte == 0)
        .expect("a metric name");
    let name = std::str::from_utf8(&rest[..separator]).expect("a name");
    // Event ids are kept under the metric index past the last, with no name.
    let metric = store
        .metric_names
        .iter()
        .position(|known| known == name)
        .unwrap_or(store.metric_names.len());
    let start = codec::decode_i64(rest[separator + 1..separator + 9].try_into().expect("8"));
    let window_end = key.len() - rest.len() + separator + 9;
    let period = match &key[window_end..at] {
        [] => 0,
        period => u64::from_be_bytes(period.try_into().expect("a funnel period of 8 bytes")),
    };
    let digest = u128::from_be_bytes(key[at..].try_into().expect("16 bytes of digest"));
    ((metric, start, period), digest)
}

/// A page: metric, window start, funnel period, checkpoint shard.
type PageName = (usize, i64, u64, u16);

#[test]
fn a_page_read_whole_holds_exactly_the_stored_entries_of_its_shard_of_a_place() {
    let plan = every_entry_plan();
    let dir = tempfile::tempdir().expect("tempdir");
    write_events(dir.path(), &plan, &every_entry_events());
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut pages: BTreeMap<PageName, Vec<(u128, Vec<u8>)>> = BTreeMap::new();
    for (key, value) in stored_entries(&store) {
        let ((metric, start, period), digest) = place_and_digest(&store, &key);
        let shard = nsm_core::engine::member_shard_of(digest);
        pages
            .entry((metric, start, period, shard))
            .or_default()
            .push((digest, value));
    }
    let funnel = plan.metric_index("paid_after_messaging").expect("metric");
    assert!(
        pages.keys().any(|(metric, ..)| *metric == funnel),
        "funnel periods are among the pages"
    );
    assert!(pages.len() > 5, "entries of several places: {pages:?}");
    for ((metric, start, period, shard), mut expected) in pages.clone() {
        let mut read = store
            .member_page(&key(0), metric, start, period, shard)
            .expect("read");
        read.sort();
        expected.sort();
        assert_eq!(
            read, expected,
            "page {shard} of {metric} at {start} ({period})"
        );
        // The pages beside it in the same place hold only their own entries.
        for beside in [shard.wrapping_sub(1), shard + 1] {
            if beside < MEMBER_SHARDS && !pages.contains_key(&(metric, start, period, beside)) {
                let read = store
                    .member_page(&key(0), metric, start, period, beside)
                    .expect("read");
                assert!(read.is_empty(), "page {beside} beside {shard}: {read:?}");
            }
        }
        // Another partition's page of the same place holds nothing.
        let other = store
            .member_page(&key(1), metric, start, period, shard)
            .expect("read");
        assert!(other.is_empty());
    }
}

#[test]
fn a_migration_cut_short_starts_over() {
    let plan = every_entry_plan();
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = write_events(dir.path(), &plan, &every_entry_events());
    let before = stored_entries(&Store::open(dir.path(), &plan, &options()).expect("open"));
    move_entries_to_format(dir.path(), 7);
    // Cut short: some entries copied, one of them changed since, one of a metric gone; the
    // version still 7.
    {
        let db = raw_db(dir.path());
        let entries = db.cf_handle(CF_ENTRIES).expect("entries");
        db.put_cf(entries, &before[0].0, b"stale").expect("put");
        db.put_cf(entries, &before[1].0, &before[1].1).expect("put");
        db.put_cf(entries, b"events\0\0\0\0\0gone\0", b"")
            .expect("put");
    }
    set_raw_version(dir.path(), 7);

    let store = Store::open(dir.path(), &plan, &options()).expect("reopen");
    assert_eq!(stored_entries(&store), before);
    assert_eq!(values_of(&store, &plan), expected);
}

#[test]
fn changelog_records_keep_the_bytes_of_format_6() {
    let plan = every_entry_plan();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), PartitionSnapshot::default());
    feed(&mut engine, 0, 0, &every_entry_events());
    let changes = engine.take_changes();
    let prepared = store.prepare_keyed(&changes).expect("prepare");
    let records: Vec<Vec<u8>> = prepared.partitions[0]
        .records
        .iter()
        .filter(|record| record.key[0] == b'm')
        .map(|record| record.key.clone())
        .collect();
    // Format 6's key of every member the change set holds: the window key, then the entry.
    let prefix = partition_prefix(&key(0));
    let mut expected: Vec<Vec<u8>> = changes.partitions[0]
        .members
        .iter()
        .map(|member| {
            let name = plan
                .metrics()
                .get(member.metric)
                .map_or("", |m| m.name.as_str());
            let mut key = b"m".to_vec();
            key.extend_from_slice(&window_key(&prefix, name, member.start_ms));
            key.extend_from_slice(&member.member);
            key
        })
        .collect();
    expected.sort();
    assert!(expected.len() >= 6, "{expected:?}");
    assert_eq!(records, expected);
    // Ana's funnel key, spelled out: partition, metric, the funnel window, her period.
    let funnel = records
        .iter()
        .find(|key| key.windows(20).any(|name| name == b"paid_after_messaging"))
        .expect("a funnel record");
    let head = [
        &b"mevents\0\0\0\0\0paid_after_messaging\0"[..],
        &codec::encode_i64(i64::MIN),
    ]
    .concat();
    assert!(funnel.starts_with(&head), "{funnel:?}");
    // Restored into another store, they are its format 8 keys again.
    let mut topic = Topic::default();
    let positions = topic.send(&store, &prepared);
    store.commit_keyed(prepared, &positions).expect("commit");
    let copy_dir = tempfile::tempdir().expect("tempdir");
    let copy = Store::open(copy_dir.path(), &plan, &options()).expect("open");
    restore(&copy, &topic, 0);
    assert_eq!(stored_entries(&copy), stored_entries(&store));
}

/// Every row of partition 0 as frames carry them (family byte, key without the partition
/// prefix), with its shard, read from the whole store.
fn frame_rows_of(store: &Store) -> BTreeMap<Vec<u8>, (u16, Vec<u8>)> {
    let prefix = partition_prefix(&key(0));
    let mut rows = BTreeMap::new();
    for (byte, family) in changelog::FAMILIES {
        if family == CF_PARTITIONS {
            continue;
        }
        for item in store.entries_under(family, &prefix) {
            let (stored_key, value) = item.expect("read");
            let shard = if family == CF_ENTRIES {
                codec::stored_member_shard(&stored_key).expect("a member key")
            } else {
                AGGREGATE_SHARD
            };
            let row = [&[byte][..], &stored_key[prefix.len()..]].concat();
            rows.insert(row, (shard, value.to_vec()));
        }
    }
    rows
}

/// Every shard's snapshot of partition 0 once `write` is stored, read before it is.
fn snapshots_of(store: &Store, write: &FramedWrite) -> BTreeMap<Vec<u8>, (u16, Vec<u8>)> {
    let empty = WriteOverlay::default();
    let overlay = write.overlay(&key(0)).unwrap_or(&empty);
    let mut rows = BTreeMap::new();
    for shard in 0..=AGGREGATE_SHARD {
        store
            .shard_rows(&key(0), shard, overlay, |row, value| {
                let earlier = rows.insert(row.to_vec(), (shard, value.to_vec()));
                assert_eq!(earlier, None, "{row:?} twice");
            })
            .expect("shard rows");
    }
    rows
}

/// A round of events: the clock, and each event with its offset.
type Round = (i64, Vec<(i64, Vec<u8>)>);

/// Six rounds of 40 random events of 25 users (messages, payments, events with ids) and the
/// clock of each: five in the hour before [`NOW`], then one 40 days later, which expires every
/// window of the first. Each event with its offset.
fn random_rounds(seed: u64) -> Vec<Round> {
    let mut random = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = |bound: u64| {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random % bound
    };
    let mut offset = 0;
    (0..6)
        .map(|round| {
            let now = if round == 5 {
                NOW + 40 * 86_400_000
            } else {
                NOW
            };
            let events = (0..40)
                .map(|_| {
                    let user = format!("user-{}", next(25));
                    let minutes = 10 * round + next(10) as i64;
                    let time = now - 3_600_000 + minutes * 60_000;
                    let payload = match next(4) {
                        0 => format!(
                            r#"{{"event":"payment","user_id":"{user}","timestamp":{time},"amount":1}}"#
                        ),
                        1 => format!(
                            r#"{{"event_id":"id-{}","event":"message_sent","user_id":"{user}","timestamp":{time}}}"#,
                            next(30)
                        ),
                        _ => format!(
                            r#"{{"event":"message_sent","user_id":"{user}","timestamp":{time}}}"#
                        ),
                    };
                    offset += 1;
                    (offset - 1, payload.into_bytes())
                })
                .collect();
            (now, events)
        })
        .collect()
}

#[test]
fn a_shard_snapshot_is_the_store_after_the_batch_filtered_by_shard() {
    let plan = every_entry_plan();
    // A budget that keeps every entry in memory, and one so small that shards leave it.
    for (seed, budget) in (1..=4u64).zip([1 << 30, 1024, 1 << 30, 1024]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), &plan, &options()).expect("open");
        adopt(&store, 0, &[]);
        let mut engine = Engine::with_reader(plan.clone(), Box::new(store.clone()), budget);
        let loaded = store.load_partition(&key(0)).expect("load");
        assert!(loaded.no_stored_members, "a new partition");
        engine.restore_partition(key(0), loaded);
        // Rounds of events in the hour before the clock, then a round 40 days later, which
        // expires every window of the first (ranges deleted in the same write as its puts).
        for (round, (now, events)) in random_rounds(seed).into_iter().enumerate() {
            for (offset, payload) in events {
                let _ = engine.apply(&key(0), offset, &payload, now);
            }
            let every_shard = |_: &PartitionKey| (0..MEMBER_SHARDS).collect();
            let write = store.prepare_frames(&engine.take_changes_with_snapshots(every_shard));
            let ranges = write.overlay(&key(0)).map_or(0, |o| o.ranges().len());
            assert!(ranges > 0 || round < 5, "the last round expires windows");
            let snapshots = snapshots_of(&store, &write);
            let memory_shards: Vec<(u16, MemoryShard)> = (0..MEMBER_SHARDS)
                .filter_map(|shard| Some((shard, write.memory_shard(&key(0), shard)?.clone())))
                .collect();
            store.commit_framed(write).expect("commit");
            let stored = frame_rows_of(&store);
            let member_byte = changelog::family_byte(CF_ENTRIES);
            assert!(
                stored.keys().any(|row| row[0] == member_byte),
                "members stored"
            );
            let differing: Vec<_> = stored
                .iter()
                .filter(|(row, value)| snapshots.get(*row) != Some(value))
                .chain(
                    snapshots
                        .iter()
                        .filter(|(row, _)| !stored.contains_key(*row)),
                )
                .take(3)
                .collect();
            assert!(
                differing.is_empty(),
                "seed {seed}, round {round}: {differing:?}"
            );
            assert_eq!(snapshots.len(), stored.len());
            // Each member shard the engine holds whole is the store's. With room for every
            // entry (the partition started empty), that is every shard.
            if budget > 1024 {
                assert_eq!(memory_shards.len(), usize::from(MEMBER_SHARDS));
            }
            for (shard, memory) in &memory_shards {
                let shard = *shard;
                let read: Vec<_> = snapshots
                    .iter()
                    .filter(|(_, (number, _))| *number == shard)
                    .map(|(row, (_, value))| (row.clone(), value.clone()))
                    .collect();
                assert_eq!(
                    memory.rows, read,
                    "seed {seed}, round {round}, shard {shard}"
                );
            }
        }
        // After a restart the stored entries are not in memory: no shard comes from it.
        let mut restarted = engine_on(&store, &plan);
        let loaded = store.load_partition(&key(0)).expect("load");
        assert!(!loaded.no_stored_members);
        restarted.restore_partition(key(0), loaded);
        let later = NOW + 40 * 86_400_000;
        let payload = format!(r#"{{"event":"message_sent","user_id":"ana","timestamp":{later}}}"#);
        let outcome = restarted.apply(&key(0), 1_000, payload.as_bytes(), later);
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
        let changes = restarted.take_changes_with_snapshots(|_| (0..MEMBER_SHARDS).collect());
        assert!(changes.partitions[0].member_snapshots.is_empty());
    }
}
