//! The real binary with a state directory it cannot use: it must stop with a clear error and
//! never show a number it has not stored. A store from a newer nsm is refused at start; a disk
//! that fills up while nsm runs stops it (not ready, exit status 1), and once there is room
//! again a restart gives exactly the values of an uninterrupted run.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use rdkafka::mocking::MockCluster;

#[test]
fn a_state_directory_from_a_newer_nsm_is_refused_at_start_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let port = free_port();
    let config_path = dir.path().join("nsm.toml");
    // No broker is needed: the state is opened before anything else.
    std::fs::write(
        &config_path,
        test_config("127.0.0.1:1", "events", &state, port, "nsm-format"),
    )
    .expect("config");
    // A store this nsm writes, then marked as written by a future format.
    {
        let families = [
            "meta",
            "partitions",
            "windows",
            "members",
            "seen_ids",
            "segments",
            "funnels",
        ];
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let db = rocksdb::DB::open_cf(&options, &state, families).expect("rocksdb");
        let meta = db.cf_handle("meta").expect("meta");
        db.put_cf(
            meta,
            b"format_version",
            (nsm_state::FORMAT_VERSION + 1).to_be_bytes(),
        )
        .expect("put");
    }
    let output = Command::new(NSM)
        .args(["run", "--config", config_path.to_str().expect("utf8")])
        .output()
        .expect("nsm run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let newer = format!(
        "written by a newer nsm, in state format {}; this nsm reads format {}",
        nsm_state::FORMAT_VERSION + 1,
        nsm_state::FORMAT_VERSION
    );
    for part in [
        newer.as_str(),
        "reset the consumer group's offsets to the earliest",
    ] {
        assert!(stderr.contains(part), "{part:?} not in: {stderr}");
    }
    assert!(
        http_get(port, "/readyz").is_none(),
        "nothing serves after a refusal"
    );
}

#[test]
fn a_full_disk_stops_nsm_and_a_restart_with_room_loses_and_double_counts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let Some(disk) = Tmpfs::mount(&state, "size=2m") else {
        return;
    };
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = "events";
    cluster.create_topic(topic, 1, 1).expect("topic");
    cluster.create_topic("events-dlq", 1, 1).expect("dlq topic");
    // The mock cluster cannot create topics through the admin API.
    cluster
        .create_topic("nsm-full-disk-changelog", 1, 1)
        .expect("changelog topic");
    let brokers = cluster.bootstrap_servers();

    // 40,000 messages of as many users: each user is a member entry of the daily distinct
    // count (its key ends in the user's digest, whatever the id's length), so the 2 MiB disk
    // fills after about a fifth of them.
    let users = 40_000;
    let time = hour_start_ms(1) + 60_000;
    let lines: Vec<String> = (0..users)
        .map(|user| {
            format!(
                r#"{{"event":"message_sent","user_id":"u{user}","timestamp":{}}}"#,
                time + user as i64 / 100
            )
        })
        .collect();
    let produce = |name: &str, lines: &[String]| {
        let file = dir.path().join(name);
        std::fs::write(&file, lines.join("\n")).expect("events");
        nsm_tool(&[
            "produce",
            "--brokers",
            &brokers,
            "--topic",
            topic,
            "--file",
            file.to_str().expect("utf8"),
        ]);
    };
    let port = free_port();
    let config_path = dir.path().join("nsm.toml");
    std::fs::write(
        &config_path,
        test_config(&brokers, topic, &state, port, "nsm-full-disk"),
    )
    .expect("config");
    let run = || {
        Process::spawn(
            "nsm",
            Command::new(NSM).args(["run", "--config", config_path.to_str().expect("utf8")]),
            dir.path(),
        )
    };

    // The first 8,000 fit, and are stored and shown; the rest fill the disk.
    let stored_first = 8_000;
    produce("first.jsonl", &lines[..stored_first]);
    let mut nsm = run();
    wait_for(
        "the first messages stored and shown",
        Duration::from_secs(60),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (metric_value(&samples, "messages_sent", "current")? == stored_first as f64)
                .then_some(())
        },
    );
    produce("rest.jsonl", &lines[stored_first..]);
    // The mock cluster keeps 5 MiB per partition, like a retention: all of them are there.
    let topic_now = nsm_tool(&[
        "read",
        "--brokers",
        &brokers,
        "--topic",
        topic,
        "--quiet",
        "2s",
    ]);
    assert_eq!(topic_now.lines().count(), users);

    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = nsm.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "nsm did not stop on the full disk:\n{}",
            nsm.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = nsm.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    for part in [
        "cannot write state; stopping so nothing is shown that is not stored",
        "No space left on device",
    ] {
        assert!(log.contains(part), "{part:?} not in:\n{log}");
    }

    // Room again: the restart resumes from the last complete write (at least the first 8
    // messages) and counts each event once. The changelog may be ahead of the failed local
    // write (it is written first): the restart then restores the rest from it and has
    // nothing left to consume.
    disk.remount("size=64m");
    let mut nsm = run();
    let samples = wait_for(
        "every message counted after the restart",
        Duration::from_secs(120),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (metric_value(&samples, "messages_sent", "current")? >= users as f64).then_some(samples)
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let samples = scrape(port).unwrap_or(samples);
    assert_eq!(
        metric_value(&samples, "messages_sent", "current"),
        Some(users as f64)
    );
    assert_eq!(
        metric_value(&samples, "daily_active_messagers", "current"),
        Some(users as f64)
    );
    assert_eq!(
        http_get(port, "/readyz").map(|(status, _)| status),
        Some(200)
    );
    let status = nsm.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", nsm.log_text());
}
