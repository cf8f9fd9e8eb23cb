//! The state format version: stored in the `meta` column family when a store is created, and
//! checked at every open before anything is read, so that a state directory nsm cannot read
//! exactly is refused with what to do, never read into wrong numbers.

use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamily, IteratorMode, WriteOptions, DB};

/// Bumped whenever the layout described in the crate doc changes incompatibly. 2: members
/// carry values (threshold progress, trailing occurrences, funnels, event ids) and are read one
/// at a time, never loaded whole; `gaps` added; `funnels` and `seen_ids` no longer used.
/// 3: metric fingerprints per partition (`fingerprints`), changelog positions in `meta`.
/// 4: a trailing distinct count's (or conversion's) last occurrence of a member per period
/// holds the occurrence's previous one too, and its other occurrences are stored only where an
/// event can still reach them (`nsm_core::engine::trailing`); such metrics' fingerprints say
/// so. 5: a partition's meta record holds its watermark apart from its newest event (the
/// watermark is bounded by the wall clock when each event was applied). 6: a calendar window
/// of a count, sum, distinct count, conversion or retention carries its progress record after
/// its value (`nsm_core::engine::baseline`), and its distinct members hold the step of their
/// earliest event; such metrics' fingerprints say so. 7: member entries move to `entries`, each
/// key with its checkpoint shard after its place. 8: member entries move to
/// `entries_by_digest`, each key ending in the entry's digest (`codec::member_key_into`).
pub const FORMAT_VERSION: u32 = 8;

/// An older format this nsm migrates at open (its fingerprints move to each partition, in
/// format 3's form).
pub(crate) const FORMAT_WITH_GLOBAL_FINGERPRINTS: u32 = 2;

/// An older format this nsm reads as it is: it stored every trailing occurrence apart, and
/// the last ones without their previous one, which this nsm still reads; the fingerprints it
/// stored are accepted as they are, and replaced as partitions are taken.
pub(crate) const FORMAT_WITH_EVERY_OCCURRENCE: u32 = 3;

/// An older format this nsm reads as it is: its partitions' meta records hold no watermark,
/// which is then their newest event, as it was in that format.
pub(crate) const FORMAT_WITHOUT_WATERMARK: u32 = 4;

/// An older format this nsm reads as it is: its windows end after their value and its
/// members hold no step, so those windows have no progress record and give no baseline
/// (windows created from then on have one).
pub(crate) const FORMAT_WITHOUT_PROGRESS: u32 = 5;

/// An older format this nsm migrates at open: its member entries, in `members`, are keyed
/// without their shard; they are rewritten into `entries`.
pub(crate) const FORMAT_WITHOUT_SHARDS: u32 = 6;

/// An older format this nsm migrates at open: its member entries, in `entries`, are keyed by
/// shard and bytes; they are rewritten into `entries_by_digest`.
pub(crate) const FORMAT_WITH_SHARDED_ENTRIES: u32 = 7;

pub(crate) const FORMAT_VERSION_KEY: &[u8] = b"format_version";

/// What every refusal tells the operator to do when the right nsm version is not at hand:
/// state is rebuilt only by replaying the topics, so the group's offsets must go back too.
const REBUILD: &str = "to rebuild the state instead, move the directory away and replay the \
                       topics: reset the consumer group's offsets to the earliest (or set a new \
                       kafka.group_id); windows older than the topics' retention are lost";

/// A state directory nsm refuses to open.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("the state directory {path} was written by a newer nsm, in state format {found}; this nsm reads format {expected}. Run the nsm version that wrote it (or a newer one); {REBUILD}")]
    Newer {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("the state directory {path} is in state format {found}, which this nsm (format {expected}) cannot read or migrate; {REBUILD}")]
    Older {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("the state directory {path} has an unreadable format version ({detail}): it was not written by nsm, or is damaged; {REBUILD}")]
    Unknown { path: PathBuf, detail: String },
    #[error("the state directory {path} holds data but no format version: it was not written by nsm; point state.path at an empty or nsm-owned directory")]
    Missing { path: PathBuf },
    #[error("cannot read or write the format version of {path}: {source}")]
    Storage {
        path: PathBuf,
        source: rocksdb::Error,
    },
}

/// Checks the format version of an opened store and returns it; a new, empty store gets the
/// current one. `data` are the column families that hold state: a store with data there and
/// no version was not made by nsm. [`FORMAT_WITH_GLOBAL_FINGERPRINTS`],
/// [`FORMAT_WITH_EVERY_OCCURRENCE`], [`FORMAT_WITHOUT_WATERMARK`], [`FORMAT_WITHOUT_PROGRESS`]
/// [`FORMAT_WITHOUT_SHARDS`] and [`FORMAT_WITH_SHARDED_ENTRIES`] are accepted, for the caller to
/// migrate.
pub(crate) fn check(
    db: &DB,
    meta: &ColumnFamily,
    data: &[&ColumnFamily],
    write_options: &WriteOptions,
    path: &Path,
) -> Result<u32, FormatError> {
    let storage = |source| FormatError::Storage {
        path: path.to_path_buf(),
        source,
    };
    let Some(bytes) = db.get_cf(meta, FORMAT_VERSION_KEY).map_err(storage)? else {
        for family in data {
            let first = db.iterator_cf(*family, IteratorMode::Start).next();
            if first.transpose().map_err(storage)?.is_some() {
                return Err(FormatError::Missing {
                    path: path.to_path_buf(),
                });
            }
        }
        db.put_cf_opt(
            meta,
            FORMAT_VERSION_KEY,
            FORMAT_VERSION.to_be_bytes(),
            write_options,
        )
        .map_err(storage)?;
        return Ok(FORMAT_VERSION);
    };
    let found = <[u8; 4]>::try_from(bytes.as_slice())
        .map(u32::from_be_bytes)
        .map_err(|_| FormatError::Unknown {
            path: path.to_path_buf(),
            detail: format!("{} bytes where 4 were expected", bytes.len()),
        })?;
    let (path, expected) = (path.to_path_buf(), FORMAT_VERSION);
    if found == FORMAT_WITH_GLOBAL_FINGERPRINTS
        || found == FORMAT_WITH_EVERY_OCCURRENCE
        || found == FORMAT_WITHOUT_WATERMARK
        || found == FORMAT_WITHOUT_PROGRESS
        || found == FORMAT_WITHOUT_SHARDS
        || found == FORMAT_WITH_SHARDED_ENTRIES
    {
        return Ok(found);
    }
    match found.cmp(&FORMAT_VERSION) {
        std::cmp::Ordering::Equal => Ok(found),
        std::cmp::Ordering::Greater => Err(FormatError::Newer {
            path,
            found,
            expected,
        }),
        std::cmp::Ordering::Less => Err(FormatError::Older {
            path,
            found,
            expected,
        }),
    }
}
