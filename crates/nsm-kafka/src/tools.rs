//! Producing and reading helpers for the demo generator and the command-line tools. nsm
//! ships its own because Debian's kcat is too old for current brokers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;

use crate::client::{ClientRole, ClientSettings};
use crate::KafkaError;

/// Creates topics that do not exist yet; existing ones are left as they are.
pub fn ensure_topics(settings: &ClientSettings, topics: &[(&str, i32)]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.create(ClientRole::Producer, &[])?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| {
            NewTopic::new(name, *partitions, TopicReplication::Fixed(1)).set("retention.ms", "-1")
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KafkaError::Other(e.to_string()))?;
    let results = runtime.block_on(admin.create_topics(&new_topics, &options))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::Other(format!(
                    "cannot create topic {topic}: {code}"
                )))
            }
        }
    }
    Ok(())
}

/// The number of partitions of `topic`, or `None` if the broker does not know it.
pub fn topic_partition_count(
    settings: &ClientSettings,
    topic: &str,
) -> Result<Option<usize>, KafkaError> {
    let consumer: BaseConsumer = settings.create(
        ClientRole::Consumer,
        &[("allow.auto.create.topics", "false")],
    )?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|found| {
            found.name() == topic && found.error().is_none() && !found.partitions().is_empty()
        })
        .map(|found| found.partitions().len()))
}

/// A producer that waits for room instead of failing when its queue is full.
pub struct EventProducer {
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl EventProducer {
    pub fn new(settings: &ClientSettings) -> Result<Self, KafkaError> {
        let producer = settings.create(
            ClientRole::Producer,
            &[("linger.ms", "5"), ("message.timeout.ms", "30000")],
        )?;
        Ok(Self { producer })
    }

    /// Queues one message; a key keeps one entity's events in one partition.
    pub fn send(&self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<(), KafkaError> {
        loop {
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(payload);
            if let Some(key) = key {
                record = record.key(key);
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }

    /// Waits until everything queued is delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)?;
        Ok(())
    }
}

/// One message read back, with its headers as text.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// Reads a whole topic from the beginning, without a consumer group, until no message came
/// for `quiet` (or `deadline` passed).
pub fn read_topic(
    settings: &ClientSettings,
    topic: &str,
    quiet: Duration,
    deadline: Duration,
) -> Result<Vec<ReadRecord>, KafkaError> {
    let consumer: BaseConsumer = settings.create(
        ClientRole::Consumer,
        &[
            ("group.id", "nsm-reader"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
        ],
    )?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut list = TopicPartitionList::new();
    for topic_metadata in metadata.topics() {
        if let Some(error) = topic_metadata.error() {
            return Err(KafkaError::Other(format!("topic {topic}: {:?}", error)));
        }
        for partition in topic_metadata.partitions() {
            list.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&list)?;
    let started = Instant::now();
    let mut last_message = Instant::now();
    let mut records = Vec::new();
    while last_message.elapsed() < quiet && started.elapsed() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                last_message = Instant::now();
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|header| {
                                (
                                    header.key.to_string(),
                                    String::from_utf8_lossy(header.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(ReadRecord {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(error)) => return Err(error.into()),
            None => {}
        }
    }
    records.sort_by_key(|record| (record.partition, record.offset));
    Ok(records)
}

/// Header values by name, for convenience.
pub fn header_map(record: &ReadRecord) -> HashMap<&str, &str> {
    record
        .headers
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect()
}
