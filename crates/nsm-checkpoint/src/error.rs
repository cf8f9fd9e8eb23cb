//! The protocol's errors, each carrying the port error that caused it as it is, so a caller
//! can tell a broker that timed out from a disk that failed from a bug of its own.

use std::fmt;

use crate::ids::{Epoch, FrameId, PartitionId, Sequence, ShardId};
use crate::wire::DecodeError;

/// What part of a partition's stored or logged state could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    Head,
    Snapshot(ShardId),
    Delta(Sequence),
    Frame(FrameId),
}

impl fmt::Display for Corruption {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Head => write!(formatter, "the stored head"),
            Corruption::Snapshot(shard) => write!(formatter, "the snapshot of shard {}", shard.0),
            Corruption::Delta(sequence) => {
                write!(formatter, "the delta of checkpoint {}", sequence.0)
            }
            Corruption::Frame(frame) => write!(formatter, "the frame of {frame}"),
        }
    }
}

/// What a store lacks that its head says it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Snapshot { shard: ShardId, sequence: Sequence },
    Delta(Sequence),
}

impl fmt::Display for Missing {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Snapshot { shard, sequence } => write!(
                formatter,
                "the snapshot of shard {} taken at checkpoint {}",
                shard.0, sequence.0
            ),
            Missing::Delta(sequence) => write!(formatter, "the delta of checkpoint {}", sequence.0),
        }
    }
}

/// Why a partition could not be restored; `P` is the error of the port read (the changelog
/// reader or the store), or of the sink a streaming restore applies to.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError<P> {
    #[error("cannot read partition {partition}: {source}")]
    Read { partition: PartitionId, source: P },
    #[error(
        "partition {partition} was written with {stored} shards, this configuration has {configured}"
    )]
    ShardCountChanged {
        partition: PartitionId,
        stored: u32,
        configured: u32,
    },
    #[error("partition {partition}: {what} is corrupt: {source}")]
    Corrupt {
        partition: PartitionId,
        what: Corruption,
        source: DecodeError,
    },
    #[error("partition {partition}: the store lacks {missing}, which its head names")]
    Incomplete {
        partition: PartitionId,
        missing: Missing,
    },
    #[error(
        "partition {partition}: the changelog has finished checkpoints, but none with every frame \
         it builds on (the newest is {newest}); the frames it needs were deleted"
    )]
    BrokenLine {
        partition: PartitionId,
        newest: FrameId,
    },
    #[error("partition {partition}: the restore's sink refused a change: {source}")]
    Sink { partition: PartitionId, source: P },
}

impl RestoreError<std::convert::Infallible> {
    /// This error as one of a restore whose port may fail (the in-memory sink cannot).
    pub fn widen<P>(self) -> RestoreError<P> {
        match self {
            RestoreError::Read { source, .. } | RestoreError::Sink { source, .. } => {
                match source {}
            }
            RestoreError::ShardCountChanged {
                partition,
                stored,
                configured,
            } => RestoreError::ShardCountChanged {
                partition,
                stored,
                configured,
            },
            RestoreError::Corrupt {
                partition,
                what,
                source,
            } => RestoreError::Corrupt {
                partition,
                what,
                source,
            },
            RestoreError::Incomplete { partition, missing } => {
                RestoreError::Incomplete { partition, missing }
            }
            RestoreError::BrokenLine { partition, newest } => {
                RestoreError::BrokenLine { partition, newest }
            }
        }
    }
}

/// Why a partition could not be opened for writing. `P` is the error of the port restored
/// from, `S` the store's.
#[derive(Debug, thiserror::Error)]
pub enum OpenError<P, S> {
    #[error(transparent)]
    Restore(RestoreError<P>),
    #[error("cannot store partition {partition} as restored from the changelog: {source}")]
    Install { partition: PartitionId, source: S },
    #[error(
        "partition {partition} cannot be taken with epoch {requested}: it has seen epoch {seen}, \
         and an owner must take it with a higher one"
    )]
    EpochNotAbove {
        partition: PartitionId,
        requested: u64,
        seen: u64,
    },
    #[error("partition {partition} is already open")]
    AlreadyOpen { partition: PartitionId },
}

impl<P, S> OpenError<P, S> {
    pub(crate) fn epoch_not_above(partition: &PartitionId, requested: Epoch, seen: Epoch) -> Self {
        OpenError::EpochNotAbove {
            partition: partition.clone(),
            requested: requested.0,
            seen: seen.0,
        }
    }
}

/// A checkpoint the caller got wrong; nothing was sent or stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCheckpoint {
    #[error("partition {partition} is not open: restore it first")]
    NotOpen { partition: PartitionId },
    #[error("partition {partition} appears twice in one commit")]
    DuplicatePartition { partition: PartitionId },
    #[error("partition {partition}: shard {shard} is not below the shard count {shards}")]
    ShardOutOfRange {
        partition: PartitionId,
        shard: u32,
        shards: u32,
    },
}

/// Why a commit did not happen. After a changelog or store error the checkpointer refuses every
/// later commit ([`CommitError::Stopped`]): the changelog may hold a frame the store lacks, and
/// the next owner (a restart with a higher epoch) must restore before anything more is written.
#[derive(Debug, thiserror::Error)]
pub enum CommitError<C, S> {
    #[error(transparent)]
    Invalid(#[from] InvalidCheckpoint),
    #[error("the changelog did not take the checkpoint: {source}")]
    Changelog { source: C },
    #[error("the store did not take the checkpoint (the changelog did): {source}")]
    Store { source: S },
    #[error(
        "an earlier checkpoint failed: nothing more is written until the partitions are restored"
    )]
    Stopped,
}

/// Why a seed did not happen. Once a record of it was sent (the rows of a later shard could
/// not be read, or the changelog or the store failed) the checkpointer refuses everything more
/// ([`SeedError::Stopped`], [`CommitError::Stopped`]): the log may hold base frames of the
/// seed's epoch, and a second seed under it would reuse their keys. What was sent is a seed cut
/// short, which a restore never takes for a line; the next owner seeds again with a higher epoch.
#[derive(Debug, thiserror::Error)]
pub enum SeedError<C, S, R> {
    #[error("partition {partition} is already open: a seed opens it")]
    AlreadyOpen { partition: PartitionId },
    #[error(
        "partition {partition} cannot be seeded with epoch {requested}: it has seen epoch {seen}, \
         and a seed must take a higher one"
    )]
    EpochNotAbove {
        partition: PartitionId,
        requested: u64,
        seen: u64,
    },
    #[error(
        "partition {partition}: the rows of shard {shard} could not be read for the seed: {source}"
    )]
    Rows {
        partition: PartitionId,
        shard: u32,
        source: R,
    },
    #[error("the changelog did not take the seed of partition {partition}: {source}")]
    Changelog { partition: PartitionId, source: C },
    #[error(
        "the store did not take the head of partition {partition}'s seed (the changelog did): \
         {source}"
    )]
    Store { partition: PartitionId, source: S },
    #[error(
        "an earlier checkpoint or seed failed: nothing more is written until the partitions are \
         restored"
    )]
    Stopped,
}
