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

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
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
                Box::from(&**value),
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

/// A reader counting the entries asked of the one it wraps: the lookups the engine's memory
/// (written entries, cache, filter) could not answer. For benchmarks and tests.
#[derive(Debug, Default)]
pub struct CountingReader<R> {
    inner: R,
    reads: Arc<AtomicU64>,
}

impl<R: StateReader> CountingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            reads: Arc::default(),
        }
    }

    /// The count of entries read, shared: it goes on counting once the reader is handed to
    /// an engine.
    pub fn reads(&self) -> Arc<AtomicU64> {
        self.reads.clone()
    }
}

impl<R: StateReader> StateReader for CountingReader<R> {
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

/// Where a partition's committed entries are read from.
pub(super) struct Source<'a> {
    pub reader: &'a dyn StateReader,
    pub partition: &'a PartitionKey,
}

/// A window of one metric: the namespace of its entries.
type Namespace = (usize, EpochMillis);

/// A cached entry's value: nearly every value the engine writes is at most 8 bytes (an event
/// time, a previous bucket, a trailing last occurrence in its short form, a progress count, or
/// nothing for a member). Longer ones (a conversion's times, a last occurrence's long form)
/// are not cached.
#[derive(Debug, Clone, Copy)]
pub struct Small {
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

    fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// An entry's value: inline when short (nearly all are), so writing, reading or handing over
/// an entry to be stored costs no allocation for its value, nor a free on the thread that
/// stores it. Read it as bytes (it derefs to `[u8]`).
#[derive(Debug, Clone)]
pub enum EntryValue {
    Small(Small),
    Long(Box<[u8]>),
}

impl EntryValue {
    pub fn new(bytes: &[u8]) -> EntryValue {
        Small::new(bytes).map_or_else(|| EntryValue::Long(bytes.into()), EntryValue::Small)
    }

    fn small(&self) -> Option<Small> {
        match self {
            EntryValue::Small(small) => Some(*small),
            EntryValue::Long(_) => None,
        }
    }
}

impl PartialEq for EntryValue {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for EntryValue {}

impl Default for EntryValue {
    fn default() -> Self {
        EntryValue::new(&[])
    }
}

impl std::ops::Deref for EntryValue {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            EntryValue::Small(small) => small.bytes(),
            EntryValue::Long(value) => value,
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

/// Hashes a window's place (metric, start) with one multiply a word: namespaces are asked for
/// at every entry written and at every miss, where SipHash showed in profiles, and they are
/// few and come from the config and calendar-aligned times, not from arbitrary input.
#[derive(Default, Clone, Copy)]
struct NamespaceHasher(u64);

impl Hasher for NamespaceHasher {
    /// The product's high bits, which every bit of the words reaches, turned into the low ones
    /// the table's slot is taken from: a multiply carries low bits up, never down, and window
    /// starts are multiples of minutes, so their low bits are all zero.
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn write_i64(&mut self, word: i64) {
        self.write_u64(word as u64);
    }
}

type NamespaceSet = HashSet<Namespace, BuildHasherDefault<NamespaceHasher>>;
type NamespaceMap<V> = HashMap<Namespace, V, BuildHasherDefault<NamespaceHasher>>;

/// One generation of the cache: entries, and the windows they belong to (so dropping the
/// generation tells which windows lose entries).
#[derive(Debug, Default)]
struct Generation {
    entries: DigestMap<Small>,
    namespaces: NamespaceSet,
}

/// One partition's view of its per-entity entries: what it wrote since the last checkpoint,
/// a bounded cache of entries, then the reader.
///
/// The reader is asked only when it may know more than the cache. A window whose first use
/// found nothing stored is *complete*: every entry it has was written by this index, so it
/// is in `written` or in the cache for as long as the cache dropped none of that window's
/// entries. A miss in a complete window is an answer, not a read; a new user's first event
/// of a week costs no I/O while the cache holds the week. Once the cache has dropped some of
/// a complete window's entries, the [`WrittenFilter`] still answers most of its misses while
/// its epoch lasts: a key of that window it never saw was never written, so it is not stored
/// either.
#[derive(Debug)]
pub(super) struct MemberIndex {
    /// Written since the last checkpoint, by digest of the entry's place. Exact: the reader
    /// does not have these yet.
    written: DigestMap<Written>,
    /// What the last [`MemberIndex::take_written`] handed over, by digest: the caller may
    /// still be storing it while events go on being applied, and the cache may drop any of
    /// it meanwhile. Exact; replaced at the next take, by when the caller has stored it.
    in_flight: DigestMap<EntryValue>,
    /// The windows of the entries in flight. The reader may not hold those entries yet, so
    /// its "nothing stored" for one of them does not make the window complete.
    in_flight_windows: NamespaceSet,
    /// Entries known to be stored, with their values, in two generations: when `recent`
    /// fills up, it becomes `older` and the previous `older` is dropped. Bounded, and the
    /// entries of active users stay in it.
    recent: Generation,
    older: Generation,
    cache_capacity: usize,
    /// What is known of each window in use (see [`Known`]). Forgotten wholesale when it
    /// grows past [`MAX_TRACKED_WINDOWS`]: a forgotten window is asked of the reader again.
    known: NamespaceMap<Known>,
    /// Every entry written since the filter's epoch began: answers the misses of windows
    /// that were complete once, after the cache dropped some of their entries.
    filter: WrittenFilter,
}

/// An entry written since the last checkpoint.
#[derive(Debug)]
struct Written {
    key: MemberKey,
    value: EntryValue,
    /// Whether to cache it once handed over to be stored: not when it is read again only in
    /// exceptional cases (see [`MemberIndex::put_rarely_read`]).
    cache: bool,
}

/// What the index knows of a window's entries, from the reader's answer at the window's
/// first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Nothing was stored at its first use (in the filter's epoch `epoch`), and every entry it
    /// has had since is still written or cached: a miss is an answer.
    Complete { epoch: u64 },
    /// Nothing was stored or in flight at its first use in filter epoch `epoch`, but some of
    /// its entries are neither written nor cached (see [`Known::dropped`]): while that epoch
    /// lasts, every entry it has is in the filter, so a key the filter never saw is absent.
    /// Otherwise a miss is read.
    Filtered { epoch: u64 },
    /// Something was stored at its first use (or was being stored), or an entry was handed
    /// over uncached before it: a miss is read.
    Stored,
}

impl Known {
    /// Some of the window's entries are neither written nor cached: the cache dropped them,
    /// or they were never cached (too long, or rarely read).
    fn dropped(self) -> Known {
        match self {
            Known::Complete { epoch } => Known::Filtered { epoch },
            other => other,
        }
    }
}

/// Windows whose completeness is remembered at most (each a few dozen bytes).
const MAX_TRACKED_WINDOWS: usize = 100_000;

impl MemberIndex {
    /// An index caching up to `cache_capacity` entries a generation, with a filter of
    /// `filter_bytes` (see [`WrittenFilter`]).
    pub fn new(cache_capacity: usize, filter_bytes: usize) -> Self {
        Self {
            written: DigestMap::default(),
            in_flight: DigestMap::default(),
            in_flight_windows: NamespaceSet::default(),
            recent: Generation::default(),
            older: Generation::default(),
            cache_capacity: cache_capacity.max(1),
            known: NamespaceMap::default(),
            filter: WrittenFilter::new(filter_bytes),
        }
    }

    /// Resizes the cache and the filter, as the engine's budget is split between more or
    /// fewer partitions. A smaller cache shrinks as entries are next cached; a filter of a
    /// new size starts a new epoch.
    pub fn resize(&mut self, cache_capacity: usize, filter_bytes: usize) {
        self.cache_capacity = cache_capacity.max(1);
        if WrittenFilter::blocks_for(filter_bytes) != self.filter.blocks.len() {
            let epoch = self.filter.epoch + 1;
            self.filter = WrittenFilter::new(filter_bytes);
            self.filter.epoch = epoch;
            self.refill_filter();
        }
    }

    /// The value of an entry, if present.
    pub fn get(
        &mut self,
        source: &Source<'_>,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<EntryValue>, StateReadError> {
        let digest = digest(metric, start_ms, key);
        if let Some(written) = self.written.get(&digest) {
            return Ok(Some(written.value.clone()));
        }
        if let Some(value) = self.in_flight(digest, (metric, start_ms)) {
            return Ok(Some(value.clone()));
        }
        if let Some(cached) = self.cached(digest, (metric, start_ms)) {
            return Ok(Some(EntryValue::Small(cached)));
        }
        let value = self.stored(source, digest, metric, start_ms, key)?;
        Ok(value.map(|value| EntryValue::new(&value)))
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
            || self.in_flight(digest, (metric, start_ms)).is_some()
            || self.cached(digest, (metric, start_ms)).is_some()
        {
            return Ok(true);
        }
        let value = self.stored(source, digest, metric, start_ms, key)?;
        Ok(value.is_some())
    }

    /// Adds a member (an entry with an empty value).
    pub fn insert(&mut self, metric: usize, start_ms: EpochMillis, key: &[u8]) {
        self.put(metric, start_ms, key, &[]);
    }

    /// Sets an entry's value.
    pub fn put(&mut self, metric: usize, start_ms: EpochMillis, key: &[u8], value: &[u8]) {
        self.write(metric, start_ms, key, value, true);
    }

    /// Sets the value of an entry read again only in exceptional cases (an event id, read
    /// back only when the event comes again). Handed over to be stored, it is left out of
    /// the cache (an older cached value of it is evicted), so it does not push out entries
    /// that are read: ids are one entry an event (see BENCHMARKS.md for what it saved). A
    /// later read of it caches it like any other. Its window then answers misses from the
    /// filter while the filter's epoch lasts, and reads them after, as when the cache rotates
    /// a window's entries out.
    pub fn put_rarely_read(
        &mut self,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
        value: &[u8],
    ) {
        self.write(metric, start_ms, key, value, false);
    }

    fn write(
        &mut self,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
        value: &[u8],
        cache: bool,
    ) {
        let digest = digest(metric, start_ms, key);
        let value = EntryValue::new(value);
        match self.written.entry(digest) {
            // Written again before the checkpoint: its key is already held, and in the filter.
            Entry::Occupied(mut written) => {
                let written = written.get_mut();
                written.value = value;
                written.cache = cache;
                return;
            }
            Entry::Vacant(slot) => {
                let key = (metric, start_ms, key.into());
                slot.insert(Written { key, value, cache });
            }
        }
        if !self.filter.add(digest) {
            // Full: a new epoch, holding what is written or in flight (see `WrittenFilter`).
            self.filter.start_epoch();
            self.refill_filter();
        }
    }

    /// Adds every entry written or in flight to the filter of a new epoch.
    fn refill_filter(&mut self) {
        for digest in self.written.keys().chain(self.in_flight.keys()) {
            self.filter.insert(*digest);
        }
    }

    /// What was written since the last call, to store before the next call. Until then the
    /// entries are still answered from memory, so events may be applied while they are being
    /// stored.
    pub fn take_written(&mut self) -> Vec<MemberInsert> {
        self.in_flight.clear();
        self.in_flight.reserve(self.written.len());
        self.in_flight_windows.clear();
        // Taken out to be drained while the cache is filled, then put back with its capacity.
        let mut written = std::mem::take(&mut self.written);
        let mut inserts = Vec::with_capacity(written.len());
        for (digest, entry) in written.drain() {
            let Written { key, value, cache } = entry;
            let (metric, start_ms, member) = key;
            let small = value.small();
            let stored = value.clone();
            self.in_flight.insert(digest, value);
            self.in_flight_windows.insert((metric, start_ms));
            match small {
                Some(small) if cache => self.remember(digest, (metric, start_ms), small),
                // Not cached: rarely read, or too long (a conversion's times). An older value
                // cached for the entry would now be wrong, and the window has an entry only
                // the reader knows.
                _ => {
                    self.recent.entries.remove(&digest);
                    self.older.entries.remove(&digest);
                    let known = self
                        .known
                        .entry((metric, start_ms))
                        .or_insert(Known::Stored);
                    *known = known.dropped();
                }
            }
            inserts.push(MemberInsert {
                metric,
                start_ms,
                member,
                value: stored,
            });
        }
        self.written = written;
        in_key_order(inserts)
    }

    /// The entries a cache generation holds and the filter's bytes, for tests.
    #[cfg(test)]
    pub fn budget(&self) -> (usize, usize) {
        (self.cache_capacity, self.filter.blocks.len() * 64)
    }

    /// Entries written since the last [`MemberIndex::take_written`].
    pub fn written_len(&self) -> usize {
        self.written.len()
    }

    /// Entries held in memory (written and cached), for the memory gauge.
    pub fn resident(&self) -> usize {
        self.written.len()
            + self.in_flight.len()
            + self.recent.entries.len()
            + self.older.entries.len()
    }

    /// An entry being stored, probed only when its window has some (see [`Self::cached`]).
    fn in_flight(&self, digest: u128, namespace: Namespace) -> Option<&EntryValue> {
        if self.in_flight_windows.contains(&namespace) {
            self.in_flight.get(&digest)
        } else {
            None
        }
    }

    /// A cached entry, kept in the recent generation when found in the older one.
    ///
    /// A generation is probed only when it holds entries of the window: its few windows are a
    /// small table at hand, its entries a large one whose probe is a trip to main memory, and
    /// some windows have none cached (event ids are never cached once stored).
    fn cached(&mut self, digest: u128, namespace: Namespace) -> Option<Small> {
        if self.recent.namespaces.contains(&namespace) {
            if let Some(small) = self.recent.entries.get(&digest) {
                return Some(*small);
            }
        }
        if !self.older.namespaces.contains(&namespace) {
            return None;
        }
        let small = *self.older.entries.get(&digest)?;
        self.remember(digest, namespace, small);
        Some(small)
    }

    /// An entry neither written nor cached: none in a complete window, nor in a filtered one
    /// when the filter never saw it; else the reader's answer, cached when present.
    fn stored(
        &mut self,
        source: &Source<'_>,
        digest: u128,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateReadError> {
        match self.known(source, (metric, start_ms))? {
            Known::Complete { .. } => return Ok(None),
            Known::Filtered { epoch }
                if epoch == self.filter.epoch && !self.filter.may_contain(digest) =>
            {
                return Ok(None)
            }
            _ => {}
        }
        let value = source
            .reader
            .member(source.partition, metric, start_ms, key)?;
        if let Some(small) = value.as_deref().and_then(Small::new) {
            self.remember(digest, (metric, start_ms), small);
        }
        Ok(value)
    }

    /// What is known of a window's entries; asks the reader the first time a window is used.
    fn known(
        &mut self,
        source: &Source<'_>,
        namespace: Namespace,
    ) -> Result<Known, StateReadError> {
        if let Some(known) = self.known.get(&namespace) {
            return Ok(*known);
        }
        if self.known.len() >= MAX_TRACKED_WINDOWS {
            self.known.clear();
        }
        if self.in_flight_windows.contains(&namespace) {
            // Some of its entries may be neither stored yet nor cached any more (the cache
            // may have dropped them before this first use): misses are read.
            self.known.insert(namespace, Known::Stored);
            return Ok(Known::Stored);
        }
        // Entries written here but not yet stored are in `written` (and in the filter), so
        // "nothing stored" means the index holds all there is.
        let (metric, start_ms) = namespace;
        let known = if source
            .reader
            .has_entries(source.partition, metric, start_ms)?
        {
            Known::Stored
        } else {
            Known::Complete {
                epoch: self.filter.epoch,
            }
        };
        self.known.insert(namespace, known);
        Ok(known)
    }

    fn remember(&mut self, digest: u128, namespace: Namespace, value: Small) {
        if self.recent.entries.len() >= self.cache_capacity {
            let dropped = std::mem::replace(&mut self.older, std::mem::take(&mut self.recent));
            // The dropped entries' windows may now have entries neither here nor written.
            for namespace in dropped.namespaces {
                if let Some(known) = self.known.get_mut(&namespace) {
                    *known = known.dropped();
                }
            }
        }
        self.recent.entries.insert(digest, value);
        self.recent.namespaces.insert(namespace);
    }
}

/// A Bloom filter of the entries written since its epoch began, and of those written or in
/// flight when it began (so a window first used in the epoch with nothing stored or in flight
/// has every entry it will ever have in the filter: they are all written through this index
/// from then on). It never answers "absent" for an entry it saw; a false "maybe" costs a read.
///
/// Blocked: a key sets [`FILTER_PROBES`] bits in one 512-bit block, one cache line, so a probe
/// costs one memory access. The filter is a fixed size: once it has taken a key for every
/// [`FILTER_BITS_PER_KEY`] bits, about 6% of absent keys would pass it, so it starts a new
/// epoch, empty but for the entries written or in flight, and windows of older epochs read
/// their misses again (so do all windows when the partition's share changes: see
/// [`MemberIndex::resize`]). An entry takes about 6 bits here against 33 bytes in the cache:
/// the filter answers "absent" for far more entries than the cache can hold. It assumes a
/// checkpoint writes far fewer entries than it holds (8 MiB split between partitions holds
/// millions): carried over into a new epoch, more would leave it saturated, still right but
/// answering "maybe" to every key.
#[derive(Debug)]
struct WrittenFilter {
    blocks: Vec<[u64; 8]>,
    /// Entries put since the epoch began, those carried over from the last one aside (at
    /// most about two checkpoints' worth, so a full filter does not start epoch after epoch).
    added: usize,
    capacity: usize,
    epoch: u64,
}

const FILTER_PROBES: u32 = 5;
const FILTER_BITS_PER_KEY: usize = 6;

impl WrittenFilter {
    fn new(bytes: usize) -> Self {
        let blocks = Self::blocks_for(bytes);
        WrittenFilter {
            blocks: vec![[0; 8]; blocks],
            added: 0,
            capacity: blocks * 512 / FILTER_BITS_PER_KEY,
            epoch: 0,
        }
    }

    fn blocks_for(bytes: usize) -> usize {
        (bytes / 64).max(1)
    }

    /// The block of a digest and the bits it sets there. The digest is uniform: its low half
    /// picks the block, its high half the bits (9 bits a probe).
    fn place(&self, digest: u128) -> (usize, impl Iterator<Item = (usize, u64)>) {
        let block = ((u128::from(digest as u64) * self.blocks.len() as u128) >> 64) as usize;
        let high = (digest >> 64) as u64;
        let bits = (0..FILTER_PROBES).map(move |probe| {
            let bit = (high >> (probe * 9)) & 511;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        });
        (block, bits)
    }

    fn insert(&mut self, digest: u128) {
        let (block, bits) = self.place(digest);
        let words = &mut self.blocks[block];
        for (word, mask) in bits {
            words[word] |= mask;
        }
    }

    /// Adds an entry put; false once the filter is full (the entry is added all the same).
    fn add(&mut self, digest: u128) -> bool {
        self.insert(digest);
        self.added += 1;
        self.added < self.capacity
    }

    fn may_contain(&self, digest: u128) -> bool {
        let (block, mut bits) = self.place(digest);
        let words = &self.blocks[block];
        bits.all(|(word, mask)| words[word] & mask != 0)
    }

    /// Empties the filter for a new epoch.
    fn start_epoch(&mut self) {
        self.blocks.iter_mut().for_each(|block| *block = [0; 8]);
        self.added = 0;
        self.epoch += 1;
    }
}

/// Entries in key order: the same entries give the same write, and RocksDB inserts sorted
/// keys into its memtable much faster (measured: the core bench ran at ~55k events/s with
/// entries in digest order, ~80k in key order).
///
/// Sorted on a copy of each key's first 16 bytes, so most comparisons are of integers held
/// side by side rather than of bytes behind two pointers (the comparisons of the boxed keys
/// were 5% of the core bench's time). Keys are unique: unstable is enough.
fn in_key_order(inserts: Vec<MemberInsert>) -> Vec<MemberInsert> {
    let mut order: Vec<(usize, EpochMillis, u128, usize)> = inserts
        .iter()
        .enumerate()
        .map(|(index, insert)| (insert.metric, insert.start_ms, head(&insert.member), index))
        .collect();
    order.sort_unstable_by(|a, b| {
        (a.0, a.1, a.2)
            .cmp(&(b.0, b.1, b.2))
            .then_with(|| inserts[a.3].member.cmp(&inserts[b.3].member))
    });
    let mut slots: Vec<Option<MemberInsert>> = inserts.into_iter().map(Some).collect();
    order
        .into_iter()
        .filter_map(|(.., index)| slots[index].take())
        .collect()
}

/// A key's first 16 bytes as a big-endian number, zero-padded: a smaller head means a smaller
/// key, and equal heads leave the order to the whole keys (a padding zero may stand for the
/// end of a shorter key or for a zero byte).
fn head(key: &[u8]) -> u128 {
    let mut bytes = [0; 16];
    let len = key.len().min(16);
    bytes[..len].copy_from_slice(&key[..len]);
    u128::from_be_bytes(bytes)
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
    use std::sync::atomic::Ordering;

    use super::*;

    type CountingReader = super::CountingReader<MemoryReader>;

    fn source_of<'a>(reader: &'a CountingReader, partition: &'a PartitionKey) -> Source<'a> {
        Source { reader, partition }
    }

    fn store(reader: &CountingReader, partition: &PartitionKey, index: &mut MemberIndex) {
        let written = index.take_written();
        reader.inner.write_members(partition, &written, &[]);
    }

    #[test]
    fn entries_are_handed_over_in_key_order() {
        // Keys sharing their first 16 bytes, ending in zeros, or a prefix of another: the
        // heads tie and the whole keys decide.
        let keys: Vec<&[u8]> = vec![
            b"suser-0000000000012",
            b"suser-0000000000011",
            b"suser-000000000",
            b"suser-000000000\0",
            b"suser-000000000\0\0",
            b"suser-0000000001",
            b"b",
            b"",
            b"s\xff",
        ];
        let mut index = MemberIndex::new(16, 1024);
        for (metric, start_ms) in [(1, 60_000), (0, 120_000), (0, 60_000)] {
            for key in &keys {
                index.insert(metric, start_ms, key);
            }
        }
        let taken: Vec<_> = index
            .take_written()
            .into_iter()
            .map(|insert| (insert.metric, insert.start_ms, insert.member))
            .collect();
        let mut expected = taken.clone();
        expected.sort();
        assert_eq!(taken, expected);
        assert_eq!(taken.len(), 27);
    }

    #[test]
    fn calendar_aligned_windows_spread_over_the_slots_of_a_table() {
        use std::hash::BuildHasher;
        // Hour starts have seven zero low bits; a table's slot is the hash's low bits.
        let build = BuildHasherDefault::<NamespaceHasher>::default();
        let slots: HashSet<u64> = (0..8usize)
            .flat_map(|metric| (0..1000i64).map(move |hour| (metric, hour * 3_600_000)))
            .map(|namespace| build.hash_one(namespace) & 4095)
            .collect();
        // 8,000 windows over 4,096 slots: about 3,500 distinct when uniform.
        assert!(slots.len() > 3_000, "{} slots used", slots.len());
    }

    #[test]
    fn written_entries_are_seen_before_they_are_stored_and_the_cache_stays_bounded() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(2, 1024);
        assert!(!index.contains(&source, 0, 0, b"a").expect("in memory"));
        index.insert(0, 0, b"a");
        index.put(0, 0, b"p", b"\x01");
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
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(1, 1024);
        index.insert(0, 0, b"stored");
        store(&reader, &partition, &mut index);
        let mut index = MemberIndex::new(1, 1024);
        for member in [b"a", b"b", b"c", b"d"] {
            index.put(0, 0, member, member);
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
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        // Another window with stored entries, whose reads turn the cache over.
        let mut other = MemberIndex::new(1, 1024);
        other.insert(1, 0, b"x1");
        other.insert(1, 0, b"x2");
        store(&reader, &partition, &mut other);

        let mut index = MemberIndex::new(1, 1024);
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
    fn a_new_window_answers_misses_from_the_cache_then_from_the_filter() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(3, 1024);
        for member in [b"a", b"b", b"c"] {
            assert!(!index.contains(&source, 0, 0, member).expect("in memory"));
            index.insert(0, 0, member);
        }
        store(&reader, &partition, &mut index);
        assert!(index.contains(&source, 0, 0, b"a").expect("in memory"));
        assert!(!index.contains(&source, 0, 0, b"z").expect("in memory"));
        assert!(index.get(&source, 0, 0, b"z").expect("in memory").is_none());
        assert_eq!(reader.reads.load(Ordering::Relaxed), 0, "all answered here");

        // Two rotations of another window's entries drop the first window's: from then on
        // its entries are read, and a key never written is answered by the filter.
        rotate_cache_twice(&reader, &partition, &mut index);
        assert!(index.contains(&source, 0, 0, b"b").expect("in memory"));
        assert_eq!(
            reader.reads.load(Ordering::Relaxed),
            1,
            "b asked of the reader"
        );
        assert!(!index.contains(&source, 0, 0, b"z").expect("in memory"));
        assert!(index.get(&source, 0, 0, b"y").expect("in memory").is_none());
        assert_eq!(
            reader.reads.load(Ordering::Relaxed),
            1,
            "z and y from the filter"
        );
    }

    /// Stores two rounds of three entries of window 1, turning a cache of three over twice.
    fn rotate_cache_twice(
        reader: &CountingReader,
        partition: &PartitionKey,
        index: &mut MemberIndex,
    ) {
        for round in 0..2u8 {
            for member in [b"x", b"y", b"w"] {
                index.insert(1, 0, &[member[0], round]);
            }
            store(reader, partition, index);
        }
    }

    #[test]
    fn windows_of_an_epoch_the_filter_left_behind_read_their_misses() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        // One block of 512 bits: full after 85 entries put.
        let mut index = MemberIndex::new(3, 64);
        assert!(!index.contains(&source, 0, 0, b"a").expect("in memory"));
        index.insert(0, 0, b"a");
        store(&reader, &partition, &mut index);
        rotate_cache_twice(&reader, &partition, &mut index);
        assert!(!index.contains(&source, 0, 0, b"z").expect("in memory"));
        assert_eq!(reader.reads.load(Ordering::Relaxed), 0, "z from the filter");

        for entry in 0..100u8 {
            index.insert(3, 0, &[entry]);
        }
        assert_eq!(index.filter.epoch, 1, "the full filter started over");
        assert!(!index.contains(&source, 0, 0, b"z").expect("in memory"));
        assert_eq!(
            reader.reads.load(Ordering::Relaxed),
            1,
            "z asked of the reader"
        );
    }

    #[test]
    fn a_filter_starting_over_keeps_the_entries_not_stored_yet() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(3, 64);
        // Written before the filter starts over, stored after.
        index.insert(2, 0, b"k");
        for entry in 0..100u8 {
            index.insert(3, 0, &[entry]);
        }
        assert_eq!(index.filter.epoch, 1, "the full filter started over");
        // Window 2's first use: nothing stored yet, so it is complete in the new epoch.
        assert!(!index.contains(&source, 2, 0, b"other").expect("in memory"));
        store(&reader, &partition, &mut index);
        rotate_cache_twice(&reader, &partition, &mut index);
        assert!(
            index.contains(&source, 2, 0, b"k").expect("read"),
            "k was written before the epoch began: the new filter must hold it"
        );
    }

    #[test]
    fn a_value_too_long_to_cache_replaces_the_cached_one() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(16, 1024);
        index.put(0, 0, b"f", b"short");
        store(&reader, &partition, &mut index);
        let long: Box<[u8]> = Box::from(&b"longer than eight bytes"[..]);
        index.put(0, 0, b"f", &long);
        store(&reader, &partition, &mut index);
        assert_eq!(
            index
                .get(&source, 0, 0, b"f")
                .expect("in memory")
                .as_deref(),
            Some(&*long)
        );
    }

    #[test]
    fn rarely_read_entries_leave_the_cache_to_others_and_stay_exact() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(16, 1024);
        // The window's first use: nothing stored, so it starts complete.
        assert!(!index.contains(&source, 1, 0, b"new").expect("in memory"));
        index.put(1, 0, b"id", &5i64.to_be_bytes());
        index.insert(0, 0, b"member");
        assert!(index.contains(&source, 1, 0, b"id").expect("written"));
        store(&reader, &partition, &mut index);
        assert!(index.contains(&source, 1, 0, b"id").expect("in flight"));
        store(&reader, &partition, &mut index);
        assert_eq!(index.recent.entries.len(), 2, "both cached");

        index.put_rarely_read(1, 0, b"id", &9i64.to_be_bytes());
        index.put_rarely_read(1, 0, b"other", &[]);
        store(&reader, &partition, &mut index);
        store(&reader, &partition, &mut index);
        assert_eq!(
            index.recent.entries.len(),
            1,
            "only the member stays cached"
        );
        assert_eq!(reader.reads.load(Ordering::Relaxed), 0);
        // The older value cached for `id` went with it: the stored one is read.
        assert_eq!(
            index.get(&source, 1, 0, b"id").expect("read").as_deref(),
            Some(&9i64.to_be_bytes()[..])
        );
        assert!(index.contains(&source, 1, 0, b"other").expect("read"));
        assert_eq!(reader.reads.load(Ordering::Relaxed), 2);
        // A key the window never had is still answered by the filter, not read.
        assert!(!index.contains(&source, 1, 0, b"never").expect("filtered"));
        assert_eq!(reader.reads.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_window_with_stored_entries_is_asked_of_the_reader() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut before_restart = MemberIndex::new(16, 1024);
        before_restart.insert(0, 0, b"a");
        before_restart.put(0, 0, b"p", &7u32.to_be_bytes());
        store(&reader, &partition, &mut before_restart);

        let mut index = MemberIndex::new(16, 1024);
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
