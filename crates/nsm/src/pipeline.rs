//! The pipeline behind the consumer: the core engine, the state store and the exposition,
//! wired together. It implements the Kafka crate's `PartitionHandler`.
//!
//! Order of effects at each checkpoint: changes are sent to the changelog topic (when there is
//! one) and acknowledged, then written to RocksDB (state and offsets in one batch), and only
//! then are values published to `/metrics` and offsets committed to the group. What
//! `/metrics` shows has therefore always been made durable first.
//!
//! A checkpoint is stored on a thread of its own while the consumer goes on applying events
//! (waiting for the broker's acknowledgements and writing RocksDB took 40% of the consumer's
//! time when it waited for them). At most one is in flight: the next checkpoint, a rebalance
//! and the shutdown wait for it first. The values it publishes are those of its changes,
//! computed when they were taken, not the engine's later ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nsm_core::engine::{
    Engine, Epoch, Forwarded, MetricValues, Outcome, PartitionSnapshot, PartitionStatus, Plan,
    Route,
};
use nsm_core::event::RecordMeta;
use nsm_core::reject::{RejectReason, Rejection};
use nsm_core::PartitionKey;
use nsm_http::{
    BatchCounts, DeadLetterCounts, Liveness, OffsetSkip, Published, Readiness, Telemetry, Watch,
};
use nsm_kafka::{
    DeadLetterStats, Disposition, Forward, HandlerError, PartitionHandler, PartitionLag, Restore,
};
use nsm_state::Store;
use tracing::{error, info, warn};

use crate::backfill::{
    late_metrics, Backfills, Targets, CLOSE_PATIENCE as BACKFILL_CLOSE_PATIENCE,
};
use crate::changelog::Changelog;
use crate::clock::EventClock;
use crate::repartition::{AsOriginal, Origin, Received, Repartition};

/// How many event latencies to keep between publishes; beyond, every n-th is kept.
const MAX_LATENCY_SAMPLES: usize = 50_000;
/// How often idle partitions are checked.
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often the owned input partitions' time goes to every repartition partition at most.
const TIME_RECORD_INTERVAL: Duration = Duration::from_secs(1);

pub use crate::clock::wall_clock_ms;

pub struct Pipeline {
    engine: Engine,
    store: Store,
    changelog: Option<Arc<Changelog>>,
    /// What event time is judged by: the wall clock, or the demo's faster one.
    clock: EventClock,
    /// The checkpoint being stored, if any.
    in_flight: Option<InFlight>,
    /// Offsets of the checkpoints stored since the consumer last asked, to commit to the group.
    stored_offsets: Vec<(PartitionKey, i64)>,
    /// Partitions given up whose frames are still the checkpoint's in flight: released from
    /// the changelog's protocol once it settles.
    to_release: Vec<PartitionKey>,
    /// Whether the last statistics showed a connected broker (to log changes only).
    kafka_reachable: bool,
    /// Set when stored state could not be read or a write failed: nothing more is stored,
    /// the consumer stops.
    failure: Option<String>,
    telemetry: Arc<Telemetry>,
    published: Arc<RwLock<Published>>,
    readiness: Arc<Readiness>,
    dead_letter_stats: Arc<DeadLetterStats>,
    idle_timeout: Duration,
    last_message: HashMap<PartitionKey, Instant>,
    /// The last consumer lag reported per partition: one with messages waiting is behind,
    /// not idle, however long it has gone without a message.
    lag: HashMap<PartitionKey, i64>,
    last_idle_check: Instant,
    consumed: HashMap<PartitionKey, u64>,
    rejected: HashMap<RejectReason, u64>,
    /// The consumer loop's turns, for `/healthz`: marked at every tick.
    loop_watch: Arc<Watch>,
    /// The checkpoint writer's writes, for `/healthz`.
    writer_watch: Arc<Watch>,
    /// Offsets never applied since the last publish, by why.
    skipped: HashMap<OffsetSkip, u64>,
    duplicates: u64,
    /// Records sent to the repartition topic since the last publish.
    forwarded: u64,
    produced_times_ms: Vec<i64>,
    latency_sample_every: usize,
    messages_since_publish: usize,
    last_warned: HashMap<RejectReason, Instant>,
    /// The last line logged of each partition's skipped offsets, and the jumps and offsets
    /// skipped since.
    skip_logged: HashMap<(OffsetSkip, PartitionKey), (Instant, u64, u64)>,
    /// The repartition topic, when metrics count another entity than the message key.
    repartition: Option<Repartition>,
    /// Per owned input partition: this instance's epoch as its owner (see
    /// `nsm_core::engine::upstream`).
    epochs: HashMap<PartitionKey, Epoch>,
    last_time_records: Option<Instant>,
    /// The backfills of metrics added or changed (docs/design/backfill.md).
    backfills: Option<Backfills>,
    /// Owned partitions with metrics to backfill, wanted from the runner once their targets
    /// are known (a repartition partition's, once every source was heard from).
    late: HashMap<PartitionKey, Vec<usize>>,
    /// The backfill the consumer waits for (it holds), since when; and those that made it
    /// wait too long, not waited for again until then.
    closing: Option<(PartitionKey, Instant)>,
    close_again_after: HashMap<PartitionKey, Instant>,
}

/// A checkpoint being stored on its own thread, and what to publish once it is.
struct InFlight {
    writer: JoinHandle<Result<(), String>>,
    /// Set by the writer as it ends, so that a consumer waiting for it wakes at once.
    ended: Arc<Ended>,
    publish: Snapshot,
    /// Partitions were given up while it was stored: its values still hold them.
    released: bool,
}

impl InFlight {
    fn is_finished(&self) -> bool {
        // The flag, or a writer that panicked before setting it.
        self.ended.is_set() || self.writer.is_finished()
    }
}

/// A flag a checkpoint writer sets as it ends, waited on without polling. Read without a lock:
/// the consumer asks after every poll whether a checkpoint is still being written.
#[derive(Default)]
struct Ended {
    flag: AtomicBool,
    lock: Mutex<()>,
    signal: Condvar,
}

impl Ended {
    fn set(&self) {
        self.flag.store(true, Ordering::Release);
        // Under the lock, so that a waiter between its check and its wait is not missed.
        let _locked = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.signal.notify_all();
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Waits until the flag is set or `patience` has passed.
    fn wait(&self, patience: Duration) {
        let locked = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = self
            .signal
            .wait_timeout_while(locked, patience, |_| !self.is_set())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
}

/// What a checkpoint makes visible once stored, taken with its changes.
struct Snapshot {
    now_ms: i64,
    values: Vec<MetricValues>,
    partitions: Vec<PartitionStatus>,
    resident_members: usize,
    consumed: Vec<(PartitionKey, u64)>,
    rejected: Vec<(RejectReason, u64)>,
    skipped: Vec<(OffsetSkip, u64)>,
    duplicates: u64,
    forwarded: u64,
    produced_times_ms: Vec<i64>,
}

impl Snapshot {
    /// The next offset of each partition, to commit to the group.
    fn offsets(&self) -> Vec<(PartitionKey, i64)> {
        self.partitions
            .iter()
            .filter_map(|status| {
                status
                    .next_offset
                    .map(|offset| (status.key.clone(), offset))
            })
            .collect()
    }
}

/// At most one log line per rejection reason in this interval; counters carry the rest.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// At most one log line per partition and kind of skipped offsets in this interval (a
/// transactional topic has a gap after every transaction); counters carry the rest.
const SKIP_LOG_INTERVAL: Duration = Duration::from_secs(60);

pub struct PipelineParts {
    pub plan: Plan,
    pub store: Store,
    pub changelog: Option<Changelog>,
    pub telemetry: Arc<Telemetry>,
    pub published: Arc<RwLock<Published>>,
    pub readiness: Arc<Readiness>,
    pub dead_letter_stats: Arc<DeadLetterStats>,
    pub idle_timeout: Duration,
    /// `state.flush_max_entries`: a checkpoint is due once this many entries wait.
    pub flush_max_entries: usize,
    /// `state.memory_limit`: bytes of entries kept in memory.
    pub memory_limit: usize,
    /// `/healthz` fails when a turn of the consumer loop or a checkpoint write lasts longer
    /// than `stuck_after`.
    pub liveness: Arc<Liveness>,
    pub stuck_after: Duration,
    pub clock: EventClock,
    pub repartition: Option<Repartition>,
    pub backfills: Option<Backfills>,
}

impl Pipeline {
    pub fn new(parts: PipelineParts) -> Pipeline {
        Pipeline {
            // Entries past the memory limit are read from the store: memory stays bounded
            // whatever the users.
            engine: Engine::with_reader(
                parts.plan,
                Box::new(parts.store.clone()),
                parts.memory_limit,
            )
            .with_max_checkpoint_entries(parts.flush_max_entries),
            store: parts.store,
            changelog: parts.changelog.map(Arc::new),
            clock: parts.clock,
            in_flight: None,
            stored_offsets: Vec::new(),
            to_release: Vec::new(),
            kafka_reachable: true,
            failure: None,
            telemetry: parts.telemetry,
            published: parts.published,
            readiness: parts.readiness,
            dead_letter_stats: parts.dead_letter_stats,
            idle_timeout: parts.idle_timeout,
            last_message: HashMap::new(),
            lag: HashMap::new(),
            last_idle_check: Instant::now(),
            consumed: HashMap::new(),
            rejected: HashMap::new(),
            skipped: HashMap::new(),
            loop_watch: parts.liveness.watch("the consumer loop", parts.stuck_after),
            writer_watch: parts
                .liveness
                .watch("the checkpoint writer", parts.stuck_after),
            duplicates: 0,
            forwarded: 0,
            produced_times_ms: Vec::new(),
            latency_sample_every: 1,
            messages_since_publish: 0,
            last_warned: HashMap::new(),
            skip_logged: HashMap::new(),
            repartition: parts.repartition,
            epochs: HashMap::new(),
            last_time_records: None,
            backfills: parts.backfills,
            late: HashMap::new(),
            closing: None,
            close_again_after: HashMap::new(),
        }
    }

    /// Whether `key` is a partition of the repartition topic.
    fn is_repartition(&self, key: &PartitionKey) -> bool {
        self.repartition
            .as_ref()
            .is_some_and(|repartition| *repartition.topic == *key.topic)
    }

    /// Applies a record of the repartition topic to the metrics of its group.
    fn apply_received(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        payload: &[u8],
        record: &dyn RecordMeta,
    ) -> Outcome {
        let Some(received) = Received::read(record) else {
            return Outcome::Rejected(Rejection::new(
                RejectReason::MissingField,
                "a record of the repartition topic without nsm's headers (nsm-rekey, nsm-from, \
                 nsm-at, nsm-inputs): not forwarded by nsm"
                    .to_string(),
            ));
        };
        let now_ms = self.clock.now_ms();
        let original = AsOriginal(record);
        let outcome = match self.engine.plan().rekey_group(received.group_field) {
            Some(group) => self.engine.apply_forwarded(
                key,
                offset,
                payload,
                &original,
                &received.forwarded(group),
                now_ms,
            ),
            // No metric counts that field any more: only the source's time is taken, under no
            // group (its mark would say the event counted).
            None => self.engine.apply_forwarded(
                key,
                offset,
                &[],
                &original,
                &Forwarded {
                    group_field: "",
                    ..received.forwarded(0)
                },
                now_ms,
            ),
        };
        match outcome {
            // A copy reaches a partition per group it is forwarded for, and is skipped in
            // each: it counts as one duplicate, on its first record.
            Outcome::Duplicate { .. } if !received.first => Outcome::AlreadyApplied,
            outcome => outcome,
        }
    }

    /// The records forwarding an event of input partition `key` to the repartition topic.
    fn forwards_of(
        &self,
        key: &PartitionKey,
        offset: i64,
        payload: &[u8],
        record: &dyn RecordMeta,
        forward: &[(usize, u64)],
    ) -> Vec<Forward> {
        let Some(repartition) = &self.repartition else {
            return Vec::new();
        };
        let (watermark_ms, clock_ms) = self.engine.source_time(key);
        let origin = Origin {
            partition: key.partition,
            offset,
            epoch: self.epochs.get(key).copied().unwrap_or_default(),
            watermark_ms,
            clock_ms,
        };
        forward
            .iter()
            .enumerate()
            .map(|(index, (group, hash))| {
                repartition.record(
                    repartition.partition_of(*hash),
                    *hash,
                    Some(*group),
                    index == 0,
                    &key.topic,
                    &origin,
                    payload,
                    record,
                )
            })
            .collect()
    }

    /// Forgets partitions given up, their offsets to commit too: the group may have handed
    /// them to another instance, whose committed offsets must not be moved back.
    fn release(&mut self, partitions: &[PartitionKey]) {
        if let Some(in_flight) = &mut self.in_flight {
            in_flight.released = true;
        }
        self.to_release.extend(partitions.iter().cloned());
        if self.in_flight.is_none() {
            self.release_frames();
        }
        for key in partitions {
            if let Some(backfills) = &self.backfills {
                backfills.forget(key);
                self.telemetry.forget_backfill(key);
            }
            self.late.remove(key);
            if self
                .closing
                .as_ref()
                .is_some_and(|(closing, _)| closing == key)
            {
                self.closing = None;
            }
            self.engine.remove_partition(key);
            self.epochs.remove(key);
            self.last_message.remove(key);
            self.lag.remove(key);
            self.telemetry.forget_restore(key);
        }
        self.skip_logged
            .retain(|(_, key), _| !partitions.contains(key));
        self.stored_offsets
            .retain(|(key, _)| !partitions.contains(key));
        self.publish_now();
    }

    /// Stops writing frames of the partitions given up, once no write of them is in flight.
    fn release_frames(&mut self) {
        let released = std::mem::take(&mut self.to_release);
        if let Some(changelog) = &self.changelog {
            changelog.release(&released);
        }
    }

    /// Takes the changes since the last checkpoint and starts storing them on a thread of
    /// their own; publishes at once when there are none. Waits for the checkpoint in flight
    /// first.
    fn persist(&mut self) -> Result<(), HandlerError> {
        self.settle()?;
        if let Some(failure) = &self.failure {
            // A partition may hold a half-applied event, or a batch was lost: store nothing
            // more, stop, and let the restart resume from the last whole state.
            return Err(HandlerError(failure.clone()));
        }
        // The checkpoint in flight is settled, so the shards due are those of the next one.
        let changes = match &self.changelog {
            Some(changelog) => self
                .engine
                .take_changes_with_snapshots(|key| changelog.member_shards_due(key)),
            None => self.engine.take_changes(),
        };
        let publish = self.snapshot();
        if changes.is_empty() {
            // The engine's state is the stored state.
            self.stored_offsets = publish.offsets();
            self.publish(publish, true);
            return Ok(());
        }
        let store = self.store.clone();
        let changelog = self.changelog.clone();
        let telemetry = self.telemetry.clone();
        let ended = Arc::new(Ended::default());
        let ends = ended.clone();
        let writer = std::thread::Builder::new()
            .name("nsm-checkpoint".into())
            .spawn(move || {
                let started = Instant::now();
                let result = match changelog.as_deref() {
                    Some(changelog) => changelog
                        .write(&store, &changes)
                        .map(|records| telemetry.record_changelog(records)),
                    None => write_alone(&store, |store| Ok((store.prepare(&changes), ()))),
                };
                telemetry.record_checkpoint(started.elapsed().as_secs_f64(), result.is_ok());
                ends.set();
                result
            })
            .map_err(|error| self.failed(format!("cannot start the checkpoint writer: {error}")))?;
        self.writer_watch.busy();
        self.in_flight = Some(InFlight {
            writer,
            ended,
            publish,
            released: false,
        });
        Ok(())
    }

    /// Whether a checkpoint is being written still.
    fn writing(&self) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|in_flight| !in_flight.is_finished())
    }

    /// Stores the changes since the last checkpoint before returning.
    fn persist_now(&mut self) -> Result<(), HandlerError> {
        self.persist()?;
        self.settle()
    }

    /// Waits for the checkpoint in flight, if any, and publishes what it stored. Partitions
    /// given up meanwhile are neither shown again nor committed: the values shown stay those
    /// published when they were given up until the next checkpoint, and its counts are taken.
    fn settle(&mut self) -> Result<(), HandlerError> {
        let Some(InFlight {
            writer,
            publish,
            released,
            ..
        }) = self.in_flight.take()
        else {
            return Ok(());
        };
        let waiting = Instant::now();
        let result = writer
            .join()
            .unwrap_or_else(|_| Err("the checkpoint writer panicked".to_string()));
        self.release_frames();
        self.writer_watch.idle();
        self.telemetry
            .record_checkpoint_wait(waiting.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                self.stored_offsets = publish.offsets();
                if released {
                    self.stored_offsets.retain(|(key, _)| self.engine.owns(key));
                }
                self.publish(publish, !released);
                Ok(())
            }
            Err(message) => Err(self.failed(message)),
        }
    }

    /// A write failed: nothing more is stored, and nsm stops, so nothing is shown that is not
    /// stored. Its partitions are withdrawn from `/metrics` at once: they are about to move,
    /// and when the write failed because this instance is cut off from the brokers, the group
    /// may give them to another instance before nsm has stopped (leaving the group waits for
    /// the coordinator).
    fn failed(&mut self, message: String) -> HandlerError {
        error!(error = %message, "cannot write state; stopping so nothing is shown that is not stored");
        self.readiness.set_not_ready(message.clone());
        self.failure.get_or_insert(message.clone());
        let owned: Vec<PartitionKey> = self
            .engine
            .partition_status()
            .into_iter()
            .map(|status| status.key)
            .collect();
        self.release(&owned);
        HandlerError(message)
    }

    /// What the engine shows now, with the counts since the last one, to publish once stored.
    fn snapshot(&mut self) -> Snapshot {
        let now_ms = self.clock.now_ms();
        self.latency_sample_every = 1;
        self.messages_since_publish = 0;
        Snapshot {
            now_ms,
            values: self.engine.metric_values(now_ms),
            partitions: self.engine.partition_status(),
            resident_members: self.engine.resident_members(),
            consumed: self.consumed.drain().collect(),
            rejected: self.rejected.drain().collect(),
            skipped: self.skipped.drain().collect(),
            duplicates: std::mem::take(&mut self.duplicates),
            forwarded: std::mem::take(&mut self.forwarded),
            produced_times_ms: std::mem::take(&mut self.produced_times_ms),
        }
    }

    /// Makes stored values visible (with `with_values` false, only the snapshot's counts).
    fn publish(&mut self, snapshot: Snapshot, with_values: bool) {
        let Snapshot {
            now_ms,
            values,
            partitions,
            resident_members,
            consumed,
            rejected,
            skipped,
            duplicates,
            forwarded,
            produced_times_ms,
        } = snapshot;
        if with_values {
            self.telemetry
                .publish_values(self.engine.plan(), &values, now_ms);
            self.telemetry.publish_partitions(&partitions);
            self.telemetry
                .record_state_entries_in_memory(resident_members);
            self.published
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .partitions = partitions;
        }

        let visible_ms = wall_clock_ms();
        let counts = BatchCounts {
            consumed,
            rejected,
            skipped,
            duplicates,
            forwarded,
            visible_latencies_seconds: produced_times_ms
                .into_iter()
                .map(|produced_ms| (visible_ms - produced_ms).max(0) as f64 / 1000.0)
                .collect(),
        };
        self.telemetry.record_batch(&counts);
        self.record_dead_letters();
    }

    fn record_dead_letters(&self) {
        let stats = &self.dead_letter_stats;
        self.telemetry.record_dead_letters(DeadLetterCounts {
            delivered: stats.delivered.load(Ordering::Relaxed),
            failed: stats.failed.load(Ordering::Relaxed),
            dropped: stats.dropped.load(Ordering::Relaxed),
            held: stats.held.load(Ordering::Relaxed),
        });
    }

    /// A message of `key` at `offset` when the engine expected `next`: offsets were skipped.
    /// Counted, and logged once per partition and kind a minute with what was left out since.
    fn offsets_skipped(&mut self, key: &PartitionKey, next: i64, offset: i64) {
        let (kind, count) = if offset > next {
            (OffsetSkip::Gap, offset - next)
        } else {
            (OffsetSkip::Rewound, 1)
        };
        let count = u64::try_from(count).unwrap_or(0);
        *self.skipped.entry(kind).or_default() += count;
        let now = Instant::now();
        let logged = self.skip_logged.get_mut(&(kind, key.clone()));
        let (jumps_left_out, offsets_left_out) = match logged {
            Some((at, jumps, offsets)) if now.duration_since(*at) < SKIP_LOG_INTERVAL => {
                *jumps += 1;
                *offsets += count;
                return;
            }
            Some((at, jumps, offsets)) => {
                *at = now;
                (std::mem::take(jumps), std::mem::take(offsets))
            }
            None => {
                self.skip_logged.insert((kind, key.clone()), (now, 0, 0));
                (0, 0)
            }
        };
        match kind {
            OffsetSkip::Gap => warn!(
                partition = %key, from = next, to = offset - 1, skipped = count,
                earlier_gaps_not_logged = jumps_left_out, offsets_in_them = offsets_left_out,
                "offsets skipped: the partition went on at a later offset than the next one nsm \
                 expected (deleted by retention before nsm read them, or compaction or \
                 transaction markers); counted in nsm_offsets_skipped_total{{reason=\"gap\"}}, \
                 further gaps of this partition are logged at most once a minute"
            ),
            OffsetSkip::Rewound => warn!(
                partition = %key, offset, stored_offset = next,
                earlier_messages_not_logged = offsets_left_out,
                "the partition's log went back below its stored offset (the topic was deleted \
                 and recreated, or truncated): its messages below the stored offset are skipped \
                 as already applied and counted in \
                 nsm_offsets_skipped_total{{reason=\"rewound\"}}; see docs/configuration.md, \
                 \"Where reading starts, and offsets nsm skips\""
            ),
        }
    }

    /// The repartition topic and its metrics' names, when backfills run: a partition of it
    /// starting empty has them backfilled.
    fn rekeyed_to_backfill(&self) -> Option<(String, Vec<String>)> {
        let repartition = self
            .repartition
            .as_ref()
            .filter(|_| self.backfills.is_some())?;
        let plan = self.engine.plan();
        let metrics = (0..plan.metrics().len())
            .filter(|metric| matches!(plan.route(*metric), Route::Rekeyed(_)))
            .map(|metric| plan.metrics()[metric].name.clone())
            .collect();
        Some((repartition.topic.clone(), metrics))
    }

    /// Where a backfill of `metrics` into `key` reads each source up to: an input partition's
    /// next offset; for a repartition partition, how far it heard from each source for the
    /// metrics' group (`None` until every source was heard from).
    fn live_targets(&self, key: &PartitionKey, metrics: &[usize]) -> Option<Targets> {
        if !self.is_repartition(key) {
            return Some(Targets::from([(
                key.clone(),
                self.engine.next_offset(key)?,
            )]));
        }
        let plan = self.engine.plan();
        let Route::Rekeyed(group) = plan.route(*metrics.first()?) else {
            return None;
        };
        let upstream = self.engine.upstream(key)?;
        if upstream.topics.is_empty() {
            return None;
        }
        let mut targets = Targets::new();
        for (topic, partitions) in &upstream.topics {
            for partition in 0..*partitions {
                let partition = i32::try_from(partition).ok()?;
                let mark = upstream.mark(topic, partition, plan.rekey_name(group))?;
                targets.insert(
                    PartitionKey::new(topic.as_str(), partition),
                    mark.next_offset,
                );
            }
        }
        Some(targets)
    }

    /// Whether a repartition partition's backfill would find nothing the live one missed:
    /// every source's records of the metrics' group come from an owner that started it
    /// without stored state (a first start), so it forwarded every event it read. Saves a
    /// first deployment reading the whole history again once per repartition partition.
    fn missed_nothing(&self, key: &PartitionKey, metrics: &[usize]) -> bool {
        if !self.is_repartition(key) || self.live_targets(key, metrics).is_none() {
            return false;
        }
        let plan = self.engine.plan();
        let Some(Route::Rekeyed(group)) = metrics.first().map(|metric| plan.route(*metric)) else {
            return false;
        };
        self.engine.upstream(key).is_some_and(|upstream| {
            upstream
                .marks()
                .filter(|(_, _, field, _)| *field == plan.rekey_name(group))
                .all(|(_, _, _, mark)| mark.epoch.resumed_from < 0)
        })
    }

    /// Moves the backfills' targets to their live partitions, waits for one close to its
    /// live partition (the consumer holds meanwhile), and swaps in those that reached it.
    fn follow_backfills(&mut self) {
        let Some(backfills) = &self.backfills else {
            return;
        };
        for (key, _) in backfills.failures() {
            self.telemetry.forget_backfill(&key);
            self.late.remove(&key);
        }
        let mut whole = None;
        for (key, metrics) in &self.late {
            if self.missed_nothing(key, metrics) {
                whole = Some((key.clone(), metrics.clone()));
            } else if let Some(targets) = self.live_targets(key, metrics) {
                backfills.want(key, metrics.clone(), targets);
            }
        }
        if let Some((key, metrics)) = whole {
            if let Err(HandlerError(message)) = self.swap_backfill(&key, &metrics, None, None) {
                error!(partition = %key, error = %message, "the swap of a backfill failed");
            }
            return;
        }
        let mut swap = None;
        let mut close = None;
        let close_offsets = backfills.close_offsets();
        for (key, metrics, progress) in backfills.status() {
            let Some(live) = self.live_targets(&key, &metrics) else {
                continue;
            };
            self.telemetry
                .record_backfill_progress(&key, progress.ratio());
            if progress.ready.as_ref() == Some(&live) {
                swap = Some((key, metrics, progress.since_ms, live));
                break;
            }
            let behind = live.values().sum::<i64>() - progress.next;
            let near = progress.next > 0 && behind <= close_offsets;
            let may_wait = self
                .close_again_after
                .get(&key)
                .is_none_or(|after| Instant::now() >= *after);
            if near && may_wait && self.closing.is_none() && close.is_none() {
                close = Some(key);
            }
        }
        if let Some((key, metrics, since_ms, reached)) = swap {
            self.closing = None;
            if let Err(HandlerError(message)) =
                self.swap_backfill(&key, &metrics, since_ms, Some(reached))
            {
                error!(partition = %key, error = %message, "the swap of a backfill failed");
            }
            return;
        }
        match (&self.closing, close) {
            (Some((key, since)), _) if since.elapsed() >= BACKFILL_CLOSE_PATIENCE => {
                warn!(partition = %key, "a backfill did not reach its live partition within 10 s while the consumer waited for it: going on, and trying again in a minute");
                self.close_again_after
                    .insert(key.clone(), Instant::now() + Duration::from_secs(60));
                self.closing = None;
            }
            (None, Some(key)) => self.closing = Some((key, Instant::now())),
            _ => {}
        }
    }

    /// Replaces the live partition's data of the backfilled metrics with the backfill's, which
    /// holds the partition at the same offset; the changelog gets the partition whole.
    /// For a repartition partition, its marks of the metrics' group are raised to the targets
    /// the backfill `reached`: events before them counted in the backfill, and a source sending
    /// them again is not counted twice. `reached` is `None` when there is nothing to swap: the
    /// live data is whole after all (see [`Pipeline::missed_nothing`]).
    fn swap_backfill(
        &mut self,
        key: &PartitionKey,
        metrics: &[usize],
        since_ms: Option<i64>,
        reached: Option<Targets>,
    ) -> Result<(), HandlerError> {
        // The live partition's changes stored: the store is what the engine holds.
        self.persist_now()?;
        let Some(backfills) = &self.backfills else {
            return Ok(());
        };
        let names: Vec<String> = metrics
            .iter()
            .map(|metric| self.engine.plan().metrics()[*metric].name.clone())
            .collect();
        let swapped: Result<(), String> = match &reached {
            Some(_) => names.iter().try_for_each(|name| {
                self.store
                    .replace_metric(key, name, backfills.store(), since_ms)
                    .map_err(|error| format!("cannot swap the backfill of {name} in: {error}"))
            }),
            None => self
                .store
                .end_partial(key, &names)
                .map_err(|error| format!("partition {key}: {error}")),
        };
        let reloaded = swapped.and_then(|()| {
            self.store
                .load_partition(key)
                .map_err(|error| format!("cannot load partition {key}: {error}"))
        });
        let snapshot = match reloaded {
            Ok(snapshot) => snapshot,
            Err(message) => return Err(self.failed(message)),
        };
        let repartition = self.is_repartition(key);
        let still_late = late_metrics(self.engine.plan(), &snapshot.metric_since, repartition);
        let snapshot = holding_only_own_data(self.engine.plan(), snapshot, repartition);
        self.engine.restore_partition(key.clone(), snapshot);
        let group = match metrics.first().map(|m| self.engine.plan().route(*m)) {
            Some(Route::Rekeyed(group)) => Some(group),
            _ => None,
        };
        if let (Some(group), Some(reached)) = (group, &reached) {
            let reached: Vec<(PartitionKey, i64)> = reached.clone().into_iter().collect();
            self.engine.raise_marks(key, group, &reached);
            self.persist_now()?;
        }
        if let Some(changelog) = &self.changelog {
            if let Err(message) = changelog.reseed(&self.store, key) {
                return Err(self.failed(message));
            }
        }
        // Another group's re-keyed metrics are backfilled next.
        self.late.remove(key);
        if !still_late.is_empty() {
            self.late.insert(key.clone(), still_late);
        }
        let Some(backfills) = &self.backfills else {
            return Ok(());
        };
        backfills.swapped(key);
        self.telemetry.record_backfill_progress(key, 1.0);
        if reached.is_some() {
            info!(partition = %key, metrics = ?names, whole_from = ?since_ms,
                  "backfill swapped in: the metrics added or changed now hold the partition's history");
        } else {
            info!(partition = %key, metrics = ?names,
                  "nothing to backfill: every input partition started empty, so the repartition partition missed none of their events");
        }
        self.publish_now();
        Ok(())
    }

    /// Publishes the engine's values as they are: only when they are all stored.
    fn publish_now(&mut self) {
        let snapshot = self.snapshot();
        self.publish(snapshot, true);
    }

    fn advance_idle_partitions(&mut self) {
        let now_ms = self.clock.now_ms();
        let idle: Vec<PartitionKey> = self
            .last_message
            .iter()
            .filter(|(key, last)| {
                // A repartition partition's time is its sources' (they send it when idle).
                !self.is_repartition(key)
                // Moving a lagging partition's time to the wall clock would make its backlog
                // late (seen: a starved partition of a 10M-event catch-up lost 2.4M events).
                && last.elapsed() >= self.idle_timeout
                    && self.lag.get(*key).is_none_or(|lag| *lag <= 0)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in idle {
            self.engine.advance_idle(&key, now_ms);
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // A checkpoint still being stored finishes (its failure is logged): a crash would
        // only lose it, but a clean stop should not.
        let _ = self.settle();
    }
}

/// Stores a write without the changelog (`state.changelog = false`): the changelog no longer
/// follows its partitions, so their positions and heads go.
fn write_alone<T>(
    store: &Store,
    prepare: impl FnOnce(&Store) -> Result<(nsm_state::PreparedWrite, T), nsm_state::StateError>,
) -> Result<T, String> {
    let (prepared, extra) =
        prepare(store).map_err(|error| format!("state write failed: {error}"))?;
    store
        .commit(prepared)
        .map_err(|error| format!("state write failed: {error}"))?;
    Ok(extra)
}

/// Brings a partition's stored state up to date and loads it: restored from the changelog
/// when another instance wrote it since, an unfinished write reverted, data of changed
/// metrics dropped. Runs off the consumer thread (see [`Restore`]); no checkpoint is in
/// flight meanwhile, so its writes are the only ones.
///
/// `rekeyed`, for a partition of the repartition topic: its metrics, which lack the input
/// topics' history when it starts empty, and are then backfilled.
fn adopt(
    store: &Store,
    changelog: Option<&Changelog>,
    telemetry: &Telemetry,
    readiness: &Readiness,
    key: &PartitionKey,
    rekeyed: &[String],
    cancel: &AtomicBool,
) -> Result<PartitionSnapshot, String> {
    let started = Instant::now();
    let taken = match changelog {
        Some(changelog) => changelog.take(store, key, cancel)?,
        None => crate::frames::Taken {
            discarded: write_alone(store, |store| store.prepare_adoption(key))?,
            ..Default::default()
        },
    };
    let crate::frames::Taken {
        records,
        changelog_lost,
        seeded,
        frames_skipped,
        discarded,
    } = taken;
    if changelog_lost {
        telemetry.record_changelog_lost(key);
        readiness.set_not_ready(format!(
            "the changelog of partition {key} was lost (deleted, recreated or truncated): \
             sending it the local state again"
        ));
    }
    if frames_skipped > 0 {
        warn!(partition = %key, frames = frames_skipped,
              "left out changelog records of an owner that had lost the partition, or of writes that did not finish (an instance cut off from the group, or a crash)");
    }
    for metric in discarded {
        warn!(partition = %key, metric = %metric.name, reason = metric.reason,
              "stored data of this metric was discarded");
    }
    let seconds = started.elapsed().as_secs_f64();
    if records > 0 || seeded {
        info!(partition = %key, records, seeded,
              elapsed_ms = (seconds * 1000.0) as u64, "partition restored from the changelog");
    }
    telemetry.record_restore(key, seconds, records);
    abandon_unfinished_swaps(store, changelog, key)?;
    let loading = Instant::now();
    let load = || {
        store
            .load_partition(key)
            .map_err(|state_error| format!("cannot load partition {key}: {state_error}"))
    };
    let mut snapshot = load()?;
    if !rekeyed.is_empty() && snapshot.next_offset.is_none() {
        store
            .start_partial(key, rekeyed, wall_clock_ms())
            .map_err(|error| format!("partition {key}: {error}"))?;
        if let Some(changelog) = changelog {
            changelog.reseed(store, key)?;
        }
        snapshot = load()?;
        info!(partition = %key, metrics = ?rekeyed,
              "a repartition partition starting empty: its metrics are partial until backfilled from the input topics' history");
    }
    info!(partition = %key, next_offset = ?snapshot.next_offset, windows = snapshot.windows.len(),
          elapsed_ms = loading.elapsed().as_millis() as u64, "partition state restored");
    Ok(snapshot)
}

/// A partition's `metric_since` of the metrics whose data it holds: an input partition's of
/// those counted locally, a repartition partition's of the re-keyed ones. Every partition
/// taken is told of every metric added, but one it does not count makes no window partial.
fn holding_only_own_data(
    plan: &Plan,
    mut snapshot: PartitionSnapshot,
    repartition: bool,
) -> PartitionSnapshot {
    snapshot
        .metric_since
        .retain(|(metric, _)| matches!(plan.route(*metric), Route::Rekeyed(_)) == repartition);
    snapshot
}

/// A backfill's swap cut short by a crash left the partition's data of its metrics part old,
/// part new: given up, each starts again partial and is backfilled again; the changelog gets
/// the partition whole, as after a swap.
fn abandon_unfinished_swaps(
    store: &Store,
    changelog: Option<&Changelog>,
    key: &PartitionKey,
) -> Result<(), String> {
    let abandoned = store
        .abandon_unfinished_swaps(key)
        .map_err(|error| format!("partition {key}: {error}"))?;
    if abandoned.is_empty() {
        return Ok(());
    }
    warn!(partition = %key, metrics = ?abandoned,
          "a backfill's swap was cut short (a crash): these metrics start again, partial, and are backfilled again");
    if let Some(changelog) = changelog {
        changelog.reseed(store, key)?;
    }
    Ok(())
}

impl PartitionHandler for Pipeline {
    type Restored = Vec<(PartitionKey, PartitionSnapshot)>;

    fn start_restore(
        &mut self,
        partitions: &[PartitionKey],
    ) -> Result<Restore<Self::Restored>, HandlerError> {
        // Partitions are loaded from the store: the checkpoint in flight must be in it, and
        // no other write may run beside the restore's.
        self.settle()?;
        self.readiness.set_not_ready(format!(
            "restoring the state of {} assigned partition(s)",
            partitions.len()
        ));
        let partitions = partitions.to_vec();
        let rekeyed = self.rekeyed_to_backfill();
        let store = self.store.clone();
        let changelog = self.changelog.clone();
        let telemetry = self.telemetry.clone();
        let readiness = self.readiness.clone();
        Ok(Box::new(move |cancel: &AtomicBool| {
            partitions
                .into_iter()
                .map(|key| {
                    let rekeyed = rekeyed
                        .as_ref()
                        .filter(|(topic, _)| **topic == *key.topic)
                        .map_or(&[][..], |(_, metrics)| metrics.as_slice());
                    adopt(
                        &store,
                        changelog.as_deref(),
                        &telemetry,
                        &readiness,
                        &key,
                        rekeyed,
                        cancel,
                    )
                    .map(|snapshot| (key, snapshot))
                    .map_err(|message| {
                        readiness.set_not_ready(message.clone());
                        HandlerError(message)
                    })
                })
                .collect()
        }))
    }

    fn finish_restore(
        &mut self,
        restored: Self::Restored,
    ) -> Result<Vec<Option<i64>>, HandlerError> {
        let mut offsets = Vec::with_capacity(restored.len());
        let taken_at_ms = wall_clock_ms();
        for (key, snapshot) in restored {
            offsets.push(snapshot.next_offset);
            if !self.is_repartition(&key) {
                // After the last owner's stored offset and its taking: a newer owner.
                let epoch = Epoch {
                    resumed_from: snapshot.next_offset.unwrap_or(-1),
                    taken_at_ms,
                };
                self.epochs.insert(key.clone(), epoch);
            }
            let repartition = self.is_repartition(&key);
            // A partition with state, or one of the repartition topic (started empty).
            if self.backfills.is_some() && (snapshot.next_offset.is_some() || repartition) {
                let late = late_metrics(self.engine.plan(), &snapshot.metric_since, repartition);
                if !late.is_empty() {
                    self.late.insert(key.clone(), late);
                    self.telemetry.record_backfill_progress(&key, 0.0);
                }
            }
            let snapshot = holding_only_own_data(self.engine.plan(), snapshot, repartition);
            self.engine.restore_partition(key.clone(), snapshot);
            self.last_message.insert(key, Instant::now());
        }
        self.publish_now();
        self.readiness.set_ready();
        Ok(offsets)
    }

    fn revoked(&mut self, partitions: &[PartitionKey]) -> Result<(), HandlerError> {
        self.persist_now()?;
        self.release(partitions);
        Ok(())
    }

    fn abandoned(&mut self, partitions: &[PartitionKey]) {
        // At once, without waiting for a checkpoint in flight: it may be waiting for a broker
        // that is cut off (up to the changelog's delivery timeout), while the group may have
        // given these partitions to another instance, which shows them too. It goes on; its
        // result is taken at the next settle, where a failure stops the consumer.
        self.release(partitions);
    }

    fn process(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        payload: &[u8],
        record: &dyn RecordMeta,
    ) -> Disposition {
        let expected = self.engine.next_offset(key);
        let outcome = if self.is_repartition(key) {
            self.apply_received(key, offset, payload, record)
        } else {
            self.engine
                .apply_record(key, offset, payload, record, self.clock.now_ms())
        };
        let produced_ms = record.timestamp_ms();
        if let Some(next) = expected.filter(|next| *next != offset) {
            self.offsets_skipped(key, next, offset);
        }
        match self.consumed.get_mut(key) {
            Some(count) => *count += 1,
            None => {
                self.consumed.insert(key.clone(), 1);
            }
        }
        if let Some(last) = self.last_message.get_mut(key) {
            *last = Instant::now();
        }
        match outcome {
            Outcome::Applied { forward, .. } => {
                self.messages_since_publish += 1;
                let forwards = if forward.0.is_empty() {
                    Vec::new()
                } else {
                    self.forwards_of(key, offset, payload, record, &forward.0)
                };
                if let Some(produced_ms) = produced_ms {
                    if self.produced_times_ms.len() >= MAX_LATENCY_SAMPLES {
                        // Keep memory bounded under bursts: thin the samples evenly.
                        self.latency_sample_every *= 2;
                        let every = 2;
                        let mut index = 0;
                        self.produced_times_ms.retain(|_| {
                            index += 1;
                            index % every == 0
                        });
                    }
                    if self
                        .messages_since_publish
                        .is_multiple_of(self.latency_sample_every)
                    {
                        self.produced_times_ms.push(produced_ms);
                    }
                }
                if forwards.is_empty() {
                    Disposition::Done
                } else {
                    self.forwarded += forwards.len() as u64;
                    Disposition::Forward(forwards)
                }
            }
            Outcome::AlreadyApplied | Outcome::Resent => Disposition::Done,
            Outcome::StateUnreadable(read_error) => {
                if self.failure.is_none() {
                    error!(partition = %key, offset, error = %read_error,
                           "cannot read stored state; stopping at the next checkpoint without storing anything more");
                    self.readiness
                        .set_not_ready(format!("state read failed: {read_error}"));
                    self.failure = Some(format!("partition {key}: {read_error}"));
                }
                Disposition::Done
            }
            Outcome::Duplicate { .. } => {
                self.duplicates += 1;
                Disposition::Done
            }
            Outcome::Rejected(rejection) => {
                *self.rejected.entry(rejection.reason).or_default() += 1;
                let should_log = self
                    .last_warned
                    .get(&rejection.reason)
                    .is_none_or(|at| at.elapsed() >= REJECTION_LOG_INTERVAL);
                if should_log {
                    self.last_warned.insert(rejection.reason, Instant::now());
                    warn!(partition = %key, offset, reason = rejection.reason.label(), detail = %rejection.detail,
                          "event rejected and sent to the dead-letter topic (further ones of this reason are only counted for 10s)");
                }
                Disposition::DeadLetter {
                    reason: rejection.reason.label(),
                    detail: rejection.detail,
                }
            }
        }
    }

    fn checkpoint(&mut self) -> Result<Vec<(PartitionKey, i64)>, HandlerError> {
        // A write still running (a long expiry, a slow broker) is not waited for here: the
        // consumer keeps polling and applying, the changes wait for the next checkpoint, and
        // `hold` pauses the applying once twice the usual amount waits.
        if self.writing() {
            return Ok(Vec::new());
        }
        self.persist()?;
        Ok(std::mem::take(&mut self.stored_offsets))
    }

    fn finish(&mut self) -> Result<Vec<(PartitionKey, i64)>, HandlerError> {
        self.persist_now()?;
        // What a restart would otherwise replay from the write-ahead log (up to 64 MiB, half a
        // second) is written to table files now, while the group has already moved on.
        if let Err(error) = self.store.flush_memtables() {
            warn!(error = %error, "the state's memtables were not flushed at stop: the next start replays its write-ahead log");
        }
        Ok(std::mem::take(&mut self.stored_offsets))
    }

    fn checkpoint_due(&self) -> bool {
        self.engine.checkpoint_due()
    }

    fn hold(&self) -> bool {
        (self.writing() && self.engine.checkpoint_overdue()) || self.closing.is_some()
    }

    fn wait_for_store(&mut self, patience: Duration) -> bool {
        let waiting = Instant::now();
        if self.hold() {
            match &self.in_flight {
                Some(in_flight) if self.writing() => in_flight.ended.wait(patience),
                // A backfill's last stretch: its runner reads it meanwhile.
                _ => std::thread::sleep(patience.min(Duration::from_millis(20))),
            }
            self.tick();
        }
        // `settle` counts the join; this counts the wait before it.
        self.telemetry
            .record_checkpoint_wait(waiting.elapsed().as_secs_f64());
        !self.hold()
    }

    fn tick(&mut self) {
        self.loop_watch.busy();
        // Publish a stored checkpoint as soon as it is, not at the next one.
        if self.in_flight.as_ref().is_some_and(InFlight::is_finished) {
            // A failure is kept in `self.failure` and stops the consumer at its next
            // checkpoint.
            let _ = self.settle();
        }
        if self.backfills.is_some() && self.failure.is_none() {
            self.follow_backfills();
        }
        if self.last_idle_check.elapsed() >= IDLE_CHECK_INTERVAL {
            self.last_idle_check = Instant::now();
            self.advance_idle_partitions();
            // Held dead letters stop the checkpoints, and so the publishes: their counters
            // are exported here too.
            self.record_dead_letters();
        }
    }

    fn brokers(&mut self, up: usize, known: usize) {
        let reachable = up > 0 || known == 0;
        if reachable != self.kafka_reachable {
            if reachable {
                info!(up, known, "Kafka reachable again");
            } else {
                warn!(
                    known,
                    "no Kafka broker reachable: values hold and are stale until one returns"
                );
            }
            self.kafka_reachable = reachable;
        }
        self.telemetry.record_brokers_up(up);
    }

    fn time_records(&mut self) -> Vec<Forward> {
        let Some(repartition) = &self.repartition else {
            return Vec::new();
        };
        if self
            .last_time_records
            .is_some_and(|last| last.elapsed() < TIME_RECORD_INTERVAL)
        {
            return Vec::new();
        }
        self.last_time_records = Some(Instant::now());
        let none = nsm_core::event::NoRecord::default();
        let mut records = Vec::new();
        for (key, epoch) in &self.epochs {
            let (watermark_ms, clock_ms) = self.engine.source_time(key);
            let origin = Origin {
                partition: key.partition,
                offset: self.engine.next_offset(key).unwrap_or(0),
                epoch: *epoch,
                watermark_ms,
                clock_ms,
            };
            // One per group: each says its group's events before the offset were all sent.
            for partition in 0..repartition.partitions {
                for group in 0..self.engine.plan().rekey_fields().len() {
                    records.push(repartition.record(
                        partition,
                        0,
                        Some(group),
                        false,
                        &key.topic,
                        &origin,
                        &[],
                        &none,
                    ));
                }
            }
        }
        self.forwarded += records.len() as u64;
        records
    }

    fn lag(&mut self, lags: Vec<PartitionLag>) {
        for PartitionLag { key, lag } in lags {
            if self.engine.owns(&key) {
                self.telemetry.record_lag(&key, lag);
                self.lag.insert(key, lag);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use nsm_core::event::NoRecord;
    use nsm_core::Config;
    use nsm_state::StoreOptions;

    use super::*;

    const CONFIG: &str = r#"
[kafka]
brokers = "127.0.0.1:9"
topics = ["events"]
group_id = "test"
[state]
path = "unused"
[north_star]
name = "daily_active_messagers"
description = "Users who sent a message today"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1d"
"#;

    fn pipeline(directory: &std::path::Path) -> Pipeline {
        let config = Config::from_toml(CONFIG, &|_| None).expect("config");
        let plan = Plan::from_config(&config);
        let store = Store::open(directory, &plan, &StoreOptions::default()).expect("store");
        Pipeline::new(PipelineParts {
            telemetry: Arc::new(Telemetry::new(&plan, "test")),
            plan,
            store,
            changelog: None,
            published: Arc::new(RwLock::new(Published::default())),
            readiness: Arc::new(Readiness::default()),
            dead_letter_stats: Arc::new(DeadLetterStats::default()),
            idle_timeout: Duration::from_secs(3600),
            flush_max_entries: config.state.flush_max_entries,
            memory_limit: config.state.memory_limit,
            liveness: Arc::new(Liveness::default()),
            stuck_after: Duration::from_secs(300),
            clock: EventClock::wall(),
            backfills: None,
            repartition: None,
        })
    }

    fn message(pipeline: &mut Pipeline, key: &PartitionKey, offset: i64) {
        let event = format!(
            r#"{{"event":"message_sent","user_id":"u{offset}","timestamp":{}}}"#,
            wall_clock_ms()
        );
        assert_eq!(
            pipeline.process(key, offset, event.as_bytes(), &NoRecord::default()),
            Disposition::Done
        );
    }

    #[test]
    fn offsets_of_a_partition_given_up_are_never_committed_afterwards() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut pipeline = pipeline(directory.path());
        let kept = PartitionKey::new("events", 0);
        let given_up = PartitionKey::new("events", 1);
        pipeline
            .assigned(&[kept.clone(), given_up.clone()])
            .expect("assigned");
        message(&mut pipeline, &kept, 0);
        message(&mut pipeline, &given_up, 0);
        // Stored on the checkpoint thread: its offsets come with the next checkpoint.
        pipeline.checkpoint().expect("checkpoint");
        pipeline
            .revoked(std::slice::from_ref(&given_up))
            .expect("revoked");
        message(&mut pipeline, &kept, 1);
        let offsets = pipeline.checkpoint().expect("checkpoint");
        assert_eq!(offsets, vec![(kept.clone(), 1)]);
        assert_eq!(pipeline.finish().expect("finish"), vec![(kept, 2)]);
    }

    #[test]
    fn a_partition_abandoned_while_its_checkpoint_is_stored_is_neither_shown_nor_committed() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut pipeline = pipeline(directory.path());
        let kept = PartitionKey::new("events", 0);
        let lost = PartitionKey::new("events", 1);
        pipeline
            .assigned(&[kept.clone(), lost.clone()])
            .expect("assigned");
        message(&mut pipeline, &kept, 0);
        message(&mut pipeline, &lost, 0);
        message(&mut pipeline, &lost, 1);
        // The checkpoint is being stored when the group session is lost: the partition goes
        // at once, and what the checkpoint stored of it is neither shown nor committed.
        pipeline.checkpoint().expect("checkpoint");
        pipeline.abandoned(std::slice::from_ref(&lost));
        message(&mut pipeline, &kept, 1);
        // The next checkpoint takes the stored one's result once it is stored (one still
        // being written is left for later).
        while pipeline.writing() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let offsets = pipeline.checkpoint().expect("checkpoint");
        assert_eq!(offsets, vec![(kept.clone(), 1)]);
        let shown = pipeline.telemetry.render();
        assert!(
            shown.contains(
                "nsm_metric_value{metric=\"daily_active_messagers\",window=\"current\"} 1\n"
            ),
            "only the kept partition's first member is shown:\n{shown}"
        );
        assert_eq!(pipeline.finish().expect("finish"), vec![(kept, 2)]);
    }

    fn skipped(pipeline: &Pipeline, reason: &str) -> String {
        let series = format!("nsm_offsets_skipped_total{{reason=\"{reason}\"}} ");
        pipeline
            .telemetry
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str()).map(str::to_string))
            .unwrap_or_default()
    }

    #[test]
    fn offsets_skipped_forward_or_back_are_counted() {
        let directory = tempfile::tempdir().expect("tempdir");
        let key = PartitionKey::new("events", 0);
        {
            let mut pipeline = pipeline(directory.path());
            pipeline
                .assigned(std::slice::from_ref(&key))
                .expect("assigned");
            // A partition without a stored offset starts wherever the consumer says.
            message(&mut pipeline, &key, 100);
            message(&mut pipeline, &key, 101);
            pipeline.finish().expect("finish");
            assert_eq!(skipped(&pipeline, "gap"), "0");
        }
        // Restarted: the stored offset is 102, and the log no longer has 102 to 109.
        let mut pipeline = pipeline(directory.path());
        assert_eq!(
            pipeline
                .assigned(std::slice::from_ref(&key))
                .expect("assigned"),
            vec![Some(102)]
        );
        message(&mut pipeline, &key, 110);
        message(&mut pipeline, &key, 111);
        message(&mut pipeline, &key, 113);
        pipeline.finish().expect("finish");
        assert_eq!(skipped(&pipeline, "gap"), "9", "102..=109 and 112");
        // The topic is recreated: its offsets start again below the stored one (114), and
        // those messages are skipped as applied before, each counted.
        for offset in 0..3 {
            message(&mut pipeline, &key, offset);
        }
        pipeline.finish().expect("finish");
        assert_eq!(skipped(&pipeline, "rewound"), "3");
        assert_eq!(skipped(&pipeline, "gap"), "9");
        assert_eq!(
            metric_value(&pipeline.telemetry.render(), "daily_active_messagers"),
            "5",
            "the rewound messages changed nothing"
        );
    }

    fn metric_value(text: &str, metric: &str) -> String {
        let series = format!("nsm_metric_value{{metric=\"{metric}\",window=\"current\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(series.as_str()).map(str::to_string))
            .unwrap_or_default()
    }
}
