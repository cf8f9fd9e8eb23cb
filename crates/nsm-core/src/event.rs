//! Decoding JSON events: only the fields some metric needs are captured, borrowed from the
//! payload; everything else is skipped without being built.
//!
//! The config names a handful of field paths (the event name, the timestamp, each metric's
//! filter and value fields). They are compiled once into a [`EventSchema`], a tree of object
//! keys with a numbered slot at each wanted leaf. Decoding walks the JSON once and stores the
//! raw text of each wanted value in its slot, so numbers keep their exact decimal text.
//!
//! A key nsm reads that appears twice in one object (`{"event":"a","event":"b"}`) rejects the
//! event as invalid JSON: parsers disagree on which one counts (first, last, or an error), so
//! nsm would count it differently from the warehouse that replays the same topic. Repeated
//! keys nsm never reads cannot change a value and are left alone. Every node of the schema
//! (objects on the way to a wanted field, too) has a slot, which is how a repeat is noticed.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::metric::{FieldPath, RecordField};
use crate::reject::{RejectReason, Rejection};

/// Index of a captured field in [`Fields`].
pub type Slot = usize;

#[derive(Debug, Default, Clone)]
struct Node {
    slot: Option<Slot>,
    children: Vec<(Box<str>, Node)>,
}

impl Node {
    fn child(&self, key: &str) -> Option<&Node> {
        self.children
            .iter()
            .find(|(name, _)| &**name == key)
            .map(|(_, node)| node)
    }
}

/// The Kafka record around an event: what `@key`, `@header.NAME` and `events.timestamp =
/// "@kafka"` read. The Kafka crate implements it over a consumed message.
pub trait RecordMeta {
    fn key(&self) -> Option<&[u8]>;
    /// The value of the first header called `name`.
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// The record's timestamp (CreateTime, or LogAppendTime), epoch milliseconds.
    fn timestamp_ms(&self) -> Option<i64>;
}

/// An event without a record around it (tests, tools), or with only its timestamp.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRecord {
    pub timestamp_ms: Option<i64>,
}

impl RecordMeta for NoRecord {
    fn key(&self) -> Option<&[u8]> {
        None
    }

    fn header(&self, _: &str) -> Option<&[u8]> {
        None
    }

    fn timestamp_ms(&self) -> Option<i64> {
        self.timestamp_ms
    }
}

/// The set of field paths to capture from each event.
#[derive(Debug, Default, Clone)]
pub struct EventSchema {
    root: Node,
    slot_count: usize,
    /// Slots read from the Kafka record rather than the JSON event.
    record_slots: Vec<(Slot, RecordField)>,
}

impl EventSchema {
    /// The slot of `path`, adding it on first use; the same path always gets the same slot.
    /// The objects on the way get slots too (see the module doc).
    pub fn slot(&mut self, path: &FieldPath) -> Slot {
        if let Some(field) = path.record_field() {
            if let Some((slot, _)) = self.record_slots.iter().find(|(_, known)| *known == field) {
                return *slot;
            }
            let slot = self.slot_count;
            self.slot_count += 1;
            self.record_slots.push((slot, field));
            return slot;
        }
        let mut node = &mut self.root;
        for segment in path.segments() {
            let position = node
                .children
                .iter()
                .position(|(name, _)| **name == **segment);
            let position = match position {
                Some(position) => position,
                None => {
                    let child = Node {
                        slot: Some(self.slot_count),
                        children: Vec::new(),
                    };
                    self.slot_count += 1;
                    node.children.push((segment.as_str().into(), child));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[position].1;
        }
        // Every node but the root has a slot; a path always has at least one segment.
        node.slot
            .unwrap_or_else(|| unreachable!("a field path is never empty"))
    }

    /// The names of the Kafka headers the schema reads (`@header.NAME`).
    pub fn record_headers(&self) -> impl Iterator<Item = &str> {
        self.record_slots
            .iter()
            .filter_map(|(_, field)| match field {
                RecordField::Header(name) => Some(name.as_str()),
                RecordField::Key => None,
            })
    }

    /// Decodes one event. `payload` must already be valid UTF-8.
    pub fn decode<'a>(&self, payload: &'a str) -> Result<Fields<'a>, Rejection> {
        const NONE: &NoRecord = &NoRecord { timestamp_ms: None };
        self.decode_with(payload, NONE)
    }

    /// Decodes one event and reads the parts of its Kafka record the schema names. A key or
    /// header that is not UTF-8 reads as absent.
    pub fn decode_with<'a>(
        &self,
        payload: &'a str,
        record: &'a dyn RecordMeta,
    ) -> Result<Fields<'a>, Rejection> {
        let mut values = vec![None; self.slot_count];
        let mut deserializer = serde_json::Deserializer::from_str(payload);
        let seed = ObjectSeed {
            node: &self.root,
            out: &mut values,
        };
        let saw_object = seed
            .deserialize(&mut deserializer)
            .and_then(|saw_object| deserializer.end().map(|()| saw_object))
            .map_err(|error| Rejection::new(RejectReason::InvalidJson, error.to_string()))?;
        if !saw_object {
            return Err(Rejection::new(
                RejectReason::NotAnObject,
                "the event is not a JSON object",
            ));
        }
        let record_values = self
            .record_slots
            .iter()
            .map(|(slot, field)| {
                let bytes = match field {
                    RecordField::Key => record.key(),
                    RecordField::Header(name) => record.header(name),
                };
                (
                    *slot,
                    bytes.and_then(|bytes| std::str::from_utf8(bytes).ok()),
                )
            })
            .collect();
        Ok(Fields {
            values,
            record_values,
        })
    }
}

/// The captured fields of one event, by slot.
#[derive(Debug)]
pub struct Fields<'a> {
    values: Vec<Option<&'a RawValue>>,
    /// The record's key and headers the schema names, as text.
    record_values: Vec<(Slot, Option<&'a str>)>,
}

impl<'a> Fields<'a> {
    /// The field's value; JSON `null` reads as absent. A key or header is text.
    pub fn get(&self, slot: Slot) -> Option<Scalar<'a>> {
        if let Some((_, value)) = self.record_values.iter().find(|(known, _)| *known == slot) {
            return value.map(|text| Scalar::Text(Cow::Borrowed(text)));
        }
        let raw = self.values.get(slot).copied().flatten()?;
        match Scalar::from_raw(raw) {
            Scalar::Null => None,
            scalar => Some(scalar),
        }
    }
}

/// A captured JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Text(Cow<'a, str>),
    /// The number's exact JSON text.
    Number(&'a str),
    Bool(bool),
    Null,
    /// An object or array.
    Composite,
}

impl<'a> Scalar<'a> {
    fn from_raw(raw: &'a RawValue) -> Scalar<'a> {
        let text = raw.get().trim();
        match text.as_bytes().first() {
            Some(b'"') => {
                let inner = &text[1..text.len() - 1];
                if inner.contains('\\') {
                    // Escapes need decoding; the raw text was already validated by the parser.
                    match serde_json::from_str::<String>(text) {
                        Ok(decoded) => Scalar::Text(Cow::Owned(decoded)),
                        Err(_) => Scalar::Composite,
                    }
                } else {
                    Scalar::Text(Cow::Borrowed(inner))
                }
            }
            Some(b't') => Scalar::Bool(true),
            Some(b'f') => Scalar::Bool(false),
            Some(b'n') => Scalar::Null,
            Some(b'{') | Some(b'[') | None => Scalar::Composite,
            Some(_) => Scalar::Number(text),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Text(_) => "string",
            Self::Number(_) => "number",
            Self::Bool(_) => "boolean",
            Self::Null => "null",
            Self::Composite => "object or array",
        }
    }
}

/// Walks one JSON value: captures wanted keys of an object, skips everything else.
/// Yields whether the value was an object.
struct ObjectSeed<'s, 'o, 'a> {
    node: &'s Node,
    out: &'o mut Vec<Option<&'a RawValue>>,
}

impl<'de, 's, 'o> DeserializeSeed<'de> for ObjectSeed<'s, 'o, 'de> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, 's, 'o> Visitor<'de> for ObjectSeed<'s, 'o, 'de> {
    type Value = bool;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<bool, M::Error> {
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match self.node.child(&key) {
                Some(child) if child.slot.is_some() || !child.children.is_empty() => {
                    let raw: &'de RawValue = map.next_value()?;
                    if let Some(slot) = child.slot {
                        if self.out[slot].is_some() {
                            return Err(de::Error::custom(format_args!(
                                "key {key:?} appears twice in one object"
                            )));
                        }
                        check_escapes(&key, raw)?;
                        self.out[slot] = Some(raw);
                    }
                    if !child.children.is_empty() {
                        let mut nested = serde_json::Deserializer::from_str(raw.get());
                        ObjectSeed {
                            node: child,
                            out: self.out,
                        }
                        .deserialize(&mut nested)
                        .map_err(de::Error::custom)?;
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(true)
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<bool, S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// A string nsm reads must decode to Unicode text. JSON's grammar lets `\ud800` (half of a
/// surrogate pair) stand alone, but no UTF-8 text holds it: such a value could match no filter
/// and be no member, so the event is refused as invalid rather than counted by half its
/// metrics. Strings without escapes are valid UTF-8 already, and unread ones are skipped.
fn check_escapes<E: de::Error>(key: &str, raw: &RawValue) -> Result<(), E> {
    let text = raw.get();
    if !(text.starts_with('"') && text.contains('\\')) {
        return Ok(());
    }
    match serde_json::from_str::<Cow<'_, str>>(text) {
        Ok(_) => Ok(()),
        Err(error) => Err(E::custom(format_args!(
            "the string at key {key:?} is not Unicode text: {error}"
        ))),
    }
}

/// Object keys, borrowed when they contain no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(key))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> FieldPath {
        FieldPath::parse(text).expect("path")
    }

    #[test]
    fn captures_wanted_fields_only_with_exact_number_text() {
        let mut schema = EventSchema::default();
        let name = schema.slot(&path("event"));
        let amount = schema.slot(&path("properties.amount"));
        let plan = schema.slot(&path("properties.plan"));
        let missing = schema.slot(&path("properties.nothing"));
        let payload = r#"{"event":"payment_succeeded","noise":{"deep":[1,2,{"x":null}]},
            "properties":{"amount":19.990000000000001,"plan":"pro\u0021"}}"#;
        let fields = schema.decode(payload).expect("valid");
        assert_eq!(
            fields.get(name),
            Some(Scalar::Text(Cow::Borrowed("payment_succeeded")))
        );
        assert_eq!(
            fields.get(amount),
            Some(Scalar::Number("19.990000000000001"))
        );
        assert_eq!(
            fields.get(plan),
            Some(Scalar::Text(Cow::Owned("pro!".to_string())))
        );
        assert_eq!(fields.get(missing), None);
    }

    #[test]
    fn a_path_through_a_non_object_is_absent() {
        let mut schema = EventSchema::default();
        let amount = schema.slot(&path("properties.amount"));
        let fields = schema.decode(r#"{"properties":[1,2]}"#).expect("valid");
        assert_eq!(fields.get(amount), None);
        let fields = schema.decode(r#"{"properties":"text"}"#).expect("valid");
        assert_eq!(fields.get(amount), None);
    }

    #[test]
    fn a_field_can_be_both_captured_and_walked_into() {
        let mut schema = EventSchema::default();
        let whole = schema.slot(&path("properties"));
        let amount = schema.slot(&path("properties.amount"));
        let fields = schema
            .decode(r#"{"properties":{"amount":5}}"#)
            .expect("valid");
        assert_eq!(fields.get(whole), Some(Scalar::Composite));
        assert_eq!(fields.get(amount), Some(Scalar::Number("5")));
    }

    #[test]
    fn a_repeated_key_that_is_read_rejects_the_event_and_others_do_not() {
        let mut schema = EventSchema::default();
        let name = schema.slot(&path("event"));
        let amount = schema.slot(&path("properties.amount"));
        let reason = |payload: &str| schema.decode(payload).map(|_| ()).map_err(|r| r.reason);
        assert_eq!(
            reason(r#"{"event":"a","event":"b"}"#),
            Err(RejectReason::InvalidJson)
        );
        // The object on the way counts too: last-wins parsers would see no amount here.
        assert_eq!(
            reason(r#"{"properties":{"amount":1},"properties":{}}"#),
            Err(RejectReason::InvalidJson)
        );
        assert_eq!(
            reason(r#"{"properties":{"amount":1,"amount":2}}"#),
            Err(RejectReason::InvalidJson)
        );
        // The same key in different objects, and repeats nsm never reads, are fine.
        let fields = schema
            .decode(r#"{"event":"a","noise":1,"noise":2,"properties":{"event":"b","amount":3}}"#)
            .expect("valid");
        assert_eq!(fields.get(name), Some(Scalar::Text(Cow::Borrowed("a"))));
        assert_eq!(fields.get(amount), Some(Scalar::Number("3")));
    }

    #[test]
    fn a_lone_surrogate_escape_rejects_a_read_string_only() {
        let mut schema = EventSchema::default();
        let name = schema.slot(&path("event"));
        let reason = |payload: &str| schema.decode(payload).map(|_| ()).map_err(|r| r.reason);
        // Found by fuzzing: serde_json skips it in unread values, and cannot decode it.
        assert_eq!(
            reason(r#"{"event":"a\ud800"}"#),
            Err(RejectReason::InvalidJson)
        );
        assert_eq!(
            reason(r#"{"event":"\udc00\ud83d"}"#),
            Err(RejectReason::InvalidJson)
        );
        assert_eq!(reason(r#"{"event":"a","other":"\ud800"}"#), Ok(()));
        let fields = schema
            .decode(r#"{"event":"\ud83d\ude00 \\ud800"}"#)
            .expect("a pair, and an escaped backslash");
        assert_eq!(
            fields.get(name),
            Some(Scalar::Text(Cow::Owned("\u{1f600} \\ud800".to_string())))
        );
    }

    #[test]
    fn rejects_non_objects_and_broken_json() {
        let schema = EventSchema::default();
        let reason = |payload: &str| schema.decode(payload).map(|_| ()).map_err(|r| r.reason);
        assert_eq!(reason("[1,2]"), Err(RejectReason::NotAnObject));
        assert_eq!(reason("42"), Err(RejectReason::NotAnObject));
        assert_eq!(reason("{\"a\":"), Err(RejectReason::InvalidJson));
        assert_eq!(reason("{} trailing"), Err(RejectReason::InvalidJson));
        assert_eq!(reason(""), Err(RejectReason::InvalidJson));
        // Skipped values are walked without recursion: deep nesting costs no stack.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(reason(&deep), Err(RejectReason::NotAnObject));
        let deep_inside = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(reason(&deep_inside), Ok(()));
        assert_eq!(reason("{}"), Ok(()));
    }
}
