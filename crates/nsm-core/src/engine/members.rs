//! Per-entity state kept on disk, not in memory: the members of distinct sets, threshold
//! progress, the occurrences of trailing distinct members and the counts of trailing
//! threshold entities.
//!
//! Memory must not grow with the number of users or entities, so the engine keeps only what it
//! wrote since the last checkpoint (exact, needed until it is stored) and a bounded cache of
//! members known to be present. Everything else is asked of a [`StateReader`]: nsm-state
//! answers from RocksDB; [`MemoryReader`] answers from memory for tests and benchmarks.
//!
//! Entries live in the namespace of one window of one metric, so expiring a window deletes
//! them with it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use super::changes::{
    MemberInsert, MemberRangeDelete, PartitionChanges, WindowDelete, WindowsBefore,
};

use crate::{EpochMillis, PartitionKey};

/// Reading committed per-entity state failed (an I/O error of the store).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reading stored state failed: {0}")]
pub struct StateReadError(pub String);

/// Answers for per-entity state that was committed (written by the caller from
/// [`super::ChangeSet`]s). The engine asks it only for entries it did not write since the
/// last [`super::Engine::take_changes`].
pub trait StateReader: Send {
    /// The value stored for `key` in window `start_ms` of metric `metric` of a partition.
    fn member(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateReadError>;

    /// Whether any entry is stored in window `start_ms` of metric `metric` of a partition.
    /// Asked once per window a partition's engine starts to use: a window with nothing
    /// stored needs no reads for as long as the engine's cache keeps all it writes there.
    fn has_entries(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
    ) -> Result<bool, StateReadError>;
}

type MemberKey = (usize, EpochMillis, Box<[u8]>);

/// Every entry of every partition, ordered so a window's entries are adjacent.
type Entries = BTreeMap<(PartitionKey, MemberKey), Box<[u8]>>;

/// Per-entity state in memory: a map of every committed entry. For tests and in-process
/// benchmarks, and the default of [`super::Engine::new`]; its memory grows with the entities.
#[derive(Debug, Default, Clone)]
pub struct MemoryReader {
    entries: Arc<Mutex<Entries>>,
}

impl MemoryReader {
    /// Stores the member changes of one partition, as nsm-state does.
    pub fn write(&self, changes: &PartitionChanges) {
        self.write_members(&changes.key, &changes.members, &changes.deletes);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for MemberRangeDelete {
            metric,
            start_ms,
            before,
        } in &changes.member_range_deletes
        {
            entries.retain(|(partition, (m, s, key)), _| {
                !(*partition == changes.key && m == metric && s == start_ms && key < before)
            });
        }
        for WindowsBefore { metric, before_ms } in &changes.windows_before {
            entries.retain(|(partition, (m, s, _)), _| {
                !(*partition == changes.key && m == metric && s < before_ms)
            });
        }
    }

    /// Stores member entries, then deletes the windows' entries (the order of a store batch).
    pub fn write_members(
        &self,
        partition: &PartitionKey,
        inserts: &[MemberInsert],
        deletes: &[WindowDelete],
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for MemberInsert {
            metric,
            start_ms,
            member,
            value,
        } in inserts
        {
            entries.insert(
                (partition.clone(), (*metric, *start_ms, member.clone())),
                value.clone(),
            );
        }
        for delete in deletes {
            let from = (
                partition.clone(),
                (delete.metric, delete.start_ms, Box::<[u8]>::default()),
            );
            let doomed: Vec<_> = entries
                .range(from..)
                .take_while(|((stored, (metric, start, _)), _)| {
                    stored == partition && *metric == delete.metric && *start == delete.start_ms
                })
                .map(|(key, _)| key.clone())
                .collect();
            for key in doomed {
                entries.remove(&key);
            }
        }
    }

    /// Every stored entry's place, in order, for tests.
    pub fn entries(&self) -> Vec<(PartitionKey, usize, EpochMillis, Box<[u8]>)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .keys()
            .map(|(partition, (metric, start_ms, key))| {
                (partition.clone(), *metric, *start_ms, key.clone())
            })
            .collect()
    }

    /// Stored entries, for tests.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StateReader for MemoryReader {
    fn member(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateReadError> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Ok(entries
            .get(&(partition.clone(), (metric, start_ms, key.into())))
            .map(|value| value.to_vec()))
    }

    fn has_entries(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
    ) -> Result<bool, StateReadError> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let from = (
            partition.clone(),
            (metric, start_ms, Box::<[u8]>::default()),
        );
        Ok(entries
            .range(from..)
            .next()
            .is_some_and(|((stored, (m, s, _)), _)| {
                stored == partition && *m == metric && *s == start_ms
            }))
    }
}

/// Where a partition's committed entries are read from.
pub(super) struct Source<'a> {
    pub reader: &'a dyn StateReader,
    pub partition: &'a PartitionKey,
}

/// A window of one metric: the namespace of its entries.
type Namespace = (usize, EpochMillis);

/// A cached entry's value: every value the engine writes is at most 8 bytes (an event time,
/// a previous bucket, a progress count, or nothing for a member).
#[derive(Debug, Clone, Copy)]
struct Small {
    len: u8,
    bytes: [u8; 8],
}

impl Small {
    fn new(value: &[u8]) -> Option<Small> {
        let mut bytes = [0; 8];
        bytes.get_mut(..value.len())?.copy_from_slice(value);
        Some(Small {
            len: value.len() as u8,
            bytes,
        })
    }

    fn value(&self) -> Box<[u8]> {
        Box::from(&self.bytes[..usize::from(self.len)])
    }
}

/// The value of an entry being stored: inline when short (nearly all are), so handing a
/// checkpoint over costs no allocation per entry.
#[derive(Debug)]
enum InFlight {
    Small(Small),
    Long(Box<[u8]>),
}

impl InFlight {
    fn value(&self) -> Box<[u8]> {
        match self {
            InFlight::Small(small) => small.value(),
            InFlight::Long(value) => value.clone(),
        }
    }
}

/// Hashes a key that is already a uniform digest by taking its low bits.
#[derive(Default, Clone, Copy)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u128(&mut self, digest: u128) {
        self.0 = digest as u64;
    }
}

type DigestMap<V> = HashMap<u128, V, BuildHasherDefault<DigestHasher>>;

/// One generation of the cache: entries, and the windows they belong to (so dropping the
/// generation tells which windows lose entries).
#[derive(Debug, Default)]
struct Generation {
    entries: DigestMap<Small>,
    namespaces: HashSet<Namespace>,
}

/// One partition's view of its per-entity entries: what it wrote since the last checkpoint,
/// a bounded cache of entries, then the reader.
///
/// The reader is asked only when it may know more than the cache. A window whose first use
/// found nothing stored is *complete*: every entry it has was written by this index, so it
/// is in `written` or in the cache for as long as the cache dropped none of that window's
/// entries. A miss in a complete window is an answer, not a read; a new user's first event
/// of a week costs no I/O while the cache holds the week.
#[derive(Debug)]
pub(super) struct MemberIndex {
    /// Written since the last checkpoint, by digest of the entry's place. Exact: the reader
    /// does not have these yet.
    written: DigestMap<(MemberKey, Box<[u8]>)>,
    /// What the last [`MemberIndex::take_written`] handed over, by digest: the caller may
    /// still be storing it while events go on being applied, and the cache may drop any of
    /// it meanwhile. Exact; replaced at the next take, by when the caller has stored it.
    in_flight: DigestMap<InFlight>,
    /// The windows of the entries in flight. The reader may not hold those entries yet, so
    /// its "nothing stored" for one of them does not make the window complete.
    in_flight_windows: HashSet<Namespace>,
    /// Entries known to be stored, with their values, in two generations: when `recent`
    /// fills up, it becomes `older` and the previous `older` is dropped. Bounded, and the
    /// entries of active users stay in it.
    recent: Generation,
    older: Generation,
    cache_capacity: usize,
    /// Per window in use, whether it is complete (see above). Forgotten wholesale when it
    /// grows past [`MAX_TRACKED_WINDOWS`]: a forgotten window is asked of the reader again.
    complete: HashMap<Namespace, bool>,
}

/// Windows whose completeness is remembered at most (each a few dozen bytes).
const MAX_TRACKED_WINDOWS: usize = 100_000;

impl MemberIndex {
    pub fn new(cache_capacity: usize) -> Self {
        Self {
            written: DigestMap::default(),
            in_flight: DigestMap::default(),
            in_flight_windows: HashSet::new(),
            recent: Generation::default(),
            older: Generation::default(),
            cache_capacity: cache_capacity.max(1),
            complete: HashMap::new(),
        }
    }

    /// The value of an entry, if present.
    pub fn get(
        &mut self,
        source: &Source<'_>,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<Box<[u8]>>, StateReadError> {
        let digest = digest(metric, start_ms, key);
        if let Some((_, value)) = self.written.get(&digest) {
            return Ok(Some(value.clone()));
        }
        if let Some(value) = self.in_flight.get(&digest) {
            return Ok(Some(value.value()));
        }
        if let Some(cached) = self.cached(digest, (metric, start_ms)) {
            return Ok(Some(cached.value()));
        }
        let value = self.stored(source, digest, metric, start_ms, key)?;
        Ok(value.map(Vec::into_boxed_slice))
    }

    /// Whether an entry is present.
    pub fn contains(
        &mut self,
        source: &Source<'_>,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<bool, StateReadError> {
        let digest = digest(metric, start_ms, key);
        if self.written.contains_key(&digest)
            || self.in_flight.contains_key(&digest)
            || self.cached(digest, (metric, start_ms)).is_some()
        {
            return Ok(true);
        }
        let value = self.stored(source, digest, metric, start_ms, key)?;
        Ok(value.is_some())
    }

    /// Adds a member (an entry with an empty value).
    pub fn insert(&mut self, metric: usize, start_ms: EpochMillis, key: &[u8]) {
        self.put(metric, start_ms, key, Box::default());
    }

    /// Sets an entry's value.
    pub fn put(&mut self, metric: usize, start_ms: EpochMillis, key: &[u8], value: Box<[u8]>) {
        self.written.insert(
            digest(metric, start_ms, key),
            ((metric, start_ms, key.into()), value),
        );
    }

    /// What was written since the last call, to store before the next call. Until then the
    /// entries are still answered from memory, so events may be applied while they are being
    /// stored.
    pub fn take_written(&mut self) -> Vec<MemberInsert> {
        self.in_flight.clear();
        self.in_flight.reserve(self.written.len());
        self.in_flight_windows.clear();
        let mut written: Vec<_> = self.written.drain().collect();
        // In key order: the same entries give the same write, and RocksDB inserts sorted keys
        // into its memtable much faster (measured: the core bench ran at ~55k events/s with
        // entries in digest order, ~80k in key order). Keys are unique: unstable is enough.
        written.sort_unstable_by(|(_, (a, _)), (_, (b, _))| a.cmp(b));
        let mut inserts = Vec::with_capacity(written.len());
        for (digest, ((metric, start_ms, member), value)) in written {
            let small = Small::new(&value);
            let held = small.map_or_else(|| InFlight::Long(value.clone()), InFlight::Small);
            self.in_flight.insert(digest, held);
            self.in_flight_windows.insert((metric, start_ms));
            match small {
                Some(small) => self.remember(digest, (metric, start_ms), small),
                // Too long to cache (a conversion's times): an older, shorter value cached
                // for the entry would now be wrong, and the window has an entry only the
                // reader knows.
                None => {
                    self.recent.entries.remove(&digest);
                    self.older.entries.remove(&digest);
                    self.complete.insert((metric, start_ms), false);
                }
            }
            inserts.push(MemberInsert {
                metric,
                start_ms,
                member,
                value,
            });
        }
        inserts
    }

    /// Entries held in memory (written and cached), for the memory gauge.
    pub fn resident(&self) -> usize {
        self.written.len()
            + self.in_flight.len()
            + self.recent.entries.len()
            + self.older.entries.len()
    }

    /// A cached entry, kept in the recent generation when found in the older one.
    fn cached(&mut self, digest: u128, namespace: Namespace) -> Option<Small> {
        if let Some(small) = self.recent.entries.get(&digest) {
            return Some(*small);
        }
        let small = *self.older.entries.get(&digest)?;
        self.remember(digest, namespace, small);
        Some(small)
    }

    /// An entry neither written nor cached: none in a complete window, else the reader's
    /// answer, cached when present.
    fn stored(
        &mut self,
        source: &Source<'_>,
        digest: u128,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateReadError> {
        if self.is_complete(source, (metric, start_ms))? {
            return Ok(None);
        }
        let value = source
            .reader
            .member(source.partition, metric, start_ms, key)?;
        if let Some(small) = value.as_deref().and_then(Small::new) {
            self.remember(digest, (metric, start_ms), small);
        }
        Ok(value)
    }

    /// Whether every entry of a window is in `written` or the cache; asks the reader the
    /// first time a window is used.
    fn is_complete(
        &mut self,
        source: &Source<'_>,
        namespace: Namespace,
    ) -> Result<bool, StateReadError> {
        if let Some(complete) = self.complete.get(&namespace) {
            return Ok(*complete);
        }
        if self.complete.len() >= MAX_TRACKED_WINDOWS {
            self.complete.clear();
        }
        if self.in_flight_windows.contains(&namespace) {
            // Some of its entries may be neither stored yet nor cached any more (the cache
            // may have dropped them before this first use): incomplete, so misses are read.
            self.complete.insert(namespace, false);
            return Ok(false);
        }
        // Entries written here but not yet stored are in `written`, so "nothing stored"
        // means the index holds all there is.
        let (metric, start_ms) = namespace;
        let complete = !source
            .reader
            .has_entries(source.partition, metric, start_ms)?;
        self.complete.insert(namespace, complete);
        Ok(complete)
    }

    fn remember(&mut self, digest: u128, namespace: Namespace, value: Small) {
        if self.recent.entries.len() >= self.cache_capacity {
            let dropped = std::mem::replace(&mut self.older, std::mem::take(&mut self.recent));
            // The dropped entries' windows may now have entries neither here nor written.
            for namespace in dropped.namespaces {
                if let Some(complete) = self.complete.get_mut(&namespace) {
                    *complete = false;
                }
            }
        }
        self.recent.entries.insert(digest, value);
        self.recent.namespaces.insert(namespace);
    }
}

/// A 128-bit digest of an entry's place (XXH3-128); collisions are out of reach in practice.
/// Stable only within a process, which is all a cache needs.
fn digest(metric: usize, start_ms: EpochMillis, key: &[u8]) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&(metric as u64).to_le_bytes());
    hasher.update(&start_ms.to_le_bytes());
    hasher.update(key);
    hasher.digest128()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A memory reader that counts the entry reads it answers.
    #[derive(Default)]
    struct CountingReader {
        inner: MemoryReader,
        reads: AtomicUsize,
    }

    impl StateReader for CountingReader {
        fn member(
            &self,
            partition: &PartitionKey,
            metric: usize,
            start_ms: EpochMillis,
            key: &[u8],
        ) -> Result<Option<Vec<u8>>, StateReadError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.member(partition, metric, start_ms, key)
        }

        fn has_entries(
            &self,
            partition: &PartitionKey,
            metric: usize,
            start_ms: EpochMillis,
        ) -> Result<bool, StateReadError> {
            self.inner.has_entries(partition, metric, start_ms)
        }
    }

    fn store(reader: &CountingReader, partition: &PartitionKey, index: &mut MemberIndex) {
        let written = index.take_written();
        reader.inner.write_members(partition, &written, &[]);
    }

    #[test]
    fn written_entries_are_seen_before_they_are_stored_and_the_cache_stays_bounded() {
        let reader = CountingReader::default();
        let partition = PartitionKey::new("t", 0);
        let source = Source {
            reader: &reader,
            partition: &partition,
        };
        let mut index = MemberIndex::new(2);
        assert!(!index.contains(&source, 0, 0, b"a").expect("in memory"));
        index.insert(0, 0, b"a");
        index.put(0, 0, b"p", Box::from(&b"\x01"[..]));
        assert!(index.contains(&source, 0, 0, b"a").expect("in memory"));
        assert_eq!(
            index
                .get(&source, 0, 0, b"p")
                .expect("in memory")
                .as_deref(),
            Some(&b"\x01"[..])
        );
        assert_eq!(index.take_written().len(), 2);

        for member in [b"b", b"c", b"d", b"e"] {
            index.insert(0, 0, member);
            store(&reader, &partition, &mut index);
        }
        assert!(
            index.recent.entries.len() + index.older.entries.len() <= 4,
            "two generations of two"
        );
    }

    #[test]
    fn entries_being_stored_are_answered_even_when_the_cache_drops_them() {
        // A window with stored entries, so a miss is asked of the reader.
        let reader = CountingReader::default();
        let partition = PartitionKey::new("t", 0);
        let source = Source {
            reader: &reader,
            partition: &partition,
        };
        let mut index = MemberIndex::new(1);
        index.insert(0, 0, b"stored");
        store(&reader, &partition, &mut index);
        let mut index = MemberIndex::new(1);
        for member in [b"a", b"b", b"c", b"d"] {
            index.put(0, 0, member, Box::from(&member[..]));
        }
        // Taken, not stored yet: a cache of one keeps at most two of the four.
        let taken = index.take_written();
        assert_eq!(taken.len(), 4);
        for member in [b"a", b"b", b"c", b"d"] {
            assert!(index.contains(&source, 0, 0, member).expect("in memory"));
            assert_eq!(
                index
                    .get(&source, 0, 0, member)
                    .expect("in memory")
                    .as_deref(),
                Some(&member[..])
            );
        }
        assert_eq!(
            reader.reads.load(Ordering::Relaxed),
            0,
            "none asked of the reader"
        );
        reader.inner.write_members(&partition, &taken, &[]);
        // The next take means the last one is stored: from then on the reader answers.
        assert!(index.take_written().is_empty());
        assert!(index.contains(&source, 0, 0, b"a").expect("in memory"));
        assert!(index.resident() <= 2, "two generations of one");
    }

    #[test]
    fn a_window_first_used_while_its_entries_are_being_stored_is_not_taken_as_complete() {
        let reader = CountingReader::default();
        let partition = PartitionKey::new("t", 0);
        let source = Source {
            reader: &reader,
            partition: &partition,
        };
        // Another window with stored entries, whose reads turn the cache over.
        let mut other = MemberIndex::new(1);
        other.insert(1, 0, b"x1");
        other.insert(1, 0, b"x2");
        store(&reader, &partition, &mut other);

        let mut index = MemberIndex::new(1);
        index.insert(0, 0, b"k");
        let taken = index.take_written();
        // While `k` is being stored, the cache of one drops it before its window is first used.
        assert!(index.contains(&source, 1, 0, b"x1").expect("read"));
        assert!(index.contains(&source, 1, 0, b"x2").expect("read"));
        assert!(!index.contains(&source, 0, 0, b"other").expect("read"));
        reader.inner.write_members(&partition, &taken, &[]);
        assert!(index.take_written().is_empty());
        assert!(
            index.contains(&source, 0, 0, b"k").expect("read"),
            "k is stored: its window must not answer misses from memory"
        );
    }

    #[test]
    fn a_new_window_answers_misses_without_reads_until_its_entries_leave_the_cache() {
        let reader = CountingReader::default();
        let partition = PartitionKey::new("t", 0);
        let source = Source {
            reader: &reader,
            partition: &partition,
        };
        let mut index = MemberIndex::new(3);
        for member in [b"a", b"b", b"c"] {
            assert!(!index.contains(&source, 0, 0, member).expect("in memory"));
            index.insert(0, 0, member);
        }
        store(&reader, &partition, &mut index);
        assert!(index.contains(&source, 0, 0, b"a").expect("in memory"));
        assert!(!index.contains(&source, 0, 0, b"z").expect("in memory"));
        assert_eq!(index.get(&source, 0, 0, b"z").expect("in memory"), None);
        assert_eq!(reader.reads.load(Ordering::Relaxed), 0, "all answered here");

        // Two rotations of another window's entries drop the first window's: from then on
        // its misses are asked of the reader, which still has them.
        for round in 0..2u8 {
            for member in [b"x", b"y", b"w"] {
                index.insert(1, 0, &[member[0], round]);
            }
            store(&reader, &partition, &mut index);
        }
        assert!(index.contains(&source, 0, 0, b"b").expect("in memory"));
        assert!(!index.contains(&source, 0, 0, b"z").expect("in memory"));
        assert!(
            reader.reads.load(Ordering::Relaxed) >= 2,
            "asked the reader"
        );
    }

    #[test]
    fn a_value_too_long_to_cache_replaces_the_cached_one() {
        let reader = CountingReader::default();
        let partition = PartitionKey::new("t", 0);
        let source = Source {
            reader: &reader,
            partition: &partition,
        };
        let mut index = MemberIndex::new(16);
        index.put(0, 0, b"f", Box::from(&b"short"[..]));
        store(&reader, &partition, &mut index);
        let long: Box<[u8]> = Box::from(&b"longer than eight bytes"[..]);
        index.put(0, 0, b"f", long.clone());
        store(&reader, &partition, &mut index);
        assert_eq!(
            index.get(&source, 0, 0, b"f").expect("in memory"),
            Some(long)
        );
    }

    #[test]
    fn a_window_with_stored_entries_is_asked_of_the_reader() {
        let reader = CountingReader::default();
        let partition = PartitionKey::new("t", 0);
        let source = Source {
            reader: &reader,
            partition: &partition,
        };
        let mut before_restart = MemberIndex::new(16);
        before_restart.insert(0, 0, b"a");
        before_restart.put(0, 0, b"p", Box::from(7u32.to_be_bytes()));
        store(&reader, &partition, &mut before_restart);

        let mut index = MemberIndex::new(16);
        assert!(index.contains(&source, 0, 0, b"a").expect("in memory"));
        assert!(!index.contains(&source, 0, 0, b"b").expect("in memory"));
        assert_eq!(
            index
                .get(&source, 0, 0, b"p")
                .expect("in memory")
                .as_deref(),
            Some(&7u32.to_be_bytes()[..])
        );
        assert_eq!(reader.reads.load(Ordering::Relaxed), 3);
        assert!(index.contains(&source, 0, 0, b"a").expect("in memory"));
        assert_eq!(reader.reads.load(Ordering::Relaxed), 3, "cached once read");
    }
}
