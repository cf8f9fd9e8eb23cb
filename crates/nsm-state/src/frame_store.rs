//! The store's side of `nsm-checkpoint`'s ports (plan commit 8): [`RocksHeadStore`] keeps each
//! partition's head beside its rows, and [`RocksSink`] applies a restore's frames to RocksDB.
//!
//! Keys in `meta`: `frames/<partition key>` → the library's head of the partition (local only,
//! never sent), beside `changelog/<partition key>`, the changelog position.

use std::sync::{Arc, Mutex};

use nsm_checkpoint::{Acknowledged, FrameId, HeadStore, HeadWrite, PartitionId, RestoreSink};
use nsm_checkpoint::{ShardId, SnapshotRows};
use rocksdb::WriteBatch;

use crate::changelog::{encode_position, family_of, position_key, FAMILIES, OLDER_MEMBER_BYTE};
use crate::codec::{
    current_member_key_of_format_7, member_shard_position, member_shard_range, partition_prefix,
    prefix_successor, split_partition_prefix,
};
use crate::frames::{FramedWrite, AGGREGATE_SHARD};
use crate::{
    PartitionKey, StateError, Store, CF_ENTRIES, CF_FINGERPRINTS, CF_GAPS, CF_META, CF_PARTITIONS,
    CF_SEGMENTS, CF_WINDOWS,
};

/// Rows a restore writes per batch.
const APPLY_CHUNK: usize = 10_000;

fn head_key(partition: &PartitionId) -> Vec<u8> {
    let mut key = b"frames/".to_vec();
    key.extend_from_slice(&partition.name);
    key
}

pub(crate) fn head_key_of(partition: &PartitionKey) -> Vec<u8> {
    head_key(&crate::frames::partition_id(partition))
}

/// Marks a partition being restored whole (see `Store::start_whole_restore`).
pub(crate) fn restoring_key(partition: &PartitionKey) -> Vec<u8> {
    let mut key = b"frames-restoring/".to_vec();
    key.extend_from_slice(&partition_prefix(partition));
    key
}

/// The input partition a frame partition names (its name is the key prefix).
fn partition_key(partition: &PartitionId) -> Result<PartitionKey, StateError> {
    split_partition_prefix(&partition.name)
        .filter(|(_, rest)| rest.is_empty())
        .map(|(key, _)| key)
        .ok_or_else(|| StateError::Corrupt {
            column_family: CF_META,
            detail: format!("a frame partition named {}", partition.name.escape_ascii()),
        })
}

/// The library's heads, in `meta`, written in one batch with the rows of the checkpoint they
/// name and the changelog positions acknowledged. Clones share the staged batch, so the caller
/// keeps one to stage each write while the checkpointer owns another.
#[derive(Clone)]
pub struct RocksHeadStore {
    store: Store,
    staged: Arc<Mutex<Option<WriteBatch>>>,
    /// The next commit fails without writing anything, as a crash after the changelog
    /// acknowledged a frame and before the store wrote it.
    #[cfg(test)]
    pub(crate) fail_next: Arc<std::sync::atomic::AtomicBool>,
}

impl RocksHeadStore {
    pub fn new(store: Store) -> Self {
        RocksHeadStore {
            store,
            staged: Arc::default(),
            #[cfg(test)]
            fail_next: Arc::default(),
        }
    }

    /// Makes the next commit write `write`'s batch with its heads; a write staged before and not
    /// committed is dropped (its commit failed, so nothing of it may be stored).
    pub fn stage(&self, write: FramedWrite) {
        *self.staged.lock().unwrap_or_else(|e| e.into_inner()) = Some(write.batch);
    }
}

impl HeadStore for RocksHeadStore {
    type Error = StateError;

    fn commit(
        &mut self,
        heads: &[HeadWrite],
        acknowledged: &Acknowledged,
    ) -> Result<(), StateError> {
        let staged = self.staged.lock().unwrap_or_else(|e| e.into_inner()).take();
        #[cfg(test)]
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Err(StateError::Corrupt {
                column_family: CF_META,
                detail: "a commit failed on cue".into(),
            });
        }
        let mut batch = staged.unwrap_or_default();
        let meta = self.store.cf(CF_META);
        for head in heads {
            // A take-over's rows are in the store already: its sink wrote them as it applied
            // the frames, never a meta ahead of its rows.
            batch.put_cf(meta, head_key(&head.partition), &head.head);
            if head.replace {
                // A take-over's restore, whole: its rows are all in now.
                batch.delete_cf(meta, restoring_key(&partition_key(&head.partition)?));
            }
            let changelog_partition = head.partition.changelog_partition;
            if let Some(offset) = acknowledged.next_offset(changelog_partition) {
                let partition = partition_key(&head.partition)?;
                let offset = i64::try_from(offset).unwrap_or(i64::MAX);
                batch.put_cf(meta, position_key(&partition), encode_position(offset));
            }
        }
        self.store.db.write_opt(batch, &self.store.write_options)?;
        Ok(())
    }

    fn load_head(&self, partition: &PartitionId) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self
            .store
            .db
            .get_cf(self.store.cf(CF_META), head_key(partition))?)
    }
}

/// Applies a restore's frames to one partition of the store, in batches; each frame's meta (the
/// partition's meta record) is written with the batch that ends the frame, never before its
/// rows.
pub struct RocksSink<'s> {
    store: &'s Store,
    prefix: Vec<u8>,
    batch: WriteBatch,
}

impl<'s> RocksSink<'s> {
    pub fn new(store: &'s Store, partition: &PartitionKey) -> Self {
        RocksSink {
            store,
            prefix: partition_prefix(partition),
            batch: WriteBatch::default(),
        }
    }

    /// The family and stored key of a frame row's key. A member entry of an older nsm's frames
    /// (under [`OLDER_MEMBER_BYTE`], keyed as format 7 stored it) gets format 8's key.
    fn stored(&self, row: &[u8]) -> Result<(&'static str, Vec<u8>), StateError> {
        let corrupt = |detail: String| StateError::Corrupt {
            column_family: "changelog",
            detail,
        };
        let family = row
            .first()
            .copied()
            .and_then(family_of)
            .filter(|family| *family != CF_PARTITIONS)
            .ok_or_else(|| corrupt(format!("a frame row starting with byte {:?}", row.first())))?;
        let key = [&self.prefix, &row[1..]].concat();
        if row[0] != OLDER_MEMBER_BYTE {
            return Ok((family, key));
        }
        current_member_key_of_format_7(&key)
            .map(|key| (family, key))
            .ok_or_else(|| corrupt(format!("a format 7 member row of {} bytes", row.len())))
    }

    fn write(&mut self) -> Result<(), StateError> {
        let batch = std::mem::take(&mut self.batch);
        self.store.db.write_opt(batch, &self.store.write_options)?;
        Ok(())
    }

    fn written_one(&mut self) -> Result<(), StateError> {
        if self.batch.len() >= APPLY_CHUNK {
            self.write()?;
        }
        Ok(())
    }
}

impl RestoreSink for RocksSink<'_> {
    type Error = StateError;

    fn drop_range(&mut self, start: &[u8], end: Option<&[u8]>) -> Result<(), StateError> {
        // Per family, the part of the range in the family's rows (a row key is the family's
        // byte, then the stored key without the partition prefix).
        // An older nsm's frames name member entries by another byte; their places (the bounds
        // of any range of them) are the same in every format.
        let member_bytes = [(OLDER_MEMBER_BYTE, CF_ENTRIES)];
        for (byte, family) in FAMILIES.into_iter().chain(member_bytes) {
            let (from, to) = ([byte], [byte + 1]);
            let lower: &[u8] = if start > &from[..] { start } else { &from };
            let upper: &[u8] = match end {
                Some(end) if end < &to[..] => end,
                _ => &to,
            };
            if lower >= upper {
                continue;
            }
            let stored_start = [&self.prefix, &lower[1..]].concat();
            let stored_end = if upper == to {
                prefix_successor(&self.prefix)
            } else {
                [&self.prefix, &upper[1..]].concat()
            };
            self.batch
                .delete_range_cf(self.store.cf(family), stored_start, stored_end);
        }
        self.written_one()
    }

    fn put(&mut self, _shard: ShardId, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        let (family, key) = self.stored(key)?;
        self.batch.put_cf(self.store.cf(family), key, value);
        self.written_one()
    }

    fn delete(&mut self, _shard: ShardId, key: &[u8]) -> Result<(), StateError> {
        let (family, key) = self.stored(key)?;
        self.batch.delete_cf(self.store.cf(family), key);
        self.written_one()
    }

    fn replace_shard(&mut self, shard: ShardId, rows: SnapshotRows<'_>) -> Result<(), StateError> {
        let end = prefix_successor(&self.prefix);
        match u16::try_from(shard.0) {
            Ok(AGGREGATE_SHARD) => {
                for family in [CF_WINDOWS, CF_SEGMENTS, CF_GAPS, CF_FINGERPRINTS] {
                    self.batch
                        .delete_range_cf(self.store.cf(family), &self.prefix, &end);
                }
            }
            Ok(number) => {
                // The shard's rows so far, wherever they are: written out first, so the scan
                // sees them; then the shard's range in each place that has some.
                self.write()?;
                let mut places: Vec<Vec<u8>> = Vec::new();
                self.store
                    .scan_member_shard(&self.prefix, number, |key, _| {
                        let place = member_shard_position(key).map_or(key, |at| &key[..at]);
                        if places.last().map(Vec::as_slice) != Some(place) {
                            places.push(place.to_vec());
                        }
                    })?;
                for place in places {
                    let (start, end) = member_shard_range(&place, number);
                    self.batch
                        .delete_range_cf(self.store.cf(CF_ENTRIES), start, end);
                }
            }
            Err(_) => {}
        }
        for (key, value) in rows {
            self.put(shard, key, value)?;
        }
        Ok(())
    }

    fn meta(&mut self, _frame: FrameId, meta: &[u8]) -> Result<(), StateError> {
        let partitions = self.store.cf(CF_PARTITIONS);
        if meta.is_empty() {
            self.batch.delete_cf(partitions, &self.prefix);
        } else {
            self.batch.put_cf(partitions, &self.prefix, meta);
        }
        self.write()
    }
}
