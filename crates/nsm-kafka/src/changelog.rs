//! The changelog topic: a compacted topic holding the latest value of every stored state key,
//! partitioned like the input (changelog partition `p` carries input partition `p` of every
//! input topic), so that the instance a partition moves to rebuilds its state from there.
//!
//! This module moves opaque keys and values, and each record's epoch (the
//! [`EPOCH_HEADER`]); what they mean, which record ends a write and how a restore treats an
//! unfinished one or one of an older epoch are the state store's business.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, Message};
use tracing::{info, warn};

use crate::client::{ClientRole, ClientSettings};
use crate::KafkaError;

/// How long a restore waits for the next record before it calls the broker unreachable.
const READ_STALL: Duration = Duration::from_secs(60);

/// The Kafka header carrying a changelog record's epoch, 8 bytes big-endian: which owner of
/// the partition wrote it. Opaque here, like keys and values.
pub(crate) const EPOCH_HEADER: &str = "nsm-epoch";

/// Makes sure the changelog topic exists, compacted, with at least `partitions` partitions.
/// An existing topic with fewer is an error: its partition `p` must exist for every input
/// partition `p`. A topic nsm creates has one replica: create it yourself (compacted) for more.
pub fn ensure_changelog_topic(
    settings: &ClientSettings,
    topic: &str,
    partitions: usize,
) -> Result<(), KafkaError> {
    let existing = crate::topic_partition_count(settings, topic)?;
    if existing.is_none() {
        let admin: AdminClient<DefaultClientContext> =
            settings.create(ClientRole::Producer, &[])?;
        let wanted = i32::try_from(partitions.max(1)).unwrap_or(i32::MAX);
        // Compacted: the latest value of every key is kept, deleted keys go after
        // delete.retention.ms, and nothing else is ever deleted by age.
        // A day before compaction may touch a record: an unfinished write's records cannot
        // replace the finished values a new owner reverts them to before it has done so.
        let new_topic = NewTopic::new(topic, wanted, TopicReplication::Fixed(1))
            .set("cleanup.policy", "compact")
            .set("retention.ms", "-1")
            .set("min.compaction.lag.ms", "86400000");
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| KafkaError::Other(e.to_string()))?;
        let results = runtime
            .block_on(admin.create_topics(&[new_topic], &options))
            .map_err(|error| {
                KafkaError::Other(format!(
                    "cannot create the changelog topic {topic:?} (state.changelog_topic): {error}; create it compacted with {partitions} partitions"
                ))
            })?;
        for result in results {
            match result {
                Ok(_) => info!(topic, partitions = wanted, "changelog topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(KafkaError::Other(format!(
                        "the changelog topic {topic:?} (state.changelog_topic) does not exist and cannot be created: {code}; create it compacted with {partitions} partitions"
                    )))
                }
            }
        }
    }
    match crate::topic_partition_count(settings, topic)? {
        Some(found) if found >= partitions => Ok(()),
        Some(found) => Err(KafkaError::Other(format!(
            "the changelog topic {topic:?} (state.changelog_topic) has {found} partitions, fewer than the {partitions} of the input topics; add partitions to it (its partition p holds the state of input partition p)"
        ))),
        None => Err(KafkaError::Other(format!(
            "the changelog topic {topic:?} (state.changelog_topic) is not visible after creating it"
        ))),
    }
}

#[derive(Default)]
struct DeliveryState {
    /// The next offset after the last acknowledged record, per changelog partition.
    next_offsets: HashMap<i32, i64>,
    failures: u64,
    first_failure: Option<String>,
}

struct ChangelogContext {
    state: Arc<Mutex<DeliveryState>>,
}

impl ClientContext for ChangelogContext {}

impl ProducerContext for ChangelogContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match result {
            Ok(message) => {
                let next = state.next_offsets.entry(message.partition()).or_insert(0);
                *next = (*next).max(message.offset() + 1);
            }
            Err((error, _)) => {
                state.failures += 1;
                state.first_failure.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

/// Writes changelog records. A write is records, then [`ChangelogWriter::await_delivery`],
/// then the end markers, then `await_delivery` again: an end marker is only ever sent once
/// every record before it was acknowledged.
pub struct ChangelogWriter {
    producer: ThreadedProducer<ChangelogContext>,
    topic: String,
    state: Arc<Mutex<DeliveryState>>,
}

impl ChangelogWriter {
    pub fn new(settings: &ClientSettings, topic: &str) -> Result<Self, KafkaError> {
        let state = Arc::new(Mutex::new(DeliveryState::default()));
        // Every in-sync replica acknowledges; retried until delivered (message.timeout.ms 0),
        // since a checkpoint waits for its changelog anyway.
        let producer = settings.create_with_context(
            ClientRole::Producer,
            &[
                ("acks", "all"),
                ("message.timeout.ms", "0"),
                ("linger.ms", "5"),
            ],
            ChangelogContext {
                state: state.clone(),
            },
        )?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            state,
        })
    }

    /// Queues one record (`value` none: a tombstone) carrying `epoch`, waiting while the local
    /// queue is full unless `give_up` says so.
    pub fn send(
        &self,
        partition: i32,
        key: &[u8],
        value: Option<&[u8]>,
        epoch: u64,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), KafkaError> {
        let epoch = epoch.to_be_bytes();
        loop {
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: EPOCH_HEADER,
                value: Some(&epoch[..]),
            });
            let mut record: BaseRecord<'_, [u8], [u8], ()> = BaseRecord::to(&self.topic)
                .partition(partition)
                .key(key)
                .headers(headers);
            if let Some(value) = value {
                record = record.payload(value);
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if give_up() {
                        return Err(KafkaError::Other(
                            "stopped while the changelog queue was full".into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }

    /// Waits until every queued record is acknowledged, however long the broker is away,
    /// unless `give_up` says so. Returns the next offset of each changelog partition written
    /// since the last call; any record the broker refused makes it an error.
    pub fn await_delivery(
        &self,
        give_up: &dyn Fn() -> bool,
    ) -> Result<HashMap<i32, i64>, KafkaError> {
        let started = Instant::now();
        let mut warned = false;
        let delivered = crate::delivery::wait_delivered(
            &|| self.producer.in_flight_count(),
            give_up,
            Duration::from_secs(5),
            &mut || {
                warned = true;
                warn!(topic = %self.topic, "changelog not acknowledged yet: the checkpoint waits for the broker");
            },
        );
        if !delivered {
            return Err(KafkaError::Other(
                "stopped while the changelog was not acknowledged".into(),
            ));
        }
        if warned {
            info!(topic = %self.topic, waited_ms = started.elapsed().as_millis() as u64, "changelog acknowledged; checkpoints resume");
        }
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.failures > 0 {
            return Err(KafkaError::Other(format!(
                "{} changelog record(s) refused by the broker; the first: {}",
                state.failures,
                state.first_failure.as_deref().unwrap_or("unknown")
            )));
        }
        Ok(std::mem::take(&mut state.next_offsets))
    }
}

/// Takes each record read: its offset, key, value (none for a tombstone) and epoch (none
/// when it has no [`EPOCH_HEADER`]); an error stops the read.
pub type RecordSink<'a> =
    dyn FnMut(i64, &[u8], Option<&[u8]>, Option<u64>) -> Result<(), String> + 'a;

/// The epoch a changelog record carries, if it has one.
fn record_epoch(message: &BorrowedMessage<'_>) -> Result<Option<u64>, String> {
    let Some(headers) = message.headers() else {
        return Ok(None);
    };
    let Some(header) = headers.iter().find(|header| header.key == EPOCH_HEADER) else {
        return Ok(None);
    };
    let value = header.value.unwrap_or_default();
    let bytes: [u8; 8] = value.try_into().map_err(|_| {
        format!(
            "the record at offset {} has an {EPOCH_HEADER} header of {} bytes, not 8",
            message.offset(),
            value.len()
        )
    })?;
    Ok(Some(u64::from_be_bytes(bytes)))
}

/// Reads changelog partitions, without a consumer group.
pub struct ChangelogReader {
    consumer: BaseConsumer,
    topic: String,
}

impl ChangelogReader {
    pub fn new(settings: &ClientSettings, topic: &str) -> Result<Self, KafkaError> {
        let consumer = settings.create(
            ClientRole::Consumer,
            &[
                ("group.id", "nsm-changelog-restore"),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
                // An offset gone from the log is an error, never a silent jump to its end.
                ("auto.offset.reset", "error"),
            ],
        )?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
        })
    }

    /// The first and the next offset of a changelog partition.
    pub fn watermarks(&self, partition: i32) -> Result<(i64, i64), KafkaError> {
        Ok(self
            .consumer
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))?)
    }

    /// Calls `apply` with each record of `partition` from offset `from` up to `to`
    /// (exclusive), in offset order; returns how many were read. Compaction may have removed
    /// some offsets: the read ends once the consumer's position reaches `to`.
    pub fn read(
        &self,
        partition: i32,
        from: i64,
        to: i64,
        apply: &mut RecordSink<'_>,
    ) -> Result<u64, KafkaError> {
        if from >= to {
            return Ok(0);
        }
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, partition, Offset::Offset(from))?;
        self.consumer.assign(&list)?;
        let mut read = 0;
        let mut last_progress = Instant::now();
        let mut last_error: Option<String> = None;
        let result = loop {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    last_progress = Instant::now();
                    if message.offset() >= to {
                        break Ok(read);
                    }
                    read += 1;
                    let key = message.key().unwrap_or_default();
                    let applied = record_epoch(&message)
                        .and_then(|epoch| apply(message.offset(), key, message.payload(), epoch));
                    if let Err(detail) = applied {
                        break Err(KafkaError::Other(detail));
                    }
                    if message.offset() + 1 >= to {
                        break Ok(read);
                    }
                }
                Some(Err(error)) => {
                    warn!(topic = %self.topic, partition, error = %error, "changelog read error");
                    if matches!(
                        error.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange
                        )
                    ) {
                        break Err(KafkaError::Other(format!(
                            "offset {from} of {} partition {partition} is no longer in the log: {error}",
                            self.topic
                        )));
                    }
                    last_error = Some(error.to_string());
                }
                None => {
                    if self.position(partition)? >= to {
                        break Ok(read);
                    }
                    if last_progress.elapsed() > READ_STALL {
                        break Err(KafkaError::Other(format!(
                            "no changelog record from {} partition {partition} for {}s while restoring (read {read} up to offset {to}){}",
                            self.topic,
                            READ_STALL.as_secs(),
                            last_error
                                .as_deref()
                                .map(|error| format!("; last error: {error}"))
                                .unwrap_or_default()
                        )));
                    }
                }
            }
        };
        self.consumer.unassign()?;
        result
    }

    fn position(&self, partition: i32) -> Result<i64, KafkaError> {
        let positions = self.consumer.position()?;
        Ok(positions
            .find_partition(&self.topic, partition)
            .and_then(|element| match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            })
            .unwrap_or(-1))
    }
}
