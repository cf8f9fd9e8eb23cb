//! Per-entity state: the members of distinct sets, threshold progress, the occurrences of
//! trailing distinct members, the counts of trailing threshold entities, conversion funnels
//! and event ids.
//!
//! Each partition keeps its entries in memory ([`MemberIndex`]) up to a budget of bytes, and
//! the caller stores every entry written in RocksDB at each checkpoint. Past the budget, the
//! shards of the least recently used windows leave memory (but for the entries not stored
//! yet), and a miss there is asked of a
//! [`StateReader`]: nsm-state answers from RocksDB; [`MemoryReader`] answers from memory for
//! tests and benchmarks. A miss where every entry is in memory is an answer, not a read, so a
//! new member costs no I/O; a restart loads no entries, they come back a page (a checkpoint
//! shard of a window) at a time as events need them. How, on [`MemberIndex`].
//!
//! Entries live in the namespace of one window of one metric, so expiring a window deletes
//! them with it.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::changes::{
    member_shard_of, MemberInsert, MemberRangeDelete, MemberRow, MemberShardRows, PartitionChanges,
    WindowDelete, WindowsBefore, MEMBER_SHARDS,
};

use super::funnel::FUNNEL_WINDOW;
use crate::table::{entity_key, EntityTable, SHARDS};
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

    /// Every entry stored in one page: checkpoint shard `shard` (see [`member_shard_of`]) of
    /// window `start_ms` of metric `metric` (of funnel period `period` in a conversion's
    /// funnel window, 0 elsewhere), each by the XXH3-128 digest of its key, in any order.
    /// While its entries have room, the engine reads a page whole on its first miss there, so
    /// a window left on disk is read back in about a thousand reads, whatever its entries.
    fn member_page(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
        period: u64,
        shard: u16,
    ) -> Result<Vec<(u128, Vec<u8>)>, StateReadError>;

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

    fn member_page(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
        period: u64,
        shard: u16,
    ) -> Result<Vec<(u128, Vec<u8>)>, StateReadError> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let from = (
            partition.clone(),
            (metric, start_ms, Box::<[u8]>::default()),
        );
        Ok(entries
            .range(from..)
            .take_while(|((stored, (m, s, _)), _)| {
                stored == partition && *m == metric && *s == start_ms
            })
            .filter(|((_, (_, _, key)), _)| place_of(metric, start_ms, key).2 == period)
            .map(|((_, (_, _, key)), value)| (entity_key(0, key), value.to_vec()))
            .filter(|(digest, _)| member_shard_of(*digest) == shard)
            .collect())
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

/// A reader counting the entries read from the one it wraps: those asked one at a time, and
/// those of the pages the engine's memory could not answer. For benchmarks and tests.
#[derive(Debug, Default)]
pub struct CountingReader<R> {
    inner: R,
    reads: Arc<AtomicU64>,
    pages: Arc<AtomicU64>,
}

impl<R: StateReader> CountingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            reads: Arc::default(),
            pages: Arc::default(),
        }
    }

    /// The count of entries read, shared: it goes on counting once the reader is handed to
    /// an engine.
    pub fn reads(&self) -> Arc<AtomicU64> {
        self.reads.clone()
    }

    /// The count of pages read, shared as [`CountingReader::reads`] is.
    pub fn page_reads(&self) -> Arc<AtomicU64> {
        self.pages.clone()
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

    fn member_page(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
        period: u64,
        shard: u16,
    ) -> Result<Vec<(u128, Vec<u8>)>, StateReadError> {
        let rows = self
            .inner
            .member_page(partition, metric, start_ms, period, shard)?;
        self.reads.fetch_add(rows.len() as u64, Ordering::Relaxed);
        self.pages.fetch_add(1, Ordering::Relaxed);
        Ok(rows)
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

/// Hashes a space's place (metric, start, period) with one multiply a word: a space is looked
/// up at every entry read or written, where SipHash showed in profiles, and spaces are few
/// and come from the config and calendar-aligned times, not from arbitrary input.
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

/// Where an entry lives in memory: its window (metric, start) and, for a conversion's funnel
/// entries, their period (the key's first 8 bytes, see [`super::funnel`]), so that old
/// periods go as whole tables; 0 for every other entry.
type Place = (usize, EpochMillis, u64);

type SpaceMap = HashMap<Place, Space, BuildHasherDefault<NamespaceHasher>>;

/// An entry's row: a first lane of the value's length, flags and stamp, and the value's first
/// 2 bytes; then, only in the tables that need them, lanes of 4 more bytes each. A table starts
/// with the first lane alone (a member, a step, a small count: most entries) and is widened
/// once a value needs more (see [`RowLayout`]): a row costs 20, 24 or 28 bytes a slot.
const LENGTH: u32 = 0xf;
/// The value is longer than 8 bytes and kept in [`Space::long`].
const LONG: u32 = 1 << 4;
/// The entry was written (not only read from the store): with its stamp, whether it is in the
/// index's written log of the checkpoint being filled.
const WRITTEN: u32 = 1 << 5;
/// All but the value's last 2 bytes are zero, and those 2 are the ones in the first lane (a
/// count stored as 4 big-endian bytes, below 65,536).
const ZEROS: u32 = 1 << 6;
/// Bits 7 to 15 of the first lane: the checkpoint during which the entry was last written
/// (its low 9 bits; 0 for an entry read from the store). An entry of the checkpoint just
/// handed over is not in the store yet and must stay in memory; any other may leave. A stamp
/// equal to that checkpoint's by wrapping around keeps an entry one checkpoint longer, no
/// more.
const STAMP_SHIFT: u32 = 7;
const STAMP_MASK: u32 = 0x1ff;
/// The top half of the first lane: the value's first 2 bytes.
const INLINE_SHIFT: u32 = 16;
/// About the bytes a row of the widest tables takes in memory.
#[cfg(test)]
const ROW_BYTES: usize = 40;

fn stamp(checkpoint: u64) -> u32 {
    checkpoint as u32 & STAMP_MASK
}

fn stamp_of(first_lane: u32) -> u32 {
    first_lane >> STAMP_SHIFT & STAMP_MASK
}

/// Where a row keeps its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowLayout {
    /// In the first lane's 2 bytes and as many lanes after it as it needs (up to 8 bytes).
    Lanes(usize),
    /// Zeros but for its last 2 bytes, which the first lane holds.
    Zeros,
    /// Longer than 8 bytes: in [`Space::long`].
    Long,
}

impl RowLayout {
    fn of(value: &[u8]) -> Self {
        match value.len() {
            0..=2 => RowLayout::Lanes(1),
            len @ 3..=8 if value[..len - 2].iter().all(|&byte| byte == 0) => RowLayout::Zeros,
            3..=6 => RowLayout::Lanes(2),
            7..=8 => RowLayout::Lanes(3),
            _ => RowLayout::Long,
        }
    }

    /// The lanes a row of this layout needs.
    fn lanes(self) -> usize {
        match self {
            RowLayout::Lanes(lanes) => lanes,
            RowLayout::Zeros | RowLayout::Long => 1,
        }
    }
}

/// One bit per page of a space (a checkpoint shard of its place, see [`member_shard_of`]).
type PageBits = [u64; MEMBER_SHARDS as usize / 64];

/// Pages in one shard of an [`EntityTable`] (its top 6 bits, a checkpoint shard's top 10).
const PAGES_PER_TABLE_SHARD: usize = MEMBER_SHARDS as usize / SHARDS;

/// The entries of one place, in memory.
#[derive(Debug)]
struct Space {
    rows: EntityTable,
    long: DigestMap<Box<[u8]>>,
    /// Pages that may hold stored entries this space lacks: in a table shard evicted, or
    /// stored before the index first used the space. A miss there reads the page whole;
    /// anywhere else it is an answer.
    spilled: PageBits,
    /// Whether the reader was asked if the place has stored entries. Until then every shard
    /// counts as spilled: a space first written, never read, cannot know.
    checked: bool,
    /// The checkpoint during which the space was last used, for the order of eviction.
    used_in: u64,
    /// A page read whole showed the place too large for the room left: its misses read their
    /// entry alone.
    too_large: bool,
}

impl Space {
    /// A space of a place whose stored entries are unknown (`known_empty: false`), or known to
    /// be none: every entry it will hold is one written through the index.
    fn new(checkpoint: u64, known_empty: bool) -> Self {
        Self {
            rows: EntityTable::new(1),
            long: DigestMap::default(),
            spilled: [if known_empty { 0 } else { u64::MAX }; MEMBER_SHARDS as usize / 64],
            checked: known_empty,
            used_in: checkpoint,
            too_large: false,
        }
    }

    fn is_spilled(&self, page: u16) -> bool {
        self.spilled[usize::from(page) / 64] >> (page % 64) & 1 != 0
    }

    /// Takes in the stored entries of a page read whole: those the space holds are newer (or
    /// the same), and stay.
    fn load_page(&mut self, page: u16, rows: Vec<(u128, Vec<u8>)>) {
        for (digest, value) in rows {
            if self.rows.get(digest).is_none() {
                self.set(digest, &value, 0);
            }
        }
        self.spilled[usize::from(page) / 64] &= !(1 << (page % 64));
    }

    fn value(&self, digest: u128, lanes: &[u32]) -> EntryValue {
        if lanes[0] & LONG != 0 {
            if let Some(long) = self.long.get(&digest) {
                return EntryValue::Long(long.clone());
            }
        }
        let mut bytes = [0; 8];
        let len = (lanes[0] & LENGTH) as u8;
        let inline = ((lanes[0] >> INLINE_SHIFT) as u16).to_le_bytes();
        if lanes[0] & ZEROS != 0 {
            let end = usize::from(len);
            bytes[end - 2..end].copy_from_slice(&inline);
            return EntryValue::Small(Small { len, bytes });
        }
        bytes[..2].copy_from_slice(&inline);
        if let Some(lane) = lanes.get(1) {
            bytes[2..6].copy_from_slice(&lane.to_le_bytes());
        }
        if let Some(lane) = lanes.get(2) {
            bytes[6..].copy_from_slice(&lane.to_le_bytes()[..2]);
        }
        EntryValue::Small(Small { len, bytes })
    }

    /// Sets a row's value with `flags` ([`WRITTEN`] and a stamp, or 0 for a value read from
    /// the store); returns whether the row was written before during the checkpoint of
    /// `flags`'s stamp. The table's own record of changed rows is not kept: the index's log
    /// is.
    fn set(&mut self, digest: u128, value: &[u8], flags: u32) -> bool {
        let layout = RowLayout::of(value);
        if layout.lanes() > self.rows.lanes() {
            self.rows.widen(layout.lanes());
        }
        let (row, _) = self.rows.entry_untracked(digest);
        let was_long = row[0] & LONG != 0;
        let was_written =
            row[0] & WRITTEN != 0 && flags & WRITTEN != 0 && stamp_of(row[0]) == stamp_of(flags);
        let len = value.len() as u32;
        match layout {
            RowLayout::Long => {
                row[0] = LONG | flags;
                self.long.insert(digest, value.into());
                return was_written;
            }
            RowLayout::Zeros => {
                let [.., a, b] = value else {
                    unreachable!("a value of zeros has 3 bytes or more")
                };
                row[0] =
                    len | flags | ZEROS | u32::from(u16::from_le_bytes([*a, *b])) << INLINE_SHIFT;
            }
            RowLayout::Lanes(_) => {
                let mut bytes = [0; 10];
                bytes[..value.len()].copy_from_slice(value);
                row[0] = len
                    | flags
                    | u32::from(u16::from_le_bytes([bytes[0], bytes[1]])) << INLINE_SHIFT;
                for (lane, chunk) in row[1..].iter_mut().zip(bytes[2..].chunks_exact(4)) {
                    *lane = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                }
            }
        }
        if was_long {
            self.long.remove(&digest);
        }
        was_written
    }

    /// About the bytes a row of this space takes.
    fn row_bytes(&self) -> usize {
        self.rows.mean_row_bytes()
    }

    /// Drops a shard's entries but those written during checkpoint `handed_over` (the store
    /// has every other): once any went, misses there are read. Returns how many went.
    fn evict(&mut self, shard: usize, handed_over: u64) -> usize {
        let pending = stamp(handed_over);
        // A sub-table left sparse shrinks, one left empty frees its slots.
        let removed = self
            .rows
            .retain_shard(shard, |_, lanes| stamp_of(lanes[0]) == pending);
        if removed == 0 {
            // Nothing left: a miss here is still an answer, not a read.
            return 0;
        }
        if !self.long.is_empty() {
            let rows = &self.rows;
            self.long.retain(|digest, _| {
                EntityTable::shard_of(*digest) != shard || rows.get(*digest).is_some()
            });
        }
        let first = shard * PAGES_PER_TABLE_SHARD;
        let pages = (1u64 << PAGES_PER_TABLE_SHARD) - 1;
        self.spilled[first / 64] |= pages << (first % 64);
        removed
    }

    fn heap_bytes(&self) -> usize {
        let long: usize = self.long.values().map(|value| value.len() + 48).sum();
        self.rows.heap_bytes() + long
    }
}

/// An entry written since the last checkpoint: where, its key in the log's bytes, and the
/// value written (a later write of the same entry is logged again, and wins).
#[derive(Debug)]
struct Written {
    place: Place,
    key: std::ops::Range<usize>,
    value: EntryValue,
}

/// One partition's per-entity entries, in memory up to a budget of bytes, the rest read from
/// the store.
///
/// Each place (a window of a metric) keeps its entries in an [`EntityTable`] keyed by the
/// XXH3-128 of the entry's key, its value (nearly always 8 bytes or less) in the row: one
/// digest and one probe an access, however many entries. Nothing is a cache to keep in step:
/// an entry written stays in its table until its window goes, unless the partition's entries
/// outgrow the budget, when shards of the least recently used places leave memory (the store
/// has them: only entries written during the checkpoint being stored stay). A miss in a page
/// (a checkpoint shard of a place) that left, or in a place whose stored entries were never
/// loaded (after a restart), is asked of the reader: the whole page while the entries have
/// room, else the entry alone; a miss anywhere else is an answer, so a new member of a window
/// costs no read.
#[derive(Debug)]
pub(super) struct MemberIndex {
    spaces: SpaceMap,
    /// Writes since the last checkpoint, with their keys in `keys`: the store keeps entries
    /// by key. Handing them over needs no lookup of their rows.
    written: Vec<Written>,
    keys: Vec<u8>,
    /// Distinct entries in `written`.
    written_entries: usize,
    /// Bytes the entries may take in memory.
    budget: usize,
    /// Bytes the entries took when last measured (at the last checkpoint), and about the bytes
    /// of the rows taken in since (read back or written): whether a miss may read its page
    /// whole.
    measured_bytes: usize,
    bytes_since: usize,
    /// Entries left memory at a checkpoint, and have not fallen to half the budget since: the
    /// entries do not fit, so a page read whole would push out others that are read back in
    /// turn. A miss then reads its entry alone.
    evicting: bool,
    /// Checkpoints taken so far, plus one: the checkpoint being filled.
    checkpoint: u64,
    /// Every place with stored entries is in `spaces`: the partition started with none stored
    /// and no place has left memory whole since. A new place then has nothing stored, and a
    /// shard no place evicted is whole in memory.
    all_known: bool,
}

impl MemberIndex {
    /// An index keeping up to `budget` bytes of entries in memory.
    pub fn new(budget: usize) -> Self {
        Self {
            spaces: SpaceMap::default(),
            written: Vec::new(),
            keys: Vec::new(),
            written_entries: 0,
            budget,
            measured_bytes: 0,
            bytes_since: 0,
            evicting: false,
            checkpoint: 1,
            all_known: false,
        }
    }

    /// The same index of a partition with no stored entries.
    pub fn with_nothing_stored(mut self) -> Self {
        self.all_known = self.spaces.is_empty();
        self
    }

    /// Sets the budget, as the engine's is split between more or fewer partitions; a smaller
    /// one is met at the next checkpoint.
    pub fn resize(&mut self, budget: usize) {
        self.budget = budget;
    }

    /// The value of an entry, if present.
    pub fn get(
        &mut self,
        source: &Source<'_>,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<EntryValue>, StateReadError> {
        let digest = entity_key(0, key);
        let (taken, budget) = (self.measured_bytes + self.bytes_since, self.budget);
        let room = !self.evicting && taken < budget;
        let space = self.space_to_read(source, metric, start_ms, key)?;
        if let Some(lanes) = space.rows.get(digest) {
            return Ok(Some(space.value(digest, lanes)));
        }
        let page = member_shard_of(digest);
        if !space.is_spilled(page) {
            return Ok(None);
        }
        if !room || space.too_large {
            // Full, entries left memory lately, or the place would not fit: a page read whole
            // would push out as many entries as it brings, each read back whole in turn. The
            // entry alone.
            let Some(value) = source
                .reader
                .member(source.partition, metric, start_ms, key)?
            else {
                return Ok(None);
            };
            space.set(digest, &value, 0);
            self.bytes_since += space.row_bytes();
            return Ok(Some(EntryValue::new(&value)));
        }
        let (_, _, period) = place_of(metric, start_ms, key);
        let rows = source
            .reader
            .member_page(source.partition, metric, start_ms, period, page)?;
        let loaded = rows.len();
        space.load_page(page, rows);
        // Pages of a place hold about as many entries each (digests are uniform): when the
        // place as a whole would not fit, reading its other pages whole would end in
        // evicting them. (Its rows' width is known once a page is in.)
        let page_bytes = loaded * space.row_bytes();
        space.too_large = taken + page_bytes * usize::from(MEMBER_SHARDS) > budget;
        let value = space
            .rows
            .get(digest)
            .map(|lanes| space.value(digest, lanes));
        self.bytes_since += page_bytes;
        Ok(value)
    }

    /// Whether an entry is present.
    pub fn contains(
        &mut self,
        source: &Source<'_>,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<bool, StateReadError> {
        Ok(self.get(source, metric, start_ms, key)?.is_some())
    }

    /// Adds a member (an entry with an empty value).
    pub fn insert(&mut self, metric: usize, start_ms: EpochMillis, key: &[u8]) {
        self.put(metric, start_ms, key, &[]);
    }

    /// Sets an entry's value.
    pub fn put(&mut self, metric: usize, start_ms: EpochMillis, key: &[u8], value: &[u8]) {
        let place = place_of(metric, start_ms, key);
        let digest = entity_key(0, key);
        let (checkpoint, all_known) = (self.checkpoint, self.all_known);
        let space = self
            .spaces
            .entry(place)
            .or_insert_with(|| Space::new(checkpoint, all_known));
        space.used_in = checkpoint;
        if !space.set(digest, value, WRITTEN | stamp(checkpoint) << STAMP_SHIFT) {
            self.written_entries += 1;
            self.bytes_since += space.row_bytes();
        }
        let from = self.keys.len();
        self.keys.extend_from_slice(key);
        self.written.push(Written {
            place,
            key: from..self.keys.len(),
            value: EntryValue::new(value),
        });
    }

    /// Sets the value of an entry read again only in exceptional cases (an event id, read
    /// back only when the event comes again); kept like any other.
    pub fn put_rarely_read(
        &mut self,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
        value: &[u8],
    ) {
        self.put(metric, start_ms, key, value);
    }

    /// The space of an entry to be read: on its first use, the reader says whether the place
    /// has stored entries (then every shard counts as spilled).
    fn space_to_read(
        &mut self,
        source: &Source<'_>,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<&mut Space, StateReadError> {
        let (checkpoint, all_known) = (self.checkpoint, self.all_known);
        let space = self
            .spaces
            .entry(place_of(metric, start_ms, key))
            .or_insert_with(|| Space::new(checkpoint, all_known));
        space.used_in = checkpoint;
        if !space.checked {
            // Entries written since the space was made are all in it, so "nothing stored"
            // leaves nothing to read; stored entries, written here or not, may be missing.
            if !source
                .reader
                .has_entries(source.partition, metric, start_ms)?
            {
                space.spilled = PageBits::default();
            }
            space.checked = true;
        }
        Ok(space)
    }

    /// What was written since the last call, to store before the next call; entries stay in
    /// memory meanwhile, so events may be applied while they are being stored. Then, over
    /// the budget, shards of the least recently used places leave memory.
    #[cfg(test)]
    pub fn take_written(&mut self) -> Vec<MemberInsert> {
        self.take_written_with_snapshots(&[]).0
    }

    /// As [`MemberIndex::take_written`], with the entries of the checkpoint shards `shards`
    /// that are whole in memory, taken before any entry leaves memory.
    pub fn take_written_with_snapshots(
        &mut self,
        shards: &[u16],
    ) -> (Vec<MemberInsert>, Vec<MemberShardRows>) {
        // A place gone since (its window expired) is deleted whole by the store. Rows of a
        // place still there stay until the log is taken: eviction keeps this checkpoint's.
        let mut known: Option<(Place, bool)> = None;
        let (spaces, keys) = (&self.spaces, &self.keys);
        let order: Vec<Order> = self
            .written
            .iter()
            .enumerate()
            .filter(|(_, written)| {
                let live = match known {
                    Some((place, live)) if place == written.place => live,
                    _ => spaces.contains_key(&written.place),
                };
                known = Some((written.place, live));
                live
            })
            .map(|(index, written)| {
                let (metric, start_ms, _) = written.place;
                (metric, start_ms, head(&keys[written.key.clone()]), index)
            })
            .collect();
        let inserts = in_key_order(order, &self.keys, &mut self.written);
        self.written.clear();
        self.keys.clear();
        self.written_entries = 0;
        let snapshots = shards
            .iter()
            .filter_map(|&shard| self.shard_rows(shard))
            .collect();
        let handed_over = self.checkpoint;
        self.checkpoint += 1;
        self.evict(handed_over);
        (inserts, snapshots)
    }

    /// Every entry of checkpoint shard `shard` (a digest's top 10 bits), when all of them are
    /// in memory: no place with stored entries is missing, and none evicted the table shard
    /// that holds it.
    fn shard_rows(&self, shard: u16) -> Option<MemberShardRows> {
        if !self.all_known || shard >= MEMBER_SHARDS {
            return None;
        }
        let table_shard = usize::from(shard) * SHARDS / usize::from(MEMBER_SHARDS);
        if self.spaces.values().any(|space| space.is_spilled(shard)) {
            return None;
        }
        let mut rows = Vec::new();
        for (&(metric, start_ms, period), space) in &self.spaces {
            space.rows.for_each_in_shard(table_shard, |digest, lanes| {
                if member_shard_of(digest) == shard {
                    rows.push(MemberRow {
                        metric,
                        start_ms,
                        period,
                        digest,
                        value: space.value(digest, lanes),
                    });
                }
            });
        }
        Some(MemberShardRows { shard, rows })
    }

    /// Evicts shards, least recently used places first, until the entries take three
    /// quarters of the budget (so that a checkpoint does not evict again at once). Entries
    /// written during checkpoint `handed_over` stay: the store does not have them yet (a
    /// shard of a busy window has some in every checkpoint, so shards go but for those). A
    /// place left with nothing in memory goes whole (a table costs some bytes even empty):
    /// made again, it asks the reader as after a restart.
    fn evict(&mut self, handed_over: u64) {
        let mut bytes: usize = self.spaces.values().map(Space::heap_bytes).sum();
        self.bytes_since = 0;
        self.measured_bytes = bytes;
        if bytes <= self.budget / 2 {
            self.evicting = false;
        }
        if bytes <= self.budget {
            return;
        }
        self.evicting = true;
        self.evict_down_to(self.budget / 4 * 3, &mut bytes, handed_over);
        self.measured_bytes = bytes;
    }

    /// Evicts shards, least recently used places first, until the entries take `target`
    /// bytes or less (`bytes` is what they take, kept up to date).
    fn evict_down_to(&mut self, target: usize, bytes: &mut usize, handed_over: u64) {
        let mut order: Vec<(u64, Place)> = self
            .spaces
            .iter()
            .map(|(place, space)| (space.used_in, *place))
            .collect();
        order.sort_unstable();
        for (_, place) in order {
            if *bytes <= target {
                return;
            }
            let Some(space) = self.spaces.get_mut(&place) else {
                continue;
            };
            let before = space.heap_bytes();
            for shard in 0..SHARDS {
                if space.rows.shard_len(shard) > 0
                    && space.evict(shard, handed_over) > 0
                    && before.saturating_sub(space.heap_bytes()) >= *bytes - target
                {
                    break;
                }
            }
            if space.rows.is_empty() && space.long.is_empty() {
                // Its stored entries are now in no space: a place made again asks the reader.
                self.all_known = false;
                self.spaces.remove(&place);
                *bytes = bytes.saturating_sub(before);
            } else {
                *bytes = bytes.saturating_sub(before.saturating_sub(space.heap_bytes()));
            }
        }
    }

    /// Forgets the entries of a window the partition deleted.
    pub fn forget_window(&mut self, metric: usize, start_ms: EpochMillis) {
        self.spaces
            .retain(|(m, start, _), _| !(*m == metric && *start == start_ms));
    }

    /// Forgets the entries of every window of `metric` starting before `before_ms`.
    pub fn forget_windows_before(&mut self, metric: usize, before_ms: EpochMillis) {
        self.spaces
            .retain(|(m, start, _), _| !(*m == metric && *start < before_ms));
    }

    /// Forgets the entries of a window whose keys sort before `before` (a conversion's
    /// funnel periods before a period bound).
    pub fn forget_range(&mut self, metric: usize, start_ms: EpochMillis, before: &[u8]) {
        let bound = period_of_key(before);
        self.spaces.retain(|(m, start, period), _| {
            !(*m == metric && *start == start_ms && *period < bound)
        });
    }

    /// The budget, for tests.
    #[cfg(test)]
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Entries written since the last [`MemberIndex::take_written`].
    pub fn written_len(&self) -> usize {
        self.written_entries
    }

    /// Entries held in memory, for the memory gauge.
    pub fn resident(&self) -> usize {
        self.spaces.values().map(|space| space.rows.len()).sum()
    }

    /// Bytes the entries take in memory.
    #[cfg(test)]
    pub fn resident_bytes(&self) -> usize {
        self.spaces.values().map(Space::heap_bytes).sum::<usize>() + self.keys.capacity()
    }
}

/// The place of an entry: a funnel entry's period is its key's first 8 bytes (every funnel key
/// starts with its whole period, `funnel::entry_key`, as the store's keys and the snapshots'
/// rows take it).
fn place_of(metric: usize, start_ms: EpochMillis, key: &[u8]) -> Place {
    if start_ms == FUNNEL_WINDOW {
        debug_assert!(key.len() >= 8, "a funnel key without its whole period");
        (metric, start_ms, period_of_key(key))
    } else {
        (metric, start_ms, 0)
    }
}

/// A key's first 8 bytes as a big-endian number, zero-padded: the period of a funnel entry
/// (periods sort as their keys).
fn period_of_key(key: &[u8]) -> u64 {
    let mut bytes = [0; 8];
    let len = key.len().min(8);
    bytes[..len].copy_from_slice(&key[..len]);
    u64::from_be_bytes(bytes)
}

/// A logged write's metric, window start, key's head (see [`head`]) and place in the log.
type Order = (usize, EpochMillis, u128, usize);

/// Entries in key order, each once with its last value: the same entries give the same
/// write, and RocksDB inserts sorted keys into its memtable much faster (measured: the core
/// bench ran at ~55k events/s with entries in digest order, ~80k in key order).
///
/// Sorted on a copy of each key's first 16 bytes, so most comparisons are of integers held
/// side by side rather than of bytes behind two pointers (the comparisons of the boxed keys
/// were 5% of the core bench's time); the log's order breaks ties between writes of one entry,
/// so the last of them comes last.
fn in_key_order(mut order: Vec<Order>, keys: &[u8], written: &mut [Written]) -> Vec<MemberInsert> {
    let key_of = |written: &[Written], index: usize| &keys[written[index].key.clone()];
    order.sort_unstable_by(|a, b| {
        (a.0, a.1, a.2)
            .cmp(&(b.0, b.1, b.2))
            .then_with(|| key_of(written, a.3).cmp(key_of(written, b.3)))
            .then(a.3.cmp(&b.3))
    });
    let mut inserts = Vec::with_capacity(order.len());
    for (position, &(metric, start_ms, head, index)) in order.iter().enumerate() {
        let overwritten = order.get(position + 1).is_some_and(|next| {
            (next.0, next.1, next.2) == (metric, start_ms, head)
                && key_of(written, next.3) == key_of(written, index)
        });
        if overwritten {
            continue;
        }
        inserts.push(MemberInsert {
            metric,
            start_ms,
            member: key_of(written, index).into(),
            value: std::mem::take(&mut written[index].value),
        });
    }
    inserts
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
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

    fn reads(reader: &CountingReader) -> u64 {
        reader.reads.load(Ordering::Relaxed)
    }

    fn page_reads(reader: &CountingReader) -> u64 {
        reader.pages.load(Ordering::Relaxed)
    }

    fn page_of(key: &[u8]) -> u16 {
        member_shard_of(entity_key(0, key))
    }

    const PLENTY: usize = 64 << 20;

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
        let mut index = MemberIndex::new(PLENTY);
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
            .flat_map(|metric| (0..1000i64).map(move |hour| (metric, hour * 3_600_000, 0u64)))
            .map(|place| build.hash_one(place) & 4095)
            .collect();
        // 8,000 windows over 4,096 slots: about 3,500 distinct when uniform.
        assert!(slots.len() > 3_000, "{} slots used", slots.len());
    }

    #[test]
    fn an_entry_written_twice_is_handed_over_once_with_its_last_value() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(PLENTY);
        let long = [7u8; 20];
        index.put(0, 0, b"a", b"\x01");
        index.put(0, 0, b"a", &long);
        index.put(0, 0, b"b", &long);
        index.put(0, 0, b"b", b"\x02\x03");
        index.insert(0, 0, b"c");
        assert_eq!(index.written_len(), 3);
        let get = |index: &mut MemberIndex, key: &[u8]| {
            index
                .get(&source, 0, 0, key)
                .expect("in memory")
                .map(|value| value.to_vec())
        };
        assert_eq!(get(&mut index, b"a"), Some(long.to_vec()));
        assert_eq!(get(&mut index, b"b"), Some(vec![2, 3]));
        assert_eq!(get(&mut index, b"c"), Some(vec![]));
        let taken: Vec<(Box<[u8]>, Vec<u8>)> = index
            .take_written()
            .into_iter()
            .map(|insert| (insert.member, insert.value.to_vec()))
            .collect();
        assert_eq!(
            taken,
            vec![
                (b"a"[..].into(), long.to_vec()),
                (b"b"[..].into(), vec![2, 3]),
                (b"c"[..].into(), vec![]),
            ]
        );
        // Written again after the checkpoint: handed over again.
        index.put(0, 0, b"a", b"\x09");
        assert_eq!(index.take_written().len(), 1);
        assert_eq!(get(&mut index, b"a"), Some(vec![9]));
    }

    #[test]
    fn values_of_every_length_read_back_exactly_as_their_table_widens() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(PLENTY);
        // No zero byte, or zeros but for the last 2 bytes (a small count's form).
        let value = |len: usize| {
            (1..=len as u8)
                .map(|b| b.wrapping_mul(37))
                .collect::<Vec<_>>()
        };
        let zeros = |len: usize| {
            let mut value = vec![0; len];
            if len >= 2 {
                value[len - 2..].copy_from_slice(&[len as u8, 7]);
            }
            value
        };
        let key = |len: usize, round: usize| format!("member-{len}-{round}").into_bytes();
        // Lengths rising, so the table widens twice with rows of every length in it, each row
        // rewritten with another length, from one lane's form to another's and back.
        for round in 0..4 {
            for len in 0..=12 {
                index.put(0, 0, &key(len, round), &value(len));
                index.put(0, 0, &key(len, 0), &value(12 - len));
                index.put(0, 0, &key(len, 1), &zeros(len));
                index.put(0, 0, &key(len, 2), &zeros(12 - len));
                index.put(0, 0, &key(len, 3), &value(len));
            }
        }
        let widest = index.spaces.values().map(|space| space.rows.lanes()).max();
        assert_eq!(widest, Some(3));
        for len in 0..=12 {
            let expected = [value(12 - len), zeros(len), zeros(12 - len), value(len)];
            for (round, expected) in expected.iter().enumerate() {
                let read = index
                    .get(&source, 0, 0, &key(len, round))
                    .expect("in memory");
                assert_eq!(read.as_deref(), Some(&expected[..]), "{len} {round}");
            }
        }
        assert_eq!(index.take_written().len(), 13 * 4);
    }

    #[test]
    fn members_steps_and_small_counts_take_one_lane_a_row_under_three_quarters_of_the_widest() {
        let mut index = MemberIndex::new(PLENTY);
        for user in 0..200_000u32 {
            let key = format!("user-{user}");
            index.insert(0, 0, key.as_bytes());
            index.put(1, 0, key.as_bytes(), &(user as u16).to_be_bytes());
            index.put(2, 0, key.as_bytes(), &(user % 5).to_be_bytes());
            index.put(3, 0, key.as_bytes(), &(u64::from(user) << 40).to_be_bytes());
        }
        let bytes = |metric: usize| {
            let space = &index.spaces[&(metric, 0, 0)];
            (space.rows.lanes(), space.heap_bytes())
        };
        let (widest_lanes, widest) = bytes(3);
        assert_eq!(widest_lanes, 3, "an event time's 8 bytes");
        for metric in [0, 1, 2] {
            let (lanes, narrow) = bytes(metric);
            assert_eq!(lanes, 1, "metric {metric}");
            assert!(
                narrow * 4 < widest * 3,
                "metric {metric}: {narrow} bytes against {widest}"
            );
        }
    }

    #[test]
    fn a_window_with_nothing_stored_answers_its_misses_without_reading() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(PLENTY);
        for member in 0..1_000u32 {
            let key = member.to_be_bytes();
            assert!(!index.contains(&source, 0, 0, &key).expect("in memory"));
            index.insert(0, 0, &key);
            if member % 100 == 0 {
                store(&reader, &partition, &mut index);
            }
        }
        assert_eq!(reads(&reader), 0);
        assert_eq!(index.resident(), 1_000);
    }

    #[test]
    fn a_window_first_used_while_its_entries_are_being_stored_is_not_taken_as_incomplete() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(PLENTY);
        index.insert(0, 0, b"a");
        // Handed over, not stored yet, when the window is first read.
        let taken = index.take_written();
        assert!(index.contains(&source, 0, 0, b"a").expect("in memory"));
        assert!(!index.contains(&source, 0, 0, b"b").expect("in memory"));
        reader.inner.write_members(&partition, &taken, &[]);
        assert_eq!(reads(&reader), 0);
    }

    #[test]
    fn a_window_stored_before_a_restart_reads_each_page_of_its_misses_once() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(PLENTY);
        // Two entries of one page, and a key of another page.
        let stored = b"stored";
        let beside = (0u32..)
            .map(|n| format!("beside-{n}").into_bytes())
            .find(|key| page_of(key) == page_of(stored))
            .expect("a key of the same page");
        let elsewhere = (0u32..)
            .map(|n| format!("new-{n}").into_bytes())
            .find(|key| page_of(key) != page_of(stored))
            .expect("a key of another page");
        index.put(0, 0, stored, b"\x05");
        index.put(0, 0, &beside, b"\x06");
        store(&reader, &partition, &mut index);

        // A new index, as after a restart: the window has stored entries.
        let mut index = MemberIndex::new(PLENTY);
        let value = index.get(&source, 0, 0, stored).expect("read");
        assert_eq!(value.as_deref(), Some(&b"\x05"[..]));
        assert_eq!(
            (page_reads(&reader), reads(&reader)),
            (1, 2),
            "the page whole"
        );
        // The page is in memory now: its other entry, and a key it lacks, need no read.
        let value = index.get(&source, 0, 0, &beside).expect("in memory");
        assert_eq!(value.as_deref(), Some(&b"\x06"[..]));
        let absent = (0u32..)
            .map(|n| format!("absent-{n}").into_bytes())
            .find(|key| page_of(key) == page_of(stored))
            .expect("a key of the same page");
        assert!(!index.contains(&source, 0, 0, &absent).expect("in memory"));
        assert_eq!(page_reads(&reader), 1);
        // A key of a page not read yet reads that page (the window may hold it), and is
        // written from then on.
        assert!(!index.contains(&source, 0, 0, &elsewhere).expect("read"));
        assert_eq!((page_reads(&reader), reads(&reader)), (2, 2));
        index.insert(0, 0, &elsewhere);
        assert!(index
            .contains(&source, 0, 0, &elsewhere)
            .expect("in memory"));
        assert_eq!(page_reads(&reader), 2);
    }

    #[test]
    fn a_page_read_back_keeps_the_entries_written_since() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(PLENTY);
        index.put(0, 0, b"stored", b"old");
        store(&reader, &partition, &mut index);

        // After a restart the entry is written before its page is ever read: the page read
        // for another key of it must not bring the stored value back.
        let mut index = MemberIndex::new(PLENTY);
        index.put(0, 0, b"stored", b"new");
        let other = (0u32..)
            .map(|n| format!("other-{n}").into_bytes())
            .find(|key| page_of(key) == page_of(b"stored"))
            .expect("a key of the same page");
        assert!(!index.contains(&source, 0, 0, &other).expect("read"));
        assert_eq!(page_reads(&reader), 1);
        let value = index.get(&source, 0, 0, b"stored").expect("in memory");
        assert_eq!(value.as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn over_its_budget_the_index_evicts_stored_shards_and_reads_them_back_exactly() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        // Far too small for the entries: each checkpoint evicts all it may.
        let mut index = MemberIndex::new(1);
        let keys: Vec<[u8; 4]> = (0..2_000u32).map(u32::to_be_bytes).collect();
        for (batch, chunk) in keys.chunks(500).enumerate() {
            for key in chunk {
                index.put(batch, 0, key, key);
            }
            // Taken: this checkpoint's shards stay until the next one, when the store has them.
            let taken = index.take_written();
            assert_eq!(taken.len(), 500);
            for key in chunk {
                assert!(index.contains(&source, batch, 0, key).expect("in memory"));
            }
            reader.inner.write_members(&partition, &taken, &[]);
        }
        index.take_written();
        assert_eq!(index.resident(), 0, "everything stored was evicted");
        let before = (reads(&reader), page_reads(&reader));
        for (batch, chunk) in keys.chunks(500).enumerate() {
            for key in chunk {
                let value = index.get(&source, batch, 0, key).expect("read");
                assert_eq!(value.as_deref(), Some(&key[..]));
            }
            assert!(!index.contains(&source, batch, 0, b"absent").expect("read"));
        }
        // Memory is full: each miss reads its entry alone (a page read whole would push out
        // as many entries as it brings), but the first, which finds memory empty.
        assert_eq!(reads(&reader) - before.0, 2_004);
        assert!(page_reads(&reader) - before.1 <= 1);
    }

    #[test]
    fn after_entries_left_memory_a_miss_reads_its_entry_alone_until_memory_frees_up() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let budget = 256 << 10;
        let mut index = MemberIndex::new(budget);
        let keys: Vec<[u8; 4]> = (0..20_000u32).map(u32::to_be_bytes).collect();
        for chunk in keys.chunks(2_000) {
            for key in chunk {
                index.put(0, 0, key, key);
            }
            let taken = index.take_written();
            reader.inner.write_members(&partition, &taken, &[]);
        }
        index.take_written();
        assert!(index.resident() < keys.len() / 2, "entries left memory");
        assert!(index.resident_bytes() < budget, "and there is room again");
        // Room, but entries left lately: reading pages whole would push out others.
        let before = reads(&reader);
        for key in &keys[..100] {
            let value = index.get(&source, 0, 0, key).expect("read");
            assert_eq!(value.as_deref(), Some(&key[..]));
        }
        assert_eq!(page_reads(&reader), 0);
        assert!(reads(&reader) - before <= 100);
        // The window goes; once a checkpoint finds memory half free, pages are read whole.
        index.forget_window(0, 0);
        for key in &keys[..10] {
            index.put(1, 0, key, key);
        }
        let taken = index.take_written();
        reader.inner.write_members(&partition, &taken, &[]);
        index.take_written();
        index.forget_window(1, 0);
        assert!(index.get(&source, 1, 0, &keys[0]).expect("read").is_some());
        assert_eq!(page_reads(&reader), 1);
    }

    /// Stores each key as an entry of place (0, 0) with itself as value; then a new index, as
    /// after a restart, with `budget`.
    fn stored_then_restarted(
        reader: &CountingReader,
        partition: &PartitionKey,
        keys: &[[u8; 4]],
        budget: usize,
    ) -> MemberIndex {
        let mut index = MemberIndex::new(PLENTY);
        for key in keys {
            index.put(0, 0, key, key);
        }
        store(reader, partition, &mut index);
        MemberIndex::new(budget)
    }

    #[test]
    fn a_place_too_large_for_the_room_left_is_read_an_entry_at_a_time_after_its_first_page() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let keys: Vec<[u8; 4]> = (0..4_000u32).map(u32::to_be_bytes).collect();
        // After a restart, with room for about half the place's entries.
        let mut index = stored_then_restarted(&reader, &partition, &keys, 2_000 * ROW_BYTES);
        for key in &keys[..100] {
            let value = index.get(&source, 0, 0, key).expect("read");
            assert_eq!(value.as_deref(), Some(&key[..]));
        }
        // The first page showed the place too large: the others are read an entry at a time.
        assert_eq!(page_reads(&reader), 1);
        assert!(reads(&reader) <= 100 + 20);
    }

    #[test]
    fn with_room_a_miss_reads_its_page_whole() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let keys: Vec<[u8; 4]> = (0..2_000u32).map(u32::to_be_bytes).collect();
        // A new index, as after a restart, with room for every entry.
        let mut index = stored_then_restarted(&reader, &partition, &keys, PLENTY);
        for key in &keys {
            let value = index.get(&source, 0, 0, key).expect("read");
            assert_eq!(value.as_deref(), Some(&key[..]));
        }
        let mut pages: Vec<u16> = keys.iter().map(|key| page_of(key)).collect();
        pages.sort_unstable();
        pages.dedup();
        // Each stored entry read once, with its page: a page read whole answers the others.
        assert_eq!(reads(&reader), 2_000);
        assert_eq!(page_reads(&reader), pages.len() as u64);
        assert!(pages.len() < 1_000);
    }

    #[test]
    fn a_window_written_in_every_shard_at_every_checkpoint_stays_within_its_budget() {
        // One busy window: every checkpoint writes new entries into all its shards, so no
        // shard is ever wholly stored. Entries of earlier checkpoints leave all the same.
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let budget = 256 << 10;
        let mut index = MemberIndex::new(budget);
        let batch = 4_000u32;
        let mut previous: Vec<MemberInsert> = Vec::new();
        for checkpoint in 0..25u32 {
            for member in checkpoint * batch..(checkpoint + 1) * batch {
                index.put(0, 0, &member.to_be_bytes(), &member.to_le_bytes());
            }
            // The batch before is stored now, as the caller stores each before the next call.
            reader.inner.write_members(&partition, &previous, &[]);
            previous = index.take_written();
            assert_eq!(previous.len(), batch as usize);
            // The batch just handed over is not in the store yet: it stays in memory.
            let before = reads(&reader);
            for member in checkpoint * batch..(checkpoint + 1) * batch {
                assert!(index
                    .contains(&source, 0, 0, &member.to_be_bytes())
                    .expect("in memory"));
            }
            assert_eq!(reads(&reader), before, "an unstored entry was read");
            assert!(
                index.resident_bytes() <= budget + (batch as usize) * 64,
                "checkpoint {checkpoint}: {} bytes resident",
                index.resident_bytes()
            );
        }
        reader.inner.write_members(&partition, &previous, &[]);
        assert!(index.resident() < 5 * batch as usize);
        for member in 0..25 * batch {
            let value = index
                .get(&source, 0, 0, &member.to_be_bytes())
                .expect("read");
            assert_eq!(value.as_deref(), Some(&member.to_le_bytes()[..]));
        }
    }

    #[test]
    fn the_least_recently_used_windows_leave_memory_first() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(PLENTY);
        for window in 0..2 {
            for member in 0..5_000u32 {
                index.insert(0, window, &member.to_be_bytes());
            }
            store(&reader, &partition, &mut index);
        }
        // Window 1 is in use; the budget then drops below both windows' bytes.
        assert!(!index.contains(&source, 0, 1, b"x").expect("in memory"));
        let one_window = index.resident_bytes() / 2;
        index.resize(one_window + one_window / 2);
        store(&reader, &partition, &mut index);
        let resident_of = |index: &MemberIndex, start: EpochMillis| {
            index
                .spaces
                .get(&(0, start, 0))
                .map_or(0, |space| space.rows.len())
        };
        assert!(resident_of(&index, 0) < 5_000, "the older window gave way");
        assert_eq!(resident_of(&index, 1), 5_000);
        assert!(index.resident_bytes() <= one_window + one_window / 2);
    }

    #[test]
    fn windows_evicted_whole_leave_no_empty_tables_behind_and_read_back_exactly() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        // An entry in each of 500 hourly windows: the tables, not the entries, fill memory.
        let mut index = MemberIndex::new(PLENTY);
        for hour in 0..500 {
            index.put(0, hour * 3_600_000, b"u", b"\x01");
        }
        store(&reader, &partition, &mut index);
        let all = index.resident_bytes();
        index.resize(all / 10);
        index.put(0, 500 * 3_600_000, b"u", b"\x01");
        store(&reader, &partition, &mut index);
        assert!(index.resident_bytes() <= all / 10, "empty tables went too");
        assert!(
            index.spaces.len() < 100,
            "{} windows left",
            index.spaces.len()
        );
        for hour in 0..=500 {
            let value = index.get(&source, 0, hour * 3_600_000, b"u").expect("read");
            assert_eq!(value.as_deref(), Some(&b"\x01"[..]), "hour {hour}");
        }
    }

    /// The digests of checkpoint shard `shard`'s rows, sorted, with the place and value of each.
    fn shard_digests(
        snapshots: &[MemberShardRows],
        shard: u16,
    ) -> Option<Vec<(Place, u128, Vec<u8>)>> {
        let rows = &snapshots.iter().find(|rows| rows.shard == shard)?.rows;
        let mut rows: Vec<_> = rows
            .iter()
            .map(|row| {
                (
                    (row.metric, row.start_ms, row.period),
                    row.digest,
                    row.value.to_vec(),
                )
            })
            .collect();
        rows.sort();
        Some(rows)
    }

    #[test]
    fn a_shard_is_snapshotted_from_memory_only_while_every_entry_of_it_is_there() {
        let (reader, partition) = (CountingReader::default(), PartitionKey::new("t", 0));
        let source = source_of(&reader, &partition);
        let mut index = MemberIndex::new(PLENTY).with_nothing_stored();
        let mut funnel_key = 7u64.to_be_bytes().to_vec();
        funnel_key.extend_from_slice(b"\x01ana");
        index.put(0, 0, b"ana", b"\x05");
        index.put(1, FUNNEL_WINDOW, &funnel_key, b"\x06");
        // A new place has nothing stored: its misses are answers, not reads.
        assert!(!index
            .contains(&source, 0, 3_600_000, b"bo")
            .expect("in memory"));
        assert_eq!(reads(&reader), 0);
        let shard_of = |key: &[u8]| member_shard_of(entity_key(0, key));
        let (ana, funnel) = (shard_of(b"ana"), shard_of(&funnel_key));
        let (taken, snapshots) = index.take_written_with_snapshots(&[ana, funnel]);
        reader.inner.write_members(&partition, &taken, &[]);
        assert_eq!(
            shard_digests(&snapshots, ana).expect("whole in memory"),
            [((0, 0, 0), entity_key(0, b"ana"), vec![5])]
        );
        let funnel_rows = shard_digests(&snapshots, funnel).expect("whole in memory");
        assert!(funnel_rows.contains(&(
            (1, FUNNEL_WINDOW, 7),
            entity_key(0, &funnel_key),
            vec![6]
        )));
        // Once a shard left memory, its snapshots are read from the store.
        index.resize(0);
        index.put(0, 0, b"cy", b"\x01");
        let (taken, _) = index.take_written_with_snapshots(&[]);
        reader.inner.write_members(&partition, &taken, &[]);
        let (_, snapshots) = index.take_written_with_snapshots(&[ana, funnel]);
        assert!(snapshots.is_empty(), "{snapshots:?}");
        // Nor does an index of a partition with stored entries snapshot any.
        let mut restarted = MemberIndex::new(PLENTY);
        restarted.put(0, 0, b"ana", b"\x05");
        assert!(restarted.take_written_with_snapshots(&[ana]).1.is_empty());
    }

    #[test]
    fn deleted_windows_and_funnel_periods_leave_memory() {
        let mut index = MemberIndex::new(PLENTY);
        index.insert(0, 10, b"a");
        index.insert(0, 20, b"a");
        index.insert(1, 10, b"a");
        let period = |period: u64| period.to_be_bytes();
        let funnel_key = |period: u64| [&period.to_be_bytes()[..], b"\x01e"].concat();
        index.insert(2, FUNNEL_WINDOW, &funnel_key(5));
        index.insert(2, FUNNEL_WINDOW, &funnel_key(6));
        index.forget_window(0, 10);
        index.forget_windows_before(1, 11);
        index.forget_range(2, FUNNEL_WINDOW, &period(6));
        let mut places: Vec<Place> = index.spaces.keys().copied().collect();
        places.sort();
        assert_eq!(places, vec![(0, 20, 0), (2, FUNNEL_WINDOW, 6)]);
        // Their written entries are not handed over: the store deletes them whole.
        assert_eq!(index.take_written().len(), 2);
    }
}
