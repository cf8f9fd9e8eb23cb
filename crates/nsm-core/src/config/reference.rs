//! The reference of the config file's settings (`kafka.*`, `events.*`, `time.*`, `state.*`,
//! `http.*`): each key, its default and what it means, as docs/configuration.md shows them.
//!
//! The table there is generated from this one and a test keeps the two equal
//! (`UPDATE_GOLDEN=1` rewrites it); another test checks that every key of the raw config has
//! a row and every row a key, so a key added without its documentation fails the tests.

/// One setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub path: &'static str,
    /// Markdown: a value in backticks, `required`, `none`, or a phrase.
    pub default: &'static str,
    /// Markdown, with links relative to docs/.
    pub meaning: &'static str,
}

const fn key(path: &'static str, default: &'static str, meaning: &'static str) -> Key {
    Key {
        path,
        default,
        meaning,
    }
}

/// Every setting, in the order the reference shows them.
pub const KEYS: [Key; 42] = [
    key(
        "kafka.brokers",
        r#"required"#,
        r#"bootstrap servers, `host:port,...`"#,
    ),
    key("kafka.topics", r#"required"#, r#"topics of JSON events"#),
    key(
        "kafka.group_id",
        r#"`nsm`"#,
        r#"consumer group; instances of one group share partitions"#,
    ),
    key(
        "kafka.key_field",
        r#"none"#,
        r#"the event field producers use as the message key (`user_id`); metrics counting another entity are counted through the repartition topic (see [Exact distinct counts](metrics.md#exact-distinct-counts-and-the-repartition-topic))"#,
    ),
    key(
        "kafka.repartition_topic",
        r#"`<group_id>-repartition`"#,
        r#"where events of metrics counting another entity than `kafka.key_field` are forwarded, keyed by that entity; created with as many partitions as the largest input topic, read from its start"#,
    ),
    key(
        "kafka.nested_in_key",
        r#"none"#,
        r#"fields whose every value belongs to one value of `kafka.key_field` (`["user_id"]` when keyed by team and each user is in one team): their distinct counts are exact too"#,
    ),
    key(
        "kafka.start_from",
        r#"`earliest`"#,
        r#"where a partition starts when neither nsm's state nor the group has an offset for it: `earliest`, `latest`, or an RFC 3339 time (the first message at or after it; see [Where reading starts](#where-reading-starts-and-offsets-nsm-skips))"#,
    ),
    key(
        "kafka.dead_letter_topic",
        r#"`<first topic>-dlq`"#,
        r#"where rejected events go, reason in headers; created at start when missing and allowed"#,
    ),
    key(
        "kafka.replication_factor",
        r#"`"broker"`"#,
        r#"replicas of the topics nsm creates (the changelog and the dead-letter topic): a number, or `"broker"` for the broker's `default.replication.factor`; topics that already exist are left as they are"#,
    ),
    key(
        "kafka.dead_letter_on_failure",
        r#"`hold`"#,
        r#"a dead letter the broker refuses for good (unknown topic, not authorized, too large): `hold` keeps it and sends it again every second, and stores no checkpoint until it is delivered; `drop` counts it (`nsm_dead_letters_total{result="dropped"}`), logs it and goes on, the event then only in its source topic (see [Dead letters](operations.md#dead-letters))"#,
    ),
    key(
        "kafka.properties",
        r#"none"#,
        r#"passed to librdkafka as they are (`security.protocol`, `sasl.*`, `ssl.*`, ...), consumer-only ones to the consumer alone and producer-only ones to the dead-letter producer alone, each replacing nsm's own setting of the same property (`linger.ms`); `${VAR}` reads the environment and `${file:/path}` a file (see [Security](security.md#kafka)). nsm's guarantees rest on the properties it sets itself, which are refused under any of librdkafka's names for them (aliases such as `acks` and `delivery.timeout.ms`, the `topic.` prefix): `bootstrap.servers`, `group.id`, `enable.auto.commit`, `enable.auto.offset.store`, `auto.offset.reset` (use `kafka.start_from`), `enable.partition.eof`, `statistics.interval.ms`, `message.timeout.ms` and `request.required.acks`"#,
    ),
    key(
        "events.name",
        r#"`event`"#,
        r#"field holding the event name"#,
    ),
    key(
        "events.timestamp",
        r#"`timestamp`"#,
        r#"field holding the event time: RFC 3339 text (with an offset, or without one when `events.timestamp_zone` is set; a space may stand for the `T`), or an epoch number in `events.timestamp_unit`; `"@kafka"` takes the Kafka record's timestamp instead"#,
    ),
    key(
        "events.timestamp_unit",
        r#"`ms`"#,
        r#"what epoch numbers count: `s`, `ms`, `us` or `ns`, integer or fractional (`1733480000.25`; below a millisecond is dropped). A number that only makes sense in another unit (seconds sent to a config in `ms`) is rejected as `invalid_timestamp` saying which unit it looks like, rather than read as 1970"#,
    ),
    key(
        "events.timestamp_zone",
        r#"none"#,
        r#"IANA zone of RFC 3339 times sent without an offset (`"Europe/Paris"`); without it they are rejected as `invalid_timestamp`"#,
    ),
    key(
        "events.timestamp_fallback",
        r#"none"#,
        r#"`"@kafka"`: an event without its time field (or with null) takes the Kafka record's timestamp (CreateTime, or LogAppendTime when the topic says so) instead of being rejected as `missing_timestamp`"#,
    ),
    key(
        "events.user",
        r#"`user_id`"#,
        r#"default field of `distinct` metrics"#,
    ),
    key(
        "events.id",
        r#"`event_id`"#,
        r#"event id: an event whose id was already applied in its partition within `events.dedup_horizon` counts once (events without an id always count)"#,
    ),
    key(
        "events.dedup_across_partitions",
        r#"`false`"#,
        r#"copies of one event may be on different partitions: every metric is counted through the repartition topic, where the copies meet and count once (see [Duplicates](metrics.md#duplicates)); not with `kafka.key_field`"#,
    ),
    key(
        "events.dedup_horizon",
        r#"`time.allowed_lateness`"#,
        r#"how long ids are remembered, in event time behind the watermark; the default catches every duplicate that could still be applied (older ones are refused as late anyway). `"0s"` turns deduplication off. Ids are stored in RocksDB, not held in memory; a lookup reads at most two entries"#,
    ),
    key(
        "events.max_bytes",
        r#"`1MiB`"#,
        r#"larger messages are rejected as `oversize`"#,
    ),
    key(
        "time.zone",
        r#"`UTC`"#,
        r#"IANA zone calendar windows align in, DST-correct"#,
    ),
    key(
        "time.week_start",
        r#"`monday`"#,
        r#"first day of weekly windows"#,
    ),
    key(
        "time.allowed_lateness",
        r#"`1h`"#,
        r#"how far behind the watermark an event may still correct its window. The watermark is the partition's largest event time, each taken no further than the wall clock when it arrived: one event stamped ahead does not make the others late"#,
    ),
    key(
        "time.idle_timeout",
        r#"`5m`"#,
        r#"after this long without messages, a partition's time moves with the wall clock (windows roll over and complete); never while it has consumer lag (a partition behind is not idle). Idle time never makes an event late: a backfill of a stalled period is counted, correcting windows already shown complete"#,
    ),
    key(
        "time.max_future_skew",
        r#"`1h`, or `time.allowed_lateness` if shorter"#,
        r#"events further ahead of the wall clock are rejected; must not exceed `time.allowed_lateness`"#,
    ),
    key("state.path", r#"`nsm-state`"#, r#"the RocksDB directory"#),
    key(
        "state.retention",
        r#"`35d`"#,
        r#"windows ending longer ago than this (behind the watermark) are deleted"#,
    ),
    key(
        "state.flush_interval",
        r#"`200ms`"#,
        r#"how often state and offsets are written and values published"#,
    ),
    key(
        "state.flush_max_entries",
        r#"`100000`"#,
        r#"written sooner once this many per-entity entries (members, threshold progress, event ids) wait, so memory stays bounded while a backlog is read; 1000 to 10000000"#,
    ),
    key(
        "state.memory_limit",
        r#"`"128MiB"`"#,
        r#"bytes of per-entity entries kept in memory over all owned partitions (about 40 bytes an entry); past it, the shards of the least recently used windows leave memory (but for entries not yet stored) and are read back from RocksDB when an event needs them; at least `"1MiB"`, in `B`, `KiB`, `MiB`, `GiB` or bytes"#,
    ),
    key(
        "state.backfill_rate",
        r#"unlimited"#,
        r#"history messages per second a backfill of metrics added or changed reads, over all partitions, so it leaves the brokers and the live pipeline room; 1 to 10000000"#,
    ),
    key(
        "state.sync_writes",
        r#"`true`"#,
        r#"fsync each write, to survive power loss and not only crashes"#,
    ),
    key(
        "state.changelog",
        r#"`true`"#,
        r#"write every state change to the changelog topic too, so that partitions move between instances with their state (see [Several instances](scale-out.md#several-instances))"#,
    ),
    key(
        "state.changelog_topic",
        r#"`<group_id>-changelog`"#,
        r#"the compacted changelog topic; created at start if missing"#,
    ),
    key(
        "http.listen",
        r#"`127.0.0.1:9464`"#,
        r#"address of `/metrics`, `/healthz`, `/readyz`, `/api/v1`"#,
    ),
    key(
        "http.header_timeout",
        r#"`10s`"#,
        r#"a new connection must send a whole request head (TLS handshake included) within this, and a kept-alive one the rest of a head within this of its first byte; 1s to 10m"#,
    ),
    key(
        "http.idle_timeout",
        r#"`90s`"#,
        r#"a kept-alive connection waiting longer for its next request is closed (longer than a 1-minute scrape interval, so scrapes reuse their connection); 1s to 1h"#,
    ),
    key(
        "http.max_connections",
        r#"`256`"#,
        r#"connections open at once (see [Security](security.md#connections)); fewer if the open-file limit leaves no room for them, with a warning"#,
    ),
    key(
        "http.tls.cert_file",
        r#"none"#,
        r#"PEM certificate chain; with `http.tls.key_file`, the port serves HTTPS only (see [Security](security.md#http))"#,
    ),
    key(
        "http.tls.key_file",
        r#"none"#,
        r#"PEM private key of `http.tls.cert_file`"#,
    ),
    key(
        "http.basic_auth.users",
        r#"none"#,
        r#"`{ name = "<bcrypt hash>" }`: `/metrics` and `/api/v1` need one of these users (see [Security](security.md#http))"#,
    ),
];

/// The reference as a Markdown table.
pub fn markdown_table() -> String {
    let mut table = String::from("| key | default | meaning |\n|---|---|---|\n");
    for key in KEYS {
        table.push_str(&format!(
            "| `{}` | {} | {} |\n",
            key.path, key.default, key.meaning
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = "docs/configuration.md";

    fn reference_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(REFERENCE)
    }

    #[test]
    fn the_documented_reference_is_the_generated_one() {
        let path = reference_path();
        let text = std::fs::read_to_string(&path).expect("docs/configuration.md");
        let start = text
            .find("| key | default | meaning |")
            .expect("the table's head");
        let end = text[start..]
            .find("\n\n")
            .map_or(text.len(), |end| start + end + 1);
        let generated = markdown_table();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            let updated = format!("{}{generated}{}", &text[..start], &text[end..]);
            std::fs::write(&path, updated).expect("write the reference");
            return;
        }
        assert!(
            text[start..end] == generated,
            "{REFERENCE} differs from config::reference::KEYS: edit the keys there, then run \
             UPDATE_GOLDEN=1 cargo test --workspace --lib reference"
        );
    }

    /// The settings the raw config reads: each `pub` field of its section structs, but the
    /// nested tables (documented key by key).
    fn raw_keys() -> Vec<String> {
        let source = include_str!("raw.rs");
        let sections = [
            ("RawKafka", "kafka"),
            ("RawEvents", "events"),
            ("RawTime", "time"),
            ("RawState", "state"),
            ("RawHttp", "http"),
            ("RawHttpTls", "http.tls"),
            ("RawBasicAuth", "http.basic_auth"),
        ];
        let mut keys = Vec::new();
        for (name, section) in sections {
            let start = source
                .find(&format!("pub struct {name} {{"))
                .unwrap_or_else(|| panic!("struct {name}"));
            let body = &source[start..start + source[start..].find("\n}").expect("end")];
            for line in body.lines().skip(1) {
                let Some((field, kind)) = line
                    .trim()
                    .strip_prefix("pub ")
                    .and_then(|f| f.split_once(':'))
                else {
                    continue;
                };
                if kind.contains("Raw") {
                    continue;
                }
                keys.push(format!("{section}.{field}"));
            }
        }
        keys
    }

    #[test]
    fn every_key_of_the_config_has_a_row_and_every_row_a_key() {
        let raw = raw_keys();
        let documented: Vec<&str> = KEYS.iter().map(|key| key.path).collect();
        for key in &raw {
            assert!(
                documented.contains(&key.as_str()),
                "{key} is read but not documented"
            );
        }
        for key in &documented {
            assert!(
                raw.iter().any(|raw| raw == key),
                "{key} is documented but not read"
            );
        }
        assert_eq!(raw.len(), documented.len());
    }
}
