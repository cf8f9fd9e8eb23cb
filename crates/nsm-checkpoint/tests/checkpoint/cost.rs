//! What a checkpoint sends and a restore reads, counted: a checkpoint of many rows is a few
//! large records, an expiry is one entry whatever it removes, and a restore after any number
//! of checkpoints reads one snapshot per shard and the deltas after the oldest one.

use nsm_checkpoint::testing::{MemoryChangelog, MemoryStore};
use nsm_checkpoint::{CheckpointConfig, Checkpointer, CommitReport, Epoch, PartitionId, RecordKey};

use crate::support::{
    apply, checkpoint, config, from_changelog, from_store, meta_of, Op, Owner, State,
};

fn partition() -> PartitionId {
    PartitionId::new(0, "input-0")
}

fn open_owner(config: CheckpointConfig, changelog: &MemoryChangelog) -> Owner {
    let mut owner = Checkpointer::new(config, changelog.writer(), MemoryStore::new());
    owner
        .resume_from_store(&partition(), Epoch(1))
        .expect("an empty store opens");
    owner
}

/// Commits `ops` as the next checkpoint, with the due snapshot.
fn commit(owner: &mut Owner, state: &mut State, number: &mut u64, ops: &[Op]) -> CommitReport {
    *number += 1;
    apply(state, ops, meta_of(0, *number));
    let config = *owner.config();
    let snapshot = owner.snapshot_due(&partition());
    let built = checkpoint(&config, &partition(), ops, state, snapshot);
    owner.commit(&[built]).expect("the commit goes through")
}

/// A row key as the engine's: a prefix naming its generation, then a 128-bit entity hash.
fn entity_key(generation: u32, entity: u64) -> Vec<u8> {
    let mut key = format!("generation/{generation}/").into_bytes();
    key.extend_from_slice(
        &u128::from(entity)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            .to_be_bytes(),
    );
    key
}

#[test]
fn a_checkpoint_of_many_rows_is_a_few_large_records_and_an_expiry_one_entry() {
    const ROWS: u64 = 100_000;
    let config = config(64, CheckpointConfig::DEFAULT_MAX_CHUNK_BYTES);
    let changelog = MemoryChangelog::new();
    let mut owner = open_owner(config, &changelog);
    let mut state = State::default();
    let mut number = 0;

    let rows: Vec<Op> = (0..ROWS)
        .map(|entity| {
            Op::Put(
                entity_key(1, entity),
                format!("windows {entity:>16}").into_bytes(),
            )
        })
        .collect();
    let report = commit(&mut owner, &mut state, &mut number, &rows);
    let chunks = report.frame_bytes.div_ceil(config.max_chunk_bytes() as u64);
    eprintln!(
        "{ROWS} changed rows: a frame of {} bytes, {} chunk records, {} end marker, {} tombstones, \
         {} records in all; the store write put {} values",
        report.frame_bytes,
        report.chunk_records,
        report.end_markers,
        report.tombstones,
        report.records(),
        owner.store().last_commit().values_put,
    );
    assert_eq!(report.chunk_records, chunks);
    assert_eq!(report.end_markers, 1);
    assert!(report.records() <= chunks + 3);
    // The head, the due shard's snapshot and the checkpoint's delta.
    assert_eq!(owner.store().last_commit().values_put, 3);

    let expiry = commit(
        &mut owner,
        &mut state,
        &mut number,
        &[Op::DropPrefix(b"generation/1/".to_vec())],
    );
    let stored = owner.store().last_commit();
    eprintln!(
        "expiring {ROWS} rows: {} records ({} chunk, {} end marker, {} tombstones); the store \
         write put {} values and made {} range deletes",
        expiry.records(),
        expiry.chunk_records,
        expiry.end_markers,
        expiry.tombstones,
        stored.values_put,
        stored.range_deletes,
    );
    assert!(state.rows.is_empty());
    assert_eq!(expiry.chunk_records, 1);
    assert_eq!(expiry.end_markers, 1);
    assert!(expiry.records() <= 3);
    assert_eq!(stored.values_put, 3);
    assert!(stored.range_deletes <= 1);

    // As snapshots go round, the large frame becomes obsolete and is tombstoned as its chunks
    // and end marker, never a record per row.
    let mut tombstones = 0;
    let mut commits = 0;
    for _ in 0..config.shards() + 2 {
        tombstones += commit(&mut owner, &mut state, &mut number, &[]).tombstones;
        commits += 1;
    }
    eprintln!(
        "{commits} more checkpoints, the large frame obsolete: {tombstones} tombstones in all"
    );
    let tombstones_of_the_large_frame = changelog
        .records(0)
        .iter()
        .filter(|record| record.value.is_none())
        .filter_map(|record| RecordKey::parse(&record.key).ok().flatten())
        .filter(|key| key.frame.sequence.0 == 1)
        .count() as u64;
    assert_eq!(tombstones_of_the_large_frame, chunks + 1);
    assert!(tombstones <= chunks + 1 + 2 * commits);
    changelog.compact();
    let restored = from_changelog(&config, &changelog, &partition(), false);
    assert_eq!(State::of(&config, &restored), state);
    assert!(
        restored.stats.bytes_read < 64 * 1024,
        "the expired rows are gone from the log: a restore reads {} bytes",
        restored.stats.bytes_read
    );
}

#[test]
fn a_restore_reads_one_snapshot_per_shard_and_the_deltas_after_the_oldest() {
    const SHARDS: u32 = 8;
    const ROWS: u64 = 2_000;
    const CHANGED: u64 = 50;
    let config = config(SHARDS, 4096);
    let changelog = MemoryChangelog::new();
    let mut owner = open_owner(config, &changelog);
    let mut state = State::default();
    let mut number = 0;
    let all: Vec<Op> = (0..ROWS)
        .map(|entity| Op::Put(entity_key(1, entity), b"first value".to_vec()))
        .collect();
    commit(&mut owner, &mut state, &mut number, &all);

    let mut most_records = 0;
    let mut read_after = Vec::new();
    for round in 1..=20u64 {
        for step in 0..u64::from(SHARDS) {
            let checkpoint_index = round * u64::from(SHARDS) + step;
            let ops: Vec<Op> = (0..CHANGED)
                .map(|row| {
                    let entity = (checkpoint_index * 97 + row * 37) % ROWS;
                    Op::Put(
                        entity_key(1, entity),
                        format!("value {checkpoint_index}").into_bytes(),
                    )
                })
                .collect();
            let report = commit(&mut owner, &mut state, &mut number, &ops);
            most_records = most_records.max(report.records());
        }
        if round % 10 == 0 {
            changelog.compact();
            let restored = from_changelog(&config, &changelog, &partition(), false);
            assert_eq!(State::of(&config, &restored), state);
            read_after.push((number, restored.stats));
        }
    }

    let state_bytes: u64 = state
        .rows
        .iter()
        .map(|(key, value)| (key.len() + value.len() + 2) as u64)
        .sum();
    let delta_bytes = CHANGED * (state.rows.keys().next().map_or(0, Vec::len) as u64 + 16);
    let shards = u64::from(SHARDS);
    for (checkpoints, stats) in &read_after {
        eprintln!(
            "after {checkpoints} checkpoints: a restore read {} records, {} bytes ({} snapshots \
             of {} rows, {} deltas of {} changes); the state is {} rows, {state_bytes} bytes",
            stats.records_read,
            stats.bytes_read,
            stats.snapshots_applied,
            stats.snapshot_rows,
            stats.deltas_applied,
            stats.delta_changes,
            state.rows.len(),
        );
        assert_eq!(stats.snapshots_applied, shards);
        assert_eq!(stats.snapshot_rows, ROWS);
        assert_eq!(stats.deltas_applied, shards - 1);
        assert!(stats.delta_changes <= (shards - 1) * CHANGED);
        // The frames left: one per shard holding its snapshot, at most two obsolete ones not
        // yet tombstoned; each frame's records carry a key and a few bytes of framing.
        assert!(stats.records_read <= (shards + 2) * most_records);
        assert!(
            stats.bytes_read
                <= state_bytes * (shards + 2) / shards
                    + (shards + 2) * delta_bytes
                    + stats.records_read * 64,
            "a restore read {} bytes",
            stats.bytes_read
        );
    }
    let (first, second) = (read_after[0].1, read_after[1].1);
    assert_eq!(
        first.records_read, second.records_read,
        "what a restore reads does not grow"
    );
    assert!(second.bytes_read <= first.bytes_read * 21 / 20);

    let stored = from_store(&config, owner.store(), &partition());
    assert_eq!(State::of(&config, &stored), state);
    assert_eq!(stored.stats.snapshots_applied, shards);
    assert_eq!(stored.stats.deltas_applied, shards - 1);
    assert!(owner.store().stored_deltas(&partition()) < SHARDS as usize);
}

#[test]
fn an_expiry_of_many_windows_is_one_range_each() {
    const WINDOWS: u32 = 40;
    const EXPIRED: u32 = 30;
    const ROWS_PER_WINDOW: u64 = 2_500;
    let config = config(64, CheckpointConfig::DEFAULT_MAX_CHUNK_BYTES);
    let changelog = MemoryChangelog::new();
    let mut owner = open_owner(config, &changelog);
    let mut state = State::default();
    let mut number = 0;
    let window = |window: u32| format!("window/{window:04}/");
    let rows: Vec<Op> = (0..WINDOWS)
        .flat_map(|index| {
            (0..ROWS_PER_WINDOW).map(move |entity| {
                let mut key = window(index).into_bytes();
                key.extend_from_slice(&entity_key(0, entity)[13..]);
                Op::Put(key, b"1".to_vec())
            })
        })
        .collect();
    commit(&mut owner, &mut state, &mut number, &rows);

    // Each expired window is the range from its start to the next window's, as a store names
    // the windows it deletes; no snapshot, so the frame is the expiry alone.
    let expiry: Vec<Op> = (0..EXPIRED)
        .map(|index| Op::DropRange(window(index).into_bytes(), window(index + 1).into_bytes()))
        .collect();
    number += 1;
    apply(&mut state, &expiry, meta_of(0, number));
    let built = checkpoint(&config, &partition(), &expiry, &state, None);
    assert_eq!(built.dropped_ranges(), EXPIRED as usize);
    assert_eq!(built.changes(), 0);
    let report = owner.commit(&[built]).expect("the commit goes through");
    let range_bytes = u64::from(EXPIRED) * 2 * (window(0).len() as u64 + 1);
    eprintln!(
        "expiring {EXPIRED} windows of {ROWS_PER_WINDOW} rows: a frame of {} bytes ({range_bytes} \
         of ranges), {} records",
        report.frame_bytes,
        report.records(),
    );
    assert_eq!(
        state.rows.len() as u64,
        u64::from(WINDOWS - EXPIRED) * ROWS_PER_WINDOW
    );
    assert_eq!(report.chunk_records, 1);
    assert_eq!(report.end_markers, 1);
    assert!(report.records() <= 3);
    assert!(
        report.frame_bytes <= range_bytes + 128,
        "the frame is the ranges and its framing, not {} bytes",
        report.frame_bytes
    );
    for compacted in [false, true] {
        let restored = from_changelog(&config, &changelog, &partition(), compacted);
        assert_eq!(State::of(&config, &restored), state);
    }
    let stored = from_store(&config, owner.store(), &partition());
    assert_eq!(State::of(&config, &stored), state);
}
