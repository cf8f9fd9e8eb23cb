//! Threshold metrics: the number of entities (projects, organisations) with at least k events,
//! or at least k distinct actors, in a window.
//!
//! Only progress up to k is kept: once an entity reaches the threshold, its actors or event
//! count are dropped and only its key stays, so memory per entity is bounded by k. Progress is
//! stored as members of the window, one per step towards k, and a restore replays them.

use std::collections::{HashMap, HashSet};

use super::pair;

/// How far one entity is towards the threshold.
#[derive(Debug)]
enum Progress {
    Events(u32),
    Actors(HashSet<Box<[u8]>>),
    Reached,
}

/// The state of one threshold metric in one window.
#[derive(Debug, Default)]
pub(super) struct ThresholdAgg {
    entities: HashMap<Box<[u8]>, Progress>,
    reached: u64,
}

impl ThresholdAgg {
    /// Entities that reached the threshold.
    pub fn reached(&self) -> u64 {
        self.reached
    }

    /// Counts one event of `entity` (by `actor` when the metric counts distinct actors).
    /// Returns the member to store when progress was made, `None` when the event changed
    /// nothing (the entity was already past the threshold, or the actor already counted).
    pub fn add(&mut self, at_least: u32, entity: &[u8], actor: Option<&[u8]>) -> Option<Box<[u8]>> {
        let progress = match self.entities.get_mut(entity) {
            Some(progress) => progress,
            None => self
                .entities
                .entry(entity.into())
                .or_insert_with(|| match actor {
                    Some(_) => Progress::Actors(HashSet::new()),
                    None => Progress::Events(0),
                }),
        };
        let (member, done) = match (progress, actor) {
            (Progress::Reached, _) => return None,
            (Progress::Events(count), _) => {
                *count += 1;
                (
                    pair::join(&[], entity, &count.to_be_bytes()),
                    *count >= at_least,
                )
            }
            (Progress::Actors(actors), Some(actor)) => {
                if !actors.insert(actor.into()) {
                    return None;
                }
                (
                    pair::join(&[], entity, actor),
                    actors.len() as u64 >= u64::from(at_least),
                )
            }
            (Progress::Actors(_), None) => return None,
        };
        if done {
            self.entities.insert(entity.into(), Progress::Reached);
            self.reached += 1;
        }
        Some(member)
    }

    /// Replays one stored member (from [`ThresholdAgg::add`]) after a restart.
    pub fn restore(&mut self, at_least: u32, member: &[u8], counts_actors: bool) {
        if let Some((entity, second)) = pair::split(member) {
            let actor = counts_actors.then_some(second);
            self.add(at_least, entity, actor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_count_once_when_they_reach_k_events_or_k_actors() {
        let mut events = ThresholdAgg::default();
        assert!(events.add(3, b"p1", None).is_some());
        assert!(events.add(3, b"p1", None).is_some());
        assert_eq!(events.reached(), 0);
        assert!(events.add(3, b"p1", None).is_some());
        assert_eq!(events.reached(), 1);
        assert!(
            events.add(3, b"p1", None).is_none(),
            "past k nothing is kept"
        );

        let mut actors = ThresholdAgg::default();
        let mut stored = Vec::new();
        for (entity, actor) in [("p1", "ana"), ("p1", "ana"), ("p1", "bo"), ("p2", "ana")] {
            stored.extend(actors.add(2, entity.as_bytes(), Some(actor.as_bytes())));
        }
        assert_eq!(actors.reached(), 1);
        assert_eq!(stored.len(), 3, "a repeated actor stores nothing");

        let mut restored = ThresholdAgg::default();
        for member in &stored {
            restored.restore(2, member, true);
        }
        assert_eq!(restored.reached(), 1);
        assert!(restored.add(2, b"p2", Some(b"cy")).is_some());
        assert_eq!(restored.reached(), 2);
    }
}
