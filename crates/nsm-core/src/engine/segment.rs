//! Segment breakdowns: keys, labels, the stored form of segment members, and the top-N
//! selection with an overflow series.
//!
//! Every segment's value is kept exactly in state (up to [`MAX_SEGMENTS_PER_WINDOW`] per
//! window and partition; later ones are kept together as the overflow segment). Only the
//! export is capped: the `top` largest segments of a window, and the rest summed.

use std::collections::HashMap;

use super::pair;
use super::plan::{Plan, ValueSource};
use super::state::AggValue;
use crate::window::WindowBounds;

/// Distinct segments kept per window and partition before new ones go to the overflow.
pub const MAX_SEGMENTS_PER_WINDOW: usize = 10_000;

/// The segment key of events that could not get their own segment.
pub const OVERFLOW_KEY: &[u8] = b"\xff";

/// The label of the overflow series.
pub const OVERFLOW_LABEL: &str = "__other__";

/// Prefix of a stored member of a segment's distinct set (a plain member starts with an ASCII
/// type tag, so the two never collide).
const SEGMENT_MEMBER_TAG: u8 = 0xff;

/// A segment's key from the member keys of its fields (`None` where the event lacks one):
/// `<u16 BE length> <bytes>` per field.
pub fn segment_key<'a>(values: impl Iterator<Item = Option<&'a [u8]>>) -> Box<[u8]> {
    let mut key = Vec::new();
    for value in values {
        let value = value.unwrap_or_default();
        let length = u16::try_from(value.len()).unwrap_or(u16::MAX);
        key.extend_from_slice(&length.to_be_bytes());
        key.extend_from_slice(&value[..usize::from(length)]);
    }
    key.into_boxed_slice()
}

/// The exported label: each field's value as text, joined by `/` (`pro/DE`); a missing field
/// reads `(none)`.
pub fn segment_label(key: &[u8]) -> String {
    if key == OVERFLOW_KEY {
        return OVERFLOW_LABEL.to_string();
    }
    let mut parts = Vec::new();
    let mut rest = key;
    while rest.len() >= 2 {
        let length = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let value = rest.get(2..2 + length).unwrap_or_default();
        rest = rest.get(2 + length..).unwrap_or_default();
        // Skip the member key's type tag; the text after it is the value.
        parts.push(match value.split_first() {
            Some((b'?', _)) | None => "(none)".to_string(),
            Some((_, text)) => String::from_utf8_lossy(text).into_owned(),
        });
    }
    parts.join("/")
}

/// The stored member of a segment's distinct set.
pub fn segment_member(segment: &[u8], member: &[u8]) -> Box<[u8]> {
    pair::join(&[SEGMENT_MEMBER_TAG], segment, member)
}

/// The segment and member of a stored segment member; `None` for a plain member.
#[cfg(test)]
pub fn split_segment_member(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    pair::split(bytes.strip_prefix(&[SEGMENT_MEMBER_TAG])?)
}

/// One exported segment of a window.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentValue {
    pub label: String,
    pub value: AggValue,
}

/// The `top` largest segments (ties by label, so the choice is stable), then one overflow
/// series summing the rest when there is a rest.
pub fn top_segments(summed: HashMap<Box<[u8]>, AggValue>, top: usize) -> Vec<SegmentValue> {
    let mut segments: Vec<SegmentValue> = summed
        .into_iter()
        .map(|(key, value)| SegmentValue {
            label: segment_label(&key),
            value,
        })
        .collect();
    // An undefined ratio (n/0) ranks below every number.
    let rank = |value: &AggValue| {
        let value = value.to_f64();
        if value.is_nan() {
            f64::NEG_INFINITY
        } else {
            value
        }
    };
    segments.sort_by(|a, b| {
        rank(&b.value)
            .total_cmp(&rank(&a.value))
            .then_with(|| a.label.cmp(&b.label))
    });
    let mut overflow: Option<AggValue> = None;
    let mut kept = Vec::with_capacity(top.min(segments.len()) + 1);
    for segment in segments {
        if kept.len() < top && segment.label != OVERFLOW_LABEL {
            kept.push(segment);
        } else {
            overflow = Some(overflow.map_or(segment.value, |sum| sum.plus(segment.value)));
        }
    }
    if let Some(value) = overflow {
        kept.push(SegmentValue {
            label: OVERFLOW_LABEL.to_string(),
            value,
        });
    }
    kept
}

/// The segments of one metric's window (`bounds`) to export: the `top` of its breakdown.
/// `summed(metric, bounds)` gives a metric's segments of the window (or trailing range) at
/// `bounds`, summed over partitions. A ratio divides its parts' segments, a retention its
/// returning entities by its base's segment entities of the window before.
pub fn metric_segments(
    plan: &Plan,
    metric: usize,
    bounds: WindowBounds,
    summed: impl Fn(usize, WindowBounds) -> HashMap<Box<[u8]>, AggValue>,
) -> Vec<SegmentValue> {
    let Some(segmentation) = &plan.metrics()[metric].segments else {
        return Vec::new();
    };
    let compiled = &plan.compiled[metric];
    let values = match compiled.value {
        ValueSource::Ratio {
            numerator,
            denominator,
        } => divided(
            summed(numerator, bounds),
            summed(denominator, bounds),
            (
                AggValue::zero_of(plan, numerator),
                AggValue::zero_of(plan, denominator),
            ),
        ),
        ValueSource::Retention { of } => {
            let previous = match &compiled.trailing {
                Some(trailing) => Some(trailing.previous(bounds)),
                None => plan.calendar().previous(compiled.window, bounds),
            };
            let before = previous
                .map(|previous| summed(of, previous))
                .unwrap_or_default();
            divided(
                summed(metric, bounds),
                before,
                (AggValue::Count(0), AggValue::Distinct(0)),
            )
        }
        _ => summed(metric, bounds),
    };
    top_segments(values, segmentation.top as usize)
}

/// Per segment of either side, the ratio of the two (a side without it reads `zeros`).
fn divided(
    numerators: HashMap<Box<[u8]>, AggValue>,
    mut denominators: HashMap<Box<[u8]>, AggValue>,
    zeros: (AggValue, AggValue),
) -> HashMap<Box<[u8]>, AggValue> {
    let mut ratios = HashMap::with_capacity(numerators.len().max(denominators.len()));
    for (segment, numerator) in numerators {
        let denominator = denominators.remove(&segment).unwrap_or(zeros.1);
        ratios.insert(segment, AggValue::ratio(numerator, denominator));
    }
    for (segment, denominator) in denominators {
        ratios.insert(segment, AggValue::ratio(zeros.0, denominator));
    }
    ratios
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_label_values_and_the_overflow_sums_the_rest() {
        let key = segment_key([Some(&b"spro"[..]), None, Some(&b"n3"[..])].into_iter());
        assert_eq!(segment_label(&key), "pro/(none)/3");
        let member = segment_member(&key, b"sana");
        assert_eq!(
            split_segment_member(&member),
            Some((&key[..], &b"sana"[..]))
        );
        assert_eq!(split_segment_member(b"sana"), None);

        let summed: HashMap<Box<[u8]>, AggValue> = [("a", 5), ("b", 9), ("c", 1), ("d", 5)]
            .into_iter()
            .map(|(name, count)| {
                let value = format!("s{name}");
                (
                    segment_key([Some(value.as_bytes())].into_iter()),
                    AggValue::Count(count),
                )
            })
            .chain([(OVERFLOW_KEY.into(), AggValue::Count(2))])
            .collect();
        let top = top_segments(summed, 2);
        let labels: Vec<(&str, AggValue)> =
            top.iter().map(|s| (s.label.as_str(), s.value)).collect();
        assert_eq!(
            labels,
            vec![
                ("b", AggValue::Count(9)),
                ("a", AggValue::Count(5)),
                (OVERFLOW_LABEL, AggValue::Count(8))
            ]
        );
    }
}
