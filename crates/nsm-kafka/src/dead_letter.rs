//! The dead-letter producer: every rejected message is forwarded as it was, with the reason in
//! headers, so it can be inspected, fixed and replayed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tracing::error;

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

/// Counters of the dead-letter producer, shared with the exposition.
#[derive(Debug, Default)]
pub struct DeadLetterStats {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

pub(crate) struct DeadLetterContext {
    stats: Arc<DeadLetterStats>,
}

impl ClientContext for DeadLetterContext {}

impl ProducerContext for DeadLetterContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, message)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                use rdkafka::Message;
                error!(
                    error = %error,
                    topic = message.topic(),
                    "a dead letter could not be delivered; the rejected event is only counted"
                );
            }
        }
    }
}

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

pub(crate) struct DeadLetterProducer {
    producer: ThreadedProducer<DeadLetterContext>,
    topic: String,
}

impl DeadLetterProducer {
    pub fn new(
        settings: &ClientSettings,
        topic: &str,
        stats: Arc<DeadLetterStats>,
    ) -> Result<Self, KafkaError> {
        // Retry forever: a dead letter is only given up on a permanent error, so a broker
        // outage delays checkpoints instead of losing rejected events.
        let producer = settings.create_with_context(
            ClientRole::Producer,
            &[("message.timeout.ms", "0"), ("linger.ms", "20")],
            DeadLetterContext { stats },
        )?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
        })
    }

    /// Queues a dead letter, waiting while the local queue is full.
    pub fn send(&self, letter: &DeadLetter<'_>) {
        let partition = letter.source_partition.to_string();
        let offset = letter.source_offset.to_string();
        let detail: String = letter.detail.chars().take(1024).collect();
        let mut payload = letter.payload;
        let mut truncated = false;
        loop {
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
            let mut record: BaseRecord<'_, [u8], [u8], ()> = BaseRecord::to(&self.topic)
                .payload(payload)
                .headers(headers);
            if let Some(key) = letter.key {
                record = record.key(key);
            }
            match self.producer.send(record) {
                Ok(()) => return,
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The background thread drains the queue; wait for room.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((
                    RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    _,
                )) if !truncated => {
                    payload = &letter.payload[..letter.payload.len().min(TRUNCATED_PAYLOAD_BYTES)];
                    truncated = true;
                }
                Err((error, _)) => {
                    error!(error = %error, reason = letter.reason, "cannot queue a dead letter; the rejected event is only counted");
                    return;
                }
            }
        }
    }

    /// Waits until every queued dead letter is delivered (or failed permanently).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = std::time::Instant::now() + timeout;
        let delivered = crate::delivery::wait_delivered(
            &|| self.producer.in_flight_count(),
            &|| std::time::Instant::now() >= deadline,
            timeout,
            &mut || {},
        );
        if delivered {
            Ok(())
        } else {
            Err(KafkaError::Other(format!(
                "dead letters not delivered within {timeout:?}"
            )))
        }
    }
}
