//! Measures the entity table (`nsm_core::table`): `entry` and `get` in nanoseconds per call and
//! memory in bytes per row, beside a std `HashMap` with a pass-through hasher as a reference.
//! Measured, never asserted.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-table cargo run --release -p nsm-core --example table_bench
//! ```
//!
//! The workload: 5M distinct keys of 2 lanes, each written twice by `entry` in a shuffled order
//! (10M calls, the first of each pair an insert), then 10M `get`s in another shuffled order,
//! then a drain of the 5M dirty rows, a restore of the rows in snapshot order (`load` in the
//! order of `for_each`, into a growing table, then into one sized by `reserve_shard`) and a
//! retain that removes every row (an expiry). The whole run repeats three times, interleaved
//! with the reference, because the machine is shared: read the best figures.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::hint::black_box;
use std::time::Instant;

use nsm_core::table::{entity_key, EntityTable, SHARDS};

const DISTINCT: usize = 5_000_000;
const CALLS: usize = 2 * DISTINCT;

/// A deterministic stream of pseudo-random numbers (xorshift64*).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Each index of `0..distinct` twice, in a shuffled order.
    fn twice_shuffled(&mut self, distinct: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..2 * distinct).map(|i| (i % distinct) as u32).collect();
        for i in (1..order.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}

fn nanos_per(calls: usize, started: Instant) -> f64 {
    started.elapsed().as_nanos() as f64 / calls as f64
}

fn table(keys: &[u128], writes: &[u32], reads: &[u32]) {
    let mut table = EntityTable::new(2);
    let mut bytes_per_row_samples = Vec::new();
    let started = Instant::now();
    for (call, &index) in writes.iter().enumerate() {
        let (row, _) = table.entry(keys[index as usize]);
        row[0] += 1;
        row[1] = index;
        if call % 100_000 == 0 && table.len() >= DISTINCT / 4 {
            bytes_per_row_samples.push(table.heap_bytes() as f64 / table.len() as f64);
        }
    }
    let entry_ns = nanos_per(writes.len(), started);

    let started = Instant::now();
    let mut sum = 0u64;
    for &index in reads {
        if let Some(row) = table.get(keys[index as usize]) {
            sum += u64::from(row[0]);
        }
    }
    let get_ns = nanos_per(reads.len(), started);
    assert_eq!(black_box(sum), CALLS as u64 * 2, "every get found its row");

    let bytes_per_row = table.heap_bytes() as f64 / table.len() as f64;
    let average_bytes_per_row =
        bytes_per_row_samples.iter().sum::<f64>() / bytes_per_row_samples.len() as f64;

    let started = Instant::now();
    let mut drained = 0usize;
    table.drain_dirty(|_, lanes| drained += lanes[0] as usize);
    let drain_ns = nanos_per(DISTINCT, started);
    assert_eq!(drained, CALLS);

    let mut snapshot = Vec::with_capacity(table.len());
    table.for_each(|key, lanes| snapshot.push((key, [lanes[0], lanes[1]])));
    let mut restored = EntityTable::new(2);
    let started = Instant::now();
    for (key, lanes) in &snapshot {
        restored.load(*key, lanes);
    }
    let restore_ns = nanos_per(snapshot.len(), started);
    assert_eq!(restored.len(), DISTINCT);
    drop(restored);
    let mut restored = EntityTable::new(2);
    let started = Instant::now();
    for shard in 0..SHARDS {
        restored.reserve_shard(shard, table.shard_len(shard));
    }
    for (key, lanes) in &snapshot {
        restored.load(*key, lanes);
    }
    let reserved_restore_ns = nanos_per(snapshot.len(), started);
    assert_eq!(restored.len(), DISTINCT);
    drop(restored);

    let started = Instant::now();
    let removed = table.retain(|_, _| false);
    let retain_ns = nanos_per(removed, started);
    assert_eq!(removed, DISTINCT);

    println!(
        "EntityTable: entry {entry_ns:.1} ns, get {get_ns:.1} ns, drain {drain_ns:.1} ns per \
         dirty row, restore in snapshot order {restore_ns:.1} ns per row ({reserved_restore_ns:.1} \
         with reserve_shard), retain (expire all) \
         {retain_ns:.1} ns per row; {bytes_per_row:.1} bytes per row at 5M rows, \
         {average_bytes_per_row:.1} on average from 1.25M to 5M rows"
    );
}

/// Hashes a `u128` key by its low 64 bits: the key is already a hash.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8) | u64::from(byte);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }
}

fn hash_map(keys: &[u128], writes: &[u32], reads: &[u32]) {
    let mut map: HashMap<u128, [u32; 2], BuildHasherDefault<PassThrough>> = HashMap::default();
    let started = Instant::now();
    for &index in writes {
        let row = map.entry(keys[index as usize]).or_insert([0, 0]);
        row[0] += 1;
        row[1] = index;
    }
    let entry_ns = nanos_per(writes.len(), started);

    let started = Instant::now();
    let mut sum = 0u64;
    for &index in reads {
        if let Some(row) = map.get(&keys[index as usize]) {
            sum += u64::from(row[0]);
        }
    }
    let get_ns = nanos_per(reads.len(), started);
    assert_eq!(black_box(sum), CALLS as u64 * 2);

    // hashbrown: a power of two of buckets, at most 7/8 full, each a padded (u128, [u32; 2]) of
    // 32 bytes and a control byte.
    let buckets = (map.capacity() * 8 / 7).next_power_of_two();
    let bytes_per_row = (buckets * (32 + 1)) as f64 / map.len() as f64;
    println!(
        "std HashMap (reference): entry {entry_ns:.1} ns, get {get_ns:.1} ns; \
         {bytes_per_row:.1} bytes per row at 5M rows"
    );
}

fn main() {
    let keys: Vec<u128> = (0..DISTINCT as u64)
        .map(|user| entity_key(0, format!("user-{user}").as_bytes()))
        .collect();
    let mut random = Random(0x05EE_D0F7_AB1E);
    let writes = random.twice_shuffled(DISTINCT);
    let reads = random.twice_shuffled(DISTINCT);
    for _ in 0..3 {
        table(&keys, &writes, &reads);
        hash_map(&keys, &writes, &reads);
    }
}
