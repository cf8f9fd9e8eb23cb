//! Records of the repartition topic (docs/design/repartition.md): what an input partition's
//! owner writes beside a forwarded event, and how a repartition partition reads it back.
//!
//! A forwarded record is the event's bytes unchanged, keyed by its entity's hash, with the
//! Kafka timestamp of the original, the headers the config reads, and:
//! - `nsm-rekey`: the field of the group it is forwarded for (`team_id`);
//! - `nsm-from`: the source topic;
//! - `nsm-at`: the source partition, the event's offset there, the owner's epoch and the
//!   source's watermark and clock;
//! - `nsm-inputs`: every input topic and its partitions (`events:8,other:4`);
//! - `nsm-key`: the original message key, if any;
//! - `nsm-first`: on the first record of an event forwarded for several groups, so that a
//!   copy skipped as a duplicate in each (`events.dedup_across_partitions`) counts once.

use std::sync::Arc;

use nsm_core::engine::{Epoch, Forwarded, Inputs, Plan};
use nsm_core::event::RecordMeta;
use nsm_core::EpochMillis;
use nsm_kafka::Forward;

const HEADER_GROUP: &str = "nsm-rekey";
const HEADER_FROM: &str = "nsm-from";
const HEADER_AT: &str = "nsm-at";
const HEADER_INPUTS: &str = "nsm-inputs";
const HEADER_KEY: &str = "nsm-key";
const HEADER_FIRST: &str = "nsm-first";

/// The repartition topic and what its records say of the inputs.
#[derive(Debug, Clone)]
pub struct Repartition {
    pub topic: String,
    pub partitions: u32,
    /// What every record repeats, built once: a record costs no formatting.
    inputs_text: Vec<u8>,
    /// Per group: its field as records name it.
    group_fields: Vec<Vec<u8>>,
    /// The header names: nsm's own, then the headers the config reads.
    names: [Arc<str>; 6],
    headers_read: Vec<Arc<str>>,
}

/// Where a record comes from: its source partition, offset, owner and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
    pub epoch: Epoch,
    pub watermark_ms: Option<EpochMillis>,
    pub clock_ms: Option<EpochMillis>,
}

const AT_BYTES: usize = 4 + 8 + 8 + 8 + 9 + 9;

impl Origin {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(AT_BYTES);
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.epoch.resumed_from.to_be_bytes());
        out.extend_from_slice(&self.epoch.taken_at_ms.to_be_bytes());
        for time in [self.watermark_ms, self.clock_ms] {
            out.push(u8::from(time.is_some()));
            out.extend_from_slice(&time.unwrap_or_default().to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Origin> {
        if bytes.len() != AT_BYTES {
            return None;
        }
        let i64_at = |at: usize| -> Option<i64> {
            Some(i64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
        };
        let time_at = |at: usize| -> Option<Option<i64>> {
            match bytes.get(at)? {
                0 => Some(None),
                1 => Some(Some(i64_at(at + 1)?)),
                _ => None,
            }
        };
        Some(Origin {
            partition: i32::from_be_bytes(bytes.get(0..4)?.try_into().ok()?),
            offset: i64_at(4)?,
            epoch: Epoch {
                resumed_from: i64_at(12)?,
                taken_at_ms: i64_at(20)?,
            },
            watermark_ms: time_at(28)?,
            clock_ms: time_at(37)?,
        })
    }
}

impl Repartition {
    /// `inputs`: every input topic and its partitions.
    pub fn new(topic: &str, partitions: u32, inputs: &[(String, u32)], plan: &Plan) -> Repartition {
        Repartition {
            topic: topic.to_string(),
            partitions,
            inputs_text: Inputs::text_of(inputs).into_bytes(),
            group_fields: (0..plan.rekey_fields().len())
                .map(|group| plan.rekey_name(group).as_bytes().to_vec())
                .collect(),
            names: [
                HEADER_GROUP,
                HEADER_FROM,
                HEADER_AT,
                HEADER_INPUTS,
                HEADER_KEY,
                HEADER_FIRST,
            ]
            .map(Arc::from),
            headers_read: plan.record_headers().map(Arc::from).collect(),
        }
    }

    /// The record forwarding an event for `group` (or, with `payload` empty and no group, only
    /// its source's time) to partition `partition`; `first` of the event's records.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        partition: u32,
        entity_hash: u64,
        group: Option<usize>,
        first: bool,
        source_topic: &str,
        origin: &Origin,
        payload: &[u8],
        original: &dyn RecordMeta,
    ) -> Forward {
        let [group_name, from, at, inputs, key_name, first_name] = &self.names;
        let group_field = group
            .and_then(|group| self.group_fields.get(group))
            .map_or(&[][..], Vec::as_slice);
        let mut headers = Vec::with_capacity(6 + self.headers_read.len());
        headers.extend([
            (group_name.clone(), group_field.to_vec()),
            (from.clone(), source_topic.as_bytes().to_vec()),
            (at.clone(), origin.encode()),
            (inputs.clone(), self.inputs_text.clone()),
        ]);
        if let Some(key) = original.key() {
            headers.push((key_name.clone(), key.to_vec()));
        }
        if first {
            headers.push((first_name.clone(), Vec::new()));
        }
        for name in &self.headers_read {
            if let Some(value) = original.header(name) {
                headers.push((name.clone(), value.to_vec()));
            }
        }
        Forward {
            partition: i32::try_from(partition).unwrap_or(i32::MAX),
            key: entity_hash.to_be_bytes().to_vec(),
            headers,
            payload: payload.to_vec(),
            timestamp_ms: original.timestamp_ms(),
        }
    }

    /// The repartition topic's partition of an entity.
    pub fn partition_of(&self, entity_hash: u64) -> u32 {
        u32::try_from(entity_hash % u64::from(self.partitions.max(1))).unwrap_or(0)
    }
}

/// A record read from the repartition topic, as the engine takes it; borrowed from the
/// record's headers.
pub struct Received<'r> {
    pub group_field: &'r str,
    pub source_topic: &'r str,
    pub origin: Origin,
    pub inputs: Inputs<'r>,
    /// The first record of its event (see `nsm-first`).
    pub first: bool,
}

impl<'r> Received<'r> {
    /// `None` when a header is missing or malformed: not a record nsm wrote.
    pub fn read(record: &'r dyn RecordMeta) -> Option<Received<'r>> {
        let text =
            |name: &str| -> Option<&'r str> { std::str::from_utf8(record.header(name)?).ok() };
        Some(Received {
            group_field: text(HEADER_GROUP)?,
            source_topic: text(HEADER_FROM)?,
            origin: Origin::decode(record.header(HEADER_AT)?)?,
            inputs: Inputs::parse(text(HEADER_INPUTS)?)?,
            first: record.header(HEADER_FIRST).is_some(),
        })
    }

    pub fn forwarded(&self, group: usize) -> Forwarded<'r> {
        Forwarded {
            group,
            group_field: self.group_field,
            topic: self.source_topic,
            partition: self.origin.partition,
            offset: self.origin.offset,
            epoch: self.origin.epoch,
            watermark_ms: self.origin.watermark_ms,
            clock_ms: self.origin.clock_ms,
            topics: self.inputs,
        }
    }
}

/// A forwarded record read as the original one: its key from `nsm-key`, its headers and
/// timestamp as they were carried.
pub struct AsOriginal<'r>(pub &'r dyn RecordMeta);

impl RecordMeta for AsOriginal<'_> {
    fn key(&self) -> Option<&[u8]> {
        self.0.header(HEADER_KEY)
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.header(name)
    }

    fn timestamp_ms(&self) -> Option<i64> {
        self.0.timestamp_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Headers(Vec<(Arc<str>, Vec<u8>)>, Option<i64>);

    impl RecordMeta for Headers {
        fn key(&self) -> Option<&[u8]> {
            Some(b"hash")
        }
        fn header(&self, name: &str) -> Option<&[u8]> {
            self.0
                .iter()
                .find(|(key, _)| **key == *name)
                .map(|(_, value)| value.as_slice())
        }
        fn timestamp_ms(&self) -> Option<i64> {
            self.1
        }
    }

    #[test]
    fn a_forwarded_record_reads_back_as_it_was_sent_and_as_the_original() {
        let config = nsm_core::config::Config::from_toml(
            r#"
[kafka]
brokers = "127.0.0.1:9"
topics = ["events"]
group_id = "test"
key_field = "user_id"
[state]
path = "unused"
[north_star]
name = "weekly_active_teams"
description = "Teams with a message from an iOS app this week"
kind = "distinct"
field = "team_id"
where = { event = "message_sent", "@header.source" = "ios" }
window = "1w"
"#,
            &|_| None,
        )
        .expect("config");
        let plan = Plan::from_config(&config);
        let inputs = vec![("events".to_string(), 8), ("app:events".to_string(), 2)];
        let repartition = Repartition::new("nsm-repartition", 6, &inputs, &plan);
        let original = Headers(
            vec![
                ("source".into(), b"ios".to_vec()),
                ("other".into(), vec![1]),
            ],
            Some(1_795_435_200_000),
        );
        let origin = Origin {
            partition: 3,
            offset: 1_234,
            epoch: Epoch {
                resumed_from: 1_000,
                taken_at_ms: 1_795_435_100_000,
            },
            watermark_ms: Some(1_795_435_199_000),
            clock_ms: None,
        };
        let forward = repartition.record(
            repartition.partition_of(41),
            41,
            Some(0),
            true,
            "events",
            &origin,
            b"{}",
            &original,
        );
        assert_eq!(forward.partition, 5);
        assert_eq!(forward.timestamp_ms, Some(1_795_435_200_000));
        let sent = Headers(forward.headers.clone(), forward.timestamp_ms);
        let received = Received::read(&sent).expect("nsm's own record");
        assert_eq!(received.group_field, "team_id");
        assert_eq!(received.source_topic, "events");
        assert_eq!(received.origin, origin);
        assert!(received.first);
        let read: Vec<(&str, u32)> = received.inputs.iter().collect();
        assert_eq!(read, [("events", 8), ("app:events", 2)]);
        let as_original = AsOriginal(&sent);
        assert_eq!(as_original.key(), Some(&b"hash"[..]));
        assert_eq!(as_original.header("source"), Some(&b"ios"[..]));
        assert_eq!(as_original.header("other"), None, "not read by the config");
        assert!(Received::read(&Headers(Vec::new(), None)).is_none());
    }
}
