//! The North Star linter: the classic mistakes in choosing and breaking down a North Star
//! Metric, found in a valid config. `nsm check` prints every finding with a hint; errors stop
//! `nsm check` and `nsm run`, warnings only inform.
//!
//! The checks follow the practice the product is built on: revenue is the lagging outcome and
//! never the North Star; a North Star must be able to fall (no sign-up or all-event counts);
//! one North Star, two at most for a two-sided marketplace; 3–5 inputs, each owned by a team;
//! at least one guardrail against gaming; revenue tracked beside the North Star.

use std::fmt;

use crate::config::Config;
use crate::metric::{FieldPath, FilterField, Literal, MetricDef, MetricKind, Role};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

impl Severity {
    pub fn label(self) -> &'static str {
        match self {
            Self::Warning => "warning",
            Self::Error => "error",
        }
    }
}

/// One finding: where, what is wrong, and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// A stable name of the check (`revenue_as_north_star`), for tests and log filters.
    pub check: &'static str,
    /// Where in the config: `north_star`, `inputs[2].owner`, `guardrails`.
    pub path: String,
    pub message: String,
    pub hint: &'static str,
}

impl Finding {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {} [{}]\n    hint: {}",
            self.severity.label(),
            self.path,
            self.message,
            self.check,
            self.hint
        )
    }
}

/// Words that, as the last segment of a summed field, say the sum is money.
const MONEY_WORDS: [&str; 12] = [
    "amount",
    "revenue",
    "price",
    "cost",
    "paid",
    "payment",
    "mrr",
    "arr",
    "gmv",
    "cents",
    "total_price",
    "order_value",
];

/// Words that, as the last segment of a field, say it holds a running total.
const CUMULATIVE_WORDS: [&str; 5] = [
    "running_total",
    "cumulative",
    "lifetime",
    "to_date",
    "all_time",
];

/// Event names that only count arrivals, not value received.
const SIGN_UP_WORDS: [&str; 8] = [
    "signup",
    "sign_up",
    "signed_up",
    "register",
    "registered",
    "registration",
    "account_created",
    "install",
];

/// Whether the last segment of `field` contains one of `words` (case-insensitive).
fn names_any(field: &FieldPath, words: &[&str]) -> bool {
    let last = field
        .segments()
        .last()
        .map(|segment| segment.to_ascii_lowercase())
        .unwrap_or_default();
    words.iter().any(|word| last.contains(word))
}

/// Every finding for `config`, errors first, then in config order.
pub fn lint(config: &Config) -> Vec<Finding> {
    let mut findings = Vec::new();
    let north_stars: Vec<&MetricDef> = config.metrics_with_role(Role::NorthStar).collect();
    let inputs: Vec<&MetricDef> = config.metrics_with_role(Role::Input).collect();
    let revenue = config.metrics_with_role(Role::Revenue).next();

    if north_stars.len() > 2 {
        findings.push(Finding {
            severity: Severity::Error,
            check: "too_many_north_stars",
            path: "north_star".into(),
            message: format!(
                "{} North Star metrics; a product has one, a two-sided marketplace two",
                north_stars.len()
            ),
            hint: "keep the one number that best captures the value customers get; move the \
                   others to [[inputs]] or [[guardrails]]",
        });
    }
    for (index, north_star) in north_stars.iter().enumerate() {
        let path = if north_stars.len() == 1 {
            "north_star".to_string()
        } else {
            format!("north_star[{index}]")
        };
        lint_north_star(north_star, revenue, &path, &mut findings);
    }

    match inputs.len() {
        0 => findings.push(Finding {
            severity: Severity::Warning,
            check: "no_inputs",
            path: "inputs".into(),
            message: "the North Star has no input metrics".into(),
            hint: "break it into 3 to 5 levers that teams can move (activation, frequency, \
                   coverage...), each an [[inputs]] with an owner",
        }),
        1..=2 => findings.push(Finding {
            severity: Severity::Warning,
            check: "few_inputs",
            path: "inputs".into(),
            message: format!(
                "{} input metric{}; 3 to 5 cover the levers of a North Star",
                inputs.len(),
                if inputs.len() == 1 { "" } else { "s" }
            ),
            hint: "add the missing levers, so a change of the North Star can be traced to one",
        }),
        3..=5 => {}
        more => findings.push(Finding {
            severity: Severity::Warning,
            check: "many_inputs",
            path: "inputs".into(),
            message: format!("{more} input metrics; more than 5 blur who moves the North Star"),
            hint: "keep the 3 to 5 levers with the most influence; track the rest elsewhere",
        }),
    }
    for (index, input) in inputs.iter().enumerate() {
        if input.owner.is_none() {
            findings.push(Finding {
                severity: Severity::Warning,
                check: "input_without_owner",
                path: format!("inputs[{index}].owner"),
                message: format!("input {:?} has no owner", input.name),
                hint: "name the team that moves this lever (owner = \"growth-team\"); it is \
                       shown on dashboards and in alerts",
            });
        }
    }
    if config.metrics_with_role(Role::Guardrail).next().is_none() {
        findings.push(Finding {
            severity: Severity::Warning,
            check: "no_guardrail",
            path: "guardrails".into(),
            message: "no guardrail metric".into(),
            hint: "add a [[guardrails]] metric (complaints, churn, errors) that would fall if \
                   customers were worse off while the North Star rose",
        });
    }
    lint_partitioning(config, &mut findings);
    if revenue.is_none() {
        findings.push(Finding {
            severity: Severity::Warning,
            check: "no_revenue",
            path: "revenue".into(),
            message: "no [revenue] metric".into(),
            hint: "track revenue beside the North Star: the dangerous divergence (North Star \
                   flat while revenue grows) can only be seen with both",
        });
    }
    findings.sort_by_key(|finding| std::cmp::Reverse(finding.severity));
    findings
}

/// Distinct counts are exact only when all events of one entity are counted in one partition.
/// With `kafka.key_field` set, metrics counting another entity are counted through the
/// repartition topic, exactly (docs/design/repartition.md); without it nsm cannot tell how
/// producers key events, and says so once. With `events.dedup_across_partitions` every metric
/// goes through the repartition topic.
fn lint_partitioning(config: &Config, findings: &mut Vec<Finding>) {
    if config.kafka.key_field.is_some() || config.events.dedup_across_partitions {
        return;
    }
    let counted: Vec<(&MetricDef, &FieldPath)> = config
        .metrics
        .iter()
        .filter_map(|metric| metric.kind.counted_entity().map(|field| (metric, field)))
        .collect();
    if counted.is_empty() {
        return;
    }
    let mut entities: Vec<String> = Vec::new();
    for (_, field) in &counted {
        let field = field.to_string();
        if !entities.contains(&field) {
            entities.push(field);
        }
    }
    let names: Vec<&str> = counted
        .iter()
        .map(|(metric, _)| metric.name.as_str())
        .collect();
    findings.push(Finding {
        severity: Severity::Warning,
        check: "message_key_unknown",
        path: "kafka.key_field".into(),
        message: format!(
            "{} count distinct {} per Kafka partition, but the config does not say how \
             producers key events",
            names.join(", "),
            entities.join(", ")
        ),
        hint: "distinct counts are exact only when all events of one entity are counted in one \
               partition: set kafka.key_field to the field producers key events by, and nsm \
               counts the metrics of other entities through a repartition topic (or, when copies \
               of one event may be on different partitions, events.dedup_across_partitions)",
    });
}

fn lint_north_star(
    north_star: &MetricDef,
    revenue: Option<&MetricDef>,
    path: &str,
    findings: &mut Vec<Finding>,
) {
    let revenue_hint = "revenue is the lagging outcome: keep it in [revenue] and choose as North \
                        Star the value customers get (messages sent in active teams, nights \
                        booked, questions resolved)";
    if revenue.is_some_and(|revenue| revenue.fingerprint() == north_star.fingerprint()) {
        findings.push(Finding {
            severity: Severity::Error,
            check: "revenue_as_north_star",
            path: path.into(),
            message: format!(
                "North Star {:?} computes exactly what [revenue] computes",
                north_star.name
            ),
            hint: revenue_hint,
        });
    } else if let MetricKind::Sum { field } = &north_star.kind {
        if names_any(field, &MONEY_WORDS) {
            findings.push(Finding {
                severity: Severity::Warning,
                check: "revenue_as_north_star",
                path: path.into(),
                message: format!(
                    "North Star {:?} sums {field}, which looks like money",
                    north_star.name
                ),
                hint: revenue_hint,
            });
        }
    }

    // A North Star that can hardly fall: a window of months, or a running total in the event.
    let long_trailing = north_star
        .trailing
        .filter(|trailing| trailing.length_ms > 90 * 86_400_000);
    let cumulative_field = north_star
        .kind
        .field()
        .filter(|field| names_any(field, &CUMULATIVE_WORDS));
    if let Some(trailing) = long_trailing {
        findings.push(Finding {
            severity: Severity::Warning,
            check: "vanity_north_star",
            path: path.into(),
            message: format!(
                "North Star {:?} trails {}: close to a cumulative total, it barely falls",
                north_star.name,
                trailing.label().trim_start_matches("trailing_")
            ),
            hint: "a North Star should move with this week's value: use a weekly or monthly \
                   window (or a trailing 7d/28d one)",
        });
    } else if let Some(field) = cumulative_field {
        findings.push(Finding {
            severity: Severity::Warning,
            check: "vanity_north_star",
            path: path.into(),
            message: format!(
                "North Star {:?} reads {field}, which looks like a running total",
                north_star.name
            ),
            hint: "sum what happened in each event (nights of this booking), not a total to \
                   date that only grows",
        });
    }

    if let MetricKind::Ratio { denominator, .. } = &north_star.kind {
        findings.push(Finding {
            severity: Severity::Warning,
            check: "ratio_north_star",
            path: path.into(),
            message: format!(
                "North Star {:?} is a ratio: it rises when its denominator {denominator:?} \
                 falls, even while fewer customers get value",
                north_star.name
            ),
            hint: "make the North Star the count in the numerator and track the rate as an \
                   input, or keep the rate and guard its denominator with a guardrail",
        });
    }

    let event_names: Vec<String> = north_star
        .filter
        .clauses
        .iter()
        .filter(|clause| clause.field == FilterField::EventName)
        .flat_map(|clause| clause.any_of.iter())
        .filter_map(|literal| match literal {
            Literal::Text(name) => Some(name.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    if let Some(sign_up) = event_names
        .iter()
        .find(|name| SIGN_UP_WORDS.iter().any(|word| name.contains(word)))
    {
        findings.push(Finding {
            severity: Severity::Warning,
            check: "vanity_north_star",
            path: path.into(),
            message: format!(
                "North Star {:?} counts {sign_up:?} events: arrivals, not value received",
                north_star.name
            ),
            hint: "count what customers get once they are in (the core action done, the job \
                   completed); keep sign-ups as an activation input",
        });
    } else if event_names.is_empty() && north_star.kind == MetricKind::Count {
        findings.push(Finding {
            severity: Severity::Warning,
            check: "vanity_north_star",
            path: path.into(),
            message: format!(
                "North Star {:?} counts every event, whatever it is",
                north_star.name
            ),
            hint: "filter on the core action (where = { event = \"message_sent\" }): raw \
                   event volume grows with noise and retries, not with customer value",
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config keyed by user_id, the entity the distinct counts below count.
    fn config(metrics: &str) -> Config {
        keyed("key_field = \"user_id\"", metrics)
    }

    fn keyed(kafka: &str, metrics: &str) -> Config {
        let text =
            format!("[kafka]\nbrokers = \"b:9092\"\ntopics = [\"events\"]\n{kafka}\n{metrics}");
        Config::from_toml(&text, &|_| None).expect("valid config")
    }

    /// A config with the healthy input tree below and this North Star definition.
    fn with_north_star(definition: &str) -> Config {
        config(&format!("[north_star]\n{definition}\n{HEALTHY_TREE}"))
    }

    fn checks(config: &Config) -> Vec<(Severity, &'static str, String)> {
        lint(config)
            .into_iter()
            .map(|finding| (finding.severity, finding.check, finding.path))
            .collect()
    }

    const HEALTHY_TREE: &str = r#"
[[inputs]]
name = "activated_teams"
owner = "onboarding"
kind = "count"
where = { event = "team_activated" }
window = "1w"
[[inputs]]
name = "messages_per_team"
owner = "messaging"
kind = "count"
where = { event = "message_sent" }
window = "1w"
[[inputs]]
name = "returning_users"
owner = "growth"
kind = "distinct"
where = { event = "session_started" }
window = "1w"
[[guardrails]]
name = "complaints"
owner = "support"
kind = "count"
where = { event = "complaint_filed" }
window = "1w"
[revenue]
name = "revenue"
kind = "sum"
field = "properties.amount"
where = { event = "payment_succeeded" }
window = "1w"
"#;

    #[test]
    fn a_healthy_tree_has_no_findings() {
        let config = with_north_star(
            r#"name = "weekly_active_messagers"
kind = "distinct"
where = { event = "message_sent" }
window = "1w""#,
        );
        assert_eq!(checks(&config), vec![]);
    }

    #[test]
    fn more_than_five_inputs_is_a_warning_on_the_inputs() {
        let extra: String = (0..3)
            .map(|index| {
                format!(
                    "[[inputs]]\nname = \"extra_{index}\"\nowner = \"team\"\nkind = \"count\"\n\
                     where = {{ event = \"extra_{index}\" }}\nwindow = \"1w\"\n"
                )
            })
            .collect();
        let config = config(&format!(
            "[north_star]\nname = \"weekly_active_messagers\"\nkind = \"distinct\"\n\
             where = {{ event = \"message_sent\" }}\nwindow = \"1w\"\n{HEALTHY_TREE}\n{extra}"
        ));
        assert_eq!(
            checks(&config),
            vec![(Severity::Warning, "many_inputs", "inputs".into())]
        );
        let finding = lint(&config).remove(0);
        assert!(
            finding.message.starts_with("6 input metrics"),
            "{}",
            finding.message
        );
    }

    #[test]
    fn revenue_as_north_star_is_an_error_when_identical_and_a_warning_when_money_like() {
        let identical = with_north_star(
            r#"name = "weekly_revenue"
kind = "sum"
field = "properties.amount"
where = { event = "payment_succeeded" }
window = "1w""#,
        );
        assert_eq!(
            checks(&identical),
            vec![(
                Severity::Error,
                "revenue_as_north_star",
                "north_star".into()
            )]
        );
        let money = with_north_star(
            r#"name = "gmv"
kind = "sum"
field = "order.total_price"
where = { event = "order_placed" }
window = "1w""#,
        );
        assert_eq!(
            checks(&money),
            vec![(
                Severity::Warning,
                "revenue_as_north_star",
                "north_star".into()
            )]
        );
        let minutes = with_north_star(
            r#"name = "minutes_listened"
kind = "sum"
field = "properties.minutes"
where = { event = "track_played" }
window = "1w""#,
        );
        assert_eq!(checks(&minutes), vec![]);
    }

    #[test]
    fn sign_ups_and_all_event_counts_are_vanity_north_stars() {
        let sign_ups = with_north_star(
            r#"name = "weekly_signups"
kind = "count"
where = { event = ["user_signed_up", "invite_accepted"] }
window = "1w""#,
        );
        assert_eq!(
            checks(&sign_ups),
            vec![(Severity::Warning, "vanity_north_star", "north_star".into())]
        );
        let everything = with_north_star("name = \"events\"\nkind = \"count\"\nwindow = \"1w\"");
        assert_eq!(
            checks(&everything),
            vec![(Severity::Warning, "vanity_north_star", "north_star".into())]
        );
    }

    #[test]
    fn north_stars_that_barely_fall_are_vanity_warnings() {
        let months = with_north_star(
            r#"name = "active_users"
kind = "distinct"
where = { event = "message_sent" }
trailing = "120d"
[state]
retention = "250d""#,
        );
        assert_eq!(
            checks(&months),
            vec![(Severity::Warning, "vanity_north_star", "north_star".into())]
        );
        let running_total = with_north_star(
            r#"name = "nights"
kind = "sum"
field = "properties.lifetime_nights"
where = { event = "booking_confirmed" }
window = "1w""#,
        );
        assert_eq!(
            checks(&running_total),
            vec![(Severity::Warning, "vanity_north_star", "north_star".into())]
        );
    }

    #[test]
    fn a_ratio_north_star_is_a_warning() {
        let ratio = with_north_star(
            r#"name = "team_activation_rate"
kind = "ratio"
numerator = "activated_teams"
denominator = "messages_per_team""#,
        );
        assert_eq!(
            checks(&ratio),
            vec![(Severity::Warning, "ratio_north_star", "north_star".into())]
        );
    }

    #[test]
    fn more_than_two_north_stars_is_an_error() {
        let three = config(&format!(
            "[[north_star]]\nname = \"a\"\nkind = \"count\"\nwhere = {{ event = \"a\" }}\nwindow = \"1w\"\n\
             [[north_star]]\nname = \"b\"\nkind = \"count\"\nwhere = {{ event = \"b\" }}\nwindow = \"1w\"\n\
             [[north_star]]\nname = \"c\"\nkind = \"count\"\nwhere = {{ event = \"c\" }}\nwindow = \"1w\"\n\
             {HEALTHY_TREE}"
        ));
        assert_eq!(
            checks(&three),
            vec![(Severity::Error, "too_many_north_stars", "north_star".into())]
        );
    }

    #[test]
    fn a_bare_north_star_gets_every_tree_warning_with_paths() {
        let bare = config(
            "[north_star]\nname = \"weekly_active_messagers\"\nkind = \"distinct\"\n\
             where = { event = \"message_sent\" }\nwindow = \"1w\"\n\
             [[inputs]]\nname = \"messages\"\nkind = \"count\"\nwindow = \"1w\"\n",
        );
        assert_eq!(
            checks(&bare),
            vec![
                (Severity::Warning, "few_inputs", "inputs".into()),
                (
                    Severity::Warning,
                    "input_without_owner",
                    "inputs[0].owner".into()
                ),
                (Severity::Warning, "no_guardrail", "guardrails".into()),
                (Severity::Warning, "no_revenue", "revenue".into()),
            ]
        );
        let finding = &lint(&bare)[1];
        assert_eq!(
            finding.to_string().lines().next(),
            Some("warning: inputs[0].owner: input \"messages\" has no owner [input_without_owner]")
        );
    }

    const TEAM_TREE: &str = r#"
[north_star]
name = "weekly_active_messagers"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1w"
[[inputs]]
name = "active_teams"
owner = "collaboration"
kind = "threshold"
entity = "team_id"
field = "user_id"
at_least = 3
window = "1w"
[[inputs]]
name = "messages"
owner = "messaging"
kind = "count"
window = "1w"
[[inputs]]
name = "teams_paying"
owner = "sales"
kind = "distinct"
field = "team_id"
where = { event = "payment_succeeded" }
window = "1w"
[[guardrails]]
name = "complaints"
owner = "support"
kind = "count"
where = { event = "complaint_filed" }
window = "1w"
[revenue]
name = "revenue"
kind = "sum"
field = "properties.amount"
where = { event = "payment_succeeded" }
window = "1w"
"#;

    #[test]
    fn without_a_key_field_distinct_counts_get_one_warning() {
        let config = keyed("", TEAM_TREE);
        assert_eq!(
            checks(&config),
            vec![(
                Severity::Warning,
                "message_key_unknown",
                "kafka.key_field".into()
            )]
        );
        let finding = &lint(&config)[0];
        assert!(
            finding
                .message
                .contains("weekly_active_messagers, active_teams, teams_paying")
                && finding.message.contains("user_id, team_id"),
            "{finding}"
        );
        // Counts and sums are exact however events are keyed: nothing to say.
        let counts_only = keyed(
            "",
            "[north_star]\nname = \"messages_sent\"\nkind = \"count\"\n\
             where = { event = \"message_sent\" }\nwindow = \"1w\"",
        );
        assert!(
            !checks(&counts_only)
                .iter()
                .any(|(_, check, _)| *check == "message_key_unknown"),
            "{:?}",
            checks(&counts_only)
        );
    }

    #[test]
    fn metrics_counting_another_entity_than_the_key_need_no_warning_they_are_re_keyed() {
        for key in [
            "key_field = \"team_id\"",
            "key_field = \"team_id\"\nnested_in_key = [\"user_id\"]",
            "key_field = \"user_id\"",
        ] {
            let config = keyed(key, TEAM_TREE);
            assert_eq!(checks(&config), vec![], "{key}");
        }
        // Copies of one event on any partition: every metric goes through the topic.
        let across = keyed("[events]\ndedup_across_partitions = true", TEAM_TREE);
        assert_eq!(checks(&across), vec![]);
        let by_user = keyed("key_field = \"user_id\"", TEAM_TREE);
        let plan = crate::engine::Plan::from_config(&by_user);
        let fields: Vec<String> = plan
            .rekey_fields()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(fields, ["team_id"]);
    }
}
