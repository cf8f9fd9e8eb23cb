//! In-memory stand-ins for the ports, deterministic, that fail on cue: a changelog that keeps
//! each partition's records in order, can be compacted as Kafka compacts (the last record of
//! each key, tombstones removed), and can refuse a send, lose records or fail a flush at record
//! N; a store that can fail its commit N. Handles are shared: a test keeps one to look at
//! what a checkpointer wrote through another.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ids::{PartitionId, Sequence, ShardId};
use crate::ports::{
    ChangelogReader, ChangelogRecord, ChangelogWriter, PartitionWrite, Store, StoredPartition,
};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fault of the changelog, at record `n` counted from zero over every record sent to it by
/// any writer. It strikes once, the writer it strikes stays failed, and later writers are
/// healthy (a new owner's producer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangelogFault {
    /// The send of record `n` fails: the log holds the `n` records before it.
    RefuseSendAt(u64),
    /// Record `n` and every later one of that writer are lost, and its next flush fails.
    LoseFrom(u64),
    /// Record `n` alone is lost, later ones land, and its writer's next flush fails: records
    /// delivered out of order around a failed one.
    LoseOnly(u64),
}

/// The errors of the in-memory changelog: the faults injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryChangelogError {
    #[error("the changelog refused record {record} (an injected fault)")]
    SendRefused { record: u64 },
    #[error(
        "the changelog did not acknowledge every record (an injected fault at record {record})"
    )]
    NotAcknowledged { record: u64 },
    #[error("the changelog writer failed before, at record {record}")]
    WriterFailed { record: u64 },
    #[error("the changelog read failed at record {record} (an injected fault)")]
    ReadFailed { record: u64 },
}

#[derive(Debug, Default)]
struct Log {
    partitions: BTreeMap<u32, Vec<ChangelogRecord>>,
    records_sent: u64,
    fault: Option<ChangelogFault>,
}

/// A changelog topic in memory.
#[derive(Debug, Clone, Default)]
pub struct MemoryChangelog {
    log: Arc<Mutex<Log>>,
}

impl MemoryChangelog {
    pub fn new() -> Self {
        MemoryChangelog::default()
    }

    /// An independent copy of the log as it is now, without its pending fault.
    pub fn fork(&self) -> MemoryChangelog {
        let log = lock(&self.log);
        MemoryChangelog {
            log: Arc::new(Mutex::new(Log {
                partitions: log.partitions.clone(),
                records_sent: log.records_sent,
                fault: None,
            })),
        }
    }

    /// A writer (an owner's producer).
    pub fn writer(&self) -> MemoryChangelogWriter {
        MemoryChangelogWriter {
            log: self.log.clone(),
            state: WriterState::Healthy,
        }
    }

    /// A reader of `partition` as it is now, from its first record.
    pub fn reader(&self, partition: u32) -> MemoryChangelogReader {
        MemoryChangelogReader::new(self.records(partition))
    }

    /// A reader of what compaction would leave of `partition` now (the log is not changed).
    pub fn compacted_reader(&self, partition: u32) -> MemoryChangelogReader {
        MemoryChangelogReader::new(compacted(&self.records(partition)))
    }

    /// Compacts every partition: the last record of each key stays, in its place; a key whose
    /// last record is a tombstone is removed with it.
    pub fn compact(&self) {
        let mut log = lock(&self.log);
        for records in log.partitions.values_mut() {
            *records = compacted(records);
        }
    }

    /// Makes `fault` strike when the record it names is sent.
    pub fn inject(&self, fault: ChangelogFault) {
        lock(&self.log).fault = Some(fault);
    }

    /// The records of `partition`, in log order.
    pub fn records(&self, partition: u32) -> Vec<ChangelogRecord> {
        lock(&self.log)
            .partitions
            .get(&partition)
            .cloned()
            .unwrap_or_default()
    }

    /// Records sent so far by every writer, those lost or refused included.
    pub fn records_sent(&self) -> u64 {
        lock(&self.log).records_sent
    }

    /// Changes the records of `partition` in place: to damage, reorder or plant records.
    pub fn edit(&self, partition: u32, edit: impl FnOnce(&mut Vec<ChangelogRecord>)) {
        edit(lock(&self.log).partitions.entry(partition).or_default());
    }
}

fn compacted(records: &[ChangelogRecord]) -> Vec<ChangelogRecord> {
    let mut last: HashMap<&[u8], usize> = HashMap::new();
    for (index, record) in records.iter().enumerate() {
        last.insert(&record.key, index);
    }
    let kept: HashSet<usize> = last.into_values().collect();
    records
        .iter()
        .enumerate()
        .filter(|(index, record)| kept.contains(index) && record.value.is_some())
        .map(|(_, record)| record.clone())
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    Healthy,
    Losing { record: u64 },
    LostOne { record: u64 },
    Failed { record: u64 },
}

/// A writer of a [`MemoryChangelog`]: a record lands in the log when sent, unless a fault
/// loses it.
#[derive(Debug)]
pub struct MemoryChangelogWriter {
    log: Arc<Mutex<Log>>,
    state: WriterState,
}

impl ChangelogWriter for MemoryChangelogWriter {
    type Error = MemoryChangelogError;

    fn send(
        &mut self,
        partition: u32,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), MemoryChangelogError> {
        if let WriterState::Failed { record } = self.state {
            return Err(MemoryChangelogError::WriterFailed { record });
        }
        let mut log = lock(&self.log);
        let record = log.records_sent;
        log.records_sent += 1;
        match log.fault {
            Some(ChangelogFault::RefuseSendAt(at)) if record >= at => {
                log.fault = None;
                self.state = WriterState::Failed { record };
                return Err(MemoryChangelogError::SendRefused { record });
            }
            Some(ChangelogFault::LoseFrom(at)) if record >= at => {
                log.fault = None;
                self.state = WriterState::Losing { record };
            }
            Some(ChangelogFault::LoseOnly(at)) if record >= at => {
                log.fault = None;
                self.state = WriterState::LostOne { record };
                return Ok(());
            }
            _ => {}
        }
        if let WriterState::Losing { .. } = self.state {
            return Ok(());
        }
        log.partitions
            .entry(partition)
            .or_default()
            .push(ChangelogRecord {
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
            });
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MemoryChangelogError> {
        match self.state {
            WriterState::Healthy => Ok(()),
            WriterState::Losing { record } | WriterState::LostOne { record } => {
                self.state = WriterState::Failed { record };
                Err(MemoryChangelogError::NotAcknowledged { record })
            }
            WriterState::Failed { record } => Err(MemoryChangelogError::WriterFailed { record }),
        }
    }
}

/// A reader of a copy of a [`MemoryChangelog`] partition.
#[derive(Debug, Clone)]
pub struct MemoryChangelogReader {
    records: Vec<ChangelogRecord>,
    next: usize,
    fail_at: Option<usize>,
}

impl MemoryChangelogReader {
    pub fn new(records: Vec<ChangelogRecord>) -> Self {
        MemoryChangelogReader {
            records,
            next: 0,
            fail_at: None,
        }
    }

    /// Makes the read of record `record` (from zero) fail.
    pub fn failing_at(mut self, record: usize) -> Self {
        self.fail_at = Some(record);
        self
    }
}

impl ChangelogReader for MemoryChangelogReader {
    type Error = MemoryChangelogError;

    fn next_record(&mut self) -> Result<Option<ChangelogRecord>, MemoryChangelogError> {
        if self.fail_at == Some(self.next) {
            return Err(MemoryChangelogError::ReadFailed {
                record: self.next as u64,
            });
        }
        let record = self.records.get(self.next).cloned();
        self.next += 1;
        Ok(record)
    }
}

/// The error of the in-memory store: the fault injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the store failed commit {commit} (an injected fault); nothing of it was written")]
pub struct MemoryStoreError {
    pub commit: u64,
}

/// What one store commit wrote, as a RocksDB write batch would count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreCommitStats {
    pub values_put: u64,
    pub bytes_put: u64,
    pub range_deletes: u64,
}

#[derive(Debug, Default, Clone)]
struct StoredData {
    head: Vec<u8>,
    snapshots: BTreeMap<ShardId, Vec<u8>>,
    deltas: BTreeMap<Sequence, Vec<u8>>,
}

#[derive(Debug, Default)]
struct StoreState {
    partitions: BTreeMap<PartitionId, StoredData>,
    commits: u64,
    fail_at: Option<u64>,
    last_commit: StoreCommitStats,
}

/// A local store in memory; a commit is applied whole or not at all.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<StoreState>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// An independent copy of the store as it is now, without its pending fault.
    pub fn fork(&self) -> MemoryStore {
        let state = lock(&self.state);
        MemoryStore {
            state: Arc::new(Mutex::new(StoreState {
                partitions: state.partitions.clone(),
                commits: state.commits,
                fail_at: None,
                last_commit: state.last_commit,
            })),
        }
    }

    /// Makes commit `commit` (counted from zero over this store's life) fail, writing nothing.
    pub fn fail_commit(&self, commit: u64) {
        lock(&self.state).fail_at = Some(commit);
    }

    /// Commits attempted so far, the failed one included.
    pub fn commits(&self) -> u64 {
        lock(&self.state).commits
    }

    pub fn last_commit(&self) -> StoreCommitStats {
        lock(&self.state).last_commit
    }

    /// The delta blobs held for `partition`.
    pub fn stored_deltas(&self, partition: &PartitionId) -> usize {
        lock(&self.state)
            .partitions
            .get(partition)
            .map_or(0, |data| data.deltas.len())
    }
}

impl Store for MemoryStore {
    type Error = MemoryStoreError;

    fn commit(&mut self, writes: &[PartitionWrite]) -> Result<(), MemoryStoreError> {
        let mut state = lock(&self.state);
        let commit = state.commits;
        state.commits += 1;
        if state.fail_at == Some(commit) {
            state.fail_at = None;
            return Err(MemoryStoreError { commit });
        }
        let mut stats = StoreCommitStats::default();
        let mut put = |bytes: &[u8]| {
            stats.values_put += 1;
            stats.bytes_put += bytes.len() as u64;
        };
        for write in writes {
            let data = state.partitions.entry(write.partition.clone()).or_default();
            if write.replace {
                *data = StoredData::default();
                stats.range_deletes += 2;
            }
            if let Some(through) = write.delete_deltas_through {
                data.deltas.retain(|sequence, _| *sequence > through);
                stats.range_deletes += 1;
            }
            put(&write.head);
            data.head = write.head.clone();
            for (shard, blob) in &write.snapshots {
                put(blob);
                data.snapshots.insert(*shard, blob.clone());
            }
            for (sequence, blob) in &write.deltas {
                put(blob);
                data.deltas.insert(*sequence, blob.clone());
            }
        }
        state.last_commit = stats;
        Ok(())
    }

    fn load(&self, partition: &PartitionId) -> Result<Option<StoredPartition>, MemoryStoreError> {
        Ok(lock(&self.state)
            .partitions
            .get(partition)
            .map(|data| StoredPartition {
                head: data.head.clone(),
                snapshots: data
                    .snapshots
                    .iter()
                    .map(|(shard, blob)| (*shard, blob.clone()))
                    .collect(),
                deltas: data
                    .deltas
                    .iter()
                    .map(|(sequence, blob)| (*sequence, blob.clone()))
                    .collect(),
            }))
    }
}
