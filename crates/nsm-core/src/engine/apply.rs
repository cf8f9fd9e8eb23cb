//! Applying one event: decode, validate everything, then update state.
//!
//! An event is applied to all metrics it matches or to none: every check (timestamp, value
//! types, lateness) happens before the first state change, so a rejected event leaves no trace
//! and can be replayed from the dead-letter topic once fixed.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;

use super::funnel::{FunnelRecord, FunnelStep};
use super::plan::{CompiledMetric, Plan, ValueSource};
use super::segment::{segment_key, segment_member, MAX_SEGMENTS_PER_WINDOW, OVERFLOW_KEY};
use super::state::{id_digest, Agg, PartitionState, SeenId, WindowState};
use super::Outcome;
use crate::decimal::{Decimal, DecimalError};
use crate::event::{Fields, Scalar};
use crate::metric::Literal;
use crate::reject::{RejectReason, Rejection};
use crate::window::WindowBounds;
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
    payload: &[u8],
    now_ms: EpochMillis,
) -> Outcome {
    match evaluate(plan, state, payload, now_ms) {
        Ok(evaluated) => {
            let event_time_ms = evaluated.event_time_ms;
            if let Some(id) = &evaluated.id {
                if is_duplicate(plan, state, id.digest) {
                    return Outcome::Duplicate { event_time_ms };
                }
            }
            let matched = evaluated.contributions.len();
            commit(plan, state, evaluated);
            Outcome::Applied {
                event_time_ms,
                matched,
            }
        }
        Err(rejection) => Outcome::Rejected(rejection),
    }
}

/// Per matching metric: its index, what the event adds, and its segment for a breakdown.
type Contributions<'a> = Vec<(usize, Contribution<'a>, Option<Box<[u8]>>)>;

/// An event's id: its stored form, and the digest it is remembered by (hashed once).
struct EventId<'a> {
    stored: Cow<'a, [u8]>,
    digest: u128,
}

/// A valid event, ready to commit.
struct Evaluated<'a> {
    event_time_ms: EpochMillis,
    /// The event id, when deduplication is on and the event has one.
    id: Option<EventId<'a>>,
    contributions: Contributions<'a>,
}

/// An id is remembered while its event time is less than the horizon behind the watermark.
/// Deciding by the watermark, not by when memory is swept, keeps the answer a function of the
/// partition's log: replays after a restart decide exactly as the first run did.
fn is_duplicate(plan: &Plan, state: &PartitionState, digest: u128) -> bool {
    let Some(dedup) = &plan.settings.dedup else {
        return false;
    };
    let Some(seen_ms) = state.seen_ids.get(&digest) else {
        return false;
    };
    state
        .watermark_ms()
        .is_none_or(|watermark| *seen_ms > watermark.saturating_sub(dedup.horizon_ms))
}

fn evaluate<'a>(
    plan: &Plan,
    state: &PartitionState,
    payload: &'a [u8],
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
    let fields = plan.schema.decode(text)?;

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
    let event_time_ms = event_time(&fields, plan)?;
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
        Some(scalar) => {
            let stored = member_key(scalar);
            Some(EventId {
                digest: id_digest(&stored),
                stored,
            })
        }
    };

    let mut contributions = Vec::new();
    for (index, metric) in plan.compiled.iter().enumerate() {
        if let ValueSource::Conversion { entity, .. } = metric.value {
            let starts = matches_clauses(&metric.from_clauses, &fields);
            let ends = matches_clauses(&metric.clauses, &fields);
            if starts || ends {
                let metric_def = &plan.metrics()[index];
                let entity = member_of(
                    &fields,
                    entity,
                    &metric_def.name,
                    "converts",
                    metric_def.kind.field(),
                )?;
                // A start first, so an event that is both converts on its own.
                if starts {
                    let start = Contribution::FunnelStart(entity.clone());
                    contributions.push((index, start, None));
                }
                if ends {
                    contributions.push((index, Contribution::FunnelEnd(entity), None));
                }
            }
            continue;
        }
        if !metric.value.is_stateful() || !matches_clauses(&metric.clauses, &fields) {
            continue;
        }
        let contribution = contribution(plan, index, metric, &fields)?;
        let segment = (!metric.segment_slots.is_empty()).then(|| {
            let values: Vec<Option<Cow<'_, [u8]>>> = metric
                .segment_slots
                .iter()
                .map(|slot| fields.get(*slot).map(member_key))
                .collect();
            segment_key(values.iter().map(Option::as_deref))
        });
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

fn event_time(fields: &Fields<'_>, plan: &Plan) -> Result<EpochMillis, Rejection> {
    let path = &plan.settings.timestamp_field;
    match fields.get(plan.timestamp_slot) {
        None => Err(Rejection::new(
            RejectReason::MissingTimestamp,
            format!("no timestamp at {path}"),
        )),
        Some(Scalar::Text(text)) => text
            .parse::<Timestamp>()
            .map(Timestamp::as_millisecond)
            .map_err(|_| {
                // Well-formed but beyond what a timestamp can hold (the last hours of year
                // 9999, with their offset): as far out of range as any other absurd time.
                let well_formed = jiff::fmt::temporal::Pieces::parse(text.as_bytes())
                    .is_ok_and(|pieces| pieces.offset().is_some());
                if well_formed {
                    Rejection::new(
                        RejectReason::TimestampOutOfRange,
                        format!("timestamp {text:?} at {path} is beyond the representable range"),
                    )
                } else {
                    Rejection::new(
                        RejectReason::InvalidTimestamp,
                        format!("timestamp {text:?} at {path} is not RFC 3339 with an offset"),
                    )
                }
            }),
        Some(Scalar::Number(text)) => text.parse::<i64>().map_err(|_| {
            Rejection::new(
                RejectReason::InvalidTimestamp,
                format!("timestamp {text} at {path} is not integer epoch milliseconds"),
            )
        }),
        Some(other) => Err(Rejection::new(
            RejectReason::InvalidTimestamp,
            format!("timestamp at {path} is a {}", other.type_name()),
        )),
    }
}

fn matches_clauses(clauses: &[(crate::event::Slot, Vec<Literal>)], fields: &Fields<'_>) -> bool {
    clauses.iter().all(|(slot, any_of)| {
        let Some(value) = fields.get(*slot) else {
            return false;
        };
        any_of
            .iter()
            .any(|literal| literal_matches(literal, &value))
    })
}

fn literal_matches(literal: &Literal, value: &Scalar<'_>) -> bool {
    match (literal, value) {
        (Literal::Text(expected), Scalar::Text(actual)) => expected == actual,
        (Literal::Bool(expected), Scalar::Bool(actual)) => expected == actual,
        (Literal::Number(expected), Scalar::Number(actual)) => {
            Decimal::parse(actual).is_ok_and(|n| n == *expected)
        }
        _ => false,
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

fn commit(plan: &Plan, state: &mut PartitionState, evaluated: Evaluated<'_>) {
    let Evaluated {
        event_time_ms,
        id,
        contributions,
    } = evaluated;
    if let Some(id) = id {
        state.seen_ids.insert(id.digest, event_time_ms);
        state.pending.new_ids.push(SeenId {
            time_ms: event_time_ms,
            id: id.stored.into_owned().into_boxed_slice(),
        });
    }
    state.max_event_ms = Some(
        state
            .max_event_ms
            .map_or(event_time_ms, |max| max.max(event_time_ms)),
    );
    for (index, contribution, segment) in contributions {
        let compiled = &plan.compiled[index];
        if let Contribution::FunnelStart(_) | Contribution::FunnelEnd(_) = contribution {
            funnel_step(plan, state, index, contribution, event_time_ms);
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
        let window = window_entry(&mut state.windows[index], bounds, &compiled.value);
        let pending = &mut state.pending;
        if let Some(segment) = segment {
            let segment = if window.segments.len() >= MAX_SEGMENTS_PER_WINDOW
                && !window.segments.contains_key(&segment)
            {
                OVERFLOW_KEY.into()
            } else {
                segment
            };
            let agg = window
                .segments
                .entry(segment.clone())
                .or_insert_with(|| Agg::empty(&compiled.value));
            match add(agg, &compiled.value, contribution.clone()) {
                Added::Nothing => {}
                Added::Value => {
                    pending
                        .dirty_segments
                        .insert((index, bounds.start_ms, segment));
                }
                Added::Member(member) => {
                    let stored = segment_member(&segment, &member);
                    pending.new_members.push((index, bounds.start_ms, stored));
                    pending
                        .dirty_segments
                        .insert((index, bounds.start_ms, segment));
                }
            }
        }
        let new_member = match add(&mut window.agg, &compiled.value, contribution) {
            Added::Nothing => None,
            Added::Value => {
                pending.dirty_windows.insert((index, bounds.start_ms));
                None
            }
            Added::Member(member) => {
                pending
                    .new_members
                    .push((index, bounds.start_ms, member.clone()));
                pending.dirty_windows.insert((index, bounds.start_ms));
                Some(member)
            }
        };
        if let Some(member) = new_member {
            count_returning(plan, state, index, bounds, &member);
        }
    }
    state.pending.meta_dirty = true;
}

/// Moves a conversion metric's funnel, and counts the entity in the windows of the events
/// that converted.
fn funnel_step(
    plan: &Plan,
    state: &mut PartitionState,
    index: usize,
    contribution: Contribution<'_>,
    event_time_ms: EpochMillis,
) {
    let compiled = &plan.compiled[index];
    let ValueSource::Conversion { within_ms, .. } = compiled.value else {
        return;
    };
    let (entity, update) = match contribution {
        Contribution::FunnelStart(entity) => {
            let update = state.funnels[index].start(&entity, event_time_ms, within_ms);
            (entity, update)
        }
        Contribution::FunnelEnd(entity) => {
            let update = state.funnels[index].end(&entity, event_time_ms, within_ms);
            (entity, update)
        }
        _ => return,
    };
    let record = |step: FunnelStep, time_ms: EpochMillis| FunnelRecord {
        metric: index,
        step,
        time_ms,
        entity: entity.as_ref().into(),
    };
    if let Some((step, time_ms)) = update.remembered {
        state.pending.funnel_inserts.push(record(step, time_ms));
    }
    for time_ms in &update.forgotten_ends {
        state
            .pending
            .funnel_deletes
            .push(record(FunnelStep::PendingEnd, *time_ms));
    }
    for time_ms in update.converted_at {
        let Some(bounds) = plan.calendar().window_of(compiled.window, time_ms) else {
            continue;
        };
        let window = window_entry(&mut state.windows[index], bounds, &compiled.value);
        if let Added::Member(member) = add(
            &mut window.agg,
            &compiled.value,
            Contribution::Member(entity.clone()),
        ) {
            state
                .pending
                .new_members
                .push((index, bounds.start_ms, member));
            state.pending.dirty_windows.insert((index, bounds.start_ms));
        }
    }
}

/// Keeps the retention metrics of distinct metric `base` up to date when `member` joins its
/// window `bounds`: it returns in this window if it was in the previous one, and makes the
/// next window's member (seen earlier, out of order) a returning one.
fn count_returning(
    plan: &Plan,
    state: &mut PartitionState,
    base: usize,
    bounds: WindowBounds,
    member: &[u8],
) {
    let dependents = &plan.retention_of[base];
    if dependents.is_empty() {
        return;
    }
    let unit = plan.compiled[base].window;
    let calendar = plan.calendar();
    let in_window = |windows: &BTreeMap<EpochMillis, WindowState>, start_ms: EpochMillis| {
        matches!(
            windows.get(&start_ms),
            Some(WindowState { agg: Agg::Distinct(members), .. }) if members.contains(member)
        )
    };
    let mut returning_in = Vec::with_capacity(2);
    if let Some(previous) = calendar.previous(unit, bounds) {
        if in_window(&state.windows[base], previous.start_ms) {
            returning_in.push(bounds);
        }
    }
    if let Some(next) = calendar.window_of(unit, bounds.end_ms) {
        if in_window(&state.windows[base], next.start_ms) {
            returning_in.push(next);
        }
    }
    for &retention in dependents {
        for window in &returning_in {
            let source = &plan.compiled[retention].value;
            let entry = window_entry(&mut state.windows[retention], *window, source);
            if let Agg::Count(count) = &mut entry.agg {
                *count += 1;
                state
                    .pending
                    .dirty_windows
                    .insert((retention, window.start_ms));
            }
        }
    }
}

/// The window of a metric at `bounds`, created empty for the metric's kind if new.
fn window_entry<'s>(
    windows: &'s mut BTreeMap<EpochMillis, WindowState>,
    bounds: WindowBounds,
    source: &ValueSource,
) -> &'s mut WindowState {
    windows
        .entry(bounds.start_ms)
        .or_insert_with(|| WindowState {
            end_ms: bounds.end_ms,
            agg: Agg::empty(source),
            segments: HashMap::new(),
        })
}

/// What applying a contribution changed.
enum Added {
    Nothing,
    Value,
    /// The value changed through a new member, to store with it.
    Member(Box<[u8]>),
}

fn add(agg: &mut Agg, source: &ValueSource, contribution: Contribution<'_>) -> Added {
    match (agg, contribution) {
        (Agg::Count(count), Contribution::One) => {
            *count += 1;
            Added::Value
        }
        (Agg::Sum(sum), Contribution::Amount(amount)) => match sum.checked_add(amount) {
            Some(total) => {
                *sum = total;
                Added::Value
            }
            None => Added::Nothing,
        },
        (Agg::Threshold(threshold), Contribution::Progress { entity, actor }) => {
            let ValueSource::Threshold { at_least, .. } = source else {
                return Added::Nothing;
            };
            match threshold.add(*at_least, &entity, actor.as_deref()) {
                Some(member) => Added::Member(member),
                None => Added::Nothing,
            }
        }
        (Agg::Distinct(members), Contribution::Member(member)) => {
            if members.contains(member.as_ref()) {
                Added::Nothing
            } else {
                let member: Box<[u8]> = member.into_owned().into_boxed_slice();
                members.insert(member.clone());
                Added::Member(member)
            }
        }
        _ => Added::Nothing,
    }
}

pub(super) fn format_ms(time_ms: EpochMillis) -> String {
    match Timestamp::from_millisecond(time_ms) {
        Ok(timestamp) => timestamp.to_string(),
        Err(_) => format!("{time_ms}ms"),
    }
}
