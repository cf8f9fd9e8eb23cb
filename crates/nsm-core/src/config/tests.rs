use super::*;
use crate::metric::{FilterField, Literal, MetricKind};
use crate::window::CalendarUnit;

fn no_env(_: &str) -> Option<String> {
    None
}

fn errors_of(text: &str) -> Vec<(String, String)> {
    match Config::from_toml(text, &no_env) {
        Ok(_) => panic!("config unexpectedly valid"),
        Err(errors) => errors
            .0
            .into_iter()
            .map(|error| (error.path, error.message))
            .collect(),
    }
}

/// Just the paths of every problem, in order.
fn error_paths(text: &str) -> Vec<String> {
    errors_of(text).into_iter().map(|(path, _)| path).collect()
}

#[test]
fn example_config_is_valid_and_typed() {
    let text = include_str!("../../../../config/example.toml");
    let config = Config::from_toml(text, &no_env).expect("example config is valid");
    assert_eq!(config.kafka.topics, vec!["product-events".to_string()]);
    assert_eq!(config.kafka.dead_letter_topic, "product-events-dlq");
    assert_eq!(config.time.allowed_lateness_ms, 3_600_000);
    assert_eq!(
        config.events.dedup_horizon_ms, 3_600_000,
        "deduplication covers the allowed lateness by default"
    );
    assert_eq!(config.time.calendar.zone_name(), "Europe/Berlin");
    assert_eq!(config.state.flush_max_entries, 100_000);
    assert_eq!(config.state.memory_limit, 128 << 20);
    assert_eq!(config.state.backfill_rate, None, "as fast as it reads");
    assert_eq!(config.metrics.len(), 8);
    let north_star = &config.metrics[0];
    assert_eq!(north_star.name, "weekly_active_messagers");
    assert_eq!(north_star.role, Role::NorthStar);
    assert_eq!(north_star.window, CalendarUnit::Week);
    assert!(
        matches!(&north_star.kind, MetricKind::Distinct { field } if field.to_string() == "user_id")
    );
    assert_eq!(north_star.filter.clauses[0].field, FilterField::EventName);
    assert_eq!(
        north_star.filter.clauses[0].any_of,
        vec![Literal::Text("message_sent".into())]
    );
    let revenue = config.metric("revenue").expect("revenue");
    assert!(
        matches!(&revenue.kind, MetricKind::Sum { field } if field.to_string() == "properties.amount")
    );
}

#[test]
fn every_problem_is_listed_with_its_path() {
    let text = r#"
[kafka]
topics = []
bogus = 1
[time]
zone = "Mars/Olympus"
week_start = "funday"
allowed_lateness = "soon"
[state]
flush_max_entries = 10
memory_limit = "12"
backfill_rate = 0
[north_star]
name = "Bad Name"
kind = "median"
window = "2w"
[[inputs]]
name = "x"
kind = "sum"
window = "1d"
"#;
    let errors = errors_of(text);
    let paths: Vec<&str> = errors.iter().map(|(path, _)| path.as_str()).collect();
    for expected in [
        "kafka.bogus",
        "kafka.brokers",
        "kafka.topics",
        "time.zone",
        "time.week_start",
        "time.allowed_lateness",
        "state.flush_max_entries",
        "state.memory_limit",
        "state.backfill_rate",
        "north_star.name",
        "north_star.kind",
        "north_star.window",
        "inputs[0].field",
    ] {
        assert!(
            paths.contains(&expected),
            "missing {expected} in {errors:#?}"
        );
    }
    let zone_message = &errors
        .iter()
        .find(|(path, _)| path == "time.zone")
        .expect("zone")
        .1;
    assert!(zone_message.contains("Mars/Olympus"), "{zone_message}");
}

#[test]
fn syntax_errors_name_the_line() {
    let errors = errors_of("[kafka]\nbrokers = \"a:1\"\ntopics = [\n");
    assert_eq!(errors.len(), 1);
    assert!(errors[0].0.starts_with("line "), "{errors:?}");
}

#[test]
fn secrets_come_from_the_environment_and_are_marked() {
    let text = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[kafka.properties]
"sasl.username" = "nsm"
"sasl.password" = "${KAFKA_PASSWORD}"
"ssl.ca.location" = "/etc/ca.pem"
[north_star]
name = "n"
kind = "count"
window = "1d"
"#;
    let env = |name: &str| (name == "KAFKA_PASSWORD").then(|| "s3cret".to_string());
    let config = Config::from_toml(text, &env).expect("valid");
    assert_eq!(config.kafka.properties.get("sasl.password"), Some("s3cret"));
    assert!(config.kafka.properties.is_secret("sasl.password"));
    assert!(!config.kafka.properties.is_secret("ssl.ca.location"));
    assert!(!format!("{config:?}").contains("s3cret"));
    let errors = errors_of(text);
    assert_eq!(errors[0].0, "kafka.properties.\"sasl.password\"");
    assert!(errors[0].1.contains("KAFKA_PASSWORD is not set"));
}

#[test]
fn secrets_come_from_files_and_every_unreadable_one_is_listed() {
    let text = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[kafka.properties]
"sasl.password" = "${file:/run/secrets/kafka-password}"
"ssl.key.password" = "${file:/run/secrets/missing}"
"sasl.oauthbearer.config" = "${file:/run/secrets/also-missing}"
"ssl.ca.location" = "/etc/ca.pem"
[north_star]
name = "n"
kind = "count"
window = "1d"
"#;
    let file = |path: &str| {
        if path == "/run/secrets/kafka-password" {
            Ok("from-a-file\n".to_string())
        } else {
            Err(format!("cannot read secret file {path}: No such file"))
        }
    };
    let errors = Config::from_toml_with(
        text,
        &Resolver {
            env: &no_env,
            file: &file,
        },
    )
    .expect_err("two files are missing")
    .0;
    let listed: Vec<(&str, &str)> = errors
        .iter()
        .map(|error| (error.path.as_str(), error.message.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            (
                "kafka.properties.\"sasl.oauthbearer.config\"",
                "cannot read secret file /run/secrets/also-missing: No such file"
            ),
            (
                "kafka.properties.\"ssl.key.password\"",
                "cannot read secret file /run/secrets/missing: No such file"
            ),
        ]
    );

    let text = text
        .replace("/run/secrets/missing", "/run/secrets/kafka-password")
        .replace("/run/secrets/also-missing", "/run/secrets/kafka-password");
    let config = Config::from_toml_with(
        &text,
        &Resolver {
            env: &no_env,
            file: &file,
        },
    )
    .expect("every file readable");
    assert_eq!(
        config.kafka.properties.get("sasl.password"),
        Some("from-a-file")
    );
    assert!(config.kafka.properties.is_secret("sasl.password"));
    assert!(!format!("{config:?}").contains("from-a-file"));
    // Without a file system (nsm demo's built-in configs), a file reference is an error.
    assert!(Config::from_toml(&text, &no_env).is_err());
}

#[test]
fn reserved_kafka_properties_are_refused() {
    let text = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[kafka.properties]
"enable.auto.commit" = true
[north_star]
name = "n"
kind = "count"
window = "1d"
"#;
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].1.contains("nsm stores offsets"), "{errors:?}");
}

/// librdkafka reads a property under its aliases and, for topic-level ones, with a `topic.`
/// prefix: nsm's own settings are refused under every name, each with its path and why,
/// while tunable ones pass.
#[test]
fn reserved_kafka_properties_are_refused_under_their_aliases_too() {
    let text = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[kafka.properties]
"topic.auto.offset.reset" = "latest"
"auto.offset.reset" = "earliest"
"delivery.timeout.ms" = 30000
"acks" = 1
"bootstrap.servers" = "elsewhere:9092"
"statistics.interval.ms" = 0
"linger.ms" = 50
"session.timeout.ms" = 6000
"topic.metadata.refresh.interval.ms" = 1000
"isolation.level" = "read_committed"
[north_star]
name = "n"
kind = "count"
window = "1d"
"#;
    let errors = errors_of(text);
    let paths: Vec<&str> = errors.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "kafka.properties.\"acks\"",
            "kafka.properties.\"auto.offset.reset\"",
            "kafka.properties.\"bootstrap.servers\"",
            "kafka.properties.\"delivery.timeout.ms\"",
            "kafka.properties.\"statistics.interval.ms\"",
            "kafka.properties.\"topic.auto.offset.reset\"",
        ]
    );
    let message = |path: &str| {
        errors
            .iter()
            .find(|(found, _)| found == path)
            .map(|(_, message)| message.as_str())
            .unwrap_or_default()
    };
    let prefixed = message("kafka.properties.\"topic.auto.offset.reset\"");
    assert!(
        prefixed.contains("librdkafka reads it as auto.offset.reset")
            && prefixed.contains("kafka.start_from"),
        "{prefixed}"
    );
    let alias = message("kafka.properties.\"acks\"");
    assert!(alias.contains("request.required.acks"), "{alias}");
    assert!(message("kafka.properties.\"delivery.timeout.ms\"")
        .contains("kafka.dead_letter_on_failure"));
}

#[test]
fn start_from_is_earliest_latest_or_a_time() {
    let with = |line: &str| {
        format!(
            "[kafka]\nbrokers = \"b:9092\"\ntopics = [\"events\"]\n{line}\n\
             [north_star]\nname = \"n\"\nkind = \"count\"\nwindow = \"1d\"\n"
        )
    };
    let start_from = |line: &str| {
        Config::from_toml(&with(line), &no_env)
            .expect("valid config")
            .kafka
            .start_from
    };
    assert_eq!(start_from(""), StartFrom::Earliest, "the default");
    assert_eq!(start_from("start_from = \"earliest\""), StartFrom::Earliest);
    assert_eq!(start_from("start_from = \"latest\""), StartFrom::Latest);
    assert_eq!(
        start_from("start_from = \"2024-05-01T02:00:00+02:00\""),
        StartFrom::Time(1_714_521_600_000)
    );
    for bad in [
        "\"yesterday\"",
        "\"2024-05-01\"",
        "\"1969-12-31T23:59:59Z\"",
    ] {
        let errors = errors_of(&with(&format!("start_from = {bad}")));
        assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
        assert_eq!(errors[0].0, "kafka.start_from", "{bad}");
        assert!(errors[0].1.contains(bad.trim_matches('"')), "{errors:?}");
    }
}

#[test]
fn dead_letter_on_failure_holds_by_default_or_drops() {
    let with = |line: &str| {
        format!(
            "[kafka]\nbrokers = \"b:9092\"\ntopics = [\"events\"]\n{line}\n\
             [north_star]\nname = \"n\"\nkind = \"count\"\nwindow = \"1d\"\n"
        )
    };
    let policy = |line: &str| {
        Config::from_toml(&with(line), &no_env)
            .expect("valid config")
            .kafka
            .dead_letter_on_failure
    };
    assert_eq!(policy(""), DeadLetterOnFailure::Hold);
    assert_eq!(
        policy("dead_letter_on_failure = \"drop\""),
        DeadLetterOnFailure::Drop
    );
    let errors = errors_of(&with("dead_letter_on_failure = \"retry\""));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "kafka.dead_letter_on_failure");
}

#[test]
fn replication_factor_is_the_brokers_default_or_a_count() {
    let with = |line: &str| {
        format!(
            "[kafka]\nbrokers = \"b:9092\"\ntopics = [\"events\"]\n{line}\n\
             [north_star]\nname = \"n\"\nkind = \"count\"\nwindow = \"1d\"\n"
        )
    };
    let replicas = |line: &str| {
        Config::from_toml(&with(line), &no_env)
            .expect("valid config")
            .kafka
            .replication_factor
    };
    assert_eq!(replicas(""), None, "the broker's default");
    assert_eq!(replicas("replication_factor = \"broker\""), None);
    assert_eq!(replicas("replication_factor = 3"), Some(3));
    for bad in ["0", "-1", "\"three\"", "2.5"] {
        let errors = errors_of(&with(&format!("replication_factor = {bad}")));
        assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
        assert_eq!(errors[0].0, "kafka.replication_factor", "{bad}");
    }
}

#[test]
fn retention_must_outlive_two_windows_and_lateness() {
    let text = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[state]
retention = "8d"
[north_star]
name = "n"
kind = "count"
window = "1w"
"#;
    let errors = errors_of(text);
    assert_eq!(errors[0].0, "state.retention");
}

#[test]
fn max_future_skew_must_not_exceed_the_allowed_lateness() {
    let text = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[time]
allowed_lateness = "10m"
max_future_skew = "1h"
[north_star]
name = "n"
kind = "count"
window = "1w"
"#;
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "time.max_future_skew");
    assert!(errors[0].1.contains("10m"), "{errors:?}");
}

#[test]
fn monthly_windows_need_two_months_of_retention() {
    let monthly = |retention: &str| {
        format!(
            r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[state]
retention = "{retention}"
[north_star]
name = "monthly_active_users"
kind = "distinct"
window = "1mo"
"#
        )
    };
    let errors = errors_of(&monthly("35d"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "state.retention");
    assert!(errors[0].1.contains("at least \"63d\""), "{}", errors[0].1);
    let config = Config::from_toml(&monthly("70d"), &no_env).expect("valid with 70d");
    assert_eq!(config.metrics[0].window, CalendarUnit::Month);
}

const RATIO_BASE: &str = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[north_star]
name = "resolved"
kind = "count"
where = { event = "conversation_resolved" }
window = "1w"
[[inputs]]
name = "started"
kind = "count"
where = { event = "conversation_started" }
window = "1w"
[[inputs]]
name = "started_today"
kind = "count"
where = { event = "conversation_started" }
window = "1d"
"#;

#[test]
fn a_ratio_names_its_parts_and_takes_their_window() {
    let text = format!(
        "{RATIO_BASE}[[inputs]]\nname = \"resolution_rate\"\nkind = \"ratio\"\n\
         numerator = \"resolved\"\ndenominator = \"started\"\n"
    );
    let config = Config::from_toml(&text, &no_env).expect("valid ratio");
    let rate = config.metric("resolution_rate").expect("ratio metric");
    assert_eq!(
        rate.kind,
        MetricKind::Ratio {
            numerator: "resolved".into(),
            denominator: "started".into()
        }
    );
    assert_eq!(rate.window, CalendarUnit::Week);
}

#[test]
fn a_ratio_with_missing_or_mismatched_parts_is_refused_with_paths() {
    let text = format!(
        "{RATIO_BASE}\
         [[inputs]]\nname = \"no_parts\"\nkind = \"ratio\"\nfield = \"user_id\"\n\
         [[inputs]]\nname = \"unknown_part\"\nkind = \"ratio\"\nnumerator = \"resolved\"\ndenominator = \"opened\"\n\
         [[inputs]]\nname = \"mixed_windows\"\nkind = \"ratio\"\nnumerator = \"resolved\"\ndenominator = \"started_today\"\n\
         [[inputs]]\nname = \"ratio_of_ratio\"\nkind = \"ratio\"\nnumerator = \"mixed_windows\"\ndenominator = \"started\"\n\
         [[inputs]]\nname = \"daily_window\"\nkind = \"ratio\"\nnumerator = \"resolved\"\ndenominator = \"started\"\nwindow = \"1d\"\n\
         [[guardrails]]\nname = \"count_with_parts\"\nkind = \"count\"\nnumerator = \"resolved\"\nwindow = \"1w\"\n"
    );
    let errors = errors_of(&text);
    let paths: Vec<&str> = errors.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "inputs[2].field",
            "inputs[2].numerator",
            "inputs[2].denominator",
            "guardrails[0].numerator",
            "inputs[3].denominator",
            "inputs[4]",
            "inputs[5].numerator",
            "inputs[6].window",
        ],
        "{errors:#?}"
    );
    assert!(errors[4].1.contains("no metric named \"opened\""));
    assert!(errors[5].1.contains("same window"));
}

#[test]
fn a_threshold_names_its_entity_and_k_and_refuses_stray_keys() {
    let valid = format!(
        "{RATIO_BASE}[[inputs]]\nname = \"busy_projects\"\nkind = \"threshold\"\n\
         entity = \"properties.project_id\"\nfield = \"user_id\"\nat_least = 3\nwindow = \"1w\"\n"
    );
    let config = Config::from_toml(&valid, &no_env).expect("valid threshold");
    assert_eq!(
        config.metric("busy_projects").expect("metric").kind,
        MetricKind::Threshold {
            entity: FieldPath::parse("properties.project_id").expect("path"),
            actor: FieldPath::parse("user_id"),
            at_least: 3
        }
    );
    let invalid = format!(
        "{RATIO_BASE}[[inputs]]\nname = \"no_entity\"\nkind = \"threshold\"\nat_least = 0\nwindow = \"1w\"\n\
         [[inputs]]\nname = \"stray\"\nkind = \"count\"\nentity = \"team_id\"\nwindow = \"1w\"\n"
    );
    let paths = error_paths(&invalid);
    assert_eq!(
        paths,
        vec!["inputs[2].entity", "inputs[2].at_least", "inputs[3].entity"]
    );
}

#[test]
fn a_breakdown_takes_fields_and_a_top_on_every_kind() {
    let valid = format!(
        "{RATIO_BASE}[[guardrails]]\nname = \"by_plan\"\nkind = \"count\"\nwindow = \"1w\"\n\
         by = [\"properties.plan\", \"context.country\"]\n\
         [[inputs]]\nname = \"busy_projects\"\nkind = \"threshold\"\nentity = \"project_id\"\n\
         at_least = 3\nwindow = \"1w\"\nby = [\"properties.plan\"]\n\
         [[inputs]]\nname = \"active\"\nkind = \"distinct\"\nwindow = \"1w\"\nby = [\"properties.plan\"]\n\
         [[inputs]]\nname = \"returning\"\nkind = \"retention\"\nof = \"active\"\nby = [\"properties.plan\"]\n"
    );
    let config = Config::from_toml(&valid, &no_env).expect("valid breakdown");
    let segments = config.metric("by_plan").and_then(|m| m.segments.clone());
    assert_eq!(segments.map(|s| (s.by.len(), s.top)), Some((2, 10)));
    for name in ["busy_projects", "returning"] {
        assert!(config
            .metric(name)
            .and_then(|m| m.segments.clone())
            .is_some());
    }
    let invalid = format!(
        "{RATIO_BASE}[[guardrails]]\nname = \"too_many\"\nkind = \"count\"\nwindow = \"1w\"\nby = [\"a\"]\ntop = 0\n\
         [[guardrails]]\nname = \"rate\"\nkind = \"ratio\"\nnumerator = \"resolved\"\ndenominator = \"started\"\nby = [\"a\"]\n\
         [[guardrails]]\nname = \"stray_top\"\nkind = \"count\"\nwindow = \"1w\"\ntop = 5\n\
         [[guardrails]]\nname = \"active\"\nkind = \"distinct\"\nwindow = \"1w\"\nby = [\"b\"]\n\
         [[guardrails]]\nname = \"returning\"\nkind = \"retention\"\nof = \"active\"\nby = [\"a\"]\n"
    );
    let errors = errors_of(&invalid);
    let paths: Vec<&str> = errors.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "guardrails[0].top",
            "guardrails[2].top",
            // Both parts of the ratio lack the breakdown.
            "guardrails[1].by",
            "guardrails[1].by",
            "guardrails[4].by"
        ]
    );
    assert!(
        errors[4].1.contains("its of \"active\" is by [\"b\"]"),
        "{errors:#?}"
    );
}

#[test]
fn retention_reads_a_distinct_metric_and_takes_its_window() {
    let text = format!(
        "{RATIO_BASE}[[inputs]]\nname = \"active\"\nkind = \"distinct\"\nwindow = \"1d\"\n\
         [[inputs]]\nname = \"returning\"\nkind = \"retention\"\nof = \"active\"\n"
    );
    let config = Config::from_toml(&text, &no_env).expect("valid retention");
    assert_eq!(
        config.metric("returning").map(|m| m.window),
        Some(CalendarUnit::Day)
    );
    // Of a trailing metric: the range against the one before it.
    let trailing = format!(
        "{RATIO_BASE}[[inputs]]\nname = \"active_7d\"\nkind = \"distinct\"\ntrailing = \"7d\"\n\
         [[inputs]]\nname = \"returning_7d\"\nkind = \"retention\"\nof = \"active_7d\"\n"
    );
    let config = Config::from_toml(&trailing, &no_env).expect("valid trailing retention");
    assert_eq!(
        config.metric("returning_7d").and_then(|m| m.trailing),
        config.metric("active_7d").and_then(|m| m.trailing)
    );
    // It reads two lengths back: 4 weeks and the lateness do not fit in 28 days.
    let short = format!("{trailing}[state]\nretention = \"28d\"\n");
    assert_eq!(error_paths(&short), vec!["state.retention"]);
    let invalid = format!(
        "{RATIO_BASE}[[inputs]]\nname = \"of_a_count\"\nkind = \"retention\"\nof = \"started\"\n\
         [[inputs]]\nname = \"of_nothing\"\nkind = \"retention\"\n"
    );
    let paths = error_paths(&invalid);
    assert_eq!(paths, vec!["inputs[3].of", "inputs[2].of"]);
}

#[test]
fn a_conversion_needs_its_start_its_end_and_a_duration() {
    let text = format!(
        "{RATIO_BASE}[[inputs]]\nname = \"converted\"\nkind = \"conversion\"\nwindow = \"1w\"\n\
         [[inputs]]\nname = \"stray\"\nkind = \"count\"\nwithin = \"1d\"\nwindow = \"1w\"\n"
    );
    let paths = error_paths(&text);
    assert_eq!(
        paths,
        vec![
            "inputs[2].from",
            "inputs[2].where",
            "inputs[2].within",
            "inputs[3].within"
        ]
    );
}

#[test]
fn a_trailing_window_replaces_the_calendar_one_for_every_kind_with_events() {
    let text = format!(
        "{RATIO_BASE}[[inputs]]\nname = \"active_7d\"\nkind = \"distinct\"\ntrailing = \"7d\"\n\
         [[inputs]]\nname = \"busy_7d\"\nkind = \"threshold\"\nentity = \"team_id\"\n\
         field = \"user_id\"\nat_least = 3\ntrailing = \"7d\"\nby = [\"plan\"]\n\
         [[inputs]]\nname = \"converted\"\nkind = \"conversion\"\nfrom = {{ event = \"a\" }}\n\
         where = {{ event = \"b\" }}\nwithin = \"1d\"\ntrailing = \"1d\"\n"
    );
    let config = Config::from_toml(&text, &no_env).expect("valid trailing");
    let metric = config.metric("active_7d").expect("metric");
    assert_eq!(metric.window_label(), "trailing_7d");
    assert_eq!(
        metric.window,
        CalendarUnit::Week,
        "compared week over week in rules"
    );
    let busy = config.metric("busy_7d").expect("metric");
    assert_eq!(busy.window_label(), "trailing_7d");
    let invalid = format!(
        "{RATIO_BASE}[[inputs]]\nname = \"both\"\nkind = \"count\"\ntrailing = \"1d\"\nwindow = \"1d\"\n\
         [[inputs]]\nname = \"odd\"\nkind = \"count\"\ntrailing = \"90s\"\n\
         [[inputs]]\nname = \"rate\"\nkind = \"ratio\"\nnumerator = \"resolved\"\n\
         denominator = \"started\"\ntrailing = \"1d\"\n"
    );
    let paths = error_paths(&invalid);
    assert_eq!(
        paths,
        vec![
            "inputs[2].trailing",
            "inputs[3].trailing",
            "inputs[4].trailing"
        ]
    );
}

const HTTP_BASE: &str = r#"
[kafka]
brokers = "b:9092"
topics = ["events"]
[north_star]
name = "n"
kind = "count"
window = "1d"
"#;

#[test]
fn http_tls_and_basic_auth_are_optional_and_read_in_the_prometheus_style() {
    let config = Config::from_toml(HTTP_BASE, &no_env).expect("valid");
    assert!(config.http.tls.is_none() && config.http.basic_auth.is_none());

    let hash = "$2y$10$Fj7XKDnAOd3ycCpmERbx7.fAfNVqVH3bGkUE5pF6BRFGclXh4WC8m";
    let text = format!(
        "{HTTP_BASE}[http]\nlisten = \"0.0.0.0:9464\"\n[http.tls]\ncert_file = \"/etc/nsm/tls.crt\"\n\
         key_file = \"/etc/nsm/tls.key\"\n[http.basic_auth]\nusers = {{ prometheus = \"{hash}\" }}\n"
    );
    let config = Config::from_toml(&text, &no_env).expect("valid");
    let tls = config.http.tls.as_ref().expect("tls");
    assert_eq!(tls.cert_file, std::path::Path::new("/etc/nsm/tls.crt"));
    assert_eq!(tls.key_file, std::path::Path::new("/etc/nsm/tls.key"));
    let users = config.http.basic_auth.as_ref().expect("basic auth");
    assert_eq!(users.iter().collect::<Vec<_>>(), [("prometheus", hash)]);
    // Hashes are not shown in a config dump, only user names.
    let debug = format!("{config:?}");
    assert!(
        debug.contains("prometheus") && !debug.contains(hash),
        "{debug}"
    );
}

#[test]
fn http_security_problems_are_listed_and_a_plaintext_password_is_never_echoed() {
    let text = format!(
        "{HTTP_BASE}[http.tls]\ncert_file = \"/etc/nsm/tls.crt\"\n[http.basic_auth]\n\
         users = {{ alice = \"plaintext-hunter2\", \"bad:name\" = \"$2b$04$abcdefghijklmnopqrstuu5Bd0ZBNs6mCAyJ5b3EW3Ey6H1.ESEre\", bob = 7 }}\n"
    );
    let errors = errors_of(&text);
    let paths: Vec<&str> = errors.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "http.tls.key_file",
            "http.basic_auth.users.\"alice\"",
            "http.basic_auth.users.\"bad:name\"",
            "http.basic_auth.users.\"bob\"",
        ],
        "{errors:?}"
    );
    assert!(errors[1].1.contains("not a bcrypt hash"), "{errors:?}");
    assert!(!format!("{errors:?}").contains("hunter2"), "{errors:?}");

    let errors = errors_of(&format!("{HTTP_BASE}[http.basic_auth]\nusers = {{}}\n"));
    assert_eq!(errors[0].0, "http.basic_auth.users");
}

#[test]
fn the_changelog_is_on_by_default_and_named_after_the_group() {
    let minimal = |state: &str| {
        format!(
            "[kafka]\nbrokers = \"b:9092\"\ntopics = [\"events\"]\ngroup_id = \"metrics\"\n\
             [state]\n{state}\n[north_star]\nname = \"n\"\nkind = \"count\"\nwindow = \"1d\"\n"
        )
    };
    let config = Config::from_toml(&minimal(""), &no_env).expect("valid");
    assert_eq!(
        config.state.changelog_topic.as_deref(),
        Some("metrics-changelog")
    );
    let config = Config::from_toml(&minimal("changelog = false"), &no_env).expect("valid");
    assert_eq!(config.state.changelog_topic, None);
    let config =
        Config::from_toml(&minimal("changelog_topic = \"state-log\""), &no_env).expect("valid");
    assert_eq!(config.state.changelog_topic.as_deref(), Some("state-log"));

    for state in [
        "changelog_topic = \"events\"",
        "changelog_topic = \"bad topic\"",
        "changelog = false\nchangelog_topic = \"state-log\"",
    ] {
        assert_eq!(
            error_paths(&minimal(state)),
            vec!["state.changelog_topic"],
            "{state}"
        );
    }
}

#[test]
fn http_connection_limits_have_defaults_and_bounds() {
    let config = Config::from_toml(HTTP_BASE, &no_env).expect("valid");
    assert_eq!(config.http.header_timeout, Duration::from_secs(10));
    assert_eq!(config.http.idle_timeout, Duration::from_secs(90));
    assert_eq!(config.http.max_connections, 256);

    let text = format!(
        "{HTTP_BASE}[http]\nheader_timeout = \"5s\"\nidle_timeout = \"2m\"\nmax_connections = 64\n"
    );
    let config = Config::from_toml(&text, &no_env).expect("valid");
    assert_eq!(config.http.header_timeout, Duration::from_secs(5));
    assert_eq!(config.http.idle_timeout, Duration::from_secs(120));
    assert_eq!(config.http.max_connections, 64);

    let text = format!(
        "{HTTP_BASE}[http]\nheader_timeout = \"0s\"\nidle_timeout = \"soon\"\nmax_connections = 0\n"
    );
    let errors = errors_of(&text);
    let paths: Vec<&str> = errors.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "http.header_timeout",
            "http.idle_timeout",
            "http.max_connections"
        ]
    );
    assert!(errors[0].1.contains("between 1s and 10m"), "{errors:?}");
}

#[test]
fn the_memory_for_entries_takes_a_size() {
    let example = include_str!("../../../../config/example.toml");
    let with =
        |limit: &str| example.replacen("[state]", &format!("[state]\nmemory_limit = {limit}"), 1);
    let config = Config::from_toml(&with("\"2GiB\""), &no_env).expect("a size in GiB");
    assert_eq!(config.state.memory_limit, 2 << 30);
    let config = Config::from_toml(&with("67108864"), &no_env).expect("a size in bytes");
    assert_eq!(config.state.memory_limit, 64 << 20);
    let errors = errors_of(&with("\"lots\""));
    assert!(
        errors.iter().any(|(path, _)| path == "state.memory_limit"),
        "{errors:#?}"
    );
}

#[test]
fn deduplicating_across_partitions_needs_ids_and_no_key_field() {
    let with = |kafka: &str, events: &str| {
        RATIO_BASE
            .replace(
                "topics = [\"events\"]\n",
                &format!("topics = [\"events\"]\n{kafka}"),
            )
            .replace(
                "[north_star]",
                &format!("[events]\ndedup_across_partitions = true\n{events}[north_star]"),
            )
    };
    let config = Config::from_toml(&with("", ""), &no_env).expect("valid");
    assert!(config.events.dedup_across_partitions);
    let errors = errors_of(&with(
        "key_field = \"user_id\"\n",
        "dedup_horizon = \"0s\"\n",
    ));
    let paths: Vec<&str> = errors.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "events.dedup_across_partitions",
            "events.dedup_across_partitions"
        ]
    );
    assert!(errors[0].1.contains("dedup_horizon"), "{}", errors[0].1);
    assert!(errors[1].1.contains("kafka.key_field"), "{}", errors[1].1);
}
