//! Backfill of metrics added or changed (docs/design/backfill.md).
//!
//! A partition taken with metrics that began late (`metric_since`) is computed again from the
//! retained history, on a thread of its own, by an engine of the whole plan keeping only those
//! metrics (`Plan::keeping_only`), into a store of its own beside the live one. An input
//! partition's backfill reads that partition; a repartition partition's reads every input
//! partition, judges each event as its source did and forwards in-process what reaches it,
//! for one group of re-keyed metrics at a time. Each source is read up to a target: the live
//! partition's next offset, or how far the repartition partition heard from that source
//! (its marks). Once the backfill holds every source at its target, the pipeline swaps the
//! metrics' data in on the consumer thread (`Pipeline::swap_backfill`). Its store is
//! checkpointed every few seconds, so a restart goes on from there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nsm_core::engine::{Engine, Epoch, Forwarded, Inputs, Outcome, Plan, Route};
use nsm_core::event::{NoRecord, RecordMeta};
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
/// How close to its live partition a backfill must be for the consumer to hold (the last
/// stretch read while nothing more is applied): at most this many offsets...
const CLOSE_OFFSETS: i64 = 20_000;
/// ...and no more than `state.backfill_rate` reads in this long, the most the consumer waits.
pub const CLOSE_PATIENCE: Duration = Duration::from_secs(10);

/// The backfill store's directory: beside the live one (`<state.path>-backfill`).
pub fn backfill_path(state: &Path) -> PathBuf {
    let name = state.file_name().map_or_else(
        || "state".into(),
        |name| name.to_string_lossy().into_owned(),
    );
    state.with_file_name(format!("{name}-backfill"))
}

/// The metrics of a partition taken whose data began late, to backfill now: an input
/// partition's metrics counted locally; a repartition partition's re-keyed metrics of one
/// group (the first; the others after its swap).
pub fn late_metrics(plan: &Plan, metric_since: &[(usize, i64)], repartition: bool) -> Vec<usize> {
    let routes = metric_since
        .iter()
        .map(|(metric, _)| (*metric, plan.route(*metric)));
    let mut metrics: Vec<usize> = if repartition {
        let first = routes
            .clone()
            .filter_map(|(_, route)| match route {
                Route::Rekeyed(group) => Some(group),
                Route::Local => None,
            })
            .min();
        routes
            .filter(|(_, route)| first.is_some_and(|first| *route == Route::Rekeyed(first)))
            .map(|(metric, _)| metric)
            .collect()
    } else {
        routes
            .filter(|(_, route)| *route == Route::Local)
            .map(|(metric, _)| metric)
            .collect()
    };
    metrics.sort_unstable();
    metrics.dedup();
    metrics
}

/// The repartition topic as a backfill forwards to it in-process.
#[derive(Debug, Clone)]
pub struct Rekeying {
    pub partitions: u32,
    /// Every input topic and its partitions, as forwarded records list them.
    pub inputs: String,
}

impl Rekeying {
    fn partition_of(&self, entity_hash: u64) -> i32 {
        i32::try_from(entity_hash % u64::from(self.partitions.max(1))).unwrap_or(0)
    }
}

/// Per source partition read: the offset to read up to.
pub type Targets = BTreeMap<PartitionKey, i64>;

/// What the runner says of a partition's backfill.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Over its sources: offsets of the history, read, and to read up to.
    pub earliest: i64,
    pub next: i64,
    pub target: i64,
    /// The backfill store holds the partition with every source at these targets, and the
    /// runner leaves it alone until a target moves or the swap is done.
    pub ready: Option<Targets>,
    /// From when its data is whole: `None` when every source's history starts at its first
    /// offset, else the time of the first event read from the one starting latest.
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
    /// Per partition to backfill: its metrics and its sources' targets. Set by the pipeline.
    wanted: HashMap<PartitionKey, (Vec<usize>, Targets)>,
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
    rate: Option<u32>,
    stop: Arc<AtomicBool>,
    runner: Option<JoinHandle<()>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a backfill runs on, beside its plan and store.
pub struct Setting {
    pub settings: ClientSettings,
    /// Bytes of per-entity entries each backfill's engine keeps in memory.
    pub memory_limit: usize,
    /// Events are judged by this clock, as the live pipeline judges them.
    pub clock: EventClock,
    /// `state.backfill_rate`: history messages read a second at most.
    pub rate: Option<u32>,
    /// The repartition topic, when some metrics are re-keyed.
    pub rekeying: Option<Rekeying>,
}

impl Backfills {
    /// Starts the runner over `store` (the backfill store at `dir`, opened with `plan`'s
    /// config).
    pub fn start(
        plan: Plan,
        store: Store,
        dir: PathBuf,
        setting: Setting,
    ) -> std::io::Result<Backfills> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let rate = setting.rate;
        let runner = Runner {
            shared: shared.clone(),
            store: store.clone(),
            dir,
            plan,
            stop: stop.clone(),
            running: HashMap::new(),
            pace: Pace::new(setting.rate),
            setting,
        };
        let thread = std::thread::Builder::new()
            .name("nsm-backfill".into())
            .spawn(move || runner.run())?;
        Ok(Backfills {
            shared,
            store,
            rate,
            stop,
            runner: Some(thread),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How far behind its live partition a backfill may be for the consumer to hold while it
    /// reads the rest: what it reads within [`CLOSE_PATIENCE`].
    pub fn close_offsets(&self) -> i64 {
        self.rate.map_or(CLOSE_OFFSETS, |rate| {
            (i64::from(rate) * CLOSE_PATIENCE.as_secs() as i64 / 2).clamp(1, CLOSE_OFFSETS)
        })
    }

    /// Backfills `metrics` of `key` from `targets`' sources, or moves its targets forward.
    pub fn want(&self, key: &PartitionKey, metrics: Vec<usize>, targets: Targets) {
        let mut shared = lock(&self.shared);
        match shared.wanted.get_mut(key) {
            Some((_, wanted)) => {
                for (source, target) in targets {
                    let at = wanted.entry(source).or_insert(target);
                    *at = (*at).max(target);
                }
            }
            None => {
                shared.wanted.insert(key.clone(), (metrics, targets));
            }
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
            .map(|(key, (metrics, targets))| {
                let progress = shared.progress.get(key).cloned().unwrap_or(Progress {
                    target: targets.values().sum(),
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
/// only with the same metrics, defined the same way, read from the same sources.
#[derive(Debug, PartialEq)]
struct Started {
    /// Each metric's definition, as its name and its `Debug` text.
    metrics: Vec<(String, String)>,
    /// Per source: its first retained offset when the backfill began, and, when that is not
    /// its first offset ever, the time of the first event read from it.
    sources: BTreeMap<PartitionKey, (i64, Option<i64>)>,
}

impl Started {
    fn since_ms(&self) -> Option<i64> {
        self.sources
            .values()
            .filter(|(earliest, _)| *earliest > 0)
            .filter_map(|(_, first)| *first)
            .max()
    }
}

/// A backfill under way, with a reader of its own.
struct Running {
    engine: Engine,
    reader: PartitionReader,
    /// Per source read: the key the engine holds it under (itself for an input partition's
    /// backfill; a name of the backfill's own for a repartition partition's, so that two
    /// backfills reading one source do not share its state), and its target.
    sources: BTreeMap<PartitionKey, (PartitionKey, i64)>,
    /// For a repartition partition: the group of its metrics.
    group: Option<usize>,
    started: Started,
    /// Written to the store at the targets: left alone until one moves.
    ready: bool,
}

/// The key a repartition partition's backfill holds `source` under: `@` is in no topic name.
fn held_as(key: &PartitionKey, source: &PartitionKey) -> PartitionKey {
    PartitionKey::new(
        format!("{}@{}/{}", source.topic, key.topic, key.partition),
        source.partition,
    )
}

impl Running {
    fn at(&self, source: &PartitionKey) -> i64 {
        let (held, _) = &self.sources[source];
        self.engine.next_offset(held).unwrap_or_else(|| {
            self.started
                .sources
                .get(source)
                .map_or(0, |(earliest, _)| *earliest)
        })
    }

    fn reached(&self) -> bool {
        self.sources
            .iter()
            .all(|(source, (_, target))| self.at(source) >= *target)
    }

    fn progress(&self) -> Progress {
        let earliest = self
            .started
            .sources
            .values()
            .map(|(earliest, _)| earliest)
            .sum();
        Progress {
            earliest,
            next: self.sources.keys().map(|source| self.at(source)).sum(),
            target: self.sources.values().map(|(_, target)| target).sum(),
            ready: self.ready.then(|| {
                self.sources
                    .iter()
                    .map(|(source, (_, target))| (source.clone(), *target))
                    .collect()
            }),
            since_ms: self.started.since_ms(),
        }
    }

    /// Reads and applies up to `budget` messages; how many it read.
    fn read(
        &mut self,
        key: &PartitionKey,
        budget: usize,
        plan: &Plan,
        rekeying: Option<&Rekeying>,
        now_ms: i64,
    ) -> Result<usize, String> {
        let Running {
            engine,
            reader,
            sources,
            group,
            started,
            ..
        } = self;
        let mut apply = |source: &PartitionKey,
                         offset: i64,
                         payload: &[u8],
                         record: &dyn RecordMeta| {
            let Some((held, _)) = sources.get(source) else {
                return;
            };
            let outcome = engine.apply_record(held, offset, payload, record, now_ms);
            let Outcome::Applied {
                event_time_ms,
                forward,
                ..
            } = outcome
            else {
                return;
            };
            if let Some((earliest, first)) = started.sources.get_mut(source) {
                if *earliest > 0 {
                    *first = Some(first.map_or(event_time_ms, |first| first.min(event_time_ms)));
                }
            }
            let (Some(group), Some(rekeying)) = (*group, rekeying) else {
                return;
            };
            for (forwarded_group, entity_hash) in forward.0 {
                if forwarded_group == group && rekeying.partition_of(entity_hash) == key.partition {
                    let (watermark_ms, clock_ms) = engine.source_time(held);
                    let at = engine.next_offset(key).unwrap_or(0);
                    let forwarded = Forwarded {
                        group,
                        group_field: plan.rekey_name(group),
                        topic: &source.topic,
                        partition: source.partition,
                        offset,
                        epoch: Epoch::default(),
                        watermark_ms,
                        clock_ms,
                        topics: Inputs::parse(&rekeying.inputs).unwrap_or_default(),
                    };
                    engine.apply_forwarded(key, at, payload, record, &forwarded, now_ms);
                }
            }
        };
        let mut read = 0;
        while read < budget {
            match reader.poll(Duration::ZERO, &mut apply) {
                Ok(true) => read += 1,
                Ok(false) => break,
                Err(error) => return Err(error.to_string()),
            }
        }
        Ok(read)
    }

    /// A repartition partition's backfill hears every source's time, as the live one hears
    /// it from records of time alone.
    fn hear_time(
        &mut self,
        key: &PartitionKey,
        plan: &Plan,
        rekeying: Option<&Rekeying>,
        now_ms: i64,
    ) {
        let (Some(group), Some(rekeying)) = (self.group, rekeying) else {
            return;
        };
        for source in self.sources.keys() {
            let held = &self.sources[source].0;
            let (watermark_ms, clock_ms) = self.engine.source_time(held);
            let forwarded = Forwarded {
                group,
                group_field: plan.rekey_name(group),
                topic: &source.topic,
                partition: source.partition,
                offset: self.at(source),
                epoch: Epoch::default(),
                watermark_ms,
                clock_ms,
                topics: Inputs::parse(&rekeying.inputs).unwrap_or_default(),
            };
            let at = self.engine.next_offset(key).unwrap_or(0);
            self.engine
                .apply_forwarded(key, at, &[], &NoRecord::default(), &forwarded, now_ms);
        }
    }
}

struct Runner {
    shared: Arc<Mutex<Shared>>,
    store: Store,
    dir: PathBuf,
    plan: Plan,
    stop: Arc<AtomicBool>,
    running: HashMap<PartitionKey, Running>,
    pace: Pace,
    setting: Setting,
}

/// Keeps a backfill's reading under `state.backfill_rate`: messages read are paid for by the
/// time passed since the runner had work, and a quiet spell earns at most one turn ahead.
struct Pace {
    rate: Option<u32>,
    since: Instant,
    read: u64,
}

impl Pace {
    fn new(rate: Option<u32>) -> Pace {
        Pace {
            rate,
            since: Instant::now(),
            read: 0,
        }
    }

    /// How many messages may be read now, at most `turn`.
    fn allowed(&mut self, turn: usize) -> usize {
        let Some(rate) = self.rate else {
            return turn;
        };
        let earned = (self.since.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        self.read = self.read.max(earned.saturating_sub(turn as u64));
        (earned - self.read.min(earned)).min(turn as u64) as usize
    }

    fn paid(&mut self, messages: usize) {
        self.read += messages as u64;
    }
}

impl Runner {
    fn run(mut self) {
        let mut last_checkpoint = Instant::now();
        let mut last_log = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            self.follow_wanted();
            if self.running.is_empty() {
                self.pace = Pace::new(self.pace.rate);
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            // Up to a batch of messages a turn over every backfill: the bookkeeping below is
            // per turn.
            let mut allowed = self.pace.allowed(MESSAGES_PER_TURN);
            let mut read = 0;
            let now_ms = self.setting.clock.now_ms();
            let mut failed = Vec::new();
            // An even share each, so that every partition's backfill moves.
            let share = (allowed / self.running.len()).max(1);
            for (key, backfill) in &mut self.running {
                if allowed == 0 {
                    break;
                }
                match backfill.read(
                    key,
                    share.min(allowed),
                    &self.plan,
                    self.setting.rekeying.as_ref(),
                    now_ms,
                ) {
                    Ok(count) => {
                        read += count;
                        allowed -= count;
                    }
                    Err(message) => failed.push((key.clone(), message)),
                }
            }
            self.pace.paid(read);
            for (key, message) in failed {
                error!(partition = %key, error = %message, "reading the history for a backfill failed; trying again");
            }
            if read == 0 {
                std::thread::sleep(Duration::from_millis(20));
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
                          "backfilling the metrics added or changed from the history");
                }
            }
        }
        self.checkpoint(true);
    }

    /// Starts the backfills newly wanted, stops those no longer wanted, moves targets.
    fn follow_wanted(&mut self) {
        let (wanted, swapped) = {
            let mut shared = lock(&self.shared);
            (shared.wanted.clone(), std::mem::take(&mut shared.swapped))
        };
        for key in swapped {
            if let Some(backfill) = self.running.remove(&key) {
                let held: Vec<PartitionKey> = backfill
                    .sources
                    .values()
                    .map(|(held, _)| held.clone())
                    .collect();
                for partition in held.iter().chain(std::iter::once(&key)) {
                    if let Err(error) = self.store.clear_partition(partition) {
                        error!(partition = %key, error = %error, "cannot drop a backfill swapped in from the backfill store");
                    }
                }
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
            if let Some(mut backfill) = self.running.remove(&key) {
                // The partition was given up: kept for a later take.
                let _ = self.store.write(&backfill.engine.take_changes());
            }
            lock(&self.shared).progress.remove(&key);
        }
        for (key, (metrics, targets)) in wanted {
            match self.running.get_mut(&key) {
                Some(backfill) => {
                    let mut moved = Ok(());
                    for (source, target) in targets {
                        let Some((_, at)) = backfill.sources.get_mut(&source) else {
                            continue;
                        };
                        if target > *at {
                            *at = target;
                            backfill.ready = false;
                            moved = moved.and(backfill.reader.set_target(&source, target));
                        }
                    }
                    if let Err(error) = moved {
                        self.fail(&key, format!("cannot move the backfill's target: {error}"));
                    }
                }
                None => {
                    if let Err(message) = self.begin(&key, metrics, targets) {
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
    /// same metrics from the same sources, from each source's first retained offset otherwise.
    fn begin(
        &mut self,
        key: &PartitionKey,
        metrics: Vec<usize>,
        targets: Targets,
    ) -> Result<(), String> {
        let definitions: Vec<(String, String)> = metrics
            .iter()
            .map(|metric| {
                let def = &self.plan.metrics()[*metric];
                (def.name.clone(), format!("{def:?}"))
            })
            .collect();
        let group = match metrics.first().map(|metric| self.plan.route(*metric)) {
            Some(Route::Rekeyed(group)) => Some(group),
            _ => None,
        };
        // A Kafka client per backfill, only once one is wanted: most starts need none.
        let mut reader = PartitionReader::new(&self.setting.settings)
            .map_err(|error| format!("cannot start the backfill's reader: {error}"))?;
        let held = |source: &PartitionKey| match group {
            Some(_) => held_as(key, source),
            None => source.clone(),
        };
        let kept = read_started(&self.dir, key).filter(|started| {
            started.metrics == definitions && started.sources.keys().eq(targets.keys())
        });
        let state_failed = |error: nsm_state::StateError| format!("backfill store: {error}");
        let started = match kept {
            Some(started) => started,
            None => {
                self.store.clear_partition(key).map_err(state_failed)?;
                let mut sources = BTreeMap::new();
                for source in targets.keys() {
                    self.store
                        .clear_partition(&held(source))
                        .map_err(state_failed)?;
                    let (earliest, _) = reader.bounds(source).map_err(|error| {
                        format!("cannot read the offsets of partition {source}: {error}")
                    })?;
                    sources.insert(source.clone(), (earliest, None));
                }
                Started {
                    metrics: definitions,
                    sources,
                }
            }
        };
        let mut engine = Engine::with_reader(
            self.plan.clone().keeping_only(&metrics),
            Box::new(self.store.clone()),
            self.setting.memory_limit,
        );
        let mut sources = BTreeMap::new();
        let mut from = Vec::new();
        for (source, target) in &targets {
            let held = held(source);
            let snapshot = self.store.load_partition(&held).map_err(state_failed)?;
            let resume_from = snapshot.next_offset;
            if held != *key {
                engine.restore_partition(held.clone(), snapshot);
            }
            reader
                .start(source, resume_from, *target)
                .map_err(|error| {
                    format!("cannot read the history of partition {source}: {error}")
                })?;
            from.push(resume_from.unwrap_or(started.sources[source].0));
            sources.insert(source.clone(), (held, *target));
        }
        engine.restore_partition(
            key.clone(),
            self.store.load_partition(key).map_err(state_failed)?,
        );
        info!(partition = %key, from = from.iter().sum::<i64>(), to = targets.values().sum::<i64>(),
              sources = targets.len(),
              metrics = ?started.metrics.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(),
              "backfill started: reading the history for the metrics added or changed");
        write_started(&self.dir, key, &started)?;
        self.running.insert(
            key.clone(),
            Running {
                engine,
                reader,
                sources,
                group,
                started,
                ready: false,
            },
        );
        Ok(())
    }

    /// Writes the backfills' stores (all when `due`, else those that reached their targets),
    /// and says where each stands.
    fn checkpoint(&mut self, due: bool) {
        let mut failed = Vec::new();
        let now_ms = self.setting.clock.now_ms();
        for (key, backfill) in &mut self.running {
            if backfill.ready {
                continue;
            }
            let reached = backfill.reached();
            if due || reached {
                backfill.hear_time(key, &self.plan, self.setting.rekeying.as_ref(), now_ms);
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
            lock(&self.shared)
                .progress
                .insert(key.clone(), backfill.progress());
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
    let sources = value["sources"]
        .as_array()?
        .iter()
        .map(|source| {
            let key = PartitionKey::new(
                source[0].as_str()?,
                i32::try_from(source[1].as_i64()?).ok()?,
            );
            Some((key, (source[2].as_i64()?, source[3].as_i64())))
        })
        .collect::<Option<BTreeMap<_, _>>>()?;
    Some(Started { metrics, sources })
}

fn write_started(dir: &Path, key: &PartitionKey, started: &Started) -> Result<(), String> {
    let sources: Vec<serde_json::Value> = started
        .sources
        .iter()
        .map(|(source, (earliest, first))| {
            serde_json::json!([&*source.topic, source.partition, earliest, first])
        })
        .collect();
    let value = serde_json::json!({
        "metrics": started.metrics,
        "sources": sources,
    });
    std::fs::write(started_path(dir, key), value.to_string())
        .map_err(|error| format!("cannot write the backfill's progress: {error}"))
}
