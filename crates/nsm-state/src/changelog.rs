//! The store's side of the changelog: every write is also a list of keyed records, so that a
//! compacted Kafka topic holds the latest value of every stored key and another instance can
//! rebuild a partition from it (restore) when the partition moves.
//!
//! A record's key is one byte naming the column family and the store key; its value is the
//! stored value, or none (a tombstone) for a deleted key. Range deletes are expanded into a
//! tombstone per stored key, so compaction alone keeps the topic bounded by the live state.
//! Those tombstones (and the copies of a partition's stored entries when it is seeded) are
//! read from the store as they are sent, never held: a week's window expiring deletes an
//! entry per user and metric, millions of them, in one write.
//!
//! Each partition's records of one write end with its **end marker**, the partition's meta
//! record (offsets and watermark), sent only once the others are acknowledged. Records after
//! the last end marker of a partition are the *tail* of a write that did not finish: a
//! restore never applies them, and the new owner's first write reverts their keys to the
//! restored values, so that the topic reads right from the start again.
//!
//! Every record also carries the **epoch** of the owner that wrote it (a Kafka header, so
//! that keys and values stay those of the store): an owner takes a partition with an epoch
//! above every one the changelog holds for it ([`Store::adoption_epoch`]). An instance cut off
//! from the group can go on sending after another has taken its partitions, and its records
//! can land after the new owner's: a restore takes a record whose epoch is below the highest
//! epoch read before it as *stale*, and an end marker whose epoch is below the highest of an
//! end marker applied before it as stale too. A stale end marker finishes nothing; a stale
//! record never replaces nor deletes a value, and only sets a key that has none (compaction
//! may have removed the newer records of its key, which it came after: the stale value is
//! then the only one left). Records without an epoch (written by an nsm before epochs) are
//! never stale, so a group running two versions during an upgrade restores as it did.

use std::collections::HashSet;

use nsm_core::PartitionKey;
use rocksdb::WriteBatch;

use std::borrow::Cow;

use crate::codec::{
    current_member_key, decode_partition_meta, legacy_member_key, partition_prefix,
    prefix_successor,
};
use crate::{
    Recording, StateError, Store, CF_ENTRIES, CF_FINGERPRINTS, CF_GAPS, CF_META, CF_PARTITIONS,
    CF_SEGMENTS, CF_WINDOWS,
};

/// The column families a changelog carries, with the byte that names each in record keys.
pub(crate) const FAMILIES: [(u8, &str); 6] = [
    (b'p', CF_PARTITIONS),
    (b'w', CF_WINDOWS),
    (b'm', CF_ENTRIES),
    (b's', CF_SEGMENTS),
    (b'g', CF_GAPS),
    (b'f', CF_FINGERPRINTS),
];

pub(crate) fn family_byte(family: &'static str) -> u8 {
    FAMILIES
        .iter()
        .find(|(_, name)| *name == family)
        .map(|(byte, _)| *byte)
        .unwrap_or_else(|| unreachable!("{family} is not carried by the changelog and its frames"))
}

pub(crate) fn family_of(byte: u8) -> Option<&'static str> {
    FAMILIES
        .iter()
        .find(|(found, _)| *found == byte)
        .map(|(_, name)| *name)
}

/// The record key of a stored key: its family's byte, then the key, a member entry's in
/// format 6's layout (without its shard), which the changelog keeps until it carries frames.
fn record_key(family: &'static str, key: &[u8]) -> Vec<u8> {
    let legacy = (family == CF_ENTRIES)
        .then(|| legacy_member_key(key))
        .flatten();
    record_bound(family, legacy.as_deref().unwrap_or(key))
}

/// A bound of a range of record keys: its family's byte, then the bound as stored. A range
/// deletes whole places (a window, a metric, the periods of a funnel before one), whose bounds
/// member keys of both layouts share.
fn record_bound(family: &'static str, bound: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bound.len() + 1);
    out.push(family_byte(family));
    out.extend_from_slice(bound);
    out
}

/// The stored key of a record's key (without its family byte): the inverse of [`record_key`].
fn stored_key<'k>(family: &'static str, key: &'k [u8]) -> Result<Cow<'k, [u8]>, StateError> {
    if family != CF_ENTRIES {
        return Ok(Cow::Borrowed(key));
    }
    current_member_key(key)
        .map(Cow::Owned)
        .ok_or_else(|| StateError::Corrupt {
            column_family: "changelog",
            detail: format!("a member record key of {} bytes with no window", key.len()),
        })
}

/// One changelog record: a store key and its value, or `None` for a deleted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// The records of one partition in one write: `records` (one per key, in key order) and those
/// of the stored keys in `stored_ranges`, in any order (see [`Store::each_record`]), then
/// `end`, which must be sent only after every one of them was acknowledged.
#[derive(Debug, Clone)]
pub struct PartitionRecords {
    pub partition: PartitionKey,
    pub records: Vec<ChangeRecord>,
    pub(crate) stored_ranges: Vec<StoredRange>,
    pub end: ChangeRecord,
    /// The epoch every record of the write carries, the end marker's included: that of the
    /// owner writing it (see [`Store::changelog_epoch`]).
    pub epoch: u64,
}

/// Stored keys of one column family that a write sends records for without holding them:
/// read from the store when the records are sent, which is before the write is stored.
#[derive(Debug, Clone)]
pub(crate) struct StoredRange {
    family: &'static str,
    start: Vec<u8>,
    end: Vec<u8>,
    /// Each key goes with its stored value (a copy); otherwise as a tombstone.
    copy: bool,
    /// How many of the write's own records were recorded before it: a range delete makes
    /// those it covers tombstones too (see `one_per_key`).
    records_before: usize,
}

/// A write made ready: the local batch, and the changelog records of the same changes.
/// Send the records first, then [`Store::commit`] the batch with the changelog positions.
pub struct PreparedWrite {
    pub(crate) batch: WriteBatch,
    pub partitions: Vec<PartitionRecords>,
    /// Partitions written without changelog records: their positions are dropped.
    pub(crate) without_changelog: Vec<PartitionKey>,
}

impl PreparedWrite {
    /// The write without its changelog records, for a store that runs without a changelog:
    /// committing it drops the positions of its partitions.
    pub fn without_changelog_records(mut self) -> Self {
        self.without_changelog.extend(
            self.partitions
                .drain(..)
                .map(|partition| partition.partition),
        );
        self
    }
}

impl Store {
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

/// Builds a local batch and, when asked, the changelog records of the same operations. Records
/// are kept one per key, the latest operation winning, so their order never matters.
///
/// A partition's records are collected in the order of their operations and sorted once at its
/// end, not kept in a sorted map as they come: a checkpoint records a few keys per event, and
/// a map allocated a node and compared keys at every one.
pub(crate) struct Recorder<'s> {
    store: &'s Store,
    pub(crate) batch: WriteBatch,
    records: Option<Vec<ChangeRecord>>,
    stored_ranges: Vec<StoredRange>,
    partitions: Vec<PartitionRecords>,
    without_changelog: Vec<PartitionKey>,
}

impl<'s> Recorder<'s> {
    /// `capacity_bytes`: about the size the batch will reach (0 if unknown).
    pub(crate) fn new(store: &'s Store, record: bool, capacity_bytes: usize) -> Self {
        Recorder {
            store,
            batch: WriteBatch::with_capacity_bytes(capacity_bytes),
            records: record.then(Vec::new),
            stored_ranges: Vec::new(),
            partitions: Vec::new(),
            without_changelog: Vec::new(),
        }
    }

    fn record(&mut self, family: &'static str, key: &[u8], value: Option<&[u8]>) {
        if let Some(records) = &mut self.records {
            records.push(ChangeRecord {
                key: record_key(family, key),
                value: value.map(<[u8]>::to_vec),
            });
        }
    }

    /// Only to the changelog: every stored key of `family` under `prefix` with its value, read
    /// when the records are sent (seeding a changelog with a partition's stored copy). Keys a
    /// range deleted later in the write covers go as its tombstones only (see
    /// [`Store::each_record`]).
    pub(crate) fn copy_stored(&mut self, family: &'static str, prefix: &[u8]) {
        if let Some(records) = &self.records {
            self.stored_ranges.push(StoredRange {
                family,
                start: prefix.to_vec(),
                end: prefix_successor(prefix),
                copy: true,
                records_before: records.len(),
            });
        }
    }

    /// Only to the changelog: a record whose value the store already holds (a revert, or a
    /// snapshot of stored state).
    pub(crate) fn record_only(&mut self, family: &'static str, key: &[u8], value: Option<&[u8]>) {
        self.record(family, key, value);
    }

    pub(crate) fn finish(self) -> PreparedWrite {
        PreparedWrite {
            batch: self.batch,
            partitions: self.partitions,
            without_changelog: self.without_changelog,
        }
    }
}

impl Recording for Recorder<'_> {
    fn put(&mut self, family: &'static str, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.store.cf(family), key, value);
        self.record(family, key, Some(value));
    }

    fn delete(&mut self, family: &'static str, key: &[u8]) {
        self.batch.delete_cf(self.store.cf(family), key);
        self.record(family, key, None);
    }

    /// Deletes `[start, end)`: one range delete locally, a tombstone per key in the changelog
    /// (those put earlier in this write now, those stored when the records are sent).
    fn delete_range(&mut self, family: &'static str, start: &[u8], end: &[u8]) {
        self.batch
            .delete_range_cf(self.store.cf(family), start, end);
        if let Some(records) = &self.records {
            self.stored_ranges.push(StoredRange {
                family,
                start: start.to_vec(),
                end: end.to_vec(),
                copy: false,
                records_before: records.len(),
            });
        }
    }

    /// Closes one partition's records with its end marker, the meta record `meta`, which is
    /// also written locally.
    fn end_partition(&mut self, partition: &PartitionKey, meta: &[u8]) {
        let prefix = partition_prefix(partition);
        self.batch
            .put_cf(self.store.cf(CF_PARTITIONS), &prefix, meta);
        if let Some(records) = &mut self.records {
            let records = one_per_key(std::mem::take(records), &self.stored_ranges);
            self.partitions.push(PartitionRecords {
                partition: partition.clone(),
                records,
                stored_ranges: std::mem::take(&mut self.stored_ranges),
                end: ChangeRecord {
                    key: record_key(CF_PARTITIONS, &prefix),
                    value: Some(meta.to_vec()),
                },
                // The store's epoch of the partition, set by `Store::stamp_epochs`, or the
                // new one of an adoption.
                epoch: 0,
            });
        } else {
            self.without_changelog.push(partition.clone());
        }
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
            record_bound(range.family, &range.start),
            record_bound(range.family, &range.end),
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

/// Where the local copy of a partition stands in the changelog: the next changelog offset to
/// read. Kept in `meta`, never sent.
pub(crate) fn position_key(partition: &PartitionKey) -> Vec<u8> {
    let mut key = b"changelog/".to_vec();
    key.extend_from_slice(&partition_prefix(partition));
    key
}

/// The epoch of the local copy of a partition. Kept in `meta`, never sent.
pub(crate) fn epoch_key(partition: &PartitionKey) -> Vec<u8> {
    let mut key = b"changelog-epoch/".to_vec();
    key.extend_from_slice(&partition_prefix(partition));
    key
}

/// Whether a record of epoch `epoch` is older than `bound`; a record without an epoch never is.
fn older(epoch: Option<u64>, bound: Option<u64>) -> bool {
    matches!((epoch, bound), (Some(epoch), Some(bound)) if epoch < bound)
}

/// Which records of a changelog partition belong to one input partition, and which one is its
/// end marker (a changelog partition carries that partition number of every input topic).
struct PartitionRecordKeys {
    prefix: Vec<u8>,
    end_key: Vec<u8>,
}

impl PartitionRecordKeys {
    fn new(partition: &PartitionKey) -> Self {
        let prefix = partition_prefix(partition);
        PartitionRecordKeys {
            end_key: record_key(CF_PARTITIONS, &prefix),
            prefix,
        }
    }

    fn belongs(&self, key: &[u8]) -> bool {
        key.len() > self.prefix.len() && key[1..].starts_with(&self.prefix)
    }

    fn is_end(&self, key: &[u8]) -> bool {
        key == self.end_key
    }
}

/// Where a partition's local copy stands in the changelog, and when that was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangelogPosition {
    /// The next changelog offset the local copy has not read.
    pub offset: i64,
    /// Wall-clock time the position was stored, Unix milliseconds: tombstones after an old
    /// position may have been compacted away since (`delete.retention.ms`).
    pub written_ms: i64,
}

pub(crate) fn encode_position(offset: i64) -> [u8; 16] {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64);
    let mut out = [0; 16];
    out[..8].copy_from_slice(&offset.to_be_bytes());
    out[8..].copy_from_slice(&now_ms.to_be_bytes());
    out
}

impl Store {
    /// Where the local copy of `partition` stands in the changelog, if it ever read or wrote
    /// it (and has not written without it since).
    pub fn changelog_position(
        &self,
        partition: &PartitionKey,
    ) -> Result<Option<ChangelogPosition>, StateError> {
        let Some(bytes) = self.db.get_cf(self.cf(CF_META), position_key(partition))? else {
            return Ok(None);
        };
        let corrupt = || StateError::Corrupt {
            column_family: CF_META,
            detail: format!("changelog position of {partition}"),
        };
        let bytes: [u8; 16] = bytes.as_slice().try_into().map_err(|_| corrupt())?;
        let half = |range: std::ops::Range<usize>| {
            bytes[range]
                .try_into()
                .map(i64::from_be_bytes)
                .map_err(|_| corrupt())
        };
        Ok(Some(ChangelogPosition {
            offset: half(0..8)?,
            written_ms: half(8..16)?,
        }))
    }

    /// The epoch of the local copy of `partition`: the one it writes with since it took the
    /// partition, or after a restore the highest epoch of an end marker it applied. `None`
    /// when it has none (restored from records without epochs, or cleared).
    pub fn changelog_epoch(&self, partition: &PartitionKey) -> Result<Option<u64>, StateError> {
        let Some(bytes) = self.db.get_cf(self.cf(CF_META), epoch_key(partition))? else {
            return Ok(None);
        };
        let bytes: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StateError::Corrupt {
                column_family: CF_META,
                detail: format!("changelog epoch of {partition}"),
            })?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// The epoch to take `partition` with: above the local copy's and above every epoch a
    /// restore read (`seen`), so above every one the changelog holds for it; and at least the
    /// wall clock in milliseconds, so that a copy whose epoch is unknown (kept by an nsm
    /// before epochs, which read the changelog without them) still goes above the owners'
    /// before it.
    pub fn adoption_epoch(
        &self,
        partition: &PartitionKey,
        seen: Option<u64>,
    ) -> Result<u64, StateError> {
        let known = self.changelog_epoch(partition)?.max(seen);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as u64);
        Ok(known.map_or(0, |epoch| epoch.saturating_add(1)).max(now_ms))
    }

    /// Gives each partition of a write the epoch of its local copy.
    pub(crate) fn stamp_epochs(&self, prepared: &mut PreparedWrite) -> Result<(), StateError> {
        for part in &mut prepared.partitions {
            part.epoch = self.changelog_epoch(&part.partition)?.unwrap_or(0);
        }
        Ok(())
    }

    /// The input offset the stored copy of `partition` resumes from.
    pub fn stored_next_offset(&self, partition: &PartitionKey) -> Result<Option<i64>, StateError> {
        let Some(bytes) = self
            .db
            .get_cf(self.cf(CF_PARTITIONS), partition_prefix(partition))?
        else {
            return Ok(None);
        };
        decode_partition_meta(&bytes)
            .map(|meta| meta.next_offset)
            .ok_or_else(|| StateError::Corrupt {
                column_family: CF_PARTITIONS,
                detail: format!("partition {partition}"),
            })
    }

    /// Whether anything is stored for `partition`.
    pub fn has_partition_data(&self, partition: &PartitionKey) -> Result<bool, StateError> {
        let prefix = partition_prefix(partition);
        for (_, family) in FAMILIES {
            if let Some(first) = self.keys_under(family, &prefix).next() {
                first?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Deletes everything stored for `partition`, and its changelog position and epoch: before
    /// a restore from the start of the changelog.
    pub fn clear_partition(&self, partition: &PartitionKey) -> Result<(), StateError> {
        let prefix = partition_prefix(partition);
        let end = prefix_successor(&prefix);
        let mut batch = WriteBatch::default();
        for (_, family) in FAMILIES {
            batch.delete_range_cf(self.cf(family), prefix.as_slice(), end.as_slice());
        }
        batch.delete_cf(self.cf(CF_META), position_key(partition));
        batch.delete_cf(self.cf(CF_META), epoch_key(partition));
        batch.delete_cf(self.cf(CF_META), crate::frame_store::head_key_of(partition));
        batch.delete_cf(
            self.cf(CF_META),
            crate::frame_store::restoring_key(partition),
        );
        self.db.write_opt(batch, &self.write_options)?;
        Ok(())
    }

    /// Clears the partition before a restore of it whole from frames, marked as under way
    /// until a head is written for it: a restore cut short leaves rows of frames the line may
    /// not keep, which must never count as a local copy.
    pub fn start_whole_restore(&self, partition: &PartitionKey) -> Result<(), StateError> {
        self.clear_partition(partition)?;
        self.db.put_cf_opt(
            self.cf(CF_META),
            crate::frame_store::restoring_key(partition),
            [],
            &self.write_options,
        )?;
        Ok(())
    }

    /// Whether a restore of the partition whole was cut short (see
    /// [`Store::start_whole_restore`]).
    pub fn restore_was_cut_short(&self, partition: &PartitionKey) -> Result<bool, StateError> {
        Ok(self
            .db
            .get_pinned_cf(
                self.cf(CF_META),
                crate::frame_store::restoring_key(partition),
            )?
            .is_some())
    }

    /// The changelog records that make a partition's stored copy whole again after a
    /// restore, or on its first changelog, in one write ending with its end marker:
    /// - `tail`: keys of an unfinished write found after the last end marker, reverted to the
    ///   stored values;
    /// - `seed`: everything stored (the changelog is empty but the store is not);
    /// - the partition's metric definitions: data of a metric that changed or left the config
    ///   is deleted (and named in the result), and every metric's fingerprint is stored.
    ///
    /// The write's records carry `epoch`, the new owner's (see [`Store::adoption_epoch`]),
    /// which the local copy keeps once the write is committed.
    pub fn prepare_adoption(
        &self,
        partition: &PartitionKey,
        tail: &[Vec<u8>],
        seed: bool,
        epoch: u64,
    ) -> Result<(PreparedWrite, Vec<crate::DiscardedMetric>), StateError> {
        let prefix = partition_prefix(partition);
        let mut recorder = Recorder::new(self, true, 0);
        if seed {
            for (_, family) in FAMILIES {
                // The partition's meta record is the end marker, sent last.
                if family != CF_PARTITIONS {
                    recorder.copy_stored(family, &prefix);
                }
            }
        }
        for key in tail {
            let Some(family) = key.first().copied().and_then(family_of) else {
                continue;
            };
            let key = stored_key(family, &key[1..])?;
            let stored = self.db.get_cf(self.cf(family), &key)?;
            recorder.record_only(family, &key, stored.as_deref());
        }
        let discarded = self.reconcile_partition(&prefix, &mut recorder)?;
        let meta = self.stored_meta(partition)?;
        recorder.end_partition(partition, &meta);
        let mut prepared = recorder.finish();
        for part in &mut prepared.partitions {
            part.epoch = epoch;
        }
        Ok((prepared, discarded))
    }

    /// Applies restored records of one partition to the store, in order; returns how many
    /// stale ones it left out. A stale record (see the module doc) only sets a key that has
    /// no value, in the store or earlier in `records`.
    fn apply_records(&self, records: &[Restored]) -> Result<u64, StateError> {
        let mut batch = WriteBatch::default();
        // The keys written before, only needed (and kept) when a stale record is among them.
        let any_stale = records.iter().any(|restored| restored.stale);
        let mut written: HashSet<&[u8]> = HashSet::new();
        let mut left_out = 0;
        for Restored { record, stale } in records {
            let family = record
                .key
                .first()
                .copied()
                .and_then(family_of)
                .ok_or_else(|| StateError::Corrupt {
                    column_family: "changelog",
                    detail: format!("a record key starting with byte {:?}", record.key.first()),
                })?;
            let key = stored_key(family, &record.key[1..])?;
            let key = key.as_ref();
            if *stale {
                let fills = record.value.is_some()
                    && !written.contains(record.key.as_slice())
                    && self.db.get_pinned_cf(self.cf(family), key)?.is_none();
                if !fills {
                    left_out += 1;
                    continue;
                }
            }
            if any_stale {
                written.insert(&record.key);
            }
            match &record.value {
                Some(value) => batch.put_cf(self.cf(family), key, value),
                None => batch.delete_cf(self.cf(family), key),
            }
        }
        self.db.write_opt(batch, &self.write_options)?;
        Ok(left_out)
    }

    /// Stores where the local copy of `partition` stands in the changelog, and the highest
    /// epoch of an end marker it applied (none: records without epochs).
    pub(crate) fn set_changelog_position(
        &self,
        partition: &PartitionKey,
        position: i64,
        epoch: Option<u64>,
    ) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META),
            position_key(partition),
            encode_position(position),
        );
        match epoch {
            Some(epoch) => {
                batch.put_cf(self.cf(CF_META), epoch_key(partition), epoch.to_be_bytes())
            }
            None => batch.delete_cf(self.cf(CF_META), epoch_key(partition)),
        }
        self.db.write_opt(batch, &self.write_options)?;
        Ok(())
    }
}

/// How much of an unfinished tail a restore holds in memory before it writes it out; past
/// this, a tail that turns out unfinished needs a second pass from the start.
const PENDING_LIMIT_BYTES: usize = 64 * 1024 * 1024;
/// Records written to the store per batch while restoring.
const APPLY_CHUNK: usize = 10_000;

/// A record read by a restore, and whether it is stale: its epoch is below the highest read
/// before it (see the module doc).
struct Restored {
    record: ChangeRecord,
    stale: bool,
}

/// Rebuilds one partition from its changelog records, read in offset order from some start.
/// Records up to the last end marker are applied; those after it (an unfinished write) are
/// not, and come back as the tail to revert. Records and end markers of an owner that had
/// lost the partition when they landed are fenced off by their epochs (see the module doc).
pub struct PartitionRestore<'s> {
    store: &'s Store,
    partition: PartitionKey,
    keys: PartitionRecordKeys,
    start: i64,
    /// Records since the last end marker, not yet written.
    pending: Vec<Restored>,
    pending_bytes: usize,
    /// Records since the last end marker were written out (the tail grew past the limit).
    spilled: bool,
    last_end: Option<i64>,
    /// The last offset read, of any partition.
    last_read: Option<i64>,
    /// Second pass: apply records up to this offset, keep only the keys of later ones.
    apply_through: Option<i64>,
    /// Bytes of an unfinished tail held back before it is written out.
    pending_limit: usize,
    tail_keys: Vec<Vec<u8>>,
    applied: u64,
    /// The highest epoch read of the partition (the local copy's at the start): a record
    /// below it is stale.
    epoch_read: Option<u64>,
    /// The highest epoch of an end marker applied (the local copy's at the start): an end
    /// marker below it is stale.
    epoch_finished: Option<u64>,
    /// Stale records left out and stale end markers ignored.
    fenced: u64,
}

/// What a restore found.
#[derive(Debug)]
pub enum RestoreOutcome {
    /// Restored; `tail` holds the keys of an unfinished write to revert with
    /// [`Store::prepare_adoption`]; `epoch` is the highest epoch read, for
    /// [`Store::adoption_epoch`]; `fenced` counts the stale records and end markers left out.
    Restored {
        tail: Vec<Vec<u8>>,
        records: u64,
        epoch: Option<u64>,
        fenced: u64,
    },
    /// An unfinished tail was too large to hold back: clear the partition and restore again
    /// from the start of the changelog with [`PartitionRestore::through`] this offset.
    RestartThrough(Option<i64>),
}

impl<'s> PartitionRestore<'s> {
    /// A restore of `partition` reading the changelog from offset `start`, on top of what the
    /// store holds of it (cleared before a restore from the start of the changelog).
    pub fn new(store: &'s Store, partition: &PartitionKey, start: i64) -> Result<Self, StateError> {
        let epoch = store.changelog_epoch(partition)?;
        Ok(PartitionRestore {
            store,
            partition: partition.clone(),
            keys: PartitionRecordKeys::new(partition),
            start,
            pending: Vec::new(),
            pending_bytes: 0,
            spilled: false,
            last_end: None,
            last_read: None,
            apply_through: None,
            pending_limit: PENDING_LIMIT_BYTES,
            tail_keys: Vec::new(),
            applied: 0,
            epoch_read: epoch,
            epoch_finished: epoch,
            fenced: 0,
        })
    }

    /// The second pass of a restore whose tail was too large: apply only records up to
    /// `last_end` (none when `None`).
    pub fn through(mut self, last_end: Option<i64>) -> Self {
        self.apply_through = Some(last_end.unwrap_or(-1));
        self
    }

    /// Holds back at most `bytes` of records after an end marker (64 MiB by default) before
    /// writing them out; a tail larger than that costs a second pass.
    pub fn hold_back_at_most(mut self, bytes: usize) -> Self {
        self.pending_limit = bytes;
        self
    }

    /// The next record, in offset order, with its epoch (`None`: written without one).
    pub fn record(
        &mut self,
        offset: i64,
        key: &[u8],
        value: Option<&[u8]>,
        epoch: Option<u64>,
    ) -> Result<(), StateError> {
        self.last_read = Some(offset);
        if !self.keys.belongs(key) {
            return Ok(());
        }
        let is_end = self.keys.is_end(key);
        if is_end && older(epoch, self.epoch_finished) {
            // The end of a write of an owner that lost the partition to the one whose end
            // markers came before: it finishes nothing.
            self.fenced += 1;
            return Ok(());
        }
        let stale = older(epoch, self.epoch_read);
        self.epoch_read = self.epoch_read.max(epoch);
        let record = Restored {
            record: ChangeRecord {
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
            },
            stale,
        };
        if let Some(through) = self.apply_through {
            if offset <= through {
                if is_end {
                    self.epoch_finished = self.epoch_finished.max(epoch);
                }
                self.pending.push(record);
                if self.pending.len() >= APPLY_CHUNK {
                    self.write_pending()?;
                }
            } else {
                self.tail_keys.push(record.record.key);
            }
            return Ok(());
        }
        self.pending_bytes +=
            record.record.key.len() + record.record.value.as_ref().map_or(0, Vec::len);
        self.pending.push(record);
        if is_end {
            self.write_pending()?;
            self.spilled = false;
            self.last_end = Some(offset);
            self.epoch_finished = self.epoch_finished.max(epoch);
        } else if self.pending_bytes > self.pending_limit {
            self.write_pending()?;
            self.spilled = true;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> Result<(), StateError> {
        for chunk in self.pending.chunks(APPLY_CHUNK) {
            let left_out = self.store.apply_records(chunk)?;
            self.fenced += left_out;
            self.applied += chunk.len() as u64 - left_out;
        }
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Ends the restore: the store's position is set after the last end marker read, so a
    /// restart before the tail is reverted finds the same tail again.
    pub fn finish(mut self) -> Result<RestoreOutcome, StateError> {
        if let Some(through) = self.apply_through {
            self.write_pending()?;
            let position = if through >= self.start {
                through + 1
            } else {
                self.start
            };
            self.store
                .set_changelog_position(&self.partition, position, self.epoch_finished)?;
            return Ok(RestoreOutcome::Restored {
                tail: self.tail_keys,
                records: self.applied,
                epoch: self.epoch_read,
                fenced: self.fenced,
            });
        }
        if self.spilled {
            // Everything before the start was finished (the store read or wrote it).
            let through = self.last_end.unwrap_or(self.start - 1);
            return Ok(RestoreOutcome::RestartThrough(Some(through)));
        }
        // After the last record read when nothing of this partition is held back (the rest
        // belonged to other input topics' partitions of that number), else after the last end.
        let position = match (self.pending.is_empty(), self.last_read, self.last_end) {
            (true, Some(read), _) => read + 1,
            (false, _, Some(end)) => end + 1,
            _ => self.start,
        };
        self.store
            .set_changelog_position(&self.partition, position, self.epoch_finished)?;
        let tail = self
            .pending
            .drain(..)
            .map(|restored| restored.record.key)
            .collect();
        Ok(RestoreOutcome::Restored {
            tail,
            records: self.applied,
            epoch: self.epoch_read,
            fenced: self.fenced,
        })
    }
}

/// What a changelog partition holds of one input partition, read without applying anything:
/// for a store that holds the partition without a changelog position (written before the
/// changelog, or with it turned off), to tell which copy is newer.
pub struct ChangelogProbe {
    matcher: PartitionRecordKeys,
    /// The input offset of the last finished write found (`Some(None)`: one without offset).
    finished: Option<Option<i64>>,
    keys: std::collections::BTreeSet<Vec<u8>>,
    /// The highest epoch read, and the highest of an end marker taken (a stale end marker,
    /// below it, finishes nothing).
    epoch_read: Option<u64>,
    epoch_finished: Option<u64>,
}

impl ChangelogProbe {
    pub fn new(partition: &PartitionKey) -> Self {
        ChangelogProbe {
            matcher: PartitionRecordKeys::new(partition),
            finished: None,
            keys: std::collections::BTreeSet::new(),
            epoch_read: None,
            epoch_finished: None,
        }
    }

    /// The next record, in offset order, with its epoch (`None`: written without one).
    pub fn record(&mut self, key: &[u8], value: Option<&[u8]>, epoch: Option<u64>) {
        if !self.matcher.belongs(key) {
            return;
        }
        self.epoch_read = self.epoch_read.max(epoch);
        if self.matcher.is_end(key) {
            if older(epoch, self.epoch_finished) {
                return;
            }
            self.epoch_finished = self.epoch_finished.max(epoch);
            if let Some(meta) = value.and_then(decode_partition_meta) {
                self.finished = Some(meta.next_offset);
            }
        } else {
            self.keys.insert(key.to_vec());
        }
    }

    /// The input offset the changelog's last finished write of the partition resumes from;
    /// `None` when it holds no finished write of it.
    pub fn finished_offset(&self) -> Option<Option<i64>> {
        self.finished
    }

    /// The highest epoch read, for [`Store::adoption_epoch`].
    pub fn epoch(&self) -> Option<u64> {
        self.epoch_read
    }

    /// Every key of the partition the changelog holds (to overwrite when the store's copy wins).
    pub fn into_keys(self) -> Vec<Vec<u8>> {
        self.keys.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of a member entry keyed `key`.
    fn put(key: &str, value: &str) -> ChangeRecord {
        ChangeRecord {
            key: record_key(CF_ENTRIES, key.as_bytes()),
            value: Some(value.as_bytes().to_vec()),
        }
    }

    fn tombstone(key: &str) -> ChangeRecord {
        ChangeRecord {
            key: record_key(CF_ENTRIES, key.as_bytes()),
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
