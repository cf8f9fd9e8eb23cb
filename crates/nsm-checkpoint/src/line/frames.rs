//! One frame's records as a restore reads them in log order, the latest per key, as the whole
//! log read at its end would show them.
//!
//! A frame's chunks are kept until its end marker and every chunk it counts are there and the
//! checksum holds; then it is checked whole (its header names it, every row and change
//! decodes), so a frame that is applied is never found damaged halfway. After that only its
//! bytes (until applied) and header are kept. A tombstone of any of its records unfinishes it:
//! the whole log would not show it finished either.

use std::collections::{BTreeMap, BTreeSet};

use crate::body::{Delta, Rows};
use crate::frame::{check_frame, parse_frame, FrameHeader, RecordPart, RecordValue};
use crate::ids::{FrameId, PartitionId, Sequence};
use crate::wire::DecodeError;

/// Where a frame stands.
#[derive(Debug)]
pub(crate) enum FrameState {
    /// Not finished: an end marker or a chunk is missing, or they do not check.
    Assembling,
    /// Finished and checked.
    Finished(Finished),
    /// Finished once, then a record of it was tombstoned: as if never finished.
    Gone,
}

/// A finished frame.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) header: FrameHeader,
    pub(crate) chunks: u32,
    /// Its bytes, while held: neither applied yet nor evicted past the hold limit.
    pub(crate) bytes: Option<Vec<u8>>,
}

/// What a record changed of its frame.
pub(crate) enum Change {
    None,
    /// The frame is now finished.
    Finished,
    /// A finished frame was tombstoned: its bytes, if held, are dropped.
    Unfinished {
        held_bytes: u64,
    },
}

/// The records of one frame read so far.
#[derive(Debug)]
pub(crate) struct TrackedFrame {
    /// Chunk record values of a frame not finished yet, the latest per index.
    chunk_values: BTreeMap<u32, Vec<u8>>,
    end_value: Option<Vec<u8>>,
    /// The chunks whose latest record is a value, kept once the values are not.
    present: BTreeSet<u32>,
    end_present: bool,
    pub(crate) state: FrameState,
}

impl TrackedFrame {
    pub(crate) fn new() -> Self {
        TrackedFrame {
            chunk_values: BTreeMap::new(),
            end_value: None,
            present: BTreeSet::new(),
            end_present: false,
            state: FrameState::Assembling,
        }
    }

    /// Takes one record of the frame `id` of `partition`.
    pub(crate) fn record(
        &mut self,
        partition: &PartitionId,
        id: FrameId,
        part: RecordPart,
        value: Option<&[u8]>,
    ) -> Change {
        match part {
            RecordPart::Chunk(index) if value.is_some() => {
                self.present.insert(index);
            }
            RecordPart::Chunk(index) => {
                self.present.remove(&index);
            }
            RecordPart::End => self.end_present = value.is_some(),
        }
        match &mut self.state {
            FrameState::Finished(finished) if value.is_none() => {
                let held_bytes = finished
                    .bytes
                    .as_ref()
                    .map_or(0, |bytes| bytes.len() as u64);
                self.state = FrameState::Gone;
                Change::Unfinished { held_bytes }
            }
            // A repeated record of a finished frame (a retried send) changes nothing; a frame
            // tombstoned is not made whole again by the protocol.
            FrameState::Finished(_) | FrameState::Gone => Change::None,
            FrameState::Assembling => {
                match (part, value) {
                    (RecordPart::Chunk(index), Some(value)) => {
                        self.chunk_values.insert(index, value.to_vec());
                    }
                    (RecordPart::Chunk(index), None) => {
                        self.chunk_values.remove(&index);
                    }
                    (RecordPart::End, value) => self.end_value = value.map(<[u8]>::to_vec),
                }
                match self.try_finish(partition, id) {
                    Some(finished) => {
                        self.chunk_values.clear();
                        self.end_value = None;
                        self.state = FrameState::Finished(finished);
                        Change::Finished
                    }
                    None => Change::None,
                }
            }
        }
    }

    /// The frame these records make, if they make a finished frame of `partition` under `id`:
    /// an end marker, every chunk it counts, the checksum right, a header that names the same
    /// frame, and a body that decodes whole.
    fn try_finish(&self, partition: &PartitionId, id: FrameId) -> Option<Finished> {
        let end = match RecordValue::parse(self.end_value.as_deref()?) {
            Ok(RecordValue::End(end)) => end,
            _ => return None,
        };
        let held: usize = self.chunk_values.values().map(Vec::len).sum();
        // A corrupt length never sizes an allocation.
        if usize::try_from(end.frame_len).ok()? > held {
            return None;
        }
        let mut bytes = Vec::with_capacity(end.frame_len as usize);
        for index in 0..end.chunks {
            match RecordValue::parse(self.chunk_values.get(&index)?) {
                Ok(RecordValue::Chunk(chunk)) => bytes.extend_from_slice(chunk),
                _ => return None,
            }
        }
        check_frame(&bytes, &end).ok()?;
        let header = check_body(&bytes).ok()?;
        let names_itself = header.id == id
            && header.partition_name == partition.name
            && header.id.sequence > Sequence::EMPTY;
        if !names_itself {
            return None;
        }
        Some(Finished {
            header,
            chunks: end.chunks,
            bytes: Some(bytes),
        })
    }

    /// Whether the frame is finished now.
    pub(crate) fn finished(&self) -> Option<&Finished> {
        match &self.state {
            FrameState::Finished(finished) => Some(finished),
            _ => None,
        }
    }

    pub(crate) fn finished_mut(&mut self) -> Option<&mut Finished> {
        match &mut self.state {
            FrameState::Finished(finished) => Some(finished),
            _ => None,
        }
    }

    /// Whether any record of the frame is in the log as read (a value, not a tombstone).
    pub(crate) fn anything_present(&self) -> bool {
        self.end_present || !self.present.is_empty()
    }

    /// The chunk records to tombstone of a frame not finished: those seen.
    pub(crate) fn chunks_seen(&self) -> u32 {
        self.present
            .iter()
            .next_back()
            .map_or(0, |index| index.saturating_add(1))
    }
}

/// Reads a frame whole without applying it: its header, then every row of its snapshots and
/// every change of its delta, so that applying it cannot stop halfway on bad bytes.
fn check_body(bytes: &[u8]) -> Result<FrameHeader, DecodeError> {
    let view = parse_frame(bytes)?;
    for (_, rows) in &view.snapshots {
        check_rows(rows)?;
    }
    let delta = Delta::read(view.delta, view.header.shards)?;
    for group in &delta.groups {
        group.for_each(|_, _| {})?;
    }
    Ok(view.header)
}

fn check_rows(rows: &Rows<'_>) -> Result<(), DecodeError> {
    rows.for_each(|_, _| {})
}
