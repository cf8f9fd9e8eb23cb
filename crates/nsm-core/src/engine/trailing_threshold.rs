//! Exact trailing threshold metrics in bounded memory: the number of entities with at least k
//! events, or at least k distinct actors, in the trailing window.
//!
//! The views only ever read ranges of exactly one length that end on a bucket end (`current`,
//! `previous`, `before_previous`), so a range is named by its last bucket e: it covers the
//! buckets `(e - length, e]`. For an entity let `A(e)` be its events (or distinct actors) in
//! that range. `A(e)` never decreases when an event is applied, whatever its order: an event
//! in bucket j adds one to `A(e)` for e in `[j, j + length)` (an actor: only where no other
//! occurrence of the same actor is in range, see below). So an entity starts to qualify at e
//! (`A(e)` reaches k) at most once, ever, and the value of the range ending at e is the number
//! of such starts at e. Each bucket's window holds exactly that number (`Agg::Threshold`): the
//! value of the trailing window ending with the bucket, in this partition. A view reads one
//! bucket ([`qualifying_at`]); nothing else is kept in memory, no histogram is needed, and an
//! entity costs one window increment per bucket it qualifies at, once (an entity reaching k
//! for the first time in a while: up to one per bucket of the length, 672 for 7 days).
//! Histograms of qualification runs per bucket, as trailing distinct counts keep gaps, would
//! answer the same ranges with up to a length's worth of entries per bucket.
//!
//! Per entity the member index keeps `A(e)` capped at k (past k nothing can change) as a
//! run-length list over the buckets from the *horizon* on: the bucket of the partition's
//! newest event minus the allowed lateness, before which no accepted event can land and so no
//! count can change. Capping is exact: `min(A + 1, k) = min(min(A, k) + 1, k)`.
//!
//! With actors, an occurrence of an actor in bucket j makes it newly present in the ranges
//! ending at e in `[max(j, p + length), min(q, j + length))`, where p is its previous
//! occurrence and q its next one (none: unbounded); nothing if j already is one. Per (entity,
//! actor) the member index keeps the occurrence buckets from `horizon - length` on, which
//! are all a later event can need for its p and q.
//!
//! Both entries live in the namespace of the first bucket of a period of one length (their
//! *home*), so they expire with that bucket: the period of the entity's last bucket with a
//! count above zero, or of the actor's last occurrence. Homes only move forward (counts and
//! occurrences are only added there), so an entry is looked up from the last period it can be
//! in down to the first that can still matter, and the first found is current. An entry that
//! moves leaves an empty value behind (nothing, just smaller than a copy) until its bucket
//! expires.

use std::collections::BTreeMap;

use super::members::{EntryValue, MemberIndex, Source, StateReadError};
use super::pair;
use super::state::{ensure_bucket, Agg, Pending, WindowState};
use crate::window::Trailing;
use crate::EpochMillis;

/// The tag of an entity's counts.
const COUNTS_TAG: &[u8] = b"c";
/// The tag of an entity's actor's occurrences.
const OCCURRENCES_TAG: &[u8] = b"o";

/// An entry found, with its home.
type Found = (EpochMillis, EntryValue);

/// One trailing threshold metric of one partition (or one segment of it), being changed.
pub(super) struct TrailingThreshold<'a> {
    pub metric: usize,
    pub trailing: Trailing,
    pub at_least: u32,
    /// The earliest event time the partition still accepts (its watermark less the allowed
    /// lateness): no count before it can change.
    pub accepted_from_ms: EpochMillis,
    /// The segment whose entities are counted (tagged with it), in each bucket's segment
    /// value; `None` for the metric's own.
    pub segment: Option<&'a [u8]>,
    pub windows: &'a mut BTreeMap<EpochMillis, WindowState>,
    pub members: &'a mut MemberIndex,
    /// Where the changed windows and segments are noted.
    pub pending: &'a mut Pending,
}

impl TrailingThreshold<'_> {
    /// Counts one event of `entity` (by `actor` when the metric counts distinct actors) in the
    /// bucket starting at `bucket_ms`; `newest_ms` is the partition's newest event time, this
    /// one included.
    pub fn add(
        &mut self,
        source: &Source<'_>,
        bucket_ms: EpochMillis,
        entity: &[u8],
        actor: Option<&[u8]>,
        newest_ms: EpochMillis,
    ) -> Result<(), StateReadError> {
        let length = self.trailing.length_ms;
        let step = self.trailing.step_ms;
        // Every event still to be accepted is at or after `accepted_from`, so in this bucket
        // or a later one.
        let horizon = self.trailing.bucket_of(self.accepted_from_ms).start_ms;
        let newest_bucket = self.trailing.bucket_of(newest_ms).start_ms;
        let (from, to) = match actor {
            None => (bucket_ms, bucket_ms + length),
            Some(actor) => {
                match self.add_occurrence(
                    source,
                    bucket_ms,
                    entity,
                    actor,
                    horizon,
                    newest_bucket,
                )? {
                    Some(range) => range,
                    None => return Ok(()),
                }
            }
        };
        if from >= to {
            return Ok(());
        }

        let key = pair::join(COUNTS_TAG, entity, &[]);
        // The last bucket with a count is at most a length after the newest event; an entry
        // whose counts end before the horizon is no different from none.
        let found = self.find(
            source,
            &key,
            self.period_of(newest_bucket + length - step),
            self.period_of(horizon),
        )?;
        let mut counts = match &found {
            Some((_, value)) => {
                Counts::decode(value, step).ok_or_else(|| malformed(self.metric, "counts"))?
            }
            None => Counts::default(),
        };
        let started = counts.add(from, to, self.at_least);
        if !counts.changed {
            return Ok(());
        }
        for (start, end) in started {
            let mut e = start;
            while e < end {
                self.count_qualifying(e);
                e += step;
            }
        }
        counts.trim(horizon);
        let home = counts.last_counted(step).map(|last| self.period_of(last));
        self.store(found.map(|(home, _)| home), home, &key, counts.encode(step));
        Ok(())
    }

    /// Records an occurrence of `actor` for `entity`; returns the ranges ending at e in which
    /// the actor is newly present, as `[from, to)`, or `None` when the bucket already had it.
    fn add_occurrence(
        &mut self,
        source: &Source<'_>,
        bucket_ms: EpochMillis,
        entity: &[u8],
        actor: &[u8],
        horizon: EpochMillis,
        newest_bucket: EpochMillis,
    ) -> Result<Option<(EpochMillis, EpochMillis)>, StateReadError> {
        let length = self.trailing.length_ms;
        let step = self.trailing.step_ms;
        // A later event (at the horizon or after) needs occurrences after `its bucket -
        // length` only: an earlier previous one is out of every range it touches.
        let keep_from = horizon - length + step;
        let key = pair::join(OCCURRENCES_TAG, entity, actor);
        let found = self.find(
            source,
            &key,
            self.period_of(newest_bucket),
            self.period_of(keep_from),
        )?;
        let mut occurrences = match &found {
            Some((_, value)) => {
                decode_buckets(value, step).ok_or_else(|| malformed(self.metric, "occurrences"))?
            }
            None => Vec::new(),
        };
        let at = match occurrences.binary_search(&bucket_ms) {
            Ok(_) => return Ok(None),
            Err(at) => at,
        };
        let previous = at.checked_sub(1).map(|before| occurrences[before]);
        let next = occurrences.get(at).copied();
        occurrences.insert(at, bucket_ms);
        occurrences.retain(|occurrence| *occurrence >= keep_from);
        let home = occurrences.last().map(|last| self.period_of(*last));
        let value = encode_buckets(&occurrences, step);
        self.store(found.map(|(home, _)| home), home, &key, value);

        let from = previous.map_or(bucket_ms, |previous| bucket_ms.max(previous + length));
        let to = next.map_or(bucket_ms + length, |next| next.min(bucket_ms + length));
        Ok(Some((from, to)))
    }

    /// The entry `key` in the first period, from `top` down to `bottom`, that has one.
    fn find(
        &mut self,
        source: &Source<'_>,
        key: &[u8],
        top: EpochMillis,
        bottom: EpochMillis,
    ) -> Result<Option<Found>, StateReadError> {
        let mut period = top;
        while period >= bottom {
            // Entries live only in buckets that exist: a home bucket is created with its first
            // entry and its entries expire with it.
            if self.windows.contains_key(&period) {
                if let Some(value) = self.members.get(source, self.metric, period, key)? {
                    return Ok(Some((period, value)));
                }
            }
            period -= self.trailing.length_ms;
        }
        Ok(None)
    }

    /// Writes an entry at its new home, and an empty value at its old one when it moved (the
    /// new home is later, so it is found first).
    fn store(
        &mut self,
        old_home: Option<EpochMillis>,
        home: Option<EpochMillis>,
        key: &[u8],
        value: Box<[u8]>,
    ) {
        if let Some(home) = home {
            self.members.put(self.metric, home, key, &value);
            self.ensure_window(home);
        }
        if let Some(old_home) = old_home.filter(|old| Some(*old) != home) {
            self.members.put(self.metric, old_home, key, &[]);
        }
    }

    /// The first bucket of the period of one length holding `bucket_ms`.
    fn period_of(&self, bucket_ms: EpochMillis) -> EpochMillis {
        bucket_ms.div_euclid(self.trailing.length_ms) * self.trailing.length_ms
    }

    /// One more entity qualifying in the range ending with the bucket, or in its segment.
    fn count_qualifying(&mut self, bucket_ms: EpochMillis) {
        let (metric, segment) = (self.metric, self.segment);
        let bucket = self.trailing.bucket_of(bucket_ms);
        let empty = Agg::Threshold(0);
        let window = ensure_bucket(self.windows, self.pending, metric, bucket, empty);
        window.count_one(self.pending, metric, bucket_ms, segment);
    }

    fn ensure_window(&mut self, bucket_ms: EpochMillis) -> &mut WindowState {
        let bucket = self.trailing.bucket_of(bucket_ms);
        ensure_bucket(
            self.windows,
            self.pending,
            self.metric,
            bucket,
            Agg::Threshold(0),
        )
    }
}

/// The entities of one partition (or of one segment) qualifying in the trailing range whose
/// last bucket starts at `last_bucket_ms`.
pub(super) fn qualifying_at(
    windows: &BTreeMap<EpochMillis, WindowState>,
    last_bucket_ms: EpochMillis,
    segment: Option<&[u8]>,
) -> u64 {
    let bucket = windows.get(&last_bucket_ms);
    let agg = match segment {
        None => bucket.map(|bucket| &bucket.agg),
        Some(segment) => bucket.and_then(|bucket| bucket.segments.get(segment)),
    };
    match agg {
        Some(Agg::Threshold(reached)) => *reached,
        _ => 0,
    }
}

fn malformed(metric: usize, what: &str) -> StateReadError {
    StateReadError(format!(
        "a stored trailing threshold entry ({what}) of metric {metric} is malformed"
    ))
}

/// An entity's counts `min(A(e), k)` by the last bucket e of a range: from each breakpoint's
/// bucket on, its value, up to the next breakpoint. Zero before the first and after the last
/// (whose value is zero); before the horizon they are no longer kept and never read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Counts {
    breakpoints: Vec<(EpochMillis, u32)>,
    /// Whether [`Counts::add`] changed a count.
    changed: bool,
}

impl Counts {
    fn value_at(&self, bucket_ms: EpochMillis) -> u32 {
        match self.breakpoints.partition_point(|(at, _)| *at <= bucket_ms) {
            0 => 0,
            after => self.breakpoints[after - 1].1,
        }
    }

    /// A breakpoint at `bucket_ms` (with the value there); its index.
    fn split(&mut self, bucket_ms: EpochMillis) -> usize {
        let at = self.breakpoints.partition_point(|(b, _)| *b < bucket_ms);
        if self
            .breakpoints
            .get(at)
            .is_none_or(|(b, _)| *b != bucket_ms)
        {
            let value = self.value_at(bucket_ms);
            self.breakpoints.insert(at, (bucket_ms, value));
        }
        at
    }

    /// Adds one to every count in `[from, to)`, up to `at_least`; returns the ranges
    /// `[start, end)` where a count reached `at_least`.
    fn add(
        &mut self,
        from: EpochMillis,
        to: EpochMillis,
        at_least: u32,
    ) -> Vec<(EpochMillis, EpochMillis)> {
        let first = self.split(from);
        let last = self.split(to);
        let mut started = Vec::new();
        for index in first..last {
            let end = self.breakpoints[index + 1].0;
            let (start, value) = &mut self.breakpoints[index];
            if *value < at_least {
                *value += 1;
                self.changed = true;
                if *value == at_least {
                    started.push((*start, end));
                }
            }
        }
        self.normalize();
        started
    }

    /// Forgets the counts before `horizon`.
    fn trim(&mut self, horizon: EpochMillis) {
        let value = self.value_at(horizon);
        let kept = self.breakpoints.partition_point(|(b, _)| *b < horizon);
        self.breakpoints.drain(..kept);
        if self.breakpoints.first().is_none_or(|(b, _)| *b != horizon) {
            self.breakpoints.insert(0, (horizon, value));
        }
        self.normalize();
    }

    /// Drops breakpoints that change nothing, so equal counts have one encoding.
    fn normalize(&mut self) {
        let mut previous = 0;
        self.breakpoints.retain(|(_, value)| {
            let keep = *value != previous;
            previous = *value;
            keep
        });
    }

    /// The last bucket with a count above zero.
    fn last_counted(&self, step_ms: i64) -> Option<EpochMillis> {
        // The last breakpoint is where the counts end (zero); the bucket before it counts.
        let (end, _) = self.breakpoints.last()?;
        Some(end - step_ms)
    }

    /// `first bucket / step` (zigzag varint), then per breakpoint but the last its value and
    /// the distance to the next in steps (varints); the last one's value is zero. Empty for
    /// no counts. A few bytes for a quiet entity.
    fn encode(&self, step_ms: i64) -> Box<[u8]> {
        let mut bytes = Vec::new();
        let Some((first, _)) = self.breakpoints.first() else {
            return Box::default();
        };
        put_varint(&mut bytes, zigzag(first.div_euclid(step_ms)));
        for pair in self.breakpoints.windows(2) {
            let [(at, value), (next, _)] = pair else {
                continue;
            };
            put_varint(&mut bytes, u64::from(*value));
            put_varint(&mut bytes, ((next - at) / step_ms) as u64);
        }
        bytes.into_boxed_slice()
    }

    fn decode(bytes: &[u8], step_ms: i64) -> Option<Counts> {
        let mut counts = Counts::default();
        if bytes.is_empty() {
            return Some(counts);
        }
        let mut reader = bytes;
        let mut at = unzigzag(take_varint(&mut reader)?).checked_mul(step_ms)?;
        while !reader.is_empty() {
            let value = u32::try_from(take_varint(&mut reader)?).ok()?;
            let distance = i64::try_from(take_varint(&mut reader)?).ok()?;
            counts.breakpoints.push((at, value));
            at = at.checked_add(distance.checked_mul(step_ms)?)?;
        }
        counts.breakpoints.push((at, 0));
        Some(counts)
    }
}

/// Sorted bucket starts: the first `/ step` (zigzag varint), then distances in steps.
fn encode_buckets(buckets: &[EpochMillis], step_ms: i64) -> Box<[u8]> {
    let mut bytes = Vec::new();
    let mut previous = None;
    for bucket in buckets {
        match previous {
            None => put_varint(&mut bytes, zigzag(bucket.div_euclid(step_ms))),
            Some(previous) => put_varint(&mut bytes, ((bucket - previous) / step_ms) as u64),
        }
        previous = Some(*bucket);
    }
    bytes.into_boxed_slice()
}

fn decode_buckets(bytes: &[u8], step_ms: i64) -> Option<Vec<EpochMillis>> {
    let mut reader = bytes;
    let mut buckets = Vec::new();
    while !reader.is_empty() {
        let bucket = match buckets.last() {
            None => unzigzag(take_varint(&mut reader)?).checked_mul(step_ms)?,
            Some(previous) => {
                let distance = i64::try_from(take_varint(&mut reader)?).ok()?;
                previous + distance.checked_mul(step_ms)?
            }
        };
        buckets.push(bucket);
    }
    Some(buckets)
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// LEB128.
fn put_varint(bytes: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        bytes.push((value as u8) | 0x80);
        value >>= 7;
    }
    bytes.push(value as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::members::MemoryReader;
    use crate::PartitionKey;

    const MINUTE: i64 = 60_000;

    /// A 10-minute trailing threshold (1-minute buckets) of one partition, stored and reread
    /// after every event, as after a restart.
    struct Fixture {
        trailing: Trailing,
        at_least: u32,
        windows: BTreeMap<EpochMillis, WindowState>,
        reader: MemoryReader,
        partition: PartitionKey,
        newest_ms: EpochMillis,
    }

    impl Fixture {
        fn new(at_least: u32) -> Fixture {
            Fixture {
                trailing: Trailing::new(10 * MINUTE).expect("10m"),
                at_least,
                windows: BTreeMap::new(),
                reader: MemoryReader::default(),
                partition: PartitionKey::new("t", 0),
                newest_ms: EpochMillis::MIN,
            }
        }

        fn add(&mut self, minute: i64, entity: &str, actor: Option<&str>) {
            let time_ms = minute * MINUTE;
            self.newest_ms = self.newest_ms.max(time_ms);
            // A fresh index: everything is read back from what was stored.
            let mut members = MemberIndex::new(1);
            let mut pending = Pending::default();
            let source = Source {
                reader: &self.reader,
                partition: &self.partition,
            };
            TrailingThreshold {
                metric: 0,
                trailing: self.trailing,
                at_least: self.at_least,
                accepted_from_ms: self.newest_ms - 30 * MINUTE,
                segment: None,
                windows: &mut self.windows,
                members: &mut members,
                pending: &mut pending,
            }
            .add(
                &source,
                self.trailing.bucket_of(time_ms).start_ms,
                entity.as_bytes(),
                actor.map(str::as_bytes),
                self.newest_ms,
            )
            .expect("in memory");
            self.reader
                .write_members(&self.partition, &members.take_written(), &[]);
        }

        /// The value of the range ending with the bucket of `minute`.
        fn at(&self, minute: i64) -> u64 {
            qualifying_at(&self.windows, minute * MINUTE, None)
        }

        /// The values of the ranges ending with minutes `from..to`.
        fn values(&self, from: i64, to: i64) -> Vec<u64> {
            (from..to).map(|minute| self.at(minute)).collect()
        }
    }

    #[test]
    fn an_entity_qualifies_while_k_of_its_events_are_in_range() {
        let mut fixture = Fixture::new(2);
        fixture.add(0, "p", None);
        assert_eq!(fixture.values(0, 12), vec![0; 12]);
        fixture.add(3, "p", None);
        // Both events are in the ranges ending at minutes 3 to 9 (a range holds 10 minutes).
        assert_eq!(
            fixture.values(0, 14),
            [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
        );
        fixture.add(3, "q", None);
        assert_eq!(fixture.at(5), 1, "one event of q");
    }

    #[test]
    fn a_late_event_in_the_middle_joins_both_neighbours() {
        let mut fixture = Fixture::new(3);
        fixture.add(0, "p", None);
        fixture.add(12, "p", None);
        assert_eq!(fixture.values(0, 25), vec![0; 25]);
        // Late, between the two: the ranges ending at 6 to 9 hold 0 and 6, those ending at
        // 12 to 15 hold 6 and 12; never three.
        fixture.add(6, "p", None);
        assert_eq!(
            fixture.values(0, 25),
            vec![0; 25],
            "never three in 10 minutes"
        );
        fixture.add(8, "p", None);
        // 0, 6, 8 in ranges ending at 8 and 9; 6, 8, 12 in those ending at 12 to 15.
        let mut expected = vec![0; 25];
        for minute in [8, 9, 12, 13, 14, 15] {
            expected[minute] = 1;
        }
        assert_eq!(fixture.values(0, 25), expected);
        // Another late event at 10 fills the gap: 6, 8, 10 at 10 and 11.
        fixture.add(10, "p", None);
        for minute in [10, 11] {
            expected[minute] = 1;
        }
        // ... and 8, 10, 12 keep it through 17.
        for minute in [16, 17] {
            expected[minute] = 1;
        }
        assert_eq!(fixture.values(0, 25), expected);
    }

    #[test]
    fn an_actor_seen_twice_counts_once_in_every_range() {
        let mut fixture = Fixture::new(2);
        fixture.add(0, "p", Some("ana"));
        fixture.add(4, "p", Some("ana"));
        fixture.add(4, "p", Some("ana"));
        assert_eq!(
            fixture.values(0, 20),
            vec![0; 20],
            "one actor, however often"
        );
        fixture.add(12, "p", Some("bo"));
        // bo at 12 meets ana at 4 in the ranges ending at 12 and 13.
        let mut expected = vec![0; 25];
        expected[12] = 1;
        expected[13] = 1;
        assert_eq!(fixture.values(0, 25), expected);
        // ana, late, at 2: changes nothing (4 covers more of the later ranges).
        fixture.add(2, "p", Some("ana"));
        assert_eq!(fixture.values(0, 25), expected);
        // ana at 8 (late, between 4 and nothing later): with bo up to 17.
        fixture.add(8, "p", Some("ana"));
        expected[14..18].fill(1);
        assert_eq!(fixture.values(0, 25), expected);
    }

    #[test]
    fn runs_cross_period_boundaries_and_entries_move_forward() {
        let mut fixture = Fixture::new(2);
        // Periods are 10 minutes long: [0, 10), [10, 20), ...
        for minute in [7, 9, 15, 21, 28, 33] {
            fixture.add(minute, "p", None);
        }
        let events = [7, 9, 15, 21, 28, 33];
        let naive: Vec<u64> = (0..50)
            .map(|end| {
                let reached = events
                    .iter()
                    .filter(|minute| end - 10 < **minute && **minute <= end)
                    .count();
                u64::from(reached >= 2)
            })
            .collect();
        assert_eq!(fixture.values(0, 50), naive);
        // The counts moved to later periods, leaving empty entries behind.
        let homes: Vec<EpochMillis> = fixture
            .reader
            .entries()
            .iter()
            .map(|(_, _, start, _)| *start / MINUTE)
            .collect();
        assert!(homes.contains(&40), "last counted bucket 42: {homes:?}");
    }

    #[test]
    fn a_late_event_finds_entries_more_than_a_length_behind_the_newest() {
        // The lateness (30 minutes) is three lengths: p's entries are two periods back.
        let mut fixture = Fixture::new(2);
        fixture.add(0, "p", Some("ana"));
        fixture.add(35, "q", Some("cy"));
        fixture.add(8, "p", Some("bo"));
        let mut expected = vec![0; 40];
        expected[8] = 1;
        expected[9] = 1;
        assert_eq!(fixture.values(0, 40), expected);
        // ana again at 6: present in the ranges ending at 6 to 15 now, with bo until 17.
        fixture.add(6, "p", Some("ana"));
        expected[10..16].fill(1);
        assert_eq!(fixture.values(0, 40), expected);
        // And by events: p's counts from minute 1 are found for a late event at 9.
        let mut events = Fixture::new(2);
        events.add(1, "p", None);
        events.add(36, "q", None);
        events.add(9, "p", None);
        let mut expected = vec![0; 40];
        expected[9] = 1;
        expected[10] = 1;
        assert_eq!(events.values(0, 40), expected);
    }

    #[test]
    fn counts_keep_their_encoding() {
        let mut counts = Counts::default();
        counts.add(5 * MINUTE, 15 * MINUTE, 3);
        counts.add(8 * MINUTE, 18 * MINUTE, 3);
        counts.add(9 * MINUTE, 19 * MINUTE, 3);
        let started = counts.add(9 * MINUTE, 19 * MINUTE, 3);
        assert_eq!(started, vec![(15 * MINUTE, 18 * MINUTE)]);
        let bytes = counts.encode(MINUTE);
        let decoded = Counts::decode(&bytes, MINUTE).expect("decodes");
        assert_eq!(decoded.breakpoints, counts.breakpoints);
        counts.trim(10 * MINUTE);
        assert_eq!(counts.value_at(10 * MINUTE), 3);
        assert_eq!(counts.value_at(18 * MINUTE), 2);
        assert_eq!(counts.value_at(19 * MINUTE), 0);
        let buckets = [-3 * MINUTE, 0, 7 * MINUTE];
        let bytes = encode_buckets(&buckets, MINUTE);
        assert_eq!(
            decode_buckets(&bytes, MINUTE).as_deref(),
            Some(&buckets[..])
        );
    }
}
