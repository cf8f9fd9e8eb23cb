//! What one checkpoint of one partition says, built by the caller and encoded as it is built:
//! its meta, the prefixes it drops, its changes grouped by shard, and the full rows of the
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
//! - the delta section: the dropped prefixes (count, then each length-prefixed), then the
//!   change groups (count, then each: shard, change count, byte length, changes).

use std::collections::BTreeMap;

use crate::ids::{CheckpointConfig, PartitionId, ShardId};
use crate::wire::{put_bytes, put_varint, DecodeError, Reader};

/// Bytes of rows or changes of one shard, and how many there are.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardBytes {
    pub(crate) count: u64,
    pub(crate) bytes: Vec<u8>,
}

/// One checkpoint of one partition, as the caller builds it.
///
/// The state it leaves is: the state before it, with every key starting with a dropped prefix
/// removed, then its changes applied in the order given (a later change of a key wins), except
/// that a shard it snapshots is exactly the snapshot's rows. A snapshot must therefore hold the
/// shard as it is after this checkpoint's drops and changes; the changes of a snapshotted shard
/// are left out of the encoding, since the snapshot holds them.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub(crate) partition: PartitionId,
    pub(crate) meta: Vec<u8>,
    pub(crate) dropped_prefixes: Vec<Vec<u8>>,
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
            dropped_prefixes: Vec::new(),
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

    /// Removes every key starting with `prefix`, in every shard, before this checkpoint's
    /// changes: a whole window or generation expires in one entry, whatever its number of rows.
    pub fn drop_prefix(&mut self, prefix: &[u8]) {
        self.dropped_prefixes.push(prefix.to_vec());
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
        let capacity = self.dropped_prefixes.iter().map(Vec::len).sum::<usize>()
            + groups
                .iter()
                .map(|(_, group)| group.bytes.len())
                .sum::<usize>()
            + 16 * (groups.len() + self.dropped_prefixes.len() + 1);
        let mut out = Vec::with_capacity(capacity);
        put_varint(&mut out, self.dropped_prefixes.len() as u64);
        for prefix in &self.dropped_prefixes {
            put_bytes(&mut out, prefix);
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

/// A delta section read: its drops and change groups, the changes decoded when iterated.
#[derive(Debug, Clone)]
pub(crate) struct Delta<'a> {
    pub(crate) dropped_prefixes: Vec<&'a [u8]>,
    pub(crate) groups: Vec<ChangeGroup<'a>>,
}

impl<'a> Delta<'a> {
    pub(crate) fn read(bytes: &'a [u8], shards: u32) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let drops = reader.count("dropped prefix count")?;
        let dropped_prefixes = (0..drops)
            .map(|_| reader.bytes())
            .collect::<Result<_, _>>()?;
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
            dropped_prefixes,
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
        assert_eq!(delta.dropped_prefixes, vec![&b"window/3/"[..]]);
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
