//! In-memory state of one partition, and its stored form.
//!
//! **Time.** A partition's *watermark* is the largest event time applied, each taken no
//! further than the wall clock when it was applied: one event stamped ahead (local time sent
//! as UTC) counts in its own window but does not make the on-time events beside it late. An
//! event more than `allowed_lateness` behind the watermark is late: lateness is measured
//! against the stream, so old events replayed in order are not. The partition's *clock* is the
//! watermark, or the wall clock once the caller finds the partition idle: it picks and
//! completes windows, so time moves without traffic, but it never makes an event late, so a
//! backfill of a stalled period still counts. A window is complete once every owned
//! partition's clock has passed its end by the lateness. Validation keeps `max_future_skew`
//! within `allowed_lateness`: a replay applies an event stamped ahead at a later wall clock,
//! where it may move the watermark, and the events sent beside it must still be on time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::baseline::Progress;
use super::members::MemberIndex;
use super::plan::{Plan, ValueSource};
use super::upstream::Upstream;
use crate::decimal::Decimal;
use crate::window::WindowBounds;
use crate::EpochMillis;

/// The value of one metric in one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggValue {
    Count(u64),
    Sum(Decimal),
    Distinct(u64),
    /// Both parts, exact; the quotient is taken only when a float is needed.
    Ratio {
        numerator: Decimal,
        denominator: Decimal,
    },
}

impl AggValue {
    /// The value as a float; a ratio with a zero denominator is NaN (undefined, not zero).
    pub fn to_f64(self) -> f64 {
        match self {
            Self::Count(count) | Self::Distinct(count) => count as f64,
            Self::Sum(sum) => sum.to_f64(),
            Self::Ratio {
                numerator,
                denominator,
            } => {
                if denominator == Decimal::ZERO {
                    f64::NAN
                } else {
                    numerator.to_f64() / denominator.to_f64()
                }
            }
        }
    }

    /// The exact value of a count, distinct count or sum; `None` for a ratio.
    pub fn to_decimal(self) -> Option<Decimal> {
        match self {
            Self::Count(count) | Self::Distinct(count) => Some(Decimal::from_count(count)),
            Self::Sum(sum) => Some(sum),
            Self::Ratio { .. } => None,
        }
    }

    /// The ratio of two values of the same window.
    pub fn ratio(numerator: AggValue, denominator: AggValue) -> AggValue {
        Self::Ratio {
            numerator: numerator.to_decimal().unwrap_or(Decimal::ZERO),
            denominator: denominator.to_decimal().unwrap_or(Decimal::ZERO),
        }
    }

    /// Adds the value of another partition for the same window. Distinct counts add up
    /// exactly only when events are keyed by the distinct entity (see ARCHITECTURE.md).
    pub fn plus(self, other: AggValue) -> AggValue {
        match (self, other) {
            (Self::Count(a), Self::Count(b)) => Self::Count(a.saturating_add(b)),
            (Self::Distinct(a), Self::Distinct(b)) => Self::Distinct(a.saturating_add(b)),
            (Self::Sum(a), Self::Sum(b)) => Self::Sum(a.checked_add(b).unwrap_or(a)),
            (
                Self::Ratio {
                    numerator: a,
                    denominator: b,
                },
                Self::Ratio {
                    numerator: c,
                    denominator: d,
                },
            ) => Self::Ratio {
                numerator: a.checked_add(c).unwrap_or(a),
                denominator: b.checked_add(d).unwrap_or(b),
            },
            (mismatched, _) => mismatched,
        }
    }

    /// The zero of a metric of the plan.
    pub fn zero_of(plan: &Plan, metric: usize) -> AggValue {
        plan.compiled
            .get(metric)
            .map_or(Self::Count(0), |compiled| Self::zero_for(&compiled.value))
    }

    /// The zero of a metric's kind.
    pub(super) fn zero_for(source: &ValueSource) -> AggValue {
        match source {
            ValueSource::One => Self::Count(0),
            ValueSource::Sum(_) => Self::Sum(Decimal::ZERO),
            ValueSource::Distinct(_)
            | ValueSource::Threshold { .. }
            | ValueSource::Conversion { .. } => Self::Distinct(0),
            ValueSource::Ratio { .. } | ValueSource::Retention { .. } => Self::Ratio {
                numerator: Decimal::ZERO,
                denominator: Decimal::ZERO,
            },
        }
    }
}

impl std::fmt::Display for AggValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(count) | Self::Distinct(count) => write!(f, "{count}"),
            Self::Sum(sum) => write!(f, "{sum}"),
            Self::Ratio {
                numerator,
                denominator,
            } => write!(f, "{numerator}/{denominator}"),
        }
    }
}

/// A stored window of one metric in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWindow {
    pub metric: usize,
    pub start_ms: EpochMillis,
    pub end_ms: EpochMillis,
    pub value: AggValue,
    /// What each step of the window added (see [`super::baseline`]); `None` for kinds that
    /// keep none, trailing buckets, and windows stored before records were kept.
    pub progress: Option<Progress>,
}

/// In a bucket of a trailing distinct metric: how many of its members (or of one segment's)
/// occurred last before it in the bucket starting at `previous_ms` ([`NO_PREVIOUS`] when not
/// within the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGap {
    pub metric: usize,
    pub start_ms: EpochMillis,
    /// The segment key, or empty for the bucket's own histogram (no segment key is empty).
    pub segment: Box<[u8]>,
    pub previous_ms: EpochMillis,
    pub count: u64,
}

/// The `previous_ms` of members that did not occur within the trailing length before.
pub const NO_PREVIOUS: EpochMillis = EpochMillis::MIN;

/// A stored segment of one window of one metric in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSegment {
    pub metric: usize,
    pub start_ms: EpochMillis,
    pub segment: Box<[u8]>,
    pub value: AggValue,
}

/// Everything stored for one partition; restoring it gives back the exact in-memory state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionSnapshot {
    pub next_offset: Option<i64>,
    pub max_event_ms: Option<EpochMillis>,
    /// `None` in state written before the watermark was kept apart from the newest event
    /// (formats 3 and 4): it was the newest event then.
    pub event_watermark_ms: Option<EpochMillis>,
    pub idle_floor_ms: Option<EpochMillis>,
    pub windows: Vec<StoredWindow>,
    pub segments: Vec<StoredSegment>,
    /// The gap histograms of trailing distinct metrics' buckets.
    pub gaps: Vec<StoredGap>,
    /// Per metric added to the config or changed while the partition already had state: the
    /// partition's event watermark then. Its windows starting before it lack the events
    /// before it: partial.
    pub metric_since: Vec<(usize, EpochMillis)>,
    /// The store holds no member entry of the partition: every entry will be one the engine
    /// wrote, so none is read back, and shard snapshots can be taken from memory. `false`
    /// (the default) when unknown.
    pub no_stored_members: bool,
    /// A repartition partition's sources (see [`super::upstream`]).
    pub upstream: Option<Upstream>,
}

/// A window's value in memory. Members of distinct sets and threshold progress are kept by
/// the partition's [`MemberIndex`], not here: memory does not grow with the entities.
#[derive(Debug)]
pub(super) enum Agg {
    Count(u64),
    Sum(Decimal),
    Distinct(u64),
    /// Entities that reached the threshold; in a trailing threshold's bucket, those qualifying
    /// in the range of one length ending with it (see [`super::trailing_threshold`]).
    Threshold(u64),
}

impl Agg {
    pub fn empty(source: &ValueSource) -> Agg {
        match source {
            ValueSource::One => Agg::Count(0),
            ValueSource::Sum(_) => Agg::Sum(Decimal::ZERO),
            // A conversion's window holds the entities that converted in it.
            ValueSource::Distinct(_) | ValueSource::Conversion { .. } => Agg::Distinct(0),
            ValueSource::Threshold { .. } => Agg::Threshold(0),
            // The number of returning entities; the rate is taken when read.
            ValueSource::Retention { .. } => Agg::Count(0),
            // Never reached: ratios keep no windows (the engine skips them when applying).
            ValueSource::Ratio { .. } => Agg::Count(0),
        }
    }

    /// A stored value back in the form a metric of `source` keeps; `None` when the kinds
    /// differ.
    pub fn restored(value: AggValue, source: &ValueSource) -> Option<Agg> {
        Some(match (value, source) {
            (AggValue::Count(count), ValueSource::One | ValueSource::Retention { .. }) => {
                Agg::Count(count)
            }
            (AggValue::Sum(sum), ValueSource::Sum(_)) => Agg::Sum(sum),
            (
                AggValue::Distinct(count),
                ValueSource::Distinct(_) | ValueSource::Conversion { .. },
            ) => Agg::Distinct(count),
            (AggValue::Distinct(reached), ValueSource::Threshold { .. }) => Agg::Threshold(reached),
            _ => return None,
        })
    }

    /// The same kind of value, at zero.
    pub fn emptied(&self) -> Agg {
        match self {
            Agg::Count(_) => Agg::Count(0),
            Agg::Sum(_) => Agg::Sum(Decimal::ZERO),
            Agg::Distinct(_) => Agg::Distinct(0),
            Agg::Threshold(_) => Agg::Threshold(0),
        }
    }

    pub fn value(&self) -> AggValue {
        match self {
            Agg::Count(count) => AggValue::Count(*count),
            Agg::Sum(sum) => AggValue::Sum(*sum),
            Agg::Distinct(count) => AggValue::Distinct(*count),
            // The number of entities past the threshold is a distinct count of entities.
            Agg::Threshold(reached) => AggValue::Distinct(*reached),
        }
    }
}

#[derive(Debug)]
pub(super) struct WindowState {
    pub end_ms: EpochMillis,
    pub agg: Agg,
    /// The breakdown of a segmented metric, by segment key (empty otherwise).
    pub segments: HashMap<Box<[u8]>, Agg>,
    /// A trailing distinct bucket's members by the bucket of their previous occurrence
    /// (see [`super::trailing`]); empty otherwise.
    pub gaps: BTreeMap<EpochMillis, u64>,
    /// The same per segment of a breakdown.
    pub segment_gaps: HashMap<Box<[u8]>, BTreeMap<EpochMillis, u64>>,
    /// What each step of a calendar window added to `agg` (see [`super::baseline`]): set when
    /// the window is created, so a window restored without one never gets a partial one.
    pub progress: Option<Progress>,
}

impl WindowState {
    pub fn new(end_ms: EpochMillis, agg: Agg) -> WindowState {
        WindowState {
            end_ms,
            agg,
            segments: HashMap::new(),
            gaps: BTreeMap::new(),
            segment_gaps: HashMap::new(),
            progress: None,
        }
    }

    /// Adds one to a bucket's count (its members, or its entities past a threshold), or to one
    /// of its segments', and notes the change for the next checkpoint.
    pub fn count_one(
        &mut self,
        pending: &mut Pending,
        metric: usize,
        start_ms: EpochMillis,
        segment: Option<&[u8]>,
    ) {
        let agg = match segment {
            None => &mut self.agg,
            Some(segment) => {
                let empty = self.agg.emptied();
                self.segments.entry(segment.into()).or_insert(empty)
            }
        };
        if let Agg::Distinct(count) | Agg::Threshold(count) = agg {
            *count += 1;
        }
        match segment {
            None => pending.dirty_windows.insert((metric, start_ms)),
            Some(segment) => pending
                .dirty_segments
                .insert((metric, start_ms, segment.into())),
        };
    }

    /// The gap histogram of the bucket, or of one of its segments.
    pub fn gaps_of(&self, segment: Option<&[u8]>) -> Option<&BTreeMap<EpochMillis, u64>> {
        match segment {
            None => Some(&self.gaps),
            Some(segment) => self.segment_gaps.get(segment),
        }
    }
}

/// The bucket of a trailing metric starting at `start_ms`, created (`empty`, noted for the
/// next checkpoint) if new.
pub(super) fn ensure_bucket<'w>(
    windows: &'w mut BTreeMap<EpochMillis, WindowState>,
    pending: &mut Pending,
    metric: usize,
    bucket: WindowBounds,
    empty: Agg,
) -> &'w mut WindowState {
    windows.entry(bucket.start_ms).or_insert_with(|| {
        pending.dirty_windows.insert((metric, bucket.start_ms));
        WindowState::new(bucket.end_ms, empty)
    })
}

/// Changes since the last [`PartitionState::take_changes`].
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub dirty_windows: BTreeSet<(usize, EpochMillis)>,
    /// (metric, bucket start, segment (empty for the bucket's own), previous bucket) of
    /// changed gap counts.
    pub dirty_gaps: BTreeSet<(usize, EpochMillis, Box<[u8]>, EpochMillis)>,
    pub dirty_segments: BTreeSet<(usize, EpochMillis, Box<[u8]>)>,
    pub meta_dirty: bool,
    pub upstream_dirty: bool,
}

#[derive(Debug)]
pub(super) struct PartitionState {
    pub next_offset: Option<i64>,
    /// The largest event time applied: how far ahead the partition's entries can be.
    pub max_event_ms: Option<EpochMillis>,
    /// The largest event time applied, each taken no further than the wall clock when it
    /// was applied; drives lateness (see [`PartitionState::watermark_ms`]).
    pub event_watermark_ms: Option<EpochMillis>,
    /// The wall clock at the last idle advance; lets windows roll over and complete without
    /// events, never makes an event late.
    pub idle_floor_ms: Option<EpochMillis>,
    /// Per metric (plan order): windows by start.
    pub windows: Vec<BTreeMap<EpochMillis, WindowState>>,
    /// Per metric: the window of the last event, to skip time-zone arithmetic for the next.
    pub last_window: Vec<Option<WindowBounds>>,
    /// Per metric: the first funnel period still stored, for conversion metrics (see
    /// [`super::funnel`]); `None` until the first sweep.
    pub funnels_kept_from: Vec<Option<EpochMillis>>,
    /// The first dedup id period still stored (see [`super::dedup`]); `None` until the
    /// first sweep.
    pub ids_kept_from: Option<EpochMillis>,
    /// Members, threshold progress and trailing occurrences: written ones and a cache.
    pub members: MemberIndex,
    /// Reading stored state failed while applying an event, which may then be half applied:
    /// nothing more is applied or taken for storage, so the stored state stays whole.
    pub poisoned: bool,
    pub pending: Pending,
    /// Per metric: from when this partition's data of it exists, when not from its start
    /// (see [`PartitionSnapshot::metric_since`]).
    pub metric_since: Vec<Option<EpochMillis>>,
    /// A repartition partition's sources (see [`super::upstream`]); `None` on an input one.
    pub upstream: Option<Upstream>,
}

impl PartitionState {
    /// Whether this partition's data of `metric` (or of the metrics it is computed from)
    /// began after `start_ms`.
    pub fn lacks_start_of(&self, plan: &Plan, metric: usize, start_ms: EpochMillis) -> bool {
        let began_after = |metric: usize| {
            self.metric_since
                .get(metric)
                .copied()
                .flatten()
                .is_some_and(|since_ms| since_ms > start_ms)
        };
        let parts = plan
            .ratio_parts(metric)
            .map(|(numerator, denominator)| [Some(numerator), Some(denominator)])
            .unwrap_or([plan.retention_base(metric), None]);
        began_after(metric) || parts.into_iter().flatten().any(began_after)
    }

    pub fn restore(
        plan: &Plan,
        snapshot: PartitionSnapshot,
        state_memory: usize,
    ) -> PartitionState {
        let metric_count = plan.compiled.len();
        let mut windows: Vec<BTreeMap<EpochMillis, WindowState>> =
            (0..metric_count).map(|_| BTreeMap::new()).collect();
        for stored in snapshot.windows {
            let Some(compiled) = plan.compiled.get(stored.metric) else {
                continue;
            };
            // A kind mismatch means the definition changed; the store discards such windows,
            // so this is only reached by a hand-made snapshot.
            let Some(agg) = Agg::restored(stored.value, &compiled.value) else {
                continue;
            };
            let mut window = WindowState::new(stored.end_ms, agg);
            window.progress = stored.progress;
            windows[stored.metric].insert(stored.start_ms, window);
        }
        for stored in snapshot.segments {
            let Some(window) = windows
                .get_mut(stored.metric)
                .and_then(|windows| windows.get_mut(&stored.start_ms))
            else {
                continue;
            };
            let Some(compiled) = plan.compiled.get(stored.metric) else {
                continue;
            };
            if let Some(agg) = Agg::restored(stored.value, &compiled.value) {
                window.segments.insert(stored.segment, agg);
            }
        }
        for gap in snapshot.gaps {
            if let Some(window) = windows
                .get_mut(gap.metric)
                .and_then(|windows| windows.get_mut(&gap.start_ms))
            {
                let gaps = if gap.segment.is_empty() {
                    &mut window.gaps
                } else {
                    window.segment_gaps.entry(gap.segment).or_default()
                };
                gaps.insert(gap.previous_ms, gap.count);
            }
        }
        let mut metric_since = vec![None; metric_count];
        for (metric, since_ms) in snapshot.metric_since {
            if let Some(slot) = metric_since.get_mut(metric) {
                *slot = Some(since_ms);
            }
        }
        PartitionState {
            metric_since,
            upstream: snapshot.upstream,
            next_offset: snapshot.next_offset,
            max_event_ms: snapshot.max_event_ms,
            event_watermark_ms: snapshot.event_watermark_ms.or(snapshot.max_event_ms),
            idle_floor_ms: snapshot.idle_floor_ms,
            windows,
            last_window: vec![None; metric_count],
            funnels_kept_from: vec![None; metric_count],
            ids_kept_from: None,
            members: if snapshot.no_stored_members {
                MemberIndex::new(state_memory).with_nothing_stored()
            } else {
                MemberIndex::new(state_memory)
            },
            poisoned: false,
            pending: Pending::default(),
        }
    }

    /// Event time below which events are late is `watermark - allowed_lateness`. The
    /// watermark is the largest event time applied, each bounded by the wall clock when it was
    /// applied: one event stamped ahead of the clock (a client sending local time as UTC)
    /// must not make the partition's on-time events late. Idle time never moves it, so a
    /// backfill of a stalled period is not late either.
    pub fn watermark_ms(&self) -> Option<EpochMillis> {
        self.event_watermark_ms
    }

    /// How far the partition's time has moved, for picking and completing windows: the
    /// watermark, or the wall clock once the partition has been idle.
    pub fn clock_ms(&self) -> Option<EpochMillis> {
        match (self.event_watermark_ms, self.idle_floor_ms) {
            (Some(event), Some(idle)) => Some(event.max(idle)),
            (event, idle) => event.or(idle),
        }
    }

    /// Applies an event at `event_time_ms` to the partition's time, at wall clock `now_ms`.
    pub fn advance_event_time(&mut self, event_time_ms: EpochMillis, now_ms: EpochMillis) {
        self.max_event_ms = Some(
            self.max_event_ms
                .map_or(event_time_ms, |max| max.max(event_time_ms)),
        );
        let bounded = event_time_ms.min(now_ms);
        self.event_watermark_ms = Some(
            self.event_watermark_ms
                .map_or(bounded, |watermark| watermark.max(bounded)),
        );
        self.pending.meta_dirty = true;
    }

    /// Notes an event at `event_time_ms` on a repartition partition, whose watermark its
    /// sources set (see [`super::upstream`]).
    pub fn note_newest(&mut self, event_time_ms: EpochMillis) {
        self.max_event_ms = Some(
            self.max_event_ms
                .map_or(event_time_ms, |max| max.max(event_time_ms)),
        );
        self.pending.meta_dirty = true;
    }

    /// Takes a repartition partition's time from its sources: the smallest of their
    /// watermarks and clocks, once all have reported. Never moves back.
    pub fn follow_upstream(&mut self) {
        let Some((watermark, clock)) = self.upstream.as_ref().and_then(Upstream::time) else {
            return;
        };
        if self
            .event_watermark_ms
            .is_none_or(|current| current < watermark)
        {
            self.event_watermark_ms = Some(watermark);
            self.pending.meta_dirty = true;
        }
        if clock > watermark && self.idle_floor_ms.is_none_or(|current| current < clock) {
            self.idle_floor_ms = Some(clock);
            self.pending.meta_dirty = true;
        }
    }

    /// The earliest event time the partition still accepts: no accepted event can land
    /// before it. `None` before any event.
    pub fn accepted_from_ms(&self, allowed_lateness_ms: i64) -> Option<EpochMillis> {
        self.watermark_ms()
            .map(|watermark| watermark.saturating_sub(allowed_lateness_ms))
    }
}
