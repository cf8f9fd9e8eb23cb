//! The core path in process: decoding, every metric and the checkpoints of each event (as
//! `nsm run` writes them, the broker aside), beside a parse-only baseline over the same bytes
//! (serde_json's typed, borrowed parsing of the fields the metrics read), run alternately in
//! one process so machine noise hits both.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use nsm_core::engine::{
    CountingReader, Engine, Outcome, Plan, StateReadError, StateReader, DEFAULT_STATE_MEMORY,
};
use nsm_core::{EpochMillis, PartitionKey};
use nsm_state::{Store, StoreOptions};
use serde::Deserialize;

use crate::frames::{CheckpointTimes, Frames};
use crate::workload::{bench_plan, coprime_stride, write_event, NOW_MS, STEP_MS, WEEK_MS};

/// Events between two state writes, as a busy pipeline takes them in one flush interval (one
/// comes sooner when the engine asks for it, as in `nsm run`).
const CHECKPOINT_EVERY: usize = 50_000;

#[derive(Args)]
pub struct CoreArgs {
    /// Events per run.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Distinct users the events come from (each user is in one team of five).
    #[arg(long, default_value_t = 200_000)]
    users: u64,
    /// Runs of each path, alternating; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// The fields the bench config reads, parsed the fastest way serde_json offers.
#[derive(Deserialize)]
#[allow(dead_code)] // Read only through black_box: the parse is what is measured.
struct TypedEvent<'a> {
    event_id: &'a str,
    event: &'a str,
    timestamp: i64,
    user_id: &'a str,
    team_id: &'a str,
    #[serde(borrow)]
    properties: TypedProperties<'a>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TypedProperties<'a> {
    platform: &'a str,
    amount: f64,
}

/// Events in one buffer, with the end of each.
struct Events {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Events {
    fn generate(count: u64, users: u64) -> Events {
        let users = users.max(1);
        let stride = coprime_stride(users);
        let spacing_ms = (WEEK_MS - 2 * STEP_MS) as f64 / count.max(1) as f64;
        let start_ms = NOW_MS - WEEK_MS + STEP_MS;
        let mut bytes = Vec::with_capacity(count as usize * 420);
        let mut ends = Vec::with_capacity(count as usize);
        let mut payload = Vec::with_capacity(512);
        for index in 0..count {
            let user = (index as u128 * stride as u128 % users as u128) as u64;
            write_event(
                &mut payload,
                index,
                user,
                start_ms + (index as f64 * spacing_ms) as i64,
            );
            bytes.extend_from_slice(&payload);
            ends.push(bytes.len());
        }
        Events { bytes, ends }
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.bytes[start..end])
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

/// Wall-clock and CPU seconds of one run (CPU: every thread of the process, RocksDB's too).
struct Run {
    seconds: f64,
    cpu_seconds: f64,
}

fn measure(work: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Run> {
    let cpu_before = crate::procfs::cpu_seconds("self")?;
    let started = Instant::now();
    work()?;
    Ok(Run {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: crate::procfs::cpu_seconds("self")? - cpu_before,
    })
}

fn parse_only(events: &Events) -> anyhow::Result<()> {
    let mut parsed = 0usize;
    for payload in events.iter() {
        let event: TypedEvent<'_> = serde_json::from_slice(payload)?;
        black_box(&event);
        parsed += 1;
    }
    black_box(parsed);
    Ok(())
}

/// Per-entity entries of one run: what drives the cost of the state.
#[derive(Default)]
struct Entries {
    written: u64,
    read: u64,
}

/// Where one run's time went: its events and checkpoints (`running`, the store's opening and
/// closing aside), and within it reading entries back from RocksDB (while applying events),
/// taking the engine's changes, and the checkpoints' frames and batch.
#[derive(Default, Clone, Copy)]
struct Split {
    running: Duration,
    reading: Duration,
    taking: Duration,
    checkpointing: CheckpointTimes,
}

/// The store, timing the entries read from it.
struct TimedReader {
    store: Store,
    nanos: Arc<AtomicU64>,
}

impl TimedReader {
    fn timed<T>(&self, read: impl FnOnce(&Store) -> T) -> T {
        let started = Instant::now();
        let answer = read(&self.store);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
        answer
    }
}

impl StateReader for TimedReader {
    fn member(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateReadError> {
        self.timed(|store| store.member(partition, metric, start_ms, key))
    }

    fn member_page(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
        period: u64,
        shard: u16,
    ) -> Result<Vec<(u128, Vec<u8>)>, StateReadError> {
        self.timed(|store| store.member_page(partition, metric, start_ms, period, shard))
    }

    fn has_entries(
        &self,
        partition: &PartitionKey,
        metric: usize,
        start_ms: EpochMillis,
    ) -> Result<bool, StateReadError> {
        self.timed(|store| store.has_entries(partition, metric, start_ms))
    }
}

fn core_path(plan: &Plan, events: &Events) -> anyhow::Result<(Entries, Split)> {
    let directory = tempfile::tempdir()?;
    let store = Store::open(directory.path(), plan, &StoreOptions::default())?;
    // What the engine reads back from the store: what its memory could not answer.
    let reading = Arc::new(AtomicU64::new(0));
    let reader = CountingReader::new(TimedReader {
        store: store.clone(),
        nanos: reading.clone(),
    });
    let reads = reader.reads();
    let mut engine = Engine::with_reader(plan.clone(), Box::new(reader), DEFAULT_STATE_MEMORY);
    let key = PartitionKey::new("events", 0);
    engine.restore_partition(key.clone(), store.load_partition(&key)?);
    let mut frames = Frames::open(&store, &key)?;
    let mut written = 0;
    let mut split = Split::default();
    let run_started = Instant::now();
    let mut checkpoint = |engine: &mut Engine| -> anyhow::Result<()> {
        let started = Instant::now();
        let changes = frames.take_changes(engine);
        split.taking += started.elapsed();
        written += changes
            .partitions
            .iter()
            .map(|partition| partition.members.len() as u64)
            .sum::<u64>();
        frames.write(&store, &changes)?;
        Ok(())
    };
    let mut since_checkpoint = 0;
    for (offset, payload) in events.iter().enumerate() {
        match engine.apply(&key, offset as i64, payload, NOW_MS) {
            Outcome::Applied { .. } => {}
            other => bail!("event {offset} was not applied: {other:?}"),
        }
        since_checkpoint += 1;
        // As `nsm run`: at its interval, or sooner once the engine holds enough entries.
        if since_checkpoint == CHECKPOINT_EVERY || engine.checkpoint_due() {
            checkpoint(&mut engine)?;
            since_checkpoint = 0;
        }
    }
    checkpoint(&mut engine)?;
    black_box(engine.metric_values(NOW_MS));
    split.running = run_started.elapsed();
    split.checkpointing = frames.times;
    split.reading = Duration::from_nanos(reading.load(Ordering::Relaxed));
    let entries = Entries {
        written,
        read: reads.load(Ordering::Relaxed),
    };
    Ok((entries, split))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn run(args: &CoreArgs) -> anyhow::Result<()> {
    let plan = bench_plan()?;
    let events = Events::generate(args.events, args.users);
    let count = events.len() as f64;
    let mut parse_rates = Vec::new();
    let mut core_rates = Vec::new();
    let mut core_cpu_rates = Vec::new();
    // The same in every round: the run is deterministic.
    let mut entries = Entries::default();
    // Summed over the rounds, as the seconds of the runs.
    let (mut split, mut parse_seconds) = (Split::default(), 0.0);
    for _ in 0..args.rounds.max(1) {
        let parse = measure(|| parse_only(&events))?;
        parse_rates.push(count / parse.seconds);
        parse_seconds += parse.seconds;
        let core = measure(|| {
            let (run_entries, run_split) = core_path(&plan, &events)?;
            entries = run_entries;
            split.running += run_split.running;
            split.reading += run_split.reading;
            split.taking += run_split.taking;
            split.checkpointing.add(&run_split.checkpointing);
            Ok(())
        })?;
        core_rates.push(count / core.seconds);
        core_cpu_rates.push(count / core.cpu_seconds.max(1e-9));
    }
    // Microseconds an event over every round; applying includes its reads.
    let per_event = |seconds: f64| seconds * 1e6 / (count * args.rounds.max(1) as f64);
    let (reading, taking) = (split.reading.as_secs_f64(), split.taking.as_secs_f64());
    let times = split.checkpointing;
    let applying = split.running.as_secs_f64() - taking - times.total().as_secs_f64();
    let parse = median(parse_rates.clone());
    let core = median(core_rates.clone());
    let rounded = |rates: &[f64]| {
        rates
            .iter()
            .map(|rate| format!("{rate:.0}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    println!(
        "{{\"bench\":\"core\",\"events\":{},\"users\":{},\"mean_event_bytes\":{},\"metrics\":{},\
         \"parse_only_events_per_second\":{parse:.0},\"nsm_events_per_second\":{core:.0},\
         \"nsm_events_per_cpu_second\":{:.0},\"nsm_to_parse_only\":{:.3},\
         \"entries_written_per_event\":{:.2},\"entries_read_per_event\":{:.2},\
         \"microseconds_per_event\":{{\"parse_only\":{:.2},\"applying\":{:.2},\
         \"of_it_reading_rocksdb\":{:.2},\"taking_changes\":{:.2},\"checkpointing\":{:.2},\
         \"of_it_preparing\":{:.2},\"of_it_snapshotting\":{:.2},\"of_it_committing\":{:.2}}},\
         \"parse_only_runs\":[{}],\"nsm_runs\":[{}]}}",
        events.len(),
        args.users,
        events.bytes.len() / events.len().max(1),
        plan.metrics().len(),
        median(core_cpu_rates),
        core / parse,
        entries.written as f64 / count,
        entries.read as f64 / count,
        per_event(parse_seconds),
        per_event(applying),
        per_event(reading),
        per_event(taking),
        per_event(times.total().as_secs_f64()),
        per_event(times.preparing.as_secs_f64()),
        per_event(times.snapshotting.as_secs_f64()),
        per_event(times.committing.as_secs_f64()),
        rounded(&parse_rates),
        rounded(&core_rates),
    );
    Ok(())
}
