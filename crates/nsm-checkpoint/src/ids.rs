//! The names the protocol gives things: partitions, owners' epochs, checkpoint sequences,
//! frames and shards, and the configuration every side of a partition must agree on.

use std::fmt;

/// A partition of state as the caller names it: the changelog partition its records go to,
/// and a name telling it from the other partitions sharing that changelog partition (the
/// engine's: input partition `p` of every input topic goes to changelog partition `p`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId {
    pub changelog_partition: u32,
    pub name: Vec<u8>,
}

impl PartitionId {
    pub fn new(changelog_partition: u32, name: impl Into<Vec<u8>>) -> Self {
        PartitionId {
            changelog_partition,
            name: name.into(),
        }
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{} (changelog partition {})",
            self.name.escape_ascii(),
            self.changelog_partition
        )
    }
}

/// Which owner of a partition wrote a frame. Each owner takes a partition with an epoch above
/// every one it has seen for it, so a higher epoch is a later owner. Epoch zero is nobody's:
/// it names the empty state a partition starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

/// The number of a checkpoint in a partition's history: the first is one, zero is the empty
/// state before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sequence(pub u64);

impl Sequence {
    pub const EMPTY: Sequence = Sequence(0);

    pub fn next(self) -> Sequence {
        Sequence(self.0 + 1)
    }
}

/// One checkpoint of one partition as one owner wrote it. Ordered by epoch first: the frame
/// of a later owner is newer whatever its sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FrameId {
    pub epoch: Epoch,
    pub sequence: Sequence,
}

impl FrameId {
    /// The empty state a partition starts from, before its first checkpoint.
    pub const EMPTY: FrameId = FrameId {
        epoch: Epoch(0),
        sequence: Sequence(0),
    };
}

impl fmt::Display for FrameId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "checkpoint {} of epoch {}",
            self.sequence.0, self.epoch.0
        )
    }
}

/// A shard of a partition's keys; which shard a key is in is the caller's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub u32);

impl ShardId {
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

/// What the library is built with, the same for every owner of a partition: the number of
/// shards is written into every frame and local head, and a restore under another refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointConfig {
    shards: u32,
    max_chunk_bytes: usize,
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the shard count must be between 1 and {max}, not {found}")]
    Shards { found: u32, max: u32 },
    #[error("a changelog chunk must hold at least {min} bytes, not {found}")]
    ChunkTooSmall { found: usize, min: usize },
}

impl CheckpointConfig {
    /// More shards than this only makes snapshots smaller than a chunk.
    pub const MAX_SHARDS: u32 = 1 << 16;
    /// A chunk must hold more than a record's own framing.
    pub const MIN_CHUNK_BYTES: usize = 64;
    /// Half of Kafka's default largest message, so a chunk with its key always fits.
    pub const DEFAULT_MAX_CHUNK_BYTES: usize = 512 * 1024;

    pub fn new(shards: u32, max_chunk_bytes: usize) -> Result<Self, ConfigError> {
        if shards == 0 || shards > Self::MAX_SHARDS {
            return Err(ConfigError::Shards {
                found: shards,
                max: Self::MAX_SHARDS,
            });
        }
        if max_chunk_bytes < Self::MIN_CHUNK_BYTES {
            return Err(ConfigError::ChunkTooSmall {
                found: max_chunk_bytes,
                min: Self::MIN_CHUNK_BYTES,
            });
        }
        Ok(CheckpointConfig {
            shards,
            max_chunk_bytes,
        })
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn max_chunk_bytes(&self) -> usize {
        self.max_chunk_bytes
    }

    /// The shard of a key hashed uniformly to 64 bits, from its top bits: the engine's rows
    /// are keyed by such a hash.
    pub fn shard_of_hash(&self, hash: u64) -> ShardId {
        ShardId(((u128::from(hash) * u128::from(self.shards)) >> 64) as u32)
    }
}
