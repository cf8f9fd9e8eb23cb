//! Exact trailing distinct counts in bounded memory.
//!
//! A trailing distinct metric keeps its members per step bucket, on disk. Uniting the sets of
//! the buckets in a range at every publish would need them all in memory, so instead each
//! occurrence (a member's first event in a bucket) remembers the bucket of the member's
//! previous occurrence, and each bucket keeps in memory only a histogram: how many of its
//! occurrences had their previous one in bucket p (its *gaps*). A member counts in the range
//! `[s, e)` exactly once, through its first occurrence in the range, which is the one whose
//! previous occurrence is before `s`:
//!
//! `distinct([s, e)) = Σ over buckets b in [s, e) of Σ over p < s of gaps[b][p]`
//!
//! Any range is exact, so `current`, `previous` and `before_previous` are. A previous
//! occurrence a whole length or more before b is kept as [`NO_PREVIOUS`]: every range holding
//! b starts after it. The histogram has at most one entry per bucket of the length, whatever
//! the number of members.
//!
//! A trailing retention ("members of this range also in the one before") counts the first
//! occurrences in `[s, e)` whose previous one is in `[s - length, s)`; its base keeps the
//! previous occurrence exactly two lengths back (the same algorithm, run for twice the
//! length), so that is a sum over the same histograms.
//!
//! Finding a new occurrence's neighbours: the previous one is the member's last occurrence
//! unless a later one exists. A later one can only be in the buckets up to the partition's
//! newest event, at most the allowed lateness away, which are probed one by one; it then knows
//! the previous one. Otherwise the member's last occurrence per period of one length (stored
//! under the period's first bucket, tag `0x00`) gives it, from this period or the one before.

use std::collections::BTreeMap;

use super::members::{MemberIndex, Source, StateReadError};
use super::state::{ensure_bucket, Agg, Pending, WindowState, NO_PREVIOUS};
use crate::window::Trailing;
use crate::EpochMillis;

/// The tag of a member's last occurrence in a period (member keys never start with 0).
const LAST_TAG: u8 = 0;

/// One trailing distinct metric of one partition (or one segment of it), being changed.
pub(super) struct TrailingDistinct<'a> {
    pub metric: usize,
    pub trailing: Trailing,
    /// The segment whose members are added (tagged with it), counted in the segment's value
    /// and histogram of each bucket; `None` for the metric's own.
    pub segment: Option<&'a [u8]>,
    pub windows: &'a mut BTreeMap<EpochMillis, WindowState>,
    pub members: &'a mut MemberIndex,
    /// Where the changed windows, segments and gap counts are noted.
    pub pending: &'a mut Pending,
}

impl TrailingDistinct<'_> {
    /// Records `member` in the bucket starting at `bucket_ms`; `newest_ms` is the partition's
    /// newest event time. Returns whether the member is new in the bucket.
    pub fn add(
        &mut self,
        source: &Source<'_>,
        bucket_ms: EpochMillis,
        member: &[u8],
        newest_ms: EpochMillis,
    ) -> Result<bool, StateReadError> {
        let metric = self.metric;
        if self.members.contains(source, metric, bucket_ms, member)? {
            return Ok(false);
        }
        let step = self.trailing.step_ms;
        // A later occurrence, nearest first.
        let mut next = None;
        let newest_bucket = self.trailing.bucket_of(newest_ms).start_ms;
        let mut probe = bucket_ms + step;
        while probe <= newest_bucket {
            if self.windows.contains_key(&probe) {
                if let Some(value) = self.members.get(source, metric, probe, member)? {
                    next = Some((probe, decode_previous(&value)));
                    break;
                }
            }
            probe += step;
        }
        let period_ms = self.period_of(bucket_ms);
        let last_key = last_key(member);
        let last_in_period = self.last_in(source, period_ms, &last_key)?;
        let length = self.trailing.length_ms;
        let previous = match next {
            Some((_, previous_of_next)) if previous_of_next != NO_PREVIOUS => previous_of_next,
            // No later occurrence: the latest before this bucket is the latest before it.
            // A later one with none within a length before it tells nothing of an earlier
            // one within a length of this bucket, but none is in `[next - length, bucket)`:
            // the latest before this bucket is the latest before `min(bucket, next - length)`.
            // Either way no occurrence lies between that bound and the end of its period, so
            // the period's last, or else the period before's, is it.
            _ => {
                let before = next.map_or(bucket_ms, |(next_ms, _)| bucket_ms.min(next_ms - length));
                let period = self.period_of(before);
                let in_period = if period == period_ms {
                    last_in_period
                } else {
                    self.last_in(source, period, &last_key)?
                };
                match in_period {
                    Some(last) => last,
                    None => self
                        .last_in(source, period - length, &last_key)?
                        .unwrap_or(NO_PREVIOUS),
                }
            }
        };

        self.members
            .put(metric, bucket_ms, member, encode_previous(previous));
        self.count_member(bucket_ms);
        self.count_gap(bucket_ms, previous, 1);
        if let Some((next_ms, previous_of_next)) = next {
            self.members
                .put(metric, next_ms, member, encode_previous(bucket_ms));
            self.count_gap(next_ms, previous_of_next, -1);
            self.count_gap(next_ms, bucket_ms, 1);
        }
        if last_in_period.is_none_or(|last| last < bucket_ms) {
            self.members
                .put(metric, period_ms, &last_key, encode_previous(bucket_ms));
            // The period's first bucket holds the entry, so that it expires with it.
            self.ensure_window(period_ms);
        }
        Ok(true)
    }

    /// The member's last occurrence stored for the period starting at `period_ms`.
    fn last_in(
        &mut self,
        source: &Source<'_>,
        period_ms: EpochMillis,
        last_key: &[u8],
    ) -> Result<Option<EpochMillis>, StateReadError> {
        Ok(self
            .members
            .get(source, self.metric, period_ms, last_key)?
            .map(|value| decode_previous(&value)))
    }

    /// The first bucket of the period of one length holding `bucket_ms`.
    fn period_of(&self, bucket_ms: EpochMillis) -> EpochMillis {
        bucket_ms.div_euclid(self.trailing.length_ms) * self.trailing.length_ms
    }

    /// One more member in the bucket's value, or its segment's.
    fn count_member(&mut self, bucket_ms: EpochMillis) {
        let (metric, segment) = (self.metric, self.segment);
        let bucket = self.trailing.bucket_of(bucket_ms);
        let empty = Agg::Distinct(0);
        let window = ensure_bucket(self.windows, self.pending, metric, bucket, empty);
        window.count_one(self.pending, metric, bucket_ms, segment);
    }

    fn count_gap(&mut self, bucket_ms: EpochMillis, previous_ms: EpochMillis, delta: i64) {
        let previous_ms = if previous_ms <= bucket_ms - self.trailing.length_ms {
            NO_PREVIOUS
        } else {
            previous_ms
        };
        let (metric, segment) = (self.metric, self.segment);
        let window = self.ensure_window(bucket_ms);
        let gaps = match segment {
            None => &mut window.gaps,
            Some(segment) => window.segment_gaps.entry(segment.into()).or_default(),
        };
        let count = gaps.entry(previous_ms).or_insert(0);
        *count = count.saturating_add_signed(delta);
        let segment = Box::from(segment.unwrap_or_default());
        self.pending
            .dirty_gaps
            .insert((metric, bucket_ms, segment, previous_ms));
    }

    fn ensure_window(&mut self, bucket_ms: EpochMillis) -> &mut WindowState {
        let bucket = self.trailing.bucket_of(bucket_ms);
        ensure_bucket(
            self.windows,
            self.pending,
            self.metric,
            bucket,
            Agg::Distinct(0),
        )
    }
}

/// The distinct members of one partition's buckets in `[start_ms, end_ms)`, or of one
/// segment's.
pub(super) fn distinct_in_range(
    windows: &BTreeMap<EpochMillis, WindowState>,
    start_ms: EpochMillis,
    end_ms: EpochMillis,
    segment: Option<&[u8]>,
) -> u64 {
    windows
        .range(start_ms..end_ms)
        .filter_map(|(_, bucket)| bucket.gaps_of(segment))
        .map(|gaps| gaps.range(..start_ms).map(|(_, count)| count).sum::<u64>())
        .sum()
}

/// The members of one partition's buckets in `[start_ms, end_ms)` that were also in the range
/// of the same length before it: those whose first occurrence in the range has its previous
/// one in the range before. Exact when the gaps reach two lengths back (`Plan::gap_span`).
pub(super) fn returning_in_range(
    windows: &BTreeMap<EpochMillis, WindowState>,
    start_ms: EpochMillis,
    end_ms: EpochMillis,
    segment: Option<&[u8]>,
) -> u64 {
    let before_ms = start_ms - (end_ms - start_ms);
    windows
        .range(start_ms..end_ms)
        .filter_map(|(_, bucket)| bucket.gaps_of(segment))
        .map(|gaps| {
            gaps.range(before_ms..start_ms)
                .map(|(_, count)| count)
                .sum::<u64>()
        })
        .sum()
}

/// The segments with members in one partition's buckets in `[start_ms, end_ms)`.
pub(super) fn segments_in_range(
    windows: &BTreeMap<EpochMillis, WindowState>,
    start_ms: EpochMillis,
    end_ms: EpochMillis,
) -> std::collections::BTreeSet<&[u8]> {
    windows
        .range(start_ms..end_ms)
        .flat_map(|(_, bucket)| bucket.segment_gaps.keys().map(|key| &**key))
        .collect()
}

fn last_key(member: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(member.len() + 1);
    key.push(LAST_TAG);
    key.extend_from_slice(member);
    key
}

/// A bucket start as stored; empty for none.
fn encode_previous(previous_ms: EpochMillis) -> Box<[u8]> {
    if previous_ms == NO_PREVIOUS {
        Box::default()
    } else {
        Box::from(previous_ms.to_be_bytes())
    }
}

fn decode_previous(value: &[u8]) -> EpochMillis {
    <[u8; 8]>::try_from(value).map_or(NO_PREVIOUS, i64::from_be_bytes)
}
