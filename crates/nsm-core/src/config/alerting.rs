//! The optional `[alerting]` section: thresholds of the generated Prometheus alerts
//! (`nsm rules`). It changes nothing in the pipeline; every key has a default, so a config
//! without the section generates sane rules.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::metric::{MetricDef, MetricKind, Role};

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
    pub max_invalid_share: Option<f64>,
    pub max_late_share: Option<f64>,
    pub max_publish_delay: Option<String>,
    pub noise_windows: Option<i64>,
    pub noise_min_windows: Option<i64>,
    pub noise_z: Option<f64>,
    pub assumed_noise: Option<f64>,
    pub pace_alerts_off: Option<Vec<String>>,
    pub pace_collapse_ratio: Option<f64>,
    pub pace_z: Option<f64>,
    pub pace_min_gap: Option<f64>,
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
    pub relative_to: Option<String>,
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
    /// EventsRejected when more than this share of consumed messages is rejected as invalid,
    /// per reason: the values miss those events, so business alerts are held too.
    pub max_invalid_share: f64,
    /// The same for events later than the allowed lateness.
    pub max_late_share: f64,
    /// PublishStalled when an instance has not published values for this long.
    pub max_publish_delay: Duration,
    /// How the divergence and guardrail alerts tell a change from noise.
    pub noise: NoiseGate,
    /// How the pace alerts judge the window still filling against its baseline.
    pub pace: PaceAlerting,
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
    /// The metric whose growth the guardrail's worsening is judged against: complaints per
    /// booking rather than complaints, so a busy week is not a worse one. `None`: judged
    /// as it is (a ratio or a retention rate already is relative).
    pub relative_to: Option<String>,
}

/// A z-score gate: a signal (the growth gap between revenue and the North Star, a guardrail's
/// worsening) must exceed `z` standard deviations of its own values over the `windows`
/// whole windows before the ones judged, so that a noisy product pages only on a change its
/// week-to-week noise does not explain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseGate {
    /// Past windows the standard deviation is measured over.
    pub windows: u32,
    /// Windows of Prometheus history needed before the measured deviation is trusted.
    pub min_windows: u32,
    /// Standard deviations the signal must exceed; 0 turns the gate off.
    pub z: f64,
    /// The deviation assumed until `min_windows` windows of history exist.
    pub assumed: f64,
}

/// The pace alerts (issue 21 items 2 and 3): the window still filling against its baseline
/// (`nsm_metric_value{window="baseline"}`, what the comparable past window held at the same
/// elapsed point).
#[derive(Debug, Clone, PartialEq)]
pub struct PaceAlerting {
    /// North Star or inputs without the fast-burn alerts (`PaceCollapsed`, `EventsVanished`).
    pub off: Vec<String>,
    /// `PaceCollapsed` when the metric's increase over both look-backs is below this share of
    /// its baseline's (0.6: 40% below the usual pace).
    pub collapse_ratio: f64,
    /// The shortfall must exceed this many Poisson standard deviations (the square root of
    /// the baseline's increase), and a vanished metric must have expected more than its
    /// square: low-volume hours never page on chance.
    pub z: f64,
    /// `NSMPaceBelowRevenue` when revenue's pace leads the North Star's by more than this
    /// (and beyond the noise).
    pub min_gap: f64,
}

pub const DEFAULT_PACE_COLLAPSE_RATIO: f64 = 0.6;
pub const DEFAULT_PACE_Z: f64 = 3.0;
pub const DEFAULT_PACE_MIN_GAP: f64 = 0.01;
pub const DEFAULT_NSM_FLAT_GROWTH_THRESHOLD: f64 = 0.01;
pub const DEFAULT_SUSTAINED_PERIODS: u32 = 2;
pub const DEFAULT_SLOWER_THAN_REVENUE_PERIODS: u32 = 3;
pub const DEFAULT_GAMING_MIN_WORSENING: f64 = 0.05;
pub const DEFAULT_MAX_WORSENING: f64 = 0.25;
pub const DEFAULT_MAX_CONSUMER_LAG_MESSAGES: u64 = 100_000;
pub const DEFAULT_MAX_INVALID_SHARE: f64 = 0.05;
pub const DEFAULT_MAX_LATE_SHARE: f64 = 0.05;
pub const DEFAULT_NOISE_WINDOWS: u32 = 6;
pub const DEFAULT_NOISE_MIN_WINDOWS: u32 = 3;
pub const DEFAULT_NOISE_Z: f64 = 2.0;
pub const DEFAULT_ASSUMED_NOISE: f64 = 0.05;
const DEFAULT_MAX_WATERMARK_DELAY: &str = "15m";
const DEFAULT_NO_EVENTS_FOR: &str = "15m";
const DEFAULT_MAX_PUBLISH_DELAY: &str = "5m";
/// `relative_to` naming the (first) North Star, whatever its name.
const RELATIVE_TO_NORTH_STAR: &str = "north_star";
const RELATIVE_TO_NONE: &str = "none";

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
    let mut share = |key: &str, value: Option<f64>, default: f64| {
        let value = value.unwrap_or(default);
        if !value.is_finite() || value <= 0.0 || value > 1.0 {
            add(
                key,
                format!("{value} is out of range: a share above 0, at most 1 (0.05 = 5%)"),
            );
        }
        value
    };
    let max_invalid_share = share(
        "max_invalid_share",
        raw.max_invalid_share,
        DEFAULT_MAX_INVALID_SHARE,
    );
    let max_late_share = share("max_late_share", raw.max_late_share, DEFAULT_MAX_LATE_SHARE);
    let noise = noise_gate(raw, &mut add);
    let pace = pace(raw, metrics, &mut add);
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
    let max_publish_delay = duration(
        "max_publish_delay",
        &raw.max_publish_delay,
        DEFAULT_MAX_PUBLISH_DELAY,
    );
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
        let relative_to = relative_to(
            metrics,
            name,
            raw_guardrail.relative_to.as_deref(),
            &mut |message| add(&format!("{path}.relative_to"), message),
        );
        guardrails.push(GuardrailAlerting {
            metric: name.to_string(),
            worse_when,
            max_worsening,
            limit,
            relative_to,
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
        max_invalid_share,
        max_late_share,
        max_publish_delay: max_publish_delay?,
        noise,
        pace,
        guardrails,
    })
}

/// `pace_alerts_off`, `pace_collapse_ratio`, `pace_z` and `pace_min_gap`.
fn pace(
    raw: &RawAlerting,
    metrics: &[MetricDef],
    add: &mut impl FnMut(&str, String),
) -> PaceAlerting {
    let judged: Vec<&str> = metrics
        .iter()
        .filter(|metric| matches!(metric.role, Role::NorthStar | Role::Input))
        .map(|metric| metric.name.as_str())
        .collect();
    let off = raw.pace_alerts_off.clone().unwrap_or_default();
    for (index, name) in off.iter().enumerate() {
        if !judged.contains(&name.as_str()) {
            add(
                &format!("pace_alerts_off[{index}]"),
                format!(
                    "no North Star or input named {name:?}; pace alerts are generated for: {}",
                    judged.join(", ")
                ),
            );
        }
    }
    let collapse_ratio = raw
        .pace_collapse_ratio
        .unwrap_or(DEFAULT_PACE_COLLAPSE_RATIO);
    if !collapse_ratio.is_finite() || collapse_ratio <= 0.0 || collapse_ratio >= 1.0 {
        add(
            "pace_collapse_ratio",
            format!(
                "{collapse_ratio} is out of range: a share of the baseline's pace above 0 and below 1 (0.6 = 40% below)"
            ),
        );
    }
    let z = raw.pace_z.unwrap_or(DEFAULT_PACE_Z);
    if !z.is_finite() || !(0.0..=10.0).contains(&z) {
        add(
            "pace_z",
            format!("{z} is out of range: 0 (no volume gate) to 10 standard deviations"),
        );
    }
    let min_gap = raw.pace_min_gap.unwrap_or(DEFAULT_PACE_MIN_GAP);
    if !min_gap.is_finite() || !(0.0..=10.0).contains(&min_gap) {
        add(
            "pace_min_gap",
            format!("{min_gap} is out of range: a pace difference from 0 to 10 (0.01 = 1 point)"),
        );
    }
    PaceAlerting {
        off,
        collapse_ratio,
        z,
        min_gap,
    }
}

/// `noise_windows`, `noise_min_windows`, `noise_z` and `assumed_noise`.
fn noise_gate(raw: &RawAlerting, add: &mut impl FnMut(&str, String)) -> NoiseGate {
    let mut windows_key = |key: &str, value: Option<i64>, default: u32, max: u32| {
        let value = value.unwrap_or(i64::from(default));
        match u32::try_from(value) {
            Ok(windows) if (1..=max).contains(&windows) => windows,
            _ => {
                add(key, format!("{value} is out of range: 1 to {max} windows"));
                default
            }
        }
    };
    // Two windows give one difference; 26 weekly windows are half a year of Prometheus
    // history, beyond what most keep.
    let windows = windows_key(
        "noise_windows",
        raw.noise_windows,
        DEFAULT_NOISE_WINDOWS,
        26,
    );
    let min_windows = windows_key(
        "noise_min_windows",
        raw.noise_min_windows,
        DEFAULT_NOISE_MIN_WINDOWS,
        26,
    );
    if windows < 2 {
        add(
            "noise_windows",
            "a standard deviation needs at least 2 windows".to_string(),
        );
    }
    if min_windows > windows {
        add(
            "noise_min_windows",
            format!("{min_windows} is more than noise_windows ({windows})"),
        );
    }
    let z = raw.noise_z.unwrap_or(DEFAULT_NOISE_Z);
    if !z.is_finite() || !(0.0..=10.0).contains(&z) {
        add(
            "noise_z",
            format!("{z} is out of range: 0 (no noise gate) to 10 standard deviations"),
        );
    }
    let assumed = raw.assumed_noise.unwrap_or(DEFAULT_ASSUMED_NOISE);
    if !assumed.is_finite() || !(0.0..=10.0).contains(&assumed) {
        add(
            "assumed_noise",
            format!("{assumed} is out of range: a growth deviation from 0 to 10 (0.05 = 5%)"),
        );
    }
    NoiseGate {
        windows,
        min_windows,
        z,
        assumed,
    }
}

/// The metric a guardrail is judged relative to: `relative_to` as written, or by default the
/// North Star for a guardrail that grows with traffic (a count, sum, distinct count,
/// threshold or conversion of the North Star's window), none for a rate.
fn relative_to(
    metrics: &[MetricDef],
    guardrail: &str,
    written: Option<&str>,
    add: &mut impl FnMut(String),
) -> Option<String> {
    let metric = metrics.iter().find(|metric| metric.name == guardrail)?;
    let north_star = metrics.iter().find(|metric| metric.role == Role::NorthStar);
    match written {
        None => {
            let grows_with_traffic = !matches!(
                metric.kind,
                MetricKind::Ratio { .. } | MetricKind::Retention { .. }
            );
            north_star
                .filter(|north_star| grows_with_traffic && north_star.window == metric.window)
                .map(|north_star| north_star.name.clone())
        }
        Some(RELATIVE_TO_NONE) => None,
        Some(name) => {
            let base = if name == RELATIVE_TO_NORTH_STAR {
                north_star
            } else {
                metrics.iter().find(|other| other.name == name)
            };
            match base {
                None => {
                    add(format!(
                        "no metric named {name:?}; expected \"{RELATIVE_TO_NORTH_STAR}\", \"{RELATIVE_TO_NONE}\" or a metric of the config"
                    ));
                    None
                }
                Some(base) if base.name == guardrail => {
                    add("a guardrail cannot be relative to itself".to_string());
                    None
                }
                Some(base) if base.window != metric.window => {
                    add(format!(
                        "{} is a {} metric and {guardrail} a {} one: growth is compared window \
                         by window, so both need the same window",
                        base.name,
                        base.window.label(),
                        metric.window.label()
                    ));
                    None
                }
                Some(base) => Some(base.name.clone()),
            }
        }
    }
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
        assert_eq!(alerting.max_invalid_share, 0.05);
        assert_eq!(alerting.max_late_share, 0.05);
        assert_eq!(alerting.max_publish_delay, Duration::from_secs(300));
        assert_eq!(
            alerting.noise,
            NoiseGate {
                windows: 6,
                min_windows: 3,
                z: 2.0,
                assumed: 0.05
            }
        );
        assert_eq!(
            alerting.pace,
            PaceAlerting {
                off: Vec::new(),
                collapse_ratio: 0.6,
                z: 3.0,
                min_gap: 0.01
            }
        );
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
    fn guardrails_that_grow_with_traffic_are_judged_per_north_star_by_default() {
        let config = parse(
            r#"
[[inputs]]
name = "searches"
kind = "count"
window = "1w"

[[guardrails]]
name = "complaint_rate"
kind = "ratio"
numerator = "complaints"
denominator = "searches"
window = "1w"

[[guardrails]]
name = "daily_refunds"
kind = "count"
window = "1d"

[alerting.guardrails.retention]
relative_to = "searches"
"#,
        )
        .expect("valid");
        let relative: Vec<(&str, Option<&str>)> = config
            .alerting
            .guardrails
            .iter()
            .map(|g| (g.metric.as_str(), g.relative_to.as_deref()))
            .collect();
        assert_eq!(
            relative,
            [
                ("complaints", Some("nights")),
                ("retention", Some("searches")),
                ("complaint_rate", None),
                ("daily_refunds", None),
            ],
            "counts per North Star, a ratio as it is, another window as it is, or as written"
        );
        let none =
            parse("[alerting.guardrails.complaints]\nrelative_to = \"none\"\n").expect("valid");
        assert_eq!(none.alerting.guardrails[0].relative_to, None);
        let named = parse("[alerting.guardrails.complaints]\nrelative_to = \"north_star\"\n")
            .expect("valid");
        assert_eq!(
            named.alerting.guardrails[0].relative_to.as_deref(),
            Some("nights")
        );
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
max_invalid_share = 0
max_late_share = 1.5
max_publish_delay = "10s"
noise_windows = 4
noise_min_windows = 5
noise_z = -1
assumed_noise = -0.5
pace_alerts_off = ["nights", "complaints"]
pace_collapse_ratio = 1
pace_z = -1
pace_min_gap = -0.1
[alerting.guardrails.complaint]
max = 3
[alerting.guardrails.retention]
worse_when = "down"
[alerting.guardrails.complaints]
min = 3
relative_to = "complaints"
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
            "alerting.guardrails.complaints.relative_to",
            "alerting.max_invalid_share",
            "alerting.max_late_share",
            "alerting.max_publish_delay",
            "alerting.noise_min_windows",
            "alerting.noise_z",
            "alerting.assumed_noise",
            "alerting.pace_alerts_off[1]",
            "alerting.pace_collapse_ratio",
            "alerting.pace_z",
            "alerting.pace_min_gap",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {errors:?}"
            );
        }
        assert!(
            !paths.contains(&"alerting.pace_alerts_off[0]"),
            "the North Star can be turned off: {errors:?}"
        );
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
