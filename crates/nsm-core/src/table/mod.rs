//! Compact in-memory tables of per-entity state: one row of `u32` lanes per live entity of a
//! partition (a user, a team, an event id), keyed by a 128-bit hash of the entity.
//!
//! The table knows nothing of what the lanes mean: the engine decides (a bitmask of the windows
//! an entity is counted in, the last bucket it was seen in, threshold progress...). The table
//! gives it three things: a lookup that touches memory only, the rows changed since the last
//! checkpoint ([`EntityTable::drain_dirty`], so a checkpoint writes each changed row once however
//! many events touched it), and one shard at a time for a rolling snapshot
//! ([`EntityTable::for_each_in_shard`]).
//!
//! # The invariant of removal
//!
//! Removing a row ([`EntityTable::retain`], [`EntityTable::remove`]) is not recorded as a change,
//! and a row removed while dirty is no longer drained. So a removed row must mean exactly what an
//! absent row means, both in memory and as the stored copy will be read on restore: for example
//! a row whose windows have all expired, which the same expiry removes again after a restore.
//!
//! # Layout
//!
//! The table is split into [`SHARDS`] sub-tables by the top 6 bits of the key. Each grows on its
//! own, so a resize allocates about 1/64 of the table at once and peak memory during growth stays
//! close to the steady state; a rolling snapshot reads one sub-table.
//!
//! A sub-table is open addressing with linear probing, stored as a struct of arrays: the keys
//! (`u128`, 0 marks an empty slot) in one array and the lanes (`lanes` per slot) in another. A
//! probe reads the key array only, and a row costs `16 + 4 × lanes` bytes per slot, where an
//! array of `(u128, [u32; 2])` would pad each slot to 32 bytes. Removal compacts each run of
//! occupied slots back towards the rows' home slots (backward shift): no tombstones, so probes
//! never lengthen with churn. A row's home slot comes from a multiply-shift of the key's low 64
//! bits (independent of the top bits that chose the shard), which works for any number of slots.
//! Those bits are first multiplied by an odd number drawn from the number of slots, so that
//! sub-tables of different sizes order their rows differently: loading rows in the slot order of
//! another table (a restore from a snapshot or a delta) into a smaller, growing one would
//! otherwise pile them into a single run and make each insert probe all of it.
//!
//! Sub-tables fill up to 7/8 of their slots and then grow by 1.5×, so they are between 7/12 and
//! 7/8 full: a row costs 1.14 to 1.71 slots, 1.41 on average over table sizes (2× growth would
//! cost 1.14 to 2.29, 1.65 on average, and one resize would allocate twice the shard). With
//! 2 lanes a slot is 24 bytes plus its dirty bit, so a row costs about 34 bytes on average and at
//! most about 41.5. The price is moving each row about twice while a table grows, instead of
//! once. A retain that leaves a sub-table less than 7/24 full shrinks it back to 7/12.
//!
//! Dirty rows are a bitmap of slots with a summary bitmap above it (one bit per 64-slot word),
//! moved along with the rows on growth and removal. Marking costs one bit, a row dirtied twice
//! is drained once, memory stays one bit per slot whatever the number of dirty rows, and a drain
//! visits the summary (one bit per 4,096 slots) plus the words that hold dirty rows, in slot
//! order, so it reads the rows mostly sequentially.

use std::fmt;

use xxhash_rust::xxh3::xxh3_128_with_seed;

#[cfg(test)]
mod tests;

/// The number of independent sub-tables, chosen by the top 6 bits of the key.
pub const SHARDS: usize = 64;

/// The shift that leaves the top 6 bits of a key: its shard.
const SHARD_SHIFT: u32 = 128 - SHARDS.trailing_zeros();

/// The slots of a sub-table when its first row arrives.
const MIN_SLOTS: usize = 8;

/// The key of an entity: the XXH3-128 hash of its bytes with `seed`, never 0 (0 marks an empty
/// slot; a hash of 0 becomes 1).
pub fn entity_key(seed: u64, bytes: &[u8]) -> u128 {
    normalized(xxh3_128_with_seed(bytes, seed))
}

/// Keys are compared after mapping 0 to 1, the rule of [`entity_key`], so that a key of 0 can
/// never be confused with an empty slot.
fn normalized(key: u128) -> u128 {
    key.max(1)
}

/// The most rows a sub-table of `slots` slots holds before it grows: 7/8 of them, always leaving
/// an empty slot so that every probe ends.
fn max_len(slots: usize) -> usize {
    slots - slots / 8
}

/// The slots a sub-table grows to from `slots`.
fn grown(slots: usize) -> usize {
    if slots == 0 {
        MIN_SLOTS
    } else {
        slots + slots / 2
    }
}

/// The slots of a sub-table rebuilt for `len` rows: 7/12 full, as right after a growth.
fn slots_for(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 12 / 7 + 1).max(MIN_SLOTS)
    }
}

/// The odd multiplier that scrambles keys in a sub-table of `slots` slots (SplitMix64's
/// finaliser of the number of slots).
fn scrambler(slots: usize) -> u64 {
    let mut z = (slots as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

/// A map from entity keys to rows of a fixed number of `u32` lanes, with the rows changed since
/// the last drain. See the [module documentation](self).
///
/// Keys come from [`entity_key`]; a key of 0 is taken as 1, the rule of [`entity_key`].
#[derive(Clone)]
pub struct EntityTable {
    lanes: usize,
    len: usize,
    shards: Box<[Shard; SHARDS]>,
}

impl EntityTable {
    /// An empty table of rows of `lanes` lanes; 0 lanes makes a set. Allocates no slots yet.
    pub fn new(lanes: usize) -> Self {
        Self {
            lanes,
            len: 0,
            shards: Box::new(std::array::from_fn(|_| Shard::new(lanes))),
        }
    }

    /// The number of lanes of every row.
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The row of `key`, if present.
    #[inline]
    pub fn get(&self, key: u128) -> Option<&[u32]> {
        let key = normalized(key);
        self.shards[Self::shard_of(key)].get(key)
    }

    /// The row of `key`, inserted with all lanes 0 when absent; marks it dirty. Returns (lanes,
    /// inserted).
    #[inline]
    pub fn entry(&mut self, key: u128) -> (&mut [u32], bool) {
        let key = normalized(key);
        let (row, inserted) = self.shards[Self::shard_of(key)].entry(key);
        self.len += usize::from(inserted);
        (row, inserted)
    }

    /// The row of `key`, inserted with all lanes 0 when absent, not marked dirty: for a table
    /// whose owner keeps its own record of changes. Returns (lanes, inserted).
    #[inline]
    pub fn entry_untracked(&mut self, key: u128) -> (&mut [u32], bool) {
        let key = normalized(key);
        let shard = &mut self.shards[Self::shard_of(key)];
        let (slot, inserted) = shard.find_or_insert(key);
        self.len += usize::from(inserted);
        (shard.row_mut(slot), inserted)
    }

    /// The row of `key` if present, marked dirty.
    #[inline]
    pub fn get_mut(&mut self, key: u128) -> Option<&mut [u32]> {
        let key = normalized(key);
        self.shards[Self::shard_of(key)].get_mut(key)
    }

    /// Inserts or overwrites a row without marking it dirty (restoring from a snapshot or delta).
    /// A row that was dirty stays dirty, and is drained with these lanes.
    ///
    /// Panics if `lanes` is not [`Self::lanes`] long.
    pub fn load(&mut self, key: u128, lanes: &[u32]) {
        assert_eq!(
            lanes.len(),
            self.lanes,
            "a loaded row must have the table's lanes"
        );
        let key = normalized(key);
        let inserted = self.shards[Self::shard_of(key)].load(key, lanes);
        self.len += usize::from(inserted);
    }

    /// Gives every row `lanes` lanes, the new ones 0: a table whose rows turn out to need more
    /// room than it started with. Rows keep their slots and dirty marks.
    ///
    /// Panics if `lanes` is fewer than the rows have.
    pub fn widen(&mut self, lanes: usize) {
        assert!(lanes >= self.lanes, "a table never narrows");
        for shard in self.shards.iter_mut() {
            shard.widen(lanes);
        }
        self.lanes = lanes;
    }

    /// Removes the row of `key`; returns whether it was present. Not recorded as dirty: see the
    /// invariant of removal in the [module documentation](self).
    pub fn remove(&mut self, key: u128) -> bool {
        let key = normalized(key);
        let removed = self.shards[Self::shard_of(key)].remove(key);
        self.len -= usize::from(removed);
        removed
    }

    /// Removes the rows for which `keep` returns false, in one shard; returns how many went.
    /// `keep` is called once for every row of the shard. Removal is not recorded as dirty (a
    /// removed row must be one that means the same as no row).
    ///
    /// Panics if `shard` is not below [`SHARDS`].
    pub fn retain_shard(&mut self, shard: usize, keep: impl FnMut(u128, &[u32]) -> bool) -> usize {
        let removed = self.shards[shard].retain(keep);
        self.len -= removed;
        removed
    }

    /// Removes the rows for which `keep` returns false, shard after shard; returns how many went.
    pub fn retain(&mut self, mut keep: impl FnMut(u128, &[u32]) -> bool) -> usize {
        (0..SHARDS)
            .map(|shard| self.retain_shard(shard, &mut keep))
            .sum()
    }

    /// Calls `each` once for every row changed (entry/get_mut) since the last drain, with its
    /// current lanes, and forgets that they were dirty. Rows come shard after shard, in slot
    /// order. The cost is the dirty rows plus a scan of one bit per 4,096 slots.
    pub fn drain_dirty(&mut self, mut each: impl FnMut(u128, &[u32])) {
        for shard in self.shards.iter_mut() {
            shard.drain_dirty(&mut each);
        }
    }

    /// The number of dirty rows.
    pub fn dirty_len(&self) -> usize {
        self.shards.iter().map(|shard| shard.dirty.len).sum()
    }

    /// Calls `each` for every row of one shard (a rolling snapshot writes one shard at a time).
    ///
    /// Panics if `shard` is not below [`SHARDS`].
    pub fn for_each_in_shard(&self, shard: usize, each: impl FnMut(u128, &[u32])) {
        self.shards[shard].for_each(each);
    }

    /// Calls `each` for every row, shard after shard.
    pub fn for_each(&self, mut each: impl FnMut(u128, &[u32])) {
        for shard in self.shards.iter() {
            shard.for_each(&mut each);
        }
    }

    /// The shard of `key`: its top 6 bits.
    #[inline]
    pub fn shard_of(key: u128) -> usize {
        (key >> SHARD_SHIFT) as usize
    }

    /// Grows one shard, if needed, so that it holds `rows` rows without growing again: a restore
    /// that knows how many rows a shard had sizes it once. The shard gets the size that growing
    /// row by row would give it, so rows loaded in the slot order of the table they come from
    /// land in slot order.
    ///
    /// Panics if `shard` is not below [`SHARDS`].
    pub fn reserve_shard(&mut self, shard: usize, rows: usize) {
        self.shards[shard].reserve(rows);
    }

    /// The number of rows of one shard.
    ///
    /// Panics if `shard` is not below [`SHARDS`].
    pub fn shard_len(&self, shard: usize) -> usize {
        self.shards[shard].len
    }

    /// About the bytes a row of this table takes on average: its slot (the key and the lanes)
    /// times the 1.41 slots a row takes over table sizes (see the module documentation).
    pub fn mean_row_bytes(&self) -> usize {
        (16 + 4 * self.lanes) * 141 / 100
    }

    /// The bytes allocated by the table, for memory accounting and limits.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<[Shard; SHARDS]>()
            + self.shards.iter().map(Shard::heap_bytes).sum::<usize>()
    }

    /// Removes every row and dirty mark and frees the slots: a cleared table costs what a new
    /// one does.
    pub fn clear(&mut self) {
        for shard in self.shards.iter_mut() {
            *shard = Shard::new(self.lanes);
        }
        self.len = 0;
    }
}

impl fmt::Debug for EntityTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntityTable")
            .field("lanes", &self.lanes)
            .field("len", &self.len)
            .field("dirty_len", &self.dirty_len())
            .field("heap_bytes", &self.heap_bytes())
            .finish()
    }
}

/// One sub-table: linear probing over a struct of arrays.
#[derive(Clone)]
struct Shard {
    /// One key per slot; 0 marks an empty slot. Its length is the number of slots.
    keys: Vec<u128>,
    /// `width` lanes per slot; the lanes of an empty slot are meaningless.
    lanes: Vec<u32>,
    width: usize,
    len: usize,
    /// The odd multiplier of the keys' low 64 bits before they choose a home slot.
    scrambler: u64,
    dirty: DirtySlots,
}

impl Shard {
    fn new(width: usize) -> Self {
        Self {
            keys: Vec::new(),
            lanes: Vec::new(),
            width,
            len: 0,
            scrambler: scrambler(0),
            dirty: DirtySlots::default(),
        }
    }

    fn heap_bytes(&self) -> usize {
        self.keys.capacity() * std::mem::size_of::<u128>()
            + self.lanes.capacity() * std::mem::size_of::<u32>()
            + self.dirty.heap_bytes()
    }

    /// The home slot of `key`: a multiply-shift of its scrambled low 64 bits.
    #[inline]
    fn home(&self, key: u128) -> usize {
        let scrambled = (key as u64).wrapping_mul(self.scrambler);
        ((u128::from(scrambled) * self.keys.len() as u128) >> 64) as usize
    }

    fn row(&self, slot: usize) -> &[u32] {
        &self.lanes[slot * self.width..][..self.width]
    }

    fn row_mut(&mut self, slot: usize) -> &mut [u32] {
        &mut self.lanes[slot * self.width..][..self.width]
    }

    /// The slot holding `key` (`Ok`), or the empty slot where it would go (`Err`). The table must
    /// have slots.
    #[inline]
    fn probe(&self, key: u128) -> Result<usize, usize> {
        let slots = self.keys.len();
        let mut slot = self.home(key);
        loop {
            let here = self.keys[slot];
            if here == key {
                return Ok(slot);
            }
            if here == 0 {
                return Err(slot);
            }
            slot += 1;
            if slot == slots {
                slot = 0;
            }
        }
    }

    #[inline]
    fn get(&self, key: u128) -> Option<&[u32]> {
        if self.keys.is_empty() {
            return None;
        }
        self.probe(key).ok().map(|slot| self.row(slot))
    }

    #[inline]
    fn get_mut(&mut self, key: u128) -> Option<&mut [u32]> {
        if self.keys.is_empty() {
            return None;
        }
        let slot = self.probe(key).ok()?;
        self.dirty.insert(slot);
        Some(self.row_mut(slot))
    }

    #[inline]
    fn entry(&mut self, key: u128) -> (&mut [u32], bool) {
        let (slot, inserted) = self.find_or_insert(key);
        self.dirty.insert(slot);
        (self.row_mut(slot), inserted)
    }

    fn widen(&mut self, width: usize) {
        let mut lanes = vec![0; self.keys.len() * width];
        for (slot, row) in self.lanes.chunks_exact(self.width.max(1)).enumerate() {
            lanes[slot * width..][..self.width].copy_from_slice(&row[..self.width]);
        }
        self.lanes = lanes;
        self.width = width;
    }

    /// Returns whether the row was inserted.
    fn load(&mut self, key: u128, lanes: &[u32]) -> bool {
        let (slot, inserted) = self.find_or_insert(key);
        self.row_mut(slot).copy_from_slice(lanes);
        inserted
    }

    /// The slot of `key`, inserted with all lanes 0 when absent (growing the table first if it
    /// is full), and whether it was inserted.
    fn find_or_insert(&mut self, key: u128) -> (usize, bool) {
        if self.keys.is_empty() {
            self.resize(grown(0));
        }
        let slot = match self.probe(key) {
            Ok(slot) => return (slot, false),
            Err(slot) if self.len < max_len(self.keys.len()) => slot,
            Err(_) => {
                self.resize(grown(self.keys.len()));
                self.empty_slot(key)
            }
        };
        self.keys[slot] = key;
        self.row_mut(slot).fill(0);
        self.len += 1;
        (slot, true)
    }

    fn reserve(&mut self, rows: usize) {
        let mut slots = self.keys.len();
        while max_len(slots) < rows {
            slots = grown(slots);
        }
        if slots > self.keys.len() {
            self.resize(slots);
        }
    }

    /// The first empty slot from the home of `key`, which must be absent.
    fn empty_slot(&self, key: u128) -> usize {
        let slots = self.keys.len();
        let mut slot = self.home(key);
        while self.keys[slot] != 0 {
            slot += 1;
            if slot == slots {
                slot = 0;
            }
        }
        slot
    }

    /// Rebuilds the table with `slots` slots, which must hold every row; dirty rows stay dirty.
    /// Only this shard's old and new arrays are allocated at once.
    fn resize(&mut self, slots: usize) {
        debug_assert!(max_len(slots) >= self.len);
        let keys = std::mem::replace(&mut self.keys, vec![0; slots]);
        let lanes = std::mem::replace(&mut self.lanes, vec![0; slots * self.width]);
        let dirty = std::mem::replace(&mut self.dirty, DirtySlots::with_slots(slots));
        self.scrambler = scrambler(slots);
        let width = self.width;
        for (old_slot, &key) in keys.iter().enumerate() {
            if key == 0 {
                continue;
            }
            let slot = self.empty_slot(key);
            self.keys[slot] = key;
            self.lanes[slot * width..][..width]
                .copy_from_slice(&lanes[old_slot * width..][..width]);
            if dirty.contains(old_slot) {
                self.dirty.insert(slot);
            }
        }
    }

    /// Moves the row (key, lanes and dirty mark) of slot `from` to the empty slot `to`; `from`
    /// is left for the caller to empty or refill.
    fn move_row(&mut self, from: usize, to: usize) {
        self.keys[to] = self.keys[from];
        let width = self.width;
        self.lanes
            .copy_within(from * width..(from + 1) * width, to * width);
        if self.dirty.remove(from) {
            self.dirty.insert(to);
        }
    }

    fn remove(&mut self, key: u128) -> bool {
        if self.keys.is_empty() {
            return false;
        }
        let Ok(mut hole) = self.probe(key) else {
            return false;
        };
        self.dirty.remove(hole);
        // Backward shift: every later row of the run whose home is not between the hole and
        // itself moves into the hole, so that no probe meets an empty slot before its row.
        let slots = self.keys.len();
        let mut next = hole;
        loop {
            next = if next + 1 == slots { 0 } else { next + 1 };
            let key = self.keys[next];
            if key == 0 {
                break;
            }
            let home = self.home(key);
            let stays = if hole <= next {
                hole < home && home <= next
            } else {
                hole < home || home <= next
            };
            if !stays {
                self.move_row(next, hole);
                hole = next;
            }
        }
        self.keys[hole] = 0;
        self.len -= 1;
        true
    }

    /// Removes the rows for which `keep` returns false in one pass, calling `keep` once per row.
    ///
    /// The pass starts after an empty slot, so no run of occupied slots wraps past its end.
    /// Within a run, once a row has gone, every later row moves back to the first empty slot at
    /// or after its home: the table holds the survivors as if they had been inserted again in
    /// slot order, with no tombstones. Rows only move backwards, into slots already passed, so
    /// each row is offered to `keep` exactly once.
    fn retain(&mut self, mut keep: impl FnMut(u128, &[u32]) -> bool) -> usize {
        if self.len == 0 {
            return 0;
        }
        let slots = self.keys.len();
        let start = self.keys.iter().position(|&key| key == 0).unwrap_or(0);
        debug_assert_eq!(self.keys[start], 0, "a table always has an empty slot");
        // Positions count slots from `start`, so that they grow along the pass.
        let slot_at = |position: usize| {
            let slot = start + position;
            if slot >= slots {
                slot - slots
            } else {
                slot
            }
        };
        let mut removed = 0;
        // The first empty position of the current run, once a row of it has gone.
        let mut first_hole: Option<usize> = None;
        for position in 1..slots {
            let slot = slot_at(position);
            let key = self.keys[slot];
            if key == 0 {
                first_hole = None;
                continue;
            }
            if !keep(key, self.row(slot)) {
                self.keys[slot] = 0;
                self.dirty.remove(slot);
                removed += 1;
                first_hole.get_or_insert(position);
                continue;
            }
            let Some(hole) = first_hole else {
                continue;
            };
            let home_position = (self.home(key) + slots - start) % slots;
            let mut target = hole.max(home_position);
            while target < position && self.keys[slot_at(target)] != 0 {
                target += 1;
            }
            if target == position {
                continue;
            }
            self.move_row(slot, slot_at(target));
            self.keys[slot] = 0;
            if target == hole {
                // The slot just left is empty, so the next hole is at most `position`.
                let mut next = hole + 1;
                while self.keys[slot_at(next)] != 0 {
                    next += 1;
                }
                first_hole = Some(next);
            }
        }
        self.len -= removed;
        let smaller = slots_for(self.len);
        if removed > 0 && self.len < max_len(slots) / 3 && smaller < slots {
            self.resize(smaller);
        }
        removed
    }

    fn drain_dirty(&mut self, each: &mut impl FnMut(u128, &[u32])) {
        if self.dirty.len == 0 {
            return;
        }
        let Self {
            keys,
            lanes,
            width,
            dirty,
            ..
        } = self;
        let width = *width;
        dirty.drain(|slot| each(keys[slot], &lanes[slot * width..][..width]));
    }

    fn for_each(&self, mut each: impl FnMut(u128, &[u32])) {
        for (slot, &key) in self.keys.iter().enumerate() {
            if key != 0 {
                each(key, self.row(slot));
            }
        }
    }
}

/// A set of slots: a bit per slot, and a summary bit per word of slots that may hold one.
#[derive(Clone, Default)]
struct DirtySlots {
    words: Vec<u64>,
    /// Bit `w` is set when `words[w]` may be non-zero (it is not cleared on removal).
    summary: Vec<u64>,
    len: usize,
}

impl DirtySlots {
    fn with_slots(slots: usize) -> Self {
        let words = slots.div_ceil(64);
        Self {
            words: vec![0; words],
            summary: vec![0; words.div_ceil(64)],
            len: 0,
        }
    }

    fn heap_bytes(&self) -> usize {
        (self.words.capacity() + self.summary.capacity()) * std::mem::size_of::<u64>()
    }

    fn contains(&self, slot: usize) -> bool {
        self.words[slot / 64] & (1 << (slot % 64)) != 0
    }

    fn insert(&mut self, slot: usize) {
        let word = slot / 64;
        let bit = 1 << (slot % 64);
        if self.words[word] & bit == 0 {
            self.words[word] |= bit;
            self.summary[word / 64] |= 1 << (word % 64);
            self.len += 1;
        }
    }

    /// Returns whether the slot was in the set.
    fn remove(&mut self, slot: usize) -> bool {
        let word = slot / 64;
        let bit = 1 << (slot % 64);
        let present = self.words[word] & bit != 0;
        self.words[word] &= !bit;
        self.len -= usize::from(present);
        present
    }

    /// Calls `each` for every slot of the set in increasing order, and empties it.
    fn drain(&mut self, mut each: impl FnMut(usize)) {
        for (summary_index, summary) in self.summary.iter_mut().enumerate() {
            let mut pending = std::mem::take(summary);
            while pending != 0 {
                let word = summary_index * 64 + pending.trailing_zeros() as usize;
                pending &= pending - 1;
                let mut bits = std::mem::take(&mut self.words[word]);
                while bits != 0 {
                    each(word * 64 + bits.trailing_zeros() as usize);
                    bits &= bits - 1;
                }
            }
        }
        self.len = 0;
    }
}
