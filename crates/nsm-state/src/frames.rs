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
//! A member shard the engine's index holds whole, stored or not, is handed over from memory
//! instead, with no read.

use nsm_checkpoint::{Checkpoint, CheckpointConfig, PartitionId, SeedShard, ShardId};
use nsm_core::engine::MemberShardRows;
use rocksdb::ReadOptions;

use crate::changelog::{family_byte, BatchRecorder};
use crate::codec::{
    member_place_into, member_shard_position, member_shard_range, partition_prefix,
    prefix_successor, split_partition_prefix, stored_member_shard, MEMBER_SHARDS,
};
use crate::{
    PartitionKey, Recording, StateError, Store, CF_ENTRIES, CF_FINGERPRINTS, CF_GAPS, CF_SEGMENTS,
    CF_WINDOWS,
};

/// The shard of every row that is not a member entry.
pub const AGGREGATE_SHARD: u16 = MEMBER_SHARDS as u16;

/// Shards of a partition's frames: the member shards and the aggregate shard.
pub const FRAME_SHARDS: u32 = MEMBER_SHARDS as u32 + 1;

/// Shard snapshots one checkpoint reads at most, of those the byte credit makes due: the
/// oldest first, the credit left pays for the rest at the next checkpoints. Each is a seek per
/// place into RocksDB; reading every shard due after a take, or while a growing state makes
/// many due, made a checkpoint long enough to hold the consumer back (BENCHMARKS.md notes). A
/// growing state then snapshots more slowly than its deltas come: a restore reads the deltas
/// of up to 64 checkpoints beyond the state.
pub const SNAPSHOTS_PER_CHECKPOINT: usize = 16;

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

/// Bytes of a write's rows, kept in one buffer: a checkpoint records a few rows per event,
/// and an allocation for each key and value cost more than the rest of its preparation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn of(bytes: &[u8], span: Span) -> &[u8] {
        &bytes[span.start as usize..span.end as usize]
    }
}

/// Appends `parts` to `bytes`; the span they take.
fn push_span(bytes: &mut Vec<u8>, parts: &[&[u8]]) -> Span {
    let start = bytes.len();
    for part in parts {
        bytes.extend_from_slice(part);
    }
    let to_u32 =
        |at: usize| u32::try_from(at).unwrap_or_else(|_| unreachable!("a write under 4 GiB"));
    Span {
        start: to_u32(start),
        end: to_u32(bytes.len()),
    }
}

/// A row a write puts (`value: Some`) or deletes, in frame-row keys within the write's bytes.
#[derive(Debug, Clone, Copy)]
struct Row {
    shard: u16,
    key: Span,
    value: Option<Span>,
}

/// What one write does to one partition, in frame rows: the rows it leaves put or deleted, and
/// the ranges it deletes. A row put and then covered by a range deleted later in the write is
/// not among the rows (the store's batch deletes it too), so the rows and the ranges can be
/// applied in any order: ranges first, as a frame applies them.
#[derive(Debug, Clone, Default)]
pub struct WriteOverlay {
    bytes: Vec<u8>,
    /// Each row's last value in the write, in (shard, key) order.
    rows: Vec<Row>,
    /// The ranges deleted, merged into disjoint ranges in key order.
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The rows a write puts or deletes in one shard, in key order.
#[derive(Clone, Copy)]
pub(crate) struct ShardRows<'a> {
    bytes: &'a [u8],
    rows: &'a [Row],
}

impl<'a> ShardRows<'a> {
    fn key(&self, row: &Row) -> &'a [u8] {
        Span::of(self.bytes, row.key)
    }

    /// Each row's key and value (`None`: deleted).
    fn iter(self) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> {
        self.rows.iter().map(move |row| {
            (
                Span::of(self.bytes, row.key),
                row.value.map(|value| Span::of(self.bytes, value)),
            )
        })
    }

    /// The rows whose key starts with `byte` (a family's).
    fn of_family(self, byte: u8) -> ShardRows<'a> {
        let first = |row: &Row| self.key(row).first().copied();
        let from = self.rows.partition_point(|row| first(row) < Some(byte));
        let to = self.rows.partition_point(|row| first(row) <= Some(byte));
        ShardRows {
            bytes: self.bytes,
            rows: &self.rows[from..to],
        }
    }
}

impl WriteOverlay {
    /// The overlay of a partition's rows, in the order they were recorded, and the ranges
    /// deleted, each with the number of rows recorded before it.
    fn of(bytes: Vec<u8>, recorded: &[Row], ranges: Vec<(usize, Vec<u8>, Vec<u8>)>) -> Self {
        // Walked from the last: a row's last operation decides, unless a range recorded after
        // it covers it.
        let mut later = Vec::new();
        let mut pending = ranges.into_iter().rev().peekable();
        let mut rows = Vec::with_capacity(recorded.len());
        for (index, row) in recorded.iter().enumerate().rev() {
            while let Some((_, start, end)) = pending.next_if(|(before, ..)| *before > index) {
                later = merged(later, start, end);
            }
            if !covers(&later, Span::of(&bytes, row.key)) {
                rows.push((index, *row));
            }
        }
        for (_, start, end) in pending {
            later = merged(later, start, end);
        }
        // By shard in recorded order (a stable sort on the shard alone), then each shard by
        // key. A shard's member rows come in key order already, as the store's batch takes
        // them; the others (or a row written twice) are sorted, the last recorded first among
        // equal keys so that the dedup keeps it.
        rows.reverse();
        rows.sort_by_key(|(_, row)| row.shard);
        let key = |row: &Row| Span::of(&bytes, row.key);
        for shard_rows in rows.chunk_by_mut(|(_, a), (_, b)| a.shard == b.shard) {
            let in_order = shard_rows
                .windows(2)
                .all(|pair| key(&pair[0].1) < key(&pair[1].1));
            if !in_order {
                shard_rows.sort_unstable_by(|(a_index, a), (b_index, b)| {
                    key(a).cmp(key(b)).then_with(|| b_index.cmp(a_index))
                });
            }
        }
        rows.dedup_by(|(_, later), (_, kept)| later.shard == kept.shard && key(later) == key(kept));
        WriteOverlay {
            bytes,
            rows: rows.into_iter().map(|(_, row)| row).collect(),
            ranges: later,
        }
    }

    /// Whether a range of the write deletes `key`.
    fn deletes(&self, key: &[u8]) -> bool {
        covers(&self.ranges, key)
    }

    pub(crate) fn rows_of(&self, shard: u16) -> ShardRows<'_> {
        let from = self.rows.partition_point(|row| row.shard < shard);
        let to = self.rows.partition_point(|row| row.shard <= shard);
        ShardRows {
            bytes: &self.bytes,
            rows: &self.rows[from..to],
        }
    }

    /// The ranges deleted, disjoint and in key order.
    pub fn ranges(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.ranges
    }

    /// Every row the write puts or deletes, by shard, in key order within a shard.
    pub fn rows(&self) -> impl Iterator<Item = (u16, &[u8], Option<&[u8]>)> {
        self.rows.iter().map(|row| {
            (
                row.shard,
                Span::of(&self.bytes, row.key),
                row.value.map(|value| Span::of(&self.bytes, value)),
            )
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
    batch: BatchRecorder<'s>,
    /// The keys and values of the partition being recorded.
    bytes: Vec<u8>,
    rows: Vec<Row>,
    /// Its ranges deleted, each with the number of rows recorded before it.
    ranges: Vec<(usize, Vec<u8>, Vec<u8>)>,
    pub(crate) partitions: Vec<(PartitionKey, Vec<u8>, WriteOverlay)>,
}

impl<'s> FrameRecorder<'s> {
    pub(crate) fn new(store: &'s Store, capacity_bytes: usize) -> Self {
        FrameRecorder {
            batch: BatchRecorder::new(store, capacity_bytes),
            bytes: Vec::with_capacity(capacity_bytes),
            rows: Vec::new(),
            ranges: Vec::new(),
            partitions: Vec::new(),
        }
    }

    /// Records the frame row of a stored key, in its shard.
    fn record(&mut self, family: &'static str, key: &[u8], value: Option<&[u8]>) {
        let prefix_len = split_partition_prefix(key).map_or(0, |(_, rest)| key.len() - rest.len());
        let shard = if family == CF_ENTRIES {
            stored_member_shard(key).unwrap_or(AGGREGATE_SHARD)
        } else {
            AGGREGATE_SHARD
        };
        let rest = key.get(prefix_len..).unwrap_or_default();
        let key = push_span(&mut self.bytes, &[&[family_byte(family)], rest]);
        let value = value.map(|value| push_span(&mut self.bytes, &[value]));
        self.rows.push(Row { shard, key, value });
    }
}

impl Recording for FrameRecorder<'_> {
    fn put(&mut self, family: &'static str, key: &[u8], value: &[u8]) {
        self.batch.put(family, key, value);
        self.record(family, key, Some(value));
    }

    fn delete(&mut self, family: &'static str, key: &[u8]) {
        self.batch.delete(family, key);
        self.record(family, key, None);
    }

    fn delete_range(&mut self, family: &'static str, start: &[u8], end: &[u8]) {
        self.batch.delete_range(family, start, end);
        let prefix_len =
            split_partition_prefix(start).map_or(0, |(_, rest)| start.len() - rest.len());
        self.ranges.push((
            self.rows.len(),
            row_key(family, start, prefix_len),
            row_key(family, end, prefix_len),
        ));
    }

    fn end_partition(&mut self, partition: &PartitionKey, meta: &[u8]) {
        self.batch.end_partition(partition, meta);
        let overlay = WriteOverlay::of(
            std::mem::take(&mut self.bytes),
            &self.rows,
            std::mem::take(&mut self.ranges),
        );
        self.rows.clear();
        self.partitions
            .push((partition.clone(), meta.to_vec(), overlay));
    }
}

/// The rows of a member shard read from memory (see `PartitionChanges::member_snapshots`), as
/// frame rows: keys and values, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryShard {
    pub rows: Vec<(Vec<u8>, Vec<u8>)>,
}

impl MemoryShard {
    /// The frame rows of a shard's entries as the member index holds them.
    fn of(store: &Store, snapshot: &MemberShardRows) -> MemoryShard {
        let member_byte = family_byte(CF_ENTRIES);
        let mut key = Vec::new();
        let mut rows: Vec<(Vec<u8>, Vec<u8>)> = snapshot
            .rows
            .iter()
            .map(|row| {
                let name = store.metric_name(row.metric);
                member_place_into(&mut key, &[], name, row.start_ms, row.period);
                key.extend_from_slice(&row.digest.to_be_bytes());
                ([&[member_byte][..], &key].concat(), row.value.to_vec())
            })
            .collect();
        rows.sort_unstable();
        MemoryShard { rows }
    }
}

/// A write made ready for frames: the local batch, per partition its meta record and what the
/// write does to its rows, and the member shards the engine snapshotted from memory.
pub struct FramedWrite {
    pub(crate) batch: rocksdb::WriteBatch,
    partitions: Vec<(PartitionKey, Vec<u8>, WriteOverlay)>,
    memory_shards: Vec<(PartitionKey, u16, MemoryShard)>,
}

impl FramedWrite {
    /// A member shard of `partition` as it is once the write is stored, from the engine's
    /// memory, if the engine snapshotted it.
    pub fn memory_shard(&self, partition: &PartitionKey, shard: u16) -> Option<&MemoryShard> {
        self.memory_shards
            .iter()
            .find(|(key, number, _)| key == partition && *number == shard)
            .map(|(.., rows)| rows)
    }

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

/// The member shards among the snapshots `due` that a checkpoint takes (the first
/// [`SNAPSHOTS_PER_CHECKPOINT`]), for the engine to read from memory.
pub fn member_shards(due: &[ShardId]) -> Vec<u16> {
    due.iter()
        .take(SNAPSHOTS_PER_CHECKPOINT)
        .filter_map(|shard| u16::try_from(shard.0).ok())
        .filter(|shard| *shard < AGGREGATE_SHARD)
        .collect()
}

/// The frames' name of a partition: its key prefix, on the changelog partition of its number
/// (a changelog partition carries that partition number of every input topic).
pub fn partition_id(partition: &PartitionKey) -> PartitionId {
    ChangelogLayout::default().partition_id(partition)
}

/// Which changelog partition carries a partition's frames: the partition's number, plus an
/// offset for the topics given one. The repartition topic's partitions come after the input
/// topics': sharing a changelog partition with an input partition, each take would read the
/// other's records of the tail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangelogLayout {
    offsets: std::collections::BTreeMap<String, u32>,
}

impl ChangelogLayout {
    /// The partitions of `topic` start at changelog partition `offset`.
    pub fn with_offset(mut self, topic: &str, offset: u32) -> Self {
        self.offsets.insert(topic.to_string(), offset);
        self
    }

    pub fn changelog_partition(&self, partition: &PartitionKey) -> i32 {
        let offset = self.offsets.get(&*partition.topic).copied().unwrap_or(0);
        partition
            .partition
            .saturating_add(i32::try_from(offset).unwrap_or(i32::MAX))
    }

    pub fn partition_id(&self, partition: &PartitionKey) -> PartitionId {
        let changelog = u32::try_from(self.changelog_partition(partition)).unwrap_or(0);
        PartitionId::new(changelog, partition_prefix(partition))
    }
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
        let memory_shards = changes
            .partitions
            .iter()
            .flat_map(|part| {
                part.member_snapshots.iter().map(|snapshot| {
                    let rows = MemoryShard::of(self, snapshot);
                    (part.key.clone(), snapshot.shard, rows)
                })
            })
            .collect();
        FramedWrite {
            batch: recorder.batch.into_batch(),
            partitions: recorder.partitions,
            memory_shards,
        }
    }

    /// The checkpoint of `partition` in `write`, for nsm-checkpoint: the write's rows and
    /// dropped ranges, and the snapshots of the first [`SNAPSHOTS_PER_CHECKPOINT`] of the `due`
    /// shards, read now (before the write is stored) as they will be once it is. `None` when
    /// the write does not write the partition.
    pub fn checkpoint_of(
        &self,
        write: &FramedWrite,
        partition: &PartitionKey,
        layout: &ChangelogLayout,
        due: &[ShardId],
    ) -> Result<Option<Checkpoint>, StateError> {
        let Some((_, meta, overlay)) = write.partitions.iter().find(|(key, ..)| key == partition)
        else {
            return Ok(None);
        };
        let mut checkpoint = Checkpoint::new(layout.partition_id(partition), meta.clone());
        for (start, end) in overlay.ranges() {
            checkpoint.drop_range(start, end);
        }
        for (shard, key, value) in overlay.rows() {
            match value {
                Some(value) => checkpoint.put(ShardId(u32::from(shard)), key, value),
                None => checkpoint.delete(ShardId(u32::from(shard)), key),
            }
        }
        for &shard in due.iter().take(SNAPSHOTS_PER_CHECKPOINT) {
            checkpoint.snapshot_shard(shard);
            let Ok(number) = u16::try_from(shard.0) else {
                continue;
            };
            if let Some(memory) = write.memory_shard(partition, number) {
                for (key, value) in &memory.rows {
                    checkpoint.snapshot_row(shard, key, value);
                }
                continue;
            }
            self.shard_rows(partition, number, overlay, |key, value| {
                checkpoint.snapshot_row(shard, key, value)
            })?;
        }
        Ok(Some(checkpoint))
    }

    /// The checkpoint of every partition `write` writes, each with the snapshots of the shards
    /// `due` names for it (see [`Store::checkpoint_of`]): a checkpoint's frames, for
    /// `Checkpointer::commit`.
    pub fn checkpoints_of(
        &self,
        write: &FramedWrite,
        layout: &ChangelogLayout,
        mut due: impl FnMut(&PartitionId) -> Vec<ShardId>,
    ) -> Result<Vec<Checkpoint>, StateError> {
        let mut checkpoints = Vec::with_capacity(write.partitions.len());
        for partition in write.partitions() {
            let due = due(&layout.partition_id(partition));
            checkpoints.extend(self.checkpoint_of(write, partition, layout, &due)?);
        }
        Ok(checkpoints)
    }

    /// The write that takes `partition` with frames: data of metrics that changed or left the
    /// config is dropped (and named in the result), and every metric's fingerprint is stored,
    /// as [`Store::prepare_adoption`] does without the changelog. Its checkpoint is the take's
    /// first frame, committed even when it changes nothing.
    pub fn prepare_adoption_frames(
        &self,
        partition: &PartitionKey,
    ) -> Result<(FramedWrite, Vec<crate::DiscardedMetric>), StateError> {
        let mut recorder = FrameRecorder::new(self, 0);
        let discarded = self.record_adoption(partition, &mut recorder)?;
        let write = FramedWrite {
            batch: recorder.batch.into_batch(),
            partitions: recorder.partitions,
            memory_shards: Vec::new(),
        };
        Ok((write, discarded))
    }

    /// The partition's meta record as stored (the empty state's when it has none): a seed's and
    /// a take's.
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
        let rows = overlay.rows_of(shard);
        if shard == AGGREGATE_SHARD {
            for family in AGGREGATE_FAMILIES {
                let own = rows.of_family(family_byte(family)).iter();
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
    /// are one range of digests, found with a seek, and the next place with another.
    pub(crate) fn scan_member_shard(
        &self,
        prefix: &[u8],
        shard: u16,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError> {
        let mut stored = self.db.raw_iterator_cf_opt(self.cf(CF_ENTRIES), uncached());
        stored.seek(prefix);
        let mut bounds = None;
        while let (true, Some(key)) = (stored.valid(), stored.key()) {
            if !key.starts_with(prefix) {
                break;
            }
            let place = member_shard_position(key).ok_or_else(|| StateError::Corrupt {
                column_family: CF_ENTRIES,
                detail: format!("a member key of {} bytes with no window in it", key.len()),
            })?;
            // The shard's range in this place, made again only when the place changes.
            let known = bounds
                .as_ref()
                .is_some_and(|(start, _): &(Vec<u8>, Vec<u8>)| {
                    start.len() == place + 2 && start.starts_with(&key[..place])
                });
            if !known {
                bounds = None;
            }
            let (start, end) =
                bounds.get_or_insert_with(|| member_shard_range(&key[..place], shard));
            if key < start.as_slice() {
                stored.seek(start);
            } else if key < end.as_slice() {
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
struct Merge<'a, I: Iterator<Item = (&'a [u8], Option<&'a [u8]>)>, F: FnMut(&[u8], &[u8])> {
    own: std::iter::Peekable<I>,
    overlay: &'a WriteOverlay,
    each: F,
}

impl<'a, I, F> Merge<'a, I, F>
where
    I: Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
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
        while let Some((own_key, own_value)) = self.own.next_if(|(own, _)| *own <= key) {
            if own_key == key {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An operation of a test write: `(shard, key, value)`, or a range `[start, end)` when the
    /// shard is `None`.
    type Operation<'a> = (Option<u16>, &'a [u8], Option<&'a [u8]>);

    /// Records rows and ranges as the recorder does.
    fn overlay(operations: &[Operation<'_>]) -> WriteOverlay {
        let (mut bytes, mut rows, mut ranges) = (Vec::new(), Vec::new(), Vec::new());
        for &(shard, key, value) in operations {
            match shard {
                Some(shard) => {
                    let key = push_span(&mut bytes, &[key]);
                    let value = value.map(|value| push_span(&mut bytes, &[value]));
                    rows.push(Row { shard, key, value });
                }
                None => ranges.push((rows.len(), key.to_vec(), value.unwrap_or_default().to_vec())),
            }
        }
        WriteOverlay::of(bytes, &rows, ranges)
    }

    fn rows(overlay: &WriteOverlay) -> Vec<(u16, Vec<u8>, Option<Vec<u8>>)> {
        overlay
            .rows()
            .map(|(shard, key, value)| (shard, key.to_vec(), value.map(<[u8]>::to_vec)))
            .collect()
    }

    #[test]
    fn a_rows_last_operation_wins_and_rows_come_by_shard_then_key() {
        let overlay = overlay(&[
            (Some(3), b"b", Some(b"1")),
            (Some(1), b"z", Some(b"1")),
            (Some(3), b"a", Some(b"1")),
            (Some(3), b"b", None),
            (Some(1), b"z", Some(b"2")),
        ]);
        assert_eq!(
            rows(&overlay),
            vec![
                (1, b"z".to_vec(), Some(b"2".to_vec())),
                (3, b"a".to_vec(), Some(b"1".to_vec())),
                (3, b"b".to_vec(), None),
            ]
        );
    }

    #[test]
    fn a_range_deleted_later_drops_the_rows_it_covers_and_not_those_written_after_it() {
        let overlay = overlay(&[
            (Some(0), b"b1", Some(b"old")),
            (Some(0), b"c", Some(b"kept")),
            (None, b"b", Some(b"c")),
            (Some(0), b"b2", Some(b"new")),
            (None, b"x", Some(b"y")),
            (None, b"a", Some(b"b0")),
        ]);
        assert_eq!(
            rows(&overlay),
            vec![
                (0, b"b2".to_vec(), Some(b"new".to_vec())),
                (0, b"c".to_vec(), Some(b"kept".to_vec())),
            ]
        );
        assert_eq!(
            overlay.ranges(),
            &[
                (b"a".to_vec(), b"c".to_vec()),
                (b"x".to_vec(), b"y".to_vec())
            ]
        );
    }

    #[test]
    fn a_shards_rows_of_one_family_are_those_whose_key_starts_with_its_byte() {
        let overlay = overlay(&[
            (Some(AGGREGATE_SHARD), &[2, 9], Some(b"w")),
            (Some(AGGREGATE_SHARD), &[1, 5], Some(b"v")),
            (Some(AGGREGATE_SHARD), &[3], None),
            (Some(AGGREGATE_SHARD), &[2, 1], Some(b"u")),
            (Some(7), &[2, 0], Some(b"elsewhere")),
        ]);
        let family: Vec<_> = overlay
            .rows_of(AGGREGATE_SHARD)
            .of_family(2)
            .iter()
            .map(|(key, value)| (key.to_vec(), value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(
            family,
            vec![
                (vec![2, 1], Some(b"u".to_vec())),
                (vec![2, 9], Some(b"w".to_vec()))
            ]
        );
        assert_eq!(
            overlay.rows_of(AGGREGATE_SHARD).of_family(4).iter().count(),
            0
        );
        assert_eq!(overlay.rows_of(5).iter().count(), 0);
    }
}
