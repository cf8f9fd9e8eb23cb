//! What the protocol does with what it did not write well or did not write at all: damaged or
//! missing chunks, records of another format, a failing read, a corrupt store, checkpoints the
//! caller got wrong, and a checkpointer that failed once.

use nsm_checkpoint::testing::{ChangelogFault, MemoryChangelog, MemoryStore};
use nsm_checkpoint::{
    restore_from_changelog, restore_from_store, Checkpoint, Checkpointer, CommitError, Corruption,
    Epoch, OpenError, PartitionId, PartitionWrite, RecordKey, RecordPart, RestoreError, ShardId,
    Store,
};

use crate::support::{apply, checkpoint, commit_ops, config, from_changelog, put, Owner, State};

fn partition() -> PartitionId {
    PartitionId::new(0, "input-0")
}

/// Two checkpoints of a partition, with chunks small enough that each frame has several.
fn two_checkpoints() -> (MemoryChangelog, Owner, [State; 2]) {
    let changelog = MemoryChangelog::new();
    let mut owner = Checkpointer::new(config(2, 64), changelog.writer(), MemoryStore::new());
    owner
        .resume_from_store(&partition(), Epoch(1))
        .expect("an empty store opens");
    let mut state = State::default();
    let ops: Vec<_> = (0..10)
        .map(|user| put(&format!("user/{user}"), "one"))
        .collect();
    commit_ops(&mut owner, &partition(), &mut state, &ops, "checkpoint 1");
    let first = state.clone();
    let ops: Vec<_> = (0..10)
        .map(|user| put(&format!("user/{user}"), "two"))
        .collect();
    commit_ops(&mut owner, &partition(), &mut state, &ops, "checkpoint 2");
    (changelog, owner, [first, state])
}

/// The index in the log of a record of the second frame.
fn record_of_second_frame(changelog: &MemoryChangelog, part: RecordPart) -> usize {
    changelog
        .records(0)
        .iter()
        .position(|record| {
            RecordKey::parse(&record.key)
                .ok()
                .flatten()
                .is_some_and(|key| key.frame.sequence.0 == 2 && key.part == part)
        })
        .expect("the record is in the log")
}

fn restored_state(changelog: &MemoryChangelog) -> (State, u64) {
    let config = config(2, 64);
    let restored = from_changelog(&config, changelog, &partition(), false);
    (State::of(&config, &restored), restored.stats.frames_skipped)
}

#[test]
fn a_frame_with_a_damaged_chunk_or_end_marker_is_never_applied() {
    // A byte of a chunk's payload; the end marker's frame length; its checksum.
    for (part, byte) in [
        (RecordPart::Chunk(1), 10),
        (RecordPart::End, 12),
        (RecordPart::End, 18),
    ] {
        let (changelog, _, [first, _]) = two_checkpoints();
        let index = record_of_second_frame(&changelog, part);
        changelog.edit(0, |records| {
            if let Some(value) = records[index].value.as_mut() {
                value[byte] ^= 0x40;
            }
        });
        assert_eq!(restored_state(&changelog), (first, 1), "{part:?} damaged");
    }
}

#[test]
fn a_frame_missing_a_chunk_is_never_applied_even_with_its_end_marker() {
    let (changelog, _, [first, second]) = two_checkpoints();
    assert_eq!(restored_state(&changelog).0, second);
    let index = record_of_second_frame(&changelog, RecordPart::Chunk(0));
    changelog.edit(0, |records| {
        records.remove(index);
    });
    assert_eq!(restored_state(&changelog), (first, 1));
}

#[test]
fn records_of_another_format_and_of_other_partitions_are_skipped() {
    let (changelog, _, [_, second]) = two_checkpoints();
    changelog.edit(0, |records| {
        records.insert(
            0,
            nsm_checkpoint::ChangelogRecord {
                key: b"wwindow-of-the-old-format".to_vec(),
                value: Some(b"old value".to_vec()),
            },
        );
    });
    let mut other = Checkpointer::new(config(2, 64), changelog.writer(), MemoryStore::new());
    let neighbour = PartitionId::new(0, "input-1");
    other
        .resume_from_store(&neighbour, Epoch(9))
        .expect("an empty store opens");
    commit_ops(
        &mut other,
        &neighbour,
        &mut State::default(),
        &[put("user/1", "other")],
        "n 1",
    );
    let config = config(2, 64);
    let restored = from_changelog(&config, &changelog, &partition(), false);
    assert_eq!(State::of(&config, &restored), second);
    assert_eq!(restored.stats.foreign_records, 1);
    assert_eq!(
        restored.highest_epoch,
        Epoch(1),
        "the neighbour's epoch is its own"
    );
}

#[test]
fn a_failed_read_is_a_typed_error_and_a_take_over_then_stores_nothing() {
    let (changelog, _, _) = two_checkpoints();
    let store = MemoryStore::new();
    let mut owner = Checkpointer::new(config(2, 64), changelog.writer(), store.clone());
    let mut reader = changelog.reader(0).failing_at(3);
    let error = owner
        .take_over_from_changelog(&partition(), Epoch(2), &mut reader)
        .expect_err("the read fails");
    assert!(matches!(
        error,
        OpenError::Restore(RestoreError::Read { .. })
    ));
    assert!(
        error.to_string().contains("read failed at record 3"),
        "{error}"
    );
    assert_eq!(store.commits(), 0);
    assert_eq!(owner.head(&partition()), None);
}

#[test]
fn a_corrupt_or_incomplete_store_is_a_typed_error() {
    let config = config(2, 64);
    let (_, owner, _) = two_checkpoints();
    let (_, mut store) = owner.into_parts();
    let loaded = store
        .load(&partition())
        .expect("loads")
        .expect("the partition is stored");
    // The snapshot of shard 1 taken at the second checkpoint goes missing.
    let mut without_snapshot = store.fork();
    without_snapshot
        .commit(&[PartitionWrite {
            partition: partition(),
            replace: true,
            delete_deltas_through: None,
            head: loaded.head.clone(),
            snapshots: loaded
                .snapshots
                .iter()
                .filter(|(shard, _)| *shard != ShardId(1))
                .cloned()
                .collect(),
            deltas: loaded.deltas.clone(),
        }])
        .expect("writes");
    let error =
        restore_from_store(&config, &without_snapshot, &partition()).expect_err("incomplete");
    assert!(matches!(error, RestoreError::Incomplete { .. }), "{error}");
    store
        .commit(&[PartitionWrite {
            partition: partition(),
            replace: false,
            delete_deltas_through: None,
            head: b"\x01garbage".to_vec(),
            snapshots: Vec::new(),
            deltas: Vec::new(),
        }])
        .expect("writes");
    let error = restore_from_store(&config, &store, &partition()).expect_err("corrupt");
    assert!(
        matches!(
            error,
            RestoreError::Corrupt {
                what: Corruption::Head,
                ..
            }
        ),
        "{error}"
    );
    let error = restore_from_store(
        &nsm_checkpoint::CheckpointConfig::new(3, 64).expect("valid"),
        &loaded_store(&loaded),
        &partition(),
    )
    .expect_err("another shard count");
    assert!(
        matches!(
            error,
            RestoreError::ShardCountChanged {
                stored: 2,
                configured: 3,
                ..
            }
        ),
        "{error}"
    );
}

fn loaded_store(loaded: &nsm_checkpoint::StoredPartition) -> MemoryStore {
    let mut store = MemoryStore::new();
    store
        .commit(&[PartitionWrite {
            partition: partition(),
            replace: true,
            delete_deltas_through: None,
            head: loaded.head.clone(),
            snapshots: loaded.snapshots.clone(),
            deltas: loaded.deltas.clone(),
        }])
        .expect("writes");
    store
}

#[test]
fn a_checkpoint_the_caller_got_wrong_sends_nothing_and_stops_nothing() {
    let (changelog, mut owner, [_, second]) = two_checkpoints();
    let sent = changelog.records_sent();
    let mut out_of_range = Checkpoint::new(partition(), "bad");
    out_of_range.put(ShardId(2), b"key", b"value");
    let not_open = Checkpoint::new(PartitionId::new(0, "never-opened"), "bad");
    let twice = [
        Checkpoint::new(partition(), "a"),
        Checkpoint::new(partition(), "b"),
    ];
    for (checkpoints, expected) in [
        (vec![out_of_range], "ShardOutOfRange"),
        (vec![not_open], "NotOpen"),
        (twice.to_vec(), "DuplicatePartition"),
    ] {
        let error = owner.commit(&checkpoints).expect_err(expected);
        let CommitError::Invalid(invalid) = error else {
            panic!("{expected}: not an invalid checkpoint");
        };
        assert!(format!("{invalid:?}").starts_with(expected), "{invalid:?}");
    }
    assert_eq!(changelog.records_sent(), sent);
    assert!(!owner.is_stopped());
    assert_eq!(restored_state(&changelog).0, second);
}

#[test]
fn after_a_failed_commit_the_checkpointer_writes_nothing_more() {
    let (changelog, mut owner, [_, second]) = two_checkpoints();
    changelog.inject(ChangelogFault::LoseOnly(changelog.records_sent()));
    let mut third = Checkpoint::new(partition(), "checkpoint 3");
    third.put(ShardId(0), b"user/1", b"three");
    let error = owner.commit(&[third]).expect_err("the flush fails");
    assert!(matches!(error, CommitError::Changelog { .. }), "{error}");
    assert!(owner.is_stopped());
    let sent = changelog.records_sent();
    let error = owner
        .commit(&[Checkpoint::new(partition(), "checkpoint 4")])
        .expect_err("stopped");
    assert!(matches!(error, CommitError::Stopped));
    assert_eq!(changelog.records_sent(), sent);
    let config = config(2, 64);
    let from_log =
        restore_from_changelog(&config, &mut changelog.reader(0), &partition()).expect("restores");
    assert_eq!(
        State::of(&config, &from_log),
        second,
        "the frame missing its first chunk is not applied"
    );
}

#[test]
fn a_damaged_frame_in_the_middle_of_the_line_falls_back_to_the_last_whole_line_and_says_so() {
    let (changelog, mut owner, [first, second]) = two_checkpoints();
    // The third checkpoint snapshots nothing, so its line needs the second frame.
    let mut third = second.clone();
    let ops = [put("user/1", "three")];
    apply(&mut third, &ops, b"checkpoint 3".to_vec());
    let built = checkpoint(owner.config(), &partition(), &ops, &third, &[]);
    owner.commit(&[built]).expect("the commit goes through");
    let index = record_of_second_frame(&changelog, RecordPart::Chunk(0));
    changelog.edit(0, |records| {
        if let Some(value) = records[index].value.as_mut() {
            value[4] ^= 0x01;
        }
    });
    let config = config(2, 64);
    let restored = from_changelog(&config, &changelog, &partition(), false);
    assert_eq!(State::of(&config, &restored), first);
    assert_eq!(restored.stats.newer_frames_unusable, 1);
    assert_eq!(restored.stats.frames_skipped, 2);
}

#[test]
fn a_changelog_written_with_another_shard_count_is_refused_not_emptied() {
    let (changelog, _, _) = two_checkpoints();
    let error = restore_from_changelog(
        &nsm_checkpoint::CheckpointConfig::new(4, 64).expect("valid"),
        &mut changelog.reader(0),
        &partition(),
    )
    .expect_err("another shard count");
    assert!(
        matches!(
            error,
            RestoreError::ShardCountChanged {
                stored: 2,
                configured: 4,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_seed_refused_sends_nothing_and_one_whose_rows_fail_stops_only_once_it_sent() {
    use nsm_checkpoint::{RetiredFrames, SeedError};

    #[derive(Debug, thiserror::Error)]
    #[error("the caller's store failed reading shard {0}")]
    struct ReadFailed(u32);

    let config = config(2, 64);
    let (changelog, _, [_, second]) = two_checkpoints();
    let sent = changelog.records_sent();
    let mut seeder = Checkpointer::new(config, changelog.writer(), MemoryStore::new());
    let rows = |fail_at: Option<u32>| {
        move |shard: ShardId, rows: &mut nsm_checkpoint::SeedShard<'_>| {
            if Some(shard.0) == fail_at {
                return Err(ReadFailed(shard.0));
            }
            rows.row(format!("row of {}", shard.0).as_bytes(), b"v");
            Ok(())
        }
    };
    // The log saw epoch 1: a seed must take a higher one.
    let retire = |changelog: &MemoryChangelog| {
        crate::support::read_for_seed(&config, changelog, &partition()).1
    };
    let refused = seeder.seed(&partition(), b"m", Epoch(1), retire(&changelog), rows(None));
    assert!(
        matches!(
            refused,
            Err(SeedError::EpochNotAbove {
                requested: 1,
                seen: 1,
                ..
            })
        ),
        "{refused:?}"
    );
    // The first shard's rows fail: nothing was sent, nothing stops.
    let failed = seeder.seed(
        &partition(),
        b"m",
        Epoch(2),
        retire(&changelog),
        rows(Some(0)),
    );
    assert!(
        matches!(failed, Err(SeedError::Rows { shard: 0, .. })),
        "{failed:?}"
    );
    assert_eq!(changelog.records_sent(), sent);
    assert!(!seeder.is_stopped());
    // The second's: the first base frame was sent, so the checkpointer stops, and the seed cut
    // short restores as if never sent.
    let failed = seeder.seed(
        &partition(),
        b"m",
        Epoch(2),
        retire(&changelog),
        rows(Some(1)),
    );
    assert!(
        matches!(failed, Err(SeedError::Rows { shard: 1, .. })),
        "{failed:?}"
    );
    assert!(changelog.records_sent() > sent);
    assert!(seeder.is_stopped());
    assert!(matches!(
        seeder.seed(
            &partition(),
            b"m",
            Epoch(3),
            RetiredFrames::none(),
            rows(None)
        ),
        Err(SeedError::Stopped)
    ));
    assert_eq!(restored_state(&changelog).0, second);
    // A partition already open is not seeded.
    let mut open = Checkpointer::new(config, changelog.writer(), MemoryStore::new());
    open.resume_from_store(&partition(), Epoch(5))
        .expect("an empty store opens");
    assert!(matches!(
        open.seed(&partition(), b"m", Epoch(6), retire(&changelog), rows(None)),
        Err(SeedError::AlreadyOpen { .. })
    ));
}
