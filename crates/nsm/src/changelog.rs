//! The state changelog topic: its writer and reader, the protocol of frames over them
//! (`crate::frames`), and the keyed restore of the records an nsm of state format 7 or before
//! wrote, one per stored key.
//!
//! A keyed restore brings a local copy without a frames head up to date: records since its
//! position, or everything when it has none (compared with the changelog by input offset: the
//! newer copy wins), applied up to each write's end marker, records of an owner that had lost
//! the partition fenced off by their epochs (see `nsm_state::changelog`). The copy is then sent
//! to the changelog as frames.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nsm_checkpoint::{Checkpointer, HeadsOnly};

use nsm_core::PartitionKey;
use nsm_kafka::{ChangelogReader, ChangelogWriter, ClientSettings};
use nsm_state::{
    ChangelogLayout, ChangelogProbe, PartitionRestore, RestoreOutcome, RocksHeadStore, Store,
};
use tracing::{info, warn};

/// How old a stored position may be and still be read from: tombstones written after it
/// must still be in the changelog. Kafka keeps them `delete.retention.ms`, one day by default.
const TRUST_POSITION_MS: i64 = 20 * 3_600_000;

use crate::frames::KafkaFrames;

type FrameCheckpointer = Checkpointer<KafkaFrames, RocksHeadStore, HeadsOnly>;

pub struct Changelog {
    pub(crate) topic: String,
    pub(crate) reader: ChangelogReader,
    /// The frames' protocol, shared by the checkpoint writer and the takes (which never run
    /// together), over `heads`.
    checkpointer: Mutex<FrameCheckpointer>,
    pub(crate) heads: RocksHeadStore,
    settings: ClientSettings,
    /// Partitions the topic is known to have: an input partition beyond them (added to an
    /// input topic since) gets its changelog partition when it is first taken.
    partitions: AtomicUsize,
    /// Which changelog partition carries each partition's frames.
    pub(crate) layout: ChangelogLayout,
}

/// What bringing a partition up to date did.
#[derive(Debug, Default)]
pub struct Restored {
    /// The store's copy of the partition is newer than the changelog's (or the only one):
    /// send it whole, with `tail` holding every other key the changelog has of it.
    pub seed: bool,
    /// Changelog records read.
    pub records: u64,
    /// The changelog ended before the position the store had reached: it was deleted,
    /// recreated or truncated, and the store's copy is sent to it again (`seed`) unless the
    /// changelog holds a newer one.
    pub changelog_lost: bool,
}

impl Changelog {
    pub fn new(
        settings: &ClientSettings,
        topic: &str,
        store: &Store,
        stop: Arc<AtomicBool>,
        layout: ChangelogLayout,
    ) -> Result<Self, nsm_kafka::KafkaError> {
        let writer = Arc::new(ChangelogWriter::new(settings, topic)?);
        let heads = RocksHeadStore::new(store.clone());
        let checkpointer = Checkpointer::with_head_store(
            nsm_state::checkpoint_config(),
            KafkaFrames::new(writer.clone(), stop.clone()),
            heads.clone(),
        );
        Ok(Changelog {
            topic: topic.to_string(),
            reader: ChangelogReader::new(settings, topic)?,
            checkpointer: Mutex::new(checkpointer),
            heads,
            settings: settings.clone(),
            partitions: AtomicUsize::new(0),
            layout,
        })
    }

    /// What a failed read of `key`'s changelog partition says.
    pub(crate) fn read_failed(&self, key: &PartitionKey, error: nsm_kafka::KafkaError) -> String {
        format!(
            "cannot read the changelog {} partition {} for {key}: {error}",
            self.topic,
            self.layout.changelog_partition(key)
        )
    }

    pub(crate) fn checkpointer(&self) -> MutexGuard<'_, FrameCheckpointer> {
        self.checkpointer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes sure changelog partition `partition` exists, adding partitions to the topic when
    /// an input topic gained some since nsm sized it.
    pub(crate) fn ensure_partition(&self, partition: i32) -> Result<(), String> {
        let needed = usize::try_from(partition).unwrap_or(0) + 1;
        if needed <= self.partitions.load(Ordering::Relaxed) {
            return Ok(());
        }
        let failed = |error: nsm_kafka::KafkaError| format!("changelog {}: {error}", self.topic);
        let mut found = nsm_kafka::topic_partition_count(&self.settings, &self.topic)
            .map_err(failed)?
            .unwrap_or(0);
        if found < needed {
            warn!(changelog = %self.topic, partitions = found, needed,
                  "input partitions were added: adding partitions to the changelog");
            nsm_kafka::extend_changelog_topic(&self.settings, &self.topic, found, needed)
                .map_err(failed)?;
            found = needed;
        }
        self.partitions.fetch_max(found, Ordering::Relaxed);
        Ok(())
    }

    /// Brings the store's copy of `key` up to date with the changelog: nothing to do when it
    /// wrote or read the changelog's last record itself, the records since its position
    /// otherwise, everything from the start when it has no position or an old one. A store
    /// that holds the partition without a position (written before the changelog, or with it
    /// off) is compared with the changelog by input offset: the newer copy wins.
    /// `cancel` set stops it between two records (a rebalance came first): what it stored
    /// up to its last end marker stays, with its position, for the next restore to go on from.
    pub fn restore(
        &self,
        store: &Store,
        key: &PartitionKey,
        cancel: &AtomicBool,
    ) -> Result<Restored, String> {
        let failed = |error| self.read_failed(key, error);
        let state_failed = |error: nsm_state::StateError| format!("partition {key}: {error}");
        let changelog_partition = self.layout.changelog_partition(key);
        self.ensure_partition(changelog_partition)?;
        let (low, high) = self
            .reader
            .watermarks(changelog_partition)
            .map_err(failed)?;
        let position = store.changelog_position(key).map_err(state_failed)?;
        let mut changelog_lost = false;
        let start = match position {
            Some(position) if position.offset == high => return Ok(Restored::default()),
            Some(position) if position.offset > high || position.offset < low => {
                // The changelog ends before records this store saw acknowledged, or starts
                // after them: it was deleted, recreated or truncated. The local copy is
                // whole; clearing it to read what is left of the log would lose state.
                warn!(partition = %key, changelog = %self.topic, stored_position = position.offset,
                      changelog_start = low, changelog_end = high,
                      "the changelog no longer holds the records this instance wrote or read: it was deleted, recreated or truncated; keeping the local state and sending it to the changelog again");
                changelog_lost = true;
                let restored = self.compare_with_changelog(store, key, low, high, cancel)?;
                if restored.seed {
                    return Ok(Restored {
                        changelog_lost,
                        ..restored
                    });
                }
                low
            }
            Some(position)
                if position.offset >= low
                    && position.offset < high
                    && crate::pipeline::wall_clock_ms() - position.written_ms
                        < TRUST_POSITION_MS =>
            {
                position.offset
            }
            None if store.has_partition_data(key).map_err(state_failed)? => {
                let restored = self.compare_with_changelog(store, key, low, high, cancel)?;
                if restored.seed {
                    return Ok(restored);
                }
                low
            }
            _ => {
                store.clear_partition(key).map_err(state_failed)?;
                low
            }
        };
        if start == high {
            return Ok(Restored {
                changelog_lost,
                ..Restored::default()
            });
        }
        info!(partition = %key, changelog = %self.topic, from = start, to = high, "restoring partition state from the changelog");
        let restore = PartitionRestore::new(store, key, start).map_err(state_failed)?;
        let (outcome, mut records) = self.read_into(restore, key, start, high, cancel)?;
        let outcome = match outcome {
            RestoreOutcome::RestartThrough(last_end) => {
                // An unfinished write too large to hold back was written out: start over.
                store.clear_partition(key).map_err(state_failed)?;
                let restore = PartitionRestore::new(store, key, low)
                    .map_err(state_failed)?
                    .through(last_end);
                let (outcome, more) = self.read_into(restore, key, low, high, cancel)?;
                records += more;
                outcome
            }
            restored => restored,
        };
        match outcome {
            RestoreOutcome::Restored { fenced, .. } => {
                if fenced > 0 {
                    warn!(partition = %key, changelog = %self.topic, fenced,
                          "left out changelog records of an owner that had lost the partition when they landed (an instance cut off from the group)");
                }
                Ok(Restored {
                    seed: false,
                    records,
                    changelog_lost,
                })
            }
            RestoreOutcome::RestartThrough(_) => Err(format!(
                "partition {key}: the changelog restore did not settle in two passes"
            )),
        }
    }

    /// Compares a stored copy of `key` that cannot be brought up to date record by record
    /// (it has no changelog position, or the changelog lost records it had) with the
    /// changelog, by the input offset each resumes from. The newer copy wins: the changelog's
    /// clears the store's (the caller then restores from `low`), the store's is sent whole,
    /// with a tombstone for every other key the changelog holds of the partition.
    fn compare_with_changelog(
        &self,
        store: &Store,
        key: &PartitionKey,
        low: i64,
        high: i64,
        cancel: &AtomicBool,
    ) -> Result<Restored, String> {
        let failed = |error| self.read_failed(key, error);
        let state_failed = |error: nsm_state::StateError| format!("partition {key}: {error}");
        let mut probe = ChangelogProbe::new(key);
        let records = self
            .reader
            .read(
                self.layout.changelog_partition(key),
                low,
                high,
                &mut |_: i64, record_key: &[u8], value: Option<&[u8]>, epoch: Option<u64>| {
                    cancelled(cancel)?;
                    probe.record(record_key, value, epoch);
                    Ok(())
                },
            )
            .map_err(failed)?;
        let stored = store.stored_next_offset(key).map_err(state_failed)?;
        match probe.finished_offset() {
            Some(logged) if logged >= stored => {
                info!(partition = %key, stored = ?stored, changelog = ?logged,
                      "the changelog is ahead of the stored copy: restoring from it");
                store.clear_partition(key).map_err(state_failed)?;
                Ok(Restored::default())
            }
            _ => {
                info!(partition = %key, stored = ?stored, changelog = ?probe.finished_offset(),
                      "the stored copy is ahead of the changelog: sending it whole");
                Ok(Restored {
                    seed: true,
                    records,
                    changelog_lost: false,
                })
            }
        }
    }

    fn read_into(
        &self,
        mut restore: PartitionRestore<'_>,
        key: &PartitionKey,
        from: i64,
        to: i64,
        cancel: &AtomicBool,
    ) -> Result<(RestoreOutcome, u64), String> {
        let records = self
            .reader
            .read(
                self.layout.changelog_partition(key),
                from,
                to,
                &mut |offset: i64, record_key: &[u8], value: Option<&[u8]>, epoch: Option<u64>| {
                    cancelled(cancel)?;
                    restore
                        .record(offset, record_key, value, epoch)
                        .map_err(|error| error.to_string())
                },
            )
            .map_err(|error| {
                format!(
                    "cannot restore {key} from the changelog {}: {error}",
                    self.topic
                )
            })?;
        let outcome = restore
            .finish()
            .map_err(|error| format!("partition {key}: {error}"))?;
        Ok((outcome, records))
    }
}

/// Stops a restore a rebalance has overtaken.
fn cancelled(cancel: &AtomicBool) -> Result<(), String> {
    if cancel.load(Ordering::Relaxed) {
        return Err("cancelled: a rebalance came before it ended".into());
    }
    Ok(())
}
