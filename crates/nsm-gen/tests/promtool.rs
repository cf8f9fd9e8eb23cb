//! The generated rules as Prometheus itself reads them: `promtool check rules` on the rules of
//! every shipped config, and `promtool test rules` scenarios in which each alert fires on the
//! situation it is for and stays silent on healthy growth, a short dip, and stale data.

mod support;

use std::fmt::Write as _;

use nsm_core::Config;
use support::{run_promtool, shipped_configs};

#[test]
fn promtool_accepts_the_rules_of_every_shipped_config() {
    let directory = tempfile::tempdir().expect("temporary directory");
    for (name, config) in shipped_configs() {
        let path = directory
            .path()
            .join(format!("{}.rules.yml", name.replace('/', "_")));
        std::fs::write(&path, nsm_gen::rules(&config, &name)).expect("write rules");
        let output = run_promtool(
            &["check", "rules", path.to_str().expect("utf-8 path")],
            &name,
        );
        assert!(output.contains("SUCCESS"), "{name}: {output}");
    }
}

/// Every dashboard query is valid PromQL: promtool parses each as a recording rule.
#[test]
fn every_dashboard_query_parses() {
    let directory = tempfile::tempdir().expect("temporary directory");
    for (name, config) in shipped_configs() {
        let dashboard: serde_json::Value =
            serde_json::from_str(&nsm_gen::dashboard(&config, &name)).expect("dashboard JSON");
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(target["expr"].as_str().expect("expr").to_string());
            }
        }
        assert!(exprs.len() > 10, "{name}: {exprs:?}");
        let mut file = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
        for (index, expr) in exprs.iter().enumerate() {
            let _ = writeln!(
                file,
                "      - record: dashboard:query_{index}\n        expr: {}",
                serde_json::Value::String(expr.clone())
            );
        }
        let path = directory.path().join("queries.yml");
        std::fs::write(&path, file).expect("write queries");
        run_promtool(
            &["check", "rules", path.to_str().expect("utf-8 path")],
            &format!("the dashboard queries of {name}"),
        );
    }
}

/// Hourly windows, so that a scenario of a few windows is a few hundred one-minute samples.
const SCENARIO_CONFIG: &str = r#"
[kafka]
brokers = "localhost:9092"
topics = ["events"]

[north_star]
name = "nights_booked"
kind = "count"
where = { event = "booked" }
window = "1h"

[[inputs]]
name = "searches"
owner = "demand-team"
kind = "count"
where = { event = "search" }
window = "1h"

[[guardrails]]
name = "complaints"
owner = "support-team"
kind = "count"
where = { event = "complaint" }
window = "1h"

[revenue]
name = "fees"
kind = "sum"
field = "properties.fee"
where = { event = "booked" }
window = "1h"

[alerting]
runbook_base_url = "https://runbooks.example.com/nsm"

[alerting.guardrails.complaints]
max = 1000
"#;

/// Hours each scenario lasts.
const HOURS: usize = 7;
const MINUTES: usize = HOURS * 60;

/// One value per hour, held for its 60 one-minute samples, in promtool's series notation.
fn per_hour(values: impl IntoIterator<Item = f64>) -> String {
    let values: Vec<String> = values
        .into_iter()
        .map(|value| format!("{value}x59"))
        .collect();
    assert_eq!(values.len(), HOURS);
    values.join(" ")
}

/// Labels of one expected alert.
type Labels = Vec<(&'static str, &'static str)>;
/// An alert name, the minute it is evaluated at, and the alerts expected then (none: silent).
type Expectation = (&'static str, usize, Vec<Labels>);

/// What nsm exports in a scenario: `previous[k]` is the value of window k-1, exported as
/// `previous` during hour k.
struct Scenario {
    name: &'static str,
    nights_booked: [f64; HOURS],
    fees: [f64; HOURS],
    complaints: [f64; HOURS],
    complaints_current: [f64; HOURS],
    /// The minute from which the watermark stops moving.
    watermark_stops_at: Option<usize>,
    /// The minute from which the scrape of nsm fails.
    down_from: Option<usize>,
    /// (alert name, minute, expected alerts as `{label="value", ...}` label sets).
    expectations: Vec<Expectation>,
}

impl Scenario {
    fn input_series(&self) -> String {
        let mut out = String::from("    input_series:\n");
        let mut series = |selector: String, values: String| {
            let _ = writeln!(
                out,
                "      - series: '{selector}'\n        values: '{values}'"
            );
        };
        for (metric, previous, current) in [
            ("nights_booked", &self.nights_booked, &self.nights_booked),
            ("fees", &self.fees, &self.fees),
            ("complaints", &self.complaints, &self.complaints_current),
        ] {
            series(
                format!("nsm_metric_value{{metric=\"{metric}\",window=\"previous\"}}"),
                per_hour(previous.iter().copied()),
            );
            series(
                format!("nsm_metric_value{{metric=\"{metric}\",window=\"current\"}}"),
                per_hour(current.iter().copied()),
            );
            series(
                format!(
                    "nsm_metric_window_start_timestamp_seconds{{metric=\"{metric}\",window=\"previous\"}}"
                ),
                per_hour((0..HOURS).map(|hour| (hour as f64 - 1.0) * 3600.0)),
            );
            series(
                format!(
                    "nsm_metric_window_end_timestamp_seconds{{metric=\"{metric}\",window=\"previous\"}}"
                ),
                per_hour((0..HOURS).map(|hour| hour as f64 * 3600.0)),
            );
        }
        let partition = "topic=\"events\",partition=\"0\"";
        series(
            format!("nsm_watermark_timestamp_seconds{{{partition}}}"),
            match self.watermark_stops_at {
                None => format!("0+60x{MINUTES}"),
                Some(minute) => format!("0+60x{minute} {}x{}", minute * 60, MINUTES - minute - 1),
            },
        );
        series(
            format!("nsm_events_consumed_total{{{partition}}}"),
            format!("0+100x{MINUTES}"),
        );
        series(
            format!("nsm_consumer_lag_messages{{{partition}}}"),
            format!("0x{MINUTES}"),
        );
        series(
            "up{job=\"nsm\",instance=\"nsm:9464\"}".to_string(),
            match self.down_from {
                None => format!("1x{MINUTES}"),
                Some(minute) => format!("1x{minute} 0x{}", MINUTES - minute - 1),
            },
        );
        out
    }

    fn test_case(&self) -> String {
        let mut out = format!("  # {}\n  - interval: 1m\n", self.name);
        out.push_str(&self.input_series());
        out.push_str("    alert_rule_test:\n");
        for (alert, minute, expected) in &self.expectations {
            let _ = writeln!(
                out,
                "      - eval_time: {minute}m\n        alertname: {alert}\n        exp_alerts:"
            );
            if expected.is_empty() {
                out.truncate(out.len() - 1);
                out.push_str(" []\n");
            }
            for labels in expected {
                out.push_str("          - exp_labels:\n");
                for (name, value) in labels {
                    let _ = writeln!(out, "              {name}: \"{value}\"");
                }
            }
        }
        out
    }
}

/// The alerts a scenario checks; each test states which must fire and all others stay silent.
const ALL_ALERTS: [&str; 8] = [
    "NSMFlatWhileRevenueGrows",
    "NSMGrowingSlowerThanRevenue",
    "GuardrailBreached",
    "NSMUpWhileGuardrailDown",
    "NsmDown",
    "NoEvents",
    "ConsumerLagHigh",
    "WatermarkStale",
];

fn silent_except(firing: &[&str], minutes: &[usize]) -> Vec<Expectation> {
    let mut out = Vec::new();
    for alert in ALL_ALERTS {
        if firing.contains(&alert) {
            continue;
        }
        for minute in minutes {
            out.push((alert, *minute, Vec::new()));
        }
    }
    out
}

/// The generated rules without annotations: the scenarios check when alerts fire and with
/// which labels; annotation templates are checked by `promtool check rules`.
fn rules_without_annotations(config: &Config) -> String {
    let mut out = String::new();
    let mut in_annotations = false;
    for line in nsm_gen::rules(config, "scenario.toml").lines() {
        let indent = line.len() - line.trim_start().len();
        if in_annotations && indent > 8 {
            continue;
        }
        in_annotations = line.trim() == "annotations:";
        if !in_annotations {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn run_scenarios(scenarios: &[Scenario]) {
    let config = Config::from_toml(SCENARIO_CONFIG, &|_| None).expect("scenario config");
    let directory = tempfile::tempdir().expect("temporary directory");
    std::fs::write(
        directory.path().join("rules.yml"),
        rules_without_annotations(&config),
    )
    .expect("write rules");
    let mut test = String::from("rule_files:\n  - rules.yml\nevaluation_interval: 1m\ntests:\n");
    for scenario in scenarios {
        test.push_str(&scenario.test_case());
    }
    let path = directory.path().join("tests.yml");
    std::fs::write(&path, &test).expect("write tests");
    let names: Vec<&str> = scenarios.iter().map(|scenario| scenario.name).collect();
    run_promtool(
        &["test", "rules", path.to_str().expect("utf-8 path")],
        &format!("the scenarios {names:?}:\n{test}"),
    );
}

const GROWING: [f64; HOURS] = [100.0, 110.0, 121.0, 133.0, 146.0, 161.0, 177.0];
const STEADY_COMPLAINTS: [f64; HOURS] = [50.0; HOURS];
/// Grows 10% per hour for two hours, then stays at 121.
const FLATTENING: [f64; HOURS] = [100.0, 110.0, 121.0, 121.0, 121.0, 121.0, 121.0];

const NSM_FLAT: &[(&str, &str)] = &[
    ("severity", "critical"),
    ("metric", "nights_booked"),
    ("role", "north_star"),
    ("period", "hour"),
];

#[test]
fn nsm_flat_while_revenue_grows_pages_once_sustained() {
    run_scenarios(&[Scenario {
        name: "the North Star flattens from hour 3 while revenue keeps growing",
        nights_booked: FLATTENING,
        fees: GROWING,
        complaints: STEADY_COMPLAINTS,
        complaints_current: STEADY_COMPLAINTS,
        watermark_stops_at: None,
        down_from: None,
        expectations: [
            // One flat window is not yet sustained (2 periods).
            vec![("NSMFlatWhileRevenueGrows", 200, vec![])],
            vec![("NSMFlatWhileRevenueGrows", 250, vec![NSM_FLAT.to_vec()])],
            vec![("NSMFlatWhileRevenueGrows", 400, vec![NSM_FLAT.to_vec()])],
            silent_except(
                &["NSMFlatWhileRevenueGrows", "NSMGrowingSlowerThanRevenue"],
                &[250, 400],
            ),
        ]
        .concat(),
    }]);
}

#[test]
fn healthy_growth_and_a_short_dip_stay_silent() {
    let mut dip = GROWING;
    dip[3] = 109.0; // one window 10% down, then back on the trend
    run_scenarios(&[
        Scenario {
            name: "everything grows 10% per hour",
            nights_booked: GROWING,
            fees: GROWING,
            complaints: STEADY_COMPLAINTS,
            complaints_current: STEADY_COMPLAINTS,
            watermark_stops_at: None,
            down_from: None,
            expectations: silent_except(&[], &[150, 250, 300, 400]),
        },
        Scenario {
            name: "one seasonal dip of the North Star",
            nights_booked: dip,
            fees: GROWING,
            complaints: STEADY_COMPLAINTS,
            complaints_current: STEADY_COMPLAINTS,
            watermark_stops_at: None,
            down_from: None,
            expectations: silent_except(&[], &[190, 200, 230, 250, 270, 300, 400]),
        },
    ]);
}

#[test]
fn guardrail_breaches_and_the_gaming_signal_fire() {
    let mut jumping = STEADY_COMPLAINTS;
    jumping[3..].fill(75.0); // +50% in window 2, over the 25% default
    let mut current = STEADY_COMPLAINTS;
    current[5..].fill(1200.0); // the current window already above max = 1000
    let worsening = vec![
        ("severity", "warning"),
        ("check", "worsening"),
        ("guardrail", "complaints"),
        ("metric", "complaints"),
        ("role", "guardrail"),
        ("period", "hour"),
        ("worse_when", "higher"),
    ];
    let limit = vec![
        ("severity", "warning"),
        ("check", "limit"),
        ("guardrail", "complaints"),
        ("metric", "complaints"),
        ("role", "guardrail"),
    ];
    let gaming = vec![
        ("severity", "warning"),
        ("metric", "complaints"),
        ("role", "guardrail"),
        ("period", "hour"),
        ("worse_when", "higher"),
    ];
    run_scenarios(&[Scenario {
        name: "complaints jump 50% while the North Star grows, then pass their maximum",
        nights_booked: GROWING,
        fees: GROWING,
        complaints: jumping,
        complaints_current: current,
        watermark_stops_at: None,
        down_from: None,
        expectations: [
            vec![
                ("GuardrailBreached", 170, vec![]),
                ("GuardrailBreached", 200, vec![worsening.clone()]),
                ("NSMUpWhileGuardrailDown", 200, vec![gaming.clone()]),
                ("GuardrailBreached", 320, vec![limit.clone()]),
                ("NSMUpWhileGuardrailDown", 320, vec![]),
            ],
            silent_except(
                &["GuardrailBreached", "NSMUpWhileGuardrailDown"],
                &[200, 320],
            ),
        ]
        .concat(),
    }]);
}

#[test]
fn stale_data_pages_for_the_pipeline_and_holds_business_alerts_back() {
    let watermark_stale = vec![
        ("severity", "critical"),
        ("topic", "events"),
        ("partition", "0"),
    ];
    let down = vec![
        ("severity", "critical"),
        ("job", "nsm"),
        ("instance", "nsm:9464"),
    ];
    run_scenarios(&[
        Scenario {
            name: "the watermark stops while the North Star looks flat and revenue grows",
            nights_booked: FLATTENING,
            fees: GROWING,
            complaints: STEADY_COMPLAINTS,
            complaints_current: STEADY_COMPLAINTS,
            watermark_stops_at: Some(150),
            down_from: None,
            expectations: [
                vec![
                    ("WatermarkStale", 160, vec![]),
                    ("WatermarkStale", 250, vec![watermark_stale.clone()]),
                    ("NSMFlatWhileRevenueGrows", 250, vec![]),
                    ("NSMFlatWhileRevenueGrows", 400, vec![]),
                    ("NSMGrowingSlowerThanRevenue", 400, vec![]),
                ],
                silent_except(&["WatermarkStale"], &[250]),
            ]
            .concat(),
        },
        Scenario {
            name: "nsm goes down while the North Star looks flat and revenue grows",
            nights_booked: FLATTENING,
            fees: GROWING,
            complaints: STEADY_COMPLAINTS,
            complaints_current: STEADY_COMPLAINTS,
            watermark_stops_at: None,
            down_from: Some(230),
            expectations: [
                vec![
                    ("NsmDown", 232, vec![]),
                    ("NsmDown", 250, vec![down.clone()]),
                    ("NSMFlatWhileRevenueGrows", 250, vec![]),
                    ("NSMFlatWhileRevenueGrows", 300, vec![]),
                ],
                silent_except(&["NsmDown"], &[250]),
            ]
            .concat(),
        },
    ]);
}
