//! A consumed message as the engine reads the Kafka record around an event.

use nsm_core::event::RecordMeta;
use rdkafka::message::Headers;
use rdkafka::Message;

/// The key, headers and timestamp of a consumed message, read in place.
pub(crate) struct MessageRecord<'m, M>(pub(crate) &'m M);

impl<M: Message> RecordMeta for MessageRecord<'_, M> {
    fn key(&self) -> Option<&[u8]> {
        self.0.key()
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        let headers = self.0.headers()?;
        headers
            .iter()
            .find(|header| header.key == name)
            .and_then(|header| header.value)
    }

    fn timestamp_ms(&self) -> Option<i64> {
        self.0.timestamp().to_millis()
    }
}
