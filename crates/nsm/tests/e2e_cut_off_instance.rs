//! One instance cut off from Kafka while events flow (tansu, installed by `make test`): two
//! instances share a topic's partitions, and a relay in front of tansu black-holes every
//! connection of instance a, as a network partition between a and the brokers would. a gives
//! its partitions up (it cannot store them: its changelog write gives up within half its
//! session, and a failed write stops nsm) before the group can hand them to another instance,
//! so the values summed over the instances never count a partition twice. When the network
//! heals, the changelog records a was sending land after those of the partitions' new owner;
//! a restore from the changelog leaves them out by their epoch and is exact.
//!
//! tansu 0.6 does not rebalance when it expires a member's session, only when a member joins
//! or leaves (see `e2e_scale_out.rs`): instance c joins once a's session has expired, and the
//! rebalance gives a's partitions to the live instances. The fresh instance that restores
//! every partition at the end joins a group of its own, reading the same changelog: once a, b
//! and c had left, tansu 0.6 did not give the group's partitions to a new member again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const TOPIC: &str = "product-events";
const GROUP: &str = "nsm-cut-off";
/// The changelog of `GROUP` (its default name).
const CHANGELOG: &str = "nsm-cut-off-changelog";
/// `session.timeout.ms` of `test_config`.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

struct Instance {
    name: &'static str,
    process: Process,
    port: u16,
}

fn start_instance(dir: &Path, brokers: &str, name: &'static str) -> Instance {
    start_instance_with(dir, brokers, name, GROUP, |config| config)
}

/// An instance of `group` whose test config `change` adjusts.
fn start_instance_with(
    dir: &Path,
    brokers: &str,
    name: &'static str,
    group: &str,
    change: impl Fn(String) -> String,
) -> Instance {
    let port = free_port();
    let config_path = dir.join(format!("{name}.toml"));
    let config = test_config(
        brokers,
        TOPIC,
        &dir.join(format!("state-{name}")),
        port,
        group,
    );
    std::fs::write(&config_path, change(config)).expect("config");
    let process = Process::spawn(
        name,
        Command::new(NSM).args(["run", "--config", config_path.to_str().expect("utf8")]),
        dir,
    );
    Instance {
        name,
        process,
        port,
    }
}

/// The partitions an instance's /metrics shows (none when it does not answer).
fn exported_partitions(samples: Option<&BTreeMap<String, f64>>) -> BTreeSet<String> {
    samples
        .into_iter()
        .flat_map(|samples| samples.keys())
        .filter(|series| series.starts_with("nsm_events_consumed_total{"))
        .filter_map(|series| {
            let (_, rest) = series.split_once("partition=\"")?;
            Some(rest.split_once('"')?.0.to_string())
        })
        .collect()
}

/// Messages counted, in whichever hour window: until the current hour's events come, the
/// previous hour's are the instances' current window.
fn messages(values: &BTreeMap<&'static str, f64>) -> f64 {
    values["messages this hour"] + values["messages previous hour"]
}

/// The stream's values as the instances show them, summed; an instance that does not
/// answer counts nothing.
fn summed(samples: &[Option<BTreeMap<String, f64>>]) -> BTreeMap<&'static str, f64> {
    let mut values = BTreeMap::new();
    for (name, metric, window) in [
        ("messages this hour", "messages_sent", "current"),
        ("messages previous hour", "messages_sent", "previous"),
        ("north star", "daily_active_messagers", "current"),
        ("complaints", "complaints", "current"),
        ("revenue", "revenue", "current"),
    ] {
        let total = samples
            .iter()
            .flatten()
            .filter_map(|samples| metric_value(samples, metric, window))
            .sum();
        values.insert(name, total);
    }
    values
}

fn all_logs(instances: &[&Instance]) -> String {
    instances
        .iter()
        .map(|instance| format!("--- {}:\n{}", instance.name, instance.process.log_text()))
        .collect()
}

/// Feeds lines to a producer's standard input, `chunk` lines every `pause`, counting the
/// messages (`message_sent` lines) fed in `fed`.
fn feed(
    stdin: &mut std::process::ChildStdin,
    lines: &[String],
    chunk: usize,
    pause: Duration,
    fed: &AtomicUsize,
) {
    for lines in lines.chunks(chunk) {
        for line in lines {
            writeln!(stdin, "{line}").expect("feed the producer");
        }
        stdin.flush().expect("flush");
        let messages = lines
            .iter()
            .filter(|line| line.contains("\"message_sent\""))
            .count();
        fed.fetch_add(messages, Ordering::SeqCst);
        std::thread::sleep(pause);
    }
}

#[test]
fn an_instance_cut_off_while_events_flow_never_double_counts_and_its_late_writes_are_fenced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, relay, brokers) = start_tansu_behind_relay(dir.path());
    let stream = known_stream(1_200, 4);
    let users = stream.messagers;
    nsm_tool(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        TOPIC,
        "--partitions",
        "4",
        "--file",
        "/dev/null",
    ]);
    // a stores its checkpoints every 2 s: the cut finds it with changes not stored yet, whose
    // write is then sent while it is cut off (its records held by the relay, delivered late).
    let mut a = start_instance_with(dir.path(), &brokers, "a", GROUP, |config| {
        config.replace("flush_interval = \"100ms\"", "flush_interval = \"2s\"")
    });
    let b = start_instance(dir.path(), &brokers, "b");
    wait_for(
        "a and b to share the four partitions",
        Duration::from_secs(90),
        Some(&b.process),
        || {
            let owned: Vec<BTreeSet<String>> = [&a, &b]
                .iter()
                .map(|instance| exported_partitions(scrape(instance.port).as_ref()))
                .collect();
            (owned[0].len() + owned[1].len() == 4 && owned.iter().all(|set| !set.is_empty()))
                .then_some(())
        },
    );

    // The stream goes through one producer, one message per record batch (tansu 0.6 skips the
    // rest of a batch fetched from an offset inside it, see e2e_tansu.rs). The previous hour's
    // messages come first: half of them before the cut, the rest while it happens.
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
    let fed = Arc::new(AtomicUsize::new(0));
    feed(
        &mut stdin,
        &stream.lines[..users / 2],
        300,
        Duration::ZERO,
        &fed,
    );
    wait_for(
        "the first half of the previous hour counted",
        Duration::from_secs(120),
        Some(&a.process),
        || {
            let samples = [scrape(a.port), scrape(b.port)];
            (messages(&summed(&samples)) >= (users / 2) as f64).then_some(())
        },
    );
    let during = stream.lines[users / 2..users].to_vec();
    let feeding = {
        let fed = fed.clone();
        std::thread::spawn(move || {
            feed(&mut stdin, &during, 20, Duration::from_millis(100), &fed);
            stdin
        })
    };
    wait_for("events flowing", Duration::from_secs(30), None, || {
        (fed.load(Ordering::SeqCst) >= users / 2 + 150).then_some(())
    });

    // a is cut off from the brokers while events flow.
    let a_pid = a.process.child.id();
    let connections = relay.black_hole(a_pid);
    let cut = Instant::now();
    eprintln!("instance a (pid {a_pid}) black-holed: {connections} connections");
    assert!(connections > 0, "a's connections go through the relay");

    // Until the group has given a's partitions to the others and they show them: a stops
    // showing its partitions before any other instance shows one of them, and the values
    // summed over the instances never exceed the messages produced.
    let a_partitions = exported_partitions(scrape(a.port).as_ref());
    let mut a_stopped: Option<Duration> = None;
    let mut taken_over: Option<Duration> = None;
    let mut max_summed = 0.0_f64;
    let mut c: Option<Instance> = None;
    let mut samples_taken = 0;
    loop {
        assert!(
            cut.elapsed() < Duration::from_secs(120),
            "a's partitions were not taken over:\n{}",
            all_logs(&[&a, &b])
        );
        // The others first: a partition they show while a still shows it is shown twice.
        let others: Vec<&Instance> = std::iter::once(&b).chain(c.as_ref()).collect();
        let others_samples: Vec<Option<BTreeMap<String, f64>>> = others
            .iter()
            .map(|instance| scrape(instance.port))
            .collect();
        let a_samples = scrape(a.port);
        let fed_now = fed.load(Ordering::SeqCst) as f64;
        samples_taken += 1;
        let mut all_samples = others_samples.clone();
        all_samples.push(a_samples.clone());
        let counted = messages(&summed(&all_samples));
        max_summed = max_summed.max(counted);
        assert!(
            counted <= fed_now,
            "{counted} messages summed over the instances, {fed_now} produced:\n{}",
            all_logs(&[&a, &b])
        );
        let shown_by_a = exported_partitions(a_samples.as_ref());
        let shown_by_others: BTreeSet<String> = others_samples
            .iter()
            .flat_map(|samples| exported_partitions(samples.as_ref()))
            .collect();
        let twice: Vec<&String> = shown_by_a.intersection(&shown_by_others).collect();
        assert!(
            twice.is_empty(),
            "partitions {twice:?} shown by a and another instance at once:\n{}",
            all_logs(&[&a, &b])
        );
        if a_stopped.is_none() && shown_by_a.is_empty() {
            a_stopped = Some(cut.elapsed());
            eprintln!(
                "a stopped showing its partitions {:?} after the cut",
                cut.elapsed()
            );
        }
        if taken_over.is_none() && a_partitions.is_subset(&shown_by_others) {
            taken_over = Some(cut.elapsed());
            eprintln!(
                "a's partitions shown by others {:?} after the cut",
                cut.elapsed()
            );
            break;
        }
        // tansu rebalances when a member joins: c joins once a's session has expired.
        if c.is_none() && cut.elapsed() > SESSION_TIMEOUT + Duration::from_secs(1) {
            c = Some(start_instance(dir.path(), &brokers, "c"));
            eprintln!("instance c started");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = c.expect("c started");
    let a_stopped = a_stopped.expect("a stopped showing its partitions");
    eprintln!(
        "a stopped after {a_stopped:?} (session timeout {SESSION_TIMEOUT:?}), taken over after {taken_over:?}; \
         {samples_taken} samples, at most {max_summed} messages summed, {} produced by then",
        fed.load(Ordering::SeqCst)
    );
    // Within its session as librdkafka times it (a poll and a sample later at most).
    assert!(
        a_stopped < SESSION_TIMEOUT + Duration::from_secs(1),
        "a gives up within its session"
    );

    // The previous hour is counted whole by b and c before the network heals.
    let mut stdin = feeding.join().expect("feeder");
    let previous_hour = stream.messages_previous_hour as f64;
    wait_for(
        "b and c to count the previous hour",
        Duration::from_secs(120),
        Some(&c.process),
        || {
            let samples = [scrape(b.port), scrape(c.port)];
            (messages(&summed(&samples)) >= previous_hour).then_some(())
        },
    );
    let a_status = a.process.child.try_wait().expect("wait");
    eprintln!("a's exit status before the network heals: {a_status:?}");
    if let Some(status) = a_status {
        assert_eq!(status.code(), Some(1), "a stops on its failed write");
    }

    // The network heals: what a sent meanwhile lands now, after b's and c's writes; the rest
    // of the stream follows.
    let late = relay.restore();
    eprintln!("network healed: {late} produce requests of a delivered late");
    let rest = stream.lines[users..].to_vec();
    let rest_fed = fed.clone();
    let feeding = std::thread::spawn(move || {
        feed(
            &mut stdin,
            &rest,
            300,
            Duration::from_millis(300),
            &rest_fed,
        );
    });
    feeding.join().expect("feeder");
    let status = producer.child.wait().expect("producer");
    assert!(status.success(), "producer:\n{}", producer.log_text());

    let expected = BTreeMap::from([
        ("messages this hour", stream.messages_current_hour as f64),
        ("messages previous hour", previous_hour),
        ("north star", stream.messagers as f64),
        ("complaints", stream.complaints as f64),
        ("revenue", stream.revenue),
    ]);
    // a is back in the group if it did not stop: it counts with the others.
    let mut live: Vec<&Instance> = vec![&b, &c];
    if a.process.child.try_wait().expect("wait").is_none() {
        live.push(&a);
    }
    let exact = |values: &BTreeMap<&'static str, f64>| {
        values
            .iter()
            .all(|(name, value)| (value - expected[name]).abs() < 1e-6)
    };
    let mut last = String::new();
    wait_for(
        "the summed values to reach the stream's",
        Duration::from_secs(180),
        Some(&c.process),
        || {
            let samples: Vec<_> = live.iter().map(|instance| scrape(instance.port)).collect();
            let values = summed(&samples);
            for (name, value) in &values {
                assert!(
                    *value <= expected[name] + 1e-6,
                    "{name}: {value} summed, more than the stream's {}:\n{}",
                    expected[name],
                    all_logs(&live)
                );
            }
            let progress = format!("{values:?}");
            if progress != last {
                eprintln!("progress: {progress}");
                last = progress;
            }
            exact(&values).then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let samples: Vec<_> = live.iter().map(|instance| scrape(instance.port)).collect();
    assert_eq!(summed(&samples), expected, "{}", all_logs(&live));

    // A new instance alone restores every partition from the changelog, a's late records in
    // it, and shows the stream's values exactly.
    let mut b = b;
    let mut c = c;
    for instance in [&mut b, &mut c] {
        let status = instance.process.terminate(Duration::from_secs(60));
        assert!(
            status.success(),
            "{}:\n{}",
            instance.name,
            instance.process.log_text()
        );
    }
    if a.process.child.try_wait().expect("wait").is_none() {
        let status = a.process.terminate(Duration::from_secs(60));
        assert!(status.success(), "a:\n{}", a.process.log_text());
    }
    let d = start_instance_with(dir.path(), &brokers, "d", "nsm-cut-off-restore", |config| {
        config.replace(
            "[state]\n",
            &format!("[state]\nchangelog_topic = \"{CHANGELOG}\"\n"),
        )
    });
    let mut last = String::new();
    wait_for(
        "d to restore the stream's values from the changelog",
        Duration::from_secs(180),
        Some(&d.process),
        || {
            let samples = [scrape(d.port)];
            let owned = samples[0]
                .as_ref()
                .and_then(|samples| samples.get("nsm_partitions_owned").copied());
            let values = summed(&samples);
            let progress = format!("d: owned {owned:?} {values:?}");
            if progress != last {
                eprintln!("{progress}");
                last = progress;
            }
            (owned == Some(4.0) && exact(&values)).then_some(())
        },
    );
    let samples = scrape(d.port).expect("d answers");
    assert_eq!(
        summed(&[Some(samples.clone())]),
        expected,
        "{}",
        d.process.log_text()
    );
    assert!(
        samples
            .get("nsm_state_restored_records_total")
            .is_some_and(|records| *records > 0.0),
        "d restored from the changelog"
    );
    let fenced = d
        .process
        .log_text()
        .contains("left out changelog records of an owner that had lost the partition");
    eprintln!("d's restore left a's late records out: {fenced}");
    if late > 0 {
        assert!(
            fenced,
            "a's late records reached the changelog:\n{}",
            d.process.log_text()
        );
    }
}
