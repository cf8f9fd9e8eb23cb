//! The things the protocol needs from outside, as traits: a changelog writer, a changelog
//! reader and a local store of one of two kinds. Each is shaped so that a thin adapter
//! implements it: an rdkafka producer whose delivery reports are awaited at `flush`, a consumer
//! assigned to one partition from its first offset, a RocksDB write batch and prefix scans.
//!
//! The two kinds of store: a [`Store`] keeps the partition in the library's own layout (head,
//! snapshot blobs, delta blobs), and restores it alone; a [`HeadStore`] keeps only the library's
//! head of each partition, beside rows the caller keeps in its own layout and writes in the same
//! atomic write.
//!
//! Every port has its own error type; the protocol's errors carry it as it is.

use std::collections::BTreeMap;
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
    /// any was refused or not acknowledged in time; with the offsets acknowledged, so the caller
    /// can keep its changelog positions.
    fn flush(&mut self) -> Result<Acknowledged, Self::Error>;
}

/// What a flush acknowledged: for each changelog partition sent to since the previous flush,
/// the offset after the last record of it acknowledged (Kafka's next offset).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Acknowledged {
    pub next_offsets: BTreeMap<u32, u64>,
}

impl Acknowledged {
    /// The offset after the last record acknowledged of changelog partition `partition`.
    pub fn next_offset(&self, partition: u32) -> Option<u64> {
        self.next_offsets.get(&partition).copied()
    }

    /// Adds what a later flush acknowledged.
    pub fn and(&mut self, later: Acknowledged) {
        for (partition, next) in later.next_offsets {
            let kept = self.next_offsets.entry(partition).or_insert(next);
            *kept = (*kept).max(next);
        }
    }
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

/// What one commit writes for one partition in a [`HeadStore`]: the library's head, which
/// replaces the previous one. `replace` marks a take-over: the caller's rows of the partition
/// are replaced by those it staged from the restore, in the same write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadWrite {
    pub partition: PartitionId,
    pub replace: bool,
    /// The partition's head: where it stands, with its meta (the library's bytes).
    pub head: Vec<u8>,
}

/// A local store that keeps only the library's head of each partition; the rows are the
/// caller's, in its own layout, so a per-key store does not hold the state twice. The caller's
/// adapter writes each commit's heads in one atomic write with the rows of the checkpoint it
/// prepared, and with the changelog positions acknowledged: after a crash, all of it is there
/// or none, so a head never names a checkpoint its rows do not hold.
pub trait HeadStore {
    type Error: Error + Send + Sync + 'static;

    /// Writes the heads of one commit, the caller's rows of it and `acknowledged` (the offsets
    /// the changelog acknowledged for it, empty for a take-over) in one atomic write.
    fn commit(
        &mut self,
        heads: &[HeadWrite],
        acknowledged: &Acknowledged,
    ) -> Result<(), Self::Error>;

    /// The head stored for `partition`, or `None` when it has none.
    fn load_head(&self, partition: &PartitionId) -> Result<Option<Vec<u8>>, Self::Error>;
}

/// Which kind of store a [`Checkpointer`](crate::Checkpointer) writes: [`Blobs`] for a
/// [`Store`], [`HeadsOnly`] for a [`HeadStore`]. A type parameter rather than a trait of the
/// store, so one adapter type may implement both ports.
pub trait StoreKind<S>: sealed::Sealed {
    type Error: Error + Send + Sync + 'static;

    /// Whether the store keeps snapshot and delta blobs (the checkpointer builds them only then).
    const KEEPS_BLOBS: bool;

    fn commit(
        store: &mut S,
        writes: &[PartitionWrite],
        acknowledged: &Acknowledged,
    ) -> Result<(), Self::Error>;

    fn load_head(store: &S, partition: &PartitionId) -> Result<Option<Vec<u8>>, Self::Error>;
}

/// The kind of a [`Store`]: the library's whole layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Blobs;

/// The kind of a [`HeadStore`]: the library's head only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeadsOnly;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Blobs {}
    impl Sealed for super::HeadsOnly {}
}

impl<S: Store> StoreKind<S> for Blobs {
    type Error = S::Error;
    const KEEPS_BLOBS: bool = true;

    fn commit(
        store: &mut S,
        writes: &[PartitionWrite],
        _acknowledged: &Acknowledged,
    ) -> Result<(), S::Error> {
        store.commit(writes)
    }

    fn load_head(store: &S, partition: &PartitionId) -> Result<Option<Vec<u8>>, S::Error> {
        Ok(store.load(partition)?.map(|stored| stored.head))
    }
}

impl<S: HeadStore> StoreKind<S> for HeadsOnly {
    type Error = S::Error;
    const KEEPS_BLOBS: bool = false;

    fn commit(
        store: &mut S,
        writes: &[PartitionWrite],
        acknowledged: &Acknowledged,
    ) -> Result<(), S::Error> {
        let heads: Vec<HeadWrite> = writes
            .iter()
            .map(|write| HeadWrite {
                partition: write.partition.clone(),
                replace: write.replace,
                head: write.head.clone(),
            })
            .collect();
        store.commit(&heads, acknowledged)
    }

    fn load_head(store: &S, partition: &PartitionId) -> Result<Option<Vec<u8>>, S::Error> {
        store.load_head(partition)
    }
}
