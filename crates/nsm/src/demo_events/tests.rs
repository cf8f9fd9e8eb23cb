//! Each product's generated stream against the config that measures it: the stream holds
//! every event the config filters on, about the asked share of bad events, keys that keep
//! distinct counts exact, and, through the core engine, a non-zero value for every metric.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use clap::ValueEnum;
use nsm_core::engine::{Engine, Outcome, PartitionSnapshot, Plan};
use nsm_core::metric::{FieldPath, Filter, FilterField, Literal, MetricKind};
use nsm_core::reject::RejectReason;
use nsm_core::{Config, PartitionKey};
use serde_json::Value;

use super::*;

const EVENTS: usize = 2_000;
const BAD_SHARE: f64 = 0.03;
/// Wednesday 4 March 2026, 10:00 UTC. At one event a second the stream lasts 33 minutes and
/// stays inside one day and one week in every product's time zone, so the current window of
/// every metric holds all of it (late events, three hours older, too).
const START_MS: i64 = 1_772_618_400_000;
const PARTITIONS: i32 = 3;

fn config(product: Product) -> Config {
    Config::from_toml(product.config_text(), &|_| None)
        .unwrap_or_else(|errors| panic!("{}: {errors}", product.config_file()))
}

/// `EVENTS` events of `product`, one a second from `START_MS`, with their send times.
fn stream(product: Product) -> Vec<(i64, GeneratedEvent)> {
    let mut generator = EventGenerator::new(GeneratorOptions {
        product,
        topic: product.topic().into(),
        rate: 1,
        count: None,
        users: 5_000,
        seed: 7,
        bad_share: BAD_SHARE,
        scenario: None,
        scenario_period: Duration::ZERO,
        clock: crate::clock::EventClock::wall(),
        history: std::time::Duration::ZERO,
    });
    (0..EVENTS as i64)
        .map(|second| {
            let time_ms = START_MS + second * 1_000;
            (time_ms, generator.next_event(time_ms))
        })
        .collect()
}

fn parse(event: &GeneratedEvent) -> Option<Value> {
    serde_json::from_str(&event.payload).ok()
}

fn lookup<'a>(event: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    path.segments()
        .iter()
        .try_fold(event, |value, segment| value.get(segment))
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The event names a filter accepts, or `None` when it accepts every name.
fn event_names(filter: &Filter) -> Option<BTreeSet<String>> {
    filter
        .clauses
        .iter()
        .find(|clause| clause.field == FilterField::EventName)
        .map(|clause| {
            clause
                .any_of
                .iter()
                .filter_map(|literal| match literal {
                    Literal::Text(name) => Some(name.clone()),
                    _ => None,
                })
                .collect()
        })
}

#[test]
fn every_product_has_its_config_and_topic() {
    for &product in Product::value_variants() {
        let config = config(product);
        assert_eq!(config.kafka.topics, vec![product.topic().to_string()]);
        let on_disk = std::fs::read_to_string(format!(
            "{}/../../{}",
            env!("CARGO_MANIFEST_DIR"),
            product.config_file()
        ))
        .expect("the config file");
        assert_eq!(on_disk, product.config_text(), "{}", product.config_file());
        assert!(
            config.metrics.len() >= 6,
            "{product:?}: {:?}",
            config.metrics
        );
    }
}

/// The mix, the bad share, the timestamp formats and the keys of one product's stream.
fn check_stream(product: Product) {
    let config = config(product);
    let events = stream(product);

    // About the asked share is deliberately bad, in all three ways, and each is what it says.
    let flawed: Vec<Flaw> = events.iter().filter_map(|(_, event)| event.flaw).collect();
    let share = flawed.len() as f64 / EVENTS as f64;
    assert!(
        (0.02..=0.04).contains(&share),
        "{product:?}: bad share {share} for {BAD_SHARE}"
    );
    for flaw in [Flaw::Truncated, Flaw::WrongType, Flaw::Late] {
        assert!(flawed.contains(&flaw), "{product:?}: no {flaw:?} event");
    }
    for (time_ms, event) in &events {
        let parsed = parse(event);
        match event.flaw {
            Some(Flaw::Truncated) => assert!(parsed.is_none(), "{}", event.payload),
            Some(Flaw::Late) => {
                let parsed = parsed.expect("a late event is valid JSON");
                let stamped = parsed["timestamp"]
                    .as_i64()
                    .or_else(|| {
                        let text = parsed["timestamp"].as_str()?;
                        Some(text.parse::<jiff::Timestamp>().ok()?.as_millisecond())
                    })
                    .expect("a timestamp");
                assert_eq!(stamped, time_ms - LATE_BY_MS);
            }
            _ => assert!(
                parsed.is_some_and(|event| event.is_object()),
                "{}",
                event.payload
            ),
        }
    }

    // Every event the config filters on occurs, several times.
    let mut mix: BTreeMap<String, usize> = BTreeMap::new();
    let valid: Vec<(&GeneratedEvent, Value)> = events
        .iter()
        .filter(|(_, event)| event.flaw.is_none())
        .filter_map(|(_, event)| Some((event, parse(event)?)))
        .collect();
    assert_eq!(valid.len(), EVENTS - flawed.len(), "{product:?}");
    for (_, event) in &valid {
        *mix.entry(text(&event["event"])).or_default() += 1;
    }
    for metric in &config.metrics {
        for name in event_names(&metric.filter).unwrap_or_default() {
            let seen = mix.get(&name).copied().unwrap_or(0);
            assert!(
                seen >= 5,
                "{product:?}: {name:?} (metric {}) occurs {seen} times in {mix:?}",
                metric.name
            );
        }
    }

    // Half the timestamps are RFC 3339 text, half epoch milliseconds.
    let text_timestamps = valid
        .iter()
        .filter(|(_, event)| event["timestamp"].is_string())
        .count();
    let text_share = text_timestamps as f64 / valid.len() as f64;
    assert!(
        (0.45..=0.55).contains(&text_share),
        "{product:?}: {text_share}"
    );

    // Each entity a distinct metric counts is always sent under one Kafka key, so it stays in
    // one partition and the summed distinct count is exact.
    for metric in &config.metrics {
        let MetricKind::Distinct { field } = &metric.kind else {
            continue;
        };
        let mut keys: HashMap<String, HashSet<&str>> = HashMap::new();
        for (generated, event) in &valid {
            if let Some(entity) = lookup(event, field) {
                keys.entry(text(entity))
                    .or_default()
                    .insert(generated.key.as_str());
            }
        }
        assert!(!keys.is_empty(), "{product:?}: no event has {field}");
        for (entity, entity_keys) in keys {
            assert_eq!(
                entity_keys.len(),
                1,
                "{product:?}: {field} {entity} is sent under keys {entity_keys:?}"
            );
        }
    }
}

#[test]
fn the_chatbot_stream_matches_its_config() {
    check_stream(Product::Chatbot);
}

#[test]
fn the_collaboration_stream_matches_its_config() {
    check_stream(Product::Collaboration);
}

#[test]
fn the_marketplace_stream_matches_its_config() {
    check_stream(Product::Marketplace);
}

fn partition_of(key: &str) -> i32 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % PARTITIONS as u64) as i32
}

/// Runs one product's stream through the core engine, partitioned by key as Kafka would, and
/// checks that the engine rejects exactly the bad events, that every metric it reports is
/// non-zero, and that distinct counts summed over partitions equal a count over the whole
/// stream.
fn check_through_the_engine(product: Product) {
    let config = config(product);
    let plan = Plan::from_config(&config);
    let mut engine = Engine::new(plan);
    let topic = product.topic();
    for partition in 0..PARTITIONS {
        engine.restore_partition(
            PartitionKey::new(topic, partition),
            PartitionSnapshot::default(),
        );
    }
    let events = stream(product);
    let now_ms = START_MS + EVENTS as i64 * 1_000;
    let mut offsets = [0i64; PARTITIONS as usize];
    let mut on_time_seen = [false; PARTITIONS as usize];
    let mut applied: Vec<Value> = Vec::new();
    for (_, event) in &events {
        let partition = partition_of(&event.key);
        let index = partition as usize;
        let outcome = engine.apply(
            &PartitionKey::new(topic, partition),
            offsets[index],
            event.payload.as_bytes(),
            now_ms,
        );
        offsets[index] += 1;
        let expected = match event.flaw {
            None => None,
            Some(Flaw::Truncated) => Some(RejectReason::InvalidJson),
            Some(Flaw::WrongType) => Some(RejectReason::WrongType),
            // Late only behind an on-time event of its partition: before one, nothing is
            // ahead of it.
            Some(Flaw::Late) if on_time_seen[index] => Some(RejectReason::Late),
            Some(Flaw::Late) => None,
        };
        match (&outcome, expected) {
            (Outcome::Applied { .. }, None) => {
                applied.push(parse(event).expect("an applied event is JSON"));
            }
            (Outcome::Rejected(rejection), Some(reason)) if rejection.reason == reason => {}
            _ => panic!(
                "{product:?}: expected {expected:?}, got {outcome:?} for {}",
                event.payload
            ),
        }
        on_time_seen[index] |= event.flaw.is_none();
    }

    let metrics = engine.plan().metrics().to_vec();
    let values = engine.metric_values(now_ms);
    assert!(
        !values.is_empty(),
        "{product:?}: the engine reports nothing"
    );
    for value in &values {
        let metric = &metrics[value.metric];
        let current = value.current.value.to_f64();
        assert!(
            current > 0.0,
            "{product:?}: {} is {current}: the stream never feeds it",
            metric.name
        );
        // A distinct count summed over partitions equals the count over the whole stream.
        if let MetricKind::Distinct { field } = &metric.kind {
            let names = event_names(&metric.filter);
            assert!(
                metric
                    .filter
                    .clauses
                    .iter()
                    .all(|clause| clause.field == FilterField::EventName),
                "this check only knows event-name filters: {}",
                metric.name
            );
            let members: HashSet<String> = applied
                .iter()
                .filter(|event| {
                    names
                        .as_ref()
                        .is_none_or(|names| names.contains(&text(&event["event"])))
                })
                .filter_map(|event| lookup(event, field).map(text))
                .collect();
            assert_eq!(
                current,
                members.len() as f64,
                "{product:?}: {} over {PARTITIONS} partitions",
                metric.name
            );
        }
    }
}

#[test]
fn the_chatbot_stream_feeds_every_metric_of_its_config() {
    check_through_the_engine(Product::Chatbot);
}

#[test]
fn the_collaboration_stream_feeds_every_metric_of_its_config() {
    check_through_the_engine(Product::Collaboration);
}

#[test]
fn the_marketplace_stream_feeds_every_metric_of_its_config() {
    check_through_the_engine(Product::Marketplace);
}
