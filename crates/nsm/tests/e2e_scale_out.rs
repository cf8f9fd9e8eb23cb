//! Scale-out on a real Kafka-protocol broker (tansu, installed by `make test`): three nsm
//! instances in one consumer group share a topic's partitions while the stream is produced.
//! One is killed with SIGKILL, one is added, one is stopped gracefully; the partitions move
//! with their state (restored from the changelog topic), and the values summed across the
//! instances left must equal the stream's exactly.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const TOPIC: &str = "product-events";
const GROUP: &str = "nsm-scale-out";
/// `session.timeout.ms` of `test_config`.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

struct Instance {
    process: Process,
    port: u16,
}

fn start_instance(dir: &Path, brokers: &str, name: &str) -> Instance {
    let port = free_port();
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config_path,
        test_config(
            brokers,
            TOPIC,
            &dir.join(format!("state-{name}")),
            port,
            GROUP,
        ),
    )
    .expect("config");
    let process = Process::spawn(
        name,
        Command::new(NSM).args(["run", "--config", config_path.to_str().expect("utf8")]),
        dir,
    );
    Instance { process, port }
}

/// One series summed over instances; `None` unless every instance answered and has it.
fn summed(instances: &[&Instance], metric: &str, window: &str) -> Option<f64> {
    let mut total = 0.0;
    for instance in instances {
        let samples = scrape(instance.port)?;
        total += metric_value(&samples, metric, window).unwrap_or(0.0);
    }
    Some(total)
}

fn owned_partitions(instance: &Instance) -> Option<f64> {
    scrape(instance.port)?.get("nsm_partitions_owned").copied()
}

fn all_consumed(instances: &[&Instance]) -> f64 {
    instances
        .iter()
        .filter_map(|instance| scrape(instance.port))
        .map(|samples| consumed_total(&samples))
        .sum()
}

fn values(instances: &[&Instance]) -> Option<BTreeMap<&'static str, f64>> {
    let mut values = BTreeMap::new();
    for (name, metric, window) in [
        ("messages this hour", "messages_sent", "current"),
        ("messages previous hour", "messages_sent", "previous"),
        ("north star", "daily_active_messagers", "current"),
        ("complaints", "complaints", "current"),
        ("revenue", "revenue", "current"),
    ] {
        values.insert(name, summed(instances, metric, window)?);
    }
    Some(values)
}

#[test]
fn instances_joining_crashing_and_leaving_keep_the_summed_values_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, brokers) = start_tansu(dir.path());
    let stream = known_stream(1_200, 20);
    nsm_tool(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        TOPIC,
        "--partitions",
        "6",
        "--file",
        "/dev/null",
    ]);

    let mut a = start_instance(dir.path(), &brokers, "a");
    let mut b = start_instance(dir.path(), &brokers, "b");
    let c = start_instance(dir.path(), &brokers, "c");
    wait_for(
        "the three instances to share the six partitions",
        Duration::from_secs(90),
        Some(&c.process),
        || {
            let owned: Vec<f64> = [&a, &b, &c]
                .iter()
                .map(|instance| owned_partitions(instance))
                .collect::<Option<_>>()?;
            (owned.iter().sum::<f64>() == 6.0 && owned.iter().all(|n| *n >= 1.0)).then_some(())
        },
    );

    // The stream is fed to the producer over about 40 s, so that the instances come and go
    // while it flows.
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
                // One message per record batch: tansu 0.6 skips the rest of a batch fetched
                // from an offset inside it (see e2e_tansu.rs).
                "--property",
                "batch.num.messages=1",
            ])
            .stdin(Stdio::piped()),
        dir.path(),
    );
    let mut stdin = producer.child.stdin.take().expect("producer stdin");
    let lines = stream.lines.clone();
    let feeder = std::thread::spawn(move || {
        for chunk in lines.chunks(300) {
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
        || (all_consumed(&[&a, &b, &c]) >= total * 0.2).then_some(()),
    );
    a.process.kill_9();
    eprintln!("instance a killed with SIGKILL");
    // tansu 0.6 does not rebalance when it expires a dead member's session, only when a
    // member joins or leaves (Kafka does both): d joins once a's session has expired, and the
    // rebalance gives a's partitions to the live members, restored from the changelog.
    std::thread::sleep(SESSION_TIMEOUT + Duration::from_secs(1));
    let d = start_instance(dir.path(), &brokers, "d");
    eprintln!("instance d started");
    wait_for(
        "b, c and d to share the six partitions",
        Duration::from_secs(90),
        Some(&d.process),
        || {
            let owned = [&b, &c, &d]
                .iter()
                .map(|instance| owned_partitions(instance))
                .collect::<Option<Vec<f64>>>()?;
            (owned.iter().sum::<f64>() == 6.0 && owned[2] >= 1.0).then_some(())
        },
    );
    wait_for(
        "more of the stream consumed",
        Duration::from_secs(180),
        Some(&d.process),
        || (all_consumed(&[&b, &c, &d]) >= total * 0.3).then_some(()),
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
        ("messages this hour", stream.messages_current_hour as f64),
        (
            "messages previous hour",
            stream.messages_previous_hour as f64,
        ),
        ("north star", stream.messagers as f64),
        ("complaints", stream.complaints as f64),
        ("revenue", stream.revenue),
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
            (owned == 6.0
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
    // The take-overs restored state from the changelog rather than starting empty.
    let restored: f64 = live
        .iter()
        .filter_map(|instance| scrape(instance.port))
        .filter_map(|samples| samples.get("nsm_state_restored_records_total").copied())
        .sum();
    assert!(restored > 0.0, "no changelog record was restored");
}
