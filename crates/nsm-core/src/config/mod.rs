//! Configuration in two stages: [`raw`] mirrors the TOML file, [`Config`] is the validated,
//! typed result. Validation reports every problem at once, each with its path
//! (`inputs[1].window: unknown window "2w"; expected 1h, 1d or 1w`).

pub mod alerting;
pub mod librdkafka;
mod raw;
pub mod reference;
pub mod secrets;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use alerting::{AlertingConfig, GuardrailAlerting, NoiseGate, WorseWhen};
pub use librdkafka::{canonical_property, reserved_property, ReservedProperty};
pub use secrets::{KafkaProperties, Resolver};

use crate::metric::{FieldPath, MetricDef, Role};
use crate::timestamp::TimestampFormat;
use crate::window::Calendar;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub events: EventsConfig,
    pub time: TimeConfig,
    pub state: StateConfig,
    pub http: HttpConfig,
    /// North stars first, then inputs, guardrails and revenue, in file order.
    pub metrics: Vec<MetricDef>,
    /// Thresholds of the generated Prometheus alerts (`[alerting]`, optional).
    pub alerting: AlertingConfig,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    pub dead_letter_topic: String,
    /// The event field producers use as the message key, when the config says; `nsm check`
    /// compares it with what distinct counts count: metrics counting another entity are
    /// counted through `repartition_topic`. nsm itself never reads message keys.
    pub key_field: Option<FieldPath>,
    /// Fields whose every value belongs to one key value (each user in one team), so that
    /// counting them distinct is exact under that key too.
    pub nested_in_key: Vec<FieldPath>,
    /// Where events of metrics counting another entity than the key go to be counted by it
    /// (docs/design/repartition.md); used only when `key_field` is set and such metrics exist.
    pub repartition_topic: String,
    /// Passed to librdkafka as they are, after `${VAR}` and `${file:PATH}` expansion;
    /// secret values never show in `Debug` output.
    pub properties: KafkaProperties,
    /// Where a partition starts when neither nsm's state nor the consumer group has an
    /// offset for it (a new group, a new partition).
    pub start_from: StartFrom,
    /// What happens to a dead letter the broker refuses for good.
    pub dead_letter_on_failure: DeadLetterOnFailure,
    /// Replicas of the topics nsm creates (the changelog and the dead-letter topic); `None`
    /// takes the broker's `default.replication.factor`.
    pub replication_factor: Option<i32>,
}

/// `kafka.start_from`: where a partition without a stored or committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The earliest offset still in the log: the whole retained history.
    #[default]
    Earliest,
    /// The end of the log: only events produced from now on.
    Latest,
    /// The first message whose Kafka timestamp is at or after this time (epoch milliseconds),
    /// or the end of the log when there is none.
    Time(i64),
}

/// `kafka.dead_letter_on_failure`: what a dead letter the broker refuses for good (unknown
/// topic, not authorized, too large) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeadLetterOnFailure {
    /// Kept and sent again until delivered; no checkpoint is stored meanwhile, so no offset
    /// passes an undelivered letter (values stop advancing; `nsm_dead_letters_held` says why).
    #[default]
    Hold,
    /// Given up: counted in `nsm_dead_letters_total{result="dropped"}` and logged, and the
    /// checkpoints go on. The rejected event is then only in its source topic.
    Drop,
}

impl DeadLetterOnFailure {
    pub fn label(self) -> &'static str {
        match self {
            DeadLetterOnFailure::Hold => "hold",
            DeadLetterOnFailure::Drop => "drop",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EventsConfig {
    pub name: FieldPath,
    /// The event time's field (unused when `timestamp_format.source` is the Kafka record's).
    pub timestamp: FieldPath,
    /// How the event time is read: unit, zone, and where from.
    pub timestamp_format: TimestampFormat,
    pub user: FieldPath,
    pub id: FieldPath,
    /// An event whose id was applied less than this before (in event time, behind the
    /// watermark) counts once; 0 turns deduplication off. Defaults to the allowed lateness.
    pub dedup_horizon_ms: i64,
    /// Copies of one event may be on different partitions (the topic is not keyed by a field
    /// of the event): every metric is then counted through the repartition topic, where each
    /// event's copies meet (docs/design/repartition.md).
    pub dedup_across_partitions: bool,
    pub max_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct TimeConfig {
    pub calendar: Calendar,
    pub allowed_lateness_ms: i64,
    pub idle_timeout: Duration,
    pub max_future_skew_ms: i64,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
    pub retention_ms: i64,
    pub flush_interval: Duration,
    /// Per-entity entries written since the last flush at which one is due before the
    /// interval ends (see `engine::DEFAULT_MAX_CHECKPOINT_ENTRIES`).
    pub flush_max_entries: usize,
    /// Bytes of per-entity entries kept in memory, over all owned partitions (see
    /// `engine::DEFAULT_STATE_MEMORY`); past it, entries are read back from RocksDB.
    pub memory_limit: usize,
    pub sync_writes: bool,
    /// `state.backfill_rate`: history messages a backfill reads per second, over all its
    /// partitions; `None` reads as fast as it can.
    pub backfill_rate: Option<u32>,
    /// The compacted topic every state change is also written to, from which the instance a
    /// partition moves to restores it; `None` when `state.changelog = false`.
    pub changelog_topic: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// A client has this long to send a request's head: from its connection's start (the TLS
    /// handshake included), or from the first byte of a request after an idle wait.
    pub header_timeout: Duration,
    /// A connection waiting longer than this for its next request is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; one more closes the longest idle one, or is refused when
    /// every connection is busy with a request.
    pub max_connections: usize,
    /// `[http.tls]`: serve HTTPS only.
    pub tls: Option<HttpTls>,
    /// `[http.basic_auth]`: `/metrics` and `/api` need one of these users.
    pub basic_auth: Option<BasicAuthUsers>,
}

/// PEM files of the HTTPS certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// User names and the bcrypt hashes of their passwords. `Debug` shows the names only.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuthUsers {
    users: BTreeMap<String, String>,
}

impl BasicAuthUsers {
    pub(crate) fn new(users: BTreeMap<String, String>) -> Self {
        Self { users }
    }

    /// Users and their bcrypt hashes; validation has checked the hashes' shape.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.users
            .iter()
            .map(|(name, hash)| (name.as_str(), hash.as_str()))
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl fmt::Debug for BasicAuthUsers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.users.keys()).finish()
    }
}

impl Config {
    /// Parses and validates a TOML config. `env` resolves `${VAR}` references in Kafka
    /// properties; `${file:PATH}` references are refused (see [`Config::from_toml_with`]).
    pub fn from_toml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let no_files = |path: &str| -> Result<String, String> {
            Err(format!(
                "cannot read secret file {path}: files are not read here"
            ))
        };
        Config::from_toml_with(
            text,
            &Resolver {
                env,
                file: &no_files,
            },
        )
    }

    /// Parses and validates a TOML config, resolving `${VAR}` and `${file:PATH}` references
    /// in Kafka properties through `resolver` (the process environment and file system in a
    /// program).
    pub fn from_toml_with(text: &str, resolver: &Resolver<'_>) -> Result<Config, ConfigErrors> {
        validate::parse_and_validate(text, resolver)
    }

    pub fn metric(&self, name: &str) -> Option<&MetricDef> {
        self.metrics.iter().find(|metric| metric.name == name)
    }

    pub fn metrics_with_role(&self, role: Role) -> impl Iterator<Item = &MetricDef> {
        self.metrics
            .iter()
            .filter(move |metric| metric.role == role)
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `kafka.brokers`, `inputs[2].window`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "configuration is invalid ({} problem{}):",
            self.0.len(),
            plural(self.0.len())
        )?;
        for error in &self.0 {
            if error.path.is_empty() {
                writeln!(f, "  - {}", error.message)?;
            } else {
                writeln!(f, "  - {}: {}", error.path, error.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests;
