//! Member entries stored by page (state format 9).
//!
//! A member entry is known by its key of format 8, `<place> <digest, 16 bytes BE>`
//! (`codec::member_key_into`): the frames, the overlay of a write and every reader use that
//! key. What RocksDB holds is coarser. The entries of one *page*, a place's checkpoint shard
//! (the digests whose top 10 bits are the shard), are stored as *runs*: one value holding rows
//! sorted by digest, under `<place> <shard's 2 bytes of digest> <sequence, 8 bytes BE>`. A
//! write puts one run per page it touches, whatever the number of entries, so a checkpoint
//! inserts a few thousand keys into the memtable instead of one per entry, and compactions
//! move large values. A page is read whole, merging its runs: the newest run holding a digest
//! decides, and a row may be a tombstone. When a shard is snapshotted, each of its pages is
//! rewritten as one run and its older runs are deleted, so a page has at most the runs of one
//! round of snapshots.
//!
//! Sequences grow with every run the store writes: the store's *generation*, raised and stored
//! at every open, above a counter of the runs written since. A run written later than another
//! of its page always has the larger sequence, across restarts too.
//!
//! A page's key is the two bytes `codec::member_shard_range` puts after a place, so the key
//! ranges of places, windows, funnel periods and shards are the same in both layouts.

use std::sync::atomic::{AtomicU64, Ordering};

use rocksdb::{ColumnFamily, WriteBatch, WriteOptions, DB};

use crate::codec::{member_shard_position, push_varint, take_varint};
use crate::StateError;

/// Bytes of a run's sequence, after its page.
const SEQUENCE_BYTES: usize = 8;
/// Bytes of the digest that name a page after its place.
const PAGE_BYTES: usize = 2;
/// Bytes of the digest that end a member key of format 8.
const DIGEST_BYTES: usize = 16;
/// Bits of a digest that name its checkpoint shard.
const SHARD_BITS: u32 = crate::codec::MEMBER_SHARDS.trailing_zeros();
/// Runs written in one process life at most: the sequence's low bits.
const COUNTER_BITS: u32 = 40;

/// The key in `meta` of the store's generation.
const GENERATION_KEY: &[u8] = b"run_generation";

/// The sequences of the runs a store writes.
#[derive(Debug)]
pub(crate) struct RunSequences {
    generation: u64,
    written: AtomicU64,
}

impl RunSequences {
    /// Raises the store's generation and stores it, before any run of this open is written.
    pub(crate) fn open(
        db: &DB,
        meta: &ColumnFamily,
        write_options: &WriteOptions,
    ) -> Result<Self, StateError> {
        let stored = db
            .get_cf(meta, GENERATION_KEY)?
            .map(|bytes| {
                <[u8; 8]>::try_from(&*bytes)
                    .map(u64::from_be_bytes)
                    .map_err(|_| StateError::Corrupt {
                        column_family: "meta",
                        detail: format!("a run generation of {} bytes", bytes.len()),
                    })
            })
            .transpose()?
            .unwrap_or(0);
        let generation = stored + 1;
        db.put_cf_opt(
            meta,
            GENERATION_KEY,
            generation.to_be_bytes(),
            write_options,
        )?;
        Ok(RunSequences {
            generation,
            written: AtomicU64::new(0),
        })
    }

    /// The sequence of the next run.
    pub(crate) fn next(&self) -> u64 {
        let counter = self.written.fetch_add(1, Ordering::Relaxed);
        debug_assert!(counter < 1 << COUNTER_BITS, "runs of one process life");
        (self.generation << COUNTER_BITS) | counter
    }
}

/// The two bytes after a place that name the page of `digest`.
fn page_bytes(digest: u128) -> [u8; PAGE_BYTES] {
    let top = (digest >> (128 - 16)) as u16;
    (top & !((1u16 << (16 - SHARD_BITS)) - 1)).to_be_bytes()
}

/// A member key of format 8 split into its place's length and its digest.
pub(crate) fn split_member_key(key: &[u8]) -> Option<(usize, u128)> {
    let place = member_shard_position(key)?;
    let digest = key.get(place..place + DIGEST_BYTES)?.try_into().ok()?;
    Some((place, u128::from_be_bytes(digest)))
}

/// The page of a stored run key (its key without the sequence), and its place's length.
pub(crate) fn page_of_run(run_key: &[u8]) -> Option<(&[u8], usize)> {
    let page = run_key.len().checked_sub(SEQUENCE_BYTES)?;
    let place = page.checked_sub(PAGE_BYTES)?;
    Some((&run_key[..page], place))
}

/// The key of a run of `page` with sequence `sequence`.
fn run_key(page: &[u8], sequence: u64) -> Vec<u8> {
    [page, &sequence.to_be_bytes()].concat()
}

/// Appends a row to a run: the digest, then the value's length plus one (zero for a
/// tombstone), then the value.
fn push_row(out: &mut Vec<u8>, digest: u128, value: Option<&[u8]>) {
    out.extend_from_slice(&digest.to_be_bytes());
    match value {
        Some(value) => {
            push_varint(out, value.len() as u128 + 1);
            out.extend_from_slice(value);
        }
        None => push_varint(out, 0),
    }
}

/// The rows of a run, in digest order: each digest, and its value (`None`: deleted).
pub(crate) fn run_rows(
    mut run: &[u8],
) -> impl Iterator<Item = Result<(u128, Option<&[u8]>), StateError>> {
    std::iter::from_fn(move || {
        if run.is_empty() {
            return None;
        }
        let corrupt = || StateError::Corrupt {
            column_family: crate::CF_ENTRIES,
            detail: "a member page's run cut short".into(),
        };
        let row = (|| {
            let digest: [u8; DIGEST_BYTES] = run.get(..DIGEST_BYTES)?.try_into().ok()?;
            run = &run[DIGEST_BYTES..];
            let length = usize::try_from(take_varint(&mut run)?).ok()?;
            let value = match length.checked_sub(1) {
                None => None,
                Some(length) => {
                    let value = run.get(..length)?;
                    run = &run[length..];
                    Some(value)
                }
            };
            Some((u128::from_be_bytes(digest), value))
        })();
        if row.is_none() {
            run = &[];
        }
        Some(row.ok_or_else(corrupt))
    })
}

/// The value of `digest` in a run: `Some(None)` when the run deletes it, `None` when the run
/// does not name it.
pub(crate) fn find_in_run(run: &[u8], digest: u128) -> Result<Option<Option<&[u8]>>, StateError> {
    for row in run_rows(run) {
        let (found, value) = row?;
        if found == digest {
            return Ok(Some(value));
        }
        if found > digest {
            break;
        }
    }
    Ok(None)
}

/// The entries of a page from its runs, oldest run first: each digest's value in the newest
/// run that names it, deleted ones left out, in digest order.
pub(crate) fn merge_runs<R: AsRef<[u8]>>(runs: &[R]) -> Result<Vec<(u128, Vec<u8>)>, StateError> {
    if let [run] = runs {
        let mut rows = Vec::new();
        for row in run_rows(run.as_ref()) {
            if let (digest, Some(value)) = row? {
                rows.push((digest, value.to_vec()));
            }
        }
        return Ok(rows);
    }
    // Newest first, so a stable sort by digest keeps each digest's newest row first.
    let mut rows: Vec<(u128, Option<&[u8]>)> = Vec::new();
    for run in runs.iter().rev() {
        for row in run_rows(run.as_ref()) {
            rows.push(row?);
        }
    }
    rows.sort_by_key(|(digest, _)| *digest);
    rows.dedup_by_key(|(digest, _)| *digest);
    Ok(rows
        .into_iter()
        .filter_map(|(digest, value)| Some((digest, value?.to_vec())))
        .collect())
}

/// A member row waiting in a [`PageWriter`]: its page's bytes and value's in the writer's
/// buffer.
#[derive(Debug, Clone, Copy)]
struct Pending {
    page: (u32, u32),
    digest: u128,
    /// `None`: a tombstone.
    value: Option<(u32, u32)>,
}

/// Rows a writer buffers at most before it writes them as runs.
const ROWS_PER_FLUSH: usize = 1 << 16;

/// Gathers the member rows of a write, by their keys of format 8, into one run per page.
/// Rows are buffered in the order given (a later row of an entry wins) and written as runs
/// when a range is deleted (which must come after them), when the buffer is full, and when
/// the write is finished; rows in key order make one run per page and flush.
#[derive(Debug, Default)]
pub(crate) struct PageWriter {
    bytes: Vec<u8>,
    rows: Vec<Pending>,
}

impl PageWriter {
    /// Buffers a row (`value: None` deletes the entry); a key that is not a member key of
    /// format 8 is refused.
    pub(crate) fn put(
        &mut self,
        batch: &mut WriteBatch,
        family: &ColumnFamily,
        sequences: &RunSequences,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), StateError> {
        let (place, digest) = split_member_key(key).ok_or_else(|| StateError::Corrupt {
            column_family: crate::CF_ENTRIES,
            detail: format!(
                "a member key of {} bytes with no digest after a place",
                key.len()
            ),
        })?;
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&key[..place]);
        self.bytes.extend_from_slice(&page_bytes(digest));
        let page = (offset(start), offset(self.bytes.len()));
        let value = value.map(|value| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(value);
            (offset(start), offset(self.bytes.len()))
        });
        self.rows.push(Pending {
            page,
            digest,
            value,
        });
        if self.rows.len() >= ROWS_PER_FLUSH {
            self.flush(batch, family, sequences);
        }
        Ok(())
    }

    /// Writes the buffered rows into `batch`, one run per page.
    pub(crate) fn flush(
        &mut self,
        batch: &mut WriteBatch,
        family: &ColumnFamily,
        sequences: &RunSequences,
    ) {
        if self.rows.is_empty() {
            return;
        }
        let bytes = &self.bytes;
        let span = |(start, end): (u32, u32)| &bytes[start as usize..end as usize];
        let order =
            |a: &Pending, b: &Pending| span(a.page).cmp(span(b.page)).then(a.digest.cmp(&b.digest));
        if !self
            .rows
            .windows(2)
            .all(|pair| order(&pair[0], &pair[1]).is_lt())
        {
            // Stable: of two rows of an entry, the later stays after the earlier.
            self.rows.sort_by(order);
        }
        let mut run = Vec::new();
        let mut rows = self.rows.iter().peekable();
        while let Some(row) = rows.next() {
            let later = rows.peek().filter(|next| order(row, next).is_eq());
            if later.is_none() {
                push_row(&mut run, row.digest, row.value.map(span));
            }
            let page_ends = rows
                .peek()
                .is_none_or(|next| span(next.page) != span(row.page));
            if page_ends {
                batch.put_cf(family, run_key(span(row.page), sequences.next()), &run);
                run.clear();
            }
        }
        self.rows.clear();
        self.bytes.clear();
    }
}

fn offset(at: usize) -> u32 {
    u32::try_from(at).unwrap_or_else(|_| unreachable!("a page writer flushes long before 4 GiB"))
}

/// Puts `rows` (digests and values, in digest order) as the one run of `page`, deleting its
/// older runs: a page rewritten whole.
pub(crate) fn rewrite_page(
    batch: &mut WriteBatch,
    family: &ColumnFamily,
    sequences: &RunSequences,
    page: &[u8],
    rows: impl IntoIterator<Item = (u128, impl AsRef<[u8]>)>,
) {
    let sequence = sequences.next();
    let mut run = Vec::new();
    for (digest, value) in rows {
        push_row(&mut run, digest, Some(value.as_ref()));
    }
    let key = run_key(page, sequence);
    batch.delete_range_cf(family, page, &key);
    if !run.is_empty() {
        batch.put_cf(family, key, run);
    }
}

/// The page of a member key of format 8 (its place, then its shard's two bytes).
pub(crate) fn page_of_member_key(key: &[u8]) -> Option<Vec<u8>> {
    let (place, digest) = split_member_key(key)?;
    Some([&key[..place], &page_bytes(digest)].concat())
}

/// The member key of format 8 of a digest in a page.
pub(crate) fn member_key(page: &[u8], digest: u128) -> Vec<u8> {
    let place = page.len() - PAGE_BYTES;
    [&page[..place], &digest.to_be_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rows: &[(u128, Option<&[u8]>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(digest, value) in rows {
            push_row(&mut out, digest, value);
        }
        out
    }

    #[test]
    fn the_newest_run_naming_a_digest_decides_and_tombstones_leave_it_out() {
        let older = run(&[(1, Some(b"a")), (5, Some(b"b")), (9, Some(b"c"))]);
        let newer = run(&[(5, None), (7, Some(b"")), (9, Some(b"d"))]);
        assert_eq!(
            merge_runs(&[older.clone(), newer.clone()]).expect("merge"),
            vec![(1, b"a".to_vec()), (7, Vec::new()), (9, b"d".to_vec())]
        );
        assert_eq!(find_in_run(&newer, 5).expect("find"), Some(None));
        assert_eq!(find_in_run(&newer, 7).expect("find"), Some(Some(&b""[..])));
        assert_eq!(find_in_run(&newer, 6).expect("find"), None);
        assert!(run_rows(&older[..older.len() - 1]).any(|row| row.is_err()));
    }

    #[test]
    fn a_page_is_the_two_bytes_a_shard_range_puts_after_its_place() {
        for shard in [0u16, 1, 513, 1023] {
            let digest = (u128::from(shard) << (128 - SHARD_BITS)) | 0xabcdef;
            let (start, end) = crate::codec::member_shard_range(b"place", shard);
            let page = [&b"place"[..], &page_bytes(digest)].concat();
            assert_eq!(page, start);
            assert!(run_key(&page, u64::MAX).as_slice() < end.as_slice());
            assert_eq!(nsm_core::engine::member_shard_of(digest), shard);
        }
    }
}
