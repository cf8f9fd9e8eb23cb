//! Segment breakdowns: keys, labels, the stored form of segment members, and the top-N
//! selection with an overflow series.
//!
//! Every segment's value is kept exactly in state (up to [`MAX_SEGMENTS_PER_WINDOW`] per
//! window and partition; later ones are kept together as the overflow segment). Only the
//! export is capped: the `top` largest segments of a window, and the rest summed.
//!
//! **Keys.** A segment key (stored in RocksDB and the changelog) holds, per `by` field,
//! `<u16 BE length> <value>`, where the value is the field's member key: `s` and the text,
//! `n` and the canonical number, `b` and `true` or `false`, `?` for an object or an array,
//! nothing when the field is missing or null. So the string `"3"` and the number `3`, a
//! missing field and the string `"(none)"`, and fields holding `/` are all different keys. A
//! member key longer than [`MAX_SEGMENT_VALUE_BYTES`] is kept in its capped form
//! `~ <tag> <text cut at a character boundary> <XXH3-128 of the whole member key>`, at most
//! that long, so a segment key holds at most 130 bytes a field whatever the events carry (a
//! value could take 64 KiB before), in memory, in each stored segment and in each entry of
//! an entity tagged with the segment. No member key starts with `~`, so keys stored before
//! the cap (whole values, up to 64 KiB) keep their meaning. XXH3 is a frozen, specified algorithm:
//! a stored digest means the same in every build.
//!
//! **Labels.** [`segment_label`] renders a key as the `segment` label of `/metrics` and the
//! API, distinct keys of one metric as distinct labels. Fields are joined by `/`; a missing
//! field reads `(none)`, an object or array `(composite)`, a number or a bool its JSON text,
//! and a string itself unless it could read as something else: then it is shown as a JSON
//! string, in double quotes with JSON escapes (`"3"`, `"(none)"`, `""`). A string reads as
//! something else when it is empty, a JSON number, `true`, `false` or `null`, `(none)`,
//! `(composite)` or `__other__`, starts with `"`, holds a control character, ends like a
//! digest suffix (`~` and 16 hexadecimal digits) or, in a breakdown by several fields, holds
//! a `/`. A label longer than [`MAX_LABEL_BYTES`], or one of a capped value, is cut at a
//! character boundary and ends with `~` and the 16 hexadecimal digits of the XXH3-64 of the
//! whole key; no label of a whole value ends that way, so the two never meet. The digests
//! keep values apart by chance, not against a producer forging collisions on purpose (who
//! could as well send one value twice).
//!
//! **Every kind.** A segment is its metric over the events carrying the segment's values: its
//! per-entity entries are the metric's, the entity tagged by the segment ([`segment_member`]),
//! so distinct members, threshold progress, funnels and retentions are exact per segment. A
//! ratio's or a retention's segments are computed when read from the segments of the metrics
//! they read ([`metric_segments`]), which validation requires to share its `by`. A trailing
//! metric keeps segments per bucket, its distinct ones through per-segment gap histograms.

use std::collections::HashMap;
use std::fmt::Write as _;

use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use super::pair;
use super::plan::{Plan, ValueSource};
use super::state::AggValue;
use crate::window::WindowBounds;

/// Distinct segments kept per window and partition before new ones go to the overflow.
pub const MAX_SEGMENTS_PER_WINDOW: usize = 10_000;

/// Longest value of one field kept in a segment key, with its type tag; a longer one is kept
/// in its capped form (see the module doc). Enough for every label: a label shows at most
/// [`MAX_LABEL_BYTES`] less its digest suffix.
pub const MAX_SEGMENT_VALUE_BYTES: usize = 128;

/// Longest `segment` label exported, in bytes. Segments are categories (a plan, a country, a
/// page) read in legends and tables; 128 bytes shows any of them and keeps every series far
/// below the label limits of Prometheus-compatible stores (Cortex and Mimir refuse values
/// over 2,048 bytes by default, Prometheus' `label_value_length_limit` is often set lower).
pub const MAX_LABEL_BYTES: usize = 128;

/// The segment key of events that could not get their own segment.
pub const OVERFLOW_KEY: &[u8] = b"\xff";

/// The label of the overflow series.
pub const OVERFLOW_LABEL: &str = "__other__";

/// The label of a missing (or null) field.
const MISSING_LABEL: &str = "(none)";

/// The label of a field holding an object or an array.
const COMPOSITE_LABEL: &str = "(composite)";

/// The first byte of a capped value (no member key's type tag).
const CAPPED_TAG: u8 = b'~';

/// The digest ending a capped value: XXH3-128 of the whole member key.
const VALUE_DIGEST_BYTES: usize = 16;

/// Hexadecimal digits of the digest ending a capped label, after its `~`.
const LABEL_DIGEST_DIGITS: usize = 16;

/// Prefix of a stored member of a segment's distinct set (a plain member starts with an ASCII
/// type tag, so the two never collide).
const SEGMENT_MEMBER_TAG: u8 = 0xff;

/// A segment's key from the member keys of its fields (`None` where the event lacks one):
/// `<u16 BE length> <value>` per field, a value longer than [`MAX_SEGMENT_VALUE_BYTES`] in its
/// capped form.
pub fn segment_key<'a>(values: impl Iterator<Item = Option<&'a [u8]>>) -> Box<[u8]> {
    let mut key = Vec::new();
    for value in values {
        let value = value.unwrap_or_default();
        let capped;
        let value = if value.len() > MAX_SEGMENT_VALUE_BYTES {
            capped = capped_value(value);
            &capped[..]
        } else {
            value
        };
        debug_assert!(value.len() <= MAX_SEGMENT_VALUE_BYTES);
        let length = u16::try_from(value.len()).unwrap_or(u16::MAX);
        key.extend_from_slice(&length.to_be_bytes());
        key.extend_from_slice(&value[..usize::from(length)]);
    }
    key.into_boxed_slice()
}

/// `~ <tag> <text cut at a character boundary> <XXH3-128 of the member key>`, exactly as long
/// as [`MAX_SEGMENT_VALUE_BYTES`] allows (less the bytes of a character cut off).
fn capped_value(member: &[u8]) -> Vec<u8> {
    let (tag, text) = member.split_first().unwrap_or((&b'?', &[]));
    let room = MAX_SEGMENT_VALUE_BYTES - 2 - VALUE_DIGEST_BYTES;
    let text = &text[..char_floor(text, room)];
    let mut capped = Vec::with_capacity(MAX_SEGMENT_VALUE_BYTES);
    capped.extend_from_slice(&[CAPPED_TAG, *tag]);
    capped.extend_from_slice(text);
    capped.extend_from_slice(&xxh3_128(member).to_be_bytes());
    capped
}

/// The largest length up to `limit` that does not cut a UTF-8 character of `bytes` in two.
fn char_floor(bytes: &[u8], limit: usize) -> usize {
    let mut end = limit.min(bytes.len());
    // A continuation byte (0b10xx_xxxx) is never the first of a character.
    while end > 0 && end < bytes.len() && bytes[end] & 0xc0 == 0x80 {
        end -= 1;
    }
    end
}

/// The exported label of a segment key: see the module doc. Distinct keys of one metric (all
/// with the same number of fields) give distinct labels, of at most [`MAX_LABEL_BYTES`].
pub fn segment_label(key: &[u8]) -> String {
    if key == OVERFLOW_KEY {
        return OVERFLOW_LABEL.to_string();
    }
    let mut fields = Vec::new();
    let mut rest = key;
    // A key segment_key could not have made (cut short, or a byte left over) is shown with
    // its digest, as is any value whose rendering does not tell it apart on its own.
    let mut needs_digest = false;
    while !rest.is_empty() {
        let Some(&[high, low]) = rest.get(..2) else {
            needs_digest = true;
            break;
        };
        let length = usize::from(u16::from_be_bytes([high, low]));
        let Some(value) = rest.get(2..2 + length) else {
            fields.push(&rest[2..]);
            needs_digest = true;
            break;
        };
        fields.push(value);
        rest = &rest[2 + length..];
    }
    let several = fields.len() > 1;
    let mut label = String::new();
    for (index, value) in fields.into_iter().enumerate() {
        if index > 0 {
            label.push('/');
        }
        needs_digest |= !render_value(value, several, &mut label);
    }
    if needs_digest || label.len() > MAX_LABEL_BYTES {
        with_digest(label, key)
    } else {
        label
    }
}

/// Appends the rendering of one field's stored value; false when it does not identify the
/// value on its own (a capped value, or bytes segment_key never stores).
fn render_value(value: &[u8], several: bool, label: &mut String) -> bool {
    match value.split_first() {
        None => {
            label.push_str(MISSING_LABEL);
            true
        }
        Some((&CAPPED_TAG, capped)) => {
            let (tag, text) = capped.split_first().unwrap_or((&b'?', &[]));
            let text = &text[..text.len().saturating_sub(VALUE_DIGEST_BYTES)];
            render_scalar(*tag, text, several, label);
            false
        }
        Some((tag, text)) => render_scalar(*tag, text, several, label),
    }
}

/// Appends a member key's rendering (its type tag and text); false when segment_key never
/// stores that tag and text.
fn render_scalar(tag: u8, text: &[u8], several: bool, label: &mut String) -> bool {
    let Ok(text) = std::str::from_utf8(text) else {
        label.push_str(&String::from_utf8_lossy(text));
        return false;
    };
    match tag {
        b's' if shows_as_is(text, several) => label.push_str(text),
        b's' => label.push_str(&serde_json::Value::String(text.to_string()).to_string()),
        b'n' => {
            label.push_str(text);
            return is_json_number(text);
        }
        b'b' => {
            label.push_str(text);
            return matches!(text, "true" | "false");
        }
        b'?' => {
            label.push_str(COMPOSITE_LABEL);
            return text.is_empty();
        }
        _ => {
            label.push_str(text);
            return false;
        }
    }
    true
}

/// Whether a string value is shown as it is: it cannot read as another value's rendering, as
/// a field separator, or as a digest suffix.
fn shows_as_is(text: &str, several: bool) -> bool {
    !(text.is_empty()
        || text.starts_with('"')
        || (several && text.contains('/'))
        || text.chars().any(char::is_control)
        || matches!(
            text,
            "true" | "false" | "null" | MISSING_LABEL | COMPOSITE_LABEL | OVERFLOW_LABEL
        )
        || is_json_number(text)
        || ends_like_digest(text))
}

/// Whether `text` is a number in JSON's grammar (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`),
/// which every number's rendering is.
fn is_json_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut at = usize::from(bytes.first() == Some(&b'-'));
    let digits = |at: &mut usize| {
        let start = *at;
        while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        *at - start
    };
    let whole_start = at;
    match digits(&mut at) {
        0 => return false,
        1 => {}
        _ if bytes[whole_start] == b'0' => return false,
        _ => {}
    }
    if bytes.get(at) == Some(&b'.') {
        at += 1;
        if digits(&mut at) == 0 {
            return false;
        }
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        if digits(&mut at) == 0 {
            return false;
        }
    }
    at == bytes.len()
}

/// Whether `text` ends with `~` and [`LABEL_DIGEST_DIGITS`] lowercase hexadecimal digits, as
/// a capped label does.
fn ends_like_digest(text: &str) -> bool {
    let bytes = text.as_bytes();
    let Some(start) = bytes.len().checked_sub(LABEL_DIGEST_DIGITS + 1) else {
        return false;
    };
    bytes[start] == b'~'
        && bytes[start + 1..]
            .iter()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

/// The label cut at a character boundary to leave room for `~` and the key's digest, then
/// those.
fn with_digest(mut label: String, key: &[u8]) -> String {
    let mut end = label.len().min(MAX_LABEL_BYTES - 1 - LABEL_DIGEST_DIGITS);
    while !label.is_char_boundary(end) {
        end -= 1;
    }
    label.truncate(end);
    let _ = write!(label, "~{:016x}", xxh3_64(key));
    label
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

    fn key_of(values: &[Option<&[u8]>]) -> Box<[u8]> {
        segment_key(values.iter().copied())
    }

    fn label_of(values: &[Option<&[u8]>]) -> String {
        segment_label(&key_of(values))
    }

    /// A string member key: the `s` tag, then the text.
    fn text(value: &str) -> Vec<u8> {
        [b"s", value.as_bytes()].concat()
    }

    #[test]
    fn values_that_look_alike_have_labels_of_their_own() {
        let cases: [(&[u8], &str); 14] = [
            (b"s3", "\"3\""),
            (b"n3", "3"),
            (b"n-1.5", "-1.5"),
            (b"s1e5", "\"1e5\""),
            (b"strue", "\"true\""),
            (b"btrue", "true"),
            (b"snull", "\"null\""),
            (b"s(none)", "\"(none)\""),
            (b"?", "(composite)"),
            (b"s(composite)", "\"(composite)\""),
            (b"s__other__", "\"__other__\""),
            (b"s", "\"\""),
            (b"s\"pro\"", r#""\"pro\"""#),
            (b"sline\nbreak", r#""line\nbreak""#),
        ];
        for (member, label) in cases {
            assert_eq!(label_of(&[Some(member)]), label, "{member:?}");
        }
        assert_eq!(label_of(&[None]), "(none)");
        assert_eq!(
            label_of(&[Some(&text("x~0123456789abcdef"))]),
            "\"x~0123456789abcdef\"",
            "a string ending like a digest suffix is quoted"
        );
        // Strings that cannot read as anything else are shown as they are, `/` too when it
        // cannot be taken for the separator of several fields.
        for plain in [
            "pro",
            "DE",
            "/pricing",
            "3-pack",
            "+3",
            "1.",
            "say \"hi\"",
            "grün",
        ] {
            assert_eq!(label_of(&[Some(&text(plain))]), plain);
        }
        // In a breakdown by several fields a `/` inside a value is quoted away.
        let (slash_first, slash_second) = (
            label_of(&[Some(&text("a/b")), Some(&text("c"))]),
            label_of(&[Some(&text("a")), Some(&text("b/c"))]),
        );
        assert_eq!(slash_first, r#""a/b"/c"#);
        assert_eq!(slash_second, r#"a/"b/c""#);
        assert_eq!(
            label_of(&[Some(b"spro"), None, Some(b"n3")]),
            "pro/(none)/3"
        );
        assert_eq!(segment_label(OVERFLOW_KEY), OVERFLOW_LABEL);
    }

    /// Every key of one or two fields made of awkward values: no two share a label.
    #[test]
    fn distinct_keys_give_distinct_labels() {
        let long_a = text(&"x".repeat(300));
        let long_b = text(&format!("{}y", "x".repeat(299)));
        let values: Vec<Option<Vec<u8>>> = [
            "",
            "3",
            "3.5",
            "true",
            "null",
            "(none)",
            "(composite)",
            "__other__",
            "a",
            "b",
            "a/b",
            "/",
            "b/",
            "\"",
            "\"a",
            "a\"",
            "\"a/b\"",
            "\"a\"/\"b\"",
            "~0123456789abcdef",
            "a/~0123456789abcdef",
            "\\",
            "\n",
            "é",
        ]
        .iter()
        .map(|value| Some(text(value)))
        .chain(
            [&b"n3"[..], b"n3.5", b"n-0.5", b"btrue", b"bfalse", b"?"]
                .map(|member| Some(member.to_vec())),
        )
        .chain([None, Some(long_a), Some(long_b)])
        .collect();
        fn check(seen: &mut HashMap<String, Box<[u8]>>, key: Box<[u8]>) {
            let label = segment_label(&key);
            assert!(label.len() <= MAX_LABEL_BYTES, "{label}");
            if let Some(other) = seen.insert(label.clone(), key.clone()) {
                assert_eq!(other, key, "two keys labelled {label}");
            }
        }
        let mut seen = HashMap::new();
        for first in &values {
            check(&mut seen, key_of(&[first.as_deref()]));
        }
        assert_eq!(seen.len(), values.len());
        seen.clear();
        for first in &values {
            for second in &values {
                check(&mut seen, key_of(&[first.as_deref(), second.as_deref()]));
            }
        }
        assert_eq!(seen.len(), values.len() * values.len());
    }

    #[test]
    fn long_values_are_kept_capped_and_labelled_with_a_digest() {
        // A 64 KiB value is kept in at most MAX_SEGMENT_VALUE_BYTES and its label ends with
        // the key's digest.
        let huge = text(&"v".repeat(64 * 1024));
        let key = key_of(&[Some(&huge)]);
        assert!(key.len() <= 2 + MAX_SEGMENT_VALUE_BYTES, "{}", key.len());
        let label = segment_label(&key);
        assert!(label.len() <= MAX_LABEL_BYTES, "{}", label.len());
        assert!(label.starts_with("vvvv"), "{label}");
        assert!(ends_like_digest(&label), "{label}");

        // Two long values with the same first 200 bytes: two keys, two labels.
        let prefix = "p".repeat(200);
        let (one, two) = (text(&format!("{prefix}1")), text(&format!("{prefix}2")));
        let (one, two) = (key_of(&[Some(&one)]), key_of(&[Some(&two)]));
        assert_ne!(one, two);
        assert_ne!(segment_label(&one), segment_label(&two));
        assert_eq!(
            segment_label(&one)[..100],
            segment_label(&two)[..100],
            "both show the prefix"
        );

        // Capping cuts at a character boundary: 36 whole 3-byte characters in 110 bytes.
        let euros = key_of(&[Some(&text(&"€".repeat(1000)))]);
        let kept_text = euros.len() - 2 - 2 - VALUE_DIGEST_BYTES;
        assert_eq!(kept_text, 108);
        assert!(segment_label(&euros).starts_with("€€"));

        // The longest value kept whole fills the cap exactly; one byte more is capped.
        let longest = text(&"w".repeat(MAX_SEGMENT_VALUE_BYTES - 1));
        let longest_key = key_of(&[Some(&longest)]);
        assert_eq!(&longest_key[2..], &longest[..]);
        assert_eq!(
            segment_label(&longest_key),
            "w".repeat(MAX_SEGMENT_VALUE_BYTES - 1)
        );
        let over = text(&"w".repeat(MAX_SEGMENT_VALUE_BYTES));
        assert_eq!(key_of(&[Some(&over)])[2], CAPPED_TAG);

        // Short fields whose label outgrows the cap get the digest too.
        let fields = [text(&"f".repeat(100)), text(&"g".repeat(100))];
        let label = label_of(&[Some(&fields[0]), Some(&fields[1])]);
        assert!(
            label.len() <= MAX_LABEL_BYTES && ends_like_digest(&label),
            "{label}"
        );
        assert!(label.starts_with(&"f".repeat(100)), "{label}");
    }

    /// Keys stored before values were capped held whole values of up to 64 KiB (cut there,
    /// possibly inside a character): they keep their meaning and get a bounded label of their
    /// own.
    #[test]
    fn keys_stored_whole_before_the_cap_still_read() {
        let whole = |value: &[u8]| -> Box<[u8]> {
            let length = u16::try_from(value.len()).unwrap_or(u16::MAX);
            [&length.to_be_bytes()[..], &value[..usize::from(length)]]
                .concat()
                .into_boxed_slice()
        };
        let old = whole(&text(&"v".repeat(1000)));
        let new = key_of(&[Some(&text(&"v".repeat(1000)))]);
        let (old_label, new_label) = (segment_label(&old), segment_label(&new));
        assert!(old_label.len() <= MAX_LABEL_BYTES && ends_like_digest(&old_label));
        assert_ne!(old_label, new_label);
        // Cut inside a character: shown lossily, and told apart by the digest.
        let cut = whole(&text(&"€".repeat(30_000)));
        assert!(segment_label(&cut).starts_with("€€"));
        assert!(ends_like_digest(&segment_label(&cut)));
        // A key cut short shows what it has, with the digest.
        assert!(ends_like_digest(&segment_label(&old[..10])));
    }

    #[test]
    fn json_numbers_are_recognised_by_their_grammar() {
        for number in ["0", "-0", "3", "-1.5", "10", "1e5", "1E+5", "2.5e-3"] {
            assert!(is_json_number(number), "{number}");
        }
        for other in [
            "", "-", "01", "1.", ".5", "+3", "1e", "1e+", "3-pack", "NaN", "0x10", " 3",
        ] {
            assert!(!is_json_number(other), "{other}");
        }
    }

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
