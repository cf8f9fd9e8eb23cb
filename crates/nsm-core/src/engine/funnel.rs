//! Conversion metrics: an entity did the start event A, then the conversion event B within a
//! duration D. It counts once in the window of B (when the conversion happened).
//!
//! Events arrive out of order, so both sides are remembered: the times of A events, and the
//! times of B events not yet converted. A late A converts earlier Bs within D after it.
//!
//! They are kept in the partition's member index, not in memory, under one pseudo-window of
//! the metric ([`FUNNEL_WINDOW`]): per entity and period of length D (aligned to the epoch),
//! one entry of A times and one of waiting B times. A B at t looks for As in its period and the
//! one before; an A at t looks for Bs in its period and the one after. Periods that no future
//! event can reach (ending before `watermark - lateness - D`) are deleted with one range
//! delete. That never changes a result, so the value equals a batch recomputation.

use super::members::{MemberIndex, Source, StateReadError};
use crate::EpochMillis;

/// The pseudo-window start under which a conversion metric's funnel entries are kept; no
/// calendar window starts there.
pub const FUNNEL_WINDOW: EpochMillis = EpochMillis::MIN;

const START_TAG: u8 = 1;
const WAITING_TAG: u8 = 2;

/// One conversion metric's funnels in one partition.
pub(super) struct Funnel<'a> {
    pub metric: usize,
    pub within_ms: i64,
    pub members: &'a mut MemberIndex,
}

impl Funnel<'_> {
    /// An A event of `entity` at `time_ms`: remembered, and the waiting Bs within D after it
    /// convert. Returns their times.
    pub fn start(
        &mut self,
        source: &Source<'_>,
        entity: &[u8],
        time_ms: EpochMillis,
    ) -> Result<Vec<EpochMillis>, StateReadError> {
        let period = self.period_of(time_ms);
        let key = entry_key(period, START_TAG, entity);
        let mut starts = self.times(source, &key)?;
        if let Err(position) = starts.binary_search(&time_ms) {
            starts.insert(position, time_ms);
            self.put_times(&key, &starts);
        }
        let mut converted = Vec::new();
        for period in [period, period + self.within_ms] {
            let key = entry_key(period, WAITING_TAG, entity);
            let waiting = self.times(source, &key)?;
            let pairs = |end: &EpochMillis| {
                time_ms <= *end && *end <= time_ms.saturating_add(self.within_ms)
            };
            if waiting.iter().any(pairs) {
                let (now_converted, still_waiting): (Vec<_>, Vec<_>) =
                    waiting.into_iter().partition(pairs);
                converted.extend(now_converted);
                self.put_times(&key, &still_waiting);
            }
        }
        Ok(converted)
    }

    /// A B event of `entity` at `time_ms`: whether an A within D before it converts it. If
    /// not, it waits for a late A.
    pub fn end(
        &mut self,
        source: &Source<'_>,
        entity: &[u8],
        time_ms: EpochMillis,
    ) -> Result<bool, StateReadError> {
        let period = self.period_of(time_ms);
        for period in [period - self.within_ms, period] {
            let starts = self.times(source, &entry_key(period, START_TAG, entity))?;
            if starts
                .iter()
                .any(|start| *start <= time_ms && time_ms <= start.saturating_add(self.within_ms))
            {
                return Ok(true);
            }
        }
        let key = entry_key(period, WAITING_TAG, entity);
        let mut waiting = self.times(source, &key)?;
        if let Err(position) = waiting.binary_search(&time_ms) {
            waiting.insert(position, time_ms);
            self.put_times(&key, &waiting);
        }
        Ok(false)
    }

    fn period_of(&self, time_ms: EpochMillis) -> EpochMillis {
        period_of(time_ms, self.within_ms)
    }

    fn times(
        &mut self,
        source: &Source<'_>,
        key: &[u8],
    ) -> Result<Vec<EpochMillis>, StateReadError> {
        let value = self
            .members
            .get(source, self.metric, FUNNEL_WINDOW, key)?
            .unwrap_or_default();
        Ok(value
            .chunks_exact(8)
            .filter_map(|chunk| <[u8; 8]>::try_from(chunk).ok())
            .map(i64::from_be_bytes)
            .collect())
    }

    fn put_times(&mut self, key: &[u8], times: &[EpochMillis]) {
        let value: Vec<u8> = times.iter().flat_map(|time| time.to_be_bytes()).collect();
        self.members.put(self.metric, FUNNEL_WINDOW, key, &value);
    }
}

/// The period of length `within_ms` holding `time_ms`.
pub(super) fn period_of(time_ms: EpochMillis, within_ms: i64) -> EpochMillis {
    time_ms.div_euclid(within_ms) * within_ms
}

/// The first bytes of the entries of period `period_ms` and later: entry keys sort by period.
pub(super) fn period_bound(period_ms: EpochMillis) -> Box<[u8]> {
    Box::from(sortable(period_ms))
}

fn entry_key(period_ms: EpochMillis, tag: u8, entity: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + entity.len());
    key.extend_from_slice(&sortable(period_ms));
    key.push(tag);
    key.extend_from_slice(entity);
    key
}

/// A signed time as bytes that sort like the numbers.
fn sortable(time_ms: EpochMillis) -> [u8; 8] {
    ((time_ms as u64) ^ (1 << 63)).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::members::MemoryReader;
    use crate::PartitionKey;

    #[test]
    fn a_conversion_pairs_a_start_and_an_end_within_the_duration_in_any_order() {
        let reader = MemoryReader::default();
        let partition = PartitionKey::new("t", 0);
        let source = Source {
            reader: &reader,
            partition: &partition,
        };
        let mut members = MemberIndex::new(1 << 20);
        let mut funnel = Funnel {
            metric: 0,
            within_ms: 10,
            members: &mut members,
        };
        // B before any A waits; a late A within D before it converts it.
        assert!(!funnel.end(&source, b"ana", 50).expect("in memory"));
        assert_eq!(
            funnel.start(&source, b"ana", 45).expect("in memory"),
            vec![50]
        );
        // A then B in time, across a period boundary (periods of 10: 40-49, 50-59).
        assert!(funnel.end(&source, b"ana", 55).expect("in memory"));
        // Too late after the A: waits.
        assert!(!funnel.end(&source, b"ana", 56).expect("in memory"));
        // An A after the B does not convert it; one before it does, once.
        assert!(funnel
            .start(&source, b"ana", 57)
            .expect("in memory")
            .is_empty());
        assert_eq!(
            funnel.start(&source, b"ana", 52).expect("in memory"),
            vec![56]
        );
        assert!(funnel
            .start(&source, b"ana", 51)
            .expect("in memory")
            .is_empty());
        // Another entity is apart.
        assert!(!funnel.end(&source, b"bo", 58).expect("in memory"));
    }

    #[test]
    fn periods_sort_as_their_times() {
        assert!(period_bound(-10) < period_bound(0));
        assert!(period_bound(0) < period_bound(10));
        assert!(entry_key(10, START_TAG, b"zzz").as_slice() < &*period_bound(20));
    }
}
