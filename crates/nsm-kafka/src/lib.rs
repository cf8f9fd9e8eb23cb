//! Kafka for nsm: the consumer loop, the dead-letter producer, and small producing and reading
//! tools for demos and tests.
//!
//! This crate owns rdkafka and nothing else: it knows nothing of metrics or storage. The
//! pipeline it drives is a [`PartitionHandler`], which decides what each message means and
//! persists state; this crate guarantees the order of effects around it: dead letters are
//! delivered before the offsets that passed them are checkpointed, and partitions are
//! checkpointed before they are given up in a rebalance.

mod changelog;
mod client;
mod consumer;
mod dead_letter;
mod delivery;
mod forward;
mod history;
mod record;
mod tools;

pub use changelog::{
    ensure_changelog_topic, extend_changelog_topic, ChangelogReader, ChangelogWriter,
};
pub use client::ClientSettings;
pub use consumer::{
    run_consumer, ConsumerOptions, Disposition, HandlerError, PartitionHandler, PartitionLag,
    Restore,
};
pub use dead_letter::{DeadLetterStats, HEADER_ERROR, HEADER_REASON};
pub use forward::Forward;
pub use history::{read_history, HistorySink, PartitionReader};
pub use tools::{
    ensure_topics, ensure_topics_replicated, header_map, read_topic, topic_partition_count,
    EventProducer, ReadRecord,
};

/// Errors of the Kafka edge.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// librdkafka refused a property; the message never holds a secret value.
    #[error("kafka property {key:?} (kafka.properties): {message}")]
    Property { key: String, message: String },
    #[error("cannot {action} partition state: {detail}")]
    Handler {
        action: &'static str,
        detail: String,
    },
    #[error("{0}")]
    Other(String),
}

/// librdkafka's in-process mock cluster, a real Kafka-protocol endpoint for demos and tests.
pub mod mock {
    pub use rdkafka::mocking::MockCluster;
    pub use rdkafka::producer::DefaultProducerContext;

    /// Starts a mock cluster with one broker and the given topics.
    pub fn start(
        topics: &[(&str, i32)],
    ) -> Result<MockCluster<'static, DefaultProducerContext>, super::KafkaError> {
        let cluster = MockCluster::new(1)?;
        for (topic, partitions) in topics {
            cluster.create_topic(topic, *partitions, 1)?;
        }
        Ok(cluster)
    }
}
