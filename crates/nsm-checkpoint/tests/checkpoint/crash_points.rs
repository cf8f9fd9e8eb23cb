//! A scripted history of two partitions (snapshots rotating, deletes, dropped prefixes and
//! ranges, a restart and a hand-off, so three epochs), crashed at every changelog record and at
//! every store write: both stay restorable to exactly one checkpoint, the changelog never behind the
//! store, and the next owner, however it opens, ends at the script's final state; with a store
//! of each kind (the library's blobs, or its heads beside the caller's rows).

use nsm_checkpoint::testing::ChangelogFault;

use crate::support::{
    config, delete, drop_prefix, drop_range, put, Fault, Kind, Op, Recovery, Runner, Step, KINDS,
};

fn users(from: usize, to: usize, value: &str) -> Vec<Op> {
    (from..to)
        .map(|user| put(&format!("user/{user}"), &format!("{value}-{user}")))
        .collect()
}

fn with(mut ops: Vec<Op>, more: Vec<Op>) -> Vec<Op> {
    ops.extend(more);
    ops
}

pub fn script() -> Vec<Step> {
    vec![
        Step::Commit(vec![(0, users(0, 12, "a")), (1, users(0, 6, "a"))]),
        Step::Commit(vec![
            (
                0,
                with(
                    users(0, 4, "b"),
                    (0..8)
                        .map(|row| put(&format!("generation/1/{row}"), "x"))
                        .chain([delete("user/5")])
                        .collect(),
                ),
            ),
            (1, vec![delete("user/1")]),
        ]),
        Step::Commit(vec![
            (0, vec![put("window/1", "w1"), put("user/13", "c")]),
            // user/3 to user/5 go; user/2 stays.
            (1, vec![drop_range("user/3", "user/6"), put("user/7", "c")]),
        ]),
        Step::Restart,
        Step::Commit(vec![
            (
                0,
                (0..4)
                    .map(|row| put(&format!("generation/2/{row}"), "y"))
                    .chain([drop_prefix("generation/1/")])
                    .collect(),
            ),
            (1, vec![put("user/9", "z"), drop_prefix("user/0")]),
        ]),
        Step::Commit(vec![
            (0, vec![delete("window/1"), put("user/14", "d")]),
            (1, vec![put("user/2", "q")]),
        ]),
        Step::HandOff { compacted: false },
        Step::Commit(vec![
            (0, users(0, 16, "e")),
            (1, vec![delete("user/2"), put("user/3", "r")]),
        ]),
        Step::Commit(vec![
            (
                0,
                vec![
                    drop_prefix("generation/2/"),
                    delete("user/13"),
                    // user/10 and user/11, not user/1 nor user/12.
                    drop_range("user/10", "user/12"),
                ],
            ),
            (1, vec![put("user/4", "s")]),
        ]),
        Step::Commit(vec![(0, vec![put("user/15", "f")])]),
        Step::HandOff { compacted: true },
        Step::Commit(vec![(0, vec![put("user/1", "g")]), (1, users(5, 9, "g"))]),
        Step::Commit(vec![(1, vec![drop_prefix("user/")])]),
    ]
}

const RECOVERIES: [Recovery; 3] = [
    Recovery::ResumeStore,
    Recovery::TakeOver { compacted: false },
    Recovery::TakeOver { compacted: true },
];

fn runner(kind: Kind) -> Runner {
    // Small chunks, so frames span several records and a crash can cut one short.
    Runner::new(kind, config(4, 96), 2, script())
}

/// The run after a failure, as every kind of next owner would go on with it.
fn recover_every_way(failed: &Runner, context: &str) {
    let failed_step = failed.failed_step().expect("the run stopped at a step");
    for recovery in RECOVERIES {
        let mut next = failed.fork();
        assert!(
            next.recover(recovery, failed_step),
            "{context}: recovery {recovery:?} failed"
        );
        next.check_final(&format!("{context}, then {recovery:?}"));
    }
}

#[test]
fn the_script_without_faults_ends_right_and_compaction_removes_obsolete_frames() {
    for kind in KINDS {
        the_script_without_faults_ends_right(kind);
    }
}

fn the_script_without_faults_ends_right(kind: Kind) {
    let mut run = runner(kind);
    assert!(run.run(Fault::None));
    run.check_final(&format!("{kind:?}, no fault"));
    let log = run.changelog.records(3);
    run.changelog.compact();
    let kept = run.changelog.records(3);
    assert!(
        log.iter().any(|record| record.value.is_none()),
        "the script tombstones obsolete frames"
    );
    assert!(
        kept.len() < log.len() / 2,
        "compaction keeps {} of {}",
        kept.len(),
        log.len()
    );
    run.check_final(&format!("{kind:?}, no fault, compacted"));
}

#[test]
fn a_changelog_failing_at_any_record_leaves_both_restorable_and_never_mixed() {
    for kind in KINDS {
        a_changelog_failing_at_any_record(kind);
    }
}

fn a_changelog_failing_at_any_record(kind: Kind) {
    let total = {
        let mut run = runner(kind);
        assert!(run.run(Fault::None));
        run.changelog.records_sent()
    };
    assert!(total > 60, "the script sends {total} records");
    eprintln!("{kind:?}: the script sends {total} records: crashed at each, three ways");
    let mut stopped = 0;
    for record in 0..=total {
        for fault in [
            ChangelogFault::RefuseSendAt(record),
            ChangelogFault::LoseFrom(record),
            ChangelogFault::LoseOnly(record),
        ] {
            let context = format!("{kind:?}, {fault:?}");
            let mut run = runner(kind);
            let finished = run.run(Fault::Changelog(fault));
            run.check_restorable(&context);
            if finished {
                assert_eq!(record, total, "{context}: the fault never struck");
                run.check_final(&context);
            } else {
                stopped += 1;
                recover_every_way(&run, &context);
            }
        }
    }
    assert_eq!(stopped, 3 * total);
}

#[test]
fn a_store_failing_at_any_write_leaves_both_restorable_and_never_mixed() {
    for kind in KINDS {
        a_store_failing_at_any_write(kind);
    }
}

fn a_store_failing_at_any_write(kind: Kind) {
    let total = {
        let mut run = runner(kind);
        assert!(run.run(Fault::None));
        run.store_writes()
    };
    assert!(total > 10, "the script writes the store {total} times");
    eprintln!("{kind:?}: the script writes the store {total} times: crashed at each");
    for write in 0..total {
        let context = format!("{kind:?}, store write {write}");
        let mut run = runner(kind);
        assert!(!run.run(Fault::StoreWrite(write)), "{context}: no failure");
        run.check_restorable(&context);
        recover_every_way(&run, &context);
    }
}

#[test]
fn a_head_store_keeps_the_position_each_commit_acknowledged_and_compaction_keeps_offsets() {
    use nsm_checkpoint::testing::MemoryHeadStore;
    use nsm_checkpoint::{restore_head, Checkpointer, Epoch, PartitionId};

    use crate::support::{commit_ops, AnyOwner, State};

    let config = config(4, 96);
    let changelog = nsm_checkpoint::testing::MemoryChangelog::new();
    let partition = PartitionId::new(3, "input-0");
    let store = MemoryHeadStore::new();
    let mut owner = AnyOwner::Heads(Checkpointer::with_head_store(
        config,
        changelog.writer(),
        store.clone(),
    ));
    owner
        .resume(&partition, Epoch(1))
        .expect("an empty store opens");
    let mut state = State::default();
    for number in 1..=12u64 {
        let ops: Vec<Op> = (0..6)
            .map(|user| put(&format!("user/{user}"), &format!("{number}")))
            .collect();
        commit_ops(
            &mut owner,
            &partition,
            &mut state,
            &ops,
            &format!("checkpoint {number}"),
        );
        // The position is the end of the log: every record of the commit was acknowledged.
        assert_eq!(store.position(3), Some(changelog.end_offset(3)));
        assert_eq!(store.rows(&partition), state.rows);
    }
    let head = restore_head(&config, &store, &partition).expect("the head restores");
    assert_eq!(head.meta, b"checkpoint 12");
    // Compaction removes records but renumbers none: each record kept has its offset.
    let before = changelog.records_with_offsets(3);
    changelog.compact();
    let after = changelog.records_with_offsets(3);
    assert!(
        after.len() < before.len(),
        "compaction removes tombstoned frames"
    );
    for record in &after {
        assert!(before.contains(record), "{record:?} was renumbered");
    }
    assert_eq!(
        changelog.end_offset(3),
        before.last().map_or(0, |(offset, _)| offset + 1)
    );
}

/// The caller's copy a seed starts from: rows unlike any checkpoint's, in every shard.
fn seeded_copy() -> crate::support::State {
    let mut state = crate::support::State {
        meta: b"the copy's offsets".to_vec(),
        ..Default::default()
    };
    for user in 0..24 {
        state.rows.insert(
            format!("user/{user}").into_bytes(),
            format!("seeded-{user}").into_bytes(),
        );
    }
    state
}

/// A log holding a line of `checkpoints` checkpoints of one owner (epoch 1), and its state.
fn line_before_the_seed(
    kind: Kind,
    checkpoints: u64,
) -> (
    nsm_checkpoint::testing::MemoryChangelog,
    crate::support::State,
) {
    use crate::support::{commit_ops, AnyOwner, AnyStore, State};

    let changelog = nsm_checkpoint::testing::MemoryChangelog::new();
    let partition = nsm_checkpoint::PartitionId::new(3, "input-0");
    let mut owner = AnyOwner::new(config(4, 96), &changelog, AnyStore::new(kind));
    owner
        .resume(&partition, nsm_checkpoint::Epoch(1))
        .expect("an empty store opens");
    let mut state = State::default();
    for number in 1..=checkpoints {
        let mut ops: Vec<Op> = users(0, 10, &format!("line-{number}"));
        ops.push(delete("user/3"));
        commit_ops(
            &mut owner,
            &partition,
            &mut state,
            &ops,
            &format!("line {number}"),
        );
    }
    (changelog, state)
}

#[test]
fn a_seed_failing_at_any_record_restores_the_line_before_it_or_none() {
    for kind in KINDS {
        // No frame of the partition before the seed (a legacy changelog, one turned on), or an
        // older line (a lost changelog's local copy is newer).
        for checkpoints in [0, 3] {
            a_seed_failing_at_any_record(kind, checkpoints);
        }
    }
}

fn a_seed_failing_at_any_record(kind: Kind, checkpoints: u64) {
    use nsm_checkpoint::{Epoch, FrameId, PartitionId, RecordKey};

    use crate::support::{
        assert_every_restore_is, commit_ops, frame_is_whole_in_log, read_for_seed, AnyOwner,
        AnyStore,
    };

    let config = config(4, 96);
    let partition = PartitionId::new(3, "input-0");
    let (before, previous) = line_before_the_seed(kind, checkpoints);
    let copy = seeded_copy();
    let sent_before = before.records_sent();
    let total = {
        let changelog = before.fork();
        let mut owner = AnyOwner::new(config, &changelog, AnyStore::new(kind));
        let (_, retire) = read_for_seed(&config, &changelog, &partition);
        let report = owner
            .seed(&partition, Epoch(2), retire, &copy)
            .expect("the seed goes through");
        // One base frame per shard, of several chunks each: a crash can cut one short.
        assert_eq!(report.frames.len(), 4);
        assert!(report.chunk_records > 8, "{report:?}");
        changelog.records_sent() - sent_before
    };
    eprintln!(
        "{kind:?}, a line of {checkpoints} before: the seed sends {total} records: crashed at \
         each, three ways, and at its store write"
    );
    let mut faults: Vec<Option<ChangelogFault>> = (0..=total)
        .flat_map(|record| {
            let at = sent_before + record;
            [
                ChangelogFault::RefuseSendAt(at),
                ChangelogFault::LoseFrom(at),
                ChangelogFault::LoseOnly(at),
            ]
        })
        .map(Some)
        .collect();
    // `None`: the store write fails, the changelog took the whole seed.
    faults.push(None);
    for fault in faults {
        let context = format!("{kind:?}, a line of {checkpoints} before, {fault:?}");
        let changelog = before.fork();
        let store = AnyStore::new(kind);
        match fault {
            Some(fault) => changelog.inject(fault),
            None => store.fail_commit(store.commits()),
        }
        let mut owner = AnyOwner::new(config, &changelog, store);
        let (read, retire) = read_for_seed(&config, &changelog, &partition);
        assert_eq!(read, previous, "{context}: the read before the seed");
        let seeded = owner.seed(&partition, Epoch(2), retire, &copy);
        let struck = seeded.is_err();
        assert_eq!(
            struck,
            fault.is_none_or(|fault| !matches!(fault, ChangelogFault::RefuseSendAt(at)
                | ChangelogFault::LoseFrom(at)
                | ChangelogFault::LoseOnly(at) if at == sent_before + total)),
            "{context}: {seeded:?}"
        );
        assert_eq!(owner.is_stopped(), struck, "{context}");
        let seed_is_whole = (1..=4).all(|sequence| {
            let frame = FrameId {
                epoch: Epoch(2),
                sequence: nsm_checkpoint::Sequence(sequence),
            };
            frame_is_whole_in_log(&changelog, &partition, frame)
        });
        // Only a seed whole in the log is a line; cut short it is as if never sent.
        let expected = if seed_is_whole { &copy } else { &previous };
        assert_every_restore_is(&config, &changelog, &partition, expected, &context);
        // The store took the seed's head only after every record was acknowledged.
        let stored = owner.store().state(&config, &partition);
        if struck {
            assert_eq!(stored, Default::default(), "{context}: the store");
        } else {
            assert_eq!(stored, copy, "{context}: the store");
        }
        if !struck {
            continue;
        }

        // The next owner reads the log, seeds again with a higher epoch, retiring whatever it
        // found (the line before, the seed cut short), and commits: its first commit tombstones
        // every frame of the epochs before, so compaction leaves nothing of them.
        let mut next = AnyOwner::new(config, &changelog, AnyStore::new(kind));
        let (read, retire) = read_for_seed(&config, &changelog, &partition);
        assert_eq!(&read, expected, "{context}: the next owner's read");
        next.seed(&partition, Epoch(3), retire, &copy)
            .expect("the next seed goes through");
        assert_every_restore_is(&config, &changelog, &partition, &copy, &context);
        let mut state = copy.clone();
        commit_ops(
            &mut next,
            &partition,
            &mut state,
            &[put("user/1", "after"), delete("user/2")],
            "after the seed",
        );
        assert_every_restore_is(&config, &changelog, &partition, &state, &context);
        changelog.compact();
        let epochs: std::collections::BTreeSet<u64> = changelog
            .records(3)
            .iter()
            .filter_map(|record| RecordKey::parse(&record.key).ok().flatten())
            .map(|key| key.frame.epoch.0)
            .collect();
        assert_eq!(epochs, [3].into(), "{context}: left after compaction");
        assert_every_restore_is(
            &config,
            &changelog,
            &partition,
            &state,
            &format!("{context}, compacted"),
        );
        assert_eq!(next.store().state(&config, &partition), state, "{context}");
    }
}
