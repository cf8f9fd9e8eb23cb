//! Every series nsm exports, in one place: names, labels and their bounded values.
//!
//! Business values (`nsm_metric_*`) and self-metrics (`nsm_events_*`, `nsm_consumer_*`, ...).
//! The pipeline never touches a Prometheus handle per event: it counts locally and hands
//! batches to [`Telemetry`] when it publishes, off the hot path.

use std::collections::BTreeSet;

use nsm_core::engine::{AggValue, Baseline, MetricValues, PartitionStatus, Plan, WindowValue};
use nsm_core::reject::RejectReason;
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

fn register<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: T,
) -> T {
    // Names are static and unique; a failure here is a bug caught by every test.
    registry
        .register(Box::new(collector.clone()))
        .unwrap_or_else(|error| panic!("telemetry registration: {error}"));
    collector
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    register(
        registry,
        GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{name}: {e}")),
    )
}

impl Telemetry {
    pub fn new(plan: &Plan, version: &str) -> Telemetry {
        let registry = Registry::new();
        let metric_value = gauge_vec(&registry, "nsm_metric_value", "Value of a metric in its current or previous window (and before_previous, when the retention keeps it), summed over the partitions this instance owns. window=\"baseline\": what the comparable past window(s) held at the current window's elapsed point (weekly, monthly: the previous window; hourly, daily: the median of the same weekday (and hour) 1 to 4 weeks back, each also exported as baseline_<k>w; trailing: the previous range); absent when no past window has a value.", &["metric", "window"]);
        let window_start = gauge_vec(
            &registry,
            "nsm_metric_window_start_timestamp_seconds",
            "Start of the window the value belongs to, Unix seconds.",
            &["metric", "window"],
        );
        let window_end = gauge_vec(
            &registry,
            "nsm_metric_window_end_timestamp_seconds",
            "End (exclusive) of the window the value belongs to, Unix seconds.",
            &["metric", "window"],
        );
        let window_complete = gauge_vec(&registry, "nsm_metric_window_complete", "1 once the window can no longer change: every owned partition's watermark passed its end plus the allowed lateness.", &["metric", "window"]);
        let window_partial = gauge_vec(&registry, "nsm_metric_window_partial", "1 when the window lacks events nsm never counted for this metric: it was added to the config or changed after the window started (on some partition this instance owns).", &["metric", "window"]);
        let segment_ratio_part = gauge_vec(&registry, "nsm_metric_segment_ratio_part", "Numerator and denominator of one exported segment of a ratio or retention metric with a breakdown. Sum each part across instances before dividing.", &["metric", "window", "segment", "part"]);
        let ratio_part = gauge_vec(&registry, "nsm_metric_ratio_part", "Numerator and denominator of a ratio metric in its current or previous window. Sum each part across instances before dividing.", &["metric", "window", "part"]);
        let segment_value = gauge_vec(&registry, "nsm_metric_segment_value", "Value of one segment of a metric with a breakdown (`by`), in its current or previous window: the `top` largest segments, and `__other__` summing the rest.", &["metric", "window", "segment"]);
        let info = gauge_vec(
            &registry,
            "nsm_metric_info",
            "Metadata of each configured metric; always 1.",
            &["metric", "role", "kind", "period", "owner", "description"],
        );
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
        let build = gauge_vec(
            &registry,
            "nsm_build_info",
            "Version of the running nsm; always 1.",
            &["version"],
        );
        build.with_label_values(&[version]).set(1.0);

        let consumed = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "nsm_events_consumed_total",
                    "Kafka messages consumed, valid or not.",
                ),
                &["topic", "partition"],
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let invalid = register(&registry, IntCounterVec::new(Opts::new("nsm_events_invalid_total", "Messages rejected as invalid, by reason; each is sent to the dead-letter topic."), &["reason"]).unwrap_or_else(|e| panic!("{e}")));
        for reason in RejectReason::ALL
            .iter()
            .filter(|reason| **reason != RejectReason::Late)
        {
            invalid.with_label_values(&[reason.label()]);
        }
        let late = register(&registry, IntCounter::new("nsm_events_late_total", "Events older than the watermark by more than the allowed lateness; sent to the dead-letter topic.").unwrap_or_else(|e| panic!("{e}")));
        let duplicates = register(&registry, IntCounter::new("nsm_events_duplicate_total", "Valid events skipped because an event with the same id was applied within events.dedup_horizon.").unwrap_or_else(|e| panic!("{e}")));
        let forwarded = register(&registry, IntCounter::new("nsm_events_forwarded_total", "Records sent to the repartition topic: events of metrics counting another entity than kafka.key_field, and records carrying only an input partition's time.").unwrap_or_else(|e| panic!("{e}")));
        let dead_letters = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "nsm_dead_letters_total",
                    "Dead letters by delivery result: delivered; failed, a delivery refused for \
                     good (unknown topic, not authorized, too large), each attempt; dropped, \
                     given up under kafka.dead_letter_on_failure = \"drop\".",
                ),
                &["result"],
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        for result in ["delivered", "failed", "dropped"] {
            dead_letters.with_label_values(&[result]);
        }
        let dead_letters_held = register(
            &registry,
            IntGauge::new(
                "nsm_dead_letters_held",
                "Dead letters refused for good and held to be sent again \
                 (kafka.dead_letter_on_failure = \"hold\"): while above 0 no checkpoint is \
                 stored and values do not advance.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let offsets_skipped = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "nsm_offsets_skipped_total",
                    "Offsets of input partitions never applied, by reason: gap, offsets \
                     missing between two messages (deleted by retention before they were read, \
                     or compaction and transaction markers); rewound, messages below the \
                     stored offset after the log went back (a recreated or truncated topic).",
                ),
                &["reason"],
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        for reason in OffsetSkip::ALL {
            offsets_skipped.with_label_values(&[reason.label()]);
        }
        let consumer_lag = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "nsm_consumer_lag_messages",
                    "Messages between the consumer position and the end of the partition.",
                ),
                &["topic", "partition"],
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let watermark = gauge_vec(&registry, "nsm_watermark_timestamp_seconds", "Event-time watermark of a partition, Unix seconds; moves to the wall clock when the partition is idle.", &["topic", "partition"]);
        let last_event = gauge_vec(
            &registry,
            "nsm_last_event_timestamp_seconds",
            "Largest event time applied in a partition, Unix seconds.",
            &["topic", "partition"],
        );
        let partitions_owned = register(
            &registry,
            IntGauge::new(
                "nsm_partitions_owned",
                "Kafka partitions this instance owns.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let visible_latency = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "nsm_event_visible_latency_seconds",
                    "From an event's Kafka timestamp to its effect being visible on /metrics.",
                )
                .buckets(vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let checkpoint_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "nsm_state_checkpoint_duration_seconds",
                    "Time to store one checkpoint (changelog sent and acknowledged, then state \
                     and offsets in one atomic batch), by result. Events go on being applied \
                     meanwhile.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["result"],
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let checkpoint_wait = register(
            &registry,
            Counter::new(
                "nsm_state_checkpoint_wait_seconds_total",
                "Time the consumer waited for a checkpoint still being stored before it could \
                 take the next: a rate near 1 means storing state is the bottleneck.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let last_publish = register(
            &registry,
            Gauge::new(
                "nsm_last_publish_timestamp_seconds",
                "Wall-clock time values were last published, Unix seconds.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let state_entries_in_memory = register(
            &registry,
            IntGauge::new(
                "nsm_state_entries_in_memory",
                "Per-entity state entries (members, threshold progress, funnels, event ids) held \
                 in memory: written since the last checkpoint, or cached. Bounded; the rest is \
                 read from RocksDB.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let restore_duration = gauge_vec(
            &registry,
            "nsm_state_restore_duration_seconds",
            "Time the last take-over of each owned partition spent restoring its state from the changelog (0: the local copy was current).",
            &["topic", "partition"],
        );
        let backfill_progress = gauge_vec(
            &registry,
            "nsm_backfill_progress_ratio",
            "Share of the retained history read by the backfill of each owned partition whose metrics were added or changed (1: swapped in; their windows are partial until then).",
            &["topic", "partition"],
        );
        let brokers_up = register(
            &registry,
            IntGauge::new(
                "nsm_kafka_brokers_up",
                "Kafka brokers the consumer is connected to, from librdkafka's statistics every 5s; 0 while the cluster is unreachable.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let restored_records = register(
            &registry,
            IntCounter::new(
                "nsm_state_restored_records_total",
                "Changelog records read to restore partitions taken over.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let changelog_records = register(
            &registry,
            IntCounter::new(
                "nsm_changelog_records_total",
                "State change records written to the changelog topic, end markers included.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let changelog_lost = register(
            &registry,
            IntCounter::new(
                "nsm_changelog_lost_total",
                "Partitions taken whose changelog no longer held the records this instance had written or read (the topic was deleted, recreated or truncated): the local state was kept and sent to the changelog again, unless the changelog held a newer copy.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
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
