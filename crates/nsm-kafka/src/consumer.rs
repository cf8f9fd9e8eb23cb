//! The consumer loop: one thread polls Kafka, hands each message to the handler, forwards
//! rejected ones to the dead-letter topic, and checkpoints on an interval.
//!
//! A plain thread with `BaseConsumer` rather than an async stream: rebalance callbacks then
//! run inside `poll`, on this thread, between two messages, so the handler can persist a
//! partition before giving it up without any cross-task coordination.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nsm_core::config::{DeadLetterOnFailure, StartFrom};
use nsm_core::PartitionKey;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message};
use tracing::{debug, error, info, warn};

use crate::client::{ClientRole, ClientSettings};
use crate::dead_letter::{DeadLetter, DeadLetterProducer, DeadLetterStats, LogLimiter};
use crate::KafkaError;

/// What to do with a message after the handler saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Applied or skipped; nothing more to do.
    Done,
    /// Rejected: forward to the dead-letter topic with this reason label and detail.
    DeadLetter {
        reason: &'static str,
        detail: String,
    },
}

/// A failure of the handler that the consumer cannot work around (storage is broken).
#[derive(Debug, Clone)]
pub struct HandlerError(pub String);

/// Consumer lag of one partition, from librdkafka's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub key: PartitionKey,
    pub lag: i64,
}

/// The next offset of each partition, to commit to the group.
pub type Offsets = Vec<(PartitionKey, i64)>;

/// The pipeline behind the consumer.
pub trait PartitionHandler: Send + 'static {
    /// Partitions were assigned: take them over and say where to resume each, in order
    /// (`None`: from the group's committed offset, or `auto.offset.reset`).
    fn assigned(&mut self, partitions: &[PartitionKey]) -> Result<Vec<Option<i64>>, HandlerError>;
    /// Partitions are being revoked: persist them and let them go.
    fn revoked(&mut self, partitions: &[PartitionKey]) -> Result<(), HandlerError>;
    /// Partitions are being revoked but must not be persisted: the group session was lost
    /// (the group may have given them to another instance already), or their dead letters are
    /// not delivered. Let them go at once, without storing anything more of them nor waiting
    /// for a write in flight; their new owner resumes from their last stored state.
    fn abandoned(&mut self, partitions: &[PartitionKey]);
    /// One message. `produced_ms` is the Kafka message timestamp.
    fn process(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        payload: &[u8],
        produced_ms: Option<i64>,
    ) -> Disposition;
    /// Persist state and offsets atomically; return the next offset of each partition, to
    /// commit to the group. Only called once the dead letters before it are delivered.
    fn checkpoint(&mut self) -> Result<Offsets, HandlerError>;
    /// The last checkpoint, at shutdown: like [`PartitionHandler::checkpoint`], but stored
    /// before it returns (a handler may store checkpoints while the next events are applied).
    fn finish(&mut self) -> Result<Offsets, HandlerError> {
        self.checkpoint()
    }
    /// Called at least every poll interval, with or without messages.
    fn tick(&mut self);
    /// Whether a checkpoint is due before the interval ends: the handler holds as many
    /// unstored changes as it should (its memory would otherwise grow with the rate of
    /// messages). Asked after every poll.
    fn checkpoint_due(&self) -> bool {
        false
    }
    /// Fresh consumer-lag figures.
    fn lag(&mut self, lags: Vec<PartitionLag>);
    /// How many of the cluster's brokers the consumer is connected to, of those it knows.
    fn brokers(&mut self, _up: usize, _known: usize) {}
}

/// Settings of the consumer loop.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub client: ClientSettings,
    pub topics: Vec<String>,
    pub group_id: String,
    pub dead_letter_topic: String,
    /// What a dead letter the broker refuses for good does: held (no checkpoint until it is
    /// delivered) or dropped.
    pub dead_letter_on_failure: DeadLetterOnFailure,
    pub checkpoint_interval: Duration,
    /// Where a partition with neither a stored nor a committed offset starts.
    pub start_from: StartFrom,
}

struct Shared<H> {
    handler: Mutex<H>,
    dead_letters: DeadLetterProducer,
    start_from: StartFrom,
    /// Set when the handler failed in a rebalance: the loop stops with that error.
    fatal: Mutex<Option<String>>,
}

impl<H> Shared<H> {
    fn handler(&self) -> MutexGuard<'_, H> {
        // A poisoned lock means the handler panicked mid-update; its state is suspect, but
        // the next checkpoint or restart decides, so carry on with the inner value.
        self.handler
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn fail(&self, message: String) {
        error!(error = %message, "stopping the consumer");
        let mut fatal = self
            .fatal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        fatal.get_or_insert(message);
    }
}

struct Context<H> {
    shared: Arc<Shared<H>>,
}

impl<H: PartitionHandler> ClientContext for Context<H> {
    fn stats(&self, statistics: Statistics) {
        let mut lags = Vec::new();
        for (topic, topic_stats) in statistics.topics {
            let topic: Arc<str> = topic.into();
            for (partition, partition_stats) in topic_stats.partitions {
                // -1 is librdkafka's internal unassigned partition; a negative lag is unknown.
                if partition >= 0 && partition_stats.consumer_lag >= 0 {
                    lags.push(PartitionLag {
                        key: PartitionKey::new(topic.clone(), partition),
                        lag: partition_stats.consumer_lag,
                    });
                }
            }
        }
        // Bootstrap entries (node id -1) stand for the configured addresses, not brokers.
        let brokers = statistics
            .brokers
            .values()
            .filter(|broker| broker.nodeid >= 0);
        let (known, up) = brokers.fold((0, 0), |(known, up), broker| {
            (known + 1, up + usize::from(broker.state == "UP"))
        });
        let mut handler = self.shared.handler();
        handler.lag(lags);
        handler.brokers(up, known);
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        warn!(error = %error, reason, "kafka client error");
    }
}

fn keys_of(list: &TopicPartitionList) -> Vec<PartitionKey> {
    list.elements()
        .iter()
        .map(|element| PartitionKey::new(element.topic(), element.partition()))
        .collect()
}

impl<H: PartitionHandler> ConsumerContext for Context<H> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        error: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let keys = keys_of(list);
                info!(partitions = ?keys.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions assigned");
                self.shared.dead_letters.owned(&keys);
                match self.shared.handler().assigned(&keys) {
                    Ok(offsets) => {
                        let new: Vec<PartitionKey> = keys
                            .iter()
                            .zip(&offsets)
                            .filter(|(_, offset)| offset.is_none())
                            .map(|(key, _)| key.clone())
                            .collect();
                        let mut starts: Vec<(PartitionKey, Offset)> = keys
                            .iter()
                            .zip(offsets)
                            .filter_map(|(key, offset)| {
                                offset.map(|offset| (key.clone(), Offset::Offset(offset)))
                            })
                            .collect();
                        match start_offsets(consumer, &new, self.shared.start_from) {
                            Ok(found) => starts.extend(found),
                            Err(message) => {
                                // Not assigned: reading from the earliest offset would count
                                // the history kafka.start_from leaves out. The loop stops.
                                self.shared.fail(message);
                                return;
                            }
                        }
                        for (key, offset) in starts {
                            if let Err(error) =
                                list.set_partition_offset(&key.topic, key.partition, offset)
                            {
                                warn!(partition = %key, error = %error, "cannot set the resume offset");
                            }
                        }
                    }
                    Err(HandlerError(message)) => self
                        .shared
                        .fail(format!("cannot load partition state: {message}")),
                }
                let result = if cooperative {
                    consumer.incremental_assign(list)
                } else {
                    consumer.assign(list)
                };
                if let Err(error) = result {
                    self.shared
                        .fail(format!("cannot assign partitions: {error}"));
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let keys = keys_of(list);
                info!(partitions = ?keys.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions revoked");
                if consumer.assignment_lost() {
                    // The session expired (cut off from the coordinator) or the member was
                    // fenced: the group may have given these partitions to another instance
                    // already. Nothing more of them is stored, which would land after the new
                    // owner's writes, nor shown, which would count them twice.
                    warn!("group session lost: the partitions are given up unstored and their events will be re-read by their new owner");
                    self.shared.dead_letters.forget(&keys);
                    self.shared.handler().abandoned(&keys);
                // Dead letters first, then state: the stored offsets never pass an undelivered one.
                } else if let Err(error) = self.shared.dead_letters.flush(Duration::from_secs(30)) {
                    warn!(error = %error, "dead letters not yet delivered at revoke; the partitions are given up unstored and their events will be re-read");
                    self.shared.dead_letters.forget(&keys);
                    self.shared.handler().abandoned(&keys);
                } else if let Err(HandlerError(message)) = self.shared.handler().revoked(&keys) {
                    self.shared
                        .fail(format!("cannot persist revoked partitions: {message}"));
                }
                let result = if cooperative {
                    consumer.incremental_unassign(list)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    warn!(error = %error, "cannot unassign partitions");
                }
            }
            other => {
                warn!(error = ?other, "rebalance error; dropping the assignment");
                if let Err(error) = consumer.unassign() {
                    warn!(error = %error, "cannot unassign partitions");
                }
            }
        }
    }
}

/// Where partitions without a stored offset start, for `kafka.start_from`: `Earliest` leaves
/// them to librdkafka (the group's committed offset, else `auto.offset.reset`, which nsm sets
/// to `earliest`); otherwise a partition the group has a committed offset for resumes there,
/// and the others start at the end of the log, or at the first message at or after the time.
fn start_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &[PartitionKey],
    start_from: StartFrom,
) -> Result<Vec<(PartitionKey, Offset)>, String> {
    if partitions.is_empty() || start_from == StartFrom::Earliest {
        return Ok(Vec::new());
    }
    let timeout = Duration::from_secs(30);
    let mut list = TopicPartitionList::new();
    for key in partitions {
        list.add_partition(&key.topic, key.partition);
    }
    let committed = consumer.committed_offsets(list, timeout).map_err(|error| {
        format!("cannot read the group's committed offsets (to apply kafka.start_from): {error}")
    })?;
    let mut starts = Vec::new();
    let mut without = TopicPartitionList::new();
    for element in committed.elements() {
        let key = PartitionKey::new(element.topic(), element.partition());
        match element.offset() {
            Offset::Offset(offset) => {
                info!(partition = %key, offset, "partition has no stored state: resuming from the group's committed offset");
                starts.push((key, Offset::Offset(offset)));
            }
            _ => {
                let position = match start_from {
                    StartFrom::Time(ms) => Offset::Offset(ms),
                    _ => Offset::End,
                };
                without
                    .add_partition_offset(&key.topic, key.partition, position)
                    .map_err(|error| format!("partition {key}: {error}"))?;
            }
        }
    }
    if without.count() == 0 {
        return Ok(starts);
    }
    let found = match start_from {
        StartFrom::Time(_) => consumer
            .offsets_for_times(without, timeout)
            .map_err(|error| {
                format!("cannot look up the offsets of kafka.start_from's time: {error}")
            })?,
        _ => without,
    };
    for element in found.elements() {
        let key = PartitionKey::new(element.topic(), element.partition());
        // A time after the last message finds no offset: the partition starts at its end.
        let offset = match element.offset() {
            Offset::Offset(offset) => Offset::Offset(offset),
            _ => Offset::End,
        };
        match offset {
            Offset::Offset(offset) => {
                info!(partition = %key, offset, "new partition: starting at the first message at or after kafka.start_from")
            }
            _ => {
                info!(partition = %key, "new partition: starting at the end of the log (kafka.start_from); earlier events are not read")
            }
        }
        starts.push((key, offset));
    }
    Ok(starts)
}

/// Runs the consumer until `stop` is set, then checkpoints and leaves the group.
pub fn run_consumer<H: PartitionHandler>(
    options: &ConsumerOptions,
    handler: H,
    dead_letter_stats: Arc<DeadLetterStats>,
    stop: Arc<AtomicBool>,
) -> Result<(), KafkaError> {
    let dead_letters = DeadLetterProducer::new(
        &options.client,
        &options.dead_letter_topic,
        dead_letter_stats,
        options.dead_letter_on_failure,
    )?;
    let shared = Arc::new(Shared {
        handler: Mutex::new(handler),
        dead_letters,
        start_from: options.start_from,
        fatal: Mutex::new(None),
    });
    let consumer: BaseConsumer<Context<H>> = options.client.create_with_context(
        ClientRole::Consumer,
        &[
            ("group.id", &options.group_id),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
            ("enable.partition.eof", "false"),
        ],
        Context {
            shared: shared.clone(),
        },
    )?;
    let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    info!(brokers = %options.client.brokers, topics = ?options.topics, group = %options.group_id,
          properties = %options.client.redacted(), "consumer started");

    let mut topic_names: HashMap<String, Arc<str>> = HashMap::new();
    let mut last_checkpoint = Instant::now();
    let mut last_commit: Option<Instant> = None;
    let mut postponed_log = LogLimiter::default();
    let mut result = Ok(());
    while !stop.load(Ordering::Relaxed) {
        if let Some(message) = take_fatal(&shared) {
            result = Err(KafkaError::Other(message));
            break;
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => {
                let topic = match topic_names.get(message.topic()) {
                    Some(topic) => topic.clone(),
                    None => {
                        let topic: Arc<str> = message.topic().into();
                        topic_names.insert(message.topic().to_string(), topic.clone());
                        topic
                    }
                };
                let key = PartitionKey {
                    topic,
                    partition: message.partition(),
                };
                let payload = message.payload().unwrap_or_default();
                let produced_ms = message.timestamp().to_millis();
                let disposition =
                    shared
                        .handler()
                        .process(&key, message.offset(), payload, produced_ms);
                if let Disposition::DeadLetter { reason, detail } = disposition {
                    shared.dead_letters.send(&DeadLetter {
                        source_topic: message.topic(),
                        source_partition: message.partition(),
                        source_offset: message.offset(),
                        key: message.key(),
                        payload,
                        reason,
                        detail: &detail,
                    });
                }
            }
            Some(Err(error)) => warn!(error = %error, "consume error"),
            None => {}
        }
        let due = {
            let mut handler = shared.handler();
            handler.tick();
            handler.checkpoint_due()
        };
        if due || last_checkpoint.elapsed() >= options.checkpoint_interval {
            let commit = last_commit.is_none_or(|commit| commit.elapsed() >= GROUP_COMMIT_INTERVAL);
            match checkpoint(
                &consumer,
                &shared,
                H::checkpoint,
                commit,
                &mut postponed_log,
            ) {
                Ok(true) => last_commit = Some(Instant::now()),
                Ok(false) => {}
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
            last_checkpoint = Instant::now();
        }
    }
    if result.is_ok() {
        result = checkpoint(&consumer, &shared, H::finish, true, &mut postponed_log).map(|_| ());
    }
    info!("consumer stopping: leaving the group");
    // Dropping the consumer closes it: the final revoke persists and releases partitions.
    drop(consumer);
    if let Some(message) = take_fatal(&shared) {
        result = result.and(Err(KafkaError::Other(message)));
    }
    result
}

fn take_fatal<H>(shared: &Shared<H>) -> Option<String> {
    shared
        .fatal
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// The group's committed offsets serve lag tools and a fallback start, so they are committed
/// at most once a second rather than at every checkpoint: while the coordinator is away, each
/// commit waits and is retried, and librdkafka rejoins the group only once every one is
/// answered (a 20 s outage piled up 55 at 100 ms checkpoints).
const GROUP_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Stores a checkpoint and, if `commit`, commits its offsets to the group; says whether it did.
fn checkpoint<H: PartitionHandler>(
    consumer: &BaseConsumer<Context<H>>,
    shared: &Shared<H>,
    persist: fn(&mut H) -> Result<Offsets, HandlerError>,
    commit: bool,
    postponed_log: &mut LogLimiter<()>,
) -> Result<bool, KafkaError> {
    if let Err(error) = shared.dead_letters.flush(Duration::from_secs(5)) {
        // Not fatal: the broker may be briefly away, or the letters held until it takes them.
        // State stays in memory and the next checkpoint tries again; nothing past an
        // undelivered dead letter is stored.
        if let Some(reason) = shared.dead_letters.over_limit() {
            return Err(KafkaError::Other(reason));
        }
        if let Some(left_out) = postponed_log.allow((), Duration::from_secs(30)) {
            warn!(error = %error, postponed_since_last_line = left_out, "dead letters not delivered yet; checkpoint postponed");
        }
        return Ok(false);
    }
    let offsets =
        persist(&mut shared.handler()).map_err(|HandlerError(detail)| KafkaError::Handler {
            action: "persist",
            detail,
        })?;
    if offsets.is_empty() || !commit {
        return Ok(false);
    }
    let mut list = TopicPartitionList::new();
    for (key, offset) in &offsets {
        if let Err(error) =
            list.add_partition_offset(&key.topic, key.partition, Offset::Offset(*offset))
        {
            debug!(partition = %key, error = %error, "cannot add offset to commit");
        }
    }
    // The group's committed offsets are for lag monitoring and a fallback: the truth is the
    // offset stored with the state, so an async commit that fails loses nothing.
    if let Err(error) = consumer.commit(&list, CommitMode::Async) {
        debug!(error = %error, "offset commit to the group failed");
    }
    Ok(true)
}
