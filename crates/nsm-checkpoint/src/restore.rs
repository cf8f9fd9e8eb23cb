//! Rebuilding a partition from the store or from the changelog: for each shard its latest
//! snapshot, then the deltas of the later checkpoints in order, then the newest meta.
//!
//! From the changelog, the streaming restore ([`LineRestore`]) into memory: only finished frames
//! count (end marker, every chunk, checksum), and only those on one line: the newest finished
//! frame by epoch then sequence, and the frames it names as parents back to the snapshots it
//! needs. A frame of a lower epoch is used only as an ancestor the newest line names, so a frame
//! a cut-off owner sent late, before or after the new owner's, never replaces anything.
//! Everything else the changelog holds of the partition is reported, for the next owner to
//! tombstone.

use std::collections::{BTreeMap, HashMap};

use crate::body::{Delta, Rows};
use crate::error::{Corruption, Missing, RestoreError};
use crate::frame::RecordKey;
use crate::ids::{CheckpointConfig, Epoch, FrameId, PartitionId, Sequence, ShardId};
use crate::line::{LineOutcome, LineRestore};
use crate::local::{decode_delta_blob, decode_snapshot_blob, PartitionHead};
use crate::ports::{ChangelogReader, HeadStore, HeadsOnly, PartitionWrite, Store, StoreKind};
use crate::sink::MemorySink;
use crate::wire::DecodeError;

/// The rows of one shard.
pub type ShardRows = HashMap<Vec<u8>, Vec<u8>>;

/// What a restore read, to see that it stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestoreStats {
    /// Records read from the changelog partition, of every partition sharing it.
    pub records_read: u64,
    /// Bytes of keys and values of this partition's records, or of its stored blobs.
    pub bytes_read: u64,
    /// Shard snapshots applied.
    pub snapshots_applied: u64,
    /// Checkpoints whose deltas were applied.
    pub deltas_applied: u64,
    /// Rows of the snapshots applied.
    pub snapshot_rows: u64,
    /// Changes of the deltas applied.
    pub delta_changes: u64,
    /// Frames of this partition not applied: unfinished, damaged, off the newest line, or
    /// obsolete and not yet tombstoned.
    pub frames_skipped: u64,
    /// Records this library did not write (another format's), skipped.
    pub foreign_records: u64,
    /// Finished frames newer than the one restored that could not be restored: a frame their
    /// line needs is missing. Zero unless records were lost or damaged.
    pub newer_frames_unusable: u64,
    /// Frames a streaming restore gave its sink, over every pass: the line's, and those it
    /// applied before the line was known (frames the line's snapshots replace since, or, before
    /// a second pass, frames off the line). The counts above are the line's alone.
    pub frames_applied: u64,
    /// Reads of the changelog: two when the line forked behind what was applied, or frames it
    /// needed were dropped past the hold limit.
    pub passes: u64,
}

/// A partition as a restore rebuilt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredPartition {
    pub partition: PartitionId,
    /// The checkpoint restored ([`FrameId::EMPTY`] when none was found).
    pub head: FrameId,
    /// The highest epoch seen of the partition; its next owner must take a higher one.
    pub highest_epoch: Epoch,
    pub meta: Vec<u8>,
    /// The rows of each shard, indexed by shard.
    pub shards: Vec<ShardRows>,
    pub stats: RestoreStats,
}

impl RestoredPartition {
    /// Every row, of every shard.
    pub fn rows(&self) -> impl Iterator<Item = (ShardId, &[u8], &[u8])> {
        self.shards.iter().enumerate().flat_map(|(index, rows)| {
            rows.iter()
                .map(move |(key, value)| (ShardId(index as u32), key.as_slice(), value.as_slice()))
        })
    }

    pub fn row_count(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }
}

/// Applies snapshots, then deltas in checkpoint order, to the shards.
struct Fold {
    shards: Vec<ShardRows>,
    snapshot_sequences: Vec<Sequence>,
    stats: RestoreStats,
}

impl Fold {
    fn new(snapshot_sequences: Vec<Sequence>) -> Self {
        Fold {
            shards: vec![HashMap::new(); snapshot_sequences.len()],
            snapshot_sequences,
            stats: RestoreStats::default(),
        }
    }

    fn snapshot(&mut self, shard: ShardId, rows: &Rows<'_>) -> Result<(), DecodeError> {
        let target = &mut self.shards[shard.index()];
        target.clear();
        target.reserve(
            usize::try_from(rows.count)
                .unwrap_or(0)
                .min(rows.bytes.len()),
        );
        rows.for_each(|key, value| {
            target.insert(key.to_vec(), value.to_vec());
        })?;
        self.stats.snapshots_applied += 1;
        self.stats.snapshot_rows += rows.count;
        Ok(())
    }

    /// The delta of checkpoint `sequence`, to the shards snapshotted before it.
    fn delta(&mut self, sequence: Sequence, delta: &Delta<'_>) -> Result<(), DecodeError> {
        if !delta.dropped_ranges.is_empty() {
            for (index, rows) in self.shards.iter_mut().enumerate() {
                if self.snapshot_sequences[index] < sequence {
                    rows.retain(|key, _| {
                        !delta.dropped_ranges.iter().any(|range| range.contains(key))
                    });
                }
            }
        }
        for group in &delta.groups {
            if self.snapshot_sequences[group.shard.index()] >= sequence {
                continue;
            }
            let rows = &mut self.shards[group.shard.index()];
            group.for_each(|key, value| match value {
                Some(value) => {
                    rows.insert(key.to_vec(), value.to_vec());
                }
                None => {
                    rows.remove(key);
                }
            })?;
        }
        self.stats.deltas_applied += 1;
        self.stats.delta_changes += delta.changes();
        Ok(())
    }
}

/// Where a partition stands as a store's head says: what a head-only resume gives, the rows
/// being the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumedHead {
    pub partition: PartitionId,
    /// The last checkpoint stored ([`FrameId::EMPTY`] when none).
    pub head: FrameId,
    /// The highest epoch the head has seen of the partition; its next owner must take a higher
    /// one.
    pub highest_epoch: Epoch,
    pub meta: Vec<u8>,
    /// The head whole, for a restore going on from it ([`LineRestore::resume`]).
    pub(crate) local: PartitionHead,
}

/// Where `partition` stands in a [`HeadStore`]: its head, without rows (empty when it holds
/// nothing).
pub fn restore_head<S: HeadStore>(
    config: &CheckpointConfig,
    store: &S,
    partition: &PartitionId,
) -> Result<ResumedHead, RestoreError<S::Error>> {
    load_head::<S, HeadsOnly>(config, store, partition).map(|(resumed, _)| resumed)
}

pub(crate) fn load_head<S, K: StoreKind<S>>(
    config: &CheckpointConfig,
    store: &S,
    partition: &PartitionId,
) -> Result<(ResumedHead, PartitionHead), RestoreError<K::Error>> {
    let bytes = K::load_head(store, partition).map_err(|source| RestoreError::Read {
        partition: partition.clone(),
        source,
    })?;
    let head = match bytes {
        None => PartitionHead::empty(config.shards()),
        Some(bytes) => PartitionHead::decode(&bytes).map_err(|source| RestoreError::Corrupt {
            partition: partition.clone(),
            what: Corruption::Head,
            source,
        })?,
    };
    if head.shards != config.shards() {
        return Err(RestoreError::ShardCountChanged {
            partition: partition.clone(),
            stored: head.shards,
            configured: config.shards(),
        });
    }
    let resumed = ResumedHead {
        partition: partition.clone(),
        head: head.head,
        highest_epoch: head.highest_epoch(),
        meta: head.meta.clone(),
        local: head.clone(),
    };
    Ok((resumed, head))
}

/// Restores `partition` from what `store` holds: empty when it holds nothing.
pub fn restore_from_store<S: Store>(
    config: &CheckpointConfig,
    store: &S,
    partition: &PartitionId,
) -> Result<RestoredPartition, RestoreError<S::Error>> {
    restore_with_head_from_store(config, store, partition).map(|(restored, _)| restored)
}

pub(crate) fn restore_with_head_from_store<S: Store>(
    config: &CheckpointConfig,
    store: &S,
    partition: &PartitionId,
) -> Result<(RestoredPartition, PartitionHead), RestoreError<S::Error>> {
    let corrupt = |what: Corruption| {
        move |source: DecodeError| RestoreError::Corrupt {
            partition: partition.clone(),
            what,
            source,
        }
    };
    let incomplete = |missing: Missing| RestoreError::Incomplete {
        partition: partition.clone(),
        missing,
    };
    let stored = store.load(partition).map_err(|source| RestoreError::Read {
        partition: partition.clone(),
        source,
    })?;
    let Some(stored) = stored else {
        let head = PartitionHead::empty(config.shards());
        return Ok((empty_restore(partition, &head), head));
    };
    let head = PartitionHead::decode(&stored.head).map_err(corrupt(Corruption::Head))?;
    if head.shards != config.shards() {
        return Err(RestoreError::ShardCountChanged {
            partition: partition.clone(),
            stored: head.shards,
            configured: config.shards(),
        });
    }
    let mut fold = Fold::new(head.snapshot_sequences.clone());
    fold.stats.bytes_read = stored.head.len() as u64;
    let snapshots: HashMap<ShardId, &Vec<u8>> = stored
        .snapshots
        .iter()
        .map(|(shard, blob)| (*shard, blob))
        .collect();
    for (index, sequence) in head.snapshot_sequences.iter().enumerate() {
        let shard = ShardId(index as u32);
        if *sequence == Sequence::EMPTY {
            continue;
        }
        let blob = snapshots.get(&shard).ok_or_else(|| {
            incomplete(Missing::Snapshot {
                shard,
                sequence: *sequence,
            })
        })?;
        let what = Corruption::Snapshot(shard);
        let (taken_at, mut reader) = decode_snapshot_blob(blob).map_err(corrupt(what))?;
        if taken_at != *sequence {
            return Err(incomplete(Missing::Snapshot {
                shard,
                sequence: *sequence,
            }));
        }
        let rows = Rows::read(&mut reader).map_err(corrupt(what))?;
        reader.finish().map_err(corrupt(what))?;
        fold.snapshot(shard, &rows).map_err(corrupt(what))?;
        fold.stats.bytes_read += blob.len() as u64;
    }
    let deltas: BTreeMap<Sequence, &Vec<u8>> = stored
        .deltas
        .iter()
        .map(|(sequence, blob)| (*sequence, blob))
        .collect();
    let oldest = head.oldest_snapshot();
    for sequence in (oldest.0 + 1..=head.head.sequence.0).map(Sequence) {
        let blob = deltas
            .get(&sequence)
            .ok_or_else(|| incomplete(Missing::Delta(sequence)))?;
        let what = Corruption::Delta(sequence);
        let section = decode_delta_blob(blob).map_err(corrupt(what))?;
        let delta = Delta::read(section, config.shards()).map_err(corrupt(what))?;
        fold.delta(sequence, &delta).map_err(corrupt(what))?;
        fold.stats.bytes_read += blob.len() as u64;
    }
    let restored = RestoredPartition {
        partition: partition.clone(),
        head: head.head,
        highest_epoch: head.highest_epoch(),
        meta: head.meta.clone(),
        shards: fold.shards,
        stats: fold.stats,
    };
    Ok((restored, head))
}

fn empty_restore(partition: &PartitionId, head: &PartitionHead) -> RestoredPartition {
    RestoredPartition {
        partition: partition.clone(),
        head: FrameId::EMPTY,
        highest_epoch: Epoch(0),
        meta: Vec::new(),
        shards: vec![HashMap::new(); head.shards as usize],
        stats: RestoreStats::default(),
    }
}

/// A restore from the changelog with what taking the partition over needs: the head to write
/// from, and the store write that installs the restored state.
pub(crate) struct ChangelogRestore {
    pub(crate) restored: RestoredPartition,
    pub(crate) head: PartitionHead,
    pub(crate) install: PartitionWrite,
}

/// Restores `partition` from its changelog partition, read from its first record, into memory:
/// the streaming restore ([`LineRestore`]) with every frame held as long as it takes, and a
/// second pass over the partition's records kept from the first when the line forks behind
/// what was applied.
pub fn restore_from_changelog<R: ChangelogReader>(
    config: &CheckpointConfig,
    reader: &mut R,
    partition: &PartitionId,
) -> Result<RestoredPartition, RestoreError<R::Error>> {
    restore_with_install_from_changelog(config, reader, partition, false)
        .map(|restore| restore.restored)
}

/// The restore, and the store write installing it: with the snapshot and delta blobs of the
/// line when `with_blobs` (a [`Store`]), the head alone otherwise.
pub(crate) fn restore_with_install_from_changelog<R: ChangelogReader>(
    config: &CheckpointConfig,
    reader: &mut R,
    partition: &PartitionId,
    with_blobs: bool,
) -> Result<ChangelogRestore, RestoreError<R::Error>> {
    let mut restore = LineRestore::new(config, partition, u64::MAX);
    if with_blobs {
        restore = restore.with_blobs();
    }
    let mut sink = MemorySink::new(config.shards());
    // The partition's records, for a second pass; the others were counted once.
    let mut own: Vec<(u64, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut offset = 0u64;
    while let Some(record) = reader.next_record().map_err(|source| RestoreError::Read {
        partition: partition.clone(),
        source,
    })? {
        restore
            .record(&mut sink, offset, &record.key, record.value.as_deref())
            .map_err(RestoreError::widen)?;
        if RecordKey::parse(&record.key)
            .ok()
            .flatten()
            .is_some_and(|key| key.partition_name == partition.name)
        {
            own.push((offset, record.key, record.value));
        }
        offset += 1;
    }
    let read = restore_read_counts(&restore);
    let mut outcome = restore.finish(&mut sink).map_err(RestoreError::widen)?;
    let restored = loop {
        match outcome {
            LineOutcome::Restored(restored) => break restored,
            LineOutcome::SecondPass(pass) => {
                let mut again =
                    LineRestore::second_pass(pass, &mut sink).map_err(RestoreError::widen)?;
                for (offset, key, value) in &own {
                    again
                        .record(&mut sink, *offset, key, value.as_deref())
                        .map_err(RestoreError::widen)?;
                }
                outcome = again.finish(&mut sink).map_err(RestoreError::widen)?;
            }
            // A read of the whole log resumes nothing.
            LineOutcome::Broken(broken) => {
                return Err(RestoreError::BrokenLine {
                    partition: partition.clone(),
                    newest: broken.newest.unwrap_or(FrameId::EMPTY),
                })
            }
        }
    };
    let mut stats = restored.stats;
    // The second pass replayed what the first read: the reader was read once.
    (stats.records_read, stats.bytes_read, stats.foreign_records) = read;
    let blobs = restored.blobs.unwrap_or_default();
    let install = PartitionWrite {
        partition: partition.clone(),
        replace: true,
        delete_deltas_through: None,
        head: restored.local.encode(),
        snapshots: blobs.snapshots,
        deltas: blobs.deltas,
    };
    Ok(ChangelogRestore {
        restored: RestoredPartition {
            partition: partition.clone(),
            head: restored.head,
            highest_epoch: restored.highest_epoch,
            meta: restored.meta,
            shards: sink.shards,
            stats,
        },
        head: restored.local,
        install,
    })
}

/// What the first pass read: records, bytes of the partition's, foreign records.
fn restore_read_counts(restore: &LineRestore) -> (u64, u64, u64) {
    let stats = restore.stats();
    (stats.records_read, stats.bytes_read, stats.foreign_records)
}
