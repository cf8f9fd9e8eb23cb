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
//! - `nsm-key`: the original message key, if any.

use nsm_core::engine::{Epoch, Forwarded};
use nsm_core::event::RecordMeta;
use nsm_core::EpochMillis;
use nsm_kafka::Forward;

const HEADER_GROUP: &str = "nsm-rekey";
const HEADER_FROM: &str = "nsm-from";
const HEADER_AT: &str = "nsm-at";
const HEADER_INPUTS: &str = "nsm-inputs";
const HEADER_KEY: &str = "nsm-key";

/// The repartition topic and what its records say of the inputs.
#[derive(Debug, Clone)]
pub struct Repartition {
    pub topic: String,
    pub partitions: u32,
    /// Every input topic and its partitions.
    pub inputs: Vec<(String, u32)>,
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
    /// The record forwarding an event (or, with `payload` empty, only its source's time) to
    /// partition `partition`, for the group re-keyed by `group_field`.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        partition: u32,
        entity_hash: u64,
        group_field: &str,
        source_topic: &str,
        origin: &Origin,
        payload: &[u8],
        original: &dyn RecordMeta,
        headers_read: &[String],
    ) -> Forward {
        let mut headers = vec![
            (HEADER_GROUP.to_string(), group_field.as_bytes().to_vec()),
            (HEADER_FROM.to_string(), source_topic.as_bytes().to_vec()),
            (HEADER_AT.to_string(), origin.encode()),
            (HEADER_INPUTS.to_string(), self.inputs_text().into_bytes()),
        ];
        if let Some(key) = original.key() {
            headers.push((HEADER_KEY.to_string(), key.to_vec()));
        }
        for name in headers_read {
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

    fn inputs_text(&self) -> String {
        self.inputs
            .iter()
            .map(|(topic, partitions)| format!("{topic}:{partitions}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A record read from the repartition topic, as the engine takes it.
pub struct Received {
    pub group_field: String,
    pub source_topic: String,
    pub origin: Origin,
    pub inputs: Vec<(String, u32)>,
}

impl Received {
    /// `None` when a header is missing or malformed: not a record nsm wrote.
    pub fn read(record: &dyn RecordMeta) -> Option<Received> {
        let text = |name: &str| -> Option<String> {
            String::from_utf8(record.header(name)?.to_vec()).ok()
        };
        let inputs = text(HEADER_INPUTS)?
            .split(',')
            .map(|pair| {
                let (topic, partitions) = pair.rsplit_once(':')?;
                Some((topic.to_string(), partitions.parse().ok()?))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Received {
            group_field: text(HEADER_GROUP)?,
            source_topic: text(HEADER_FROM)?,
            origin: Origin::decode(record.header(HEADER_AT)?)?,
            inputs,
        })
    }

    pub fn forwarded(&self, group: usize) -> Forwarded<'_> {
        Forwarded {
            group,
            group_field: &self.group_field,
            topic: &self.source_topic,
            partition: self.origin.partition,
            offset: self.origin.offset,
            epoch: self.origin.epoch,
            watermark_ms: self.origin.watermark_ms,
            clock_ms: self.origin.clock_ms,
            topics: &self.inputs,
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

    struct Headers(Vec<(String, Vec<u8>)>, Option<i64>);

    impl RecordMeta for Headers {
        fn key(&self) -> Option<&[u8]> {
            Some(b"hash")
        }
        fn header(&self, name: &str) -> Option<&[u8]> {
            self.0
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_slice())
        }
        fn timestamp_ms(&self) -> Option<i64> {
            self.1
        }
    }

    #[test]
    fn a_forwarded_record_reads_back_as_it_was_sent_and_as_the_original() {
        let repartition = Repartition {
            topic: "nsm-repartition".into(),
            partitions: 6,
            inputs: vec![("events".into(), 8), ("app:events".into(), 2)],
        };
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
            "team_id",
            "events",
            &origin,
            b"{}",
            &original,
            &["source".to_string()],
        );
        assert_eq!(forward.partition, 5);
        assert_eq!(forward.timestamp_ms, Some(1_795_435_200_000));
        let sent = Headers(forward.headers.clone(), forward.timestamp_ms);
        let received = Received::read(&sent).expect("nsm's own record");
        assert_eq!(received.group_field, "team_id");
        assert_eq!(received.source_topic, "events");
        assert_eq!(received.origin, origin);
        assert_eq!(received.inputs, repartition.inputs);
        let as_original = AsOriginal(&sent);
        assert_eq!(as_original.key(), Some(&b"hash"[..]));
        assert_eq!(as_original.header("source"), Some(&b"ios"[..]));
        assert_eq!(as_original.header("other"), None, "not read by the config");
        assert!(Received::read(&Headers(Vec::new(), None)).is_none());
    }
}
