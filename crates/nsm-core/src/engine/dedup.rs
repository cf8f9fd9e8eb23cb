//! Deduplication by event id, in bounded memory.
//!
//! An event whose id was applied in its partition with an event time less than the horizon
//! behind the watermark is a duplicate. Deciding by the watermark, not by when anything is
//! swept, keeps the answer a function of the partition's log: a replay after a restart decides
//! exactly as the first run did.
//!
//! Ids are entries of the partition's member index in the engine's own namespace (the metric
//! index one past the last metric, see [`Plan::ids_namespace`]), under periods of one horizon
//! aligned to the epoch: `id` → the event time it was applied at. A lookup reads the periods
//! from that of `watermark - horizon` to that of the newest event, at most two. Whole periods
//! behind the horizon are deleted as windows.
//!
//! With `events.dedup_across_partitions` (copies of one event on different partitions), ids are
//! deduplicated where the copies meet instead: on the repartition partition, per group
//! ([`Plan::dedups_at`]). Until all its sources have reported it has no watermark, so an id
//! counts as seen within the horizon of the event's own time (a copy has its original's time).

use super::changes::WindowsBefore;
use super::members::{MemberIndex, Source, StateReadError};
use super::plan::Plan;
use crate::EpochMillis;

/// The ids of one partition, as the member index holds them.
pub(super) struct SeenIds<'a> {
    pub namespace: usize,
    pub horizon_ms: i64,
    pub members: &'a mut MemberIndex,
}

impl SeenIds<'_> {
    /// Whether `id` was applied with an event time after `watermark - horizon`.
    pub fn is_duplicate(
        &mut self,
        source: &Source<'_>,
        id: &[u8],
        watermark_ms: EpochMillis,
        newest_ms: EpochMillis,
    ) -> Result<bool, StateReadError> {
        let bound = watermark_ms.saturating_sub(self.horizon_ms);
        let mut period = self.period_of(bound);
        while period <= newest_ms {
            let seen = self.members.get(source, self.namespace, period, id)?;
            let seen_ms = seen
                .and_then(|value| <[u8; 8]>::try_from(&*value).ok())
                .map(i64::from_be_bytes);
            if seen_ms.is_some_and(|seen_ms| seen_ms > bound) {
                return Ok(true);
            }
            period += self.horizon_ms;
        }
        Ok(false)
    }

    /// Remembers `id` as applied at `time_ms` (a later application overwrites an earlier one
    /// of the same period).
    pub fn remember(&mut self, id: &[u8], time_ms: EpochMillis) {
        let period = self.period_of(time_ms);
        self.members
            .put_rarely_read(self.namespace, period, id, &time_ms.to_be_bytes());
    }

    fn period_of(&self, time_ms: EpochMillis) -> EpochMillis {
        time_ms.div_euclid(self.horizon_ms) * self.horizon_ms
    }
}

/// The id periods no lookup reads any more: all before the one holding
/// `watermark - horizon`. `None` while that bound has not moved past `kept_from`, the bound
/// of the last sweep (unknown after a restart, so the first sweep always runs).
pub(super) fn expired_before(
    plan: &Plan,
    watermark_ms: EpochMillis,
    kept_from: &mut Option<EpochMillis>,
) -> Option<WindowsBefore> {
    let horizon_ms = plan.settings.dedup.as_ref()?.horizon_ms;
    let keep_from = watermark_ms
        .saturating_sub(horizon_ms)
        .div_euclid(horizon_ms)
        * horizon_ms;
    if kept_from.is_some_and(|kept| kept >= keep_from) {
        return None;
    }
    *kept_from = Some(keep_from);
    Some(WindowsBefore {
        metric: plan.ids_namespace(),
        before_ms: keep_from,
    })
}
