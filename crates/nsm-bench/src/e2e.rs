//! `nsm-bench e2e`: nsm on a real Kafka-protocol broker (tansu, in memory), side by side with
//! the ceiling, then the restart and freshness figures of the same state.
//!
//! 1. A fixed synthetic stream (the workload's events, users spread over a coprime stride,
//!    event times over the 7 days ending 3 hours ago) is produced to a topic, keyed by user.
//! 2. A bare librdkafka consumer (the settings nsm's consumer uses, doing nothing with the
//!    messages) reads it whole: the ceiling. Then `nsm run` reads it whole. Both are timed
//!    from their first message to their last, with their process' CPU over the same span.
//! 3. nsm is stopped with SIGTERM. With `--quix-python`, the Quix Streams peer
//!    (`quix/peer.py`, see [`quix`]) reads the same topic whole meanwhile, timed the same way.
//!    nsm is started again on its state: the time from the start to the first scrape showing
//!    the values it showed before the stop.
//! 4. Events are produced at a steady rate with the current time, while `/metrics` is scraped
//!    every 10 ms: an event's delay is from its send to the first scrape whose `messages`
//!    count includes it (the k-th message counts once k are visible).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::Message;

use crate::procfs;
use crate::workload::{coprime_stride, write_event, CONFIG, STEP_MS, WEEK_MS};
use quix::{QuixPeer, QuixRead};

mod quix;

#[derive(Args)]
pub struct E2eArgs {
    /// Events of the stream both consumers read.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Distinct users the events come from (each user is in one team of five).
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Events per second of the freshness run.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds of the freshness run.
    #[arg(long, default_value_t = 30)]
    freshness_seconds: u64,
    /// The nsm binary [default: `nsm` beside this program].
    #[arg(long)]
    nsm: Option<PathBuf>,
    /// The tansu binary [default: on the PATH, else ~/.cargo/bin/tansu].
    #[arg(long)]
    tansu: Option<PathBuf>,
    /// A Python with the Quix Streams peer's requirements installed (`make bench` makes one in
    /// target/bench/quix-venv): the peer reads the same topic after nsm. Without it the peer
    /// is skipped.
    #[arg(long)]
    quix_python: Option<PathBuf>,
    /// The Quix Streams peer's script.
    #[arg(long, default_value = quix::DEFAULT_SCRIPT)]
    quix_peer: PathBuf,
    /// `off` declares teams nested in users (`kafka.nested_in_key = ["team_id"]`), so the
    /// team metrics are counted per partition, as before the repartition topic (inexact:
    /// events are keyed by user): to measure what the repartition topic costs beside `on`.
    #[arg(long, value_enum, default_value_t = Repartition::On)]
    repartition: Repartition,
    /// Events the Quix Streams peer reads (it reads about 4,000 a second here): fewer than
    /// `--events` make a shorter stream of the same shape, users scaled, in a topic of its own
    /// [default: the whole stream].
    #[arg(long)]
    quix_events: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Repartition {
    /// The config as users run it: events keyed by user, teams counted through the
    /// repartition topic.
    On,
    /// Teams counted per partition (declared nested in users).
    Off,
}

const TOPIC: &str = "bench-events";
/// The Quix Streams peer's shorter stream, when it reads fewer events than nsm.
const QUIX_TOPIC: &str = "bench-events-quix";
/// How often a wait scrapes: often, where the time of the answer is measured.
const POLL: Duration = Duration::from_millis(10);
/// How often the wait for nsm to read the whole stream scrapes: rendering `/metrics` costs
/// nsm CPU, and this span is long.
const CATCH_UP_POLL: Duration = Duration::from_millis(100);
/// Longest wait for anything the bench waits on, per million events of the stream.
const PATIENCE_PER_MILLION: Duration = Duration::from_secs(120);

pub fn run(args: &E2eArgs) -> anyhow::Result<()> {
    let nsm = match &args.nsm {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("nsm"),
    };
    if !nsm.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --workspace`",
            nsm.display()
        );
    }
    let tansu = match &args.tansu {
        Some(path) => path.clone(),
        None => find_tansu()?,
    };
    let dir = tempfile::tempdir()?;
    let result = measure(args, &nsm, &tansu, dir.path());
    if result.is_err() {
        eprintln!("the logs are kept in {}", dir.keep().display());
    }
    result
}

fn measure(args: &E2eArgs, nsm: &Path, tansu: &Path, dir: &Path) -> anyhow::Result<()> {
    let patience = PATIENCE_PER_MILLION * (args.events / 1_000_000 + 1) as u32;
    let broker_port = free_port()?;
    let brokers = format!("127.0.0.1:{broker_port}");
    let url = format!("tcp://{brokers}");
    let _broker = Running::spawn(
        "tansu",
        Command::new(tansu).args([
            "broker",
            "--storage-engine",
            "memory://tansu/",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ]),
        dir,
    )?;
    wait("tansu to listen", Duration::from_secs(30), POLL, || {
        Ok(TcpStream::connect(("127.0.0.1", broker_port)).ok())
    })?;

    // 1. The stream, produced once.
    let stream_end_ms = wall_clock_ms() - 3 * 3_600_000;
    let stream = Stream {
        nsm,
        brokers: &brokers,
        partitions: args.partitions,
        end_ms: stream_end_ms,
        dir,
    };
    let produce_started = Instant::now();
    let mean_bytes = stream.produce(TOPIC, args.events, args.users)?;
    let produce_seconds = produce_started.elapsed().as_secs_f64();
    eprintln!("produced {} events in {produce_seconds:.1} s", args.events);

    // 2. The ceiling, then nsm, over the same topic.
    let bare = bare_consumer(&brokers, args.events, patience)?;
    eprintln!(
        "bare consumer: {:.0} events/s, {:.2} CPU-s per million",
        bare.events_per_second(args.events),
        bare.cpu_per_million(args.events)
    );
    let http_port = free_port()?;
    let config = dir.join("nsm.toml");
    std::fs::write(
        &config,
        nsm_config(&brokers, &dir.join("state"), http_port, args.repartition),
    )?;
    let start_nsm = || {
        Running::spawn(
            "nsm",
            Command::new(nsm).args(["run", "--config"]).arg(&config),
            dir,
        )
    };
    let mut instance = start_nsm()?;
    let through = nsm_consumes(&instance, http_port, args.events, patience)?;
    eprintln!(
        "nsm: {:.0} events/s, {:.2} CPU-s per million",
        through.events_per_second(args.events),
        through.cpu_per_million(args.events)
    );
    let before = scrape(http_port).context("scrape before the restart")?;
    let invalid =
        sum_of(&before, "nsm_events_invalid_total") + sum_of(&before, "nsm_events_late_total");
    if invalid > 0.0 {
        bail!(
            "nsm refused {invalid} events of the stream: see {}",
            dir.display()
        );
    }
    // Events the broker never gave nsm would make its figures those of a shorter stream.
    let skipped = sum_of(&before, "nsm_offsets_skipped_total");
    if skipped > 0.0 {
        bail!(
            "nsm skipped {skipped} offsets of the stream: see {}",
            dir.display()
        );
    }

    // Checkpoints are stored while events are applied; the consumer waits only when the next
    // one is due before the last is stored: that wait's share of the span says how much.
    let checkpoint_seconds = sum_of(&before, "nsm_state_checkpoint_duration_seconds_sum");
    let checkpoints = sum_of(&before, "nsm_state_checkpoint_duration_seconds_count");
    let checkpoint_mean_ms = checkpoint_seconds * 1e3 / checkpoints.max(1.0);
    let checkpoint_share = checkpoint_seconds / through.seconds;
    let checkpoint_wait_share =
        sum_of(&before, "nsm_state_checkpoint_wait_seconds_total") / through.seconds;
    eprintln!(
        "nsm checkpoints: {checkpoints} of {checkpoint_mean_ms:.0} ms on average, {:.0}% of the span; \
         the consumer waited for them {:.0}% of it",
        checkpoint_share * 100.0,
        checkpoint_wait_share * 100.0
    );

    // 3. Restart on the state just written; the peer reads the topic while nsm is stopped,
    //    so nothing else runs beside it but the broker.
    let expected = restart_values(&before);
    let stopping = Instant::now();
    instance.terminate()?;
    let shutdown_seconds = stopping.elapsed().as_secs_f64();
    let quix = quix_reads(args, &stream)?;
    let starting = Instant::now();
    let instance = start_nsm()?;
    wait(
        "the first correct scrape after the restart",
        patience,
        POLL,
        || {
            instance.check_alive()?;
            Ok(scrape(http_port).filter(|now| restart_values(now) == expected))
        },
    )?;
    let restart_seconds = starting.elapsed().as_secs_f64();
    eprintln!("restart to the first correct scrape: {restart_seconds:.2} s");

    // 4. Freshness at a steady rate.
    let freshness = freshness(args, &brokers, http_port, &instance)?;
    eprintln!(
        "freshness at {:.0} events/s: p50 {:.0} ms, p99 {:.0} ms; a bare consumer beside: p50 {:.0} ms, p99 {:.0} ms ({} events)",
        freshness.achieved_rate,
        freshness.p50_ms,
        freshness.p99_ms,
        freshness.bare.p50_ms,
        freshness.bare.p99_ms,
        freshness.bare.events
    );

    println!(
        "{{\"bench\":\"e2e\",\"events\":{},\"users\":{},\"partitions\":{},\"repartition\":{},\"mean_event_bytes\":{mean_bytes},\
         \"produce_seconds\":{produce_seconds:.1},\
         \"bare_events_per_second\":{:.0},\"bare_cpu_seconds_per_million\":{:.2},\
         \"nsm_events_per_second\":{:.0},\"nsm_cpu_seconds_per_million\":{:.2},\
         \"nsm_to_bare\":{:.3},\"nsm_cpu_to_bare\":{:.2},\
         \"nsm_checkpoint_mean_ms\":{checkpoint_mean_ms:.1},\"nsm_checkpoint_share\":{checkpoint_share:.3},\
         \"nsm_checkpoint_wait_share\":{checkpoint_wait_share:.3},\
         \"shutdown_seconds\":{shutdown_seconds:.2},\"restart_seconds\":{restart_seconds:.2},\
         \"freshness_rate\":{:.0},\"freshness_events\":{},\"freshness_p50_ms\":{:.0},\
         \"freshness_p99_ms\":{:.0},\"freshness_max_ms\":{:.0},\
         \"bare_freshness_p50_ms\":{:.0},\"bare_freshness_p99_ms\":{:.0}{}}}",
        args.events,
        args.users,
        args.partitions,
        args.repartition == Repartition::On,
        bare.events_per_second(args.events),
        bare.cpu_per_million(args.events),
        through.events_per_second(args.events),
        through.cpu_per_million(args.events),
        through.events_per_second(args.events) / bare.events_per_second(args.events),
        through.cpu_per_million(args.events) / bare.cpu_per_million(args.events),
        freshness.achieved_rate,
        freshness.messages,
        freshness.p50_ms,
        freshness.p99_ms,
        freshness.max_ms,
        freshness.bare.p50_ms,
        freshness.bare.p99_ms,
        quix_fields(quix.as_ref(), &bare, args.events),
    );
    drop(instance);
    Ok(())
}

/// The Quix Streams peer's read of the topic, when the bench was given a Python for it.
fn quix_reads(args: &E2eArgs, stream: &Stream<'_>) -> anyhow::Result<Option<QuixRead>> {
    let Some(python) = &args.quix_python else {
        eprintln!("Quix Streams peer skipped: no --quix-python (`make bench` installs one)");
        return Ok(None);
    };
    let peer = QuixPeer {
        python,
        script: &args.quix_peer,
    };
    // Fewer events than the stream's: a shorter stream of the same shape (the users scaled
    // with it) in a topic of the peer's own, read whole.
    let events = args.quix_events.unwrap_or(args.events).min(args.events);
    let topic = if events < args.events {
        let users = (args.users as u128 * events as u128 / args.events as u128).max(1) as u64;
        stream.produce(QUIX_TOPIC, events, users)?;
        QUIX_TOPIC
    } else {
        TOPIC
    };
    let read = quix::quix_consumes(&peer, stream.brokers, topic, events, stream.dir)?;
    eprintln!(
        "Quix Streams peer: {} events, {:.0} events/s, {:.2} CPU-s per million; its weekly \
         active users (by Thursday week start, ms): {}",
        read.events,
        read.span.events_per_second(read.events),
        read.span.cpu_per_million(read.events),
        read.weekly_active_users
    );
    Ok(Some(read))
}

/// The peer's JSON fields, after a comma; none when it was skipped.
fn quix_fields(quix: Option<&QuixRead>, bare: &Span, events: u64) -> String {
    let Some(QuixRead {
        span, events: read, ..
    }) = quix
    else {
        return String::new();
    };
    // Rates and CPU per event are over what each side read: the peer may read a prefix.
    format!(
        ",\"quix_events\":{read},\"quix_events_per_second\":{:.0},\
         \"quix_cpu_seconds_per_million\":{:.2},\"quix_to_bare\":{:.3},\"quix_cpu_to_bare\":{:.2}",
        span.events_per_second(*read),
        span.cpu_per_million(*read),
        span.events_per_second(*read) / bare.events_per_second(events),
        span.cpu_per_million(*read) / bare.cpu_per_million(events),
    )
}

/// One side's read of the whole stream: from its first message to its last.
struct Span {
    seconds: f64,
    cpu_seconds: f64,
}

impl Span {
    fn events_per_second(&self, events: u64) -> f64 {
        events as f64 / self.seconds
    }

    fn cpu_per_million(&self, events: u64) -> f64 {
        self.cpu_seconds * 1e6 / events as f64
    }
}

/// Where and how the bench's streams are produced.
struct Stream<'a> {
    nsm: &'a Path,
    brokers: &'a str,
    partitions: u32,
    end_ms: i64,
    dir: &'a Path,
}

impl Stream<'_> {
    /// Produces `events` events of `users` users to `topic`, keyed by user; returns their
    /// mean size in bytes.
    fn produce(&self, topic: &str, events: u64, users: u64) -> anyhow::Result<u64> {
        let events_file = self.dir.join("events.jsonl");
        let mean_bytes = write_stream(&events_file, events, users, self.end_ms)?;
        let status = Command::new(self.nsm)
            .args(["produce", "--brokers", self.brokers, "--topic", topic])
            .args(["--partitions", &self.partitions.to_string()])
            .args(["--key-field", "user_id", "--log", "warn", "--file"])
            .arg(&events_file)
            .status()
            .context("nsm produce")?;
        if !status.success() {
            bail!("nsm produce failed: {status}");
        }
        std::fs::remove_file(&events_file)?;
        Ok(mean_bytes)
    }
}

/// Writes the stream as JSON lines; returns the mean event size.
fn write_stream(path: &Path, events: u64, users: u64, end_ms: i64) -> anyhow::Result<u64> {
    let users = users.max(1);
    let stride = coprime_stride(users);
    let start_ms = end_ms - WEEK_MS + STEP_MS;
    let spacing_ms = (WEEK_MS - 2 * STEP_MS) as f64 / events.max(1) as f64;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut payload = Vec::with_capacity(512);
    let mut bytes = 0u64;
    for index in 0..events {
        let user = (u128::from(index) * u128::from(stride) % u128::from(users)) as u64;
        write_event(
            &mut payload,
            index,
            user,
            start_ms + (index as f64 * spacing_ms) as i64,
        );
        bytes += payload.len() as u64;
        out.write_all(&payload)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(bytes / events.max(1))
}

/// The bench config, on this broker, state directory and port. The flush interval is the
/// default (200 ms): freshness is measured as users get it. Fetches wait at most 100 ms, as
/// the bare consumer's: tansu answers a waiting fetch only when its wait ends, not when data
/// arrives as a Kafka broker does, so librdkafka's 500 ms would cap both sides' throughput and
/// add to every delay. (Not nsm's default: frequent fetches wedged tansu after a broker
/// outage in the outage test.)
fn nsm_config(brokers: &str, state: &Path, http_port: u16, repartition: Repartition) -> String {
    let nested = match repartition {
        Repartition::On => "",
        Repartition::Off => "nested_in_key = [\"team_id\"]\n",
    };
    let config = CONFIG.replace(
        "brokers = \"127.0.0.1:9092\"\ntopics = [\"events\"]",
        &format!(
            "brokers = \"{brokers}\"\ntopics = [\"{TOPIC}\"]\ngroup_id = \"nsm-bench\"\n\
             dead_letter_topic = \"{TOPIC}-dlq\"\nkey_field = \"user_id\"\n{nested}\
             [kafka.properties]\n\"fetch.wait.max.ms\" = \"100\""
        ),
    );
    let config = config.replace(
        "[state]\n",
        &format!("[state]\npath = \"{}\"\n", state.display()),
    );
    format!("{config}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n")
}

/// The ceiling: librdkafka's consumer with nsm's settings, counting messages and bytes.
fn bare_consumer(brokers: &str, events: u64, patience: Duration) -> anyhow::Result<Span> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "nsm-bench-bare")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    consumer.subscribe(&[TOPIC])?;
    let deadline = Instant::now() + patience;
    let mut seen = 0u64;
    let mut bytes = 0usize;
    let mut first = None;
    while seen < events {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => {
                if first.is_none() {
                    first = Some((Instant::now(), procfs::cpu_seconds("self")?));
                }
                bytes += message.payload().map_or(0, <[u8]>::len);
                seen += 1;
            }
            Some(Err(error)) => bail!("bare consumer: {error}"),
            None if Instant::now() > deadline => {
                bail!("bare consumer: {seen} of {events} events after {patience:?}")
            }
            None => {}
        }
    }
    std::hint::black_box(bytes);
    let (started, cpu) = first.unwrap_or((Instant::now(), 0.0));
    Ok(Span {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: procfs::cpu_seconds("self")? - cpu,
    })
}

/// nsm's read of the whole stream, from its first consumed message to its last, as
/// `/metrics` shows them (published every flush, 200 ms).
fn nsm_consumes(
    instance: &Running,
    port: u16,
    events: u64,
    patience: Duration,
) -> anyhow::Result<Span> {
    let pid = instance.child.id().to_string();
    let (started, cpu) = wait("nsm's first message", patience, POLL, || {
        instance.check_alive()?;
        let consumed = scrape(port).map_or(0.0, |s| sum_of(&s, "nsm_events_consumed_total"));
        if consumed > 0.0 {
            Ok(Some((Instant::now(), procfs::cpu_seconds(&pid)?)))
        } else {
            Ok(None)
        }
    })?;
    wait("nsm to consume the stream", patience, CATCH_UP_POLL, || {
        instance.check_alive()?;
        let samples = scrape(port).unwrap_or_default();
        let skipped = sum_of(&samples, "nsm_offsets_skipped_total");
        if skipped > 0.0 {
            bail!("nsm skipped {skipped} offsets of the stream (see its log)");
        }
        // The stream's topic read, and the repartition topic caught up with what was sent.
        let consumed = consumed_of(&samples, TOPIC);
        let forwarded = sum_of(&samples, "nsm_events_forwarded_total");
        let counted = sum_of(&samples, "nsm_events_consumed_total") - consumed;
        Ok((consumed >= events as f64 && counted >= forwarded).then_some(()))
    })?;
    Ok(Span {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: procfs::cpu_seconds(&pid)? - cpu,
    })
}

/// The values a restart must show again: every metric's, except the trailing one, which
/// drains on the wall clock between the two scrapes.
fn restart_values(samples: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|(series, _)| {
            series.starts_with("nsm_metric_value{") && !series.contains("metric=\"users_7d\"")
        })
        .map(|(series, value)| (series.clone(), *value))
        .collect()
}

struct Freshness {
    achieved_rate: f64,
    messages: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The same events' delays to a bare consumer reading beside nsm: the broker's and the
    /// client's share of nsm's.
    bare: Delays,
}

/// Quantiles of delays, in milliseconds.
struct Delays {
    events: usize,
    p50_ms: f64,
    p99_ms: f64,
}

impl Delays {
    fn of(mut delays_ms: Vec<f64>) -> anyhow::Result<Delays> {
        if delays_ms.is_empty() {
            bail!("no delay measured");
        }
        delays_ms.sort_by(f64::total_cmp);
        let quantile = |q: f64| delays_ms[((delays_ms.len() - 1) as f64 * q).round() as usize];
        Ok(Delays {
            events: delays_ms.len(),
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
        })
    }
}

/// A bare consumer of every partition from its end, noting when each event of the freshness
/// run arrives (by the index in its header) until `stop`.
fn bare_arrivals(
    brokers: &str,
    partitions: i32,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Arrivals>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "nsm-bench-bare-freshness")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition_offset(TOPIC, partition, rdkafka::Offset::End)?;
    }
    consumer.assign(&list)?;
    Ok(std::thread::spawn(move || {
        let mut arrivals = Vec::new();
        let mut quiet_since = Instant::now();
        while !(stop.load(Ordering::Relaxed) && quiet_since.elapsed() > Duration::from_secs(1)) {
            match consumer.poll(Duration::from_millis(20)) {
                Some(Ok(message)) => {
                    let arrived = Instant::now();
                    quiet_since = arrived;
                    use rdkafka::message::Headers;
                    let index = message
                        .headers()
                        .and_then(|headers| {
                            headers.iter().find(|header| header.key == INDEX_HEADER)
                        })
                        .and_then(|header| header.value)
                        .and_then(|value| <[u8; 8]>::try_from(value).ok())
                        .map(u64::from_be_bytes);
                    if let Some(index) = index {
                        arrivals.push((index, arrived));
                    }
                }
                Some(Err(error)) => bail!("bare freshness consumer: {error}"),
                None => {}
            }
        }
        Ok(arrivals)
    }))
}

/// Each event's index in the freshness run and when it arrived.
type Arrivals = Vec<(u64, Instant)>;

/// The header carrying an event's index in the freshness run.
const INDEX_HEADER: &str = "nsm-bench-index";

/// Produces at `args.rate` for `args.freshness_seconds` while another thread scrapes.
fn freshness(
    args: &E2eArgs,
    brokers: &str,
    port: u16,
    instance: &Running,
) -> anyhow::Result<Freshness> {
    // The stream ended hours ago: the `messages` windows (1 h) that start after this run
    // began hold only what it sends. Current and previous cover an hour boundary passing;
    // before a partition sees this run, its current window is still the stream's last hour.
    let run_hour_s = (wall_clock_ms() / 3_600_000 * 3_600) as f64;
    let visible = move |samples: &BTreeMap<String, f64>| {
        ["current", "previous"]
            .iter()
            .filter(|window| {
                samples
                    .get(&format!(
                        "nsm_metric_window_start_timestamp_seconds{{metric=\"messages\",window=\"{window}\"}}"
                    ))
                    .is_some_and(|start_s| *start_s >= run_hour_s)
            })
            .filter_map(|window| {
                samples
                    .get(&format!(
                        "nsm_metric_value{{metric=\"messages\",window=\"{window}\"}}"
                    ))
                    .copied()
            })
            .sum::<f64>()
    };
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            // One scrape after the stop, which comes once everything is visible.
            loop {
                let last = stop.load(Ordering::Relaxed);
                if let Some(samples) = scrape(port) {
                    seen.push((Instant::now(), visible(&samples)));
                }
                if last {
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let bare_stop = Arc::new(AtomicBool::new(false));
    let bare = bare_arrivals(brokers, args.partitions as i32, bare_stop.clone())?;
    // The bare consumer's end offsets are looked up before the run starts.
    std::thread::sleep(Duration::from_secs(1));

    let total = args.rate * args.freshness_seconds;
    let users = args.users.max(1);
    let mut sent_messages = Vec::with_capacity(total as usize);
    let mut sent_all = Vec::with_capacity(total as usize);
    let mut payload = Vec::with_capacity(512);
    let started = Instant::now();
    for index in 0..total {
        let due = started + Duration::from_secs_f64(index as f64 / args.rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let user = index.wrapping_mul(2_654_435_761) % users;
        // Ids after the stream's, so none is a duplicate.
        let is_message = write_event(&mut payload, args.events + index, user, wall_clock_ms());
        let key = format!("user-{user:09}");
        let sent_at = Instant::now();
        sent_all.push(sent_at);
        let index_bytes = index.to_be_bytes();
        loop {
            let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: INDEX_HEADER,
                value: Some(&index_bytes),
            });
            match producer.send(
                BaseRecord::to(TOPIC)
                    .key(&key)
                    .payload(&payload)
                    .headers(headers),
            ) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => bail!("freshness producer: {error}"),
            }
        }
        if is_message {
            sent_messages.push(sent_at);
        }
    }
    let achieved_rate = total as f64 / started.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(30))?;
    let expected = sent_messages.len() as f64;
    let mut shown = 0.0;
    let mut counters = [("", 0.0); 4];
    let waited = wait(
        "the freshness run to be visible",
        Duration::from_secs(60),
        POLL,
        || {
            instance.check_alive()?;
            Ok(scrape(port).filter(|s| {
                shown = visible(s);
                counters = [
                    "nsm_events_consumed_total",
                    "nsm_events_duplicate_total",
                    "nsm_events_late_total",
                    "nsm_events_invalid_total",
                ]
                .map(|metric| (metric, sum_of(s, metric)));
                shown >= expected
            }))
        },
    )
    .with_context(|| {
        format!(
            "{shown} of {expected} messages visible ({counters:?}); see {}",
            instance.log.display()
        )
    });
    stop.store(true, Ordering::Relaxed);
    bare_stop.store(true, Ordering::Relaxed);
    let seen = scraper
        .join()
        .map_err(|_| anyhow::anyhow!("scraper panicked"))?;
    waited?;
    let arrivals = bare
        .join()
        .map_err(|_| anyhow::anyhow!("the bare freshness consumer panicked"))??;
    let bare = Delays::of(
        arrivals
            .iter()
            .filter_map(|(index, arrived)| {
                let sent = sent_all.get(usize::try_from(*index).ok()?)?;
                Some(arrived.saturating_duration_since(*sent).as_secs_f64() * 1e3)
            })
            .collect(),
    )
    .context("the bare consumer received no event of the freshness run")?;

    // The k-th message is visible at the first scrape showing at least k.
    let mut delays_ms = Vec::with_capacity(sent_messages.len());
    let mut scrape_index = 0;
    for (k, sent_at) in sent_messages.iter().enumerate() {
        while scrape_index < seen.len() && seen[scrape_index].1 < (k + 1) as f64 {
            scrape_index += 1;
        }
        let Some((visible_at, _)) = seen.get(scrape_index) else {
            bail!("message {k} of the freshness run never showed in a scrape");
        };
        delays_ms.push(visible_at.saturating_duration_since(*sent_at).as_secs_f64() * 1e3);
    }
    delays_ms.sort_by(f64::total_cmp);
    let quantile = |q: f64| delays_ms[((delays_ms.len() - 1) as f64 * q).round() as usize];
    Ok(Freshness {
        achieved_rate,
        messages: delays_ms.len(),
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        max_ms: quantile(1.0),
        bare,
    })
}

/// A child process, killed if still running when dropped; its output goes to a log file.
struct Running {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Running {
    fn spawn(name: &'static str, command: &mut Command, dir: &Path) -> anyhow::Result<Running> {
        let (log, file) = open_log(name, dir)?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        Self::start(name, command, log)
    }

    /// A child the bench talks to: its stdin and stdout are pipes (`child.stdin`,
    /// `child.stdout`), its stderr goes to the log.
    fn spawn_talking(
        name: &'static str,
        command: &mut Command,
        dir: &Path,
    ) -> anyhow::Result<Running> {
        let (log, file) = open_log(name, dir)?;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file);
        Self::start(name, command, log)
    }

    fn start(name: &'static str, command: &mut Command, log: PathBuf) -> anyhow::Result<Running> {
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Running { name, child, log })
    }

    fn check_alive(&self) -> anyhow::Result<()> {
        let pid = self.child.id();
        // A zombie (exited, not yet reaped) has no `/proc/<pid>/stat` state other than Z.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let exited = state
            .rsplit_once(')')
            .is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'));
        if exited {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "{} exited; the end of its log:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(&mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.name);
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("{} exited with {status} after SIGTERM", self.name);
        }
        Ok(())
    }

    /// Waits for an exit of the child's own accord, which must be a success.
    fn wait_for_exit(&mut self, patience: Duration) -> anyhow::Result<()> {
        let status = wait(&format!("{} to exit", self.name), patience, POLL, || {
            Ok(self.child.try_wait()?)
        })?;
        if !status.success() {
            bail!(
                "{} exited with {status}; see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }
}

/// `<dir>/<name>.log`, opened for appending.
fn open_log(name: &str, dir: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    Ok((log, file))
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every `every` until it gives a value, or fails after `patience`.
fn wait<T>(
    what: &str,
    patience: Duration,
    every: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {patience:?}");
        }
        std::thread::sleep(every);
    }
}

/// Samples of `/metrics` in the Prometheus text format, by `name{labels}` as written.
fn scrape(port: u16) -> Option<BTreeMap<String, f64>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if head.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of a metric.
/// Messages consumed from one topic.
fn consumed_of(samples: &BTreeMap<String, f64>, topic: &str) -> f64 {
    let label = format!("topic=\"{topic}\"");
    samples
        .iter()
        .filter(|(series, _)| {
            series.starts_with("nsm_events_consumed_total{") && series.contains(&label)
        })
        .map(|(_, value)| value)
        .sum()
}

fn sum_of(samples: &BTreeMap<String, f64>, metric: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series
                .strip_prefix(metric)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .map(|(_, value)| value)
        .sum()
}

fn find_tansu() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("tansu"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let in_cargo = std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin/tansu"));
    on_path
        .into_iter()
        .chain(in_cargo)
        .find(|candidate| candidate.is_file())
        .context("tansu is not installed: `make tansu` installs it")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}
