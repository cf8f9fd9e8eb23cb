//! `promtool test rules` for the dead-letter alert: refused dead letters page, hold the
//! business alerts back while they are held (values stop advancing), and go quiet once
//! delivered.

mod support;

use nsm_core::Config;
use support::run_promtool;

const CONFIG: &str = r#"
[kafka]
brokers = "localhost:9092"
topics = ["events"]

[north_star]
name = "nights_booked"
kind = "count"
where = { event = "booked" }
window = "1h"
"#;

/// The generated rules without annotations: the test checks when the alert fires and with
/// which labels; `promtool check rules` checks the annotation templates.
fn rules_without_annotations(config: &Config) -> String {
    let mut out = String::new();
    let mut in_annotations = false;
    for line in nsm_gen::rules(config, "dead-letters.toml").lines() {
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

#[test]
fn refused_dead_letters_page_and_mark_the_data_stale_while_held() {
    let config = Config::from_toml(CONFIG, &|_| None).expect("config");
    let directory = tempfile::tempdir().expect("temporary directory");
    let rules = directory.path().join("rules.yml");
    std::fs::write(&rules, nsm_gen::rules(&config, "dead-letters.toml")).expect("write rules");
    run_promtool(
        &["check", "rules", rules.to_str().expect("utf-8 path")],
        "the rules with annotations",
    );
    std::fs::write(&rules, rules_without_annotations(&config)).expect("write rules");
    // Held from minute 30 to 60, each refused again every minute; then delivered.
    let test = r#"rule_files:
  - rules.yml
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'nsm_dead_letters_held{job="nsm",instance="nsm:9464"}'
        values: '0x30 1x29 0x60'
      - series: 'nsm_dead_letters_total{job="nsm",instance="nsm:9464",result="failed"}'
        values: '0x30 1+1x29 30x60'
    alert_rule_test:
      - eval_time: 20m
        alertname: DeadLettersFailing
        exp_alerts: []
      - eval_time: 31m
        alertname: DeadLettersFailing
        exp_alerts: []
      - eval_time: 40m
        alertname: DeadLettersFailing
        exp_alerts:
          - exp_labels:
              severity: critical
      - eval_time: 100m
        alertname: DeadLettersFailing
        exp_alerts: []
    promql_expr_test:
      - expr: nsm:data_stale:reason{reason="dead_letters_held"}
        eval_time: 20m
        exp_samples:
          - labels: 'nsm:data_stale:reason{reason="dead_letters_held"}'
            value: 0
      - expr: nsm:data_stale:reason{reason="dead_letters_held"}
        eval_time: 40m
        exp_samples:
          - labels: 'nsm:data_stale:reason{reason="dead_letters_held"}'
            value: 1
      - expr: nsm:data_stale:reason{reason="dead_letters_held"}
        eval_time: 100m
        exp_samples:
          - labels: 'nsm:data_stale:reason{reason="dead_letters_held"}'
            value: 0
"#;
    let path = directory.path().join("tests.yml");
    std::fs::write(&path, test).expect("write tests");
    run_promtool(
        &["test", "rules", path.to_str().expect("utf-8 path")],
        &format!("the dead-letter scenario:\n{test}"),
    );
}

/// With the drop policy nothing is held, but each refusal still pages for ten minutes: the
/// dropped letters are missing from the dead-letter topic.
#[test]
fn dropped_dead_letters_page_without_holding_the_business_alerts() {
    let config = Config::from_toml(CONFIG, &|_| None).expect("config");
    let directory = tempfile::tempdir().expect("temporary directory");
    std::fs::write(
        directory.path().join("rules.yml"),
        rules_without_annotations(&config),
    )
    .expect("write rules");
    let test = r#"rule_files:
  - rules.yml
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'nsm_dead_letters_held{job="nsm",instance="nsm:9464"}'
        values: '0x90'
      - series: 'nsm_dead_letters_total{job="nsm",instance="nsm:9464",result="failed"}'
        values: '0x30 1x60'
    alert_rule_test:
      - eval_time: 34m
        alertname: DeadLettersFailing
        exp_alerts:
          - exp_labels:
              severity: critical
      - eval_time: 60m
        alertname: DeadLettersFailing
        exp_alerts: []
    promql_expr_test:
      - expr: nsm:data_stale:reason{reason="dead_letters_held"}
        eval_time: 34m
        exp_samples:
          - labels: 'nsm:data_stale:reason{reason="dead_letters_held"}'
            value: 0
"#;
    let path = directory.path().join("tests.yml");
    std::fs::write(&path, test).expect("write tests");
    run_promtool(
        &["test", "rules", path.to_str().expect("utf-8 path")],
        &format!("the dropped-letters scenario:\n{test}"),
    );
}
