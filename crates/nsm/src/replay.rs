//! `nsm replay`: what a candidate config would have shown over the retained history, beside
//! what the live config shows for the same events, before deploying it. The topics are read
//! without a consumer group from a time to their current end; both configs are computed in
//! memory; nothing of the live pipeline (its state, offsets, changelog) is touched.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nsm_core::config::Config;
use nsm_core::engine::{Engine, Epoch, Forwarded, Inputs, Outcome, Plan, StoredWindow};
use nsm_core::event::RecordMeta;
use nsm_core::lint::lint;
use nsm_core::query::windows_between;
use nsm_core::window::parse_instant;
use nsm_core::PartitionKey;
use serde_json::json;
use tracing::info;

use crate::clock::wall_clock_ms;
use crate::run::{client_settings, load_config};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The candidate config: its metrics are computed over the history, its [kafka] section
    /// says what to read.
    #[arg(long)]
    config: PathBuf,
    /// The live config to compare with, computed over the same events.
    #[arg(long)]
    against: Option<PathBuf>,
    /// Where the history starts: an RFC 3339 time (`2026-11-01T00:00:00Z`), or a date
    /// (`2026-11-01`, midnight in the candidate's time.zone). Default: all that is retained.
    #[arg(long)]
    from: Option<String>,
    /// `table` for people, `json` for tools.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

/// One config computed over the history.
struct Replayed {
    plan: Plan,
    engine: Engine,
    /// Records applied to [`REKEYED`]: events of metrics counting another entity than the
    /// message key, counted there once each, as the repartition topic counts them live.
    rekeyed: i64,
}

/// The one partition where a replay counts re-keyed metrics: all of the history is in this
/// process, so one partition holds every entity.
const REKEYED: &str = "nsm-replay-rekeyed";

impl Replayed {
    fn new(config: &Config) -> Replayed {
        let plan = Plan::from_config(config);
        let mut engine = Engine::new(plan.clone());
        engine.restore_partition(PartitionKey::new(REKEYED, 0), Default::default());
        Replayed {
            engine,
            plan,
            rekeyed: 0,
        }
    }

    fn apply(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        payload: &[u8],
        record: &dyn RecordMeta,
        now_ms: i64,
    ) {
        let outcome = self
            .engine
            .apply_record(key, offset, payload, record, now_ms);
        let Outcome::Applied { forward, .. } = outcome else {
            return;
        };
        let rekeyed = PartitionKey::new(REKEYED, 0);
        for (group, _) in forward.0 {
            // No time: the partition has no watermark, so nothing is late or expires in it.
            let forwarded = Forwarded {
                group,
                group_field: self.plan.rekey_name(group),
                topic: &key.topic,
                partition: key.partition,
                offset,
                epoch: Epoch::default(),
                watermark_ms: None,
                clock_ms: None,
                topics: Inputs::default(),
            };
            self.engine.apply_forwarded(
                &rekeyed,
                self.rekeyed,
                payload,
                record,
                &forwarded,
                now_ms,
            );
            self.rekeyed += 1;
        }
    }

    /// Every window since `from_ms` of each metric, by metric name.
    fn windows(
        mut self,
        from_ms: i64,
        now_ms: i64,
    ) -> BTreeMap<String, Vec<nsm_core::query::WindowRecord>> {
        let watermark = self
            .engine
            .partition_status()
            .iter()
            .filter_map(|status| status.watermark_ms)
            .min();
        let changes = self.engine.take_changes();
        let stored: Vec<StoredWindow> = changes
            .partitions
            .iter()
            .flat_map(|partition| partition.upserts.iter())
            .map(|upsert| StoredWindow {
                metric: upsert.metric,
                start_ms: upsert.start_ms,
                end_ms: upsert.end_ms,
                value: upsert.value,
                progress: upsert.progress.clone(),
            })
            .collect();
        self.plan
            .metrics()
            .iter()
            .enumerate()
            .map(|(index, metric)| {
                let windows = windows_between(
                    &self.plan,
                    index,
                    stored.iter().cloned(),
                    watermark,
                    from_ms,
                    now_ms,
                );
                (metric.name.clone(), windows)
            })
            .collect()
    }
}

pub fn replay(args: ReplayArgs) -> Result<()> {
    let candidate = load_config(&args.config)?;
    let live = args.against.as_deref().map(load_config).transpose()?;
    let from_ms = match &args.from {
        None => None,
        Some(text) => Some(parse_from(text, &candidate).ok_or_else(|| {
            anyhow!("--from {text:?}: expected an RFC 3339 time or a date (2026-11-01)")
        })?),
    };
    let now_ms = wall_clock_ms();
    let mut replayed = vec![Replayed::new(&candidate)];
    replayed.extend(live.as_ref().map(Replayed::new));
    let mut restored: std::collections::HashSet<PartitionKey> = Default::default();
    let read = nsm_kafka::read_history(
        &client_settings(&candidate),
        &candidate.kafka.topics,
        from_ms,
        Duration::from_secs(30),
        &mut |key, offset, payload, record| {
            if restored.insert(key.clone()) {
                for config in &mut replayed {
                    config
                        .engine
                        .restore_partition(key.clone(), Default::default());
                }
            }
            for config in &mut replayed {
                config.apply(key, offset, payload, record, now_ms);
            }
        },
    )
    .context("cannot read the history")?;
    info!(messages = read, "history read");
    let from_ms = from_ms.unwrap_or(i64::MIN);
    let mut results = replayed
        .into_iter()
        .map(|config| config.windows(from_ms, now_ms));
    let candidate_windows = results.next().unwrap_or_default();
    let live_windows = results.next();
    let findings = lint(&candidate);
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            let metrics: Vec<serde_json::Value> = candidate_windows
                .iter()
                .map(|(name, windows)| {
                    let live = live_windows.as_ref().and_then(|live| live.get(name));
                    json!({
                        "name": name,
                        "windows": windows.iter().map(|window| json!({
                            "start": candidate.time.calendar.format_local(window.bounds.start_ms),
                            "end": candidate.time.calendar.format_local(window.bounds.end_ms),
                            "candidate": finite(window.value.to_f64()),
                            "live": live.and_then(|live| live.iter().find(|w| w.bounds == window.bounds)).map(|w| finite(w.value.to_f64())),
                            "complete": window.complete,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let findings: Vec<serde_json::Value> = findings
                .iter()
                .map(|finding| {
                    json!({
                        "severity": finding.severity.label(),
                        "check": finding.check,
                        "path": finding.path,
                        "message": finding.message,
                    })
                })
                .collect();
            let document = json!({
                "messages_read": read,
                "metrics": metrics,
                "findings": findings,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
        }
        Format::Table => {
            writeln!(out, "{read} messages read")?;
            for (name, windows) in &candidate_windows {
                let live = live_windows.as_ref().and_then(|live| live.get(name));
                writeln!(out, "\n{name}")?;
                let live_header = if live_windows.is_some() { "live" } else { "" };
                writeln!(
                    out,
                    "  {:<26} {:>14} {live_header:>14}  complete",
                    "window start", "candidate"
                )?;
                for window in windows {
                    let live_value = live
                        .and_then(|live| live.iter().find(|w| w.bounds == window.bounds))
                        .map(|w| number(w.value.to_f64()))
                        .unwrap_or_else(|| {
                            if live_windows.is_some() {
                                "-".into()
                            } else {
                                String::new()
                            }
                        });
                    writeln!(
                        out,
                        "  {:<26} {:>14} {:>14}  {}",
                        candidate.time.calendar.format_local(window.bounds.start_ms),
                        number(window.value.to_f64()),
                        live_value,
                        if window.complete { "yes" } else { "no" }
                    )?;
                }
            }
            if !findings.is_empty() {
                writeln!(out, "\nlinter findings for {}:", args.config.display())?;
                for finding in &findings {
                    writeln!(
                        out,
                        "  {} {} ({}): {}",
                        finding.severity.label(),
                        finding.path,
                        finding.check,
                        finding.message
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// An RFC 3339 time, or a date at midnight in the config's calendar zone.
fn parse_from(text: &str, config: &Config) -> Option<i64> {
    if let Some(ms) = parse_instant(text) {
        return Some(ms);
    }
    let date: jiff::civil::Date = text.trim().parse().ok()?;
    let zone = jiff::tz::TimeZone::get(config.time.calendar.zone_name()).ok()?;
    zone.to_ambiguous_timestamp(date.to_datetime(jiff::civil::Time::midnight()))
        .compatible()
        .ok()
        .map(|timestamp| timestamp.as_millisecond())
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.4}")
    }
}

/// JSON has no NaN: an undefined ratio is null.
fn finite(value: f64) -> serde_json::Value {
    if value.is_finite() {
        json!(value)
    } else {
        serde_json::Value::Null
    }
}
