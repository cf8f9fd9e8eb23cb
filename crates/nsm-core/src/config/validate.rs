//! From [`RawConfig`] to [`Config`], collecting every problem with its path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::librdkafka::reserved_property;
use super::raw::{RawBasicAuth, RawConfig, RawEvents, RawMetric};
use super::secrets::{self, KafkaProperties, Resolver};
use super::{
    BasicAuthUsers, Config, ConfigError, ConfigErrors, DeadLetterOnFailure, EventsConfig,
    HttpConfig, HttpTls, KafkaConfig, StartFrom, StateConfig, TimeConfig,
};
use crate::metric::{FieldPath, MetricDef, MetricKind, Role, Segmentation};
use crate::timestamp::{EpochUnit, TimestampFormat, TimestampSource};
use crate::window::{parse_weekday, Calendar, CalendarUnit, Trailing};

const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

mod filter;

use filter::parse_filter;

#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

pub(super) fn parse_and_validate(
    text: &str,
    resolver: &Resolver<'_>,
) -> Result<Config, ConfigErrors> {
    let mut problems = Problems::default();
    let raw = match parse_raw(text, &mut problems) {
        Some(raw) => raw,
        None => return Err(ConfigErrors(problems.0)),
    };
    let config = validate(raw, resolver, &mut problems);
    if problems.0.is_empty() {
        if let Some(config) = config {
            return Ok(config);
        }
    }
    Err(ConfigErrors(problems.0))
}

fn parse_raw(text: &str, problems: &mut Problems) -> Option<RawConfig> {
    let deserializer = match toml::Deserializer::parse(text) {
        Ok(deserializer) => deserializer,
        Err(error) => {
            problems.add(
                location(text, error.span()),
                error.message().trim().to_string(),
            );
            return None;
        }
    };
    let mut unknown = Vec::new();
    let result = serde_ignored::deserialize(deserializer, |path| unknown.push(path.to_string()));
    for path in unknown {
        problems.add(
            path,
            "unknown key (check the spelling; see config/example.toml)",
        );
    }
    match result {
        Ok(raw) => Some(raw),
        Err(error) => {
            problems.add(
                location(text, error.span()),
                error.message().trim().to_string(),
            );
            None
        }
    }
}

/// Deduplicating across partitions routes every event by its id; it contradicts a message key
/// taken from the events (copies of an event then share a partition) and needs ids.
fn check_dedup_across_partitions(raw: &RawConfig, events: &EventsConfig, problems: &mut Problems) {
    if !events.dedup_across_partitions {
        return;
    }
    if events.dedup_horizon_ms == 0 {
        problems.add(
            "events.dedup_across_partitions",
            "needs deduplication on: events.dedup_horizon is \"0s\"",
        );
    }
    if raw.kafka.key_field.is_some() {
        problems.add(
            "events.dedup_across_partitions",
            "contradicts kafka.key_field: with the key taken from a field of the event, copies of \
             an event share a partition and are deduplicated there; remove one of the two",
        );
    }
}

/// `line 12` for an error span, so a syntax error without a key path still says where it is.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}")
        }
        None => String::new(),
    }
}

fn validate(raw: RawConfig, resolver: &Resolver<'_>, problems: &mut Problems) -> Option<Config> {
    let kafka = validate_kafka(&raw, resolver, problems);
    let mut events = validate_events(&raw, problems);
    let time = validate_time(&raw, problems);
    if let (Some(events), Some(time)) = (&mut events, &time) {
        if events.dedup_horizon_ms < 0 {
            events.dedup_horizon_ms = time.allowed_lateness_ms;
        }
    }
    if let Some(events) = &events {
        check_dedup_across_partitions(&raw, events, problems);
    }
    let state = validate_state(&raw, problems);
    let http = validate_http(&raw, problems);

    let mut metrics = Vec::new();
    let north_stars = raw
        .north_star
        .map(|many| many.into_vec())
        .unwrap_or_default();
    if north_stars.is_empty() {
        problems.add(
            "north_star",
            "missing: every config needs one [north_star] metric",
        );
    }
    let north_star_path = |index: usize| {
        if north_stars.len() == 1 {
            "north_star".to_string()
        } else {
            format!("north_star[{index}]")
        }
    };
    let mut sections: Vec<(String, Role, &RawMetric)> = Vec::new();
    for (index, metric) in north_stars.iter().enumerate() {
        sections.push((north_star_path(index), Role::NorthStar, metric));
    }
    for (index, metric) in raw.inputs.iter().enumerate() {
        sections.push((format!("inputs[{index}]"), Role::Input, metric));
    }
    for (index, metric) in raw.guardrails.iter().enumerate() {
        sections.push((format!("guardrails[{index}]"), Role::Guardrail, metric));
    }
    if let Some(revenue) = &raw.revenue {
        sections.push(("revenue".to_string(), Role::Revenue, revenue));
    }
    let default_distinct_field = events.as_ref().map(|events| events.user.clone());
    let mut seen_names: BTreeMap<String, String> = BTreeMap::new();
    let mut metric_paths = Vec::new();
    let mut explicit_window = Vec::new();
    for (path, role, metric) in sections {
        let parsed = validate_metric(
            &path,
            role,
            metric,
            default_distinct_field.as_ref(),
            problems,
        );
        if let Some(parsed) = parsed {
            if let Some(first) = seen_names.get(&parsed.name) {
                problems.add(
                    format!("{path}.name"),
                    format!(
                        "duplicate metric name {:?}, already used at {first}",
                        parsed.name
                    ),
                );
            } else {
                seen_names.insert(parsed.name.clone(), path.clone());
            }
            metrics.push(parsed);
            metric_paths.push(path);
            explicit_window.push(metric.window.is_some());
        }
    }
    resolve_ratios(&mut metrics, &metric_paths, &explicit_window, problems);
    resolve_retention(&mut metrics, &metric_paths, &explicit_window, problems);

    if let (Some(time), Some(state)) = (&time, &state) {
        if state.retention_ms <= time.allowed_lateness_ms {
            problems.add(
                "state.retention",
                "must be longer than time.allowed_lateness, or windows would be deleted while \
                 late events can still correct them",
            );
        }
        // The previous complete window must still be stored to be exported.
        let longest_window_ms = metrics
            .iter()
            .map(|metric| match &metric.trailing {
                // A trailing retention reads its base two lengths back.
                Some(trailing) if matches!(metric.kind, MetricKind::Retention { .. }) => {
                    2 * trailing.length_ms + trailing.step_ms
                }
                // A trailing window's last bucket may still be filling.
                Some(trailing) => trailing.length_ms + trailing.step_ms,
                None => metric.window.max_length_ms(),
            })
            .max()
            .unwrap_or(0);
        let needed_ms = 2 * longest_window_ms + time.allowed_lateness_ms;
        if state.retention_ms < needed_ms {
            const DAY_MS: i64 = 86_400_000;
            let needed_days = (needed_ms + DAY_MS - 1) / DAY_MS;
            problems.add(
                "state.retention",
                format!(
                    "must cover two of the longest window plus the allowed lateness, so the \
                     previous complete window is still stored: at least \"{needed_days}d\" here \
                     (\"35d\" suits weekly windows, \"70d\" monthly ones)"
                ),
            );
        }
    }
    let alerting = super::alerting::validate(
        &raw.alerting,
        &metrics,
        time.as_ref().map(|time| time.idle_timeout),
        &mut problems.0,
    );
    Some(Config {
        kafka: kafka?,
        events: events?,
        time: time?,
        state: state?,
        http: http?,
        metrics,
        alerting: alerting?,
    })
}

fn validate_kafka(
    raw: &RawConfig,
    resolver: &Resolver<'_>,
    problems: &mut Problems,
) -> Option<KafkaConfig> {
    let brokers = raw.kafka.brokers.clone().unwrap_or_default();
    if brokers.trim().is_empty() {
        problems.add(
            "kafka.brokers",
            "missing: a comma-separated list of host:port",
        );
    }
    let topics = raw.kafka.topics.clone().unwrap_or_default();
    if topics.is_empty() {
        problems.add(
            "kafka.topics",
            "missing: at least one topic to read events from",
        );
    }
    for (index, topic) in topics.iter().enumerate() {
        if let Err(message) = check_topic_name(topic) {
            problems.add(format!("kafka.topics[{index}]"), message);
        }
    }
    let group_id = raw
        .kafka
        .group_id
        .clone()
        .unwrap_or_else(|| "nsm".to_string());
    if group_id.trim().is_empty() {
        problems.add("kafka.group_id", "must not be empty");
    }
    let dead_letter_topic = raw.kafka.dead_letter_topic.clone().unwrap_or_else(|| {
        format!(
            "{}-dlq",
            topics.first().map(String::as_str).unwrap_or("nsm")
        )
    });
    if let Err(message) = check_topic_name(&dead_letter_topic) {
        problems.add("kafka.dead_letter_topic", message);
    }
    if topics.contains(&dead_letter_topic) {
        problems.add(
            "kafka.dead_letter_topic",
            "must differ from the topics nsm reads",
        );
    }

    let key_field = raw
        .kafka
        .key_field
        .as_ref()
        .and_then(|text| field_path("kafka.key_field", Some(text), text, problems));
    let nested = raw.kafka.nested_in_key.as_deref().unwrap_or_default();
    let nested_in_key: Vec<FieldPath> = nested
        .iter()
        .enumerate()
        .filter_map(|(index, text)| {
            field_path(
                &format!("kafka.nested_in_key[{index}]"),
                Some(text),
                text,
                problems,
            )
        })
        .collect();
    let repartition_topic = raw
        .kafka
        .repartition_topic
        .clone()
        .unwrap_or_else(|| format!("{group_id}-repartition"));
    if let Err(message) = check_topic_name(&repartition_topic) {
        problems.add("kafka.repartition_topic", message);
    }
    if topics.contains(&repartition_topic) || repartition_topic == dead_letter_topic {
        problems.add(
            "kafka.repartition_topic",
            "must differ from the topics nsm reads and the dead-letter topic",
        );
    }
    if !nested.is_empty() && raw.kafka.key_field.is_none() {
        problems.add(
            "kafka.nested_in_key",
            "needs kafka.key_field: the field these fields nest in",
        );
    }

    let mut properties = KafkaProperties::default();
    for (key, value) in &raw.kafka.properties {
        let path = format!("kafka.properties.{key:?}");
        if let Some(reserved) = reserved_property(key) {
            let name = if reserved.canonical == key {
                String::new()
            } else {
                format!(" (librdkafka reads it as {})", reserved.canonical)
            };
            problems.add(
                path,
                format!("is set by nsm{name}; remove it: {}", reserved.reason),
            );
            continue;
        }
        let text = match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            toml::Value::Boolean(flag) => flag.to_string(),
            _ => {
                problems.add(path, "must be a string, number or boolean");
                continue;
            }
        };
        // A value that came from the environment or a file is a secret whatever its name.
        match secrets::expand(&text, resolver) {
            Ok((expanded, true)) => properties.insert_secret(key.clone(), expanded),
            Ok((expanded, false)) => properties.insert(key.clone(), expanded),
            Err(message) => problems.add(path, message),
        }
    }
    let start_from = match raw.kafka.start_from.as_deref() {
        None => Some(StartFrom::default()),
        Some(text) => match parse_start_from(text) {
            Ok(start_from) => Some(start_from),
            Err(message) => {
                problems.add("kafka.start_from", message);
                None
            }
        },
    };
    let dead_letter_on_failure = match raw.kafka.dead_letter_on_failure.as_deref() {
        None => Some(DeadLetterOnFailure::default()),
        Some("hold") => Some(DeadLetterOnFailure::Hold),
        Some("drop") => Some(DeadLetterOnFailure::Drop),
        Some(other) => {
            problems.add(
                "kafka.dead_letter_on_failure",
                format!(
                    "unknown policy {other:?}; expected \"hold\" (keep the letter and hold \
                     checkpoints until it is delivered) or \"drop\" (count it and go on)"
                ),
            );
            None
        }
    };
    let replication_factor = match &raw.kafka.replication_factor {
        None => Some(None),
        Some(toml::Value::Integer(count)) if (1..=i64::from(i16::MAX)).contains(count) => {
            Some(i32::try_from(*count).ok())
        }
        Some(toml::Value::String(text)) if text == "broker" => Some(None),
        Some(other) => {
            problems.add(
                "kafka.replication_factor",
                format!(
                    "expected a number of replicas of at least 1, or \"broker\" for the \
                     broker's default.replication.factor; found {other}"
                ),
            );
            None
        }
    };
    Some(KafkaConfig {
        brokers,
        topics,
        group_id,
        dead_letter_topic,
        key_field,
        nested_in_key,
        repartition_topic,
        properties,
        start_from: start_from?,
        dead_letter_on_failure: dead_letter_on_failure?,
        replication_factor: replication_factor?,
    })
}

/// `earliest`, `latest`, or an RFC 3339 time with an offset (`2024-05-01T00:00:00Z`).
fn parse_start_from(text: &str) -> Result<StartFrom, String> {
    match text {
        "earliest" => Ok(StartFrom::Earliest),
        "latest" => Ok(StartFrom::Latest),
        _ => match text.parse::<jiff::Timestamp>() {
            // Kafka timestamps are milliseconds since 1970; below 0 they mean "latest" and
            // "earliest" to the broker.
            Ok(time) if time.as_millisecond() >= 0 => Ok(StartFrom::Time(time.as_millisecond())),
            Ok(_) => Err(format!("{text:?} is before 1970, when Kafka time begins")),
            Err(_) => Err(format!(
                "{text:?} is not \"earliest\", \"latest\" or an RFC 3339 time with an \
                 offset, like \"2024-05-01T00:00:00Z\""
            )),
        },
    }
}

fn check_topic_name(topic: &str) -> Result<(), String> {
    let valid_chars = topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if topic.is_empty() || topic.len() > 249 || !valid_chars {
        return Err(format!(
            "invalid topic name {topic:?}: 1 to 249 characters of a-z, A-Z, 0-9, '.', '_', '-'"
        ));
    }
    Ok(())
}

fn field_path(
    path: &str,
    value: Option<&String>,
    default: &str,
    problems: &mut Problems,
) -> Option<FieldPath> {
    let text = value.map(String::as_str).unwrap_or(default);
    let parsed = FieldPath::parse(text);
    if parsed.is_none() {
        problems.add(
            path,
            format!("invalid field path {text:?}: dotted names like properties.amount"),
        );
    }
    parsed
}

/// The name standing for the Kafka record's timestamp in `events.timestamp` and
/// `events.timestamp_fallback`.
const KAFKA_TIMESTAMP: &str = "@kafka";

/// `events.timestamp_unit`, `events.timestamp_zone`, `events.timestamp_fallback`.
fn timestamp_format(
    events: &RawEvents,
    from_kafka: bool,
    problems: &mut Problems,
) -> Option<TimestampFormat> {
    let unit = match events.timestamp_unit.as_deref() {
        None => Some(EpochUnit::default()),
        Some(text) => {
            let unit = EpochUnit::parse(text);
            if unit.is_none() {
                problems.add(
                    "events.timestamp_unit",
                    format!(
                        "unknown unit {text:?}; expected \"s\", \"ms\", \"us\" or \"ns\" \
                         (what the epoch numbers producers send count)"
                    ),
                );
            }
            unit
        }
    };
    let zone = match events.timestamp_zone.as_deref() {
        None => Some(None),
        Some(name) => match jiff::tz::TimeZone::get(name) {
            Ok(zone) => Some(Some(zone)),
            Err(_) => {
                problems.add(
                    "events.timestamp_zone",
                    format!("unknown time zone {name:?}; expected an IANA name such as \"Europe/Paris\""),
                );
                None
            }
        },
    };
    let source = match (from_kafka, events.timestamp_fallback.as_deref()) {
        (true, None) => Some(TimestampSource::Kafka),
        (false, None) => Some(TimestampSource::Field),
        (false, Some(KAFKA_TIMESTAMP)) => Some(TimestampSource::FieldElseKafka),
        (true, Some(_)) => {
            problems.add(
                "events.timestamp_fallback",
                "events.timestamp is already the Kafka record's timestamp (\"@kafka\"): no fallback to name",
            );
            None
        }
        (false, Some(other)) => {
            problems.add(
                "events.timestamp_fallback",
                format!("unknown fallback {other:?}; the only one is \"@kafka\", the Kafka record's timestamp"),
            );
            None
        }
    };
    Some(TimestampFormat {
        source: source?,
        unit: unit?,
        zone: zone?,
    })
}

fn validate_events(raw: &RawConfig, problems: &mut Problems) -> Option<EventsConfig> {
    let events = &raw.events;
    let name = field_path("events.name", events.name.as_ref(), "event", problems);
    // `@kafka`: the Kafka record's timestamp; the field path keeps its default, unused.
    let from_kafka = events.timestamp.as_deref() == Some(KAFKA_TIMESTAMP);
    let timestamp = field_path(
        "events.timestamp",
        events.timestamp.as_ref().filter(|_| !from_kafka),
        "timestamp",
        problems,
    );
    let timestamp_format = timestamp_format(events, from_kafka, problems);
    let user = field_path("events.user", events.user.as_ref(), "user_id", problems);
    let id = field_path("events.id", events.id.as_ref(), "event_id", problems);
    // Defaults to the allowed lateness (filled in by `validate`): every duplicate that could
    // still be applied is then recognised, since older ones are refused as late anyway.
    let dedup_horizon = match &events.dedup_horizon {
        Some(text) => duration("events.dedup_horizon", Some(text), "", problems).map(millis),
        None => Some(-1),
    };
    let max_bytes = match &events.max_bytes {
        None => Some(DEFAULT_MAX_EVENT_BYTES),
        Some(value) => {
            let parsed = parse_size(value);
            if parsed.is_none() {
                problems.add(
                    "events.max_bytes",
                    "expected a size such as \"1MiB\", \"512KiB\" or 65536",
                );
            }
            parsed
        }
    };
    Some(EventsConfig {
        name: name?,
        timestamp: timestamp?,
        timestamp_format: timestamp_format?,
        user: user?,
        id: id?,
        dedup_horizon_ms: dedup_horizon?,
        dedup_across_partitions: events.dedup_across_partitions.unwrap_or(false),
        max_bytes: max_bytes?,
    })
}

fn parse_size(value: &toml::Value) -> Option<usize> {
    match value {
        toml::Value::Integer(bytes) if *bytes > 0 => usize::try_from(*bytes).ok(),
        toml::Value::String(text) => {
            let text = text.trim();
            let digits_end = text
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len());
            let number: usize = text[..digits_end].parse().ok()?;
            let multiplier = match text[digits_end..].trim() {
                "" | "B" => 1,
                "KiB" => 1024,
                "MiB" => 1024 * 1024,
                "GiB" => 1024 * 1024 * 1024,
                "KB" | "kB" => 1000,
                "MB" => 1_000_000,
                _ => return None,
            };
            number.checked_mul(multiplier).filter(|bytes| *bytes > 0)
        }
        _ => None,
    }
}

fn duration(
    path: &str,
    value: Option<&String>,
    default: &str,
    problems: &mut Problems,
) -> Option<Duration> {
    let text = value.map(String::as_str).unwrap_or(default);
    match humantime::parse_duration(text) {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            problems.add(path, format!("invalid duration {text:?} ({error}); write e.g. \"90s\", \"5m\", \"1h\", \"35d\""));
            None
        }
    }
}

/// A duration between `bounds` (both included), named with its bounds when outside them.
fn bounded_duration(
    path: &str,
    value: Option<&String>,
    default: &str,
    bounds: (Duration, Duration),
    problems: &mut Problems,
) -> Option<Duration> {
    let parsed = duration(path, value, default, problems)?;
    if parsed < bounds.0 || parsed > bounds.1 {
        problems.add(
            path,
            format!(
                "must be between {} and {}",
                humantime::format_duration(bounds.0),
                humantime::format_duration(bounds.1)
            ),
        );
        return None;
    }
    Some(parsed)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn validate_time(raw: &RawConfig, problems: &mut Problems) -> Option<TimeConfig> {
    let time = &raw.time;
    let zone_name = time.zone.clone().unwrap_or_else(|| "UTC".to_string());
    let week_start_text = time
        .week_start
        .clone()
        .unwrap_or_else(|| "monday".to_string());
    let week_start = parse_weekday(&week_start_text);
    if week_start.is_none() {
        problems.add(
            "time.week_start",
            format!("unknown weekday {week_start_text:?}; expected monday ... sunday"),
        );
    }
    let calendar = match Calendar::new(
        &zone_name,
        week_start.unwrap_or(jiff::civil::Weekday::Monday),
    ) {
        Ok(calendar) => Some(calendar),
        Err(_) => {
            problems.add("time.zone", format!("unknown time zone {zone_name:?}; expected an IANA name such as \"Europe/Berlin\" or \"UTC\""));
            None
        }
    };
    let lateness = duration(
        "time.allowed_lateness",
        time.allowed_lateness.as_ref(),
        "1h",
        problems,
    );
    let idle_timeout = duration(
        "time.idle_timeout",
        time.idle_timeout.as_ref(),
        "5m",
        problems,
    );
    if idle_timeout == Some(Duration::ZERO) {
        problems.add("time.idle_timeout", "must be longer than zero");
    }
    let mut skew = duration(
        "time.max_future_skew",
        time.max_future_skew.as_ref(),
        "1h",
        problems,
    );
    // Unset, it defaults to 1h or the allowed lateness, whichever is shorter.
    if let (None, Some(default), Some(lateness)) = (&time.max_future_skew, skew, lateness) {
        skew = Some(default.min(lateness));
    }
    if let (Some(skew), Some(lateness)) = (skew, lateness) {
        // The watermark never passes the wall clock, but a replay after a restart applies an
        // event stamped ahead at a later clock: at most `max_future_skew` ahead of the events
        // sent beside it, which must then still be within the lateness.
        if skew > lateness {
            problems.add(
                "time.max_future_skew",
                format!(
                    "must not exceed time.allowed_lateness ({}), or one event stamped that far \
                     ahead could make the on-time events beside it late when they are replayed \
                     after a restart",
                    humantime::format_duration(lateness)
                ),
            );
        }
    }
    week_start?;
    Some(TimeConfig {
        calendar: calendar?,
        allowed_lateness_ms: millis(lateness?),
        idle_timeout: idle_timeout?,
        max_future_skew_ms: millis(skew?),
    })
}

fn validate_state(raw: &RawConfig, problems: &mut Problems) -> Option<StateConfig> {
    let state = &raw.state;
    let path = state
        .path
        .clone()
        .unwrap_or_else(|| "nsm-state".to_string());
    if path.trim().is_empty() {
        problems.add("state.path", "must not be empty");
    }
    let retention = duration("state.retention", state.retention.as_ref(), "35d", problems);
    let flush = duration(
        "state.flush_interval",
        state.flush_interval.as_ref(),
        "200ms",
        problems,
    );
    if let Some(flush) = flush {
        if flush < Duration::from_millis(10) || flush > Duration::from_secs(60) {
            problems.add("state.flush_interval", "must be between 10ms and 60s");
        }
    }
    let flush_max_entries = match state.flush_max_entries {
        None => Some(crate::engine::DEFAULT_MAX_CHECKPOINT_ENTRIES),
        Some(entries) if (1_000..=10_000_000).contains(&entries) => usize::try_from(entries).ok(),
        Some(_) => {
            problems.add(
                "state.flush_max_entries",
                "must be between 1000 and 10000000 (entries written before a flush is due)",
            );
            None
        }
    };
    let backfill_rate = match state.backfill_rate {
        None => Some(None),
        Some(rate) if (1..=10_000_000).contains(&rate) => u32::try_from(rate).ok().map(Some),
        Some(_) => {
            problems.add(
                "state.backfill_rate",
                "must be between 1 and 10000000 (history messages a backfill reads per second)",
            );
            None
        }
    };
    let memory_limit = match &state.memory_limit {
        None => Some(crate::engine::DEFAULT_STATE_MEMORY),
        Some(value) => match parse_size(value) {
            Some(bytes) if bytes >= 1 << 20 => Some(bytes),
            _ => {
                problems.add(
                    "state.memory_limit",
                    "expected a size of at least 1MiB, such as \"256MiB\" or \"2GiB\"",
                );
                None
            }
        },
    };
    let changelog_topic = state.changelog.unwrap_or(true).then(|| {
        state.changelog_topic.clone().unwrap_or_else(|| {
            format!(
                "{}-changelog",
                raw.kafka.group_id.as_deref().unwrap_or("nsm")
            )
        })
    });
    if let Some(topic) = &changelog_topic {
        if let Err(message) = check_topic_name(topic) {
            problems.add("state.changelog_topic", message);
        }
        let inputs = raw.kafka.topics.as_deref().unwrap_or_default();
        if inputs.contains(topic)
            || raw.kafka.dead_letter_topic.as_ref() == Some(topic)
            || raw.kafka.repartition_topic.as_ref() == Some(topic)
        {
            problems.add(
                "state.changelog_topic",
                "must differ from the topics nsm reads, the dead-letter topic and the \
                 repartition topic",
            );
        }
    } else if state.changelog_topic.is_some() {
        problems.add(
            "state.changelog_topic",
            "is set but state.changelog = false: remove one of them",
        );
    }
    Some(StateConfig {
        path: PathBuf::from(path),
        retention_ms: millis(retention?),
        flush_interval: flush?,
        flush_max_entries: flush_max_entries?,
        memory_limit: memory_limit?,
        sync_writes: state.sync_writes.unwrap_or(true),
        backfill_rate: backfill_rate?,
        changelog_topic,
    })
}

fn validate_http(raw: &RawConfig, problems: &mut Problems) -> Option<HttpConfig> {
    let text = raw
        .http
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:9464".to_string());
    let listen = match text.parse::<SocketAddr>() {
        Ok(listen) => Some(listen),
        Err(_) => {
            problems.add(
                "http.listen",
                format!("invalid address {text:?}; expected host:port such as \"0.0.0.0:9464\""),
            );
            None
        }
    };
    let header_timeout = bounded_duration(
        "http.header_timeout",
        raw.http.header_timeout.as_ref(),
        "10s",
        (Duration::from_secs(1), Duration::from_secs(600)),
        problems,
    );
    let idle_timeout = bounded_duration(
        "http.idle_timeout",
        raw.http.idle_timeout.as_ref(),
        "90s",
        (Duration::from_secs(1), Duration::from_secs(3600)),
        problems,
    );
    let max_connections = match raw.http.max_connections {
        None => Some(256),
        Some(count) if (1..=1_000_000).contains(&count) => usize::try_from(count).ok(),
        Some(_) => {
            problems.add(
                "http.max_connections",
                "must be between 1 and 1000000 (connections open at once)",
            );
            None
        }
    };
    let tls = raw.http.tls.as_ref().and_then(|tls| {
        let cert_file = required_file(
            tls.cert_file.as_deref(),
            "http.tls.cert_file",
            "certificate chain",
            problems,
        );
        let key_file = required_file(
            tls.key_file.as_deref(),
            "http.tls.key_file",
            "private key",
            problems,
        );
        Some(HttpTls {
            cert_file: cert_file?,
            key_file: key_file?,
        })
    });
    let basic_auth = raw
        .http
        .basic_auth
        .as_ref()
        .and_then(|auth| basic_auth_users(auth, problems));
    Some(HttpConfig {
        listen: listen?,
        header_timeout: header_timeout?,
        idle_timeout: idle_timeout?,
        max_connections: max_connections?,
        tls,
        basic_auth,
    })
}

fn required_file(
    path: Option<&str>,
    key: &str,
    what: &str,
    problems: &mut Problems,
) -> Option<PathBuf> {
    match path {
        Some(path) if !path.trim().is_empty() => Some(PathBuf::from(path)),
        _ => {
            problems.add(key, format!("missing: the PEM file of the {what}"));
            None
        }
    }
}

/// `[http.basic_auth] users`: every name with a bcrypt hash. A value that is not a hash may
/// be a plaintext password, so no message ever shows it.
fn basic_auth_users(auth: &RawBasicAuth, problems: &mut Problems) -> Option<BasicAuthUsers> {
    let hint = "generate one with `nsm hash-password` (or `htpasswd -nBC 10 USER`)";
    let Some(raw_users) = auth.users.as_ref().filter(|users| !users.is_empty()) else {
        problems.add(
            "http.basic_auth.users",
            format!("missing: at least one user, as {{ name = \"<bcrypt hash>\" }}; {hint}"),
        );
        return None;
    };
    let mut users = BTreeMap::new();
    for (name, hash) in raw_users {
        let path = format!("http.basic_auth.users.{name:?}");
        if name.is_empty() || name.contains(':') || name.chars().any(char::is_control) {
            problems.add(
                path,
                "a user name must be non-empty, without ':' or control characters",
            );
            continue;
        }
        match hash {
            toml::Value::String(hash) if is_bcrypt_hash(hash) => {
                users.insert(name.clone(), hash.clone());
            }
            _ => problems.add(
                path,
                format!("not a bcrypt hash (passwords are never written in the config); {hint}"),
            ),
        }
    }
    (users.len() == raw_users.len()).then(|| BasicAuthUsers::new(users))
}

/// `$2b$10$` followed by 53 characters of bcrypt's base64, as htpasswd, Python's bcrypt and
/// `nsm hash-password` write them (`$2a$`, `$2x$`, `$2y$` too).
fn is_bcrypt_hash(text: &str) -> bool {
    let bytes = text.as_bytes();
    let cost_is_valid = text
        .get(4..6)
        .and_then(|cost| cost.parse::<u32>().ok())
        .is_some_and(|cost| (4..=31).contains(&cost));
    bytes.len() == 60
        && bytes[0] == b'$'
        && bytes[1] == b'2'
        && matches!(bytes[2], b'a' | b'b' | b'x' | b'y')
        && bytes[3] == b'$'
        && cost_is_valid
        && bytes[6] == b'$'
        && bytes[7..]
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'/'))
}

fn is_valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(first) if first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn validate_metric(
    path: &str,
    role: Role,
    raw: &RawMetric,
    default_distinct_field: Option<&FieldPath>,
    problems: &mut Problems,
) -> Option<MetricDef> {
    let name = raw.name.clone().unwrap_or_default();
    if name.is_empty() {
        problems.add(format!("{path}.name"), "missing: a snake_case metric name");
    } else if !is_valid_metric_name(&name) || name.len() > 100 {
        problems.add(
            format!("{path}.name"),
            format!(
                "invalid name {name:?}: lowercase letters, digits and '_', starting with a letter"
            ),
        );
    }

    // Derived kinds take their window from the metrics they read.
    let is_derived = matches!(raw.kind.as_deref(), Some("ratio" | "retention"));
    refuse_keys_of_other_kinds(path, raw, problems);
    let kind = match (raw.kind.as_deref(), &raw.field) {
        (None, _) => {
            problems.add(
                format!("{path}.kind"),
                "missing: one of count, sum, distinct, threshold, ratio, retention, conversion",
            );
            None
        }
        (Some("count"), Some(_)) => {
            problems.add(
                format!("{path}.field"),
                "a count has no field; remove it or use kind = \"sum\"",
            );
            None
        }
        (Some("count"), None) => Some(MetricKind::Count),
        (Some("sum"), None) => {
            problems.add(
                format!("{path}.field"),
                "missing: the numeric field to sum, e.g. \"properties.amount\"",
            );
            None
        }
        (Some("sum"), Some(field)) => {
            field_path(&format!("{path}.field"), Some(field), "", problems)
                .map(|field| MetricKind::Sum { field })
        }
        (Some("distinct"), field) => match field {
            Some(field) => field_path(&format!("{path}.field"), Some(field), "", problems),
            None => default_distinct_field.cloned(),
        }
        .map(|field| MetricKind::Distinct { field }),
        (Some("ratio"), field) => validate_ratio(path, raw, field.is_some(), problems),
        (Some("conversion"), _) => validate_conversion(path, raw, default_distinct_field, problems),
        (Some("retention"), field) => {
            if field.is_some() || raw.filter.is_some() {
                problems.add(
                    path.to_string(),
                    "a retention metric has no field or where; they belong to its `of` metric",
                );
            }
            match &raw.of {
                Some(of) if !of.trim().is_empty() => Some(MetricKind::Retention { of: of.clone() }),
                _ => {
                    problems.add(
                        format!("{path}.of"),
                        "missing: the distinct metric whose returning entities to count",
                    );
                    None
                }
            }
        }
        (Some("threshold"), field) => validate_threshold(path, raw, field.as_ref(), problems),
        (Some(other), _) => {
            problems.add(
                format!("{path}.kind"),
                format!(
                    "unknown kind {other:?}; expected count, sum, distinct, threshold, ratio, \
                     retention or conversion"
                ),
            );
            None
        }
    };

    let trailing = validate_trailing(path, raw, kind.as_ref(), problems);
    let window = match raw.window.as_deref() {
        // A ratio takes its parts' window; `resolve_ratios` fills it in.
        None if is_derived => Some(CalendarUnit::Week),
        None if raw.trailing.is_some() => trailing.map(|trailing| trailing.nominal_unit()),
        None => {
            problems.add(
                format!("{path}.window"),
                "missing: one of \"1h\", \"1d\", \"1w\", \"1mo\"",
            );
            None
        }
        Some(text) => {
            let unit = CalendarUnit::parse(text);
            if unit.is_none() {
                problems.add(
                    format!("{path}.window"),
                    format!("unknown window {text:?}; expected \"1h\", \"1d\", \"1w\" or \"1mo\""),
                );
            }
            unit
        }
    };

    let filter = parse_filter(&format!("{path}.where"), raw.filter.as_ref(), problems);

    let segments = validate_segments(path, raw, problems);
    let owner = raw.owner.clone().filter(|owner| !owner.trim().is_empty());
    Some(MetricDef {
        name,
        role,
        owner,
        description: raw.description.clone().unwrap_or_default(),
        kind: kind?,
        filter,
        window: window?,
        trailing,
        segments,
    })
}

/// A conversion's keys: the start filter `from`, the duration `within`, and the entity
/// (`field`, default `events.user`); `where` selects the conversion events.
fn validate_conversion(
    path: &str,
    raw: &RawMetric,
    default_entity: Option<&FieldPath>,
    problems: &mut Problems,
) -> Option<MetricKind> {
    let entity = match &raw.field {
        Some(field) => field_path(&format!("{path}.field"), Some(field), "", problems),
        None => default_entity.cloned(),
    };
    if raw.from.is_none() {
        problems.add(
            format!("{path}.from"),
            "missing: the start events, e.g. from = { event = \"onboarding_completed\" }",
        );
    }
    if raw.filter.is_none() {
        problems.add(
            format!("{path}.where"),
            "missing: the conversion events, e.g. where = { event = \"message_sent\" }",
        );
    }
    let from = parse_filter(&format!("{path}.from"), raw.from.as_ref(), problems);
    let within = match &raw.within {
        None => {
            problems.add(
                format!("{path}.within"),
                "missing: how soon after the start the conversion must happen, e.g. \"7d\"",
            );
            None
        }
        Some(text) => duration(&format!("{path}.within"), Some(text), "", problems),
    };
    Some(MetricKind::Conversion {
        entity: entity?,
        from,
        within_ms: millis(within?),
    })
}

/// `trailing = "7d"`: a moving window instead of a calendar one, for counts, sums, distinct
/// counts, thresholds and conversions (ratios and retentions take their parts').
fn validate_trailing(
    path: &str,
    raw: &RawMetric,
    kind: Option<&MetricKind>,
    problems: &mut Problems,
) -> Option<Trailing> {
    let text = raw.trailing.as_ref()?;
    let key = format!("{path}.trailing");
    if raw.window.is_some() {
        problems.add(
            key.clone(),
            "a metric has either a calendar `window` or a `trailing` one; remove one",
        );
    }
    if let Some(MetricKind::Ratio { .. } | MetricKind::Retention { .. }) = kind {
        problems.add(
            key.clone(),
            "a ratio or retention takes the window of the metrics it reads; put `trailing` on \
             them",
        );
    }
    let length = duration(&key, Some(text), "", problems)?;
    let trailing = Trailing::new(millis(length));
    if trailing.is_none() {
        problems.add(
            key,
            format!(
                "{text:?} is not a trailing length nsm keeps: whole minutes from \"1m\" to \
                 \"1000d\" (\"24h\", \"7d\", \"28d\")"
            ),
        );
    }
    trailing
}

/// Most segments a breakdown may export per window (beside the overflow series).
const MAX_TOP_SEGMENTS: i64 = 1000;
const DEFAULT_TOP_SEGMENTS: u32 = 10;

/// `by = [...]`: a breakdown, for every kind. A ratio's or a retention's segments are those of
/// the metrics it reads, so they must be broken down by the same fields (`resolve_ratios`,
/// `resolve_retention`).
fn validate_segments(path: &str, raw: &RawMetric, problems: &mut Problems) -> Option<Segmentation> {
    let Some(by) = &raw.by else {
        if raw.top.is_some() {
            problems.add(
                format!("{path}.top"),
                "only a breakdown has a top; add by = [\"field\", ...] or remove it",
            );
        }
        return None;
    };
    if by.is_empty() || by.len() > 4 {
        problems.add(
            format!("{path}.by"),
            "expected 1 to 4 fields to break the metric down by",
        );
    }
    let fields: Vec<Option<FieldPath>> = by
        .iter()
        .enumerate()
        .map(|(index, field)| field_path(&format!("{path}.by[{index}]"), Some(field), "", problems))
        .collect();
    let top = match raw.top {
        None => Some(DEFAULT_TOP_SEGMENTS),
        Some(top) if (1..=MAX_TOP_SEGMENTS).contains(&top) => u32::try_from(top).ok(),
        Some(top) => {
            problems.add(
                format!("{path}.top"),
                format!(
                    "{top} is out of range; expected 1 to {MAX_TOP_SEGMENTS} exported segments"
                ),
            );
            None
        }
    };
    Some(Segmentation {
        by: fields.into_iter().collect::<Option<Vec<_>>>()?,
        top: top?,
    })
}

/// Keys that belong to one kind only, refused (with the kind they belong to) on the others.
fn refuse_keys_of_other_kinds(path: &str, raw: &RawMetric, problems: &mut Problems) {
    let kind_keys: [(&str, &str, bool); 7] = [
        ("conversion", "from", raw.from.is_some()),
        ("conversion", "within", raw.within.is_some()),
        ("retention", "of", raw.of.is_some()),
        ("threshold", "entity", raw.entity.is_some()),
        ("threshold", "at_least", raw.at_least.is_some()),
        ("ratio", "numerator", raw.numerator.is_some()),
        ("ratio", "denominator", raw.denominator.is_some()),
    ];
    for (owner, key, present) in kind_keys {
        if present && raw.kind.as_deref() != Some(owner) {
            problems.add(
                format!("{path}.{key}"),
                format!("only a {owner} metric has `{key}`; remove it or use kind = \"{owner}\""),
            );
        }
    }
}

/// A threshold's keys: the entity it counts, k, and optionally the actor field whose distinct
/// values must reach k (without it, k events do).
fn validate_threshold(
    path: &str,
    raw: &RawMetric,
    actor: Option<&String>,
    problems: &mut Problems,
) -> Option<MetricKind> {
    let entity = match &raw.entity {
        None => {
            problems.add(
                format!("{path}.entity"),
                "missing: the field of the entity counted, e.g. \"properties.project_id\"",
            );
            None
        }
        Some(entity) => field_path(&format!("{path}.entity"), Some(entity), "", problems),
    };
    let actor = match actor {
        Some(actor) => Some(field_path(
            &format!("{path}.field"),
            Some(actor),
            "",
            problems,
        )?),
        None => None,
    };
    let at_least = match raw.at_least {
        None => {
            problems.add(
                format!("{path}.at_least"),
                "missing: how many events (or distinct `field` values) an entity needs, e.g. 3",
            );
            None
        }
        Some(value) => match u32::try_from(value) {
            Ok(value) if (1..=10_000).contains(&value) => Some(value),
            _ => {
                problems.add(
                    format!("{path}.at_least"),
                    format!("{value} is out of range; expected 1 to 10000"),
                );
                None
            }
        },
    };
    Some(MetricKind::Threshold {
        entity: entity?,
        actor,
        at_least: at_least?,
    })
}

/// A ratio's own keys: the two part names, and no field or filter (those belong to the parts).
fn validate_ratio(
    path: &str,
    raw: &RawMetric,
    has_field: bool,
    problems: &mut Problems,
) -> Option<MetricKind> {
    if has_field {
        problems.add(
            format!("{path}.field"),
            "a ratio has no field; its numerator and denominator metrics read the events",
        );
    }
    if raw.filter.is_some() {
        problems.add(
            format!("{path}.where"),
            "a ratio has no filter; put it on the numerator or denominator metric",
        );
    }
    let part = |key: &str, value: &Option<String>, problems: &mut Problems| {
        let name = value.clone().filter(|name| !name.trim().is_empty());
        if name.is_none() {
            problems.add(
                format!("{path}.{key}"),
                format!(
                    "missing: a ratio needs its {key}, the name of another metric in this \
                     config (a ratio without both parts cannot be computed or re-aggregated)"
                ),
            );
        }
        name
    };
    let numerator = part("numerator", &raw.numerator, problems);
    let denominator = part("denominator", &raw.denominator, problems);
    Some(MetricKind::Ratio {
        numerator: numerator?,
        denominator: denominator?,
    })
}

/// Checks that every retention metric reads a distinct metric, and gives it that window.
fn resolve_retention(
    metrics: &mut [MetricDef],
    paths: &[String],
    explicit_window: &[bool],
    problems: &mut Problems,
) {
    for index in 0..metrics.len() {
        let MetricKind::Retention { of } = metrics[index].kind.clone() else {
            continue;
        };
        let path = &paths[index];
        let Some(base) = metrics.iter().find(|metric| metric.name == of) else {
            let distinct: Vec<&str> = metrics
                .iter()
                .filter(|metric| matches!(metric.kind, MetricKind::Distinct { .. }))
                .map(|metric| metric.name.as_str())
                .collect();
            problems.add(
                format!("{path}.of"),
                format!(
                    "no metric named {of:?}; distinct metrics: {}",
                    distinct.join(", ")
                ),
            );
            continue;
        };
        if !matches!(base.kind, MetricKind::Distinct { .. }) {
            problems.add(
                format!("{path}.of"),
                format!(
                    "{of:?} is a {}; retention counts the returning entities of a distinct metric",
                    base.kind.label()
                ),
            );
            continue;
        }
        check_breakdown_of_part(path, &metrics[index], "of", base, problems);
        // A trailing base gives a trailing retention: the range against the one before it.
        let (window, trailing) = (base.window, base.trailing);
        metrics[index].trailing = trailing;
        if !explicit_window[index] {
            metrics[index].window = window;
        } else if metrics[index].window != window {
            problems.add(
                format!("{path}.window"),
                format!(
                    "{:?} differs from the window {:?} of {of:?}; remove it (retention takes \
                     the window of its metric)",
                    metrics[index].window.label(),
                    window.label()
                ),
            );
        }
    }
}

/// A ratio's or retention's segments are computed from the segments of the metric it reads
/// (`key` names it), so a breakdown needs the same one there.
fn check_breakdown_of_part(
    path: &str,
    metric: &MetricDef,
    key: &str,
    part: &MetricDef,
    problems: &mut Problems,
) {
    let Some(segments) = &metric.segments else {
        return;
    };
    let by = |segments: &Segmentation| {
        let fields: Vec<String> = segments.by.iter().map(ToString::to_string).collect();
        format!("{fields:?}")
    };
    if part.segments.as_ref().map(|part| &part.by) != Some(&segments.by) {
        let theirs = part
            .segments
            .as_ref()
            .map_or("has no breakdown".to_string(), |part| {
                format!("is by {}", by(part))
            });
        problems.add(
            format!("{path}.by"),
            format!(
                "the {} is by {} but its {key} {:?} {theirs}; its segments are computed from \
                 that metric's, so give both the same `by`",
                metric.kind.label(),
                by(segments),
                part.name
            ),
        );
    }
}

/// Checks that every ratio's parts exist, are not ratios themselves, and share one window,
/// and gives a ratio without its own `window` the parts' window.
fn resolve_ratios(
    metrics: &mut [MetricDef],
    paths: &[String],
    explicit_window: &[bool],
    problems: &mut Problems,
) {
    let known: Vec<String> = metrics.iter().map(|metric| metric.name.clone()).collect();
    for index in 0..metrics.len() {
        let MetricKind::Ratio {
            numerator,
            denominator,
        } = metrics[index].kind.clone()
        else {
            continue;
        };
        let path = &paths[index];
        let mut part_windows = Vec::new();
        for (key, name) in [("numerator", &numerator), ("denominator", &denominator)] {
            let Some(part) = metrics.iter().find(|metric| &metric.name == name) else {
                problems.add(
                    format!("{path}.{key}"),
                    format!(
                        "no metric named {name:?} (the ratio's {key} is missing); known: {}",
                        known.join(", ")
                    ),
                );
                continue;
            };
            if part.name == metrics[index].name {
                problems.add(format!("{path}.{key}"), "a ratio cannot divide itself");
            } else if matches!(
                part.kind,
                MetricKind::Ratio { .. } | MetricKind::Retention { .. }
            ) {
                problems.add(
                    format!("{path}.{key}"),
                    format!("{name:?} is a {}; the parts of a ratio must be counts, sums, distinct counts or thresholds", part.kind.label()),
                );
            } else {
                check_breakdown_of_part(path, &metrics[index], key, part, problems);
                part_windows.push((key, name, part.window, part.trailing, part.window_label()));
            }
        }
        if let [(_, first_name, first, first_trailing, first_label), (_, second_name, second, second_trailing, second_label)] =
            &part_windows[..]
        {
            if first != second || first_trailing != second_trailing {
                problems.add(
                    path.clone(),
                    format!(
                        "the numerator {first_name:?} has window {first_label:?} but the \
                         denominator {second_name:?} has {second_label:?}; a ratio divides \
                         values of the same window"
                    ),
                );
            }
        }
        if let Some((_, name, window, trailing, _)) = part_windows.first().cloned() {
            metrics[index].trailing = trailing;
            if !explicit_window[index] {
                metrics[index].window = window;
            } else if trailing.is_some() || metrics[index].window != window {
                problems.add(
                    format!("{path}.window"),
                    format!(
                        "{:?} differs from the window {:?} of its part {name:?}; remove it (a \
                         ratio takes its parts' window) or make them equal",
                        metrics[index].window.label(),
                        window.label()
                    ),
                );
            }
        }
    }
}
