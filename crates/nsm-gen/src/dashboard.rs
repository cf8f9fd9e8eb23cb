//! The Grafana dashboard of a config, in Grafana's provisioning JSON model: the North Star big
//! and first, its input tree with owners, revenue growth beside North Star growth, the
//! divergence signal, guardrails and pipeline health. Panels query the recording rules of
//! `nsm rules` (`nsm:*`) and nsm's own series; the data source is a dashboard variable.

use nsm_core::metric::{MetricDef, Role};
use nsm_core::window::CalendarUnit;
use nsm_core::Config;
use serde_json::{json, Value};

use crate::promql::{duration, number, Timing};

/// Grafana's dashboard JSON schema version the model follows (Grafana 10.x).
const SCHEMA_VERSION: u64 = 39;
const WIDTH: u64 = 24;

/// The dashboard JSON for `config`; `source` names the config in the description.
pub fn dashboard(config: &Config, source: &str) -> String {
    let mut builder = Builder::default();
    let north_stars: Vec<&MetricDef> = config.metrics_with_role(Role::NorthStar).collect();
    let inputs: Vec<&MetricDef> = config.metrics_with_role(Role::Input).collect();
    let guardrails: Vec<&MetricDef> = config.metrics_with_role(Role::Guardrail).collect();
    let revenue = config.metrics_with_role(Role::Revenue).next();
    let flat = config.alerting.nsm_flat_growth_threshold;

    for north_star in &north_stars {
        let unit = north_star.window.label();
        builder.add(
            stat(
                &format!("North Star: {} (this {unit} so far)", north_star.name),
                &north_star.description,
                &value_query(north_star, "current"),
                "short",
                true,
            ),
            12,
            8,
        );
        builder.add(
            stat(
                &format!("Last whole {unit}"),
                "The previous window, complete once the allowed lateness has passed.",
                &value_query(north_star, "previous"),
                "short",
                false,
            ),
            4,
            8,
        );
        let mut growth = stat(
            &format!("Growth, last {unit} over the one before"),
            &format!("Below {} counts as flat.", number(flat)),
            &format!("nsm:metric_growth{{metric=\"{}\"}}", north_star.name),
            "percentunit",
            false,
        );
        growth["fieldConfig"]["defaults"]["thresholds"] =
            thresholds(&[(None, "red"), (Some(flat), "green")]);
        builder.add(growth, 4, 8);
        if let Some(revenue) = revenue {
            builder.add(
                stat(
                    &format!("Revenue growth: {}", revenue.name),
                    &revenue.description,
                    &format!("nsm:metric_growth{{metric=\"{}\"}}", revenue.name),
                    "percentunit",
                    false,
                ),
                4,
                8,
            );
        } else {
            builder.next_row();
        }
        builder.add(
            timeseries(
                &format!("North Star: this {unit} against its baseline"),
                &format!(
                    "The {unit} still filling, and what {} had reached at the same point, from \
                     nsm's own state: a gap that opens is the North Star falling behind its \
                     usual pace.",
                    baseline_source(north_star.window)
                ),
                vec![
                    target(&value_query(north_star, "current"), &format!("this {unit}")),
                    target(
                        &value_query(north_star, "baseline"),
                        &format!("baseline: past {unit}s at the same point"),
                    ),
                ],
                "short",
            ),
            18,
            8,
        );
        let mut pace = stat(
            "Pace against baseline",
            "This window so far over its baseline at the same point: 100% is the usual pace.",
            &format!(
                "{} / {}",
                value_query(north_star, "current"),
                value_query(north_star, "baseline")
            ),
            "percentunit",
            false,
        );
        pace["fieldConfig"]["defaults"]["thresholds"] =
            thresholds(&[(None, "red"), (Some(0.7), "orange"), (Some(0.9), "green")]);
        builder.add(pace, 6, 8);
    }

    builder.row("Input metrics and their owners");
    let input_width = (WIDTH / inputs.len().max(1) as u64).max(4);
    for input in &inputs {
        let owner = input.owner.as_deref().unwrap_or("no owner");
        builder.add(
            stat(
                &format!("{} (owner: {owner})", input.name),
                &input.description,
                &value_query(input, "current"),
                "short",
                true,
            ),
            input_width,
            5,
        );
    }
    builder.next_row();
    builder.add(
        table(
            "Input tree: metric, role, owner",
            "Every configured metric with its place in the tree and its owning team (nsm_metric_info).",
            "max by (metric, role, kind, period, owner, description) (nsm_metric_info)",
        ),
        WIDTH,
        7,
    );

    builder.row("Growth and divergence");
    let mut growth_targets = vec![target(
        "nsm:metric_growth{role=\"north_star\"}",
        "North Star {{metric}}",
    )];
    if revenue.is_some() {
        growth_targets.push(target(
            "nsm:metric_growth{role=\"revenue\"}",
            "revenue {{metric}}",
        ));
    }
    builder.add(
        timeseries(
            "Growth per window: revenue beside the North Star",
            "Each whole window over the one before. The North Star leads: it should grow faster than revenue.",
            growth_targets,
            "percentunit",
        ),
        12,
        8,
    );
    if revenue.is_some() {
        let mut divergence = timeseries(
            "Divergence: revenue growth minus North Star growth",
            "Above 0 the North Star grows slower than revenue. Per window: NSMGrowingSlowerThanRevenue warns when it stays there, NSMFlatWhileRevenueGrows pages when the North Star is flat. Over the last 7 days, updated continuously (weekly metrics): revenue per North Star against its level of the 3 weeks before, on which NSMFallingBehindRevenue warns from 3%.",
            vec![
                target(
                    "nsm:growth_gap:revenue_minus_north_star",
                    "{{metric}} last window",
                ),
                target(
                    "nsm:trailing_gap:revenue_minus_north_star",
                    "{{metric}} last 7 days",
                ),
            ],
            "percentunit",
        );
        divergence["fieldConfig"]["defaults"]["thresholds"] =
            thresholds(&[(None, "green"), (Some(0.0), "red")]);
        divergence["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"] =
            json!({ "mode": "line" });
        builder.add(divergence, 12, 8);
    }
    builder.add(
        timeseries(
            "Input growth per window",
            "Which lever moved: growth of each input's last whole window over the one before.",
            vec![target("nsm:metric_growth{role=\"input\"}", "{{metric}}")],
            "percentunit",
        ),
        12,
        8,
    );
    builder.add(
        timeseries(
            "Firing NSM alerts",
            "Business and data-freshness alerts of this config that are firing.",
            vec![target(
                "sum by (alertname, metric) (ALERTS{alertname=~\"NSMFlatWhileRevenueGrows|NSMGrowingSlowerThanRevenue|NSMFallingBehindRevenue|NSMFallingBehindRevenueConfirmed|GuardrailBreached|NSMUpWhileGuardrailDown|GuardrailWorseningWhileNSMGrows|NsmDown|NoEvents|ConsumerLagHigh|WatermarkStale\", alertstate=\"firing\"})",
                "{{alertname}} {{metric}}",
            )],
            "short",
        ),
        12,
        8,
    );

    if !guardrails.is_empty() {
        builder.row("Guardrails");
        let width = (WIDTH / guardrails.len() as u64).max(4);
        for guardrail in &guardrails {
            let owner = guardrail.owner.as_deref().unwrap_or("no owner");
            builder.add(
                stat(
                    &format!("{} (owner: {owner})", guardrail.name),
                    &guardrail.description,
                    &value_query(guardrail, "current"),
                    "short",
                    true,
                ),
                width,
                5,
            );
        }
        builder.next_row();
        builder.add(
            timeseries(
                "Guardrail worsening",
                "How much each guardrail worsened over the window before (0.1 = 10% worse), and, for weekly guardrails, over the last 7 days against its level of the 3 weeks before, updated continuously. NSMUpWhileGuardrailDown (per window) and GuardrailWorseningWhileNSMGrows (last 7 days) fire when one worsens while the North Star grows.",
                vec![
                    target("nsm:guardrail_worsening", "{{metric}} last window"),
                    target("nsm:guardrail_trailing:worsening", "{{metric}} last 7 days"),
                ],
                "percentunit",
            ),
            WIDTH,
            7,
        );
    }

    builder.row("Pipeline health");
    let stale = stat(
        "Data stale (business alerts held back)",
        "1 for each reason that makes the data untrustworthy right now.",
        "nsm:data_stale:reason",
        "short",
        false,
    );
    let mut stale = stale;
    stale["targets"][0]["legendFormat"] = json!("{{reason}}");
    stale["fieldConfig"]["defaults"]["thresholds"] =
        thresholds(&[(None, "green"), (Some(1.0), "red")]);
    builder.add(stale, 8, 6);
    builder.add(
        timeseries(
            "Consumer lag",
            "Messages between nsm's position and the end of each topic.",
            vec![target(
                "sum by (topic) (nsm_consumer_lag_messages)",
                "{{topic}}",
            )],
            "short",
        ),
        8,
        6,
    );
    builder.add(
        timeseries(
            "Throughput",
            "Messages consumed per second.",
            vec![target(
                "sum by (topic) (rate(nsm_events_consumed_total[5m]))",
                "{{topic}}",
            )],
            "ops",
        ),
        8,
        6,
    );
    builder.add(
        timeseries(
            "Late, invalid and duplicate events",
            "Late and invalid events go to the dead-letter topic; duplicates are skipped.",
            vec![
                target(
                    "sum by (reason) (rate(nsm_events_invalid_total[5m]))",
                    "invalid: {{reason}}",
                ),
                target("sum(rate(nsm_events_late_total[5m]))", "late"),
                target("sum(rate(nsm_events_duplicate_total[5m]))", "duplicate"),
            ],
            "ops",
        ),
        12,
        7,
    );
    builder.add(
        timeseries(
            "Watermark delay",
            &format!(
                "Wall clock minus each partition's event-time watermark; WatermarkStale fires above {}.",
                duration(config.alerting.max_watermark_delay.as_secs())
            ),
            vec![target(
                "time() - min by (topic, partition) (nsm_watermark_timestamp_seconds)",
                "{{topic}}[{{partition}}]",
            )],
            "s",
        ),
        12,
        7,
    );

    let names: Vec<&str> = north_stars.iter().map(|m| m.name.as_str()).collect();
    let timing = north_stars
        .first()
        .map(|north_star| Timing::of(north_star.window))
        .unwrap_or(Timing::of(nsm_core::window::CalendarUnit::Week));
    let dashboard = json!({
        "uid": uid(config),
        "title": format!("North Star: {}", names.join(", ")),
        "description": format!("Generated by nsm from {source}; do not edit. Regenerate with nsm dashboards --config {source}."),
        "tags": ["nsm", "north-star"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": false,
        "graphTooltip": 1,
        "timezone": "",
        "refresh": "1m",
        "time": { "from": format!("now-{}", duration(timing.window * 5)), "to": "now" },
        "templating": { "list": [ {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "options": [],
        } ] },
        "annotations": { "list": alert_annotations(config, source) },
        "links": [],
        "panels": builder.panels,
    });
    let mut text = serde_json::to_string_pretty(&dashboard).unwrap_or_default();
    text.push('\n');
    text
}

/// Stable across runs and machines, distinct per North Star tree and consumer group; within
/// Grafana's 40 characters.
fn uid(config: &Config) -> String {
    let mut key = config.kafka.group_id.clone();
    for metric in config.metrics_with_role(Role::NorthStar) {
        key.push('/');
        key.push_str(&metric.name);
    }
    // FNV-1a: a fixed, documented hash (std's hasher is not stable across releases).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let first = config
        .metrics_with_role(Role::NorthStar)
        .next()
        .map(|metric| metric.name.replace('_', "-"))
        .unwrap_or_default();
    let slug: String = first.chars().take(22).collect();
    format!("nsm-{slug}-{:012x}", hash & 0xffff_ffff_ffff)
}

/// What a window's baseline is taken from (see docs/metrics.md, "Baselines").
fn baseline_source(window: CalendarUnit) -> &'static str {
    match window {
        CalendarUnit::Hour => {
            "the same hour of the same weekday (the median of the four weeks before)"
        }
        CalendarUnit::Day => "the same weekday (the median of the four weeks before)",
        CalendarUnit::Week => "the previous week",
        CalendarUnit::Month => "the previous month",
    }
}

/// The generated alerts as annotations: when each fired, on every time series panel.
fn alert_annotations(config: &Config, source: &str) -> Value {
    let names = alert_names(&crate::rules(config, source));
    if names.is_empty() {
        return json!([]);
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    json!([{
        "name": "nsm alerts",
        "datasource": datasource(),
        "enable": true,
        "iconColor": "red",
        "expr": format!(
            "ALERTS{{alertstate=\"firing\", alertname=~\"{}\"}}",
            names.join("|")
        ),
        "step": "1m",
        "titleFormat": "{{alertname}}",
        "textFormat": "{{severity}} {{metric}}",
        "tagKeys": "severity,metric",
        "useValueForTime": false,
    }])
}

/// The alert names of a generated rule file, sorted.
fn alert_names(rules: &str) -> std::collections::BTreeSet<String> {
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(|name| name.trim().to_string())
        .collect()
}

fn value_query(metric: &MetricDef, window: &str) -> String {
    format!(
        "nsm:metric_value:sum{{metric=\"{}\", window=\"{window}\"}}",
        metric.name
    )
}

fn datasource() -> Value {
    json!({ "type": "prometheus", "uid": "${datasource}" })
}

fn target(expr: &str, legend: &str) -> Value {
    json!({ "refId": "A", "datasource": datasource(), "expr": expr, "legendFormat": legend })
}

fn thresholds(steps: &[(Option<f64>, &str)]) -> Value {
    let steps: Vec<Value> = steps
        .iter()
        .map(|(value, color)| json!({ "value": value, "color": color }))
        .collect();
    json!({ "mode": "absolute", "steps": steps })
}

fn stat(title: &str, description: &str, expr: &str, unit: &str, sparkline: bool) -> Value {
    json!({
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "targets": [target(expr, "")],
        "fieldConfig": { "defaults": { "unit": unit, "decimals": null, "thresholds": thresholds(&[(None, "blue")]) }, "overrides": [] },
        "options": {
            "reduceOptions": { "calcs": ["lastNotNull"], "fields": "", "values": false },
            "graphMode": if sparkline { "area" } else { "none" },
            "colorMode": "value",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    })
}

fn table(title: &str, description: &str, expr: &str) -> Value {
    let mut query = target(expr, "");
    query["instant"] = json!(true);
    query["format"] = json!("table");
    json!({
        "type": "table",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "targets": [query],
        "fieldConfig": { "defaults": {}, "overrides": [] },
        "options": { "showHeader": true },
        "transformations": [ { "id": "organize", "options": {
            "excludeByName": { "Time": true, "Value": true },
            "indexByName": { "metric": 0, "role": 1, "owner": 2, "period": 3, "kind": 4, "description": 5 },
        } } ],
    })
}

fn timeseries(title: &str, description: &str, targets: Vec<Value>, unit: &str) -> Value {
    let targets: Vec<Value> = targets
        .into_iter()
        .enumerate()
        .map(|(index, mut target)| {
            target["refId"] = json!(ref_id(index));
            target
        })
        .collect();
    json!({
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "targets": targets,
        "fieldConfig": { "defaults": { "unit": unit, "custom": { "drawStyle": "line", "lineWidth": 1, "fillOpacity": 0 } }, "overrides": [] },
        "options": { "legend": { "displayMode": "list", "placement": "bottom", "showLegend": true }, "tooltip": { "mode": "multi", "sort": "none" } },
    })
}

fn ref_id(index: usize) -> String {
    char::from(b'A' + (index % 26) as u8).to_string()
}

/// Lays panels out left to right, top to bottom, and numbers them.
#[derive(Default)]
struct Builder {
    panels: Vec<Value>,
    x: u64,
    y: u64,
    row_height: u64,
}

impl Builder {
    fn add(&mut self, mut panel: Value, width: u64, height: u64) {
        let width = width.min(WIDTH);
        if self.x + width > WIDTH {
            self.next_row();
        }
        panel["id"] = json!(self.panels.len() + 1);
        panel["gridPos"] = json!({ "x": self.x, "y": self.y, "w": width, "h": height });
        self.panels.push(panel);
        self.x += width;
        self.row_height = self.row_height.max(height);
    }

    fn next_row(&mut self) {
        if self.x > 0 {
            self.y += self.row_height;
        }
        self.x = 0;
        self.row_height = 0;
    }

    fn row(&mut self, title: &str) {
        self.next_row();
        self.add(
            json!({ "type": "row", "title": title, "collapsed": false, "panels": [] }),
            WIDTH,
            1,
        );
        self.next_row();
    }
}
