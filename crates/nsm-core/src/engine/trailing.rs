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
//!
//! What is stored per member: the last occurrence per period, with its own previous one (6
//! bytes, see [`Last::encode`]), and an entry per other occurrence (its previous one) only
//! where an event can still need it. Only a late event reads an occurrence that is not its
//! period's last, in its own bucket or a later one, and every accepted event's bucket ends
//! after the newest event less the allowed lateness. So a last that a newer occurrence
//! replaces is written apart only if its bucket ends after that: an occurrence costs one entry
//! (not two, as before) unless the member's previous one is within the lateness and a step.
//! State format 3 kept the last's bucket alone (8 bytes) and wrote every occurrence apart;
//! both are read.

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
    /// The earliest event time the partition still accepts (its watermark less the allowed
    /// lateness): occurrences in buckets no accepted event can reach need no entry of their
    /// own.
    pub accepted_from_ms: EpochMillis,
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
    /// newest event time, this event's included. Returns whether the member is new in the
    /// bucket.
    pub fn add(
        &mut self,
        source: &Source<'_>,
        bucket_ms: EpochMillis,
        member: &[u8],
        newest_ms: EpochMillis,
    ) -> Result<bool, StateReadError> {
        let (metric, step_ms) = (self.metric, self.trailing.step_ms);
        let period_ms = self.period_of(bucket_ms);
        let last_key = last_key(member);
        let last_in_period = self.last_in(source, period_ms, &last_key)?;
        if self
            .occurrence(source, bucket_ms, member, last_in_period)?
            .is_some()
        {
            return Ok(false);
        }
        let next = self.next_occurrence(source, bucket_ms, member, &last_key, newest_ms)?;
        let length = self.trailing.length_ms;
        let previous = match next {
            Some(next) if next.previous_ms != NO_PREVIOUS => next.previous_ms,
            // No later occurrence: the latest before this bucket is the latest before it.
            // A later one with none within a length before it tells nothing of an earlier
            // one within a length of this bucket, but none is in `[next - length, bucket)`:
            // the latest before this bucket is the latest before `min(bucket, next - length)`.
            // Either way no occurrence lies between that bound and the end of its period, so
            // the period's last, or else the period before's, is it.
            _ => {
                let before = next.map_or(bucket_ms, |next| bucket_ms.min(next.bucket_ms - length));
                let period = self.period_of(before);
                let in_period = if period == period_ms {
                    last_in_period
                } else {
                    self.last_in(source, period, &last_key)?
                };
                match in_period {
                    Some(last) => Some(last),
                    None => self.last_in(source, period - length, &last_key)?,
                }
                .map_or(NO_PREVIOUS, |last| last.bucket_ms)
            }
        };

        self.count_member(bucket_ms);
        self.count_gap(bucket_ms, previous, 1);
        if let Some(next) = next {
            self.count_gap(next.bucket_ms, next.previous_ms, -1);
            self.count_gap(next.bucket_ms, bucket_ms, 1);
            self.set_previous(next, member, &last_key, bucket_ms);
        }
        match last_in_period {
            Some(last) if last.bucket_ms > bucket_ms => {
                // A late occurrence before the period's last: an entry of its own.
                self.members
                    .put(metric, bucket_ms, member, &encode_previous(previous));
            }
            _ => {
                if let Some(Last {
                    bucket_ms: superseded_ms,
                    previous_ms: Some(previous_of_superseded),
                }) = last_in_period
                {
                    // The replaced last needs an entry of its own only while an event can
                    // still land in its bucket, or probe it: its bucket ends after the
                    // earliest event time still accepted. Format 3 wrote one anyway.
                    if superseded_ms + step_ms > self.accepted_from_ms {
                        self.members.put_rarely_read(
                            metric,
                            superseded_ms,
                            member,
                            &encode_previous(previous_of_superseded),
                        );
                    }
                }
                let last = Last {
                    bucket_ms,
                    previous_ms: Some(previous),
                };
                self.members.put(
                    metric,
                    period_ms,
                    &last_key,
                    &last.encode(period_ms, step_ms),
                );
                // The period's first bucket holds the entry, so that it expires with it.
                self.ensure_window(period_ms);
            }
        }
        Ok(true)
    }

    /// The previous occurrence stored for the member's occurrence in `bucket_ms`, if it has
    /// one there; `last` is the member's last occurrence in the bucket's period.
    fn occurrence(
        &mut self,
        source: &Source<'_>,
        bucket_ms: EpochMillis,
        member: &[u8],
        last: Option<Last>,
    ) -> Result<Option<EpochMillis>, StateReadError> {
        match last {
            None => Ok(None),
            Some(last) if last.bucket_ms < bucket_ms => Ok(None),
            Some(Last {
                bucket_ms: last_ms,
                previous_ms: Some(previous_ms),
            }) if last_ms == bucket_ms => Ok(Some(previous_ms)),
            // Before the last (or the last as format 3 kept it): the occurrence's own entry.
            Some(_) => Ok(self
                .members
                .get(source, self.metric, bucket_ms, member)?
                .map(|value| decode_previous(&value))),
        }
    }

    /// The member's nearest occurrence after `bucket_ms`. Only a late event has one: it can
    /// only be in the buckets up to the partition's newest event, which are probed in turn.
    fn next_occurrence(
        &mut self,
        source: &Source<'_>,
        bucket_ms: EpochMillis,
        member: &[u8],
        last_key: &[u8],
        newest_ms: EpochMillis,
    ) -> Result<Option<Next>, StateReadError> {
        let step = self.trailing.step_ms;
        let newest_bucket = self.trailing.bucket_of(newest_ms).start_ms;
        let mut probe = bucket_ms + step;
        let mut last_of: Option<(EpochMillis, Option<Last>)> = None;
        while probe <= newest_bucket {
            if self.windows.contains_key(&probe) {
                let period_ms = self.period_of(probe);
                let last = match last_of {
                    Some((period, last)) if period == period_ms => last,
                    _ => self.last_in(source, period_ms, last_key)?,
                };
                last_of = Some((period_ms, last));
                if let Some(previous_ms) = self.occurrence(source, probe, member, last)? {
                    let is_last = last
                        .is_some_and(|last| last.bucket_ms == probe && last.previous_ms.is_some());
                    return Ok(Some(Next {
                        bucket_ms: probe,
                        previous_ms,
                        held_by_last: is_last.then_some(period_ms),
                    }));
                }
            }
            probe += step;
        }
        Ok(None)
    }

    /// Stores `previous_ms` as the previous occurrence of `next`, where it is kept.
    fn set_previous(
        &mut self,
        next: Next,
        member: &[u8],
        last_key: &[u8],
        previous_ms: EpochMillis,
    ) {
        match next.held_by_last {
            Some(period_ms) => {
                let last = Last {
                    bucket_ms: next.bucket_ms,
                    previous_ms: Some(previous_ms),
                };
                let value = last.encode(period_ms, self.trailing.step_ms);
                self.members.put(self.metric, period_ms, last_key, &value);
            }
            None => self.members.put(
                self.metric,
                next.bucket_ms,
                member,
                &encode_previous(previous_ms),
            ),
        }
    }

    /// The member's last occurrence stored for the period starting at `period_ms`.
    fn last_in(
        &mut self,
        source: &Source<'_>,
        period_ms: EpochMillis,
        last_key: &[u8],
    ) -> Result<Option<Last>, StateReadError> {
        let Some(value) = self.members.get(source, self.metric, period_ms, last_key)? else {
            return Ok(None);
        };
        let step_ms = self.trailing.step_ms;
        Last::decode(&value, period_ms, step_ms)
            .map(Some)
            .ok_or_else(|| {
                StateReadError(format!(
                    "a stored last occurrence of trailing metric {} is malformed ({} bytes)",
                    self.metric,
                    value.len()
                ))
            })
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

/// A member's last occurrence in a period, as its entry keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Last {
    pub bucket_ms: EpochMillis,
    /// The occurrence's previous one ([`NO_PREVIOUS`] for none); `None` in an entry of state
    /// format 3, which kept the bucket alone and gave the occurrence an entry of its own.
    pub previous_ms: Option<EpochMillis>,
}

/// The short form's "no previous occurrence".
const NONE_BACK: u32 = u32::MAX;

impl Last {
    /// The entry's value, in the window starting at `start_ms`. Short (6 bytes) when it can
    /// be: the bucket's index in steps from the window's start (`u16`), then how many steps
    /// back the previous occurrence is (`u32`, [`NONE_BACK`] for none). Short values are
    /// what the member cache holds (`members::Small`). Else long (16 bytes): both bucket
    /// starts. Never 8 bytes, format 3's form.
    pub fn encode(self, start_ms: EpochMillis, step_ms: i64) -> Box<[u8]> {
        let previous_ms = self.previous_ms.unwrap_or(NO_PREVIOUS);
        let steps = |from: EpochMillis, to: EpochMillis| {
            let span = to.checked_sub(from)?;
            (span % step_ms == 0).then_some(span / step_ms)
        };
        let index = steps(start_ms, self.bucket_ms).and_then(|index| u16::try_from(index).ok());
        let back = if previous_ms == NO_PREVIOUS {
            Some(NONE_BACK)
        } else {
            steps(previous_ms, self.bucket_ms)
                .and_then(|back| u32::try_from(back).ok())
                .filter(|back| *back != NONE_BACK)
        };
        if let (Some(index), Some(back)) = (index, back) {
            let mut value = [0; 6];
            value[..2].copy_from_slice(&index.to_be_bytes());
            value[2..].copy_from_slice(&back.to_be_bytes());
            return Box::from(value);
        }
        let mut value = [0; 16];
        value[..8].copy_from_slice(&self.bucket_ms.to_be_bytes());
        value[8..].copy_from_slice(&previous_ms.to_be_bytes());
        Box::from(value)
    }

    /// Reads an entry of the window starting at `start_ms`, in any of its forms: short, long,
    /// or format 3's (8 bytes, the bucket alone).
    pub fn decode(value: &[u8], start_ms: EpochMillis, step_ms: i64) -> Option<Self> {
        let word = |offset: usize| {
            let bytes = value.get(offset..offset + 8)?;
            Some(i64::from_be_bytes(bytes.try_into().ok()?))
        };
        match value.len() {
            6 => {
                let index = u16::from_be_bytes(value[..2].try_into().ok()?);
                let back = u32::from_be_bytes(value[2..].try_into().ok()?);
                let bucket_ms = start_ms + i64::from(index) * step_ms;
                let previous_ms = if back == NONE_BACK {
                    NO_PREVIOUS
                } else {
                    bucket_ms - i64::from(back) * step_ms
                };
                Some(Last {
                    bucket_ms,
                    previous_ms: Some(previous_ms),
                })
            }
            8 => Some(Last {
                bucket_ms: word(0)?,
                previous_ms: None,
            }),
            16 => Some(Last {
                bucket_ms: word(0)?,
                previous_ms: Some(word(8)?),
            }),
            _ => None,
        }
    }
}

/// The bucket of a stored last occurrence (an entry tagged `0x00` of a trailing distinct
/// count, in the window starting at `start_ms`), for tests that check what is stored.
pub fn last_occurrence_bucket(
    value: &[u8],
    start_ms: EpochMillis,
    step_ms: i64,
) -> Option<EpochMillis> {
    Last::decode(value, start_ms, step_ms).map(|last| last.bucket_ms)
}

/// A member's occurrence after the one being added.
#[derive(Debug, Clone, Copy)]
struct Next {
    bucket_ms: EpochMillis,
    previous_ms: EpochMillis,
    /// The first bucket of its period when the period's last-occurrence entry holds its
    /// previous occurrence; `None` when the occurrence has an entry of its own.
    held_by_last: Option<EpochMillis>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_last_occurrence_reads_back_in_every_form() {
        const STEP: i64 = 900_000;
        let period = 1_795_435_200_000 - 7 * 86_400_000;
        let bucket = period + 5 * STEP;
        let read = |last: Last| {
            let value = last.encode(period, STEP);
            (value.len(), Last::decode(&value, period, STEP))
        };
        for previous in [NO_PREVIOUS, bucket - STEP, bucket - 1000 * STEP] {
            let last = Last {
                bucket_ms: bucket,
                previous_ms: Some(previous),
            };
            assert_eq!(read(last), (6, Some(last)), "short, cached");
        }
        // Off the steps, or too far for the short form: long.
        for (bucket_ms, previous) in [
            (bucket, bucket - 1),
            (period + 70_000 * STEP, bucket),
            (bucket, bucket - (1 << 33) * STEP),
        ] {
            let last = Last {
                bucket_ms,
                previous_ms: Some(previous),
            };
            assert_eq!(read(last), (16, Some(last)));
        }
        let format_3 = Last::decode(&bucket.to_be_bytes(), period, STEP);
        assert_eq!(
            format_3,
            Some(Last {
                bucket_ms: bucket,
                previous_ms: None
            })
        );
        assert_eq!(Last::decode(&[0; 12], period, STEP), None);
    }
}
