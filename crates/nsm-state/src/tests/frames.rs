//! The store under `nsm-checkpoint`'s frames: written through the checkpointer into an
//! in-memory changelog, restored from it into another store.

use nsm_checkpoint::testing::MemoryChangelog;
use nsm_checkpoint::{Checkpointer, Epoch, LineOutcome, LineRestore, LineRestored};

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
    fn open(dir: &Path, plan: &Plan, changelog: &MemoryChangelog) -> Framed {
        let store = Store::open(dir, plan, &options()).expect("open");
        let heads = RocksHeadStore::new(store.clone());
        let mut checkpointer =
            Checkpointer::with_head_store(checkpoint_config(), changelog.writer(), heads.clone());
        checkpointer
            .resume(&partition_id(&key(0)), Epoch(1))
            .expect("open the partition");
        let mut engine = engine_on(&store, plan);
        engine.restore_partition(key(0), PartitionSnapshot::default());
        Framed {
            store,
            heads,
            checkpointer,
            engine,
        }
    }

    /// Applies `events` and commits them as one checkpoint: the checkpoint's changes and
    /// dropped ranges, as frames carry them.
    fn checkpoint(&mut self, now: i64, events: &[(i64, Vec<u8>)]) -> (u64, usize) {
        for (offset, payload) in events {
            let _ = self.engine.apply(&key(0), *offset, payload, now);
        }
        let write = self.store.prepare_frames(&self.engine.take_changes());
        let due = self.checkpointer.snapshots_due(&partition_id(&key(0)));
        let checkpoint = self
            .store
            .checkpoint_of(&write, &key(0), &due)
            .expect("snapshots")
            .expect("partition 0 is written");
        let counts = (checkpoint.changes(), checkpoint.dropped_ranges());
        self.heads.stage(write);
        self.checkpointer
            .commit(std::slice::from_ref(&checkpoint))
            .expect("commit");
        counts
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
