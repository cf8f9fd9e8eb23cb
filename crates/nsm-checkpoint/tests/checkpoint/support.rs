//! What the tests share: a caller's model of a partition, checkpoints built from it, restores
//! read back as states, and a runner of scripted owners (restarts, hand-offs, faults) that
//! knows, for every checkpoint number, the state it must restore to.

use std::collections::BTreeMap;
use std::convert::Infallible;

use nsm_checkpoint::testing::{
    ChangelogFault, MemoryChangelog, MemoryChangelogError, MemoryChangelogReader,
    MemoryChangelogWriter, MemoryHeadStore, MemoryStore, MemoryStoreError,
};
use nsm_checkpoint::{
    restore_from_changelog, restore_from_store, restore_head, ChangelogReader, Checkpoint,
    CheckpointConfig, Checkpointer, CommitError, CommitReport, Epoch, FrameId, HeadsOnly,
    LineBroken, LineOutcome, LineRestore, LineRestored, OpenError, PartitionId, RecordKey,
    RecordPart, RestoreError, RestoreSink, RestoredPartition, RetiredFrames, SeedError, SeedShard,
    ShardId, SnapshotRows,
};
use xxhash_rust::xxh3::xxh3_64;

pub type Owner = Checkpointer<MemoryChangelogWriter, MemoryStore>;
pub type HeadOwner = Checkpointer<MemoryChangelogWriter, MemoryHeadStore, HeadsOnly>;
pub type CommitFailure = CommitError<MemoryChangelogError, MemoryStoreError>;
pub type OpenFailure = OpenError<MemoryChangelogError, MemoryStoreError>;
pub type SeedFailure = SeedError<MemoryChangelogError, MemoryStoreError, Infallible>;

/// The kind of store an owner writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The library's whole layout ([`MemoryStore`]).
    Blobs,
    /// The library's heads beside the caller's rows ([`MemoryHeadStore`]).
    Heads,
}

pub const KINDS: [Kind; 2] = [Kind::Blobs, Kind::Heads];

/// A store of either kind.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Blobs(MemoryStore),
    Heads(MemoryHeadStore),
}

impl AnyStore {
    pub fn new(kind: Kind) -> AnyStore {
        match kind {
            Kind::Blobs => AnyStore::Blobs(MemoryStore::new()),
            Kind::Heads => AnyStore::Heads(MemoryHeadStore::new()),
        }
    }

    pub fn fork(&self) -> AnyStore {
        match self {
            AnyStore::Blobs(store) => AnyStore::Blobs(store.fork()),
            AnyStore::Heads(store) => AnyStore::Heads(store.fork()),
        }
    }

    pub fn fail_commit(&self, commit: u64) {
        match self {
            AnyStore::Blobs(store) => store.fail_commit(commit),
            AnyStore::Heads(store) => store.fail_commit(commit),
        }
    }

    pub fn commits(&self) -> u64 {
        match self {
            AnyStore::Blobs(store) => store.commits(),
            AnyStore::Heads(store) => store.commits(),
        }
    }

    /// The partition as the store holds it: restored from the blobs, or the caller's rows with
    /// the head's meta.
    pub fn state(&self, config: &CheckpointConfig, partition: &PartitionId) -> State {
        match self {
            AnyStore::Blobs(store) => State::of(config, &from_store(config, store, partition)),
            AnyStore::Heads(store) => State {
                meta: restore_head(config, store, partition)
                    .expect("the head store restores")
                    .meta,
                rows: store.rows(partition),
            },
        }
    }
}

/// An owner writing a store of either kind, driven the same way.
pub enum AnyOwner {
    Blobs(Owner),
    Heads(HeadOwner),
}

impl AnyOwner {
    pub fn new(config: CheckpointConfig, changelog: &MemoryChangelog, store: AnyStore) -> Self {
        match store {
            AnyStore::Blobs(store) => {
                AnyOwner::Blobs(Checkpointer::new(config, changelog.writer(), store))
            }
            AnyStore::Heads(store) => AnyOwner::Heads(Checkpointer::with_head_store(
                config,
                changelog.writer(),
                store,
            )),
        }
    }

    pub fn store(&self) -> AnyStore {
        match self {
            AnyOwner::Blobs(owner) => AnyStore::Blobs(owner.store().clone()),
            AnyOwner::Heads(owner) => AnyStore::Heads(owner.store().clone()),
        }
    }

    pub fn config(&self) -> CheckpointConfig {
        match self {
            AnyOwner::Blobs(owner) => *owner.config(),
            AnyOwner::Heads(owner) => *owner.config(),
        }
    }

    pub fn head(&self, partition: &PartitionId) -> Option<FrameId> {
        match self {
            AnyOwner::Blobs(owner) => owner.head(partition),
            AnyOwner::Heads(owner) => owner.head(partition),
        }
    }

    pub fn is_stopped(&self) -> bool {
        match self {
            AnyOwner::Blobs(owner) => owner.is_stopped(),
            AnyOwner::Heads(owner) => owner.is_stopped(),
        }
    }

    /// Opens `partition` from the store: the blobs restored, or the head read beside the
    /// caller's rows.
    pub fn resume(
        &mut self,
        partition: &PartitionId,
        epoch: Epoch,
    ) -> Result<State, OpenError<MemoryStoreError, MemoryStoreError>> {
        let config = self.config();
        match self {
            AnyOwner::Blobs(owner) => owner
                .resume_from_store(partition, epoch)
                .map(|restored| State::of(&config, &restored)),
            AnyOwner::Heads(owner) => {
                let resumed = owner.resume(partition, epoch)?;
                Ok(State {
                    meta: resumed.meta,
                    rows: owner.store().rows(partition),
                })
            }
        }
    }

    /// Opens `partition` from the changelog: the store replaced by the restore; for a head
    /// store, the streaming restore into the caller's rows, staged and written with the head.
    /// Head-store take-overs hold frames up to a limit that cycles with the epoch (none, a few
    /// hundred bytes, unbounded), so the suites go through second passes too.
    pub fn take_over(
        &mut self,
        partition: &PartitionId,
        epoch: Epoch,
        reader: &mut MemoryChangelogReader,
    ) -> Result<State, OpenFailure> {
        let config = self.config();
        match self {
            AnyOwner::Blobs(owner) => {
                let restored = owner.take_over_from_changelog(partition, epoch, reader)?;
                Ok(State::of(&config, &restored))
            }
            AnyOwner::Heads(owner) => {
                let hold_limit = [0, 300, u64::MAX][(epoch.0 % 3) as usize];
                let start = LineRestore::new(&config, partition, hold_limit);
                let (restored, state) = stream_restore(&config, start, reader, State::default())
                    .map_err(OpenError::Restore)?
                    .expect("a whole read goes on from nothing");
                let rows = state.rows.clone();
                owner
                    .take_over_restored(epoch, restored, |store| {
                        store.stage(partition, rows);
                        Ok(())
                    })
                    .map_err(widen_open)?;
                Ok(state)
            }
        }
    }
}

impl AnyOwner {
    /// Opens `partition` by seeding it from `state` (the caller's copy: its rows, read shard by
    /// shard, and its meta) with `epoch`, retiring `retire`. A head store's caller has the rows
    /// on disk already: they are staged, so the seed's head write holds them too.
    pub fn seed(
        &mut self,
        partition: &PartitionId,
        epoch: Epoch,
        retire: RetiredFrames,
        state: &State,
    ) -> Result<CommitReport, SeedFailure> {
        self.seed_with(partition, epoch, retire, state, |_| {})
    }

    /// [`AnyOwner::seed`], calling `between` before each shard's rows are read (to land
    /// another owner's records in the middle of the seed).
    pub fn seed_with(
        &mut self,
        partition: &PartitionId,
        epoch: Epoch,
        retire: RetiredFrames,
        state: &State,
        mut between: impl FnMut(ShardId),
    ) -> Result<CommitReport, SeedFailure> {
        let config = self.config();
        let by_shard = rows_by_shard(&config, state);
        let mut rows_of_shard = |shard: ShardId, rows: &mut SeedShard<'_>| {
            between(shard);
            for (key, value) in by_shard.get(&shard).into_iter().flatten() {
                rows.row(key, value);
            }
            Ok::<(), Infallible>(())
        };
        match self {
            AnyOwner::Blobs(owner) => {
                owner.seed(partition, &state.meta, epoch, retire, &mut rows_of_shard)
            }
            AnyOwner::Heads(owner) => {
                owner.store().stage(partition, state.rows.clone());
                owner.seed(partition, &state.meta, epoch, retire, &mut rows_of_shard)
            }
        }
    }
}

/// Rows (key, value) by the shard each is in.
pub type RowsByShard = BTreeMap<ShardId, Vec<(Vec<u8>, Vec<u8>)>>;

/// The rows of `state` by the shard each is in.
pub fn rows_by_shard(config: &CheckpointConfig, state: &State) -> RowsByShard {
    let mut by_shard = RowsByShard::new();
    for (key, value) in &state.rows {
        by_shard
            .entry(shard_of(config, key))
            .or_default()
            .push((key.clone(), value.clone()));
    }
    by_shard
}

/// What a read of the whole log (compacted or not) finds of `partition`: the state of its line,
/// and the frames a seed retires.
pub fn read_for_seed(
    config: &CheckpointConfig,
    changelog: &MemoryChangelog,
    partition: &PartitionId,
) -> (State, RetiredFrames) {
    let reader = reader_from(changelog, partition.changelog_partition, false, None);
    let start = LineRestore::new(config, partition, u64::MAX);
    let (restored, state) = stream_restore(config, start, &reader, State::default())
        .expect("the changelog restores")
        .expect("a whole read goes on from nothing");
    (state, RetiredFrames::of_read(&restored))
}

/// Every way a restore of the whole log gives `partition`: into memory and streamed with
/// every hold limit, of the log as it is and compacted. All must be `expected`.
pub fn assert_every_restore_is(
    config: &CheckpointConfig,
    changelog: &MemoryChangelog,
    partition: &PartitionId,
    expected: &State,
    context: &str,
) {
    for compacted in [false, true] {
        let whole = from_changelog(config, changelog, partition, compacted);
        assert_eq!(
            &State::of(config, &whole),
            expected,
            "{context}, into memory (compacted: {compacted})"
        );
        let reader = reader_from(changelog, partition.changelog_partition, compacted, None);
        for limit in [0, 300, u64::MAX] {
            let start = LineRestore::new(config, partition, limit);
            let (restored, state) = stream_restore(config, start, &reader, State::default())
                .expect("the changelog restores")
                .expect("a whole read goes on from nothing");
            assert_eq!(
                &state, expected,
                "{context}, streamed (compacted: {compacted}, limit {limit})"
            );
            assert_eq!(restored.head, whole.head, "{context}, limit {limit}");
        }
    }
}

/// An error of an open that restored nothing, as one of an open that read the changelog.
fn widen_open(error: OpenError<Infallible, MemoryStoreError>) -> OpenFailure {
    match error {
        OpenError::Restore(restore) => match restore {
            RestoreError::Read { source, .. } | RestoreError::Sink { source, .. } => {
                match source {}
            }
            other => panic!("a restore error from an open that restored nothing: {other}"),
        },
        OpenError::Install { partition, source } => OpenError::Install { partition, source },
        OpenError::EpochNotAbove {
            partition,
            requested,
            seen,
        } => OpenError::EpochNotAbove {
            partition,
            requested,
            seen,
        },
        OpenError::AlreadyOpen { partition } => OpenError::AlreadyOpen { partition },
    }
}

/// The caller's side of a streaming restore: its rows in one map, a shard being the keys the
/// caller's shard function puts in it.
pub struct StateSink {
    config: CheckpointConfig,
    pub state: State,
}

impl StateSink {
    pub fn new(config: CheckpointConfig, state: State) -> Self {
        StateSink { config, state }
    }
}

impl RestoreSink for StateSink {
    type Error = Infallible;

    fn drop_range(&mut self, start: &[u8], end: Option<&[u8]>) -> Result<(), Infallible> {
        self.state.rows.retain(|key, _| {
            key.as_slice() < start || end.is_some_and(|end| key.as_slice() >= end)
        });
        Ok(())
    }

    fn put(&mut self, shard: ShardId, key: &[u8], value: &[u8]) -> Result<(), Infallible> {
        assert_eq!(
            shard,
            shard_of(&self.config, key),
            "a change in the wrong shard"
        );
        self.state.rows.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, shard: ShardId, key: &[u8]) -> Result<(), Infallible> {
        assert_eq!(
            shard,
            shard_of(&self.config, key),
            "a change in the wrong shard"
        );
        self.state.rows.remove(key);
        Ok(())
    }

    fn replace_shard(&mut self, shard: ShardId, rows: SnapshotRows<'_>) -> Result<(), Infallible> {
        let config = self.config;
        self.state
            .rows
            .retain(|key, _| shard_of(&config, key) != shard);
        for (key, value) in rows {
            assert_eq!(
                shard,
                shard_of(&config, key),
                "a snapshot row in the wrong shard"
            );
            self.state.rows.insert(key.to_vec(), value.to_vec());
        }
        Ok(())
    }

    fn meta(&mut self, _frame: FrameId, meta: &[u8]) -> Result<(), Infallible> {
        self.state.meta = meta.to_vec();
        Ok(())
    }
}

/// Runs the streaming restore `start` over what `reader` reads (read again from its start for
/// each second pass) into `state` (the local copy's rows when it resumes), checking after every
/// record of a first pass that it holds no more than its limit; the restore and the rows, or
/// the broken line of a resumed read.
pub fn stream_restore(
    config: &CheckpointConfig,
    start: LineRestore,
    reader: &MemoryChangelogReader,
    state: State,
) -> Result<Result<(LineRestored, State), LineBroken>, RestoreError<MemoryChangelogError>> {
    let mut sink = StateSink {
        config: *config,
        state,
    };
    let mut restore = start;
    loop {
        let first_pass = restore.stats().passes == 1;
        let mut pass = reader.clone();
        while let Some(offset) = pass.next_offset() {
            let record = pass
                .next_record()
                .map_err(|source| RestoreError::Read {
                    partition: restore.partition().clone(),
                    source,
                })?
                .expect("a record at the offset");
            restore
                .record(&mut sink, offset, &record.key, record.value.as_deref())
                .map_err(RestoreError::widen)?;
            if first_pass {
                assert!(
                    restore.held_bytes() <= restore.hold_limit(),
                    "{} bytes held, past the limit of {}",
                    restore.held_bytes(),
                    restore.hold_limit()
                );
            }
        }
        match restore.finish(&mut sink).map_err(RestoreError::widen)? {
            LineOutcome::Restored(restored) => {
                assert_eq!(
                    restored.meta, sink.state.meta,
                    "the sink's meta is the head's"
                );
                return Ok(Ok((restored, sink.state)));
            }
            LineOutcome::SecondPass(pass) => {
                assert!(
                    first_pass,
                    "a second pass asks for a third though the log did not change"
                );
                restore = LineRestore::second_pass(pass, &mut sink).map_err(RestoreError::widen)?;
            }
            LineOutcome::Broken(broken) => return Ok(Err(broken)),
        }
    }
}

/// What drives checkpoints: an owner of either kind. A head store's owner stages the caller's
/// rows of each checkpoint before the commit, which writes them with the heads.
pub trait Driven {
    fn due(&self, partition: &PartitionId) -> Vec<ShardId>;
    fn checkpoint_config(&self) -> CheckpointConfig;
    fn commit_with_rows(
        &mut self,
        checkpoints: &[Checkpoint],
        states: &[&State],
    ) -> Result<CommitReport, CommitFailure>;
}

impl Driven for Owner {
    fn due(&self, partition: &PartitionId) -> Vec<ShardId> {
        self.snapshots_due(partition)
    }

    fn checkpoint_config(&self) -> CheckpointConfig {
        *self.config()
    }

    fn commit_with_rows(
        &mut self,
        checkpoints: &[Checkpoint],
        _states: &[&State],
    ) -> Result<CommitReport, CommitFailure> {
        self.commit(checkpoints)
    }
}

impl Driven for AnyOwner {
    fn due(&self, partition: &PartitionId) -> Vec<ShardId> {
        match self {
            AnyOwner::Blobs(owner) => owner.snapshots_due(partition),
            AnyOwner::Heads(owner) => owner.snapshots_due(partition),
        }
    }

    fn checkpoint_config(&self) -> CheckpointConfig {
        self.config()
    }

    fn commit_with_rows(
        &mut self,
        checkpoints: &[Checkpoint],
        states: &[&State],
    ) -> Result<CommitReport, CommitFailure> {
        match self {
            AnyOwner::Blobs(owner) => owner.commit(checkpoints),
            AnyOwner::Heads(owner) => {
                for (checkpoint, state) in checkpoints.iter().zip(states) {
                    owner
                        .store()
                        .stage(checkpoint.partition(), state.rows.clone());
                }
                owner.commit(checkpoints)
            }
        }
    }
}

pub fn config(shards: u32, max_chunk_bytes: usize) -> CheckpointConfig {
    CheckpointConfig::new(shards, max_chunk_bytes).expect("a valid configuration")
}

/// The caller's shard function: the top bits of a hash of the key.
pub fn shard_of(config: &CheckpointConfig, key: &[u8]) -> ShardId {
    config.shard_of_hash(xxh3_64(key))
}

/// A partition's state as a caller sees it: its meta and its rows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    pub meta: Vec<u8>,
    pub rows: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl State {
    /// The state a restore rebuilt; every row must be in the shard its key belongs to.
    pub fn of(config: &CheckpointConfig, restored: &RestoredPartition) -> State {
        let mut rows = BTreeMap::new();
        for (shard, key, value) in restored.rows() {
            assert_eq!(
                shard,
                shard_of(config, key),
                "row {} restored into the wrong shard",
                key.escape_ascii()
            );
            rows.insert(key.to_vec(), value.to_vec());
        }
        State {
            meta: restored.meta.clone(),
            rows,
        }
    }

    /// The checkpoint number a scripted meta names (zero for the empty state).
    pub fn checkpoint_number(&self) -> u64 {
        checkpoint_number(&self.meta)
    }
}

pub fn meta_of(partition: usize, number: u64) -> Vec<u8> {
    format!("partition {partition} checkpoint {number}").into_bytes()
}

pub fn checkpoint_number(meta: &[u8]) -> u64 {
    if meta.is_empty() {
        return 0;
    }
    let text = String::from_utf8_lossy(meta);
    text.rsplit(' ')
        .next()
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("not a scripted meta: {text}"))
}

/// One change a caller makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    DropPrefix(Vec<u8>),
    /// From the first key (included) to the second (excluded).
    DropRange(Vec<u8>, Vec<u8>),
}

impl Op {
    /// Whether this op drops `key`.
    fn drops(&self, key: &[u8]) -> bool {
        match self {
            Op::DropPrefix(prefix) => key.starts_with(prefix),
            Op::DropRange(start, end) => key >= start.as_slice() && key < end.as_slice(),
            Op::Put(..) | Op::Delete(_) => false,
        }
    }
}

pub fn put(key: &str, value: &str) -> Op {
    Op::Put(key.as_bytes().to_vec(), value.as_bytes().to_vec())
}

pub fn delete(key: &str) -> Op {
    Op::Delete(key.as_bytes().to_vec())
}

pub fn drop_prefix(prefix: &str) -> Op {
    Op::DropPrefix(prefix.as_bytes().to_vec())
}

pub fn drop_range(start: &str, end: &str) -> Op {
    Op::DropRange(start.as_bytes().to_vec(), end.as_bytes().to_vec())
}

/// Applies `ops` to `state` as a checkpoint does: drops first, then changes in order.
pub fn apply(state: &mut State, ops: &[Op], meta: Vec<u8>) {
    for op in ops {
        if matches!(op, Op::DropPrefix(_) | Op::DropRange(..)) {
            state.rows.retain(|key, _| !op.drops(key));
        }
    }
    for op in ops {
        match op {
            Op::Put(key, value) => {
                state.rows.insert(key.clone(), value.clone());
            }
            Op::Delete(key) => {
                state.rows.remove(key);
            }
            Op::DropPrefix(_) | Op::DropRange(..) => {}
        }
    }
    state.meta = meta;
}

/// The checkpoint of `ops`, which take `before` to `after`, with the snapshots of `snapshots`
/// (their rows in `after`).
pub fn checkpoint(
    config: &CheckpointConfig,
    partition: &PartitionId,
    ops: &[Op],
    after: &State,
    snapshots: &[ShardId],
) -> Checkpoint {
    let mut checkpoint = Checkpoint::new(partition.clone(), after.meta.clone());
    for op in ops {
        match op {
            Op::Put(key, value) => checkpoint.put(shard_of(config, key), key, value),
            Op::Delete(key) => checkpoint.delete(shard_of(config, key), key),
            Op::DropPrefix(prefix) => checkpoint.drop_prefix(prefix),
            Op::DropRange(start, end) => checkpoint.drop_range(start, end),
        }
    }
    if !snapshots.is_empty() {
        for shard in snapshots {
            checkpoint.snapshot_shard(*shard);
        }
        for (key, value) in &after.rows {
            let shard = shard_of(config, key);
            if snapshots.contains(&shard) {
                checkpoint.snapshot_row(shard, key, value);
            }
        }
    }
    checkpoint
}

/// Applies `ops` to `state` with `meta`, and commits the checkpoint of it (snapshotting the
/// shards due) through `owner`.
pub fn commit_ops<O: Driven>(
    owner: &mut O,
    partition: &PartitionId,
    state: &mut State,
    ops: &[Op],
    meta: &str,
) -> CommitReport {
    apply(state, ops, meta.as_bytes().to_vec());
    let config = owner.checkpoint_config();
    let snapshots = owner.due(partition);
    let checkpoint = checkpoint(&config, partition, ops, state, &snapshots);
    owner
        .commit_with_rows(&[checkpoint], &[state])
        .expect("the commit goes through")
}

pub fn from_store(
    config: &CheckpointConfig,
    store: &MemoryStore,
    partition: &PartitionId,
) -> RestoredPartition {
    restore_from_store(config, store, partition).expect("the store restores")
}

pub fn from_changelog(
    config: &CheckpointConfig,
    changelog: &MemoryChangelog,
    partition: &PartitionId,
    compacted: bool,
) -> RestoredPartition {
    let mut reader = if compacted {
        changelog.compacted_reader(partition.changelog_partition)
    } else {
        changelog.reader(partition.changelog_partition)
    };
    restore_from_changelog(config, &mut reader, partition).expect("the changelog restores")
}

/// Whether the log holds the end marker of `frame` and every chunk it counts.
pub fn frame_is_whole_in_log(
    changelog: &MemoryChangelog,
    partition: &PartitionId,
    frame: FrameId,
) -> bool {
    let records = changelog.records(partition.changelog_partition);
    let latest = |part: RecordPart| {
        let key = RecordKey::encode(partition, frame, part);
        records
            .iter()
            .rev()
            .find(|record| record.key == key)
            .and_then(|record| record.value.clone())
    };
    let Some(end) = latest(RecordPart::End) else {
        return false;
    };
    // The chunk count is the first field after the format and kind bytes.
    let chunks = u32::from_be_bytes([end[2], end[3], end[4], end[5]]);
    (0..chunks).all(|index| latest(RecordPart::Chunk(index)).is_some())
}

/// A step of a scripted run.
#[derive(Debug, Clone)]
pub enum Step {
    /// One commit: a checkpoint of each partition named, with its ops.
    Commit(Vec<(usize, Vec<Op>)>),
    /// The owner restarts: a new checkpointer on the same store, resumed from it, a higher
    /// epoch.
    Restart,
    /// Another instance takes the partitions: a new, empty store, restored from the changelog.
    HandOff { compacted: bool },
}

/// How the first owner after a failure opens the partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    ResumeStore,
    TakeOver { compacted: bool },
}

/// A fault a run meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    Changelog(ChangelogFault),
    /// The store write numbered so, counted over the run's stores.
    StoreWrite(u64),
}

/// A scripted run of owners over partitions sharing one changelog partition.
pub struct Runner {
    pub kind: Kind,
    pub config: CheckpointConfig,
    pub partitions: Vec<PartitionId>,
    pub steps: Vec<Step>,
    /// For each partition, the state of each checkpoint number (zero: empty).
    pub expected: Vec<Vec<State>>,
    pub changelog: MemoryChangelog,
    /// The store of the owner that last opened the partitions.
    pub store: AnyStore,
    owner: Option<AnyOwner>,
    next_epoch: u64,
    /// The checkpoint number each partition has in the current owner's store.
    pub stored: Vec<u64>,
    fault: Fault,
    store_writes: u64,
    failed_step: Option<usize>,
}

impl Runner {
    pub fn new(
        kind: Kind,
        config: CheckpointConfig,
        partitions: usize,
        steps: Vec<Step>,
    ) -> Runner {
        let partitions: Vec<PartitionId> = (0..partitions)
            .map(|index| PartitionId::new(3, format!("input-{index}")))
            .collect();
        let mut expected = vec![vec![State::default()]; partitions.len()];
        for step in &steps {
            if let Step::Commit(entries) = step {
                for (partition, ops) in entries {
                    let history = &mut expected[*partition];
                    let mut state = history.last().cloned().unwrap_or_default();
                    apply(&mut state, ops, meta_of(*partition, history.len() as u64));
                    history.push(state);
                }
            }
        }
        Runner {
            kind,
            config,
            stored: vec![0; partitions.len()],
            partitions,
            steps,
            expected,
            changelog: MemoryChangelog::new(),
            store: AnyStore::new(kind),
            owner: None,
            next_epoch: 1,
            fault: Fault::None,
            store_writes: 0,
            failed_step: None,
        }
    }

    /// An independent copy of the run as it stands, its owner closed (it crashed).
    pub fn fork(&self) -> Runner {
        Runner {
            kind: self.kind,
            config: self.config,
            partitions: self.partitions.clone(),
            steps: self.steps.clone(),
            expected: self.expected.clone(),
            changelog: self.changelog.fork(),
            store: self.store.fork(),
            owner: None,
            next_epoch: self.next_epoch,
            stored: self.stored.clone(),
            fault: Fault::None,
            store_writes: self.store_writes,
            failed_step: self.failed_step,
        }
    }

    /// Store writes made or attempted in the run.
    pub fn store_writes(&self) -> u64 {
        self.store_writes
    }

    fn take_epoch(&mut self) -> Epoch {
        self.next_epoch += 1;
        Epoch(self.next_epoch - 1)
    }

    /// Arms the store fault if the store write about to be made is the one it names.
    fn before_store_write(&mut self, store: &AnyStore) {
        if self.fault == Fault::StoreWrite(self.store_writes) {
            store.fail_commit(store.commits());
        }
        self.store_writes += 1;
    }

    /// Opens every partition on a new owner; false when the store write of a take-over failed.
    fn open(&mut self, recovery: Recovery) -> bool {
        let epoch = self.take_epoch();
        let store = match recovery {
            Recovery::ResumeStore => self.store.clone(),
            Recovery::TakeOver { .. } => AnyStore::new(self.kind),
        };
        let mut owner = AnyOwner::new(self.config, &self.changelog, store.clone());
        let mut numbers = Vec::new();
        for partition in self.partitions.clone() {
            let restored = match recovery {
                Recovery::ResumeStore => {
                    owner.resume(&partition, epoch).expect("the store restores")
                }
                Recovery::TakeOver { compacted } => {
                    self.before_store_write(&store);
                    let mut reader = if compacted {
                        self.changelog
                            .compacted_reader(partition.changelog_partition)
                    } else {
                        self.changelog.reader(partition.changelog_partition)
                    };
                    match owner.take_over(&partition, epoch, &mut reader) {
                        Ok(restored) => restored,
                        Err(nsm_checkpoint::OpenError::Install { .. }) => return false,
                        Err(error) => panic!("take-over of {partition} failed: {error}"),
                    }
                }
            };
            numbers.push(checkpoint_number(&restored.meta));
        }
        self.store = store;
        self.stored = numbers;
        self.owner = Some(owner);
        true
    }

    /// Runs the script from its start with `fault`; returns whether it ran to its end.
    pub fn run(&mut self, fault: Fault) -> bool {
        self.fault = fault;
        self.store_writes = 0;
        if let Fault::Changelog(fault) = fault {
            self.changelog.inject(fault);
        }
        self.open(Recovery::ResumeStore) && self.run_from(0)
    }

    /// After a failed run, opens the partitions as `recovery` says and runs the rest of the
    /// script: each partition goes on from the checkpoint it was restored at.
    pub fn recover(&mut self, recovery: Recovery, failed_step: usize) -> bool {
        self.fault = Fault::None;
        self.open(recovery) && self.run_from(failed_step)
    }

    /// The step the run stopped at, if it stopped.
    pub fn failed_step(&self) -> Option<usize> {
        self.failed_step
    }

    fn run_from(&mut self, first: usize) -> bool {
        self.failed_step = None;
        let mut numbers = vec![0u64; self.partitions.len()];
        for (index, step) in self.steps.clone().into_iter().enumerate() {
            let entries = match step {
                Step::Commit(entries) => entries,
                _ if index < first => continue,
                Step::Restart => {
                    self.owner = None;
                    if !self.open(Recovery::ResumeStore) {
                        self.failed_step = Some(index);
                        return false;
                    }
                    continue;
                }
                Step::HandOff { compacted } => {
                    if !self.open(Recovery::TakeOver { compacted }) {
                        self.failed_step = Some(index);
                        return false;
                    }
                    continue;
                }
            };
            let mut checkpoints = Vec::new();
            let mut states = Vec::new();
            let mut committed = Vec::new();
            for (partition, ops) in entries {
                numbers[partition] += 1;
                let number = numbers[partition];
                if index < first || number <= self.stored[partition] {
                    continue;
                }
                let owner = self.owner.as_ref().expect("an owner is open");
                let id = &self.partitions[partition];
                assert_eq!(owner.head(id).map(|head| head.sequence.0), Some(number - 1));
                let after = &self.expected[partition][number as usize];
                let snapshots = owner.due(id);
                checkpoints.push(checkpoint(&self.config, id, &ops, after, &snapshots));
                states.push(after);
                committed.push((partition, number));
            }
            if checkpoints.is_empty() {
                continue;
            }
            let states: Vec<State> = states.into_iter().cloned().collect();
            let store = self.store.clone();
            self.before_store_write(&store);
            let owner = self.owner.as_mut().expect("an owner is open");
            match owner.commit_with_rows(&checkpoints, &states.iter().collect::<Vec<_>>()) {
                Ok(_) => {
                    for (partition, number) in committed {
                        self.stored[partition] = number;
                    }
                }
                Err(_) => {
                    assert!(owner.is_stopped());
                    self.failed_step = Some(index);
                    return false;
                }
            }
        }
        true
    }

    /// The two invariants, for every partition: the store restores exactly its last stored
    /// checkpoint; the changelog, compacted or not, restores exactly some checkpoint, never an
    /// older one than the store's and at most the one being written, from a frame that is whole
    /// in the log.
    pub fn check_restorable(&self, context: &str) {
        for (index, partition) in self.partitions.iter().enumerate() {
            let history = &self.expected[index];
            let from_store = self.store.state(&self.config, partition);
            assert_eq!(
                from_store, history[self.stored[index] as usize],
                "{context}: {partition} from the store"
            );
            for compacted in [false, true] {
                let restored = from_changelog(&self.config, &self.changelog, partition, compacted);
                let state = State::of(&self.config, &restored);
                let number = state.checkpoint_number();
                assert_eq!(
                    state, history[number as usize],
                    "{context}: {partition} from the changelog (compacted: {compacted}) is not \
                     exactly checkpoint {number}"
                );
                assert!(
                    number >= self.stored[index] && number <= self.stored[index] + 1,
                    "{context}: {partition} from the changelog (compacted: {compacted}) is \
                     checkpoint {number}, the store has {}",
                    self.stored[index]
                );
                if restored.head != FrameId::EMPTY {
                    assert!(
                        frame_is_whole_in_log(&self.changelog, partition, restored.head),
                        "{context}: {partition} restored from {} which is not whole in the log",
                        restored.head
                    );
                }
            }
        }
    }

    /// Every partition, from the store and from the changelog compacted or not, is the
    /// script's final state.
    pub fn check_final(&self, context: &str) {
        for (index, partition) in self.partitions.iter().enumerate() {
            let expected = self.expected[index].last().cloned().unwrap_or_default();
            assert_eq!(
                self.store.state(&self.config, partition),
                expected,
                "{context}: {partition} from the store"
            );
            for compacted in [false, true] {
                assert_eq!(
                    State::of(
                        &self.config,
                        &from_changelog(&self.config, &self.changelog, partition, compacted)
                    ),
                    expected,
                    "{context}: {partition} from the changelog (compacted: {compacted})"
                );
            }
        }
    }
}

/// A reader of changelog partition `partition` from `position` on (every record when `None`),
/// of the log as it is or as compaction would leave it (offsets are kept either way).
/// Gives every record `reader` holds to `restore`, in log order, applying into `sink`.
pub fn feed(restore: &mut LineRestore, sink: &mut StateSink, reader: &MemoryChangelogReader) {
    let mut records = reader.clone();
    while let Some(offset) = records.next_offset() {
        let record = records.next_record().expect("reads").expect("a record");
        restore
            .record(sink, offset, &record.key, record.value.as_deref())
            .expect("applies");
    }
}

pub fn reader_from(
    changelog: &MemoryChangelog,
    partition: u32,
    compacted: bool,
    position: Option<u64>,
) -> MemoryChangelogReader {
    let records = if compacted {
        let copy = changelog.fork();
        copy.compact();
        copy.records_with_offsets(partition)
    } else {
        changelog.records_with_offsets(partition)
    };
    MemoryChangelogReader::with_offsets(
        records
            .into_iter()
            .filter(|(offset, _)| position.is_none_or(|position| *offset >= position))
            .collect(),
    )
}

/// The bytes of the largest frame of `partition` in the log: a hold limit of one frame.
pub fn largest_frame_bytes(changelog: &MemoryChangelog, partition: &PartitionId) -> u64 {
    changelog
        .records(partition.changelog_partition)
        .iter()
        .filter(|record| {
            RecordKey::parse(&record.key)
                .ok()
                .flatten()
                .is_some_and(|key| {
                    key.partition_name == partition.name && key.part == RecordPart::End
                })
        })
        .filter_map(|record| record.value.as_ref())
        // The frame length follows the format, kind and chunk count bytes.
        .filter_map(|end| end.get(6..14)?.try_into().ok().map(u64::from_be_bytes))
        .max()
        .unwrap_or(0)
}
