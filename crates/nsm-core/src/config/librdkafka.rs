//! librdkafka property names as librdkafka itself reads them: aliases, the `topic.` prefix,
//! and the properties nsm sets itself, which `kafka.properties` may not override under any
//! of their names.
//!
//! librdkafka matches names exactly (case included). A topic-level property may also be set
//! on the global configuration with a `topic.` prefix, which it strips
//! (`topic.auto.offset.reset` is `auto.offset.reset`), and a dozen properties have a second
//! name (`acks` is `request.required.acks`). rdkafka applies a client's properties in no
//! particular order, so a property given under two names takes either value: nsm's own
//! settings must be refused under every name, and a tunable one (`linger.ms`) replaced by
//! the user's under any of its names.

/// librdkafka's aliases, `(alias, property)`, from CONFIGURATION.md of librdkafka 2.12
/// ("Alias for `...`").
const ALIASES: [(&str, &str); 11] = [
    ("bootstrap.servers", "metadata.broker.list"),
    ("max.in.flight", "max.in.flight.requests.per.connection"),
    ("sasl.mechanism", "sasl.mechanisms"),
    (
        "sasl.oauthbearer.client.credentials.client.id",
        "sasl.oauthbearer.client.id",
    ),
    (
        "sasl.oauthbearer.client.credentials.client.secret",
        "sasl.oauthbearer.client.secret",
    ),
    ("max.partition.fetch.bytes", "fetch.message.max.bytes"),
    ("linger.ms", "queue.buffering.max.ms"),
    ("retries", "message.send.max.retries"),
    ("compression.type", "compression.codec"),
    ("acks", "request.required.acks"),
    ("delivery.timeout.ms", "message.timeout.ms"),
];

/// Topic-level properties (and their aliases) that can be written with the `topic.` prefix
/// and concern nsm: the ones it reserves. Global properties named `topic.*`
/// (`topic.metadata.refresh.interval.ms`) are not prefixed forms and keep their name.
const TOPIC_LEVEL: [&str; 7] = [
    "auto.offset.reset",
    "auto.commit.enable",
    "enable.auto.commit",
    "request.required.acks",
    "acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
];

/// The name librdkafka sets for `name`: the `topic.` prefix of a topic-level property
/// dropped, an alias replaced by its property. Other names are returned as they are.
pub fn canonical_property(name: &str) -> &str {
    let name = match name.strip_prefix("topic.") {
        Some(rest) if TOPIC_LEVEL.contains(&rest) => rest,
        _ => name,
    };
    if name == "enable.auto.commit" {
        // Both a global property and, at topic level, an alias of the legacy
        // `auto.commit.enable`; as a global one it is its own name.
        return name;
    }
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, property)| property)
}

/// Why nsm sets a property itself, for the error that refuses it in `kafka.properties`.
const OFFSETS_WITH_STATE: &str =
    "nsm stores offsets with its state and commits them to the group itself";
const RETRIED_UNTIL_DELIVERED: &str = "nsm retries dead letters and changelog records until \
     they are delivered; see kafka.dead_letter_on_failure";

/// Properties nsm sets itself (by their canonical name), and why a user may not override
/// them: each breaks a guarantee (offsets stored only with the state they produced, dead
/// letters and changelog records acknowledged before the offsets past them) or the consumer
/// group.
const RESERVED: [(&str, &str); 10] = [
    ("metadata.broker.list", "set it with kafka.brokers"),
    ("group.id", "set it with kafka.group_id"),
    ("enable.auto.commit", OFFSETS_WITH_STATE),
    ("auto.commit.enable", OFFSETS_WITH_STATE),
    ("enable.auto.offset.store", OFFSETS_WITH_STATE),
    (
        "auto.offset.reset",
        "set where a new group starts with kafka.start_from; an offset no longer in the log \
         resumes at the earliest one still there, counted in nsm_offsets_skipped_total",
    ),
    (
        "enable.partition.eof",
        "nsm's consumer loop expects no end-of-partition events",
    ),
    (
        "statistics.interval.ms",
        "nsm reads consumer lag and broker connections from librdkafka's statistics every 5s \
         (a lagging partition is never idle; nsm_kafka_brokers_up)",
    ),
    ("message.timeout.ms", RETRIED_UNTIL_DELIVERED),
    (
        "request.required.acks",
        "changelog records must be acknowledged by every in-sync replica before the state \
         they carry is stored",
    ),
];

/// A property of `kafka.properties` that nsm sets itself: the name it is reserved under
/// and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedProperty {
    /// librdkafka's name of the property (`auto.offset.reset` for `topic.auto.offset.reset`).
    pub canonical: &'static str,
    pub reason: &'static str,
}

/// `Some` when nsm sets `name` itself, under this name or another librdkafka reads the same.
pub fn reserved_property(name: &str) -> Option<ReservedProperty> {
    let canonical = canonical_property(name);
    RESERVED
        .iter()
        .find(|(reserved, _)| *reserved == canonical)
        .map(|(canonical, reason)| ReservedProperty { canonical, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_topic_prefixes_name_one_property() {
        assert_eq!(canonical_property("acks"), "request.required.acks");
        assert_eq!(canonical_property("topic.acks"), "request.required.acks");
        assert_eq!(canonical_property("linger.ms"), "queue.buffering.max.ms");
        assert_eq!(
            canonical_property("topic.auto.offset.reset"),
            "auto.offset.reset"
        );
        assert_eq!(
            canonical_property("topic.metadata.refresh.interval.ms"),
            "topic.metadata.refresh.interval.ms",
            "a global property whose name starts with topic."
        );
        assert_eq!(
            canonical_property("session.timeout.ms"),
            "session.timeout.ms"
        );
    }

    #[test]
    fn reserved_properties_are_found_under_every_name() {
        for name in [
            "bootstrap.servers",
            "metadata.broker.list",
            "group.id",
            "enable.auto.commit",
            "topic.enable.auto.commit",
            "auto.commit.enable",
            "topic.auto.commit.enable",
            "enable.auto.offset.store",
            "auto.offset.reset",
            "topic.auto.offset.reset",
            "enable.partition.eof",
            "statistics.interval.ms",
            "message.timeout.ms",
            "delivery.timeout.ms",
            "topic.message.timeout.ms",
            "acks",
            "request.required.acks",
            "topic.request.required.acks",
        ] {
            assert!(reserved_property(name).is_some(), "{name}");
        }
        for name in [
            "linger.ms",
            "queue.buffering.max.ms",
            "session.timeout.ms",
            "security.protocol",
            "isolation.level",
            "topic.metadata.refresh.interval.ms",
            "Auto.Offset.Reset",
        ] {
            assert_eq!(reserved_property(name), None, "{name}");
        }
    }
}
