//! nsm: turns product events in Kafka into a live North Star Metric.
//!
//! The binary wires the edges (Kafka, RocksDB, HTTP) around the pure core; it holds no
//! business logic of its own.

mod assets;
mod backfill;
mod backfill_watch;
mod changelog;
mod clock;
mod demo;
mod demo_events;
mod frames;
mod logging;
mod open_files;
mod pipeline;
mod repartition;
mod replay;
mod run;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc, for RocksDB's C++ too: it returns freed memory to the system within seconds,
/// where glibc's per-thread arenas kept it (the memory bench at 5M users: 605.6 MiB peak with
/// glibc, 528.3 with jemalloc, the same entries in memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "nsm",
    version,
    about = "Live North Star Metric from product events in Kafka",
    long_about = "nsm reads JSON product events from Kafka, keeps windowed North Star, input, \
guardrail and revenue metrics exactly in RocksDB, and exposes them as Prometheus metrics.\n\n\
Start with `nsm demo` (an in-process broker and a demo event stream), then write a config \
(see config/example.toml) and run `nsm check --config FILE` and `nsm run --config FILE`."
)]
struct Cli {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"], env = "NSM_LOG_FORMAT")]
    log_format: String,
    /// Log filter, in tracing's syntax (`info`, `nsm=debug,rdkafka=warn`).
    #[arg(long, global = true, default_value = "info", env = "NSM_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the pipeline: consume events, keep state, serve /metrics. Stops cleanly on SIGTERM
    /// or Ctrl-C, storing state and offsets first.
    Run {
        /// The TOML config file. `${VAR}` in kafka.properties reads the environment.
        #[arg(long, short, env = "NSM_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file without running; lists every problem with its path.
    Check {
        #[arg(long, short, env = "NSM_CONFIG")]
        config: PathBuf,
    },
    /// Run the whole pipeline on an embedded default: an in-process Kafka broker (librdkafka's
    /// mock cluster), a demo event generator, and nsm consuming through the real client path.
    Demo(demo::DemoArgs),
    /// Produce JSON events, one per line, from a file or standard input into a topic.
    Produce(tools::ProduceArgs),
    /// Print every message of a topic (for example the dead-letter topic) as JSON lines.
    Read(tools::ReadArgs),
    /// Produce the demo event stream into a real broker.
    Generate(tools::GenerateArgs),
    /// Write the Prometheus rule file of a config: recording rules (metrics summed across
    /// instances, growth, the revenue gap) and the on-call alerts, `[alerting]` thresholds.
    Rules(assets::RulesArgs),
    /// Write the Grafana dashboard of a config (provisioning JSON model).
    Dashboards(assets::AssetArgs),
    /// Compute a candidate config over the retained history of its topics, beside the live
    /// config (--against) over the same events, with the linter's findings, without touching
    /// the live pipeline: `nsm replay --config candidate.toml --against nsm.toml --from
    /// 2026-11-01`.
    Replay(replay::ReplayArgs),
    /// Follow a running nsm's backfills of metrics added or changed (their history read again
    /// and swapped in), with a progress bar per partition, until each is swapped in:
    /// `nsm backfill --config nsm.toml`.
    Backfill(backfill_watch::BackfillArgs),
    /// Print the bcrypt hash of a password read from standard input (one line), for
    /// `[http.basic_auth] users`: `nsm hash-password < password-file`.
    HashPassword(tools::HashPasswordArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = logging::init(&cli.log_format, &cli.log) {
        eprintln!("error: {error:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Run { config } => {
            run::load_config(&config).and_then(|config| run::run_pipeline(config, run::stop_flag()))
        }
        Command::Check { config } => tools::check(&config),
        Command::Demo(args) => demo::run(args),
        Command::Produce(args) => tools::produce(args),
        Command::Read(args) => tools::read(args),
        Command::Generate(args) => tools::generate(args),
        Command::Rules(args) => assets::write_rules(args),
        Command::Dashboards(args) => assets::write(args, nsm_gen::dashboard),
        Command::Replay(args) => replay::replay(args),
        Command::Backfill(args) => backfill_watch::watch(args),
        Command::HashPassword(args) => tools::hash_password(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "nsm failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
