//! Metric definitions: what a metric counts, over which events, in which window.

use std::fmt;

use crate::decimal::Decimal;
use crate::window::{CalendarUnit, Trailing};

/// The place of a metric in the North Star tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    NorthStar,
    Input,
    Guardrail,
    Revenue,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Self::NorthStar => "north_star",
            Self::Input => "input",
            Self::Guardrail => "guardrail",
            Self::Revenue => "revenue",
        }
    }
}

/// A dotted path to a field of the JSON event (`properties.amount`), or a part of the Kafka
/// record around it: `@key` (the message key) and `@header.NAME` (a header, its name taken
/// whole, dots included).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPath(Vec<String>);

/// What a field path names outside the JSON event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordField {
    Key,
    Header(String),
}

const KEY_FIELD: &str = "@key";
const HEADER_FIELD: &str = "@header";

impl FieldPath {
    /// Splits at dots; `None` for an empty path or an empty segment (`a..b`).
    pub fn parse(text: &str) -> Option<FieldPath> {
        if text == KEY_FIELD {
            return Some(FieldPath(vec![KEY_FIELD.into()]));
        }
        if let Some(name) = text.strip_prefix("@header.") {
            return (!name.is_empty()).then(|| FieldPath(vec![HEADER_FIELD.into(), name.into()]));
        }
        let segments: Vec<String> = text.split('.').map(str::to_string).collect();
        if segments.iter().any(|segment| segment.is_empty()) {
            return None;
        }
        Some(FieldPath(segments))
    }

    /// The part of the Kafka record this path names, when it names one.
    pub fn record_field(&self) -> Option<RecordField> {
        match self.0.as_slice() {
            [key] if key == KEY_FIELD => Some(RecordField::Key),
            [header, name] if header == HEADER_FIELD => Some(RecordField::Header(name.clone())),
            _ => None,
        }
    }

    pub fn segments(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// What a metric aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricKind {
    /// Number of matching events.
    Count,
    /// Exact sum of a numeric field of matching events.
    Sum { field: FieldPath },
    /// Exact number of distinct values of a field among matching events.
    Distinct { field: FieldPath },
    /// Entities (`entity`, e.g. a project id) with at least `at_least` matching events, or at
    /// least `at_least` distinct values of `actor` (e.g. user ids), in the window.
    Threshold {
        entity: FieldPath,
        actor: Option<FieldPath>,
        at_least: u32,
    },
    /// Entities (`entity`) that did an event matching `from`, then an event matching the
    /// metric's filter within `within_ms`; counted once per window of the second event.
    Conversion {
        entity: FieldPath,
        from: Filter,
        within_ms: i64,
    },
    /// Retention: entities of the distinct metric `of` in a window that were also in its
    /// previous window, as a rate of the previous window's entities (the count is exported as
    /// the rate's numerator).
    Retention { of: String },
    /// One metric divided by another of the same window (resolution rate = resolved /
    /// started). Keeps no state of its own: it is computed from its parts whenever it is read,
    /// and the parts are exported beside it so PromQL can re-aggregate across instances.
    Ratio {
        numerator: String,
        denominator: String,
    },
}

impl MetricKind {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Sum { .. } => "sum",
            Self::Distinct { .. } => "distinct",
            Self::Threshold { .. } => "threshold",
            Self::Retention { .. } => "retention",
            Self::Conversion { .. } => "conversion",
            Self::Ratio { .. } => "ratio",
        }
    }

    /// The entity a metric counts distinct, whose events must all be counted in one partition
    /// for the count to be exact: a distinct count's field, a threshold's or conversion's
    /// entity. A retention counts its base's entity (not known here).
    pub fn counted_entity(&self) -> Option<&FieldPath> {
        match self {
            Self::Distinct { field } => Some(field),
            Self::Threshold { entity, .. } | Self::Conversion { entity, .. } => Some(entity),
            Self::Count | Self::Sum { .. } | Self::Ratio { .. } | Self::Retention { .. } => None,
        }
    }

    /// The event field the metric reads, if any.
    pub fn field(&self) -> Option<&FieldPath> {
        match self {
            Self::Sum { field } | Self::Distinct { field } => Some(field),
            Self::Threshold { actor, .. } => actor.as_ref(),
            Self::Conversion { entity, .. } => Some(entity),
            Self::Count | Self::Ratio { .. } | Self::Retention { .. } => None,
        }
    }
}

/// A constant a filter compares a field with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    Text(String),
    Number(Decimal),
    Bool(bool),
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(text) => write!(f, "{text:?}"),
            Self::Number(number) => write!(f, "{number}"),
            Self::Bool(value) => write!(f, "{value}"),
        }
    }
}

/// Which field a filter clause looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterField {
    /// The configured event-name field (`where = { event = "..." }`).
    EventName,
    Path(FieldPath),
}

/// `field` equals one of `any_of`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    pub field: FilterField,
    pub any_of: Vec<Literal>,
}

/// A test other than equality on one field: `where = { "user.email" = { not = [...] } }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub field: FilterField,
    pub test: Test,
}

/// What a field must be. A missing field (or JSON null) fails every test but `NoneOf` and
/// `Missing`: an event without the field is not one of the excluded values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// Equal to one of these (what a [`Clause`] asks).
    AnyOf(Vec<Literal>),
    /// Equal to none of these (`not`, `not_any_of`).
    NoneOf(Vec<Literal>),
    /// A number compared with this one (`gt`, `gte`, `lt`, `lte`).
    Compare(Comparison, Decimal),
    /// Present and not null (`present = true`).
    Present,
    /// Absent or null (`present = false`).
    Missing,
    /// A string starting with this (`prefix`).
    Prefix(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Greater,
    AtLeast,
    Less,
    AtMost,
}

impl Comparison {
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Greater => ">",
            Self::AtLeast => ">=",
            Self::Less => "<",
            Self::AtMost => "<=",
        }
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |values: &[Literal]| {
            values
                .iter()
                .map(Literal::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Self::AnyOf(values) => write!(f, "in [{}]", list(values)),
            Self::NoneOf(values) => write!(f, "not in [{}]", list(values)),
            Self::Compare(comparison, number) => write!(f, "{} {number}", comparison.symbol()),
            Self::Present => write!(f, "present"),
            Self::Missing => write!(f, "missing"),
            Self::Prefix(prefix) => write!(f, "starts with {prefix:?}"),
        }
    }
}

impl fmt::Display for FilterField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EventName => write!(f, "event"),
            Self::Path(path) => write!(f, "{path}"),
        }
    }
}

/// All clauses and conditions must hold (an empty filter matches every event).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    /// Equality: the field is one of the values.
    pub clauses: Vec<Clause>,
    /// Every other test.
    pub conditions: Vec<Condition>,
}

impl Filter {
    /// Every test of the filter, equality first, as the engine runs them.
    pub fn tests(&self) -> impl Iterator<Item = (&FilterField, Test)> + '_ {
        let clauses = self
            .clauses
            .iter()
            .map(|clause| (&clause.field, Test::AnyOf(clause.any_of.clone())));
        let conditions = self
            .conditions
            .iter()
            .map(|condition| (&condition.field, condition.test.clone()));
        clauses.chain(conditions)
    }

    /// "event in [\"a\"] and amount >= 10", or "every event".
    pub fn describe(&self) -> String {
        let tests: Vec<String> = self
            .tests()
            .map(|(field, test)| format!("{field} {test}"))
            .collect();
        if tests.is_empty() {
            "every event".to_string()
        } else {
            tests.join(" and ")
        }
    }
}

/// A breakdown of a metric by the values of some event fields ("nights booked by plan and
/// region"). Every segment is kept exactly; the export shows the `top` largest of each window
/// and sums the rest into one overflow series, so Prometheus cardinality stays bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segmentation {
    pub by: Vec<FieldPath>,
    pub top: u32,
}

/// One metric as the engine computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricDef {
    pub name: String,
    pub role: Role,
    pub owner: Option<String>,
    pub description: String,
    pub kind: MetricKind,
    pub filter: Filter,
    /// The calendar window; for a trailing metric, the nominal period generated rules compare
    /// it over.
    pub window: CalendarUnit,
    /// A trailing window instead of the calendar one.
    pub trailing: Option<Trailing>,
    pub segments: Option<Segmentation>,
}

impl MetricDef {
    /// The window's label: `week`, or `trailing_7d`.
    pub fn window_label(&self) -> String {
        match &self.trailing {
            Some(trailing) => trailing.label(),
            None => self.window.label().to_string(),
        }
    }
}

impl MetricDef {
    /// A stable text of everything that decides the metric's stored values. When it changes
    /// between runs, stored windows of the metric no longer mean the same thing and are
    /// discarded rather than mixed with new ones.
    pub fn fingerprint(&self) -> String {
        let field = match &self.kind {
            MetricKind::Ratio {
                numerator,
                denominator,
            } => format!("{numerator}/{denominator}"),
            MetricKind::Retention { of } => format!("returning:{of}"),
            MetricKind::Conversion {
                entity,
                from,
                within_ms,
            } => format!("{entity};from={};within={within_ms}", filter_text(from)),
            MetricKind::Threshold {
                entity,
                actor,
                at_least,
            } => {
                let actor = actor.as_ref().map(FieldPath::to_string).unwrap_or_default();
                format!("{entity}>={at_least}:{actor}")
            }
            kind => kind.field().map(FieldPath::to_string).unwrap_or_default(),
        };
        // The breakdown fields decide what is stored; `top` only what is exported.
        let by = match &self.segments {
            None => String::new(),
            Some(segments) => {
                let fields: Vec<String> = segments.by.iter().map(FieldPath::to_string).collect();
                format!(";by={}", fields.join(","))
            }
        };
        format!(
            "v1;kind={};field={field};window={};where={}{by}",
            self.kind.label(),
            self.window_label(),
            filter_text(&self.filter)
        )
    }
}

/// A stable text of a filter, for fingerprints. Equality clauses keep the text they had
/// before other tests existed, so a config without them keeps its stored data.
fn filter_text(filter: &Filter) -> String {
    let field_text = |field: &FilterField| match field {
        FilterField::EventName => "@event".to_string(),
        FilterField::Path(path) => path.to_string(),
    };
    let list = |values: &[Literal]| {
        values
            .iter()
            .map(Literal::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let texts: Vec<String> = filter
        .tests()
        .map(|(field, test)| {
            let field = field_text(field);
            match test {
                Test::AnyOf(values) => format!("{field}in[{}]", list(&values)),
                Test::NoneOf(values) => format!("{field}notin[{}]", list(&values)),
                Test::Compare(comparison, number) => {
                    format!("{field}{}{number}", comparison.symbol())
                }
                Test::Present => format!("{field}present"),
                Test::Missing => format!("{field}missing"),
                Test::Prefix(prefix) => format!("{field}prefix{prefix:?}"),
            }
        })
        .collect();
    texts.join("&")
}
