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
    let number = |value: &Value, key: &str| value[key].as_f64().unwrap_or(f64::NAN);
    let verdict = |met: bool| if met { "met" } else { "**not met**" };

    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str(&format!(
        "Measured by `{}` on {}, {} ({}), with nsm {} built in release mode. Figures of one \
         section come from one run of one process, alternating the two sides, so machine noise \
         hits both; the median of the rounds is shown with every round beside it.\n\n",
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
         events, against serde_json's typed, borrowed parsing of the same fields of the same \
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
    }

    out.push_str("## Memory\n\n");
    out.push_str(
        "Every user sends two messages over the 7 days before the bench clock, through the \
         engine and the real RocksDB store, checkpointing every 50,000 events; the 7-day \
         trailing distinct count is checked exact against the users sent. `memory` keeps the \
         members in a map instead of RocksDB: the baseline that grows with the users. Peak \
         resident memory is the process' `VmHWM`.\n\n",
    );
    out.push_str("| members kept in | distinct users | events | peak RSS (MiB) | events/s | target |\n|---|---|---|---|---|---|\n");
    for memory in find("memory") {
        let peak = number(memory, "peak_rss_mib");
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
            "| {} | {} | {} | {:.0} | {:.0} | {} |\n",
            memory["store"].as_str().unwrap_or("?"),
            memory["users"],
            memory["events"],
            peak,
            number(memory, "events_per_second"),
            target
        ));
    }
    out.push_str(
        "\n## Not measured yet\n\nEnd to end against a bare librdkafka consumer on tansu, \
         freshness at 20k events/s, restart to the first correct scrape and the Quix Streams \
         peer are not part of `make bench` yet.\n",
    );
    std::fs::write(&args.output, out)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("wrote {}", args.output.display());
    Ok(())
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

fn today() -> String {
    command_output("date", &["-u", "+%Y-%m-%d"]).unwrap_or_else(|| "an unknown date".into())
}

fn kernel() -> String {
    command_output("uname", &["-sr"]).unwrap_or_else(|| "unknown kernel".into())
}

/// CPU model, cores and memory, from /proc.
fn machine() -> String {
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
