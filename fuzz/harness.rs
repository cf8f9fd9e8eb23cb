//! The hostile-input harness shared by the fuzz target (`fuzz/fuzz_targets/apply.rs`, nightly,
//! `make fuzz`) and the seed-corpus replay test on stable (`crates/nsm-core/tests/hostile.rs`).
//!
//! One input is a stream of messages separated by `\n` (JSON needs no raw newline, so a
//! message loses nothing but that byte), applied in order to one partition of an engine built
//! from a realistic config with every metric kind. After each message the harness checks, with
//! its own independent reading of the JSON (serde_json's `Value`), that:
//! - nothing panics (the fuzzer's own check);
//! - a rejected event or a duplicate changes no window, member, segment, event id or funnel,
//!   nor the partition's event time, and leaves every exported value as it was;
//! - an applied event is UTF-8 JSON within `events.max_bytes`, an object with a string name and
//!   the event time the engine reports; a `message_sent` adds exactly 1 to its hour's count
//!   and any other event none; a `payment_succeeded` adds exactly its amount to revenue;
//! - a distinct count always equals the number of members stored for its window, and no
//!   member is stored twice.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use nsm_core::decimal::Decimal;
use nsm_core::engine::{
    last_occurrence_bucket, AggValue, Engine, Outcome, PartitionChanges, PartitionSnapshot, Plan,
};
use nsm_core::metric::MetricKind;
use nsm_core::reject::RejectReason;
use nsm_core::{Config, PartitionKey};
use serde_json::Value;

/// The wall clock of every run: noon UTC on the day Central European Summer Time ends (2026-10-25),
/// so day and hour windows around a DST change are in reach of the retention.
pub const NOW_MS: i64 = 1_792_929_600_000;

/// A realistic config: a weekly distinct North Star, hourly counts, a revenue sum with a
/// breakdown, a threshold, a conversion, a retention, a ratio, a trailing distinct count and a
/// trailing threshold.
pub const CONFIG: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
topics = ["product-events"]
[events]
max_bytes = "4KiB"
[time]
zone = "Europe/Berlin"
allowed_lateness = "1h"
max_future_skew = "1h"
[state]
retention = "35d"
[north_star]
name = "weekly_active_messagers"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1w"
[[inputs]]
name = "messages_sent"
owner = "messaging"
kind = "count"
where = { event = "message_sent" }
window = "1h"
[[inputs]]
name = "active_teams"
owner = "collaboration"
kind = "threshold"
entity = "team_id"
field = "user_id"
at_least = 2
where = { event = "message_sent" }
window = "1d"
[[inputs]]
name = "active_teams_7d"
owner = "collaboration"
kind = "threshold"
entity = "team_id"
field = "user_id"
at_least = 2
where = { event = "message_sent" }
trailing = "7d"
[[inputs]]
name = "activated"
owner = "onboarding"
kind = "conversion"
from = { event = "onboarding_completed" }
where = { event = "message_sent" }
within = "1d"
window = "1d"
[[inputs]]
name = "returning_messagers"
owner = "retention"
kind = "retention"
of = "weekly_active_messagers"
[[inputs]]
name = "revenue_per_messager"
owner = "growth"
kind = "ratio"
numerator = "revenue"
denominator = "weekly_active_messagers"
[[guardrails]]
name = "daily_actives"
owner = "growth"
kind = "distinct"
field = "user_id"
trailing = "24h"
[revenue]
name = "revenue"
kind = "sum"
field = "properties.amount"
where = { event = "payment_succeeded", "properties.currency" = ["EUR", "USD"] }
window = "1w"
by = ["properties.plan"]
top = 3
"#;

/// Runs one fuzz input: every `\n`-separated message in order.
pub fn run(data: &[u8]) {
    let mut harness = Harness::new();
    for message in data.split(|byte| *byte == b'\n') {
        harness.feed(message);
    }
}

/// An engine with one partition, and what the harness knows of its state.
pub struct Harness {
    engine: Engine,
    key: PartitionKey,
    offset: i64,
    max_event_ms: Option<i64>,
    max_bytes: usize,
    /// The last stored value of each window, by (metric, start).
    windows: HashMap<(usize, i64), AggValue>,
    /// Stored members by window, for metrics without a breakdown.
    members: HashMap<(usize, i64), HashSet<Box<[u8]>>>,
    messages: usize,
    revenue: usize,
    /// Metrics whose value is the number of their stored members.
    counted_by_members: Vec<usize>,
    /// Trailing metrics, whose stored members are occurrences per step bucket.
    trailing: Vec<usize>,
    /// Every metric's exported values after the last message, as text (a ratio of 0/0 is NaN,
    /// which equals nothing as a float).
    values: String,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        // Parsing the config and the time zone takes far longer than an input: once per process.
        static PLAN: OnceLock<Plan> = OnceLock::new();
        let plan = PLAN
            .get_or_init(|| {
                let config =
                    Config::from_toml(CONFIG, &|_| None).expect("the harness config is valid");
                Plan::from_config(&config)
            })
            .clone();
        let index = |name: &str| plan.metric_index(name).expect("metric in the config");
        let counted_by_members = plan
            .metrics()
            .iter()
            .enumerate()
            .filter(|(_, metric)| {
                metric.segments.is_none()
                    && matches!(
                        metric.kind,
                        MetricKind::Distinct { .. } | MetricKind::Conversion { .. }
                    )
            })
            .map(|(index, _)| index)
            .collect();
        let trailing = plan
            .metrics()
            .iter()
            .enumerate()
            .filter(|(_, metric)| metric.trailing.is_some())
            .map(|(index, _)| index)
            .collect();
        let messages = index("messages_sent");
        let revenue = index("revenue");
        let max_bytes = plan.settings().max_event_bytes;
        let mut engine = Engine::new(plan);
        let key = PartitionKey::new("product-events", 0);
        engine.restore_partition(key.clone(), PartitionSnapshot::default());
        let values = format!("{:?}", engine.metric_values(NOW_MS));
        Harness {
            values,
            engine,
            key,
            offset: 0,
            max_event_ms: None,
            max_bytes,
            windows: HashMap::new(),
            members: HashMap::new(),
            messages,
            revenue,
            counted_by_members,
            trailing,
        }
    }

    /// Applies one message and checks every invariant; panics on a violation.
    pub fn feed(&mut self, payload: &[u8]) -> Outcome {
        let outcome = self.engine.apply(&self.key, self.offset, payload, NOW_MS);
        let mut changes = self.engine.take_changes().partitions;
        assert!(changes.len() <= 1, "one partition, one change entry");
        let changes = changes.pop().expect("an applied offset is always a change");
        assert_eq!(
            changes.next_offset,
            Some(self.offset + 1),
            "the offset moves"
        );
        self.offset += 1;
        let reference = Reference::read(payload);
        let values = format!("{:?}", self.engine.metric_values(NOW_MS));
        let values_before = std::mem::replace(&mut self.values, values);
        match &outcome {
            Outcome::Rejected(rejection) => {
                assert_unchanged(&changes, self.max_event_ms, &outcome);
                assert_eq!(values_before, self.values, "a rejection changed values");
                self.check_rejection(rejection.reason, payload, &reference);
            }
            Outcome::Duplicate { .. } => {
                assert_unchanged(&changes, self.max_event_ms, &outcome);
                assert_eq!(values_before, self.values, "a duplicate changed values");
                let object = reference.object().expect("a duplicate is a valid event");
                assert!(
                    object.get("event_id").is_some_and(|id| !id.is_null()),
                    "a duplicate without an event id"
                );
            }
            Outcome::Applied { event_time_ms, .. } => {
                assert!(payload.len() <= self.max_bytes, "oversize event applied");
                self.check_applied(*event_time_ms, payload, &reference, &changes);
                self.max_event_ms = Some(
                    self.max_event_ms
                        .map_or(*event_time_ms, |max| max.max(*event_time_ms)),
                );
                assert_eq!(changes.max_event_ms, self.max_event_ms, "event time");
            }
            Outcome::AlreadyApplied | Outcome::Resent => {
                panic!("a new offset of an input partition reported as already applied")
            }
            Outcome::StateUnreadable(error) => panic!("in-memory state failed to read: {error}"),
        }
        self.record(&changes);
        outcome
    }

    fn check_rejection(&self, reason: RejectReason, payload: &[u8], reference: &Reference) {
        match reason {
            RejectReason::Oversize => assert!(payload.len() > self.max_bytes),
            RejectReason::InvalidJson => assert!(
                !matches!(reference, Reference::Object(_, Quirks::NONE)),
                "valid JSON without repeated keys or surrogates rejected as invalid_json: \
                 {reference:?}"
            ),
            RejectReason::NotAnObject => assert!(
                matches!(reference, Reference::Other | Reference::Unreadable),
                "an object rejected as not_an_object"
            ),
            RejectReason::MissingEventName => {
                if let Some(object) = reference.object() {
                    assert!(object.get("event").is_none_or(Value::is_null));
                }
            }
            _ => {}
        }
        if reason != RejectReason::Oversize {
            assert!(payload.len() <= self.max_bytes, "oversize checked first");
        }
    }

    fn check_applied(
        &self,
        event_time_ms: i64,
        payload: &[u8],
        reference: &Reference,
        changes: &PartitionChanges,
    ) {
        assert!(
            (NOW_MS - 35 * 86_400_000..=NOW_MS + 3_600_000).contains(&event_time_ms),
            "event time {event_time_ms} outside the retention and the future skew"
        );
        let object = match reference {
            // Repeated keys the engine does not read are harmless; repeated ones it reads are
            // rejected, or the name and time checks below would disagree with `Value`.
            Reference::Object(object, _) => object,
            // The engine skips what it does not read, however deep or large.
            Reference::Unreadable => return,
            other => panic!(
                "the engine applied what is not a JSON object ({other:?}): {}",
                String::from_utf8_lossy(payload)
            ),
        };
        let name = object
            .get("event")
            .and_then(Value::as_str)
            .expect("an applied event has a string name");
        match object.get("timestamp") {
            Some(Value::Number(number)) => {
                assert_eq!(number.as_i64(), Some(event_time_ms), "epoch millis")
            }
            Some(Value::String(text)) => {
                let parsed: jiff::Timestamp = text.parse().expect("RFC 3339");
                assert_eq!(parsed.as_millisecond(), event_time_ms, "RFC 3339 time");
            }
            other => panic!("applied with timestamp {other:?}"),
        }

        let upserts = |metric: usize| {
            changes
                .upserts
                .iter()
                .filter(move |upsert| upsert.metric == metric)
        };
        let counted: Vec<_> = upserts(self.messages).collect();
        if name == "message_sent" {
            assert_eq!(
                counted.len(),
                1,
                "a message counts in one hour: {counted:?}"
            );
            let upsert = counted[0];
            assert!((upsert.start_ms..upsert.end_ms).contains(&event_time_ms));
            let before = match self.windows.get(&(self.messages, upsert.start_ms)) {
                Some(AggValue::Count(count)) => *count,
                _ => 0,
            };
            assert_eq!(
                upsert.value,
                AggValue::Count(before + 1),
                "a message adds 1"
            );
        } else {
            assert!(counted.is_empty(), "{name} changed the message count");
        }

        let paid = upserts(self.revenue).next();
        let properties = object.get("properties");
        let currency = properties.and_then(|p| p.get("currency"));
        let pays = name == "payment_succeeded"
            && matches!(currency.and_then(Value::as_str), Some("EUR" | "USD"));
        match (pays, paid) {
            (true, Some(upsert)) => {
                let before = match self.windows.get(&(self.revenue, upsert.start_ms)) {
                    Some(AggValue::Sum(sum)) => *sum,
                    _ => Decimal::ZERO,
                };
                let AggValue::Sum(after) = upsert.value else {
                    panic!("revenue is a sum")
                };
                let amount = properties
                    .and_then(|p| p.get("amount"))
                    .and_then(Value::as_f64)
                    .expect("an applied payment has a numeric amount");
                let added = after.0 - before.0;
                let expected = amount * 1e9;
                assert!(
                    (added as f64 - expected).abs() <= 1.0 + expected.abs() * 1e-12,
                    "revenue moved by {added} nano-units for an amount of {amount}"
                );
            }
            (true, None) => {
                let amount = properties
                    .and_then(|p| p.get("amount"))
                    .and_then(Value::as_f64);
                assert_eq!(
                    amount,
                    Some(0.0),
                    "an applied payment of {amount:?} left revenue as it was"
                );
            }
            (false, Some(upsert)) => panic!("{name} changed revenue: {upsert:?}"),
            (false, None) => {}
        }
    }

    /// Follows the stored state, and checks distinct counts against their members.
    fn record(&mut self, changes: &PartitionChanges) {
        for delete in &changes.deletes {
            self.windows.remove(&(delete.metric, delete.start_ms));
            self.members.remove(&(delete.metric, delete.start_ms));
        }
        for member in &changes.members {
            // Funnel entries (a pseudo-window) are no members. A trailing member's last
            // occurrence in a period (tagged 0) names its bucket, which then holds the member
            // even once a later last replaces it without writing the occurrence apart (it
            // does so only within the lateness). A trailing occurrence is rewritten when an
            // earlier one arrives late; a plain member is written once, or again with the
            // earlier step of its progress record (a value) when an earlier event arrives late.
            if !self.counted_by_members.contains(&member.metric) || member.start_ms == i64::MIN {
                continue;
            }
            let trailing = self.trailing.contains(&member.metric);
            let (bucket_ms, key) = match member.member.split_first() {
                Some((0, key)) if trailing => {
                    let step = self.engine.plan().metrics()[member.metric].trailing;
                    let step = step.expect("a trailing metric").step_ms;
                    let bucket = last_occurrence_bucket(&member.value, member.start_ms, step)
                        .expect("a last occurrence");
                    (bucket, Box::from(key))
                }
                _ => (member.start_ms, member.member.clone()),
            };
            let fresh = self
                .members
                .entry((member.metric, bucket_ms))
                .or_default()
                .insert(key);
            let moved = !member.value.is_empty();
            assert!(
                fresh || trailing || moved,
                "member stored twice: {member:?}"
            );
        }
        for upsert in &changes.upserts {
            let window = (upsert.metric, upsert.start_ms);
            if self.counted_by_members.contains(&upsert.metric) {
                let stored = self.members.get(&window).map_or(0, HashSet::len) as u64;
                assert_eq!(upsert.value, AggValue::Distinct(stored), "{upsert:?}");
            }
            self.windows.insert(window, upsert.value);
        }
    }
}

fn assert_unchanged(changes: &PartitionChanges, max_event_ms: Option<i64>, outcome: &Outcome) {
    let untouched = changes.upserts.is_empty()
        && changes.segments.is_empty()
        && changes.members.is_empty()
        && changes.deletes.is_empty()
        && changes.max_event_ms == max_event_ms;
    // Periodic sweeps of old funnel and id periods (`member_range_deletes`, `windows_before`)
    // are no change of values, and may come with any message.
    assert!(untouched, "{outcome:?} changed state: {changes:?}");
}

/// The harness's own reading of a message.
#[derive(Debug)]
enum Reference {
    NotJson,
    /// Valid JSON that `Value` cannot hold: nested deeper than 128 levels, or with a number
    /// beyond the range of a float (`1e400`).
    Unreadable,
    Other,
    /// An object, and what makes it valid JSON the engine may still refuse.
    Object(serde_json::Map<String, Value>, Quirks),
}

/// Valid JSON that is refused when the engine reads the field concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Quirks {
    /// Some object repeats a key (`Value` keeps the last).
    repeated_keys: bool,
    /// Some string escapes half of a surrogate pair (read with U+FFFD instead).
    surrogates: bool,
}

impl Quirks {
    const NONE: Quirks = Quirks {
        repeated_keys: false,
        surrogates: false,
    };
}

impl Reference {
    fn read(payload: &[u8]) -> Reference {
        match serde_json::from_slice::<Value>(payload) {
            // JSON's grammar allows an escaped half of a surrogate pair, which `Value` cannot
            // hold; read such an event with the halves replaced.
            Err(error) if error.to_string().contains("hex escape") => {
                let replaced = replace_surrogates(payload);
                Reference::from_parsed(serde_json::from_slice(&replaced), &replaced, true)
            }
            parsed => Reference::from_parsed(parsed, payload, false),
        }
    }

    fn from_parsed(parsed: serde_json::Result<Value>, text: &[u8], surrogates: bool) -> Reference {
        match parsed {
            Ok(Value::Object(object)) => {
                let repeated_keys = serde_json::from_slice::<RepeatedKeys>(text)
                    .is_ok_and(|RepeatedKeys(repeats)| repeats);
                Reference::Object(
                    object,
                    Quirks {
                        repeated_keys,
                        surrogates,
                    },
                )
            }
            Ok(_) => Reference::Other,
            Err(error)
                if error.to_string().contains("recursion limit")
                    || error.to_string().contains("number out of range") =>
            {
                Reference::Unreadable
            }
            Err(_) => Reference::NotJson,
        }
    }

    fn object(&self) -> Option<&serde_json::Map<String, Value>> {
        match self {
            Reference::Object(object, _) => Some(object),
            _ => None,
        }
    }
}

/// The payload with every `\uD800`-`\uDFFF` escape (halves of surrogate pairs, paired or not)
/// replaced by `\uFFFD`; an escaped backslash is copied as it is.
fn replace_surrogates(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    let mut index = 0;
    while index < payload.len() {
        if payload[index] != b'\\' {
            out.push(payload[index]);
            index += 1;
            continue;
        }
        let escape = payload.get(index..index + 6);
        let surrogate = escape.is_some_and(|escape| {
            escape[1] == b'u'
                && std::str::from_utf8(&escape[2..])
                    .ok()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok())
                    .is_some_and(|unit| (0xD800..=0xDFFF).contains(&unit))
        });
        if surrogate {
            out.extend_from_slice(b"\\ufffd");
            index += 6;
        } else {
            out.extend_from_slice(&payload[index..(index + 2).min(payload.len())]);
            index += 2;
        }
    }
    out
}

/// Whether any object of a JSON value repeats one of its keys.
struct RepeatedKeys(bool);

impl<'de> serde::Deserialize<'de> for RepeatedKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(RepeatedKeysVisitor)
            .map(RepeatedKeys)
    }
}

struct RepeatedKeysVisitor;

impl<'de> serde::de::Visitor<'de> for RepeatedKeysVisitor {
    type Value = bool;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<bool, M::Error> {
        let mut keys = HashSet::new();
        let mut repeats = false;
        while let Some(key) = map.next_key::<String>()? {
            repeats |= !keys.insert(key);
            repeats |= map.next_value::<RepeatedKeys>()?.0;
        }
        Ok(repeats)
    }

    fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<bool, S::Error> {
        let mut repeats = false;
        while let Some(RepeatedKeys(inner)) = seq.next_element()? {
            repeats |= inner;
        }
        Ok(repeats)
    }

    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
}
