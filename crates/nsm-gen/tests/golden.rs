//! Golden files: the rules and the dashboard generated from config/example.toml, reviewed as
//! text in each change that alters them. `UPDATE_GOLDEN=1 cargo test --workspace --test
//! golden` rewrites them; the diff is then part of the commit.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use support::{load, repo_root};

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn assert_golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "{}: {error}; create it with UPDATE_GOLDEN=1 cargo test --workspace --test golden",
            path.display()
        )
    });
    if expected != actual {
        let first_difference = expected
            .lines()
            .zip(actual.lines())
            .position(|(expected, actual)| expected != actual)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{name} differs from the golden file at line {} (expected {:?}, generated {:?}); \
             if the change is intended, rerun with UPDATE_GOLDEN=1 and review the diff",
            first_difference + 1,
            expected.lines().nth(first_difference),
            actual.lines().nth(first_difference)
        );
    }
}

#[test]
fn example_rules_match_the_golden_file() {
    let config = load(&repo_root().join("config/example.toml"));
    assert_golden(
        "example.rules.yml",
        &nsm_gen::rules(&config, "config/example.toml"),
    );
}

#[test]
fn example_dashboard_matches_the_golden_file() {
    let config = load(&repo_root().join("config/example.toml"));
    assert_golden(
        "example.dashboard.json",
        &nsm_gen::dashboard(&config, "config/example.toml"),
    );
}

/// What a product team looks for on the dashboard, for every shipped config: the North Star
/// big and first, each input and guardrail with its owner, revenue growth beside the North
/// Star's, the divergence signal and pipeline health; a layout Grafana accepts.
#[test]
fn every_dashboard_shows_the_tree_with_owners_and_pipeline_health() {
    for (name, config) in support::shipped_configs() {
        let text = nsm_gen::dashboard(&config, &name);
        let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(dashboard["schemaVersion"], 39, "{name}");
        assert_eq!(
            text,
            nsm_gen::dashboard(&config, &name),
            "{name}: generation is deterministic"
        );
        let uid = dashboard["uid"].as_str().expect("uid");
        assert!(uid.len() <= 40 && uid.starts_with("nsm-"), "{name}: {uid}");
        assert_eq!(
            dashboard["templating"]["list"][0]["type"], "datasource",
            "{name}: the data source is a variable"
        );
        let panels = dashboard["panels"].as_array().expect("panels");
        let first = &panels[0];
        assert_eq!(first["type"], "stat", "{name}: the North Star comes first");
        let north_star = config
            .metrics_with_role(nsm_core::metric::Role::NorthStar)
            .next()
            .expect("a North Star");
        assert!(
            first["title"]
                .as_str()
                .is_some_and(|title| title.contains(&north_star.name)),
            "{name}: {}",
            first["title"]
        );
        assert!(first["gridPos"]["w"].as_u64() >= Some(12), "{name}: big");
        let titles: Vec<&str> = panels
            .iter()
            .filter_map(|panel| panel["title"].as_str())
            .collect();
        for metric in &config.metrics {
            if let (Some(owner), true) = (
                &metric.owner,
                matches!(
                    metric.role,
                    nsm_core::metric::Role::Input | nsm_core::metric::Role::Guardrail
                ),
            ) {
                let wanted = format!("{} (owner: {owner})", metric.name);
                assert!(
                    titles.contains(&wanted.as_str()),
                    "{name}: no panel {wanted:?}"
                );
            }
        }
        let exprs: Vec<&str> = panels
            .iter()
            .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
            .filter_map(|target| target["expr"].as_str())
            .collect();
        for needed in [
            "nsm:metric_growth{role=\"revenue\"}",
            "nsm:metric_growth{role=\"north_star\"}",
            "nsm:growth_gap:revenue_minus_north_star",
            "nsm:guardrail_worsening",
            "nsm_consumer_lag_messages",
            "nsm_events_consumed_total",
            "nsm_events_late_total",
            "nsm_events_invalid_total",
            "nsm_events_duplicate_total",
            "nsm_watermark_timestamp_seconds",
        ] {
            assert!(
                exprs.iter().any(|expr| expr.contains(needed)),
                "{name}: no panel queries {needed}"
            );
        }
        // Unique ids, panels inside the 24-column grid, none overlapping.
        let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
        assert_eq!(ids.len(), panels.len(), "{name}: panel ids are unique");
        let mut cells = BTreeSet::new();
        for panel in panels {
            let grid = &panel["gridPos"];
            let (x, y, w, h) = (
                grid["x"].as_u64().expect("x"),
                grid["y"].as_u64().expect("y"),
                grid["w"].as_u64().expect("w"),
                grid["h"].as_u64().expect("h"),
            );
            assert!(
                x + w <= 24,
                "{name}: {} is outside the grid",
                panel["title"]
            );
            for column in x..x + w {
                for row in y..y + h {
                    assert!(
                        cells.insert((column, row)),
                        "{name}: {} overlaps another panel",
                        panel["title"]
                    );
                }
            }
        }
    }
}

/// `--time-scale` divides every window-derived duration of the business rules and nothing
/// else; scale 1 is the production file.
#[test]
fn time_scaled_rules_divide_window_durations_only() {
    let config = load(&repo_root().join("config/example.toml"));
    let source = "config/example.toml";
    assert_eq!(
        nsm_gen::rules_scaled(&config, source, 1),
        nsm_gen::rules(&config, source)
    );
    let scaled = nsm_gen::rules_scaled(&config, source, 360);
    assert!(scaled.contains("TIME-SCALED"), "{scaled}");
    // A day is 4m, a week 28m; the North Star's grace (6h) 1m, keep_firing_for (1d) 4m.
    assert!(scaled.contains(" offset 4m)"), "day growth look-back");
    assert!(scaled.contains(" offset 28m)"), "week growth look-back");
    assert!(scaled.contains("for: 1m\n        keep_firing_for: 4m"));
    assert!(!scaled.contains("offset 7d") && !scaled.contains("offset 1d"));
    // Freshness alerts are about the wall clock: unscaled.
    assert!(scaled.contains("sum(rate(nsm_events_consumed_total[5m])) == 0\n        for: 15m"));
}
