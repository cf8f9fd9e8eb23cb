//! `nsm-bench`: measurements of nsm that are not tests. Each run prints one JSON line.
//!
//! `nsm-bench memory --users N --store rocksdb|memory` feeds every user twice through the
//! engine and the real state store, with a realistic config (8 metrics, 3 exact distinct
//! counts, a 7-day trailing distinct count, a segment breakdown, a threshold), in event-time
//! order over the 7 days before a fixed clock, checkpointing like the pipeline. It checks the
//! trailing distinct count equals N and reports the peak resident memory of the process
//! (`VmHWM`). `--store memory` keeps members in memory instead: the baseline that grows.

mod memory;

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Memory(args) => memory::run(&args),
    }
}
