//! The store under `nsm-checkpoint`'s frames: written through the checkpointer into an
//! in-memory changelog, restored from it into another store.

use nsm_checkpoint::testing::MemoryChangelog;
use nsm_checkpoint::{
    Checkpoint, Checkpointer, Epoch, LineOutcome, LineRestore, LineRestored, ShardId,
};

use super::*;

/// A store written through the checkpointer, frame by frame.
struct Framed {
    store: Store,
    heads: RocksHeadStore,
    checkpointer: Checkpointer<
        nsm_checkpoint::testing::MemoryChangelogWriter,
        RocksHeadStore,
        nsm_checkpoint::HeadsOnly,
    >,
    engine: Engine,
}

impl Framed {
    /// Opens the store at `dir` and takes partition 0 as its first owner.
    fn open(dir: &Path, plan: &Plan, changelog: &MemoryChangelog) -> Framed {
        Framed::take(dir, plan, changelog, Epoch(1)).0
    }

    /// Takes the partition again, as a new owner after a restart.
    fn reopen(
        self,
        dir: &Path,
        plan: &Plan,
        changelog: &MemoryChangelog,
    ) -> (Framed, Vec<DiscardedMetric>) {
        drop(self);
        let (framed, discarded) = Framed::take(dir, plan, changelog, Epoch(2));
        let head = framed.checkpointer.head(&partition_id(&key(0)));
        assert!(
            head.is_some_and(|head| head.sequence.0 > 1),
            "the head was kept"
        );
        (framed, discarded)
    }

    /// Takes partition 0 from the head the store holds: its first frame reconciles the
    /// metrics' definitions, committed even when it changes nothing.
    fn take(
        dir: &Path,
        plan: &Plan,
        changelog: &MemoryChangelog,
        epoch: Epoch,
    ) -> (Framed, Vec<DiscardedMetric>) {
        let store = Store::open(dir, plan, &options()).expect("open");
        let heads = RocksHeadStore::new(store.clone());
        let mut checkpointer =
            Checkpointer::with_head_store(checkpoint_config(), changelog.writer(), heads.clone());
        checkpointer
            .resume(&partition_id(&key(0)), epoch)
            .expect("open the partition");
        let (write, discarded) = store.prepare_adoption_frames(&key(0)).expect("adoption");
        let due = checkpointer.snapshots_due(&partition_id(&key(0)));
        let checkpoint = store
            .checkpoint_of(&write, &key(0), &ChangelogLayout::default(), &due)
            .expect("snapshots")
            .expect("the adoption writes partition 0");
        heads.stage(write);
        checkpointer
            .commit(std::slice::from_ref(&checkpoint))
            .expect("commit");
        let mut engine = engine_on(&store, plan);
        engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
        let framed = Framed {
            store,
            heads,
            checkpointer,
            engine,
        };
        (framed, discarded)
    }

    /// Applies `events` and commits them as one checkpoint: the checkpoint's changes and
    /// dropped ranges, as frames carry them.
    fn checkpoint(&mut self, now: i64, events: &[(i64, Vec<u8>)]) -> (u64, usize) {
        self.try_checkpoint(now, events).expect("commit")
    }

    /// As [`Framed::checkpoint`]; whether the commit succeeded.
    fn try_checkpoint(
        &mut self,
        now: i64,
        events: &[(i64, Vec<u8>)],
    ) -> Result<(u64, usize), String> {
        for (offset, payload) in events {
            let _ = self.engine.apply(&key(0), *offset, payload, now);
        }
        let write = self.store.prepare_frames(&self.engine.take_changes());
        let due = self.checkpointer.snapshots_due(&partition_id(&key(0)));
        let checkpoint = self
            .store
            .checkpoint_of(&write, &key(0), &ChangelogLayout::default(), &due)
            .expect("snapshots")
            .expect("partition 0 is written");
        let counts = (checkpoint.changes(), checkpoint.dropped_ranges());
        self.heads.stage(write);
        self.checkpointer
            .commit(std::slice::from_ref(&checkpoint))
            .map_err(|error| error.to_string())?;
        Ok(counts)
    }
}

/// Restores partition 0 from `records` into the store at `dir`, whole.
fn restore_frames(
    dir: &Path,
    plan: &Plan,
    records: Vec<(u64, nsm_checkpoint::ChangelogRecord)>,
) -> (Store, LineRestored) {
    let copy = Store::open(dir, plan, &options()).expect("open");
    let mut sink = RocksSink::new(&copy, &key(0));
    let mut restore = LineRestore::new(&checkpoint_config(), &partition_id(&key(0)), u64::MAX);
    for (offset, record) in records {
        restore
            .record(&mut sink, offset, &record.key, record.value.as_deref())
            .expect("record");
    }
    let LineOutcome::Restored(restored) = restore.finish(&mut sink).expect("finish") else {
        panic!("one pass restores a whole log");
    };
    drop(sink);
    (copy, restored)
}

fn meta_of(store: &Store) -> Option<Vec<u8>> {
    store
        .db
        .get_cf(store.cf(CF_PARTITIONS), partition_prefix(&key(0)))
        .expect("read")
}

#[test]
fn a_partition_restored_from_its_frames_equals_the_store_that_wrote_it() {
    let plan = every_entry_plan();
    for seed in 1..=3u64 {
        let changelog = MemoryChangelog::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut framed = Framed::open(dir.path(), &plan, &changelog);
        for (round, (now, events)) in random_rounds(seed).into_iter().enumerate() {
            framed.checkpoint(now, &events);
            for records in [changelog.records_with_offsets(0), {
                let compacted = changelog.fork();
                compacted.compact();
                compacted.records_with_offsets(0)
            }] {
                let copy_dir = tempfile::tempdir().expect("tempdir");
                let (copy, restored) = restore_frames(copy_dir.path(), &plan, records);
                assert_eq!(
                    frame_rows_of(&copy),
                    frame_rows_of(&framed.store),
                    "seed {seed}, round {round}"
                );
                assert_eq!(meta_of(&copy), meta_of(&framed.store));
                assert_eq!(Some(restored.meta), meta_of(&framed.store));
                assert_eq!(values_of(&copy, &plan), values_of(&framed.store, &plan));
            }
        }
    }
}

#[test]
fn a_week_expiring_is_a_dropped_range_per_window_not_a_record_per_entry() {
    let plan = every_entry_plan();
    let changelog = MemoryChangelog::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut framed = Framed::open(dir.path(), &plan, &changelog);
    // 400 users a round for an hour, then one event 40 days later.
    for round in 0..5i64 {
        let events: Vec<(i64, Vec<u8>)> = (0..400)
            .map(|user| {
                let offset = round * 400 + user;
                (
                    offset,
                    event("message_sent", &format!("user-{user}"), round * 10),
                )
            })
            .collect();
        framed.checkpoint(NOW, &events);
    }
    let later = NOW + 40 * 86_400_000;
    let expiring = vec![(2_000, {
        let time = later - 60_000;
        format!(r#"{{"event":"message_sent","user_id":"eve","timestamp":{time}}}"#).into_bytes()
    })];
    let entries_before = framed.store.stored_member_count(&key(0)).expect("count");
    let sent_before = changelog.records_sent();
    let (changes, dropped) = framed.checkpoint(later, &expiring);
    let entries_after = framed.store.stored_member_count(&key(0)).expect("count");
    assert!(
        entries_after < entries_before / 2,
        "{entries_before} → {entries_after}"
    );
    assert!(dropped > 0);
    // The new round's own changes, not a tombstone per entry gone.
    let gone = entries_before - entries_after;
    assert!(
        (changes as usize) < gone,
        "{changes} changes when {gone} entries went ({entries_before} → {entries_after})"
    );
    let sent = changelog.records_sent() - sent_before;
    assert!(
        sent <= 3,
        "{sent} records: a chunk or two and an end marker"
    );
}

#[test]
fn a_metric_that_changed_is_dropped_from_the_frames_too() {
    let plan = every_entry_plan();
    let changelog = MemoryChangelog::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut framed = Framed::open(dir.path(), &plan, &changelog);
    let mut rounds = random_rounds(3);
    rounds.pop();
    for (now, events) in &rounds[..3] {
        framed.checkpoint(*now, events);
    }
    // Reopened with the hourly count now daily, and the trailing count gone.
    let changed = plan_from(
        &CONFIG
            .replace("window = \"1h\"", "window = \"1d\"")
            .replace("[time]", "[events]\ndedup_horizon = \"10m\"\n[time]"),
    );
    let (mut framed, discarded) = framed.reopen(dir.path(), &changed, &changelog);
    let names: Vec<&str> = discarded
        .iter()
        .map(|metric| metric.name.as_str())
        .collect();
    assert_eq!(names, ["messages", "paid_after_messaging", "users_2h"]);
    for (now, events) in &rounds[3..] {
        framed.checkpoint(*now, events);
    }
    let rows = frame_rows_of(&framed.store);
    for gone in ["users_2h", "paid_after_messaging"] {
        assert!(
            !rows
                .keys()
                .any(|row| row.windows(gone.len()).any(|name| name == gone.as_bytes())),
            "{gone} left no row"
        );
    }
    let copy_dir = tempfile::tempdir().expect("tempdir");
    let (copy, _) = restore_frames(copy_dir.path(), &changed, changelog.records_with_offsets(0));
    assert_eq!(frame_rows_of(&copy), rows);
    assert_eq!(
        values_of(&copy, &changed),
        values_of(&framed.store, &changed)
    );
}

#[test]
fn a_store_kept_without_the_changelog_is_seeded_as_base_frames_and_restores_the_same() {
    let plan = every_entry_plan();
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path(), &plan, &options()).expect("open");
        adopt(&store, 0, &[]);
        let mut engine = engine_on(&store, &plan);
        engine.restore_partition(key(0), PartitionSnapshot::default());
        for (now, events) in random_rounds(5) {
            for (offset, payload) in events {
                let _ = engine.apply(&key(0), offset, &payload, now);
            }
            store.write(&engine.take_changes()).expect("write");
        }
    }
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    let changelog = MemoryChangelog::new();
    let heads = RocksHeadStore::new(store.clone());
    let mut checkpointer =
        Checkpointer::with_head_store(checkpoint_config(), changelog.writer(), heads);
    let id = partition_id(&key(0));
    let meta = store.stored_meta(&key(0)).expect("meta");
    checkpointer
        .seed(
            &id,
            &meta,
            Epoch(1),
            nsm_checkpoint::RetiredFrames::none(),
            |_, seed| store.seed_shard(&key(0), seed),
        )
        .expect("seed");
    assert_eq!(
        checkpointer.head(&id).map(|head| head.sequence.0),
        Some(1_025)
    );
    let copy_dir = tempfile::tempdir().expect("tempdir");
    let (copy, restored) =
        restore_frames(copy_dir.path(), &plan, changelog.records_with_offsets(0));
    assert_eq!(restored.meta, meta);
    assert_eq!(frame_rows_of(&copy), frame_rows_of(&store));
    assert_eq!(values_of(&copy, &plan), values_of(&store, &plan));
}

#[test]
fn a_frame_acknowledged_but_not_stored_is_restored_from_the_position() {
    let plan = every_entry_plan();
    let rounds = random_rounds(11);
    // Without a crash, for reference.
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let mut reference = Framed::open(reference_dir.path(), &plan, &MemoryChangelog::new());
    for (now, events) in &rounds {
        reference.checkpoint(*now, events);
    }

    let changelog = MemoryChangelog::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut framed = Framed::open(dir.path(), &plan, &changelog);
    for (now, events) in &rounds[..3] {
        framed.checkpoint(*now, events);
    }
    // The fourth checkpoint's frame is acknowledged, then the store's write fails.
    framed
        .heads
        .fail_next
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (now, events) = &rounds[3];
    assert!(framed.try_checkpoint(*now, events).is_err());
    drop(framed);

    // Restarted: the local head is the third checkpoint's; the changelog goes on from its
    // position with the fourth, which the restore applies to the local rows.
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    let heads = RocksHeadStore::new(store.clone());
    let config = checkpoint_config();
    let id = partition_id(&key(0));
    let head = nsm_checkpoint::restore_head(&config, &heads, &id).expect("head");
    let position = store
        .changelog_position(&key(0))
        .expect("position")
        .expect("a position was stored")
        .offset as u64;
    let mut sink = RocksSink::new(&store, &key(0));
    let mut restore = LineRestore::resume(&config, &head, u64::MAX);
    for (offset, record) in changelog.records_with_offsets(0) {
        if offset >= position {
            restore
                .record(&mut sink, offset, &record.key, record.value.as_deref())
                .expect("record");
        }
    }
    let LineOutcome::Restored(restored) = restore.finish(&mut sink).expect("finish") else {
        panic!("the frames after the position continue the local head");
    };
    drop(sink);
    assert!(restored.resumed);
    assert!(restored.head.sequence > head.head.sequence);
    let mut checkpointer = Checkpointer::with_head_store(config, changelog.writer(), heads.clone());
    checkpointer
        .take_over_restored(Epoch(2), restored, |_| Ok(()))
        .expect("take over");
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    let mut framed = Framed {
        store,
        heads,
        checkpointer,
        engine,
    };
    for (now, events) in &rounds[4..] {
        framed.checkpoint(*now, events);
    }
    assert_eq!(
        frame_rows_of(&framed.store),
        frame_rows_of(&reference.store)
    );
    assert_eq!(
        values_of(&framed.store, &plan),
        values_of(&reference.store, &plan)
    );
}

/// The checkpoint an nsm of state format 7 made of a write already stored (`overlay`): member
/// rows keyed as that format stored them, under the byte it gave them, and the `due` snapshots
/// read from the store as it is. Returns it with how many member rows it carries.
fn format_7_checkpoint(
    store: &Store,
    overlay: &WriteOverlay,
    due: &[ShardId],
) -> (Checkpoint, usize) {
    let prefix = partition_prefix(&key(0));
    let member_byte = changelog::family_byte(CF_ENTRIES);
    let mut members = 0;
    let mut older = |row: &[u8]| -> Vec<u8> {
        if row[0] != member_byte {
            return row.to_vec();
        }
        members += 1;
        let key = format_7_key(&[&prefix[..], &row[1..]].concat());
        [&[changelog::OLDER_MEMBER_BYTE][..], &key[prefix.len()..]].concat()
    };
    let meta = store.stored_meta(&key(0)).expect("meta");
    let mut checkpoint = Checkpoint::new(partition_id(&key(0)), meta);
    for (start, end) in overlay.ranges() {
        // A range's bounds are places, the same in format 7 but for the byte.
        let byte = |bound: &[u8]| match bound.split_first() {
            Some((first, rest)) if *first == member_byte => {
                [&[changelog::OLDER_MEMBER_BYTE][..], rest].concat()
            }
            _ => bound.to_vec(),
        };
        checkpoint.drop_range(&byte(start), &byte(end));
    }
    for (shard, key, value) in overlay.rows() {
        let key = older(key);
        match value {
            Some(value) => checkpoint.put(ShardId(u32::from(shard)), &key, value),
            None => checkpoint.delete(ShardId(u32::from(shard)), &key),
        }
    }
    for &shard in due.iter().take(SNAPSHOTS_PER_CHECKPOINT) {
        checkpoint.snapshot_shard(shard);
        let number = u16::try_from(shard.0).expect("a frame shard");
        let mut rows = Vec::new();
        store
            .shard_rows(&key(0), number, &WriteOverlay::default(), |key, value| {
                rows.push((key.to_vec(), value.to_vec()))
            })
            .expect("read");
        for (key, value) in rows {
            checkpoint.snapshot_row(shard, &older(&key), &value);
        }
    }
    (checkpoint, members)
}

#[test]
fn frames_of_an_nsm_of_format_7_restore_into_format_8_keys() {
    let plan = every_entry_plan();
    let changelog = MemoryChangelog::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &plan, &options()).expect("open");
    let heads = RocksHeadStore::new(store.clone());
    let mut checkpointer =
        Checkpointer::with_head_store(checkpoint_config(), changelog.writer(), heads);
    let id = partition_id(&key(0));
    checkpointer
        .resume(&id, Epoch(1))
        .expect("open the partition");
    // Each write is stored first, then sent as the older nsm's frame of it.
    let mut member_rows = 0;
    let mut send = |write: FramedWrite| {
        let overlay = write.overlay(&key(0)).cloned().unwrap_or_default();
        store.commit_framed(write).expect("commit");
        let due = checkpointer.snapshots_due(&id);
        let (checkpoint, members) = format_7_checkpoint(&store, &overlay, &due);
        member_rows += members;
        checkpointer
            .commit(std::slice::from_ref(&checkpoint))
            .expect("commit");
    };
    let (adoption, _) = store.prepare_adoption_frames(&key(0)).expect("adoption");
    send(adoption);
    let mut engine = engine_on(&store, &plan);
    engine.restore_partition(key(0), PartitionSnapshot::default());
    for (now, events) in random_rounds(7) {
        for (offset, payload) in events {
            let _ = engine.apply(&key(0), offset, &payload, now);
        }
        let changes = engine.take_changes();
        store.learn_legacy_keys(&changes);
        send(store.prepare_frames(&changes));
    }
    assert!(member_rows > 0, "the frames carry member rows of format 7");

    let copy_dir = tempfile::tempdir().expect("tempdir");
    let (copy, restored) =
        restore_frames(copy_dir.path(), &plan, changelog.records_with_offsets(0));
    assert_eq!(Some(restored.meta), meta_of(&store));
    assert_eq!(frame_rows_of(&copy), frame_rows_of(&store));
    assert_eq!(values_of(&copy, &plan), values_of(&store, &plan));
}
