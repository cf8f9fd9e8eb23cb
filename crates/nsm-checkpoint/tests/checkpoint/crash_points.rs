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
