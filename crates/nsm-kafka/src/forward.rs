//! The forwarding producer: events of metrics counting another entity than the message key
//! go on to the repartition topic, keyed by that entity (docs/design/repartition.md).
//!
//! Every record forwarded before a checkpoint is delivered before the checkpoint stores the
//! offsets past it, as dead letters are: a crash re-reads and forwards again what was not
//! stored, and the receiving partition skips what it already applied. The producer is
//! idempotent, so each partition's records land in the order they were read, once each,
//! whatever the retries (the receiver skips an offset below one it applied: a record retried
//! after a later one would be lost); transient errors are retried for as long as they last. A record the broker refuses for good (no such topic,
//! no authorization) stops the consumer: its offsets are never stored, nothing is lost.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tracing::error;

use crate::client::{ClientRole, ClientSettings};
use crate::KafkaError;

/// One record for the repartition topic: the event's bytes go unchanged, with these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub partition: i32,
    pub key: Vec<u8>,
    /// Names shared between records (`Arc`): a record copies no header name.
    pub headers: Vec<(Arc<str>, Vec<u8>)>,
    /// The event's own bytes, or empty for a record carrying only its source's time.
    pub payload: Vec<u8>,
    pub timestamp_ms: Option<i64>,
}

#[derive(Default)]
struct ForwardContext {
    /// The first refusal for good, which stops the consumer.
    refused: Arc<Mutex<Option<String>>>,
}

impl ClientContext for ForwardContext {}

impl ProducerContext for ForwardContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            let mut refused = self
                .refused
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if refused.is_none() {
                error!(error = %error, "a record for the repartition topic was refused; stopping without storing the offsets past it");
                *refused = Some(format!(
                    "a record for the repartition topic was refused: {error}"
                ));
            }
        }
    }
}

pub(crate) struct ForwardProducer {
    producer: ThreadedProducer<ForwardContext>,
    topic: String,
    refused: Arc<Mutex<Option<String>>>,
}

impl ForwardProducer {
    pub fn new(settings: &ClientSettings, topic: &str) -> Result<Self, KafkaError> {
        let refused = Arc::new(Mutex::new(None));
        let producer = settings.create_with_context(
            ClientRole::Producer,
            &[
                ("message.timeout.ms", "0"),
                ("linger.ms", "5"),
                ("enable.idempotence", "true"),
                ("compression.type", "lz4"),
            ],
            ForwardContext {
                refused: refused.clone(),
            },
        )?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            refused,
        })
    }

    /// Queues a record, waiting while the local queue is full.
    pub fn send(&self, forward: &Forward) {
        let mut headers = OwnedHeaders::new_with_capacity(forward.headers.len());
        for (key, value) in &forward.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_slice()),
            });
        }
        loop {
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic)
                .partition(forward.partition)
                .key(forward.key.as_slice())
                .payload(forward.payload.as_slice())
                .headers(headers.clone());
            if let Some(timestamp) = forward.timestamp_ms {
                record = record.timestamp(timestamp);
            }
            match self.producer.send(record) {
                Ok(()) => return,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => {
                    let mut refused = self
                        .refused
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    refused.get_or_insert_with(|| {
                        format!("a record for the repartition topic was refused: {error}")
                    });
                    return;
                }
            }
        }
    }

    /// Waits until every queued record is delivered. An error when one was refused for good
    /// (fatal), or when some are not delivered within `timeout` (not stored yet: try again).
    pub fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        let deadline = Instant::now() + timeout;
        let delivered = crate::delivery::wait_delivered(
            &|| self.producer.in_flight_count(),
            &|| Instant::now() >= deadline,
            timeout,
            &mut || {},
        );
        if let Some(refusal) = self.refusal() {
            return Err(FlushError::Refused(refusal));
        }
        if delivered {
            Ok(())
        } else {
            Err(FlushError::Slow(timeout))
        }
    }

    pub fn refusal(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

#[derive(Debug)]
pub(crate) enum FlushError {
    /// A record was refused for good: the consumer stops.
    Refused(String),
    /// Not all delivered yet.
    Slow(Duration),
}
