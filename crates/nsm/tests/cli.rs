//! The command line as a user meets it: help that explains, and config errors listed with
//! their paths before anything starts.

mod common;

use std::process::Command;

use common::NSM;

fn repo_file(path: &str) -> String {
    format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn help_lists_every_command() {
    let output = Command::new(NSM)
        .arg("--help")
        .output()
        .expect("nsm --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for command in [
        "run",
        "check",
        "demo",
        "produce",
        "read",
        "generate",
        "rules",
        "dashboards",
        "hash-password",
    ] {
        assert!(help.contains(command), "--help misses {command}:\n{help}");
    }
    let output = Command::new(NSM)
        .args(["run", "--help"])
        .output()
        .expect("nsm run --help");
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("--config") && help.contains("SIGTERM"),
        "{help}"
    );
}

/// The configs a product team copies: the reference of every key and one example per product
/// (the collaboration one is also the built-in demo config).
const SHIPPED_CONFIGS: [&str; 4] = [
    "config/example.toml",
    "config/support-chatbot.toml",
    "config/collaboration.toml",
    "config/marketplace.toml",
];

#[test]
fn check_accepts_every_shipped_config_with_no_lint_finding() {
    for config in SHIPPED_CONFIGS {
        let output = Command::new(NSM)
            .args(["check", "--config", &repo_file(config)])
            .output()
            .expect("nsm check");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{config}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("valid") && stdout.contains("north_star"),
            "{config}: {stdout}"
        );
        // An example that teaches the North Star practice must pass its own linter cleanly:
        // 3 to 5 owned inputs, a guardrail, revenue, no vanity or revenue North Star.
        assert!(
            stdout.contains("lint: no findings") && !stdout.contains("warning:"),
            "{config} has lint findings:\n{stdout}"
        );
    }
}

#[test]
fn check_lists_every_problem_with_its_path_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[kafka]
brokers = "localhost:9092"
topics = ["events"]
[kafka.properties]
"sasl.password" = "${NSM_TEST_UNSET_SECRET}"
[events]
timestamp_unit = "minutes"
timestamp_zone = "Mars/Base"
[time]
zone = "Europe/Berlinn"
[north_star]
name = "nsm"
kind = "distinct"
window = "1wk"
[[inputs]]
name = "clicks"
kind = "count"
field = "x"
window = "1d"
where = { amount = { gte = "lots" }, user_id = { prefix = 3 }, "@header.x-source" = { present = "yes" }, plan = { bogus = 1 } }
"#,
    )
    .expect("write");
    let output = Command::new(NSM)
        .args(["check", "--config", path.to_str().expect("utf8")])
        .env_remove("NSM_TEST_UNSET_SECRET")
        .output()
        .expect("nsm check");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "kafka.properties.\"sasl.password\": environment variable NSM_TEST_UNSET_SECRET is not set",
        "time.zone: unknown time zone \"Europe/Berlinn\"",
        "north_star.window: unknown window \"1wk\"",
        "inputs[0].field: a count has no field",
        "events.timestamp_unit: unknown unit \"minutes\"",
        "events.timestamp_zone: unknown time zone \"Mars/Base\"",
        "inputs[0].where.amount.gte: expected a number, found \"lots\"",
        "inputs[0].where.user_id.prefix: expected a non-empty string, found 3",
        "inputs[0].where.@header.x-source.present: expected true",
        "inputs[0].where.plan.bogus: unknown test \"bogus\"",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_and_run_refuse_revenue_as_the_north_star_with_a_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("revenue-star.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[kafka]
brokers = "127.0.0.1:1"
topics = ["events"]
[state]
path = "{state}"
[north_star]
name = "weekly_revenue"
kind = "sum"
field = "properties.amount"
where = {{ event = "payment_succeeded" }}
window = "1w"
[[inputs]]
name = "payments"
kind = "count"
where = {{ event = "payment_succeeded" }}
window = "1w"
[revenue]
name = "revenue"
kind = "sum"
field = "properties.amount"
where = {{ event = "payment_succeeded" }}
window = "1w"
"#,
            state = dir.path().join("state").display()
        ),
    )
    .expect("write");
    let config = path.to_str().expect("utf8");

    let output = Command::new(NSM)
        .args(["check", "--config", config])
        .output()
        .expect("nsm check");
    assert!(!output.status.success(), "a lint error must fail the check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "error: north_star: North Star \"weekly_revenue\" computes exactly what [revenue] computes [revenue_as_north_star]",
        "hint: revenue is the lagging outcome",
        "warning: inputs: 1 input metric; 3 to 5 cover the levers of a North Star [few_inputs]",
        "warning: inputs[0].owner: input \"payments\" has no owner [input_without_owner]",
        "warning: guardrails: no guardrail metric [no_guardrail]",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }

    let output = Command::new(NSM)
        .args(["run", "--config", config])
        .output()
        .expect("nsm run");
    assert!(!output.status.success(), "nsm run must refuse the config");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("classic North Star mistake") && stderr.contains("revenue_as_north_star"),
        "{stderr}"
    );
}

#[test]
fn rules_and_dashboards_are_written_for_a_config() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let rules = directory.path().join("nsm.rules.yml");
    let output = Command::new(NSM)
        .args([
            "rules",
            "--config",
            &repo_file("config/marketplace.toml"),
            "--output",
        ])
        .arg(&rules)
        .output()
        .expect("nsm rules");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&rules).expect("rules written");
    assert!(text.starts_with("# Generated by nsm from "), "{text}");
    assert!(text.contains("do not edit") && text.contains("alert: NSMFlatWhileRevenueGrows"));

    let output = Command::new(NSM)
        .args([
            "dashboards",
            "--config",
            &repo_file("config/marketplace.toml"),
        ])
        .output()
        .expect("nsm dashboards");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dashboard: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("dashboard JSON on standard output");
    assert_eq!(dashboard["title"], "North Star: nights_booked");

    let output = Command::new(NSM)
        .args(["rules", "--config", &repo_file("Cargo.toml")])
        .output()
        .expect("nsm rules on a wrong file");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("configuration is invalid"));
}
