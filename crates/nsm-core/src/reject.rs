//! Why an event was not applied. The set is closed so that the `reason` label of the
//! invalid-event counters and the dead-letter header stay bounded.

use std::fmt;

/// The bounded reason an event was rejected, used as a metric label and a dead-letter header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Larger than `events.max_bytes`.
    Oversize,
    /// Not UTF-8, not JSON, or nested deeper than the parser allows.
    InvalidJson,
    /// Valid JSON, but not an object.
    NotAnObject,
    /// The event-name field is absent or null.
    MissingEventName,
    /// The timestamp field is absent or null.
    MissingTimestamp,
    /// The timestamp is neither RFC 3339 nor integer epoch milliseconds.
    InvalidTimestamp,
    /// The timestamp is further in the future than `time.max_future_skew`, or older than the
    /// retention: no window nsm keeps could hold it.
    TimestampOutOfRange,
    /// A field a matching metric needs (a summed amount, a distinct key) is absent or null.
    MissingField,
    /// A field has the wrong JSON type (a string where a sum needs a number, an object where
    /// a distinct key needs a scalar) or a number beyond the exact range.
    WrongType,
    /// Older than the partition's watermark by more than `time.allowed_lateness`.
    Late,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        Self::Oversize,
        Self::InvalidJson,
        Self::NotAnObject,
        Self::MissingEventName,
        Self::MissingTimestamp,
        Self::InvalidTimestamp,
        Self::TimestampOutOfRange,
        Self::MissingField,
        Self::WrongType,
        Self::Late,
    ];

    /// The label value: stable, documented, snake_case.
    pub fn label(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::InvalidJson => "invalid_json",
            Self::NotAnObject => "not_an_object",
            Self::MissingEventName => "missing_event_name",
            Self::MissingTimestamp => "missing_timestamp",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::TimestampOutOfRange => "timestamp_out_of_range",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::Late => "late",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A rejected event: the bounded reason plus a human detail for the dead-letter header and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}
