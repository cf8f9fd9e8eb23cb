//! The changelog topic: a compacted topic holding each partition's state as checkpoint frames
//! and shard snapshots (`nsm-checkpoint`), partitioned like the input (changelog partition `p` carries input partition `p` of every
//! input topic), so that the instance a partition moves to rebuilds its state from there.
//!
//! This module moves opaque keys and values, and each record's epoch (the
//! [`EPOCH_HEADER`]); what they mean, which record ends a write and how a restore treats an
//! unfinished one or one of an older epoch are the state store's business.
//!
//! A topic nsm creates compacts (replicas: `kafka.replication_factor`, else the broker's), and
//! keeps records a day before compaction may touch them (`min.compaction.lag.ms`): tombstoned
//! frames stay readable, so an instance back within the day goes on from its local head. An
//! existing topic that does not compact is refused: the broker would delete state by age. A
//! record waits at most half the group session for its acknowledgement (`delivery_timeout`), so
//! an instance cut off with a write in flight gives it up before the group can hand its
//! partitions on. The reader refuses an offset gone from the log (`auto.offset.reset=error`)
//! rather than skip to its end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{
    AdminClient, AdminOptions, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
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

/// librdkafka's default `session.timeout.ms`.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a changelog record may wait for its acknowledgement before its write fails: half
/// the consumer's `session.timeout.ms` (librdkafka's default 45 s, so 22.5 s). The group
/// hands an instance's partitions to another only once its session has expired, so an
/// instance cut off from the brokers with a write in flight gives that write up (and stops,
/// as every failed write stops nsm) well before another instance can have taken its
/// partitions, rather than wait for the network and then land its records after the new
/// owner's. A broker away for less than that only delays the write.
pub(crate) fn delivery_timeout(settings: &ClientSettings) -> Duration {
    let session = settings
        .properties
        .get("session.timeout.ms")
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map_or(DEFAULT_SESSION_TIMEOUT, Duration::from_millis);
    (session / 2).max(Duration::from_millis(1))
}

/// Makes sure the changelog topic exists, compacted, with at least `partitions` partitions,
/// adding partitions to an existing one that has fewer (its partition `p` must exist for
/// every input partition `p`). A topic nsm creates gets `replication_factor` replicas, or the
/// broker's `default.replication.factor` when `None`. An existing topic whose
/// `cleanup.policy` does not compact is refused: the broker would delete state by age.
pub fn ensure_changelog_topic(
    settings: &ClientSettings,
    topic: &str,
    partitions: usize,
    replication_factor: Option<i32>,
) -> Result<(), KafkaError> {
    let existing = crate::topic_partition_count(settings, topic)?;
    match existing {
        None => create_changelog_topic(settings, topic, partitions, replication_factor)?,
        Some(_) => check_compacted(settings, topic)?,
    }
    match crate::topic_partition_count(settings, topic)? {
        Some(found) if found >= partitions => Ok(()),
        Some(found) => extend_changelog_topic(settings, topic, found, partitions),
        None => Err(KafkaError::Other(format!(
            "the changelog topic {topic:?} (state.changelog_topic) is not visible after creating it"
        ))),
    }
}

/// Gives the changelog topic `wanted` partitions when it has `found`: input partitions were
/// added (or an input topic has more than the others had). Waits until the new partitions
/// show in the metadata.
pub fn extend_changelog_topic(
    settings: &ClientSettings,
    topic: &str,
    found: usize,
    wanted: usize,
) -> Result<(), KafkaError> {
    let refused = |detail: String| {
        KafkaError::Other(format!(
            "the changelog topic {topic:?} (state.changelog_topic) has {found} partitions and \
             cannot be given the {wanted} the input topics need: {detail}; add partitions to it \
             (its partition p holds the state of input partition p)"
        ))
    };
    info!(
        topic,
        from = found,
        to = wanted,
        "adding partitions to the changelog topic"
    );
    let admin: AdminClient<DefaultClientContext> = settings.create(ClientRole::Producer, &[])?;
    let new_partitions = NewPartitions::new(topic, wanted);
    let results = block_on(admin.create_partitions(&[new_partitions], &admin_options()))?
        .map_err(|error| refused(error.to_string()))?;
    for result in results {
        if let Err((_, code)) = result {
            return Err(refused(code.to_string()));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match crate::topic_partition_count(settings, topic)? {
            Some(count) if count >= wanted => return Ok(()),
            _ if Instant::now() >= deadline => {
                return Err(refused(
                    "the new partitions did not show in the metadata within 30s".into(),
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn create_changelog_topic(
    settings: &ClientSettings,
    topic: &str,
    partitions: usize,
    replication_factor: Option<i32>,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.create(ClientRole::Producer, &[])?;
    let wanted = i32::try_from(partitions.max(1)).unwrap_or(i32::MAX);
    // -1: the broker's default.replication.factor (Kafka 2.4 and later).
    let replication = TopicReplication::Fixed(replication_factor.unwrap_or(-1));
    // Compacted: the latest value of every key is kept, deleted keys go after
    // delete.retention.ms, and nothing else is ever deleted by age.
    // A day before compaction may touch a record: an unfinished write's records cannot
    // replace the finished values a new owner reverts them to before it has done so.
    let new_topic = NewTopic::new(topic, wanted, replication)
        .set("cleanup.policy", "compact")
        .set("retention.ms", "-1")
        .set("min.compaction.lag.ms", "86400000");
    let results = block_on(admin.create_topics(&[new_topic], &admin_options()))?
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
    Ok(())
}

/// Refuses an existing changelog topic that the broker cleans up by age (`cleanup.policy`
/// without `compact`): its old records, the state of keys not written since, would go.
/// A broker that does not say is trusted, with a warning.
fn check_compacted(settings: &ClientSettings, topic: &str) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.create(ClientRole::Producer, &[])?;
    // A broker without DescribeConfigs (librdkafka's mock cluster) never answers: a short
    // request timeout keeps the start quick, and a broker that does not say is trusted.
    let options = admin_options().request_timeout(Some(DESCRIBE_TIMEOUT));
    let described = block_on(admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &options))?;
    let policy = match described {
        Ok(results) => results.into_iter().find_map(|result| {
            result.ok().and_then(|resource| {
                resource
                    .get("cleanup.policy")
                    .and_then(|entry| entry.value.clone())
            })
        }),
        Err(error) => {
            warn!(topic, error = %error, "cannot read the changelog topic's cleanup.policy; make sure it is compact");
            return Ok(());
        }
    };
    match policy {
        Some(policy) if policy.split(',').any(|part| part.trim() == "compact") => Ok(()),
        Some(policy) => Err(KafkaError::Other(format!(
            "the changelog topic {topic:?} (state.changelog_topic) has cleanup.policy={policy}: \
             the broker would delete state by age; set cleanup.policy=compact on it (for example \
             kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config \
             cleanup.policy=compact) or point state.changelog_topic at a compacted topic"
        ))),
        None => {
            warn!(topic, "the broker did not say the changelog topic's cleanup.policy; make sure it is compact");
            Ok(())
        }
    }
}

/// How long the changelog topic's `cleanup.policy` is asked for at start.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(3);

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

/// Runs an admin request to its end on a runtime of its own (admin calls are rare: at start,
/// and when partitions are added).
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, KafkaError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KafkaError::Other(e.to_string()))?;
    Ok(runtime.block_on(future))
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
/// every record before it was acknowledged. A record not acknowledged within the delivery
/// timeout (`delivery_timeout`) fails the write, and every one after it: the writer is not
/// used again.
pub struct ChangelogWriter {
    producer: ThreadedProducer<ChangelogContext>,
    topic: String,
    state: Arc<Mutex<DeliveryState>>,
    timeout: Duration,
}

impl ChangelogWriter {
    pub fn new(settings: &ClientSettings, topic: &str) -> Result<Self, KafkaError> {
        let state = Arc::new(Mutex::new(DeliveryState::default()));
        let timeout = delivery_timeout(settings);
        let timeout_ms = timeout.as_millis().to_string();
        // Every in-sync replica acknowledges, retried until the delivery timeout: a checkpoint
        // waits for its changelog, so a cut-off instance must give up before the group moves
        // its partitions (see `delivery_timeout`).
        let producer = settings.create_with_context(
            ClientRole::Producer,
            &[
                ("acks", "all"),
                ("message.timeout.ms", &timeout_ms),
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
            timeout,
        })
    }

    /// Queues one record (`value` none: a tombstone), carrying `epoch` in the
    /// [`EPOCH_HEADER`] when given (frames carry theirs in their keys), waiting while the local
    /// queue is full unless `give_up` says so or a record before it failed.
    pub fn send(
        &self,
        partition: i32,
        key: &[u8],
        value: Option<&[u8]>,
        epoch: Option<u64>,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), KafkaError> {
        let epoch = epoch.map(u64::to_be_bytes);
        loop {
            let mut record: BaseRecord<'_, [u8], [u8], ()> =
                BaseRecord::to(&self.topic).partition(partition).key(key);
            if let Some(epoch) = &epoch {
                record = record.headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                    key: EPOCH_HEADER,
                    value: Some(&epoch[..]),
                }));
            }
            if let Some(value) = value {
                record = record.payload(value);
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Records queued earlier time out and free the queue: the write has
                    // failed then, and waits no longer.
                    if let Some(failure) = self.failure() {
                        return Err(failure);
                    }
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

    /// Waits until every queued record is acknowledged (each at most the delivery timeout),
    /// unless `give_up` says so. Returns the next offset of each changelog partition written
    /// since the last call; any record refused or not acknowledged in time makes it an error,
    /// at once.
    pub fn await_delivery(
        &self,
        give_up: &dyn Fn() -> bool,
    ) -> Result<HashMap<i32, i64>, KafkaError> {
        let started = Instant::now();
        let mut warned = false;
        let delivered = crate::delivery::wait_delivered(
            &|| self.producer.in_flight_count(),
            &|| give_up() || self.failure().is_some(),
            Duration::from_secs(5),
            &mut || {
                warned = true;
                warn!(topic = %self.topic, timeout_ms = self.timeout.as_millis() as u64,
                      "changelog not acknowledged yet: the checkpoint waits for the broker, at most the delivery timeout");
            },
        );
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
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
        Ok(std::mem::take(&mut state.next_offsets))
    }

    /// The error of the records refused or not acknowledged in time, if any was.
    fn failure(&self) -> Option<KafkaError> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (state.failures > 0).then(|| {
            KafkaError::Other(format!(
                "{} changelog record(s) refused by the broker or not acknowledged within {} ms \
                 (half of session.timeout.ms); the first: {}",
                state.failures,
                self.timeout.as_millis(),
                state.first_failure.as_deref().unwrap_or("unknown")
            ))
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changelog_write_gives_up_within_half_the_group_session() {
        let mut settings = ClientSettings::new("127.0.0.1:1");
        assert_eq!(delivery_timeout(&settings), Duration::from_millis(22_500));
        settings.properties.insert("session.timeout.ms", "2000");
        assert_eq!(delivery_timeout(&settings), Duration::from_secs(1));

        // No broker listens there: the write fails once its records time out, rather than
        // wait for one, and so does every later write of the writer.
        let writer = ChangelogWriter::new(&settings, "changelog").expect("writer");
        let started = Instant::now();
        writer
            .send(0, b"key", Some(b"value"), Some(7), &|| false)
            .expect("queued");
        let error = writer
            .await_delivery(&|| false)
            .expect_err("nothing acknowledges it");
        assert!(started.elapsed() < Duration::from_secs(10), "{error}");
        assert!(
            error
                .to_string()
                .contains("not acknowledged within 1000 ms"),
            "{error}"
        );
        assert!(writer.await_delivery(&|| false).is_err());
    }

    #[test]
    fn records_carry_their_epoch_when_given_one_and_frames_go_without() {
        let cluster = crate::mock::start(&[("changelog", 1)]).expect("mock cluster");
        let settings = ClientSettings::new(cluster.bootstrap_servers());
        let writer = ChangelogWriter::new(&settings, "changelog").expect("writer");
        writer
            .send(0, b"legacy", Some(b"a"), Some(7), &|| false)
            .expect("queued");
        writer
            .send(0, b"frame", Some(b"b"), None, &|| false)
            .expect("queued");
        let next = writer.await_delivery(&|| false).expect("acknowledged");
        assert_eq!(next.get(&0), Some(&2));
        let reader = ChangelogReader::new(&settings, "changelog").expect("reader");
        let mut read = Vec::new();
        reader
            .read(0, 0, 2, &mut |offset, key, _, epoch| {
                read.push((offset, key.to_vec(), epoch));
                Ok(())
            })
            .expect("read");
        assert_eq!(
            read,
            [
                (0, b"legacy".to_vec(), Some(7)),
                (1, b"frame".to_vec(), None)
            ]
        );
    }
}
