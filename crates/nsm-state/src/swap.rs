//! The swap of a backfill (docs/design/backfill.md): a partition's data of some metrics,
//! computed over the topic's history by a backfill engine in a store of its own, replaces the
//! live store's.
//!
//! A metric's data of a partition is one key range per family (the partition prefix, then the
//! metric's name), so the swap deletes the live ranges and copies the backfill's in, in
//! batches of bounded size. A marker written with the first batch and removed with the last
//! says a swap is under way: a crash in between leaves the marker, and the caller does the
//! swap again from the start (it is idempotent) or gives the metric up
//! ([`Store::abandon_swap`]).

use rocksdb::WriteBatch;

use crate::codec::{partition_prefix, prefix_successor, window_metric_prefix};
use crate::{
    since_key, StateError, Store, CF_ENTRIES, CF_FINGERPRINTS, CF_GAPS, CF_SEGMENTS, CF_WINDOWS,
};
use nsm_core::{EpochMillis, PartitionKey};

/// The families holding a metric's data of a partition, one key range each.
const METRIC_FAMILIES: [&str; 4] = [CF_WINDOWS, CF_ENTRIES, CF_SEGMENTS, CF_GAPS];

/// Before a metric's name in `fingerprints`: a swap of that metric is under way.
const SWAP_MARKER: &[u8] = b"\0swap\0";

/// Entries copied per batch: a swap of millions of entries holds a few MB at a time.
const ENTRIES_PER_BATCH: usize = 50_000;

pub(crate) fn swap_key(prefix: &[u8], metric: &str) -> Vec<u8> {
    [prefix, SWAP_MARKER, metric.as_bytes()].concat()
}

impl Store {
    /// Replaces the partition's data of `metric` with `from`'s (a backfill's store, opened
    /// with the same config). `since_ms`: from when the data is whole (`None`: from the
    /// partition's start, so its windows are no longer partial).
    pub fn replace_metric(
        &self,
        key: &PartitionKey,
        metric: &str,
        from: &Store,
        since_ms: Option<EpochMillis>,
    ) -> Result<(), StateError> {
        let prefix = partition_prefix(key);
        let start = window_metric_prefix(&prefix, metric);
        let end = prefix_successor(&start);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_FINGERPRINTS), swap_key(&prefix, metric), []);
        for family in METRIC_FAMILIES {
            batch.delete_range_cf(self.cf(family), &start, &end);
        }
        let mut in_batch = 0;
        for family in METRIC_FAMILIES {
            for item in from.entries_under(family, &start) {
                let (entry, value) = item?;
                batch.put_cf(self.cf(family), entry, value);
                in_batch += 1;
                if in_batch == ENTRIES_PER_BATCH {
                    self.db.write(std::mem::take(&mut batch))?;
                    in_batch = 0;
                }
            }
        }
        let since = since_key(&prefix, metric);
        match since_ms {
            Some(since_ms) => {
                batch.put_cf(self.cf(CF_FINGERPRINTS), &since, since_ms.to_be_bytes())
            }
            None => batch.delete_cf(self.cf(CF_FINGERPRINTS), &since),
        }
        batch.delete_cf(self.cf(CF_FINGERPRINTS), swap_key(&prefix, metric));
        self.db.write(batch)?;
        Ok(())
    }

    /// The metrics whose swap into the partition was cut short: their data is part old, part
    /// new, until swapped again or given up.
    pub fn unfinished_swaps(&self, key: &PartitionKey) -> Result<Vec<String>, StateError> {
        let marker = [&partition_prefix(key)[..], SWAP_MARKER].concat();
        self.entries_under(CF_FINGERPRINTS, &marker)
            .map(|item| {
                let (entry, _) = item?;
                Ok(String::from_utf8_lossy(&entry[marker.len()..]).into_owned())
            })
            .collect()
    }

    /// Gives up every swap into the partition that was cut short (a crash between its
    /// batches): each such metric starts again at the partition's watermark, partial before,
    /// as a metric just added, and is backfilled again. Returns their names.
    pub fn abandon_unfinished_swaps(&self, key: &PartitionKey) -> Result<Vec<String>, StateError> {
        let metrics = self.unfinished_swaps(key)?;
        if metrics.is_empty() {
            return Ok(metrics);
        }
        let since_ms = self
            .stored_watermark(&partition_prefix(key))?
            .unwrap_or(EpochMillis::MIN);
        for metric in &metrics {
            self.abandon_swap(key, metric, since_ms)?;
        }
        Ok(metrics)
    }

    /// Says the partition's data of `metrics` lacks the events before `since_ms`, unless
    /// something was said of them already: a partition of the repartition topic starting
    /// empty while the input topics have history, whose metrics are then backfilled.
    pub fn start_partial(
        &self,
        key: &PartitionKey,
        metrics: &[String],
        since_ms: EpochMillis,
    ) -> Result<(), StateError> {
        let prefix = partition_prefix(key);
        let mut batch = WriteBatch::default();
        for metric in metrics {
            let since = since_key(&prefix, metric);
            if self.db.get_cf(self.cf(CF_FINGERPRINTS), &since)?.is_none() {
                batch.put_cf(self.cf(CF_FINGERPRINTS), since, since_ms.to_be_bytes());
            }
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// The partition's data of `metrics` is whole after all: what [`Store::start_partial`]
    /// said is taken back (every source of a repartition partition starting empty had started
    /// empty too, so it missed nothing).
    pub fn end_partial(&self, key: &PartitionKey, metrics: &[String]) -> Result<(), StateError> {
        let prefix = partition_prefix(key);
        let mut batch = WriteBatch::default();
        for metric in metrics {
            batch.delete_cf(self.cf(CF_FINGERPRINTS), since_key(&prefix, metric));
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Gives a cut-short swap up: the partition's data of `metric` is deleted, and starts at
    /// `since_ms` (partial before), as for a metric just added.
    pub fn abandon_swap(
        &self,
        key: &PartitionKey,
        metric: &str,
        since_ms: EpochMillis,
    ) -> Result<(), StateError> {
        let prefix = partition_prefix(key);
        let start = window_metric_prefix(&prefix, metric);
        let end = prefix_successor(&start);
        let mut batch = WriteBatch::default();
        for family in METRIC_FAMILIES {
            batch.delete_range_cf(self.cf(family), &start, &end);
        }
        batch.put_cf(
            self.cf(CF_FINGERPRINTS),
            since_key(&prefix, metric),
            since_ms.to_be_bytes(),
        );
        batch.delete_cf(self.cf(CF_FINGERPRINTS), swap_key(&prefix, metric));
        self.db.write(batch)?;
        Ok(())
    }
}
