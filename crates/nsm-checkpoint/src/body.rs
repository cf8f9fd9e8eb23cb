//! What one checkpoint of one partition says, built by the caller and encoded as it is built:
//! its meta, the key ranges it drops, its changes grouped by shard, and the full rows of the
//! shards it snapshots.
//!
//! Rows are appended to per-shard byte buffers rather than collected as owned keys and values,
//! so a checkpoint of many rows costs no allocation per row, and its delta section is the same
//! bytes in the changelog frame and in the local store.
//!
//! Layout of the sections (every length and count a varint):
//! - a row: key (length-prefixed), value (length-prefixed);
//! - a change: key (length-prefixed), then zero for a delete, or the value's length plus one
//!   and the value;
//! - a dropped range: its start (length-prefixed), then zero for a range without an end, or
//!   the end's length plus one and the end;
//! - the delta section: the dropped ranges (count, then each), then the change groups (count,
//!   then each: shard, change count, byte length, changes).

use std::collections::BTreeMap;

use crate::ids::{CheckpointConfig, PartitionId, ShardId};
use crate::wire::{put_bytes, put_varint, varint_len, DecodeError, Reader};

/// Bytes of rows or changes of one shard, and how many there are.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardBytes {
    pub(crate) count: u64,
    pub(crate) bytes: Vec<u8>,
}

/// A range of keys a checkpoint drops: from `start` (included) to `end` (excluded), or to the
/// last key when `end` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DroppedRange {
    pub(crate) start: Vec<u8>,
    pub(crate) end: Option<Vec<u8>>,
}

/// The first key after every key starting with `prefix`: the prefix without its trailing
/// `0xff` bytes, its last byte raised by one. `None` when there is none (the prefix is empty or
/// all `0xff`), so the range of the prefix runs to the last key.
pub(crate) fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|byte| *byte != 0xff)?;
    let mut successor = prefix[..=last].to_vec();
    successor[last] += 1;
    Some(successor)
}

/// One checkpoint of one partition, as the caller builds it.
///
/// The state it leaves is: the state before it, with every key in a dropped range removed,
/// then its changes applied in the order given (a later change of a key wins), except that a
/// shard it snapshots is exactly the snapshot's rows. A snapshot must therefore hold the shard
/// as it is after this checkpoint's drops and changes; the changes of a snapshotted shard are
/// left out of the encoding, since the snapshot holds them.
///
/// Drops come first whatever the order they were recorded in. A caller whose own store applies
/// its range deletes after its changes (RocksDB's batch in nsm-state: "entries written for a
/// window deleted in this batch go too") must leave out of the checkpoint every change that a
/// range recorded after it covers, as that store's batch does; the checkpoint does not look
/// for them, since that would mean reading back every change recorded at each drop.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub(crate) partition: PartitionId,
    pub(crate) meta: Vec<u8>,
    pub(crate) dropped_ranges: Vec<DroppedRange>,
    pub(crate) changes: Vec<ShardBytes>,
    pub(crate) snapshots: BTreeMap<ShardId, ShardBytes>,
    /// The highest shard named beyond any configuration's count: its changes are not kept,
    /// and the commit refuses the checkpoint.
    shard_beyond_any_count: Option<u32>,
}

impl Checkpoint {
    /// A checkpoint of `partition` whose state is as current as `meta` (the input offset to
    /// resume from, watermarks: opaque here).
    pub fn new(partition: PartitionId, meta: impl Into<Vec<u8>>) -> Self {
        Checkpoint {
            partition,
            meta: meta.into(),
            dropped_ranges: Vec::new(),
            changes: Vec::new(),
            snapshots: BTreeMap::new(),
            shard_beyond_any_count: None,
        }
    }

    pub fn partition(&self) -> &PartitionId {
        &self.partition
    }

    /// The changes of `shard`; `None`, and the shard remembered, when no configuration has it.
    fn shard_changes(&mut self, shard: ShardId) -> Option<&mut ShardBytes> {
        if shard.0 >= CheckpointConfig::MAX_SHARDS {
            self.shard_beyond_any_count = self.shard_beyond_any_count.max(Some(shard.0));
            return None;
        }
        if self.changes.len() <= shard.index() {
            self.changes
                .resize_with(shard.index() + 1, ShardBytes::default);
        }
        Some(&mut self.changes[shard.index()])
    }

    /// Sets `key` of `shard` to `value`.
    pub fn put(&mut self, shard: ShardId, key: &[u8], value: &[u8]) {
        let Some(changes) = self.shard_changes(shard) else {
            return;
        };
        put_bytes(&mut changes.bytes, key);
        put_varint(&mut changes.bytes, value.len() as u64 + 1);
        changes.bytes.extend_from_slice(value);
        changes.count += 1;
    }

    /// Removes `key` of `shard`.
    pub fn delete(&mut self, shard: ShardId, key: &[u8]) {
        let Some(changes) = self.shard_changes(shard) else {
            return;
        };
        put_bytes(&mut changes.bytes, key);
        put_varint(&mut changes.bytes, 0);
        changes.count += 1;
    }

    /// Removes every key from `start` (included) to `end` (excluded), bytewise, in every shard,
    /// before this checkpoint's changes (see [`Checkpoint`] for the order): a whole window, id
    /// period or funnel period expires in one entry, whatever its number of rows. A range whose
    /// end is not after its start drops nothing and is not recorded.
    pub fn drop_range(&mut self, start: &[u8], end: &[u8]) {
        if start < end {
            self.dropped_ranges.push(DroppedRange {
                start: start.to_vec(),
                end: Some(end.to_vec()),
            });
        }
    }

    /// Removes every key starting with `prefix`: the range from `prefix` to its successor (to
    /// the last key when it has none), as [`Checkpoint::drop_range`] does.
    pub fn drop_prefix(&mut self, prefix: &[u8]) {
        self.dropped_ranges.push(DroppedRange {
            start: prefix.to_vec(),
            end: prefix_successor(prefix),
        });
    }

    /// The ranges dropped.
    pub fn dropped_ranges(&self) -> usize {
        self.dropped_ranges.len()
    }

    /// Makes this checkpoint carry the full contents of `shard`, empty until rows are added
    /// with [`Checkpoint::snapshot_row`].
    pub fn snapshot_shard(&mut self, shard: ShardId) {
        self.snapshots.entry(shard).or_default();
    }

    /// Adds a row of the snapshot of `shard` (see [`Checkpoint::snapshot_shard`]).
    pub fn snapshot_row(&mut self, shard: ShardId, key: &[u8], value: &[u8]) {
        let rows = self.snapshots.entry(shard).or_default();
        put_bytes(&mut rows.bytes, key);
        put_bytes(&mut rows.bytes, value);
        rows.count += 1;
    }

    /// The changes recorded, those of snapshotted shards included.
    pub fn changes(&self) -> u64 {
        self.changes.iter().map(|shard| shard.count).sum()
    }

    /// The highest shard this checkpoint names, to check it against the configuration.
    pub(crate) fn highest_shard(&self) -> Option<u32> {
        let changed = self
            .changes
            .iter()
            .rposition(|shard| shard.count > 0)
            .map(|index| index as u32);
        let snapshotted = self.snapshots.keys().next_back().map(|shard| shard.0);
        changed.max(snapshotted).max(self.shard_beyond_any_count)
    }

    pub(crate) fn snapshot_shards(&self) -> Vec<ShardId> {
        self.snapshots.keys().copied().collect()
    }

    /// The delta section: drops, then the change groups of the shards not snapshotted.
    pub(crate) fn encode_delta(&self) -> Vec<u8> {
        let groups: Vec<(ShardId, &ShardBytes)> = self
            .changes
            .iter()
            .enumerate()
            .map(|(index, changes)| (ShardId(index as u32), changes))
            .filter(|(shard, changes)| changes.count > 0 && !self.snapshots.contains_key(shard))
            .collect();
        let capacity = self
            .dropped_ranges
            .iter()
            .map(|range| range.start.len() + range.end.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
            + groups
                .iter()
                .map(|(_, group)| group.bytes.len())
                .sum::<usize>()
            + 16 * (groups.len() + self.dropped_ranges.len() + 1);
        let mut out = Vec::with_capacity(capacity);
        put_varint(&mut out, self.dropped_ranges.len() as u64);
        for range in &self.dropped_ranges {
            put_bytes(&mut out, &range.start);
            match &range.end {
                None => put_varint(&mut out, 0),
                Some(end) => {
                    put_varint(&mut out, end.len() as u64 + 1);
                    out.extend_from_slice(end);
                }
            }
        }
        put_varint(&mut out, groups.len() as u64);
        for (shard, group) in groups {
            put_varint(&mut out, u64::from(shard.0));
            put_varint(&mut out, group.count);
            put_bytes(&mut out, &group.bytes);
        }
        out
    }
}

/// Writes a snapshot section: row count, byte length, rows.
/// The bytes `put_rows` writes for `rows`: a snapshot section's size, without building it.
pub(crate) fn rows_section_len(rows: &ShardBytes) -> u64 {
    (varint_len(rows.count) + varint_len(rows.bytes.len() as u64) + rows.bytes.len()) as u64
}

pub(crate) fn put_rows(out: &mut Vec<u8>, rows: &ShardBytes) {
    put_varint(out, rows.count);
    put_bytes(out, &rows.bytes);
}

/// A snapshot section being read: its rows, decoded as they are iterated.
#[derive(Debug, Clone)]
pub(crate) struct Rows<'a> {
    pub(crate) count: u64,
    pub(crate) bytes: &'a [u8],
}

impl<'a> Rows<'a> {
    pub(crate) fn read(reader: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let count = reader.varint()?;
        let bytes = reader.bytes()?;
        Ok(Rows { count, bytes })
    }

    /// Calls `row` with each key and value; the count must match the bytes exactly.
    pub(crate) fn for_each(
        &self,
        mut row: impl FnMut(&'a [u8], &'a [u8]),
    ) -> Result<(), DecodeError> {
        let mut reader = Reader::new(self.bytes);
        for _ in 0..self.count {
            let key = reader.bytes()?;
            let value = reader.bytes()?;
            row(key, value);
        }
        reader.finish()
    }
}

/// The changes of one shard in a delta section.
#[derive(Debug, Clone)]
pub(crate) struct ChangeGroup<'a> {
    pub(crate) shard: ShardId,
    count: u64,
    bytes: &'a [u8],
}

impl<'a> ChangeGroup<'a> {
    /// Calls `change` with each key and its new value (`None`: deleted), in order.
    pub(crate) fn for_each(
        &self,
        mut change: impl FnMut(&'a [u8], Option<&'a [u8]>),
    ) -> Result<(), DecodeError> {
        let mut reader = Reader::new(self.bytes);
        for _ in 0..self.count {
            let key = reader.bytes()?;
            match reader.varint()? {
                0 => change(key, None),
                tagged => change(key, Some(reader.take(tagged - 1)?)),
            }
        }
        reader.finish()
    }
}

/// A dropped range read from a delta section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RangeView<'a> {
    pub(crate) start: &'a [u8],
    pub(crate) end: Option<&'a [u8]>,
}

impl RangeView<'_> {
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        key >= self.start && self.end.is_none_or(|end| key < end)
    }
}

/// A delta section read: its drops and change groups, the changes decoded when iterated.
#[derive(Debug, Clone)]
pub(crate) struct Delta<'a> {
    pub(crate) dropped_ranges: Vec<RangeView<'a>>,
    pub(crate) groups: Vec<ChangeGroup<'a>>,
}

impl<'a> Delta<'a> {
    pub(crate) fn read(bytes: &'a [u8], shards: u32) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let drops = reader.count("dropped range count")?;
        let mut dropped_ranges = Vec::new();
        for _ in 0..drops {
            let start = reader.bytes()?;
            let end = match reader.varint()? {
                0 => None,
                tagged => Some(reader.take(tagged - 1)?),
            };
            dropped_ranges.push(RangeView { start, end });
        }
        let group_count = reader.count("change group count")?;
        let mut groups = Vec::new();
        for _ in 0..group_count {
            let shard = reader.varint()?;
            if shard >= u64::from(shards) {
                return Err(DecodeError::ShardOutOfRange { shard, shards });
            }
            let count = reader.varint()?;
            let bytes = reader.bytes()?;
            groups.push(ChangeGroup {
                shard: ShardId(shard as u32),
                count,
                bytes,
            });
        }
        reader.finish()?;
        Ok(Delta {
            dropped_ranges,
            groups,
        })
    }

    /// How many changes the section holds.
    pub(crate) fn changes(&self) -> u64 {
        self.groups.iter().map(|group| group.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition() -> PartitionId {
        PartitionId::new(0, "events")
    }

    #[test]
    fn a_delta_reads_back_as_written_without_the_snapshotted_shards() {
        let mut checkpoint = Checkpoint::new(partition(), "offset 7");
        checkpoint.drop_prefix(b"window/3/");
        checkpoint.put(ShardId(0), b"a", b"1");
        checkpoint.delete(ShardId(2), b"b");
        checkpoint.put(ShardId(2), b"c", b"");
        checkpoint.put(ShardId(1), b"d", b"4");
        checkpoint.snapshot_row(ShardId(1), b"d", b"4");
        let encoded = checkpoint.encode_delta();
        let delta = Delta::read(&encoded, 4).expect("decodes");
        assert_eq!(
            delta.dropped_ranges,
            vec![RangeView {
                start: b"window/3/",
                end: Some(b"window/30")
            }]
        );
        let mut seen = Vec::new();
        for group in &delta.groups {
            group
                .for_each(|key, value| {
                    seen.push((group.shard, key.to_vec(), value.map(<[u8]>::to_vec)))
                })
                .expect("decodes");
        }
        assert_eq!(
            seen,
            vec![
                (ShardId(0), b"a".to_vec(), Some(b"1".to_vec())),
                (ShardId(2), b"b".to_vec(), None),
                (ShardId(2), b"c".to_vec(), Some(Vec::new())),
            ]
        );
        assert_eq!(checkpoint.highest_shard(), Some(2));
    }

    #[test]
    fn a_prefix_is_the_range_to_its_successor() {
        assert_eq!(prefix_successor(b"window/3/"), Some(b"window/30".to_vec()));
        assert_eq!(prefix_successor(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"\xff\xff"), None);
        assert_eq!(prefix_successor(b""), None);
        let mut checkpoint = Checkpoint::new(partition(), "");
        checkpoint.drop_prefix(b"a\xff");
        checkpoint.drop_prefix(b"");
        checkpoint.drop_range(b"m", b"p");
        // Empty and reversed ranges drop nothing and are not recorded.
        checkpoint.drop_range(b"q", b"q");
        checkpoint.drop_range(b"z", b"r");
        let encoded = checkpoint.encode_delta();
        let delta = Delta::read(&encoded, 1).expect("decodes");
        let [to_successor, everything, range] = delta.dropped_ranges[..] else {
            panic!("three ranges, not {:?}", delta.dropped_ranges);
        };
        assert!(to_successor.contains(b"a\xff"));
        assert!(to_successor.contains(b"a\xff\xff\x00"));
        assert!(!to_successor.contains(b"a"));
        assert!(!to_successor.contains(b"b"));
        assert!(everything.contains(b""));
        assert!(everything.contains(b"\xff\xff\xff"));
        assert!(range.contains(b"m"));
        assert!(range.contains(b"o\xff"));
        assert!(!range.contains(b"p"));
        assert!(!range.contains(b"l\xff"));
    }

    #[test]
    fn a_shard_beyond_any_count_allocates_nothing_and_is_reported() {
        let mut checkpoint = Checkpoint::new(partition(), "");
        checkpoint.put(ShardId(u32::MAX), b"a", b"1");
        checkpoint.delete(ShardId(CheckpointConfig::MAX_SHARDS), b"b");
        assert!(checkpoint.changes.is_empty());
        assert_eq!(checkpoint.highest_shard(), Some(u32::MAX));
    }

    #[test]
    fn a_delta_naming_a_shard_beyond_the_count_is_refused() {
        let mut checkpoint = Checkpoint::new(partition(), "");
        checkpoint.put(ShardId(5), b"a", b"1");
        let encoded = checkpoint.encode_delta();
        assert_eq!(
            Delta::read(&encoded, 4).map(|_| ()),
            Err(DecodeError::ShardOutOfRange {
                shard: 5,
                shards: 4
            })
        );
    }
}
