//! Rebuilding a partition from the store or from the changelog: for each shard its latest
//! snapshot, then the deltas of the later checkpoints in order, then the newest meta.
//!
//! From the changelog, only finished frames count (end marker, every chunk, checksum), and only
//! those on one line: the newest finished frame by epoch then sequence, and the frames it names
//! as parents back to the snapshots it needs. A frame of a lower epoch is used only as an
//! ancestor the newest line names, so a frame a cut-off owner sent late, before or after the new
//! owner's, never replaces anything. Everything else the changelog holds of the partition is
//! reported, for the next owner to tombstone.

use std::collections::{BTreeMap, HashMap};

use crate::body::{Delta, Rows};
use crate::error::{Corruption, Missing, RestoreError};
use crate::frame::{
    check_frame, parse_frame, EndMarker, FrameHeader, RecordKey, RecordPart, RecordValue,
};
use crate::ids::{CheckpointConfig, Epoch, FrameId, PartitionId, Sequence, ShardId};
use crate::local::{
    decode_delta_blob, decode_snapshot_blob, encode_delta_blob, encode_snapshot_blob, LoggedFrame,
    PartitionHead,
};
use crate::ports::{ChangelogReader, HeadStore, HeadsOnly, PartitionWrite, Store, StoreKind};
use crate::wire::{put_bytes, put_varint, DecodeError};

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

/// The records of one frame seen in the changelog, the latest per key.
#[derive(Default)]
struct FrameParts {
    chunks: BTreeMap<u32, Vec<u8>>,
    end: Option<Vec<u8>>,
}

/// A finished frame: its bytes checked against its end marker, its header read.
struct FinishedFrame {
    bytes: Vec<u8>,
    header: FrameHeader,
    chunks: u32,
}

/// The frames of a line, newest first, and the sequence of each shard's snapshot on it.
struct Line {
    frames: Vec<FrameId>,
    snapshot_sequences: Vec<Sequence>,
}

/// A restore from the changelog with what taking the partition over needs: the head to write
/// from, and the store write that installs the restored state.
pub(crate) struct ChangelogRestore {
    pub(crate) restored: RestoredPartition,
    pub(crate) head: PartitionHead,
    pub(crate) install: PartitionWrite,
}

/// Restores `partition` from its changelog partition, read from its first record.
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
    let mut stats = RestoreStats::default();
    let mut highest_epoch = Epoch(0);
    let mut parts: BTreeMap<FrameId, FrameParts> = BTreeMap::new();
    while let Some(record) = reader.next_record().map_err(|source| RestoreError::Read {
        partition: partition.clone(),
        source,
    })? {
        stats.records_read += 1;
        let key = match RecordKey::parse(&record.key) {
            Ok(Some(key)) => key,
            Ok(None) | Err(_) => {
                stats.foreign_records += 1;
                continue;
            }
        };
        if key.partition_name != partition.name {
            continue;
        }
        stats.bytes_read += (record.key.len() + record.value.as_ref().map_or(0, Vec::len)) as u64;
        highest_epoch = highest_epoch.max(key.frame.epoch);
        let frame = parts.entry(key.frame).or_default();
        match (key.part, record.value) {
            (RecordPart::Chunk(index), Some(value)) => {
                frame.chunks.insert(index, value);
            }
            (RecordPart::Chunk(index), None) => {
                frame.chunks.remove(&index);
            }
            (RecordPart::End, value) => frame.end = value,
        }
    }

    let mut finished: BTreeMap<FrameId, FinishedFrame> = BTreeMap::new();
    let mut leftovers: Vec<LoggedFrame> = Vec::new();
    for (id, frame) in parts {
        let chunks_seen = frame
            .chunks
            .keys()
            .next_back()
            .map_or(0, |index| index.saturating_add(1));
        match finish_frame(partition, id, &frame) {
            Some(done) if done.header.shards != config.shards() => {
                return Err(RestoreError::ShardCountChanged {
                    partition: partition.clone(),
                    stored: done.header.shards,
                    configured: config.shards(),
                });
            }
            Some(done) => {
                finished.insert(id, done);
            }
            None if frame.end.is_some() || !frame.chunks.is_empty() => {
                stats.frames_skipped += 1;
                leftovers.push(LoggedFrame {
                    id,
                    chunks: chunks_seen,
                    snapshot_shards: Vec::new(),
                    retired: true,
                });
            }
            None => {}
        }
    }

    let newest = finished.keys().next_back().copied();
    let line = finished.keys().rev().enumerate().find_map(|(newer, head)| {
        stats.newer_frames_unusable = newer as u64;
        follow_line(config, &finished, *head)
    });
    let line = match (line, newest) {
        (Some(line), _) => line,
        (None, None) => Line {
            frames: Vec::new(),
            snapshot_sequences: vec![Sequence::EMPTY; config.shards() as usize],
        },
        (None, Some(newest)) => {
            return Err(RestoreError::BrokenLine {
                partition: partition.clone(),
                newest,
            })
        }
    };

    let mut head = PartitionHead::empty(config.shards());
    head.snapshot_sequences = line.snapshot_sequences.clone();
    let mut install = PartitionWrite {
        partition: partition.clone(),
        replace: true,
        delete_deltas_through: None,
        head: Vec::new(),
        snapshots: Vec::new(),
        deltas: Vec::new(),
    };
    let mut fold = Fold::new(line.snapshot_sequences.clone());
    let oldest = head.oldest_snapshot();
    for id in line.frames.iter().rev() {
        let Some(frame) = finished.get(id) else {
            continue;
        };
        let corrupt = |source: DecodeError| RestoreError::Corrupt {
            partition: partition.clone(),
            what: Corruption::Frame(*id),
            source,
        };
        let view = parse_frame(&frame.bytes).map_err(corrupt)?;
        for (shard, rows) in &view.snapshots {
            if line.snapshot_sequences[shard.index()] == id.sequence {
                fold.snapshot(*shard, rows).map_err(corrupt)?;
                let mut section = Vec::with_capacity(rows.bytes.len() + 20);
                put_varint(&mut section, rows.count);
                put_bytes(&mut section, rows.bytes);
                head.snapshot_bytes[shard.index()] = section.len() as u64;
                if with_blobs {
                    install
                        .snapshots
                        .push((*shard, encode_snapshot_blob(id.sequence, &section)));
                }
            }
        }
        if id.sequence > oldest {
            let delta = Delta::read(view.delta, config.shards()).map_err(corrupt)?;
            fold.delta(id.sequence, &delta).map_err(corrupt)?;
            if with_blobs {
                install
                    .deltas
                    .push((id.sequence, encode_delta_blob(view.delta)));
            }
        }
        head.head = *id;
        head.meta = view.meta.to_vec();
        head.logged_frames.push(LoggedFrame {
            id: *id,
            chunks: frame.chunks,
            snapshot_shards: frame.header.snapshot_shards.clone(),
            retired: false,
        });
    }
    for (id, frame) in &finished {
        if !line.frames.contains(id) {
            stats.frames_skipped += 1;
            leftovers.push(LoggedFrame {
                id: *id,
                chunks: frame.chunks,
                snapshot_shards: Vec::new(),
                retired: true,
            });
        }
    }
    head.logged_frames.extend(leftovers);
    install.head = head.encode();

    let fold_stats = fold.stats;
    stats.snapshots_applied = fold_stats.snapshots_applied;
    stats.deltas_applied = fold_stats.deltas_applied;
    stats.snapshot_rows = fold_stats.snapshot_rows;
    stats.delta_changes = fold_stats.delta_changes;
    let restored = RestoredPartition {
        partition: partition.clone(),
        head: head.head,
        highest_epoch,
        meta: head.meta.clone(),
        shards: fold.shards,
        stats,
    };
    Ok(ChangelogRestore {
        restored,
        head,
        install,
    })
}

/// The frame these parts make, if they make a finished frame of `partition` under `id`: an end
/// marker, every chunk it counts, the checksum right, a header that names the same frame.
fn finish_frame(partition: &PartitionId, id: FrameId, parts: &FrameParts) -> Option<FinishedFrame> {
    let end: EndMarker = match RecordValue::parse(parts.end.as_deref()?) {
        Ok(RecordValue::End(end)) => end,
        _ => return None,
    };
    if usize::try_from(end.frame_len).ok()? > parts.chunks.values().map(Vec::len).sum::<usize>() {
        return None;
    }
    let mut bytes = Vec::with_capacity(end.frame_len as usize);
    for index in 0..end.chunks {
        match RecordValue::parse(parts.chunks.get(&index)?) {
            Ok(RecordValue::Chunk(chunk)) => bytes.extend_from_slice(chunk),
            _ => return None,
        }
    }
    check_frame(&bytes, &end).ok()?;
    let header = parse_frame(&bytes).ok()?.header;
    let names_itself = header.id == id
        && header.partition_name == partition.name
        && header.id.sequence > Sequence::EMPTY;
    if !names_itself {
        return None;
    }
    Some(FinishedFrame {
        bytes,
        header,
        chunks: end.chunks,
    })
}

/// The line ending at `head`: from it back through the parents each frame names, until every
/// shard has its latest snapshot or the first checkpoint is reached (shards never snapshotted
/// start empty). `None` when a frame it needs is missing.
fn follow_line(
    config: &CheckpointConfig,
    finished: &BTreeMap<FrameId, FinishedFrame>,
    head: FrameId,
) -> Option<Line> {
    let mut snapshot_sequences: Vec<Option<Sequence>> = vec![None; config.shards() as usize];
    let mut uncovered = snapshot_sequences.len();
    let mut frames = Vec::new();
    let mut id = head;
    loop {
        let frame = finished.get(&id)?;
        frames.push(id);
        for shard in &frame.header.snapshot_shards {
            let latest = &mut snapshot_sequences[shard.index()];
            if latest.is_none() {
                *latest = Some(id.sequence);
                uncovered -= 1;
            }
        }
        if uncovered == 0 || id.sequence == Sequence(1) {
            break;
        }
        id = frame.header.parent();
    }
    Some(Line {
        frames,
        snapshot_sequences: snapshot_sequences
            .into_iter()
            .map(|sequence| sequence.unwrap_or(Sequence::EMPTY))
            .collect(),
    })
}
