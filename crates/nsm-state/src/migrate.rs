//! Format 8's member layout, reached from older stores at open.
//!
//! Format 8 keeps member entries in `entries_by_digest`, each key ending in the entry's digest
//! after its place (`codec::member_key_into`). An older store's entries (format 7's `entries`,
//! or `members` before it) are copied there, rewritten, in batches read without filling the
//! block cache; then the version goes to 8 in a write of its own, and the older family is
//! dropped. The version is written after every batch, so a store at version 8 has all of its
//! entries; a migration cut short leaves the old version, and the next open empties
//! `entries_by_digest` and starts over.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rocksdb::{IteratorMode, ReadOptions, WriteBatch, DB};

use crate::codec::{current_member_key, current_member_key_of_format_7, split_partition_prefix};
use crate::format::{FORMAT_VERSION, FORMAT_VERSION_KEY, FORMAT_WITH_SHARDED_ENTRIES};
use crate::{StateError, Store, CF_ENTRIES, CF_MEMBERS, CF_META, CF_SHARDED_ENTRIES};

/// The families older formats kept member entries in: dropped once they are rewritten.
const OLDER_ENTRIES: [&str; 2] = [CF_MEMBERS, CF_SHARDED_ENTRIES];

/// Entries rewritten per write.
const BATCH_ENTRIES: usize = 10_000;

/// Above every stored key: keys start with a topic name, which Kafka spells in ASCII.
const ABOVE_EVERY_KEY: &[u8] = &[0xff];

/// Rewrites the member entries of a store of format `found` into format 8 and raises its
/// version.
pub(crate) fn rewrite_entries(
    store: &mut Store,
    path: &Path,
    found: u32,
) -> Result<(), StateError> {
    let started = Instant::now();
    let write_options = store.write_options.clone();
    let db = database(store);
    let entries = db
        .cf_handle(CF_ENTRIES)
        .unwrap_or_else(|| unreachable!("{CF_ENTRIES} is created at open"));
    if db
        .iterator_cf(entries, IteratorMode::Start)
        .next()
        .is_some()
    {
        // A migration cut short: what it copied may be partial.
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(entries, &b""[..], ABOVE_EVERY_KEY);
        db.write_opt(batch, &write_options)?;
    }
    let (mut rewritten, mut partitions) = (0u64, 0u64);
    // Format 7's keys carry the shard between place and entry; older ones are format 6's.
    let (source, of_format_7) = if found == FORMAT_WITH_SHARDED_ENTRIES {
        (CF_SHARDED_ENTRIES, true)
    } else {
        (CF_MEMBERS, false)
    };
    if let Some(members) = db.cf_handle(source) {
        let mut read = ReadOptions::default();
        read.fill_cache(false);
        let mut batch = WriteBatch::default();
        let mut last_partition: Vec<u8> = Vec::new();
        for item in db.iterator_cf_opt(members, read, IteratorMode::Start) {
            let (key, value) = item?;
            let corrupt = || StateError::Corrupt {
                column_family: source,
                detail: format!("a member key of {} bytes with no window in it", key.len()),
            };
            let (_, rest) = split_partition_prefix(&key).ok_or_else(corrupt)?;
            let partition = &key[..key.len() - rest.len()];
            if partition != last_partition.as_slice() {
                partitions += 1;
                last_partition = partition.to_vec();
            }
            let current = if of_format_7 {
                current_member_key_of_format_7(&key)
            } else {
                current_member_key(&key)
            };
            batch.put_cf(entries, current.ok_or_else(corrupt)?, value);
            rewritten += 1;
            if batch.len() >= BATCH_ENTRIES {
                db.write_opt(std::mem::take(&mut batch), &write_options)?;
            }
        }
        db.write_opt(batch, &write_options)?;
    }
    let meta = db
        .cf_handle(CF_META)
        .unwrap_or_else(|| unreachable!("{CF_META} is created at open"));
    db.put_cf_opt(
        meta,
        FORMAT_VERSION_KEY,
        FORMAT_VERSION.to_be_bytes(),
        &write_options,
    )?;
    drop_older_entries(db)?;
    if rewritten > 0 {
        tracing::info!(
            path = %path.display(),
            entries = rewritten,
            partitions,
            seconds = started.elapsed().as_secs_f64(),
            "rewrote the stored member entries in state format {FORMAT_VERSION}"
        );
    }
    Ok(())
}

/// Drops the older families of a store already at format 8 (a drop that failed after the
/// migration): nothing reads them.
pub(crate) fn drop_older_families(store: &mut Store) -> Result<(), StateError> {
    drop_older_entries(database(store))
}

fn drop_older_entries(db: &mut DB) -> Result<(), StateError> {
    for family in OLDER_ENTRIES {
        if db.cf_handle(family).is_some() {
            db.drop_cf(family)?;
        }
    }
    Ok(())
}

/// The store's database while it opens, before any clone of it exists.
fn database(store: &mut Store) -> &mut DB {
    Arc::get_mut(&mut store.db)
        .unwrap_or_else(|| unreachable!("a store is not shared before it is open"))
}
