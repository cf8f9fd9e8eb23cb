//! What a seed needs beside the checkpointer: the frames it retires, and the rows of each shard
//! as the caller reads them.
//!
//! A seed starts a partition's line anew from the caller's own copy (a store kept without the
//! changelog, a changelog lost or of the per-key format): one base frame per shard, frames 1 to
//! the shard count of the take's epoch, each naming that count, so that a restore tells a seed
//! cut short (never a line) from one whole (a line snapshotting every shard, so it replaces
//! whatever a restore applied before it). How, on [`Checkpointer::seed`](crate::Checkpointer::seed).

use std::collections::BTreeMap;

use crate::body::Checkpoint;
use crate::ids::{Epoch, FrameId, ShardId};
use crate::line::LineRestored;
use crate::local::LoggedFrame;
use crate::restore::ResumedHead;

/// The frames of a partition a seed retires: every frame a read of the changelog found of it,
/// and those a local head knew, on its line or not, since the seed's line needs none of them.
/// The commit after the seed tombstones them. Their highest epoch bounds the seed's from below.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetiredFrames {
    /// By frame, so a frame both a read and a head name is tombstoned once.
    frames: BTreeMap<FrameId, LoggedFrame>,
    highest_epoch: Epoch,
}

impl RetiredFrames {
    /// Nothing to retire: a changelog holding nothing of the partition.
    pub fn none() -> Self {
        RetiredFrames::default()
    }

    /// Every frame a read of the changelog found of the partition (its line's, and those it
    /// left: unfinished, damaged, another owner's, a seed cut short), and the highest epoch it
    /// saw.
    pub fn of_read(restored: &LineRestored) -> Self {
        let mut retired = RetiredFrames::none();
        retired.add(&restored.local.logged_frames, restored.highest_epoch);
        retired
    }

    /// Every frame a local head knows of the partition, and the highest epoch it saw.
    pub fn of_head(head: &ResumedHead) -> Self {
        let mut retired = RetiredFrames::none();
        retired.add(&head.local.logged_frames, head.highest_epoch);
        retired
    }

    /// These frames and `other`'s.
    pub fn and(mut self, other: RetiredFrames) -> Self {
        let frames: Vec<LoggedFrame> = other.frames.into_values().collect();
        self.add(&frames, other.highest_epoch);
        self
    }

    /// The highest epoch of the partition seen where these frames were found: a seed must take
    /// a higher one.
    pub fn highest_epoch(&self) -> Epoch {
        self.highest_epoch
    }

    /// The frames retired, oldest first.
    pub fn frames(&self) -> impl Iterator<Item = FrameId> + '_ {
        self.frames.keys().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn add(&mut self, frames: &[LoggedFrame], highest_epoch: Epoch) {
        for frame in frames {
            let retired = self.frames.entry(frame.id).or_insert_with(|| LoggedFrame {
                id: frame.id,
                chunks: 0,
                snapshot_shards: Vec::new(),
                retired: true,
            });
            // Of a frame found twice, every chunk either saw: a tombstone of a chunk that is
            // not there costs a record, one left behind costs the frame's removal.
            retired.chunks = retired.chunks.max(frame.chunks);
            self.highest_epoch = self.highest_epoch.max(frame.id.epoch);
        }
        self.highest_epoch = self.highest_epoch.max(highest_epoch);
    }

    pub(crate) fn into_logged(self) -> impl Iterator<Item = LoggedFrame> {
        self.frames.into_values()
    }
}

/// The rows of one shard a seed's base frame carries, put by the caller as it reads them.
#[derive(Debug)]
pub struct SeedShard<'a> {
    pub(crate) checkpoint: &'a mut Checkpoint,
    pub(crate) shard: ShardId,
}

impl SeedShard<'_> {
    /// The shard whose rows are asked for.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Adds a row of the shard: every row the shard holds, each once.
    pub fn row(&mut self, key: &[u8], value: &[u8]) {
        self.checkpoint.snapshot_row(self.shard, key, value);
    }
}
