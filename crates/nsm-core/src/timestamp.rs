//! An event's time as producers send it: epoch numbers in a configured unit (integer or
//! fractional), RFC 3339 text with an offset, or without one in a configured zone, or the
//! Kafka record's own timestamp.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::reject::{RejectReason, Rejection};
use crate::EpochMillis;

/// `events.timestamp_unit`: what an epoch number counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EpochUnit {
    Seconds,
    #[default]
    Millis,
    Micros,
    Nanos,
}

impl EpochUnit {
    pub const ALL: [EpochUnit; 4] = [Self::Seconds, Self::Millis, Self::Micros, Self::Nanos];

    pub fn parse(text: &str) -> Option<EpochUnit> {
        Self::ALL.into_iter().find(|unit| unit.name() == text)
    }

    /// The name in the config: `s`, `ms`, `us`, `ns`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Seconds => "s",
            Self::Millis => "ms",
            Self::Micros => "us",
            Self::Nanos => "ns",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Seconds => "epoch seconds",
            Self::Millis => "epoch milliseconds",
            Self::Micros => "epoch microseconds",
            Self::Nanos => "epoch nanoseconds",
        }
    }

    /// Decimal digits from this unit to milliseconds: 3 for seconds, -3 for microseconds.
    fn digits_to_millis(self) -> i32 {
        match self {
            Self::Seconds => 3,
            Self::Millis => 0,
            Self::Micros => -3,
            Self::Nanos => -6,
        }
    }
}

/// Where an event's time comes from (`events.timestamp`, `events.timestamp_fallback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampSource {
    /// The event field; an event without it is rejected.
    #[default]
    Field,
    /// The Kafka record's timestamp (`events.timestamp = "@kafka"`).
    Kafka,
    /// The event field, else the Kafka record's timestamp
    /// (`events.timestamp_fallback = "@kafka"`).
    FieldElseKafka,
}

/// How event times are read.
#[derive(Debug, Clone, Default)]
pub struct TimestampFormat {
    pub source: TimestampSource,
    pub unit: EpochUnit,
    /// The zone of RFC 3339 times written without an offset; `None` rejects them.
    pub zone: Option<TimeZone>,
}

/// How far from `now` a time read in the configured unit must be for another unit to be
/// suspected (a year), and how close the other unit must bring it (ten years back, a day on).
const SUSPECT_BEYOND_MS: i64 = 366 * 86_400_000;
const PLAUSIBLE_BACK_MS: i64 = 10 * 366 * 86_400_000;
const PLAUSIBLE_AHEAD_MS: i64 = 86_400_000;

/// An epoch number in `unit`, its JSON text as sent: `1733480000`, `1733480000.25`. The
/// fraction below a millisecond is dropped (times are kept in milliseconds). A number whose
/// magnitude fits another unit much better than the configured one (a client sending
/// seconds to a config that says milliseconds) is rejected as such, not taken as 1970.
pub fn epoch_millis(
    text: &str,
    unit: EpochUnit,
    now_ms: EpochMillis,
    field: &str,
) -> Result<EpochMillis, Rejection> {
    let invalid = |detail: String| Rejection::new(RejectReason::InvalidTimestamp, detail);
    let Some(millis) = scaled(text, unit.digits_to_millis()) else {
        return Err(invalid(format!(
            "timestamp {text} at {field} is not {} (events.timestamp_unit = {:?}): \
             expected digits with an optional fraction",
            unit.describe(),
            unit.name()
        )));
    };
    if millis.abs_diff(now_ms) > SUSPECT_BEYOND_MS.unsigned_abs() {
        let plausible = EpochUnit::ALL
            .into_iter()
            .filter(|other| *other != unit)
            .find(|other| {
                scaled(text, other.digits_to_millis()).is_some_and(|other_ms| {
                    other_ms >= now_ms.saturating_sub(PLAUSIBLE_BACK_MS)
                        && other_ms <= now_ms.saturating_add(PLAUSIBLE_AHEAD_MS)
                })
            });
        if let Some(other) = plausible {
            return Err(invalid(format!(
                "timestamp {text} at {field} looks like {}, but events.timestamp_unit is {:?} \
                 (read so, it is {}); set events.timestamp_unit = {:?}",
                other.describe(),
                unit.name(),
                describe_millis(millis),
                other.name()
            )));
        }
    }
    Ok(millis)
}

/// RFC 3339 text. With an offset it is exact; without one (`2026-12-06T10:00:00`, also with a
/// space for the `T`) it is read in `zone` when there is one.
pub fn text_millis(
    text: &str,
    zone: Option<&TimeZone>,
    field: &str,
) -> Result<EpochMillis, Rejection> {
    if let Ok(timestamp) = text.parse::<Timestamp>() {
        return Ok(timestamp.as_millisecond());
    }
    let pieces = jiff::fmt::temporal::Pieces::parse(text.as_bytes());
    // Well-formed but beyond what a timestamp can hold (the last hours of year 9999, with
    // their offset): as far out of range as any other absurd time.
    if pieces
        .as_ref()
        .is_ok_and(|pieces| pieces.offset().is_some())
    {
        return Err(Rejection::new(
            RejectReason::TimestampOutOfRange,
            format!("timestamp {text:?} at {field} is beyond the representable range"),
        ));
    }
    let local = text.parse::<DateTime>().ok();
    match (local, zone) {
        (Some(local), Some(zone)) => zone
            .to_ambiguous_timestamp(local)
            .compatible()
            .map(Timestamp::as_millisecond)
            .map_err(|_| {
                Rejection::new(
                    RejectReason::TimestampOutOfRange,
                    format!("timestamp {text:?} at {field} is beyond the representable range"),
                )
            }),
        (Some(_), None) => Err(Rejection::new(
            RejectReason::InvalidTimestamp,
            format!(
                "timestamp {text:?} at {field} has no offset; add one (\"Z\", \"+01:00\") or set \
                 events.timestamp_zone to the zone producers write local times in"
            ),
        )),
        (None, _) => Err(Rejection::new(
            RejectReason::InvalidTimestamp,
            format!("timestamp {text:?} at {field} is not RFC 3339 with an offset"),
        )),
    }
}

/// `text` (optional `-`, digits, optional `.` and digits) times ten to the `digits`, in whole
/// units rounded toward minus infinity; `None` when malformed or out of range.
fn scaled(text: &str, digits: i32) -> Option<i64> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((_, "")) => return None,
        Some((whole, fraction)) => (whole, fraction),
        None => (unsigned, ""),
    };
    let all_digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    // At most 30 digits: the value and the power of ten below stay within an i128.
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let written = format!("{whole}{fraction}");
    let written = written.trim_start_matches('0');
    if written.len() > 30 {
        return None;
    }
    let mut value: i128 = if written.is_empty() {
        0
    } else {
        written.parse().ok()?
    };
    if negative {
        value = -value;
    }
    let exponent = digits - i32::try_from(fraction.len()).ok()?;
    let power = 10_i128.checked_pow(exponent.unsigned_abs())?;
    let result = if exponent >= 0 {
        value.checked_mul(power)?
    } else {
        value.div_euclid(power)
    };
    i64::try_from(result).ok()
}

fn describe_millis(millis: EpochMillis) -> String {
    Timestamp::from_millisecond(millis)
        .map(|timestamp| timestamp.to_string())
        .unwrap_or_else(|_| "out of range".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_765_015_200_000; // 2025-12-06T10:00:00Z

    #[test]
    fn epoch_numbers_in_every_unit_integer_or_fractional() {
        let read = |text: &str, unit| epoch_millis(text, unit, NOW_MS, "ts");
        assert_eq!(read("1765015200", EpochUnit::Seconds), Ok(NOW_MS));
        assert_eq!(read("1765015200.25", EpochUnit::Seconds), Ok(NOW_MS + 250));
        assert_eq!(
            read("1765015200.2509", EpochUnit::Seconds),
            Ok(NOW_MS + 250)
        );
        assert_eq!(read("1765015200000", EpochUnit::Millis), Ok(NOW_MS));
        assert_eq!(read("1765015200000.9", EpochUnit::Millis), Ok(NOW_MS));
        assert_eq!(read("1765015200000123", EpochUnit::Micros), Ok(NOW_MS));
        assert_eq!(read("1765015200000123456", EpochUnit::Nanos), Ok(NOW_MS));
        assert_eq!(read("-1.5", EpochUnit::Seconds), Ok(-1500));
    }

    #[test]
    fn a_number_in_another_unit_is_rejected_saying_which() {
        let rejection = epoch_millis("1765015200", EpochUnit::Millis, NOW_MS, "ts")
            .expect_err("seconds read as milliseconds");
        assert_eq!(rejection.reason, RejectReason::InvalidTimestamp);
        assert!(
            rejection.detail.contains("looks like epoch seconds")
                && rejection.detail.contains("events.timestamp_unit = \"s\""),
            "{}",
            rejection.detail
        );
        let rejection = epoch_millis("1765015200000", EpochUnit::Seconds, NOW_MS, "ts")
            .expect_err("milliseconds read as seconds");
        assert!(rejection.detail.contains("looks like epoch milliseconds"));
        // Far off in every unit: left to the range check, which says it is out of range.
        assert!(epoch_millis("42", EpochUnit::Millis, NOW_MS, "ts").is_ok());
        assert!(epoch_millis("1e9", EpochUnit::Seconds, NOW_MS, "ts").is_err());
        assert!(epoch_millis("12.", EpochUnit::Seconds, NOW_MS, "ts").is_err());
    }

    #[test]
    fn rfc3339_with_an_offset_or_in_the_configured_zone() {
        assert_eq!(text_millis("2025-12-06T10:00:00Z", None, "ts"), Ok(NOW_MS));
        assert_eq!(
            text_millis("2025-12-06T11:00:00+01:00", None, "ts"),
            Ok(NOW_MS)
        );
        let paris = TimeZone::get("Europe/Paris").expect("zone");
        assert_eq!(
            text_millis("2025-12-06T11:00:00", Some(&paris), "ts"),
            Ok(NOW_MS)
        );
        assert_eq!(
            text_millis("2025-12-06 11:00:00.5", Some(&paris), "ts"),
            Ok(NOW_MS + 500)
        );
        let rejection =
            text_millis("2025-12-06T11:00:00", None, "ts").expect_err("no offset, no zone");
        assert!(rejection.detail.contains("events.timestamp_zone"));
        assert!(text_millis("yesterday", Some(&paris), "ts").is_err());
    }
}
