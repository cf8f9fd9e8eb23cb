//! The checkpoint as `nsm run` writes it, without the broker: the engine's changes made into a
//! RocksDB batch and one frame per partition (its rows, dropped ranges and the shard snapshots
//! due), encoded and handed to a changelog that acknowledges every record at once, then the
//! batch stored with the heads.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nsm_checkpoint::{Acknowledged, Checkpointer, Epoch, HeadsOnly};
use nsm_core::engine::{ChangeSet, Engine};
use nsm_core::PartitionKey;
use nsm_state::{
    checkpoint_config, member_shards, partition_id, ChangelogLayout, RocksHeadStore, Store,
};

/// Where the checkpoints' time went.
#[derive(Default, Clone, Copy)]
pub struct CheckpointTimes {
    /// Making the RocksDB batch and each partition's rows of it.
    pub preparing: Duration,
    /// Reading the shard snapshots due from RocksDB.
    pub snapshotting: Duration,
    /// Encoding and sending the frames, then storing the batch with the heads.
    pub committing: Duration,
}

impl CheckpointTimes {
    pub fn total(&self) -> Duration {
        self.preparing + self.snapshotting + self.committing
    }

    pub fn add(&mut self, other: &CheckpointTimes) {
        self.preparing += other.preparing;
        self.snapshotting += other.snapshotting;
        self.committing += other.committing;
    }
}

pub struct Frames {
    checkpointer: Checkpointer<CountingWriter, RocksHeadStore, HeadsOnly>,
    heads: RocksHeadStore,
    pub times: CheckpointTimes,
}

impl Frames {
    /// Opens `key` for writing from the head `store` holds.
    pub fn open(store: &Store, key: &PartitionKey) -> anyhow::Result<Frames> {
        let heads = RocksHeadStore::new(store.clone());
        let mut checkpointer = Checkpointer::with_head_store(
            checkpoint_config(),
            CountingWriter::default(),
            heads.clone(),
        );
        checkpointer
            .resume(&partition_id(key), Epoch(1))
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        Ok(Frames {
            checkpointer,
            heads,
            times: CheckpointTimes::default(),
        })
    }

    /// The engine's changes since the last checkpoint, with the member shards the next
    /// checkpoint snapshots read from memory where the engine holds them whole, as `nsm run`
    /// takes them.
    pub fn take_changes(&self, engine: &mut Engine) -> ChangeSet {
        engine.take_changes_with_snapshots(|key| {
            member_shards(&self.checkpointer.snapshots_due(&partition_id(key)))
        })
    }

    /// Sends and stores one checkpoint; the records it sent.
    pub fn write(&mut self, store: &Store, changes: &ChangeSet) -> anyhow::Result<u64> {
        let started = Instant::now();
        let write = store.prepare_frames(changes);
        let prepared = Instant::now();
        let checkpoints = store.checkpoints_of(&write, &ChangelogLayout::default(), |id| {
            self.checkpointer.snapshots_due(id)
        })?;
        let snapshotted = Instant::now();
        self.heads.stage(write);
        let report = self
            .checkpointer
            .commit(&checkpoints)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        self.times.preparing += prepared - started;
        self.times.snapshotting += snapshotted - prepared;
        self.times.committing += snapshotted.elapsed();
        Ok(report.records())
    }
}

/// A changelog that takes every record at once.
#[derive(Default)]
struct CountingWriter {
    next_offsets: BTreeMap<u32, u64>,
}

impl nsm_checkpoint::ChangelogWriter for CountingWriter {
    type Error = std::convert::Infallible;

    fn send(&mut self, partition: u32, _: &[u8], _: Option<&[u8]>) -> Result<(), Self::Error> {
        *self.next_offsets.entry(partition).or_default() += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<Acknowledged, Self::Error> {
        Ok(Acknowledged {
            next_offsets: self.next_offsets.clone(),
        })
    }
}
