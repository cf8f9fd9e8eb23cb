//! The engine against a naive batch oracle over random streams.
//!
//! Streams span the Berlin DST fall-back, the spring-forward or a month's end, arrive out of
//! order within and beyond the allowed lateness, repeat earlier messages (late ones
//! included), mix in invalid events, and are consumed with crashes: unflushed state is lost,
//! the engine restarts from what was stored, and Kafka redelivers from an older committed
//! offset. Whatever happens, the stored windows must equal a batch recomputation over each
//! partition's log.
//!
//! With the message key known, the same streams go through the repartition topic's two
//! stages: the metrics counting users or teams, spread over both input partitions, must then
//! equal the batch recomputation over the whole stream, and the others each partition's.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use nsm_core::decimal::Decimal;
use nsm_core::engine::{
    last_occurrence_bucket, segment_label, MemoryReader, StateReader, StoredGap, StoredSegment,
    StoredWindow, OVERFLOW_LABEL,
};
use nsm_core::engine::{
    AggValue, ChangeSet, DedupSettings, Engine, EngineSettings, Epoch, Forwarded, Inputs,
    MessageKey, Outcome, PartitionSnapshot, Plan, Route,
};
use nsm_core::metric::{
    Clause, Comparison, Condition, FieldPath, Filter, FilterField, Literal, MetricDef, MetricKind,
    Role, Segmentation, Test,
};
use nsm_core::query::windows_between;
use nsm_core::timestamp::{EpochUnit, TimestampFormat, TimestampSource};
use nsm_core::window::{Calendar, CalendarUnit, Trailing};
use nsm_core::PartitionKey;
use proptest::prelude::*;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const LATENESS: i64 = HOUR;
const PARTITIONS: i32 = 2;
const EVENT_NAMES: [&str; 3] = ["message_sent", "payment", "page_viewed"];
/// Ids come from a small space, so different events share ids (counted once within the
/// horizon) as well as repeated messages do.
const ID_SPACE: u8 = 60;
const DEDUP_HORIZON: i64 = 2 * HOUR;

fn path(text: &str) -> FieldPath {
    FieldPath::parse(text).expect("path")
}

fn metric(name: &str, kind: MetricKind, event: Option<&str>, window: CalendarUnit) -> MetricDef {
    let clauses = event
        .map(|event| {
            vec![Clause {
                field: FilterField::EventName,
                any_of: vec![Literal::Text(event.into())],
            }]
        })
        .unwrap_or_default();
    MetricDef {
        name: name.into(),
        role: Role::Input,
        owner: None,
        description: String::new(),
        kind,
        filter: Filter {
            clauses,
            ..Filter::default()
        },
        window,
        trailing: None,
        segments: None,
    }
}

/// Breakdowns: weekly messagers and daily revenue by team, hourly messages by team and a
/// field no event has (a "(none)" segment); by team as well every other kind: the events a
/// ratio divides, the ratio, both thresholds, the retention, the conversion and every
/// trailing metric.
fn metrics() -> Vec<MetricDef> {
    let mut metrics = unsegmented_metrics();
    // The tests a `where` has besides equality: messages of everybody but user-1 under 80.00;
    // payers of at least 20.00 whose id starts with "user-" and whose event has no coupon.
    let condition = |field: &str, test: Test| Condition {
        field: FilterField::Path(path(field)),
        test,
    };
    let number = |text: &str| Decimal::parse(text).expect("decimal");
    metrics[2].filter.conditions = vec![
        condition(
            "user_id",
            Test::NoneOf(vec![Literal::Text("user-1".into())]),
        ),
        condition(
            "properties.amount",
            Test::Compare(Comparison::Less, number("80.00")),
        ),
    ];
    metrics[5].filter.conditions = vec![
        condition(
            "properties.amount",
            Test::Compare(Comparison::AtLeast, number("20.00")),
        ),
        condition("user_id", Test::Prefix("user-".into())),
        condition("properties.coupon", Test::Missing),
        condition("team_id", Test::Present),
    ];
    let by = |fields: &[&str]| {
        Some(Segmentation {
            by: fields.iter().map(|field| path(field)).collect(),
            top: 2,
        })
    };
    metrics[0].segments = by(&["team_id"]);
    metrics[2].segments = by(&["team_id", "properties.plan"]);
    for index in [3, 4, RATIO, 7, 8, RETENTION, CONVERSION] {
        metrics[index].segments = by(&["team_id"]);
    }
    for index in [TRAILING_COUNT, TRAILING_SUM, TRAILING_CONVERSION] {
        metrics[index].segments = by(&["team_id"]);
    }
    // By event name, users fall in several segments of one window.
    for index in [
        1,
        TRAILING_DISTINCT,
        TRAILING_RETENTION,
        TRAILING_THRESHOLDS[0],
    ] {
        metrics[index].segments = by(&["event"]);
    }
    metrics[TRAILING_THRESHOLDS[1]].segments = by(&["team_id"]);
    metrics
}

fn unsegmented_metrics() -> Vec<MetricDef> {
    vec![
        metric(
            "weekly_messagers",
            MetricKind::Distinct {
                field: path("user_id"),
            },
            Some("message_sent"),
            CalendarUnit::Week,
        ),
        metric(
            "daily_users",
            MetricKind::Distinct {
                field: path("user_id"),
            },
            None,
            CalendarUnit::Day,
        ),
        metric(
            "messages_hourly",
            MetricKind::Count,
            Some("message_sent"),
            CalendarUnit::Hour,
        ),
        metric("events_daily", MetricKind::Count, None, CalendarUnit::Day),
        metric(
            "revenue_daily",
            MetricKind::Sum {
                field: path("properties.amount"),
            },
            Some("payment"),
            CalendarUnit::Day,
        ),
        metric(
            "monthly_payers",
            MetricKind::Distinct {
                field: path("user_id"),
            },
            Some("payment"),
            CalendarUnit::Month,
        ),
        metric(
            "revenue_per_event",
            MetricKind::Ratio {
                numerator: "revenue_daily".into(),
                denominator: "events_daily".into(),
            },
            None,
            CalendarUnit::Day,
        ),
        metric(
            "teams_with_two_messagers",
            MetricKind::Threshold {
                entity: path("team_id"),
                actor: Some(path("user_id")),
                at_least: 2,
            },
            Some("message_sent"),
            CalendarUnit::Day,
        ),
        metric(
            "users_with_three_events",
            MetricKind::Threshold {
                entity: path("user_id"),
                actor: None,
                at_least: 3,
            },
            None,
            CalendarUnit::Hour,
        ),
        metric(
            "returning_messagers",
            MetricKind::Retention {
                of: "weekly_messagers".into(),
            },
            None,
            CalendarUnit::Week,
        ),
        paid_after_messaging("paid_after_messaging"),
        trailing(
            metric(
                "messages_trailing_3h",
                MetricKind::Count,
                Some("message_sent"),
                CalendarUnit::Day,
            ),
            3 * HOUR,
        ),
        trailing(
            metric(
                "users_trailing_90m",
                MetricKind::Distinct {
                    field: path("user_id"),
                },
                None,
                CalendarUnit::Day,
            ),
            90 * MINUTE,
        ),
        trailing(
            metric(
                "revenue_trailing_2h",
                MetricKind::Sum {
                    field: path("properties.amount"),
                },
                Some("payment"),
                CalendarUnit::Day,
            ),
            2 * HOUR,
        ),
        trailing(
            paid_after_messaging("paid_after_messaging_trailing_3h"),
            3 * HOUR,
        ),
        trailing(
            metric(
                "returning_users_trailing_90m",
                MetricKind::Retention {
                    of: "users_trailing_90m".into(),
                },
                None,
                CalendarUnit::Day,
            ),
            90 * MINUTE,
        ),
        trailing(
            metric(
                "busy_teams_trailing_2h",
                MetricKind::Threshold {
                    entity: path("team_id"),
                    actor: None,
                    at_least: 3,
                },
                None,
                CalendarUnit::Day,
            ),
            2 * HOUR,
        ),
        trailing(
            metric(
                "teams_with_two_users_trailing_90m",
                MetricKind::Threshold {
                    entity: path("team_id"),
                    actor: Some(path("user_id")),
                    at_least: 2,
                },
                None,
                CalendarUnit::Day,
            ),
            90 * MINUTE,
        ),
        // Shorter than the allowed lateness: a late event reaches back several lengths.
        trailing(
            metric(
                "teams_with_two_messagers_trailing_20m",
                MetricKind::Threshold {
                    entity: path("team_id"),
                    actor: Some(path("user_id")),
                    at_least: 2,
                },
                Some("message_sent"),
                CalendarUnit::Day,
            ),
            20 * MINUTE,
        ),
    ]
}

/// Trailing thresholds: teams with at least 3 events in the last 2 hours, teams with at least
/// 2 distinct users in the last 90 minutes, and with 2 messagers in the last 20 minutes.
const TRAILING_THRESHOLDS: [usize; 3] = [16, 17, 18];

/// The teams of one partition qualifying for a threshold metric of teams in `[start, end)`:
/// counted naively from the applied events it matches.
fn qualifying_teams(
    events: &[(usize, u8, i64, u32)],
    def: &MetricDef,
    start: i64,
    end: i64,
) -> u64 {
    let MetricKind::Threshold {
        actor, at_least, ..
    } = &def.kind
    else {
        unreachable!("a threshold metric");
    };
    let (actor, at_least) = (actor.is_some(), *at_least as usize);
    let mut by_team: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    for event @ &(_, user, time_ms, _) in events {
        if start <= time_ms && time_ms < end && wants(def, event) {
            let seen = by_team.entry(team_of(user)).or_default();
            if !actor || !seen.contains(&user) {
                seen.push(user);
            }
        }
    }
    by_team
        .values()
        .filter(|seen| seen.len() >= at_least)
        .count() as u64
}

/// Trailing windows: messages over the last 3 hours, users over the last 90 minutes, revenue
/// over the last 2 hours.
const TRAILING_COUNT: usize = 11;
const TRAILING_DISTINCT: usize = 12;
const TRAILING_SUM: usize = 13;
/// The conversion again, over the last 3 hours of payments.
const TRAILING_CONVERSION: usize = 14;
/// Users of the last 90 minutes also there in the 90 minutes before.
const TRAILING_RETENTION: usize = 15;
/// Every trailing metric; each is broken down by team too.
const TRAILING: [usize; 8] = [
    TRAILING_COUNT,
    TRAILING_DISTINCT,
    TRAILING_SUM,
    TRAILING_CONVERSION,
    TRAILING_RETENTION,
    TRAILING_THRESHOLDS[0],
    TRAILING_THRESHOLDS[1],
    TRAILING_THRESHOLDS[2],
];

fn trailing(metric: MetricDef, length_ms: i64) -> MetricDef {
    MetricDef {
        trailing: Some(Trailing::new(length_ms).expect("trailing length")),
        ..metric
    }
}

/// Users who paid within two hours after sending a message, in the day of the payment.
fn paid_after_messaging(name: &str) -> MetricDef {
    let from = Filter {
        clauses: vec![Clause {
            field: FilterField::EventName,
            any_of: vec![Literal::Text("message_sent".into())],
        }],
        ..Filter::default()
    };
    let kind = MetricKind::Conversion {
        entity: path("user_id"),
        from,
        within_ms: CONVERSION_WITHIN,
    };
    metric(name, kind, Some("payment"), CalendarUnit::Day)
}

/// Users who paid within two hours after sending a message, by the day of the payment.
const CONVERSION: usize = 10;
const CONVERSION_WITHIN: i64 = 2 * HOUR;

/// The retention metric, and the weekly distinct metric it reads.
const RETENTION: usize = 9;
const RETENTION_BASE: usize = 0;

/// The team of a user: users 0, 3 are in team-0, and so on.
fn team_of(user: u8) -> u8 {
    user % 3
}

const RATIO: usize = 6;
const RATIO_PARTS: (usize, usize) = (4, 3);

fn plan() -> Plan {
    plan_keyed_by(None, false)
}

/// The plan, with the message key known (metrics counting another entity go through the
/// repartition topic), or with copies of an event on any partition (`across`: every metric
/// goes through it, and ids are remembered for the whole stream).
fn plan_keyed_by(message_key: Option<MessageKey>, across: bool) -> Plan {
    Plan::new(
        metrics(),
        EngineSettings {
            event_name_field: path("event"),
            timestamp_field: path("timestamp"),
            timestamp_format: timestamp_format(),
            calendar: Calendar::new("Europe/Berlin", jiff::civil::Weekday::Sunday).expect("zone"),
            allowed_lateness_ms: LATENESS,
            retention_ms: 400 * 24 * HOUR,
            max_future_skew_ms: HOUR,
            max_event_bytes: 1024,
            dedup: Some(DedupSettings {
                id_field: path("event_id"),
                horizon_ms: if across {
                    400 * 24 * HOUR
                } else {
                    DEDUP_HORIZON
                },
                across_partitions: across,
            }),
            message_key,
        },
    )
}

/// Where a stream starts (UTC); each crosses a calendar edge of Berlin in its day: the
/// fall-back night and a Sunday week start (Saturday 2026-10-24), the spring-forward night,
/// whose hour from 02:00 does not exist (Saturday 2026-03-28), and a month's end (Sunday
/// 2026-05-31, June starting at 22:00 UTC).
const STARTS: [&str; 3] = [
    "2026-10-24T20:00:00Z",
    "2026-03-28T20:00:00Z",
    "2026-05-31T12:00:00Z",
];

/// How a stream writes its event times, and the config reading them: epoch milliseconds and
/// RFC 3339 in UTC (the defaults), or fractional epoch seconds and RFC 3339 local times
/// without an offset (`events.timestamp_unit = "s"`, `events.timestamp_zone`), in a zone
/// without summer time so that every local time names one instant. Per test thread: a case
/// sets it before it builds its logs and plans.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    Default,
    SecondsAndLocal,
}

const LOCAL_ZONE: &str = "Asia/Kolkata";

thread_local! {
    static ENCODING: Cell<Encoding> = const { Cell::new(Encoding::Default) };
}

fn timestamp_format() -> TimestampFormat {
    match ENCODING.get() {
        Encoding::Default => TimestampFormat::default(),
        Encoding::SecondsAndLocal => TimestampFormat {
            source: TimestampSource::Field,
            unit: EpochUnit::Seconds,
            zone: Some(jiff::tz::TimeZone::get(LOCAL_ZONE).expect("zone")),
        },
    }
}

fn start_ms(start: usize) -> i64 {
    STARTS[start]
        .parse::<jiff::Timestamp>()
        .expect("start")
        .as_millisecond()
}

/// Moves a stream generated from time zero to its start.
fn starting_at(mut messages: Vec<(i32, Message)>, start_ms: i64) -> Vec<(i32, Message)> {
    for (_, message) in &mut messages {
        if let Message::Valid { time_ms, .. } = message {
            *time_ms += start_ms;
        }
    }
    messages
}

#[derive(Debug, Clone)]
enum Message {
    Valid {
        name: usize,
        user: u8,
        time_ms: i64,
        cents: u32,
        /// `None`: the event carries no id and cannot be deduplicated.
        id: Option<u8>,
    },
    Invalid(u8),
    /// The payload of the n-th earlier message of the same partition, again.
    Repeat(usize),
}

impl Message {
    fn payload(&self) -> Vec<u8> {
        match self {
            Message::Valid { name, user, time_ms, cents, id } => {
                let timestamp = jiff::Timestamp::from_millisecond(*time_ms).expect("time");
                // Alternate the two timestamp encodings and number spellings.
                let time = match (ENCODING.get(), user % 2 == 0) {
                    (Encoding::Default, true) => format!("\"{timestamp}\""),
                    (Encoding::Default, false) => time_ms.to_string(),
                    (Encoding::SecondsAndLocal, true) => {
                        let zone = jiff::tz::TimeZone::get(LOCAL_ZONE).expect("zone");
                        format!("\"{}\"", zone.to_datetime(timestamp))
                    }
                    (Encoding::SecondsAndLocal, false) => {
                        format!("{}.{:03}", time_ms.div_euclid(1000), time_ms.rem_euclid(1000))
                    }
                };
                // Ids as text and as numbers: 7 and "7" are different ids.
                let id = match id {
                    None => String::new(),
                    Some(id) if id % 2 == 0 => format!(r#""event_id":{id},"#),
                    Some(id) => format!(r#""event_id":"{}","#, id / 2),
                };
                format!(
                    r#"{{{id}"event":"{}","user_id":"user-{user}","team_id":"team-{}","timestamp":{time},"properties":{{"amount":{}.{:02}}}}}"#,
                    EVENT_NAMES[*name],
                    team_of(*user),
                    cents / 100,
                    cents % 100
                )
                .into_bytes()
            }
            Message::Invalid(variant) => match variant % 4 {
                0 => b"{not json".to_vec(),
                1 => br#"{"event":"payment","user_id":"x","timestamp":"2026-10-25T00:00:00Z","properties":{"amount":"12"}}"#.to_vec(),
                2 => br#"{"event":"message_sent","timestamp":"2026-10-25T00:00:00Z"}"#.to_vec(),
                _ => br#"{"event":"message_sent","user_id":"x","timestamp":"not a time"}"#.to_vec(),
            },
            Message::Repeat(_) => unreachable!("repeats are resolved when the log is built"),
        }
    }
}

/// What the oracle knows a valid message is: event name, user, time, cents, id.
type Truth = (usize, u8, i64, u32, Option<u8>);

/// A partition's Kafka log: payloads, and what the oracle knows each one is.
struct Log {
    payloads: Vec<Vec<u8>>,
    truth: Vec<Option<Truth>>,
}

fn build_logs(messages: &[(i32, Message)]) -> Vec<Log> {
    let mut logs: Vec<Log> = (0..PARTITIONS)
        .map(|_| Log {
            payloads: Vec::new(),
            truth: Vec::new(),
        })
        .collect();
    for (partition, message) in messages {
        let log = &mut logs[*partition as usize];
        let (payload, truth) = match message {
            Message::Repeat(n) if !log.payloads.is_empty() => {
                let index = n % log.payloads.len();
                (log.payloads[index].clone(), log.truth[index])
            }
            Message::Repeat(_) => continue,
            Message::Valid {
                name,
                user,
                time_ms,
                cents,
                id,
            } => (
                message.payload(),
                Some((*name, *user, *time_ms, *cents, *id)),
            ),
            Message::Invalid(_) => (message.payload(), None),
        };
        log.payloads.push(payload);
        log.truth.push(truth);
    }
    logs
}

/// The naive batch recomputation: per partition, walk the log in offset order, drop late
/// events, drop events whose id was kept less than the horizon behind the watermark, then
/// aggregate every accepted event into its windows.
type SegmentKey = (i32, usize, i64, String);

/// The segment values of every window, by partition, metric, start and segment label. A
/// segment's values are the metric's over the events carrying the segment, so the oracle of
/// those events gives them.
fn segment_oracle(logs: &[Log]) -> BTreeMap<SegmentKey, AggValue> {
    let accepted: Vec<Vec<Event>> = logs.iter().map(accepted_events).collect();
    segment_oracle_of(&accepted)
}

fn segment_oracle_of(accepted: &[Vec<Event>]) -> BTreeMap<SegmentKey, AggValue> {
    let defs = metrics();
    let mut result = BTreeMap::new();
    for segment in Segment::ALL {
        let carrying: Vec<Vec<Event>> = accepted
            .iter()
            .map(|events| {
                events
                    .iter()
                    .filter(|event| segment.holds(event))
                    .copied()
                    .collect()
            })
            .collect();
        for ((partition, metric, start_ms), (_, value)) in oracle_of(&carrying) {
            if let Some(label) = segment.label_in(&defs[metric]) {
                result.insert((partition, metric, start_ms, label), value);
            }
        }
    }
    result
}

/// A segment of the breakdowns here: by team, or by event name (a user is in several).
#[derive(Debug, Clone, Copy)]
enum Segment {
    Team(u8),
    Name(usize),
}

impl Segment {
    const ALL: [Segment; 6] = [
        Segment::Team(0),
        Segment::Team(1),
        Segment::Team(2),
        Segment::Name(0),
        Segment::Name(1),
        Segment::Name(2),
    ];

    fn holds(self, event: &Event) -> bool {
        match self {
            Segment::Team(team) => team_of(event.1) == team,
            Segment::Name(name) => event.0 == name,
        }
    }

    /// The label of the segment in a metric broken down its way.
    fn label_in(self, def: &MetricDef) -> Option<String> {
        let by: Vec<String> = def
            .segments
            .as_ref()?
            .by
            .iter()
            .map(ToString::to_string)
            .collect();
        let by: Vec<&str> = by.iter().map(String::as_str).collect();
        match (self, &by[..]) {
            (Segment::Team(team), ["team_id"]) => Some(format!("team-{team}")),
            (Segment::Team(team), ["team_id", _]) => Some(format!("team-{team}/(none)")),
            (Segment::Name(name), ["event"]) => Some(EVENT_NAMES[name].to_string()),
            _ => None,
        }
    }
}

/// Whether the metric's filter takes the event: every test of it, on the fields the oracle
/// knows an event has (and no other).
fn wants(def: &MetricDef, &(name, user, _, cents): &Event) -> bool {
    def.filter.tests().all(|(field, test)| {
        let value = match field {
            FilterField::EventName => Some(Literal::Text(EVENT_NAMES[name].into())),
            FilterField::Path(path) => match path.to_string().as_str() {
                "user_id" => Some(Literal::Text(format!("user-{user}"))),
                "team_id" => Some(Literal::Text(format!("team-{}", team_of(user)))),
                "properties.amount" => Some(Literal::Number(amount(cents))),
                _ => None,
            },
        };
        match (test, value) {
            (Test::AnyOf(values), Some(value)) => values.contains(&value),
            (Test::NoneOf(values), value) => value.is_none_or(|value| !values.contains(&value)),
            (Test::Compare(comparison, bound), Some(Literal::Number(number))) => match comparison {
                Comparison::Greater => number > bound,
                Comparison::AtLeast => number >= bound,
                Comparison::Less => number < bound,
                Comparison::AtMost => number <= bound,
            },
            (Test::Present, value) => value.is_some(),
            (Test::Missing, value) => value.is_none(),
            (Test::Prefix(prefix), Some(Literal::Text(text))) => text.starts_with(&prefix),
            _ => false,
        }
    })
}

/// An event's amount: its cents as a decimal of 9 places.
fn amount(cents: u32) -> Decimal {
    Decimal(i128::from(cents) * 10_000_000)
}

/// An applied event: name, user, time, cents.
type Event = (usize, u8, i64, u32);

/// The events a partition applies, in offset order: not late, not a duplicate.
fn accepted_events(log: &Log) -> Vec<Event> {
    let mut accepted = Vec::new();
    let mut watermark: Option<i64> = None;
    let mut kept_ids: BTreeMap<u8, i64> = BTreeMap::new();
    for (name, user, time_ms, cents, id) in log.truth.iter().flatten().copied() {
        if watermark.is_some_and(|w| time_ms < w - LATENESS) {
            continue;
        }
        if let Some(id) = id {
            let seen = kept_ids.get(&id).copied();
            if seen.is_some_and(|seen| watermark.is_none_or(|w| seen > w - DEDUP_HORIZON)) {
                continue;
            }
            kept_ids.insert(id, time_ms);
        }
        watermark = Some(watermark.map_or(time_ms, |w| w.max(time_ms)));
        accepted.push((name, user, time_ms, cents));
    }
    accepted
}

fn oracle(logs: &[Log]) -> BTreeMap<(i32, usize, i64), (i64, AggValue)> {
    let accepted: Vec<Vec<Event>> = logs.iter().map(accepted_events).collect();
    oracle_of(&accepted)
}

/// Every stored window, from each partition's applied events.
fn oracle_of(accepted: &[Vec<Event>]) -> BTreeMap<(i32, usize, i64), (i64, AggValue)> {
    let plan = plan();
    let calendar = plan.calendar();
    let mut result: BTreeMap<(i32, usize, i64), (i64, AggValue)> = BTreeMap::new();
    let mut members: BTreeMap<(i32, usize, i64), BTreeSet<u8>> = BTreeMap::new();
    // Threshold progress: per window, per entity, the actors seen (or one entry per event).
    let mut progress: BTreeMap<(i32, usize, i64), BTreeMap<u8, Vec<u8>>> = BTreeMap::new();
    let defs = metrics();
    for (partition, events) in accepted.iter().enumerate() {
        let partition = partition as i32;
        for &(name, user, time_ms, cents) in events {
            for (index, def) in defs.iter().enumerate() {
                let derived = [
                    RATIO,
                    RETENTION,
                    CONVERSION,
                    TRAILING_CONVERSION,
                    TRAILING_RETENTION,
                ];
                if derived.contains(&index)
                    || TRAILING_THRESHOLDS.contains(&index)
                    || !wants(def, &(name, user, time_ms, cents))
                {
                    continue;
                }
                let bounds = match &def.trailing {
                    Some(trailing) => trailing.bucket_of(time_ms),
                    None => calendar.window_of(def.window, time_ms).expect("window"),
                };
                let key = (partition, index, bounds.start_ms);
                let zero = match def.kind {
                    MetricKind::Count => AggValue::Count(0),
                    MetricKind::Sum { .. } => AggValue::Sum(Decimal::ZERO),
                    MetricKind::Distinct { .. } | MetricKind::Threshold { .. } => {
                        AggValue::Distinct(0)
                    }
                    MetricKind::Ratio { .. }
                    | MetricKind::Retention { .. }
                    | MetricKind::Conversion { .. } => {
                        unreachable!("derived metrics are skipped")
                    }
                };
                if let MetricKind::Threshold {
                    actor, at_least, ..
                } = &def.kind
                {
                    let entities = progress.entry(key).or_default();
                    let (entity, actor) = match actor {
                        Some(_) => (team_of(user), Some(user)),
                        None => (user, None),
                    };
                    let seen = entities.entry(entity).or_default();
                    match actor {
                        Some(actor) if !seen.contains(&actor) => seen.push(actor),
                        Some(_) => {}
                        None => seen.push(0),
                    }
                    let reached = entities
                        .values()
                        .filter(|seen| seen.len() >= *at_least as usize)
                        .count();
                    result.insert(key, (bounds.end_ms, AggValue::Distinct(reached as u64)));
                    continue;
                }
                let entry = result.entry(key).or_insert((bounds.end_ms, zero));
                entry.1 = match entry.1 {
                    AggValue::Count(n) => AggValue::Count(n + 1),
                    AggValue::Sum(sum) => {
                        AggValue::Sum(Decimal(sum.0 + i128::from(cents) * 10_000_000))
                    }
                    AggValue::Distinct(_) => {
                        let set = members.entry(key).or_default();
                        set.insert(user);
                        AggValue::Distinct(set.len() as u64)
                    }
                    AggValue::Ratio { .. } => unreachable!("ratios keep no windows"),
                };
            }
        }
    }
    // Conversions: a payment counts its user in the payment's day (or 15-minute bucket of the
    // trailing one) when the same user sent a message at most two hours before it (in event
    // time, whatever the arrival order).
    for (partition, events) in accepted.iter().enumerate() {
        for metric in [CONVERSION, TRAILING_CONVERSION] {
            let mut converted: BTreeMap<i64, (i64, BTreeSet<u8>)> = BTreeMap::new();
            for (user, paid_ms) in conversions(events) {
                let window = match metrics()[metric].trailing {
                    Some(trailing) => trailing.bucket_of(paid_ms),
                    None => calendar.window_of(CalendarUnit::Day, paid_ms).expect("day"),
                };
                let entry = converted
                    .entry(window.start_ms)
                    .or_insert((window.end_ms, BTreeSet::new()));
                entry.1.insert(user);
            }
            for (start_ms, (end_ms, users)) in converted {
                result.insert(
                    (partition as i32, metric, start_ms),
                    (end_ms, AggValue::Distinct(users.len() as u64)),
                );
            }
        }
    }
    // Trailing thresholds: each bucket holds the value of the range ending with it, wherever
    // that is not zero (up to a length after the last event).
    for (partition, events) in accepted.iter().enumerate() {
        let mut events = events.clone();
        events.sort_by_key(|event| event.2);
        for metric in TRAILING_THRESHOLDS {
            let def = &metrics()[metric];
            let trailing = def.trailing.expect("trailing");
            let ends: BTreeSet<i64> = events
                .iter()
                .flat_map(|event| {
                    let first = trailing.bucket_of(event.2).end_ms;
                    (0..trailing.length_ms / trailing.step_ms)
                        .map(move |n| first + n * trailing.step_ms)
                })
                .collect();
            for end in ends {
                // Only the events in range, found in the sorted events.
                let start = end - trailing.length_ms;
                let in_range = &events[events.partition_point(|event| event.2 < start)
                    ..events.partition_point(|event| event.2 < end)];
                let reached = qualifying_teams(in_range, def, start, end);
                if reached > 0 {
                    result.insert(
                        (partition as i32, metric, end - trailing.step_ms),
                        (end, AggValue::Distinct(reached)),
                    );
                }
            }
        }
    }
    // Returning messagers: members of a week also in the week before, where there are any.
    let week_unit = metrics()[RETENTION_BASE].window;
    let weeks: Vec<((i32, usize, i64), i64)> = result
        .iter()
        .filter(|((_, metric, _), _)| *metric == RETENTION_BASE)
        .map(|(key, (end_ms, _))| (*key, *end_ms))
        .collect();
    for ((partition, _, start_ms), end_ms) in weeks {
        let bounds = nsm_core::window::WindowBounds { start_ms, end_ms };
        let previous = calendar.previous(week_unit, bounds).expect("previous week");
        let this_week = members.get(&(partition, RETENTION_BASE, start_ms));
        let week_before = members.get(&(partition, RETENTION_BASE, previous.start_ms));
        if let (Some(this_week), Some(week_before)) = (this_week, week_before) {
            let returning = this_week.intersection(week_before).count() as u64;
            if returning > 0 {
                result.insert(
                    (partition, RETENTION, start_ms),
                    (end_ms, AggValue::Count(returning)),
                );
            }
        }
    }
    result
}

/// The segments of a window as `/metrics` shows them, before the top is taken: summed over
/// partitions; a ratio's divide its parts', a retention's its returning users by its base's
/// users of the week before.
fn shown_segments(
    expected: &BTreeMap<SegmentKey, AggValue>,
    metric: usize,
    bounds: nsm_core::window::WindowBounds,
) -> BTreeMap<String, AggValue> {
    let summed = |metric: usize, start_ms: i64| {
        let mut truth: BTreeMap<String, AggValue> = BTreeMap::new();
        for ((_, m, start, label), value) in expected {
            if *m == metric && *start == start_ms {
                let summed = truth.get(label).map_or(*value, |sum| sum.plus(*value));
                truth.insert(label.clone(), summed);
            }
        }
        truth
    };
    let divided = |numerators: BTreeMap<String, AggValue>,
                   denominators: BTreeMap<String, AggValue>,
                   zeros: (AggValue, AggValue)| {
        let labels: BTreeSet<&String> = numerators.keys().chain(denominators.keys()).collect();
        labels
            .into_iter()
            .map(|label| {
                let numerator = numerators.get(label).copied().unwrap_or(zeros.0);
                let denominator = denominators.get(label).copied().unwrap_or(zeros.1);
                (label.clone(), AggValue::ratio(numerator, denominator))
            })
            .collect()
    };
    if metric == RATIO {
        let (numerator, denominator) = RATIO_PARTS;
        divided(
            summed(numerator, bounds.start_ms),
            summed(denominator, bounds.start_ms),
            (AggValue::Sum(Decimal::ZERO), AggValue::Count(0)),
        )
    } else if metric == RETENTION {
        let unit = metrics()[RETENTION_BASE].window;
        let previous = plan()
            .calendar()
            .previous(unit, bounds)
            .expect("previous week");
        divided(
            summed(RETENTION, bounds.start_ms),
            summed(RETENTION_BASE, previous.start_ms),
            (AggValue::Count(0), AggValue::Distinct(0)),
        )
    } else {
        summed(metric, bounds.start_ms)
    }
}

/// A trailing metric's value over a range, from the applied events (those carrying the
/// segment, for a segment), or `None` where a segment has nothing to show: no event for a count or sum, no
/// member for a distinct count, neither a returning user nor one the range before.
fn trailing_truth(
    accepted: &[Vec<Event>],
    metric: usize,
    bounds: nsm_core::window::WindowBounds,
    segment: Option<Segment>,
) -> Option<AggValue> {
    let carrying = |events: &Vec<Event>| -> Vec<Event> {
        events
            .iter()
            .filter(|event| segment.is_none_or(|segment| segment.holds(event)))
            .copied()
            .collect()
    };
    let events: Vec<Vec<Event>> = accepted.iter().map(carrying).collect();
    let inside = |time_ms: i64, bounds: nsm_core::window::WindowBounds| {
        bounds.start_ms <= time_ms && time_ms < bounds.end_ms
    };
    let named = |name: &str| -> Vec<Event> {
        events
            .iter()
            .flatten()
            .filter(|event| EVENT_NAMES[event.0] == name && inside(event.2, bounds))
            .copied()
            .collect()
    };
    // Distinct users per partition, summed: of the events, or of the conversions.
    let users = |bounds: nsm_core::window::WindowBounds| -> Vec<BTreeSet<u8>> {
        events
            .iter()
            .map(|events| {
                events
                    .iter()
                    .filter(|event| inside(event.2, bounds))
                    .map(|event| event.1)
                    .collect()
            })
            .collect()
    };
    let before = nsm_core::window::WindowBounds {
        start_ms: 2 * bounds.start_ms - bounds.end_ms,
        end_ms: bounds.start_ms,
    };
    let shown_if = |shown: bool, value: AggValue| (segment.is_none() || shown).then_some(value);
    match metric {
        TRAILING_COUNT => {
            let messages = named("message_sent").len();
            shown_if(messages > 0, AggValue::Count(messages as u64))
        }
        TRAILING_SUM => {
            let payments = named("payment");
            let cents: i128 = payments.iter().map(|event| i128::from(event.3)).sum();
            shown_if(
                !payments.is_empty(),
                AggValue::Sum(Decimal(cents * 10_000_000)),
            )
        }
        TRAILING_DISTINCT => {
            let count: usize = users(bounds).iter().map(BTreeSet::len).sum();
            shown_if(count > 0, AggValue::Distinct(count as u64))
        }
        TRAILING_CONVERSION => {
            let count: usize = events
                .iter()
                .map(|events| {
                    conversions(events)
                        .into_iter()
                        .filter(|(_, paid_ms)| inside(*paid_ms, bounds))
                        .map(|(user, _)| user)
                        .collect::<BTreeSet<u8>>()
                        .len()
                })
                .sum();
            shown_if(count > 0, AggValue::Distinct(count as u64))
        }
        TRAILING_RETENTION => {
            let returning: usize = users(bounds)
                .iter()
                .zip(users(before))
                .map(|(now, then)| now.intersection(&then).count())
                .sum();
            let then: usize = users(before).iter().map(BTreeSet::len).sum();
            shown_if(
                returning > 0 || then > 0,
                AggValue::ratio(
                    AggValue::Count(returning as u64),
                    AggValue::Distinct(then as u64),
                ),
            )
        }
        metric if TRAILING_THRESHOLDS.contains(&metric) => {
            let def = &metrics()[metric];
            let reached: u64 = events
                .iter()
                .map(|events| qualifying_teams(events, def, bounds.start_ms, bounds.end_ms))
                .sum();
            shown_if(reached > 0, AggValue::Distinct(reached))
        }
        _ => unreachable!("not a trailing metric"),
    }
}

/// The payments that convert (user, time): a message of the same user at most two hours
/// before.
fn conversions(events: &[Event]) -> Vec<(u8, i64)> {
    events
        .iter()
        .filter(|event| EVENT_NAMES[event.0] == "payment")
        .filter(|&&(_, user, paid_ms, _)| {
            events.iter().any(|&(other, sender, sent_ms, _)| {
                EVENT_NAMES[other] == "message_sent"
                    && sender == user
                    && sent_ms <= paid_ms
                    && paid_ms <= sent_ms + CONVERSION_WITHIN
            })
        })
        .map(|&(_, user, paid_ms, _)| (user, paid_ms))
        .collect()
}

/// Next offset, largest event time, watermark and idle floor of a partition.
type PartitionMeta = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);

/// What RocksDB would hold, with the same overwrite semantics as the real store.
#[derive(Default)]
struct FakeStore {
    offsets: BTreeMap<i32, PartitionMeta>,
    windows: BTreeMap<(i32, usize, i64), (i64, AggValue)>,
    /// The progress records of windows keeping one, stored with them.
    progress: BTreeMap<(i32, usize, i64), nsm_core::engine::Progress>,
    /// Members, threshold progress and trailing occurrences, read one at a time.
    members: MemoryReader,
    gaps: BTreeMap<StoredGapKey, u64>,
    segments: BTreeMap<StoredSegmentKey, AggValue>,
}

/// Partition, metric, bucket start, segment (empty for the bucket's own) and previous bucket
/// of a stored gap count.
type StoredGapKey = (i32, usize, i64, Box<[u8]>, i64);

/// Partition, metric, window start and segment key of a stored segment.
type StoredSegmentKey = (i32, usize, i64, Box<[u8]>);

impl FakeStore {
    fn write(&mut self, changes: ChangeSet) {
        for part in changes.partitions {
            self.members.write(&part);
            let p = part.key.partition;
            let meta = (
                part.next_offset,
                part.max_event_ms,
                part.event_watermark_ms,
                part.idle_floor_ms,
            );
            self.offsets.insert(p, meta);
            for upsert in part.upserts {
                let place = (p, upsert.metric, upsert.start_ms);
                match upsert.progress {
                    Some(progress) => self.progress.insert(place, progress),
                    None => self.progress.remove(&place),
                };
                self.windows.insert(
                    (p, upsert.metric, upsert.start_ms),
                    (upsert.end_ms, upsert.value),
                );
            }
            for gap in &part.gaps {
                let key = (
                    p,
                    gap.metric,
                    gap.start_ms,
                    gap.segment.clone(),
                    gap.previous_ms,
                );
                self.gaps.insert(key, gap.count);
            }
            for segment in part.segments {
                self.segments.insert(
                    (p, segment.metric, segment.start_ms, segment.segment),
                    segment.value,
                );
            }
            for delete in part.deletes {
                self.windows.remove(&(p, delete.metric, delete.start_ms));
                self.progress.remove(&(p, delete.metric, delete.start_ms));
                self.gaps.retain(|(gp, m, s, _, _), _| {
                    !(*gp == p && *m == delete.metric && *s == delete.start_ms)
                });
                self.segments.retain(|(sp, m, s, _), _| {
                    !(*sp == p && *m == delete.metric && *s == delete.start_ms)
                });
            }
        }
    }

    fn snapshot(&self, partition: i32) -> PartitionSnapshot {
        let (next_offset, max_event_ms, event_watermark_ms, idle_floor_ms) =
            self.offsets.get(&partition).copied().unwrap_or_default();
        PartitionSnapshot {
            next_offset,
            max_event_ms,
            event_watermark_ms,
            idle_floor_ms,
            metric_since: Vec::new(),
            no_stored_members: false,
            upstream: None,
            windows: self
                .windows
                .iter()
                .filter(|((p, _, _), _)| *p == partition)
                .map(|((_, metric, start_ms), (end_ms, value))| StoredWindow {
                    metric: *metric,
                    start_ms: *start_ms,
                    end_ms: *end_ms,
                    value: *value,
                    progress: self.progress.get(&(partition, *metric, *start_ms)).cloned(),
                })
                .collect(),
            gaps: self
                .gaps
                .iter()
                .filter(|((p, _, _, _, _), count)| *p == partition && **count > 0)
                .map(
                    |((_, metric, start_ms, segment, previous_ms), count)| StoredGap {
                        metric: *metric,
                        start_ms: *start_ms,
                        segment: segment.clone(),
                        previous_ms: *previous_ms,
                        count: *count,
                    },
                )
                .collect(),
            segments: self
                .segments
                .iter()
                .filter(|((p, _, _, _), _)| *p == partition)
                .map(|((_, metric, start_ms, segment), value)| StoredSegment {
                    metric: *metric,
                    start_ms: *start_ms,
                    segment: segment.clone(),
                    value: *value,
                })
                .collect(),
        }
    }
}

fn key(partition: i32) -> PartitionKey {
    PartitionKey::new("events", partition)
}

fn restored_engine(store: &FakeStore) -> Engine {
    // A budget of a byte for entries in memory: every checkpoint evicts all that the store
    // holds, so that most answers come from the store, as beyond the budget at scale.
    let mut engine = Engine::with_reader(plan(), Box::new(store.members.clone()), 1);
    for partition in 0..PARTITIONS {
        engine.restore_partition(key(partition), store.snapshot(partition));
    }
    engine
}

#[derive(Debug, Clone)]
enum Step {
    Deliver(u8),
    Flush,
    /// Crash, losing unflushed state; Kafka then redelivers from this many offsets before
    /// the stored ones (an older commit).
    Crash(u8),
}

fn message_strategy() -> impl Strategy<Value = (i32, Message)> {
    let id = prop_oneof![1 => Just(None), 4 => (0..ID_SPACE).prop_map(Some)];
    let valid = (0..3usize, 0..6u8, 0..48i64, -180..30i64, 0..10_000u32, id).prop_map(
        |(name, user, hour, jitter, cents, id)| {
            // Mostly forward in time with jitter up to 3 h back: some in lateness, some beyond.
            Message::Valid {
                name,
                user,
                // From time zero; `starting_at` moves the stream to one of `STARTS`.
                time_ms: hour * HOUR / 2 + jitter * MINUTE,
                cents,
                id,
            }
        },
    );
    let message = prop_oneof![
        8 => valid,
        1 => any::<u8>().prop_map(Message::Invalid),
        2 => any::<usize>().prop_map(Message::Repeat),
    ];
    (0..PARTITIONS, message)
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        20 => any::<u8>().prop_map(Step::Deliver),
        2 => Just(Step::Flush),
        1 => (0..5u8).prop_map(Step::Crash),
    ]
}

fn sorted_by_time(mut messages: Vec<(i32, Message)>) -> Vec<(i32, Message)> {
    // Sorting by time with the generated jitter keeps streams realistic: mostly ordered.
    messages.sort_by_key(|(_, message)| match message {
        Message::Valid { time_ms, .. } => *time_ms - (*time_ms % HOUR),
        _ => 0,
    });
    messages
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn engine_equals_batch_oracle_despite_disorder_repeats_and_crashes(
        messages in prop::collection::vec(message_strategy(), 1..150),
        steps in prop::collection::vec(step_strategy(), 0..300),
        sort in any::<bool>(),
        start in 0..STARTS.len(),
        seconds_and_local in any::<bool>(),
    ) {
        ENCODING.set(if seconds_and_local { Encoding::SecondsAndLocal } else { Encoding::Default });
        let messages = starting_at(messages, start_ms(start));
        let messages = if sort { sorted_by_time(messages) } else { messages };
        let logs = build_logs(&messages);
        let now_ms = start_ms(start) + 30 * HOUR;

        let mut store = FakeStore::default();
        let mut engine = restored_engine(&store);
        let mut cursors: Vec<usize> = vec![0; PARTITIONS as usize];
        let mut steps = steps.into_iter();
        loop {
            let remaining: Vec<i32> = (0..PARTITIONS).filter(|p| cursors[*p as usize] < logs[*p as usize].payloads.len()).collect();
            if remaining.is_empty() {
                break;
            }
            match steps.next().unwrap_or(Step::Deliver(0)) {
                Step::Deliver(choice) => {
                    let partition = remaining[choice as usize % remaining.len()];
                    let cursor = &mut cursors[partition as usize];
                    let payload = &logs[partition as usize].payloads[*cursor];
                    let outcome = engine.apply(&key(partition), *cursor as i64, payload, now_ms);
                    let expected_valid = logs[partition as usize].truth[*cursor].is_some();
                    if let Outcome::Rejected(rejection) = &outcome {
                        prop_assert!(!expected_valid || rejection.reason == nsm_core::reject::RejectReason::Late, "{rejection}");
                    }
                    *cursor += 1;
                }
                Step::Flush => store.write(engine.take_changes()),
                Step::Crash(rewind) => {
                    engine = restored_engine(&store);
                    for partition in 0..PARTITIONS {
                        let stored = engine.next_offset(&key(partition)).unwrap_or(0) as usize;
                        cursors[partition as usize] = stored.saturating_sub(rewind as usize);
                    }
                }
            }
        }
        store.write(engine.take_changes());

        // The trailing windows as /metrics shows them, at the end of the stream, equal the
        // events in the trailing ranges: current, previous and before-previous.
        let values = restored_engine(&store).metric_values(now_ms);
        let accepted: Vec<Vec<Event>> = logs.iter().map(accepted_events).collect();
        if let Some(clock) = accepted.iter().flatten().map(|event| event.2).max() {
            for metric in TRAILING {
                let shown = &values[metric];
                let range = metrics()[metric].trailing.expect("trailing").range_at(clock);
                prop_assert_eq!(shown.current.bounds, range);
                for window in [Some(&shown.current), Some(&shown.previous), shown.before_previous.as_ref()].into_iter().flatten() {
                    let truth = trailing_truth(&accepted, metric, window.bounds, None);
                    prop_assert_eq!(Some(window.value), truth, "{} {:?}", metrics()[metric].name, window.bounds);
                }
            }
        }

        let expected = oracle(&logs);
        // A trailing distinct or threshold metric may keep an empty bucket: the first of a
        // period of one length holds per-member (per-entity) entries of that period.
        let stored_windows: BTreeMap<_, _> = store
            .windows
            .iter()
            .filter(|((_, metric, _), (_, value))| {
                let keeps_empty = [TRAILING_DISTINCT, TRAILING_CONVERSION].contains(metric)
                    || TRAILING_THRESHOLDS.contains(metric);
                !(keeps_empty && *value == AggValue::Distinct(0))
            })
            .map(|(key, value)| (*key, *value))
            .collect();
        prop_assert_eq!(&stored_windows, &expected);
        // A restore loads no entry into memory: they are read when needed.
        prop_assert_eq!(restored_engine(&store).resident_members(), 0);

        // Every segment of every stored window, exactly.
        let segments: BTreeMap<SegmentKey, AggValue> = store
            .segments
            .iter()
            .map(|((p, m, s, segment), value)| ((*p, *m, *s, segment_label(segment)), *value))
            .collect();
        let expected_segments = segment_oracle(&logs);
        prop_assert_eq!(&segments, &expected_segments);

        // What /metrics shows of each breakdown, in the current and the previous window: the
        // `top` largest segments (summed over partitions) exactly, then one overflow series
        // holding the rest.
        let values = restored_engine(&store).metric_values(now_ms);
        for (metric, def) in metrics().iter().enumerate() {
            let Some(segmentation) = &def.segments else { continue };
            let top = segmentation.top as usize;
            let shown = &values[metric];
            for (bounds, exported) in [
                (shown.current.bounds, &shown.current_segments),
                (shown.previous.bounds, &shown.previous_segments),
            ] {
                let truth = if TRAILING.contains(&metric) {
                    Segment::ALL
                        .into_iter()
                        .filter_map(|segment| {
                            let label = segment.label_in(def)?;
                            let value = trailing_truth(&accepted, metric, bounds, Some(segment))?;
                            Some((label, value))
                        })
                        .collect()
                } else {
                    shown_segments(&expected_segments, metric, bounds)
                };
                prop_assert!(exported.len() <= top + 1);
                let kept: BTreeSet<&str> = exported
                    .iter()
                    .filter(|segment| segment.label != OVERFLOW_LABEL)
                    .map(|segment| segment.label.as_str())
                    .collect();
                prop_assert_eq!(kept.len(), truth.len().min(top));
                for segment in exported.iter() {
                    if segment.label == OVERFLOW_LABEL {
                        let rest = truth
                            .iter()
                            .filter(|(label, _)| !kept.contains(label.as_str()))
                            .map(|(_, value)| *value)
                            .reduce(AggValue::plus);
                        prop_assert_eq!(Some(segment.value), rest);
                        continue;
                    }
                    prop_assert_eq!(Some(&segment.value), truth.get(&segment.label));
                    // Kept because no segment left out is larger.
                    for (label, value) in &truth {
                        if !kept.contains(label.as_str()) {
                            prop_assert!(value.to_f64() <= segment.value.to_f64());
                        }
                    }
                }
            }
        }

        // Distinct members stored match the counts. A trailing member's occurrence in a
        // bucket is stored apart, or named by its last occurrence in the period (tag 0x00,
        // the bucket first in the value); a replaced last keeps an entry of its own only while
        // an event can still land in its bucket (it ends after the newest event less the
        // lateness). Segment members (tagged 0xff) are left out.
        let defs = metrics();
        let entries = store.members.entries();
        let is_plain = |member: &[u8]| !matches!(member.first(), Some(0xff | 0x00));
        for ((p, metric, start), (_, value)) in &store.windows {
            let is_distinct = matches!(defs[*metric].kind, MetricKind::Distinct { .. });
            if let (AggValue::Distinct(count), true) = (value, is_distinct) {
                let stored: BTreeSet<&[u8]> = entries
                    .iter()
                    .filter(|(mp, m, _, _)| mp.partition == *p && m == metric)
                    .filter_map(|(mp, _, s, member)| match (member.split_first(), &defs[*metric].trailing) {
                        (Some((0x00, last)), Some(_)) if is_plain(last) => {
                            let value = store.members.member(mp, *metric, *s, member).expect("read").expect("stored");
                            let step = defs[*metric].trailing.expect("trailing").step_ms;
                            let bucket = last_occurrence_bucket(&value, *s, step).expect("a last occurrence");
                            (bucket == *start).then_some(last)
                        }
                        _ => (s == start && is_plain(member)).then_some(&**member),
                    })
                    .collect();
                match &defs[*metric].trailing {
                    Some(trailing) => {
                        let newest = store.snapshot(*p).max_event_ms.expect("an event");
                        let reachable = start + trailing.step_ms > newest - LATENESS;
                        prop_assert!(stored.len() as u64 <= *count);
                        prop_assert!(!reachable || stored.len() as u64 == *count);
                    }
                    None => prop_assert_eq!(stored.len() as u64, *count),
                }
            }
        }

        // The windows query sums partitions exactly like the oracle does.
        let plan = plan();
        for metric in 0..metrics().len() {
            let stored: Vec<StoredWindow> = (0..PARTITIONS).flat_map(|p| store.snapshot(p).windows).collect();
            let records = windows_between(&plan, metric, stored, None, i64::MIN, i64::MAX);
            let summed = |metric: usize, start_ms: i64| {
                (0..PARTITIONS)
                    .filter_map(|p| expected.get(&(p, metric, start_ms)))
                    .map(|(_, value)| *value)
                    .reduce(AggValue::plus)
            };
            for record in records {
                let start_ms = record.bounds.start_ms;
                let sum = if metric == RETENTION {
                    let unit = metrics()[RETENTION_BASE].window;
                    let previous = plan.calendar().previous(unit, record.bounds).expect("previous");
                    AggValue::ratio(
                        summed(RETENTION, start_ms).unwrap_or(AggValue::Count(0)),
                        summed(RETENTION_BASE, previous.start_ms).unwrap_or(AggValue::Distinct(0)),
                    )
                } else if metric == RATIO {
                    // Every window with a numerator has a denominator: both count all events.
                    let (numerator, denominator) = RATIO_PARTS;
                    AggValue::ratio(
                        summed(numerator, start_ms).unwrap_or(AggValue::Sum(Decimal::ZERO)),
                        summed(denominator, start_ms).expect("every event counts"),
                    )
                } else if [TRAILING_DISTINCT, TRAILING_CONVERSION].contains(&metric)
                    || TRAILING_THRESHOLDS.contains(&metric)
                {
                    // An empty period-start bucket (see above) is in no oracle window.
                    summed(metric, start_ms).unwrap_or(AggValue::Distinct(0))
                } else {
                    summed(metric, start_ms).expect("window exists in oracle")
                };
                prop_assert_eq!(record.value, sum);
            }
        }
    }
}

/// The repartition topic's partitions in the two-stage runs.
const REPARTITIONS: u64 = 3;
const REPARTITION_TOPIC: &str = "events-repartition";

/// A record of the repartition topic: the event forwarded for a group (or, with no payload,
/// only its source's time), and what its headers say.
#[derive(Clone)]
struct Sent {
    group: Option<usize>,
    partition: i32,
    offset: i64,
    watermark_ms: Option<i64>,
    clock_ms: Option<i64>,
    payload: Vec<u8>,
}

/// The stored values of every window and segment, by topic, partition, metric and start
/// (and segment label), from one take of an engine's changes.
type TopicWindows = BTreeMap<(String, i32, usize, i64), AggValue>;
type TopicSegments = BTreeMap<(String, i32, usize, i64, String), AggValue>;

fn stored_by_topic(changes: ChangeSet) -> (TopicWindows, TopicSegments) {
    let mut windows = BTreeMap::new();
    let mut segments = BTreeMap::new();
    for part in changes.partitions {
        let (topic, partition) = (part.key.topic.to_string(), part.key.partition);
        for upsert in part.upserts {
            windows.insert(
                (topic.clone(), partition, upsert.metric, upsert.start_ms),
                upsert.value,
            );
        }
        for segment in part.segments {
            segments.insert(
                (
                    topic.clone(),
                    partition,
                    segment.metric,
                    segment.start_ms,
                    segment_label(&segment.segment),
                ),
                segment.value,
            );
        }
    }
    (windows, segments)
}

/// A value left out of a comparison: the empty period-start bucket a trailing distinct or
/// threshold metric may keep (see the single-stage test).
fn kept_empty(metric: usize, value: AggValue) -> bool {
    let keeps_empty = [TRAILING_DISTINCT, TRAILING_CONVERSION].contains(&metric)
        || TRAILING_THRESHOLDS.contains(&metric);
    keeps_empty && value == AggValue::Distinct(0)
}

/// Sums values of the same key (metric, start, ...) found in several partitions.
fn summed_over_partitions<K: Ord + Clone>(
    values: impl IntoIterator<Item = (K, AggValue)>,
) -> BTreeMap<K, AggValue> {
    let mut summed: BTreeMap<K, AggValue> = BTreeMap::new();
    for (key, value) in values {
        let entry = summed.entry(key);
        match entry {
            std::collections::btree_map::Entry::Occupied(mut sum) => {
                let total = sum.get().plus(value);
                sum.insert(total);
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(value);
            }
        }
    }
    summed
}

/// Runs both stages in one engine: the input partitions read their logs and forward what
/// they accept; the repartition partitions apply it, with the sources' time records between.
/// `choices` pick what moves next. Returns the stored windows and segments, after checking
/// that no forwarded event is refused at stage two (what its source accepted is never late
/// there).
fn run_two_stages(
    plan: Plan,
    logs: &[Log],
    choices: Vec<u8>,
    now_ms: i64,
) -> Result<(TopicWindows, TopicSegments), TestCaseError> {
    let rekey_names: Vec<String> = plan
        .rekey_fields()
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut engine = Engine::new(plan);
    let repartition = |partition: u64| PartitionKey::new(REPARTITION_TOPIC, partition as i32);
    for partition in 0..PARTITIONS {
        engine.restore_partition(key(partition), PartitionSnapshot::default());
    }
    for partition in 0..REPARTITIONS {
        engine.restore_partition(repartition(partition), PartitionSnapshot::default());
    }
    let inputs = format!("events:{PARTITIONS}");
    let mut cursors = vec![0usize; PARTITIONS as usize];
    let mut sent: Vec<Vec<Sent>> = vec![Vec::new(); REPARTITIONS as usize];
    let mut applied = vec![0usize; REPARTITIONS as usize];
    let mut choices = choices.into_iter();
    loop {
        // What can move: an input partition with events left, a repartition partition with
        // records left, or every source's time sent to every repartition partition.
        let readable: Vec<i32> = (0..PARTITIONS)
            .filter(|p| cursors[*p as usize] < logs[*p as usize].payloads.len())
            .collect();
        let countable: Vec<usize> = (0..REPARTITIONS as usize)
            .filter(|p| applied[*p] < sent[*p].len())
            .collect();
        if readable.is_empty() && countable.is_empty() {
            break;
        }
        let choice = choices.next().unwrap_or(0) as usize;
        let moves = readable.len() + countable.len() + 1;
        match choice % moves {
            read if read < readable.len() => {
                let partition = readable[read];
                let cursor = &mut cursors[partition as usize];
                let offset = *cursor as i64;
                let payload = &logs[partition as usize].payloads[*cursor];
                *cursor += 1;
                if let Outcome::Applied { forward, .. } =
                    engine.apply(&key(partition), offset, payload, now_ms)
                {
                    let (watermark_ms, clock_ms) = engine.source_time(&key(partition));
                    for (group, hash) in forward.0 {
                        sent[(hash % REPARTITIONS) as usize].push(Sent {
                            group: Some(group),
                            partition,
                            offset,
                            watermark_ms,
                            clock_ms,
                            payload: payload.clone(),
                        });
                    }
                }
            }
            count if count < readable.len() + countable.len() => {
                let partition = countable[count - readable.len()];
                let record = &sent[partition][applied[partition]];
                let forwarded = Forwarded {
                    group: record.group.unwrap_or(0),
                    group_field: record.group.map_or("", |group| &rekey_names[group]),
                    topic: "events",
                    partition: record.partition,
                    offset: record.offset,
                    epoch: Epoch::default(),
                    watermark_ms: record.watermark_ms,
                    clock_ms: record.clock_ms,
                    topics: Inputs::parse(&inputs).expect("well formed"),
                };
                let outcome = engine.apply_forwarded(
                    &repartition(partition as u64),
                    applied[partition] as i64,
                    &record.payload,
                    &nsm_core::event::NoRecord::default(),
                    &forwarded,
                    now_ms,
                );
                prop_assert!(!matches!(outcome, Outcome::Rejected(_)), "{:?}", outcome);
                applied[partition] += 1;
            }
            _ => {
                for partition in 0..PARTITIONS {
                    let (watermark_ms, clock_ms) = engine.source_time(&key(partition));
                    for log in &mut sent {
                        log.push(Sent {
                            group: None,
                            partition,
                            offset: cursors[partition as usize] as i64,
                            watermark_ms,
                            clock_ms,
                            payload: Vec::new(),
                        });
                    }
                }
            }
        }
    }
    Ok(stored_by_topic(engine.take_changes()))
}

/// The windows of the re-keyed metrics summed over the repartition partitions, and what the
/// oracle says of them over `events`.
type Compared<K> = (BTreeMap<K, AggValue>, BTreeMap<K, AggValue>);

fn rekeyed_windows(
    windows: &TopicWindows,
    rekeyed: &BTreeSet<usize>,
    events: &[Event],
) -> Compared<(usize, i64)> {
    let truth = oracle_of(&[events.to_vec()])
        .into_iter()
        .filter(|((_, metric, _), (_, value))| {
            rekeyed.contains(metric) && !kept_empty(*metric, *value)
        })
        .map(|((_, metric, start), (_, value))| ((metric, start), value))
        .collect();
    let sums = summed_over_partitions(
        windows
            .iter()
            .filter(|((topic, _, _, _), _)| topic == REPARTITION_TOPIC)
            .map(|((_, _, metric, start), value)| ((*metric, *start), *value)),
    )
    .into_iter()
    .filter(|((metric, _), value)| !kept_empty(*metric, *value))
    .collect();
    (sums, truth)
}

fn rekeyed_segments(
    segments: &TopicSegments,
    rekeyed: &BTreeSet<usize>,
    events: &[Event],
) -> Compared<(usize, i64, String)> {
    let truth = segment_oracle_of(&[events.to_vec()])
        .into_iter()
        .filter(|((_, metric, _, _), _)| rekeyed.contains(metric))
        .map(|((_, metric, start, label), value)| ((metric, start, label), value))
        .collect();
    let sums = summed_over_partitions(
        segments
            .iter()
            .filter(|((topic, ..), _)| topic == REPARTITION_TOPIC)
            .map(|((_, _, metric, start, label), value)| {
                ((*metric, *start, label.clone()), *value)
            }),
    );
    (sums, truth)
}

fn rekeyed_metrics(plan: &Plan) -> BTreeSet<usize> {
    (0..metrics().len())
        .filter(|metric| matches!(plan.route(*metric), Route::Rekeyed(_)))
        .collect()
}

/// Logs where a repeat copies an earlier message of any partition (a producer sending an
/// event again with another key), and each valid message with an id has an id of its own:
/// copies of one event share an id, different events never do.
fn build_logs_across(messages: &[(i32, Message)]) -> Vec<Log> {
    let mut resolved: Vec<(i32, Message)> = Vec::new();
    for (index, (partition, message)) in messages.iter().enumerate() {
        let message = match message {
            Message::Repeat(n) => {
                let earlier: Vec<&Message> = resolved
                    .iter()
                    .map(|(_, message)| message)
                    .filter(|message| matches!(message, Message::Valid { .. }))
                    .collect();
                if earlier.is_empty() {
                    continue;
                }
                earlier[n % earlier.len()].clone()
            }
            Message::Valid {
                name,
                user,
                time_ms,
                cents,
                id,
            } => Message::Valid {
                name: *name,
                user: *user,
                time_ms: *time_ms,
                cents: *cents,
                id: id.map(|_| index as u8),
            },
            Message::Invalid(variant) => Message::Invalid(*variant),
        };
        resolved.push((*partition, message));
    }
    build_logs(&resolved)
}

/// The events the whole stream counts when copies meet: each partition keeps what is not late
/// there (no id is deduplicated where it is read), then each id counts once.
fn accepted_across(logs: &[Log]) -> Vec<Event> {
    let mut seen_ids = BTreeSet::new();
    let mut accepted = Vec::new();
    for log in logs {
        let mut watermark: Option<i64> = None;
        for (name, user, time_ms, cents, id) in log.truth.iter().flatten().copied() {
            if watermark.is_some_and(|w| time_ms < w - LATENESS) {
                continue;
            }
            watermark = Some(watermark.map_or(time_ms, |w| w.max(time_ms)));
            if id.is_none_or(|id| seen_ids.insert(id)) {
                accepted.push((name, user, time_ms, cents));
            }
        }
    }
    accepted
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, ..ProptestConfig::default() })]

    /// Events keyed by event id (so every user's and every team's events are spread over
    /// both input partitions), read in any interleaving, forwarded to three repartition
    /// partitions which apply them in any interleaving with the sources' time records.
    #[test]
    fn metrics_counting_entities_spread_over_partitions_equal_the_whole_streams_oracle(
        messages in prop::collection::vec(message_strategy(), 1..150),
        choices in prop::collection::vec(any::<u8>(), 0..600),
        sort in any::<bool>(),
        start in 0..STARTS.len(),
    ) {
        let messages = starting_at(messages, start_ms(start));
        let messages = if sort { sorted_by_time(messages) } else { messages };
        let logs = build_logs(&messages);
        let now_ms = start_ms(start) + 30 * HOUR;
        let plan = plan_keyed_by(Some(MessageKey { field: path("event_id"), nested: Vec::new() }), false);
        prop_assert_eq!(plan.rekey_fields(), [path("user_id"), path("team_id")]);
        let rekeyed = rekeyed_metrics(&plan);
        prop_assert!(rekeyed.contains(&RETENTION) && rekeyed.contains(&CONVERSION));
        let (windows, segments) = run_two_stages(plan, &logs, choices, now_ms)?;

        // Each input partition holds its own metrics' windows, as without the repartition
        // topic; the repartition partitions hold the others', summing to the whole stream's.
        let accepted: Vec<Vec<Event>> = logs.iter().map(accepted_events).collect();
        let whole_stream: Vec<Event> = accepted.iter().flatten().copied().collect();
        let local_truth: BTreeMap<(i32, usize, i64), AggValue> = oracle_of(&accepted)
            .into_iter()
            .filter(|((_, metric, _), (_, value))| !rekeyed.contains(metric) && !kept_empty(*metric, *value))
            .map(|(key, (_, value))| (key, value))
            .collect();
        let local: BTreeMap<(i32, usize, i64), AggValue> = windows
            .iter()
            .filter(|((topic, _, metric, _), value)| topic == "events" && !kept_empty(*metric, **value))
            .map(|((_, partition, metric, start), value)| ((*partition, *metric, *start), *value))
            .collect();
        prop_assert_eq!(&local, &local_truth);
        prop_assert!(
            windows.keys().all(|(topic, _, metric, _)| (topic == REPARTITION_TOPIC) == rekeyed.contains(metric)),
            "each metric counted in one stage only"
        );
        let (sums, truth) = rekeyed_windows(&windows, &rekeyed, &whole_stream);
        prop_assert_eq!(&sums, &truth);

        // The breakdowns too: each partition's for local metrics, the whole stream's summed
        // over the repartition partitions for the others.
        let local_segments: BTreeMap<SegmentKey, AggValue> = segments
            .iter()
            .filter(|((topic, ..), _)| topic == "events")
            .map(|((_, partition, metric, start, label), value)| ((*partition, *metric, *start, label.clone()), *value))
            .collect();
        let local_segment_truth: BTreeMap<SegmentKey, AggValue> = segment_oracle_of(&accepted)
            .into_iter()
            .filter(|((_, metric, _, _), _)| !rekeyed.contains(metric))
            .collect();
        prop_assert_eq!(&local_segments, &local_segment_truth);
        let (sums, truth) = rekeyed_segments(&segments, &rekeyed, &whole_stream);
        prop_assert_eq!(&sums, &truth);
    }

    /// Copies of an event on both input partitions (`events.dedup_across_partitions`): every
    /// metric goes through the repartition topic, counts and sums by the id, and each event
    /// counts once wherever its copies were read.
    #[test]
    fn copies_of_an_event_on_different_partitions_count_once(
        messages in prop::collection::vec(message_strategy(), 1..150),
        choices in prop::collection::vec(any::<u8>(), 0..600),
        sort in any::<bool>(),
        start in 0..STARTS.len(),
    ) {
        let messages = starting_at(messages, start_ms(start));
        let messages = if sort { sorted_by_time(messages) } else { messages };
        let logs = build_logs_across(&messages);
        let now_ms = start_ms(start) + 30 * HOUR;
        let plan = plan_keyed_by(None, true);
        prop_assert!(plan.rekey_fields().contains(&path("event_id")));
        let rekeyed = rekeyed_metrics(&plan);
        let stateful: BTreeSet<usize> = (0..metrics().len()).filter(|metric| *metric != RATIO).collect();
        prop_assert_eq!(&rekeyed, &stateful);
        let (windows, segments) = run_two_stages(plan, &logs, choices, now_ms)?;

        let whole_stream = accepted_across(&logs);
        prop_assert!(windows.keys().all(|(topic, ..)| topic == REPARTITION_TOPIC));
        let (sums, truth) = rekeyed_windows(&windows, &rekeyed, &whole_stream);
        prop_assert_eq!(&sums, &truth);
        let (sums, truth) = rekeyed_segments(&segments, &rekeyed, &whole_stream);
        prop_assert_eq!(&sums, &truth);
    }
}
