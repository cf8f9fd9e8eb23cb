//! The JSON API: metric definitions and stored windows.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nsm_core::decimal::Decimal;
use nsm_core::engine::SegmentValue;
use nsm_core::engine::{AggValue, PartitionStatus};
use nsm_core::metric::{FilterField, Literal, MetricKind};
use nsm_core::query::{stored_metrics, window_segments, windows_between};
use nsm_core::window::parse_instant;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::AppState;

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
    let needed = stored_metrics(&state.plan, metric);
    let segmented = state.plan.metrics()[metric].segments.is_some();
    let loaded = tokio::task::spawn_blocking(move || {
        let mut stored = Vec::new();
        let mut segments = Vec::new();
        for key in &keys {
            for metric in &needed {
                stored.extend(store.windows(key, Some(*metric))?);
            }
            if segmented {
                for metric in &needed {
                    segments.extend(store.segments(key, *metric)?);
                }
            }
        }
        Ok::<_, nsm_state::StateError>((stored, segments))
    })
    .await;
    let (stored, segments) = match loaded {
        Ok(Ok(stored)) => stored,
        Ok(Err(state_error)) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, state_error.to_string())
        }
        Err(join_error) => return error(StatusCode::INTERNAL_SERVER_ERROR, join_error.to_string()),
    };
    let completeness = nsm_core::engine::completeness_watermark(
        partitions.iter().map(|status| status.watermark_ms),
    );
    let records = windows_between(&state.plan, metric, stored, completeness, from_ms, to_ms);
    let calendar = state.plan.calendar();
    let windows: Vec<Value> = records
        .iter()
        .map(|record| {
            json!({
                "start": calendar.format_local(record.bounds.start_ms),
                "end": calendar.format_local(record.bounds.end_ms),
                "start_ms": record.bounds.start_ms,
                "end_ms": record.bounds.end_ms,
                "value": value_json(record.value),
                "complete": record.complete,
                "segments": segments_json(
                    &window_segments(&state.plan, metric, &segments, record.bounds)
                ),
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
    }))
    .into_response()
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
