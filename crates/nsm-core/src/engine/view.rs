//! Read-only views of the engine for exposition: current and previous windows, summed over
//! the partitions this instance owns.
//!
//! A ratio keeps no state: it is computed from its two parts' windows whenever it is read, and
//! divides only when a float is exported. Its parts are exported too, so that across instances
//! PromQL divides summed parts rather than averaging ratios, which would be wrong.

use std::collections::{BTreeSet, HashMap};

use super::baseline::{calendar_baseline, Baseline, BaselinePoint};
use super::plan::{Plan, ValueSource};
use super::segment::{metric_segments, SegmentValue};
use super::state::{Agg, AggValue, PartitionState};
use super::trailing::{distinct_in_range, returning_in_range, segments_in_range};
use super::trailing_threshold::qualifying_at;
use crate::decimal::Decimal;
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
    /// Some owned partition began computing the metric (added or changed in the config)
    /// after the window started: the events before are missing, the value is partial.
    pub partial: bool,
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
    /// What the comparable past window(s) held at the current window's elapsed point (see
    /// [`super::baseline`]); for a trailing metric, its previous range. `None` when no past
    /// window has a value there.
    pub baseline: Option<Baseline>,
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
    let clock = instance_clock(partitions.clone().map(PartitionState::clock_ms), now_ms);
    let complete_until = completeness_watermark(partitions.clone().map(PartitionState::clock_ms));
    let calendar = plan.calendar();
    // What the windows hold: a retention metric's are its count of returning entities.
    let stored_zero = |index: usize| match &plan.compiled[index].value {
        ValueSource::Retention { .. } => AggValue::Count(0),
        source => AggValue::zero_for(source),
    };
    let calendar_value = |index: usize, bounds: WindowBounds| {
        let zero = stored_zero(index);
        partitions
            .clone()
            .filter_map(|state| state.windows[index].get(&bounds.start_ms))
            .fold(zero, |sum, window| sum.plus(window.agg.value()))
    };
    // A trailing metric's value over a range: its step buckets in the range, a distinct
    // member (or converted entity) counted once per partition through the gap histograms (see
    // `trailing`); a threshold's last bucket holds the range's value (see `trailing_threshold`).
    let stored_value = |index: usize, bounds: WindowBounds| {
        if plan.compiled[index].trailing.is_none() {
            return calendar_value(index, bounds);
        }
        partitions.clone().fold(stored_zero(index), |total, state| {
            total.plus(range_value(plan, state, index, bounds, None))
        })
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
                let compiled = &plan.compiled[index];
                let previous = match &compiled.trailing {
                    Some(trailing) => Some(trailing.previous(bounds)),
                    None => calendar.previous(compiled.window, bounds),
                };
                let before =
                    previous.map_or(AggValue::Distinct(0), |previous| stored_value(of, previous));
                AggValue::ratio(stored_value(index, bounds), before)
            }
            _ => stored_value(index, bounds),
        };
        WindowValue {
            bounds,
            partial: partitions
                .clone()
                .any(|state| state.lacks_start_of(plan, index, bounds.start_ms)),
            value,
            complete: plan.is_complete(bounds.end_ms, complete_until),
        }
    };
    let summed_segments = |index: usize, bounds: WindowBounds| {
        let mut summed: HashMap<Box<[u8]>, AggValue> = HashMap::new();
        for state in partitions.clone() {
            for (segment, value) in partition_segments(plan, state, index, bounds) {
                summed
                    .entry(segment)
                    .and_modify(|sum| *sum = sum.plus(value))
                    .or_insert(value);
            }
        }
        summed
    };
    let segments =
        |index: usize, bounds: WindowBounds| metric_segments(plan, index, bounds, summed_segments);
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
        let previous_value = window_value(index, previous);
        let baseline = match &compiled.trailing {
            // A trailing range is always whole: the range one length ago is its baseline.
            Some(_) => Some(Baseline {
                elapsed_ms: current.end_ms - current.start_ms,
                points: vec![BaselinePoint {
                    weeks_back: None,
                    bounds: previous,
                    value: previous_value.value,
                }],
            }),
            None => calendar_baseline(plan, partitions.clone(), index, current, clock),
        };
        values.push(MetricValues {
            metric: index,
            current: window_value(index, current),
            previous: previous_value,
            before_previous,
            current_segments: segments(index, current),
            previous_segments: segments(index, previous),
            baseline,
        });
    }
    values
}

/// One partition's value of a trailing metric over a range of its buckets, or of one segment:
/// summed buckets, distinct members through the gap histograms, or a retention's returning
/// entities through its base's (the rate is taken by the caller).
fn range_value(
    plan: &Plan,
    state: &PartitionState,
    index: usize,
    bounds: WindowBounds,
    segment: Option<&[u8]>,
) -> AggValue {
    let (start_ms, end_ms) = (bounds.start_ms, bounds.end_ms);
    let windows = &state.windows[index];
    match &plan.compiled[index].value {
        ValueSource::Retention { of } => AggValue::Count(returning_in_range(
            &state.windows[*of],
            start_ms,
            end_ms,
            segment,
        )),
        ValueSource::Distinct(_) | ValueSource::Conversion { .. } => {
            AggValue::Distinct(distinct_in_range(windows, start_ms, end_ms, segment))
        }
        // The last bucket holds the range's value (see `trailing_threshold`).
        ValueSource::Threshold { .. } => {
            let step_ms = plan.compiled[index].trailing.map_or(0, |t| t.step_ms);
            AggValue::Distinct(qualifying_at(windows, end_ms - step_ms, segment))
        }
        source => windows
            .range(start_ms..end_ms)
            .filter_map(|(_, bucket)| match segment {
                None => Some(bucket.agg.value()),
                Some(segment) => bucket.segments.get(segment).map(Agg::value),
            })
            .fold(AggValue::zero_for(source), AggValue::plus),
    }
}

/// One partition's segments of a metric's window, or of a trailing metric's range (where a
/// segment counts when it has members, as a calendar window's does).
fn partition_segments(
    plan: &Plan,
    state: &PartitionState,
    index: usize,
    bounds: WindowBounds,
) -> Vec<(Box<[u8]>, AggValue)> {
    let windows = &state.windows[index];
    let compiled = &plan.compiled[index];
    if compiled.trailing.is_none() {
        return windows
            .get(&bounds.start_ms)
            .map(|window| {
                let segments = window.segments.iter();
                segments
                    .map(|(key, agg)| (key.clone(), agg.value()))
                    .collect()
            })
            .unwrap_or_default();
    }
    if let (ValueSource::Threshold { .. }, Some(trailing)) = (&compiled.value, &compiled.trailing) {
        let last = windows.get(&(bounds.end_ms - trailing.step_ms));
        return last
            .map(|bucket| {
                let segments = bucket.segments.iter();
                segments
                    .map(|(key, agg)| (key.clone(), agg.value()))
                    .collect()
            })
            .unwrap_or_default();
    }
    let keys: BTreeSet<&[u8]> = match &compiled.value {
        ValueSource::Retention { of } => {
            segments_in_range(&state.windows[*of], bounds.start_ms, bounds.end_ms)
        }
        ValueSource::Distinct(_) | ValueSource::Conversion { .. } => {
            segments_in_range(windows, bounds.start_ms, bounds.end_ms)
        }
        _ => windows
            .range(bounds.start_ms..bounds.end_ms)
            .flat_map(|(_, bucket)| bucket.segments.keys().map(|key| &**key))
            .collect(),
    };
    let is_gap_count = matches!(
        compiled.value,
        ValueSource::Retention { .. } | ValueSource::Distinct(_) | ValueSource::Conversion { .. }
    );
    keys.into_iter()
        .map(|key| (key, range_value(plan, state, index, bounds, Some(key))))
        .filter(|(_, value)| !(is_gap_count && value.to_decimal() == Some(Decimal::ZERO)))
        .map(|(key, value)| (Box::from(key), value))
        .collect()
}
