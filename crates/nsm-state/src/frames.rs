//! A partition's stored state as `nsm-checkpoint` frames carry it: rows by shard, and what one
//! write does to them (plan commits 7 and 8 of `docs/design/changelog-frames.md`).
//!
//! A frame row is a stored key without its partition prefix, after the byte of its column family
//! (the changelog's, `changelog::FAMILIES`), and its stored value. Member entries are in the
//! shard their key names (one of [`MEMBER_SHARDS`]); every other row (windows, segments, gap
//! histograms, fingerprints) is in the aggregate shard, [`AGGREGATE_SHARD`]: what
//! [`Store::load_partition`] loads whole anyway. The partition's meta record is a frame's meta,
//! not a row.
//!
//! A shard's snapshot is read while its write is prepared and not yet stored, so it is the store
//! overlaid with the write ([`WriteOverlay`]): one short scan per place (window, or funnel
//! period) for a member shard, the partition's key range of each family for the aggregate shard.

use std::collections::BTreeMap;

use nsm_checkpoint::{Checkpoint, CheckpointConfig, PartitionId, SeedShard, ShardId};
use rocksdb::ReadOptions;

use crate::changelog::family_byte;
use crate::codec::{
    member_shard_position, partition_prefix, prefix_successor, split_partition_prefix,
    stored_member_shard, MEMBER_SHARDS,
};
use crate::{
    PartitionKey, StateError, Store, CF_ENTRIES, CF_FINGERPRINTS, CF_GAPS, CF_SEGMENTS, CF_WINDOWS,
};

/// The shard of every row that is not a member entry.
pub const AGGREGATE_SHARD: u16 = MEMBER_SHARDS as u16;

/// Shards of a partition's frames: the member shards and the aggregate shard.
pub const FRAME_SHARDS: u32 = MEMBER_SHARDS as u32 + 1;

/// Member shards due in one checkpoint past which their snapshots are read in one pass.
const ONE_PASS_SHARDS: usize = 16;

/// The families of the aggregate shard, in the order its snapshot reads them.
const AGGREGATE_FAMILIES: [&str; 4] = [CF_WINDOWS, CF_SEGMENTS, CF_GAPS, CF_FINGERPRINTS];

/// A frame row's key: the family's byte, then the stored key after the partition prefix of
/// `prefix_len` bytes.
fn row_key(family: &'static str, stored_key: &[u8], prefix_len: usize) -> Vec<u8> {
    let rest = stored_key.get(prefix_len..).unwrap_or_default();
    let mut out = Vec::with_capacity(rest.len() + 1);
    out.push(family_byte(family));
    out.extend_from_slice(rest);
    out
}

/// A row put or deleted by a write, or a range it deletes, in frame-row keys.
#[derive(Debug, Clone)]
enum Operation {
    Put {
        shard: u16,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        shard: u16,
        key: Vec<u8>,
    },
    Range {
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// What one write does to one partition, in frame rows: the rows it leaves put or deleted, and
/// the ranges it deletes. A row put and then covered by a range deleted later in the write is
/// not among the rows (the store's batch deletes it too), so the rows and the ranges can be
/// applied in any order: ranges first, as a frame applies them.
#[derive(Debug, Clone, Default)]
pub struct WriteOverlay {
    /// Per shard, each row's last value in the write (`None`: deleted).
    rows: BTreeMap<u16, BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// The ranges deleted, merged into disjoint ranges in key order.
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

impl WriteOverlay {
    /// The overlay of a partition's operations, in the order they were recorded.
    fn of(operations: Vec<Operation>) -> Self {
        let mut overlay = WriteOverlay::default();
        // Walked from the last: a row's last operation decides, unless a range recorded after
        // it covers it.
        let mut later = Vec::new();
        for operation in operations.into_iter().rev() {
            let (shard, key, value) = match operation {
                Operation::Range { start, end } => {
                    later = merged(later, start, end);
                    continue;
                }
                Operation::Put { shard, key, value } => (shard, key, Some(value)),
                Operation::Delete { shard, key } => (shard, key, None),
            };
            if covers(&later, &key) {
                continue;
            }
            overlay
                .rows
                .entry(shard)
                .or_default()
                .entry(key)
                .or_insert(value);
        }
        overlay.ranges = later;
        overlay
    }

    /// Whether a range of the write deletes `key`.
    fn deletes(&self, key: &[u8]) -> bool {
        covers(&self.ranges, key)
    }

    fn rows_of(&self, shard: u16) -> Option<&BTreeMap<Vec<u8>, Option<Vec<u8>>>> {
        self.rows.get(&shard)
    }

    /// The ranges deleted, disjoint and in key order.
    pub fn ranges(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.ranges
    }

    /// Every row the write puts or deletes, by shard, in key order within a shard.
    pub fn rows(&self) -> impl Iterator<Item = (u16, &[u8], Option<&[u8]>)> {
        self.rows.iter().flat_map(|(shard, rows)| {
            rows.iter()
                .map(move |(key, value)| (*shard, key.as_slice(), value.as_deref()))
        })
    }
}

/// Adds `[start, end)` to disjoint ranges in key order.
fn merged(
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    start: Vec<u8>,
    end: Vec<u8>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    if start >= end {
        return ranges;
    }
    let (mut start, mut end) = (start, end);
    let mut out = Vec::with_capacity(ranges.len() + 1);
    let mut placed = false;
    for (other_start, other_end) in ranges {
        if other_end < start {
            out.push((other_start, other_end));
        } else if end < other_start {
            if !placed {
                out.push((std::mem::take(&mut start), std::mem::take(&mut end)));
                placed = true;
            }
            out.push((other_start, other_end));
        } else {
            start = start.min(other_start);
            end = end.max(other_end);
        }
    }
    if !placed {
        out.push((start, end));
    }
    out
}

/// Whether disjoint ranges in key order cover `key`.
fn covers(ranges: &[(Vec<u8>, Vec<u8>)], key: &[u8]) -> bool {
    let after = ranges.partition_point(|(start, _)| start.as_slice() <= key);
    after > 0 && key < ranges[after - 1].1.as_slice()
}

/// Records the operations of a write per partition, in frame rows, beside its local batch.
pub(crate) struct FrameRecorder<'s> {
    store: &'s Store,
    pub(crate) batch: rocksdb::WriteBatch,
    operations: Vec<Operation>,
    pub(crate) partitions: Vec<(PartitionKey, Vec<u8>, WriteOverlay)>,
}

impl<'s> FrameRecorder<'s> {
    pub(crate) fn new(store: &'s Store, capacity_bytes: usize) -> Self {
        FrameRecorder {
            store,
            batch: rocksdb::WriteBatch::with_capacity_bytes(capacity_bytes),
            operations: Vec::new(),
            partitions: Vec::new(),
        }
    }

    /// The frame row of a stored key, and its shard.
    fn row(family: &'static str, key: &[u8]) -> (u16, Vec<u8>) {
        let prefix_len = split_partition_prefix(key).map_or(0, |(_, rest)| key.len() - rest.len());
        let shard = if family == CF_ENTRIES {
            stored_member_shard(key).unwrap_or(AGGREGATE_SHARD)
        } else {
            AGGREGATE_SHARD
        };
        (shard, row_key(family, key, prefix_len))
    }
}

impl crate::Recording for FrameRecorder<'_> {
    fn put(&mut self, family: &'static str, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.store.cf(family), key, value);
        let (shard, key) = Self::row(family, key);
        self.operations.push(Operation::Put {
            shard,
            key,
            value: value.to_vec(),
        });
    }

    fn delete(&mut self, family: &'static str, key: &[u8]) {
        self.batch.delete_cf(self.store.cf(family), key);
        let (shard, key) = Self::row(family, key);
        self.operations.push(Operation::Delete { shard, key });
    }

    fn delete_range(&mut self, family: &'static str, start: &[u8], end: &[u8]) {
        self.batch
            .delete_range_cf(self.store.cf(family), start, end);
        let prefix_len =
            split_partition_prefix(start).map_or(0, |(_, rest)| start.len() - rest.len());
        self.operations.push(Operation::Range {
            start: row_key(family, start, prefix_len),
            end: row_key(family, end, prefix_len),
        });
    }

    fn end_partition(&mut self, partition: &PartitionKey, meta: &[u8]) {
        self.batch.put_cf(
            self.store.cf(crate::CF_PARTITIONS),
            partition_prefix(partition),
            meta,
        );
        let operations = std::mem::take(&mut self.operations);
        self.partitions.push((
            partition.clone(),
            meta.to_vec(),
            WriteOverlay::of(operations),
        ));
    }
}

/// A write made ready for frames: the local batch, and per partition its meta record and what
/// the write does to its rows.
pub struct FramedWrite {
    pub(crate) batch: rocksdb::WriteBatch,
    partitions: Vec<(PartitionKey, Vec<u8>, WriteOverlay)>,
}

impl FramedWrite {
    /// What the write does to `partition`'s rows; empty for a partition it does not write.
    pub fn overlay(&self, partition: &PartitionKey) -> Option<&WriteOverlay> {
        self.partitions
            .iter()
            .find(|(key, ..)| key == partition)
            .map(|(.., overlay)| overlay)
    }

    /// The partitions the write writes.
    pub fn partitions(&self) -> impl Iterator<Item = &PartitionKey> {
        self.partitions.iter().map(|(key, ..)| key)
    }
}

/// The frames' name of a partition: its key prefix, on the changelog partition of its number
/// (a changelog partition carries that partition number of every input topic).
pub fn partition_id(partition: &PartitionKey) -> PartitionId {
    PartitionId::new(partition.partition as u32, partition_prefix(partition))
}

/// The frame configuration of every partition: 1,025 shards, chunks of nsm-checkpoint's default.
pub fn checkpoint_config() -> CheckpointConfig {
    CheckpointConfig::new(FRAME_SHARDS, CheckpointConfig::DEFAULT_MAX_CHUNK_BYTES)
        .unwrap_or_else(|_| unreachable!("{FRAME_SHARDS} shards are within the limits"))
}

impl Store {
    /// Makes the batch that stores `changes`, and what it does to each partition's rows.
    pub fn prepare_frames(&self, changes: &nsm_core::engine::ChangeSet) -> FramedWrite {
        let mut recorder = FrameRecorder::new(self, self.batch_bytes_estimate(changes));
        self.record_changes(changes, &mut recorder);
        FramedWrite {
            batch: recorder.batch,
            partitions: recorder.partitions,
        }
    }

    /// The checkpoint of `partition` in `write`, for nsm-checkpoint: the write's rows and
    /// dropped ranges, and the snapshots of the `due` shards, read now (before the write is
    /// stored) as they will be once it is. `None` when the write does not write the partition.
    pub fn checkpoint_of(
        &self,
        write: &FramedWrite,
        partition: &PartitionKey,
        due: &[ShardId],
    ) -> Result<Option<Checkpoint>, StateError> {
        let Some((_, meta, overlay)) = write.partitions.iter().find(|(key, ..)| key == partition)
        else {
            return Ok(None);
        };
        let mut checkpoint = Checkpoint::new(partition_id(partition), meta.clone());
        for (start, end) in overlay.ranges() {
            checkpoint.drop_range(start, end);
        }
        for (shard, key, value) in overlay.rows() {
            match value {
                Some(value) => checkpoint.put(ShardId(u32::from(shard)), key, value),
                None => checkpoint.delete(ShardId(u32::from(shard)), key),
            }
        }
        let member_shards = due
            .iter()
            .filter(|shard| shard.0 < u32::from(AGGREGATE_SHARD))
            .count();
        if member_shards > ONE_PASS_SHARDS {
            self.snapshot_in_one_pass(partition, due, overlay, &mut checkpoint)?;
            return Ok(Some(checkpoint));
        }
        for &shard in due {
            checkpoint.snapshot_shard(shard);
            let Ok(number) = u16::try_from(shard.0) else {
                continue;
            };
            self.shard_rows(partition, number, overlay, |key, value| {
                checkpoint.snapshot_row(shard, key, value)
            })?;
        }
        Ok(Some(checkpoint))
    }

    /// The snapshots of many shards at once, in one pass over the partition's entries: a
    /// checkpoint after a take of a partition whose shard sizes are unknown, or while they are
    /// small, finds most shards due, and a seek per place for each costs far more than reading
    /// every entry once.
    fn snapshot_in_one_pass(
        &self,
        partition: &PartitionKey,
        due: &[ShardId],
        overlay: &WriteOverlay,
        checkpoint: &mut Checkpoint,
    ) -> Result<(), StateError> {
        let prefix = partition_prefix(partition);
        let mut wanted = vec![false; MEMBER_SHARDS];
        for shard in due {
            checkpoint.snapshot_shard(*shard);
            match u16::try_from(shard.0) {
                Ok(AGGREGATE_SHARD) => {
                    self.shard_rows(partition, AGGREGATE_SHARD, overlay, |key, value| {
                        checkpoint.snapshot_row(*shard, key, value)
                    })?;
                }
                Ok(number) => {
                    if let Some(slot) = wanted.get_mut(usize::from(number)) {
                        *slot = true;
                    }
                }
                Err(_) => {}
            }
        }
        let empty = BTreeMap::new();
        let mut row = Vec::new();
        self.scan_family(CF_ENTRIES, &prefix, |key, value| {
            let Some(shard) = stored_member_shard(key) else {
                return;
            };
            if !wanted.get(usize::from(shard)).copied().unwrap_or(false) {
                return;
            }
            row.clear();
            row.push(family_byte(CF_ENTRIES));
            row.extend_from_slice(&key[prefix.len()..]);
            let own = overlay.rows_of(shard).unwrap_or(&empty);
            if !own.contains_key(&row) && !overlay.deletes(&row) {
                checkpoint.snapshot_row(ShardId(u32::from(shard)), &row, value);
            }
        })?;
        for (shard, rows) in &overlay.rows {
            if !wanted.get(usize::from(*shard)).copied().unwrap_or(false) {
                continue;
            }
            for (key, value) in rows {
                if let Some(value) = value {
                    checkpoint.snapshot_row(ShardId(u32::from(*shard)), key, value);
                }
            }
        }
        Ok(())
    }

    /// The write that takes `partition` with frames: data of metrics that changed or left the
    /// config is dropped (and named in the result), and every metric's fingerprint is stored,
    /// as [`Store::prepare_adoption`] does for keyed records. Its checkpoint is the take's first
    /// frame, committed even when it changes nothing.
    pub fn prepare_adoption_frames(
        &self,
        partition: &PartitionKey,
    ) -> Result<(FramedWrite, Vec<crate::DiscardedMetric>), StateError> {
        let prefix = partition_prefix(partition);
        let mut recorder = FrameRecorder::new(self, 0);
        let discarded = self.reconcile_partition(&prefix, &mut recorder)?;
        let meta = self
            .db
            .get_cf(self.cf(crate::CF_PARTITIONS), &prefix)?
            .unwrap_or_else(|| {
                crate::codec::encode_partition_meta(&crate::codec::PartitionMeta::default())
            });
        crate::Recording::end_partition(&mut recorder, partition, &meta);
        let write = FramedWrite {
            batch: recorder.batch,
            partitions: recorder.partitions,
        };
        Ok((write, discarded))
    }

    /// The partition's meta record as stored (the empty state's when it has none): a seed's.
    pub fn stored_meta(&self, partition: &PartitionKey) -> Result<Vec<u8>, StateError> {
        Ok(self
            .db
            .get_cf(self.cf(crate::CF_PARTITIONS), partition_prefix(partition))?
            .unwrap_or_else(|| {
                crate::codec::encode_partition_meta(&crate::codec::PartitionMeta::default())
            }))
    }

    /// Hands a seed the stored rows of one shard of `partition` (see `Checkpointer::seed`).
    pub fn seed_shard(
        &self,
        partition: &PartitionKey,
        seed: &mut SeedShard<'_>,
    ) -> Result<(), StateError> {
        let Ok(shard) = u16::try_from(seed.shard().0) else {
            return Ok(());
        };
        self.shard_rows(partition, shard, &WriteOverlay::default(), |key, value| {
            seed.row(key, value)
        })
    }

    /// Stores a framed write's batch.
    pub fn commit_framed(&self, write: FramedWrite) -> Result<(), StateError> {
        self.db.write_opt(write.batch, &self.write_options)?;
        Ok(())
    }

    /// Hands `each` every row of `shard` of `partition` as the store holds it once `overlay`
    /// (a write prepared and not yet stored; empty for the store as it is) is stored, in key
    /// order within each family. Read without filling the block cache, which the event path
    /// needs.
    pub fn shard_rows(
        &self,
        partition: &PartitionKey,
        shard: u16,
        overlay: &WriteOverlay,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError> {
        let prefix = partition_prefix(partition);
        let empty = BTreeMap::new();
        let rows = overlay.rows_of(shard).unwrap_or(&empty);
        if shard == AGGREGATE_SHARD {
            for family in AGGREGATE_FAMILIES {
                let byte = family_byte(family);
                let own = rows.range(vec![byte]..vec![byte + 1]);
                let mut merge = Merge::new(own, overlay, &mut each);
                self.scan_family(family, &prefix, |key, value| {
                    merge.stored(&row_key(family, key, prefix.len()), value)
                })?;
                merge.finish();
            }
            return Ok(());
        }
        let mut merge = Merge::new(rows.iter(), overlay, &mut each);
        self.scan_member_shard(&prefix, shard, |key, value| {
            merge.stored(&row_key(CF_ENTRIES, key, prefix.len()), value)
        })?;
        merge.finish();
        Ok(())
    }

    fn scan_family(
        &self,
        family: &'static str,
        prefix: &[u8],
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError> {
        let mut stored = self.db.raw_iterator_cf_opt(self.cf(family), uncached());
        stored.seek(prefix);
        while let (true, Some(key), Some(value)) = (stored.valid(), stored.key(), stored.value()) {
            if !key.starts_with(prefix) {
                break;
            }
            each(key, value);
            stored.next();
        }
        stored.status()?;
        Ok(())
    }

    /// The stored entries of one member shard of a partition: in each place, the shard's keys
    /// are one range, found with a seek, and the next place with another.
    pub(crate) fn scan_member_shard(
        &self,
        prefix: &[u8],
        shard: u16,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError> {
        let mut stored = self.db.raw_iterator_cf_opt(self.cf(CF_ENTRIES), uncached());
        stored.seek(prefix);
        let mut range = Vec::new();
        while let (true, Some(key)) = (stored.valid(), stored.key()) {
            if !key.starts_with(prefix) {
                break;
            }
            let place = member_shard_position(key).ok_or_else(|| StateError::Corrupt {
                column_family: CF_ENTRIES,
                detail: format!("a member key of {} bytes with no window in it", key.len()),
            })?;
            range.clear();
            range.extend_from_slice(&key[..place]);
            range.extend_from_slice(&shard.to_be_bytes());
            if key < range.as_slice() {
                stored.seek(&range);
            } else if key.starts_with(&range) {
                each(key, stored.value().unwrap_or_default());
                stored.next();
            } else {
                // Past the shard in this place: on to the next place.
                stored.seek(prefix_successor(&key[..place]));
            }
        }
        stored.status()?;
        Ok(())
    }
}

fn uncached() -> ReadOptions {
    let mut options = ReadOptions::default();
    options.fill_cache(false);
    options
}

/// Merges the stored rows of a shard, in key order, with a write's own rows of it.
struct Merge<'a, I: Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)>, F: FnMut(&[u8], &[u8])> {
    own: std::iter::Peekable<I>,
    overlay: &'a WriteOverlay,
    each: F,
}

impl<'a, I, F> Merge<'a, I, F>
where
    I: Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)>,
    F: FnMut(&[u8], &[u8]),
{
    fn new(own: I, overlay: &'a WriteOverlay, each: F) -> Self {
        Merge {
            own: own.peekable(),
            overlay,
            each,
        }
    }

    /// A stored row: the write's own rows before it first; the write's value of it if any.
    fn stored(&mut self, key: &[u8], value: &[u8]) {
        while let Some((own_key, own_value)) = self.own.next_if(|(own, _)| own.as_slice() <= key) {
            if own_key.as_slice() == key {
                if let Some(own_value) = own_value {
                    (self.each)(key, own_value);
                }
                return;
            }
            if let Some(own_value) = own_value {
                (self.each)(own_key, own_value);
            }
        }
        if !self.overlay.deletes(key) {
            (self.each)(key, value);
        }
    }

    /// The write's own rows after the last stored one.
    fn finish(mut self) {
        for (key, value) in self.own.by_ref() {
            if let Some(value) = value {
                (self.each)(key, value);
            }
        }
    }
}
