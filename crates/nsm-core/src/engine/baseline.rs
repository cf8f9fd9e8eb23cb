//! An exact baseline for the window still filling: what the comparable past window(s) held at
//! the same elapsed point since their start.
//!
//! A whole past window cannot be compared with the current one while it fills, and pro-rating
//! it by elapsed time is wrong for distinct counts, ratios and daily patterns. So every
//! calendar window of a count, sum, distinct count, conversion or retention keeps a
//! *progress record*: what each step of elapsed time since the window's start added to its
//! value, each contribution in the step of its event time ([`progress_step_ms`]: 1 minute for
//! hours, 10 minutes for days and weeks, 1 hour for months). The baseline at elapsed `e` sums
//! the steps of the past window that ended by `e`: exact at a step boundary, and at most one
//! step behind the current value in between.
//!
//! - A count adds one to the step of its event, a sum the amount.
//! - A distinct member counts in the step of its earliest event in the window: its member
//!   entry holds that step ([`encode_step`]), and a late event that moves it earlier moves it
//!   in the record. A conversion is a distinct count of the converting entities, by the time
//!   of their conversion event.
//! - A retention's returning entity counts in the step where it joined the window (its base's
//!   member step); the rate divides by the whole window before the past one, as the current
//!   value divides by the whole previous window.
//! - A ratio reads its parts' records.
//! - A threshold keeps none: the step where an entity reached k depends on the order of its
//!   events in time, which per-entity counts up to k do not keep.
//!
//! The past windows compared: the previous one for weeks and months; for hours and days, the
//! median of the same weekday (and hour) 1 to 4 weeks back that the state holds, found in the
//! zone's calendar so that a DST change keeps the local hour. A median does not add up across
//! instances, so each point is exported too (`window="baseline_<k>w"`), for PromQL to take the
//! median of their sums. A trailing metric's baseline is its previous range, always whole.
//!
//! Windows stored before progress records existed (or whose record could not be kept exact)
//! have none and give no baseline, never a wrong one.

use crate::decimal::Decimal;
use crate::window::{Calendar, CalendarUnit, WindowBounds};
use crate::EpochMillis;

use super::plan::{Plan, ValueSource};
use super::state::{AggValue, PartitionState};

/// How many weeks back an hourly or daily baseline looks for the same weekday (and hour).
pub const SEASONAL_WEEKS: u8 = 4;

/// The step of a calendar unit's progress record: at most 1,014 steps a window (a week of
/// 10-minute steps and a DST hour), so a step fits the two bytes of a member entry. A weekly
/// window's steps are 10 minutes so that the fast-burn alerts, which compare up to the last
/// step boundary, page a collapse within the hour whenever it starts.
pub fn progress_step_ms(unit: CalendarUnit) -> i64 {
    match unit {
        CalendarUnit::Hour => 60_000,
        CalendarUnit::Day | CalendarUnit::Week => 600_000,
        CalendarUnit::Month => 3_600_000,
    }
}

/// The step of a window an event at `time_ms` falls in.
pub(super) fn step_of(unit: CalendarUnit, bounds: WindowBounds, time_ms: EpochMillis) -> usize {
    usize::try_from((time_ms - bounds.start_ms) / progress_step_ms(unit)).unwrap_or(0)
}

/// A distinct member's entry value in a window with a progress record: the step of its
/// earliest event, two bytes big-endian. Members of other windows (older, or segments) keep
/// the empty value.
pub(super) fn encode_step(step: usize) -> [u8; 2] {
    u16::try_from(step).unwrap_or(u16::MAX).to_be_bytes()
}

/// The step a member entry holds, if it holds one.
pub(super) fn decode_step(value: &[u8]) -> Option<usize> {
    let bytes: [u8; 2] = value.try_into().ok()?;
    Some(usize::from(u16::from_be_bytes(bytes)))
}

/// What each step of a window added to its value, in event time. Grows to the last step
/// written, so a window still filling holds only its steps so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Events, distinct members, converting or returning entities per step.
    Counts(Vec<u64>),
    /// Amounts of a sum per step.
    Sums(Vec<Decimal>),
}

impl Progress {
    /// An empty record for a new window of a metric of `source`; `None` for kinds that keep
    /// none (thresholds; ratios keep no windows).
    pub(super) fn for_source(source: &ValueSource) -> Option<Progress> {
        match source {
            ValueSource::One
            | ValueSource::Distinct(_)
            | ValueSource::Conversion { .. }
            | ValueSource::Retention { .. } => Some(Progress::Counts(Vec::new())),
            ValueSource::Sum(_) => Some(Progress::Sums(Vec::new())),
            ValueSource::Threshold { .. } | ValueSource::Ratio { .. } => None,
        }
    }

    /// Adds one to a step.
    pub(super) fn add_one(&mut self, step: usize) {
        if let Progress::Counts(counts) = self {
            *grown(counts, step) += 1;
        }
    }

    /// Adds an amount to a step; false when the step's sum would leave the exact range (the
    /// record is then no longer exact and the caller drops it).
    pub(super) fn add_amount(&mut self, step: usize, amount: Decimal) -> bool {
        let Progress::Sums(sums) = self else {
            return false;
        };
        let sum = grown(sums, step);
        match sum.checked_add(amount) {
            Some(total) => {
                *sum = total;
                true
            }
            None => false,
        }
    }

    /// Moves one from a step to an earlier one: a member's earliest event moved.
    pub(super) fn move_one(&mut self, from: usize, to: usize) {
        if let Progress::Counts(counts) = self {
            if let Some(count) = counts.get_mut(from) {
                *count = count.saturating_sub(1);
            }
            *grown(counts, to) += 1;
        }
    }

    /// What the steps before `steps` added, in the form of `zero` (a count, distinct count or
    /// sum).
    pub fn before(&self, steps: usize, zero: AggValue) -> AggValue {
        match self {
            Progress::Counts(counts) => {
                let total: u64 = counts.iter().take(steps).sum();
                match zero {
                    AggValue::Distinct(_) => AggValue::Distinct(total),
                    _ => AggValue::Count(total),
                }
            }
            Progress::Sums(sums) => {
                AggValue::Sum(sums.iter().take(steps).fold(Decimal::ZERO, |total, sum| {
                    total.checked_add(*sum).unwrap_or(total)
                }))
            }
        }
    }
}

/// The element of a step, the record grown to hold it: exactly, so a record takes its steps'
/// bytes and no more (it grows once a step, a copy of at most a few KiB).
fn grown<T: Default + Clone>(steps: &mut Vec<T>, step: usize) -> &mut T {
    if steps.len() <= step {
        steps.reserve_exact(step + 1 - steps.len());
        steps.resize(step + 1, T::default());
    }
    &mut steps[step]
}

/// A metric's baseline for its current window.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    /// The elapsed time since the current window's start that the past windows are read at,
    /// rounded down to their steps.
    pub elapsed_ms: i64,
    /// The past windows read, each with its value at that point: the previous window (weekly,
    /// monthly), the same weekday (and hour) 1 to 4 weeks back that the state holds (daily,
    /// hourly), or the previous range (trailing, read whole).
    pub points: Vec<BaselinePoint>,
}

/// One past window of a baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselinePoint {
    /// Weeks back for a seasonal (daily, hourly) baseline; `None` for the previous window.
    pub weeks_back: Option<u8>,
    pub bounds: WindowBounds,
    pub value: AggValue,
}

impl Baseline {
    /// The baseline: the one point's value, or the median of the seasonal points (the mean of
    /// the middle two for an even count, as PromQL's `quantile(0.5, ...)`). Points whose
    /// value is undefined (a ratio of 0/0) are left out; NaN when all are.
    pub fn value(&self) -> f64 {
        let mut values: Vec<f64> = self
            .points
            .iter()
            .map(|point| point.value.to_f64())
            .filter(|value| !value.is_nan())
            .collect();
        values.sort_by(f64::total_cmp);
        match values.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => values[n / 2],
            n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        }
    }
}

/// What the partitions hold of one past window at an elapsed point.
enum PastValue {
    /// No partition holds the window: it had no events (or nsm did not run then).
    Absent,
    /// A partition holds it without a progress record (stored before records existed).
    Unknown,
    Known(AggValue),
}

/// The baseline of a calendar metric's `current` window at instance clock `clock_ms`; `None`
/// when no past window has a value at that point.
pub(super) fn calendar_baseline<'a>(
    plan: &Plan,
    partitions: impl Iterator<Item = &'a PartitionState> + Clone,
    index: usize,
    current: WindowBounds,
    clock_ms: EpochMillis,
) -> Option<Baseline> {
    let compiled = &plan.compiled[index];
    let unit = compiled.window;
    let step_ms = progress_step_ms(unit);
    let steps = usize::try_from((clock_ms - current.start_ms).max(0) / step_ms).unwrap_or(0);
    let calendar = plan.calendar();
    let points: Vec<BaselinePoint> = past_windows(calendar, unit, current)
        .into_iter()
        .filter_map(|(weeks_back, bounds)| {
            let value = past_value(plan, partitions.clone(), index, bounds, steps)?;
            Some(BaselinePoint {
                weeks_back,
                bounds,
                value,
            })
        })
        .collect();
    (!points.is_empty()).then(|| Baseline {
        elapsed_ms: steps as i64 * step_ms,
        points,
    })
}

/// The past windows a calendar window is compared with: the previous one for weeks and
/// months, the same weekday (and hour) 1 to [`SEASONAL_WEEKS`] weeks back for days and hours.
fn past_windows(
    calendar: &Calendar,
    unit: CalendarUnit,
    current: WindowBounds,
) -> Vec<(Option<u8>, WindowBounds)> {
    match unit {
        CalendarUnit::Week | CalendarUnit::Month => calendar
            .previous(unit, current)
            .map(|previous| (None, previous))
            .into_iter()
            .collect(),
        CalendarUnit::Hour | CalendarUnit::Day => (1..=SEASONAL_WEEKS)
            .filter_map(|weeks| {
                let bounds = calendar.weeks_before(unit, current, i64::from(weeks))?;
                Some((Some(weeks), bounds))
            })
            .collect(),
    }
}

/// A metric's value in a past window after `steps` steps, summed over partitions; `None`
/// when unknown or absent.
fn past_value<'a>(
    plan: &Plan,
    partitions: impl Iterator<Item = &'a PartitionState> + Clone,
    index: usize,
    bounds: WindowBounds,
    steps: usize,
) -> Option<AggValue> {
    match &plan.compiled[index].value {
        ValueSource::Threshold { .. } => None,
        ValueSource::Ratio {
            numerator,
            denominator,
        } => {
            let numerator = progress_value(plan, partitions.clone(), *numerator, bounds, steps);
            let denominator = progress_value(plan, partitions, *denominator, bounds, steps);
            match (numerator, denominator) {
                (PastValue::Unknown, _) | (_, PastValue::Unknown) => None,
                (PastValue::Absent, PastValue::Absent) => None,
                (numerator, denominator) => Some(AggValue::ratio(
                    numerator.or_zero(AggValue::Count(0)),
                    denominator.or_zero(AggValue::Count(0)),
                )),
            }
        }
        ValueSource::Retention { of } => {
            let unit = plan.compiled[index].window;
            let returning = progress_value(plan, partitions.clone(), index, bounds, steps);
            let before = plan
                .calendar()
                .previous(unit, bounds)
                .and_then(|before| whole_value(partitions, *of, before));
            match (returning, before) {
                (PastValue::Unknown, _) | (PastValue::Absent, None) => None,
                (returning, before) => Some(AggValue::ratio(
                    returning.or_zero(AggValue::Count(0)),
                    before.unwrap_or(AggValue::Distinct(0)),
                )),
            }
        }
        _ => match progress_value(plan, partitions, index, bounds, steps) {
            PastValue::Known(value) => Some(value),
            PastValue::Absent | PastValue::Unknown => None,
        },
    }
}

impl PastValue {
    fn or_zero(self, zero: AggValue) -> AggValue {
        match self {
            PastValue::Known(value) => value,
            PastValue::Absent | PastValue::Unknown => zero,
        }
    }
}

/// The steps before `steps` of a stateful metric's window, summed over partitions.
fn progress_value<'a>(
    plan: &Plan,
    partitions: impl Iterator<Item = &'a PartitionState>,
    index: usize,
    bounds: WindowBounds,
    steps: usize,
) -> PastValue {
    // What the window holds: a retention's windows hold its returning entities.
    let zero = match &plan.compiled[index].value {
        ValueSource::Retention { .. } => AggValue::Count(0),
        source => AggValue::zero_for(source),
    };
    let mut total = None;
    for state in partitions {
        let Some(window) = state.windows[index].get(&bounds.start_ms) else {
            continue;
        };
        let Some(progress) = &window.progress else {
            return PastValue::Unknown;
        };
        let value = progress.before(steps, zero);
        total = Some(total.map_or(value, |total: AggValue| total.plus(value)));
    }
    total.map_or(PastValue::Absent, PastValue::Known)
}

/// A metric's whole window, summed over the partitions holding it; `None` when none does.
fn whole_value<'a>(
    partitions: impl Iterator<Item = &'a PartitionState>,
    index: usize,
    bounds: WindowBounds,
) -> Option<AggValue> {
    partitions
        .filter_map(|state| state.windows[index].get(&bounds.start_ms))
        .map(|window| window.agg.value())
        .reduce(AggValue::plus)
}
