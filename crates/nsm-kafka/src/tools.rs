//! Producing and reading helpers for the demo generator and the command-line tools. nsm
//! ships its own because Debian's kcat is too old for current brokers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use rdkafka::Message;

use crate::client::{ClientRole, ClientSettings};
use crate::KafkaError;

/// Creates topics that do not exist yet; existing ones are left as they are.
pub fn ensure_topics(settings: &ClientSettings, topics: &[(&str, i32)]) -> Result<(), KafkaError> {
    ensure_topics_replicated(settings, topics, Some(1))
}

/// As [`ensure_topics`], with `replication_factor` replicas each, or the broker's
/// `default.replication.factor` when `None`.
pub fn ensure_topics_replicated(
    settings: &ClientSettings,
    topics: &[(&str, i32)],
    replication_factor: Option<i32>,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.create(ClientRole::Producer, &[])?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| {
            NewTopic::new(
                name,
                *partitions,
                // -1: the broker's default.replication.factor (Kafka 2.4 and later).
                TopicReplication::Fixed(replication_factor.unwrap_or(-1)),
            )
            .set("retention.ms", "-1")
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

/// Deliveries the broker refused: counted, and the first reason kept, so that `flush` can say
/// so instead of reporting every message as produced.
#[derive(Default)]
struct DeliveryFailures {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

struct CountingContext {
    failures: Arc<DeliveryFailures>,
}

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            self.failures.count.fetch_add(1, Ordering::Relaxed);
            let mut first = self
                .failures
                .first
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            first.get_or_insert_with(|| {
                let size = message.payload().map_or(0, <[u8]>::len);
                format!("{error} (a message of {size} bytes)")
            });
        }
    }
}

/// A producer that waits for room instead of failing when its queue is full.
pub struct EventProducer {
    producer: ThreadedProducer<CountingContext>,
    failures: Arc<DeliveryFailures>,
}

impl EventProducer {
    pub fn new(settings: &ClientSettings) -> Result<Self, KafkaError> {
        let failures = Arc::new(DeliveryFailures::default());
        let producer = settings.create_with_context(
            ClientRole::Producer,
            &[("linger.ms", "5"), ("message.timeout.ms", "30000")],
            CountingContext {
                failures: failures.clone(),
            },
        )?;
        Ok(Self { producer, failures })
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

    /// Waits until everything queued is delivered; an error if the broker refused any message
    /// since the producer was created.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)?;
        let failed = self.failures.count.load(Ordering::Relaxed);
        if failed > 0 {
            let first = self
                .failures
                .first
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(KafkaError::Other(format!(
                "{failed} message(s) were not delivered; the first: {first}"
            )));
        }
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

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    use super::*;

    #[test]
    fn a_message_the_broker_refuses_fails_the_flush_instead_of_counting_as_produced() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("events", 1, 1).expect("topic");
        let producer = EventProducer::new(&ClientSettings::new(cluster.bootstrap_servers()))
            .expect("producer");
        producer
            .send("events", None, b"{\"event\":\"a\"}")
            .expect("queued");
        producer.flush(Duration::from_secs(10)).expect("delivered");
        // The broker refuses the next produce request for good (not a retriable error).
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
        );
        producer
            .send("events", None, b"{\"event\":\"b\"}")
            .expect("queued");
        let error = producer
            .flush(Duration::from_secs(10))
            .expect_err("the refusal is reported");
        assert!(
            error
                .to_string()
                .contains("1 message(s) were not delivered"),
            "{error}"
        );
    }
}
