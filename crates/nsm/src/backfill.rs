//! Backfill of metrics added or changed (docs/design/backfill.md).
//!
//! A partition taken with metrics that began late (`metric_since`) is read again from its
//! first retained offset, on a thread of its own, by an engine of the whole plan keeping only
//! those metrics (`Plan::keeping_only`), into a store of its own beside the live one. It reads
//! up to a target, the live partition's next offset, which the pipeline moves forward; once
//! it holds the partition at the target, the pipeline swaps the metrics' data in on the
//! consumer thread (`Pipeline::swap_backfill`). Its store is checkpointed every few seconds,
//! so a restart goes on from there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nsm_core::engine::{Engine, Outcome, Plan, Route};
use nsm_core::event::RecordMeta;
use nsm_core::PartitionKey;
use nsm_kafka::{ClientSettings, PartitionReader};
use nsm_state::Store;
use tracing::{error, info};

use crate::clock::EventClock;

/// How often a backfill's store is written.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// How often progress is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Messages applied between two looks at what the pipeline wants.
const MESSAGES_PER_TURN: usize = 1_000;

/// The backfill store's directory: beside the live one (`<state.path>-backfill`).
pub fn backfill_path(state: &Path) -> PathBuf {
    let name = state.file_name().map_or_else(
        || "state".into(),
        |name| name.to_string_lossy().into_owned(),
    );
    state.with_file_name(format!("{name}-backfill"))
}

/// The metrics of a partition taken whose data began late and can be backfilled: counted in
/// the input partition (those counted through the repartition topic stay partial).
pub fn late_metrics(plan: &Plan, metric_since: &[(usize, i64)]) -> Vec<usize> {
    let mut metrics: Vec<usize> = metric_since
        .iter()
        .map(|(metric, _)| *metric)
        .filter(|metric| plan.route(*metric) == Route::Local)
        .collect();
    metrics.sort_unstable();
    metrics.dedup();
    metrics
}

/// What the runner says of a partition's backfill.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    pub earliest: i64,
    pub next: i64,
    pub target: i64,
    /// The backfill store holds the partition at `target`, and the runner leaves it alone
    /// until the target moves or the swap is done.
    pub ready: bool,
    /// From when its data is whole: `None` when the history read starts at the partition's
    /// first offset, else the time of the first event read.
    pub since_ms: Option<i64>,
}

impl Progress {
    pub fn ratio(&self) -> f64 {
        if self.target <= self.earliest {
            return 1.0;
        }
        ((self.next - self.earliest) as f64 / (self.target - self.earliest) as f64).clamp(0.0, 1.0)
    }
}

#[derive(Default)]
struct Shared {
    /// Per partition to backfill: its metrics and target. Set by the pipeline.
    wanted: HashMap<PartitionKey, (Vec<usize>, i64)>,
    progress: HashMap<PartitionKey, Progress>,
    /// Partitions whose backfill failed: given up, their metrics stay partial.
    failed: Vec<(PartitionKey, String)>,
    /// Partitions swapped in: their copy in the backfill store goes.
    swapped: Vec<PartitionKey>,
}

/// The backfills of this instance: the pipeline's side of the runner thread.
pub struct Backfills {
    shared: Arc<Mutex<Shared>>,
    store: Store,
    stop: Arc<AtomicBool>,
    runner: Option<JoinHandle<()>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Backfills {
    /// Starts the runner over `store` (the backfill store at `dir`, opened with `plan`'s
    /// config); events are judged by `clock`, as the live pipeline judges them.
    pub fn start(
        plan: Plan,
        store: Store,
        dir: PathBuf,
        settings: ClientSettings,
        memory_limit: usize,
        clock: EventClock,
    ) -> std::io::Result<Backfills> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let runner = Runner {
            shared: shared.clone(),
            store: store.clone(),
            dir,
            plan,
            memory_limit,
            clock,
            stop: stop.clone(),
            running: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("nsm-backfill".into())
            .spawn(move || runner.run(settings))?;
        Ok(Backfills {
            shared,
            store,
            stop,
            runner: Some(thread),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Backfills `metrics` of `key` up to `target`, or moves its target.
    pub fn want(&self, key: &PartitionKey, metrics: Vec<usize>, target: i64) {
        lock(&self.shared)
            .wanted
            .insert(key.clone(), (metrics, target));
    }

    /// Moves the target of `key`'s backfill, if any.
    pub fn set_target(&self, key: &PartitionKey, target: i64) {
        if let Some(wanted) = lock(&self.shared).wanted.get_mut(key) {
            wanted.1 = wanted.1.max(target);
        }
    }

    /// Stops `key`'s backfill (given up, or swapped in); its store keeps what it read.
    pub fn forget(&self, key: &PartitionKey) {
        let mut shared = lock(&self.shared);
        shared.wanted.remove(key);
        shared.progress.remove(key);
    }

    /// Every backfill wanted, with its metrics and progress.
    pub fn status(&self) -> Vec<(PartitionKey, Vec<usize>, Progress)> {
        let shared = lock(&self.shared);
        shared
            .wanted
            .iter()
            .map(|(key, (metrics, target))| {
                let progress = shared.progress.get(key).copied().unwrap_or(Progress {
                    target: *target,
                    ..Progress::default()
                });
                (key.clone(), metrics.clone(), progress)
            })
            .collect()
    }

    /// Backfills that failed since the last call.
    pub fn failures(&self) -> Vec<(PartitionKey, String)> {
        std::mem::take(&mut lock(&self.shared).failed)
    }

    /// The swap of `key` is done: its copy in the backfill store goes.
    pub fn swapped(&self, key: &PartitionKey) {
        self.forget(key);
        lock(&self.shared).swapped.push(key.clone());
    }
}

impl Drop for Backfills {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(runner) = self.runner.take() {
            let _ = runner.join();
        }
    }
}

/// What a backfill store's partition was read for, kept beside the store: a restart goes on
/// only with the same metrics, defined the same way.
#[derive(Debug, PartialEq)]
struct Started {
    /// Each metric's definition, as its name and its `Debug` text.
    metrics: Vec<(String, String)>,
    earliest: i64,
    since_ms: Option<i64>,
}

struct Running {
    engine: Engine,
    target: i64,
    started: Started,
    /// Written to the store at `target`: left alone until the target moves.
    ready: bool,
}

struct Runner {
    shared: Arc<Mutex<Shared>>,
    store: Store,
    dir: PathBuf,
    plan: Plan,
    memory_limit: usize,
    clock: EventClock,
    stop: Arc<AtomicBool>,
    running: HashMap<PartitionKey, Running>,
}

impl Runner {
    fn run(mut self, settings: ClientSettings) {
        // A Kafka client only once some backfill is wanted: most starts need none.
        let mut reader: Option<PartitionReader> = None;
        let mut last_checkpoint = Instant::now();
        let mut last_log = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if reader.is_none() && !lock(&self.shared).wanted.is_empty() {
                match PartitionReader::new(&settings) {
                    Ok(created) => reader = Some(created),
                    Err(error) => {
                        error!(error = %error, "cannot start the backfill reader; trying again");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let Some(reader) = reader.as_mut() else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            self.follow_wanted(reader);
            if self.running.is_empty() {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            let running = &mut self.running;
            let clock = self.clock;
            let mut apply =
                |key: &PartitionKey, offset: i64, payload: &[u8], record: &dyn RecordMeta| {
                    let Some(backfill) = running.get_mut(key) else {
                        return;
                    };
                    let outcome =
                        backfill
                            .engine
                            .apply_record(key, offset, payload, record, clock.now_ms());
                    if let Outcome::Applied { event_time_ms, .. } = outcome {
                        if backfill.started.earliest > 0 {
                            let since = backfill.started.since_ms.get_or_insert(event_time_ms);
                            *since = (*since).min(event_time_ms);
                        }
                    }
                };
            // Up to a batch of messages a turn: the bookkeeping below is per turn.
            let mut polled = reader.poll(Duration::from_millis(100), &mut apply);
            for _ in 1..MESSAGES_PER_TURN {
                match polled {
                    Ok(true) => polled = reader.poll(Duration::ZERO, &mut apply),
                    _ => break,
                }
            }
            if let Err(error) = polled {
                error!(error = %error, "reading the history for a backfill failed; trying again");
                std::thread::sleep(Duration::from_secs(1));
            }
            let due = last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL;
            if due {
                last_checkpoint = Instant::now();
            }
            self.checkpoint(due);
            if last_log.elapsed() >= LOG_INTERVAL {
                last_log = Instant::now();
                for (key, progress) in &lock(&self.shared).progress {
                    info!(partition = %key, read = progress.next - progress.earliest,
                          of = progress.target - progress.earliest,
                          "backfilling the metrics added or changed from the partition's history");
                }
            }
        }
        self.checkpoint(true);
    }

    /// Starts the backfills newly wanted, stops those no longer wanted, moves targets.
    fn follow_wanted(&mut self, reader: &mut PartitionReader) {
        let (wanted, swapped) = {
            let mut shared = lock(&self.shared);
            (shared.wanted.clone(), std::mem::take(&mut shared.swapped))
        };
        for key in swapped {
            let _ = reader.stop(&key);
            self.running.remove(&key);
            if let Err(error) = self.store.clear_partition(&key) {
                error!(partition = %key, error = %error, "cannot drop a backfill swapped in from the backfill store");
            }
            let _ = std::fs::remove_file(started_path(&self.dir, &key));
        }
        let gone: Vec<PartitionKey> = self
            .running
            .keys()
            .filter(|key| !wanted.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            let _ = reader.stop(&key);
            if let Some(mut backfill) = self.running.remove(&key) {
                // The partition was given up: kept for a later take.
                let _ = self.store.write(&backfill.engine.take_changes());
            }
            lock(&self.shared).progress.remove(&key);
        }
        for (key, (metrics, target)) in wanted {
            match self.running.get_mut(&key) {
                Some(backfill) => {
                    if target > backfill.target {
                        backfill.target = target;
                        backfill.ready = false;
                        if let Err(error) = reader.set_target(&key, target) {
                            self.fail(&key, format!("cannot move the backfill's target: {error}"));
                        }
                    }
                }
                None => {
                    if let Err(message) = self.begin(reader, &key, metrics, target) {
                        self.fail(&key, message);
                    }
                }
            }
        }
    }

    fn fail(&mut self, key: &PartitionKey, message: String) {
        error!(partition = %key, error = %message, "backfill given up: the metrics added or changed stay partial");
        self.running.remove(key);
        let mut shared = lock(&self.shared);
        shared.wanted.remove(key);
        shared.progress.remove(key);
        shared.failed.push((key.clone(), message));
    }

    /// Starts or resumes a backfill: from the backfill store's copy when it was read for the
    /// same metrics, from the partition's first retained offset otherwise.
    fn begin(
        &mut self,
        reader: &mut PartitionReader,
        key: &PartitionKey,
        metrics: Vec<usize>,
        target: i64,
    ) -> Result<(), String> {
        let definitions: Vec<(String, String)> = metrics
            .iter()
            .map(|metric| {
                let def = &self.plan.metrics()[*metric];
                (def.name.clone(), format!("{def:?}"))
            })
            .collect();
        let (earliest, _) = reader
            .bounds(key)
            .map_err(|error| format!("cannot read the partition's offsets: {error}"))?;
        let state_failed = |error: nsm_state::StateError| format!("backfill store: {error}");
        let kept = read_started(&self.dir, key).filter(|started| started.metrics == definitions);
        let started = match kept {
            Some(started) => started,
            None => {
                self.store.clear_partition(key).map_err(state_failed)?;
                Started {
                    metrics: definitions,
                    earliest,
                    since_ms: None,
                }
            }
        };
        let mut engine = Engine::with_reader(
            self.plan.clone().keeping_only(&metrics),
            Box::new(self.store.clone()),
            self.memory_limit,
        );
        let snapshot = self.store.load_partition(key).map_err(state_failed)?;
        let resume_from = snapshot.next_offset;
        engine.restore_partition(key.clone(), snapshot);
        reader
            .start(key, resume_from, target)
            .map_err(|error| format!("cannot read the partition's history: {error}"))?;
        info!(partition = %key, from = resume_from.unwrap_or(earliest), to = target,
              metrics = ?started.metrics.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(),
              "backfill started: reading the partition's history for the metrics added or changed");
        write_started(&self.dir, key, &started)?;
        self.running.insert(
            key.clone(),
            Running {
                engine,
                target,
                started,
                ready: false,
            },
        );
        Ok(())
    }

    /// Writes the backfills' stores (all when `due`, else those that reached their target),
    /// and says where each stands.
    fn checkpoint(&mut self, due: bool) {
        let mut failed = Vec::new();
        for (key, backfill) in &mut self.running {
            if backfill.ready {
                continue;
            }
            let next = backfill
                .engine
                .next_offset(key)
                .unwrap_or(backfill.started.earliest);
            let reached = next >= backfill.target;
            if due || reached {
                let written = self
                    .store
                    .write(&backfill.engine.take_changes())
                    .map_err(|error| format!("backfill store: {error}"))
                    .and_then(|()| write_started(&self.dir, key, &backfill.started));
                if let Err(message) = written {
                    failed.push((key.clone(), message));
                    continue;
                }
                backfill.ready = reached;
            }
            lock(&self.shared).progress.insert(
                key.clone(),
                Progress {
                    earliest: backfill.started.earliest,
                    next,
                    target: backfill.target,
                    ready: backfill.ready,
                    since_ms: backfill.started.since_ms,
                },
            );
        }
        for (key, message) in failed {
            self.fail(&key, message);
        }
    }
}

fn started_path(dir: &Path, key: &PartitionKey) -> PathBuf {
    dir.join(format!("backfill-{}-{}.json", key.topic, key.partition))
}

fn read_started(dir: &Path, key: &PartitionKey) -> Option<Started> {
    let text = std::fs::read_to_string(started_path(dir, key)).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let metrics = value["metrics"]
        .as_array()?
        .iter()
        .map(|pair| Some((pair[0].as_str()?.to_string(), pair[1].as_str()?.to_string())))
        .collect::<Option<Vec<_>>>()?;
    Some(Started {
        metrics,
        earliest: value["earliest"].as_i64()?,
        since_ms: value["since_ms"].as_i64(),
    })
}

fn write_started(dir: &Path, key: &PartitionKey, started: &Started) -> Result<(), String> {
    let value = serde_json::json!({
        "metrics": started.metrics,
        "earliest": started.earliest,
        "since_ms": started.since_ms,
    });
    std::fs::write(started_path(dir, key), value.to_string())
        .map_err(|error| format!("cannot write the backfill's progress: {error}"))
}
