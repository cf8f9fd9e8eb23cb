//! Metrics counting an entity the message key does not hold, through the two stages of the
//! repartition topic (docs/design/repartition.md), driven as the pipeline drives them: input
//! partitions forward, repartition partitions count.

use std::collections::BTreeMap;

use super::plan::{EngineSettings, MessageKey};
use super::*;
use crate::metric::{Clause, FieldPath, Filter, FilterField, Literal, MetricDef, MetricKind, Role};
use crate::window::{Calendar, CalendarUnit};

const HOUR: i64 = 3_600_000;
const NOW_MS: i64 = 1_795_435_200_000; // 2026-11-23T12:00:00Z, a Monday
const INPUTS: i32 = 2;
const REPARTITIONS: u64 = 3;
const USERS: u32 = 24;
const TEAMS: u32 = 4;
const TOPIC: &str = "events";
const REPARTITION_TOPIC: &str = "nsm-repartition";

const ACTIVE_TEAMS: usize = 0;
const COLLABORATIVE_TEAMS: usize = 1;
const ACTIVE_USERS: usize = 2;
const MESSAGES: usize = 3;
/// Teams with at least 3 messages: a count, which a record applied twice would change.
const BUSY_TEAMS: usize = 4;

fn path(text: &str) -> FieldPath {
    FieldPath::parse(text).expect("path")
}

fn metric(name: &str, kind: MetricKind) -> MetricDef {
    MetricDef {
        name: name.into(),
        role: Role::Input,
        owner: None,
        description: String::new(),
        kind,
        filter: Filter {
            clauses: vec![Clause {
                field: FilterField::EventName,
                any_of: vec![Literal::Text("message_sent".into())],
            }],
            ..Filter::default()
        },
        window: CalendarUnit::Week,
        trailing: None,
        segments: None,
    }
}

/// Events keyed by user; teams counted.
fn plan(message_key: Option<MessageKey>) -> Plan {
    let metrics = vec![
        metric(
            "active_teams",
            MetricKind::Distinct {
                field: path("team_id"),
            },
        ),
        metric(
            "collaborative_teams",
            MetricKind::Threshold {
                entity: path("team_id"),
                actor: Some(path("user_id")),
                at_least: 3,
            },
        ),
        metric(
            "active_users",
            MetricKind::Distinct {
                field: path("user_id"),
            },
        ),
        metric("messages", MetricKind::Count),
        metric(
            "busy_teams",
            MetricKind::Threshold {
                entity: path("team_id"),
                actor: None,
                at_least: 3,
            },
        ),
    ];
    Plan::new(
        metrics,
        EngineSettings {
            event_name_field: path("event"),
            timestamp_field: path("timestamp"),
            timestamp_format: Default::default(),
            calendar: Calendar::new("UTC", jiff::civil::Weekday::Monday).expect("zone"),
            allowed_lateness_ms: HOUR,
            retention_ms: 35 * 24 * HOUR,
            max_future_skew_ms: HOUR,
            max_event_bytes: 4096,
            dedup: None,
            message_key,
        },
    )
}

fn keyed_by_user() -> Option<MessageKey> {
    Some(MessageKey {
        field: path("user_id"),
        nested: Vec::new(),
    })
}

/// User `u` is in team `(u / 2) % TEAMS` and keyed to input partition `u % INPUTS`: every team
/// has users in both input partitions.
fn team_of(user: u32) -> u32 {
    (user / 2) % TEAMS
}

fn event(user: u32, time_ms: i64) -> Vec<u8> {
    format!(
        r#"{{"event":"message_sent","user_id":"u{user}","team_id":"t{}","timestamp":{time_ms}}}"#,
        team_of(user)
    )
    .into_bytes()
}

fn input(partition: i32) -> PartitionKey {
    PartitionKey::new(TOPIC, partition)
}

fn repartition(partition: u64) -> PartitionKey {
    PartitionKey::new(REPARTITION_TOPIC, i32::try_from(partition).expect("small"))
}

/// A record of the repartition topic, as an input partition's owner sent it.
#[derive(Clone)]
struct Sent {
    group: usize,
    partition: i32,
    offset: i64,
    epoch: Epoch,
    watermark_ms: Option<EpochMillis>,
    clock_ms: Option<EpochMillis>,
    payload: Vec<u8>,
}

/// Both stages in one engine, with the repartition topic's partitions as logs.
struct Cluster {
    engine: Engine,
    topics: String,
    logs: Vec<Vec<Sent>>,
    /// Per repartition partition: the records applied so far.
    read: Vec<usize>,
    /// Per input partition: its next offset and its owner's epoch.
    offsets: Vec<i64>,
    epochs: Vec<Epoch>,
}

impl Cluster {
    fn new(plan: Plan) -> Cluster {
        let mut engine = Engine::new(plan);
        for partition in 0..INPUTS {
            engine.restore_partition(input(partition), PartitionSnapshot::default());
        }
        for partition in 0..REPARTITIONS {
            engine.restore_partition(repartition(partition), PartitionSnapshot::default());
        }
        Cluster {
            engine,
            topics: format!("{TOPIC}:{INPUTS}"),
            logs: vec![Vec::new(); REPARTITIONS as usize],
            read: vec![0; REPARTITIONS as usize],
            offsets: vec![0; INPUTS as usize],
            epochs: vec![Epoch::default(); INPUTS as usize],
        }
    }

    /// Reads an event at the input partition's next offset and forwards it.
    fn read(&mut self, partition: i32, payload: &[u8]) -> Outcome {
        let key = input(partition);
        let offset = self.offsets[partition as usize];
        self.offsets[partition as usize] += 1;
        let outcome = self.engine.apply(&key, offset, payload, NOW_MS);
        if let Outcome::Applied { forward, .. } = &outcome {
            let (watermark_ms, clock_ms) = self.engine.source_time(&key);
            for (group, hash) in &forward.0 {
                self.logs[(hash % REPARTITIONS) as usize].push(Sent {
                    group: *group,
                    partition,
                    offset,
                    epoch: self.epochs[partition as usize],
                    watermark_ms,
                    clock_ms,
                    payload: payload.to_vec(),
                });
            }
        }
        outcome
    }

    /// A new owner takes input partition `partition` and resumes it from `offset` (its last
    /// stored one): the events from there are read, and forwarded, again.
    fn take_over(&mut self, partition: i32, offset: i64, taken_at_ms: EpochMillis) {
        self.offsets[partition as usize] = offset;
        self.epochs[partition as usize] = Epoch {
            resumed_from: offset,
            taken_at_ms,
        };
    }

    /// Every input partition's time, to every repartition partition.
    fn send_time(&mut self) {
        for partition in 0..INPUTS {
            let (watermark_ms, clock_ms) = self.engine.source_time(&input(partition));
            for log in &mut self.logs {
                log.push(Sent {
                    group: 0,
                    partition,
                    offset: self.offsets[partition as usize],
                    epoch: self.epochs[partition as usize],
                    watermark_ms,
                    clock_ms,
                    payload: Vec::new(),
                });
            }
        }
    }

    /// The repartition partitions apply what was sent to them.
    fn count(&mut self) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        for (partition, log) in self.logs.iter().enumerate() {
            for (offset, sent) in log.iter().enumerate().skip(self.read[partition]) {
                let forwarded = Forwarded {
                    group: sent.group,
                    group_field: if sent.payload.is_empty() {
                        ""
                    } else {
                        "team_id"
                    },
                    topic: TOPIC,
                    partition: sent.partition,
                    offset: sent.offset,
                    epoch: sent.epoch,
                    watermark_ms: sent.watermark_ms,
                    clock_ms: sent.clock_ms,
                    topics: Inputs::parse(&self.topics).expect("well formed"),
                };
                outcomes.push(self.engine.apply_forwarded(
                    &repartition(partition as u64),
                    offset as i64,
                    &sent.payload,
                    &crate::event::NoRecord::default(),
                    &forwarded,
                    NOW_MS,
                ));
            }
            self.read[partition] = log.len();
        }
        outcomes
    }

    fn current(&self, metric: usize) -> f64 {
        self.engine.metric_values(NOW_MS)[metric]
            .current
            .value
            .to_f64()
    }
}

fn events() -> Vec<(i32, Vec<u8>)> {
    (0..3)
        .flat_map(|round| (0..USERS).map(move |user| (user, round)))
        .map(|(user, round)| {
            let time_ms = NOW_MS - 3 * HOUR + i64::from(round * USERS + user) * 60_000;
            ((user % INPUTS as u32) as i32, event(user, time_ms))
        })
        .collect()
}

#[test]
fn metrics_counting_another_entity_than_the_key_are_re_keyed_and_their_retention_with_them() {
    let keyed = plan(keyed_by_user());
    assert_eq!(keyed.rekey_fields(), [path("team_id")]);
    assert_eq!(keyed.route(ACTIVE_TEAMS), Route::Rekeyed(0));
    assert_eq!(keyed.route(COLLABORATIVE_TEAMS), Route::Rekeyed(0));
    assert_eq!(keyed.route(ACTIVE_USERS), Route::Local);
    assert_eq!(keyed.route(MESSAGES), Route::Local);
    assert_eq!(keyed.route(BUSY_TEAMS), Route::Rekeyed(0));
    let nested = plan(Some(MessageKey {
        field: path("user_id"),
        nested: vec![path("team_id")],
    }));
    assert!(
        nested.rekey_fields().is_empty(),
        "each team in one key value"
    );
    assert!(plan(None).rekey_fields().is_empty(), "the key is not known");
}

#[test]
fn teams_spread_over_partitions_count_once_through_the_repartition_topic() {
    let mut per_partition = Cluster::new(plan(None));
    let mut cluster = Cluster::new(plan(keyed_by_user()));
    for (partition, payload) in events() {
        per_partition.read(partition, &payload);
        cluster.read(partition, &payload);
    }
    cluster.send_time();
    cluster.count();
    // Summed per partition, each team counts once in each input partition.
    assert_eq!(per_partition.current(ACTIVE_TEAMS), f64::from(TEAMS * 2));
    assert_eq!(cluster.current(ACTIVE_TEAMS), f64::from(TEAMS));
    // Each team has 6 users, 3 in each input partition: a threshold of 3 users per partition
    // happens to hold there too; the count through the repartition topic holds by users.
    assert_eq!(cluster.current(COLLABORATIVE_TEAMS), f64::from(TEAMS));
    assert_eq!(cluster.current(ACTIVE_USERS), f64::from(USERS));
    assert_eq!(cluster.current(MESSAGES), f64::from(3 * USERS));
}

#[test]
fn a_threshold_of_users_reached_only_across_partitions_counts() {
    // Teams of 4 users, 2 in each input partition: no partition alone sees 3 users of a team.
    let team_events = |user: u32| {
        format!(
            r#"{{"event":"message_sent","user_id":"u{user}","team_id":"t{}","timestamp":{}}}"#,
            user / 4,
            NOW_MS - HOUR
        )
        .into_bytes()
    };
    let mut per_partition = Cluster::new(plan(None));
    let mut cluster = Cluster::new(plan(keyed_by_user()));
    for user in 0..16 {
        let partition = (user % 2) as i32;
        per_partition.read(partition, &team_events(user));
        cluster.read(partition, &team_events(user));
    }
    cluster.count();
    assert_eq!(per_partition.current(COLLABORATIVE_TEAMS), 0.0);
    assert_eq!(cluster.current(COLLABORATIVE_TEAMS), 4.0);
}

#[test]
fn records_sent_again_by_a_new_owner_or_late_by_a_cut_off_one_count_once() {
    let mut cluster = Cluster::new(plan(keyed_by_user()));
    let events = events();
    let (first, rest) = events.split_at(events.len() / 2);
    for (partition, payload) in first {
        cluster.read(*partition, payload);
    }
    cluster.count();
    // Input partition 0's owner stored offset 4 last; a new owner reads from there again.
    let cut_off = cluster.epochs[0];
    let old_offset = cluster.offsets[0];
    cluster.take_over(0, 4, NOW_MS);
    let again: Vec<Vec<u8>> = first
        .iter()
        .filter(|(partition, _)| *partition == 0)
        .skip(4)
        .map(|(_, payload)| payload.clone())
        .collect();
    for payload in &again {
        cluster.read(0, payload);
    }
    let outcomes = cluster.count();
    assert!(
        outcomes.iter().all(|outcome| *outcome == Outcome::Resent),
        "{outcomes:?}"
    );
    for (partition, payload) in rest {
        cluster.read(*partition, payload);
    }
    // The cut-off owner lands one more record late, for an offset its successor sends too.
    let late = Sent {
        group: 0,
        partition: 0,
        offset: old_offset,
        epoch: cut_off,
        watermark_ms: Some(NOW_MS),
        clock_ms: Some(NOW_MS),
        payload: event(0, NOW_MS - HOUR),
    };
    cluster.logs[0].push(late);
    cluster.send_time();
    cluster.count();
    assert_eq!(cluster.current(ACTIVE_TEAMS), f64::from(TEAMS));
    assert_eq!(cluster.current(COLLABORATIVE_TEAMS), f64::from(TEAMS));
    assert_eq!(cluster.current(ACTIVE_USERS), f64::from(USERS));
}

#[test]
fn a_slow_input_partitions_events_are_not_late_where_they_are_counted() {
    let mut cluster = Cluster::new(plan(keyed_by_user()));
    // Both input partitions start three hours back; then partition 0 catches up to now
    // while partition 1 is still three hours back (a backlog being read). The allowed
    // lateness is one hour.
    cluster.read(0, &event(0, NOW_MS - 3 * HOUR));
    cluster.read(1, &event(1, NOW_MS - 3 * HOUR));
    for user in (0..USERS).filter(|user| user % 2 == 0) {
        cluster.read(0, &event(user, NOW_MS - 10 * 60_000));
    }
    cluster.send_time();
    cluster.count();
    for user in (0..USERS).filter(|user| user % 2 == 1) {
        cluster.read(1, &event(user, NOW_MS - 3 * HOUR + 60_000));
    }
    let outcomes = cluster.count();
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, Outcome::Applied { .. })),
        "{outcomes:?}"
    );
    assert_eq!(cluster.current(ACTIVE_TEAMS), f64::from(TEAMS));
    // A repartition partition's watermark is its slowest source's.
    cluster.send_time();
    cluster.count();
    let statuses = cluster.engine.partition_status();
    let watermark = |key: &PartitionKey| {
        statuses
            .iter()
            .find(|status| status.key == *key)
            .and_then(|status| status.watermark_ms)
    };
    assert_eq!(watermark(&repartition(0)), Some(NOW_MS - 3 * HOUR + 60_000));
    assert_eq!(watermark(&input(0)), Some(NOW_MS - 10 * 60_000));
}

#[test]
fn a_repartition_partitions_marks_are_stored_with_it_and_skip_records_after_a_restore() {
    let mut cluster = Cluster::new(plan(keyed_by_user()));
    for (partition, payload) in events() {
        cluster.read(partition, &payload);
    }
    cluster.count();
    let changes = cluster.engine.take_changes();
    let stored = changes
        .partitions
        .iter()
        .find(|part| part.key == repartition(0))
        .expect("the repartition partition changed");
    let upstream = stored.upstream.clone().expect("its marks changed");
    let last = cluster.logs[0].last().expect("records").clone();
    assert_eq!(
        upstream
            .mark(TOPIC, last.partition, "team_id")
            .expect("the mark")
            .next_offset,
        last.offset + 1
    );
    // Restored elsewhere, it skips a record sent again.
    let mut restored = Engine::new(plan(keyed_by_user()));
    restored.restore_partition(
        repartition(0),
        PartitionSnapshot {
            next_offset: stored.next_offset,
            upstream: Some(upstream),
            ..PartitionSnapshot::default()
        },
    );
    let topics = format!("{TOPIC}:{INPUTS}");
    let forwarded = Forwarded {
        group: 0,
        group_field: "team_id",
        topic: TOPIC,
        partition: last.partition,
        offset: last.offset,
        epoch: last.epoch,
        watermark_ms: last.watermark_ms,
        clock_ms: last.clock_ms,
        topics: Inputs::parse(&topics).expect("well formed"),
    };
    let outcome = restored.apply_forwarded(
        &repartition(0),
        stored.next_offset.expect("an offset"),
        &last.payload,
        &crate::event::NoRecord::default(),
        &forwarded,
        NOW_MS,
    );
    assert_eq!(outcome, Outcome::Resent);
}

/// What a step of the random run does.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Input partition 0 or 1 reads its next event.
    Read(i32),
    /// The repartition partitions apply what was sent to them.
    Count,
    /// A new owner takes an input partition and sends again what was sent from `back`
    /// records before its last one; the cut-off owner lands one more of them late.
    TakeOver { partition: i32, back: usize },
    /// The input partitions send their time.
    SendTime,
}

fn step_strategy() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..INPUTS).prop_map(Step::Read),
        2 => Just(Step::Count),
        1 => (0..INPUTS, 0usize..8).prop_map(|(partition, back)| Step::TakeOver { partition, back }),
        1 => Just(Step::SendTime),
    ]
}

impl Cluster {
    /// A new owner of `partition` sends again its last `back` forwarded records, as it reads
    /// their events again from its stored offset; the old owner lands one of them late.
    fn take_over_and_resend(&mut self, partition: i32, back: usize, taken_at_ms: EpochMillis) {
        let old = self.epochs[partition as usize];
        // Each event the partition forwarded, once, with the repartition partition it went to.
        let mut sent: BTreeMap<i64, (usize, Sent)> = BTreeMap::new();
        for (target, log) in self.logs.iter().enumerate() {
            for record in log {
                if record.partition == partition && !record.payload.is_empty() {
                    sent.entry(record.offset)
                        .or_insert_with(|| (target, record.clone()));
                }
            }
        }
        let Some(&last) = sent.keys().next_back() else {
            return;
        };
        let from = last - back as i64;
        let epoch = Epoch {
            resumed_from: from.max(old.resumed_from),
            taken_at_ms,
        };
        self.epochs[partition as usize] = epoch;
        let again: Vec<(usize, Sent)> = sent.range(from..).map(|(_, sent)| sent.clone()).collect();
        for (target, record) in &again {
            self.logs[*target].push(Sent {
                epoch,
                ..record.clone()
            });
        }
        if let Some((target, late)) = again.first() {
            self.logs[*target].push(Sent {
                epoch: old,
                ..late.clone()
            });
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 96, ..Default::default() })]

    #[test]
    fn re_keyed_counts_equal_the_streams_whatever_the_order_resends_and_take_overs(
        events in proptest::collection::vec((0u32..30, 0u32..6, 0i64..90), 1..80),
        steps in proptest::collection::vec(step_strategy(), 0..160),
    ) {
        let mut cluster = Cluster::new(plan(keyed_by_user()));
        let mut logs: Vec<Vec<Vec<u8>>> = vec![Vec::new(); INPUTS as usize];
        for (user, team, minutes) in &events {
            let payload = format!(
                r#"{{"event":"message_sent","user_id":"u{user}","team_id":"t{team}","timestamp":{}}}"#,
                NOW_MS - 2 * HOUR + minutes * 60_000
            );
            logs[(user % INPUTS as u32) as usize].push(payload.into_bytes());
        }
        let mut cursors = vec![0usize; INPUTS as usize];
        let mut accepted: Vec<(u32, u32)> = Vec::new();
        let mut read = |cluster: &mut Cluster, partition: i32, cursors: &mut Vec<usize>| {
            let cursor = &mut cursors[partition as usize];
            let Some(payload) = logs[partition as usize].get(*cursor) else {
                return;
            };
            *cursor += 1;
            if let Outcome::Applied { .. } = cluster.read(partition, payload) {
                let text = std::str::from_utf8(payload).expect("utf8");
                let field = |name: &str| -> u32 {
                    let start = text.find(&format!("\"{name}\":\"")).expect("field") + name.len() + 5;
                    text[start..].split('"').next().expect("value").parse().expect("number")
                };
                accepted.push((field("user_id"), field("team_id")));
            }
        };
        let mut clock = NOW_MS - HOUR;
        for step in steps {
            match step {
                Step::Read(partition) => read(&mut cluster, partition, &mut cursors),
                Step::Count => {
                    for outcome in cluster.count() {
                        proptest::prop_assert!(
                            matches!(outcome, Outcome::Applied { .. } | Outcome::Resent),
                            "{outcome:?}"
                        );
                    }
                }
                Step::TakeOver { partition, back } => {
                    clock += 1;
                    cluster.take_over_and_resend(partition, back, clock);
                }
                Step::SendTime => cluster.send_time(),
            }
        }
        for partition in 0..INPUTS {
            while cursors[partition as usize] < logs[partition as usize].len() {
                read(&mut cluster, partition, &mut cursors);
            }
        }
        cluster.send_time();
        for outcome in cluster.count() {
            proptest::prop_assert!(
                matches!(outcome, Outcome::Applied { .. } | Outcome::Resent),
                "{outcome:?}"
            );
        }
        let teams: std::collections::BTreeSet<u32> = accepted.iter().map(|(_, team)| *team).collect();
        let mut senders: std::collections::BTreeMap<u32, std::collections::BTreeSet<u32>> = Default::default();
        for (user, team) in &accepted {
            senders.entry(*team).or_default().insert(*user);
        }
        let collaborative = senders.values().filter(|users| users.len() >= 3).count();
        let mut messages: BTreeMap<u32, usize> = BTreeMap::new();
        for (_, team) in &accepted {
            *messages.entry(*team).or_default() += 1;
        }
        let busy = messages.values().filter(|count| **count >= 3).count();
        proptest::prop_assert_eq!(cluster.current(BUSY_TEAMS), busy as f64);
        proptest::prop_assert_eq!(cluster.current(ACTIVE_TEAMS), teams.len() as f64);
        proptest::prop_assert_eq!(cluster.current(COLLABORATIVE_TEAMS), collaborative as f64);
        proptest::prop_assert_eq!(cluster.current(MESSAGES), accepted.len() as f64);
    }
}
