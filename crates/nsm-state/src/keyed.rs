//! The keyed changelog writer of nsm before frames (state format 7 and before), kept only to
//! make an older nsm's changelog in tests: every write as one record per stored key, range
//! deletes expanded into a tombstone per key, each partition's records ended by its meta record
//! (see the [`crate::changelog`] module doc for how a restore reads them). `nsm run` writes
//! frames and never calls it.
//!
//! Its member records carry format 6's keys (`<window key> <entry>`), as an older nsm sent them,
//! while the store keys entries by digest (format 8): the writer remembers format 6's key of
//! every entry of the change sets it is shown (`Store::learn_legacy_keys`), and sends a stored
//! member key only through that map.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use nsm_core::engine::ChangeSet;
use nsm_core::PartitionKey;
use rocksdb::WriteBatch;

use crate::changelog::{
    encode_position, epoch_key, position_key, record_bound, stored_key, BatchRecorder,
    ChangeRecord, FAMILIES, OLDER_MEMBER_BYTE,
};
use crate::codec::{entry_key_into, member_key_into, partition_prefix, prefix_successor};
use crate::{Recording, StateError, Store, CF_ENTRIES, CF_META, CF_PARTITIONS};

/// Format 6's key (`<window key> <entry>`) of each member entry the writer has seen, by stored
/// key. A stored key ends in the entry's digest, which cannot be turned back into the entry,
/// while the records of an older nsm carried the entry itself. It is a function of the entry,
/// so one map serves every store and test.
static LEGACY_KEYS: Mutex<Option<HashMap<Vec<u8>, Vec<u8>>>> = Mutex::new(None);

impl Store {
    /// Remembers format 6's key of each member entry `changes` writes, so that the keyed
    /// writer can send records of them later (those it prepares itself are remembered anyway).
    pub fn learn_legacy_keys(&self, changes: &ChangeSet) {
        let mut known = LEGACY_KEYS.lock().unwrap_or_else(PoisonError::into_inner);
        let known = known.get_or_insert_with(HashMap::new);
        for part in &changes.partitions {
            let prefix = partition_prefix(&part.key);
            for member in &part.members {
                let name = self.metric_name(member.metric);
                let (mut stored, mut legacy) = (Vec::new(), Vec::new());
                member_key_into(&mut stored, &prefix, name, member.start_ms, &member.member);
                entry_key_into(&mut legacy, &prefix, name, member.start_ms, &member.member);
                known.insert(stored, legacy);
            }
        }
    }
}

/// Format 6's key of a stored member key, if the writer has seen its entry.
pub(crate) fn legacy_member_key(stored: &[u8]) -> Option<Vec<u8>> {
    let known = LEGACY_KEYS.lock().unwrap_or_else(PoisonError::into_inner);
    known.as_ref()?.get(stored).cloned()
}

/// The record key of a stored key: its family's byte, then the key, a member entry's in
/// format 6's layout under the byte an older nsm gave it.
fn record_key(family: &'static str, key: &[u8]) -> Vec<u8> {
    if family != CF_ENTRIES {
        return record_bound(family, key);
    }
    let legacy = legacy_member_key(key).unwrap_or_else(|| {
        panic!("the keyed writer sends a member entry only from a change set it has seen")
    });
    range_bound(family, &legacy)
}

/// A bound of a range of record keys: places, the bounds of any range of member entries, are
/// the same in format 6's layout.
fn range_bound(family: &'static str, bound: &[u8]) -> Vec<u8> {
    if family != CF_ENTRIES {
        return record_bound(family, bound);
    }
    let mut out = Vec::with_capacity(bound.len() + 1);
    out.push(OLDER_MEMBER_BYTE);
    out.extend_from_slice(bound);
    out
}

/// The records of one partition in one write: `records` (one per key, in key order) and those
/// of the stored keys in `stored_ranges`, in any order (see [`Store::each_record`]), then
/// `end`, which must be sent only after every one of them was acknowledged.
#[derive(Debug, Clone)]
pub struct PartitionRecords {
    pub partition: PartitionKey,
    pub records: Vec<ChangeRecord>,
    stored_ranges: Vec<StoredRange>,
    pub end: ChangeRecord,
    /// The epoch every record of the write carries, the end marker's included: that of the
    /// owner writing it (see [`Store::changelog_epoch`]).
    pub epoch: u64,
}

/// Stored keys of one column family that a write sends records for without holding them:
/// read from the store when the records are sent, which is before the write is stored.
#[derive(Debug, Clone)]
struct StoredRange {
    family: &'static str,
    start: Vec<u8>,
    end: Vec<u8>,
    /// Each key goes with its stored value (a copy); otherwise as a tombstone.
    copy: bool,
    /// How many of the write's own records were recorded before it: a range delete makes
    /// those it covers tombstones too (see `one_per_key`).
    records_before: usize,
}

/// A write made ready with keyed records: the local batch, and the records of the same
/// changes. Send the records first, then [`Store::commit_keyed`] the batch with the changelog
/// positions.
pub struct KeyedWrite {
    batch: WriteBatch,
    pub partitions: Vec<PartitionRecords>,
}

impl Store {
    /// The batch that stores `changes` and the keyed records of the same changes.
    pub fn prepare_keyed(&self, changes: &ChangeSet) -> Result<KeyedWrite, StateError> {
        self.learn_legacy_keys(changes);
        let mut recorder = Recorder::new(self);
        self.record_changes(changes, &mut recorder);
        let mut write = recorder.finish();
        for part in &mut write.partitions {
            part.epoch = self.changelog_epoch(&part.partition)?.unwrap_or(0);
        }
        Ok(write)
    }

    /// The keyed records that make a partition's stored copy whole again after a restore, or
    /// on its first changelog, in one write ending with its end marker:
    /// - `tail`: keys of an unfinished write found after the last end marker, reverted to the
    ///   stored values;
    /// - `seed`: everything stored (the changelog is empty but the store is not);
    /// - the partition's metric definitions, as [`Store::prepare_adoption`] does.
    ///
    /// The write's records carry `epoch`, the new owner's (see [`Store::adoption_epoch`]),
    /// which the local copy keeps once the write is committed.
    pub fn prepare_keyed_adoption(
        &self,
        partition: &PartitionKey,
        tail: &[Vec<u8>],
        seed: bool,
        epoch: u64,
    ) -> Result<(KeyedWrite, Vec<crate::DiscardedMetric>), StateError> {
        let prefix = partition_prefix(partition);
        let mut recorder = Recorder::new(self);
        if seed {
            for (_, family) in FAMILIES {
                // The partition's meta record is the end marker, sent last.
                if family != CF_PARTITIONS {
                    recorder.copy_stored(family, &prefix);
                }
            }
        }
        for key in tail {
            let (family, key) = stored_key(key)?;
            let stored = self.db.get_cf(self.cf(family), &key)?;
            recorder.record(family, &key, stored.as_deref());
        }
        let discarded = self.record_adoption(partition, &mut recorder)?;
        let mut write = recorder.finish();
        for part in &mut write.partitions {
            part.epoch = epoch;
        }
        Ok((write, discarded))
    }

    /// Writes a keyed write's batch atomically, with the changelog position each partition's
    /// records reached (`positions`: the next changelog offset, after its end marker) and the
    /// epoch they carried.
    pub fn commit_keyed(
        &self,
        write: KeyedWrite,
        positions: &[(PartitionKey, i64)],
    ) -> Result<(), StateError> {
        let mut batch = write.batch;
        for (partition, position) in positions {
            batch.put_cf(
                self.cf(CF_META),
                position_key(partition),
                encode_position(*position),
            );
        }
        for part in &write.partitions {
            batch.put_cf(
                self.cf(CF_META),
                epoch_key(&part.partition),
                part.epoch.to_be_bytes(),
            );
        }
        self.db.write_opt(batch, &self.write_options)?;
        Ok(())
    }

    /// Hands every record of `part` but its end marker to `send`: its own records, then one
    /// for each stored key of its ranges (a tombstone, or a copy of the stored value), read
    /// from the store now, so call it before the write is stored. Each key goes once, with
    /// its final value in this write, so the order the broker keeps them in never matters: a
    /// key with a record of its own is skipped in the ranges (that record is final), and so
    /// is a key a later range covers again (that range is). Returns how many were sent.
    pub fn each_record<E: From<StateError>>(
        &self,
        part: &PartitionRecords,
        mut send: impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<u64, E> {
        for record in &part.records {
            send(&record.key, record.value.as_deref())?;
        }
        let mut sent = part.records.len() as u64;
        for (index, range) in part.stored_ranges.iter().enumerate() {
            // Only the later ranges that overlap this one: a write expiring a week deletes a
            // range per window, hundreds, nearly all disjoint.
            let later: Vec<&StoredRange> = part.stored_ranges[index + 1..]
                .iter()
                .filter(|other| {
                    other.family == range.family
                        && other.start < range.end
                        && range.start < other.end
                })
                .collect();
            let mut stored = self.db.raw_iterator_cf(self.cf(range.family));
            stored.seek(&range.start);
            while let (Some(stored_key), true) = (stored.key(), stored.valid()) {
                if stored_key >= range.end.as_slice() {
                    break;
                }
                let key = record_key(range.family, stored_key);
                let has_record = part
                    .records
                    .binary_search_by(|record| record.key.as_slice().cmp(&key))
                    .is_ok();
                let covered_later = later.iter().any(|other| {
                    other.start.as_slice() <= stored_key && stored_key < other.end.as_slice()
                });
                if !has_record && !covered_later {
                    send(&key, if range.copy { stored.value() } else { None })?;
                    sent += 1;
                }
                stored.next();
            }
            stored.status().map_err(StateError::from)?;
        }
        Ok(sent)
    }
}

/// Builds a local batch and the keyed records of the same operations, kept one per key, the
/// latest operation winning, so their order never matters.
struct Recorder<'s> {
    batch: BatchRecorder<'s>,
    records: Vec<ChangeRecord>,
    stored_ranges: Vec<StoredRange>,
    partitions: Vec<PartitionRecords>,
}

impl<'s> Recorder<'s> {
    fn new(store: &'s Store) -> Self {
        Recorder {
            batch: BatchRecorder::new(store, 0),
            records: Vec::new(),
            stored_ranges: Vec::new(),
            partitions: Vec::new(),
        }
    }

    /// Only to the changelog when called alone: a record whose value the store already holds
    /// (a revert of an unfinished write's key).
    fn record(&mut self, family: &'static str, key: &[u8], value: Option<&[u8]>) {
        self.records.push(ChangeRecord {
            key: record_key(family, key),
            value: value.map(<[u8]>::to_vec),
        });
    }

    /// Only to the changelog: every stored key of `family` under `prefix` with its value, read
    /// when the records are sent (seeding a changelog with a partition's stored copy). Keys a
    /// range deleted later in the write covers go as its tombstones only (see
    /// [`Store::each_record`]).
    fn copy_stored(&mut self, family: &'static str, prefix: &[u8]) {
        self.stored_ranges.push(StoredRange {
            family,
            start: prefix.to_vec(),
            end: prefix_successor(prefix),
            copy: true,
            records_before: self.records.len(),
        });
    }

    fn finish(self) -> KeyedWrite {
        KeyedWrite {
            batch: self.batch.into_batch(),
            partitions: self.partitions,
        }
    }
}

impl Recording for Recorder<'_> {
    fn put(&mut self, family: &'static str, key: &[u8], value: &[u8]) {
        self.batch.put(family, key, value);
        self.record(family, key, Some(value));
    }

    fn delete(&mut self, family: &'static str, key: &[u8]) {
        self.batch.delete(family, key);
        self.record(family, key, None);
    }

    /// Deletes `[start, end)`: one range delete locally, a tombstone per key in the changelog
    /// (those put earlier in this write now, those stored when the records are sent).
    fn delete_range(&mut self, family: &'static str, start: &[u8], end: &[u8]) {
        self.batch.delete_range(family, start, end);
        self.stored_ranges.push(StoredRange {
            family,
            start: start.to_vec(),
            end: end.to_vec(),
            copy: false,
            records_before: self.records.len(),
        });
    }

    /// Closes one partition's records with its end marker, the meta record `meta`, which is
    /// also written locally.
    fn end_partition(&mut self, partition: &PartitionKey, meta: &[u8]) {
        self.batch.end_partition(partition, meta);
        let prefix = partition_prefix(partition);
        let records = one_per_key(std::mem::take(&mut self.records), &self.stored_ranges);
        self.partitions.push(PartitionRecords {
            partition: partition.clone(),
            records,
            stored_ranges: std::mem::take(&mut self.stored_ranges),
            end: ChangeRecord {
                key: record_bound(CF_PARTITIONS, &prefix),
                value: Some(meta.to_vec()),
            },
            // Set by the caller: the store's epoch of the partition, or an adoption's.
            epoch: 0,
        });
    }
}

/// A partition's records in key order, one per key with the value of the latest operation on
/// it: its last record, or a tombstone when a range delete recorded after that covers it.
fn one_per_key(records: Vec<ChangeRecord>, ranges: &[StoredRange]) -> Vec<ChangeRecord> {
    // The order of operations breaks ties: among a key's records the last wins.
    let mut records: Vec<(usize, ChangeRecord)> = records.into_iter().enumerate().collect();
    records.sort_unstable_by(|(a_order, a), (b_order, b)| {
        a.key.cmp(&b.key).then(a_order.cmp(b_order))
    });
    let mut latest: Vec<(usize, ChangeRecord)> = Vec::with_capacity(records.len());
    for record in records {
        match latest.last_mut() {
            Some(last) if last.1.key == record.1.key => *last = record,
            _ => latest.push(record),
        }
    }
    for range in ranges.iter().filter(|range| !range.copy) {
        let (start, end) = (
            range_bound(range.family, &range.start),
            range_bound(range.family, &range.end),
        );
        let first = latest.partition_point(|(_, record)| record.key < start);
        for (order, record) in &mut latest[first..] {
            if record.key >= end {
                break;
            }
            if *order < range.records_before {
                record.value = None;
            }
        }
    }
    latest.into_iter().map(|(_, record)| record).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of a member entry keyed `key` (in format 6's layout).
    fn put(key: &str, value: &str) -> ChangeRecord {
        ChangeRecord {
            key: range_bound(CF_ENTRIES, key.as_bytes()),
            value: Some(value.as_bytes().to_vec()),
        }
    }

    fn tombstone(key: &str) -> ChangeRecord {
        ChangeRecord {
            key: range_bound(CF_ENTRIES, key.as_bytes()),
            value: None,
        }
    }

    #[test]
    fn each_key_keeps_its_latest_operation_and_a_later_range_delete_wins() {
        // In the order of the operations: b twice, a range delete of [a, c) after the first
        // three, then a again.
        let records = vec![
            put("b", "1"),
            put("a", "1"),
            put("b", "2"),
            put("c", "1"),
            put("a", "2"),
        ];
        let deleted = [StoredRange {
            family: CF_ENTRIES,
            start: b"a".to_vec(),
            end: b"c".to_vec(),
            copy: false,
            records_before: 3,
        }];
        assert_eq!(
            one_per_key(records, &deleted),
            vec![put("a", "2"), tombstone("b"), put("c", "1")]
        );
    }
}
