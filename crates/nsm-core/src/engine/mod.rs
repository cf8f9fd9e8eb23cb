//! The aggregation engine: applies events to per-partition window state, tracks the
//! watermark, and hands out the changes to persist.
//!
//! State is kept per Kafka partition so that each partition's values are a deterministic
//! function of its events up to an offset: that is what lets the offset be stored atomically
//! with the state, and a restart from stored state give exactly the values of an
//! uninterrupted run. The engine never does I/O; the caller persists [`ChangeSet`]s.

mod apply;
mod baseline;
mod changes;
mod dedup;
mod filter;
mod funnel;
mod members;
mod pair;
mod plan;
mod segment;
mod state;
mod threshold;
mod trailing;
mod trailing_threshold;
mod upstream;
mod view;

use std::collections::HashMap;

use crate::event::{NoRecord, RecordMeta};

pub use baseline::{progress_step_ms, Baseline, BaselinePoint, Progress, SEASONAL_WEEKS};
pub use changes::{
    member_shard_of, ChangeSet, MemberInsert, MemberRangeDelete, MemberRow, MemberShardRows,
    PartitionChanges, SegmentUpsert, WindowDelete, WindowUpsert, WindowsBefore, MEMBER_SHARDS,
};
pub use funnel::FUNNEL_WINDOW;
pub use members::{CountingReader, EntryValue, MemoryReader, StateReadError, StateReader};
pub use plan::{
    entity_hash, DedupSettings, EngineSettings, Forwards, MessageKey, Plan, Route, Stage,
};
pub use segment::{metric_segments, segment_label, top_segments, SegmentValue, OVERFLOW_LABEL};
pub use state::{AggValue, PartitionSnapshot, StoredGap, StoredSegment, StoredWindow, NO_PREVIOUS};
pub use trailing::last_occurrence_bucket;
pub use upstream::{Epoch, Forwarded, Inputs, Mark, Upstream};
pub use view::{
    completeness_watermark, instance_clock, MetricValues, PartitionStatus, WindowValue,
};

use crate::reject::Rejection;
use crate::{EpochMillis, PartitionKey};
use state::PartitionState;

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The event was valid and counted by `matched` metrics (possibly none), some of them
    /// re-keyed: an input partition forwards it to the repartition topic's partitions of
    /// `forward`.
    Applied {
        event_time_ms: EpochMillis,
        matched: usize,
        forward: Forwards,
    },
    /// The offset was already applied before a restart; the message is skipped.
    AlreadyApplied,
    /// A forwarded record whose source offset was already applied (sent again after a crash
    /// or a rebalance), or a record carrying only its source's time: skipped.
    Resent,
    /// A valid event whose id was already applied within the dedup horizon: counted once,
    /// skipped now (not a dead letter: nothing is wrong with it).
    Duplicate { event_time_ms: EpochMillis },
    /// The event was not applied; it belongs in the dead-letter topic.
    Rejected(Rejection),
    /// Stored state could not be read while applying the event. The partition takes no more
    /// events and stores nothing more: the caller must stop and restart from stored state.
    StateUnreadable(members::StateReadError),
}

/// Bytes of per-entity entries the engine keeps in memory, split evenly between the owned
/// partitions (`state.memory_limit`). An entry takes about 40 bytes (a 28-byte slot of a hash
/// table between 7/12 and 7/8 full), so this holds about 3.3 million: every entry of the
/// bench config's memory run at 1M users; past it, shards of the least recently used windows
/// are read back from RocksDB when needed. With RocksDB's own 128 MiB (block cache and
/// memtables) it keeps a process at 5M users under 512 MiB (BENCHMARKS.md: 420.9 MiB for every
/// kind of metric; 256 MiB made 528.3 for the core config).
pub const DEFAULT_STATE_MEMORY: usize = 128 << 20;

/// Per-entity entries written since the last checkpoint at which the engine asks for one
/// ([`Engine::checkpoint_due`]), however soon. What a checkpoint holds in memory (these
/// entries, then the batch and the changelog records made of them, then RocksDB's memtables
/// taking the batch whole) grows with them, so without a bound it grows with the rate of
/// events: the memory bench, storing every 50,000 events with every kind of metric, peaked
/// with a written-entry table of 2^19 slots (34 MiB) and a batch of 38 MiB (heaptrack, at 1M
/// users). `state.flush_max_entries` sets it.
///
/// 100,000 stays below the 114,688 at which the table of written entries doubles to 2^18
/// slots. With the bench config's 3.8 entries an event (as `nsm-bench core` counts them), a
/// checkpoint every 200 ms (the default flush interval) reaches it above about 130,000 events
/// a second: it bounds a backlog being caught up, not the steady state.
pub const DEFAULT_MAX_CHECKPOINT_ENTRIES: usize = 100_000;

/// The partition a message at `offset` is applied to, or the outcome instead: applied before
/// (a restart reads from an older offset), or the partition stopped by a read failure.
fn partition_at<'p>(
    partitions: &'p mut HashMap<PartitionKey, PartitionState>,
    key: &PartitionKey,
    offset: i64,
) -> Result<&'p mut PartitionState, Outcome> {
    let Some(state) = partitions.get_mut(key) else {
        debug_assert!(false, "apply on partition {key} that was never restored");
        return Err(Outcome::AlreadyApplied);
    };
    if state.next_offset.is_some_and(|next| offset < next) {
        return Err(Outcome::AlreadyApplied);
    }
    if state.poisoned {
        return Err(Outcome::StateUnreadable(members::StateReadError(format!(
            "partition {key} stopped after an earlier read failure"
        ))));
    }
    Ok(state)
}

/// The engine for all partitions this instance owns.
pub struct Engine {
    plan: Plan,
    partitions: HashMap<PartitionKey, PartitionState>,
    /// Where entries that left memory (or were stored before a restart) are read.
    reader: Box<dyn StateReader>,
    /// Set when the engine stores its own members (see [`Engine::new`]).
    memory: Option<MemoryReader>,
    /// Bytes of entries kept in memory, in all partitions.
    state_memory: usize,
    max_checkpoint_entries: usize,
}

impl Engine {
    /// An engine that keeps members in memory: each change set's members are stored in a
    /// [`MemoryReader`] when taken. For tests and in-process use; memory grows with them.
    pub fn new(plan: Plan) -> Self {
        let memory = MemoryReader::default();
        Self {
            plan,
            partitions: HashMap::new(),
            reader: Box::new(memory.clone()),
            memory: Some(memory),
            state_memory: DEFAULT_STATE_MEMORY,
            max_checkpoint_entries: DEFAULT_MAX_CHECKPOINT_ENTRIES,
        }
    }

    /// An engine that reads stored members from `reader`, which the caller keeps up to date
    /// by storing every [`ChangeSet`] before the next one is taken. At most `state_memory`
    /// bytes of entries are kept in memory, split between the owned partitions.
    pub fn with_reader(plan: Plan, reader: Box<dyn StateReader>, state_memory: usize) -> Self {
        Self {
            plan,
            partitions: HashMap::new(),
            reader,
            memory: None,
            state_memory,
            max_checkpoint_entries: DEFAULT_MAX_CHECKPOINT_ENTRIES,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Takes ownership of a partition, from its stored snapshot (or empty for a new one).
    pub fn restore_partition(&mut self, key: PartitionKey, snapshot: PartitionSnapshot) {
        let share = self.memory_share(self.partitions.len() + 1);
        let state = PartitionState::restore(&self.plan, snapshot, share);
        self.partitions.insert(key, state);
        self.split_memory();
    }

    /// Gives a partition up (after its changes were persisted).
    pub fn remove_partition(&mut self, key: &PartitionKey) {
        if self.partitions.remove(key).is_some() {
            self.split_memory();
        }
    }

    /// Each of `partitions` partitions' share of the memory for entries.
    fn memory_share(&self, partitions: usize) -> usize {
        self.state_memory / partitions.max(1)
    }

    /// Splits the memory for entries evenly between the owned partitions, so that together
    /// they stay within the engine's budget however many are taken or given up.
    fn split_memory(&mut self) {
        let share = self.memory_share(self.partitions.len());
        for state in self.partitions.values_mut() {
            state.members.resize(share);
        }
    }

    pub fn owns(&self, key: &PartitionKey) -> bool {
        self.partitions.contains_key(key)
    }

    pub fn partitions(&self) -> impl Iterator<Item = &PartitionKey> {
        self.partitions.keys()
    }

    /// What a partition of the repartition topic knows of its sources (`None` for an input
    /// partition, or one that heard nothing yet).
    pub fn upstream(&self, key: &PartitionKey) -> Option<&Upstream> {
        self.partitions.get(key)?.upstream.as_ref()
    }

    /// Raises the marks of `group`'s records from each source to the given next offset: a
    /// backfill swapped in counted the events before them (docs/design/backfill.md).
    pub fn raise_marks(&mut self, key: &PartitionKey, group: usize, next: &[(PartitionKey, i64)]) {
        let group_field = self.plan.rekey_name(group).to_string();
        let Some(state) = self.partitions.get_mut(key) else {
            return;
        };
        let upstream = state.upstream.get_or_insert_with(Upstream::default);
        for (source, next_offset) in next {
            upstream.raise_mark(&source.topic, source.partition, &group_field, *next_offset);
        }
        state.pending.upstream_dirty = true;
    }

    /// The offset to resume a partition from: the first not yet applied.
    pub fn next_offset(&self, key: &PartitionKey) -> Option<i64> {
        self.partitions.get(key).and_then(|state| state.next_offset)
    }

    /// Applies the message at `offset` of partition `key`. `now_ms` is the wall clock, used
    /// only to refuse timestamps no retained window could hold.
    ///
    /// # Panics
    /// In debug builds, if the partition was not restored first (a wiring bug).
    pub fn apply(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        payload: &[u8],
        now_ms: EpochMillis,
    ) -> Outcome {
        self.apply_record(key, offset, payload, &NoRecord::default(), now_ms)
    }

    /// [`Engine::apply`] with the Kafka record around the event: its key and headers
    /// (`@key`, `@header.NAME` in a config) and its timestamp (`events.timestamp = "@kafka"`,
    /// `events.timestamp_fallback`).
    pub fn apply_record(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        payload: &[u8],
        record: &dyn RecordMeta,
        now_ms: EpochMillis,
    ) -> Outcome {
        let state = match partition_at(&mut self.partitions, key, offset) {
            Ok(state) => state,
            Err(outcome) => return outcome,
        };
        let source = members::Source {
            reader: &*self.reader,
            partition: key,
        };
        let outcome = apply::apply_event(
            &self.plan,
            state,
            &source,
            payload,
            record,
            Stage::Input,
            now_ms,
        );
        state.next_offset = Some(offset + 1);
        state.pending.meta_dirty = true;
        outcome
    }

    /// A record of the repartition topic, read from its partition `key` at `offset`: an event
    /// forwarded by an input partition for one group of re-keyed metrics (an empty `payload`:
    /// only its source's time). Applied to that group's metrics unless its source offset was
    /// applied before (see [`upstream`]).
    pub fn apply_forwarded(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        payload: &[u8],
        record: &dyn RecordMeta,
        forwarded: &Forwarded<'_>,
        now_ms: EpochMillis,
    ) -> Outcome {
        let state = match partition_at(&mut self.partitions, key, offset) {
            Ok(state) => state,
            Err(outcome) => return outcome,
        };
        let fresh = !payload.is_empty()
            && state
                .upstream
                .as_ref()
                .is_none_or(|upstream| upstream.admits(forwarded));
        let outcome = if fresh {
            let source = members::Source {
                reader: &*self.reader,
                partition: key,
            };
            apply::apply_event(
                &self.plan,
                state,
                &source,
                payload,
                record,
                Stage::Rekeyed(forwarded.group),
                now_ms,
            )
        } else {
            Outcome::Resent
        };
        // A rejected event is done with too: its source offset is not applied again.
        let applied = fresh && !matches!(outcome, Outcome::StateUnreadable(_));
        let upstream = state.upstream.get_or_insert_with(Upstream::default);
        if upstream.note(forwarded, applied, payload.is_empty()) {
            state.pending.upstream_dirty = true;
        }
        state.follow_upstream();
        state.next_offset = Some(offset + 1);
        state.pending.meta_dirty = true;
        outcome
    }

    /// An input partition's time as a record forwarded from it says it: its event watermark
    /// (what makes events late) and its clock (the watermark, or the wall clock once idle).
    pub fn source_time(&self, key: &PartitionKey) -> (Option<EpochMillis>, Option<EpochMillis>) {
        self.partitions.get(key).map_or((None, None), |state| {
            (state.watermark_ms(), state.clock_ms())
        })
    }

    /// Moves an idle partition's watermark to the wall clock, so current windows roll over and
    /// complete even when no events arrive. The caller decides when a partition is idle.
    pub fn advance_idle(&mut self, key: &PartitionKey, now_ms: EpochMillis) {
        if let Some(state) = self.partitions.get_mut(key) {
            if state.idle_floor_ms.is_none_or(|floor| floor < now_ms) {
                state.idle_floor_ms = Some(now_ms);
                state.pending.meta_dirty = true;
            }
        }
    }

    /// Everything changed since the last call, for one atomic write per partition; also
    /// drops windows older than the retention. The caller stores it before the next call,
    /// and may apply events meanwhile: until then the engine answers for its per-entity
    /// entries from memory, not from the reader.
    pub fn take_changes(&mut self) -> ChangeSet {
        self.take_changes_with_snapshots(|_| Vec::new())
    }

    /// As [`Engine::take_changes`], with the member entries of the checkpoint shards
    /// `snapshot_shards` names for each partition, for those whose every entry is in memory
    /// (see [`PartitionChanges::member_snapshots`]): a checkpoint's shard snapshots, taken
    /// before any entry leaves memory.
    pub fn take_changes_with_snapshots(
        &mut self,
        mut snapshot_shards: impl FnMut(&PartitionKey) -> Vec<u16>,
    ) -> ChangeSet {
        let plan = &self.plan;
        let mut partitions: Vec<PartitionChanges> = self
            .partitions
            .iter_mut()
            .filter_map(|(key, state)| state.take_changes(plan, key, &snapshot_shards(key)))
            .collect();
        partitions.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(memory) = &self.memory {
            for changes in &partitions {
                memory.write(changes);
            }
        }
        ChangeSet { partitions }
    }

    /// The same engine asking for a checkpoint once `entries` per-entity entries are written
    /// since the last (the default is [`DEFAULT_MAX_CHECKPOINT_ENTRIES`]).
    pub fn with_max_checkpoint_entries(mut self, entries: usize) -> Self {
        self.max_checkpoint_entries = entries.max(1);
        self
    }

    /// Whether the caller should store a checkpoint now rather than at its interval: the
    /// per-entity entries written since the last [`Engine::take_changes`] reached the bound
    /// (see [`DEFAULT_MAX_CHECKPOINT_ENTRIES`]). An event may write a few past it.
    pub fn checkpoint_due(&self) -> bool {
        self.written_entries() >= self.max_checkpoint_entries
    }

    /// Whether twice the bound is written and waits: a checkpoint could not be stored when
    /// due (the last one is still being written), and the caller should stop applying events
    /// until one is, so that memory stays bounded.
    pub fn checkpoint_overdue(&self) -> bool {
        self.written_entries() >= self.max_checkpoint_entries.saturating_mul(2)
    }

    fn written_entries(&self) -> usize {
        self.partitions
            .values()
            .map(|state| state.members.written_len())
            .sum()
    }

    /// Per-entity entries held in memory (written since the last checkpoint, and cached).
    pub fn resident_members(&self) -> usize {
        self.partitions
            .values()
            .map(|state| state.members.resident())
            .sum()
    }

    /// Current and previous window of every metric, summed over owned partitions.
    pub fn metric_values(&self, now_ms: EpochMillis) -> Vec<MetricValues> {
        view::metric_values(&self.plan, self.partitions.values(), now_ms)
    }

    /// Offsets and watermarks of owned partitions, for exposition and the windows API.
    pub fn partition_status(&self) -> Vec<PartitionStatus> {
        let mut status: Vec<PartitionStatus> = self
            .partitions
            .iter()
            .map(|(key, state)| PartitionStatus {
                key: key.clone(),
                next_offset: state.next_offset,
                watermark_ms: state.clock_ms(),
                max_event_time_ms: state.max_event_ms,
            })
            .collect();
        status.sort_by(|a, b| a.key.cmp(&b.key));
        status
    }
}

#[cfg(test)]
mod baseline_tests;
#[cfg(test)]
mod rekey_tests;
#[cfg(test)]
mod tests;
