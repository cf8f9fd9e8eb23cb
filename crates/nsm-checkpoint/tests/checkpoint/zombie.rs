//! Two owners of one partition at once: A, cut off from the group, still writing with epoch 1,
//! and B, which took the partition over with epoch 2. Whatever order their records land in, a
//! restore gives B's line, never A's late frame and never a mix of the two; with a store of each
//! kind (the library's blobs, or its heads beside the caller's rows).

use nsm_checkpoint::testing::{ChangelogFault, MemoryChangelog};
use std::collections::BTreeSet;

use nsm_checkpoint::{Epoch, LineOutcome, LineRestore, PartitionId, RecordKey};

use crate::support::{
    apply, checkpoint, commit_ops, config, delete, drop_range, feed, from_changelog, put,
    reader_from, stream_restore, AnyOwner, AnyStore, Driven, Kind, Op, State, StateSink, KINDS,
};

const SHARDS: u32 = 4;

fn partition() -> PartitionId {
    PartitionId::new(0, "input-0")
}

fn owner_resuming(kind: Kind, changelog: &MemoryChangelog, epoch: u64) -> AnyOwner {
    let mut owner = AnyOwner::new(config(SHARDS, 96), changelog, AnyStore::new(kind));
    owner
        .resume(&partition(), Epoch(epoch))
        .expect("an empty store opens");
    owner
}

fn owner_taking_over(kind: Kind, changelog: &MemoryChangelog, epoch: u64) -> (AnyOwner, State) {
    let mut owner = AnyOwner::new(config(SHARDS, 96), changelog, AnyStore::new(kind));
    let restored = owner
        .take_over(&partition(), Epoch(epoch), &mut changelog.reader(0))
        .expect("the changelog restores");
    (owner, restored)
}

/// A's first `checkpoints` checkpoints, each touching every user and snapshotting a shard.
fn owner_a_history(
    kind: Kind,
    changelog: &MemoryChangelog,
    checkpoints: usize,
) -> (AnyOwner, State) {
    let mut owner = owner_resuming(kind, changelog, 1);
    let mut state = State::default();
    for number in 1..=checkpoints {
        let ops: Vec<_> = (0..10)
            .map(|user| put(&format!("user/{user}"), &format!("a{number}")))
            .collect();
        commit_ops(
            &mut owner,
            &partition(),
            &mut state,
            &ops,
            &format!("A {number}"),
        );
    }
    (owner, state)
}

fn assert_restores_to(changelog: &MemoryChangelog, expected: &State, context: &str) {
    let config = config(SHARDS, 96);
    for compacted in [false, true] {
        let restored = from_changelog(&config, changelog, &partition(), compacted);
        assert_eq!(
            &State::of(&config, &restored),
            expected,
            "{context} (compacted: {compacted})"
        );
    }
}

#[test]
fn a_cut_off_owners_late_frame_after_the_new_owners_changes_nothing() {
    for kind in KINDS {
        a_cut_off_owners_late_frame_after_the_new_owners_changes_nothing_with(kind);
    }
}

fn a_cut_off_owners_late_frame_after_the_new_owners_changes_nothing_with(kind: Kind) {
    let changelog = MemoryChangelog::new();
    let (mut owner_a, mut state_a) = owner_a_history(kind, &changelog, 3);
    let (mut owner_b, mut state_b) = owner_taking_over(kind, &changelog, 2);
    assert_eq!(state_b, state_a);
    commit_ops(
        &mut owner_b,
        &partition(),
        &mut state_b,
        &[put("user/1", "b4")],
        "B 4",
    );
    commit_ops(
        &mut owner_b,
        &partition(),
        &mut state_b,
        &[delete("user/2"), drop_range("user/5", "user/8")],
        "B 5",
    );
    assert!(!state_b.rows.contains_key(&b"user/6"[..]));
    // A's frame lands after B's, and puts back a row B's range dropped.
    commit_ops(
        &mut owner_a,
        &partition(),
        &mut state_a,
        &[put("user/3", "late"), put("user/6", "late")],
        "A 4",
    );
    assert_restores_to(&changelog, &state_b, "after A's late frame");
    commit_ops(
        &mut owner_b,
        &partition(),
        &mut state_b,
        &[put("user/4", "b6")],
        "B 6",
    );
    assert_restores_to(&changelog, &state_b, "after B's next frame");
    assert_eq!(
        owner_b.store().state(&owner_b.config(), &partition()),
        state_b
    );
}

#[test]
fn a_cut_off_owners_frame_landing_before_the_new_owners_first_is_not_mixed_in() {
    for kind in KINDS {
        a_cut_off_owners_frame_landing_before_the_new_owners_first_is_not_mixed_in_with(kind);
    }
}

fn a_cut_off_owners_frame_landing_before_the_new_owners_first_is_not_mixed_in_with(kind: Kind) {
    let changelog = MemoryChangelog::new();
    let (mut owner_a, mut state_a) = owner_a_history(kind, &changelog, 3);
    let (mut owner_b, mut state_b) = owner_taking_over(kind, &changelog, 2);
    // A's frame lands after B read the changelog, before B's first frame: it is finished and
    // has B's sequence, but B's frames build on A's third, not on it.
    commit_ops(
        &mut owner_a,
        &partition(),
        &mut state_a,
        &[put("zombie-only", "x")],
        "A 4",
    );
    commit_ops(
        &mut owner_b,
        &partition(),
        &mut state_b,
        &[put("user/1", "b4")],
        "B 4",
    );
    commit_ops(
        &mut owner_b,
        &partition(),
        &mut state_b,
        &[put("user/2", "b5")],
        "B 5",
    );
    assert!(!state_b.rows.contains_key(&b"zombie-only"[..]));
    assert_restores_to(
        &changelog,
        &state_b,
        "A's frame between B's restore and B's frames",
    );
}

#[test]
fn a_cut_off_owners_last_commit_with_its_tombstones_leaves_the_new_line_whole() {
    for kind in KINDS {
        a_cut_off_owners_last_commit_with_its_tombstones_leaves_the_new_line_whole_with(kind);
    }
}

fn a_cut_off_owners_last_commit_with_its_tombstones_leaves_the_new_line_whole_with(kind: Kind) {
    let changelog = MemoryChangelog::new();
    // Enough checkpoints that A's next commit tombstones frames obsolete on its own line.
    let (mut owner_a, mut state_a) = owner_a_history(kind, &changelog, 7);
    let (mut owner_b, mut state_b) = owner_taking_over(kind, &changelog, 2);
    let report = commit_ops(
        &mut owner_a,
        &partition(),
        &mut state_a,
        &[put("user/0", "late")],
        "A 8",
    );
    assert!(report.tombstones > 0, "A's last commit tombstones frames");
    for number in 8..=9 {
        commit_ops(
            &mut owner_b,
            &partition(),
            &mut state_b,
            &[put("user/5", &format!("b{number}"))],
            &format!("B {number}"),
        );
    }
    changelog.compact();
    assert_restores_to(&changelog, &state_b, "after compaction");
    // Once B has snapshotted every shard (paced by the bytes of its one-row deltas, so over a
    // dozen checkpoints) it needs none of A's frames, and tombstones them.
    for number in 10..=30 {
        commit_ops(
            &mut owner_b,
            &partition(),
            &mut state_b,
            &[put("user/6", &format!("b{number}"))],
            &format!("B {number}"),
        );
    }
    changelog.compact();
    let config = config(SHARDS, 96);
    let restored = from_changelog(&config, &changelog, &partition(), false);
    assert_eq!(State::of(&config, &restored), state_b);
    // Left to skip: A's late frame, which B never saw and the next owner's restore will
    // report, and B's newest obsolete frame if its last commit made one (tombstoned at its next
    // commit; snapshots paced by bytes do not make one every commit).
    assert!(
        matches!(restored.stats.frames_skipped, 1 | 2),
        "{} frames skipped",
        restored.stats.frames_skipped
    );
    let frames_of_a: BTreeSet<u64> = changelog
        .records(0)
        .iter()
        .filter_map(|record| RecordKey::parse(&record.key).ok().flatten())
        .filter(|key| key.frame.epoch == Epoch(1))
        .map(|key| key.frame.sequence.0)
        .collect();
    assert_eq!(frames_of_a, BTreeSet::from([8]));
}

#[test]
fn without_a_finished_frame_of_the_new_owner_the_old_owners_line_is_restored_whole() {
    for kind in KINDS {
        without_a_finished_frame_of_the_new_owner_the_old_owners_line_is_restored_whole_with(kind);
    }
}

fn without_a_finished_frame_of_the_new_owner_the_old_owners_line_is_restored_whole_with(
    kind: Kind,
) {
    let changelog = MemoryChangelog::new();
    let (mut owner_a, mut state_a) = owner_a_history(kind, &changelog, 3);
    let (mut owner_b, state_b) = owner_taking_over(kind, &changelog, 2);
    // B's first frame is cut short; A's frame lands after it.
    changelog.inject(ChangelogFault::RefuseSendAt(changelog.records_sent() + 1));
    let config = config(SHARDS, 96);
    let mut checkpoint = nsm_checkpoint::Checkpoint::new(partition(), "B 4");
    for user in 0..40 {
        let key = format!("user/{user}");
        checkpoint.put(
            crate::support::shard_of(&config, key.as_bytes()),
            key.as_bytes(),
            b"b4",
        );
    }
    assert!(owner_b
        .commit_with_rows(&[checkpoint], &[&state_b])
        .is_err());
    commit_ops(
        &mut owner_a,
        &partition(),
        &mut state_a,
        &[put("user/3", "a4")],
        "A 4",
    );
    // A's line is the newest finished one: exact for its own offsets, and nothing of B's.
    assert_restores_to(&changelog, &state_a, "B's unfinished frame, then A's");
    // B restarts from its store, which holds the state it restored, with a higher epoch: its
    // line now wins over A's frame of the same sequence.
    let mut owner_b = AnyOwner::new(config, &changelog, owner_b.store());
    let mut state_b_again = owner_b
        .resume(&partition(), Epoch(3))
        .expect("B's store restores");
    assert_eq!(state_b_again, state_b);
    commit_ops(
        &mut owner_b,
        &partition(),
        &mut state_b_again,
        &[put("user/7", "b4")],
        "B 4",
    );
    assert_restores_to(&changelog, &state_b_again, "B's line after its restart");
}

#[test]
fn an_owner_must_take_a_partition_with_an_epoch_above_every_one_seen() {
    for kind in KINDS {
        an_owner_must_take_a_partition_with_an_epoch_above_every_one_seen_with(kind);
    }
}

fn an_owner_must_take_a_partition_with_an_epoch_above_every_one_seen_with(kind: Kind) {
    let changelog = MemoryChangelog::new();
    let (owner_a, _) = owner_a_history(kind, &changelog, 2);
    let config = config(SHARDS, 96);
    let mut owner_b = AnyOwner::new(config, &changelog, AnyStore::new(kind));
    let refused = owner_b.take_over(&partition(), Epoch(1), &mut changelog.reader(0));
    assert!(
        matches!(
            refused,
            Err(nsm_checkpoint::OpenError::EpochNotAbove {
                requested: 1,
                seen: 1,
                ..
            })
        ),
        "{refused:?}"
    );
    let mut restarted = AnyOwner::new(config, &changelog, owner_a.store());
    let refused = restarted.resume(&partition(), Epoch(1));
    assert!(matches!(
        refused,
        Err(nsm_checkpoint::OpenError::EpochNotAbove { .. })
    ));
    assert!(restarted.resume(&partition(), Epoch(2)).is_ok());
    assert!(matches!(
        restarted.resume(&partition(), Epoch(3)),
        Err(nsm_checkpoint::OpenError::AlreadyOpen { .. })
    ));
}

#[test]
fn a_frame_landing_behind_the_applied_head_takes_a_second_pass() {
    for kind in KINDS {
        a_frame_landing_behind_the_applied_head_takes_a_second_pass_with(kind);
    }
}

fn a_frame_landing_behind_the_applied_head_takes_a_second_pass_with(kind: Kind) {
    let config = config(SHARDS, 96);
    let changelog = MemoryChangelog::new();
    let (mut owner_a, mut state_a) = owner_a_history(kind, &changelog, 3);
    let (mut owner_b, mut state_b) = owner_taking_over(kind, &changelog, 2);
    // A, cut off, finishes two more frames before B's first lands: A's fifth names its fourth
    // while epoch 1 is the newest in the log, so a streaming restore applies A's fourth...
    for number in 4..=5 {
        commit_ops(
            &mut owner_a,
            &partition(),
            &mut state_a,
            &[
                put("user/3", &format!("late {number}")),
                put("zombie-only", "x"),
            ],
            &format!("A {number}"),
        );
    }
    let position_of_a = changelog.end_offset(0);
    // ...and only then B's frames name A's third: the line forks behind what was applied.
    for number in 4..=5 {
        commit_ops(
            &mut owner_b,
            &partition(),
            &mut state_b,
            &[put("user/1", &format!("b{number}"))],
            &format!("B {number}"),
        );
    }
    assert!(!state_b.rows.contains_key(&b"zombie-only"[..]));
    for compacted in [false, true] {
        let context = format!("{kind:?}, compacted: {compacted}");
        let reader = reader_from(&changelog, 0, compacted, None);
        for limit in [0, 1_000, u64::MAX] {
            let start = LineRestore::new(&config, &partition(), limit);
            let (restored, state) = stream_restore(&config, start, &reader, State::default())
                .expect("the changelog restores")
                .expect("a whole read goes on from nothing");
            assert_eq!(state, state_b, "{context}, limit {limit}");
            assert_eq!(restored.stats.passes, 2, "{context}, limit {limit}");
            // A's two late frames are left for B's next commit to tombstone.
            assert_eq!(restored.stats.frames_skipped, 2, "{context}, limit {limit}");
        }
        // However much it may hold, the first pass applied A's fourth frame, which B's line
        // leaves. B's line snapshots every shard (A's first frame did), so applied whole it
        // replaces whatever was applied: the second pass applies it from its first frame, over
        // the sink as it is.
        let mut sink = StateSink::new(config, State::default());
        let mut first = LineRestore::new(&config, &partition(), u64::MAX);
        feed(&mut first, &mut sink, &reader);
        assert!(first.stats().frames_applied > 0, "{context}");
        match first.finish(&mut sink).expect("ends") {
            LineOutcome::SecondPass(pass) => {
                assert!(!pass.clears(), "{context}");
                let epochs = |frame: Option<&nsm_checkpoint::FrameId>| frame.map(|id| id.epoch);
                assert_eq!(epochs(pass.frames().first()), Some(Epoch(1)), "{context}");
                assert_eq!(epochs(pass.frames().last()), Some(Epoch(2)), "{context}");
            }
            other => panic!("{context}: {other:?}"),
        }
        let whole = from_changelog(&config, &changelog, &partition(), compacted);
        assert_eq!(State::of(&config, &whole), state_b, "{context}");
        assert_eq!(
            whole.stats.passes, 2,
            "{context}: the whole-log restore streams too"
        );
    }
    // A, restarted, goes on from its own head and position: B's frames name a frame behind
    // them, so its line is broken and it must restore whole.
    let config_a = owner_a.config();
    let mut reopened = AnyOwner::new(config_a, &changelog, owner_a.store());
    let local = reopened
        .resume(&partition(), Epoch(7))
        .expect("A's store opens");
    assert_eq!(local, state_a);
    let head = match owner_a.store() {
        AnyStore::Heads(store) => {
            nsm_checkpoint::restore_head(&config, &store, &partition()).expect("A's head reads")
        }
        AnyStore::Blobs(store) => {
            nsm_checkpoint::Checkpointer::new(config, changelog.writer(), store.fork())
                .resume(&partition(), Epoch(7))
                .expect("A's head reads")
        }
    };
    let reader = reader_from(&changelog, 0, false, Some(position_of_a));
    let broken = stream_restore(
        &config,
        LineRestore::resume(&config, &head, u64::MAX),
        &reader,
        local,
    )
    .expect("the changelog reads")
    .expect_err("B's line does not continue A's head");
    assert_eq!(broken.local_head, head.head);
    assert_eq!(broken.newest.map(|frame| frame.epoch), Some(Epoch(2)));
}

#[test]
fn a_fork_behind_the_applied_head_of_a_line_without_every_snapshot_is_restored_after_a_clear() {
    for kind in KINDS {
        a_fork_of_a_line_without_every_snapshot_with(kind);
    }
}

/// Commits `ops` with no snapshot at all: a line that never snapshots every shard builds on the
/// empty state, so nothing applied off it is replaced by applying it.
fn commit_without_snapshots(owner: &mut AnyOwner, state: &mut State, ops: &[Op], meta: &str) {
    apply(state, ops, meta.as_bytes().to_vec());
    let built = checkpoint(&owner.config(), &partition(), ops, state, &[]);
    owner
        .commit_with_rows(&[built], &[state])
        .expect("the commit goes through");
}

fn a_fork_of_a_line_without_every_snapshot_with(kind: Kind) {
    let config = config(SHARDS, 96);
    let changelog = MemoryChangelog::new();
    let mut owner_a = owner_resuming(kind, &changelog, 1);
    let mut state_a = State::default();
    for number in 1..=3 {
        let ops: Vec<Op> = (0..6)
            .map(|user| put(&format!("user/{user}"), &format!("a{number}")))
            .collect();
        commit_without_snapshots(&mut owner_a, &mut state_a, &ops, &format!("A {number}"));
    }
    let (mut owner_b, mut state_b) = owner_taking_over(kind, &changelog, 2);
    for number in 4..=5 {
        let ops = [put("zombie-only", "x"), delete("user/2")];
        commit_without_snapshots(&mut owner_a, &mut state_a, &ops, &format!("A {number}"));
    }
    for number in 4..=5 {
        let ops = [put("user/1", &format!("b{number}"))];
        commit_without_snapshots(&mut owner_b, &mut state_b, &ops, &format!("B {number}"));
    }
    let reader = reader_from(&changelog, 0, false, None);
    let mut sink = StateSink::new(config, State::default());
    let mut first = LineRestore::new(&config, &partition(), u64::MAX);
    feed(&mut first, &mut sink, &reader);
    let LineOutcome::SecondPass(pass) = first.finish(&mut sink).expect("ends") else {
        panic!("{kind:?}: the fork behind A's fourth frame takes no second pass");
    };
    assert!(pass.clears(), "{kind:?}");
    let frames: Vec<(u64, u64)> = pass
        .frames()
        .iter()
        .map(|frame| (frame.epoch.0, frame.sequence.0))
        .collect();
    assert_eq!(frames, [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5)], "{kind:?}");
    let mut second = LineRestore::second_pass(pass, &mut sink).expect("clears");
    assert!(sink.state.rows.is_empty(), "{kind:?}: cleared first");
    feed(&mut second, &mut sink, &reader);
    let LineOutcome::Restored(restored) = second.finish(&mut sink).expect("ends") else {
        panic!("{kind:?}: the second pass does not end the restore");
    };
    assert_eq!(sink.state, state_b, "{kind:?}");
    assert_eq!(restored.stats.passes, 2);
    assert_restores_to(&changelog, &state_b, &format!("{kind:?}, whole"));
}

#[test]
fn a_cut_off_owners_seed_does_not_win_over_a_newer_epoch() {
    for kind in KINDS {
        for landing in [
            SeedLanding::AfterTheNewLine,
            SeedLanding::BeforeTheNewOwnersFirstFrame,
            SeedLanding::AmidTheNewOwnersFrames,
            SeedLanding::AfterTheNewOwnersSeed,
        ] {
            a_cut_off_owners_seed_with(kind, landing);
        }
    }
}

/// Where the seed of Z (epoch 2, cut off while it seeded from its local copy) lands against
/// B's frames (epoch 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeedLanding {
    /// After B took A's line over and wrote two checkpoints.
    AfterTheNewLine,
    /// After B read the log, before B's first frame.
    BeforeTheNewOwnersFirstFrame,
    /// Half before B's first frame, half after it.
    AmidTheNewOwnersFrames,
    /// After B seeded too (from its own copy) and wrote a checkpoint.
    AfterTheNewOwnersSeed,
}

fn a_cut_off_owners_seed_with(kind: Kind, landing: SeedLanding) {
    use crate::support::{assert_every_restore_is, read_for_seed};

    let context = format!("{kind:?}, Z's seed {landing:?}");
    let config = config(SHARDS, 96);
    let changelog = MemoryChangelog::new();
    let (_, state_a) = owner_a_history(kind, &changelog, 3);
    // Z read A's line, and seeds its own copy, which holds rows nobody else has.
    let (_, retire_z) = read_for_seed(&config, &changelog, &partition());
    let mut copy_z = state_a.clone();
    apply(
        &mut copy_z,
        &[put("zombie-only", "z"), delete("user/4")],
        b"Z's copy".to_vec(),
    );
    let mut owner_z = AnyOwner::new(config, &changelog, AnyStore::new(kind));
    let seed_z = |owner_z: &mut AnyOwner, between: &mut dyn FnMut(nsm_checkpoint::ShardId)| {
        owner_z
            .seed_with(&partition(), Epoch(2), retire_z.clone(), &copy_z, between)
            .expect("Z's seed goes through");
    };
    let mut owner_b = AnyOwner::new(config, &changelog, AnyStore::new(kind));
    let mut state_b = if landing == SeedLanding::AfterTheNewOwnersSeed {
        // B seeds from its own copy instead of taking A's line.
        let mut copy_b = state_a.clone();
        apply(&mut copy_b, &[put("b-only", "b")], b"B's copy".to_vec());
        let (_, retire_b) = read_for_seed(&config, &changelog, &partition());
        owner_b
            .seed(&partition(), Epoch(3), retire_b, &copy_b)
            .expect("B's seed goes through");
        copy_b
    } else {
        owner_b
            .take_over(&partition(), Epoch(3), &mut changelog.reader(0))
            .expect("the changelog restores")
    };
    let b_commits = |owner_b: &mut AnyOwner, state_b: &mut State, numbers: &[u64]| {
        for number in numbers {
            commit_ops(
                owner_b,
                &partition(),
                state_b,
                &[put("user/1", &format!("b{number}")), delete("user/2")],
                &format!("B {number}"),
            );
        }
    };
    match landing {
        SeedLanding::AfterTheNewLine | SeedLanding::AfterTheNewOwnersSeed => {
            b_commits(&mut owner_b, &mut state_b, &[4, 5]);
            seed_z(&mut owner_z, &mut |_| {});
        }
        SeedLanding::BeforeTheNewOwnersFirstFrame => {
            seed_z(&mut owner_z, &mut |_| {});
            b_commits(&mut owner_b, &mut state_b, &[4, 5]);
        }
        SeedLanding::AmidTheNewOwnersFrames => {
            let mut between = |shard: nsm_checkpoint::ShardId| {
                if shard.0 == SHARDS / 2 {
                    b_commits(&mut owner_b, &mut state_b, &[4]);
                }
            };
            seed_z(&mut owner_z, &mut between);
            b_commits(&mut owner_b, &mut state_b, &[5]);
        }
    }
    assert!(!state_b.rows.contains_key(&b"zombie-only"[..]));
    assert_every_restore_is(&config, &changelog, &partition(), &state_b, &context);
    assert_eq!(
        owner_b.store().state(&config, &partition()),
        state_b,
        "{context}: B's store"
    );

    // B never saw Z's seed; the next owner's read does, and its first commit tombstones it.
    let (read, retire) = read_for_seed(&config, &changelog, &partition());
    assert_eq!(read, state_b, "{context}");
    assert!(
        retire.frames().any(|frame| frame.epoch == Epoch(2)),
        "{context}: Z's seed is among the frames the read found"
    );
    let (mut owner_c, mut state_c) = owner_taking_over(kind, &changelog, 4);
    assert_eq!(state_c, state_b, "{context}");
    commit_ops(
        &mut owner_c,
        &partition(),
        &mut state_c,
        &[put("user/8", "c")],
        "C 6",
    );
    changelog.compact();
    assert!(
        changelog
            .records(0)
            .iter()
            .filter_map(|record| RecordKey::parse(&record.key).ok().flatten())
            .all(|key| key.frame.epoch != Epoch(2)),
        "{context}: Z's seed is tombstoned by the next owner's first commit"
    );
    assert_every_restore_is(&config, &changelog, &partition(), &state_c, &context);
}
