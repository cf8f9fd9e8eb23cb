//! The consumer loop: one thread polls Kafka, hands each message to the handler, forwards
//! rejected ones to the dead-letter topic, and checkpoints on an interval.
//!
//! A plain thread with `BaseConsumer` rather than an async stream: rebalance callbacks then
//! run inside `poll`, on this thread, between two messages, so the handler can persist a
//! partition before giving it up without any cross-task coordination.
//!
//! So nothing long may run inside `poll`. A restore runs on a thread of its own (`nsm-restore`),
//! its partitions assigned at once but paused: librdkafka ignores a new rebalance until the
//! assignment it handed out is assigned, so a restore left in the callback held the whole
//! group up; the next rebalance stops it. A revoked partition is stored before it is given up,
//! unless its dead letters or forwarded records cannot be delivered first, or the session was
//! lost (`assignment_lost`): then it is given up unstored, at once, and never written again. A
//! checkpoint still being stored is waited for only when the handler holds, for a few seconds,
//! then the partitions are paused so that polling goes on serving the group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nsm_core::config::{DeadLetterOnFailure, StartFrom};
use nsm_core::event::RecordMeta;
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
use crate::forward::{FlushError, Forward, ForwardProducer};
use crate::record::MessageRecord;
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
    /// Applied here, and to be counted on through the repartition topic as these records.
    Forward(Vec<Forward>),
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

/// Work that brings assigned partitions up to date, run off the consumer thread. It stops
/// soon after its flag is set (a rebalance overtook it), with an error, leaving what it
/// stored consistent.
pub type Restore<R> = Box<dyn FnOnce(&AtomicBool) -> Result<R, HandlerError> + Send>;

/// The pipeline behind the consumer.
pub trait PartitionHandler: Send + 'static {
    /// What a restore hands back to the consumer thread.
    type Restored: Send + 'static;
    /// Partitions were assigned: returns the work that brings their state up to date, run
    /// on a thread of its own. The consumer keeps polling meanwhile (a restore can take longer
    /// than `max.poll.interval.ms`, after which the group would take the member for dead)
    /// and stores no checkpoint until [`PartitionHandler::finish_restore`].
    fn start_restore(
        &mut self,
        partitions: &[PartitionKey],
    ) -> Result<Restore<Self::Restored>, HandlerError>;
    /// The restore of the partitions last assigned ended: take them over and say where to
    /// resume each, in order (`None`: from the group's committed offset, or
    /// `kafka.start_from`).
    fn finish_restore(
        &mut self,
        restored: Self::Restored,
    ) -> Result<Vec<Option<i64>>, HandlerError>;
    /// Both steps at once, on this thread.
    fn assigned(&mut self, partitions: &[PartitionKey]) -> Result<Vec<Option<i64>>, HandlerError> {
        let restore = self.start_restore(partitions)?;
        self.finish_restore(restore(&AtomicBool::new(false))?)
    }
    /// Partitions are being revoked: persist them and let them go.
    fn revoked(&mut self, partitions: &[PartitionKey]) -> Result<(), HandlerError>;
    /// Partitions are being revoked but must not be persisted: the group session was lost
    /// (the group may have given them to another instance already), or their dead letters are
    /// not delivered. Let them go at once, without storing anything more of them nor waiting
    /// for a write in flight; their new owner resumes from their last stored state.
    fn abandoned(&mut self, partitions: &[PartitionKey]);
    /// One message, with its record (key, headers, timestamp).
    fn process(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        payload: &[u8],
        record: &dyn RecordMeta,
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
    /// Whether the handler cannot take more messages until its store catches up: the
    /// consumer waits for it, and past a few seconds pauses its partitions and keeps polling.
    fn hold(&self) -> bool {
        false
    }
    /// Once [`PartitionHandler::hold`] says so, waits up to `patience` for the store to catch
    /// up; whether it did.
    fn wait_for_store(&mut self, _patience: Duration) -> bool {
        !self.hold()
    }
    /// Records for the repartition topic carrying only the owned input partitions' time,
    /// sent before each checkpoint (see docs/design/repartition.md): quiet partitions keep
    /// the repartition partitions' watermarks moving.
    fn time_records(&mut self) -> Vec<Forward> {
        Vec::new()
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
    /// The repartition topic, when metrics count an entity the message key does not hold:
    /// read beside `topics` (from its start), and written by [`Disposition::Forward`].
    pub repartition_topic: Option<String>,
}

struct Shared<H: PartitionHandler> {
    handler: Mutex<H>,
    /// The restore of the partitions last assigned, while it runs.
    restoring: Mutex<Option<Restoring<H::Restored>>>,
    dead_letters: DeadLetterProducer,
    forwards: Option<ForwardProducer>,
    repartition_topic: Option<String>,
    start_from: StartFrom,
    /// Set when the handler failed in a rebalance: the loop stops with that error.
    fatal: Mutex<Option<String>>,
}

/// Partitions assigned whose state is being brought up to date on a thread of its own.
/// librdkafka waits for them to be assigned (its wait-assign-call state, heartbeating
/// meanwhile): the consumer thread assigns them once the restore ends.
struct Restoring<R> {
    partitions: Vec<PartitionKey>,
    worker: JoinHandle<Result<R, HandlerError>>,
    /// Set to stop the restore early.
    cancel: Arc<AtomicBool>,
    /// Every partition owned, paused while the restore runs: nothing is applied (no
    /// checkpoint may be stored beside the restore's writes), and the restored ones are read
    /// from where their state ends once it is known.
    paused: Vec<PartitionKey>,
}

impl<H: PartitionHandler> Shared<H> {
    /// Waits for the records forwarded to the repartition topic, if any are.
    fn flush_forwards(&self, timeout: Duration) -> Result<(), FlushError> {
        match &self.forwards {
            Some(forwards) => forwards.flush(timeout),
            None => Ok(()),
        }
    }

    fn restoring(&self) -> MutexGuard<'_, Option<Restoring<H::Restored>>> {
        self.restoring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

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

struct Context<H: PartitionHandler> {
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
                cancel_restore(consumer, &self.shared);
                self.shared.dead_letters.owned(&keys);
                let restore = match self.shared.handler().start_restore(&keys) {
                    Ok(restore) => restore,
                    Err(HandlerError(message)) => {
                        self.shared
                            .fail(format!("cannot load partition state: {message}"));
                        return;
                    }
                };
                // Assigned at once, paused: the group can rebalance again meanwhile (librdkafka
                // ignores a rebalance until the assignment it handed out is assigned), and
                // nothing is fetched until the restore says where each partition resumes.
                let result = if cooperative {
                    consumer.incremental_assign(list)
                } else {
                    consumer.assign(list)
                };
                if let Err(error) = result {
                    self.shared
                        .fail(format!("cannot assign partitions: {error}"));
                    return;
                }
                let paused = pause_owned(consumer);
                let cancel = Arc::new(AtomicBool::new(false));
                let worker_cancel = cancel.clone();
                match std::thread::Builder::new()
                    .name("nsm-restore".into())
                    .spawn(move || restore(&worker_cancel))
                {
                    Ok(worker) => {
                        *self.shared.restoring() = Some(Restoring {
                            partitions: keys,
                            worker,
                            cancel,
                            paused,
                        });
                    }
                    Err(error) => self
                        .shared
                        .fail(format!("cannot start the restore thread: {error}")),
                }
                // The consumer thread seeks and resumes them once restored.
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let keys = keys_of(list);
                info!(partitions = ?keys.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions revoked");
                cancel_restore(consumer, &self.shared);
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
                // Forwarded records likewise: they are sent again by the next owner if not.
                } else if let Err(error) = self.shared.flush_forwards(Duration::from_secs(30)) {
                    warn!(error = ?error, "records for the repartition topic not yet delivered at revoke; the partitions are given up unstored and their events will be re-read");
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
                cancel_restore(consumer, &self.shared);
                if let Err(error) = consumer.unassign() {
                    warn!(error = %error, "cannot unassign partitions");
                }
            }
        }
    }
}

/// Whether `key` is paused for a restore running.
fn restoring_now<H: PartitionHandler>(shared: &Shared<H>, key: &PartitionKey) -> bool {
    shared
        .restoring()
        .as_ref()
        .is_some_and(|restoring| restoring.paused.contains(key))
}

/// How long the consumer thread waits for the checkpoint being stored, without polling, before
/// it pauses its partitions to go on serving the group. A pause drops what librdkafka fetched
/// ahead and fetches it again on resume, from the middle of a batch, which a broker may answer
/// from the next batch on (tansu 0.6 does, and the offsets in between are skipped); a store
/// takes well under a second, and the group waits this long at most.
const HOLD_WAIT: Duration = Duration::from_secs(5);

/// Waits until the handler no longer holds (its store caught up), the consumer is stopped, or
/// `patience` has passed; whether the handler takes messages again.
fn wait_for_store<H: PartitionHandler>(
    shared: &Shared<H>,
    stop: &AtomicBool,
    patience: Duration,
) -> bool {
    let deadline = Instant::now() + patience;
    while !stop.load(Ordering::Relaxed) {
        let left = deadline.saturating_duration_since(Instant::now());
        if shared
            .handler()
            .wait_for_store(left.min(Duration::from_millis(100)))
        {
            return true;
        }
        if left.is_zero() {
            break;
        }
    }
    false
}

/// Pauses every partition owned, returning them: nothing of theirs is applied (and so
/// stored) while a restore writes.
fn pause_owned<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Vec<PartitionKey> {
    let owned = match consumer.assignment() {
        Ok(owned) => owned,
        Err(error) => {
            warn!(error = %error, "cannot read the assignment to pause it during a restore");
            return Vec::new();
        }
    };
    if let Err(error) = consumer.pause(&owned) {
        warn!(error = %error, "cannot pause the partitions owned during a restore");
        return Vec::new();
    }
    keys_of(&owned)
}

fn resume<C: ConsumerContext>(consumer: &BaseConsumer<C>, partitions: &[PartitionKey]) {
    if partitions.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for key in partitions {
        list.add_partition(&key.topic, key.partition);
    }
    if let Err(error) = consumer.resume(&list) {
        warn!(error = %error, "cannot resume the partitions paused during a restore");
    }
}

/// Drops a restore still running: a new rebalance came first. It is stopped and its thread
/// waited for (no other write may run beside its writes; it stops between two records), and
/// its partitions are not taken: the group is not held up for the rest of the restore.
fn cancel_restore<H: PartitionHandler, C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    shared: &Shared<H>,
) {
    let Some(restoring) = shared.restoring().take() else {
        return;
    };
    info!(partitions = ?restoring.partitions.iter().map(ToString::to_string).collect::<Vec<_>>(),
          "a rebalance came before the restore ended: stopping it");
    restoring.cancel.store(true, Ordering::Relaxed);
    let _ = restoring.worker.join();
    resume(consumer, &restoring.paused);
}

/// Once the restore running has ended: hands its result to the handler, moves its
/// partitions to where their state ends and resumes every partition paused for it.
fn finish_restore<H: PartitionHandler>(consumer: &BaseConsumer<Context<H>>, shared: &Shared<H>) {
    let finished = {
        let mut restoring = shared.restoring();
        if !restoring
            .as_ref()
            .is_some_and(|restoring| restoring.worker.is_finished())
        {
            return;
        }
        restoring.take()
    };
    let Some(Restoring {
        partitions,
        worker,
        cancel: _,
        paused,
    }) = finished
    else {
        return;
    };
    let restored = worker
        .join()
        .unwrap_or_else(|_| Err(HandlerError("the restore thread panicked".into())));
    let offsets = match restored.and_then(|restored| shared.handler().finish_restore(restored)) {
        Ok(offsets) => offsets,
        Err(HandlerError(message)) => {
            shared.fail(format!("cannot load partition state: {message}"));
            return;
        }
    };
    // The repartition topic is read from its start (records forwarded before its partitions
    // were first taken count), whatever kafka.start_from says of the input topics.
    let new: Vec<PartitionKey> = partitions
        .iter()
        .zip(&offsets)
        .filter(|(key, offset)| {
            offset.is_none() && shared.repartition_topic.as_deref() != Some(&*key.topic)
        })
        .map(|(key, _)| key.clone())
        .collect();
    let mut starts: Vec<(PartitionKey, Offset)> = partitions
        .iter()
        .zip(offsets)
        .filter_map(|(key, offset)| offset.map(|offset| (key.clone(), Offset::Offset(offset))))
        .collect();
    match start_offsets(consumer, &new, shared.start_from) {
        Ok(found) => starts.extend(found),
        Err(message) => {
            // Not assigned: reading from the earliest offset would count the history
            // kafka.start_from leaves out. The loop stops.
            shared.fail(message);
            return;
        }
    }
    // Those without a start keep the one librdkafka found (the group's committed offset,
    // else the earliest).
    let mut list = TopicPartitionList::new();
    for (key, offset) in starts {
        if let Err(error) = list.add_partition_offset(&key.topic, key.partition, offset) {
            warn!(partition = %key, error = %error, "cannot set the resume offset");
        }
    }
    if list.count() > 0 {
        match consumer.seek_partitions(list, Duration::from_secs(30)) {
            Ok(sought) => {
                for element in sought.elements() {
                    if let Err(error) = element.error() {
                        shared.fail(format!(
                            "cannot move partition {} {} to where its state ends: {error}",
                            element.topic(),
                            element.partition()
                        ));
                        return;
                    }
                }
            }
            Err(error) => {
                shared.fail(format!(
                    "cannot move partitions to where their state ends: {error}"
                ));
                return;
            }
        }
    }
    resume(consumer, &paused);
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
    let forwards = match &options.repartition_topic {
        Some(topic) => Some(ForwardProducer::new(&options.client, topic)?),
        None => None,
    };
    let shared = Arc::new(Shared {
        handler: Mutex::new(handler),
        restoring: Mutex::new(None),
        dead_letters,
        forwards,
        repartition_topic: options.repartition_topic.clone(),
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
    let topics: Vec<&str> = options
        .topics
        .iter()
        .chain(&options.repartition_topic)
        .map(String::as_str)
        .collect();
    consumer.subscribe(&topics)?;
    info!(brokers = %options.client.brokers, topics = ?options.topics, group = %options.group_id,
          properties = %options.client.redacted(), "consumer started");

    let mut topic_names: HashMap<String, Arc<str>> = HashMap::new();
    let mut last_checkpoint = Instant::now();
    let mut last_commit: Option<Instant> = None;
    let mut postponed_log = LogLimiter::default();
    // Partitions paused while the handler holds (see `PartitionHandler::hold`).
    let mut held: Option<Vec<PartitionKey>> = None;
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
                if restoring_now(&shared, &key) {
                    // Fetched before its pause took effect: read again once restored.
                    continue;
                }
                let payload = message.payload().unwrap_or_default();
                let disposition = shared.handler().process(
                    &key,
                    message.offset(),
                    payload,
                    &MessageRecord(&message),
                );
                if let Disposition::Forward(records) = &disposition {
                    if let Some(forwards) = &shared.forwards {
                        for record in records {
                            forwards.send(record);
                        }
                    }
                }
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
        finish_restore(&consumer, &shared);
        if shared.restoring().is_some() {
            // No checkpoint beside the restore's writes; nothing is applied meanwhile.
            shared.handler().tick();
            continue;
        }
        let (due, hold) = {
            let mut handler = shared.handler();
            handler.tick();
            (handler.checkpoint_due(), handler.hold())
        };
        match (&held, hold) {
            (None, true) if !wait_for_store(&shared, &stop, HOLD_WAIT) => {
                info!("pausing consumption until the checkpoint being written is stored");
                held = Some(pause_owned(&consumer));
            }
            (Some(paused), false) => {
                info!("checkpoint stored: consumption resumes");
                resume(&consumer, paused);
                held = None;
            }
            _ => {}
        }
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
    cancel_restore(&consumer, &shared);
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

fn take_fatal<H: PartitionHandler>(shared: &Shared<H>) -> Option<String> {
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
    // Then the records forwarded to the repartition topic, and the input partitions' time.
    if let Some(forwards) = &shared.forwards {
        for record in shared.handler().time_records() {
            forwards.send(&record);
        }
    }
    match shared.flush_forwards(Duration::from_secs(5)) {
        Ok(()) => {}
        Err(FlushError::Refused(reason)) => return Err(KafkaError::Other(reason)),
        Err(FlushError::Slow(timeout)) => {
            if let Some(left_out) = postponed_log.allow((), Duration::from_secs(30)) {
                warn!(timeout = ?timeout, postponed_since_last_line = left_out, "records for the repartition topic not delivered yet; checkpoint postponed");
            }
            return Ok(false);
        }
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
