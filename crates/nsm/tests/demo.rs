//! `nsm demo --product ...`, as `make run PRODUCT=...` starts it: the built-in config and the
//! generated stream of each product agree through the whole binary (in-process broker, real
//! client path, RocksDB, /metrics), and Ctrl-C-like termination stops it cleanly.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs the demo of `product` until every metric of its config shows a non-zero current
/// value on /metrics, then stops it with SIGTERM.
fn demo_feeds_every_metric(product: &str, north_star: &str) {
    let _light = beside_light_ones();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut demo = Process::spawn(
        &format!("nsm-demo-{product}"),
        Command::new(NSM).args([
            "demo",
            "--product",
            product,
            "--listen",
            &listen,
            "--rate",
            "500",
            "--history",
            "0s",
            "--prometheus",
            "off",
        ]),
        dir.path(),
    );
    let samples = wait_for(
        "every metric of the demo config non-zero",
        Duration::from_secs(90),
        Some(&demo),
        || {
            let Some(samples) = scrape(port) else {
                // A demo that failed to start (a config it refuses) fails the test at once.
                let log = demo.log_text();
                assert!(
                    !log.contains("nsm failed"),
                    "{product}: the demo failed:\n{log}"
                );
                return None;
            };
            let current: Vec<f64> = samples
                .iter()
                .filter(|(series, _)| {
                    series.starts_with("nsm_metric_value{") && series.ends_with("current\"}")
                })
                .map(|(_, value)| *value)
                .collect();
            (current.len() >= 7 && current.iter().all(|value| *value > 0.0)).then_some(samples)
        },
    );
    assert!(
        metric_value(&samples, north_star, "current").is_some_and(|value| value > 0.0),
        "{product}: no North Star {north_star} in {samples:?}"
    );
    let status = demo.terminate(Duration::from_secs(30));
    assert!(status.success(), "{product}: {status}\n{}", demo.log_text());
}

#[test]
fn the_chatbot_demo_feeds_every_metric() {
    demo_feeds_every_metric("chatbot", "ai_resolved_conversations");
}

#[test]
fn the_collaboration_demo_feeds_every_metric() {
    demo_feeds_every_metric("collaboration", "weekly_active_teams");
}

#[test]
fn the_marketplace_demo_feeds_every_metric() {
    demo_feeds_every_metric("marketplace", "nights_booked");
}

#[test]
fn an_unknown_product_is_refused_with_the_list_of_products() {
    let output = Command::new(NSM)
        .args(["demo", "--product", "bakery"])
        .output()
        .expect("nsm demo");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for product in ["chatbot", "collaboration", "marketplace"] {
        assert!(stderr.contains(product), "{stderr}");
    }
}

/// `make run SCENARIO=traffic-stops`: events flow for one period, then none at all, which is
/// what NoEvents and WatermarkStale page for.
#[test]
fn the_traffic_stops_scenario_stops_the_stream_after_its_period() {
    let _light = beside_light_ones();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut demo = Process::spawn(
        "nsm-demo-traffic-stops",
        Command::new(NSM).args([
            "demo",
            "--scenario",
            "traffic-stops",
            "--scenario-period",
            "3s",
            "--listen",
            &listen,
            "--rate",
            "500",
            "--history",
            "0s",
            "--prometheus",
            "off",
        ]),
        dir.path(),
    );
    // Summed over the demo topic's partitions.
    let consumed = |port| {
        let samples = scrape(port)?;
        let counts: Vec<f64> = samples
            .iter()
            .filter(|(series, _)| series.starts_with("nsm_events_consumed_total{"))
            .map(|(_, value)| *value)
            .collect();
        (!counts.is_empty()).then(|| counts.iter().sum::<f64>())
    };
    wait_for(
        "events consumed",
        Duration::from_secs(60),
        Some(&demo),
        || consumed(port).filter(|count| *count > 0.0),
    );
    // Well past the period and the pipeline's flush, the count no longer moves.
    std::thread::sleep(Duration::from_secs(5));
    let stopped = consumed(port).expect("scrape");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(consumed(port), Some(stopped), "events still flow");
    let status = demo.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", demo.log_text());
}

#[test]
fn an_unknown_scenario_is_refused_with_the_list_of_scenarios() {
    let output = Command::new(NSM)
        .args(["demo", "--scenario", "meltdown"])
        .output()
        .expect("nsm demo");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for scenario in [
        "healthy",
        "nsm-flattens",
        "guardrail-breach",
        "traffic-stops",
        "collapse",
        "tracking-breaks",
    ] {
        assert!(stderr.contains(scenario), "{stderr}");
    }
}

/// `make run` as it starts: three weeks of history first, so that the previous windows and the
/// baseline of the window still filling exist at once, and a real Prometheus (Debian's, as
/// `make deps` installs it) evaluating the config's rules on them.
#[test]
fn the_default_demo_fills_history_and_prometheus_sees_growth_and_baselines() {
    let _alone = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let (demo, prometheus_port, _) = demo_with_history(dir.path(), "nsm-demo-default", &[]);
    let north_star = "weekly_active_teams";
    let query = |expr: &str| -> Option<f64> {
        let path = format!("/api/v1/query?query={}", url_encode(expr));
        let (status, body) = http_get(prometheus_port, &path)?;
        let body: serde_json::Value = serde_json::from_str(&body).ok()?;
        let value = body["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()?;
        (status == 200).then_some(value)
    };
    let (previous, baseline, current) = wait_for(
        "Prometheus to hold the North Star's previous week, its baseline and its current week",
        Duration::from_secs(240),
        Some(&*demo),
        || {
            let value = |window: &str| {
                query(&format!(
                    "nsm:metric_value:sum{{metric=\"{north_star}\", window=\"{window}\"}}"
                ))
                .filter(|value| *value > 0.0)
            };
            Some((value("previous")?, value("baseline")?, value("current")?))
        },
    );
    eprintln!("previous week {previous}, baseline {baseline}, current {current}");
    // The steady stream: the week so far is about where last week was at the same point.
    assert!(
        (current / baseline - 1.0).abs() < 0.5,
        "current {current} against baseline {baseline}"
    );
    let growth = wait_for(
        "the growth of the last whole week",
        Duration::from_secs(60),
        Some(&*demo),
        || query(&format!("nsm:metric_growth{{metric=\"{north_star}\"}}")),
    );
    assert!(growth.is_finite(), "growth {growth}");
    let rules_loaded = http_get(prometheus_port, "/api/v1/rules")
        .is_some_and(|(status, body)| status == 200 && body.contains("NSMFlatWhileRevenueGrows"));
    assert!(rules_loaded, "the generated rules are loaded");
    let mut demo = demo;
    let status = demo.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", demo.log_text());
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A collapse injected into a flowing stream pages through the fast-burn rule on a real
/// Prometheus: `nsm demo --scenario collapse`, a week of event time in ten minutes, a week and
/// a day of history so that the week still filling has its baseline. Three in four messages
/// stop half-way through the period; `PaceCollapsed` on `messages_sent` (an input: the North
/// Star counts teams, almost all of them seen before the collapse) fires within minutes, and
/// no alert fires before the collapse while nsm has read the stream.
#[test]
fn a_collapse_in_the_demo_pages_through_the_fast_burn_rule_on_prometheus() {
    let _alone = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let (demo, prometheus_port, metrics_port) = demo_with_history(
        dir.path(),
        "nsm-demo-collapse",
        &[
            "--scenario",
            "collapse",
            "--scenario-period",
            "4m",
            "--history",
            "8d",
        ],
    );
    let live_started = std::time::Instant::now();
    let firing = |alert: &str| -> Option<Vec<String>> {
        let (status, body) = http_get(prometheus_port, "/api/v1/alerts")?;
        let body: serde_json::Value = serde_json::from_str(&body).ok()?;
        let alerts = body["data"]["alerts"].as_array()?;
        (status == 200).then(|| {
            alerts
                .iter()
                .filter(|a| a["labels"]["alertname"] == alert && a["state"] == "firing")
                .map(|a| {
                    a["labels"]["metric"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        })
    };
    // Before the collapse (two minutes of live stream): no fast-burn page while nsm is live. A
    // debug build reads the history slower than it is produced (about two minutes for these 8
    // days), and until then the windows it shows are seconds behind, hours of event time,
    // which the pace rule rightly sees as a collapse.
    let mut judged = 0;
    while live_started.elapsed() < Duration::from_secs(100) {
        let early = firing("PaceCollapsed").unwrap_or_default();
        if !lagging(metrics_port) {
            assert!(early.is_empty(), "paged before the collapse: {early:?}");
            judged += 1;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("{judged} checks for an early page while nsm was live");
    let paged = wait_for(
        "PaceCollapsed on messages_sent",
        Duration::from_secs(240),
        Some(&*demo),
        || {
            firing("PaceCollapsed")
                .filter(|metrics| metrics.iter().any(|metric| metric == "messages_sent"))
        },
    );
    let after = live_started
        .elapsed()
        .saturating_sub(Duration::from_secs(120));
    eprintln!("PaceCollapsed fired on {paged:?}, {after:?} after the collapse (wall clock)");
    let mut demo = demo;
    let status = demo.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", demo.log_text());
}

/// The demos with a history and a Prometheus each take both cores for minutes, and their event
/// time runs a thousand times faster than the wall clock: beside any other demo (the test
/// harness runs a binary's tests in parallel), nsm falls a few seconds behind, which is hours
/// of event time, and the pace alerts see the lag as a collapse. A heavy demo runs alone; the
/// light ones may run together.
static DEMOS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn one_at_a_time() -> std::sync::RwLockWriteGuard<'static, ()> {
    DEMOS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A light demo (no history, no Prometheus): never beside a heavy one.
fn beside_light_ones() -> std::sync::RwLockReadGuard<'static, ()> {
    DEMOS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `nsm demo` with `args`, its own Prometheus and its history (three weeks by default), once
/// the history is produced: until then the windows shown are those of the history's event
/// time. The history comes at 5,000 slots a second: three weeks at 200 slots a second and a
/// week in ten minutes are about 360,000 slots (72 s). Returns the demo, Prometheus' port and nsm's.
fn demo_with_history(dir: &std::path::Path, name: &str, args: &[&str]) -> (Demo, u16, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let prometheus_port = free_port();
    let prometheus = format!("127.0.0.1:{prometheus_port}");
    let demo = Process::spawn(
        name,
        Command::new(NSM)
            .args(["demo", "--listen", &listen, "--prometheus", &prometheus])
            .args(args),
        dir,
    );
    let demo = Demo(demo);
    wait_for(
        "the history filled",
        Duration::from_secs(300),
        Some(&demo.0),
        || demo.0.log_text().contains("history filled").then_some(()),
    );
    (demo, prometheus_port, port)
}

/// Whether nsm has more than a second of the demo's stream (200 events a second) left to read,
/// or does not say.
fn lagging(port: u16) -> bool {
    let lag: Option<f64> = scrape(port).and_then(|samples| {
        let lags: Vec<f64> = series_values(&samples, "nsm_consumer_lag_messages").collect();
        (!lags.is_empty()).then(|| lags.iter().sum())
    });
    lag.is_none_or(|lag| lag >= 200.0)
}

/// A demo stopped with SIGTERM even when its test fails, so that it stops its Prometheus
/// (SIGKILL, as a plain `Process` is dropped, would leave it running).
struct Demo(Process);

impl std::ops::Deref for Demo {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.0
    }
}

impl std::ops::DerefMut for Demo {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.0
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.0.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.child.id().to_string()])
                .status();
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(10)
                && matches!(self.0.child.try_wait(), Ok(None))
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
