//! The config file as written: every field optional or defaulted, so that validation, not
//! deserialization, finds the problems and can list all of them at once.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub kafka: RawKafka,
    #[serde(default)]
    pub events: RawEvents,
    #[serde(default)]
    pub time: RawTime,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub http: RawHttp,
    pub north_star: Option<OneOrMany<RawMetric>>,
    #[serde(default)]
    pub inputs: Vec<RawMetric>,
    #[serde(default)]
    pub guardrails: Vec<RawMetric>,
    pub revenue: Option<RawMetric>,
    #[serde(default)]
    pub alerting: super::alerting::RawAlerting,
}

/// `[north_star]` as one table, or `[[north_star]]` for the rare product with two.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct RawKafka {
    pub brokers: Option<String>,
    pub topics: Option<Vec<String>>,
    pub group_id: Option<String>,
    pub dead_letter_topic: Option<String>,
    pub key_field: Option<String>,
    pub nested_in_key: Option<Vec<String>>,
    pub repartition_topic: Option<String>,
    pub start_from: Option<String>,
    pub dead_letter_on_failure: Option<String>,
    pub replication_factor: Option<toml::Value>,
    #[serde(default)]
    pub properties: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawEvents {
    pub name: Option<String>,
    pub timestamp: Option<String>,
    pub user: Option<String>,
    pub id: Option<String>,
    pub dedup_horizon: Option<String>,
    pub dedup_across_partitions: Option<bool>,
    pub max_bytes: Option<toml::Value>,
    pub timestamp_unit: Option<String>,
    pub timestamp_zone: Option<String>,
    pub timestamp_fallback: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTime {
    pub zone: Option<String>,
    pub week_start: Option<String>,
    pub allowed_lateness: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_future_skew: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawState {
    pub path: Option<String>,
    pub retention: Option<String>,
    pub flush_interval: Option<String>,
    pub flush_max_entries: Option<i64>,
    pub backfill_rate: Option<i64>,
    pub memory_limit: Option<toml::Value>,
    pub sync_writes: Option<bool>,
    pub changelog: Option<bool>,
    pub changelog_topic: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawHttp {
    pub listen: Option<String>,
    pub header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub tls: Option<RawHttpTls>,
    pub basic_auth: Option<RawBasicAuth>,
}

/// `[http.tls]`: serve HTTPS with this certificate chain and key (PEM files).
#[derive(Debug, Default, Deserialize)]
pub struct RawHttpTls {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

/// `[http.basic_auth]`: user name to bcrypt hash, as in Prometheus' web config.
#[derive(Default, Deserialize)]
pub struct RawBasicAuth {
    pub users: Option<BTreeMap<String, toml::Value>>,
}

impl std::fmt::Debug for RawBasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&String> = self.users.iter().flat_map(|users| users.keys()).collect();
        f.debug_struct("RawBasicAuth")
            .field("users", &names)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMetric {
    pub name: Option<String>,
    pub description: Option<String>,
    pub owner: Option<String>,
    pub kind: Option<String>,
    pub field: Option<String>,
    #[serde(rename = "where")]
    pub filter: Option<BTreeMap<String, toml::Value>>,
    pub window: Option<String>,
    /// A trailing window (`"7d"`) instead of a calendar `window`.
    pub trailing: Option<String>,
    /// A breakdown by these fields, and how many segments to export.
    pub by: Option<Vec<String>>,
    pub top: Option<i64>,
    /// Threshold only: the entity counted, and how many events or actors it needs.
    pub entity: Option<String>,
    pub at_least: Option<i64>,
    /// Conversion only: the start events, and how soon after them the conversion counts.
    pub from: Option<BTreeMap<String, toml::Value>>,
    pub within: Option<String>,
    /// Retention only: the distinct metric whose returning entities are counted.
    pub of: Option<String>,
    /// Ratio only: the metric names divided.
    pub numerator: Option<String>,
    pub denominator: Option<String>,
}
