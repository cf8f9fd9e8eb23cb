//! Random histories against a model: commits of puts, deletes, dropped prefixes and dropped
//! ranges (within a group, across groups, empty or reversed), with the
//! due snapshot, another shard's, every shard's or none; restarts, hand-offs and compactions in
//! between. Every restore, from the store or from the changelog compacted or not, is the model
//! at the last commit; so is the streaming restore whatever it may hold back, and a restore
//! going on from any head the store had, read from that head's position.

use nsm_checkpoint::testing::{MemoryChangelog, MemoryStore};
use nsm_checkpoint::{
    CheckpointConfig, Checkpointer, Epoch, FrameId, LineRestore, PartitionId, ShardId,
};
use proptest::prelude::*;

use crate::support::{
    apply, checkpoint, config, from_changelog, from_store, largest_frame_bytes, meta_of,
    read_for_seed, reader_from, rows_by_shard, stream_restore, Op, Owner, State,
};

#[derive(Debug, Clone)]
enum SnapshotChoice {
    None,
    Due,
    Shard(u32),
    Every,
}

#[derive(Debug, Clone)]
enum Action {
    Commit {
        /// Which partitions take part: bit 0 the first, bit 1 the second (none: both).
        partitions: u8,
        changes: Vec<(u8, Option<u8>)>,
        dropped_prefix: Option<u8>,
        /// Bounds of a dropped range: each a group and a key number (see [`range_bound`]).
        dropped_range: Option<((u8, u8), (u8, u8))>,
        snapshot: SnapshotChoice,
    },
    Restart,
    HandOff {
        compacted: bool,
    },
    /// A new owner, with a new store, seeds every partition from the model's state (its copy),
    /// retiring what its read of the log found.
    Seed,
    Compact,
}

fn action() -> impl Strategy<Value = Action> {
    let snapshot = prop_oneof![
        1 => Just(SnapshotChoice::None),
        4 => Just(SnapshotChoice::Due),
        1 => (0u32..2048).prop_map(SnapshotChoice::Shard),
        1 => Just(SnapshotChoice::Every),
    ];
    let commit = (
        0u8..4,
        proptest::collection::vec((0u8..40, proptest::option::weighted(0.8, 0u8..6)), 0..10),
        proptest::option::weighted(0.15, 0u8..4),
        proptest::option::weighted(0.2, ((0u8..5, 0u8..40), (0u8..5, 0u8..40))),
        snapshot,
    )
        .prop_map(
            |(partitions, changes, dropped_prefix, dropped_range, snapshot)| Action::Commit {
                partitions,
                changes,
                dropped_prefix,
                dropped_range,
                snapshot,
            },
        );
    prop_oneof![
        10 => commit,
        1 => Just(Action::Restart),
        1 => any::<bool>().prop_map(|compacted| Action::HandOff { compacted }),
        1 => Just(Action::Seed),
        1 => Just(Action::Compact),
    ]
}

fn key(index: u8) -> Vec<u8> {
    format!("group-{}/key-{index}", index % 4).into_bytes()
}

/// A bound of a dropped range: a key of `group` (`group-4/` sorts after every key), or the
/// group's start when `number` is past the keys drawn.
fn range_bound((group, number): (u8, u8)) -> Vec<u8> {
    if number >= 36 {
        format!("group-{group}/").into_bytes()
    } else {
        format!("group-{group}/key-{number}").into_bytes()
    }
}

fn ops_of(
    changes: &[(u8, Option<u8>)],
    dropped_prefix: Option<u8>,
    dropped_range: Option<((u8, u8), (u8, u8))>,
    salt: usize,
) -> Vec<Op> {
    let mut ops: Vec<Op> = changes
        .iter()
        .map(|(index, value)| match value {
            Some(value) => Op::Put(key(*index), format!("value-{value}-{salt}").into_bytes()),
            None => Op::Delete(key(*index)),
        })
        .collect();
    if let Some(group) = dropped_prefix {
        ops.push(Op::DropPrefix(format!("group-{group}/").into_bytes()));
    }
    if let Some((start, end)) = dropped_range {
        ops.push(Op::DropRange(range_bound(start), range_bound(end)));
    }
    ops
}

struct History {
    config: CheckpointConfig,
    changelog: MemoryChangelog,
    owner: Owner,
    next_epoch: u64,
    partitions: [PartitionId; 2],
    states: [State; 2],
    numbers: [u64; 2],
    /// The owner's store after each step, and the changelog position then: every record was
    /// acknowledged, so the end of the log.
    heads: Vec<(MemoryStore, u64)>,
}

impl History {
    fn new(config: CheckpointConfig) -> History {
        let changelog = MemoryChangelog::new();
        let owner = Checkpointer::new(config, changelog.writer(), MemoryStore::new());
        let mut history = History {
            config,
            changelog,
            owner,
            next_epoch: 1,
            partitions: [PartitionId::new(0, "first"), PartitionId::new(0, "second")],
            states: Default::default(),
            numbers: [0; 2],
            heads: Vec::new(),
        };
        history.reopen(None);
        history.keep_head();
        history
    }

    fn keep_head(&mut self) {
        let position = self.changelog.end_offset(0);
        self.heads.push((self.owner.store().fork(), position));
    }

    /// A new owner opens every partition: from `store` (a restart), or from the changelog into
    /// a new store (`None`), compacted first if asked; what it restores must be the model.
    fn reopen_with(&mut self, store: Option<MemoryStore>, compacted: bool) {
        let epoch = Epoch(self.next_epoch);
        self.next_epoch += 1;
        let taking_over = store.is_none();
        let mut owner = Checkpointer::new(
            self.config,
            self.changelog.writer(),
            store.unwrap_or_default(),
        );
        for (index, partition) in self.partitions.iter().enumerate() {
            let restored = if taking_over {
                let mut reader = if compacted {
                    self.changelog.compacted_reader(0)
                } else {
                    self.changelog.reader(0)
                };
                owner
                    .take_over_from_changelog(partition, epoch, &mut reader)
                    .expect("the changelog restores")
            } else {
                owner
                    .resume_from_store(partition, epoch)
                    .expect("the store restores")
            };
            assert_eq!(State::of(&self.config, &restored), self.states[index]);
        }
        self.owner = owner;
    }

    fn reopen(&mut self, store: Option<MemoryStore>) {
        self.reopen_with(store, false);
    }

    /// A new owner with a new store seeds every partition from the model's state, after a read
    /// of the log (which must find the model too) names the frames to retire.
    fn seed(&mut self) {
        let epoch = Epoch(self.next_epoch);
        self.next_epoch += 1;
        let mut owner = Checkpointer::new(self.config, self.changelog.writer(), MemoryStore::new());
        for (index, partition) in self.partitions.iter().enumerate() {
            let (read, retire) = read_for_seed(&self.config, &self.changelog, partition);
            assert_eq!(
                read, self.states[index],
                "{partition}: the read before the seed"
            );
            let copy = &self.states[index];
            let by_shard = rows_by_shard(&self.config, copy);
            let report = owner
                .seed(partition, &copy.meta, epoch, retire, |shard, rows| {
                    for (key, value) in by_shard.get(&shard).into_iter().flatten() {
                        rows.row(key, value);
                    }
                    Ok::<(), std::convert::Infallible>(())
                })
                .expect("the seed goes through");
            assert_eq!(report.frames.len(), self.config.shards() as usize);
            assert_eq!(
                report.tombstones, 0,
                "a seed's retired frames wait for its next commit"
            );
        }
        self.owner = owner;
    }

    fn act(&mut self, action: &Action, salt: usize) {
        match action {
            Action::Commit {
                partitions,
                changes,
                dropped_prefix,
                dropped_range,
                snapshot,
            } => {
                let mut checkpoints = Vec::new();
                for index in 0..2 {
                    if *partitions != 0 && partitions & (1 << index) == 0 {
                        continue;
                    }
                    let partition = &self.partitions[index];
                    let ops = ops_of(changes, *dropped_prefix, *dropped_range, salt + index);
                    self.numbers[index] += 1;
                    apply(
                        &mut self.states[index],
                        &ops,
                        meta_of(index, self.numbers[index]),
                    );
                    let shards = self.config.shards();
                    let chosen = match snapshot {
                        SnapshotChoice::None => Vec::new(),
                        SnapshotChoice::Due => self.owner.snapshots_due(partition),
                        SnapshotChoice::Shard(shard) => vec![ShardId(shard % shards)],
                        SnapshotChoice::Every => (0..shards).map(ShardId).collect(),
                    };
                    let built =
                        checkpoint(&self.config, partition, &ops, &self.states[index], &chosen);
                    checkpoints.push(built);
                }
                self.owner
                    .commit(&checkpoints)
                    .expect("the commit goes through");
            }
            Action::Restart => {
                let store = self.owner.store().clone();
                self.reopen(Some(store));
            }
            Action::HandOff { compacted } => self.reopen_with(None, *compacted),
            Action::Seed => self.seed(),
            Action::Compact => self.changelog.compact(),
        }
    }

    fn check(&self) {
        for (index, partition) in self.partitions.iter().enumerate() {
            let expected = &self.states[index];
            let stored = from_store(&self.config, self.owner.store(), partition);
            assert_eq!(
                &State::of(&self.config, &stored),
                expected,
                "{partition} from the store"
            );
            for compacted in [false, true] {
                let logged = from_changelog(&self.config, &self.changelog, partition, compacted);
                assert_eq!(
                    &State::of(&self.config, &logged),
                    expected,
                    "{partition} from the changelog (compacted: {compacted})"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn every_restore_is_the_model_at_the_last_commit(
        shards in prop_oneof![3 => Just(1u32), 3 => Just(3), 3 => Just(8), 1 => Just(1025)],
        max_chunk_bytes in 64usize..256,
        actions in proptest::collection::vec(action(), 1..40),
    ) {
        let mut history = History::new(config(shards, max_chunk_bytes));
        for (salt, action) in actions.iter().enumerate() {
            history.act(action, salt * 2);
        }
        history.check();
    }

    #[test]
    fn a_streaming_restore_with_any_limit_is_the_whole_log_restore(
        shards in prop_oneof![3 => Just(1u32), 3 => Just(3), 3 => Just(8), 1 => Just(1025)],
        max_chunk_bytes in 64usize..256,
        actions in proptest::collection::vec(action(), 1..40),
        drawn_limit in 0u64..4096,
    ) {
        let mut history = History::new(config(shards, max_chunk_bytes));
        for (salt, action) in actions.iter().enumerate() {
            history.act(action, salt * 2);
        }
        history.check_streaming(drawn_limit);
    }
}

proptest! {
    // Every head of the history, each resumed six ways: fewer histories.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_restore_resumed_from_any_head_is_the_full_restore(
        shards in prop_oneof![3 => Just(1u32), 3 => Just(3), 3 => Just(8), 1 => Just(1025)],
        max_chunk_bytes in 64usize..256,
        actions in proptest::collection::vec(action(), 1..30),
        drawn_limit in 0u64..4096,
    ) {
        let mut history = History::new(config(shards, max_chunk_bytes));
        for (salt, action) in actions.iter().enumerate() {
            history.act(action, salt * 2);
            history.keep_head();
        }
        history.check_resumed(drawn_limit);
    }
}

impl History {
    /// The streaming restore, held back to nothing, one frame, `drawn` bytes or without bound,
    /// is the whole-log restore: the same line, rows, meta and counts, and the model.
    fn check_streaming(&self, drawn: u64) {
        for (index, partition) in self.partitions.iter().enumerate() {
            let one_frame = largest_frame_bytes(&self.changelog, partition);
            for compacted in [false, true] {
                let whole = from_changelog(&self.config, &self.changelog, partition, compacted);
                let reader = reader_from(&self.changelog, 0, compacted, None);
                for limit in [0, one_frame, drawn, u64::MAX] {
                    let context = format!("{partition}, compacted: {compacted}, limit {limit}");
                    let start = LineRestore::new(&self.config, partition, limit);
                    let (restored, state) =
                        stream_restore(&self.config, start, &reader, State::default())
                            .expect("the changelog restores")
                            .expect("a whole read goes on from nothing");
                    assert_eq!(state, self.states[index], "{context}");
                    assert_eq!(restored.head, whole.head, "{context}");
                    assert_eq!(restored.meta, whole.meta, "{context}");
                    assert_eq!(restored.highest_epoch, whole.highest_epoch, "{context}");
                    let (mut streamed, mut held_whole) = (restored.stats, whole.stats);
                    // How it got there differs: what it applied before the line was known,
                    // and how many reads it took.
                    (streamed.frames_applied, streamed.passes) = (0, 0);
                    (held_whole.frames_applied, held_whole.passes) = (0, 0);
                    (streamed.records_read, streamed.bytes_read) = (0, 0);
                    (held_whole.records_read, held_whole.bytes_read) = (0, 0);
                    assert_eq!(streamed, held_whole, "{context}");
                    if limit == 0 && restored.head != FrameId::EMPTY {
                        assert_eq!(restored.stats.passes, 2, "{context}: nothing can be held");
                    }
                }
            }
        }
    }

    /// From every head the stores had, read from its position on (compacted or not, held back
    /// to nothing, `drawn` bytes or without bound), the restore goes on to the model's state,
    /// the whole-log restore's head and meta.
    fn check_resumed(&self, drawn: u64) {
        for (at, (store, position)) in self.heads.iter().enumerate() {
            for (index, partition) in self.partitions.iter().enumerate() {
                let mut opener =
                    Checkpointer::new(self.config, self.changelog.writer(), store.fork());
                let head = opener
                    .resume(partition, Epoch(u64::MAX))
                    .expect("the store's head reads");
                let local = State::of(&self.config, &from_store(&self.config, store, partition));
                for compacted in [false, true] {
                    let whole = from_changelog(&self.config, &self.changelog, partition, compacted);
                    let reader = reader_from(&self.changelog, 0, compacted, Some(*position));
                    for limit in [0, drawn, u64::MAX] {
                        let context = format!(
                            "{partition} from head {at} ({}), position {position}, compacted: \
                             {compacted}, limit {limit}",
                            head.head
                        );
                        let start = LineRestore::resume(&self.config, &head, limit);
                        let (restored, state) =
                            stream_restore(&self.config, start, &reader, local.clone())
                                .expect("the changelog restores")
                                .unwrap_or_else(|broken| {
                                    panic!("{context}: one owner's line broke: {broken:?}")
                                });
                        assert_eq!(state, self.states[index], "{context}");
                        assert_eq!(restored.head, whole.head, "{context}");
                        assert_eq!(restored.meta, whole.meta, "{context}");
                        assert!(restored.resumed, "{context}");
                    }
                }
            }
        }
    }
}
