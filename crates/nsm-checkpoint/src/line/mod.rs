//! The streaming restore: a changelog partition's records taken in log order, each frame applied
//! to a [`RestoreSink`] as soon as the line it is on can be told, so a partition far larger than
//! memory is restored with a bounded hold-back.
//!
//! How, on [`LineRestore`].

mod frames;
mod resolve;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use crate::body::Delta;
use crate::error::{Corruption, RestoreError};
use crate::frame::{parse_frame, FrameHeader, RecordKey};
use crate::ids::{CheckpointConfig, Epoch, FrameId, PartitionId, Sequence, ShardId};
use crate::local::{LoggedFrame, PartitionHead};
use crate::restore::{RestoreStats, ResumedHead};
use crate::sink::{RestoreSink, SnapshotRows};
use crate::wire::{put_bytes, put_varint, varint_len, DecodeError};

use frames::{Change, TrackedFrame};
use resolve::{pick_line, Line, Picked};

/// Takes a changelog partition's records in log order and applies the frames of one partition
/// to a [`RestoreSink`].
///
/// # When a frame is applied
///
/// A finished frame is held until a later finished frame of the newest epoch seen so far names it
/// as its parent; it is then applied if it continues what was applied (its parent is the last
/// frame applied), or, reading the whole log with nothing applied yet, as the first frame (a
/// compacted log starts past the line's first checkpoint). Its bytes go once applied. Frames
/// never named (the head, a cut-off owner's late frames) stay held, up to `hold_limit` bytes,
/// the oldest held dropped first.
///
/// # At the end of the read
///
/// The line rule (newest finished frame by epoch then sequence, followed back through the
/// parents each names) runs on what the log holds finished at its end, and decides:
/// - the frames applied are the line's so far: the held frames of the rest are applied, done;
/// - the line covers every shard (each has a snapshot on it), so whatever was applied is
///   replaced: its frames are applied over it, done;
/// - a frame of the rest was dropped past the limit: [`SecondPass`], which reads the log again
///   with the line known and applies exactly its frames, after what was applied;
/// - what was applied left the line (a frame landed behind the applied head: a cut-off owner's
///   frames named before the new owner's), or started past a line that does not cover every
///   shard: [`SecondPass`] that first clears the partition; resuming, [`LineBroken`].
///
/// The second pass ends the same way (the log may have changed between the reads), so the
/// caller repeats until [`LineOutcome::Restored`].
///
/// # Resuming
///
/// [`LineRestore::resume`] reads from the changelog position of a local copy at a known head:
/// only frames continuing that head are applied, and the line rule considers only frames newer
/// than it. A line going back past the read (its frames are before the position: another
/// owner's fork) or one that neither continues the head nor covers every shard is
/// [`LineBroken`]: the caller clears the partition and restores it whole.
#[derive(Debug)]
pub struct LineRestore {
    config: CheckpointConfig,
    partition: PartitionId,
    hold_limit: u64,
    /// The local head a resumed read builds on.
    resumed: Option<PartitionHead>,
    /// The frames a second pass applies.
    guide: Option<Guide>,
    frames: BTreeMap<FrameId, TrackedFrame>,
    /// Frames a finished frame of the newest epoch seen named as its parent.
    confirmed: HashSet<FrameId>,
    /// Finished frames held, oldest first (some may have gone since: entries are dropped as they
    /// reach the front, so applying or unfinishing a frame costs no scan of the others).
    held: VecDeque<FrameId>,
    held_bytes: u64,
    /// The frames held (a first pass's), by the parent each names: what may continue the applied
    /// head, found without a scan of every frame held (a seed behind an applied line holds one
    /// frame per shard, and a scan at each frame finishing would cost their square).
    held_children: HashMap<FrameId, BTreeSet<FrameId>>,
    highest_epoch: Epoch,
    newest_finished_epoch: Epoch,
    next_offset: Option<u64>,
    carried: Carried,
}

/// The frames a second pass applies, in order, and how many it has.
#[derive(Debug)]
struct Guide {
    frames: Vec<FrameId>,
    next: usize,
    /// The frames not applied yet.
    waiting: HashSet<FrameId>,
}

/// What a restore did to its sink, carried from one pass to the next.
#[derive(Debug)]
struct Carried {
    applied: Applied,
    stats: RestoreStats,
    blobs: Option<BlobLog>,
}

/// The state the sink holds.
#[derive(Debug)]
struct Applied {
    /// The last frame applied (or the base: the empty state, the local head).
    head: FrameId,
    /// Whether the sink holds exactly the line ending at `head`. Not when the first frame
    /// applied did not continue the base: then only the shards snapshotted since are exact.
    exact: bool,
    /// The first frame applied since the sink stopped being exact.
    start: Sequence,
    meta: Option<Vec<u8>>,
    /// The section bytes of each shard's last snapshot applied (or the local head's).
    snapshot_bytes: Vec<u64>,
    /// What each frame applied held, for the line's counts.
    counts: HashMap<FrameId, FrameCounts>,
}

impl Applied {
    fn at(base: Option<&PartitionHead>, shards: u32) -> Self {
        Applied {
            head: base.map_or(FrameId::EMPTY, |head| head.head),
            exact: true,
            start: Sequence::EMPTY,
            meta: None,
            snapshot_bytes: base.map_or_else(
                || vec![0; shards as usize],
                |head| head.snapshot_bytes.clone(),
            ),
            counts: HashMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct FrameCounts {
    snapshots: Vec<(ShardId, u64)>,
    delta_changes: u64,
}

/// The sections of the frames applied, for a store keeping the library's blobs.
#[derive(Debug, Default)]
struct BlobLog {
    snapshots: HashMap<ShardId, (Sequence, Vec<u8>)>,
    deltas: HashMap<FrameId, Vec<u8>>,
}

/// How a read ended.
#[derive(Debug)]
pub enum LineOutcome {
    Restored(LineRestored),
    /// Read the log again, from where this pass started, with [`LineRestore::second_pass`].
    SecondPass(SecondPass),
    /// The frames read do not continue the local head: clear the partition and restore it
    /// whole with [`LineRestore::new`].
    Broken(LineBroken),
}

/// A partition a streaming restore finished: its rows are in the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRestored {
    pub partition: PartitionId,
    /// The checkpoint restored ([`FrameId::EMPTY`] when none was found).
    pub head: FrameId,
    /// The highest epoch seen of the partition; its next owner must take a higher one.
    pub highest_epoch: Epoch,
    pub meta: Vec<u8>,
    pub stats: RestoreStats,
    /// The offset after the last record read, when any was: the changelog position reached.
    pub next_offset: Option<u64>,
    /// Whether it went on from a local head (the sink's rows were updated in place) rather
    /// than restoring the partition whole.
    pub resumed: bool,
    pub(crate) local: PartitionHead,
    pub(crate) blobs: Option<InstallBlobs>,
}

/// The snapshot and delta blobs of a restored line, for a [`Store`](crate::Store).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct InstallBlobs {
    pub(crate) snapshots: Vec<(ShardId, Vec<u8>)>,
    pub(crate) deltas: Vec<(Sequence, Vec<u8>)>,
}

/// A read that must be made again with the line known (see [`LineRestore::second_pass`]).
#[derive(Debug)]
pub struct SecondPass {
    config: CheckpointConfig,
    partition: PartitionId,
    hold_limit: u64,
    resumed: Option<PartitionHead>,
    carried: Carried,
    frames: Vec<FrameId>,
    clears: bool,
}

impl SecondPass {
    pub fn partition(&self) -> &PartitionId {
        &self.partition
    }

    /// Whether the second pass clears the partition first: what the first applied left the
    /// line, so it is restored whole again.
    pub fn clears(&self) -> bool {
        self.clears
    }

    /// The frames the second pass applies, in order.
    pub fn frames(&self) -> &[FrameId] {
        &self.frames
    }

    /// Whether it reads from the local head's position again (a resumed restore), rather than
    /// from the first record.
    pub fn resumed(&self) -> bool {
        self.resumed.is_some()
    }
}

/// A resumed read whose frames do not continue the local head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineBroken {
    pub partition: PartitionId,
    pub local_head: FrameId,
    /// The newest finished frame read, if any.
    pub newest: Option<FrameId>,
}

/// What the end of a read decided.
enum Decision {
    /// Apply these frames, in order, on the sink as it is.
    Apply(Vec<FrameId>),
    /// What the sink holds is off the line.
    Redo,
}

impl LineRestore {
    /// A restore of `partition` whole, reading its changelog partition from the first record,
    /// into a sink the caller has cleared. `hold_limit` bounds the bytes of finished frames held
    /// unapplied; past it the restore ends in a [`SecondPass`].
    pub fn new(config: &CheckpointConfig, partition: &PartitionId, hold_limit: u64) -> Self {
        LineRestore::start(config, partition.clone(), hold_limit, None)
    }

    /// A restore going on from a local copy at `head` (its sink holds the rows `head` describes),
    /// reading the changelog partition from the copy's position: the offset after the last
    /// record of its last write or restore.
    pub fn resume(config: &CheckpointConfig, head: &ResumedHead, hold_limit: u64) -> Self {
        LineRestore::start(
            config,
            head.partition.clone(),
            hold_limit,
            Some(head.local.clone()),
        )
    }

    fn start(
        config: &CheckpointConfig,
        partition: PartitionId,
        hold_limit: u64,
        resumed: Option<PartitionHead>,
    ) -> Self {
        let applied = Applied::at(resumed.as_ref(), config.shards());
        LineRestore {
            config: *config,
            partition,
            hold_limit,
            resumed,
            guide: None,
            frames: BTreeMap::new(),
            confirmed: HashSet::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            held_children: HashMap::new(),
            highest_epoch: Epoch(0),
            newest_finished_epoch: Epoch(0),
            next_offset: None,
            carried: Carried {
                applied,
                stats: RestoreStats {
                    passes: 1,
                    ..RestoreStats::default()
                },
                blobs: None,
            },
        }
    }

    /// The second read `pass` asks for, from where the first started. Clears the sink first
    /// when the pass says so.
    pub fn second_pass<K: RestoreSink>(
        pass: SecondPass,
        sink: &mut K,
    ) -> Result<Self, RestoreError<K::Error>> {
        let mut restore =
            LineRestore::start(&pass.config, pass.partition, pass.hold_limit, pass.resumed);
        restore.carried = pass.carried;
        restore.carried.stats.passes += 1;
        if pass.clears {
            let failed = |source| RestoreError::Sink {
                partition: restore.partition.clone(),
                source,
            };
            sink.drop_range(&[], None).map_err(failed)?;
            // The sink is the empty state again, meta included: a second pass that applies
            // nothing (the line was a seed cut short, applied as it came, and there is none
            // before it) leaves no meta of a frame off the line.
            sink.meta(FrameId::EMPTY, &[]).map_err(failed)?;
            let counts = std::mem::take(&mut restore.carried.applied.counts);
            restore.carried.applied = Applied::at(None, restore.config.shards());
            restore.carried.applied.counts = counts;
            if restore.carried.blobs.is_some() {
                restore.carried.blobs = Some(BlobLog::default());
            }
        }
        restore.guide = Some(Guide {
            waiting: pass.frames.iter().copied().collect(),
            frames: pass.frames,
            next: 0,
        });
        Ok(restore)
    }

    /// Keeps the sections of the frames applied, to install them in a [`Store`](crate::Store).
    pub(crate) fn with_blobs(mut self) -> Self {
        self.carried.blobs = Some(BlobLog::default());
        self
    }

    pub fn partition(&self) -> &PartitionId {
        &self.partition
    }

    /// The bytes of finished frames a first pass holds unapplied at most.
    pub fn hold_limit(&self) -> u64 {
        self.hold_limit
    }

    /// What the read took so far (the line's counts are known only at its end).
    pub fn stats(&self) -> &RestoreStats {
        &self.carried.stats
    }

    /// Bytes of finished frames held unapplied now: at most the hold limit once a record is
    /// taken, but in a second pass, whose frames are held whatever it takes.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Takes the record read at `offset` of the changelog partition (`value` `None`: a
    /// tombstone), applying what it lets be applied.
    pub fn record<K: RestoreSink>(
        &mut self,
        sink: &mut K,
        offset: u64,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), RestoreError<K::Error>> {
        let stats = &mut self.carried.stats;
        stats.records_read += 1;
        let after = offset.saturating_add(1);
        self.next_offset = Some(self.next_offset.map_or(after, |next| next.max(after)));
        let key_bytes = key.len();
        let key = match RecordKey::parse(key) {
            Ok(Some(key)) => key,
            Ok(None) | Err(_) => {
                stats.foreign_records += 1;
                return Ok(());
            }
        };
        if key.partition_name != self.partition.name {
            return Ok(());
        }
        stats.bytes_read += (key_bytes + value.map_or(0, <[u8]>::len)) as u64;
        self.highest_epoch = self.highest_epoch.max(key.frame.epoch);
        let id = key.frame;
        let tracked = self.frames.entry(id).or_insert_with(TrackedFrame::new);
        let parent = tracked.finished().map(|finished| finished.header.parent());
        let change = tracked.record(&self.partition, id, key.part, value);
        if !tracked.anything_present() && tracked.finished().is_none() {
            // Every record of it tombstoned (or a tombstone of a frame compacted away): nothing
            // of it is in the log, so nothing is kept of it and a day of uncompacted history
            // costs no memory. A resumed read then takes a line needing it as going back past
            // the read, and restores whole: the safe side.
            self.frames.remove(&id);
            self.confirmed.remove(&id);
            self.carried.applied.counts.remove(&id);
        }
        match change {
            Change::None => Ok(()),
            Change::Unfinished { held_bytes } => {
                self.held_bytes = self.held_bytes.saturating_sub(held_bytes);
                if let Some(parent) = parent {
                    self.unhold_child(parent, id);
                }
                self.prune_held();
                Ok(())
            }
            Change::Finished => self.finished(sink, id),
        }
    }

    /// A frame just finished: hold it, and apply what it lets be applied.
    fn finished<K: RestoreSink>(
        &mut self,
        sink: &mut K,
        id: FrameId,
    ) -> Result<(), RestoreError<K::Error>> {
        let Some(finished) = self
            .frames
            .get_mut(&id)
            .and_then(TrackedFrame::finished_mut)
        else {
            return Ok(());
        };
        if finished.header.shards != self.config.shards() {
            return Err(RestoreError::ShardCountChanged {
                partition: self.partition.clone(),
                stored: finished.header.shards,
                configured: self.config.shards(),
            });
        }
        let parent = finished.header.parent();
        let len = finished
            .bytes
            .as_ref()
            .map_or(0, |bytes| bytes.len() as u64);
        if let Some(guide) = &self.guide {
            // A second pass holds only the frames it applies; those finishing before the one
            // before them (never, for one writer's frames) wait whatever it takes.
            if !guide.waiting.contains(&id) {
                finished.bytes = None;
                return Ok(());
            }
            self.held_bytes += len;
            self.held.push_back(id);
            return self.follow_guide(sink);
        }
        self.held_bytes += len;
        self.held.push_back(id);
        self.held_children.entry(parent).or_default().insert(id);
        self.newest_finished_epoch = self.newest_finished_epoch.max(id.epoch);
        // Only a frame of the newest epoch confirms its parent: a cut-off owner's frame names
        // its own line, which the newer owner's frames have left.
        if id.epoch >= self.newest_finished_epoch {
            self.confirmed.insert(parent);
        }
        self.advance(sink)?;
        self.evict();
        Ok(())
    }

    /// Applies the second pass's frames that are held, in order.
    fn follow_guide<K: RestoreSink>(&mut self, sink: &mut K) -> Result<(), RestoreError<K::Error>> {
        while let Some(id) = self
            .guide
            .as_ref()
            .and_then(|guide| guide.frames.get(guide.next).copied())
        {
            if !self.apply(sink, id)? {
                break;
            }
            if let Some(guide) = self.guide.as_mut() {
                guide.next += 1;
                guide.waiting.remove(&id);
            }
        }
        Ok(())
    }

    /// Applies the held, confirmed frames that continue what was applied.
    fn advance<K: RestoreSink>(&mut self, sink: &mut K) -> Result<(), RestoreError<K::Error>> {
        loop {
            let applied = &self.carried.applied;
            // Reading the whole log with nothing applied, the first confirmed frame starts the
            // sink: a compacted log has lost the line's first frames.
            let anywhere = self.resumed.is_none() && applied.head == FrameId::EMPTY;
            let next = if anywhere {
                // The oldest, then the newest owner's.
                self.held
                    .iter()
                    .filter(|id| self.is_held_and_confirmed(id))
                    .min_by_key(|id| (id.sequence, std::cmp::Reverse(id.epoch)))
                    .copied()
            } else {
                // The newest continuing the applied head.
                self.held_children
                    .get(&applied.head)
                    .into_iter()
                    .flatten()
                    .rev()
                    .find(|id| self.is_held_and_confirmed(id))
                    .copied()
            };
            match next {
                Some(id) if self.apply(sink, id)? => {}
                _ => return Ok(()),
            }
        }
    }

    /// Whether frame `id`'s bytes are held and a frame of the newest epoch named it.
    fn is_held_and_confirmed(&self, id: &FrameId) -> bool {
        self.confirmed.contains(id)
            && self
                .frames
                .get(id)
                .and_then(TrackedFrame::finished)
                .is_some_and(|finished| finished.bytes.is_some())
    }

    /// Forgets that frame `id`, naming `parent`, is held.
    fn unhold_child(&mut self, parent: FrameId, id: FrameId) {
        if let Some(children) = self.held_children.get_mut(&parent) {
            children.remove(&id);
            if children.is_empty() {
                self.held_children.remove(&parent);
            }
        }
    }

    /// Drops the entries at the front of `held` whose frames are no longer held (applied,
    /// tombstoned), so it stays as long as the frames held span.
    fn prune_held(&mut self) {
        while let Some(id) = self.held.front() {
            let still_held = self
                .frames
                .get(id)
                .and_then(TrackedFrame::finished)
                .is_some_and(|finished| finished.bytes.is_some());
            if still_held {
                return;
            }
            self.held.pop_front();
        }
    }

    /// Drops the oldest frames held until the held bytes are within the limit; they stay
    /// known (finished, their header), so a second pass can fetch them.
    fn evict(&mut self) {
        while self.held_bytes > self.hold_limit {
            let Some(id) = self.held.pop_front() else {
                return;
            };
            let Some(finished) = self
                .frames
                .get_mut(&id)
                .and_then(TrackedFrame::finished_mut)
            else {
                continue;
            };
            let parent = finished.header.parent();
            if let Some(bytes) = finished.bytes.take() {
                self.held_bytes = self.held_bytes.saturating_sub(bytes.len() as u64);
                self.unhold_child(parent, id);
            }
        }
    }

    /// Applies frame `id` if its bytes are held: its dropped ranges, its changes, its snapshots,
    /// then its meta. False when they are not.
    fn apply<K: RestoreSink>(
        &mut self,
        sink: &mut K,
        id: FrameId,
    ) -> Result<bool, RestoreError<K::Error>> {
        let Some(finished) = self
            .frames
            .get_mut(&id)
            .and_then(TrackedFrame::finished_mut)
        else {
            return Ok(false);
        };
        let Some(bytes) = finished.bytes.take() else {
            return Ok(false);
        };
        let parent = finished.header.parent();
        self.held_bytes = self.held_bytes.saturating_sub(bytes.len() as u64);
        self.unhold_child(parent, id);
        self.prune_held();
        let partition = &self.partition;
        let corrupt = |source: DecodeError| RestoreError::Corrupt {
            partition: partition.clone(),
            what: Corruption::Frame(id),
            source,
        };
        let failed = |source| RestoreError::Sink {
            partition: partition.clone(),
            source,
        };
        // Checked whole when it finished, so these reads do not fail.
        let view = parse_frame(&bytes).map_err(corrupt)?;
        let delta = Delta::read(view.delta, self.config.shards()).map_err(corrupt)?;
        for range in &delta.dropped_ranges {
            sink.drop_range(range.start, range.end).map_err(failed)?;
        }
        for group in &delta.groups {
            let mut refused = None;
            group
                .for_each(|key, value| {
                    if refused.is_none() {
                        let done = match value {
                            Some(value) => sink.put(group.shard, key, value),
                            None => sink.delete(group.shard, key),
                        };
                        refused = done.err();
                    }
                })
                .map_err(corrupt)?;
            if let Some(source) = refused {
                return Err(failed(source));
            }
        }
        let applied = &mut self.carried.applied;
        let mut counts = FrameCounts {
            snapshots: Vec::with_capacity(view.snapshots.len()),
            delta_changes: delta.changes(),
        };
        for (shard, rows) in &view.snapshots {
            sink.replace_shard(*shard, SnapshotRows::new(rows.count, rows.bytes))
                .map_err(failed)?;
            let section_len =
                varint_len(rows.count) + varint_len(rows.bytes.len() as u64) + rows.bytes.len();
            applied.snapshot_bytes[shard.index()] = section_len as u64;
            counts.snapshots.push((*shard, rows.count));
            if let Some(blobs) = self.carried.blobs.as_mut() {
                let mut section = Vec::with_capacity(section_len);
                put_varint(&mut section, rows.count);
                put_bytes(&mut section, rows.bytes);
                blobs.snapshots.insert(*shard, (id.sequence, section));
            }
        }
        if let Some(blobs) = self.carried.blobs.as_mut() {
            blobs.deltas.insert(id, view.delta.to_vec());
        }
        sink.meta(id, view.meta).map_err(failed)?;
        if parent != applied.head {
            // Not continuing what the sink holds: exact only for the shards it replaces from
            // here on.
            applied.exact = false;
            applied.start = id.sequence;
        }
        applied.head = id;
        applied.meta = Some(view.meta.to_vec());
        applied.counts.insert(id, counts);
        self.carried.stats.frames_applied += 1;
        Ok(true)
    }

    /// Ends the read: the line rule on what the log held finished, and what it asks of the
    /// sink (see [`LineRestore`]).
    pub fn finish<K: RestoreSink>(
        mut self,
        sink: &mut K,
    ) -> Result<LineOutcome, RestoreError<K::Error>> {
        let shards = self.config.shards() as usize;
        let base = self.resumed.as_ref().map(|head| head.head);
        let finished: BTreeMap<FrameId, &FrameHeader> = self
            .frames
            .iter()
            .filter_map(|(id, tracked)| tracked.finished().map(|done| (*id, &done.header)))
            .collect();
        let picked = pick_line(shards, &finished, base, |id| self.frames.contains_key(&id));
        let (line, newer_unusable) = match picked {
            Picked::Line {
                line,
                newer_unusable,
            } => (Some(line), newer_unusable),
            Picked::Nothing => (None, 0),
            // Resuming, the older heads the rule falls back to end at the local one.
            Picked::Broken { unusable, .. } if base.is_some() => (None, unusable),
            Picked::Broken { newest, .. } => {
                return Err(RestoreError::BrokenLine {
                    partition: self.partition.clone(),
                    newest,
                })
            }
            Picked::LeavesRead { newest } => return Ok(self.broken(Some(newest))),
        };
        let remaining = match self.decide(line.as_ref(), base) {
            Decision::Apply(remaining) => remaining,
            Decision::Redo if base.is_some() => {
                let newest = line.as_ref().and_then(|line| line.frames.last().copied());
                return Ok(self.broken(newest));
            }
            Decision::Redo => {
                let frames = line.map(|line| line.frames).unwrap_or_default();
                return Ok(LineOutcome::SecondPass(self.second(frames, true)));
            }
        };
        let mut rest = remaining.into_iter().peekable();
        while let Some(id) = rest.peek().copied() {
            if !self.apply(sink, id)? {
                break;
            }
            rest.next();
        }
        let rest: Vec<FrameId> = rest.collect();
        if !rest.is_empty() {
            return Ok(LineOutcome::SecondPass(self.second(rest, false)));
        }
        Ok(LineOutcome::Restored(self.restored(line, newer_unusable)))
    }

    /// Whether what the sink holds can become `line` by applying frames on it, and which.
    fn decide(&self, line: Option<&Line>, base: Option<FrameId>) -> Decision {
        let applied = &self.carried.applied;
        let Some(line) = line else {
            let untouched = applied.exact && applied.head == base.unwrap_or(FrameId::EMPTY);
            return if untouched {
                Decision::Apply(Vec::new())
            } else {
                Decision::Redo
            };
        };
        let frames = &line.frames;
        let first = frames.first().map_or(Sequence::EMPTY, |id| id.sequence);
        if let Some(at) = frames.iter().position(|id| *id == applied.head) {
            // The line's frames up to the applied head are applied: all of them when the sink
            // is exact, or from one at or before the line's first when the line covers every
            // shard.
            if applied.exact || (line.covered && applied.start <= first) {
                return Decision::Apply(frames[at + 1..].to_vec());
            }
        }
        if (applied.exact && applied.head == line.builds_on) || line.covered {
            return Decision::Apply(frames.clone());
        }
        Decision::Redo
    }

    fn second(self, frames: Vec<FrameId>, clears: bool) -> SecondPass {
        let mut carried = self.carried;
        carried.stats.newer_frames_unusable = 0;
        SecondPass {
            config: self.config,
            partition: self.partition,
            hold_limit: self.hold_limit,
            resumed: self.resumed,
            carried,
            frames,
            clears,
        }
    }

    fn broken(self, newest: Option<FrameId>) -> LineOutcome {
        LineOutcome::Broken(LineBroken {
            local_head: self.resumed.map_or(FrameId::EMPTY, |head| head.head),
            partition: self.partition,
            newest,
        })
    }

    /// The restored partition: the sink holds `line` applied on the base.
    fn restored(self, line: Option<Line>, newer_unusable: u64) -> LineRestored {
        let resumed = self.resumed.is_some();
        let mut head = self
            .resumed
            .clone()
            .unwrap_or_else(|| PartitionHead::empty(self.config.shards()));
        let known: HashSet<FrameId> = head.logged_frames.iter().map(|frame| frame.id).collect();
        let on_line: HashSet<FrameId> = line
            .as_ref()
            .map(|line| line.frames.iter().copied().collect())
            .unwrap_or_default();
        let applied = &self.carried.applied;
        if let Some(line) = &line {
            if line.covered {
                // The line needs nothing it builds on: the local head's frames go.
                for frame in &mut head.logged_frames {
                    frame.retired = true;
                }
            }
            for (index, sequence) in line.snapshot_sequences.iter().enumerate() {
                if let Some(sequence) = sequence {
                    head.snapshot_sequences[index] = *sequence;
                }
            }
            head.snapshot_bytes = applied.snapshot_bytes.clone();
            head.credit = 0;
            if let Some(last) = line.frames.last() {
                head.head = *last;
                head.meta = applied.meta.clone().unwrap_or_default();
            }
            for id in &line.frames {
                if known.contains(id) {
                    continue;
                }
                if let Some(finished) = self.frames.get(id).and_then(TrackedFrame::finished) {
                    head.logged_frames.push(LoggedFrame {
                        id: *id,
                        chunks: finished.chunks,
                        snapshot_shards: finished.header.snapshot_shards.clone(),
                        retired: false,
                    });
                }
            }
        }
        let mut stats = self.carried.stats;
        stats.newer_frames_unusable = newer_unusable;
        stats.frames_skipped = 0;
        for (id, tracked) in &self.frames {
            if on_line.contains(id) || known.contains(id) {
                continue;
            }
            let chunks = match tracked.finished() {
                Some(finished) => finished.chunks,
                None if tracked.anything_present() => tracked.chunks_seen(),
                None => continue,
            };
            stats.frames_skipped += 1;
            head.logged_frames.push(LoggedFrame {
                id: *id,
                chunks,
                snapshot_shards: Vec::new(),
                retired: true,
            });
        }
        let oldest = head.oldest_snapshot();
        if let Some(line) = &line {
            for id in &line.frames {
                let Some(counts) = applied.counts.get(id) else {
                    continue;
                };
                for (shard, rows) in &counts.snapshots {
                    if head.snapshot_sequences[shard.index()] == id.sequence {
                        stats.snapshots_applied += 1;
                        stats.snapshot_rows += rows;
                    }
                }
                if id.sequence > oldest {
                    stats.deltas_applied += 1;
                    stats.delta_changes += counts.delta_changes;
                }
            }
        }
        let blobs = self.carried.blobs.as_ref().map(|blobs| {
            let mut install = InstallBlobs::default();
            for (index, sequence) in head.snapshot_sequences.iter().enumerate() {
                let shard = ShardId(index as u32);
                if let Some((taken_at, section)) = blobs.snapshots.get(&shard) {
                    if *sequence != Sequence::EMPTY && taken_at == sequence {
                        install.snapshots.push((
                            shard,
                            crate::local::encode_snapshot_blob(*sequence, section),
                        ));
                    }
                }
            }
            for id in line.iter().flat_map(|line| &line.frames) {
                if id.sequence > oldest {
                    if let Some(delta) = blobs.deltas.get(id) {
                        install
                            .deltas
                            .push((id.sequence, crate::local::encode_delta_blob(delta)));
                    }
                }
            }
            install
        });
        LineRestored {
            partition: self.partition,
            head: head.head,
            highest_epoch: self.highest_epoch.max(head.highest_epoch()),
            meta: head.meta.clone(),
            stats,
            next_offset: self.next_offset,
            resumed,
            local: head,
            blobs,
        }
    }
}
