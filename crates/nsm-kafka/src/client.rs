//! librdkafka client configuration from nsm's settings.

use std::collections::{BTreeMap, BTreeSet};

use rdkafka::config::ClientConfig;

/// Connection settings shared by every client nsm makes.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    pub brokers: String,
    /// Passed to librdkafka as they are (security.protocol, sasl.*, ssl.*, ...).
    pub properties: BTreeMap<String, String>,
    /// Keys whose values must never be logged.
    pub secret_properties: BTreeSet<String>,
}

impl ClientSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// A librdkafka config with the brokers and user properties applied. nsm's own settings
    /// come first so user properties can tune them, except the ones config validation
    /// reserves.
    pub(crate) fn client_config(&self, own: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in own {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// The properties as `key=value`, secrets masked: safe for logs.
    pub fn redacted(&self) -> String {
        let parts: Vec<String> = self
            .properties
            .iter()
            .map(|(key, value)| {
                if self.secret_properties.contains(key) {
                    format!("{key}=***")
                } else {
                    format!("{key}={value}")
                }
            })
            .collect();
        parts.join(", ")
    }
}
