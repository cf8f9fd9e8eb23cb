//! The broker goes away and comes back: a relay in front of tansu cuts it off (open
//! connections closed, new ones accepted but never answered) while tansu keeps its in-memory
//! log. nsm keeps serving /metrics meanwhile, gives its partitions up when its group
//! session expires (so `sum()` never counts them twice), then rejoins, takes them back from its
//! own state, and counts the rest of the stream exactly.
//!
//! Why a relay rather than freezing tansu with SIGSTOP: the kernel keeps accepting the
//! requests of a frozen process, so at the thaw tansu 0.6 reads heartbeats sent before the
//! session expired. It then drops the expired member but keeps it as the group's leader, and
//! from then on no consumer can join the group (every SyncGroup is told a rebalance is in
//! progress). A partitioned network loses those requests instead, as it does in production.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const TOPIC: &str = "product-events";

fn produce(brokers: &str, file: &std::path::Path) {
    nsm_tool(&[
        "produce",
        "--brokers",
        brokers,
        "--topic",
        TOPIC,
        "--key-field",
        "user_id",
        // One message per record batch: tansu 0.6 skips the rest of a batch fetched from an
        // offset inside it (see e2e_tansu.rs).
        "--property",
        "batch.num.messages=1",
        "--file",
        file.to_str().expect("utf8"),
    ]);
}

#[test]
fn a_broker_outage_keeps_metrics_served_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, relay, brokers) = start_tansu_behind_relay(dir.path());
    let stream = known_stream(400, 5);
    // The stream's messages (its first lines): half before the outage, the rest after it.
    let total = stream.messages_current_hour + stream.messages_previous_hour;
    let valid: Vec<&String> = stream.lines[..total].iter().collect();
    let (first, rest) = valid.split_at(total / 2);
    let first_file = dir.path().join("first.jsonl");
    let rest_file = dir.path().join("rest.jsonl");
    let join = |lines: &[&String]| {
        lines
            .iter()
            .map(|line| line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    std::fs::write(&first_file, join(first)).expect("write");
    std::fs::write(&rest_file, join(rest)).expect("write");
    nsm_tool(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        TOPIC,
        "--partitions",
        "2",
        "--file",
        "/dev/null",
    ]);

    let port = free_port();
    let config_path = dir.path().join("nsm.toml");
    std::fs::write(
        &config_path,
        test_config(
            &brokers,
            TOPIC,
            &dir.path().join("state"),
            port,
            "nsm-outage",
        ),
    )
    .expect("config");
    let nsm = Process::spawn(
        "nsm",
        Command::new(NSM).args(["run", "--config", config_path.to_str().expect("utf8")]),
        dir.path(),
    );
    produce(&brokers, &first_file);
    let total = total as f64;
    let counted = |samples: &std::collections::BTreeMap<String, f64>| {
        Some(
            metric_value(samples, "messages_sent", "current")?
                + metric_value(samples, "messages_sent", "previous")?,
        )
    };
    let before = wait_for(
        "the first half counted",
        Duration::from_secs(120),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            let counted = counted(&samples)?;
            (counted >= first.len() as f64).then_some(counted)
        },
    );
    assert_eq!(before, first.len() as f64);

    relay.cut();
    eprintln!("broker cut off");
    // Longer than the test's 6 s session timeout: the consumer's session with the group
    // coordinator expires and nsm gives its partitions up (it cannot know whether another
    // instance took them), so their values leave /metrics rather than risk being counted
    // twice. /metrics keeps answering all along, and never shows a wrong value.
    let cut_off = std::time::Instant::now();
    let mut owned_during_outage = Vec::new();
    while cut_off.elapsed() < Duration::from_secs(20) {
        let samples = scrape(port).expect("/metrics answers while the broker is away");
        let owned = samples.get("nsm_partitions_owned").copied();
        let value = counted(&samples);
        assert!(
            (owned == Some(2.0) && value == Some(before))
                || (owned == Some(0.0) && value == Some(0.0)),
            "owned {owned:?}, counted {value:?}:\n{}",
            nsm.log_text()
        );
        owned_during_outage.push(owned);
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(
        owned_during_outage.last(),
        Some(&Some(0.0)),
        "the partitions are given up once the session expired"
    );
    relay.restore();
    eprintln!("broker reachable again");

    produce(&brokers, &rest_file);
    let samples = wait_for(
        "the whole stream counted after the outage",
        Duration::from_secs(120),
        Some(&nsm),
        || {
            let samples = scrape(port)?;
            (counted(&samples)? >= total).then_some(samples)
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let samples = scrape(port).unwrap_or(samples);
    assert_eq!(counted(&samples), Some(total), "{}", nsm.log_text());
    assert_eq!(
        metric_value(&samples, "daily_active_messagers", "current"),
        Some(stream.messagers as f64)
    );
    assert_eq!(
        http_get(port, "/readyz").map(|(status, _)| status),
        Some(200),
        "ready again"
    );
}
