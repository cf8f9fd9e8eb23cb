//! The three things the protocol needs from outside, as traits: a changelog writer, a
//! changelog reader and a local store. Each is shaped so that a thin adapter implements it:
//! an rdkafka producer whose delivery reports are awaited at `flush`, a consumer assigned to
//! one partition from its first offset, a RocksDB write batch and prefix scans.
//!
//! Every port has its own error type; the protocol's errors carry it as it is.

use std::error::Error;

use crate::ids::{PartitionId, Sequence, ShardId};

/// A record read back from a changelog partition; `value` `None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogRecord {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Sends records to the changelog topic.
pub trait ChangelogWriter {
    type Error: Error + Send + Sync + 'static;

    /// Queues one record for changelog partition `partition` (`value` `None`: a tombstone).
    /// Records of one partition must be kept in the order sent, as Kafka keeps a producer's.
    fn send(&mut self, partition: u32, key: &[u8], value: Option<&[u8]>)
        -> Result<(), Self::Error>;

    /// Returns once every record sent so far is acknowledged (durably in the log), or fails if
    /// any was refused or not acknowledged in time.
    fn flush(&mut self) -> Result<(), Self::Error>;
}

/// Reads one changelog partition, from its first record.
pub trait ChangelogReader {
    type Error: Error + Send + Sync + 'static;

    /// The next record in log order, or `None` once the end of the log as it was when the
    /// read started is reached.
    fn next_record(&mut self) -> Result<Option<ChangelogRecord>, Self::Error>;
}

/// What one commit writes for one partition. Apply, in one atomic write with the other
/// partitions of the commit: when `replace`, delete everything stored for the partition; then
/// delete its deltas up to `delete_deltas_through`; then put the head, the snapshots (each
/// replacing the shard's previous one) and the deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionWrite {
    pub partition: PartitionId,
    pub replace: bool,
    pub delete_deltas_through: Option<Sequence>,
    /// The partition's head: where it stands, with its meta (the library's bytes).
    pub head: Vec<u8>,
    pub snapshots: Vec<(ShardId, Vec<u8>)>,
    pub deltas: Vec<(Sequence, Vec<u8>)>,
}

/// What the store holds for one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredPartition {
    pub head: Vec<u8>,
    pub snapshots: Vec<(ShardId, Vec<u8>)>,
    /// In any order.
    pub deltas: Vec<(Sequence, Vec<u8>)>,
}

/// The local store the library keeps partitions in, in its own layout.
pub trait Store {
    type Error: Error + Send + Sync + 'static;

    /// Writes every partition of one commit in one atomic write: after a crash, all of it is
    /// there or none.
    fn commit(&mut self, writes: &[PartitionWrite]) -> Result<(), Self::Error>;

    /// What is stored for `partition`, or `None` when it has no head.
    fn load(&self, partition: &PartitionId) -> Result<Option<StoredPartition>, Self::Error>;
}
