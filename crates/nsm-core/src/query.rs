//! Answers to "what were the values of this metric between two times", computed from the
//! stored windows of the partitions an instance owns.

use std::collections::{BTreeMap, HashMap};

use crate::engine::{metric_segments, AggValue, Plan, SegmentValue, StoredSegment, StoredWindow};
use crate::window::WindowBounds;
use crate::EpochMillis;

/// One stored window of a metric, summed over partitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowRecord {
    pub bounds: WindowBounds,
    pub value: AggValue,
    pub complete: bool,
}

/// Sums the stored windows of `metric` that overlap `[from_ms, to_ms)`, oldest first; a
/// ratio is computed from its parts' windows. `completeness_watermark` is the least advanced
/// owned partition's watermark. `stored` must hold the windows of the metric, or of both
/// parts for a ratio (see [`stored_metrics`]).
pub fn windows_between(
    plan: &Plan,
    metric: usize,
    stored: impl IntoIterator<Item = StoredWindow>,
    completeness_watermark: Option<EpochMillis>,
    from_ms: EpochMillis,
    to_ms: EpochMillis,
) -> Vec<WindowRecord> {
    let stored: Vec<StoredWindow> = stored.into_iter().collect();
    let summed = |metric: usize| sum_by_start(&stored, metric, from_ms, to_ms);
    let by_start = match plan.ratio_parts(metric) {
        None if plan.retention_base(metric).is_some() => {
            retention_windows(plan, metric, &stored, from_ms, to_ms)
        }
        None => summed(metric),
        Some((numerator, denominator)) => {
            let numerators = summed(numerator);
            let mut denominators = summed(denominator);
            let mut ratios = BTreeMap::new();
            // A window where only one part had events still has a ratio (0/n or n/0).
            for (start_ms, (end_ms, value)) in numerators {
                let zero = AggValue::zero_of(plan, denominator);
                let below = denominators.remove(&start_ms).map_or(zero, |(_, v)| v);
                ratios.insert(start_ms, (end_ms, AggValue::ratio(value, below)));
            }
            for (start_ms, (end_ms, value)) in denominators {
                let zero = AggValue::zero_of(plan, numerator);
                ratios.insert(start_ms, (end_ms, AggValue::ratio(zero, value)));
            }
            ratios
        }
    };
    by_start
        .into_iter()
        .map(|(start_ms, (end_ms, value))| WindowRecord {
            bounds: WindowBounds { start_ms, end_ms },
            value,
            complete: plan.is_complete(end_ms, completeness_watermark),
        })
        .collect()
}

/// The stored windows of `metric` overlapping `[from_ms, to_ms)`, summed over partitions, by
/// start.
fn sum_by_start(
    stored: &[StoredWindow],
    metric: usize,
    from_ms: EpochMillis,
    to_ms: EpochMillis,
) -> BTreeMap<EpochMillis, (EpochMillis, AggValue)> {
    let mut by_start: BTreeMap<EpochMillis, (EpochMillis, AggValue)> = BTreeMap::new();
    for window in stored {
        if window.metric != metric || window.end_ms <= from_ms || window.start_ms >= to_ms {
            continue;
        }
        by_start
            .entry(window.start_ms)
            .and_modify(|(_, value)| *value = value.plus(window.value))
            .or_insert((window.end_ms, window.value));
    }
    by_start
}

/// The exported segments of one window of `metric` (summed over partitions): the metric's top
/// segments and the overflow, as on `/metrics`. `stored` must hold the segments of the
/// metrics [`stored_metrics`] names.
pub fn window_segments(
    plan: &Plan,
    metric: usize,
    stored: &[StoredSegment],
    bounds: WindowBounds,
) -> Vec<SegmentValue> {
    // Stored segments are those of calendar windows and of trailing metrics' buckets.
    let summed = |metric: usize, bounds: WindowBounds| {
        let mut summed: HashMap<Box<[u8]>, AggValue> = HashMap::new();
        for segment in stored
            .iter()
            .filter(|segment| segment.metric == metric && segment.start_ms == bounds.start_ms)
        {
            summed
                .entry(segment.segment.clone())
                .and_modify(|sum| *sum = sum.plus(segment.value))
                .or_insert(segment.value);
        }
        summed
    };
    metric_segments(plan, metric, bounds, summed)
}

/// The metrics whose stored windows [`windows_between`] needs for `metric`.
pub fn stored_metrics(plan: &Plan, metric: usize) -> Vec<usize> {
    match (plan.ratio_parts(metric), plan.retention_base(metric)) {
        (Some((numerator, denominator)), _) => vec![numerator, denominator],
        (None, Some(base)) => vec![metric, base],
        (None, None) => vec![metric],
    }
}

/// Every window of the base metric in range, with its returning entities over the previous
/// window's entities.
fn retention_windows(
    plan: &Plan,
    metric: usize,
    stored: &[StoredWindow],
    from_ms: EpochMillis,
    to_ms: EpochMillis,
) -> BTreeMap<EpochMillis, (EpochMillis, AggValue)> {
    let Some(base) = plan.retention_base(metric) else {
        return BTreeMap::new();
    };
    // A trailing retention stores no windows: it is read from its base's histograms over
    // whole ranges, which `/metrics` shows.
    if plan.metrics()[metric].trailing.is_some() {
        return BTreeMap::new();
    }
    // The previous window of one in range may start before it: sum everything, once.
    let returning = sum_by_start(stored, metric, EpochMillis::MIN, EpochMillis::MAX);
    let entities = sum_by_start(stored, base, EpochMillis::MIN, EpochMillis::MAX);
    let unit = plan.metrics()[base].window;
    let mut result = BTreeMap::new();
    for (&start_ms, &(end_ms, _)) in entities.range(..to_ms) {
        if end_ms <= from_ms {
            continue;
        }
        let bounds = WindowBounds { start_ms, end_ms };
        let back = returning
            .get(&start_ms)
            .map_or(AggValue::Count(0), |(_, value)| *value);
        let before = plan
            .calendar()
            .previous(unit, bounds)
            .and_then(|previous| entities.get(&previous.start_ms))
            .map_or(AggValue::Distinct(0), |(_, value)| *value);
        result.insert(start_ms, (end_ms, AggValue::ratio(back, before)));
    }
    result
}
