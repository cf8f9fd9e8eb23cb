//! The dead-letter producer: every rejected message is forwarded as it was, with the reason in
//! headers, so it can be inspected, fixed and replayed.
//!
//! Transient errors (a leader away, the cluster unreachable) are retried by librdkafka for as
//! long as they last (`message.timeout.ms` 0). A letter the broker or the client refuses for
//! good (an unknown topic, no authorization, too large) is, by `kafka.dead_letter_on_failure`,
//! either **held**: kept in memory and sent again every second, while [`DeadLetterProducer::
//! flush`] fails, so that no checkpoint stores an offset past it; or **dropped**: counted and
//! logged, the checkpoints going on. Held letters are bounded ([`MAX_HELD_BYTES`],
//! [`MAX_HELD_LETTERS`]): beyond, the consumer stops, and the restart reads them again from
//! the last stored offsets.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nsm_core::config::DeadLetterOnFailure;
use nsm_core::PartitionKey;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use tracing::{error, info, warn};

use crate::client::{ClientRole, ClientSettings};
use crate::KafkaError;

/// Header with the bounded reason label (`invalid_json`, `late`, ...).
pub const HEADER_REASON: &str = "nsm-reason";
/// Header with the human explanation.
pub const HEADER_ERROR: &str = "nsm-error";
const HEADER_SOURCE_TOPIC: &str = "nsm-source-topic";
const HEADER_SOURCE_PARTITION: &str = "nsm-source-partition";
const HEADER_SOURCE_OFFSET: &str = "nsm-source-offset";
const HEADER_TRUNCATED: &str = "nsm-truncated";

/// Payloads larger than this are cut when the broker refuses them whole.
const TRUNCATED_PAYLOAD_BYTES: usize = 64 * 1024;

/// How often held letters are sent again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// At most one log line per refusal reason in this interval; the counters carry the rest.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Held letters beyond these bounds stop the consumer (the restart resumes from the last
/// stored offsets and rejects, and sends, the same events again): memory stays bounded
/// however long the broker refuses them.
pub(crate) const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;
pub(crate) const MAX_HELD_LETTERS: usize = 100_000;

/// Counters of the dead-letter producer, shared with the exposition.
#[derive(Debug, Default)]
pub struct DeadLetterStats {
    /// Letters acknowledged by the broker.
    pub delivered: AtomicU64,
    /// Deliveries refused for good (unknown topic, not authorized, too large...): every
    /// attempt counts, a held letter's retries too.
    pub failed: AtomicU64,
    /// Letters given up (`kafka.dead_letter_on_failure = "drop"`).
    pub dropped: AtomicU64,
    /// Letters refused and kept to be sent again; no checkpoint is stored while there are.
    pub held: AtomicU64,
}

/// Why the broker or the client refused a letter for good, as a bounded log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Refusal {
    UnknownTopic,
    NotAuthorized,
    TooLarge,
    Other,
}

impl Refusal {
    fn of(code: Option<RDKafkaErrorCode>) -> Refusal {
        match code {
            Some(
                RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::InvalidTopic,
            ) => Refusal::UnknownTopic,
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed,
            ) => Refusal::NotAuthorized,
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge,
            ) => Refusal::TooLarge,
            _ => Refusal::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Refusal::UnknownTopic => "unknown_topic",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::TooLarge => "too_large",
            Refusal::Other => "other",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Refusal::UnknownTopic => "create the dead-letter topic (kafka.dead_letter_topic)",
            Refusal::NotAuthorized => "allow nsm's principal to write the dead-letter topic",
            Refusal::TooLarge => {
                "raise the dead-letter topic's max.message.bytes (letters are cut to 64 KiB)"
            }
            Refusal::Other => "see the error",
        }
    }
}

/// The delivery opaque of a held letter sent again.
const RETRY: usize = 1;

/// One rejected message to forward.
pub(crate) struct DeadLetter<'a> {
    pub source_topic: &'a str,
    pub source_partition: i32,
    pub source_offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub reason: &'a str,
    pub detail: &'a str,
}

/// A letter refused for good and kept to be sent again.
#[derive(Debug, Clone)]
struct HeldLetter {
    source_topic: String,
    source_partition: i32,
    source_offset: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    reason: String,
    detail: String,
    truncated: bool,
    refusal: Refusal,
}

impl HeldLetter {
    fn of(letter: &DeadLetter<'_>, truncated: bool, refusal: Refusal) -> HeldLetter {
        HeldLetter {
            source_topic: letter.source_topic.to_string(),
            source_partition: letter.source_partition,
            source_offset: letter.source_offset,
            key: letter.key.map(<[u8]>::to_vec),
            payload: letter.payload.to_vec(),
            reason: letter.reason.to_string(),
            detail: letter.detail.to_string(),
            truncated,
            refusal,
        }
    }

    /// The letter of a delivery report, from the headers nsm wrote.
    fn of_message<M: Message>(message: &M, refusal: Refusal) -> HeldLetter {
        let mut letter = HeldLetter {
            source_topic: String::new(),
            source_partition: -1,
            source_offset: -1,
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            reason: String::new(),
            detail: String::new(),
            truncated: false,
            refusal,
        };
        for header in message
            .headers()
            .into_iter()
            .flat_map(|headers| headers.iter())
        {
            let value = String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned();
            match header.key {
                HEADER_REASON => letter.reason = value,
                HEADER_ERROR => letter.detail = value,
                HEADER_SOURCE_TOPIC => letter.source_topic = value,
                HEADER_SOURCE_PARTITION => letter.source_partition = value.parse().unwrap_or(-1),
                HEADER_SOURCE_OFFSET => letter.source_offset = value.parse().unwrap_or(-1),
                HEADER_TRUNCATED => letter.truncated = true,
                _ => {}
            }
        }
        letter
    }

    fn letter(&self) -> DeadLetter<'_> {
        DeadLetter {
            source_topic: &self.source_topic,
            source_partition: self.source_partition,
            source_offset: self.source_offset,
            key: self.key.as_deref(),
            payload: &self.payload,
            reason: &self.reason,
            detail: &self.detail,
        }
    }

    fn bytes(&self) -> usize {
        self.payload.len() + self.key.as_ref().map_or(0, Vec::len) + self.detail.len()
    }

    fn source_is(&self, key: &PartitionKey) -> bool {
        self.source_partition == key.partition && self.source_topic == *key.topic
    }
}

/// One log line per key and interval, saying how many were left out since the last.
#[derive(Debug)]
pub(crate) struct LogLimiter<K> {
    last: HashMap<K, (Instant, u64)>,
}

impl<K> Default for LogLimiter<K> {
    fn default() -> Self {
        Self {
            last: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> LogLimiter<K> {
    /// `Some(left out since the last line)` when a line of `key` may be logged now.
    pub(crate) fn allow(&mut self, key: K, interval: Duration) -> Option<u64> {
        let now = Instant::now();
        match self.last.get_mut(&key) {
            Some((at, left_out)) if now.duration_since(*at) < interval => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// The letters refused for good and what to do with them; shared by the delivery callback
/// (the producer's thread) and the consumer thread.
struct Refused {
    policy: DeadLetterOnFailure,
    stats: Arc<DeadLetterStats>,
    state: Mutex<RefusedState>,
}

#[derive(Default)]
struct RefusedState {
    held: Vec<HeldLetter>,
    held_bytes: usize,
    /// Held letters sent again and not yet reported on: still held until delivered.
    retrying: usize,
    /// Partitions given up unstored: their new owner reads and rejects their events again,
    /// so their letters refused later are not held here.
    released: HashSet<PartitionKey>,
    log: LogLimiter<Refusal>,
    /// The last refusal, for the error that postpones a checkpoint.
    last_error: Option<(Refusal, String)>,
    /// Whether letters were held since the last time all were delivered, to log when they are.
    was_holding: bool,
    last_retry: Option<Instant>,
}

impl Refused {
    fn state(&self) -> MutexGuard<'_, RefusedState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The held gauge: letters held, and held ones sent again but not yet delivered.
    fn publish_held(&self, state: &RefusedState) {
        self.stats.held.store(
            (state.held.len() + state.retrying) as u64,
            Ordering::Relaxed,
        );
    }

    /// The delivery report of a held letter sent again has come.
    fn retried(&self) {
        let mut state = self.state();
        state.retrying = state.retrying.saturating_sub(1);
        self.publish_held(&state);
    }

    /// A letter the broker or the client refused for good; `retried` when it was a held
    /// letter sent again.
    fn refuse(
        &self,
        topic: &str,
        letter: HeldLetter,
        error: &dyn std::fmt::Display,
        retried: bool,
    ) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let refusal = letter.refusal;
        let mut state = self.state();
        if retried {
            state.retrying = state.retrying.saturating_sub(1);
        }
        state.last_error = Some((refusal, error.to_string()));
        let source = PartitionKey::new(letter.source_topic.as_str(), letter.source_partition);
        let released = state.released.contains(&source);
        let hold = self.policy == DeadLetterOnFailure::Hold && !released;
        let (source_partition, source_offset) = (letter.source_partition, letter.source_offset);
        if hold {
            state.held_bytes += letter.bytes();
            state.held.push(letter);
            // Said once they are all delivered, whether or not a flush waited for them.
            state.was_holding = true;
            self.publish_held(&state);
        } else {
            if !released {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            self.publish_held(&state);
        }
        let Some(left_out) = state.log.allow(refusal, LOG_INTERVAL) else {
            return;
        };
        let held = state.held.len() + state.retrying;
        drop(state);
        let source_topic = source.topic.as_ref();
        if released {
            warn!(topic, reason = refusal.label(), error = %error, source_topic, source_partition,
                  source_offset, "a dead letter of a partition given up was refused; its new owner sends it again");
        } else if hold {
            error!(topic, reason = refusal.label(), error = %error, source_topic, source_partition,
                   source_offset, held, refused_since_last_line = left_out, fix = refusal.hint(),
                   "a dead letter was refused; it is held and sent again every second, and no checkpoint is stored until it is delivered (values stop advancing; further refusals of this reason are only counted for 10s)");
        } else {
            error!(topic, reason = refusal.label(), error = %error, source_topic, source_partition,
                   source_offset, refused_since_last_line = left_out, fix = refusal.hint(),
                   "a dead letter was refused and dropped (kafka.dead_letter_on_failure = \"drop\"): the rejected event is only counted (further refusals of this reason are only counted for 10s)");
        }
    }
}

pub(crate) struct DeadLetterContext {
    topic: String,
    refused: Arc<Refused>,
}

impl ClientContext for DeadLetterContext {}

impl ProducerContext for DeadLetterContext {
    /// [`RETRY`] for a held letter sent again, 0 for a first send.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, attempt: usize) {
        let retried = attempt == RETRY;
        match result {
            Ok(_) => {
                self.refused.stats.delivered.fetch_add(1, Ordering::Relaxed);
                if retried {
                    self.refused.retried();
                }
            }
            Err((error, message)) => {
                let code = error.rdkafka_error_code();
                if matches!(
                    code,
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                ) {
                    // Purged as the producer closes: nothing past it was stored.
                    if retried {
                        self.refused.retried();
                    }
                    return;
                }
                let letter = HeldLetter::of_message(message, Refusal::of(code));
                self.refused.refuse(&self.topic, letter, error, retried);
            }
        }
    }
}

pub(crate) struct DeadLetterProducer {
    producer: ThreadedProducer<DeadLetterContext>,
    topic: String,
    refused: Arc<Refused>,
}

impl DeadLetterProducer {
    pub fn new(
        settings: &ClientSettings,
        topic: &str,
        stats: Arc<DeadLetterStats>,
        policy: DeadLetterOnFailure,
    ) -> Result<Self, KafkaError> {
        let refused = Arc::new(Refused {
            policy,
            stats,
            state: Mutex::new(RefusedState::default()),
        });
        // Retry forever: a dead letter is only refused on a permanent error, so a broker
        // outage delays checkpoints instead of losing rejected events.
        let producer = settings.create_with_context(
            ClientRole::Producer,
            &[("message.timeout.ms", "0"), ("linger.ms", "20")],
            DeadLetterContext {
                topic: topic.to_string(),
                refused: refused.clone(),
            },
        )?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            refused,
        })
    }

    /// Queues a dead letter, waiting while the local queue is full.
    pub fn send(&self, letter: &DeadLetter<'_>) {
        self.produce(letter, false, false);
    }

    /// Queues `letter`, cut to [`TRUNCATED_PAYLOAD_BYTES`] if `truncated` or if the client
    /// finds it too large; a letter the client refuses for good is held or dropped.
    fn produce(&self, letter: &DeadLetter<'_>, mut truncated: bool, retry: bool) {
        let partition = letter.source_partition.to_string();
        let offset = letter.source_offset.to_string();
        let detail: String = letter.detail.chars().take(1024).collect();
        let cut = |payload: &'_ [u8]| -> usize { payload.len().min(TRUNCATED_PAYLOAD_BYTES) };
        loop {
            let payload = if truncated {
                &letter.payload[..cut(letter.payload)]
            } else {
                letter.payload
            };
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_REASON,
                    value: Some(letter.reason),
                })
                .insert(Header {
                    key: HEADER_ERROR,
                    value: Some(detail.as_str()),
                })
                .insert(Header {
                    key: HEADER_SOURCE_TOPIC,
                    value: Some(letter.source_topic),
                })
                .insert(Header {
                    key: HEADER_SOURCE_PARTITION,
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: HEADER_SOURCE_OFFSET,
                    value: Some(offset.as_str()),
                });
            if truncated {
                headers = headers.insert(Header {
                    key: HEADER_TRUNCATED,
                    value: Some("true"),
                });
            }
            let attempt = if retry { RETRY } else { 0 };
            let mut record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(&self.topic, attempt)
                    .payload(payload)
                    .headers(headers);
            if let Some(key) = letter.key {
                record = record.key(key);
            }
            match self.producer.send(record) {
                Ok(()) => {
                    if retry {
                        let mut state = self.refused.state();
                        state.retrying += 1;
                        self.refused.publish_held(&state);
                    }
                    return;
                }
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The background thread drains the queue; wait for room.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((
                    RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    _,
                )) if !truncated && letter.payload.len() > TRUNCATED_PAYLOAD_BYTES => {
                    truncated = true;
                }
                Err((error, _)) => {
                    let refusal = Refusal::of(error.rdkafka_error_code());
                    let letter = DeadLetter {
                        detail: &detail,
                        ..*letter
                    };
                    // Refused before it was queued: a retry's count was never raised.
                    self.refused.refuse(
                        &self.topic,
                        HeldLetter::of(&letter, truncated, refusal),
                        &error,
                        false,
                    );
                    return;
                }
            }
        }
    }

    /// Sends the held letters again, at most every [`RETRY_INTERVAL`]; one refused as too
    /// large is cut first.
    fn retry_held(&self) {
        let letters = {
            let mut state = self.refused.state();
            if state.held.is_empty()
                || state
                    .last_retry
                    .is_some_and(|at| at.elapsed() < RETRY_INTERVAL)
            {
                return;
            }
            state.last_retry = Some(Instant::now());
            state.held_bytes = 0;
            // Counted as retrying before they leave the list, so the gauge never dips.
            state.retrying += state.held.len();
            std::mem::take(&mut state.held)
        };
        for held in &letters {
            let truncate = held.truncated
                || (held.refusal == Refusal::TooLarge
                    && held.payload.len() > TRUNCATED_PAYLOAD_BYTES);
            self.produce(&held.letter(), truncate, true);
            let mut state = self.refused.state();
            state.retrying -= 1;
            self.refused.publish_held(&state);
        }
    }

    /// Waits until every queued dead letter is delivered, sending held ones again. An error
    /// when some are not delivered within `timeout`, or are held: no checkpoint may be stored.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.retry_held();
            let delivered = crate::delivery::wait_delivered(
                &|| self.producer.in_flight_count(),
                &|| Instant::now() >= deadline,
                timeout,
                &mut || {},
            );
            let mut state = self.refused.state();
            if delivered && state.held.is_empty() && state.retrying == 0 {
                if std::mem::take(&mut state.was_holding) {
                    info!(topic = %self.topic, "the held dead letters are delivered; checkpoints resume");
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                if state.held.is_empty() {
                    return Err(KafkaError::Other(format!(
                        "dead letters not delivered within {timeout:?}"
                    )));
                }
                state.was_holding = true;
                let (refusal, error) = state
                    .last_error
                    .clone()
                    .unwrap_or((Refusal::Other, String::new()));
                return Err(KafkaError::Other(format!(
                    "{} dead letter(s) refused by the broker are held ({}: {error}; {})",
                    state.held.len(),
                    refusal.label(),
                    refusal.hint()
                )));
            }
            drop(state);
            let left = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// Why the held letters must stop the consumer: more than memory should hold.
    pub fn over_limit(&self) -> Option<String> {
        let state = self.refused.state();
        (state.held.len() > MAX_HELD_LETTERS || state.held_bytes > MAX_HELD_BYTES).then(|| {
            format!(
                "{} dead letters ({} bytes) refused by the broker are held, more than nsm keeps \
                 in memory; stopping without storing them, so the restart reads their events again",
                state.held.len(),
                state.held_bytes
            )
        })
    }

    /// Partitions given up unstored: their held letters are forgotten (their new owner reads
    /// and rejects their events again), as are their letters refused later.
    pub fn forget(&self, partitions: &[PartitionKey]) {
        let mut state = self.refused.state();
        state
            .held
            .retain(|letter| !partitions.iter().any(|key| letter.source_is(key)));
        state.held_bytes = state.held.iter().map(HeldLetter::bytes).sum();
        state.released.extend(partitions.iter().cloned());
        self.refused.publish_held(&state);
    }

    /// Partitions taken (back): their letters are theirs to deliver again.
    pub fn owned(&self, partitions: &[PartitionKey]) {
        let mut state = self.refused.state();
        for key in partitions {
            state.released.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_logs_once_per_interval_and_counts_the_rest() {
        let mut limiter = LogLimiter::default();
        assert_eq!(limiter.allow("a", Duration::from_secs(60)), Some(0));
        assert_eq!(limiter.allow("a", Duration::from_secs(60)), None);
        assert_eq!(limiter.allow("a", Duration::from_secs(60)), None);
        assert_eq!(
            limiter.allow("b", Duration::from_secs(60)),
            Some(0),
            "per key"
        );
        assert_eq!(limiter.allow("a", Duration::ZERO), Some(2), "two left out");
    }

    fn letter(partition: i32) -> HeldLetter {
        HeldLetter::of(
            &DeadLetter {
                source_topic: "events",
                source_partition: partition,
                source_offset: 7,
                key: None,
                payload: b"{}",
                reason: "invalid_json",
                detail: "d",
            },
            false,
            Refusal::NotAuthorized,
        )
    }

    fn refused(policy: DeadLetterOnFailure) -> Refused {
        Refused {
            policy,
            stats: Arc::new(DeadLetterStats::default()),
            state: Mutex::new(RefusedState::default()),
        }
    }

    #[test]
    fn a_refused_letter_is_held_or_dropped_by_the_policy() {
        let hold = refused(DeadLetterOnFailure::Hold);
        hold.refuse("dlq", letter(0), &"denied", false);
        hold.refuse("dlq", letter(1), &"denied", false);
        assert_eq!(hold.stats.held.load(Ordering::Relaxed), 2);
        assert_eq!(hold.stats.failed.load(Ordering::Relaxed), 2);
        assert_eq!(hold.stats.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(hold.state().held[0].source_offset, 7);

        let drop = refused(DeadLetterOnFailure::Drop);
        drop.refuse("dlq", letter(0), &"denied", false);
        assert_eq!(drop.stats.held.load(Ordering::Relaxed), 0);
        assert_eq!(drop.stats.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(drop.stats.failed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn letters_of_a_partition_given_up_are_not_held() {
        let hold = refused(DeadLetterOnFailure::Hold);
        hold.state().released.insert(PartitionKey::new("events", 1));
        hold.refuse("dlq", letter(1), &"denied", false);
        assert_eq!(hold.stats.held.load(Ordering::Relaxed), 0);
        assert_eq!(
            hold.stats.dropped.load(Ordering::Relaxed),
            0,
            "not lost: the new owner sends it"
        );
    }

    #[test]
    fn refusals_are_classified_for_the_log() {
        for (code, label) in [
            (RDKafkaErrorCode::TopicAuthorizationFailed, "not_authorized"),
            (RDKafkaErrorCode::UnknownTopicOrPartition, "unknown_topic"),
            (RDKafkaErrorCode::UnknownTopic, "unknown_topic"),
            (RDKafkaErrorCode::MessageSizeTooLarge, "too_large"),
            (RDKafkaErrorCode::InvalidRecord, "other"),
        ] {
            assert_eq!(Refusal::of(Some(code)).label(), label, "{code:?}");
        }
    }
}
