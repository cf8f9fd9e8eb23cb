//! The compiled form of the metric definitions: field slots resolved once at start.

use super::filter::CompiledFilter;
use crate::config::Config;
use crate::event::{EventSchema, Slot};
use crate::metric::{FieldPath, FilterField, MetricDef, MetricKind};
use crate::timestamp::TimestampFormat;
use crate::window::{Calendar, CalendarUnit, Trailing, WindowBounds};
use crate::EpochMillis;

/// Settings of the engine that are not metric definitions.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub event_name_field: FieldPath,
    pub timestamp_field: FieldPath,
    /// How the event time is read: unit, zone, and whether from the Kafka record.
    pub timestamp_format: TimestampFormat,
    pub calendar: Calendar,
    pub allowed_lateness_ms: i64,
    pub retention_ms: i64,
    pub max_future_skew_ms: i64,
    pub max_event_bytes: usize,
    /// Counting each event id once; `None` turns deduplication off.
    pub dedup: Option<DedupSettings>,
    /// How producers key events (`kafka.key_field`), when the config says: metrics counting
    /// another entity are re-keyed (see [`Route`]). `None`: every metric is local.
    pub message_key: Option<MessageKey>,
}

/// The event field producers key messages by, and the fields whose every value belongs to one
/// key value (each user in one team): counting either distinct is exact per partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageKey {
    pub field: FieldPath,
    pub nested: Vec<FieldPath>,
}

/// Where a metric is counted (docs/design/repartition.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// In the input partition that read the event.
    Local,
    /// In the partitions of the repartition topic, keyed by the field of this group of
    /// [`Plan::rekey_fields`]: the metric counts an entity the message key does not hold.
    Rekeyed(usize),
}

/// Which metrics a partition applies an event to: an input partition's local ones, or a
/// repartition partition's of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Input,
    Rekeyed(usize),
}

/// Where an event goes on from an input partition: per group of [`Plan::rekey_fields`] it is
/// forwarded to, the hash of its entity there ([`entity_hash`]), which picks the partition of
/// the repartition topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwards(pub Vec<(usize, u64)>);

/// The hash of an entity's member key that picks its partition of the repartition topic:
/// XXH3-64, the same on every instance and version.
pub fn entity_hash(member: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(member)
}

/// An event whose id was applied before, with an event time less than `horizon_ms` behind the
/// partition's watermark, is a duplicate (producers retry; delivery upstream is at least once).
#[derive(Debug, Clone)]
pub struct DedupSettings {
    pub id_field: FieldPath,
    pub horizon_ms: i64,
    /// Copies of an event may be on different input partitions: every metric is re-keyed
    /// (counts and sums by the id), and ids are deduplicated where the copies meet, in the
    /// repartition topic's partitions, instead of where the event is read.
    pub across_partitions: bool,
}

#[derive(Debug, Clone)]
pub(super) enum ValueSource {
    One,
    Sum(Slot),
    Distinct(Slot),
    /// Entities reaching `at_least` events, or distinct actors when `actor` is set.
    Threshold {
        entity: Slot,
        actor: Option<Slot>,
        at_least: u32,
    },
    /// Entities converting from a `from_clauses` event to a `clauses` event within the time.
    Conversion {
        entity: Slot,
        within_ms: i64,
    },
    /// Counts members of the distinct metric `of` (a plan index) that were also in its
    /// previous window; kept up to date when `of` gains a member.
    Retention {
        of: usize,
    },
    /// Computed from two other metrics (plan indices) when read; never applied to.
    Ratio {
        numerator: usize,
        denominator: usize,
    },
}

impl ValueSource {
    /// Whether events are applied to the metric directly (ratio and retention metrics are
    /// derived from other metrics).
    pub fn is_stateful(&self) -> bool {
        !matches!(self, Self::Ratio { .. } | Self::Retention { .. })
    }
}

#[derive(Debug, Clone)]
pub(super) struct CompiledMetric {
    pub clauses: CompiledFilter,
    /// A conversion's start events (empty otherwise).
    pub from_clauses: CompiledFilter,
    pub value: ValueSource,
    pub window: CalendarUnit,
    /// A trailing window's step buckets replace the calendar windows.
    pub trailing: Option<Trailing>,
    /// The fields of a breakdown (empty without one).
    pub segment_slots: Vec<Slot>,
}

/// Metric definitions plus everything precomputed to apply them fast.
#[derive(Debug, Clone)]
pub struct Plan {
    metrics: Vec<MetricDef>,
    pub(super) compiled: Vec<CompiledMetric>,
    pub(super) schema: EventSchema,
    pub(super) name_slot: Slot,
    pub(super) timestamp_slot: Slot,
    pub(super) id_slot: Option<Slot>,
    /// Per metric: the retention metrics that read it.
    pub(super) retention_of: Vec<Vec<usize>>,
    /// Per metric: where it is counted.
    pub(super) routes: Vec<Route>,
    /// The entity fields events are re-keyed by, one per group.
    rekey_fields: Vec<FieldPath>,
    /// The same fields as forwarded records name them (`team_id`, `team.id`).
    rekey_names: Vec<String>,
    /// Per metric, whether events are applied to it; `None`: all, but in a backfill
    /// (docs/design/backfill.md), which validates every metric and keeps a few.
    kept: Option<Vec<bool>>,
    pub(super) settings: EngineSettings,
}

impl Plan {
    pub fn from_config(config: &Config) -> Plan {
        Plan::new(
            config.metrics.clone(),
            EngineSettings {
                event_name_field: config.events.name.clone(),
                timestamp_field: config.events.timestamp.clone(),
                timestamp_format: config.events.timestamp_format.clone(),
                calendar: config.time.calendar.clone(),
                allowed_lateness_ms: config.time.allowed_lateness_ms,
                retention_ms: config.state.retention_ms,
                max_future_skew_ms: config.time.max_future_skew_ms,
                max_event_bytes: config.events.max_bytes,
                dedup: (config.events.dedup_horizon_ms > 0).then(|| DedupSettings {
                    id_field: config.events.id.clone(),
                    horizon_ms: config.events.dedup_horizon_ms,
                    across_partitions: config.events.dedup_across_partitions,
                }),
                message_key: config.kafka.key_field.as_ref().map(|field| MessageKey {
                    field: field.clone(),
                    nested: config.kafka.nested_in_key.clone(),
                }),
            },
        )
    }

    pub fn new(metrics: Vec<MetricDef>, settings: EngineSettings) -> Plan {
        let mut schema = EventSchema::default();
        let name_slot = schema.slot(&settings.event_name_field);
        let timestamp_slot = schema.slot(&settings.timestamp_field);
        let id_slot = settings
            .dedup
            .as_ref()
            .map(|dedup| schema.slot(&dedup.id_field));
        let index_of = |name: &str| metrics.iter().position(|metric| metric.name == name);
        let compiled: Vec<CompiledMetric> = metrics
            .iter()
            .map(|metric| {
                let mut compile_filter = |filter: &crate::metric::Filter| {
                    filter
                        .tests()
                        .map(|(field, test)| {
                            let slot = match field {
                                FilterField::EventName => name_slot,
                                FilterField::Path(path) => schema.slot(path),
                            };
                            (slot, test)
                        })
                        .collect::<CompiledFilter>()
                };
                let clauses = compile_filter(&metric.filter);
                let from_clauses = match &metric.kind {
                    MetricKind::Conversion { from, .. } => compile_filter(from),
                    _ => Vec::new(),
                };
                let value = match &metric.kind {
                    MetricKind::Count => ValueSource::One,
                    MetricKind::Sum { field } => ValueSource::Sum(schema.slot(field)),
                    MetricKind::Distinct { field } => ValueSource::Distinct(schema.slot(field)),
                    MetricKind::Threshold {
                        entity,
                        actor,
                        at_least,
                    } => ValueSource::Threshold {
                        entity: schema.slot(entity),
                        actor: actor.as_ref().map(|actor| schema.slot(actor)),
                        at_least: *at_least,
                    },
                    MetricKind::Conversion {
                        entity, within_ms, ..
                    } => ValueSource::Conversion {
                        entity: schema.slot(entity),
                        within_ms: *within_ms,
                    },
                    MetricKind::Retention { of } => ValueSource::Retention {
                        of: index_of(of).unwrap_or_else(|| index_of(&metric.name).unwrap_or(0)),
                    },
                    // Validation resolved both names; an unknown one (a hand-built plan) reads
                    // as the ratio itself, which has no state and so stays 0/0.
                    MetricKind::Ratio {
                        numerator,
                        denominator,
                    } => {
                        let own = index_of(&metric.name).unwrap_or(0);
                        ValueSource::Ratio {
                            numerator: index_of(numerator).unwrap_or(own),
                            denominator: index_of(denominator).unwrap_or(own),
                        }
                    }
                };
                let segments = metric.segments.as_ref();
                CompiledMetric {
                    clauses,
                    from_clauses,
                    value,
                    window: metric.window,
                    trailing: metric.trailing,
                    segment_slots: segments
                        .map(|segments| segments.by.iter().map(|f| schema.slot(f)).collect())
                        .unwrap_or_default(),
                }
            })
            .collect();
        let mut retention_of = vec![Vec::new(); compiled.len()];
        for (index, metric) in compiled.iter().enumerate() {
            if let ValueSource::Retention { of } = metric.value {
                if of != index {
                    retention_of[of].push(index);
                }
            }
        }
        let mut rekey_fields: Vec<FieldPath> = Vec::new();
        let across = settings
            .dedup
            .as_ref()
            .filter(|dedup| dedup.across_partitions);
        let mut route_of = |metric: &MetricDef| -> Route {
            let by = match (metric.kind.counted_entity(), across) {
                // Copies of an event meet where they are routed by a field they share: the
                // entity counted, or for counts and sums the id.
                (Some(entity), Some(_)) => entity,
                (None, Some(dedup))
                    if matches!(metric.kind, MetricKind::Count | MetricKind::Sum { .. }) =>
                {
                    &dedup.id_field
                }
                (None, _) => return Route::Local,
                (Some(entity), None) => match &settings.message_key {
                    Some(key) if *entity != key.field && !key.nested.contains(entity) => entity,
                    _ => return Route::Local,
                },
            };
            match rekey_fields.iter().position(|field| field == by) {
                Some(group) => Route::Rekeyed(group),
                None => {
                    rekey_fields.push(by.clone());
                    Route::Rekeyed(rekey_fields.len() - 1)
                }
            }
        };
        let mut routes: Vec<Route> = metrics.iter().map(&mut route_of).collect();
        // A retention reads its base's members: it is counted where its base is.
        for (index, metric) in compiled.iter().enumerate() {
            if let ValueSource::Retention { of } = metric.value {
                routes[index] = routes[of];
            }
        }
        let rekey_names = rekey_fields.iter().map(ToString::to_string).collect();
        Plan {
            metrics,
            compiled,
            retention_of,
            routes,
            rekey_fields,
            rekey_names,
            kept: None,
            schema,
            name_slot,
            timestamp_slot,
            id_slot,
            settings,
        }
    }

    pub fn metrics(&self) -> &[MetricDef] {
        &self.metrics
    }

    /// Where a metric is counted.
    pub fn route(&self, metric: usize) -> Route {
        self.routes.get(metric).copied().unwrap_or(Route::Local)
    }

    /// Whether a partition at `stage` applies events to `metric`.
    pub fn applies_at(&self, metric: usize, stage: Stage) -> bool {
        match (self.route(metric), stage) {
            (Route::Local, Stage::Input) => true,
            (Route::Rekeyed(group), Stage::Rekeyed(at)) => group == at,
            _ => false,
        }
    }

    /// The same plan applying events only to `metrics` and the metrics they are computed from
    /// (a retention's base), for a backfill: every metric still validates each event, so an
    /// event is accepted or refused as with the whole plan.
    pub fn keeping_only(mut self, metrics: &[usize]) -> Plan {
        let mut kept = vec![false; self.metrics.len()];
        for &metric in metrics {
            if let Some(slot) = kept.get_mut(metric) {
                *slot = true;
            }
            if let Some(ValueSource::Retention { of }) =
                self.compiled.get(metric).map(|compiled| &compiled.value)
            {
                kept[*of] = true;
            }
        }
        self.kept = Some(kept);
        self
    }

    /// Whether events are applied to `metric` (see [`Plan::keeping_only`]).
    pub fn keeps(&self, metric: usize) -> bool {
        self.kept
            .as_ref()
            .is_none_or(|kept| kept.get(metric).copied().unwrap_or(false))
    }

    /// Whether some metric is left out (a backfill's plan).
    pub(super) fn keeps_some_only(&self) -> bool {
        self.kept.is_some()
    }

    /// Whether ids are deduplicated at `stage`: where the event is read, or where its copies
    /// meet when they may be on different partitions.
    pub(super) fn dedups_at(&self, stage: Stage) -> bool {
        let across = self
            .settings
            .dedup
            .as_ref()
            .is_some_and(|dedup| dedup.across_partitions);
        match stage {
            Stage::Input => !across,
            Stage::Rekeyed(_) => across,
        }
    }

    /// The field of the group counts and sums are re-keyed by when ids are deduplicated
    /// across partitions: an event without an id goes by a hash of its bytes.
    pub(super) fn is_id_group(&self, group: usize) -> bool {
        self.settings.dedup.as_ref().is_some_and(|dedup| {
            dedup.across_partitions && self.rekey_fields.get(group) == Some(&dedup.id_field)
        })
    }

    /// The entity fields events are re-keyed by, by group: empty when every metric is local.
    pub fn rekey_fields(&self) -> &[FieldPath] {
        &self.rekey_fields
    }

    /// The Kafka headers the metrics read (`@header.NAME`): a forwarded event carries them on.
    pub fn record_headers(&self) -> impl Iterator<Item = &str> {
        self.schema.record_headers()
    }

    /// The field of a group as forwarded records name it.
    pub fn rekey_name(&self, group: usize) -> &str {
        self.rekey_names.get(group).map_or("", String::as_str)
    }

    /// The group re-keyed by `field`, as a forwarded record names it.
    pub fn rekey_group(&self, field: &str) -> Option<usize> {
        self.rekey_names.iter().position(|name| name == field)
    }

    pub fn metric_index(&self, name: &str) -> Option<usize> {
        self.metrics.iter().position(|metric| metric.name == name)
    }

    /// The numerator and denominator of a ratio metric.
    pub fn ratio_parts(&self, metric: usize) -> Option<(usize, usize)> {
        match self.compiled.get(metric)?.value {
            ValueSource::Ratio {
                numerator,
                denominator,
            } => Some((numerator, denominator)),
            _ => None,
        }
    }

    /// The member namespace of the engine's own entries (event ids): one past the last
    /// metric. Stores name it with the empty string, which no metric has.
    pub fn ids_namespace(&self) -> usize {
        self.compiled.len()
    }

    /// The distinct metric a retention metric reads.
    pub fn retention_base(&self, metric: usize) -> Option<usize> {
        match self.compiled.get(metric)?.value {
            ValueSource::Retention { of } => Some(of),
            _ => None,
        }
    }

    /// How far back a trailing distinct metric's occurrences keep their previous occurrence
    /// exactly, as a trailing window of that length (see `trailing`): one length, or two for
    /// the base of a retention, which compares the range with the one before it.
    pub(super) fn gap_span(&self, metric: usize) -> Option<Trailing> {
        let trailing = self.compiled[metric].trailing?;
        Some(if self.retention_of[metric].is_empty() {
            trailing
        } else {
            Trailing {
                length_ms: 2 * trailing.length_ms,
                step_ms: trailing.step_ms,
            }
        })
    }

    /// The metric's fingerprint (see [`MetricDef::fingerprint`]), plus what the plan derives
    /// for it from other metrics: the base of a trailing retention stores its gaps over two
    /// lengths, which older stored gaps do not have.
    ///
    /// A metric keeping trailing occurrences also carries the state format that changed their
    /// layout (see [`Plan::format_3_fingerprint`]), and one keeping progress records the
    /// format that added them (6: an older nsm cannot read its windows, and discards them).
    pub fn fingerprint(&self, metric: usize) -> String {
        let format_3 = self.format_3_fingerprint(metric);
        if self.keeps_trailing_occurrences(metric) {
            format!("{format_3};occurrences=4")
        } else if self.keeps_progress(metric) {
            // The step too: records of another step cannot be read as these.
            let step_ms = super::baseline::progress_step_ms(self.compiled[metric].window);
            format!("{format_3};progress=6;step={step_ms}")
        } else {
            format_3
        }
    }

    /// Whether the metric's windows keep a progress record (see [`super::baseline`]): a
    /// calendar count, sum, distinct count, conversion or retention.
    pub fn keeps_progress(&self, metric: usize) -> bool {
        let compiled = &self.compiled[metric];
        compiled.trailing.is_none()
            && super::baseline::Progress::for_source(&compiled.value).is_some()
    }

    /// The fingerprint state format 3 stored for the metric's data. This nsm reads that data
    /// as it is: of all it holds only the trailing occurrences changed layout in format 4, and
    /// both layouts are read. The new fingerprint tells them apart so that an nsm of format 3,
    /// given a partition of format 4 through the changelog, discards what it could not read
    /// (and says so) rather than read it into wrong numbers.
    pub fn format_3_fingerprint(&self, metric: usize) -> String {
        let own = self.metrics[metric].fingerprint();
        match self.gap_span(metric) {
            Some(span) if self.compiled[metric].trailing != Some(span) => {
                format!("{own};gaps={}", span.length_ms)
            }
            _ => own,
        }
    }

    /// Whether the metric keeps a member's occurrences per step bucket (`engine::trailing`):
    /// a trailing distinct count or conversion.
    fn keeps_trailing_occurrences(&self, metric: usize) -> bool {
        self.compiled[metric].trailing.is_some()
            && matches!(
                self.metrics[metric].kind,
                MetricKind::Distinct { .. } | MetricKind::Conversion { .. }
            )
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    pub fn calendar(&self) -> &Calendar {
        &self.settings.calendar
    }

    /// Whether the retention keeps a metric's window before the previous one whole (three
    /// windows plus the allowed lateness behind the watermark). Validation only demands two.
    pub fn keeps_before_previous(&self, metric: usize) -> bool {
        let compiled = &self.compiled[metric];
        let span_ms = match &compiled.trailing {
            Some(trailing) => trailing.length_ms + trailing.step_ms,
            None => compiled.window.max_length_ms(),
        };
        // A ratio or retention rate also reads its parts' (or base's) windows, one further
        // back for retention.
        let windows = if self.retention_base(metric).is_some() {
            4
        } else {
            3
        };
        self.settings.retention_ms >= windows * span_ms + self.settings.allowed_lateness_ms
    }

    /// The window an event at `time_ms` is kept in: its calendar window, or its step bucket
    /// for a trailing metric.
    pub(super) fn bucket_of(&self, metric: usize, time_ms: EpochMillis) -> Option<WindowBounds> {
        let compiled = &self.compiled[metric];
        match &compiled.trailing {
            Some(trailing) => Some(trailing.bucket_of(time_ms)),
            None => self.settings.calendar.window_of(compiled.window, time_ms),
        }
    }

    /// A window is complete, and will never change again, once the watermark has passed its
    /// end by the allowed lateness.
    pub fn is_complete(&self, end_ms: EpochMillis, watermark_ms: Option<EpochMillis>) -> bool {
        watermark_ms
            .is_some_and(|watermark| watermark >= end_ms + self.settings.allowed_lateness_ms)
    }
}
