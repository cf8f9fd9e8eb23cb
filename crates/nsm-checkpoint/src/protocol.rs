//! The checkpointer: the one place that orders writes between the changelog and the store.
//!
//! A commit sends every partition's frame, then the tombstones of frames made obsolete by
//! checkpoints already acknowledged, waits until the changelog acknowledges all of it, and only
//! then writes the store. So the changelog is never behind the store, and a tombstone never
//! removes a frame before the frame that replaces it is in the log. After any failure the
//! checkpointer writes nothing more: a retry would send a second frame under the keys of the
//! one that may be half in the log. The next owner (a restart takes a higher epoch) restores.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::marker::PhantomData;

use crate::body::{put_rows, rows_section_len, Checkpoint};
use crate::error::{CommitError, InvalidCheckpoint, OpenError, SeedError};
use crate::frame::{
    chunk_ranges, chunk_value, encode_frame, end_value, FrameHeader, RecordKey, RecordPart,
};
use crate::ids::{CheckpointConfig, Epoch, FrameId, PartitionId, Sequence, ShardId};
use crate::line::LineRestored;
use crate::local::{encode_delta_blob, encode_snapshot_blob, LoggedFrame, PartitionHead};
use crate::ports::{
    Acknowledged, Blobs, ChangelogReader, ChangelogWriter, HeadStore, HeadWrite, HeadsOnly,
    PartitionWrite, Store, StoreKind,
};
use crate::restore::{
    load_head, restore_with_head_from_store, restore_with_install_from_changelog, ChangelogRestore,
    RestoredPartition, ResumedHead,
};
use crate::seed::{RetiredFrames, SeedShard};

/// What one commit sent, to see that it stays a few records per partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitReport {
    /// The frame each partition's checkpoint became.
    pub frames: Vec<(PartitionId, FrameId)>,
    pub chunk_records: u64,
    pub end_markers: u64,
    /// Tombstones of obsolete frames (every chunk and the end marker of each).
    pub tombstones: u64,
    /// Bytes of the frames, before they were cut into chunks.
    pub frame_bytes: u64,
    /// Shard snapshots the frames hold, and their sections' bytes.
    pub snapshots: u64,
    pub snapshot_bytes: u64,
    /// Bytes of the frames' delta sections: what earns snapshot credit.
    pub delta_bytes: u64,
    /// Bytes of every key and value sent.
    pub bytes_sent: u64,
}

impl CommitReport {
    pub fn records(&self) -> u64 {
        self.chunk_records + self.end_markers + self.tombstones
    }
}

/// A partition this checkpointer writes: the epoch it took it with, and where it stands.
struct OpenPartition {
    epoch: Epoch,
    head: PartitionHead,
}

/// One partition's part of a commit, made ready before anything is sent.
struct PlannedWrite {
    partition: PartitionId,
    frame_id: FrameId,
    frame: Vec<u8>,
    snapshots: u64,
    snapshot_bytes: u64,
    delta_bytes: u64,
    tombstoned: Vec<LoggedFrame>,
    head: PartitionHead,
}

impl PlannedWrite {
    fn outgoing(&self) -> Outgoing<'_> {
        Outgoing {
            partition: &self.partition,
            id: self.frame_id,
            bytes: &self.frame,
        }
    }
}

/// A frame on its way to the changelog.
#[derive(Clone, Copy)]
struct Outgoing<'a> {
    partition: &'a PartitionId,
    id: FrameId,
    bytes: &'a [u8],
}

/// Commits checkpoints of the partitions it has open to the changelog, then the store: a
/// [`Store`] keeping the library's whole layout (kind [`Blobs`], [`Checkpointer::new`]), or a
/// [`HeadStore`] keeping only its heads beside the caller's rows (kind [`HeadsOnly`],
/// [`Checkpointer::with_head_store`]). The protocol is the same for both.
pub struct Checkpointer<W, S, K = Blobs> {
    config: CheckpointConfig,
    writer: W,
    store: S,
    open: HashMap<PartitionId, OpenPartition>,
    stopped: bool,
    kind: PhantomData<K>,
}

/// The error of the store a checkpointer of kind `K` writes.
pub type StoreError<S, K> = <K as StoreKind<S>>::Error;

/// Why a resume failed: reading the store's head, or opening from it.
type ResumeError<S, K> = OpenError<StoreError<S, K>, StoreError<S, K>>;

/// Why a seed failed, `E` being the error of the caller's read of its rows.
type SeedFailure<W, S, K, E> = SeedError<<W as ChangelogWriter>::Error, StoreError<S, K>, E>;

impl<W: ChangelogWriter, S: Store> Checkpointer<W, S, Blobs> {
    /// A checkpointer writing a [`Store`], which keeps the library's whole layout.
    pub fn new(config: CheckpointConfig, writer: W, store: S) -> Self {
        Checkpointer {
            config,
            writer,
            store,
            open: HashMap::new(),
            stopped: false,
            kind: PhantomData,
        }
    }

    /// Opens `partition` as its store holds it (empty when it holds nothing), to write it with
    /// `epoch`, which must be above every epoch the store has seen of it. The changelog may hold
    /// a newer finished frame the store lacks: the frames written from here follow the store's,
    /// and a restore from the changelog follows this higher epoch's line, never that frame.
    pub fn resume_from_store(
        &mut self,
        partition: &PartitionId,
        epoch: Epoch,
    ) -> Result<RestoredPartition, OpenError<S::Error, S::Error>> {
        self.refuse_open(partition)?;
        let (restored, head) = restore_with_head_from_store(&self.config, &self.store, partition)
            .map_err(OpenError::Restore)?;
        let seen = restored.highest_epoch;
        if epoch <= seen {
            return Err(OpenError::epoch_not_above(partition, epoch, seen));
        }
        self.open
            .insert(partition.clone(), OpenPartition { epoch, head });
        Ok(restored)
    }

    /// Opens `partition` as its changelog holds it (read by `reader` from its first record), to
    /// write it with `epoch`, which must be above every epoch the changelog holds of it, and
    /// replaces the store's copy with it in one write. The frames the restore did not use are
    /// tombstoned by the next commit.
    pub fn take_over_from_changelog<R: ChangelogReader>(
        &mut self,
        partition: &PartitionId,
        epoch: Epoch,
        reader: &mut R,
    ) -> Result<RestoredPartition, OpenError<R::Error, S::Error>> {
        let restore = self.restore_for_take_over(partition, epoch, reader)?;
        self.install(partition, epoch, restore)
    }
}

impl<W: ChangelogWriter, S: HeadStore> Checkpointer<W, S, HeadsOnly> {
    /// A checkpointer writing a [`HeadStore`], which keeps only the library's heads: the rows
    /// are the caller's, written in the same atomic write as each commit's heads.
    pub fn with_head_store(config: CheckpointConfig, writer: W, store: S) -> Self {
        Checkpointer {
            config,
            writer,
            store,
            open: HashMap::new(),
            stopped: false,
            kind: PhantomData,
        }
    }

    /// Opens the partition a streaming restore ([`LineRestore`](crate::LineRestore)) finished
    /// into the caller's sink, to write it with `epoch`, which must be above every epoch the
    /// restore saw of it. `stage` gets the store to stage what the sink has not written yet; the
    /// head is then written with it in one write, which replaces the caller's rows of the
    /// partition unless the restore went on from the local head. The frames the restore did not
    /// use are tombstoned by the next commit. The changelog position is the caller's to keep
    /// ([`LineRestored::next_offset`]).
    pub fn take_over_restored(
        &mut self,
        epoch: Epoch,
        restored: LineRestored,
        stage: impl FnOnce(&mut S) -> Result<(), S::Error>,
    ) -> Result<ResumedHead, OpenError<Infallible, S::Error>> {
        let partition = restored.partition.clone();
        self.refuse_open(&partition)?;
        if epoch <= restored.highest_epoch {
            return Err(OpenError::epoch_not_above(
                &partition,
                epoch,
                restored.highest_epoch,
            ));
        }
        let install = |source| OpenError::Install {
            partition: partition.clone(),
            source,
        };
        stage(&mut self.store).map_err(install)?;
        let head = restored.local;
        let write = HeadWrite {
            partition: partition.clone(),
            replace: !restored.resumed,
            head: head.encode(),
        };
        self.store
            .commit(std::slice::from_ref(&write), &Acknowledged::default())
            .map_err(install)?;
        let resumed = ResumedHead {
            partition: partition.clone(),
            head: head.head,
            highest_epoch: restored.highest_epoch,
            meta: head.meta.clone(),
            local: head.clone(),
        };
        self.open.insert(partition, OpenPartition { epoch, head });
        Ok(resumed)
    }
}

impl<W: ChangelogWriter, S, K: StoreKind<S>> Checkpointer<W, S, K> {
    pub fn config(&self) -> &CheckpointConfig {
        &self.config
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn writer(&self) -> &W {
        &self.writer
    }

    pub fn into_parts(self) -> (W, S) {
        (self.writer, self.store)
    }

    /// Whether a failed commit stopped this checkpointer.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Opens `partition` from the head its store holds (none: empty), to write it with
    /// `epoch`, which must be above every epoch the head has seen of it. Reads only the head:
    /// the rows are where the caller keeps them (for a [`Store`],
    /// [`Checkpointer::resume_from_store`] restores them too). The changelog may hold a newer
    /// finished frame the store lacks: the frames written from here follow the store's, and a
    /// restore from the changelog follows this higher epoch's line, never that frame.
    pub fn resume(
        &mut self,
        partition: &PartitionId,
        epoch: Epoch,
    ) -> Result<ResumedHead, ResumeError<S, K>> {
        self.refuse_open(partition)?;
        let (resumed, head) =
            load_head::<S, K>(&self.config, &self.store, partition).map_err(OpenError::Restore)?;
        if epoch <= resumed.highest_epoch {
            return Err(OpenError::epoch_not_above(
                partition,
                epoch,
                resumed.highest_epoch,
            ));
        }
        self.open
            .insert(partition.clone(), OpenPartition { epoch, head });
        Ok(resumed)
    }

    fn restore_for_take_over<R: ChangelogReader>(
        &mut self,
        partition: &PartitionId,
        epoch: Epoch,
        reader: &mut R,
    ) -> Result<ChangelogRestore, OpenError<R::Error, StoreError<S, K>>> {
        self.refuse_open(partition)?;
        let restore =
            restore_with_install_from_changelog(&self.config, reader, partition, K::KEEPS_BLOBS)
                .map_err(OpenError::Restore)?;
        if epoch <= restore.restored.highest_epoch {
            return Err(OpenError::epoch_not_above(
                partition,
                epoch,
                restore.restored.highest_epoch,
            ));
        }
        Ok(restore)
    }

    /// Writes what a take-over restored to the store, and opens the partition.
    fn install<P>(
        &mut self,
        partition: &PartitionId,
        epoch: Epoch,
        restore: ChangelogRestore,
    ) -> Result<RestoredPartition, OpenError<P, StoreError<S, K>>> {
        K::commit(
            &mut self.store,
            std::slice::from_ref(&restore.install),
            &Acknowledged::default(),
        )
        .map_err(|source| OpenError::Install {
            partition: partition.clone(),
            source,
        })?;
        self.open.insert(
            partition.clone(),
            OpenPartition {
                epoch,
                head: restore.head,
            },
        );
        Ok(restore.restored)
    }

    fn refuse_open<P, E>(&self, partition: &PartitionId) -> Result<(), OpenError<P, E>> {
        if self.open.contains_key(partition) {
            return Err(OpenError::AlreadyOpen {
                partition: partition.clone(),
            });
        }
        Ok(())
    }

    /// Stops writing `partition` (it was given up); whether it was open.
    pub fn release(&mut self, partition: &PartitionId) -> bool {
        self.open.remove(partition).is_some()
    }

    /// The shards the next checkpoint of `partition` should snapshot, paced by bytes: each
    /// checkpoint earns credit equal to its delta section's bytes, and the shards due are the
    /// oldest snapshots, oldest first, while the credit covers the next one's last snapshot
    /// size (a shard never snapshotted is due at once). Several, or none; none when the
    /// partition is not open.
    pub fn snapshots_due(&self, partition: &PartitionId) -> Vec<ShardId> {
        self.open
            .get(partition)
            .map(|open| open.head.snapshots_due())
            .unwrap_or_default()
    }

    /// The last checkpoint committed of `partition`, if it is open.
    pub fn head(&self, partition: &PartitionId) -> Option<FrameId> {
        self.open.get(partition).map(|open| open.head.head)
    }

    /// Commits one checkpoint of each of some open partitions: their frames and the tombstones
    /// of obsolete frames to the changelog, acknowledged, then everything to the store in one
    /// write. On a changelog or store error nothing was stored, and this checkpointer stops.
    pub fn commit(
        &mut self,
        checkpoints: &[Checkpoint],
    ) -> Result<CommitReport, CommitError<W::Error, StoreError<S, K>>> {
        if self.stopped {
            return Err(CommitError::Stopped);
        }
        let (plans, store_writes) = self.plan(checkpoints)?;
        let result = self.send_then_store(&plans, &store_writes);
        match result {
            Ok(report) => {
                for plan in plans {
                    if let Some(open) = self.open.get_mut(&plan.partition) {
                        open.head = plan.head;
                    }
                }
                Ok(report)
            }
            Err(error) => {
                self.stopped = true;
                Err(error)
            }
        }
    }

    /// Each partition's frame, tombstones and next head, and the store writes of them all.
    fn plan(
        &self,
        checkpoints: &[Checkpoint],
    ) -> Result<(Vec<PlannedWrite>, Vec<PartitionWrite>), InvalidCheckpoint> {
        let mut seen = HashSet::new();
        let mut plans = Vec::with_capacity(checkpoints.len());
        let mut store_writes = Vec::with_capacity(checkpoints.len());
        for checkpoint in checkpoints {
            let partition = &checkpoint.partition;
            if !seen.insert(partition) {
                return Err(InvalidCheckpoint::DuplicatePartition {
                    partition: partition.clone(),
                });
            }
            let open = self
                .open
                .get(partition)
                .ok_or_else(|| InvalidCheckpoint::NotOpen {
                    partition: partition.clone(),
                })?;
            if let Some(shard) = checkpoint
                .highest_shard()
                .filter(|shard| *shard >= self.config.shards())
            {
                return Err(InvalidCheckpoint::ShardOutOfRange {
                    partition: partition.clone(),
                    shard,
                    shards: self.config.shards(),
                });
            }
            let (plan, store_write) = self.plan_partition(open, checkpoint);
            plans.push(plan);
            store_writes.push(store_write);
        }
        Ok((plans, store_writes))
    }

    fn plan_partition(
        &self,
        open: &OpenPartition,
        checkpoint: &Checkpoint,
    ) -> (PlannedWrite, PartitionWrite) {
        let previous = &open.head;
        let frame_id = FrameId {
            epoch: open.epoch,
            sequence: previous.head.sequence.next(),
        };
        let snapshot_shards = checkpoint.snapshot_shards();
        let header = FrameHeader {
            partition_name: checkpoint.partition.name.clone(),
            id: frame_id,
            parent_epoch: previous.head.epoch,
            shards: self.config.shards(),
            // A checkpoint is never a base frame: past a seed, its line is the seed's whole.
            base_frames: 0,
            snapshot_shards: snapshot_shards.clone(),
        };
        let delta = checkpoint.encode_delta();
        let frame = encode_frame(&header, checkpoint, &delta);
        let chunks = chunk_ranges(frame.len(), self.config.max_chunk_bytes()).len() as u32;

        let previous_oldest = previous.oldest_snapshot();
        let (tombstoned, kept): (Vec<LoggedFrame>, Vec<LoggedFrame>) = previous
            .logged_frames
            .iter()
            .cloned()
            .partition(|frame| previous.is_obsolete(frame, previous_oldest));
        let snapshot_sizes: Vec<(ShardId, u64)> = checkpoint
            .snapshots
            .iter()
            .map(|(shard, rows)| (*shard, rows_section_len(rows)))
            .collect();
        let mut head = PartitionHead {
            shards: previous.shards,
            head: frame_id,
            meta: checkpoint.meta.clone(),
            snapshot_sequences: previous.snapshot_sequences.clone(),
            snapshot_bytes: previous.snapshot_bytes.clone(),
            credit: previous.credit,
            logged_frames: kept,
        };
        head.book_checkpoint(frame_id.sequence, delta.len() as u64, &snapshot_sizes);
        head.logged_frames.push(LoggedFrame {
            id: frame_id,
            chunks,
            snapshot_shards,
            retired: false,
        });

        let oldest = head.oldest_snapshot();
        // Blobs only for a store that keeps them: a head store's caller has the rows already.
        let keeps_blobs = K::KEEPS_BLOBS;
        let store_write = PartitionWrite {
            partition: checkpoint.partition.clone(),
            replace: false,
            delete_deltas_through: (keeps_blobs && oldest > previous_oldest).then_some(oldest),
            head: head.encode(),
            snapshots: if keeps_blobs {
                checkpoint
                    .snapshots
                    .iter()
                    .map(|(shard, rows)| {
                        let mut section = Vec::with_capacity(rows.bytes.len() + 20);
                        put_rows(&mut section, rows);
                        (*shard, encode_snapshot_blob(frame_id.sequence, &section))
                    })
                    .collect()
            } else {
                Vec::new()
            },
            deltas: if keeps_blobs && frame_id.sequence > oldest {
                vec![(frame_id.sequence, encode_delta_blob(&delta))]
            } else {
                Vec::new()
            },
        };
        let plan = PlannedWrite {
            partition: checkpoint.partition.clone(),
            frame_id,
            frame,
            snapshots: snapshot_sizes.len() as u64,
            snapshot_bytes: snapshot_sizes.iter().map(|(_, bytes)| bytes).sum(),
            delta_bytes: delta.len() as u64,
            tombstoned,
            head,
        };
        (plan, store_write)
    }

    fn send_then_store(
        &mut self,
        plans: &[PlannedWrite],
        store_writes: &[PartitionWrite],
    ) -> Result<CommitReport, CommitError<W::Error, StoreError<S, K>>> {
        let changelog_failed = |source| CommitError::Changelog { source };
        let mut report = CommitReport::default();
        // The frames the stored head no longer needs go first: that head's line stands
        // whatever becomes of this write.
        for plan in plans {
            for frame in &plan.tombstoned {
                let parts = (0..frame.chunks)
                    .map(RecordPart::Chunk)
                    .chain([RecordPart::End]);
                for part in parts {
                    let key = RecordKey::encode(&plan.partition, frame.id, part);
                    self.writer
                        .send(plan.partition.changelog_partition, &key, None)
                        .map_err(changelog_failed)?;
                    report.tombstones += 1;
                    report.bytes_sent += key.len() as u64;
                }
            }
        }
        // Every chunk is acknowledged before any end marker is sent, so an end marker never
        // lands before a chunk of its frame (a producer's retry cannot put it there), and the
        // marker ends the partition's log alone, in a batch of its own: a broker that answers
        // ListOffsets with the last batch's first offset plus one (tansu 0.6) still gives the
        // position this write stores.
        for plan in plans {
            self.send_chunks(plan.outgoing(), &mut report)
                .map_err(changelog_failed)?;
            report.snapshots += plan.snapshots;
            report.snapshot_bytes += plan.snapshot_bytes;
            report.delta_bytes += plan.delta_bytes;
        }
        let mut acknowledged = self.writer.flush().map_err(changelog_failed)?;
        for plan in plans {
            self.send_end_marker(plan.outgoing(), &mut report)
                .map_err(changelog_failed)?;
        }
        acknowledged.and(self.writer.flush().map_err(changelog_failed)?);
        K::commit(&mut self.store, store_writes, &acknowledged)
            .map_err(|source| CommitError::Store { source })?;
        Ok(report)
    }

    /// Sends `frame` as its chunks, then its end marker, and counts them in `report`.
    fn send_frame(
        &mut self,
        frame: Outgoing<'_>,
        report: &mut CommitReport,
    ) -> Result<(), W::Error> {
        self.send_chunks(frame, report)?;
        self.send_end_marker(frame, report)
    }

    fn send_chunks(
        &mut self,
        frame: Outgoing<'_>,
        report: &mut CommitReport,
    ) -> Result<(), W::Error> {
        let ranges = chunk_ranges(frame.bytes.len(), self.config.max_chunk_bytes());
        for (index, range) in ranges.iter().enumerate() {
            let key = RecordKey::encode(frame.partition, frame.id, RecordPart::Chunk(index as u32));
            let value = chunk_value(&frame.bytes[range.clone()]);
            self.writer
                .send(frame.partition.changelog_partition, &key, Some(&value))?;
            report.chunk_records += 1;
            report.bytes_sent += (key.len() + value.len()) as u64;
        }
        Ok(())
    }

    fn send_end_marker(
        &mut self,
        frame: Outgoing<'_>,
        report: &mut CommitReport,
    ) -> Result<(), W::Error> {
        let chunks = chunk_ranges(frame.bytes.len(), self.config.max_chunk_bytes()).len() as u32;
        let key = RecordKey::encode(frame.partition, frame.id, RecordPart::End);
        let value = end_value(frame.bytes, chunks);
        self.writer
            .send(frame.partition.changelog_partition, &key, Some(&value))?;
        report.end_markers += 1;
        report.bytes_sent += (key.len() + value.len()) as u64;
        report.frame_bytes += frame.bytes.len() as u64;
        report.frames.push((frame.partition.clone(), frame.id));
        Ok(())
    }

    /// Opens `partition` by seeding it from the caller's copy, to write it with `epoch`, which
    /// must be above every epoch `retire` saw of it: a new line of base frames, frame `i + 1`
    /// snapshotting shard `i` as `rows_of_shard` reads it, each carrying `meta` (the copy's: the
    /// input offset it is as current as), then one flush, then the head. For a case the
    /// changelog cannot restore: a store kept without the changelog, a changelog lost or of the
    /// per-key format, a local copy newer than the changelog's line.
    ///
    /// Until its last base frame is in the log the seed is no line: a restore passes over it and
    /// takes the previous line or nothing, as if it had not been sent. Whole, it snapshots every
    /// shard, so it wins over everything of a lower epoch and builds on nothing. The frames of
    /// `retire` (those a read of the changelog found, those a local head knew) are tombstoned by
    /// the next commit, once the seed is acknowledged.
    ///
    /// One frame is built at a time and dropped once sent, so a seed holds one shard's rows, not
    /// the partition (but for a [`Store`], whose blobs are written in the one store write). The
    /// caller's rows stay as they are: a head store's write does not replace them.
    pub fn seed<E>(
        &mut self,
        partition: &PartitionId,
        meta: &[u8],
        epoch: Epoch,
        retire: RetiredFrames,
        mut rows_of_shard: impl FnMut(ShardId, &mut SeedShard<'_>) -> Result<(), E>,
    ) -> Result<CommitReport, SeedFailure<W, S, K, E>> {
        if self.stopped {
            return Err(SeedError::Stopped);
        }
        if self.open.contains_key(partition) {
            return Err(SeedError::AlreadyOpen {
                partition: partition.clone(),
            });
        }
        if epoch <= retire.highest_epoch() {
            return Err(SeedError::EpochNotAbove {
                partition: partition.clone(),
                requested: epoch.0,
                seen: retire.highest_epoch().0,
            });
        }
        let shards = self.config.shards();
        let mut head = PartitionHead::empty(shards);
        head.meta = meta.to_vec();
        let mut report = CommitReport::default();
        let mut store_write = PartitionWrite {
            partition: partition.clone(),
            // A blob store's copy of the partition is the seed's whole; a head store's rows are
            // the caller's, which the seed was read from, so they stay.
            replace: K::KEEPS_BLOBS,
            delete_deltas_through: None,
            head: Vec::new(),
            snapshots: Vec::new(),
            deltas: Vec::new(),
        };
        for index in 0..shards {
            let shard = ShardId(index);
            let frame_id = FrameId {
                epoch,
                sequence: Sequence(u64::from(index) + 1),
            };
            let mut checkpoint = Checkpoint::new(partition.clone(), meta);
            checkpoint.snapshot_shard(shard);
            let read = rows_of_shard(
                shard,
                &mut SeedShard {
                    checkpoint: &mut checkpoint,
                    shard,
                },
            );
            if let Err(source) = read {
                // Base frames already sent hold keys of this epoch that a retry would reuse.
                self.stopped |= index > 0;
                return Err(SeedError::Rows {
                    partition: partition.clone(),
                    shard: index,
                    source,
                });
            }
            let header = FrameHeader {
                partition_name: partition.name.clone(),
                id: frame_id,
                // The first frame builds on nothing, as any line's first checkpoint.
                parent_epoch: if index == 0 { Epoch(0) } else { epoch },
                shards,
                base_frames: u64::from(shards),
                snapshot_shards: vec![shard],
            };
            let delta = checkpoint.encode_delta();
            let frame = encode_frame(&header, &checkpoint, &delta);
            let section = checkpoint.snapshots.get(&shard).map_or(0, rows_section_len);
            head.book_checkpoint(frame_id.sequence, delta.len() as u64, &[(shard, section)]);
            head.head = frame_id;
            head.logged_frames.push(LoggedFrame {
                id: frame_id,
                chunks: chunk_ranges(frame.len(), self.config.max_chunk_bytes()).len() as u32,
                snapshot_shards: vec![shard],
                retired: false,
            });
            if K::KEEPS_BLOBS {
                if let Some(rows) = checkpoint.snapshots.get(&shard) {
                    let mut section = Vec::with_capacity(rows.bytes.len() + 20);
                    put_rows(&mut section, rows);
                    store_write
                        .snapshots
                        .push((shard, encode_snapshot_blob(frame_id.sequence, &section)));
                }
                // Every shard's snapshot is at or after the first frame, so the deltas of the
                // others are the line's (empty, but a blob store's restore reads each).
                if frame_id.sequence > Sequence(1) {
                    store_write
                        .deltas
                        .push((frame_id.sequence, encode_delta_blob(&delta)));
                }
            }
            let outgoing = Outgoing {
                partition,
                id: frame_id,
                bytes: &frame,
            };
            let sent = self.send_frame(outgoing, &mut report);
            if let Err(source) = sent {
                self.stopped = true;
                return Err(SeedError::Changelog {
                    partition: partition.clone(),
                    source,
                });
            }
            report.snapshots += 1;
            report.snapshot_bytes += section;
            report.delta_bytes += delta.len() as u64;
        }
        head.logged_frames.extend(retire.into_logged());
        store_write.head = head.encode();
        let acknowledged = match self.writer.flush() {
            Ok(acknowledged) => acknowledged,
            Err(source) => {
                self.stopped = true;
                return Err(SeedError::Changelog {
                    partition: partition.clone(),
                    source,
                });
            }
        };
        if let Err(source) = K::commit(
            &mut self.store,
            std::slice::from_ref(&store_write),
            &acknowledged,
        ) {
            self.stopped = true;
            return Err(SeedError::Store {
                partition: partition.clone(),
                source,
            });
        }
        self.open
            .insert(partition.clone(), OpenPartition { epoch, head });
        Ok(report)
    }
}
