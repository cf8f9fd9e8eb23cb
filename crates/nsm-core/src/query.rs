//! Answers to "what were the values of this metric between two times", computed from the
//! stored windows of the partitions an instance owns.

use std::collections::BTreeMap;

use crate::engine::{AggValue, Plan, StoredWindow};
use crate::window::WindowBounds;
use crate::EpochMillis;

/// One stored window of a metric, summed over partitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowRecord {
    pub bounds: WindowBounds,
    pub value: AggValue,
    pub complete: bool,
}

/// Sums the stored windows of `metric` that overlap `[from_ms, to_ms)`, oldest first.
/// `completeness_watermark` is the least advanced owned partition's watermark.
pub fn windows_between(
    plan: &Plan,
    metric: usize,
    stored: impl IntoIterator<Item = StoredWindow>,
    completeness_watermark: Option<EpochMillis>,
    from_ms: EpochMillis,
    to_ms: EpochMillis,
) -> Vec<WindowRecord> {
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
        .into_iter()
        .map(|(start_ms, (end_ms, value))| WindowRecord {
            bounds: WindowBounds { start_ms, end_ms },
            value,
            complete: plan.is_complete(end_ms, completeness_watermark),
        })
        .collect()
}
