//! Per-entity state kept on disk, not in memory: the members of distinct sets, threshold
//! progress and the occurrences of trailing distinct members.
//!
//! Memory must not grow with the number of users or entities, so the engine keeps only what it
//! wrote since the last checkpoint (exact, needed until it is stored) and a bounded cache of
//! members known to be present. Everything else is asked of a [`StateReader`]: nsm-state
//! answers from RocksDB; [`MemoryReader`] answers from memory for tests and benchmarks.
//!
//! Entries live in the namespace of one window of one metric, so expiring a window deletes
//! them with it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use super::changes::{
    MemberInsert, MemberRangeDelete, PartitionChanges, WindowDelete, WindowsBefore,
};

use crate::{EpochMillis, PartitionKey};

/// Reading committed per-entity state failed (an I/O error of the store).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reading stored state failed: {0}")]
pub struct StateReadError(pub String);

/// Answers for per-entity state that was committed (written by the caller from
/// [`super::ChangeSet`]s). The engine asks it only for entries it did not write since the
/// last [`super::Engine::take_changes`].
pub trait StateReader: Send {
    /// The value stored for `key` in window `start_ms` of metric `metric` of a partition.
    fn member(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateReadError>;
}

type MemberKey = (usize, EpochMillis, Box<[u8]>);

/// Every entry of every partition, ordered so a window's entries are adjacent.
type Entries = BTreeMap<(PartitionKey, MemberKey), Box<[u8]>>;

/// Per-entity state in memory: a map of every committed entry. For tests and in-process
/// benchmarks, and the default of [`super::Engine::new`]; its memory grows with the entities.
#[derive(Debug, Default, Clone)]
pub struct MemoryReader {
    entries: Arc<Mutex<Entries>>,
}

impl MemoryReader {
    /// Stores the member changes of one partition, as nsm-state does.
    pub fn write(&self, changes: &PartitionChanges) {
        self.write_members(&changes.key, &changes.members, &changes.deletes);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for MemberRangeDelete {
            metric,
            start_ms,
            before,
        } in &changes.member_range_deletes
        {
            entries.retain(|(partition, (m, s, key)), _| {
                !(*partition == changes.key && m == metric && s == start_ms && key < before)
            });
        }
        for WindowsBefore { metric, before_ms } in &changes.windows_before {
            entries.retain(|(partition, (m, s, _)), _| {
                !(*partition == changes.key && m == metric && s < before_ms)
            });
        }
    }

    /// Stores member entries, then deletes the windows' entries (the order of a store batch).
    pub fn write_members(
        &self,
        partition: &PartitionKey,
        inserts: &[MemberInsert],
        deletes: &[WindowDelete],
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for MemberInsert {
            metric,
            start_ms,
            member,
            value,
        } in inserts
        {
            entries.insert(
                (partition.clone(), (*metric, *start_ms, member.clone())),
                value.clone(),
            );
        }
        for delete in deletes {
            let from = (
                partition.clone(),
                (delete.metric, delete.start_ms, Box::<[u8]>::default()),
            );
            let doomed: Vec<_> = entries
                .range(from..)
                .take_while(|((stored, (metric, start, _)), _)| {
                    stored == partition && *metric == delete.metric && *start == delete.start_ms
                })
                .map(|(key, _)| key.clone())
                .collect();
            for key in doomed {
                entries.remove(&key);
            }
        }
    }

    /// Every stored entry's place, in order, for tests.
    pub fn entries(&self) -> Vec<(PartitionKey, usize, EpochMillis, Box<[u8]>)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .keys()
            .map(|(partition, (metric, start_ms, key))| {
                (partition.clone(), *metric, *start_ms, key.clone())
            })
            .collect()
    }

    /// Stored entries, for tests.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StateReader for MemoryReader {
    fn member(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateReadError> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Ok(entries
            .get(&(partition.clone(), (metric, start_ms, key.into())))
            .map(|value| value.to_vec()))
    }
}

/// Where a partition's committed entries are read from.
pub(super) struct Source<'a> {
    pub reader: &'a dyn StateReader,
    pub partition: &'a PartitionKey,
}

/// One partition's view of its per-entity entries: what it wrote since the last checkpoint,
/// a bounded cache of entries known to be present with an empty value, then the reader.
#[derive(Debug)]
pub(super) struct MemberIndex {
    /// Written since the last checkpoint, by digest of the entry's place. Exact: the reader
    /// does not have these yet.
    written: HashMap<u128, (MemberKey, Box<[u8]>)>,
    /// Digests of present entries with an empty value, in two generations: when `recent`
    /// fills up, it becomes `older` and the previous `older` is dropped. Bounded, and the
    /// members of active users stay in it.
    recent: HashSet<u128>,
    older: HashSet<u128>,
    cache_capacity: usize,
}

impl MemberIndex {
    pub fn new(cache_capacity: usize) -> Self {
        Self {
            written: HashMap::new(),
            recent: HashSet::new(),
            older: HashSet::new(),
            cache_capacity: cache_capacity.max(1),
        }
    }

    /// The value of an entry, if present.
    pub fn get(
        &mut self,
        source: &Source<'_>,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<Box<[u8]>>, StateReadError> {
        if let Some((_, value)) = self.written.get(&digest(metric, start_ms, key)) {
            return Ok(Some(value.clone()));
        }
        let value = source
            .reader
            .member(source.partition, metric, start_ms, key)?;
        Ok(value.map(Vec::into_boxed_slice))
    }

    /// Whether an entry with an empty value (a member) is present.
    pub fn contains(
        &mut self,
        source: &Source<'_>,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<bool, StateReadError> {
        let digest = digest(metric, start_ms, key);
        if self.recent.contains(&digest) {
            return Ok(true);
        }
        if self.older.contains(&digest) {
            self.remember(digest);
            return Ok(true);
        }
        if self.written.contains_key(&digest) {
            return Ok(true);
        }
        let present = source
            .reader
            .member(source.partition, metric, start_ms, key)?
            .is_some();
        if present {
            self.remember(digest);
        }
        Ok(present)
    }

    /// Adds a member (an entry with an empty value).
    pub fn insert(&mut self, metric: usize, start_ms: EpochMillis, key: &[u8]) {
        self.put(metric, start_ms, key, Box::default());
        self.remember(digest(metric, start_ms, key));
    }

    /// Sets an entry's value.
    pub fn put(&mut self, metric: usize, start_ms: EpochMillis, key: &[u8], value: Box<[u8]>) {
        self.written.insert(
            digest(metric, start_ms, key),
            ((metric, start_ms, key.into()), value),
        );
    }

    /// What was written since the last call, to store.
    pub fn take_written(&mut self) -> Vec<MemberInsert> {
        let mut inserts: Vec<MemberInsert> = self
            .written
            .drain()
            .map(|(_, ((metric, start_ms, member), value))| MemberInsert {
                metric,
                start_ms,
                member,
                value,
            })
            .collect();
        inserts.sort_by(|a, b| {
            (a.metric, a.start_ms, &a.member).cmp(&(b.metric, b.start_ms, &b.member))
        });
        inserts
    }

    /// Entries held in memory (written and cached), for the memory gauge.
    pub fn resident(&self) -> usize {
        self.written.len() + self.recent.len() + self.older.len()
    }

    fn remember(&mut self, digest: u128) {
        if self.recent.len() >= self.cache_capacity {
            self.older = std::mem::take(&mut self.recent);
        }
        self.recent.insert(digest);
    }
}

/// A 128-bit digest of an entry's place; collisions are out of reach in practice (two SipHash
/// runs with distinct prefixes). Stable only within a process, which is all a cache needs.
fn digest(metric: usize, start_ms: EpochMillis, key: &[u8]) -> u128 {
    let half = |salt: u8| {
        let mut hasher = std::hash::DefaultHasher::new();
        hasher.write_u8(salt);
        metric.hash(&mut hasher);
        start_ms.hash(&mut hasher);
        key.hash(&mut hasher);
        hasher.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_entries_are_seen_before_they_are_stored_and_the_cache_stays_bounded() {
        let reader = MemoryReader::default();
        let partition = PartitionKey::new("t", 0);
        let source = Source {
            reader: &reader,
            partition: &partition,
        };
        let mut index = MemberIndex::new(2);
        assert!(!index.contains(&source, 0, 0, b"a").expect("in memory"));
        index.insert(0, 0, b"a");
        index.put(0, 0, b"p", Box::from(&b"\x01"[..]));
        assert!(index.contains(&source, 0, 0, b"a").expect("in memory"));
        assert_eq!(
            index
                .get(&source, 0, 0, b"p")
                .expect("in memory")
                .as_deref(),
            Some(&b"\x01"[..])
        );

        let written = index.take_written();
        assert_eq!(written.len(), 2);
        reader.write_members(&partition, &written, &[]);
        for member in [b"b", b"c", b"d", b"e"] {
            index.insert(0, 0, member);
        }
        assert!(
            index.recent.len() + index.older.len() <= 4,
            "two generations of two"
        );
        assert!(
            index.contains(&source, 0, 0, b"a").expect("in memory"),
            "answered by the reader"
        );
        assert!(
            !index.contains(&source, 0, 1, b"a").expect("in memory"),
            "another window"
        );
    }
}
