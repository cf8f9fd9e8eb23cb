//! Applying one event: decode, validate everything, then update state.
//!
//! An event is applied to all metrics it matches or to none: every check (timestamp, value
//! types, lateness) happens before the first state change, so a rejected event leaves no trace
//! and can be replayed from the dead-letter topic once fixed.
//!
//! A calendar retention stores per window how many members of its distinct metric were in the
//! previous window too, kept up to date as the distinct metric gains a member
//! ([`count_returning`]): the member returns in its own window if the previous one has it, and
//! makes the next window's copy (seen earlier, out of order) a returning one. So the value
//! never needs the two member sets compared; the rate divides by the previous window's count.

use std::borrow::Cow;
use std::collections::BTreeMap;

use jiff::Timestamp;

use super::baseline::{decode_step, encode_step, step_of, Progress};
use super::dedup::SeenIds;
use super::filter;
use super::funnel::Funnel;
use super::members::{MemberIndex, Source, StateReadError};
use super::plan::{entity_hash, CompiledMetric, Forwards, Plan, Route, Stage, ValueSource};
use super::segment::{segment_key, segment_member, MAX_SEGMENTS_PER_WINDOW, OVERFLOW_KEY};
use super::state::{Agg, PartitionState, Pending, WindowState};
use super::threshold::{Step, ThresholdWindow};
use super::trailing::TrailingDistinct;
use super::trailing_threshold::TrailingThreshold;
use super::Outcome;
use crate::decimal::{Decimal, DecimalError};
use crate::event::{Fields, RecordMeta, Scalar};
use crate::reject::{RejectReason, Rejection};
use crate::timestamp::{self, TimestampSource};
use crate::window::{Trailing, WindowBounds};
use crate::EpochMillis;

/// What a matching event adds to one metric.
#[derive(Clone)]
enum Contribution<'a> {
    One,
    Amount(Decimal),
    Member(Cow<'a, [u8]>),
    /// A conversion's start event (A) of an entity.
    FunnelStart(Cow<'a, [u8]>),
    /// A conversion's end event (B) of an entity.
    FunnelEnd(Cow<'a, [u8]>),
    /// One event of an entity, by an actor when the threshold counts distinct actors.
    Progress {
        entity: Cow<'a, [u8]>,
        actor: Option<Cow<'a, [u8]>>,
    },
}

pub(super) fn apply_event(
    plan: &Plan,
    state: &mut PartitionState,
    source: &Source<'_>,
    payload: &[u8],
    record: &dyn RecordMeta,
    stage: Stage,
    now_ms: EpochMillis,
) -> Outcome {
    match evaluate(plan, state, payload, record, stage, now_ms) {
        Ok(mut evaluated) => {
            let event_time_ms = evaluated.event_time_ms;
            let dedups = plan.dedups_at(stage);
            if let (Stage::Rekeyed(group), Some(id), true) = (stage, &evaluated.id, dedups) {
                // One event reaches a partition once per group it is forwarded for: each
                // group remembers its ids apart.
                let mut seen = plan.rekey_name(group).as_bytes().to_vec();
                seen.push(0);
                seen.extend_from_slice(id);
                evaluated.id = Some(Cow::Owned(seen));
            }
            if let Some(id) = evaluated.id.as_ref().filter(|_| dedups) {
                match is_duplicate(plan, state, source, id, event_time_ms, stage) {
                    Ok(true) => return Outcome::Duplicate { event_time_ms },
                    Ok(false) => {}
                    Err(error) => {
                        state.poisoned = true;
                        return Outcome::StateUnreadable(error);
                    }
                }
            }
            if plan.keeps_some_only() {
                // A backfill: validated by every metric, applied to its own.
                evaluated
                    .contributions
                    .retain(|(index, _, _)| plan.keeps(*index));
            }
            let matched = evaluated.contributions.len();
            let forward = match stage {
                Stage::Input => take_rekeyed(
                    plan,
                    &mut evaluated.contributions,
                    evaluated.id.as_deref(),
                    payload,
                ),
                Stage::Rekeyed(_) => Forwards::default(),
            };
            if let Err(error) = commit(plan, state, source, evaluated, stage, now_ms) {
                // The event may be half applied: nothing of this partition is stored any
                // more, so a restart resumes from its last whole state.
                state.poisoned = true;
                return Outcome::StateUnreadable(error);
            }
            Outcome::Applied {
                event_time_ms,
                matched,
                forward,
            }
        }
        Err(rejection) => Outcome::Rejected(rejection),
    }
}

/// Takes out the contributions of re-keyed metrics (an input partition validated them, a
/// repartition partition counts them): the groups the event goes on to, and its entity's hash
/// in each. Counts and sums re-keyed by the id (deduplicated across partitions) go by the id,
/// or without one by the event's bytes: a copy sent again must reach the same partition.
fn take_rekeyed(
    plan: &Plan,
    contributions: &mut Contributions<'_>,
    id: Option<&[u8]>,
    payload: &[u8],
) -> Forwards {
    let mut forward = Forwards::default();
    contributions.retain(|(index, contribution, _)| {
        let Route::Rekeyed(group) = plan.route(*index) else {
            return true;
        };
        if !forward.0.iter().any(|(known, _)| *known == group) {
            let by = match contribution.entity() {
                Some(entity) => Some(entity),
                None if plan.is_id_group(group) => Some(id.unwrap_or(payload)),
                None => None,
            };
            if let Some(by) = by {
                forward.0.push((group, entity_hash(by)));
            }
        }
        false
    });
    forward
}

impl Contribution<'_> {
    /// The entity a distinct-style metric counts.
    fn entity(&self) -> Option<&[u8]> {
        match self {
            Self::Member(entity)
            | Self::FunnelStart(entity)
            | Self::FunnelEnd(entity)
            | Self::Progress { entity, .. } => Some(entity),
            Self::One | Self::Amount(_) => None,
        }
    }
}

/// Per matching metric: its index, what the event adds, and its segment for a breakdown.
type Contributions<'a> = Vec<(usize, Contribution<'a>, Option<Box<[u8]>>)>;

/// A valid event, ready to commit.
struct Evaluated<'a> {
    event_time_ms: EpochMillis,
    /// The event id (its stored form), when deduplication is on and the event has one.
    id: Option<Cow<'a, [u8]>>,
    contributions: Contributions<'a>,
}

/// Whether the event's id was applied within the dedup horizon (see [`super::dedup`]).
fn is_duplicate(
    plan: &Plan,
    state: &mut PartitionState,
    source: &Source<'_>,
    id: &[u8],
    event_time_ms: EpochMillis,
    stage: Stage,
) -> Result<bool, StateReadError> {
    let Some(dedup) = &plan.settings.dedup else {
        return Ok(false);
    };
    // Nothing applied yet: nothing to repeat.
    let Some(newest_ms) = state.max_event_ms else {
        return Ok(false);
    };
    let (watermark_ms, newest_ms) = match (state.watermark_ms(), stage) {
        (Some(watermark_ms), _) => (watermark_ms, newest_ms.max(event_time_ms)),
        (None, Stage::Input) => return Ok(false),
        // A repartition partition before every source reported (or in `nsm replay`, without
        // time): an id applied within the horizon of the event's own time. A copy has its
        // original's time, and the lookup reads at most three periods however far apart the
        // sources are.
        (None, Stage::Rekeyed(_)) => (event_time_ms, event_time_ms + dedup.horizon_ms),
    };
    SeenIds {
        namespace: plan.ids_namespace(),
        horizon_ms: dedup.horizon_ms,
        members: &mut state.members,
    }
    .is_duplicate(source, id, watermark_ms, newest_ms)
}

/// Decodes and validates an event for the metrics of `stage`: an input partition validates
/// every metric (an event counts in all or none, re-keyed ones included), a repartition
/// partition only its group's.
fn evaluate<'a>(
    plan: &Plan,
    state: &PartitionState,
    payload: &'a [u8],
    record: &'a dyn RecordMeta,
    stage: Stage,
    now_ms: EpochMillis,
) -> Result<Evaluated<'a>, Rejection> {
    let settings = &plan.settings;
    if payload.len() > settings.max_event_bytes {
        return Err(Rejection::new(
            RejectReason::Oversize,
            format!(
                "{} bytes exceeds events.max_bytes = {}",
                payload.len(),
                settings.max_event_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|error| {
        Rejection::new(RejectReason::InvalidJson, format!("not UTF-8: {error}"))
    })?;
    let fields = plan.schema.decode_with(text, record)?;

    match fields.get(plan.name_slot) {
        Some(Scalar::Text(_)) => {}
        None => {
            return Err(Rejection::new(
                RejectReason::MissingEventName,
                format!("no event name at {}", settings.event_name_field),
            ))
        }
        Some(other) => {
            return Err(Rejection::new(
                RejectReason::WrongType,
                format!(
                    "event name at {} is a {}, not a string",
                    settings.event_name_field,
                    other.type_name()
                ),
            ))
        }
    }
    let event_time_ms = event_time(&fields, plan, record.timestamp_ms(), now_ms)?;
    if event_time_ms > now_ms.saturating_add(settings.max_future_skew_ms)
        || event_time_ms < now_ms.saturating_sub(settings.retention_ms)
    {
        return Err(Rejection::new(
            RejectReason::TimestampOutOfRange,
            format!(
                "timestamp {} is outside [now - retention, now + max_future_skew]",
                format_ms(event_time_ms)
            ),
        ));
    }

    // Ids are deduplicated where the event is read, or where its copies meet
    // (`Plan::dedups_at`); stage one also routes counts by them then.
    let id = match plan.id_slot.and_then(|slot| fields.get(slot)) {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Composite) => {
            return Err(Rejection::new(
                RejectReason::WrongType,
                format!(
                    "event id at {} is an object or array",
                    plan.settings
                        .dedup
                        .as_ref()
                        .map(|dedup| dedup.id_field.to_string())
                        .unwrap_or_default()
                ),
            ))
        }
        Some(scalar) => Some(member_key(scalar)),
    };

    let mut contributions = Vec::new();
    for (index, metric) in plan.compiled.iter().enumerate() {
        if stage != Stage::Input && !plan.applies_at(index, stage) {
            continue;
        }
        let segment = || segment_of(metric, &fields);
        if let ValueSource::Conversion { entity, .. } = metric.value {
            let starts = filter::matches(&metric.from_clauses, &fields);
            let ends = filter::matches(&metric.clauses, &fields);
            if starts || ends {
                let metric_def = &plan.metrics()[index];
                let entity = member_of(
                    &fields,
                    entity,
                    &metric_def.name,
                    "converts",
                    metric_def.kind.field(),
                )?;
                let segment = segment();
                // A start first, so an event that is both converts on its own.
                if starts {
                    let start = Contribution::FunnelStart(entity.clone());
                    contributions.push((index, start, segment.clone()));
                }
                if ends {
                    contributions.push((index, Contribution::FunnelEnd(entity), segment));
                }
            }
            continue;
        }
        if !metric.value.is_stateful() || !filter::matches(&metric.clauses, &fields) {
            continue;
        }
        let contribution = contribution(plan, index, metric, &fields)?;
        let segment = segment();
        if let Contribution::Amount(amount) = &contribution {
            check_sum_range(
                plan,
                state,
                index,
                *amount,
                event_time_ms,
                segment.as_deref(),
            )?;
        }
        contributions.push((index, contribution, segment));
    }

    if let Some(watermark) = state.watermark_ms() {
        if event_time_ms < watermark - settings.allowed_lateness_ms {
            return Err(Rejection::new(
                RejectReason::Late,
                format!(
                    "event time {} is more than the allowed lateness behind the watermark {}",
                    format_ms(event_time_ms),
                    format_ms(watermark)
                ),
            ));
        }
    }
    Ok(Evaluated {
        event_time_ms,
        id,
        contributions,
    })
}

/// The segment of an event in a metric with a breakdown.
fn segment_of(metric: &CompiledMetric, fields: &Fields<'_>) -> Option<Box<[u8]>> {
    (!metric.segment_slots.is_empty()).then(|| {
        let values: Vec<Option<Cow<'_, [u8]>>> = metric
            .segment_slots
            .iter()
            .map(|slot| fields.get(*slot).map(member_key))
            .collect();
        segment_key(values.iter().map(Option::as_deref))
    })
}

/// Refuses an amount that would take its window's sum, or its segment's, beyond the exact
/// range (about 1.7e29): adding it would lose it, and the event must then count nowhere
/// rather than in some metrics only.
fn check_sum_range(
    plan: &Plan,
    state: &PartitionState,
    index: usize,
    amount: Decimal,
    event_time_ms: EpochMillis,
    segment: Option<&[u8]>,
) -> Result<(), Rejection> {
    let bounds = match state.last_window[index] {
        Some(bounds) if bounds.contains(event_time_ms) => bounds,
        _ => match plan.bucket_of(index, event_time_ms) {
            Some(bounds) => bounds,
            None => return Ok(()),
        },
    };
    let Some(window) = state.windows[index].get(&bounds.start_ms) else {
        return Ok(());
    };
    let fits = |agg: Option<&Agg>| match agg {
        Some(Agg::Sum(sum)) => sum.checked_add(amount).is_some(),
        _ => true,
    };
    let segment_agg = segment.and_then(|segment| {
        window.segments.get(segment).or_else(|| {
            // A new segment beyond the cap is added to the overflow segment (see `commit`).
            (window.segments.len() >= MAX_SEGMENTS_PER_WINDOW)
                .then(|| window.segments.get(OVERFLOW_KEY))
                .flatten()
        })
    });
    if fits(Some(&window.agg)) && fits(segment_agg) {
        return Ok(());
    }
    let metric = &plan.metrics()[index];
    Err(Rejection::new(
        RejectReason::WrongType,
        format!(
            "{} = {amount} would take the sum of metric {} beyond the exact range",
            metric
                .kind
                .field()
                .map(ToString::to_string)
                .unwrap_or_default(),
            metric.name
        ),
    ))
}

/// The event's time, read as `events.timestamp*` say (see `crate::timestamp`).
fn event_time(
    fields: &Fields<'_>,
    plan: &Plan,
    kafka_timestamp_ms: Option<EpochMillis>,
    now_ms: EpochMillis,
) -> Result<EpochMillis, Rejection> {
    let format = &plan.settings.timestamp_format;
    let path = &plan.settings.timestamp_field;
    let from_kafka = || {
        kafka_timestamp_ms.ok_or_else(|| {
            Rejection::new(
                RejectReason::MissingTimestamp,
                "the Kafka record has no timestamp (events.timestamp = \"@kafka\")",
            )
        })
    };
    let value = match format.source {
        TimestampSource::Kafka => return from_kafka(),
        TimestampSource::Field => fields.get(plan.timestamp_slot),
        TimestampSource::FieldElseKafka => match fields.get(plan.timestamp_slot) {
            None | Some(Scalar::Null) => return from_kafka(),
            value => value,
        },
    };
    let field = path.to_string();
    match value {
        None => Err(Rejection::new(
            RejectReason::MissingTimestamp,
            format!("no timestamp at {path}"),
        )),
        Some(Scalar::Text(text)) => timestamp::text_millis(&text, format.zone.as_ref(), &field),
        Some(Scalar::Number(text)) => timestamp::epoch_millis(text, format.unit, now_ms, &field),
        Some(other) => Err(Rejection::new(
            RejectReason::InvalidTimestamp,
            format!("timestamp at {path} is a {}", other.type_name()),
        )),
    }
}

fn contribution<'a>(
    plan: &Plan,
    index: usize,
    metric: &CompiledMetric,
    fields: &Fields<'a>,
) -> Result<Contribution<'a>, Rejection> {
    let field_name = || {
        plan.metrics()[index]
            .kind
            .field()
            .map(ToString::to_string)
            .unwrap_or_default()
    };
    let metric_name = &plan.metrics()[index].name;
    match &metric.value {
        // Derived and conversion metrics never get here (see `evaluate`).
        ValueSource::One
        | ValueSource::Ratio { .. }
        | ValueSource::Retention { .. }
        | ValueSource::Conversion { .. } => Ok(Contribution::One),
        ValueSource::Sum(slot) => match fields.get(*slot) {
            Some(Scalar::Number(text)) => match Decimal::parse(text) {
                Ok(amount) => Ok(Contribution::Amount(amount)),
                Err(DecimalError::OutOfRange) | Err(DecimalError::Syntax) => Err(Rejection::new(
                    RejectReason::WrongType,
                    format!(
                        "{} = {text} for metric {metric_name} is beyond the exact range",
                        field_name()
                    ),
                )),
            },
            None => Err(Rejection::new(
                RejectReason::MissingField,
                format!(
                    "metric {metric_name} sums {} but the event has none",
                    field_name()
                ),
            )),
            Some(other) => Err(Rejection::new(
                RejectReason::WrongType,
                format!(
                    "metric {metric_name} sums {} but it is a {}",
                    field_name(),
                    other.type_name()
                ),
            )),
        },
        ValueSource::Distinct(slot) => {
            let field = plan.metrics()[index].kind.field();
            member_of(fields, *slot, metric_name, "counts distinct", field)
                .map(Contribution::Member)
        }
        ValueSource::Threshold { entity, actor, .. } => {
            let kind = &plan.metrics()[index].kind;
            let entity_field = match kind {
                crate::metric::MetricKind::Threshold { entity, .. } => Some(entity),
                _ => None,
            };
            let entity = member_of(
                fields,
                *entity,
                metric_name,
                "counts entities by",
                entity_field,
            )?;
            let actor = match actor {
                Some(slot) => Some(member_of(
                    fields,
                    *slot,
                    metric_name,
                    "counts distinct",
                    kind.field(),
                )?),
                None => None,
            };
            Ok(Contribution::Progress { entity, actor })
        }
    }
}

/// The member key of a field a metric needs; missing or composite values reject the event.
fn member_of<'a>(
    fields: &Fields<'a>,
    slot: crate::event::Slot,
    metric_name: &str,
    verb: &str,
    field: Option<&crate::metric::FieldPath>,
) -> Result<Cow<'a, [u8]>, Rejection> {
    // The field's name is only formatted for a rejection, never per valid event.
    let field_name = || field.map(ToString::to_string).unwrap_or_default();
    match fields.get(slot) {
        Some(Scalar::Composite) => Err(Rejection::new(
            RejectReason::WrongType,
            format!(
                "metric {metric_name} {verb} {} but it is an object or array",
                field_name()
            ),
        )),
        Some(scalar) => Ok(member_key(scalar)),
        None => Err(Rejection::new(
            RejectReason::MissingField,
            format!(
                "metric {metric_name} {verb} {} but the event has none",
                field_name()
            ),
        )),
    }
}

/// The identity of a distinct value: a type tag, then its canonical text, so the string "42"
/// and the number 42 are different members while 42 and 42.0 are the same.
fn member_key<'a>(scalar: Scalar<'a>) -> Cow<'a, [u8]> {
    let (tag, body): (u8, Cow<'a, str>) = match scalar {
        Scalar::Text(text) => (b's', text),
        Scalar::Number(text) => match Decimal::parse(text) {
            Ok(number) => (b'n', Cow::Owned(number.to_string())),
            Err(_) => (b'n', Cow::Borrowed(text)),
        },
        Scalar::Bool(flag) => (b'b', Cow::Borrowed(if flag { "true" } else { "false" })),
        Scalar::Null | Scalar::Composite => (b'?', Cow::Borrowed("")),
    };
    let mut key = Vec::with_capacity(body.len() + 1);
    key.push(tag);
    key.extend_from_slice(body.as_bytes());
    Cow::Owned(key)
}

fn commit(
    plan: &Plan,
    state: &mut PartitionState,
    source: &Source<'_>,
    evaluated: Evaluated<'_>,
    stage: Stage,
    now_ms: EpochMillis,
) -> Result<(), StateReadError> {
    let Evaluated {
        event_time_ms,
        id,
        contributions,
    } = evaluated;
    let dedup = plan
        .settings
        .dedup
        .as_ref()
        .filter(|_| plan.dedups_at(stage));
    if let (Some(id), Some(dedup)) = (id, dedup) {
        SeenIds {
            namespace: plan.ids_namespace(),
            horizon_ms: dedup.horizon_ms,
            members: &mut state.members,
        }
        .remember(&id, event_time_ms);
    }
    match stage {
        Stage::Input => state.advance_event_time(event_time_ms, now_ms),
        // A repartition partition's watermark is its sources' (see `upstream`).
        Stage::Rekeyed(_) => state.note_newest(event_time_ms),
    }
    let newest_ms = state.max_event_ms.unwrap_or(event_time_ms);
    // Until every source has reported, a repartition partition has no watermark, and any
    // event its sources still accept may come: only the retention bounds them.
    let accepted_from_ms = state
        .accepted_from_ms(plan.settings.allowed_lateness_ms)
        .unwrap_or(now_ms.saturating_sub(plan.settings.retention_ms));
    for (index, contribution, segment) in contributions {
        let compiled = &plan.compiled[index];
        if let Contribution::FunnelStart(_) | Contribution::FunnelEnd(_) = contribution {
            let step = FunnelStep {
                metric: index,
                time_ms: event_time_ms,
                newest_ms,
                accepted_from_ms,
            };
            step.apply(plan, state, source, &contribution, segment)?;
            continue;
        }
        let bounds = match state.last_window[index] {
            Some(bounds) if bounds.contains(event_time_ms) => bounds,
            _ => match plan.bucket_of(index, event_time_ms) {
                Some(bounds) => {
                    state.last_window[index] = Some(bounds);
                    bounds
                }
                // Unreachable: the timestamp was range-checked against the wall clock.
                None => continue,
            },
        };
        if let (Some(trailing), Contribution::Member(member)) = (&compiled.trailing, &contribution)
        {
            let bucket = TrailingBucket {
                metric: index,
                span: plan.gap_span(index).unwrap_or(*trailing),
                start_ms: bounds.start_ms,
                accepted_from_ms,
            };
            bucket.add(state, source, member, None, newest_ms)?;
            if let Some(segment) = &segment {
                bucket.add(state, source, member, Some(segment), newest_ms)?;
            }
            continue;
        }
        if let (
            Some(trailing),
            Contribution::Progress { entity, actor },
            ValueSource::Threshold { at_least, .. },
        ) = (&compiled.trailing, &contribution, &compiled.value)
        {
            let windows = &mut state.windows[index];
            // A segment's entities are the entity tagged with it, counted apart.
            let segment = segment.map(|segment| capped_at(windows, bounds.start_ms, segment));
            let tagged = segment
                .as_ref()
                .map(|segment| segment_member(segment, entity));
            let mut threshold = TrailingThreshold {
                metric: index,
                trailing: *trailing,
                at_least: *at_least,
                accepted_from_ms,
                segment: None,
                windows,
                members: &mut state.members,
                pending: &mut state.pending,
            };
            let actor = actor.as_deref();
            threshold.add(source, bounds.start_ms, entity, actor, newest_ms)?;
            if let (Some(segment), Some(tagged)) = (&segment, &tagged) {
                threshold.segment = Some(segment);
                threshold.add(source, bounds.start_ms, tagged, actor, newest_ms)?;
            }
            continue;
        }
        let window = window_entry(&mut state.windows[index], bounds, compiled);
        let members = &mut state.members;
        let pending = &mut state.pending;
        let step = step_of(compiled.window, bounds, event_time_ms);
        let target = Target {
            metric: index,
            start_ms: bounds.start_ms,
            source: &compiled.value,
            step,
        };
        // A retention counts a member new in a window (or a segment), once the window's
        // borrow ends; most metrics have none, and note nothing.
        let has_retention = !plan.retention_of[index].is_empty();
        let mut new_in_segment: Option<NewMember<'_>> = None;
        if let Some(segment) = segment {
            let added =
                target.add_to_segment(window, members, pending, source, segment, &contribution)?;
            if let (Some((segment, Contribution::Member(member))), true) = (added, has_retention) {
                new_in_segment = Some((member, segment));
            }
        }
        let added = target.add(
            &mut window.agg,
            &mut window.progress,
            members,
            source,
            &contribution,
        )?;
        if added.changed() {
            pending.dirty_windows.insert((index, bounds.start_ms));
        }
        if let (true, Contribution::Member(member)) = (has_retention, &contribution) {
            match added {
                Added::NewMember => {
                    count_returning(plan, state, source, index, bounds, member, None, Some(step))?
                }
                Added::Moved { from } => {
                    move_returning(plan, state, source, index, bounds, member, from, step)?
                }
                Added::Nothing | Added::Changed => {}
            }
        }
        if let Some((member, segment)) = new_in_segment {
            count_returning(
                plan,
                state,
                source,
                index,
                bounds,
                &member,
                Some(&segment),
                None,
            )?;
        }
    }
    Ok(())
}

/// A member new in a segment (tagged with it), and the segment.
type NewMember<'a> = (Cow<'a, [u8]>, Box<[u8]>);

/// The segment a contribution to the window (or trailing bucket) at `start_ms` goes to: see
/// [`capped_segment`]; a window not there yet has none.
fn capped_at(
    windows: &BTreeMap<EpochMillis, WindowState>,
    start_ms: EpochMillis,
    segment: Box<[u8]>,
) -> Box<[u8]> {
    match windows.get(&start_ms) {
        Some(window) => capped_segment(window, segment),
        None => segment,
    }
}

/// A new segment of a full window goes to the overflow segment.
fn capped_segment(window: &WindowState, segment: Box<[u8]>) -> Box<[u8]> {
    if window.segments.len() >= MAX_SEGMENTS_PER_WINDOW && !window.segments.contains_key(&segment) {
        OVERFLOW_KEY.into()
    } else {
        segment
    }
}

/// A contribution to a segment: its entities are kept apart from the window's (and from other
/// segments'), tagged with the segment.
fn tagged_with<'a>(segment: &[u8], contribution: &Contribution<'a>) -> Contribution<'a> {
    let tag = |entity: &[u8]| Cow::Owned(segment_member(segment, entity).into());
    match contribution {
        Contribution::Member(member) => Contribution::Member(tag(member)),
        Contribution::Progress { entity, actor } => Contribution::Progress {
            entity: tag(entity),
            actor: actor.clone(),
        },
        other => other.clone(),
    }
}

/// One step bucket of a trailing distinct metric (or conversion: its converted entities).
struct TrailingBucket {
    metric: usize,
    /// The metric's trailing window, or a longer one of the same step when its gaps must
    /// reach further back (`Plan::gap_span`).
    span: Trailing,
    start_ms: EpochMillis,
    /// The earliest event time the partition still accepts.
    accepted_from_ms: EpochMillis,
}

impl TrailingBucket {
    /// Adds the member to the bucket's own set or, given a segment, the member tagged with
    /// the segment to the segment's.
    fn add(
        &self,
        state: &mut PartitionState,
        source: &Source<'_>,
        member: &[u8],
        segment: Option<&[u8]>,
        newest_ms: EpochMillis,
    ) -> Result<(), StateReadError> {
        let windows = &mut state.windows[self.metric];
        let (segment, member): (Option<Box<[u8]>>, Cow<'_, [u8]>) = match segment {
            None => (None, Cow::Borrowed(member)),
            Some(segment) => {
                let capped = capped_at(windows, self.start_ms, segment.into());
                let tagged = segment_member(&capped, member);
                (Some(capped), Cow::Owned(tagged.into()))
            }
        };
        TrailingDistinct {
            metric: self.metric,
            trailing: self.span,
            accepted_from_ms: self.accepted_from_ms,
            segment: segment.as_deref(),
            windows,
            members: &mut state.members,
            pending: &mut state.pending,
        }
        .add(source, self.start_ms, &member, newest_ms)?;
        Ok(())
    }
}

/// One event of a conversion metric, moving the funnels of its entity.
struct FunnelStep {
    metric: usize,
    time_ms: EpochMillis,
    /// The partition's newest event time.
    newest_ms: EpochMillis,
    /// The earliest event time the partition still accepts.
    accepted_from_ms: EpochMillis,
}

impl FunnelStep {
    /// Moves the entity's funnel and counts it in the windows of the events that converted.
    /// With a breakdown the entity also has a funnel per segment (tagged with it), so it
    /// converts in a segment when both its events carry the segment's values.
    fn apply(
        &self,
        plan: &Plan,
        state: &mut PartitionState,
        source: &Source<'_>,
        contribution: &Contribution<'_>,
        segment: Option<Box<[u8]>>,
    ) -> Result<(), StateReadError> {
        let (entity, starts) = match contribution {
            Contribution::FunnelStart(entity) => (entity, true),
            Contribution::FunnelEnd(entity) => (entity, false),
            _ => return Ok(()),
        };
        for time_ms in self.move_funnel(plan, state, source, entity, starts)? {
            self.count(plan, state, source, entity, None, time_ms)?;
        }
        if let Some(segment) = segment {
            let tagged = segment_member(&segment, entity);
            for time_ms in self.move_funnel(plan, state, source, &tagged, starts)? {
                self.count(plan, state, source, entity, Some(&segment), time_ms)?;
            }
        }
        Ok(())
    }

    /// The times of the events the step converted: this one, or the waiting ones a start
    /// reaches.
    fn move_funnel(
        &self,
        plan: &Plan,
        state: &mut PartitionState,
        source: &Source<'_>,
        entity: &[u8],
        starts: bool,
    ) -> Result<Vec<EpochMillis>, StateReadError> {
        let ValueSource::Conversion { within_ms, .. } = plan.compiled[self.metric].value else {
            return Ok(Vec::new());
        };
        let mut funnel = Funnel {
            metric: self.metric,
            within_ms,
            members: &mut state.members,
        };
        if starts {
            funnel.start(source, entity, self.time_ms)
        } else {
            let converted = funnel.end(source, entity, self.time_ms)?;
            Ok(converted.then_some(self.time_ms).into_iter().collect())
        }
    }

    /// Counts `entity` once in the window (or trailing bucket) of a conversion at `time_ms`,
    /// or in its segment there.
    fn count(
        &self,
        plan: &Plan,
        state: &mut PartitionState,
        source: &Source<'_>,
        entity: &[u8],
        segment: Option<&[u8]>,
        time_ms: EpochMillis,
    ) -> Result<(), StateReadError> {
        let index = self.metric;
        let compiled = &plan.compiled[index];
        if let Some(trailing) = compiled.trailing {
            let bucket = TrailingBucket {
                metric: index,
                span: plan.gap_span(index).unwrap_or(trailing),
                start_ms: trailing.bucket_of(time_ms).start_ms,
                accepted_from_ms: self.accepted_from_ms,
            };
            return bucket.add(state, source, entity, segment, self.newest_ms);
        }
        let Some(bounds) = plan.calendar().window_of(compiled.window, time_ms) else {
            return Ok(());
        };
        let window = window_entry(&mut state.windows[index], bounds, compiled);
        let target = Target {
            metric: index,
            start_ms: bounds.start_ms,
            source: &compiled.value,
            step: step_of(compiled.window, bounds, time_ms),
        };
        let (members, pending) = (&mut state.members, &mut state.pending);
        let member = Contribution::Member(Cow::Borrowed(entity));
        match segment {
            None => {
                let progress = &mut window.progress;
                if target
                    .add(&mut window.agg, progress, members, source, &member)?
                    .changed()
                {
                    pending.dirty_windows.insert((index, bounds.start_ms));
                }
            }
            Some(segment) => {
                let segment = segment.into();
                target.add_to_segment(window, members, pending, source, segment, &member)?;
            }
        }
        Ok(())
    }
}

/// Keeps the retention metrics of distinct metric `base` up to date when `member` joins its
/// window `bounds` (or the segment `segment` there, `member` then tagged with it) at step
/// `step` of the window's progress record: it returns in this window if it was in the
/// previous one, and makes the next window's member (seen earlier, out of order) a returning
/// one, in the step of that member.
#[allow(clippy::too_many_arguments)]
fn count_returning(
    plan: &Plan,
    state: &mut PartitionState,
    source: &Source<'_>,
    base: usize,
    bounds: WindowBounds,
    member: &[u8],
    segment: Option<&[u8]>,
    step: Option<usize>,
) -> Result<(), StateReadError> {
    // A segment's returning entities count only in retention metrics broken down too.
    let counts = |retention: &usize| {
        segment.is_none() || !plan.compiled[*retention].segment_slots.is_empty()
    };
    let dependents: Vec<usize> = plan.retention_of[base]
        .iter()
        .copied()
        .filter(counts)
        .collect();
    if dependents.is_empty() {
        return Ok(());
    }
    let unit = plan.compiled[base].window;
    let calendar = plan.calendar();
    let mut returning_in = Vec::with_capacity(2);
    if let Some(previous) = calendar.previous(unit, bounds) {
        if member_step(state, source, base, previous, member)?.is_some() {
            returning_in.push((bounds, step));
        }
    }
    if let Some(next) = calendar.window_of(unit, bounds.end_ms) {
        // The next window's member returns from its own first step there.
        if let Some(next_step) = member_step(state, source, base, next, member)? {
            returning_in.push((next, next_step));
        }
    }
    for retention in dependents {
        for (window, step) in &returning_in {
            let compiled = &plan.compiled[retention];
            let entry = window_entry(&mut state.windows[retention], *window, compiled);
            let pending = &mut state.pending;
            let agg = match segment {
                None => {
                    pending.dirty_windows.insert((retention, window.start_ms));
                    match (&mut entry.progress, step) {
                        (Some(progress), Some(step)) => progress.add_one(*step),
                        // A member without a step (stored before records were kept): the
                        // record could no longer be exact.
                        (progress, None) => *progress = None,
                        (None, Some(_)) => {}
                    }
                    &mut entry.agg
                }
                Some(segment) => {
                    let segment = capped_segment(entry, segment.into());
                    pending
                        .dirty_segments
                        .insert((retention, window.start_ms, segment.clone()));
                    entry
                        .segments
                        .entry(segment)
                        .or_insert_with(|| Agg::empty(&compiled.value))
                }
            };
            if let Agg::Count(count) = agg {
                *count += 1;
            }
        }
    }
    Ok(())
}

/// Whether `member` is in window `bounds` of distinct metric `base`: `None` when not, else
/// the step of its earliest event there (`None` inside when its entry holds no step).
fn member_step(
    state: &mut PartitionState,
    source: &Source<'_>,
    base: usize,
    bounds: WindowBounds,
    member: &[u8],
) -> Result<Option<Option<usize>>, StateReadError> {
    if !state.windows[base].contains_key(&bounds.start_ms) {
        return Ok(None);
    }
    let value = state.members.get(source, base, bounds.start_ms, member)?;
    Ok(value.map(|value| decode_step(&value)))
}

/// Keeps the retention metrics of distinct metric `base` exact when `member`'s earliest event
/// in window `bounds` moved from step `from` to the earlier `to`: where it returns there (it
/// was in the previous window), it now returns from `to`.
#[allow(clippy::too_many_arguments)]
fn move_returning(
    plan: &Plan,
    state: &mut PartitionState,
    source: &Source<'_>,
    base: usize,
    bounds: WindowBounds,
    member: &[u8],
    from: usize,
    to: usize,
) -> Result<(), StateReadError> {
    let unit = plan.compiled[base].window;
    let Some(previous) = plan.calendar().previous(unit, bounds) else {
        return Ok(());
    };
    if member_step(state, source, base, previous, member)?.is_none() {
        return Ok(());
    }
    for &retention in &plan.retention_of[base] {
        let Some(window) = state.windows[retention].get_mut(&bounds.start_ms) else {
            continue;
        };
        if let Some(progress) = &mut window.progress {
            progress.move_one(from, to);
            state
                .pending
                .dirty_windows
                .insert((retention, bounds.start_ms));
        }
    }
    Ok(())
}

/// The window of a metric at `bounds`, created empty for the metric's kind if new, with an
/// empty progress record when a calendar window of its kind keeps one (see
/// [`super::baseline`]).
fn window_entry<'s>(
    windows: &'s mut BTreeMap<EpochMillis, WindowState>,
    bounds: WindowBounds,
    compiled: &CompiledMetric,
) -> &'s mut WindowState {
    windows.entry(bounds.start_ms).or_insert_with(|| {
        let mut window = WindowState::new(bounds.end_ms, Agg::empty(&compiled.value));
        if compiled.trailing.is_none() {
            window.progress = Progress::for_source(&compiled.value);
        }
        window
    })
}

/// A segment a contribution changed, and the contribution tagged with it.
type SegmentAdded<'c> = (Box<[u8]>, Contribution<'c>);

/// The window (or segment) a contribution is added to, in the member index's terms.
struct Target<'p> {
    metric: usize,
    start_ms: EpochMillis,
    source: &'p ValueSource,
    /// The step of the event in the window's progress record.
    step: usize,
}

/// What adding a contribution did to a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Added {
    Nothing,
    /// Its value changed, or it holds new per-entity entries.
    Changed,
    /// A member new in the window.
    NewMember,
    /// A member already there whose earliest event moved to the earlier step `step` from
    /// `from` (a late event).
    Moved {
        from: usize,
    },
}

impl Added {
    /// Whether the window must be stored: its value or progress changed, or it holds new
    /// per-entity entries (which expire with it, so it must be known after a restart).
    fn changed(self) -> bool {
        self != Added::Nothing
    }
}

impl Target<'_> {
    /// Adds a contribution to its segment of the window (see [`capped_segment`]), the
    /// entity tagged with the segment; returns the segment and the tagged contribution when
    /// that changed the segment (noted for the next checkpoint). Segments keep no progress
    /// record.
    fn add_to_segment<'c>(
        &self,
        window: &mut WindowState,
        members: &mut MemberIndex,
        pending: &mut Pending,
        source: &Source<'_>,
        segment: Box<[u8]>,
        contribution: &Contribution<'c>,
    ) -> Result<Option<SegmentAdded<'c>>, StateReadError> {
        let segment = capped_segment(window, segment);
        let agg = window
            .segments
            .entry(segment.clone())
            .or_insert_with(|| Agg::empty(self.source));
        let tagged = tagged_with(&segment, contribution);
        if !self
            .add(agg, &mut None, members, source, &tagged)?
            .changed()
        {
            return Ok(None);
        }
        pending
            .dirty_segments
            .insert((self.metric, self.start_ms, segment.clone()));
        Ok(Some((segment, tagged)))
    }

    /// Adds a contribution to a value and its progress record.
    fn add(
        &self,
        agg: &mut Agg,
        progress: &mut Option<Progress>,
        members: &mut MemberIndex,
        source: &Source<'_>,
        contribution: &Contribution<'_>,
    ) -> Result<Added, StateReadError> {
        Ok(match (agg, contribution) {
            (Agg::Count(count), Contribution::One) => {
                *count += 1;
                if let Some(progress) = progress {
                    progress.add_one(self.step);
                }
                Added::Changed
            }
            (Agg::Sum(sum), Contribution::Amount(amount)) => match sum.checked_add(*amount) {
                Some(total) => {
                    *sum = total;
                    if progress
                        .as_mut()
                        .is_some_and(|progress| !progress.add_amount(self.step, *amount))
                    {
                        // A step's sum beyond the exact range: no exact record any more.
                        *progress = None;
                    }
                    Added::Changed
                }
                None => Added::Nothing,
            },
            (Agg::Threshold(reached), Contribution::Progress { entity, actor }) => {
                let ValueSource::Threshold { at_least, .. } = self.source else {
                    return Ok(Added::Nothing);
                };
                let window = ThresholdWindow {
                    metric: self.metric,
                    start_ms: self.start_ms,
                    at_least: *at_least,
                };
                match window.add(members, source, entity, actor.as_deref())? {
                    Step::Reached => {
                        *reached += 1;
                        Added::Changed
                    }
                    Step::Progressed => Added::Changed,
                    Step::Nothing => Added::Nothing,
                }
            }
            (Agg::Distinct(count), Contribution::Member(member)) => {
                let (metric, start_ms) = (self.metric, self.start_ms);
                let Some(record) = progress else {
                    // No record: a member's presence is all there is to keep.
                    if members.contains(source, metric, start_ms, member)? {
                        return Ok(Added::Nothing);
                    }
                    members.insert(metric, start_ms, member);
                    *count += 1;
                    return Ok(Added::NewMember);
                };
                // With a record, the member's entry holds the step of its earliest event.
                match members.get(source, metric, start_ms, member)? {
                    None => {
                        members.put(metric, start_ms, member, &encode_step(self.step));
                        *count += 1;
                        record.add_one(self.step);
                        Added::NewMember
                    }
                    Some(value) => match decode_step(&value) {
                        Some(first) if self.step < first => {
                            members.put(metric, start_ms, member, &encode_step(self.step));
                            record.move_one(first, self.step);
                            Added::Moved { from: first }
                        }
                        Some(_) => Added::Nothing,
                        // Stored without a step, which a window with a record never does:
                        // the record cannot stay exact.
                        None => {
                            *progress = None;
                            Added::Changed
                        }
                    },
                }
            }
            _ => Added::Nothing,
        })
    }
}

pub(super) fn format_ms(time_ms: EpochMillis) -> String {
    match Timestamp::from_millisecond(time_ms) {
        Ok(timestamp) => timestamp.to_string(),
        Err(_) => format!("{time_ms}ms"),
    }
}
