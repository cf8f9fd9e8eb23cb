//! What a partition of the repartition topic knows of the input partitions whose events it
//! counts (docs/design/repartition.md): per source partition, a mark of how far it applied
//! them and what the source said of time.
//!
//! Records are sent again after a crash or a rebalance (the new owner of a source partition
//! resumes from its last stored offset), and an owner cut off from the group may land records
//! after its successor's. A record is applied only when its source offset is at least the
//! mark's next one and its sender's epoch is no older than the mark's: each offset counts once.
//! Marks are per source partition and group (the field re-keyed by): one event forwarded for
//! two groups to the same partition is two records of the same source offset.
//!
//! A record carrying only time says its source's next offset: every event before it was
//! forwarded ahead of it, so its group's mark moves there too. A backfill of a re-keyed metric
//! reads each source up to that mark (docs/design/backfill.md).
//!
//! The partition's watermark is the smallest of its sources' watermarks once every partition of
//! every input topic has reported: an event its source accepted is then never late here, and a
//! window completes only once every source has passed it. A source without any event yet
//! counts with its clock, so that an empty input partition does not hold time back; its first
//! events, if older than the others' watermark by more than the allowed lateness, are then
//! late here (counted as rejected, and dead-lettered, like any late event).

use std::collections::BTreeMap;

use crate::EpochMillis;

/// An owner of a source partition, ordered by when it took it: a new owner resumes at or after
/// the previous one's last stored offset, and takes the partition after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Epoch {
    pub resumed_from: i64,
    pub taken_at_ms: EpochMillis,
}

/// How far a repartition partition applied one source partition's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The source offset after the last record applied.
    pub next_offset: i64,
    pub epoch: Epoch,
    /// The source partition's event watermark, and its clock (the watermark, or the wall
    /// clock once idle), as its last record said.
    pub watermark_ms: Option<EpochMillis>,
    pub clock_ms: Option<EpochMillis>,
}

/// What a repartition partition knows of its sources; stored with its state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstream {
    /// Every input topic and its partitions, as the last record said.
    pub topics: BTreeMap<String, u32>,
    /// A mark per source partition (input topic, then group field, then partition) and group
    /// its records are forwarded for (the empty field for records carrying only time). Nested
    /// so that a record's mark is found from its borrowed names, without building a key.
    marks: BTreeMap<String, BTreeMap<String, BTreeMap<i32, Mark>>>,
}

/// Every input topic and its partitions, as a forwarded record lists them
/// (`events:8,other:4`), read without copying.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inputs<'a>(&'a str);

impl<'a> Inputs<'a> {
    /// `None` when a pair is not `topic:partitions`.
    pub fn parse(text: &'a str) -> Option<Inputs<'a>> {
        let inputs = Inputs(text);
        let pairs = text.split(',').filter(|pair| !pair.is_empty()).count();
        (inputs.iter().count() == pairs).then_some(inputs)
    }

    /// The text listing `inputs`.
    pub fn text_of(inputs: &[(String, u32)]) -> String {
        inputs
            .iter()
            .map(|(topic, partitions)| format!("{topic}:{partitions}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn iter(self) -> impl Iterator<Item = (&'a str, u32)> {
        self.0
            .split(',')
            .filter(|pair| !pair.is_empty())
            .filter_map(|pair| {
                let (topic, partitions) = pair.rsplit_once(':')?;
                Some((topic, partitions.parse().ok()?))
            })
    }
}

/// What a forwarded record says of where it came from.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    /// The group of [`super::Plan::rekey_fields`] it was forwarded for, and that group's
    /// field as the record names it (marks are kept by the name, which a config change does
    /// not renumber).
    pub group: usize,
    pub group_field: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    /// The event's offset in its source partition; for a watermark-only record, the source's
    /// next offset when it was sent.
    pub offset: i64,
    pub epoch: Epoch,
    pub watermark_ms: Option<EpochMillis>,
    pub clock_ms: Option<EpochMillis>,
    /// Every input topic and its partitions.
    pub topics: Inputs<'a>,
}

impl Upstream {
    /// Whether the record's event is yet to be applied: not sent again, not from an owner
    /// older than the last one heard.
    pub fn admits(&self, record: &Forwarded<'_>) -> bool {
        self.mark(record.topic, record.partition, record.group_field)
            .is_none_or(|mark| record.epoch >= mark.epoch && record.offset >= mark.next_offset)
    }

    /// The mark of a source partition and group field.
    pub fn mark(&self, topic: &str, partition: i32, group_field: &str) -> Option<&Mark> {
        self.marks.get(topic)?.get(group_field)?.get(&partition)
    }

    /// Every mark: source topic, partition, group field.
    pub fn marks(&self) -> impl Iterator<Item = (&str, i32, &str, &Mark)> {
        self.marks.iter().flat_map(|(topic, groups)| {
            groups.iter().flat_map(move |(group, partitions)| {
                partitions.iter().map(move |(partition, mark)| {
                    (topic.as_str(), *partition, group.as_str(), mark)
                })
            })
        })
    }

    pub fn mark_count(&self) -> usize {
        self.marks
            .values()
            .flat_map(BTreeMap::values)
            .map(BTreeMap::len)
            .sum()
    }

    /// Raises the mark of a source and group to `next_offset`: the events before it counted
    /// already (a backfill swapped in read them).
    pub fn raise_mark(&mut self, topic: &str, partition: i32, group_field: &str, next_offset: i64) {
        self.marks_of(topic, group_field)
            .entry(partition)
            .and_modify(|mark| mark.next_offset = mark.next_offset.max(next_offset))
            .or_insert(Mark {
                next_offset,
                epoch: Epoch::default(),
                watermark_ms: None,
                clock_ms: None,
            });
    }

    /// Sets a mark, as a stored state gives it back.
    pub fn insert_mark(&mut self, topic: &str, partition: i32, group_field: &str, mark: Mark) {
        self.marks_of(topic, group_field).insert(partition, mark);
    }

    fn marks_of(&mut self, topic: &str, group_field: &str) -> &mut BTreeMap<i32, Mark> {
        if !self.marks.contains_key(topic) {
            self.marks.insert(topic.to_string(), BTreeMap::new());
        }
        let groups = self.marks.get_mut(topic).expect("inserted above");
        if !groups.contains_key(group_field) {
            groups.insert(group_field.to_string(), BTreeMap::new());
        }
        groups.get_mut(group_field).expect("inserted above")
    }

    /// Takes what a record says of its source: its event applied (`applied`), or only its
    /// time; a record of time alone (`time_only`) says every event of its group before its
    /// offset was sent ahead of it. Returns whether anything changed.
    pub fn note(&mut self, record: &Forwarded<'_>, applied: bool, time_only: bool) -> bool {
        let mut changed = false;
        for (topic, partitions) in record.topics.iter() {
            if self.topics.get(topic) != Some(&partitions) {
                self.topics.insert(topic.to_string(), partitions);
                changed = true;
            }
        }
        let marks = self.marks_of(record.topic, record.group_field);
        let mark = marks.entry(record.partition).or_insert_with(|| {
            changed = true;
            Mark {
                next_offset: 0,
                epoch: record.epoch,
                watermark_ms: None,
                clock_ms: None,
            }
        });
        if record.epoch < mark.epoch {
            // An owner cut off from the group: its time says nothing of the partition's now.
            return changed;
        }
        let before = *mark;
        mark.epoch = record.epoch;
        if applied {
            mark.next_offset = mark.next_offset.max(record.offset + 1);
        } else if time_only {
            mark.next_offset = mark.next_offset.max(record.offset);
        }
        mark.watermark_ms = later(mark.watermark_ms, record.watermark_ms);
        mark.clock_ms = later(mark.clock_ms, record.clock_ms);
        changed || *mark != before
    }

    /// The smallest watermark and clock of the sources, once every partition of every input
    /// topic has reported; `None` until then. A source's time is the latest any of its marks
    /// heard.
    pub fn time(&self) -> Option<(EpochMillis, EpochMillis)> {
        if self.topics.is_empty() {
            return None;
        }
        // Per source partition: the latest watermark and clock heard.
        type Heard = (Option<EpochMillis>, Option<EpochMillis>);
        let mut sources: BTreeMap<(&str, i32), Heard> = BTreeMap::new();
        for (topic, partition, _, mark) in self.marks() {
            let heard = sources.entry((topic, partition)).or_default();
            heard.0 = later(heard.0, mark.watermark_ms);
            heard.1 = later(heard.1, mark.clock_ms);
        }
        let mut watermark = EpochMillis::MAX;
        let mut clock = EpochMillis::MAX;
        for (topic, partitions) in &self.topics {
            for partition in 0..*partitions {
                let partition = i32::try_from(partition).ok()?;
                let (source_watermark, source_clock) = sources.get(&(topic.as_str(), partition))?;
                // A source that never had an event counts with its clock (the wall clock once
                // idle): an empty partition must not hold the others' time back for ever.
                watermark = watermark.min(source_watermark.or(*source_clock)?);
                clock = clock.min(source_clock.or(*source_watermark)?);
            }
        }
        Some((watermark, clock.max(watermark)))
    }
}

fn later(a: Option<EpochMillis>, b: Option<EpochMillis>) -> Option<EpochMillis> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> &'static str {
        "events:2"
    }

    fn record(topics: &str, partition: i32, offset: i64, epoch: i64) -> Forwarded<'_> {
        Forwarded {
            group: 0,
            group_field: "team_id",
            topic: "events",
            partition,
            offset,
            epoch: Epoch {
                resumed_from: epoch,
                taken_at_ms: 0,
            },
            watermark_ms: Some(1_000 + offset),
            clock_ms: Some(1_000 + offset),
            topics: Inputs::parse(topics).expect("well formed"),
        }
    }

    #[test]
    fn each_source_offset_is_applied_once_whoever_sends_it_again() {
        let topics = topics();
        let mut upstream = Upstream::default();
        // The first owner (resumed from 0) sends offsets 0..5.
        for offset in 0..5 {
            let sent = record(topics, 0, offset, 0);
            assert!(upstream.admits(&sent));
            upstream.note(&sent, true, false);
        }
        // Its successor resumed from its last stored offset, 3: 3 and 4 were applied.
        let again: Vec<bool> = (3..7)
            .map(|offset| {
                let sent = record(topics, 0, offset, 3);
                let admitted = upstream.admits(&sent);
                upstream.note(&sent, admitted, false);
                admitted
            })
            .collect();
        assert_eq!(again, [false, false, true, true]);
        // The first owner, cut off, lands offsets 7 and 8 late: its successor sends them.
        assert!(!upstream.admits(&record(topics, 0, 7, 0)));
        assert!(upstream.admits(&record(topics, 0, 7, 3)));
    }

    #[test]
    fn time_is_the_slowest_source_once_every_partition_reported() {
        let topics = topics();
        let mut upstream = Upstream::default();
        assert_eq!(upstream.time(), None);
        upstream.note(&record(topics, 1, 500, 0), true, false);
        assert_eq!(upstream.time(), None, "partition 0 has not reported");
        upstream.note(&record(topics, 0, 20, 0), true, false);
        assert_eq!(upstream.time(), Some((1_020, 1_020)));
        // A watermark never goes back, whatever a record says.
        let mut older = record(topics, 0, 21, 0);
        older.watermark_ms = Some(10);
        upstream.note(&older, true, false);
        assert_eq!(upstream.time(), Some((1_020, 1_021)));
        // A partition added to the input topic holds time until it reports.
        upstream.note(&record("events:3", 1, 501, 0), true, false);
        assert_eq!(upstream.time(), None);
    }

    #[test]
    fn a_record_of_time_alone_moves_its_groups_mark_to_the_sources_next_offset() {
        let topics = topics();
        let mut upstream = Upstream::default();
        upstream.note(&record(topics, 0, 10, 0), true, false);
        // The source read up to 40 and forwarded nothing more of this group: 40 it says.
        upstream.note(&record(topics, 0, 40, 0), false, true);
        assert_eq!(
            upstream.mark("events", 0, "team_id").map(|m| m.next_offset),
            Some(40)
        );
        assert!(!upstream.admits(&record(topics, 0, 39, 0)), "sent again");
        // An event refused is done with; one only passed on (a group no longer counted) is not.
        upstream.note(&record(topics, 0, 45, 0), false, false);
        assert_eq!(
            upstream.mark("events", 0, "team_id").map(|m| m.next_offset),
            Some(40)
        );
        // A backfill swapped in raises it; a mark never goes back.
        upstream.raise_mark("events", 1, "team_id", 7);
        upstream.raise_mark("events", 0, "team_id", 30);
        assert_eq!(
            upstream.mark("events", 1, "team_id").map(|m| m.next_offset),
            Some(7)
        );
        assert_eq!(
            upstream.mark("events", 0, "team_id").map(|m| m.next_offset),
            Some(40)
        );
    }

    #[test]
    fn inputs_read_back_as_written_and_malformed_lists_are_refused() {
        let inputs = [("events".to_string(), 8), ("app:events".to_string(), 2)];
        let text = Inputs::text_of(&inputs);
        let read: Vec<(&str, u32)> = Inputs::parse(&text).expect("well formed").iter().collect();
        assert_eq!(read, [("events", 8), ("app:events", 2)]);
        assert!(Inputs::parse("events:8,other").is_none());
        assert!(Inputs::parse("events:x").is_none());
        assert_eq!(Inputs::parse("").expect("none").iter().count(), 0);
    }

    #[test]
    fn an_older_owner_moves_neither_offsets_nor_time() {
        let topics = topics();
        let mut upstream = Upstream::default();
        upstream.note(&record(topics, 0, 10, 5), true, false);
        upstream.note(&record(topics, 1, 10, 5), true, false);
        let stale = record(topics, 0, 50, 4);
        assert!(!upstream.admits(&stale));
        assert!(!upstream.note(&stale, false, true));
        assert_eq!(upstream.time(), Some((1_010, 1_010)));
    }
}
