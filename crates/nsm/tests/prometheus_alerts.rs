//! End to end with a real Prometheus server: the real nsm binary consumes a generated stream
//! from librdkafka's in-process mock cluster, Prometheus (Debian's package, `make deps`)
//! scrapes it every second and evaluates the rule file `nsm rules` generated, and the alert
//! must reach `firing` on Prometheus' own `/api/v1/alerts` — or never appear.
//!
//! Time is compressed. Growth compares the last whole window with the one before it through
//! an `offset` of one window length in Prometheus' history, and NSMFlatWhileRevenueGrows must
//! hold for `sustained_periods` windows: with real hour windows that is hours of scrapes,
//! which no backfill of nsm's live series can replace. So the stream replays event time
//! `TIME_SCALE` times faster than the wall clock (an hour of events every 10 s), and the rules
//! are generated with `nsm rules --time-scale` (every window-derived duration divided by the
//! same factor). nsm's windows follow the event-time watermark, so an hour window closes
//! every 10 s and the 10 s `offset` finds exactly the window before. Everything else is the
//! production path: the same recording rules, look-back check, hold-back on stale data, `for`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Event seconds per wall-clock second: an hour window lasts 10 s.
const TIME_SCALE: i64 = 360;
const HOUR_MS: i64 = 3_600_000;
/// Hours of event time the stream spans (100 s of wall clock at most; the alert fires in
/// about 35 s, the rest is headroom for a loaded machine).
const HOURS: i64 = 10;
const USERS_FIRST_HOUR: usize = 30;

fn config(brokers: &str, topic: &str, state: &Path, port: u16) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "nsm-prometheus"
dead_letter_topic = "{topic}-dlq"
[kafka.properties]
"topic.metadata.refresh.interval.ms" = "1000"
[time]
zone = "UTC"
allowed_lateness = "1m"
idle_timeout = "1h"
[state]
path = "{state}"
retention = "35d"
flush_interval = "100ms"
[http]
listen = "127.0.0.1:{port}"
[north_star]
name = "hourly_active_messagers"
kind = "distinct"
field = "user_id"
where = {{ event = "message_sent" }}
window = "1h"
[[inputs]]
name = "messages_sent"
owner = "messaging-team"
kind = "count"
where = {{ event = "message_sent" }}
window = "1h"
[[guardrails]]
name = "complaints"
owner = "support-team"
kind = "count"
where = {{ event = "complaint_filed" }}
window = "1h"
[revenue]
name = "revenue"
kind = "sum"
field = "properties.amount"
where = {{ event = "payment_succeeded" }}
window = "1h"
[alerting]
job = "nsm"
nsm_flat_growth_threshold = 0.01
sustained_periods = 2
# The replayed event time is hours behind the wall clock by design; freshness is not
# what this test is about, so the watermark may lag a day before the data counts as stale.
max_watermark_delay = "1d"
"#,
        state = state.display()
    )
}

/// One event of the stream, at its event time.
struct Event {
    time_ms: i64,
    key: String,
    json: String,
}

/// `HOURS` hours from `start_ms`: in hour `h`, `users(h)` distinct users send a message and
/// revenue grows 20% an hour. With `flat` the North Star stays at `USERS_FIRST_HOUR`,
/// otherwise it grows with revenue.
fn stream(start_ms: i64, flat: bool) -> Vec<Event> {
    let mut events = Vec::new();
    for hour in 0..HOURS {
        let users = if flat {
            USERS_FIRST_HOUR
        } else {
            (USERS_FIRST_HOUR as f64 * 1.2f64.powi(hour as i32)).round() as usize
        };
        let payments = (10.0 * 1.2f64.powi(hour as i32)).round() as usize;
        let hour_ms = start_ms + hour * HOUR_MS;
        // Spread over the first 50 minutes of the hour: all of it lands in its window even
        // if the producer is a little late.
        let spread = |i: usize, n: usize| hour_ms + (i as i64 * 50 * 60_000) / n.max(1) as i64;
        for user in 0..users {
            let time_ms = spread(user, users);
            events.push(Event {
                time_ms,
                key: format!("u{user}"),
                json: format!(
                    r#"{{"event":"message_sent","user_id":"u{user}","timestamp":{time_ms}}}"#
                ),
            });
        }
        for payment in 0..payments {
            let time_ms = spread(payment, payments) + 1;
            events.push(Event {
                time_ms,
                key: format!("u{payment}"),
                json: format!(
                    r#"{{"event_id":"pay-{hour}-{payment}","event":"payment_succeeded","user_id":"u{payment}","timestamp":{time_ms},"properties":{{"amount":10.0}}}}"#
                ),
            });
        }
    }
    events.sort_by_key(|event| event.time_ms);
    events
}

/// Produces `events` in a background thread, each when the accelerated clock reaches its
/// event time: event time `start_ms` is now, and runs `TIME_SCALE` times faster.
fn replay(brokers: String, topic: String, start_ms: i64, events: Vec<Event>) {
    std::thread::spawn(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let wall_start = Instant::now();
        for event in events {
            let due = Duration::from_millis(((event.time_ms - start_ms) / TIME_SCALE) as u64);
            if let Some(wait) = due.checked_sub(wall_start.elapsed()) {
                std::thread::sleep(wait);
            }
            let mut record = BaseRecord::to(&topic).key(&event.key).payload(&event.json);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, returned)) => {
                        record = returned;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
        let _ = producer.flush(Duration::from_secs(5));
    });
}

/// URL-encodes a PromQL query for a GET.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

fn api(port: u16, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http_get(port, path)?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// The state of `alert` on Prometheus' `/api/v1/alerts`, if it is there at all.
fn alert_state(port: u16, alert: &str) -> Option<String> {
    let alerts = api(port, "/api/v1/alerts")?;
    alerts["data"]["alerts"]
        .as_array()?
        .iter()
        .filter(|a| a["labels"]["alertname"] == alert)
        .map(|a| a["state"].as_str().unwrap_or_default().to_string())
        .max_by_key(|state| state == "firing")
}

/// Values of an instant query, by the `metric` label.
fn query(port: u16, promql: &str) -> Vec<(String, f64)> {
    let Some(result) = api(port, &format!("/api/v1/query?query={}", encode(promql))) else {
        return Vec::new();
    };
    result["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter_map(|s| {
                    let value = s["value"][1].as_str()?.parse().ok()?;
                    Some((s["metric"]["metric"].as_str()?.to_string(), value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A running nsm fed with the replayed stream, and a Prometheus evaluating its rules.
struct Setup {
    _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    _dir: tempfile::TempDir,
    nsm: Process,
    prometheus: Process,
    prometheus_port: u16,
}

fn start(flat: bool) -> Setup {
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: this test needs Debian's prometheus package (`make deps` \
         installs it)"
    );
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = "events";
    // One partition: one watermark, so every window closes exactly when the replay crosses it.
    cluster.create_topic(topic, 1, 1).expect("topic");
    cluster.create_topic("events-dlq", 1, 1).expect("dlq topic");
    // The mock cluster cannot create topics through the admin API.
    cluster
        .create_topic("nsm-prometheus-changelog", 1, 1)
        .expect("changelog topic");
    let brokers = cluster.bootstrap_servers();

    let dir = tempfile::tempdir().expect("tempdir");
    let nsm_port = free_port();
    let config_path = dir.path().join("nsm.toml");
    std::fs::write(
        &config_path,
        config(&brokers, topic, &dir.path().join("state"), nsm_port),
    )
    .expect("config");
    let config_arg = config_path.to_str().expect("utf8");
    let rules_path = dir.path().join("nsm.rules.yml");
    nsm_tool(&[
        "rules",
        "--config",
        config_arg,
        "--time-scale",
        &TIME_SCALE.to_string(),
        "--output",
        rules_path.to_str().expect("utf8"),
    ]);

    let prometheus_port = free_port();
    let prometheus_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: nsm\n    static_configs:\n      - targets: ['127.0.0.1:{nsm_port}']\n",
            rules = rules_path.display()
        ),
    )
    .expect("prometheus config");
    let prometheus = Process::spawn(
        "prometheus",
        Command::new(PROMETHEUS).args([
            &format!("--config.file={}", prometheus_config.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            &format!("--web.listen-address=127.0.0.1:{prometheus_port}"),
        ]),
        dir.path(),
    );
    let nsm = Process::spawn(
        "nsm",
        Command::new(NSM).args(["run", "--config", config_arg]),
        dir.path(),
    );
    wait_for(
        "nsm serving /metrics",
        Duration::from_secs(20),
        Some(&nsm),
        || scrape(nsm_port),
    );
    wait_for(
        "Prometheus ready",
        Duration::from_secs(20),
        Some(&prometheus),
        || (http_get(prometheus_port, "/-/ready")?.0 == 200).then_some(()),
    );

    // Event time starts HOURS + 1 hours ago on an hour boundary, so the replay (100 s at most)
    // ends an hour or more before the wall clock: no event is ever in the future.
    let start_ms = hour_start_ms(HOURS + 1);
    replay(brokers, topic.to_string(), start_ms, stream(start_ms, flat));
    Setup {
        _cluster: cluster,
        _dir: dir,
        nsm,
        prometheus,
        prometheus_port,
    }
}

#[test]
fn north_star_flat_while_revenue_grows_fires_on_a_real_prometheus() {
    let setup = start(true);
    let port = setup.prometheus_port;
    let started = Instant::now();
    // What Prometheus saw, once a second, for the failure message.
    let mut history = Vec::new();
    let mut last_record = Instant::now() - Duration::from_secs(1);
    loop {
        if setup.nsm.log_text().contains("ERROR") {
            panic!("nsm logged an error:\n{}", setup.nsm.log_text());
        }
        let state = alert_state(port, "NSMFlatWhileRevenueGrows");
        if state.as_deref() == Some("firing") {
            break;
        }
        if last_record.elapsed() >= Duration::from_secs(1) {
            last_record = Instant::now();
            history.push(format!(
                "{:>4.1}s growth {:?} stale {:?} up {:?} alert {state:?}",
                started.elapsed().as_secs_f64(),
                query(port, "nsm:metric_growth"),
                query(port, "label_replace(nsm:data_stale:reason == 1, \"metric\", \"$1\", \"reason\", \"(.*)\")"),
                query(port, "label_replace(up, \"metric\", \"up\", \"\", \"\")"),
            ));
        }
        assert!(
            started.elapsed() < Duration::from_secs(95),
            "NSMFlatWhileRevenueGrows not firing after 95 s; Prometheus saw:\n{}\n\
             Prometheus log:\n{}",
            history.join("\n"),
            setup.prometheus.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The page carries the values it is about: flat North Star, growing revenue.
    let growth = query(port, "nsm:metric_growth");
    let of = |metric: &str| growth.iter().find(|(m, _)| m == metric).map(|(_, v)| *v);
    assert!(
        of("hourly_active_messagers").is_some_and(|g| g.abs() < 0.01),
        "{growth:?}"
    );
    assert!(
        of("revenue").is_some_and(|g| (g - 0.2).abs() < 0.1),
        "{growth:?}"
    );
    eprintln!("firing after {:?}", started.elapsed());
}

#[test]
fn healthy_growth_never_raises_the_divergence_alert() {
    let setup = start(false);
    let port = setup.prometheus_port;
    // Long enough for the flat stream's alert to fire (it does in about 35 s): growth of
    // the North Star has been computed for several windows, and the alert never appeared,
    // not even as pending.
    let deadline = Instant::now() + Duration::from_secs(50);
    let mut growth_seen = 0;
    while Instant::now() < deadline {
        if let Some(state) = alert_state(port, "NSMFlatWhileRevenueGrows") {
            panic!("NSMFlatWhileRevenueGrows is {state} on healthy growth");
        }
        let growth = query(port, "nsm:metric_growth{role=\"north_star\"}");
        if let Some((_, value)) = growth.first() {
            assert!(
                *value > 0.1 || !value.is_finite(),
                "healthy North Star growth {value}"
            );
            growth_seen += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        growth_seen > 20,
        "North Star growth was computed in only {growth_seen} polls: the test proved nothing;\n{}",
        setup.nsm.log_text()
    );
}
