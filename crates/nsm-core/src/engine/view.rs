//! Read-only views of the engine for exposition: current and previous windows, summed over
//! the partitions this instance owns.

use std::collections::HashMap;

use super::plan::{Plan, ValueSource};
use super::segment::{top_segments, SegmentValue};
use super::state::{AggValue, PartitionState};
use super::trailing::distinct_in_range;
use super::trailing_threshold::qualifying_at;
use crate::window::WindowBounds;
use crate::{EpochMillis, PartitionKey};

/// One window of one metric, summed over partitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowValue {
    pub bounds: WindowBounds,
    pub value: AggValue,
    /// Every owned partition's watermark is past the end plus the allowed lateness: the value
    /// is final.
    pub complete: bool,
}

/// A metric's current window (the one containing the instance clock) and the one before it,
/// with the exported segments of each for a metric with a breakdown.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricValues {
    pub metric: usize,
    pub current: WindowValue,
    pub previous: WindowValue,
    /// The window before `previous`, when the retention keeps it whole: lets growth of the
    /// last whole window be computed from nsm's own state, right after a Prometheus restart.
    pub before_previous: Option<WindowValue>,
    pub current_segments: Vec<SegmentValue>,
    pub previous_segments: Vec<SegmentValue>,
}

/// Progress of one owned partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    pub key: PartitionKey,
    pub next_offset: Option<i64>,
    pub watermark_ms: Option<EpochMillis>,
    pub max_event_time_ms: Option<EpochMillis>,
}

/// The instance clock: the most advanced partition watermark, or the wall clock before any
/// partition has one. It picks which window is "current".
pub fn instance_clock(
    partitions: impl Iterator<Item = Option<EpochMillis>>,
    now_ms: EpochMillis,
) -> EpochMillis {
    partitions.flatten().max().unwrap_or(now_ms)
}

/// The watermark that decides completeness: the least advanced owned partition's. A partition
/// without any watermark yet holds nothing, so it does not hold windows open.
pub fn completeness_watermark(
    partitions: impl Iterator<Item = Option<EpochMillis>>,
) -> Option<EpochMillis> {
    partitions.flatten().min()
}

pub(super) fn metric_values<'a>(
    plan: &Plan,
    partitions: impl Iterator<Item = &'a PartitionState> + Clone,
    now_ms: EpochMillis,
) -> Vec<MetricValues> {
    let clock = instance_clock(partitions.clone().map(PartitionState::watermark_ms), now_ms);
    let complete_until =
        completeness_watermark(partitions.clone().map(PartitionState::watermark_ms));
    let calendar = plan.calendar();
    let calendar_value = |index: usize, bounds: WindowBounds| {
        // What the windows hold: a retention metric stores its count of returning entities.
        let zero = match &plan.compiled[index].value {
            ValueSource::Retention { .. } => AggValue::Count(0),
            source => AggValue::zero_for(source),
        };
        partitions
            .clone()
            .filter_map(|state| state.windows[index].get(&bounds.start_ms))
            .fold(zero, |sum, window| sum.plus(window.agg.value()))
    };
    // A trailing metric's value over a range: its step buckets in the range, a distinct
    // member counted once per partition through the gap histograms (see `trailing`); a
    // threshold's last bucket holds the range's value (see `trailing_threshold`).
    let stored_value = |index: usize, bounds: WindowBounds| {
        let Some(trailing) = &plan.compiled[index].trailing else {
            return calendar_value(index, bounds);
        };
        let mut total = AggValue::zero_for(&plan.compiled[index].value);
        for state in partitions.clone() {
            let windows = &state.windows[index];
            if let ValueSource::Distinct(_) = plan.compiled[index].value {
                let distinct = distinct_in_range(windows, bounds.start_ms, bounds.end_ms);
                total = total.plus(AggValue::Distinct(distinct));
            } else if let ValueSource::Threshold { .. } = plan.compiled[index].value {
                let reached = qualifying_at(windows, bounds.end_ms - trailing.step_ms);
                total = total.plus(AggValue::Distinct(reached));
            } else {
                for (_, bucket) in windows.range(bounds.start_ms..bounds.end_ms) {
                    total = total.plus(bucket.agg.value());
                }
            }
        }
        total
    };
    let window_value = |index: usize, bounds: WindowBounds| {
        let value = match plan.compiled[index].value {
            // Parts share the ratio's window (checked by validation), so the same bounds.
            ValueSource::Ratio {
                numerator,
                denominator,
            } => AggValue::ratio(
                stored_value(numerator, bounds),
                stored_value(denominator, bounds),
            ),
            // Returning entities as a rate of the previous window's entities.
            ValueSource::Retention { of } => {
                let before = calendar
                    .previous(plan.compiled[index].window, bounds)
                    .map_or(AggValue::Distinct(0), |previous| stored_value(of, previous));
                AggValue::ratio(stored_value(index, bounds), before)
            }
            _ => stored_value(index, bounds),
        };
        WindowValue {
            bounds,
            value,
            complete: plan.is_complete(bounds.end_ms, complete_until),
        }
    };
    let segments = |index: usize, bounds: WindowBounds| {
        let compiled = &plan.compiled[index];
        if compiled.segment_slots.is_empty() {
            return Vec::new();
        }
        let mut summed: HashMap<Box<[u8]>, AggValue> = HashMap::new();
        for state in partitions.clone() {
            let Some(window) = state.windows[index].get(&bounds.start_ms) else {
                continue;
            };
            for (segment, agg) in &window.segments {
                let value = agg.value();
                summed
                    .entry(segment.clone())
                    .and_modify(|sum| *sum = sum.plus(value))
                    .or_insert(value);
            }
        }
        top_segments(summed, compiled.top_segments)
    };
    let mut values = Vec::with_capacity(plan.compiled.len());
    for (index, compiled) in plan.compiled.iter().enumerate() {
        let (current, previous) = match &compiled.trailing {
            Some(trailing) => {
                let current = trailing.range_at(clock);
                (current, trailing.previous(current))
            }
            None => {
                let Some(current) = calendar.window_of(compiled.window, clock) else {
                    continue;
                };
                let Some(previous) = calendar.previous(compiled.window, current) else {
                    continue;
                };
                (current, previous)
            }
        };
        let before_previous = plan
            .keeps_before_previous(index)
            .then(|| match &compiled.trailing {
                Some(trailing) => Some(trailing.previous(previous)),
                None => calendar.previous(compiled.window, previous),
            })
            .flatten()
            .map(|bounds| window_value(index, bounds));
        values.push(MetricValues {
            metric: index,
            current: window_value(index, current),
            previous: window_value(index, previous),
            before_previous,
            current_segments: segments(index, current),
            previous_segments: segments(index, previous),
        });
    }
    values
}
