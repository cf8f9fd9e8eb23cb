//! Metrics counting another entity than the message key, on a real Kafka-protocol broker
//! (tansu, installed by `make test`): events are keyed by user while the North Star counts
//! teams, and a threshold counts teams with at least 3 senders. Three nsm instances share the
//! partitions while the stream is produced; one is killed with SIGKILL, one joins, one stops
//! gracefully. The team counts go through the repartition topic, and the values summed
//! across the instances left must equal the stream's exactly (summed per partition, each team
//! would count once in every partition holding one of its users).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const TOPIC: &str = "team-events";
const GROUP: &str = "nsm-repartition";
const PARTITIONS: usize = 6;
/// `session.timeout.ms` of the config.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
const TEAMS: usize = 120;
const TEAM_SIZE: usize = 5;
/// Messages each sender sends.
const ROUNDS: usize = 4;

fn config(brokers: &str, state: &Path, port: u16) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
topics = ["{TOPIC}"]
group_id = "{GROUP}"
dead_letter_topic = "{TOPIC}-dlq"
key_field = "user_id"
[kafka.properties]
"topic.metadata.refresh.interval.ms" = "1000"
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
# One message per record batch: tansu 0.6 skips the rest of a batch fetched from an offset
# inside it (see e2e_tansu.rs), and the repartition topic is read from stored offsets.
"batch.num.messages" = "1"
[time]
zone = "UTC"
allowed_lateness = "1h"
idle_timeout = "1h"
[state]
path = "{state}"
retention = "35d"
flush_interval = "100ms"
[http]
listen = "127.0.0.1:{port}"
[north_star]
name = "daily_active_teams"
kind = "distinct"
field = "team_id"
where = {{ event = "message_sent" }}
window = "1d"
[[inputs]]
name = "collaborative_teams"
owner = "collaboration"
kind = "threshold"
entity = "team_id"
field = "user_id"
at_least = 3
where = {{ event = "message_sent" }}
window = "1d"
[[inputs]]
name = "busy_teams"
owner = "collaboration"
kind = "threshold"
entity = "team_id"
at_least = 9
where = {{ event = "message_sent" }}
window = "1d"
[[inputs]]
name = "daily_active_users"
owner = "growth"
kind = "distinct"
field = "user_id"
where = {{ event = "message_sent" }}
window = "1d"
[[inputs]]
name = "messages_sent"
owner = "messaging"
kind = "count"
where = {{ event = "message_sent" }}
window = "1d"
"#,
        state = state.display()
    )
}

struct Instance {
    process: Process,
    port: u16,
}

fn start_instance(dir: &Path, brokers: &str, name: &str) -> Instance {
    let port = free_port();
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config_path,
        config(brokers, &dir.join(format!("state-{name}")), port),
    )
    .expect("config");
    let process = Process::spawn(
        name,
        Command::new(NSM).args(["run", "--config", config_path.to_str().expect("utf8")]),
        dir,
    );
    Instance { process, port }
}

/// The stream: team `t` has users `5t..5t+4`; in every third team only two of them send.
struct Stream {
    lines: Vec<String>,
    active_teams: usize,
    collaborative_teams: usize,
    /// Teams with at least 9 messages: 20 from teams of 5 senders, 8 from the others, so one
    /// message counted twice would show.
    busy_teams: usize,
    active_users: usize,
}

fn stream() -> Stream {
    // Two hours back, inside one UTC day.
    let mut hour_ms = hour_start_ms(2);
    if hour_ms.rem_euclid(86_400_000) == 0 {
        hour_ms -= 2 * 3_600_000;
    }
    let mut lines = Vec::new();
    let mut active_users = 0;
    let senders_of = |team: usize| if team.is_multiple_of(3) { 2 } else { TEAM_SIZE };
    for round in 0..ROUNDS {
        for team in 0..TEAMS {
            for member in 0..senders_of(team) {
                let user = team * TEAM_SIZE + member;
                let time = hour_ms + (round * TEAMS * TEAM_SIZE + user) as i64 * 100;
                lines.push(format!(
                    r#"{{"event":"message_sent","user_id":"u{user}","team_id":"t{team}","timestamp":{time}}}"#
                ));
                if round == 0 {
                    active_users += 1;
                }
            }
        }
    }
    Stream {
        lines,
        active_teams: TEAMS,
        collaborative_teams: (0..TEAMS).filter(|team| senders_of(*team) >= 3).count(),
        busy_teams: (0..TEAMS)
            .filter(|team| senders_of(*team) * ROUNDS >= 9)
            .count(),
        active_users,
    }
}

fn summed(instances: &[&Instance], metric: &str) -> Option<f64> {
    let mut total = 0.0;
    for instance in instances {
        let samples = scrape(instance.port)?;
        total += metric_value(&samples, metric, "current").unwrap_or(0.0);
    }
    Some(total)
}

fn owned_partitions(instance: &Instance) -> Option<f64> {
    scrape(instance.port)?.get("nsm_partitions_owned").copied()
}

fn values(instances: &[&Instance]) -> Option<BTreeMap<&'static str, f64>> {
    let mut values = BTreeMap::new();
    for metric in [
        "daily_active_teams",
        "collaborative_teams",
        "busy_teams",
        "daily_active_users",
        "messages_sent",
    ] {
        values.insert(metric, summed(instances, metric)?);
    }
    Some(values)
}

fn consumed(instances: &[&Instance]) -> f64 {
    instances
        .iter()
        .filter_map(|instance| scrape(instance.port))
        .map(|samples| {
            samples
                .iter()
                .filter(|(series, _)| {
                    series.starts_with("nsm_events_consumed_total") && series.contains(TOPIC)
                })
                .map(|(_, value)| *value)
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn teams_counted_while_events_are_keyed_by_user_stay_exact_through_kills_joins_and_leaves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, brokers) = start_tansu(dir.path());
    let stream = stream();
    nsm_tool(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        TOPIC,
        "--partitions",
        &PARTITIONS.to_string(),
        "--file",
        "/dev/null",
    ]);
    // Input partitions and repartition partitions: twice the input topic's.
    let owned_total = 2.0 * PARTITIONS as f64;

    let mut a = start_instance(dir.path(), &brokers, "a");
    let mut b = start_instance(dir.path(), &brokers, "b");
    let c = start_instance(dir.path(), &brokers, "c");
    wait_for(
        "the three instances to share the partitions",
        Duration::from_secs(90),
        Some(&c.process),
        || {
            let owned: Vec<f64> = [&a, &b, &c]
                .iter()
                .map(|instance| owned_partitions(instance))
                .collect::<Option<_>>()?;
            (owned.iter().sum::<f64>() == owned_total && owned.iter().all(|n| *n >= 1.0))
                .then_some(())
        },
    );
    let check = String::from_utf8(
        Command::new(NSM)
            .args([
                "check",
                "--config",
                dir.path().join("a.toml").to_str().expect("utf8"),
            ])
            .output()
            .expect("nsm check")
            .stdout,
    )
    .expect("utf8");
    assert!(
        check.contains(
            "repartition: daily_active_teams, collaborative_teams, busy_teams count team_id"
        ),
        "{check}"
    );

    let mut producer = Process::spawn(
        "producer",
        Command::new(NSM)
            .args([
                "produce",
                "--brokers",
                &brokers,
                "--topic",
                TOPIC,
                "--key-field",
                "user_id",
                "--property",
                "batch.num.messages=1",
            ])
            .stdin(Stdio::piped()),
        dir.path(),
    );
    let mut stdin = producer.child.stdin.take().expect("producer stdin");
    let lines = stream.lines.clone();
    let feeder = std::thread::spawn(move || {
        for chunk in lines.chunks(40) {
            for line in chunk {
                writeln!(stdin, "{line}").expect("feed the producer");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let total = stream.lines.len() as f64;

    wait_for(
        "a fifth of the stream consumed",
        Duration::from_secs(180),
        Some(&a.process),
        || (consumed(&[&a, &b, &c]) >= total * 0.2).then_some(()),
    );
    a.process.kill_9();
    eprintln!("instance a killed with SIGKILL");
    // tansu rebalances when a member joins, not when a session expires (see e2e_scale_out).
    std::thread::sleep(SESSION_TIMEOUT + Duration::from_secs(1));
    let d = start_instance(dir.path(), &brokers, "d");
    eprintln!("instance d started");
    wait_for(
        "b, c and d to share the partitions",
        Duration::from_secs(90),
        Some(&d.process),
        || {
            let owned = [&b, &c, &d]
                .iter()
                .map(|instance| owned_partitions(instance))
                .collect::<Option<Vec<f64>>>()?;
            (owned.iter().sum::<f64>() == owned_total && owned[2] >= 1.0).then_some(())
        },
    );
    wait_for(
        "more of the stream consumed",
        Duration::from_secs(180),
        Some(&d.process),
        || (consumed(&[&b, &c, &d]) >= total * 0.5).then_some(()),
    );
    let status = b.process.terminate(Duration::from_secs(60));
    assert!(
        status.success(),
        "b's graceful stop:\n{}",
        b.process.log_text()
    );
    eprintln!("instance b stopped with SIGTERM");

    feeder.join().expect("feeder");
    let status = producer.child.wait().expect("producer");
    assert!(status.success(), "producer:\n{}", producer.log_text());

    let expected = BTreeMap::from([
        ("daily_active_teams", stream.active_teams as f64),
        ("collaborative_teams", stream.collaborative_teams as f64),
        ("busy_teams", stream.busy_teams as f64),
        ("daily_active_users", stream.active_users as f64),
        ("messages_sent", total),
    ]);
    let live = [&c, &d];
    let mut last = String::new();
    wait_for(
        "the summed values of c and d to reach the stream's",
        Duration::from_secs(180),
        Some(&d.process),
        || {
            let owned = owned_partitions(&c)? + owned_partitions(&d)?;
            let values = values(&live)?;
            let progress = format!("owned={owned} {values:?}");
            if progress != last {
                eprintln!("progress: {progress}");
                last = progress;
            }
            (owned == owned_total
                && values
                    .iter()
                    .all(|(name, value)| *value >= expected[name] - 1e-6))
            .then_some(())
        },
    );
    // Settle: nothing more may arrive, and nothing may be counted twice.
    std::thread::sleep(Duration::from_secs(3));
    let values = values(&live).expect("both instances answer");
    for (name, value) in &values {
        assert!(
            (value - expected[name]).abs() < 1e-6,
            "{name}: summed {value} != {}\nc:\n{}\nd:\n{}",
            expected[name],
            c.process.log_text(),
            d.process.log_text()
        );
    }
}
