//! The JSON API: metric definitions and stored windows.
//!
//! A windows request reads only the windows of its range (and the one or two before it that a
//! window overlapping its start, or a retention's previous window, needs), at most
//! [`MAX_WINDOWS`] of them a partition, and stops reading segments past
//! [`MAX_SEGMENT_RECORDS`]: however long the retention or wide the range, one request costs a
//! bounded amount of reading. A longer range is answered in pages (`truncated`, `next_from`).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nsm_core::decimal::Decimal;
use nsm_core::engine::SegmentValue;
use nsm_core::engine::{AggValue, PartitionStatus, Plan};
use nsm_core::metric::{Comparison, FilterField, Literal, MetricKind, Test};
use nsm_core::query::{stored_metrics, window_segments, windows_between, WindowRecord};
use nsm_core::window::parse_instant;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::AppState;

/// Windows one response holds at most; the rest of the range is on the next page.
pub(crate) const MAX_WINDOWS: usize = 1000;
/// Stored segment records one response reads at most (a window may hold 10,000 segments per
/// partition): past them, the response ends with the window being read.
pub(crate) const MAX_SEGMENT_RECORDS: usize = 100_000;

/// How much one response may hold and read.
#[derive(Debug, Clone, Copy)]
struct PageLimits {
    windows: usize,
    segment_records: usize,
}

const PAGE_LIMITS: PageLimits = PageLimits {
    windows: MAX_WINDOWS,
    segment_records: MAX_SEGMENT_RECORDS,
};
/// Windows read before the range at most: the one overlapping its start, and for a retention
/// its previous window, by the longest a window can last.
const WINDOWS_BEFORE_RANGE: usize = 4;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

pub(crate) async fn list_metrics(State(state): State<AppState>) -> Json<Value> {
    let metrics: Vec<Value> = state
        .plan
        .metrics()
        .iter()
        .map(|metric| {
            let field = metric.kind.field().map(ToString::to_string);
            let (numerator, denominator) = match &metric.kind {
                MetricKind::Ratio {
                    numerator,
                    denominator,
                } => (Some(numerator), Some(denominator)),
                _ => (None, None),
            };
            let filter: serde_json::Map<String, Value> = metric
                .filter
                .clauses
                .iter()
                .map(|clause| {
                    let key = match &clause.field {
                        FilterField::EventName => "event".to_string(),
                        FilterField::Path(path) => path.to_string(),
                    };
                    let values: Vec<Value> = clause.any_of.iter().map(literal_json).collect();
                    (key, Value::Array(values))
                })
                .collect();
            // Tests other than equality, as the config writes them:
            // `"amount": {"gte": 10}`, `"plan": {"not_any_of": ["internal"]}`.
            let mut filter = filter;
            for condition in &metric.filter.conditions {
                let (name, argument) = condition_json(&condition.test);
                let entry = filter
                    .entry(condition.field.to_string())
                    .or_insert_with(|| json!({}));
                if !entry.is_object() {
                    *entry = json!({ "any_of": entry.take() });
                }
                if let Some(tests) = entry.as_object_mut() {
                    tests.insert(name.to_string(), argument);
                }
            }
            json!({
                "name": metric.name,
                "role": metric.role.label(),
                "owner": metric.owner,
                "description": metric.description,
                "kind": metric.kind.label(),
                "field": field,
                "numerator": numerator,
                "denominator": denominator,
                "where": filter,
                "window": metric.window_label(),
                "windows_url": format!("/api/v1/metrics/{}/windows", metric.name),
            })
        })
        .collect();
    Json(json!({
        "zone": state.plan.calendar().zone_name(),
        "metrics": metrics,
    }))
}

#[derive(Debug, Deserialize)]
pub(crate) struct WindowQuery {
    from: Option<String>,
    to: Option<String>,
}

pub(crate) async fn metric_windows(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<WindowQuery>,
) -> Response {
    let Some(metric) = state.plan.metric_index(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no metric named {name:?}; GET /api/v1/metrics lists them"),
        );
    };
    let parse = |text: &Option<String>, what: &str| -> Result<Option<i64>, String> {
        match text {
            None => Ok(None),
            Some(text) => parse_instant(text).map(Some).ok_or_else(|| {
                format!("{what}={text:?} is neither RFC 3339 nor epoch milliseconds")
            }),
        }
    };
    let bounds = parse(&query.from, "from").and_then(|from| Ok((from, parse(&query.to, "to")?)));
    let (from_ms, to_ms) = match bounds {
        Ok((from, to)) => (from.unwrap_or(i64::MIN), to.unwrap_or(i64::MAX)),
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if from_ms > to_ms {
        return error(StatusCode::BAD_REQUEST, "from must not be after to");
    }
    let partitions: Vec<PartitionStatus> = state
        .published
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .partitions
        .clone();
    let store = state.store.clone();
    let keys: Vec<_> = partitions.iter().map(|status| status.key.clone()).collect();
    let completeness = nsm_core::engine::completeness_watermark(
        partitions.iter().map(|status| status.watermark_ms),
    );
    let plan = state.plan.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let range = from_ms..to_ms;
        read_windows(
            &plan,
            &store,
            &keys,
            metric,
            completeness,
            range,
            PAGE_LIMITS,
        )
    })
    .await;
    let page = match loaded {
        Ok(Ok(page)) => page,
        Ok(Err(state_error)) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, state_error.to_string())
        }
        Err(join_error) => return error(StatusCode::INTERNAL_SERVER_ERROR, join_error.to_string()),
    };
    let calendar = state.plan.calendar();
    let windows: Vec<Value> = page
        .windows
        .iter()
        .map(|(record, segments)| {
            json!({
                "start": calendar.format_local(record.bounds.start_ms),
                "end": calendar.format_local(record.bounds.end_ms),
                "start_ms": record.bounds.start_ms,
                "end_ms": record.bounds.end_ms,
                "value": value_json(record.value),
                "complete": record.complete,
                "segments": segments_json(segments),
            })
        })
        .collect();
    let definition = &state.plan.metrics()[metric];
    Json(json!({
        "metric": definition.name,
        "kind": definition.kind.label(),
        "window": definition.window_label(),
        "zone": calendar.zone_name(),
        "partitions": partitions.len(),
        "windows": windows,
        "truncated": page.next_from_ms.is_some(),
        "next_from": page.next_from_ms,
    }))
    .into_response()
}

/// The windows of one response, each with its segments (empty without a breakdown), and the
/// start of the first window left for the next page.
struct WindowPage {
    windows: Vec<(WindowRecord, Vec<SegmentValue>)>,
    next_from_ms: Option<i64>,
}

/// The windows of `metric` overlapping `[from_ms, to_ms)` summed over the partitions `keys`,
/// reading only what the page needs (see the module's doc).
fn read_windows(
    plan: &Plan,
    store: &nsm_state::Store,
    keys: &[nsm_core::PartitionKey],
    metric: usize,
    completeness: Option<i64>,
    range: std::ops::Range<i64>,
    limits: PageLimits,
) -> Result<WindowPage, nsm_state::StateError> {
    let std::ops::Range {
        start: from_ms,
        end: to_ms,
    } = range;
    let needed = stored_metrics(plan, metric);
    // The longest a stored window of the metrics read can last: a calendar window, or a
    // trailing metric's step bucket.
    let span_ms = needed
        .iter()
        .map(|&needed| {
            let definition = &plan.metrics()[needed];
            match &definition.trailing {
                Some(trailing) => trailing.step_ms,
                None => definition.window.max_length_ms(),
            }
        })
        .max()
        .unwrap_or(0);
    let lookback_ms = if plan.retention_base(metric).is_some() {
        2 * span_ms
    } else {
        span_ms
    };
    let starts = from_ms.saturating_sub(lookback_ms)..to_ms;
    // Each partition's first windows of the range hold the page's windows, whichever
    // partitions they are summed from; one more tells whether the range goes on.
    let per_partition = limits.windows + 1 + WINDOWS_BEFORE_RANGE;
    let mut stored = Vec::new();
    for key in keys {
        for &needed in &needed {
            stored.extend(store.windows_in(key, needed, starts.clone(), per_partition)?);
        }
    }
    let mut records = windows_between(plan, metric, stored, completeness, from_ms, to_ms);
    let mut next_from_ms = records
        .get(limits.windows)
        .map(|record| record.bounds.start_ms);
    records.truncate(limits.windows);
    if plan.metrics()[metric].segments.is_none() {
        let windows = records
            .into_iter()
            .map(|record| (record, Vec::new()))
            .collect();
        return Ok(WindowPage {
            windows,
            next_from_ms,
        });
    }
    let mut windows = Vec::with_capacity(records.len());
    let mut segments_read = 0;
    let mut records = records.into_iter().peekable();
    while let Some(record) = records.next() {
        // A retention's segments divide by its base's in the previous window.
        let first_start = record.bounds.start_ms.saturating_sub(lookback_ms - span_ms);
        let mut segments = Vec::new();
        for key in keys {
            for &needed in &needed {
                segments.extend(store.segments(
                    key,
                    needed,
                    first_start..record.bounds.start_ms.saturating_add(1),
                )?);
            }
        }
        segments_read += segments.len();
        windows.push((
            record,
            window_segments(plan, metric, &segments, record.bounds),
        ));
        if segments_read >= limits.segment_records {
            if let Some(next) = records.peek() {
                next_from_ms = Some(next.bounds.start_ms);
            }
            break;
        }
    }
    Ok(WindowPage {
        windows,
        next_from_ms,
    })
}

/// A test as the config writes it: its name and argument.
fn condition_json(test: &Test) -> (&'static str, Value) {
    let list = |values: &[Literal]| Value::Array(values.iter().map(literal_json).collect());
    match test {
        Test::AnyOf(values) => ("any_of", list(values)),
        Test::NoneOf(values) => ("not_any_of", list(values)),
        Test::Compare(comparison, bound) => {
            let name = match comparison {
                Comparison::Greater => "gt",
                Comparison::AtLeast => "gte",
                Comparison::Less => "lt",
                Comparison::AtMost => "lte",
            };
            (name, decimal_json(*bound))
        }
        Test::Present => ("present", Value::Bool(true)),
        Test::Missing => ("present", Value::Bool(false)),
        Test::Prefix(prefix) => ("prefix", Value::String(prefix.clone())),
    }
}

fn literal_json(literal: &Literal) -> Value {
    match literal {
        Literal::Text(text) => Value::String(text.clone()),
        Literal::Bool(flag) => Value::Bool(*flag),
        Literal::Number(number) => decimal_json(*number),
    }
}

/// The exact decimal text is a valid JSON number.
fn decimal_json(number: Decimal) -> Value {
    serde_json::from_str(&number.to_string()).unwrap_or(Value::Null)
}

/// `[{"segment": "pro/DE", "value": 12}, ..., {"segment": "__other__", ...}]`, largest first;
/// `null` without a breakdown.
fn segments_json(segments: &[SegmentValue]) -> Value {
    if segments.is_empty() {
        return Value::Null;
    }
    let entries: Vec<Value> = segments
        .iter()
        .map(|segment| json!({ "segment": segment.label, "value": value_json(segment.value) }))
        .collect();
    Value::Array(entries)
}

fn value_json(value: AggValue) -> Value {
    match value {
        AggValue::Count(count) | AggValue::Distinct(count) => json!(count),
        AggValue::Sum(sum) => decimal_json(sum),
        // The quotient as a float (null when the denominator is zero), with both exact parts.
        AggValue::Ratio {
            numerator,
            denominator,
        } => json!({
            "ratio": Some(value.to_f64()).filter(|ratio| ratio.is_finite()),
            "numerator": decimal_json(numerator),
            "denominator": decimal_json(denominator),
        }),
    }
}

#[cfg(test)]
mod tests {
    use nsm_core::engine::{Engine, Outcome, PartitionSnapshot};
    use nsm_core::{Config, PartitionKey};
    use nsm_state::{Store, StoreOptions};

    use super::*;

    const CONFIG: &str = r#"
[kafka]
brokers = "localhost:9092"
topics = ["events"]
[north_star]
name = "messages"
kind = "count"
where = { event = "message_sent" }
window = "1h"
[[inputs]]
name = "by_user"
owner = "team"
kind = "count"
where = { event = "message_sent" }
window = "1h"
by = ["user_id"]
"#;

    /// 2026-01-01T00:00:00Z.
    const FIRST_HOUR_MS: i64 = 1_767_225_600_000;
    const HOUR_MS: i64 = 3_600_000;
    const HOURS: i64 = 30;

    fn key(partition: i32) -> PartitionKey {
        PartitionKey::new("events", partition)
    }

    /// A store of 30 hours of messages: in partition 0 one an even hour, in partition 1 two
    /// an hour, by users of their own.
    fn store_of_thirty_hours(dir: &std::path::Path) -> (Plan, Store) {
        let config = Config::from_toml(CONFIG, &|_| None).expect("valid config");
        let plan = Plan::from_config(&config);
        let store = Store::open(dir, &plan, &StoreOptions::default()).expect("open");
        let mut engine = Engine::new(plan.clone());
        let now_ms = FIRST_HOUR_MS + HOURS * HOUR_MS;
        for partition in [0, 1] {
            engine.restore_partition(key(partition), PartitionSnapshot::default());
            let mut offset = 0;
            for hour in 0..HOURS {
                let senders = if partition == 0 { 1 - hour % 2 } else { 2 };
                for sender in 0..senders {
                    let time = FIRST_HOUR_MS + hour * HOUR_MS + sender * 60_000;
                    let payload = format!(
                        r#"{{"event":"message_sent","user_id":"p{partition}-u{sender}","timestamp":{time}}}"#
                    );
                    let outcome = engine.apply(&key(partition), offset, payload.as_bytes(), now_ms);
                    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
                    offset += 1;
                }
            }
        }
        store.write(&engine.take_changes()).expect("write");
        (plan, store)
    }

    fn page(
        plan: &Plan,
        store: &Store,
        metric: &str,
        range: std::ops::Range<i64>,
        limits: PageLimits,
    ) -> WindowPage {
        let metric = plan.metric_index(metric).expect("metric");
        read_windows(plan, store, &[key(0), key(1)], metric, None, range, limits).expect("read")
    }

    fn hours_and_counts(page: &WindowPage) -> Vec<(i64, AggValue)> {
        page.windows
            .iter()
            .map(|(record, _)| {
                (
                    (record.bounds.start_ms - FIRST_HOUR_MS) / HOUR_MS,
                    record.value,
                )
            })
            .collect()
    }

    fn expected(hours: std::ops::Range<i64>) -> Vec<(i64, AggValue)> {
        hours
            .map(|hour| (hour, AggValue::Count(if hour % 2 == 0 { 3 } else { 2 })))
            .collect()
    }

    #[test]
    fn a_long_range_is_answered_in_exact_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (plan, store) = store_of_thirty_hours(dir.path());
        let limits = PageLimits {
            windows: 12,
            segment_records: usize::MAX,
        };
        let mut from_ms = i64::MIN;
        let mut pages = Vec::new();
        loop {
            let page = page(&plan, &store, "messages", from_ms..i64::MAX, limits);
            pages.push(hours_and_counts(&page));
            match page.next_from_ms {
                Some(next) => from_ms = next,
                None => break,
            }
        }
        assert_eq!(pages, [expected(0..12), expected(12..24), expected(24..30)]);
    }

    #[test]
    fn only_windows_overlapping_the_range_are_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (plan, store) = store_of_thirty_hours(dir.path());
        let hour = |hour: i64| FIRST_HOUR_MS + hour * HOUR_MS;
        // From the middle of hour 5 to the start of hour 8: hours 5, 6 and 7.
        let page = page(
            &plan,
            &store,
            "messages",
            hour(5) + 1_800_000..hour(8),
            PAGE_LIMITS,
        );
        assert_eq!(hours_and_counts(&page), expected(5..8));
        assert_eq!(page.next_from_ms, None);
    }

    #[test]
    fn reading_segments_stops_past_the_limit_with_the_window_being_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (plan, store) = store_of_thirty_hours(dir.path());
        // Hour 0 holds 3 segment records (one user in partition 0, two in partition 1), hour
        // 1 two: past 4 records, the page ends after hour 1.
        let limits = PageLimits {
            windows: 100,
            segment_records: 4,
        };
        let page = page(&plan, &store, "by_user", i64::MIN..i64::MAX, limits);
        assert_eq!(hours_and_counts(&page), expected(0..2));
        assert_eq!(page.next_from_ms, Some(FIRST_HOUR_MS + 2 * HOUR_MS));
        let labels: Vec<usize> = page
            .windows
            .iter()
            .map(|(_, segments)| segments.len())
            .collect();
        assert_eq!(
            labels,
            [3, 2],
            "every segment of a window returned is there"
        );
    }
}
