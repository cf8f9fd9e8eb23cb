//! The changes to persist after a batch of events: one entry per touched partition, written
//! by the state store in a single atomic batch together with the partition's offset.

use super::baseline::Progress;
use super::dedup::expired_before;
use super::funnel::{period_bound, period_of, FUNNEL_WINDOW};
use super::members::EntryValue;
use super::plan::{Plan, ValueSource};
use super::state::{AggValue, PartitionState, StoredGap};
use super::upstream::Upstream;
use crate::{EpochMillis, PartitionKey};

/// A window's new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowUpsert {
    pub metric: usize,
    pub start_ms: EpochMillis,
    pub end_ms: EpochMillis,
    pub value: AggValue,
    /// The window's progress record (see [`super::baseline`]), stored with its value.
    pub progress: Option<Progress>,
}

/// A segment's new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentUpsert {
    pub metric: usize,
    pub start_ms: EpochMillis,
    pub segment: Box<[u8]>,
    pub value: AggValue,
}

/// A per-entity entry of a window, new or changed: a member of a distinct set (empty value),
/// threshold progress, or a trailing occurrence (see [`super::members`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInsert {
    pub metric: usize,
    pub start_ms: EpochMillis,
    pub member: Box<[u8]>,
    pub value: EntryValue,
}

/// A member entry as the member index holds it: its window, a funnel entry's period (the
/// entry's first 8 bytes, big-endian; 0 in any other window), the XXH3-128 digest of its key
/// (`crate::table::entity_key(0, key)`), and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub metric: usize,
    pub start_ms: EpochMillis,
    pub period: u64,
    pub digest: u128,
    pub value: EntryValue,
}

/// Every member entry of one checkpoint shard of a partition once its changes are stored,
/// read from memory: the entries whose digest's top 10 bits are `shard` (one of
/// [`MEMBER_SHARDS`]), in no order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberShardRows {
    pub shard: u16,
    pub rows: Vec<MemberRow>,
}

/// Checkpoint shards of member entries: a digest's top 10 bits.
pub const MEMBER_SHARDS: u16 = 1024;

/// The checkpoint shard of an entry's digest: its top bits, so that a shard is a range of
/// digests, and one of the member index's table shards is 16 whole checkpoint shards.
pub fn member_shard_of(digest: u128) -> u16 {
    (digest >> (128 - MEMBER_SHARDS.trailing_zeros())) as u16
}

/// Member entries of one window whose keys sort before `before`, to delete (old funnel
/// periods of a conversion metric).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRangeDelete {
    pub metric: usize,
    pub start_ms: EpochMillis,
    pub before: Box<[u8]>,
}

/// Every window of a namespace starting before `before_ms`, to delete with its entries (old
/// periods of remembered event ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowsBefore {
    pub metric: usize,
    pub before_ms: EpochMillis,
}

/// A window past the retention, to delete with its members and segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowDelete {
    pub metric: usize,
    pub start_ms: EpochMillis,
}

/// Everything that changed in one partition. `next_offset` and the watermark fields are the
/// partition's full current values, not deltas: writing them with the window changes in one
/// batch is what makes a restart resume exactly where the state ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionChanges {
    pub key: PartitionKey,
    pub next_offset: Option<i64>,
    pub max_event_ms: Option<EpochMillis>,
    pub event_watermark_ms: Option<EpochMillis>,
    pub idle_floor_ms: Option<EpochMillis>,
    pub upserts: Vec<WindowUpsert>,
    pub segments: Vec<SegmentUpsert>,
    pub members: Vec<MemberInsert>,
    /// Changed gap counts of trailing distinct buckets (a zero count is deleted).
    pub gaps: Vec<StoredGap>,
    pub deletes: Vec<WindowDelete>,
    /// Namespaces whose old windows go (event ids past the dedup horizon).
    pub windows_before: Vec<WindowsBefore>,
    /// Member entries no future event can read, deleted after the puts.
    pub member_range_deletes: Vec<MemberRangeDelete>,
    /// The checkpoint shards asked of [`super::Engine::take_changes_with_snapshots`] whose every
    /// entry, stored or not, is in memory: each is what the store holds of it once these
    /// changes are written, without reading the store.
    pub member_snapshots: Vec<MemberShardRows>,
    /// A repartition partition's sources, whole, when they changed (see
    /// [`super::upstream`]).
    pub upstream: Option<Upstream>,
}

/// All partitions' changes since the last flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    pub partitions: Vec<PartitionChanges>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }
}

impl PartitionState {
    pub(super) fn take_changes(
        &mut self,
        plan: &Plan,
        key: &PartitionKey,
        snapshot_shards: &[u16],
    ) -> Option<PartitionChanges> {
        if self.poisoned {
            return None;
        }
        let deletes = self.expire(plan);
        let windows_before: Vec<WindowsBefore> = self
            .watermark_ms()
            .and_then(|watermark| expired_before(plan, watermark, &mut self.ids_kept_from))
            .into_iter()
            .collect();
        let member_range_deletes = self.forget_old_funnels(plan);
        // What the store deletes leaves memory too: no future event reads it.
        for delete in &deletes {
            self.members.forget_window(delete.metric, delete.start_ms);
        }
        for expired in &windows_before {
            self.members
                .forget_windows_before(expired.metric, expired.before_ms);
        }
        for range in &member_range_deletes {
            self.members
                .forget_range(range.metric, range.start_ms, &range.before);
        }
        if !self.pending.meta_dirty
            && self.pending.dirty_windows.is_empty()
            && deletes.is_empty()
            && windows_before.is_empty()
            && member_range_deletes.is_empty()
        {
            return None;
        }
        let pending = std::mem::take(&mut self.pending);
        let upserts = pending
            .dirty_windows
            .into_iter()
            .filter_map(|(metric, start_ms)| {
                let window = self.windows[metric].get(&start_ms)?;
                Some(WindowUpsert {
                    metric,
                    start_ms,
                    end_ms: window.end_ms,
                    value: window.agg.value(),
                    progress: window.progress.clone(),
                })
            })
            .collect();
        let segments = pending
            .dirty_segments
            .into_iter()
            .filter_map(|(metric, start_ms, segment)| {
                let value = self.windows[metric]
                    .get(&start_ms)?
                    .segments
                    .get(&segment)?
                    .value();
                Some(SegmentUpsert {
                    metric,
                    start_ms,
                    segment,
                    value,
                })
            })
            .collect();
        // Entries of windows deleted in this batch are not handed over: the store deletes them.
        let (members, member_snapshots) = self.members.take_written_with_snapshots(snapshot_shards);
        let gaps = pending
            .dirty_gaps
            .into_iter()
            .filter_map(|(metric, start_ms, segment, previous_ms)| {
                let window = self.windows[metric].get(&start_ms)?;
                let of_segment = (!segment.is_empty()).then_some(&*segment);
                let count = *window.gaps_of(of_segment)?.get(&previous_ms)?;
                Some(StoredGap {
                    metric,
                    start_ms,
                    segment,
                    previous_ms,
                    count,
                })
            })
            .collect();
        Some(PartitionChanges {
            key: key.clone(),
            next_offset: self.next_offset,
            max_event_ms: self.max_event_ms,
            event_watermark_ms: self.event_watermark_ms,
            idle_floor_ms: self.idle_floor_ms,
            upserts,
            segments,
            members,
            gaps,
            deletes,
            windows_before,
            member_range_deletes,
            member_snapshots,
            upstream: pending
                .upstream_dirty
                .then(|| self.upstream.clone())
                .flatten(),
        })
    }

    /// Deletes the funnel periods of conversion metrics that no future event can read (see
    /// [`super::funnel`]): those before the period of `watermark - lateness - within`. An A or
    /// B event at `t >= watermark - lateness` reads its period and the one before or after.
    fn forget_old_funnels(&mut self, plan: &Plan) -> Vec<MemberRangeDelete> {
        let Some(watermark) = self.watermark_ms() else {
            return Vec::new();
        };
        let mut deletes = Vec::new();
        for (metric, compiled) in plan.compiled.iter().enumerate() {
            let ValueSource::Conversion { within_ms, .. } = compiled.value else {
                continue;
            };
            let horizon = watermark
                .saturating_sub(plan.settings.allowed_lateness_ms)
                .saturating_sub(within_ms);
            let keep_from = period_of(horizon, within_ms);
            if self.funnels_kept_from[metric].is_some_and(|kept| kept >= keep_from) {
                continue;
            }
            self.funnels_kept_from[metric] = Some(keep_from);
            deletes.push(MemberRangeDelete {
                metric,
                start_ms: FUNNEL_WINDOW,
                before: period_bound(keep_from),
            });
        }
        deletes
    }

    /// Drops windows that ended more than the retention before the partition's clock (idle
    /// time included: no event older than the retention before the wall clock is accepted).
    fn expire(&mut self, plan: &Plan) -> Vec<WindowDelete> {
        let Some(watermark) = self.clock_ms() else {
            return Vec::new();
        };
        let horizon = watermark - plan.settings.retention_ms;
        let mut deletes = Vec::new();
        for (metric, windows) in self.windows.iter_mut().enumerate() {
            while let Some(entry) = windows.first_entry() {
                if entry.get().end_ms >= horizon {
                    break;
                }
                let start_ms = *entry.key();
                entry.remove();
                self.pending.dirty_windows.remove(&(metric, start_ms));
                self.pending
                    .dirty_segments
                    .retain(|(m, start, _)| !(*m == metric && *start == start_ms));
                self.pending
                    .dirty_gaps
                    .retain(|(m, start, _, _)| !(*m == metric && *start == start_ms));
                deletes.push(WindowDelete { metric, start_ms });
            }
        }
        deletes
    }
}
