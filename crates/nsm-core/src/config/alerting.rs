//! The optional `[alerting]` section: thresholds of the generated Prometheus alerts
//! (`nsm rules`). It changes nothing in the pipeline; every key has a default, so a config
//! without the section generates sane rules.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::metric::{MetricDef, Role};

/// `[alerting]` as written.
#[derive(Debug, Default, Deserialize)]
pub struct RawAlerting {
    pub runbook_base_url: Option<String>,
    pub job: Option<String>,
    pub nsm_flat_growth_threshold: Option<f64>,
    pub sustained_periods: Option<i64>,
    pub slower_than_revenue_periods: Option<i64>,
    pub gaming_min_worsening: Option<f64>,
    pub max_consumer_lag_messages: Option<i64>,
    pub max_watermark_delay: Option<String>,
    pub no_events_for: Option<String>,
    #[serde(default)]
    pub guardrails: BTreeMap<String, RawGuardrailAlerting>,
}

/// `[alerting.guardrails.<name>]` as written.
#[derive(Debug, Default, Deserialize)]
pub struct RawGuardrailAlerting {
    pub worse_when: Option<String>,
    pub max_worsening: Option<f64>,
    pub max: Option<f64>,
    pub min: Option<f64>,
}

/// Thresholds of the generated alerts, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertingConfig {
    /// `runbook_url` of an alert is this base joined with the alert name; none when unset.
    pub runbook_base_url: Option<String>,
    /// The Prometheus scrape job of nsm (`up{job="..."}`).
    pub job: String,
    /// North Star growth, period over period, below this is "flat" (0.01 = 1%).
    pub nsm_flat_growth_threshold: f64,
    /// Complete windows the North Star must stay flat while revenue grows before paging.
    pub sustained_periods: u32,
    /// Complete windows the North Star must grow slower than revenue before warning.
    pub slower_than_revenue_periods: u32,
    /// How much a guardrail must worsen (fraction) while the North Star grows to flag gaming.
    pub gaming_min_worsening: f64,
    pub max_consumer_lag_messages: u64,
    /// The watermark further behind the wall clock than this is stale.
    pub max_watermark_delay: Duration,
    /// No message consumed for this long is an outage of the data.
    pub no_events_for: Duration,
    /// One entry per configured guardrail, in config order.
    pub guardrails: Vec<GuardrailAlerting>,
}

/// Which direction of a guardrail hurts customers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorseWhen {
    /// Complaints, cancellations, errors: a rise is bad.
    Higher,
    /// Retention, satisfaction: a fall is bad.
    Lower,
}

impl WorseWhen {
    pub fn label(self) -> &'static str {
        match self {
            Self::Higher => "higher",
            Self::Lower => "lower",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GuardrailAlerting {
    pub metric: String,
    pub worse_when: WorseWhen,
    /// GuardrailBreached when it worsens by more than this fraction period over period.
    pub max_worsening: f64,
    /// GuardrailBreached when the value crosses this: a maximum when higher is worse, a
    /// minimum when lower is worse.
    pub limit: Option<f64>,
}

pub const DEFAULT_NSM_FLAT_GROWTH_THRESHOLD: f64 = 0.01;
pub const DEFAULT_SUSTAINED_PERIODS: u32 = 2;
pub const DEFAULT_SLOWER_THAN_REVENUE_PERIODS: u32 = 3;
pub const DEFAULT_GAMING_MIN_WORSENING: f64 = 0.05;
pub const DEFAULT_MAX_WORSENING: f64 = 0.25;
pub const DEFAULT_MAX_CONSUMER_LAG_MESSAGES: u64 = 100_000;
const DEFAULT_MAX_WATERMARK_DELAY: &str = "15m";
const DEFAULT_NO_EVENTS_FOR: &str = "15m";

/// Validates `[alerting]` against the metrics it names; problems are pushed with their paths.
pub(super) fn validate(
    raw: &RawAlerting,
    metrics: &[MetricDef],
    idle_timeout: Option<Duration>,
    problems: &mut Vec<ConfigError>,
) -> Option<AlertingConfig> {
    let mut add = |path: &str, message: String| {
        problems.push(ConfigError {
            path: format!("alerting.{path}"),
            message,
        })
    };
    let runbook_base_url = raw
        .runbook_base_url
        .as_ref()
        .map(|url| url.trim_end_matches('/').to_string());
    if let Some(url) = &runbook_base_url {
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.contains(' ') {
            add(
                "runbook_base_url",
                format!("invalid URL {url:?}: expected http(s)://host/path, without spaces"),
            );
        }
    }
    let job = raw.job.clone().unwrap_or_else(|| "nsm".to_string());
    if job.is_empty() || job.contains(['"', '\\', '\n']) {
        add(
            "job",
            format!("invalid scrape job name {job:?}: the job label Prometheus gives nsm"),
        );
    }
    let mut fraction = |key: &str, value: Option<f64>, default: f64, min: f64| {
        let value = value.unwrap_or(default);
        if !value.is_finite() || value < min || value > 100.0 {
            add(
                key,
                format!("{value} is out of range: a fraction from {min} to 100 (0.05 = 5%)"),
            );
        }
        value
    };
    let nsm_flat_growth_threshold = fraction(
        "nsm_flat_growth_threshold",
        raw.nsm_flat_growth_threshold,
        DEFAULT_NSM_FLAT_GROWTH_THRESHOLD,
        -1.0,
    );
    let gaming_min_worsening = fraction(
        "gaming_min_worsening",
        raw.gaming_min_worsening,
        DEFAULT_GAMING_MIN_WORSENING,
        0.0,
    );
    let mut periods = |key: &str, value: Option<i64>, default: u32| {
        let value = value.unwrap_or(i64::from(default));
        match u32::try_from(value) {
            Ok(periods @ 1..=12) => periods,
            _ => {
                add(key, format!("{value} is out of range: 1 to 12 windows"));
                default
            }
        }
    };
    let sustained_periods = periods(
        "sustained_periods",
        raw.sustained_periods,
        DEFAULT_SUSTAINED_PERIODS,
    );
    let slower_than_revenue_periods = periods(
        "slower_than_revenue_periods",
        raw.slower_than_revenue_periods,
        DEFAULT_SLOWER_THAN_REVENUE_PERIODS,
    );
    let max_consumer_lag_messages = match raw.max_consumer_lag_messages {
        None => DEFAULT_MAX_CONSUMER_LAG_MESSAGES,
        Some(value) => match u64::try_from(value) {
            Ok(value) if value > 0 => value,
            _ => {
                add(
                    "max_consumer_lag_messages",
                    format!("{value} must be a positive number of messages"),
                );
                DEFAULT_MAX_CONSUMER_LAG_MESSAGES
            }
        },
    };
    let mut duration = |key: &str, value: &Option<String>, default: &str| {
        let text = value.as_deref().unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(parsed) if parsed >= Duration::from_secs(60) => Some(parsed),
            Ok(_) => {
                add(key, format!("{text:?} is too short: at least \"1m\""));
                None
            }
            Err(error) => {
                add(
                    key,
                    format!("invalid duration {text:?} ({error}); write e.g. \"15m\", \"1h\""),
                );
                None
            }
        }
    };
    let no_events_for = duration("no_events_for", &raw.no_events_for, DEFAULT_NO_EVENTS_FOR);
    // An idle partition's watermark follows the wall clock only after the idle timeout; a
    // shorter limit would call every quiet partition stale. Unset, the limit is 15m or the
    // idle timeout plus 10m, whichever is longer, so any valid config gets a sane default.
    let max_watermark_delay = match (&raw.max_watermark_delay, idle_timeout) {
        (None, idle) => {
            let default = duration("max_watermark_delay", &None, DEFAULT_MAX_WATERMARK_DELAY);
            match (default, idle) {
                (Some(default), Some(idle)) => Some(default.max(idle + Duration::from_secs(600))),
                (default, _) => default,
            }
        }
        (Some(_), idle) => {
            let delay = duration(
                "max_watermark_delay",
                &raw.max_watermark_delay,
                DEFAULT_MAX_WATERMARK_DELAY,
            );
            if let (Some(delay), Some(idle)) = (delay, idle) {
                if delay <= idle {
                    add(
                        "max_watermark_delay",
                        format!(
                            "must be longer than time.idle_timeout ({}), after which an idle \
                             partition's watermark follows the wall clock",
                            humantime::format_duration(idle)
                        ),
                    );
                }
            }
            delay
        }
    };

    let guardrail_names: Vec<&str> = metrics
        .iter()
        .filter(|metric| metric.role == Role::Guardrail)
        .map(|metric| metric.name.as_str())
        .collect();
    for name in raw.guardrails.keys() {
        if !guardrail_names.contains(&name.as_str()) {
            add(
                &format!("guardrails.{name}"),
                format!(
                    "no guardrail named {name:?}; known guardrails: {}",
                    if guardrail_names.is_empty() {
                        "none".to_string()
                    } else {
                        guardrail_names.join(", ")
                    }
                ),
            );
        }
    }
    let mut guardrails = Vec::new();
    for name in &guardrail_names {
        let default = RawGuardrailAlerting::default();
        let raw_guardrail = raw.guardrails.get(*name).unwrap_or(&default);
        let path = format!("guardrails.{name}");
        let worse_when = match raw_guardrail.worse_when.as_deref() {
            None | Some("higher") => WorseWhen::Higher,
            Some("lower") => WorseWhen::Lower,
            Some(other) => {
                add(
                    &format!("{path}.worse_when"),
                    format!("unknown direction {other:?}; expected \"higher\" or \"lower\""),
                );
                WorseWhen::Higher
            }
        };
        let max_worsening = raw_guardrail.max_worsening.unwrap_or(DEFAULT_MAX_WORSENING);
        if !max_worsening.is_finite() || max_worsening <= 0.0 || max_worsening > 100.0 {
            add(
                &format!("{path}.max_worsening"),
                format!("{max_worsening} is out of range: a fraction above 0 (0.25 = 25%)"),
            );
        }
        let limit = match (worse_when, raw_guardrail.max, raw_guardrail.min) {
            (WorseWhen::Higher, max, None) => max,
            (WorseWhen::Lower, None, min) => min,
            (WorseWhen::Higher, _, Some(_)) => {
                add(
                    &format!("{path}.min"),
                    "a guardrail that is worse when higher has a max, not a min (or set \
                     worse_when = \"lower\")"
                        .to_string(),
                );
                None
            }
            (WorseWhen::Lower, Some(_), _) => {
                add(
                    &format!("{path}.max"),
                    "a guardrail that is worse when lower has a min, not a max (or set \
                     worse_when = \"higher\")"
                        .to_string(),
                );
                None
            }
        };
        if let Some(limit) = limit {
            if !limit.is_finite() {
                add(&path, format!("limit {limit} must be a finite number"));
            }
        }
        guardrails.push(GuardrailAlerting {
            metric: name.to_string(),
            worse_when,
            max_worsening,
            limit,
        });
    }
    Some(AlertingConfig {
        runbook_base_url,
        job,
        nsm_flat_growth_threshold,
        sustained_periods,
        slower_than_revenue_periods,
        gaming_min_worsening,
        max_consumer_lag_messages,
        max_watermark_delay: max_watermark_delay?,
        no_events_for: no_events_for?,
        guardrails,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
[kafka]
brokers = "localhost:9092"
topics = ["events"]

[north_star]
name = "nights"
kind = "count"
window = "1w"

[[guardrails]]
name = "complaints"
kind = "count"
window = "1w"

[[guardrails]]
name = "retention"
kind = "count"
window = "1w"
"#;

    fn parse(alerting: &str) -> Result<Config, Vec<(String, String)>> {
        Config::from_toml(&format!("{BASE}\n{alerting}"), &|_| None).map_err(|errors| {
            errors
                .0
                .into_iter()
                .map(|error| (error.path, error.message))
                .collect()
        })
    }

    #[test]
    fn a_config_without_alerting_gets_sane_defaults() {
        let config = parse("").expect("valid");
        let alerting = &config.alerting;
        assert_eq!(alerting.runbook_base_url, None);
        assert_eq!(alerting.job, "nsm");
        assert_eq!(alerting.nsm_flat_growth_threshold, 0.01);
        assert_eq!(alerting.sustained_periods, 2);
        assert_eq!(alerting.max_watermark_delay, Duration::from_secs(900));
        let slow = Config::from_toml(
            &BASE.replace("[kafka]", "[time]\nidle_timeout = \"1h\"\n\n[kafka]"),
            &|_| None,
        )
        .expect("a long idle timeout needs no [alerting] change");
        assert_eq!(
            slow.alerting.max_watermark_delay,
            Duration::from_secs(4200),
            "the default stays above the idle timeout"
        );
        let names: Vec<&str> = alerting
            .guardrails
            .iter()
            .map(|guardrail| guardrail.metric.as_str())
            .collect();
        assert_eq!(
            names,
            ["complaints", "retention"],
            "every guardrail, in order"
        );
        assert!(alerting
            .guardrails
            .iter()
            .all(|g| g.worse_when == WorseWhen::Higher && g.max_worsening == 0.25));
    }

    #[test]
    fn guardrail_settings_are_read_per_guardrail() {
        let config = parse(
            r#"
[alerting]
runbook_base_url = "https://runbooks.example.com/nsm/"
[alerting.guardrails.retention]
worse_when = "lower"
max_worsening = 0.1
min = 40
"#,
        )
        .expect("valid");
        assert_eq!(
            config.alerting.runbook_base_url.as_deref(),
            Some("https://runbooks.example.com/nsm")
        );
        let retention = &config.alerting.guardrails[1];
        assert_eq!(retention.worse_when, WorseWhen::Lower);
        assert_eq!(retention.max_worsening, 0.1);
        assert_eq!(retention.limit, Some(40.0));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let errors = parse(
            r#"
[alerting]
runbook_base_url = "runbooks"
sustained_periods = 0
max_watermark_delay = "2m"
nsm_flat_growth_threshold = -3.0
colour = "red"
[alerting.guardrails.complaint]
max = 3
[alerting.guardrails.retention]
worse_when = "down"
[alerting.guardrails.complaints]
min = 3
"#,
        )
        .expect_err("invalid");
        let paths: Vec<&str> = errors.iter().map(|(path, _)| path.as_str()).collect();
        for expected in [
            "alerting.colour",
            "alerting.runbook_base_url",
            "alerting.sustained_periods",
            "alerting.max_watermark_delay",
            "alerting.nsm_flat_growth_threshold",
            "alerting.guardrails.complaint",
            "alerting.guardrails.retention.worse_when",
            "alerting.guardrails.complaints.min",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {errors:?}"
            );
        }
        let unknown = errors
            .iter()
            .find(|(path, _)| path == "alerting.guardrails.complaint")
            .expect("unknown guardrail");
        assert!(unknown.1.contains("complaints, retention"), "{unknown:?}");
        let delay = errors
            .iter()
            .find(|(path, _)| path == "alerting.max_watermark_delay")
            .expect("delay");
        assert!(delay.1.contains("idle_timeout"), "{delay:?}");
    }
}
