//! Every series nsm exports, in one place: names, labels and their bounded values.
//!
//! Business values (`nsm_metric_*`) and self-metrics (`nsm_events_*`, `nsm_consumer_*`, ...).
//! The pipeline never touches a Prometheus handle per event: it counts locally and hands
//! batches to [`Telemetry`] when it publishes, off the hot path.

use std::collections::BTreeSet;

use nsm_core::engine::{AggValue, Baseline, MetricValues, PartitionStatus, Plan, WindowValue};
use nsm_core::reject::RejectReason;
use nsm_core::series::{self, Series};
use nsm_core::PartitionKey;
use prometheus::{
    Counter, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

/// Why offsets of an input partition were never applied (`nsm_offsets_skipped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OffsetSkip {
    /// Offsets missing between two consecutive messages of a partition (or between its stored
    /// offset and its first message): deleted by retention before nsm read them (an offset
    /// out of range resumes at the earliest one still in the log), or legitimately absent:
    /// removed by compaction, or transaction markers and aborted records of a transactional
    /// topic. Counts offsets, not messages.
    Gap,
    /// Messages below the partition's stored offset, skipped as applied before: the log went
    /// back (the topic was deleted and recreated, or truncated), and the restart at its
    /// earliest offset redelivers offsets nsm already passed. Counts messages.
    Rewound,
}

impl OffsetSkip {
    pub const ALL: [OffsetSkip; 2] = [OffsetSkip::Gap, OffsetSkip::Rewound];

    pub fn label(self) -> &'static str {
        match self {
            OffsetSkip::Gap => "gap",
            OffsetSkip::Rewound => "rewound",
        }
    }
}

/// The dead-letter producer's counters, as they stand.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterCounts {
    pub delivered: u64,
    /// Deliveries refused for good, every attempt.
    pub failed: u64,
    /// Letters given up (`kafka.dead_letter_on_failure = "drop"`).
    pub dropped: u64,
    /// Letters refused and held: no checkpoint is stored while there are.
    pub held: u64,
}

/// Counts accumulated by the pipeline between two publishes.
#[derive(Debug, Default, Clone)]
pub struct BatchCounts {
    pub consumed: Vec<(PartitionKey, u64)>,
    pub rejected: Vec<(RejectReason, u64)>,
    /// Offsets never applied, by why.
    pub skipped: Vec<(OffsetSkip, u64)>,
    /// Valid events skipped because their id was already applied within the dedup horizon.
    pub duplicates: u64,
    /// Records sent to the repartition topic.
    pub forwarded: u64,
    /// Seconds from the Kafka message timestamp to the moment its effect became visible.
    pub visible_latencies_seconds: Vec<f64>,
}

/// All exported series.
pub struct Telemetry {
    registry: Registry,
    metric_value: GaugeVec,
    window_start: GaugeVec,
    window_end: GaugeVec,
    window_complete: GaugeVec,
    window_partial: GaugeVec,
    ratio_part: GaugeVec,
    segment_value: GaugeVec,
    segment_ratio_part: GaugeVec,
    /// (metric, window, segment) series exported at the last publish.
    exported_segments: std::sync::Mutex<BTreeSet<[String; 3]>>,
    /// (metric, window) baseline series exported at the last publish: a baseline comes and
    /// goes with the past windows the state holds.
    exported_baselines: std::sync::Mutex<BTreeSet<[String; 2]>>,
    consumed: IntCounterVec,
    invalid: IntCounterVec,
    late: IntCounter,
    duplicates: IntCounter,
    forwarded: IntCounter,
    dead_letters: IntCounterVec,
    dead_letters_held: IntGauge,
    offsets_skipped: IntCounterVec,
    consumer_lag: IntGaugeVec,
    watermark: GaugeVec,
    last_event: GaugeVec,
    partitions_owned: IntGauge,
    visible_latency: Histogram,
    checkpoint_duration: HistogramVec,
    checkpoint_wait: Counter,
    last_publish: Gauge,
    state_entries_in_memory: IntGauge,
    restore_duration: GaugeVec,
    backfill_progress: GaugeVec,
    brokers_up: IntGauge,
    restored_records: IntCounter,
    changelog_records: IntCounter,
    changelog_lost: IntCounter,
    exported_partitions: std::sync::Mutex<BTreeSet<PartitionKey>>,
}

/// Registers the collector `build` makes for `series` (names are static and unique: a failure
/// here is a bug every test catches).
fn made<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    series: &Series,
    build: impl FnOnce(&Series) -> prometheus::Result<T>,
) -> T {
    let collector = build(series).unwrap_or_else(|error| panic!("{}: {error}", series.name));
    registry
        .register(Box::new(collector.clone()))
        .unwrap_or_else(|error| panic!("{}: {error}", series.name));
    collector
}

fn opts(series: &Series) -> Opts {
    Opts::new(series.name, series.help)
}

impl Telemetry {
    pub fn new(plan: &Plan, version: &str) -> Telemetry {
        let registry = Registry::new();
        let gauge_vec = |s: &Series| made(&registry, s, |s| GaugeVec::new(opts(s), s.labels));
        let int_counter = |s: &Series| made(&registry, s, |s| IntCounter::with_opts(opts(s)));
        let int_counter_vec =
            |s: &Series| made(&registry, s, |s| IntCounterVec::new(opts(s), s.labels));
        let int_gauge = |s: &Series| made(&registry, s, |s| IntGauge::with_opts(opts(s)));
        let metric_value = gauge_vec(&series::METRIC_VALUE);
        let window_start = gauge_vec(&series::WINDOW_START);
        let window_end = gauge_vec(&series::WINDOW_END);
        let window_complete = gauge_vec(&series::WINDOW_COMPLETE);
        let window_partial = gauge_vec(&series::WINDOW_PARTIAL);
        let segment_ratio_part = gauge_vec(&series::SEGMENT_RATIO_PART);
        let ratio_part = gauge_vec(&series::RATIO_PART);
        let segment_value = gauge_vec(&series::SEGMENT_VALUE);
        let info = gauge_vec(&series::METRIC_INFO);
        for metric in plan.metrics() {
            info.with_label_values(&[
                metric.name.as_str(),
                metric.role.label(),
                metric.kind.label(),
                metric.window_label().as_str(),
                metric.owner.as_deref().unwrap_or(""),
                metric.description.as_str(),
            ])
            .set(1.0);
        }
        let build = gauge_vec(&series::BUILD_INFO);
        build.with_label_values(&[version]).set(1.0);

        let consumed = int_counter_vec(&series::EVENTS_CONSUMED);
        let invalid = int_counter_vec(&series::EVENTS_INVALID);
        for reason in RejectReason::ALL
            .iter()
            .filter(|reason| **reason != RejectReason::Late)
        {
            invalid.with_label_values(&[reason.label()]);
        }
        let late = int_counter(&series::EVENTS_LATE);
        let duplicates = int_counter(&series::EVENTS_DUPLICATE);
        let forwarded = int_counter(&series::EVENTS_FORWARDED);
        let dead_letters = int_counter_vec(&series::DEAD_LETTERS);
        for result in ["delivered", "failed", "dropped"] {
            dead_letters.with_label_values(&[result]);
        }
        let dead_letters_held = int_gauge(&series::DEAD_LETTERS_HELD);
        let offsets_skipped = int_counter_vec(&series::OFFSETS_SKIPPED);
        for reason in OffsetSkip::ALL {
            offsets_skipped.with_label_values(&[reason.label()]);
        }
        let consumer_lag = made(&registry, &series::CONSUMER_LAG, |s| {
            IntGaugeVec::new(opts(s), s.labels)
        });
        let watermark = gauge_vec(&series::WATERMARK);
        let last_event = gauge_vec(&series::LAST_EVENT);
        let partitions_owned = int_gauge(&series::PARTITIONS_OWNED);
        let visible_latency = made(&registry, &series::VISIBLE_LATENCY, |s| {
            Histogram::with_opts(HistogramOpts::new(s.name, s.help).buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]))
        });
        let checkpoint_duration = made(&registry, &series::CHECKPOINT_DURATION, |s| {
            HistogramVec::new(
                HistogramOpts::new(s.name, s.help).buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                s.labels,
            )
        });
        let checkpoint_wait = made(&registry, &series::CHECKPOINT_WAIT, |s| {
            Counter::with_opts(opts(s))
        });
        let last_publish = made(&registry, &series::LAST_PUBLISH, |s| {
            Gauge::with_opts(opts(s))
        });
        let state_entries_in_memory = int_gauge(&series::ENTRIES_IN_MEMORY);
        let restore_duration = gauge_vec(&series::RESTORE_DURATION);
        let backfill_progress = gauge_vec(&series::BACKFILL_PROGRESS);
        let brokers_up = int_gauge(&series::BROKERS_UP);
        let restored_records = int_counter(&series::RESTORED_RECORDS);
        let changelog_records = int_counter(&series::CHANGELOG_RECORDS);
        let changelog_lost = int_counter(&series::CHANGELOG_LOST);
        Telemetry {
            registry,
            metric_value,
            window_start,
            window_end,
            window_complete,
            window_partial,
            ratio_part,
            segment_value,
            segment_ratio_part,
            exported_segments: std::sync::Mutex::new(BTreeSet::new()),
            exported_baselines: std::sync::Mutex::new(BTreeSet::new()),
            consumed,
            invalid,
            late,
            duplicates,
            forwarded,
            dead_letters,
            dead_letters_held,
            offsets_skipped,
            consumer_lag,
            watermark,
            last_event,
            partitions_owned,
            visible_latency,
            checkpoint_duration,
            checkpoint_wait,
            last_publish,
            state_entries_in_memory,
            exported_partitions: std::sync::Mutex::new(BTreeSet::new()),
            restore_duration,
            backfill_progress,
            brokers_up,
            restored_records,
            changelog_records,
            changelog_lost,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Publishes the metric values; called right after they were made durable.
    pub fn publish_values(&self, plan: &Plan, values: &[MetricValues], now_ms: i64) {
        let mut segments = BTreeSet::new();
        let mut baselines = BTreeSet::new();
        for metric_values in values {
            let name = plan.metrics()[metric_values.metric].name.as_str();
            if let Some(baseline) = &metric_values.baseline {
                self.publish_baseline(name, baseline, &mut baselines);
            }
            self.publish_window(name, "current", &metric_values.current);
            self.publish_window(name, "previous", &metric_values.previous);
            if let Some(before_previous) = &metric_values.before_previous {
                self.publish_window(name, "before_previous", before_previous);
            }
            for (window, exported) in [
                ("current", &metric_values.current_segments),
                ("previous", &metric_values.previous_segments),
            ] {
                for segment in exported {
                    let labels = [name.to_string(), window.to_string(), segment.label.clone()];
                    self.segment_value
                        .with_label_values(&labels)
                        .set(segment.value.to_f64());
                    if let AggValue::Ratio {
                        numerator,
                        denominator,
                    } = segment.value
                    {
                        for (part, value) in
                            [("numerator", numerator), ("denominator", denominator)]
                        {
                            self.segment_ratio_part
                                .with_label_values(&[&labels[0], &labels[1], &labels[2], part])
                                .set(value.to_f64());
                        }
                    }
                    segments.insert(labels);
                }
            }
        }
        // Segments that left the top (or whose window rolled over) disappear at once, so the
        // series count stays bounded by `top` + 1 per metric and window.
        let mut exported = self
            .exported_segments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for gone in exported.difference(&segments) {
            let _ = self
                .segment_value
                .remove_label_values(&[&gone[0], &gone[1], &gone[2]]);
            for part in ["numerator", "denominator"] {
                let _ = self
                    .segment_ratio_part
                    .remove_label_values(&[&gone[0], &gone[1], &gone[2], part]);
            }
        }
        *exported = segments;
        let mut exported = self
            .exported_baselines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for gone in exported.difference(&baselines) {
            let _ = self.metric_value.remove_label_values(&[&gone[0], &gone[1]]);
            for part in ["numerator", "denominator"] {
                let _ = self
                    .ratio_part
                    .remove_label_values(&[&gone[0], &gone[1], part]);
            }
        }
        *exported = baselines;
        self.last_publish.set(now_ms as f64 / 1000.0);
    }

    /// Publishes a metric's baseline as `window="baseline"`, and with several past windows
    /// (the seasonal baseline of an hourly or daily metric) each of them as
    /// `window="baseline_<k>w"`: the median of one instance's values is not the median of the
    /// group's, so several instances take the median of the summed points in PromQL. A ratio
    /// exports its parts where they add up across instances (not for a median).
    fn publish_baseline(
        &self,
        name: &str,
        baseline: &Baseline,
        exported: &mut BTreeSet<[String; 2]>,
    ) {
        let mut publish = |window: String, value: f64, parts: Option<AggValue>| {
            self.metric_value
                .with_label_values(&[name, &window])
                .set(value);
            if let Some(AggValue::Ratio {
                numerator,
                denominator,
            }) = parts
            {
                for (part, value) in [("numerator", numerator), ("denominator", denominator)] {
                    self.ratio_part
                        .with_label_values(&[name, &window, part])
                        .set(value.to_f64());
                }
            }
            exported.insert([name.to_string(), window]);
        };
        let single = match baseline.points.as_slice() {
            [point] if point.weeks_back.is_none() => Some(point.value),
            _ => None,
        };
        publish("baseline".to_string(), baseline.value(), single);
        for point in &baseline.points {
            if let Some(weeks) = point.weeks_back {
                let value = point.value;
                publish(format!("baseline_{weeks}w"), value.to_f64(), Some(value));
            }
        }
    }

    fn publish_window(&self, name: &str, window: &str, value: &WindowValue) {
        let labels = [name, window];
        self.metric_value
            .with_label_values(&labels)
            .set(value.value.to_f64());
        self.window_start
            .with_label_values(&labels)
            .set(value.bounds.start_ms as f64 / 1000.0);
        self.window_end
            .with_label_values(&labels)
            .set(value.bounds.end_ms as f64 / 1000.0);
        self.window_complete
            .with_label_values(&labels)
            .set(if value.complete { 1.0 } else { 0.0 });
        self.window_partial
            .with_label_values(&labels)
            .set(if value.partial { 1.0 } else { 0.0 });
        if let AggValue::Ratio {
            numerator,
            denominator,
        } = value.value
        {
            self.ratio_part
                .with_label_values(&[name, window, "numerator"])
                .set(numerator.to_f64());
            self.ratio_part
                .with_label_values(&[name, window, "denominator"])
                .set(denominator.to_f64());
        }
    }

    /// Publishes partition progress; series of partitions no longer owned disappear.
    pub fn publish_partitions(&self, partitions: &[PartitionStatus]) {
        let mut exported = self
            .exported_partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current: BTreeSet<PartitionKey> =
            partitions.iter().map(|status| status.key.clone()).collect();
        for gone in exported.difference(&current) {
            let partition = gone.partition.to_string();
            let labels = [&*gone.topic, partition.as_str()];
            let _ = self.watermark.remove_label_values(&labels);
            let _ = self.last_event.remove_label_values(&labels);
            let _ = self.consumer_lag.remove_label_values(&labels);
            let _ = self.consumed.remove_label_values(&labels);
        }
        for status in partitions {
            let partition = status.key.partition.to_string();
            let labels = [&*status.key.topic, partition.as_str()];
            if let Some(watermark) = status.watermark_ms {
                self.watermark
                    .with_label_values(&labels)
                    .set(watermark as f64 / 1000.0);
            }
            if let Some(last) = status.max_event_time_ms {
                self.last_event
                    .with_label_values(&labels)
                    .set(last as f64 / 1000.0);
            }
            self.consumed.with_label_values(&labels);
        }
        self.partitions_owned.set(partitions.len() as i64);
        *exported = current;
    }

    pub fn record_batch(&self, counts: &BatchCounts) {
        for (key, count) in &counts.consumed {
            let partition = key.partition.to_string();
            self.consumed
                .with_label_values(&[&*key.topic, partition.as_str()])
                .inc_by(*count);
        }
        for (reason, count) in &counts.rejected {
            if *reason == RejectReason::Late {
                self.late.inc_by(*count);
            } else {
                self.invalid
                    .with_label_values(&[reason.label()])
                    .inc_by(*count);
            }
        }
        for (reason, count) in &counts.skipped {
            self.offsets_skipped
                .with_label_values(&[reason.label()])
                .inc_by(*count);
        }
        self.duplicates.inc_by(counts.duplicates);
        self.forwarded.inc_by(counts.forwarded);
        for latency in &counts.visible_latencies_seconds {
            self.visible_latency.observe(*latency);
        }
    }

    pub fn record_lag(&self, key: &PartitionKey, lag: i64) {
        let partition = key.partition.to_string();
        let exported = self
            .exported_partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if exported.contains(key) {
            self.consumer_lag
                .with_label_values(&[&*key.topic, partition.as_str()])
                .set(lag);
        }
    }

    pub fn record_dead_letters(&self, counts: DeadLetterCounts) {
        let set = |result: &str, total: u64| {
            let counter = self.dead_letters.with_label_values(&[result]);
            let current = counter.get();
            if total > current {
                counter.inc_by(total - current);
            }
        };
        set("delivered", counts.delivered);
        set("failed", counts.failed);
        set("dropped", counts.dropped);
        self.dead_letters_held
            .set(i64::try_from(counts.held).unwrap_or(i64::MAX));
    }

    /// Per-entity state entries held in memory (see `Engine::resident_members`).
    pub fn record_state_entries_in_memory(&self, entries: usize) {
        self.state_entries_in_memory
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    pub fn record_checkpoint(&self, seconds: f64, ok: bool) {
        self.checkpoint_duration
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .observe(seconds);
    }

    /// A partition was taken over: its restore took `seconds` and read `records`.
    pub fn record_restore(&self, key: &PartitionKey, seconds: f64, records: u64) {
        let partition = key.partition.to_string();
        self.restore_duration
            .with_label_values(&[&*key.topic, partition.as_str()])
            .set(seconds);
        self.restored_records.inc_by(records);
    }

    /// How far the backfill of a partition has read its history (1: swapped in).
    pub fn record_backfill_progress(&self, key: &PartitionKey, ratio: f64) {
        let partition = key.partition.to_string();
        self.backfill_progress
            .with_label_values(&[&*key.topic, partition.as_str()])
            .set(ratio);
    }

    /// A partition was given up: its backfill figure goes with it.
    pub fn forget_backfill(&self, key: &PartitionKey) {
        let partition = key.partition.to_string();
        let _ = self
            .backfill_progress
            .remove_label_values(&[&*key.topic, partition.as_str()]);
    }

    /// A partition was taken whose changelog had lost records this instance had seen.
    pub fn record_changelog_lost(&self, _key: &PartitionKey) {
        self.changelog_lost.inc();
    }

    /// A partition was given up: its restore figure goes with it.
    pub fn forget_restore(&self, key: &PartitionKey) {
        let partition = key.partition.to_string();
        let _ = self
            .restore_duration
            .remove_label_values(&[&*key.topic, partition.as_str()]);
    }

    pub fn record_brokers_up(&self, up: usize) {
        self.brokers_up.set(up as i64);
    }

    pub fn record_checkpoint_wait(&self, seconds: f64) {
        self.checkpoint_wait.inc_by(seconds);
    }

    pub fn record_changelog(&self, records: u64) {
        self.changelog_records.inc_by(records);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|error| format!("# encoding failed: {error}\n"))
    }
}

#[cfg(test)]
mod tests {
    use nsm_core::engine::{Outcome, PartitionSnapshot};
    use nsm_core::{Config, Engine, PartitionKey};

    use super::*;

    const BY_PLAN: &str = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[north_star]
name = "users_by_plan"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1d"
by = ["plan"]
top = 20
"#;

    /// 2026-11-23T12:00:00Z.
    const NOW_MS: i64 = 1_795_435_200_000;

    /// The `segment` label and value of every `nsm_metric_segment_value` series, as exposed.
    fn exposed_segments(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter_map(|line| line.strip_prefix("nsm_metric_segment_value{"))
            .filter(|line| line.contains("window=\"current\""))
            .map(|line| {
                let (labels, value) = line.rsplit_once("} ").expect("a sample");
                let (_, segment) = labels.split_once("segment=\"").expect("a segment label");
                let (segment, _) = segment.split_once("\",window=").expect("sorted labels");
                (segment.to_string(), value.parse().expect("a number"))
            })
            .collect()
    }

    const BASELINES: &str = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[north_star]
name = "messages"
kind = "count"
where = { event = "message_sent" }
window = "1w"
[[inputs]]
name = "daily_messages"
kind = "count"
where = { event = "message_sent" }
window = "1d"
"#;

    /// The baseline of the window still filling is on /metrics beside its current value, and
    /// a daily one also by the week it comes from; a metric without a past peer has none.
    #[test]
    fn baselines_are_exported_as_a_window() {
        let config = Config::from_toml(BASELINES, &|_| None).expect("a valid config");
        let mut engine = Engine::new(Plan::from_config(&config));
        let key = PartitionKey::new("events", 0);
        engine.restore_partition(key.clone(), PartitionSnapshot::default());
        let telemetry = Telemetry::new(engine.plan(), "test");
        let times = [
            "2026-11-16T08:00:00Z",
            "2026-11-16T09:00:00Z",
            "2026-11-16T11:00:00Z",
            "2026-11-23T08:30:00Z",
        ];
        let apply = |engine: &mut Engine, offset: usize| {
            let event = format!(
                r#"{{"event":"message_sent","user_id":"u","timestamp":"{}"}}"#,
                times[offset]
            );
            let outcome = engine.apply(&key, offset as i64, event.as_bytes(), NOW_MS);
            assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
        };
        for offset in 0..3 {
            apply(&mut engine, offset);
        }
        // Last week only: no current window to compare yet, so no baseline (the clock is in it).
        telemetry.publish_values(engine.plan(), &engine.metric_values(NOW_MS), NOW_MS);
        let samples = |text: &str| -> Vec<String> {
            let lines = text.lines().filter(|line| !line.starts_with('#'));
            lines.map(str::to_string).collect()
        };
        let text = telemetry.render();
        assert!(
            !samples(&text).iter().any(|line| line.contains("baseline")),
            "{text}"
        );
        apply(&mut engine, 3);
        telemetry.publish_values(engine.plan(), &engine.metric_values(NOW_MS), NOW_MS);
        let text = telemetry.render();
        // At 08:30 on Monday, last Monday's events before 08:30 (weekly and daily windows
        // both keep steps of 10 minutes): the one at 08:00 counts in both.
        for expected in [
            "nsm_metric_value{metric=\"messages\",window=\"baseline\"} 1",
            "nsm_metric_value{metric=\"daily_messages\",window=\"baseline\"} 1",
            "nsm_metric_value{metric=\"daily_messages\",window=\"baseline_1w\"} 1",
            "nsm_metric_value{metric=\"messages\",window=\"current\"} 1",
        ] {
            assert!(
                text.lines().any(|line| line == expected),
                "{expected} in\n{text}"
            );
        }
        assert!(!samples(&text)
            .iter()
            .any(|line| line.contains("baseline_2w")));
    }

    /// Values that look alike but differ (a string and a number, a missing field and the
    /// string `(none)`, two long values with one prefix) are separate series on /metrics.
    #[test]
    fn look_alike_segment_values_are_separate_series() {
        let config = Config::from_toml(BY_PLAN, &|_| None).expect("a valid config");
        let mut engine = Engine::new(Plan::from_config(&config));
        let key = PartitionKey::new("events", 0);
        engine.restore_partition(key.clone(), PartitionSnapshot::default());
        let long = |last: char| format!("\"{}{last}\"", "L".repeat(300));
        let plans = [
            r#""3""#.to_string(),
            "3".to_string(),
            "3".to_string(),
            "null".to_string(),
            r#""(none)""#.to_string(),
            long('1'),
            long('2'),
        ];
        for (offset, plan) in plans.iter().enumerate() {
            let event = format!(
                r#"{{"event":"message_sent","user_id":"u{offset}","plan":{plan},"timestamp":"2026-11-23T10:00:00Z"}}"#
            );
            let outcome = engine.apply(&key, offset as i64, event.as_bytes(), NOW_MS);
            assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
        }
        let telemetry = Telemetry::new(engine.plan(), "test");
        telemetry.publish_values(engine.plan(), &engine.metric_values(NOW_MS), NOW_MS);
        let mut segments = exposed_segments(&telemetry.render());
        segments.sort_by(|a, b| a.0.cmp(&b.0));
        let (long_ones, short_ones): (Vec<_>, Vec<_>) = segments
            .into_iter()
            .partition(|(segment, _)| segment.starts_with("LLL"));
        // In the exposition format a `"` in a label value is escaped as `\"`.
        assert_eq!(
            short_ones,
            vec![
                ("(none)".to_string(), 1.0),
                ("3".to_string(), 2.0),
                (r#"\"(none)\""#.to_string(), 1.0),
                (r#"\"3\""#.to_string(), 1.0),
            ]
        );
        assert_eq!(long_ones.len(), 2, "{long_ones:?}");
        assert_ne!(long_ones[0].0, long_ones[1].0);
        assert!(long_ones
            .iter()
            .all(|(segment, value)| segment.len() <= 128 && *value == 1.0));
    }
}
