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
    pub(crate) logged_frames: Vec<LoggedFrame>,
}

impl PartitionHead {
    pub(crate) fn empty(shards: u32) -> Self {
        PartitionHead {
            shards,
            head: FrameId::EMPTY,
            meta: Vec::new(),
            snapshot_sequences: vec![Sequence::EMPTY; shards as usize],
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

    /// The shard whose snapshot is the oldest (the lowest such shard): snapshotting it moves the
    /// oldest snapshot on, so what a restore reads stays bounded, and after an owner change it
    /// replaces the previous owners' snapshots first.
    pub(crate) fn snapshot_due(&self) -> ShardId {
        let (index, _) = self
            .snapshot_sequences
            .iter()
            .enumerate()
            .min_by_key(|(index, sequence)| (**sequence, *index))
            .unwrap_or((0, &Sequence::EMPTY));
        ShardId(index as u32)
    }

    /// Whether the changelog no longer needs `frame`: it is not the head (whose meta is the
    /// partition's), holds no current snapshot, and every shard is snapshotted at or after it.
    pub(crate) fn is_obsolete(&self, frame: &LoggedFrame) -> bool {
        if frame.retired {
            return true;
        }
        frame.id != self.head
            && frame.id.sequence <= self.oldest_snapshot()
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
        head.logged_frames = vec![frame(4, 7, vec![0]), frame(4, 8, vec![1])];
        head.logged_frames[1].retired = true;
        assert_eq!(PartitionHead::decode(&head.encode()), Ok(head));
    }

    #[test]
    fn the_due_shard_is_the_oldest_snapshot_and_obsolete_frames_hold_nothing_needed() {
        let mut head = PartitionHead::empty(3);
        assert_eq!(head.snapshot_due(), ShardId(0));
        head.head = FrameId {
            epoch: Epoch(1),
            sequence: Sequence(5),
        };
        head.snapshot_sequences = vec![Sequence(4), Sequence(2), Sequence(5)];
        assert_eq!(head.snapshot_due(), ShardId(1));
        // Holds shard 1's current snapshot.
        assert!(!head.is_obsolete(&frame(1, 2, vec![1])));
        // Older than every snapshot, its snapshot replaced since.
        assert!(head.is_obsolete(&frame(1, 1, vec![0])));
        // Its deltas are still needed by shard 1.
        assert!(!head.is_obsolete(&frame(1, 3, vec![])));
        // The head holds the meta.
        assert!(!head.is_obsolete(&frame(1, 5, vec![2])));
    }
}
