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

/// A dotted path to a field of the JSON event (`properties.amount`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// Splits at dots; `None` for an empty path or an empty segment (`a..b`).
    pub fn parse(text: &str) -> Option<FieldPath> {
        let segments: Vec<String> = text.split('.').map(str::to_string).collect();
        if segments.iter().any(|segment| segment.is_empty()) {
            return None;
        }
        Some(FieldPath(segments))
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

/// All clauses must hold (an empty filter matches every event).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    pub clauses: Vec<Clause>,
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

/// A stable text of a filter, for fingerprints.
fn filter_text(filter: &Filter) -> String {
    let clauses: Vec<String> = filter
        .clauses
        .iter()
        .map(|clause| {
            let field = match &clause.field {
                FilterField::EventName => "@event".to_string(),
                FilterField::Path(path) => path.to_string(),
            };
            let values: Vec<String> = clause.any_of.iter().map(Literal::to_string).collect();
            format!("{field}in[{}]", values.join(","))
        })
        .collect();
    clauses.join("&")
}
