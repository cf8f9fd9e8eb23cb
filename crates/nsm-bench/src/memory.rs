//! Peak memory with millions of distinct users (see the crate doc).

use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use nsm_core::engine::{AggValue, Engine, Outcome, DEFAULT_STATE_MEMORY};
use nsm_core::PartitionKey;
use nsm_state::{Store, StoreOptions};

use crate::frames::Frames;
use crate::workload::{
    bench_plan, coprime_stride, every_kind_plan, write_event, NOW_MS, STEP_MS, WEEK_MS,
};

/// Events between two checkpoints, as a busy pipeline takes them in one flush interval (one
/// comes sooner when the engine asks for it, as in `nsm run`).
const CHECKPOINT_EVERY: u64 = 50_000;

#[derive(Clone, Copy, ValueEnum)]
pub enum StoreKind {
    /// Members in RocksDB behind the bounded cache, as `nsm run` keeps them.
    Rocksdb,
    /// Members in memory (a map of every entry): the baseline that grows with the users.
    Memory,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Metrics {
    /// The core path's config (8 metrics; distinct counts, a trailing one, a threshold).
    Core,
    /// The core path's config plus a metric of every kind it lacks (retentions, a trailing
    /// threshold, a conversion).
    EveryKind,
}

impl Metrics {
    fn label(self) -> &'static str {
        match self {
            Metrics::Core => "core",
            Metrics::EveryKind => "every-kind",
        }
    }
}

#[derive(Args)]
pub struct MemoryArgs {
    /// Distinct users; each sends two messages.
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    #[arg(long, value_enum, default_value_t = StoreKind::Rocksdb)]
    store: StoreKind,
    #[arg(long, value_enum, default_value_t = Metrics::Core)]
    metrics: Metrics,
    /// State directory (a temporary one by default).
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// Bytes of entries kept in memory (`state.memory_limit`), in MiB; nsm's default if unset.
    #[arg(long)]
    memory_limit_mib: Option<usize>,
}

pub fn run(args: &MemoryArgs) -> anyhow::Result<()> {
    let plan = match args.metrics {
        Metrics::Core => bench_plan()?,
        Metrics::EveryKind => every_kind_plan()?,
    };
    let temporary = tempfile::tempdir()?;
    let path = args
        .state_dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    let store = Store::open(&path, &plan, &StoreOptions::default())?;
    let mut engine = match args.store {
        StoreKind::Rocksdb => {
            let budget = args
                .memory_limit_mib
                .map_or(DEFAULT_STATE_MEMORY, |mib| mib << 20);
            Engine::with_reader(plan.clone(), Box::new(store.clone()), budget)
        }
        StoreKind::Memory => Engine::new(plan.clone()),
    };
    let key = PartitionKey::new("events", 0);
    engine.restore_partition(key.clone(), store.load_partition(&key)?);
    let mut frames = Frames::open(&store, &key)?;

    let users = args.users.max(1);
    let events = 2 * users;
    let spacing_ms = (WEEK_MS - 2 * STEP_MS) as f64 / events as f64;
    let start_ms = NOW_MS - WEEK_MS + STEP_MS;
    let stride = coprime_stride(users);
    let started = Instant::now();
    let mut payload = Vec::with_capacity(512);
    let mut bytes = 0u64;
    // Users with a message: the exact answer (one bit each).
    let mut messaged = vec![0u64; users.div_ceil(64) as usize];
    let mut since_checkpoint = 0;
    for index in 0..events {
        // First every user in order, then every user again in a scrambled order.
        let user = if index < users {
            index
        } else {
            ((index - users) as u128 * stride as u128 % users as u128) as u64
        };
        let time_ms = start_ms + (index as f64 * spacing_ms) as i64;
        if write_event(&mut payload, index, user, time_ms) {
            messaged[(user / 64) as usize] |= 1 << (user % 64);
        }
        bytes += payload.len() as u64;
        match engine.apply(&key, index as i64, &payload, NOW_MS) {
            Outcome::Applied { .. } => {}
            other => bail!("event {index} was not applied: {other:?}"),
        }
        since_checkpoint += 1;
        // As `nsm run`: at its interval, or sooner once the engine holds enough entries.
        if since_checkpoint == CHECKPOINT_EVERY || engine.checkpoint_due() {
            frames.write(&store, &frames.take_changes(&mut engine))?;
            since_checkpoint = 0;
        }
    }
    frames.write(&store, &frames.take_changes(&mut engine))?;
    let elapsed = started.elapsed().as_secs_f64();

    let values = engine.metric_values(NOW_MS);
    let trailing = plan
        .metric_index("users_7d")
        .context("users_7d is in the bench config")?;
    let counted = values
        .iter()
        .find(|value| value.metric == trailing)
        .map(|value| value.current.value);
    let expected: u64 = messaged
        .iter()
        .map(|word| u64::from(word.count_ones()))
        .sum();
    if counted != Some(AggValue::Distinct(expected)) {
        bail!("users_7d is {counted:?}, expected {expected}: not exact");
    }
    let (peak_kib, resident_kib) = process_memory_kib()?;
    let expiry = expire_the_week(&mut engine, &mut frames, &store, &key, events)?;
    println!(
        "{{\"bench\":\"memory\",\"store\":\"{}\",\"metrics\":\"{}\",\"users\":{users},\"events\":{events},\
         \"mean_event_bytes\":{},\"users_7d\":{expected},\"peak_rss_mib\":{:.1},\"rss_mib\":{:.1},\
         \"resident_member_entries\":{},\"seconds\":{elapsed:.1},\"events_per_second\":{:.0},\
         \"expiry_records\":{},\"expiry_peak_rss_mib\":{:.1},\"expiry_seconds\":{:.1}}}",
        match args.store {
            StoreKind::Rocksdb => "rocksdb",
            StoreKind::Memory => "memory",
        },
        args.metrics.label(),
        bytes / events,
        peak_kib as f64 / 1024.0,
        resident_kib as f64 / 1024.0,
        engine.resident_members(),
        events as f64 / elapsed,
        expiry.records,
        expiry.peak_kib as f64 / 1024.0,
        expiry.seconds,
    );
    Ok(())
}

/// Event time past which every window of the week has left the bench config's retention
/// (35 days after its end).
const EXPIRED_AFTER_MS: i64 = 7 * WEEK_MS;

/// Member entries one event of the bench config writes at most (its id, its user's and
/// team's memberships, trailing occurrences, threshold progress).
const LAST_EVENT_ENTRIES: usize = 10;

/// What the week's windows expiring cost: the write that deletes them all, with the changelog
/// records `nsm run` sends for it (its frame: dropped ranges, not a record per entry).
struct Expiry {
    records: u64,
    /// Peak resident memory from the expiring event on.
    peak_kib: u64,
    seconds: f64,
}

fn expire_the_week(
    engine: &mut Engine,
    frames: &mut Frames,
    store: &Store,
    key: &PartitionKey,
    offset: u64,
) -> anyhow::Result<Expiry> {
    // The peak so far is the week's; start a new one (5 resets VmHWM to the current RSS).
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")?;
    let started = Instant::now();
    let later_ms = NOW_MS + EXPIRED_AFTER_MS;
    let mut payload = Vec::new();
    write_event(&mut payload, offset, 0, later_ms);
    match engine.apply(key, offset as i64, &payload, later_ms) {
        Outcome::Applied { .. } => {}
        other => bail!("the event expiring the week was not applied: {other:?}"),
    }
    let records = frames.write(store, &frames.take_changes(engine))?;
    let left = store.stored_member_count(key)?;
    if left > LAST_EVENT_ENTRIES {
        bail!("{left} member entries left after the week expired: expected only the last event's");
    }
    Ok(Expiry {
        records,
        peak_kib: process_memory_kib()?.0,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Peak and current resident memory of this process, in KiB (Linux).
fn process_memory_kib() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse::<u64>().ok())
            .with_context(|| format!("{name} in /proc/self/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}
