//! librdkafka client configuration from nsm's settings.

use nsm_core::config::{canonical_property, KafkaProperties};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfig, FromClientConfigAndContext};
use rdkafka::error::KafkaError as RdKafkaError;

use crate::KafkaError;

/// Connection settings shared by every client nsm makes.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    pub brokers: String,
    /// Passed to librdkafka (security.protocol, sasl.*, ssl.*, ...), each to the clients it
    /// concerns; secret values never show in `Debug` output.
    pub properties: KafkaProperties,
}

/// Which kind of librdkafka client a config is for. Admin clients are producers inside
/// librdkafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientRole {
    Consumer,
    Producer,
}

/// Properties librdkafka documents as consumer-only ("C" in CONFIGURATION.md). Given to a
/// producer, each is ignored with a CONFWARN log line, so nsm gives them to consumers only.
const CONSUMER_ONLY: &[&str] = &[
    "auto.commit.enable",
    "auto.commit.interval.ms",
    "auto.offset.reset",
    "check.crcs",
    "consume.callback.max.messages",
    "coordinator.query.interval.ms",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "fetch.error.backoff.ms",
    "fetch.max.bytes",
    "fetch.message.max.bytes",
    "fetch.min.bytes",
    "fetch.queue.backoff.ms",
    "fetch.wait.max.ms",
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "heartbeat.interval.ms",
    "isolation.level",
    "max.partition.fetch.bytes",
    "max.poll.interval.ms",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "partition.assignment.strategy",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "session.timeout.ms",
];

/// Properties librdkafka documents as producer-only ("P"), kept from consumers likewise.
const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "batch.num.messages",
    "batch.size",
    "compression.codec",
    "compression.level",
    "compression.type",
    "delivery.report.only.error",
    "delivery.timeout.ms",
    "enable.gapless.guarantee",
    "enable.idempotence",
    "linger.ms",
    "message.send.max.retries",
    "message.timeout.ms",
    "partitioner",
    "produce.offset.report",
    "queue.buffering.backpressure.threshold",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "queue.buffering.max.ms",
    "queuing.strategy",
    "request.required.acks",
    "request.timeout.ms",
    "retries",
    "sticky.partitioning.linger.ms",
    "transaction.timeout.ms",
    "transactional.id",
];

impl ClientRole {
    fn accepts(self, property: &str) -> bool {
        let foreign = match self {
            ClientRole::Consumer => PRODUCER_ONLY,
            ClientRole::Producer => CONSUMER_ONLY,
        };
        !foreign.contains(&property) && !foreign.contains(&canonical_property(property))
    }
}

impl ClientSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// A librdkafka config with the brokers and the user properties this role uses. User
    /// properties replace nsm's own settings of the same property, under whichever of its
    /// names (`queue.buffering.max.ms` replaces nsm's `linger.ms`: given both, librdkafka
    /// would take either), except the ones config validation reserves. Security properties
    /// (`security.protocol`, `sasl.*`, `ssl.*`) concern every role, so the dead-letter
    /// producer and the admin client connect the way the consumer does.
    fn client_config(&self, role: ClientRole, own: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        let user: Vec<(&str, &str)> = self
            .properties
            .iter()
            .filter(|(key, _)| role.accepts(key))
            .collect();
        for (key, value) in own {
            let replaced = user
                .iter()
                .any(|(user_key, _)| canonical_property(user_key) == canonical_property(key));
            if !replaced {
                config.set(*key, *value);
            }
        }
        for (key, value) in user {
            config.set(key, value);
        }
        config
    }

    /// Creates a client of `role`; a property librdkafka refuses is reported without its
    /// value when that value is secret.
    pub(crate) fn create<T: FromClientConfig>(
        &self,
        role: ClientRole,
        own: &[(&str, &str)],
    ) -> Result<T, KafkaError> {
        self.client_config(role, own)
            .create()
            .map_err(|error| self.redact(error))
    }

    /// [`ClientSettings::create`] with a client context.
    pub(crate) fn create_with_context<C: ClientContext, T: FromClientConfigAndContext<C>>(
        &self,
        role: ClientRole,
        own: &[(&str, &str)],
        context: C,
    ) -> Result<T, KafkaError> {
        self.client_config(role, own)
            .create_with_context(context)
            .map_err(|error| self.redact(error))
    }

    /// rdkafka's configuration errors carry the refused value, and librdkafka's description
    /// may quote it: neither may reach a log when the value is secret.
    fn redact(&self, error: RdKafkaError) -> KafkaError {
        match error {
            RdKafkaError::ClientConfig(_, description, key, _value) => KafkaError::Property {
                key,
                message: self.properties.scrub(&description),
            },
            RdKafkaError::ClientCreation(message) => KafkaError::Other(format!(
                "cannot create the Kafka client: {}",
                self.properties.scrub(&message)
            )),
            other => KafkaError::Client(other),
        }
    }

    /// The properties as `key=value`, secrets masked: safe for logs.
    pub fn redacted(&self) -> String {
        self.properties.redacted()
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::producer::BaseProducer;

    use super::*;

    #[test]
    fn security_properties_reach_every_role_and_scoped_ones_only_theirs() {
        let settings = ClientSettings {
            brokers: "127.0.0.1:1".to_string(),
            properties: [
                ("security.protocol", "SASL_SSL"),
                ("sasl.password", "pw"),
                ("session.timeout.ms", "6000"),
                ("linger.ms", "50"),
            ]
            .into_iter()
            .collect(),
        };
        let producer = settings.client_config(ClientRole::Producer, &[]);
        assert_eq!(producer.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(producer.get("sasl.password"), Some("pw"));
        assert_eq!(producer.get("linger.ms"), Some("50"));
        assert_eq!(producer.get("session.timeout.ms"), None);
        let consumer = settings.client_config(ClientRole::Consumer, &[]);
        assert_eq!(consumer.get("sasl.password"), Some("pw"));
        assert_eq!(consumer.get("session.timeout.ms"), Some("6000"));
        assert_eq!(consumer.get("linger.ms"), None);
    }

    #[test]
    fn a_user_property_replaces_nsms_own_under_any_of_its_names() {
        let settings = ClientSettings {
            brokers: "127.0.0.1:1".to_string(),
            properties: [("queue.buffering.max.ms", "50")].into_iter().collect(),
        };
        let producer =
            settings.client_config(ClientRole::Producer, &[("linger.ms", "5"), ("acks", "all")]);
        assert_eq!(producer.get("queue.buffering.max.ms"), Some("50"));
        assert_eq!(producer.get("linger.ms"), None, "one name only");
        assert_eq!(producer.get("acks"), Some("all"));
    }

    #[test]
    fn a_refused_secret_property_is_reported_without_its_value() {
        let settings = ClientSettings {
            brokers: "127.0.0.1:1".to_string(),
            // Not a librdkafka property: rdkafka's own error would print the value.
            properties: [("sasl.pasword", "hunter2-never-shown")]
                .into_iter()
                .collect(),
        };
        let Err(error) = settings.create::<BaseProducer>(ClientRole::Producer, &[]) else {
            panic!("librdkafka accepted an unknown property");
        };
        let shown = format!("{error} {error:?}");
        assert!(shown.contains("sasl.pasword"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
