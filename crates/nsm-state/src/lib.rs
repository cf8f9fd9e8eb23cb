//! RocksDB persistence of nsm's window state and Kafka offsets.
//!
//! This crate owns the on-disk format and nothing else: it never interprets events or decides
//! values. Its one promise: a [`ChangeSet`] is written in a single atomic `WriteBatch`, so the
//! offsets of a partition are never stored without the state they produced, nor the state
//! without its offsets.
//!
//! Layout (column families):
//! - `meta`: `format_version` → u32 BE; `changelog/<partition key>` → the next changelog
//!   offset the local copy of that partition has not read; `frames/<partition key>` → the
//!   local copy's head in `nsm-checkpoint`'s frames; `frames-restoring/<partition key>` while a
//!   restore of it whole is under way; `changelog-epoch/<partition key>` → u64 BE, the epoch of
//!   a copy restored from keyed records of format 7 and before (all local only, never sent).
//! - `partitions`: `<topic> 0x00 <partition i32 BE>` → next offset, max event time, idle floor.
//! - `fingerprints`: `<partition key> <metric>` → the definition the partition's data of that
//!   metric was computed with (checked when the partition is taken, see
//!   [`Store::prepare_adoption`]); `<partition key> 0x00 since 0x00 <metric>` → i64 BE, the
//!   partition's event watermark when a metric started on it while it already had state (its
//!   windows starting before are partial).
//! - `windows`: `<partition key> <metric> 0x00 <start i64, sign-flipped BE>` → end and value.
//! - `entries_by_digest`: `<window key> [<funnel period>] <digest u128 BE>` → value: per-entity
//!   entries of a window, read one at a time (never loaded whole): members of distinct sets
//!   (empty value), threshold progress, trailing occurrences (see `nsm_core::engine::members`).
//!   The digest is the XXH3-128 of the entry's key, the member index's key of it; its top 10
//!   bits are its checkpoint shard (one of 1,024), so a shard of a window is one key range.
//!   A conversion's funnel period comes before it, so its periods stay key ranges too. Bloom
//!   filters make the common miss, a new member, cheap. Format 7 kept them in `entries`, keyed
//!   by the shard and the entry's bytes, and format 6 in `members`, by the bytes alone.
//! - `gaps`: `<window key> <previous bucket i64, sign-flipped BE> [<segment key>]` → count
//!   u64 BE: the gap histograms of trailing distinct buckets and of their segments (a bucket's
//!   own has no segment key), loaded with the windows.
//! - `segments`: `<window key> <segment key>` → value: the breakdown of segmented metrics.
//! - Conversion funnels are member entries of a pseudo-window of their metric
//!   (`nsm_core::engine::funnel`), and event ids remembered for deduplication are member
//!   entries of the namespace named by the empty string, one window per period of the
//!   horizon (`nsm_core::engine::dedup`). Format 1's `funnels` and `seen_ids` families are
//!   opened if present and otherwise unused.
//!
//! Every family but `meta` is keyed under the partition key, so a partition's state is one
//! key range in each, and the changelog (see [`changelog`]) carries exactly those families.

pub mod changelog;
mod codec;
mod format;
mod frame_store;
mod frames;
#[cfg(any(test, feature = "testing"))]
mod keyed;
mod migrate;
mod swap;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nsm_core::engine::{
    ChangeSet, PartitionSnapshot, Plan, StateReadError, StateReader, StoredGap, StoredSegment,
    StoredWindow,
};
use nsm_core::PartitionKey;
use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Direction,
    IteratorMode, Options, WriteBatch, WriteBufferManager, WriteOptions, DB,
};

use codec::{
    decode_i64, decode_partition_meta, decode_window_record, decode_window_value,
    encode_partition_meta, encode_window_record, encode_window_value, entry_key_into,
    member_key_into, partition_prefix, prefix_successor, split_partition_prefix, window_key,
    window_metric_prefix, PartitionMeta,
};

pub use changelog::{
    ChangeRecord, ChangelogPosition, ChangelogProbe, PartitionRestore, PreparedWrite,
    RestoreOutcome,
};
pub use format::{FormatError, FORMAT_VERSION};
pub use frame_store::{RocksHeadStore, RocksSink};
pub use frames::{
    checkpoint_config, member_shards, partition_id, ChangelogLayout, FramedWrite, MemoryShard,
    WriteOverlay, AGGREGATE_SHARD, FRAME_SHARDS, SNAPSHOTS_PER_CHECKPOINT,
};
#[cfg(any(test, feature = "testing"))]
pub use keyed::{KeyedWrite, PartitionRecords};

const CF_META: &str = "meta";
const CF_PARTITIONS: &str = "partitions";
const CF_WINDOWS: &str = "windows";
const CF_ENTRIES: &str = "entries_by_digest";
/// Format 7's member entries, migrated into `entries_by_digest` at open.
const CF_SHARDED_ENTRIES: &str = "entries";
/// Format 6's member entries, migrated into `entries_by_digest` at open.
const CF_MEMBERS: &str = "members";
const CF_SEGMENTS: &str = "segments";
const CF_GAPS: &str = "gaps";
const CF_FINGERPRINTS: &str = "fingerprints";
/// The column families this version reads and writes.
const FAMILIES_IN_USE: [&str; 7] = [
    CF_META,
    CF_PARTITIONS,
    CF_WINDOWS,
    CF_ENTRIES,
    CF_SEGMENTS,
    CF_GAPS,
    CF_FINGERPRINTS,
];
/// Before a metric name in `fingerprints`: the key of the event watermark from which the
/// partition's data of that metric exists (no metric name starts with a zero byte).
const SINCE_MARKER: &[u8] = b"\0since\0";

/// The key in `fingerprints` of a repartition partition's sources (its marks of the input
/// partitions, `nsm_core::engine::Upstream`).
const UPSTREAM_MARKER: &[u8] = b"\0upstream";

fn upstream_key(prefix: &[u8]) -> Vec<u8> {
    [prefix, UPSTREAM_MARKER].concat()
}

fn since_key(prefix: &[u8], metric: &str) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(SINCE_MARKER);
    key.extend_from_slice(metric.as_bytes());
    key
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state directory {path}: {source}")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("state storage failed: {0}")]
    Storage(#[from] rocksdb::Error),
    #[error("corrupt state record in {column_family}: {detail}")]
    Corrupt {
        column_family: &'static str,
        detail: String,
    },
}

/// Table files kept open by default: about 32 GiB of them at RocksDB's 64 MiB a file.
pub const DEFAULT_MAX_OPEN_FILES: i32 = 512;

/// Options of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// fsync every write (survives power loss, not only process crashes).
    pub sync_writes: bool,
    /// RocksDB's block cache, shared by all column families, in bytes.
    pub block_cache_bytes: usize,
    /// The write-ahead logs kept at most, in bytes: what a restart may have to replay.
    pub max_wal_bytes: u64,
    /// Table files RocksDB keeps open at most; it closes the least used beyond. Unbounded,
    /// a store grown large takes every file descriptor of the process (HTTP connections and
    /// Kafka sockets need theirs) and a write fails when it cannot open its next file.
    pub max_open_files: i32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            sync_writes: false,
            block_cache_bytes: 64 * 1024 * 1024,
            max_wal_bytes: 64 * 1024 * 1024,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
        }
    }
}

/// A metric whose stored data in a partition was dropped when the partition was taken, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardedMetric {
    pub name: String,
    pub reason: &'static str,
}

/// A stored key and its value.
type StoredEntry = (Box<[u8]>, Box<[u8]>);

/// The state store: cheap to clone, safe to share between the pipeline and HTTP threads.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    write_options: Arc<WriteOptions>,
    metric_names: Arc<Vec<String>>,
    metric_fingerprints: Arc<Vec<String>>,
    /// What format 3 stored for the same definitions, whose data this nsm reads as it is.
    format_3_fingerprints: Arc<Vec<String>>,
    metric_index: Arc<HashMap<String, usize>>,
}

impl Store {
    /// Writes every family's memtable to table files and waits for it, so that the next open
    /// has no write-ahead log to replay. Called at a graceful stop.
    pub fn flush_memtables(&self) -> Result<(), StateError> {
        let mut options = rocksdb::FlushOptions::default();
        options.set_wait(true);
        let families: Vec<_> = FAMILIES_IN_USE
            .iter()
            .filter_map(|name| self.db.cf_handle(name))
            .collect();
        self.db.flush_cfs_opt(&families, &options)?;
        Ok(())
    }

    /// Opens (or creates) the store at `path` for the metrics of `plan`. Data of metrics whose
    /// definition changed since it was written, or that left the config, is deleted when its
    /// partition is taken ([`Store::prepare_adoption`]): it no longer means what the config says.
    pub fn open(path: &Path, plan: &Plan, options: &StoreOptions) -> Result<Store, StateError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        // All memtables together stay within 64 MiB, whatever the families: 3 of 32 MiB for
        // each of 7 could otherwise reach 672 MiB. The limit stalls writes while it is
        // exceeded rather than only asking for flushes: without the stall, memtables waiting
        // for a flush piled up when writes came faster: the memory bench at 5M users peaked
        // at 506.1 and 514.1 MiB without the stall, 491.2 with it, at the same speed (a
        // checkpoint's write waits instead).
        db_options.set_write_buffer_manager(&WriteBufferManager::new_write_buffer_manager(
            64 * 1024 * 1024,
            true,
        ));
        // A write-ahead log file is kept until every family with data in it has flushed, and
        // families written a little at each checkpoint (windows, offsets) rarely fill their
        // memtables: unbounded, the logs grew to RocksDB's default of 4 × all memtables
        // (2.6 GiB here) and a restart replayed all of it (measured: 12.3 s to the first
        // correct scrape at 10M events). Past this total RocksDB flushes the families that
        // hold the oldest log, so a restart replays at most this much.
        db_options.set_max_total_wal_size(options.max_wal_bytes);
        db_options.set_max_open_files(options.max_open_files);
        // Bounded memory: small memtables, and one LRU block cache that also holds the index
        // and filter blocks, so reading members never grows past it.
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_cache_index_and_filter_blocks_with_high_priority(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        table.set_bloom_filter(10.0, false);
        // Most member reads ask for entries that are absent (a user's first event of a
        // window), so the filter answers nearly every read. Whole-file filters outgrow a
        // cache shard (1 MiB of the 64) past about a million entries per file; the cache
        // then drops them at once and every read re-reads and re-checksums megabytes
        // (measured: 3,965 events/s at 300k users). Partitioned filters and index stay in
        // blocks of a few KiB, with only their top level pinned.
        table.set_partition_filters(true);
        table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_metadata_block_size(4096);
        table.set_pin_top_level_index_and_filter(true);
        let mut family_options = Options::default();
        family_options.set_block_based_table_factory(&table);
        family_options.set_write_buffer_size(32 * 1024 * 1024);
        family_options.set_max_write_buffer_number(3);
        // A bloom filter over the memtables too, so a read of an absent entry does not search
        // their skip lists.
        family_options.set_memtable_whole_key_filtering(true);
        family_options.set_memtable_prefix_bloom_ratio(0.05);
        let families = FAMILIES_IN_USE;
        // RocksDB opens a store only with all its families: add any this version does not
        // use, so an older store reaches the format check and its clear message.
        let mut names: Vec<String> = families.iter().map(ToString::to_string).collect();
        for existing in DB::list_cf(&db_options, path).unwrap_or_default() {
            if !names.contains(&existing) && existing != "default" {
                names.push(existing);
            }
        }
        let families = names
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, family_options.clone()));
        let db = DB::open_cf_descriptors(&db_options, path, families).map_err(|source| {
            StateError::Open {
                path: path.to_path_buf(),
                source,
            }
        })?;

        let mut write_options = WriteOptions::default();
        write_options.set_sync(options.sync_writes);
        let metric_names: Vec<String> = plan
            .metrics()
            .iter()
            .map(|metric| metric.name.clone())
            .collect();
        let metric_fingerprints: Vec<String> = (0..plan.metrics().len())
            .map(|metric| plan.fingerprint(metric))
            .collect();
        let format_3_fingerprints: Vec<String> = (0..plan.metrics().len())
            .map(|metric| plan.format_3_fingerprint(metric))
            .collect();
        let metric_index = metric_names
            .iter()
            .enumerate()
            .map(|(index, name)| (name.clone(), index))
            .collect();
        let mut store = Store {
            db: Arc::new(db),
            write_options: Arc::new(write_options),
            metric_names: Arc::new(metric_names),
            metric_fingerprints: Arc::new(metric_fingerprints),
            format_3_fingerprints: Arc::new(format_3_fingerprints),
            metric_index: Arc::new(metric_index),
        };
        let data = [CF_PARTITIONS, CF_WINDOWS, CF_ENTRIES].map(|name| store.cf(name));
        let found = format::check(
            &store.db,
            store.cf(CF_META),
            &data,
            &store.write_options,
            path,
        )?;
        if found == format::FORMAT_WITH_GLOBAL_FINGERPRINTS {
            store.migrate_fingerprints_to_partitions()?;
        }
        // Formats 3 to 5 are read as they are (see `format::FORMAT_WITH_EVERY_OCCURRENCE`,
        // `format::FORMAT_WITHOUT_WATERMARK` and `format::FORMAT_WITHOUT_PROGRESS`); every
        // older format has its member entries rewritten, which raises the version last.
        if found < FORMAT_VERSION {
            migrate::rewrite_entries(&mut store, path, found)?;
        } else {
            migrate::drop_older_families(&mut store)?;
        }
        Ok(store)
    }

    fn cf(&self, name: &'static str) -> &ColumnFamily {
        // The families are created at open; a missing one is a bug in this file.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| unreachable!("column family {name} is created at open"))
    }

    /// Format 2 kept one fingerprint per metric for the whole store, checked at every open;
    /// format 3 keeps them per partition, so that they travel with the partition's changelog.
    /// The version is raised by the migration of the member entries, which follows.
    fn migrate_fingerprints_to_partitions(&self) -> Result<(), StateError> {
        let meta = self.cf(CF_META);
        let mut batch = WriteBatch::default();
        let mut global = Vec::new();
        for item in self.db.prefix_iterator_cf(meta, b"metric/") {
            let (key, value) = item?;
            let Some(name) = key.strip_prefix(b"metric/") else {
                break;
            };
            global.push((name.to_vec(), value.to_vec()));
            batch.delete_cf(meta, &key);
        }
        for partition in self.stored_partitions()? {
            let prefix = partition_prefix(&partition);
            for (name, fingerprint) in &global {
                let mut key = prefix.clone();
                key.extend_from_slice(name);
                batch.put_cf(self.cf(CF_FINGERPRINTS), key, fingerprint);
            }
        }
        self.db.write_opt(batch, &self.write_options)?;
        Ok(())
    }

    /// The event watermark of a partition with state (its largest event time before any
    /// watermark): from there on, a metric starting now sees every event.
    fn stored_watermark(&self, prefix: &[u8]) -> Result<Option<nsm_core::EpochMillis>, StateError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_PARTITIONS), prefix)?
            .as_deref()
            .and_then(decode_partition_meta)
            .filter(|meta| meta.next_offset.is_some())
            .and_then(|meta| meta.event_watermark_ms.or(meta.max_event_ms)))
    }

    /// A take's operations on one partition, ended by its meta record as stored: the data of
    /// metrics that changed or left the config deleted (the result names them), and every
    /// configured metric's fingerprint stored.
    fn record_adoption(
        &self,
        partition: &PartitionKey,
        recorder: &mut impl Recording,
    ) -> Result<Vec<DiscardedMetric>, StateError> {
        let prefix = &partition_prefix(partition)[..];
        let mut stored = HashMap::new();
        for item in self.entries_under(CF_FINGERPRINTS, prefix) {
            let (key, value) = item?;
            // Markers, not metric names: no metric name starts with a zero byte.
            if key[prefix.len()..].starts_with(b"\0") {
                continue;
            }
            let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            stored.insert(name, value);
        }
        // A metric that starts on a partition that already has state lacks the events before
        // its watermark: its windows starting before are partial (`metric_since`).
        let watermark = self.stored_watermark(prefix)?;
        let mut discarded = Vec::new();
        for (name, fingerprint) in &stored {
            let reason = match self.metric_index.get(name) {
                None => "no longer in the config",
                Some(&index)
                    if self.metric_fingerprints[index].as_bytes() != &**fingerprint
                        && self.format_3_fingerprints[index].as_bytes() != &**fingerprint =>
                {
                    "its definition changed"
                }
                Some(_) => continue,
            };
            discarded.push(DiscardedMetric {
                name: name.clone(),
                reason,
            });
            let start = window_metric_prefix(prefix, name);
            let end = prefix_successor(&start);
            for family in [CF_WINDOWS, CF_ENTRIES, CF_SEGMENTS, CF_GAPS] {
                recorder.delete_range(family, &start, &end);
            }
            let mut key = prefix.to_vec();
            key.extend_from_slice(name.as_bytes());
            recorder.delete(CF_FINGERPRINTS, &key);
            recorder.delete(CF_FINGERPRINTS, &since_key(prefix, name));
        }
        for (name, fingerprint) in self
            .metric_names
            .iter()
            .zip(self.metric_fingerprints.iter())
        {
            if stored
                .get(name)
                .is_some_and(|value| &**value == fingerprint.as_bytes())
            {
                continue;
            }
            let mut key = prefix.to_vec();
            key.extend_from_slice(name.as_bytes());
            recorder.put(CF_FINGERPRINTS, &key, fingerprint.as_bytes());
            // New, or discarded above; not a definition kept and only spelled anew.
            let starts_now =
                !stored.contains_key(name) || discarded.iter().any(|metric| &metric.name == name);
            if let (true, Some(watermark)) = (starts_now, watermark) {
                recorder.put(
                    CF_FINGERPRINTS,
                    &since_key(prefix, name),
                    &watermark.to_be_bytes(),
                );
            }
        }
        discarded.sort_by(|a, b| a.name.cmp(&b.name));
        recorder.end_partition(partition, &self.stored_meta(partition)?);
        Ok(discarded)
    }

    /// Writes all changes in one atomic batch (no changelog).
    pub fn write(&self, changes: &ChangeSet) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.commit(self.prepare(changes))
    }

    /// Makes the batch that stores `changes` without the changelog (`state.changelog =
    /// false`); with it, the checkpoint writes frames ([`Store::prepare_frames`]).
    pub fn prepare(&self, changes: &ChangeSet) -> PreparedWrite {
        let mut recorder = changelog::BatchRecorder::new(self, self.batch_bytes_estimate(changes));
        self.record_changes(changes, &mut recorder);
        recorder.finish()
    }

    /// Hands `changes` to `recorder` as the operations of one write, each partition's ended
    /// by its meta record.
    fn record_changes(&self, changes: &ChangeSet, recorder: &mut impl Recording) {
        // One key buffer for every entry: a checkpoint writes a few per event.
        let mut key = Vec::new();
        for part in &changes.partitions {
            let prefix = partition_prefix(&part.key);
            for upsert in &part.upserts {
                let key = window_key(&prefix, self.metric_name(upsert.metric), upsert.start_ms);
                recorder.put(
                    CF_WINDOWS,
                    &key,
                    &encode_window_record(upsert.end_ms, upsert.value, upsert.progress.as_ref()),
                );
            }
            for segment in &part.segments {
                let name = self.metric_name(segment.metric);
                entry_key_into(&mut key, &prefix, name, segment.start_ms, &segment.segment);
                recorder.put(CF_SEGMENTS, &key, &encode_window_value(0, segment.value));
            }
            // In the order of their stored keys: RocksDB inserts sorted keys into its memtable
            // much faster, and the shard in each key (from its digest) puts the engine's key
            // order out of it (measured: writing took 2.82 µs an event unsorted, against 1.45
            // for format 6's keys in the engine's order).
            let mut keys = Vec::with_capacity(part.members.len() * 48);
            let mut spans = Vec::with_capacity(part.members.len());
            for (index, member) in part.members.iter().enumerate() {
                let name = self.metric_name(member.metric);
                member_key_into(&mut key, &prefix, name, member.start_ms, &member.member);
                let from = keys.len();
                keys.extend_from_slice(&key);
                spans.push((from..keys.len(), index));
            }
            spans.sort_by(|(a, _), (b, _)| keys[a.clone()].cmp(&keys[b.clone()]));
            for (span, index) in spans {
                recorder.put(CF_ENTRIES, &keys[span], &part.members[index].value);
            }
            for gap in &part.gaps {
                let name = self.metric_name(gap.metric);
                let previous = codec::encode_i64(gap.previous_ms);
                entry_key_into(&mut key, &prefix, name, gap.start_ms, &previous);
                key.extend_from_slice(&gap.segment);
                if gap.count == 0 {
                    recorder.delete(CF_GAPS, &key);
                } else {
                    recorder.put(CF_GAPS, &key, &gap.count.to_be_bytes());
                }
            }
            // After the puts: entries written for a window deleted in this batch go too.
            for delete in &part.deletes {
                let key = window_key(&prefix, self.metric_name(delete.metric), delete.start_ms);
                let end = prefix_successor(&key);
                for family in [CF_ENTRIES, CF_SEGMENTS, CF_GAPS] {
                    recorder.delete_range(family, &key, &end);
                }
                recorder.delete(CF_WINDOWS, &key);
            }
            for range in &part.member_range_deletes {
                let key = window_key(&prefix, self.metric_name(range.metric), range.start_ms);
                let mut end = key.clone();
                end.extend_from_slice(&range.before);
                recorder.delete_range(CF_ENTRIES, &key, &end);
            }
            for expired in &part.windows_before {
                let name = self.metric_name(expired.metric);
                recorder.delete_range(
                    CF_ENTRIES,
                    &window_key(&prefix, name, i64::MIN),
                    &window_key(&prefix, name, expired.before_ms),
                );
            }
            if let Some(upstream) = &part.upstream {
                recorder.put(
                    CF_FINGERPRINTS,
                    &upstream_key(&prefix),
                    &codec::encode_upstream(upstream),
                );
            }
            // Last: the partition's offsets and watermark, the end marker of its records.
            recorder.end_partition(
                &part.key,
                &encode_partition_meta(&PartitionMeta {
                    next_offset: part.next_offset,
                    max_event_ms: part.max_event_ms,
                    event_watermark_ms: part.event_watermark_ms,
                    idle_floor_ms: part.idle_floor_ms,
                }),
            );
        }
    }

    /// Writes a prepared batch atomically. The changelog no longer follows its partitions:
    /// their changelog positions and heads go.
    pub fn commit(&self, prepared: PreparedWrite) -> Result<(), StateError> {
        let mut batch = prepared.batch;
        for partition in &prepared.partitions {
            batch.delete_cf(self.cf(CF_META), changelog::position_key(partition));
            batch.delete_cf(self.cf(CF_META), frame_store::head_key_of(partition));
        }
        self.db.write_opt(batch, &self.write_options)?;
        Ok(())
    }

    /// About the bytes the batch of `changes` takes: its entries are most of it, each a key
    /// (partition, metric, window, member), a value and a few bytes of framing. Reserved at
    /// once, the batch is not copied again and again as it grows.
    fn batch_bytes_estimate(&self, changes: &ChangeSet) -> usize {
        const FRAMING: usize = 16;
        let longest_name = self.metric_names.iter().map(String::len).max().unwrap_or(0);
        changes
            .partitions
            .iter()
            .map(|part| {
                let window_key = part.key.topic.len() + 5 + longest_name + 9;
                let members: usize = part
                    .members
                    .iter()
                    .map(|member| {
                        window_key + 2 + member.member.len() + member.value.len() + FRAMING
                    })
                    .sum();
                let others = part.upserts.len() + part.segments.len() + part.gaps.len() + 1;
                members + others * (window_key + 32 + FRAMING)
            })
            .sum()
    }

    /// The stored name of a metric; the empty string (no metric's name) for the engine's
    /// own namespace one past the last metric, which holds event ids.
    fn metric_name(&self, index: usize) -> &str {
        self.metric_names.get(index).map_or("", String::as_str)
    }

    /// Everything stored for one partition (empty for a partition never seen).
    pub fn load_partition(&self, key: &PartitionKey) -> Result<PartitionSnapshot, StateError> {
        let prefix = partition_prefix(key);
        let mut snapshot = PartitionSnapshot::default();
        if let Some(bytes) = self.db.get_cf(self.cf(CF_PARTITIONS), &prefix)? {
            let meta = decode_partition_meta(&bytes).ok_or_else(|| StateError::Corrupt {
                column_family: CF_PARTITIONS,
                detail: format!("partition {key}"),
            })?;
            snapshot.next_offset = meta.next_offset;
            snapshot.max_event_ms = meta.max_event_ms;
            snapshot.event_watermark_ms = meta.event_watermark_ms;
            snapshot.idle_floor_ms = meta.idle_floor_ms;
        }
        snapshot.metric_since = self.metric_since(&prefix)?;
        snapshot.upstream = match self
            .db
            .get_cf(self.cf(CF_FINGERPRINTS), upstream_key(&prefix))?
        {
            Some(bytes) => {
                Some(
                    codec::decode_upstream(&bytes).ok_or_else(|| StateError::Corrupt {
                        column_family: CF_FINGERPRINTS,
                        detail: format!("the sources of repartition partition {key}"),
                    })?,
                )
            }
            None => None,
        };
        snapshot.no_stored_members = self
            .keys_under(CF_ENTRIES, &prefix)
            .next()
            .transpose()?
            .is_none();
        snapshot.windows = self.scan_windows(&prefix, None)?;
        snapshot.gaps = self.scan_gaps(key, &prefix)?;
        snapshot.segments = self.scan_segments(key, &prefix, &prefix, None)?;
        Ok(snapshot)
    }

    /// The `metric_since` records of a partition, by metric index.
    fn metric_since(&self, prefix: &[u8]) -> Result<Vec<(usize, i64)>, StateError> {
        let mut since_prefix = prefix.to_vec();
        since_prefix.extend_from_slice(SINCE_MARKER);
        let mut since = Vec::new();
        for item in self.entries_under(CF_FINGERPRINTS, &since_prefix) {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key[since_prefix.len()..]);
            let (Some(&metric), Ok(bytes)) = (
                self.metric_index.get(name.as_ref()),
                <[u8; 8]>::try_from(&*value),
            ) else {
                continue;
            };
            since.push((metric, i64::from_be_bytes(bytes)));
        }
        Ok(since)
    }

    /// How many member entries a partition has stored (it walks them all: for tests and
    /// diagnostics, not for the event path).
    pub fn stored_member_count(&self, key: &PartitionKey) -> Result<usize, StateError> {
        let prefix = partition_prefix(key);
        let mut count = 0;
        for stored_key in self.keys_under(CF_ENTRIES, &prefix) {
            stored_key?;
            count += 1;
        }
        Ok(count)
    }

    /// The keys of a column family that start with `prefix`, in order.
    fn keys_under<'a>(
        &'a self,
        family: &'static str,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<Box<[u8]>, StateError>> + 'a {
        self.db
            .iterator_cf(
                self.cf(family),
                IteratorMode::From(prefix, Direction::Forward),
            )
            .map(|item| item.map(|(key, _)| key).map_err(StateError::from))
            .take_while(move |item| item.as_ref().map_or(true, |key| key.starts_with(prefix)))
    }

    /// The keys and values of a column family that start with `prefix`, in order.
    fn entries_under<'a>(
        &'a self,
        family: &'static str,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<StoredEntry, StateError>> + 'a {
        self.db
            .iterator_cf(
                self.cf(family),
                IteratorMode::From(prefix, Direction::Forward),
            )
            .map(|item| item.map_err(StateError::from))
            .take_while(move |item| {
                item.as_ref()
                    .map_or(true, |(key, _)| key.starts_with(prefix))
            })
    }

    /// The gap histograms of trailing distinct buckets in one partition.
    fn scan_gaps(&self, key: &PartitionKey, prefix: &[u8]) -> Result<Vec<StoredGap>, StateError> {
        let mut gaps = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_GAPS),
            IteratorMode::From(prefix, Direction::Forward),
        ) {
            let (stored_key, value) = item?;
            if !stored_key.starts_with(prefix) {
                break;
            }
            let parsed = self.parse_window_key(&stored_key[prefix.len()..]).and_then(
                |(metric, start_ms, rest)| {
                    let previous: [u8; 8] = rest.get(..8)?.try_into().ok()?;
                    let count: [u8; 8] = value.as_ref().try_into().ok()?;
                    Some((
                        metric,
                        start_ms,
                        Box::from(&rest[8..]),
                        decode_i64(previous),
                        u64::from_be_bytes(count),
                    ))
                },
            );
            let Some((metric, start_ms, segment, previous_ms, count)) = parsed else {
                return Err(StateError::Corrupt {
                    column_family: CF_GAPS,
                    detail: format!("gap record in partition {key}"),
                });
            };
            if let Some(metric) = metric {
                gaps.push(StoredGap {
                    metric,
                    start_ms,
                    segment,
                    previous_ms,
                    count,
                });
            }
        }
        Ok(gaps)
    }

    /// The stored segments of one metric's windows starting in `starts`, in one partition:
    /// only those are read.
    pub fn segments(
        &self,
        key: &PartitionKey,
        metric: usize,
        starts: Range<i64>,
    ) -> Result<Vec<StoredSegment>, StateError> {
        let partition = partition_prefix(key);
        let name = self.metric_name(metric);
        let prefix = window_metric_prefix(&partition, name);
        let from = window_key(&partition, name, starts.start);
        self.scan_segments(key, &prefix, &from, Some(starts.end))
    }

    /// Segments stored under `prefix` (a partition's, or one metric's in it), from the key
    /// `from` on; with `starts_before` (one metric's only), up to that window start.
    fn scan_segments(
        &self,
        key: &PartitionKey,
        prefix: &[u8],
        from: &[u8],
        starts_before: Option<i64>,
    ) -> Result<Vec<StoredSegment>, StateError> {
        let partition_length = partition_prefix(key).len();
        let mut segments = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_SEGMENTS),
            IteratorMode::From(from, Direction::Forward),
        ) {
            let (stored_key, value) = item?;
            if !stored_key.starts_with(prefix) {
                break;
            }
            let parsed = self
                .parse_window_key(&stored_key[partition_length..])
                .zip(decode_window_value(&value));
            let Some(((metric, start_ms, segment), (_, value))) = parsed else {
                return Err(StateError::Corrupt {
                    column_family: CF_SEGMENTS,
                    detail: format!("segment in partition {key}"),
                });
            };
            if starts_before.is_some_and(|end| start_ms >= end) {
                break;
            }
            if let Some(metric) = metric {
                segments.push(StoredSegment {
                    metric,
                    start_ms,
                    segment: segment.into(),
                    value,
                });
            }
        }
        Ok(segments)
    }

    /// The stored windows of one partition, of one metric or of all.
    pub fn windows(
        &self,
        key: &PartitionKey,
        metric: Option<usize>,
    ) -> Result<Vec<StoredWindow>, StateError> {
        self.scan_windows(&partition_prefix(key), metric)
    }

    /// The stored windows of one metric in one partition starting in `starts`, oldest first,
    /// at most `limit` of them: only those are read, however many are stored.
    pub fn windows_in(
        &self,
        key: &PartitionKey,
        metric: usize,
        starts: Range<i64>,
        limit: usize,
    ) -> Result<Vec<StoredWindow>, StateError> {
        let partition = partition_prefix(key);
        let name = self.metric_name(metric);
        let prefix = window_metric_prefix(&partition, name);
        let from = window_key(&partition, name, starts.start);
        let mut windows = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_WINDOWS),
            IteratorMode::From(&from, Direction::Forward),
        ) {
            if windows.len() >= limit {
                break;
            }
            let (stored_key, value) = item?;
            if !stored_key.starts_with(&prefix) {
                break;
            }
            let Some(window) = self.window_record(&stored_key[partition.len()..], &value)? else {
                continue;
            };
            if window.start_ms >= starts.end {
                break;
            }
            windows.push(window);
        }
        Ok(windows)
    }

    fn scan_windows(
        &self,
        prefix: &[u8],
        metric: Option<usize>,
    ) -> Result<Vec<StoredWindow>, StateError> {
        let start = match metric {
            Some(metric) => window_metric_prefix(prefix, self.metric_name(metric)),
            None => prefix.to_vec(),
        };
        let mut windows = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_WINDOWS),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (stored_key, value) = item?;
            if !stored_key.starts_with(&start) {
                break;
            }
            windows.extend(self.window_record(&stored_key[prefix.len()..], &value)?);
        }
        Ok(windows)
    }

    /// A record of the `windows` family, its key without the partition prefix; `None` for a
    /// metric no longer configured.
    fn window_record(&self, key: &[u8], value: &[u8]) -> Result<Option<StoredWindow>, StateError> {
        let corrupt = || StateError::Corrupt {
            column_family: CF_WINDOWS,
            detail: "window record".into(),
        };
        let (index, start_ms, rest) = self.parse_window_key(key).ok_or_else(corrupt)?;
        if !rest.is_empty() {
            return Err(corrupt());
        }
        let (end_ms, value, progress) = decode_window_record(value).ok_or_else(corrupt)?;
        Ok(index.map(|metric| StoredWindow {
            metric,
            start_ms,
            end_ms,
            value,
            progress,
        }))
    }

    /// Splits `<metric> 0x00 <start> <rest>`; the metric is `None` if no longer configured.
    fn parse_window_key<'k>(&self, key: &'k [u8]) -> Option<(Option<usize>, i64, &'k [u8])> {
        let separator = key.iter().position(|byte| *byte == 0)?;
        let name = std::str::from_utf8(&key[..separator]).ok()?;
        let start_bytes: [u8; 8] = key.get(separator + 1..separator + 9)?.try_into().ok()?;
        let start_ms = codec::decode_i64(start_bytes);
        Some((
            self.metric_index.get(name).copied(),
            start_ms,
            &key[separator + 9..],
        ))
    }

    /// Partitions that have stored state.
    pub fn stored_partitions(&self) -> Result<Vec<PartitionKey>, StateError> {
        let mut keys = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_PARTITIONS), IteratorMode::Start)
        {
            let (key, _) = item?;
            let (partition, _) =
                split_partition_prefix(&key).ok_or_else(|| StateError::Corrupt {
                    column_family: CF_PARTITIONS,
                    detail: "partition key".into(),
                })?;
            keys.push(partition);
        }
        Ok(keys)
    }
}

/// Where the operations of a write go: the local batch, and what the changelog carries of them
/// (keyed records, or frames). Keys are stored keys, each under its partition's prefix.
pub(crate) trait Recording {
    fn put(&mut self, family: &'static str, key: &[u8], value: &[u8]);
    fn delete(&mut self, family: &'static str, key: &[u8]);
    /// Deletes `[start, end)`, after every operation recorded before it in the partition.
    fn delete_range(&mut self, family: &'static str, start: &[u8], end: &[u8]);
    /// Ends a partition's operations with its meta record (offsets and watermark).
    fn end_partition(&mut self, partition: &PartitionKey, meta: &[u8]);
}

/// Members and threshold progress are read one entry at a time, by the pipeline's thread,
/// after the change sets before them were written.
impl StateReader for Store {
    fn member(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: i64,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateReadError> {
        let mut stored_key = Vec::new();
        member_key_into(
            &mut stored_key,
            &partition_prefix(partition),
            self.metric_name(metric),
            start_ms,
            key,
        );
        self.db
            .get_cf(self.cf(CF_ENTRIES), stored_key)
            .map_err(|error| StateReadError(error.to_string()))
    }

    fn member_page(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: i64,
        period: u64,
        shard: u16,
    ) -> Result<Vec<(u128, Vec<u8>)>, StateReadError> {
        let mut place = Vec::new();
        codec::member_place_into(
            &mut place,
            &partition_prefix(partition),
            self.metric_name(metric),
            start_ms,
            period,
        );
        // A page is one range of digests after its place: one seek, then the next keys.
        let (start, end) = codec::member_shard_range(&place, shard);
        let mut options = rocksdb::ReadOptions::default();
        options.fill_cache(false);
        options.set_iterate_upper_bound(end);
        let mut stored = self.db.raw_iterator_cf_opt(self.cf(CF_ENTRIES), options);
        stored.seek(&start);
        let mut rows = Vec::new();
        while let (true, Some(key), Some(value)) = (stored.valid(), stored.key(), stored.value()) {
            let digest = key
                .get(place.len()..)
                .and_then(|digest| <[u8; 16]>::try_from(digest).ok())
                .ok_or_else(|| {
                    StateReadError(format!(
                        "{CF_ENTRIES}: a member key of {} bytes in a page of a place of {}",
                        key.len(),
                        place.len()
                    ))
                })?;
            rows.push((u128::from_be_bytes(digest), value.to_vec()));
            stored.next();
        }
        stored
            .status()
            .map_err(|error| StateReadError(error.to_string()))?;
        Ok(rows)
    }

    fn has_entries(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: i64,
    ) -> Result<bool, StateReadError> {
        let prefix = window_key(
            &partition_prefix(partition),
            self.metric_name(metric),
            start_ms,
        );
        let mut entries = self.db.iterator_cf(
            self.cf(CF_ENTRIES),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        match entries.next() {
            Some(Ok((key, _))) => Ok(key.starts_with(&prefix)),
            Some(Err(error)) => Err(StateReadError(error.to_string())),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests;
