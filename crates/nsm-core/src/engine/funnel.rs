//! Conversion metrics: an entity did the start event A, then the conversion event B within a
//! duration D. It counts once in the window of B (when the conversion happened).
//!
//! Events arrive out of order, so both sides are remembered: the times of A events, and the
//! times of B events not yet converted. A late A converts earlier Bs within D after it.
//! Memory stays bounded by forgetting what no future event can pair with: an A older than
//! `watermark - lateness - D`, a B older than `watermark - lateness`. Forgetting is invisible
//! to the result, so the value equals a batch recomputation over the accepted events.

use std::collections::HashMap;

use crate::EpochMillis;

/// Which side of a funnel a remembered time is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FunnelStep {
    /// The start event A.
    Start,
    /// A conversion event B with no A before it yet.
    PendingEnd,
}

impl FunnelStep {
    pub fn tag(self) -> u8 {
        match self {
            Self::Start => b'a',
            Self::PendingEnd => b'b',
        }
    }

    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            b'a' => Some(Self::Start),
            b'b' => Some(Self::PendingEnd),
            _ => None,
        }
    }
}

/// A remembered funnel time of one entity of one metric, as stored.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FunnelRecord {
    pub metric: usize,
    pub step: FunnelStep,
    pub time_ms: EpochMillis,
    pub entity: Box<[u8]>,
}

#[derive(Debug, Default)]
struct Funnel {
    starts: Vec<EpochMillis>,
    pending_ends: Vec<EpochMillis>,
}

/// The funnel state of one conversion metric in one partition.
#[derive(Debug, Default)]
pub(super) struct Funnels {
    entities: HashMap<Box<[u8]>, Funnel>,
}

/// What a funnel event changed.
#[derive(Debug, Default)]
pub(super) struct FunnelUpdate {
    /// Times of B events that now count as conversions.
    pub converted_at: Vec<EpochMillis>,
    /// Newly remembered (step, time).
    pub remembered: Option<(FunnelStep, EpochMillis)>,
    /// Pending ends that converted and are forgotten.
    pub forgotten_ends: Vec<EpochMillis>,
}

impl Funnels {
    /// An A event of `entity` at `time_ms`: converts the pending Bs within `within_ms` after it.
    pub fn start(&mut self, entity: &[u8], time_ms: EpochMillis, within_ms: i64) -> FunnelUpdate {
        let funnel = self.entities.entry(entity.into()).or_default();
        let mut update = FunnelUpdate::default();
        if !funnel.starts.contains(&time_ms) {
            funnel.starts.push(time_ms);
            update.remembered = Some((FunnelStep::Start, time_ms));
        }
        let pairs =
            |end: &EpochMillis| time_ms <= *end && *end <= time_ms.saturating_add(within_ms);
        update.forgotten_ends = funnel.pending_ends.iter().copied().filter(pairs).collect();
        funnel.pending_ends.retain(|end| !pairs(end));
        update.converted_at = update.forgotten_ends.clone();
        update
    }

    /// A B event of `entity` at `time_ms`: converts when an A was within `within_ms` before it,
    /// else waits for a late A.
    pub fn end(&mut self, entity: &[u8], time_ms: EpochMillis, within_ms: i64) -> FunnelUpdate {
        let funnel = self.entities.entry(entity.into()).or_default();
        let mut update = FunnelUpdate::default();
        let paired = funnel
            .starts
            .iter()
            .any(|start| *start <= time_ms && time_ms <= start.saturating_add(within_ms));
        if paired {
            update.converted_at.push(time_ms);
        } else if !funnel.pending_ends.contains(&time_ms) {
            funnel.pending_ends.push(time_ms);
            update.remembered = Some((FunnelStep::PendingEnd, time_ms));
        }
        update
    }

    /// Restores one stored record.
    pub fn restore(&mut self, step: FunnelStep, time_ms: EpochMillis, entity: &[u8]) {
        let funnel = self.entities.entry(entity.into()).or_default();
        match step {
            FunnelStep::Start => funnel.starts.push(time_ms),
            FunnelStep::PendingEnd => funnel.pending_ends.push(time_ms),
        }
    }

    /// Forgets starts before `starts_before` and pending ends before `ends_before`.
    pub fn forget(&mut self, starts_before: EpochMillis, ends_before: EpochMillis) {
        self.entities.retain(|_, funnel| {
            funnel.starts.retain(|time| *time >= starts_before);
            funnel.pending_ends.retain(|time| *time >= ends_before);
            !funnel.starts.is_empty() || !funnel.pending_ends.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversion_pairs_a_start_and_an_end_within_the_duration_in_any_order() {
        let mut funnels = Funnels::default();
        // B before any A waits; a late A within D before it converts it.
        assert!(funnels.end(b"ana", 50, 10).converted_at.is_empty());
        let update = funnels.start(b"ana", 45, 10);
        assert_eq!(update.converted_at, vec![50]);
        assert_eq!(update.forgotten_ends, vec![50]);
        // A then B in time.
        assert_eq!(funnels.end(b"ana", 55, 10).converted_at, vec![55]);
        // Too late after the A: waits.
        assert!(funnels.end(b"ana", 56, 10).converted_at.is_empty());
        // An A after the B does not convert it.
        assert!(funnels.start(b"ana", 57, 10).converted_at.is_empty());
        funnels.forget(50, 57);
        assert!(
            funnels.end(b"ana", 60, 10).converted_at == vec![60],
            "A at 57 is kept"
        );
    }
}
