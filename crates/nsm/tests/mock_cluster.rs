//! Integration through librdkafka's in-process mock cluster: the real nsm binary consumes a
//! known stream through the real client path, exports exact values, dead-letters bad events,
//! and after a graceful stop and restart, or the loss of its state directory (restored from
//! the changelog), neither loses nor double-counts anything; a backlog is stored once
//! `state.flush_max_entries` entries wait, not only at the flush interval; 2,000 idle HTTP
//! connections held while events flow leave scrapes answering and every write stored; a
//! repartition topic refusing records stops nsm with nothing lost.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// A mock cluster holding the input topic `events` of `partitions`, its dead-letter topic and
/// the changelog topic of `group` (the mock cluster cannot create topics through the admin
/// API), and its bootstrap servers.
fn cluster_for(group: &str, partitions: i32) -> (Cluster, String) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic("events", partitions, 1)
        .expect("topic");
    cluster.create_topic("events-dlq", 1, 1).expect("dlq topic");
    cluster
        .create_topic(&format!("{group}-changelog"), partitions, 1)
        .expect("changelog topic");
    let brokers = cluster.bootstrap_servers();
    (cluster, brokers)
}

/// [`cluster_for`], with the group's repartition topic of as many partitions.
fn cluster_with_repartition(group: &str, partitions: i32) -> (Cluster, String) {
    let (cluster, brokers) = cluster_for(group, partitions);
    cluster
        .create_topic(&format!("{group}-repartition"), partitions, 1)
        .expect("repartition topic");
    (cluster, brokers)
}

/// A daily distinct count of teams: with events keyed by user, counted through the
/// repartition topic.
const ACTIVE_TEAMS: &str = "\n[[inputs]]\nname = \"active_teams\"\nowner = \"growth-team\"\n\
     kind = \"distinct\"\nfield = \"team_id\"\nwhere = { event = \"message_sent\" }\n\
     window = \"1d\"\n";

/// A message of `user`, in `team`, sent now.
fn team_message(user: usize, team: usize) -> String {
    let now = now_ms();
    format!(
        r#"{{"event":"message_sent","user_id":"u{user}","team_id":"t{team}","timestamp":{now}}}"#
    )
}

/// The team count of [`ACTIVE_TEAMS`], whether its current window is partial, and the messages.
fn teams_counted(samples: &std::collections::BTreeMap<String, f64>) -> (f64, f64, f64) {
    (
        metric_value(samples, "active_teams", "current").unwrap_or(-1.0),
        sample(
            samples,
            "nsm_metric_window_partial{metric=\"active_teams\",window=\"current\"}",
        ),
        messages(samples).unwrap_or(-1.0),
    )
}

/// Starts `nsm run` with the config `text`, written to `dir/<name>.toml`.
fn run_config(dir: &std::path::Path, name: &str, text: &str) -> Process {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config");
    Process::spawn(
        name,
        std::process::Command::new(NSM).args(["run", "--config", path.to_str().expect("utf8")]),
        dir,
    )
}

/// The samples once `process` owns `partitions` and counted every message of `stream`'s hour.
fn counted_by(
    process: &Process,
    port: u16,
    stream: &KnownStream,
    partitions: usize,
) -> std::collections::BTreeMap<String, f64> {
    wait_for(
        "every message counted",
        Duration::from_secs(90),
        Some(process),
        || {
            let samples = scrape(port)?;
            (samples.get("nsm_partitions_owned").copied()? == partitions as f64
                && metric_value(&samples, "messages_sent", "current")?
                    == stream.messages_current_hour as f64)
                .then_some(samples)
        },
    )
}

/// Produces `lines` to `topic` with `nsm produce`, through a file in `dir`; `extra` are more
/// of its arguments.
fn produce(brokers: &str, topic: &str, dir: &std::path::Path, lines: &[String], extra: &[&str]) {
    let events_file = dir.join("events.jsonl");
    std::fs::write(&events_file, lines.join("\n")).expect("write events");
    let mut args = vec![
        "produce",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--file",
        events_file.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    nsm_tool(&args);
}

#[test]
fn known_stream_gives_exact_values_dead_letters_and_survives_a_graceful_restart() {
    let (_cluster, brokers) = cluster_for("nsm-mock", 3);
    let topic = "events";
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = known_stream(60, 3);
    produce(
        &brokers,
        topic,
        dir.path(),
        &stream.lines,
        &["--key-field", "user_id"],
    );

    let port = free_port();
    let config_path = dir.path().join("nsm.toml");
    std::fs::write(
        &config_path,
        test_config(&brokers, topic, &dir.path().join("state"), port, "nsm-mock") + BY_USER,
    )
    .expect("config");
    let run = |dir: &std::path::Path| {
        Process::spawn(
            "nsm",
            std::process::Command::new(NSM).args([
                "run",
                "--config",
                config_path.to_str().expect("utf8"),
            ]),
            dir,
        )
    };
    let mut nsm = run(dir.path());

    let expected_messages = stream.messages_current_hour as f64;
    let samples = wait_for(
        "all messages counted",
        Duration::from_secs(90),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            // Complaints and payments come after the messages: each partition's last events.
            (metric_value(&samples, "messages_sent", "current")? == expected_messages
                && samples.get("nsm_events_late_total").copied()? == stream.late as f64
                && metric_value(&samples, "complaints", "current")? == stream.complaints as f64
                && samples.get("nsm_events_duplicate_total").copied()? == stream.duplicates as f64)
                .then_some(samples)
        },
    );
    assert_values(&samples, &stream);
    for (reason, count) in &stream.invalid {
        let series = format!("nsm_events_invalid_total{{reason=\"{reason}\"}}");
        assert_eq!(
            samples.get(&series).copied(),
            Some(*count as f64),
            "{series}"
        );
    }
    assert_eq!(
        samples.get("nsm_events_duplicate_total").copied(),
        Some(stream.duplicates as f64),
        "retried payments are counted once"
    );
    let (status, _) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(status, 200);

    // The windows API returns both stored hours of messages, exactly.
    let (status, body) = http_get(
        port,
        &format!(
            "/api/v1/metrics/messages_sent/windows?from={}",
            stream.hour_ms - 3_600_000
        ),
    )
    .expect("api");
    assert_eq!(status, 200, "{body}");
    let windows: serde_json::Value = serde_json::from_str(&body).expect("json");
    let values: Vec<(i64, u64, bool)> = windows["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .map(|w| {
            (
                w["start_ms"].as_i64().expect("start"),
                w["value"].as_u64().expect("value"),
                w["complete"].as_bool().expect("complete"),
            )
        })
        .collect();
    assert_eq!(
        values,
        vec![
            (
                stream.hour_ms - 3_600_000,
                stream.messages_previous_hour as u64,
                false
            ),
            (stream.hour_ms, stream.messages_current_hour as u64, false)
        ]
    );

    // Revenue's stored day carries its top segments and the overflow, summing to the total.
    let (status, body) = http_get(port, "/api/v1/metrics/revenue/windows").expect("api");
    assert_eq!(status, 200, "{body}");
    let windows: serde_json::Value = serde_json::from_str(&body).expect("json");
    let segments = windows["windows"][0]["segments"]
        .as_array()
        .expect("segments")
        .clone();
    assert_eq!(segments.len(), 4, "{segments:?}");
    assert_eq!(segments[3]["segment"], "__other__");
    let total: f64 = segments
        .iter()
        .map(|segment| segment["value"].as_f64().expect("value"))
        .sum();
    assert!((total - stream.revenue).abs() < 1e-6, "{segments:?}");

    // Every bad event is in the dead-letter topic with its reason.
    let dead_letters = nsm_tool(&[
        "read",
        "--brokers",
        &brokers,
        "--topic",
        "events-dlq",
        "--quiet",
        "2s",
    ]);
    let mut reasons: Vec<String> = dead_letters
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).expect("json line")["headers"]
                ["nsm-reason"]
                .as_str()
                .expect("reason")
                .to_string()
        })
        .collect();
    reasons.sort();
    let mut expected_reasons: Vec<String> = stream.invalid.keys().map(|r| r.to_string()).collect();
    expected_reasons.extend(["late".to_string(), "late".to_string()]);
    expected_reasons.sort();
    assert_eq!(reasons, expected_reasons);

    // SIGTERM stops cleanly; a restart resumes from stored offsets: same values, nothing twice.
    let status = nsm.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        nsm.log_text()
    );
    let mut nsm = run(dir.path());
    let samples = wait_for(
        "values after restart",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (samples.get("nsm_partitions_owned").copied()? == 3.0).then_some(samples)
        },
    );
    assert_values(&samples, &stream);

    // The state directory is lost: a fresh one is restored from the changelog topic, offsets
    // included, so nothing is counted twice or missed.
    let status = nsm.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", nsm.log_text());
    std::fs::rename(dir.path().join("state"), dir.path().join("state-lost")).expect("move");
    let mut nsm = run(dir.path());
    let samples = wait_for(
        "values restored from the changelog",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (samples.get("nsm_partitions_owned").copied()? == 3.0).then_some(samples)
        },
    );
    assert_values(&samples, &stream);
    assert!(
        samples.get("nsm_state_restored_records_total").copied() > Some(0.0),
        "restored from the changelog: {}",
        nsm.log_text()
    );

    // New events after the restart add exactly once.
    let more = dir.path().join("more.jsonl");
    let time = stream.hour_ms + 2_000_000;
    std::fs::write(
        &more,
        format!(r#"{{"event":"message_sent","user_id":"newcomer","timestamp":{time}}}"#),
    )
    .expect("write");
    nsm_tool(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        topic,
        "--file",
        more.to_str().expect("utf8"),
        "--key-field",
        "user_id",
    ]);
    wait_for("the new event", Duration::from_secs(60), Some(&nsm), || {
        let samples = scrape(port)?;
        (metric_value(&samples, "messages_sent", "current")? == expected_messages + 1.0
            && metric_value(&samples, "daily_active_messagers", "current")?
                == stream.messagers as f64 + 1.0)
            .then_some(())
    });
    nsm.terminate(Duration::from_secs(30));
}

/// Revenue per messager by user: a ratio broken down like its parts (revenue is by user in
/// the test config).
const BY_USER: &str = r#"
[[guardrails]]
name = "messagers_by_user"
owner = "growth-team"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1d"
by = ["user_id"]
[[guardrails]]
name = "revenue_per_messager_by_user"
owner = "growth-team"
kind = "ratio"
numerator = "revenue"
denominator = "messagers_by_user"
by = ["user_id"]
top = 3
"#;

fn assert_values(samples: &std::collections::BTreeMap<String, f64>, stream: &KnownStream) {
    assert_eq!(
        metric_value(samples, "messages_sent", "current"),
        Some(stream.messages_current_hour as f64)
    );
    assert_eq!(
        metric_value(samples, "messages_sent", "previous"),
        Some(stream.messages_previous_hour as f64)
    );
    assert_eq!(
        metric_value(samples, "daily_active_messagers", "current"),
        Some(stream.messagers as f64)
    );
    assert_eq!(
        metric_value(samples, "complaints", "current"),
        Some(stream.complaints as f64)
    );
    let revenue = metric_value(samples, "revenue", "current").expect("revenue");
    assert!(
        (revenue - stream.revenue).abs() < 1e-6,
        "revenue {revenue} != {}",
        stream.revenue
    );
    // Revenue by user: the three largest payers, and the rest summed in one series.
    let segments: Vec<(&String, f64)> = samples
        .iter()
        .filter(|(series, _)| {
            series.starts_with("nsm_metric_segment_value{metric=\"revenue\"")
                && series.contains("window=\"current\"")
        })
        .map(|(series, value)| (series, *value))
        .collect();
    assert_eq!(segments.len(), 4, "top 3 and __other__: {segments:?}");
    let top_payer = format!("segment=\"u{}\"", (stream.messagers - 1) / 4 * 4);
    assert!(
        segments
            .iter()
            .any(|(series, _)| series.contains(&top_payer)),
        "{top_payer} in {segments:?}"
    );
    assert!(segments
        .iter()
        .any(|(series, _)| series.contains("segment=\"__other__\"")));
    let total: f64 = segments.iter().map(|(_, value)| value).sum();
    assert!(
        (total - stream.revenue).abs() < 1e-6,
        "segments sum to the revenue"
    );
    // The hour before the previous one comes from nsm's own state (the retention keeps it),
    // so growth needs no Prometheus history.
    assert_eq!(
        metric_value(samples, "messages_sent", "before_previous"),
        Some(0.0)
    );
    let before_start = samples
        .get("nsm_metric_window_start_timestamp_seconds{metric=\"messages_sent\",window=\"before_previous\"}")
        .copied();
    assert_eq!(
        before_start,
        Some(((stream.hour_ms - 2 * 3_600_000) / 1000) as f64)
    );
    // The ratio of two daily metrics, with its exact parts for re-aggregation.
    let ratio = metric_value(samples, "revenue_per_messager", "current").expect("ratio");
    assert!((ratio - stream.revenue / stream.messagers as f64).abs() < 1e-9);
    let part = |part: &str| {
        samples
            .get(&format!("nsm_metric_ratio_part{{metric=\"revenue_per_messager\",part=\"{part}\",window=\"current\"}}"))
            .copied()
    };
    assert_eq!(part("denominator"), Some(stream.messagers as f64));
    assert!((part("numerator").expect("numerator") - stream.revenue).abs() < 1e-6);
    // By user too: the top payer's revenue over one messager, with both parts.
    let segment_part = |part: &str| {
        samples
            .get(&format!("nsm_metric_segment_ratio_part{{metric=\"revenue_per_messager_by_user\",part=\"{part}\",{top_payer},window=\"current\"}}"))
            .copied()
    };
    let top_payer_revenue = segments
        .iter()
        .find(|(series, _)| series.contains(&top_payer))
        .map(|(_, value)| *value);
    assert_eq!(segment_part("denominator"), Some(1.0));
    assert_eq!(segment_part("numerator"), top_payer_revenue);
    let start = samples
        .get("nsm_metric_window_start_timestamp_seconds{metric=\"messages_sent\",window=\"current\"}")
        .copied()
        .expect("window start");
    assert_eq!(start, (stream.hour_ms / 1000) as f64);
    assert!(samples.contains_key("nsm_metric_info{description=\"Users who sent a message today\",kind=\"distinct\",metric=\"daily_active_messagers\",owner=\"\",period=\"day\",role=\"north_star\"}"), "info series");
}

#[test]
fn a_state_kept_without_the_changelog_seeds_it_once_turned_on() {
    let (_cluster, brokers) = cluster_for("nsm-seed", 2);
    let topic = "events";
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = known_stream(40, 2);
    produce(
        &brokers,
        topic,
        dir.path(),
        &stream.lines,
        &["--key-field", "user_id"],
    );
    let port = free_port();
    let config = |changelog: bool, state: &str| {
        let text =
            test_config(&brokers, topic, &dir.path().join(state), port, "nsm-seed") + BY_USER;
        if changelog {
            text
        } else {
            text.replace("[state]\n", "[state]\nchangelog = false\n")
        }
    };
    let run = |text: String, name: &str| run_config(dir.path(), name, &text);
    let counted = |process: &Process| counted_by(process, port, &stream, 2);

    // Without the changelog, then with it: the stored copy is sent whole.
    let mut without = run(config(false, "state"), "without-changelog");
    counted(&without);
    assert!(without.terminate(Duration::from_secs(30)).success());
    let mut with = run(config(true, "state"), "with-changelog");
    let samples = counted(&with);
    assert_values(&samples, &stream);
    assert!(with.terminate(Duration::from_secs(30)).success());
    assert!(
        with.log_text().contains("sending it whole"),
        "{}",
        with.log_text()
    );

    // The changelog alone now rebuilds the same values in an empty state directory.
    let fresh = run(config(true, "fresh-state"), "fresh");
    let samples = counted(&fresh);
    assert_values(&samples, &stream);
    assert!(samples.get("nsm_state_restored_records_total").copied() > Some(0.0));
}

#[test]
fn a_lost_changelog_keeps_the_local_state_and_is_seeded_again_from_it() {
    let (cluster, brokers) = cluster_for("nsm-lost", 2);
    let topic = "events";
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = known_stream(40, 2);
    produce(
        &brokers,
        topic,
        dir.path(),
        &stream.lines,
        &["--key-field", "user_id"],
    );
    let port = free_port();
    // The changelog as a deleted and recreated topic shows it: empty, its offsets from 0.
    let recreated = "nsm-lost-changelog-recreated";
    cluster.create_topic(recreated, 2, 1).expect("topic");
    let config = |changelog_topic: &str, state: &str| {
        test_config(&brokers, topic, &dir.path().join(state), port, "nsm-lost").replace(
            "[state]\n",
            &format!("[state]\nchangelog_topic = \"{changelog_topic}\"\n"),
        ) + BY_USER
    };
    let run = |text: String, name: &str| run_config(dir.path(), name, &text);
    let counted = |process: &Process| counted_by(process, port, &stream, 2);

    let mut first = run(config("nsm-lost-changelog", "state"), "first");
    counted(&first);
    assert!(first.terminate(Duration::from_secs(30)).success());

    // The same state directory, its changelog gone: the values survive, and it says so.
    let mut second = run(config(recreated, "state"), "second");
    let samples = counted(&second);
    assert_values(&samples, &stream);
    assert!(second.terminate(Duration::from_secs(30)).success());
    assert!(
        second.log_text().contains("the changelog no longer holds"),
        "{}",
        second.log_text()
    );

    // The recreated changelog alone rebuilds the same values in an empty state directory.
    let fresh = run(config(recreated, "fresh-state"), "fresh");
    let samples = counted(&fresh);
    assert_values(&samples, &stream);
    assert!(samples.get("nsm_state_restored_records_total").copied() > Some(0.0));
}

#[test]
fn a_backlog_is_stored_once_enough_entries_wait_not_only_at_the_interval() {
    // Every message is a new member of today: one per-entity entry each. A flush is due at
    // `state.flush_max_entries`, or else at the longest interval allowed, a minute.
    const USERS: usize = 1_040;
    const BOUND: f64 = 1_000.0;
    let (_cluster, brokers) = cluster_for("nsm-bound", 1);
    let topic = "events";
    let dir = tempfile::tempdir().expect("tempdir");
    let today_ms = now_ms() - now_ms().rem_euclid(86_400_000);
    let lines: Vec<String> = (0..USERS)
        .map(|user| {
            format!(r#"{{"event":"message_sent","user_id":"u{user}","timestamp":{today_ms}}}"#)
        })
        .collect();
    produce(&brokers, topic, dir.path(), &lines, &[]);
    let port = free_port();
    let config = test_config(
        &brokers,
        topic,
        &dir.path().join("state"),
        port,
        "nsm-bound",
    );
    let interval = "flush_interval = \"100ms\"";
    assert!(config.contains(interval), "{config}");
    let config = config.replace(
        interval,
        "flush_interval = \"60s\"\nflush_max_entries = 1000",
    );
    let config_path = dir.path().join("nsm.toml");
    std::fs::write(&config_path, config).expect("config");
    let run = || {
        Process::spawn(
            "nsm",
            std::process::Command::new(NSM).args([
                "run",
                "--config",
                config_path.to_str().expect("utf8"),
            ]),
            dir.path(),
        )
    };
    let members = |samples: &std::collections::BTreeMap<String, f64>| {
        metric_value(samples, "daily_active_messagers", "current")
    };

    // Values are published once stored: the first flush comes at the bound, exactly, long
    // before the interval; the rest, read within moments, waits for the interval.
    let mut nsm = run();
    wait_for(
        "the first flush",
        Duration::from_secs(50),
        Some(&nsm),
        || (members(&scrape(port)?)? == BOUND).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        scrape(port).as_ref().and_then(members),
        Some(BOUND),
        "the entries below the bound wait for the interval"
    );
    // The stop stores the rest, and nothing is lost.
    assert!(nsm.terminate(Duration::from_secs(30)).success());
    let restarted = run();
    wait_for(
        "every member after the restart",
        Duration::from_secs(60),
        Some(&restarted),
        || (members(&scrape(port)?)? == USERS as f64).then_some(()),
    );
}

/// Idle TCP connections to a port: opened, never written to.
struct IdleConnections {
    streams: Vec<std::net::TcpStream>,
}

impl IdleConnections {
    fn open(port: u16, count: usize) -> IdleConnections {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let streams = (0..count)
            .map(|index| {
                let stream =
                    std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10))
                        .unwrap_or_else(|error| panic!("idle connection {index}: {error}"));
                stream.set_nonblocking(true).expect("nonblocking");
                stream
            })
            .collect();
        IdleConnections { streams }
    }

    /// How many the server has not closed.
    fn still_open(&self) -> usize {
        use std::io::Read;
        self.streams
            .iter()
            .filter(|stream| {
                let mut reader: &std::net::TcpStream = stream;
                match reader.read(&mut [0; 64]) {
                    Ok(0) => false,
                    Ok(_) => true,
                    Err(error) => error.kind() == std::io::ErrorKind::WouldBlock,
                }
            })
            .count()
    }
}

/// Raises this process's soft limit on open files to its hard limit; the limit then.
fn raise_own_open_file_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if setrlimit(Resource::Nofile, raised).is_err() {
        eprintln!("cannot raise the open-file limit of the test: {limit:?}");
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// About a thousand idle connections once took every file descriptor of nsm (no timeout, no
/// limit, unbounded RocksDB files): its next state write failed and it crash-looped. Here nsm
/// runs with the common limit of 1,024 open files, which it cannot raise, and 2,000 idle
/// connections are opened and held while the second half of a known stream flows: at most
/// `http.max_connections` stay open, the rest close within the header timeout, scrapes keep
/// answering with the exact values, and no state write fails.
#[test]
fn two_thousand_idle_connections_leave_scrapes_answering_and_every_write_stored() {
    const MAX_CONNECTIONS: usize = 256;
    let own_limit = raise_own_open_file_limit();
    // Each idle connection is a descriptor here too: with a lower hard limit, as many as it
    // allows beside the test's own files; still more than nsm's limit.
    let count = 2_000.min(usize::try_from(own_limit.saturating_sub(200)).unwrap_or(2_000));
    if count < 2_000 {
        eprintln!("open-file limit {own_limit}: {count} idle connections instead of 2,000");
    }

    let (_cluster, brokers) = cluster_for("nsm-idle", 3);
    let topic = "events";
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = known_stream(60, 3);
    let port = free_port();
    let config_path = dir.path().join("nsm.toml");
    std::fs::write(
        &config_path,
        test_config(&brokers, topic, &dir.path().join("state"), port, "nsm-idle") + BY_USER,
    )
    .expect("config");
    // The soft and hard limits of the systemd default; `exec` keeps the process id nsm's.
    let mut nsm = Process::spawn(
        "nsm",
        std::process::Command::new("sh").args([
            "-c",
            "ulimit -n 1024 && exec \"$0\" \"$@\"",
            NSM,
            "run",
            "--config",
            config_path.to_str().expect("utf8"),
        ]),
        dir.path(),
    );

    let (first_half, second_half) = stream.lines.split_at(stream.lines.len() / 2);
    let key_field = ["--key-field", "user_id"];
    produce(&brokers, topic, dir.path(), first_half, &key_field);
    wait_for(
        "the first half consumed",
        Duration::from_secs(90),
        Some(&nsm),
        || (consumed_total(&scrape(port)?) == first_half.len() as f64).then_some(()),
    );

    let opened = std::time::Instant::now();
    let idle = IdleConnections::open(port, count);
    eprintln!("{count} idle connections opened in {:?}", opened.elapsed());
    produce(&brokers, topic, dir.path(), second_half, &key_field);
    wait_for(
        "at most http.max_connections idle connections left open",
        Duration::from_secs(5),
        Some(&nsm),
        || (idle.still_open() <= MAX_CONNECTIONS).then_some(()),
    );
    // Every scrape is a new connection, given the place of the longest idle one.
    let samples = wait_for(
        "all messages counted while the connections are held",
        Duration::from_secs(90),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (consumed_total(&samples) == stream.lines.len() as f64
                && metric_value(&samples, "messages_sent", "current")?
                    == stream.messages_current_hour as f64
                && samples.get("nsm_events_late_total").copied()? == stream.late as f64)
                .then_some(samples)
        },
    );
    assert_values(&samples, &stream);
    assert_eq!(
        http_get(port, "/readyz").map(|(status, _)| status),
        Some(200)
    );
    // The rest were idle longer than the header timeout (10 s by default).
    wait_for(
        "every idle connection closed",
        Duration::from_secs(20),
        Some(&nsm),
        || (idle.still_open() == 0).then_some(()),
    );
    assert!(
        nsm.child.try_wait().expect("wait").is_none(),
        "nsm is running"
    );
    let log = nsm.log_text();
    assert!(
        !log.contains("cannot write state") && !log.contains("Too many open files"),
        "{log}"
    );
    assert!(log.contains("HTTP connection limit reached"), "{log}");
    drop(idle);
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}

/// Messages counted in the test config's hourly `messages_sent`, whichever of its two
/// windows they fell in (the hour may turn during a test).
fn messages(samples: &std::collections::BTreeMap<String, f64>) -> Option<f64> {
    Some(
        metric_value(samples, "messages_sent", "current")?
            + metric_value(samples, "messages_sent", "previous")?,
    )
}

fn sample(samples: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(-1.0)
}

/// `count` messages sent now by users `{prefix}0`, `{prefix}1`, ..., each padded to about
/// `pad` bytes.
fn sent_now(prefix: &str, count: usize, pad: usize) -> Vec<String> {
    let now = now_ms();
    (0..count)
        .map(|user| {
            format!(
                r#"{{"event":"message_sent","user_id":"{prefix}{user}","timestamp":{now},"pad":"{}"}}"#,
                "x".repeat(pad)
            )
        })
        .collect()
}

fn spawn_nsm(dir: &std::path::Path, name: &str, config: &str) -> Process {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("config");
    Process::spawn(
        name,
        std::process::Command::new(NSM).args(["run", "--config", path.to_str().expect("utf8")]),
        dir,
    )
}

/// Retention deleting events nsm had not read yet, and an input topic deleted and recreated:
/// what nsm skips is counted and logged, never silent.
#[test]
fn offsets_deleted_by_retention_or_gone_with_a_recreated_topic_are_counted() {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = |brokers: &str| {
        test_config(
            brokers,
            "events",
            &dir.path().join("state"),
            port,
            "nsm-gaps",
        )
        .replace("[state]\n", "[state]\nchangelog = false\n")
    };
    let (cluster, brokers) = cluster_for("nsm-gaps", 1);
    produce(
        &brokers,
        "events",
        dir.path(),
        &sent_now("small", 5, 0),
        &[],
    );
    let mut nsm = spawn_nsm(dir.path(), "nsm-1", &config(&brokers));
    wait_for("5 messages", Duration::from_secs(60), Some(&nsm), || {
        (messages(&scrape(port)?)? == 5.0).then_some(())
    });
    assert!(nsm.terminate(Duration::from_secs(30)).success());

    // While nsm is stopped, 12 messages of 600 KiB pass the mock broker's 5 MiB a
    // partition: the oldest are deleted, nsm's stored offset 5 with them.
    produce(
        &brokers,
        "events",
        dir.path(),
        &sent_now("big", 12, 600 * 1024),
        &[],
    );
    let watcher: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("consumer");
    let (log_start, log_end) = watcher
        .fetch_watermarks("events", 0, Duration::from_secs(10))
        .expect("watermarks");
    assert!(
        log_start > 5 && log_end == 17,
        "retention deleted the stored offset: {log_start}..{log_end}"
    );
    let nsm = spawn_nsm(dir.path(), "nsm-2", &config(&brokers));
    let samples = wait_for(
        "the messages still in the log",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (messages(&samples)? == (5 + 17 - log_start) as f64).then_some(samples)
        },
    );
    assert_eq!(
        sample(&samples, "nsm_offsets_skipped_total{reason=\"gap\"}"),
        (log_start - 5) as f64,
        "offsets 5 to {} were deleted before nsm read them",
        log_start - 1
    );
    assert_eq!(
        sample(&samples, "nsm_offsets_skipped_total{reason=\"rewound\"}"),
        0.0
    );
    assert!(
        nsm.log_text().contains("offsets skipped"),
        "{}",
        nsm.log_text()
    );
    drop(nsm);
    drop(watcher);
    drop(cluster);

    // The topic is recreated (a new cluster): offsets start again at 0, below the stored 17.
    let (_cluster, brokers) = cluster_for("nsm-gaps", 1);
    produce(&brokers, "events", dir.path(), &sent_now("new", 4, 0), &[]);
    let mut nsm = spawn_nsm(dir.path(), "nsm-3", &config(&brokers));
    let samples = wait_for(
        "the recreated topic's messages",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (consumed_total(&samples) == 4.0).then_some(samples)
        },
    );
    assert_eq!(
        sample(&samples, "nsm_offsets_skipped_total{reason=\"rewound\"}"),
        4.0
    );
    assert_eq!(
        messages(&samples),
        Some((5 + 17 - log_start) as f64),
        "skipped as applied before"
    );
    assert!(
        nsm.log_text().contains("went back below its stored offset"),
        "{}",
        nsm.log_text()
    );
    // Past the stored offset, messages count again.
    produce(
        &brokers,
        "events",
        dir.path(),
        &sent_now("later", 16, 0),
        &[],
    );
    let samples = wait_for(
        "messages past the stored offset",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (consumed_total(&samples) == 20.0).then_some(samples)
        },
    );
    assert_eq!(
        sample(&samples, "nsm_offsets_skipped_total{reason=\"rewound\"}"),
        17.0,
        "offsets 0 to 16"
    );
    assert_eq!(messages(&samples), Some((5 + 17 - log_start + 3) as f64));
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}

/// `kafka.start_from = "latest"`: a new group skips the history and counts only what comes.
#[test]
fn a_new_group_starting_from_latest_skips_the_history() {
    let (_cluster, brokers) = cluster_for("nsm-latest", 2);
    let dir = tempfile::tempdir().expect("tempdir");
    produce(
        &brokers,
        "events",
        dir.path(),
        &sent_now("old", 6, 0),
        &["--key-field", "user_id"],
    );
    let port = free_port();
    let config = test_config(
        &brokers,
        "events",
        &dir.path().join("state"),
        port,
        "nsm-latest",
    )
    .replace("[kafka]\n", "[kafka]\nstart_from = \"latest\"\n")
    .replace("[state]\n", "[state]\nchangelog = false\n");
    let mut nsm = spawn_nsm(dir.path(), "nsm", &config);
    wait_for(
        "both partitions placed at their end",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            (nsm.log_text()
                .matches("starting at the end of the log")
                .count()
                == 2)
                .then_some(())
        },
    );
    // librdkafka looks the end up as it starts fetching, just after the assignment.
    std::thread::sleep(Duration::from_secs(2));
    produce(
        &brokers,
        "events",
        dir.path(),
        &sent_now("new", 3, 0),
        &["--key-field", "user_id"],
    );
    wait_for(
        "the new messages",
        Duration::from_secs(60),
        Some(&nsm),
        || (messages(&scrape(port)?)? == 3.0).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let samples = scrape(port).expect("metrics");
    assert_eq!(consumed_total(&samples), 3.0, "no old message read");
    assert_eq!(messages(&samples), Some(3.0));
    assert_eq!(
        metric_value(&samples, "daily_active_messagers", "current"),
        Some(3.0)
    );
    assert_eq!(
        sample(&samples, "nsm_offsets_skipped_total{reason=\"gap\"}"),
        0.0,
        "a deliberate start is not a skip"
    );
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}

/// The broker refuses dead letters (nsm is not authorized to write the topic any more): the
/// letter is held, no checkpoint passes it, a crash loses nothing, and once the topic takes
/// letters again everything resumes by itself.
#[test]
fn a_dead_letter_topic_refusing_letters_holds_checkpoints_and_loses_nothing() {
    use rdkafka::types::RDKafkaRespErr;

    let (cluster, brokers) = cluster_for("nsm-refused", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = test_config(
        &brokers,
        "events",
        &dir.path().join("state"),
        port,
        "nsm-refused",
    )
    .replace("[state]\n", "[state]\nchangelog = false\n");
    let mut nsm = spawn_nsm(dir.path(), "nsm-1", &config);
    produce(&brokers, "events", dir.path(), &sent_now("a", 3, 0), &[]);
    wait_for("3 messages", Duration::from_secs(60), Some(&nsm), || {
        (messages(&scrape(port)?)? == 3.0).then_some(())
    });
    let refuse = |refused: bool| {
        let error = if refused {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED
        } else {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        };
        cluster
            .topic_error("events-dlq", error)
            .expect("topic error");
        // The producer learns it from its next metadata refresh, every second here.
        std::thread::sleep(Duration::from_secs(3));
    };
    let rejected_then_valid = |prefix: &str, valid: usize| {
        let mut lines = vec!["not json".to_string()];
        lines.extend(sent_now(prefix, valid, 0));
        lines
    };
    let held = |samples: &std::collections::BTreeMap<String, f64>| {
        sample(samples, "nsm_dead_letters_held")
    };

    refuse(true);
    produce(
        &brokers,
        "events",
        dir.path(),
        &rejected_then_valid("b", 2),
        &[],
    );
    let samples = wait_for("a held letter", Duration::from_secs(60), Some(&nsm), || {
        let samples = scrape(port)?;
        (held(&samples) == 1.0).then_some(samples)
    });
    assert!(sample(&samples, "nsm_dead_letters_total{result=\"failed\"}") >= 1.0);
    assert_eq!(
        sample(&samples, "nsm_dead_letters_total{result=\"dropped\"}"),
        0.0
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        scrape(port).as_ref().and_then(messages),
        Some(3.0),
        "nothing past the held letter is stored, so nothing is shown"
    );
    assert!(
        nsm.log_text().contains("a dead letter was refused"),
        "{}",
        nsm.log_text()
    );

    // A crash while the letter is held: its offset was never passed, so the restart reads
    // it again and delivers it once the topic takes letters.
    nsm.kill_9();
    refuse(false);
    let mut nsm = spawn_nsm(dir.path(), "nsm-2", &config);
    wait_for(
        "the events after the letter",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (messages(&samples)? == 5.0 && held(&samples) == 0.0).then_some(())
        },
    );

    // Refused again while running: held, then delivered by itself once allowed.
    refuse(true);
    produce(
        &brokers,
        "events",
        dir.path(),
        &rejected_then_valid("c", 1),
        &[],
    );
    wait_for("a held letter", Duration::from_secs(60), Some(&nsm), || {
        (held(&scrape(port)?) == 1.0).then_some(())
    });
    refuse(false);
    wait_for(
        "the held letter delivered",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (messages(&samples)? == 6.0 && held(&samples) == 0.0).then_some(())
        },
    );
    // Said by the next checkpoint's flush, which may come a little after the gauge moved.
    wait_for(
        "the log saying the held letters are delivered",
        Duration::from_secs(30),
        Some(&nsm),
        || {
            nsm.log_text()
                .contains("held dead letters are delivered")
                .then_some(())
        },
    );
    let dead_letters = nsm_tool(&[
        "read",
        "--brokers",
        &brokers,
        "--topic",
        "events-dlq",
        "--quiet",
        "2s",
    ]);
    let sources: Vec<String> = dead_letters
        .lines()
        .map(|line| {
            let letter: serde_json::Value = serde_json::from_str(line).expect("json line");
            assert_eq!(letter["headers"]["nsm-reason"], "invalid_json");
            letter["headers"]["nsm-source-offset"]
                .as_str()
                .expect("offset")
                .to_string()
        })
        .collect();
    assert_eq!(
        sources,
        vec!["3", "6"],
        "each rejected event once, none lost"
    );
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}

/// `nsm replay`: a candidate config that leaves test users out, computed over the topic's
/// history beside the live config, without a group and without touching any state. (The mock
/// cluster cannot look offsets up by time: `--from` is tested on tansu.)
#[test]
fn a_candidate_config_is_replayed_over_the_history_beside_the_live_one() {
    let (_cluster, brokers) = cluster_for("nsm-replay", 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lines = sent_now("user-", 5, 0);
    lines.extend(sent_now("test-", 3, 0));
    produce(
        &brokers,
        "events",
        dir.path(),
        &lines,
        &["--key-field", "user_id"],
    );
    let live = test_config(
        &brokers,
        "events",
        &dir.path().join("state"),
        free_port(),
        "nsm-replay",
    );
    let candidate = live.replace(
        "where = { event = \"message_sent\" }\nwindow = \"1d\"",
        "where = { event = \"message_sent\", user_id = { not_any_of = [\"test-0\", \"test-1\", \"test-2\"] } }\nwindow = \"1d\"",
    );
    assert_ne!(
        candidate, live,
        "the candidate changes the North Star's filter"
    );
    std::fs::write(dir.path().join("live.toml"), &live).expect("live config");
    std::fs::write(dir.path().join("candidate.toml"), &candidate).expect("candidate config");
    let output = std::process::Command::new(NSM)
        .args([
            "replay",
            "--config",
            dir.path().join("candidate.toml").to_str().expect("utf8"),
            "--against",
            dir.path().join("live.toml").to_str().expect("utf8"),
            "--format",
            "json",
        ])
        .output()
        .expect("nsm replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["messages_read"], 8);
    let north_star = report["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .find(|metric| metric["name"] == "daily_active_messagers")
        .expect("the North Star");
    let today = &north_star["windows"][0];
    assert_eq!(today["candidate"], 5.0, "{north_star}");
    assert_eq!(today["live"], 8.0, "{north_star}");
    // For people: a table per metric, candidate beside live, and the linter's findings.
    let table = std::process::Command::new(NSM)
        .args([
            "replay",
            "--config",
            dir.path().join("candidate.toml").to_str().expect("utf8"),
            "--against",
            dir.path().join("live.toml").to_str().expect("utf8"),
        ])
        .output()
        .expect("nsm replay");
    let table = String::from_utf8_lossy(&table.stdout);
    let north_star_rows: Vec<&str> = table
        .lines()
        .skip_while(|line| *line != "daily_active_messagers")
        .take(3)
        .collect();
    assert!(
        north_star_rows[1].contains("candidate") && north_star_rows[1].contains("live"),
        "{table}"
    );
    let today: Vec<&str> = north_star_rows[2].split_whitespace().collect();
    assert_eq!(&today[1..3], ["5", "8"], "{table}");
    // Nothing was stored.
    assert!(!dir.path().join("state").exists());
}

#[test]
fn a_changelog_of_per_key_records_is_taken_over_and_rewritten_as_frames() {
    let (_cluster, brokers) = cluster_for("nsm-legacy", 1);
    let topic = "events";
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = known_stream(40, 2);
    produce(&brokers, topic, dir.path(), &stream.lines, &[]);
    let port = free_port();
    let config = |state: &str| {
        test_config(&brokers, topic, &dir.path().join(state), port, "nsm-legacy") + BY_USER
    };

    // The changelog an nsm of state format 7 left: a record per stored key of the partition,
    // each write ended by its meta record, every record with its epoch in a header.
    {
        let parsed = nsm_core::Config::from_toml(&config("older"), &|_| None).expect("config");
        let plan = nsm_core::engine::Plan::from_config(&parsed);
        let store = nsm_state::Store::open(
            &dir.path().join("older"),
            &plan,
            &nsm_state::StoreOptions::default(),
        )
        .expect("store");
        let key = nsm_core::PartitionKey::new(topic, 0);
        let mut engine = nsm_core::Engine::new(plan.clone());
        engine.restore_partition(key.clone(), Default::default());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        for (offset, line) in stream.lines.iter().enumerate() {
            let _ = engine.apply(&key, offset as i64, line.as_bytes(), now_ms);
        }
        let settings = nsm_kafka::ClientSettings::new(&brokers);
        let writer =
            nsm_kafka::ChangelogWriter::new(&settings, "nsm-legacy-changelog").expect("writer");
        let send_and_commit = |write: nsm_state::KeyedWrite| {
            for part in &write.partitions {
                store
                    .each_record(part, |key, value| {
                        writer
                            .send(0, key, value, Some(part.epoch), &|| false)
                            .map_err(|error| nsm_state::StateError::Corrupt {
                                column_family: "changelog",
                                detail: error.to_string(),
                            })
                    })
                    .expect("records");
                writer.await_delivery(&|| false).expect("acknowledged");
                writer
                    .send(
                        0,
                        &part.end.key,
                        part.end.value.as_deref(),
                        Some(part.epoch),
                        &|| false,
                    )
                    .expect("end marker");
                writer.await_delivery(&|| false).expect("acknowledged");
            }
            store.commit_keyed(write, &[]).expect("commit");
        };
        // The checkpoint is prepared once the adoption is stored, so that its records carry
        // the adoption's epoch, as an older nsm's did; prepared before, they would carry none
        // and be left out as an earlier owner's.
        let (adoption, _) = store
            .prepare_keyed_adoption(&key, &[], false, 1)
            .expect("adoption");
        send_and_commit(adoption);
        send_and_commit(
            store
                .prepare_keyed(&engine.take_changes())
                .expect("prepare"),
        );
    }

    let run = |state: &str, name: &str| run_config(dir.path(), name, &config(state));
    let counted = |process: &Process| counted_by(process, port, &stream, 1);
    // Taken with no local copy: rebuilt from the keyed records, then sent as frames; the
    // input is not read again (the records' offsets say where the state ends).
    let mut upgraded = run("upgraded", "upgraded");
    let samples = counted(&upgraded);
    assert_values(&samples, &stream);
    let consumed = |samples: &std::collections::BTreeMap<String, f64>| {
        samples
            .iter()
            .filter(|(series, _)| series.starts_with("nsm_events_consumed_total"))
            .map(|(_, value)| value)
            .sum::<f64>()
    };
    assert_eq!(consumed(&samples), 0.0, "the input was read again");
    let status = upgraded.terminate(Duration::from_secs(30));
    let log = upgraded.log_text();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("keyed records of an older nsm"), "{log}");
    assert!(
        log.contains("sent to the changelog as base frames"),
        "{log}"
    );

    // Another instance with no local copy now restores the frames.
    let mut fresh = run("fresh", "fresh");
    let samples = counted(&fresh);
    assert_values(&samples, &stream);
    assert_eq!(consumed(&samples), 0.0, "the input was read again");
    let status = fresh.terminate(Duration::from_secs(30));
    let log = fresh.log_text();
    assert!(status.success(), "{status}: {log}");
    assert!(!log.contains("keyed records of an older nsm"), "{log}");
    assert!(samples.get("nsm_state_restored_records_total").copied() > Some(0.0));
}

/// The repartition topic refuses a forwarded record (nsm may not write it any more): nsm
/// stops with an error that says so and stores nothing past the record, and once the topic
/// takes records again a restart counts every team once.
#[test]
fn a_repartition_topic_refusing_records_stops_nsm_with_nothing_lost() {
    use rdkafka::types::RDKafkaRespErr;

    let group = "nsm-rp-refused";
    let repartition_topic = format!("{group}-repartition");
    let (cluster, brokers) = cluster_with_repartition(group, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // Events keyed by user; teams counted through the repartition topic.
    let config = format!(
        "{}{ACTIVE_TEAMS}",
        test_config(&brokers, "events", &dir.path().join("state"), port, group)
            .replace("[state]\n", "[state]\nchangelog = false\n")
    );
    let sent_by_teams = |teams: std::ops::Range<usize>| -> Vec<String> {
        let now = now_ms();
        teams
            .map(|team| {
                format!(
                    r#"{{"event":"message_sent","user_id":"u{team}","team_id":"t{team}","timestamp":{now}}}"#
                )
            })
            .collect()
    };
    let counted = |samples: &std::collections::BTreeMap<String, f64>| {
        (
            messages(samples).unwrap_or(-1.0),
            metric_value(samples, "active_teams", "current").unwrap_or(-1.0),
        )
    };
    let mut nsm = spawn_nsm(dir.path(), "nsm-1", &config);
    produce(&brokers, "events", dir.path(), &sent_by_teams(0..3), &[]);
    wait_for("3 teams", Duration::from_secs(60), Some(&nsm), || {
        (counted(&scrape(port)?) == (3.0, 3.0)).then_some(())
    });

    cluster
        .topic_error(
            &repartition_topic,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .expect("topic error");
    // The producer learns it from its next metadata refresh, every second here.
    std::thread::sleep(Duration::from_secs(3));
    produce(&brokers, "events", dir.path(), &sent_by_teams(3..5), &[]);
    let status = wait_for("nsm to stop", Duration::from_secs(60), None, || {
        nsm.child.try_wait().expect("wait")
    });
    assert!(!status.success(), "{}", nsm.log_text());
    assert!(
        nsm.log_text()
            .contains("a record for the repartition topic was refused"),
        "{}",
        nsm.log_text()
    );

    cluster
        .topic_error(
            &repartition_topic,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
        )
        .expect("topic error");
    let mut nsm = spawn_nsm(dir.path(), "nsm-2", &config);
    wait_for("5 teams", Duration::from_secs(60), Some(&nsm), || {
        (counted(&scrape(port)?) == (5.0, 5.0)).then_some(())
    });
    // Time for any record applied twice to show.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(scrape(port).as_ref().map(counted), Some((5.0, 5.0)));
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}

/// Two producers send each event, one keyed as the web app, one as the server: the copies
/// land on different partitions (`web` and `server` hash to partitions 1 and 0). With
/// `events.dedup_across_partitions` every event counts once, in every kind of metric.
#[test]
fn copies_of_events_on_different_partitions_count_once_when_deduplicated_across_them() {
    let group = "nsm-copies";
    let (_cluster, brokers) = cluster_with_repartition(group, 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = format!(
        "{}{ACTIVE_TEAMS}",
        test_config(&brokers, "events", &dir.path().join("state"), port, group)
            .replace("key_field = \"user_id\"\n", "")
            .replace(
                "[time]\n",
                "[events]\ndedup_across_partitions = true\n[time]\n"
            )
            .replace("[state]\n", "[state]\nchangelog = false\n")
    );
    let now = now_ms();
    let copies: Vec<String> = (0..20)
        .flat_map(|event| {
            ["web", "server"].map(|sent_by| {
                format!(
                    r#"{{"event":"message_sent","event_id":"e{event}","user_id":"u{}","team_id":"t{}","timestamp":{now},"sent_by":"{sent_by}"}}"#,
                    event % 5,
                    event % 3
                )
            })
        })
        .collect();
    let mut nsm = spawn_nsm(dir.path(), "nsm", &config);
    // `nsm check` says where each event's copies meet.
    let checked = nsm_tool(&[
        "check",
        "--config",
        dir.path().join("nsm.toml").to_str().expect("utf8"),
    ]);
    assert!(
        checked.contains("copies of an event may be on different partitions")
            && checked.contains("messages_sent")
            && checked.contains("keyed by "),
        "{checked}"
    );
    produce(
        &brokers,
        "events",
        dir.path(),
        &copies,
        &["--key-field", "sent_by"],
    );
    let counted = |samples: &std::collections::BTreeMap<String, f64>| {
        (
            messages(samples).unwrap_or(-1.0),
            metric_value(samples, "daily_active_messagers", "current").unwrap_or(-1.0),
            metric_value(samples, "active_teams", "current").unwrap_or(-1.0),
        )
    };
    let samples = wait_for(
        "every event counted",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (counted(&samples) == (20.0, 5.0, 3.0)
                && sample(&samples, "nsm_events_duplicate_total") == 20.0)
                .then_some(samples)
        },
    );
    for partition in 0..2 {
        assert_eq!(
            sample(
                &samples,
                &format!("nsm_events_consumed_total{{partition=\"{partition}\",topic=\"events\"}}")
            ),
            20.0,
            "one copy of each event on each partition"
        );
    }
    // Time for a copy counted twice to show.
    std::thread::sleep(Duration::from_secs(3));
    let samples = scrape(port).expect("scrape");
    assert_eq!(counted(&samples), (20.0, 5.0, 3.0));
    assert_eq!(sample(&samples, "nsm_events_duplicate_total"), 20.0);
    // A first start: the repartition partitions start empty, as every input partition does,
    // so they missed nothing and read no history again; their metrics are whole.
    let log = nsm.log_text();
    assert!(
        log.contains("nothing to backfill") && !log.contains("backfill started"),
        "{log}"
    );
    assert_eq!(
        sample(
            &samples,
            "nsm_metric_window_partial{metric=\"active_teams\",window=\"current\"}"
        ),
        0.0
    );
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}

/// A metric counting teams while producers key events by user, added to an nsm with state,
/// is counted through the repartition topic, whose partitions start empty: each backfills it
/// from every input partition's history, so the teams of the history count, once each.
#[test]
fn a_metric_counted_through_the_repartition_topic_is_backfilled_from_every_input_partition() {
    let group = "nsm-backfill-rekeyed";
    let (_cluster, brokers) = cluster_with_repartition(group, 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let before = test_config(&brokers, "events", &dir.path().join("state"), port, group)
        .replace("[state]\n", "[state]\nchangelog = false\n");
    let after = format!("{before}{ACTIVE_TEAMS}");
    let sent = team_message;
    // 40 messages of 20 users in 6 teams, keyed by user: every team on both partitions.
    let history: Vec<String> = (0..40).map(|n| sent(n % 20, n % 6)).collect();
    produce(&brokers, "events", dir.path(), &history, &[]);
    let mut nsm = spawn_nsm(dir.path(), "nsm-1", &before);
    wait_for("40 messages", Duration::from_secs(60), Some(&nsm), || {
        (messages(&scrape(port)?)? == 40.0).then_some(())
    });
    assert!(nsm.terminate(Duration::from_secs(30)).success());

    // Then a new team's messages and an old team's.
    produce(
        &brokers,
        "events",
        dir.path(),
        &[sent(30, 9), sent(31, 9), sent(32, 2)],
        &[],
    );
    let mut nsm = spawn_nsm(dir.path(), "nsm-2", &after);
    let counted = teams_counted;
    let samples = wait_for(
        "the teams of the history counted",
        Duration::from_secs(90),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (counted(&samples) == (7.0, 0.0, 43.0)).then_some(samples)
        },
    );
    let repartition = format!("{group}-repartition");
    for partition in 0..2 {
        assert_eq!(
            sample(
                &samples,
                &format!(
                    "nsm_backfill_progress_ratio{{partition=\"{partition}\",topic=\"{repartition}\"}}"
                )
            ),
            1.0,
            "{}",
            nsm.log_text()
        );
    }
    // Events sent after the swap count once more each, not twice.
    produce(
        &brokers,
        "events",
        dir.path(),
        &[sent(33, 10), sent(34, 9)],
        &[],
    );
    wait_for("a team more", Duration::from_secs(60), Some(&nsm), || {
        (counted(&scrape(port)?) == (8.0, 0.0, 45.0)).then_some(())
    });
    // And a restart on the local state shows the same, with nothing left to backfill.
    assert!(nsm.terminate(Duration::from_secs(30)).success());
    let mut nsm = spawn_nsm(dir.path(), "nsm-3", &after);
    wait_for(
        "the same after a restart",
        Duration::from_secs(60),
        Some(&nsm),
        || (counted(&scrape(port)?) == (8.0, 0.0, 45.0)).then_some(()),
    );
    assert!(
        !nsm.log_text().contains("backfill started"),
        "{}",
        nsm.log_text()
    );
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}

/// The same while events keep coming: each source's target moves with the live partition's
/// marks, the consumer holds for the last stretch, and every team counts once.
#[test]
fn a_rekeyed_backfill_catches_up_with_events_arriving_meanwhile() {
    let group = "nsm-backfill-moving";
    let (_cluster, brokers) = cluster_with_repartition(group, 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let before = test_config(&brokers, "events", &dir.path().join("state"), port, group).replace(
        "[state]\n",
        "[state]\nchangelog = false\nbackfill_rate = 500\n",
    );
    let after = format!("{before}{ACTIVE_TEAMS}");
    let sent = team_message;
    // 3,000 messages of 300 users in 60 teams: 12 s of backfill at 500 a second, for the two
    // repartition partitions reading both input partitions each.
    let history: Vec<String> = (0..3000).map(|n| sent(n % 300, n % 60)).collect();
    produce(&brokers, "events", dir.path(), &history, &[]);
    let mut nsm = spawn_nsm(dir.path(), "nsm-1", &before);
    wait_for(
        "3000 messages",
        Duration::from_secs(120),
        Some(&nsm),
        || (messages(&scrape(port)?)? == 3000.0).then_some(()),
    );
    assert!(nsm.terminate(Duration::from_secs(30)).success());

    let mut nsm = spawn_nsm(dir.path(), "nsm-2", &after);
    // While it backfills: 10 batches of 20 messages, a new team in each, and old teams.
    for batch in 0..10 {
        let messages: Vec<String> = (0..20)
            .map(|n| match n {
                0 => sent(1000 + batch, 60 + batch),
                n => sent(1000 + batch * 20 + n, n % 60),
            })
            .collect();
        produce(&brokers, "events", dir.path(), &messages, &[]);
        std::thread::sleep(Duration::from_millis(700));
    }
    let counted = teams_counted;
    wait_for(
        "every team counted once",
        Duration::from_secs(120),
        Some(&nsm),
        || (counted(&scrape(port)?) == (70.0, 0.0, 3200.0)).then_some(()),
    );
    let log = nsm.log_text();
    assert_eq!(
        log.matches("backfill swapped in").count(),
        2,
        "one swap per repartition partition\n{log}"
    );
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}

/// A log line without its terminal colour codes (`ESC [ ... m`).
fn without_colours(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    plain
}

/// A backfill killed midway goes on from its last checkpoint, not from the start; meanwhile
/// the added metric shows partial and the others keep publishing. `state.backfill_rate` paces
/// it, so there is a midway to kill it in.
#[test]
fn a_backfill_killed_midway_goes_on_from_where_it_was() {
    let group = "nsm-backfill-resume";
    let (_cluster, brokers) = cluster_for(group, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let before = test_config(&brokers, "events", &dir.path().join("state"), port, group);
    let after = format!(
        "{}\n[[inputs]]\nname = \"hourly_messagers\"\nowner = \"growth-team\"\n\
         kind = \"distinct\"\nfield = \"user_id\"\nwhere = {{ event = \"message_sent\" }}\n\
         window = \"1h\"\n",
        before.replace("[state]\n", "[state]\nbackfill_rate = 1000\n")
    );
    // 400 users, 20 messages each: 8,000 messages, 8 s of backfill at 1,000 a second.
    let history: Vec<String> = (0..20).flat_map(|_| sent_now("u", 400, 0)).collect();
    produce(&brokers, "events", dir.path(), &history, &[]);
    let mut nsm = spawn_nsm(dir.path(), "nsm-1", &before);
    wait_for(
        "8000 messages",
        Duration::from_secs(120),
        Some(&nsm),
        || (messages(&scrape(port)?)? == 8000.0).then_some(()),
    );
    assert!(nsm.terminate(Duration::from_secs(30)).success());

    let progress = |samples: &std::collections::BTreeMap<String, f64>| {
        (
            sample(
                samples,
                "nsm_backfill_progress_ratio{partition=\"0\",topic=\"events\"}",
            ),
            sample(
                samples,
                "nsm_metric_window_partial{metric=\"hourly_messagers\",window=\"current\"}",
            ),
            messages(samples).unwrap_or(-1.0),
        )
    };
    let mut nsm = spawn_nsm(dir.path(), "nsm-2", &after);
    // Midway (past its first checkpoint, 2 s in): partial, the other metrics published.
    wait_for(
        "the backfill midway",
        Duration::from_secs(120),
        Some(&nsm),
        || {
            let (ratio, partial, messages) = progress(&scrape(port)?);
            ((0.4..0.9).contains(&ratio) && partial == 1.0 && messages == 8000.0).then_some(())
        },
    );
    nsm.kill_9();

    let mut nsm = spawn_nsm(dir.path(), "nsm-3", &after);
    let samples = wait_for(
        "the backfill resumed and swapped in",
        Duration::from_secs(120),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (progress(&samples) == (1.0, 0.0, 8000.0)).then_some(samples)
        },
    );
    assert_eq!(
        metric_value(&samples, "hourly_messagers", "current"),
        Some(400.0)
    );
    let log = nsm.log_text();
    let resumed_from: i64 = log
        .lines()
        .find(|line| line.contains("backfill started"))
        .map(without_colours)
        .as_deref()
        .and_then(|line| line.split("from=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|from| from.parse().ok())
        .unwrap_or_else(|| panic!("no backfill start in\n{log}"));
    assert!(
        (1_000..8_000).contains(&resumed_from),
        "went on from the last checkpoint, not from the start: {resumed_from}\n{log}"
    );
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}

/// A metric added to the config while nsm already has state is computed from the topic's
/// retained history, while the others keep running, and swapped in: its windows are partial
/// until then, whole after, and it keeps the members it found in the history.
#[test]
fn a_metric_added_is_backfilled_from_the_history_and_swapped_in() {
    let group = "nsm-backfill";
    let (_cluster, brokers) = cluster_for(group, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let before = test_config(&brokers, "events", &dir.path().join("state"), port, group);
    let after = format!(
        "{before}\n[[inputs]]\nname = \"hourly_messagers\"\nowner = \"growth-team\"\n\
         kind = \"distinct\"\nfield = \"user_id\"\nwhere = {{ event = \"message_sent\" }}\n\
         window = \"1h\"\n"
    );
    // 5 users in the previous hour, then 10 users three times in this one.
    let hour_ago = now_ms() - 3_600_000;
    let mut history: Vec<String> = (0..5)
        .map(|user| {
            format!(r#"{{"event":"message_sent","user_id":"p{user}","timestamp":{hour_ago}}}"#)
        })
        .collect();
    history.extend(sent_now("a", 10, 0));
    history.extend(sent_now("a", 10, 0));
    history.extend(sent_now("a", 10, 0));
    produce(&brokers, "events", dir.path(), &history, &[]);
    let mut nsm = spawn_nsm(dir.path(), "nsm-1", &before);
    wait_for("35 messages", Duration::from_secs(60), Some(&nsm), || {
        (messages(&scrape(port)?)? == 35.0).then_some(())
    });
    assert!(nsm.terminate(Duration::from_secs(30)).success());

    produce(&brokers, "events", dir.path(), &sent_now("b", 5, 0), &[]);
    let mut nsm = spawn_nsm(dir.path(), "nsm-2", &after);
    // `nsm backfill` follows it to the end.
    let after_path = dir.path().join("nsm-2.toml");
    let watcher = std::thread::spawn(move || {
        nsm_tool(&[
            "backfill",
            "--config",
            after_path.to_str().expect("utf8"),
            "--timeout",
            "60s",
        ])
    });
    let backfilled = |samples: &std::collections::BTreeMap<String, f64>| {
        (
            sample(
                samples,
                "nsm_backfill_progress_ratio{partition=\"0\",topic=\"events\"}",
            ),
            metric_value(samples, "hourly_messagers", "current").unwrap_or(-1.0),
            sample(
                samples,
                "nsm_metric_window_partial{metric=\"hourly_messagers\",window=\"current\"}",
            ),
            messages(samples).unwrap_or(-1.0),
        )
    };
    let samples = wait_for(
        "the added metric backfilled",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (backfilled(&samples) == (1.0, 15.0, 0.0, 40.0)).then_some(samples)
        },
    );
    // Its past window too: the previous hour's users, read from the history.
    assert_eq!(
        metric_value(&samples, "hourly_messagers", "previous"),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &samples,
            "nsm_metric_window_partial{metric=\"hourly_messagers\",window=\"previous\"}"
        ),
        0.0
    );
    assert!(
        nsm.log_text().contains("backfill swapped in"),
        "{}",
        nsm.log_text()
    );
    let watched = watcher.join().expect("nsm backfill");
    assert!(
        watched.contains("events/0")
            && watched.contains("100%")
            && watched.contains("every backfill is swapped in"),
        "{watched}"
    );
    // The changelog has the swapped state at once: an instance killed right after the swap
    // and its state directory lost restore it from the changelog, whole.
    nsm.kill_9();
    std::fs::remove_dir_all(dir.path().join("state")).expect("remove state");
    std::fs::remove_dir_all(dir.path().join("state-backfill")).expect("remove backfill");
    let mut nsm = spawn_nsm(dir.path(), "nsm-3", &after);
    wait_for(
        "the swapped state restored",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            // No backfill left to run: the progress series is not exported.
            (backfilled(&scrape(port)?) == (-1.0, 15.0, 0.0, 40.0)).then_some(())
        },
    );
    // A user of the history is no new member; a new one is.
    let mut more = sent_now("a", 1, 0);
    more.extend(sent_now("c", 1, 0));
    produce(&brokers, "events", dir.path(), &more, &[]);
    wait_for("42 messages", Duration::from_secs(60), Some(&nsm), || {
        (backfilled(&scrape(port)?) == (-1.0, 16.0, 0.0, 42.0)).then_some(())
    });
    // And a restart on the local state shows the same.
    assert!(nsm.terminate(Duration::from_secs(30)).success());
    let mut nsm = spawn_nsm(dir.path(), "nsm-4", &after);
    wait_for(
        "the values again",
        Duration::from_secs(60),
        Some(&nsm),
        || (backfilled(&scrape(port)?) == (-1.0, 16.0, 0.0, 42.0)).then_some(()),
    );
    assert!(nsm.terminate(Duration::from_secs(30)).success());
}
