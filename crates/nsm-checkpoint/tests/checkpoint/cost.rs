//! What a checkpoint sends and a restore reads, counted: a checkpoint of many rows is a few
//! large records, an expiry is one entry whatever it removes, snapshots keep pace with deltas
//! by bytes, and a restore after any number of checkpoints reads one snapshot per shard and the
//! deltas after the oldest one: about twice the state.

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

/// Commits `ops` as the next checkpoint, with the due snapshots.
fn commit(owner: &mut Owner, state: &mut State, number: &mut u64, ops: &[Op]) -> CommitReport {
    *number += 1;
    apply(state, ops, meta_of(0, *number));
    let config = *owner.config();
    let snapshots = owner.snapshots_due(&partition());
    let built = checkpoint(&config, &partition(), ops, state, &snapshots);
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
    // No shard's size is known yet, so the first checkpoint snapshots every shard: the store
    // write is the head and the snapshots, no delta (no snapshot is older than it).
    assert_eq!(report.snapshots, u64::from(config.shards()));
    assert_eq!(
        owner.store().last_commit().values_put,
        1 + u64::from(config.shards())
    );

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
    // The expiry's few bytes of delta pay for no snapshot of the large shards: the head and
    // the delta.
    assert_eq!(expiry.snapshots, 0);
    assert_eq!(stored.values_put, 2);
    assert!(stored.range_deletes <= 1);

    // The expired rows stay in the first frame's snapshots until every shard is snapshotted
    // again, which the delta bytes of later checkpoints pay for (an expiry earns only its own
    // few bytes: docs/design/changelog-frames.md, risk 2). Then the large frame is obsolete and
    // tombstoned as its chunks and end marker, never a record per row.
    let large_frame_tombstoned = |changelog: &MemoryChangelog| {
        changelog
            .records(0)
            .iter()
            .filter(|record| record.value.is_none())
            .filter_map(|record| RecordKey::parse(&record.key).ok().flatten())
            .filter(|key| key.frame.sequence.0 == 1)
            .count() as u64
    };
    let mut tombstones = 0;
    let mut commits = 0;
    let mut delta_bytes = 0;
    let mut generation_2 = 0..;
    while large_frame_tombstoned(&changelog) == 0 {
        assert!(commits < 1_000, "the large frame is never tombstoned");
        let ops: Vec<Op> = generation_2
            .by_ref()
            .take(1_000)
            .map(|entity| Op::Put(entity_key(2, entity), b"new".to_vec()))
            .collect();
        let report = commit(&mut owner, &mut state, &mut number, &ops);
        tombstones += report.tombstones;
        delta_bytes += report.delta_bytes;
        commits += 1;
    }
    eprintln!(
        "{commits} more checkpoints of {delta_bytes} delta bytes in all, the large frame of {}          bytes obsolete: {tombstones} tombstones in all",
        report.frame_bytes
    );
    assert_eq!(large_frame_tombstoned(&changelog), chunks + 1);
    // A snapshot is due once the credit covers its shard's last size, but spends only what it
    // sends: the old shards' snapshots were paid off by the bytes of the new state and about
    // one old shard's size, not by the expired rows' bytes over again.
    let state_bytes: u64 = state
        .rows
        .iter()
        .map(|(key, value)| (key.len() + value.len() + 2) as u64)
        .sum();
    let old_shard_bytes = report.frame_bytes / u64::from(config.shards());
    assert!(
        delta_bytes <= 2 * state_bytes + 2 * old_shard_bytes,
        "the large frame's snapshots were paid off by {delta_bytes} delta bytes, the state is \
         {state_bytes} bytes, an old shard {old_shard_bytes}"
    );
    assert!(tombstones <= chunks + 1 + 2 * commits);
    changelog.compact();
    let restored = from_changelog(&config, &changelog, &partition(), false);
    assert_eq!(State::of(&config, &restored), state);
    assert!(
        restored.stats.bytes_read < 3 * state_bytes + restored.stats.records_read * 64,
        "the expired rows are gone from the log: a restore reads {} bytes, the state is {}",
        restored.stats.bytes_read,
        state_bytes
    );
}

/// Runs `checkpoints` checkpoints of `changed` rows each over a state of `rows` rows in
/// `shards` shards, every snapshot the pace asks for, and checks what the changelog carries and
/// what a restore of it reads.
fn snapshots_keep_pace(shards: u32, rows: u64, changed: u64, checkpoints: u64) {
    let config = config(shards, 4096);
    let changelog = MemoryChangelog::new();
    let mut owner = open_owner(config, &changelog);
    let mut state = State::default();
    let mut number = 0;
    let all: Vec<Op> = (0..rows)
        .map(|entity| Op::Put(entity_key(1, entity), b"first value".to_vec()))
        .collect();
    commit(&mut owner, &mut state, &mut number, &all);

    let state_bytes = |state: &State| -> u64 {
        state
            .rows
            .iter()
            .map(|(key, value)| (key.len() + value.len() + 2) as u64)
            .sum()
    };
    let (mut snapshot_bytes, mut delta_bytes, mut most_snapshots) = (0, 0, 0);
    let mut restores = Vec::new();
    for index in 1..=checkpoints {
        let ops: Vec<Op> = (0..changed)
            .map(|row| {
                let entity = (index * 97 + row * 37) % rows;
                Op::Put(entity_key(1, entity), format!("value {index}").into_bytes())
            })
            .collect();
        let report = commit(&mut owner, &mut state, &mut number, &ops);
        snapshot_bytes += report.snapshot_bytes;
        delta_bytes += report.delta_bytes;
        most_snapshots = most_snapshots.max(report.snapshots);
        if index % (checkpoints / 2) == 0 {
            changelog.compact();
            let restored = from_changelog(&config, &changelog, &partition(), false);
            assert_eq!(State::of(&config, &restored), state);
            restores.push((number, restored.stats));
        }
    }

    let state_bytes = state_bytes(&state);
    eprintln!(
        "{shards} shards, {checkpoints} checkpoints of {changed} of {rows} rows: {delta_bytes} \
         delta bytes, {snapshot_bytes} snapshot bytes, at most {most_snapshots} snapshots in \
         one; the state is {state_bytes} bytes"
    );
    // The credit spent on snapshots is the delta bytes earned, less what is left (at most a
    // round of snapshots); sizes drift a little as values grow.
    assert!(
        snapshot_bytes <= delta_bytes * 11 / 10,
        "{snapshot_bytes} snapshot bytes for {delta_bytes} delta bytes"
    );
    assert!(
        snapshot_bytes * 11 / 10 + state_bytes >= delta_bytes,
        "{snapshot_bytes} snapshot bytes for {delta_bytes} delta bytes"
    );
    assert!(most_snapshots < u64::from(shards));
    for (checkpoints, stats) in &restores {
        eprintln!(
            "after {checkpoints} checkpoints: a restore read {} records, {} bytes ({} snapshots \
             of {} rows, {} deltas of {} changes); it applied {} frames in {} passes",
            stats.records_read,
            stats.bytes_read,
            stats.snapshots_applied,
            stats.snapshot_rows,
            stats.deltas_applied,
            stats.delta_changes,
            stats.frames_applied,
            stats.passes,
        );
        assert_eq!(stats.snapshots_applied, u64::from(shards));
        assert_eq!(stats.snapshot_rows, rows);
        // Streamed in one pass, the compacted log's frames are the line (the oldest snapshot's
        // frame and the deltas after it) and at most the one obsolete frame the last commit
        // left for the next to tombstone.
        assert_eq!(stats.passes, 1);
        assert!(
            stats.frames_applied <= stats.deltas_applied + 2,
            "{} frames applied for a line of {}",
            stats.frames_applied,
            stats.deltas_applied + 1
        );
        // One snapshot of each shard, the deltas since the oldest (about as many bytes, since
        // they paid for a round), and the records' keys and framing.
        assert!(
            stats.bytes_read <= state_bytes * 5 / 2 + stats.records_read * 64,
            "a restore read {} bytes, the state is {state_bytes}",
            stats.bytes_read
        );
    }
    let (first, second) = (restores[0].1, restores[1].1);
    assert!(
        second.bytes_read <= first.bytes_read * 6 / 5,
        "what a restore reads does not grow"
    );

    let stored = from_store(&config, owner.store(), &partition());
    assert_eq!(State::of(&config, &stored), state);
    assert_eq!(stored.stats.snapshots_applied, u64::from(shards));
    assert_eq!(stored.stats.deltas_applied, second.deltas_applied);
}

#[test]
fn snapshot_bytes_keep_pace_with_delta_bytes_and_a_restore_reads_about_twice_the_state() {
    snapshots_keep_pace(8, 2_000, 50, 400);
    // The plan's count: 1,024 member shards and the aggregate shard.
    snapshots_keep_pace(1025, 10_000, 100, 500);
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
    let built = checkpoint(&config, &partition(), &expiry, &state, &[]);
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

#[test]
fn a_seed_is_one_frame_per_shard() {
    use crate::support::{read_for_seed, reader_from, rows_by_shard, stream_restore};
    use nsm_checkpoint::{LineRestore, RecordPart};

    const ROWS: u64 = 50_000;
    const SHARDS: u32 = 64;
    let config = config(SHARDS, CheckpointConfig::DEFAULT_MAX_CHUNK_BYTES);
    let changelog = MemoryChangelog::new();
    // A line before the seed: a checkpoint of every row (snapshotting every shard), and one of
    // a few.
    let mut owner = open_owner(config, &changelog);
    let mut state = State::default();
    let mut number = 0;
    let rows: Vec<Op> = (0..ROWS)
        .map(|entity| Op::Put(entity_key(1, entity), b"before".to_vec()))
        .collect();
    commit(&mut owner, &mut state, &mut number, &rows);
    commit(&mut owner, &mut state, &mut number, &rows[..10]);
    let before = changelog.records(0).len() as u64;

    // The copy seeded: the same keys, other values, and its own meta.
    let mut copy = State {
        meta: b"the copy's offsets".to_vec(),
        ..State::default()
    };
    for entity in 0..ROWS {
        copy.rows
            .insert(entity_key(1, entity), format!("copy {entity}").into_bytes());
    }
    let (_, retire) = read_for_seed(&config, &changelog, &partition());
    assert_eq!(retire.frames().count(), 2);
    let by_shard = rows_by_shard(&config, &copy);
    let mut seeder = Checkpointer::new(config, changelog.writer(), MemoryStore::new());
    let report = seeder
        .seed(&partition(), &copy.meta, Epoch(2), retire, |shard, rows| {
            for (key, value) in by_shard.get(&shard).into_iter().flatten() {
                rows.row(key, value);
            }
            Ok::<(), std::convert::Infallible>(())
        })
        .expect("the seed goes through");
    let state_bytes: u64 = copy
        .rows
        .iter()
        .map(|(key, value)| (key.len() + value.len() + 2) as u64)
        .sum();
    eprintln!(
        "seeding {ROWS} rows ({state_bytes} bytes) in {SHARDS} shards: {} frames of {} bytes, {} \
         records; the store write put {} values",
        report.frames.len(),
        report.frame_bytes,
        report.records(),
        seeder.store().last_commit().values_put,
    );
    // One frame per shard, each its shard's snapshot and nothing else, one chunk each at this
    // size, and no tombstone: the retired frames wait for the next commit.
    assert_eq!(report.frames.len(), SHARDS as usize);
    let sequences: Vec<u64> = report.frames.iter().map(|(_, id)| id.sequence.0).collect();
    assert_eq!(sequences, (1..=u64::from(SHARDS)).collect::<Vec<_>>());
    assert_eq!(report.end_markers, u64::from(SHARDS));
    assert_eq!(report.chunk_records, u64::from(SHARDS));
    assert_eq!(report.tombstones, 0);
    assert_eq!(report.snapshots, u64::from(SHARDS));
    assert!(report.frame_bytes <= state_bytes + u64::from(SHARDS) * 64);
    // The blob store's one write: the head, a snapshot per shard, the (empty) delta of each
    // frame after the first.
    assert_eq!(
        seeder.store().last_commit().values_put,
        1 + 2 * u64::from(SHARDS) - 1
    );

    // A restore reads the seed once, in one pass, applying the old line and then the seed over
    // it: exactly the copy.
    for compacted in [false, true] {
        let restored = from_changelog(&config, &changelog, &partition(), compacted);
        assert_eq!(State::of(&config, &restored), copy);
        assert_eq!(restored.stats.snapshots_applied, u64::from(SHARDS));
        assert_eq!(restored.stats.snapshot_rows, ROWS);
        assert_eq!(restored.stats.frames_skipped, 2);
        assert_eq!(restored.stats.passes, 1);
        let reader = reader_from(&changelog, 0, compacted, None);
        let one_frame = crate::support::largest_frame_bytes(&changelog, &partition());
        let start = LineRestore::new(&config, &partition(), one_frame);
        let (streamed, state) = stream_restore(&config, start, &reader, State::default())
            .expect("the changelog restores")
            .expect("a whole read goes on from nothing");
        assert_eq!(state, copy);
        eprintln!(
            "held to one frame (compacted: {compacted}): {} passes, {} frames applied",
            streamed.stats.passes, streamed.stats.frames_applied
        );
    }
    assert_eq!(
        State::of(&config, &from_store(&config, seeder.store(), &partition())),
        copy
    );

    // The next commit tombstones the line before the seed (its chunks and end markers), and
    // compaction leaves the seed and that commit: about the state once.
    let ops = [Op::Put(entity_key(1, 7), b"after".to_vec())];
    apply(&mut copy, &ops, meta_of(0, 3));
    let due = seeder.snapshots_due(&partition());
    let built = checkpoint(&config, &partition(), &ops, &copy, &due);
    let next = seeder.commit(&[built]).expect("the commit goes through");
    let old_records = before;
    assert_eq!(next.tombstones, old_records, "every record of the old line");
    changelog.compact();
    let kept = changelog.records(0);
    assert!(kept
        .iter()
        .filter_map(|record| RecordKey::parse(&record.key).ok().flatten())
        .all(|key| key.frame.epoch == Epoch(2)
            && (key.frame.sequence.0 <= u64::from(SHARDS) + 1)
            && matches!(key.part, RecordPart::Chunk(_) | RecordPart::End)));
    let restored = from_changelog(&config, &changelog, &partition(), false);
    assert_eq!(State::of(&config, &restored), copy);
    assert!(
        restored.stats.bytes_read <= state_bytes * 11 / 10 + restored.stats.records_read * 64,
        "a restore after the seed read {} bytes, the state is {state_bytes}",
        restored.stats.bytes_read
    );
}

/// What a writer was asked, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Chunk,
    End,
    Tombstone,
    Flush,
}

/// A [`MemoryChangelog`] writer that notes each request.
struct Noting {
    inner: nsm_checkpoint::testing::MemoryChangelogWriter,
    sent: std::sync::Arc<std::sync::Mutex<Vec<Sent>>>,
}

impl nsm_checkpoint::ChangelogWriter for Noting {
    type Error = nsm_checkpoint::testing::MemoryChangelogError;

    fn send(
        &mut self,
        partition: u32,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), Self::Error> {
        let part = RecordKey::parse(key)
            .expect("a key of ours")
            .expect("ours")
            .part;
        self.sent.lock().expect("lock").push(match (part, value) {
            (_, None) => Sent::Tombstone,
            (nsm_checkpoint::RecordPart::End, Some(_)) => Sent::End,
            (nsm_checkpoint::RecordPart::Chunk(_), Some(_)) => Sent::Chunk,
        });
        self.inner.send(partition, key, value)
    }

    fn flush(&mut self) -> Result<nsm_checkpoint::Acknowledged, Self::Error> {
        self.sent.lock().expect("lock").push(Sent::Flush);
        self.inner.flush()
    }
}

/// Every chunk of a commit is acknowledged before its end marker is sent, and the end markers
/// are the commit's last records, alone in the last flush: no retry can land a chunk after its
/// marker, and the log ends with the marker (a broker answering ListOffsets with the last
/// batch's first offset plus one, as tansu 0.6 does, still gives the stored position). The
/// frames tombstoned go before the chunks.
#[test]
fn end_markers_are_sent_alone_once_the_chunks_are_acknowledged() {
    let config = config(4, 256);
    let changelog = MemoryChangelog::new();
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = Noting {
        inner: changelog.writer(),
        sent: sent.clone(),
    };
    let mut owner = Checkpointer::new(config, writer, MemoryStore::new());
    owner
        .resume_from_store(&partition(), Epoch(1))
        .expect("an empty store opens");
    let mut state = State::default();
    let mut tombstones = 0;
    for number in 1..=40u64 {
        sent.lock().expect("lock").clear();
        let ops: Vec<Op> = (0..50)
            .map(|row| Op::Put(entity_key(1, number * 50 + row), vec![7; 40]))
            .collect();
        apply(&mut state, &ops, meta_of(0, number));
        let snapshots = owner.snapshots_due(&partition());
        let built = checkpoint(&config, &partition(), &ops, &state, &snapshots);
        let report = owner.commit(&[built]).expect("the commit goes through");
        tombstones += report.tombstones;
        let sent = sent.lock().expect("lock").clone();
        let flushes: Vec<usize> = (0..sent.len())
            .filter(|at| sent[*at] == Sent::Flush)
            .collect();
        assert_eq!(flushes.len(), 2, "{sent:?}");
        let (first, second) = sent.split_at(flushes[0]);
        assert_eq!(second, [Sent::Flush, Sent::End, Sent::Flush], "{sent:?}");
        let chunks_from = first
            .iter()
            .position(|part| *part == Sent::Chunk)
            .expect("a chunk");
        assert!(
            first[..chunks_from]
                .iter()
                .all(|part| *part == Sent::Tombstone),
            "{sent:?}"
        );
        assert!(
            first[chunks_from..].iter().all(|part| *part == Sent::Chunk),
            "{sent:?}"
        );
    }
    assert!(
        tombstones > 0,
        "no frame was tombstoned: the order of tombstones was not seen"
    );
    changelog.compact();
    let restored = from_changelog(&config, &changelog, &partition(), false);
    assert_eq!(State::of(&config, &restored), state);
}
