//! The store's side of the keyed changelog that nsm wrote before frames (state format 7 and
//! before): a compacted Kafka topic of the latest value of every stored key, from which an
//! instance of today restores a partition once, then sends it again as frames (see
//! [`crate::frames`]). Also where a local copy stands in the changelog, and its epoch.
//! The writer of such records survives only to make them in tests (`keyed`, behind the
//! `testing` feature).
//!
//! A record's key is one byte naming the column family and the store key; its value is the
//! stored value, or none (a tombstone) for a deleted key. Range deletes were expanded into a
//! tombstone per stored key, so compaction alone kept the topic bounded by the live state.
//!
//! Each partition's records of one write end with its **end marker**, the partition's meta
//! record (offsets and watermark), sent only once the others are acknowledged. Records after
//! the last end marker of a partition are the *tail* of a write that did not finish: a
//! restore never applies them.
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

use crate::codec::{current_member_key, decode_partition_meta, partition_prefix, prefix_successor};
use crate::{
    Recording, StateError, Store, CF_ENTRIES, CF_FINGERPRINTS, CF_GAPS, CF_META, CF_PARTITIONS,
    CF_SEGMENTS, CF_WINDOWS,
};

/// The column families a changelog carries, with the byte that names each in record keys and
/// frame rows: member entries in format 8's layout (ending in their digest) under `d`.
pub(crate) const FAMILIES: [(u8, &str); 6] = [
    (b'p', CF_PARTITIONS),
    (b'w', CF_WINDOWS),
    (b'd', CF_ENTRIES),
    (b's', CF_SEGMENTS),
    (b'g', CF_GAPS),
    (b'f', CF_FINGERPRINTS),
];

/// The byte of member entries in an older nsm's layouts: its keyed records carry format 6's
/// keys (`<window key> <entry>`), its frames format 7's (the shard between place and entry).
/// Both are rewritten into format 8's as they are read.
pub(crate) const OLDER_MEMBER_BYTE: u8 = b'm';

pub(crate) fn family_byte(family: &'static str) -> u8 {
    FAMILIES
        .iter()
        .find(|(_, name)| *name == family)
        .map(|(byte, _)| *byte)
        .unwrap_or_else(|| unreachable!("{family} is not carried by the changelog and its frames"))
}

/// The family a record key's or frame row's first byte names, in any layout.
pub(crate) fn family_of(byte: u8) -> Option<&'static str> {
    if byte == OLDER_MEMBER_BYTE {
        return Some(CF_ENTRIES);
    }
    FAMILIES
        .iter()
        .find(|(found, _)| *found == byte)
        .map(|(_, name)| *name)
}

/// A record key of a stored key, or a bound of a range of record keys: its family's byte,
/// then the key or bound as stored.
pub(crate) fn record_bound(family: &'static str, bound: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bound.len() + 1);
    out.push(family_byte(family));
    out.extend_from_slice(bound);
    out
}

/// The family and stored key of a keyed record's key: a member entry's, under
/// [`OLDER_MEMBER_BYTE`], is in format 6's layout.
pub(crate) fn stored_key(record_key: &[u8]) -> Result<(&'static str, Cow<'_, [u8]>), StateError> {
    let corrupt = |detail: String| StateError::Corrupt {
        column_family: "changelog",
        detail,
    };
    let (&byte, key) = record_key
        .split_first()
        .ok_or_else(|| corrupt("an empty record key".into()))?;
    let family = family_of(byte)
        .ok_or_else(|| corrupt(format!("a record key starting with byte {byte}")))?;
    if byte != OLDER_MEMBER_BYTE {
        return Ok((family, Cow::Borrowed(key)));
    }
    let key = current_member_key(key).ok_or_else(|| {
        corrupt(format!(
            "a member record key of {} bytes with no window",
            key.len()
        ))
    })?;
    Ok((family, Cow::Owned(key)))
}

/// One changelog record: a store key and its value, or `None` for a deleted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A write made ready without the changelog (`state.changelog = false`): the local batch, and
/// the partitions it writes, whose changelog positions and heads [`Store::commit`] drops (the
/// changelog no longer follows them).
pub struct PreparedWrite {
    pub(crate) batch: WriteBatch,
    pub(crate) partitions: Vec<PartitionKey>,
}

/// Builds the local batch of a write kept without the changelog.
pub(crate) struct BatchRecorder<'s> {
    store: &'s Store,
    batch: WriteBatch,
    partitions: Vec<PartitionKey>,
}

impl<'s> BatchRecorder<'s> {
    /// `capacity_bytes`: about the size the batch will reach (0 if unknown).
    pub(crate) fn new(store: &'s Store, capacity_bytes: usize) -> Self {
        BatchRecorder {
            store,
            batch: WriteBatch::with_capacity_bytes(capacity_bytes),
            partitions: Vec::new(),
        }
    }

    pub(crate) fn finish(self) -> PreparedWrite {
        PreparedWrite {
            batch: self.batch,
            partitions: self.partitions,
        }
    }

    /// The batch alone, for a recorder that keeps what the changelog carries beside it.
    pub(crate) fn into_batch(self) -> WriteBatch {
        self.batch
    }
}

/// The local side of every recorder: the others forward each operation here, then record what
/// the changelog carries of it.
impl Recording for BatchRecorder<'_> {
    fn put(&mut self, family: &'static str, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.store.cf(family), key, value);
    }

    fn delete(&mut self, family: &'static str, key: &[u8]) {
        self.batch.delete_cf(self.store.cf(family), key);
    }

    fn delete_range(&mut self, family: &'static str, start: &[u8], end: &[u8]) {
        self.batch
            .delete_range_cf(self.store.cf(family), start, end);
    }

    fn end_partition(&mut self, partition: &PartitionKey, meta: &[u8]) {
        self.batch.put_cf(
            self.store.cf(CF_PARTITIONS),
            partition_prefix(partition),
            meta,
        );
        self.partitions.push(partition.clone());
    }
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
            end_key: record_bound(CF_PARTITIONS, &prefix),
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

    /// The write that takes a partition kept without the changelog (`state.changelog = false`):
    /// data of metrics that changed or left the config is deleted (and named in the result),
    /// and every metric's fingerprint is stored. With the changelog, a take writes
    /// [`Store::prepare_adoption_frames`] instead.
    pub fn prepare_adoption(
        &self,
        partition: &PartitionKey,
    ) -> Result<(PreparedWrite, Vec<crate::DiscardedMetric>), StateError> {
        let mut recorder = BatchRecorder::new(self, 0);
        let discarded = self.record_adoption(partition, &mut recorder)?;
        Ok((recorder.finish(), discarded))
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
            let (family, key) = stored_key(&record.key)?;
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
    /// Restored; `tail` holds the keys of an unfinished write (the keyed writer reverted
    /// them; a take now sends the partition as frames, a line the tail is not part of);
    /// `epoch` is the highest epoch read, for [`Store::adoption_epoch`]; `fenced` counts the
    /// stale records and end markers left out.
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
