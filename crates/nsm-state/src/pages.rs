//! Member entries stored by page (state format 9).
//!
//! A member entry is known by its key of format 8, `<place> <digest, 16 bytes BE>`
//! (`codec::member_key_into`): the frames, the overlay of a write and every reader use that
//! key. What RocksDB holds is coarser: one value per *page*, a place's checkpoint shard (the
//! digests whose top 10 bits are the shard), under `<place> <shard's 2 bytes of digest>`. The
//! value is a *run*: rows sorted by digest, each a value or a tombstone. A write adds one run
//! per page it touches as a RocksDB merge operand, whatever the number of entries, so a
//! checkpoint inserts a few thousand keys into the memtable instead of one per entry, and
//! compactions move large values. RocksDB merges a page's operands when it is read or
//! compacted ([`full_merge`]: the newest row of a digest decides, and with the whole history at
//! hand tombstones go); when a shard is snapshotted, each of its pages is put whole in the same
//! write, so reads rarely merge more than a round of snapshots' runs.
//!
//! A page's key is the two bytes `codec::member_shard_range` puts after a place, so the key
//! ranges of places, windows, funnel periods and shards are the same in both layouts.

use rocksdb::merge_operator::MergeOperands;
use rocksdb::{ColumnFamily, Options, WriteBatch};

use crate::codec::{member_shard_position, push_varint, take_varint};
use crate::StateError;

/// Bytes of the digest that name a page after its place.
const PAGE_BYTES: usize = 2;
/// Bytes of the digest that end a member key of format 8.
const DIGEST_BYTES: usize = 16;
/// Bits of a digest that name its checkpoint shard.
const SHARD_BITS: u32 = crate::codec::MEMBER_SHARDS.trailing_zeros();

/// The name RocksDB keeps of the merge operator: a store of this format opens only with it.
const MERGE_OPERATOR: &str = "nsm.member_pages.v1";

/// The options of the pages' column family: `base`'s, with the merge operator of runs.
pub(crate) fn family_options(base: &Options) -> Options {
    let mut options = base.clone();
    options.set_merge_operator(MERGE_OPERATOR, full_merge, partial_merge);
    // A page written at every checkpoint gathers a run a checkpoint in the memtable, and a
    // read merges them all: past a few, the write merges them instead, once.
    options.set_max_successive_merges(MAX_RUNS_IN_MEMTABLE);
    options
}

/// Runs of a page the memtable holds at most before a write merges them.
const MAX_RUNS_IN_MEMTABLE: usize = 4;

/// Merges a page's runs with the whole history at hand (the stored value, if any, then the
/// operands, oldest first): the newest row of each digest, deleted ones left out. `None`
/// (a failed merge, which RocksDB reports as corruption) only for a damaged run.
fn full_merge(_key: &[u8], stored: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    merge_values(stored, operands, false)
}

/// Merges operands without what is below them: tombstones stay, they may delete older rows.
fn partial_merge(_key: &[u8], stored: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    merge_values(stored, operands, true)
}

fn merge_values(
    stored: Option<&[u8]>,
    operands: &MergeOperands,
    keep_tombstones: bool,
) -> Option<Vec<u8>> {
    let runs: Vec<&[u8]> = stored.into_iter().chain(operands).collect();
    let rows = merge_rows(&runs).ok()?;
    let mut out = Vec::new();
    for (digest, value) in rows {
        if value.is_some() || keep_tombstones {
            push_row(&mut out, digest, value);
        }
    }
    Some(out)
}

/// A row of a run: a digest, and its value (`None`: deleted).
type Row<'r> = (u128, Option<&'r [u8]>);

/// The rows of runs given oldest first: each digest's newest row, in digest order.
fn merge_rows<R: AsRef<[u8]>>(runs: &[R]) -> Result<Vec<Row<'_>>, StateError> {
    // Newest first, so a stable sort by digest keeps each digest's newest row first.
    let mut rows: Vec<Row<'_>> = Vec::new();
    for run in runs.iter().rev() {
        for row in run_rows(run.as_ref()) {
            rows.push(row?);
        }
    }
    if runs.len() > 1 {
        rows.sort_by_key(|(digest, _)| *digest);
        rows.dedup_by_key(|(digest, _)| *digest);
    }
    Ok(rows)
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

/// The entries of a page as RocksDB reads it (its runs merged): each digest's value, deleted
/// ones left out, in digest order.
pub(crate) fn page_entries(page: &[u8]) -> Result<Vec<(u128, Vec<u8>)>, StateError> {
    let mut rows = Vec::new();
    for row in run_rows(page) {
        if let (digest, Some(value)) = row? {
            rows.push((digest, value.to_vec()));
        }
    }
    Ok(rows)
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
            self.flush(batch, family);
        }
        Ok(())
    }

    /// Writes the buffered rows into `batch`, one run per page.
    pub(crate) fn flush(&mut self, batch: &mut WriteBatch, family: &ColumnFamily) {
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
                batch.merge_cf(family, span(row.page), &run);
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

/// Puts `rows` (digests and values, in digest order) as the whole of `page`: the runs merged
/// before it are replaced.
pub(crate) fn rewrite_page(
    batch: &mut WriteBatch,
    family: &ColumnFamily,
    page: &[u8],
    rows: impl IntoIterator<Item = (u128, impl AsRef<[u8]>)>,
) {
    let mut run = Vec::new();
    for (digest, value) in rows {
        push_row(&mut run, digest, Some(value.as_ref()));
    }
    if run.is_empty() {
        batch.delete_cf(family, page);
    } else {
        batch.put_cf(family, page, run);
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
    fn the_newest_run_naming_a_digest_decides_and_tombstones_go_with_the_whole_history() {
        let older = run(&[(1, Some(b"a")), (5, Some(b"b")), (9, Some(b"c"))]);
        let newer = run(&[(5, None), (7, Some(b"")), (9, Some(b"d"))]);
        let runs = [older.as_slice(), newer.as_slice()];
        let rows = merge_rows(&runs).expect("merge");
        assert_eq!(
            rows,
            vec![
                (1, Some(&b"a"[..])),
                (5, None),
                (7, Some(&b""[..])),
                (9, Some(&b"d"[..]))
            ]
        );
        assert_eq!(find_in_run(&newer, 5).expect("find"), Some(None));
        assert_eq!(find_in_run(&newer, 7).expect("find"), Some(Some(&b""[..])));
        assert_eq!(find_in_run(&newer, 6).expect("find"), None);
        assert!(run_rows(&older[..older.len() - 1]).any(|row| row.is_err()));
    }

    #[test]
    fn a_store_merges_the_runs_of_a_page_and_a_put_replaces_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let base = Options::default();
        let family = rocksdb::ColumnFamilyDescriptor::new("pages", family_options(&base));
        let db = rocksdb::DB::open_cf_descriptors(&options, dir.path(), [family]).expect("open");
        let pages = db.cf_handle("pages").expect("family");
        let mut batch = WriteBatch::default();
        batch.merge_cf(pages, b"p", run(&[(1, Some(b"a")), (5, Some(b"b"))]));
        batch.merge_cf(pages, b"p", run(&[(5, None), (7, Some(b"c"))]));
        db.write(batch).expect("write");
        let read = |db: &rocksdb::DB| {
            page_entries(&db.get_cf(pages, b"p").expect("read").expect("a page")).expect("rows")
        };
        assert_eq!(read(&db), vec![(1, b"a".to_vec()), (7, b"c".to_vec())]);
        db.flush_cf(pages).expect("flush");
        db.merge_cf(pages, b"p", run(&[(1, None)])).expect("merge");
        db.compact_range_cf(pages, None::<&[u8]>, None::<&[u8]>);
        assert_eq!(read(&db), vec![(7, b"c".to_vec())]);
        let mut batch = WriteBatch::default();
        rewrite_page(&mut batch, pages, b"p", [(3u128, b"z")]);
        db.write(batch).expect("write");
        assert_eq!(read(&db), vec![(3, b"z".to_vec())]);
    }

    #[test]
    fn a_page_is_the_two_bytes_a_shard_range_puts_after_its_place() {
        for shard in [0u16, 1, 513, 1023] {
            let digest = (u128::from(shard) << (128 - SHARD_BITS)) | 0xabcdef;
            let (start, _) = crate::codec::member_shard_range(b"place", shard);
            let page = [&b"place"[..], &page_bytes(digest)].concat();
            assert_eq!(page, start);
            assert_eq!(nsm_core::engine::member_shard_of(digest), shard);
        }
    }
}
