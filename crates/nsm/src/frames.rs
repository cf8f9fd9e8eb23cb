//! The changelog as `nsm-checkpoint` frames: each checkpoint is one frame per partition (its
//! rows put and deleted, its dropped ranges, the shard snapshots due), sent as a few large
//! records and acknowledged before the store writes the same batch with the partition's head and
//! position. A take restores the newest line of frames into RocksDB, or goes on from the local
//! head, then writes the take's first frame.
//!
//! A copy without a head (written by an nsm of state format 7 or before, whose changelog carries
//! a record per key, or kept without the changelog) is first brought up to date by the keyed
//! restore of `changelog.rs`, then sent whole as base frames (a seed), which win over every
//! frame of a lower epoch.
//!
//! A take compares the store's changelog position with the log: at its end, nothing to read (a
//! restart); inside, the frames after it, applied if they continue the local head, else the
//! newest line restored whole; past its end or before its start, the changelog lost what the
//! store saw acknowledged (deleted, recreated or truncated), so the local copy is kept and
//! seeded again. The take's epoch is above every one read, and at least the wall clock.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nsm_checkpoint::{Acknowledged, Epoch, LineOutcome, LineRestore, LineRestored, RetiredFrames};
use nsm_core::engine::ChangeSet;
use nsm_core::PartitionKey;
use nsm_state::{checkpoint_config, DiscardedMetric, RocksSink, StateError, Store};
use tracing::{info, warn};

use crate::changelog::Changelog;

/// How long a write still waits for the broker once nsm was asked to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Bytes of finished frames a restore holds before it applies them; past it, a second read.
const HOLD_LIMIT: u64 = 64 * 1024 * 1024;

/// nsm-kafka's changelog writer as nsm-checkpoint's port; it gives up `STOP_GRACE` after nsm was
/// asked to stop.
pub(crate) struct KafkaFrames {
    writer: Arc<nsm_kafka::ChangelogWriter>,
    stop: Arc<AtomicBool>,
    /// When the stop was first seen during a wait.
    stopping_since: Cell<Option<Instant>>,
}

impl KafkaFrames {
    pub(crate) fn new(writer: Arc<nsm_kafka::ChangelogWriter>, stop: Arc<AtomicBool>) -> Self {
        KafkaFrames {
            writer,
            stop,
            stopping_since: Cell::new(None),
        }
    }

    /// Whether to stop waiting: `STOP_GRACE` after the stop was first seen.
    fn give_up(&self) -> bool {
        if !self.stop.load(Ordering::Relaxed) {
            return false;
        }
        let since = self.stopping_since.get().unwrap_or_else(Instant::now);
        self.stopping_since.set(Some(since));
        since.elapsed() >= STOP_GRACE
    }
}

impl nsm_checkpoint::ChangelogWriter for KafkaFrames {
    type Error = nsm_kafka::KafkaError;

    fn send(
        &mut self,
        partition: u32,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), nsm_kafka::KafkaError> {
        let partition = i32::try_from(partition).unwrap_or(i32::MAX);
        self.writer
            .send(partition, key, value, None, &|| self.give_up())
    }

    fn flush(&mut self) -> Result<Acknowledged, nsm_kafka::KafkaError> {
        let next = self.writer.await_delivery(&|| self.give_up())?;
        Ok(Acknowledged {
            next_offsets: next
                .into_iter()
                .map(|(partition, offset)| (partition as u32, offset as u64))
                .collect(),
        })
    }
}

/// What taking a partition did.
#[derive(Debug, Default)]
pub struct Taken {
    /// Changelog records read.
    pub records: u64,
    /// The changelog no longer held what the local copy had read or written (deleted,
    /// recreated or truncated): the local copy was sent to it again.
    pub changelog_lost: bool,
    /// The local copy was sent whole, as base frames.
    pub seeded: bool,
    /// Frames left out of the line: unfinished, or of an owner that had lost the partition.
    pub frames_skipped: u64,
    pub discarded: Vec<DiscardedMetric>,
}

/// How a take opens the partition for writing.
enum Open {
    /// The local head is current.
    Resume,
    /// Frames restored into the store.
    Restored(Box<LineRestored>),
    /// The local copy, sent whole.
    Seed(RetiredFrames),
}

/// How a read of frames ended.
enum Read {
    Restored(Box<LineRestored>),
    /// The frames after the local position do not continue the local head.
    Broken,
}

impl Changelog {
    /// Sends `changes` as one frame per partition, acknowledged, then stores them with each
    /// partition's head and changelog position; returns the records sent.
    pub fn write(&self, store: &Store, changes: &ChangeSet) -> Result<u64, String> {
        let write = store.prepare_frames(changes);
        let mut checkpointer = self.checkpointer();
        let checkpoints = store
            .checkpoints_of(&write, &self.layout, |id| checkpointer.snapshots_due(id))
            .map_err(|error| format!("state read failed: {error}"))?;
        self.heads.stage(write);
        let report = checkpointer
            .commit(&checkpoints)
            .map_err(|error| format!("changelog {}: {error}", self.topic))?;
        Ok(report.records())
    }

    /// The member shards of `key` whose snapshots the next checkpoint takes, for the engine to
    /// read from memory when it holds them whole (see `Engine::take_changes_with_snapshots`).
    pub fn member_shards_due(&self, key: &PartitionKey) -> Vec<u16> {
        nsm_state::member_shards(
            &self
                .checkpointer()
                .snapshots_due(&self.layout.partition_id(key)),
        )
    }

    /// Stops writing partitions given up; the frames they left stay the changelog's.
    pub fn release(&self, partitions: &[PartitionKey]) {
        let mut checkpointer = self.checkpointer();
        for key in partitions {
            checkpointer.release(&self.layout.partition_id(key));
        }
    }

    /// Brings the store's copy of `key` up to date with the changelog and opens it for
    /// writing: nothing to read when the local head wrote or read the changelog's last record,
    /// the frames after its position otherwise, the newest line whole when there is no local
    /// copy (or its line was broken); then the take's first frame. `cancel` set stops a read
    /// between two records (a rebalance came first).
    pub fn take(
        &self,
        store: &Store,
        key: &PartitionKey,
        cancel: &AtomicBool,
    ) -> Result<Taken, String> {
        let failed = |error| self.read_failed(key, error);
        let state_failed = |error: StateError| format!("partition {key}: {error}");
        let changelog_partition = self.layout.changelog_partition(key);
        self.ensure_partition(changelog_partition)?;
        let (low, high) = self
            .reader
            .watermarks(changelog_partition)
            .map_err(failed)?;
        let config = checkpoint_config();
        let id = self.layout.partition_id(key);
        let head = nsm_checkpoint::restore_head(&config, &self.heads, &id)
            .map_err(|error| format!("partition {key}: {error}"))?;
        let has_head = head.head != nsm_checkpoint::FrameId::EMPTY;
        let position = store.changelog_position(key).map_err(state_failed)?;
        let mut taken = Taken::default();
        if store.restore_was_cut_short(key).map_err(state_failed)? {
            info!(partition = %key, "a restore of this partition was cut short: restoring it whole again");
            store.clear_partition(key).map_err(state_failed)?;
        }
        let open = match position {
            Some(position) if has_head && position.offset == high => Open::Resume,
            Some(position) if has_head && (position.offset > high || position.offset < low) => {
                warn!(partition = %key, changelog = %self.topic, stored_position = position.offset,
                      changelog_start = low, changelog_end = high,
                      "the changelog no longer holds the records this instance wrote or read: it was deleted, recreated or truncated; keeping the local state and sending it to the changelog again");
                taken.changelog_lost = true;
                Open::Seed(RetiredFrames::of_head(&head))
            }
            Some(position) if has_head => {
                let resumed = LineRestore::resume(&config, &head, HOLD_LIMIT);
                match self.read_frames(
                    store,
                    key,
                    resumed,
                    position.offset,
                    high,
                    cancel,
                    &mut taken,
                )? {
                    Read::Restored(restored) => Open::Restored(restored),
                    Read::Broken => {
                        info!(partition = %key, "the changelog's frames do not continue the local copy: restoring it whole");
                        Open::Restored(Box::new(
                            self.restore_whole(store, key, low, high, cancel, &mut taken)?,
                        ))
                    }
                }
            }
            _ if !has_head && store.has_partition_data(key).map_err(state_failed)? => {
                // A copy of an older nsm, or kept without the changelog: brought up to date
                // by the keyed records it may have, then sent whole as frames.
                let legacy = self.restore(store, key, cancel)?;
                taken.records += legacy.records;
                taken.changelog_lost = legacy.changelog_lost;
                info!(partition = %key, "sending the local copy of the partition to the changelog as frames");
                Open::Seed(RetiredFrames::none())
            }
            _ => {
                let restored = self.restore_whole(store, key, low, high, cancel, &mut taken)?;
                if restored.head == nsm_checkpoint::FrameId::EMPTY
                    && restored.stats.foreign_records > 0
                {
                    // No frame of the partition, but records of an older nsm: rebuilt from them,
                    // then sent as frames.
                    info!(partition = %key, records = restored.stats.foreign_records,
                          "the changelog holds this partition as keyed records of an older nsm: rebuilding it from them");
                    store.clear_partition(key).map_err(state_failed)?;
                    let legacy = self.restore(store, key, cancel)?;
                    taken.records += legacy.records;
                    Open::Seed(RetiredFrames::of_read(&restored))
                } else {
                    Open::Restored(Box::new(restored))
                }
            }
        };
        let seen = match &open {
            Open::Resume => head.highest_epoch,
            Open::Restored(restored) => restored.highest_epoch,
            Open::Seed(retired) => retired.highest_epoch(),
        };
        // Above every epoch seen, and at least the wall clock: a copy whose frames this read
        // did not see (a lost changelog) still goes above the owners before it.
        let epoch = Epoch((seen.0 + 1).max(crate::pipeline::wall_clock_ms().max(0) as u64));
        let mut checkpointer = self.checkpointer();
        match open {
            Open::Resume => {
                checkpointer
                    .resume(&id, epoch)
                    .map_err(|error| format!("partition {key}: {error}"))?;
            }
            Open::Restored(restored) => {
                taken.frames_skipped += restored.stats.frames_skipped;
                checkpointer
                    .take_over_restored(epoch, *restored, |_| Ok(()))
                    .map_err(|error| format!("partition {key}: {error}"))?;
            }
            Open::Seed(retired) => {
                let meta = store.stored_meta(key).map_err(state_failed)?;
                let report = checkpointer
                    .seed(&id, &meta, epoch, retired, |_, seed| {
                        store.seed_shard(key, seed)
                    })
                    .map_err(|error| format!("changelog {}: {error}", self.topic))?;
                taken.seeded = true;
                info!(partition = %key, records = report.records(), "the partition's state was sent to the changelog as base frames");
            }
        }
        // The take's first frame: definitions reconciled, and the head written. It snapshots
        // no shard, whatever the credit makes due: reading them (a pass over the partition's
        // entries) would hold the partition's first scrape back; the next checkpoints send them.
        let (write, discarded) = store.prepare_adoption_frames(key).map_err(state_failed)?;
        let checkpoint = store
            .checkpoint_of(&write, key, &self.layout, &[])
            .map_err(state_failed)?;
        self.heads.stage(write);
        checkpointer
            .commit(&Vec::from_iter(checkpoint))
            .map_err(|error| format!("changelog {}: {error}", self.topic))?;
        taken.discarded = discarded;
        Ok(taken)
    }

    /// Sends the store's copy of `key`, an open partition of this instance, whole as base
    /// frames at a new epoch: its rows changed outside the checkpoints (a backfill swapped in,
    /// docs/design/backfill.md), and the frames before cannot rebuild them. Returns the records
    /// sent. No checkpoint may be in flight.
    pub fn reseed(&self, store: &Store, key: &PartitionKey) -> Result<u64, String> {
        let state_failed = |error: StateError| format!("partition {key}: {error}");
        let config = checkpoint_config();
        let id = self.layout.partition_id(key);
        let head = nsm_checkpoint::restore_head(&config, &self.heads, &id)
            .map_err(|error| format!("partition {key}: {error}"))?;
        let epoch =
            Epoch((head.highest_epoch.0 + 1).max(crate::pipeline::wall_clock_ms().max(0) as u64));
        let meta = store.stored_meta(key).map_err(state_failed)?;
        let mut checkpointer = self.checkpointer();
        checkpointer.release(&id);
        let report = checkpointer
            .seed(
                &id,
                &meta,
                epoch,
                RetiredFrames::of_head(&head),
                |_, seed| store.seed_shard(key, seed),
            )
            .map_err(|error| format!("changelog {}: {error}", self.topic))?;
        Ok(report.records())
    }

    /// Restores the partition whole from the changelog's newest line, into a cleared store.
    fn restore_whole(
        &self,
        store: &Store,
        key: &PartitionKey,
        low: i64,
        high: i64,
        cancel: &AtomicBool,
        taken: &mut Taken,
    ) -> Result<LineRestored, String> {
        let state_failed = |error: StateError| format!("partition {key}: {error}");
        store.start_whole_restore(key).map_err(state_failed)?;
        let restore = LineRestore::new(
            &checkpoint_config(),
            &self.layout.partition_id(key),
            HOLD_LIMIT,
        );
        match self.read_frames(store, key, restore, low, high, cancel, taken)? {
            Read::Restored(restored) => Ok(*restored),
            Read::Broken => Err(format!(
                "partition {key}: a whole restore has no local head to break"
            )),
        }
    }

    /// Reads frames from `from` to `high` into the store, again while the read asks for a
    /// second pass.
    #[allow(clippy::too_many_arguments)]
    fn read_frames(
        &self,
        store: &Store,
        key: &PartitionKey,
        mut restore: LineRestore,
        from: i64,
        high: i64,
        cancel: &AtomicBool,
        taken: &mut Taken,
    ) -> Result<Read, String> {
        if from < high {
            info!(partition = %key, changelog = %self.topic, from, to = high, "restoring partition state from the changelog");
        }
        let mut sink = RocksSink::new(store, key);
        loop {
            let mut failure: Option<String> = None;
            taken.records += self
                .reader
                .read(
                    self.layout.changelog_partition(key),
                    from,
                    high,
                    &mut |offset, record_key, value, _| {
                        if cancel.load(Ordering::Relaxed) {
                            return Err("cancelled: a rebalance came before it ended".into());
                        }
                        restore
                            .record(&mut sink, offset as u64, record_key, value)
                            .map_err(|error| {
                                let message = error.to_string();
                                failure = Some(message.clone());
                                message
                            })
                    },
                )
                .map_err(|error| {
                    format!(
                        "cannot restore {key} from the changelog {}: {}",
                        self.topic,
                        failure.take().unwrap_or_else(|| error.to_string())
                    )
                })?;
            match restore
                .finish(&mut sink)
                .map_err(|error| format!("partition {key}: {error}"))?
            {
                LineOutcome::Restored(restored) => return Ok(Read::Restored(Box::new(restored))),
                LineOutcome::Broken(_) => return Ok(Read::Broken),
                LineOutcome::SecondPass(pass) => {
                    restore = LineRestore::second_pass(pass, &mut sink)
                        .map_err(|error| format!("partition {key}: {error}"))?;
                }
            }
        }
    }
}
