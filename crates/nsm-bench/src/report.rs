//! `nsm-bench report`: writes BENCHMARKS.md from the JSON lines the other measurements printed
//! in one `make bench` run, with the machine, the date and the command.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

#[derive(Args)]
pub struct ReportArgs {
    /// JSON lines of `nsm-bench core` and `nsm-bench memory` runs.
    #[arg(long)]
    results: PathBuf,
    /// The command that produced them, quoted in the report.
    #[arg(long, default_value = "make bench")]
    command: String,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

/// The brief's targets this report checks.
const CORE_TARGET_EVENTS_PER_SECOND: f64 = 1_000_000.0;
const CORE_TARGET_RATIO: f64 = 0.5;
const MEMORY_TARGET_MIB: f64 = 512.0;
const MEMORY_TARGET_USERS: f64 = 5_000_000.0;
const E2E_TARGET_RATIO: f64 = 0.95;
const E2E_TARGET_CPU_RATIO: f64 = 2.0;
const FRESHNESS_TARGET_P99_MS: f64 = 1_000.0;
const RESTART_TARGET_SECONDS: f64 = 5.0;

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.results)
        .with_context(|| format!("cannot read {}", args.results.display()))?;
    let results: Vec<Value> = text
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a result line is not JSON")?;
    let find = |bench: &'static str| results.iter().filter(move |r| r["bench"] == bench);

    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str(&format!(
        "Measured by `{}` on {}, {} ({}), with nsm {} built in release mode. The core path \
         alternates its two sides in one process, so machine noise hits both, and shows the \
         median of the rounds with every round beside it; the end-to-end figures come from \
         one run against one broker, the ceiling first.\n\n",
        args.command,
        today(),
        machine(),
        kernel(),
        env!("CARGO_PKG_VERSION")
    ));

    out.push_str("## Core path, in process\n\n");
    out.push_str(
        "Decoding, the 8 metrics of the bench config (3 exact distinct counts, a 7-day trailing \
         distinct count, a segment breakdown, a threshold) and a RocksDB write every 50,000 \
         events, or at 100,000 entries written if sooner (`state.flush_max_entries`, as `nsm \
         run`), against serde_json's typed, borrowed parsing of the same fields of the same \
         bytes (the parse-only baseline). One thread applies events; RocksDB's background \
         threads count in the CPU figure.\n\n",
    );
    out.push_str("| events | bytes/event | parse-only events/s | nsm events/s | nsm / parse-only | nsm events per CPU-second | target |\n|---|---|---|---|---|---|---|\n");
    for core in find("core") {
        let rate = number(core, "nsm_events_per_second");
        let ratio = number(core, "nsm_to_parse_only");
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.0} | ≥ 1,000,000/s: {}; ≥ 0.5 of parse-only: {} |\n",
            core["events"],
            core["mean_event_bytes"],
            number(core, "parse_only_events_per_second"),
            rate,
            ratio,
            number(core, "nsm_events_per_cpu_second"),
            verdict(rate >= CORE_TARGET_EVENTS_PER_SECOND),
            verdict(ratio >= CORE_TARGET_RATIO),
        ));
        out.push_str(&format!(
            "\nRounds, events/s: parse-only {}; nsm {}.\n\n",
            core["parse_only_runs"], core["nsm_runs"]
        ));
        if let (Some(written), Some(read)) = (
            core["entries_written_per_event"].as_f64(),
            core["entries_read_per_event"].as_f64(),
        ) {
            out.push_str(&format!(
                "Per event, nsm wrote {written:.2} per-entity entries (members, threshold \
                 progress, trailing occurrences, event ids) and read {read:.2} stored ones back \
                 from RocksDB; its memory answered the other lookups. These entries, not the \
                 parsing, are what the core path spends its time on.\n\n"
            ));
        }
        let split = &core["microseconds_per_event"];
        let field = |name: &str| split[name].as_f64();
        if let (Some(parse), Some(applying), Some(reading), Some(taking), Some(checkpointing)) = (
            field("parse_only"),
            field("applying"),
            field("of_it_reading_rocksdb"),
            field("taking_changes"),
            field("checkpointing"),
        ) {
            let (preparing, snapshotting, committing) = (
                field("of_it_preparing").unwrap_or(f64::NAN),
                field("of_it_snapshotting").unwrap_or(f64::NAN),
                field("of_it_committing").unwrap_or(f64::NAN),
            );
            out.push_str(&format!(
                "Where an event's time went, in microseconds (wall clock, every round): \
                 applying it {applying:.2}, of which reading entries back from RocksDB \
                 {reading:.2}; taking the engine's changes at checkpoints {taking:.2}; the \
                 checkpoints as `nsm run` writes them, the broker aside, {checkpointing:.2}: \
                 preparing the RocksDB batch and the frames' rows {preparing:.2}, reading the \
                 shard snapshots due {snapshotting:.2}, encoding the frames and storing the \
                 batch {committing:.2}. Parsing alone, the baseline, took {parse:.2}.\n\n"
            ));
        }
    }

    out.push_str("## Memory\n\n");
    out.push_str(
        "Every user sends two messages over the 7 days before the bench clock, through the \
         engine and the real RocksDB store, checkpointing every 50,000 events or at 100,000 \
         entries written if sooner, with the core \
         path's config (`core`), or with it plus a metric of every kind it lacks \
         (`every-kind`: retentions of the weekly and of the 7-day trailing distinct counts, a \
         7-day trailing threshold of teams, a conversion); the 7-day \
         trailing distinct count is checked exact against the users sent. `memory` keeps the \
         members in a map instead of RocksDB: the baseline that grows with the users. Then an \
         event seven weeks later expires every window of the week: the write that deletes \
         them is prepared with its changelog records, which are read as `nsm run` reads them \
         to send them (a tombstone per stored entry), and the store is checked empty but for \
         that event's entries. Peak resident memory is the process' `VmHWM`, reset before \
         the expiry (`/proc/self/clear_refs`); the target holds for the larger of the \
         two.\n\n",
    );
    out.push_str("| members kept in | metrics | distinct users | events | peak RSS (MiB) | events/s | expiry: changelog records | expiry: peak RSS (MiB) | expiry: seconds | target |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for memory in find("memory") {
        let peak = number(memory, "peak_rss_mib").max(number(memory, "expiry_peak_rss_mib"));
        let target = if memory["store"] != "rocksdb" {
            "baseline".to_string()
        } else if number(memory, "users") >= MEMORY_TARGET_USERS {
            format!(
                "< 512 MiB at 5M users: {}",
                verdict(peak < MEMORY_TARGET_MIB)
            )
        } else {
            "the target is at 5M users: not measured at this size".to_string()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.1} | {} |\n",
            memory["store"].as_str().unwrap_or("?"),
            memory["metrics"].as_str().unwrap_or("core"),
            memory["users"],
            memory["events"],
            number(memory, "peak_rss_mib"),
            number(memory, "events_per_second"),
            memory["expiry_records"],
            number(memory, "expiry_peak_rss_mib"),
            number(memory, "expiry_seconds"),
            target
        ));
    }
    let e2e: Vec<&Value> = find("e2e").collect();
    if let Some(main) = e2e.first() {
        end_to_end(&mut out, main);
    }
    // After the main run, one with and one without the repartition topic, side by side.
    let with = |on: bool| {
        e2e.iter()
            .skip(1)
            .find(|run| run["repartition"].as_bool() == Some(on))
    };
    if let (Some(on), Some(off)) = (with(true), with(false)) {
        repartition_cost(&mut out, on, off);
    }
    // The alerting section is measured by `make alert-report`, not here: kept as it was.
    if let Some(section) = crate::alerts::kept_section(&args.output) {
        out.push('\n');
        out.push_str(&section);
        out.push('\n');
    }
    std::fs::write(&args.output, out)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("wrote {}", args.output.display());
    Ok(())
}

fn number(value: &Value, key: &str) -> f64 {
    value[key].as_f64().unwrap_or(f64::NAN)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**not met**"
    }
}

/// The sections of one `nsm-bench e2e` run: throughput and CPU against the bare consumer,
/// the restart, the freshness.
fn end_to_end(out: &mut String, e2e: &Value) {
    out.push_str("\n## End to end on a real broker\n\n");
    out.push_str(&format!(
        "{} events of {} bytes on average from {} users, keyed by user over {} partitions, \
         produced to tansu (in memory) beforehand. The ceiling is a bare librdkafka consumer \
         with nsm's consumer settings that does nothing with the messages (both sides fetch \
         with `fetch.wait.max.ms` = 100: tansu answers a waiting fetch only when its wait \
         ends); then `nsm run` \
         reads the same topic with the bench config, the changelog on, as deployed. Each side \
         is timed from its first message to its last, with its own process' CPU over that \
         span; tansu runs on the same 2 cores.\n\n",
        e2e["events"], e2e["mean_event_bytes"], e2e["users"], e2e["partitions"]
    ));
    let ratio = number(e2e, "nsm_to_bare");
    let cpu_ratio = number(e2e, "nsm_cpu_to_bare");
    out.push_str("| bare consumer events/s | nsm events/s | nsm / bare | bare CPU-s per million | nsm CPU-s per million | nsm CPU / bare | target |\n|---|---|---|---|---|---|---|\n");
    out.push_str(&format!(
        "| {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | ≥ 0.95 of the bare consumer: {}; ≤ 2× its CPU: {} |\n",
        number(e2e, "bare_events_per_second"),
        number(e2e, "nsm_events_per_second"),
        ratio,
        number(e2e, "bare_cpu_seconds_per_million"),
        number(e2e, "nsm_cpu_seconds_per_million"),
        cpu_ratio,
        verdict(ratio >= E2E_TARGET_RATIO),
        verdict(cpu_ratio <= E2E_TARGET_CPU_RATIO),
    ));
    out.push_str(&format!(
        "\nnsm's checkpoints (changelog sent and acknowledged, then the RocksDB batch) took \
         {:.0} ms on average, {:.0}% of its span, on a thread of their own; the consumer thread \
         waited for one still being stored {:.0}% of its span.\n",
        number(e2e, "nsm_checkpoint_mean_ms"),
        number(e2e, "nsm_checkpoint_share") * 100.0,
        number(e2e, "nsm_checkpoint_wait_share") * 100.0
    ));

    quix_peer(out, e2e);

    out.push_str("\n## Restart\n\n");
    out.push_str(
        "nsm is stopped with SIGTERM once it has read the stream, and started again on its \
         state: from the start of the process to the first scrape of `/metrics` showing every \
         value it showed before the stop (the 7-day trailing count aside: it drains on the \
         wall clock between the two scrapes).\n\n",
    );
    let restart = number(e2e, "restart_seconds");
    out.push_str("| state of (events) | stop (s) | start to first correct scrape (s) | target |\n|---|---|---|---|\n");
    out.push_str(&format!(
        "| {} | {:.2} | {:.2} | < 5 s{}: {} |\n",
        e2e["events"],
        number(e2e, "shutdown_seconds"),
        restart,
        if number(e2e, "events") >= 10_000_000.0 {
            ""
        } else {
            " with 10M events (this state is smaller)"
        },
        verdict(restart < RESTART_TARGET_SECONDS),
    ));

    out.push_str("\n## Freshness\n\n");
    out.push_str(
        "Events with the current time are sent at a steady rate into the topic nsm (restarted \
         above) reads, while `/metrics` is scraped every 10 ms. An event's delay runs from the \
         call that sends it to the end of the first scrape whose `messages` count includes it \
         (the k-th message counts once k are visible), so it holds the producer's batching, \
         the broker, nsm's flush interval (200 ms, the default) and its checkpoint. A bare \
         consumer reads the same events beside nsm, from the topic's end: its delay, from the \
         same call to the event's arrival, is the producer's, the broker's and the client's \
         share of nsm's.\n\n",
    );
    let p99 = number(e2e, "freshness_p99_ms");
    out.push_str("| events/s sent | messages timed | p50 (ms) | p99 (ms) | max (ms) | bare consumer p50 (ms) | bare consumer p99 (ms) | target |\n|---|---|---|---|---|---|---|---|\n");
    out.push_str(&format!(
        "| {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | p99 < 1 s at 20k events/s: {} |\n",
        number(e2e, "freshness_rate"),
        e2e["freshness_events"],
        number(e2e, "freshness_p50_ms"),
        p99,
        number(e2e, "freshness_max_ms"),
        number(e2e, "bare_freshness_p50_ms"),
        number(e2e, "bare_freshness_p99_ms"),
        verdict(p99 < FRESHNESS_TARGET_P99_MS && number(e2e, "freshness_rate") >= 19_000.0),
    ));
}

/// The Quix Streams peer beside the bare consumer and nsm, over the same topic.
/// What counting teams through the repartition topic costs: the same stream, once with the
/// teams re-keyed (exact), once declared nested in users (counted per partition, inexact).
fn repartition_cost(out: &mut String, on: &Value, off: &Value) {
    out.push_str("\n## Cost of the repartition topic\n\n");
    out.push_str(&format!(
        "The same stream of {} events keyed by user, read twice: with the team metrics counted \
         exactly through the repartition topic (each `message_sent` event forwarded once more \
         through tansu, on the same 2 cores, and applied a second time), and with teams \
         declared nested in users (`kafka.nested_in_key`: counted per partition, inexact \
         here), as a config without the topic would count them.\n\n",
        on["events"]
    ));
    out.push_str(
        "| run | nsm events/s | nsm / bare | nsm CPU-s per million | freshness p99 (ms) | restart (s) |\n|---|---|---|---|---|---|\n",
    );
    for (name, run) in [("repartition topic", on), ("per partition", off)] {
        out.push_str(&format!(
            "| {name} | {:.0} | {:.2} | {:.1} | {:.0} | {:.2} |\n",
            number(run, "nsm_events_per_second"),
            number(run, "nsm_to_bare"),
            number(run, "nsm_cpu_seconds_per_million"),
            number(run, "freshness_p99_ms"),
            number(run, "restart_seconds"),
        ));
    }
}

fn quix_peer(out: &mut String, e2e: &Value) {
    out.push_str("\n## The Quix Streams peer\n\n");
    if e2e.get("quix_events_per_second").is_none() {
        out.push_str(
            "Not run: `nsm-bench e2e` was not given `--quix-python` (`make bench` gives it \
             one).\n",
        );
        return;
    }
    out.push_str(
        "A Quix Streams application (`crates/nsm-bench/quix/peer.py`, quixstreams 3.28.1, \
         RocksDB state and changelog topics on, its defaults) reads the bench's events from the \
         same broker after nsm, while nsm is stopped, and computes with its own tumbling \
         windows a 1-day count of the messages and the weekly distinct count of their users \
         (nsm's `messages_by_platform` and `weekly_active_users`). Quix groups windows by \
         message key (here the user), so its daily count is per user, and the distinct count \
         takes a second stage: each user's first message of a week is re-keyed to one key \
         through a repartition topic on the broker and counted in a second window. Its weeks \
         start on Thursdays (Unix epoch alignment), nsm's on Mondays. The peer computes 2 \
         metrics where nsm computes the config's 8. Timed like the other two, from its first \
         message to its last, its process' CPU over that span.",
    );
    // A run may give the peer the start of the topic only: it reads some 4,000 events/s.
    match (e2e.get("quix_events"), e2e.get("events")) {
        (Some(read), Some(all)) if read != all => out.push_str(&format!(
            " It reads a stream of its own, {read} events of the same shape as the {all} \
             (users scaled with them), produced to the same broker; its rates are over \
             those.\n\n"
        )),
        _ => out.push_str("\n\n"),
    }
    out.push_str(
        "| reader | events/s | / bare | CPU-s per million | CPU / bare |\n|---|---|---|---|---|\n",
    );
    out.push_str(&format!(
        "| bare librdkafka consumer | {:.0} | 1 | {:.2} | 1 |\n",
        number(e2e, "bare_events_per_second"),
        number(e2e, "bare_cpu_seconds_per_million"),
    ));
    for (reader, prefix) in [("nsm", "nsm"), ("Quix Streams peer", "quix")] {
        // The ratios as the run computed them, from the unrounded figures.
        out.push_str(&format!(
            "| {reader} | {:.0} | {:.3} | {:.2} | {:.1} |\n",
            number(e2e, &format!("{prefix}_events_per_second")),
            number(e2e, &format!("{prefix}_to_bare")),
            number(e2e, &format!("{prefix}_cpu_seconds_per_million")),
            number(e2e, &format!("{prefix}_cpu_to_bare")),
        ));
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

pub(crate) fn today() -> String {
    command_output("date", &["-u", "+%Y-%m-%d"]).unwrap_or_else(|| "an unknown date".into())
}

fn kernel() -> String {
    command_output("uname", &["-sr"]).unwrap_or_else(|| "unknown kernel".into())
}

/// CPU model, cores and memory, from /proc.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| {
            meminfo
                .lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(f64::NAN);
    format!("{model}, {cores} cores, {memory_gib:.0} GiB")
}
