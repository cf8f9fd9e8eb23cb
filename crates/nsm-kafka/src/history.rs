//! Reading retained history without a consumer group, for `nsm replay`: every partition of
//! some topics from the first message at or after a time (or from the start) up to where each
//! partition ended when the read began. Nothing is committed, no group is joined: the live
//! pipeline's state and offsets are untouched.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nsm_core::event::RecordMeta;
use nsm_core::PartitionKey;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;
use tracing::info;

use crate::client::{ClientRole, ClientSettings};
use crate::record::MessageRecord;
use crate::KafkaError;

/// Takes each message read: its partition, offset, payload and record.
pub type HistorySink<'a> = dyn FnMut(&PartitionKey, i64, &[u8], &dyn RecordMeta) + 'a;

/// Reads `topics` from `from_ms` (the first message at or after it; the start of each
/// partition when `None`) to the end each partition had when the read began, in offset order
/// per partition. Returns how many messages were read. Gives up after `stall` without a
/// message while some partition is not at its end.
pub fn read_history(
    settings: &ClientSettings,
    topics: &[String],
    from_ms: Option<i64>,
    stall: Duration,
    sink: &mut HistorySink<'_>,
) -> Result<u64, KafkaError> {
    let consumer: BaseConsumer = settings.create(
        ClientRole::Consumer,
        &[
            ("group.id", "nsm-replay"),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            ("auto.offset.reset", "earliest"),
        ],
    )?;
    let timeout = Duration::from_secs(30);
    // Where each partition ends now: the read stops there.
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let mut starts = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        for topic_metadata in metadata.topics() {
            if let Some(error) = topic_metadata.error() {
                return Err(KafkaError::Other(format!("topic {topic}: {error:?}")));
            }
            for partition in topic_metadata.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic, partition.id(), timeout)?;
                if high > low {
                    ends.insert((topic.clone(), partition.id()), high);
                    let start = match from_ms {
                        Some(ms) => Offset::Offset(ms),
                        None => Offset::Beginning,
                    };
                    starts.add_partition_offset(topic, partition.id(), start)?;
                }
            }
        }
    }
    if let Some(_ms) = from_ms {
        starts = consumer.offsets_for_times(starts, timeout)?;
        // A time after a partition's last message finds no offset: nothing to read there.
        for element in starts.elements() {
            if !matches!(element.offset(), Offset::Offset(_)) {
                ends.remove(&(element.topic().to_string(), element.partition()));
            }
        }
    }
    let mut list = TopicPartitionList::new();
    for element in starts.elements() {
        if ends.contains_key(&(element.topic().to_string(), element.partition())) {
            list.add_partition_offset(element.topic(), element.partition(), element.offset())?;
        }
    }
    info!(partitions = ends.len(), "reading the retained history");
    consumer.assign(&list)?;
    let mut read = 0_u64;
    let mut last_message = Instant::now();
    let mut keys: HashMap<(String, i32), PartitionKey> = HashMap::new();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                last_message = Instant::now();
                let place = (message.topic().to_string(), message.partition());
                let Some(end) = ends.get(&place).copied() else {
                    continue;
                };
                if message.offset() >= end {
                    ends.remove(&place);
                    continue;
                }
                let key = keys
                    .entry(place.clone())
                    .or_insert_with(|| PartitionKey::new(place.0.as_str(), place.1))
                    .clone();
                sink(
                    &key,
                    message.offset(),
                    message.payload().unwrap_or_default(),
                    &MessageRecord(&message),
                );
                read += 1;
                if read.is_multiple_of(100_000) {
                    info!(
                        read,
                        partitions_left = ends.len(),
                        "reading the retained history"
                    );
                }
                if message.offset() + 1 >= end {
                    ends.remove(&place);
                }
            }
            Some(Err(error)) => return Err(error.into()),
            None if last_message.elapsed() > stall => {
                return Err(KafkaError::Other(format!(
                    "no message for {stall:?} while {} partition(s) were not read to their end",
                    ends.len()
                )))
            }
            None => {}
        }
    }
    Ok(read)
}

/// Reads some partitions from given offsets, without a group, up to a *target* offset each
/// that may move forward: a backfill's reader (docs/design/backfill.md). A message at or past
/// its partition's target is not handed over: the partition is paused at it, and goes on from
/// there once its target moves.
pub struct PartitionReader {
    consumer: BaseConsumer,
    keys: HashMap<(String, i32), PartitionKey>,
    /// Per partition read: its target, and whether it is paused at it.
    targets: HashMap<PartitionKey, (i64, bool)>,
}

impl PartitionReader {
    pub fn new(settings: &ClientSettings) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = settings.create(
            ClientRole::Consumer,
            &[
                ("group.id", "nsm-backfill"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("enable.partition.eof", "false"),
                ("auto.offset.reset", "earliest"),
            ],
        )?;
        Ok(PartitionReader {
            consumer,
            keys: HashMap::new(),
            targets: HashMap::new(),
        })
    }

    /// The partition's first and next offsets now (its retained history).
    pub fn bounds(&self, key: &PartitionKey) -> Result<(i64, i64), KafkaError> {
        Ok(self
            .consumer
            .fetch_watermarks(&key.topic, key.partition, Duration::from_secs(30))?)
    }

    /// Reads `key` from `offset` (`None`: its first retained message) up to `target`.
    pub fn start(
        &mut self,
        key: &PartitionKey,
        offset: Option<i64>,
        target: i64,
    ) -> Result<(), KafkaError> {
        let mut list = TopicPartitionList::new();
        let from = offset.map_or(Offset::Beginning, Offset::Offset);
        list.add_partition_offset(&key.topic, key.partition, from)?;
        self.consumer.incremental_assign(&list)?;
        self.keys
            .insert((key.topic.to_string(), key.partition), key.clone());
        self.targets.insert(key.clone(), (target, false));
        Ok(())
    }

    /// Stops reading `key`.
    pub fn stop(&mut self, key: &PartitionKey) -> Result<(), KafkaError> {
        if self.targets.remove(key).is_some() {
            let mut list = TopicPartitionList::new();
            list.add_partition(&key.topic, key.partition);
            self.consumer.incremental_unassign(&list)?;
        }
        Ok(())
    }

    /// Moves `key`'s target forward, resuming it if it was paused at the old one.
    pub fn set_target(&mut self, key: &PartitionKey, target: i64) -> Result<(), KafkaError> {
        if let Some((current, paused)) = self.targets.get_mut(key) {
            if target > *current {
                *current = target;
                if *paused {
                    *paused = false;
                    let mut list = TopicPartitionList::new();
                    list.add_partition(&key.topic, key.partition);
                    self.consumer.resume(&list)?;
                }
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for a message, and hands it to `sink` if it is before its
    /// partition's target; a message at or past it pauses the partition there (it is read
    /// again once the target moves). Whether a message was handed over.
    pub fn poll(
        &mut self,
        timeout: Duration,
        sink: &mut HistorySink<'_>,
    ) -> Result<bool, KafkaError> {
        let Some(result) = self.consumer.poll(timeout) else {
            return Ok(false);
        };
        let message = result?;
        let Some(key) = self
            .keys
            .get(&(message.topic().to_string(), message.partition()))
            .cloned()
        else {
            return Ok(false);
        };
        let Some((target, paused)) = self.targets.get_mut(&key) else {
            return Ok(false);
        };
        if *paused {
            return Ok(false);
        }
        if message.offset() >= *target {
            *paused = true;
            let mut list = TopicPartitionList::new();
            list.add_partition(&key.topic, key.partition);
            self.consumer.pause(&list)?;
            self.consumer.seek(
                &key.topic,
                key.partition,
                Offset::Offset(message.offset()),
                Duration::from_secs(10),
            )?;
            return Ok(false);
        }
        sink(
            &key,
            message.offset(),
            message.payload().unwrap_or_default(),
            &MessageRecord(&message),
        );
        Ok(true)
    }
}
