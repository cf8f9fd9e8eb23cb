//! `nsm-bench`: measurements of nsm that are not tests. Each run prints one JSON line.
//!
//! `nsm-bench core --events N` runs the core path (decode, 8 metrics, RocksDB writes every
//! 50,000 events) and a parse-only baseline over the same ~400-byte events, alternately,
//! and reports the median events per second of each and their ratio.
//!
//! `nsm-bench memory --users N --store rocksdb|memory` feeds every user twice through the
//! engine and the real state store, with a realistic config (8 metrics, 3 exact distinct
//! counts, a 7-day trailing distinct count, a segment breakdown, a threshold), or with
//! `--metrics every-kind` that config plus a metric of every kind with per-entity state it
//! lacks (retentions of the weekly and of the 7-day trailing distinct counts, a 7-day
//! trailing threshold, a conversion), in event-time
//! order over the 7 days before a fixed clock, checkpointing like the pipeline. It checks the
//! trailing distinct count equals N and reports the peak resident memory of the process
//! (`VmHWM`). `--store memory` keeps members in memory instead: the baseline that grows.
//!
//! `nsm-bench e2e --events N` starts tansu, produces N events, reads them with a bare
//! librdkafka consumer (the ceiling), then with `nsm run`, then (given `--quix-python`) with
//! a Quix Streams application computing two of the same metrics, restarts nsm on its state and
//! measures freshness at a steady rate (see [`e2e`]).

mod alerts;
mod core_path;
mod e2e;
mod frames;
mod memory;
mod procfs;
mod report;
mod workload;

use clap::{Parser, Subcommand};

/// The allocator nsm runs with (see the nsm binary), so memory is measured as it is used.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "nsm-bench", about = "Measurements of nsm (not tests)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Peak resident memory with N distinct users in a 7-day trailing window.
    Memory(memory::MemoryArgs),
    /// Events per second through decoding, every metric and the state write, beside a
    /// parse-only baseline over the same bytes.
    Core(core_path::CoreArgs),
    /// nsm on a real broker (tansu) beside a bare librdkafka consumer of the same topic; then
    /// the restart to the first correct scrape and the freshness at a steady rate.
    E2e(e2e::E2eArgs),
    /// Writes BENCHMARKS.md from the JSON lines of the other measurements.
    Report(report::ReportArgs),
    /// Puts the alerting confusion table of the promtool scenario library into BENCHMARKS.md.
    Alerts(alerts::AlertsArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Memory(args) => memory::run(&args),
        Command::Core(args) => core_path::run(&args),
        Command::E2e(args) => e2e::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Alerts(args) => alerts::run(&args),
    }
}
