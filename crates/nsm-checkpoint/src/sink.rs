//! Where a streaming restore puts what it applies: the [`RestoreSink`] port, which the caller's
//! store implements (nsm-state writes RocksDB batches), and the in-memory sink the library's own
//! whole restores use.
//!
//! A frame reaches the sink whole and checked (end marker, every chunk, checksum, and every row
//! and change decoded once before the first call), in one order: its dropped ranges, its
//! changes, the snapshots replacing their shards, then its meta. So applying a frame is absolute:
//! a frame applied again on the state it was applied to ends the same.

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error;

use crate::ids::{FrameId, ShardId};
use crate::restore::ShardRows;
use crate::wire::Reader;

/// Takes the frames a restore applies, in line order.
pub trait RestoreSink {
    type Error: Error + Send + Sync + 'static;

    /// Removes every key from `start` (included) to `end` (excluded; `None`: to the last key),
    /// in every shard. An empty `start` with no `end` clears the partition: a second pass that
    /// cannot build on the first begins so.
    fn drop_range(&mut self, start: &[u8], end: Option<&[u8]>) -> Result<(), Self::Error>;

    /// Sets `key` of `shard` to `value`.
    fn put(&mut self, shard: ShardId, key: &[u8], value: &[u8]) -> Result<(), Self::Error>;

    /// Removes `key` of `shard`.
    fn delete(&mut self, shard: ShardId, key: &[u8]) -> Result<(), Self::Error>;

    /// Makes `shard` exactly `rows`: every row of the shard the sink holds goes, wherever it is
    /// (a restore may have applied a frame the line later leaves out), then the rows are put.
    fn replace_shard(&mut self, shard: ShardId, rows: SnapshotRows<'_>) -> Result<(), Self::Error>;

    /// The meta of `frame`, now applied whole: the last call for each frame, so a sink writing
    /// in batches may end one here, and never writes a meta ahead of its rows. After a clear
    /// (see [`RestoreSink::drop_range`]) it is [`FrameId::EMPTY`]'s, empty: the partition is at
    /// the empty state until a frame is applied.
    fn meta(&mut self, frame: FrameId, meta: &[u8]) -> Result<(), Self::Error>;
}

/// The rows of one shard's snapshot, in the frame's order. The frame was checked whole before
/// it was applied, so they decode; should they not, the iteration ends.
#[derive(Debug, Clone)]
pub struct SnapshotRows<'a> {
    reader: Reader<'a>,
    left: u64,
}

impl<'a> SnapshotRows<'a> {
    pub(crate) fn new(count: u64, bytes: &'a [u8]) -> Self {
        SnapshotRows {
            reader: Reader::new(bytes),
            left: count,
        }
    }

    /// The rows left.
    pub fn remaining(&self) -> u64 {
        self.left
    }
}

impl<'a> Iterator for SnapshotRows<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let row = self
            .reader
            .bytes()
            .and_then(|key| Ok((key, self.reader.bytes()?)));
        match row {
            Ok(row) => {
                self.left -= 1;
                Some(row)
            }
            Err(_) => {
                self.left = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, usize::try_from(self.left).ok())
    }
}

/// The rows of every shard in memory: the sink of [`restore_from_changelog`](crate::restore_from_changelog).
#[derive(Debug, Clone, Default)]
pub(crate) struct MemorySink {
    pub(crate) shards: Vec<ShardRows>,
}

impl MemorySink {
    pub(crate) fn new(shards: u32) -> Self {
        MemorySink {
            shards: vec![HashMap::new(); shards as usize],
        }
    }

    fn shard(&mut self, shard: ShardId) -> &mut ShardRows {
        // Shards come from checked frames of the configured count; grow rather than panic.
        if self.shards.len() <= shard.index() {
            self.shards.resize_with(shard.index() + 1, HashMap::new);
        }
        &mut self.shards[shard.index()]
    }
}

impl RestoreSink for MemorySink {
    type Error = Infallible;

    fn drop_range(&mut self, start: &[u8], end: Option<&[u8]>) -> Result<(), Infallible> {
        for rows in &mut self.shards {
            rows.retain(|key, _| {
                key.as_slice() < start || end.is_some_and(|end| key.as_slice() >= end)
            });
        }
        Ok(())
    }

    fn put(&mut self, shard: ShardId, key: &[u8], value: &[u8]) -> Result<(), Infallible> {
        self.shard(shard).insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, shard: ShardId, key: &[u8]) -> Result<(), Infallible> {
        self.shard(shard).remove(key);
        Ok(())
    }

    fn replace_shard(&mut self, shard: ShardId, rows: SnapshotRows<'_>) -> Result<(), Infallible> {
        let target = self.shard(shard);
        target.clear();
        target.reserve(usize::try_from(rows.remaining()).unwrap_or(0).min(1 << 20));
        for (key, value) in rows {
            target.insert(key.to_vec(), value.to_vec());
        }
        Ok(())
    }

    fn meta(&mut self, _frame: FrameId, _meta: &[u8]) -> Result<(), Infallible> {
        Ok(())
    }
}
