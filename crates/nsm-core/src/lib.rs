//! The pure core of nsm: configuration, event decoding, metric definitions, window arithmetic
//! and aggregation.
//!
//! This crate owns the meaning of every number nsm exports. It must never do I/O: it imports
//! neither rdkafka, nor rocksdb, nor prometheus, nor tokio, and it never reads the clock.
//! Wall-clock time is always passed in (`now_ms`), so tests can drive days of event time in
//! microseconds and every result is a function of its inputs.

pub mod config;
pub mod decimal;
pub mod engine;
pub mod event;
pub mod lint;
pub mod metric;
pub mod query;
pub mod reject;
pub mod series;
pub mod table;
pub mod timestamp;
pub mod window;

pub use config::{Config, ConfigErrors};
pub use engine::Engine;

/// A point in time as milliseconds since the Unix epoch (UTC).
pub type EpochMillis = i64;

/// One Kafka partition of one topic: the unit in which state is kept, stored and moved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
}

impl PartitionKey {
    pub fn new(topic: impl Into<std::sync::Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}
