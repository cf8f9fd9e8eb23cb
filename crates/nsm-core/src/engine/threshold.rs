//! Threshold metrics: the number of entities (projects, organisations) with at least k events,
//! or at least k distinct actors, in a window.
//!
//! Per entity the window keeps its progress towards k (an entry `p <entity>` → count), and,
//! when actors are counted, each actor seen until k (`a <entity> <actor>`). Both live in the
//! partition's member index, so memory does not grow with the entities; past k nothing more
//! is written.

use super::members::{MemberIndex, Source};
use super::pair;
use crate::EpochMillis;

use super::members::StateReadError;

const PROGRESS_TAG: &[u8] = b"p";
const ACTOR_TAG: &[u8] = b"a";

/// One threshold metric's window, as the member index sees it.
pub(super) struct ThresholdWindow {
    pub metric: usize,
    pub start_ms: EpochMillis,
    pub at_least: u32,
}

/// What one event did to an entity's progress.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing: the entity was past k, or the actor already counted.
    Nothing,
    /// Progress was made and stored.
    Progressed,
    /// The entity reached k with this event.
    Reached,
}

impl ThresholdWindow {
    /// Counts one event of `entity` (by `actor` when the metric counts distinct actors).
    pub fn add(
        &self,
        members: &mut MemberIndex,
        source: &Source<'_>,
        entity: &[u8],
        actor: Option<&[u8]>,
    ) -> Result<Step, StateReadError> {
        let progress_key = pair::join(PROGRESS_TAG, entity, &[]);
        let progress = members
            .get(source, self.metric, self.start_ms, &progress_key)?
            .and_then(|value| <[u8; 4]>::try_from(&*value).ok())
            .map_or(0, u32::from_be_bytes);
        if progress >= self.at_least {
            return Ok(Step::Nothing);
        }
        if let Some(actor) = actor {
            let actor_key = pair::join(ACTOR_TAG, entity, actor);
            if members.contains(source, self.metric, self.start_ms, &actor_key)? {
                return Ok(Step::Nothing);
            }
            members.insert(self.metric, self.start_ms, &actor_key);
        }
        let progress = progress + 1;
        members.put(
            self.metric,
            self.start_ms,
            &progress_key,
            &progress.to_be_bytes(),
        );
        Ok(if progress >= self.at_least {
            Step::Reached
        } else {
            Step::Progressed
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::members::MemoryReader;
    use crate::PartitionKey;

    #[test]
    fn entities_count_once_when_they_reach_k_events_or_k_actors() {
        let reader = MemoryReader::default();
        let partition = PartitionKey::new("t", 0);
        let source = Source {
            reader: &reader,
            partition: &partition,
        };
        let mut members = MemberIndex::new(1 << 20);
        let events = ThresholdWindow {
            metric: 0,
            start_ms: 0,
            at_least: 3,
        };
        let mut add = |window: &ThresholdWindow, entity: &str, actor: Option<&str>| {
            window
                .add(
                    &mut members,
                    &source,
                    entity.as_bytes(),
                    actor.map(str::as_bytes),
                )
                .expect("in memory")
        };
        assert_eq!(add(&events, "p1", None), Step::Progressed);
        assert_eq!(add(&events, "p1", None), Step::Progressed);
        assert_eq!(add(&events, "p1", None), Step::Reached);
        assert_eq!(
            add(&events, "p1", None),
            Step::Nothing,
            "past k nothing is kept"
        );

        let actors = ThresholdWindow {
            metric: 1,
            start_ms: 0,
            at_least: 2,
        };
        assert_eq!(add(&actors, "p1", Some("ana")), Step::Progressed);
        assert_eq!(
            add(&actors, "p1", Some("ana")),
            Step::Nothing,
            "a repeated actor"
        );
        assert_eq!(add(&actors, "p2", Some("ana")), Step::Progressed);
        assert_eq!(add(&actors, "p1", Some("bo")), Step::Reached);

        // Stored and read back: progress continues where it was.
        reader.write_members(&partition, &members.take_written(), &[]);
        let mut restored = MemberIndex::new(1 << 20);
        let step = actors
            .add(&mut restored, &source, b"p2", Some(b"cy"))
            .expect("in memory");
        assert_eq!(step, Step::Reached);
        let step = actors
            .add(&mut restored, &source, b"p2", Some(b"ana"))
            .expect("in memory");
        assert_eq!(step, Step::Nothing);
    }
}
