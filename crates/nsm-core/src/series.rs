//! Every series nsm exports, in one table: name, help, labels and type.
//!
//! `nsm-http` registers its collectors from these entries and `nsm-gen` checks the rules and
//! dashboards it writes against them, so renaming a series is one edit here, and a rule or
//! panel naming a series nsm does not export fails a unit test, not a slow end-to-end one.

/// What Prometheus type a series is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Gauge,
    Counter,
    /// Exported as `<name>_bucket`, `<name>_sum` and `<name>_count`.
    Histogram,
}

/// One exported series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    pub kind: Type,
}

const fn series(
    name: &'static str,
    kind: Type,
    labels: &'static [&'static str],
    help: &'static str,
) -> Series {
    Series {
        name,
        help,
        labels,
        kind,
    }
}

const PARTITION: &[&str] = &["topic", "partition"];
const WINDOW: &[&str] = &["metric", "window"];

// Business values.

pub const METRIC_VALUE: Series = series(
    "nsm_metric_value",
    Type::Gauge,
    WINDOW,
    "Value of a metric in its current or previous window (and before_previous, when the \
     retention keeps it), summed over the partitions this instance owns. window=\"baseline\": \
     what the comparable past window(s) held at the current window's elapsed point (weekly, \
     monthly: the previous window; hourly, daily: the median of the same weekday (and hour) 1 \
     to 4 weeks back, each also exported as baseline_<k>w; trailing: the previous range); \
     absent when no past window has a value.",
);
pub const WINDOW_START: Series = series(
    "nsm_metric_window_start_timestamp_seconds",
    Type::Gauge,
    WINDOW,
    "Start of the window the value belongs to, Unix seconds.",
);
pub const WINDOW_END: Series = series(
    "nsm_metric_window_end_timestamp_seconds",
    Type::Gauge,
    WINDOW,
    "End (exclusive) of the window the value belongs to, Unix seconds.",
);
pub const WINDOW_COMPLETE: Series = series(
    "nsm_metric_window_complete",
    Type::Gauge,
    WINDOW,
    "1 once the window can no longer change: every owned partition's watermark passed its end \
     plus the allowed lateness.",
);
pub const WINDOW_PARTIAL: Series = series(
    "nsm_metric_window_partial",
    Type::Gauge,
    WINDOW,
    "1 when the window lacks events nsm never counted for this metric: it was added to the \
     config or changed after the window started (on some partition this instance owns).",
);
pub const SEGMENT_RATIO_PART: Series = series(
    "nsm_metric_segment_ratio_part",
    Type::Gauge,
    &["metric", "window", "segment", "part"],
    "Numerator and denominator of one exported segment of a ratio or retention metric with a \
     breakdown. Sum each part across instances before dividing.",
);
pub const RATIO_PART: Series = series(
    "nsm_metric_ratio_part",
    Type::Gauge,
    &["metric", "window", "part"],
    "Numerator and denominator of a ratio metric in its current or previous window. Sum each \
     part across instances before dividing.",
);
pub const SEGMENT_VALUE: Series = series(
    "nsm_metric_segment_value",
    Type::Gauge,
    &["metric", "window", "segment"],
    "Value of one segment of a metric with a breakdown (`by`), in its current or previous \
     window: the `top` largest segments, and `__other__` summing the rest.",
);
pub const METRIC_INFO: Series = series(
    "nsm_metric_info",
    Type::Gauge,
    &["metric", "role", "kind", "period", "owner", "description"],
    "Metadata of each configured metric; always 1.",
);
pub const BUILD_INFO: Series = series(
    "nsm_build_info",
    Type::Gauge,
    &["version"],
    "Version of the running nsm; always 1.",
);

// The pipeline.

pub const EVENTS_CONSUMED: Series = series(
    "nsm_events_consumed_total",
    Type::Counter,
    PARTITION,
    "Kafka messages consumed, valid or not.",
);
pub const EVENTS_INVALID: Series = series(
    "nsm_events_invalid_total",
    Type::Counter,
    &["reason"],
    "Messages rejected as invalid, by reason; each is sent to the dead-letter topic.",
);
pub const EVENTS_LATE: Series = series(
    "nsm_events_late_total",
    Type::Counter,
    &[],
    "Events older than the watermark by more than the allowed lateness; sent to the \
     dead-letter topic.",
);
pub const EVENTS_DUPLICATE: Series = series(
    "nsm_events_duplicate_total",
    Type::Counter,
    &[],
    "Valid events skipped because an event with the same id was applied within \
     events.dedup_horizon.",
);
pub const EVENTS_FORWARDED: Series = series(
    "nsm_events_forwarded_total",
    Type::Counter,
    &[],
    "Records sent to the repartition topic: events of metrics counting another entity than \
     kafka.key_field, and records carrying only an input partition's time.",
);
pub const DEAD_LETTERS: Series = series(
    "nsm_dead_letters_total",
    Type::Counter,
    &["result"],
    "Dead letters by delivery result: delivered; failed, a delivery refused for good (unknown \
     topic, not authorized, too large), each attempt; dropped, given up under \
     kafka.dead_letter_on_failure = \"drop\".",
);
pub const DEAD_LETTERS_HELD: Series = series(
    "nsm_dead_letters_held",
    Type::Gauge,
    &[],
    "Dead letters refused for good and held to be sent again (kafka.dead_letter_on_failure = \
     \"hold\"): while above 0 no checkpoint is stored and values do not advance.",
);
pub const OFFSETS_SKIPPED: Series = series(
    "nsm_offsets_skipped_total",
    Type::Counter,
    &["reason"],
    "Offsets of input partitions never applied, by reason: gap, offsets missing between two \
     messages (deleted by retention before they were read, or compaction and transaction \
     markers); rewound, messages below the stored offset after the log went back (a recreated \
     or truncated topic).",
);
pub const CONSUMER_LAG: Series = series(
    "nsm_consumer_lag_messages",
    Type::Gauge,
    PARTITION,
    "Messages between the consumer position and the end of the partition.",
);
pub const WATERMARK: Series = series(
    "nsm_watermark_timestamp_seconds",
    Type::Gauge,
    PARTITION,
    "Event-time watermark of a partition, Unix seconds; moves to the wall clock when the \
     partition is idle.",
);
pub const LAST_EVENT: Series = series(
    "nsm_last_event_timestamp_seconds",
    Type::Gauge,
    PARTITION,
    "Largest event time applied in a partition, Unix seconds.",
);
pub const PARTITIONS_OWNED: Series = series(
    "nsm_partitions_owned",
    Type::Gauge,
    &[],
    "Kafka partitions this instance owns.",
);
pub const VISIBLE_LATENCY: Series = series(
    "nsm_event_visible_latency_seconds",
    Type::Histogram,
    &[],
    "From an event's Kafka timestamp to its effect being visible on /metrics.",
);
pub const LAST_PUBLISH: Series = series(
    "nsm_last_publish_timestamp_seconds",
    Type::Gauge,
    &[],
    "Wall-clock time values were last published, Unix seconds.",
);
pub const BROKERS_UP: Series = series(
    "nsm_kafka_brokers_up",
    Type::Gauge,
    &[],
    "Kafka brokers the consumer is connected to, from librdkafka's statistics every 5s; 0 \
     while the cluster is unreachable.",
);

// State.

pub const CHECKPOINT_DURATION: Series = series(
    "nsm_state_checkpoint_duration_seconds",
    Type::Histogram,
    &["result"],
    "Time to store one checkpoint (changelog sent and acknowledged, then state and offsets in \
     one atomic batch), by result. Events go on being applied meanwhile.",
);
pub const CHECKPOINT_WAIT: Series = series(
    "nsm_state_checkpoint_wait_seconds_total",
    Type::Counter,
    &[],
    "Time the consumer waited for a checkpoint still being stored before it could take the \
     next: a rate near 1 means storing state is the bottleneck.",
);
pub const ENTRIES_IN_MEMORY: Series = series(
    "nsm_state_entries_in_memory",
    Type::Gauge,
    &[],
    "Per-entity state entries (members, threshold progress, funnels, event ids) held in \
     memory: written since the last checkpoint, or cached. Bounded; the rest is read from \
     RocksDB.",
);
pub const RESTORE_DURATION: Series = series(
    "nsm_state_restore_duration_seconds",
    Type::Gauge,
    PARTITION,
    "Time the last take-over of each owned partition spent restoring its state from the \
     changelog (0: the local copy was current).",
);
pub const BACKFILL_PROGRESS: Series = series(
    "nsm_backfill_progress_ratio",
    Type::Gauge,
    PARTITION,
    "Share of the retained history read by the backfill of each owned partition whose metrics \
     were added or changed (1: swapped in; their windows are partial until then).",
);
pub const RESTORED_RECORDS: Series = series(
    "nsm_state_restored_records_total",
    Type::Counter,
    &[],
    "Changelog records read to restore partitions taken over.",
);
pub const CHANGELOG_RECORDS: Series = series(
    "nsm_changelog_records_total",
    Type::Counter,
    &[],
    "State change records written to the changelog topic, end markers included.",
);
pub const CHANGELOG_LOST: Series = series(
    "nsm_changelog_lost_total",
    Type::Counter,
    &[],
    "Partitions taken whose changelog no longer held the records this instance had written or \
     read (the topic was deleted, recreated or truncated): the local state was kept and sent \
     to the changelog again, unless the changelog held a newer copy.",
);

/// Every series, in the order of this table.
pub const ALL: [Series; 33] = [
    METRIC_VALUE,
    WINDOW_START,
    WINDOW_END,
    WINDOW_COMPLETE,
    WINDOW_PARTIAL,
    SEGMENT_RATIO_PART,
    RATIO_PART,
    SEGMENT_VALUE,
    METRIC_INFO,
    BUILD_INFO,
    EVENTS_CONSUMED,
    EVENTS_INVALID,
    EVENTS_LATE,
    EVENTS_DUPLICATE,
    EVENTS_FORWARDED,
    DEAD_LETTERS,
    DEAD_LETTERS_HELD,
    OFFSETS_SKIPPED,
    CONSUMER_LAG,
    WATERMARK,
    LAST_EVENT,
    PARTITIONS_OWNED,
    VISIBLE_LATENCY,
    LAST_PUBLISH,
    BROKERS_UP,
    CHECKPOINT_DURATION,
    CHECKPOINT_WAIT,
    ENTRIES_IN_MEMORY,
    RESTORE_DURATION,
    BACKFILL_PROGRESS,
    RESTORED_RECORDS,
    CHANGELOG_RECORDS,
    CHANGELOG_LOST,
];

/// The series a sample name belongs to: its own, or a histogram's `_bucket`, `_sum` or
/// `_count`.
pub fn of_sample(sample: &str) -> Option<&'static Series> {
    ALL.iter().find(|series| {
        sample == series.name
            || (series.kind == Type::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| sample.strip_suffix(suffix) == Some(series.name)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_prometheus_conventions() {
        let mut names: Vec<&str> = ALL.iter().map(|series| series.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "a name twice");
        for series in ALL {
            assert!(series.name.starts_with("nsm_"), "{}", series.name);
            assert_eq!(
                series.kind == Type::Counter,
                series.name.ends_with("_total"),
                "counters, and only they, end in _total: {}",
                series.name
            );
            assert!(series.help.ends_with('.'), "{}", series.name);
        }
        assert_eq!(
            of_sample("nsm_state_checkpoint_duration_seconds_bucket"),
            Some(&CHECKPOINT_DURATION)
        );
        assert_eq!(of_sample("nsm_metric_value_count"), None);
    }
}
