//! In-memory stand-ins for the ports, deterministic, that fail on cue: a changelog that keeps
//! each partition's records in order with their offsets, can be compacted as Kafka compacts
//! (the last record of each key, tombstones removed, offsets kept), and can refuse a send, lose
//! records or fail a flush at record N; a store of each kind that can fail its commit N (the
//! head store with the caller's rows staged beside it, as nsm-state's batch holds them).
//! Handles are shared: a test keeps one to look at what a checkpointer wrote through another.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ids::{PartitionId, Sequence, ShardId};
use crate::ports::{
    Acknowledged, ChangelogReader, ChangelogRecord, ChangelogWriter, HeadStore, HeadWrite,
    PartitionWrite, Store, StoredPartition,
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

/// One changelog partition: its records with their offsets, increasing with gaps where
/// compaction removed records, and the offset the next record gets.
#[derive(Debug, Default, Clone)]
struct LogPartition {
    records: Vec<(u64, ChangelogRecord)>,
    next_offset: u64,
}

impl LogPartition {
    fn push(&mut self, record: ChangelogRecord) -> u64 {
        let offset = self.next_offset;
        self.records.push((offset, record));
        self.next_offset += 1;
        offset
    }
}

#[derive(Debug, Default)]
struct Log {
    partitions: BTreeMap<u32, LogPartition>,
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
            landed: BTreeMap::new(),
        }
    }

    /// A reader of `partition` as it is now, from its first record.
    pub fn reader(&self, partition: u32) -> MemoryChangelogReader {
        MemoryChangelogReader::with_offsets(self.records_with_offsets(partition))
    }

    /// A reader of what compaction would leave of `partition` now (the log is not changed).
    pub fn compacted_reader(&self, partition: u32) -> MemoryChangelogReader {
        MemoryChangelogReader::with_offsets(compacted(&self.records_with_offsets(partition)))
    }

    /// Compacts every partition: the last record of each key stays, in its place; a key whose
    /// last record is a tombstone is removed with it.
    pub fn compact(&self) {
        let mut log = lock(&self.log);
        for partition in log.partitions.values_mut() {
            partition.records = compacted(&partition.records);
        }
    }

    /// Makes `fault` strike when the record it names is sent.
    pub fn inject(&self, fault: ChangelogFault) {
        lock(&self.log).fault = Some(fault);
    }

    /// The records of `partition`, in log order.
    pub fn records(&self, partition: u32) -> Vec<ChangelogRecord> {
        self.records_with_offsets(partition)
            .into_iter()
            .map(|(_, record)| record)
            .collect()
    }

    /// The records of `partition` with their offsets, in log order.
    pub fn records_with_offsets(&self, partition: u32) -> Vec<(u64, ChangelogRecord)> {
        lock(&self.log)
            .partitions
            .get(&partition)
            .map(|partition| partition.records.clone())
            .unwrap_or_default()
    }

    /// The offset the next record of `partition` gets (Kafka's end offset).
    pub fn end_offset(&self, partition: u32) -> u64 {
        lock(&self.log)
            .partitions
            .get(&partition)
            .map_or(0, |partition| partition.next_offset)
    }

    /// Records sent so far by every writer, those lost or refused included.
    pub fn records_sent(&self) -> u64 {
        lock(&self.log).records_sent
    }

    /// Changes the records of `partition` in place: to damage, reorder or plant records. A
    /// partition whose record count changes is given new offsets from its first one on, and its
    /// end offset moves past them; otherwise each place keeps its offset.
    pub fn edit(&self, partition: u32, edit: impl FnOnce(&mut Vec<ChangelogRecord>)) {
        let mut log = lock(&self.log);
        let partition = log.partitions.entry(partition).or_default();
        let offsets: Vec<u64> = partition
            .records
            .iter()
            .map(|(offset, _)| *offset)
            .collect();
        let mut records: Vec<ChangelogRecord> = partition
            .records
            .drain(..)
            .map(|(_, record)| record)
            .collect();
        edit(&mut records);
        if records.len() != offsets.len() {
            let first = offsets.first().copied().unwrap_or(partition.next_offset);
            partition.records = (first..).zip(records).collect();
            let end = first + partition.records.len() as u64;
            partition.next_offset = partition.next_offset.max(end);
        } else {
            partition.records = offsets.into_iter().zip(records).collect();
        }
    }
}

fn compacted(records: &[(u64, ChangelogRecord)]) -> Vec<(u64, ChangelogRecord)> {
    let mut last: HashMap<&[u8], usize> = HashMap::new();
    for (index, (_, record)) in records.iter().enumerate() {
        last.insert(&record.key, index);
    }
    let kept: HashSet<usize> = last.into_values().collect();
    records
        .iter()
        .enumerate()
        .filter(|(index, (_, record))| kept.contains(index) && record.value.is_some())
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
    /// The offset after the last record landed of each partition sent to since the last flush.
    landed: BTreeMap<u32, u64>,
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
        let offset = log
            .partitions
            .entry(partition)
            .or_default()
            .push(ChangelogRecord {
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
            });
        self.landed.insert(partition, offset + 1);
        Ok(())
    }

    fn flush(&mut self) -> Result<Acknowledged, MemoryChangelogError> {
        match self.state {
            WriterState::Healthy => Ok(Acknowledged {
                next_offsets: std::mem::take(&mut self.landed),
            }),
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
    records: Vec<(u64, ChangelogRecord)>,
    next: usize,
    fail_at: Option<usize>,
}

impl MemoryChangelogReader {
    /// A reader of `records`, at offsets from zero.
    pub fn new(records: Vec<ChangelogRecord>) -> Self {
        MemoryChangelogReader::with_offsets((0..).zip(records).collect())
    }

    /// A reader of `records` at the offsets given.
    pub fn with_offsets(records: Vec<(u64, ChangelogRecord)>) -> Self {
        MemoryChangelogReader {
            records,
            next: 0,
            fail_at: None,
        }
    }

    /// The offset of the record the next read returns, if any is left.
    pub fn next_offset(&self) -> Option<u64> {
        self.records.get(self.next).map(|(offset, _)| *offset)
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
        let record = self
            .records
            .get(self.next)
            .map(|(_, record)| record.clone());
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

/// The caller's rows of a partition, as a test's stand-in for nsm-state keeps them.
pub type CallerRows = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Default, Clone)]
struct HeadStoreState {
    heads: BTreeMap<PartitionId, Vec<u8>>,
    rows: BTreeMap<PartitionId, CallerRows>,
    /// Rows staged for the next commit, written with it or dropped when it fails.
    staged: BTreeMap<PartitionId, CallerRows>,
    positions: BTreeMap<u32, u64>,
    commits: u64,
    fail_at: Option<u64>,
}

/// A head-only store in memory, with the caller's rows beside the heads: the caller stages a
/// partition's rows ([`MemoryHeadStore::stage`]) and the next commit writes them with the heads
/// and the positions, whole or not at all, as one RocksDB write batch would.
#[derive(Debug, Clone, Default)]
pub struct MemoryHeadStore {
    state: Arc<Mutex<HeadStoreState>>,
}

impl MemoryHeadStore {
    pub fn new() -> Self {
        MemoryHeadStore::default()
    }

    /// An independent copy of the store as it is now, without its pending fault or staging.
    pub fn fork(&self) -> MemoryHeadStore {
        let state = lock(&self.state);
        MemoryHeadStore {
            state: Arc::new(Mutex::new(HeadStoreState {
                staged: BTreeMap::new(),
                fail_at: None,
                ..state.clone()
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

    /// Stages `rows` as the whole of `partition`'s rows, written by the next commit.
    pub fn stage(&self, partition: &PartitionId, rows: CallerRows) {
        lock(&self.state).staged.insert(partition.clone(), rows);
    }

    /// The caller's rows of `partition` as stored.
    pub fn rows(&self, partition: &PartitionId) -> CallerRows {
        lock(&self.state)
            .rows
            .get(partition)
            .cloned()
            .unwrap_or_default()
    }

    /// The changelog position stored for changelog partition `partition`: the offset after the
    /// last record acknowledged of a commit.
    pub fn position(&self, partition: u32) -> Option<u64> {
        lock(&self.state).positions.get(&partition).copied()
    }
}

impl HeadStore for MemoryHeadStore {
    type Error = MemoryStoreError;

    fn commit(
        &mut self,
        heads: &[HeadWrite],
        acknowledged: &Acknowledged,
    ) -> Result<(), MemoryStoreError> {
        let mut state = lock(&self.state);
        let commit = state.commits;
        state.commits += 1;
        let staged = std::mem::take(&mut state.staged);
        if state.fail_at == Some(commit) {
            state.fail_at = None;
            return Err(MemoryStoreError { commit });
        }
        for write in heads {
            if write.replace {
                state.rows.remove(&write.partition);
            }
            state
                .heads
                .insert(write.partition.clone(), write.head.clone());
        }
        state.rows.extend(staged);
        for (partition, next) in &acknowledged.next_offsets {
            state.positions.insert(*partition, *next);
        }
        Ok(())
    }

    fn load_head(&self, partition: &PartitionId) -> Result<Option<Vec<u8>>, MemoryStoreError> {
        Ok(lock(&self.state).heads.get(partition).cloned())
    }
}
