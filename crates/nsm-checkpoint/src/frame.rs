//! The changelog frame: one checkpoint of one partition as changelog records.
//!
//! A frame is a header and a body, cut into chunks of at most the configured size, each sent
//! as one record, then an end marker record holding the chunk count, the frame's length and
//! its XXH3 checksum. A reader takes a frame only when its end marker and every chunk are there
//! and the checksum holds, so a frame cut short by a crash, or with a chunk lost or damaged, is
//! never applied. Every key names the frame's epoch and sequence, so no record of a frame ever
//! replaces a record of another in a compacted topic: only tombstones remove frames.

use std::ops::Range;

use xxhash_rust::xxh3::xxh3_64;

use crate::body::{put_rows, Checkpoint, Rows};
use crate::ids::{Epoch, FrameId, PartitionId, Sequence, ShardId};
use crate::wire::{put_bytes, put_varint, DecodeError, Reader};

/// The layout version written first in frames, record values and local blobs.
pub(crate) const FORMAT: u8 = 1;
/// The first byte of every record key this library writes: not a letter, so never the first
/// byte of a key of the one-record-per-key changelog that came before.
pub const KEY_MAGIC: u8 = 0xf7;

const KIND_CHUNK: u8 = b'C';
const KIND_END: u8 = b'E';
const END_PART: u32 = u32::MAX;

/// Which record of a frame a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordPart {
    Chunk(u32),
    End,
}

/// A changelog record key of this library, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordKey {
    pub partition_name: Vec<u8>,
    pub frame: FrameId,
    pub part: RecordPart,
}

impl RecordKey {
    /// `[magic][format][partition name, length-prefixed][epoch u64][sequence u64][part u32]`,
    /// integers big-endian, the part `u32::MAX` for the end marker.
    pub fn encode(partition: &PartitionId, frame: FrameId, part: RecordPart) -> Vec<u8> {
        let mut key = Vec::with_capacity(partition.name.len() + 24);
        key.push(KEY_MAGIC);
        key.push(FORMAT);
        put_bytes(&mut key, &partition.name);
        key.extend_from_slice(&frame.epoch.0.to_be_bytes());
        key.extend_from_slice(&frame.sequence.0.to_be_bytes());
        let part = match part {
            RecordPart::Chunk(index) => index,
            RecordPart::End => END_PART,
        };
        key.extend_from_slice(&part.to_be_bytes());
        key
    }

    /// The key parsed, or `None` for a key this library did not write (another format's).
    pub fn parse(key: &[u8]) -> Result<Option<RecordKey>, DecodeError> {
        if key.first() != Some(&KEY_MAGIC) {
            return Ok(None);
        }
        let mut reader = Reader::new(&key[1..]);
        reader.format(FORMAT)?;
        let partition_name = reader.bytes()?.to_vec();
        let epoch = Epoch(reader.u64_be()?);
        let sequence = Sequence(reader.u64_be()?);
        let part = match reader.u32_be()? {
            END_PART => RecordPart::End,
            index => RecordPart::Chunk(index),
        };
        reader.finish()?;
        Ok(Some(RecordKey {
            partition_name,
            frame: FrameId { epoch, sequence },
            part,
        }))
    }
}

/// What an end marker says of its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndMarker {
    pub(crate) chunks: u32,
    pub(crate) frame_len: u64,
    pub(crate) checksum: u64,
}

/// A record value of a frame, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecordValue<'a> {
    Chunk(&'a [u8]),
    End(EndMarker),
}

impl<'a> RecordValue<'a> {
    pub(crate) fn parse(value: &'a [u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(value);
        reader.format(FORMAT)?;
        match reader.u8()? {
            KIND_CHUNK => Ok(RecordValue::Chunk(reader.take(value.len() as u64 - 2)?)),
            KIND_END => {
                let marker = EndMarker {
                    chunks: reader.u32_be()?,
                    frame_len: reader.u64_be()?,
                    checksum: reader.u64_be()?,
                };
                reader.finish()?;
                Ok(RecordValue::End(marker))
            }
            kind => Err(DecodeError::UnknownRecordKind(kind)),
        }
    }
}

/// What a frame's header says: whose checkpoint it is, of which owner, after which frame, and
/// which shards it snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub(crate) partition_name: Vec<u8>,
    pub(crate) id: FrameId,
    /// The epoch of the frame this one follows (its sequence is one less): a frame names its
    /// parent, so a restore follows one owner's line and never mixes two.
    pub(crate) parent_epoch: Epoch,
    pub(crate) shards: u32,
    /// For a base frame (one of the frames a seed starts a line with, sequences 1 to this
    /// count, each snapshotting its own shards), how many base frames the line starts with;
    /// zero for every other frame. A line whose base frames are not all there is a seed cut
    /// short, never a line: each base frame names the count, so a restore tells a seed cut
    /// short from one whole without knowing what was meant to be sent.
    pub(crate) base_frames: u64,
    pub(crate) snapshot_shards: Vec<ShardId>,
}

impl FrameHeader {
    pub(crate) fn parent(&self) -> FrameId {
        FrameId {
            epoch: self.parent_epoch,
            sequence: Sequence(self.id.sequence.0.saturating_sub(1)),
        }
    }

    /// Whether this is a base frame of a seed.
    pub(crate) fn is_base(&self) -> bool {
        self.base_frames > 0
    }

    /// Whether this base frame is not the seed's last: a line ending here is a seed cut short.
    pub(crate) fn is_seed_cut_short(&self) -> bool {
        self.id.sequence.0 < self.base_frames
    }
}

/// Encodes `checkpoint` as the frame `header` names: the header, then the meta, the snapshot
/// sections in the header's order, and the delta section (`delta`, the checkpoint's).
pub(crate) fn encode_frame(header: &FrameHeader, checkpoint: &Checkpoint, delta: &[u8]) -> Vec<u8> {
    let snapshot_bytes: usize = checkpoint
        .snapshots
        .values()
        .map(|rows| rows.bytes.len() + 20)
        .sum();
    let mut bytes = Vec::with_capacity(
        64 + header.partition_name.len() + checkpoint.meta.len() + snapshot_bytes + delta.len(),
    );
    bytes.push(FORMAT);
    put_bytes(&mut bytes, &header.partition_name);
    bytes.extend_from_slice(&header.id.epoch.0.to_be_bytes());
    bytes.extend_from_slice(&header.id.sequence.0.to_be_bytes());
    bytes.extend_from_slice(&header.parent_epoch.0.to_be_bytes());
    put_varint(&mut bytes, u64::from(header.shards));
    put_varint(&mut bytes, header.base_frames);
    put_varint(&mut bytes, header.snapshot_shards.len() as u64);
    for shard in &header.snapshot_shards {
        put_varint(&mut bytes, u64::from(shard.0));
    }
    put_bytes(&mut bytes, &checkpoint.meta);
    for shard in &header.snapshot_shards {
        if let Some(rows) = checkpoint.snapshots.get(shard) {
            put_rows(&mut bytes, rows);
        }
    }
    put_bytes(&mut bytes, delta);
    bytes
}

/// A frame's bytes read: its header, and its body's sections as views into the bytes.
#[derive(Debug, Clone)]
pub(crate) struct FrameView<'a> {
    pub(crate) header: FrameHeader,
    pub(crate) meta: &'a [u8],
    pub(crate) snapshots: Vec<(ShardId, Rows<'a>)>,
    pub(crate) delta: &'a [u8],
}

pub(crate) fn parse_frame(bytes: &[u8]) -> Result<FrameView<'_>, DecodeError> {
    let mut reader = Reader::new(bytes);
    reader.format(FORMAT)?;
    let partition_name = reader.bytes()?.to_vec();
    let epoch = Epoch(reader.u64_be()?);
    let sequence = Sequence(reader.u64_be()?);
    let parent_epoch = Epoch(reader.u64_be()?);
    let shards = reader.varint()?;
    let shards = u32::try_from(shards).map_err(|_| DecodeError::OutOfRange {
        what: "shard count",
        found: shards,
    })?;
    let base_frames = reader.varint()?;
    // Each base frame snapshots at least one shard of its own, so a seed has at most as many
    // frames as shards, and a base frame is one of them: anything else was not written by this
    // library, and a frame whose count is wrong must not decide whether a line is whole.
    if base_frames > u64::from(shards) || (base_frames > 0 && sequence.0 > base_frames) {
        return Err(DecodeError::OutOfRange {
            what: "base frame count",
            found: base_frames,
        });
    }
    let snapshot_count = reader.count("snapshot count")?;
    let mut snapshot_shards = Vec::new();
    for _ in 0..snapshot_count {
        let shard = reader.varint()?;
        if shard >= u64::from(shards) {
            return Err(DecodeError::ShardOutOfRange { shard, shards });
        }
        snapshot_shards.push(ShardId(shard as u32));
    }
    let meta = reader.bytes()?;
    let mut snapshots = Vec::with_capacity(snapshot_shards.len());
    for shard in &snapshot_shards {
        snapshots.push((*shard, Rows::read(&mut reader)?));
    }
    let delta = reader.bytes()?;
    reader.finish()?;
    Ok(FrameView {
        header: FrameHeader {
            partition_name,
            id: FrameId { epoch, sequence },
            parent_epoch,
            shards,
            base_frames,
            snapshot_shards,
        },
        meta,
        snapshots,
        delta,
    })
}

/// The byte ranges of a frame's chunks.
pub(crate) fn chunk_ranges(frame_len: usize, max_chunk_bytes: usize) -> Vec<Range<usize>> {
    (0..frame_len.div_ceil(max_chunk_bytes))
        .map(|index| index * max_chunk_bytes..((index + 1) * max_chunk_bytes).min(frame_len))
        .collect()
}

/// The value of chunk record `chunk`.
pub(crate) fn chunk_value(chunk: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(chunk.len() + 2);
    value.push(FORMAT);
    value.push(KIND_CHUNK);
    value.extend_from_slice(chunk);
    value
}

/// The value of the end marker of `frame` cut into `chunks` chunks.
pub(crate) fn end_value(frame: &[u8], chunks: u32) -> Vec<u8> {
    let mut value = Vec::with_capacity(22);
    value.push(FORMAT);
    value.push(KIND_END);
    value.extend_from_slice(&chunks.to_be_bytes());
    value.extend_from_slice(&(frame.len() as u64).to_be_bytes());
    value.extend_from_slice(&xxh3_64(frame).to_be_bytes());
    value
}

/// Why the chunks of a frame do not make the frame its end marker describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameCheckError {
    #[error("its chunks hold {found} bytes, its end marker says {expected}")]
    Length { found: u64, expected: u64 },
    #[error("its checksum does not match its end marker's")]
    Checksum,
}

/// Checks assembled frame bytes against their end marker.
pub(crate) fn check_frame(bytes: &[u8], end: &EndMarker) -> Result<(), FrameCheckError> {
    if bytes.len() as u64 != end.frame_len {
        return Err(FrameCheckError::Length {
            found: bytes.len() as u64,
            expected: end.frame_len,
        });
    }
    if xxh3_64(bytes) != end.checksum {
        return Err(FrameCheckError::Checksum);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(snapshot_shards: Vec<ShardId>) -> FrameHeader {
        FrameHeader {
            partition_name: b"events".to_vec(),
            id: FrameId {
                epoch: Epoch(7),
                sequence: Sequence(3),
            },
            parent_epoch: Epoch(5),
            shards: 4,
            base_frames: 0,
            snapshot_shards,
        }
    }

    #[test]
    fn record_keys_round_trip_and_foreign_keys_are_not_ours() {
        let partition = PartitionId::new(2, "events");
        let frame = FrameId {
            epoch: Epoch(9),
            sequence: Sequence(41),
        };
        for part in [RecordPart::Chunk(0), RecordPart::Chunk(17), RecordPart::End] {
            let key = RecordKey::encode(&partition, frame, part);
            assert_eq!(
                RecordKey::parse(&key),
                Ok(Some(RecordKey {
                    partition_name: b"events".to_vec(),
                    frame,
                    part
                }))
            );
        }
        assert_eq!(RecordKey::parse(b"wsome-old-rocksdb-key"), Ok(None));
        assert_eq!(RecordKey::parse(b""), Ok(None));
        assert!(RecordKey::parse(&[KEY_MAGIC, FORMAT, 200]).is_err());
    }

    #[test]
    fn a_frame_reads_back_with_its_header_meta_snapshots_and_delta() {
        let mut checkpoint = Checkpoint::new(PartitionId::new(2, "events"), "offset 12");
        checkpoint.put(ShardId(0), b"k", b"v");
        checkpoint.snapshot_row(ShardId(3), b"s", b"row");
        checkpoint.snapshot_shard(ShardId(1));
        let header = header(checkpoint.snapshot_shards());
        let frame = encode_frame(&header, &checkpoint, &checkpoint.encode_delta());
        let view = parse_frame(&frame).expect("parses");
        assert_eq!(view.header, header);
        assert_eq!(view.header.parent().sequence, Sequence(2));
        assert_eq!(view.meta, b"offset 12");
        assert_eq!(view.snapshots.len(), 2);
        assert_eq!(view.snapshots[0].0, ShardId(1));
        assert_eq!(view.snapshots[0].1.count, 0);
        let mut rows = Vec::new();
        view.snapshots[1]
            .1
            .for_each(|key, value| rows.push((key.to_vec(), value.to_vec())))
            .expect("rows");
        assert_eq!(rows, vec![(b"s".to_vec(), b"row".to_vec())]);
        assert_eq!(view.delta, checkpoint.encode_delta().as_slice());
    }

    #[test]
    fn a_base_frame_names_its_seeds_length_and_a_count_no_seed_has_is_refused() {
        let checkpoint = Checkpoint::new(PartitionId::new(2, "events"), "copy");
        let mut base = header(vec![ShardId(2)]);
        base.base_frames = 4;
        let frame = encode_frame(&base, &checkpoint, &checkpoint.encode_delta());
        let view = parse_frame(&frame).expect("parses");
        assert_eq!(view.header, base);
        // Sequence 3 of a seed of four frames: a line ending here is a seed cut short.
        assert!(view.header.is_base() && view.header.is_seed_cut_short());
        base.id.sequence = Sequence(4);
        assert!(!base.is_seed_cut_short());
        // More base frames than shards, or a base frame past its seed's last: never written.
        for (sequence, base_frames) in [(3, 5), (5, 4)] {
            base.id.sequence = Sequence(sequence);
            base.base_frames = base_frames;
            let frame = encode_frame(&base, &checkpoint, &checkpoint.encode_delta());
            assert_eq!(
                parse_frame(&frame).map(|_| ()),
                Err(DecodeError::OutOfRange {
                    what: "base frame count",
                    found: base_frames
                })
            );
        }
    }

    #[test]
    fn chunks_cover_the_frame_exactly_and_the_end_marker_checks_it() {
        assert_eq!(chunk_ranges(10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(chunk_ranges(8, 4), vec![0..4, 4..8]);
        let frame = b"a frame of some bytes".to_vec();
        let end = match RecordValue::parse(&end_value(&frame, 3)) {
            Ok(RecordValue::End(end)) => end,
            other => panic!("not an end marker: {other:?}"),
        };
        assert_eq!(end.chunks, 3);
        assert_eq!(check_frame(&frame, &end), Ok(()));
        let mut damaged = frame.clone();
        damaged[4] ^= 1;
        assert_eq!(check_frame(&damaged, &end), Err(FrameCheckError::Checksum));
        assert!(matches!(
            check_frame(&frame[1..], &end),
            Err(FrameCheckError::Length { .. })
        ));
        assert_eq!(
            RecordValue::parse(&chunk_value(b"xyz")),
            Ok(RecordValue::Chunk(&b"xyz"[..]))
        );
        assert_eq!(
            RecordValue::parse(&[FORMAT, b'Z']),
            Err(DecodeError::UnknownRecordKind(b'Z'))
        );
    }
}
