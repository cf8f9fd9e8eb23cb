//! The library's own layout in the local store, and the bookkeeping of a partition's line.
//!
//! A partition is stored as a head (the last checkpoint's frame, the meta, the sequence of each
//! shard's snapshot, and the frames it has in the changelog), one snapshot blob per shard
//! (replaced when the shard is snapshotted again) and one delta blob per checkpoint after the
//! oldest snapshot. The store gets them all from one checkpoint in one atomic write, so the head
//! always describes exactly the blobs beside it.
//!
//! The head also decides what is obsolete: a delta older than every shard's snapshot, and a
//! changelog frame that holds neither a current snapshot, nor a needed delta, nor the meta.
//!
//! And it paces snapshots by bytes: each checkpoint earns credit equal to its delta's bytes,
//! and the shards due are the oldest snapshots, oldest first, while the credit covers the size
//! of the next one's last snapshot. The changelog then carries about as many snapshot bytes as
//! delta bytes, whatever the shard count, and a restore reads about twice the state.

use crate::frame::FORMAT;
use crate::ids::{Epoch, FrameId, Sequence, ShardId};
use crate::wire::{put_bytes, put_varint, DecodeError, Reader};

/// A frame of the partition that is, or may still be, in the changelog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoggedFrame {
    pub(crate) id: FrameId,
    /// Chunk records to tombstone with it (those of an unfinished frame that were seen).
    pub(crate) chunks: u32,
    pub(crate) snapshot_shards: Vec<ShardId>,
    /// Not on the partition's line (unfinished, damaged, or another owner's): kept only to be
    /// tombstoned.
    pub(crate) retired: bool,
}

/// Where a partition stands: what a store's head holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionHead {
    pub(crate) shards: u32,
    pub(crate) head: FrameId,
    pub(crate) meta: Vec<u8>,
    /// The checkpoint whose frame holds each shard's latest snapshot; the empty sequence for a
    /// shard never snapshotted, which starts empty.
    pub(crate) snapshot_sequences: Vec<Sequence>,
    /// The bytes of each shard's latest snapshot section; zero for a shard never snapshotted,
    /// whose size is not known, so it is due at once.
    pub(crate) snapshot_bytes: Vec<u64>,
    /// Delta bytes not yet spent on snapshots.
    pub(crate) credit: u64,
    pub(crate) logged_frames: Vec<LoggedFrame>,
}

impl PartitionHead {
    pub(crate) fn empty(shards: u32) -> Self {
        PartitionHead {
            shards,
            head: FrameId::EMPTY,
            meta: Vec::new(),
            snapshot_sequences: vec![Sequence::EMPTY; shards as usize],
            snapshot_bytes: vec![0; shards as usize],
            credit: 0,
            logged_frames: Vec::new(),
        }
    }

    /// The highest epoch of a frame this head knows of.
    pub(crate) fn highest_epoch(&self) -> Epoch {
        self.logged_frames
            .iter()
            .map(|frame| frame.id.epoch)
            .chain([self.head.epoch])
            .max()
            .unwrap_or_default()
    }

    /// The oldest snapshot: deltas up to it are needed by no shard.
    pub(crate) fn oldest_snapshot(&self) -> Sequence {
        self.snapshot_sequences
            .iter()
            .copied()
            .min()
            .unwrap_or(Sequence::EMPTY)
    }

    /// The shards the next checkpoint should snapshot: the oldest snapshots first (the lowest
    /// shard first among equals), while the credit covers the size of the next one's last
    /// snapshot; several, or none. Snapshotting the oldest moves the oldest snapshot on, so what
    /// a restore reads stays bounded, and after an owner change replaces the previous owners'
    /// snapshots first. One sort of the shards, so a thousand shards cost microseconds.
    pub(crate) fn snapshots_due(&self) -> Vec<ShardId> {
        let mut order: Vec<(Sequence, u32)> = self
            .snapshot_sequences
            .iter()
            .enumerate()
            .map(|(index, sequence)| (*sequence, index as u32))
            .collect();
        order.sort_unstable();
        let mut credit = self.credit;
        let mut due = Vec::new();
        for (_, shard) in order {
            let cost = self.snapshot_bytes[shard as usize];
            if cost > credit {
                break;
            }
            credit -= cost;
            due.push(ShardId(shard));
        }
        due
    }

    /// Books a checkpoint of `delta_bytes` that snapshotted `snapshots` (shard, section bytes)
    /// at `sequence`: each shard's snapshot moves on, the delta earns credit and the snapshots
    /// spend it. Credit never goes below zero (a caller snapshotting more than due owes
    /// nothing) nor above the bytes of every shard's snapshot (a large delta pays for one round
    /// of snapshots, not for rounds to come).
    pub(crate) fn book_checkpoint(
        &mut self,
        sequence: Sequence,
        delta_bytes: u64,
        snapshots: &[(ShardId, u64)],
    ) {
        let mut spent = 0u64;
        for (shard, bytes) in snapshots {
            self.snapshot_sequences[shard.index()] = sequence;
            self.snapshot_bytes[shard.index()] = *bytes;
            spent = spent.saturating_add(*bytes);
        }
        let every_shard = self
            .snapshot_bytes
            .iter()
            .fold(0u64, |sum, bytes| sum.saturating_add(*bytes));
        self.credit = self
            .credit
            .saturating_add(delta_bytes)
            .saturating_sub(spent)
            .min(every_shard);
    }

    /// Whether the changelog no longer needs `frame`, `oldest` being this head's
    /// [`PartitionHead::oldest_snapshot`]: it is not the head (whose meta is the partition's),
    /// holds no current snapshot, and every shard is snapshotted at or after it.
    pub(crate) fn is_obsolete(&self, frame: &LoggedFrame, oldest: Sequence) -> bool {
        if frame.retired {
            return true;
        }
        frame.id != self.head
            && frame.id.sequence <= oldest
            && frame
                .snapshot_shards
                .iter()
                .all(|shard| self.snapshot_sequences[shard.index()] != frame.id.sequence)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.meta.len() + 4 * self.shards as usize);
        out.push(FORMAT);
        put_varint(&mut out, u64::from(self.shards));
        out.extend_from_slice(&self.head.epoch.0.to_be_bytes());
        put_varint(&mut out, self.head.sequence.0);
        put_bytes(&mut out, &self.meta);
        for sequence in &self.snapshot_sequences {
            put_varint(&mut out, sequence.0);
        }
        for bytes in &self.snapshot_bytes {
            put_varint(&mut out, *bytes);
        }
        put_varint(&mut out, self.credit);
        put_varint(&mut out, self.logged_frames.len() as u64);
        for frame in &self.logged_frames {
            out.extend_from_slice(&frame.id.epoch.0.to_be_bytes());
            put_varint(&mut out, frame.id.sequence.0);
            put_varint(&mut out, u64::from(frame.chunks));
            out.push(u8::from(frame.retired));
            put_varint(&mut out, frame.snapshot_shards.len() as u64);
            for shard in &frame.snapshot_shards {
                put_varint(&mut out, u64::from(shard.0));
            }
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        reader.format(FORMAT)?;
        let shards = reader.varint()?;
        let shards = u32::try_from(shards).map_err(|_| DecodeError::OutOfRange {
            what: "shard count",
            found: shards,
        })?;
        let shard = |reader: &mut Reader<'_>| -> Result<ShardId, DecodeError> {
            let shard = reader.varint()?;
            if shard >= u64::from(shards) {
                return Err(DecodeError::ShardOutOfRange { shard, shards });
            }
            Ok(ShardId(shard as u32))
        };
        let head = FrameId {
            epoch: Epoch(reader.u64_be()?),
            sequence: Sequence(reader.varint()?),
        };
        let meta = reader.bytes()?.to_vec();
        if u64::from(shards) > bytes.len() as u64 {
            return Err(DecodeError::OutOfRange {
                what: "shard count",
                found: u64::from(shards),
            });
        }
        let snapshot_sequences = (0..shards)
            .map(|_| reader.varint().map(Sequence))
            .collect::<Result<_, _>>()?;
        let snapshot_bytes = (0..shards)
            .map(|_| reader.varint())
            .collect::<Result<_, _>>()?;
        let credit = reader.varint()?;
        let frame_count = reader.count("logged frame count")?;
        let mut logged_frames = Vec::new();
        for _ in 0..frame_count {
            let id = FrameId {
                epoch: Epoch(reader.u64_be()?),
                sequence: Sequence(reader.varint()?),
            };
            let chunks = reader.varint()?;
            let chunks = u32::try_from(chunks).map_err(|_| DecodeError::OutOfRange {
                what: "chunk count",
                found: chunks,
            })?;
            let retired = match reader.u8()? {
                0 => false,
                1 => true,
                other => {
                    return Err(DecodeError::OutOfRange {
                        what: "retired flag",
                        found: u64::from(other),
                    })
                }
            };
            let snapshot_count = reader.count("snapshot count")?;
            let snapshot_shards = (0..snapshot_count)
                .map(|_| shard(&mut reader))
                .collect::<Result<_, _>>()?;
            logged_frames.push(LoggedFrame {
                id,
                chunks,
                snapshot_shards,
                retired,
            });
        }
        reader.finish()?;
        Ok(PartitionHead {
            shards,
            head,
            meta,
            snapshot_sequences,
            snapshot_bytes,
            credit,
            logged_frames,
        })
    }
}

/// A shard's snapshot blob: the checkpoint it was taken at, then its rows section.
pub(crate) fn encode_snapshot_blob(sequence: Sequence, rows_section: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows_section.len() + 12);
    out.push(FORMAT);
    put_varint(&mut out, sequence.0);
    out.extend_from_slice(rows_section);
    out
}

/// The checkpoint a snapshot blob was taken at, and its rows section.
pub(crate) fn decode_snapshot_blob(blob: &[u8]) -> Result<(Sequence, Reader<'_>), DecodeError> {
    let mut reader = Reader::new(blob);
    reader.format(FORMAT)?;
    let sequence = Sequence(reader.varint()?);
    Ok((sequence, reader))
}

/// A checkpoint's delta blob: its delta section as the frame holds it.
pub(crate) fn encode_delta_blob(delta_section: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(delta_section.len() + 1);
    out.push(FORMAT);
    out.extend_from_slice(delta_section);
    out
}

pub(crate) fn decode_delta_blob(blob: &[u8]) -> Result<&[u8], DecodeError> {
    let mut reader = Reader::new(blob);
    reader.format(FORMAT)?;
    reader.take(blob.len() as u64 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(epoch: u64, sequence: u64, snapshot_shards: Vec<u32>) -> LoggedFrame {
        LoggedFrame {
            id: FrameId {
                epoch: Epoch(epoch),
                sequence: Sequence(sequence),
            },
            chunks: 2,
            snapshot_shards: snapshot_shards.into_iter().map(ShardId).collect(),
            retired: false,
        }
    }

    #[test]
    fn a_head_round_trips() {
        let mut head = PartitionHead::empty(3);
        head.head = FrameId {
            epoch: Epoch(4),
            sequence: Sequence(9),
        };
        head.meta = b"offset 99".to_vec();
        head.snapshot_sequences = vec![Sequence(7), Sequence(8), Sequence(9)];
        head.snapshot_bytes = vec![2, 300, 70_000];
        head.credit = 1234;
        head.logged_frames = vec![frame(4, 7, vec![0]), frame(4, 8, vec![1])];
        head.logged_frames[1].retired = true;
        assert_eq!(PartitionHead::decode(&head.encode()), Ok(head));
    }

    #[test]
    fn the_due_shards_are_the_oldest_snapshots_the_credit_covers() {
        let mut head = PartitionHead::empty(3);
        // Sizes unknown: every shard is due at once, oldest first.
        assert_eq!(
            head.snapshots_due(),
            vec![ShardId(0), ShardId(1), ShardId(2)]
        );
        head.book_checkpoint(Sequence(1), 10, &[(ShardId(0), 40), (ShardId(1), 30)]);
        assert_eq!(head.credit, 0);
        // Shard 2's size is still unknown, so it is due however little the credit.
        assert_eq!(head.snapshots_due(), vec![ShardId(2)]);
        head.book_checkpoint(Sequence(2), 25, &[(ShardId(2), 20)]);
        assert_eq!(head.credit, 5);
        // Shard 0 (40 bytes) is the oldest, and 5 bytes of credit do not cover it.
        assert!(head.snapshots_due().is_empty());
        head.book_checkpoint(Sequence(3), 35, &[]);
        assert_eq!(head.snapshots_due(), vec![ShardId(0)]);
        head.book_checkpoint(Sequence(4), 30, &[]);
        // 70 bytes: shards 0 and 1 (70), not shard 2 as well (90).
        assert_eq!(head.snapshots_due(), vec![ShardId(0), ShardId(1)]);
        // A delta larger than the state pays for one round, not more.
        head.book_checkpoint(Sequence(5), 10_000, &[]);
        assert_eq!(head.credit, 90);
        assert_eq!(head.snapshots_due().len(), 3);
        // A caller snapshotting more than due owes nothing.
        head.book_checkpoint(Sequence(6), 0, &[(ShardId(0), 1_000)]);
        assert_eq!(head.credit, 0);
    }

    #[test]
    fn a_thousand_shards_are_due_in_order_of_their_snapshots() {
        let mut head = PartitionHead::empty(1025);
        let every: Vec<(ShardId, u64)> = (0..1025).map(|shard| (ShardId(shard), 100)).collect();
        head.book_checkpoint(Sequence(1), 0, &every);
        for sequence in 2..=2000u64 {
            let due = head.snapshots_due();
            let snapshots: Vec<(ShardId, u64)> = due.iter().map(|shard| (*shard, 100)).collect();
            head.book_checkpoint(Sequence(sequence), 250, &snapshots);
        }
        // 250 bytes a checkpoint, 100 a snapshot: two or three shards each, round and round.
        let newest = head.snapshot_sequences.iter().max().copied();
        let oldest = head.oldest_snapshot();
        assert_eq!(newest, Some(Sequence(2000)));
        assert!(
            oldest.0 >= 2000 - 1025 * 100 / 250 - 2,
            "the oldest snapshot is {oldest:?}"
        );
    }

    #[test]
    fn obsolete_frames_hold_nothing_needed() {
        let mut head = PartitionHead::empty(3);
        head.head = FrameId {
            epoch: Epoch(1),
            sequence: Sequence(5),
        };
        head.snapshot_sequences = vec![Sequence(4), Sequence(2), Sequence(5)];
        let oldest = head.oldest_snapshot();
        // Holds shard 1's current snapshot.
        assert!(!head.is_obsolete(&frame(1, 2, vec![1]), oldest));
        // Older than every snapshot, its snapshot replaced since.
        assert!(head.is_obsolete(&frame(1, 1, vec![0]), oldest));
        // Its deltas are still needed by shard 1.
        assert!(!head.is_obsolete(&frame(1, 3, vec![]), oldest));
        // The head holds the meta.
        assert!(!head.is_obsolete(&frame(1, 5, vec![2]), oldest));
    }
}
