//! `nsm run`: wires the store, the consumer thread and the HTTP server, and stops them in
//! order on SIGINT or SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use nsm_core::config::Resolver;
use nsm_core::engine::Plan;
use nsm_core::Config;
use nsm_http::{
    AppState, BasicAuth, Limits, Liveness, Protection, Published, Readiness, Telemetry,
};
use nsm_kafka::{ClientSettings, ConsumerOptions, DeadLetterStats};
use nsm_state::{Store, StoreOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::changelog::Changelog;
use crate::clock::EventClock;
use crate::open_files;
use crate::pipeline::{Pipeline, PipelineParts};
use crate::repartition::Repartition;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Reads and validates a config file, resolving `${VAR}` from the environment and
/// `${file:PATH}` from the file system.
pub fn load_config(path: &std::path::Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    Config::from_toml_with(
        &text,
        &Resolver {
            env: &|name| std::env::var(name).ok(),
            file: &read_secret_file,
        },
    )
    .map_err(|errors| anyhow!("{}: {errors}", path.display()))
}

/// The content of a `${file:PATH}` secret; the error says why not, never what is inside.
pub fn read_secret_file(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read secret file {path}: {error}"))
}

/// Logs the North Star linter's findings; its errors (revenue as the North Star, more than
/// two North Stars) stop the start, as `nsm check` reports them.
pub fn refuse_lint_errors(config: &Config) -> Result<()> {
    let (errors, warnings): (Vec<_>, Vec<_>) = nsm_core::lint::lint(config)
        .into_iter()
        .partition(|finding| finding.is_error());
    for finding in warnings {
        warn!(check = finding.check, path = %finding.path, hint = finding.hint, "{}", finding.message);
    }
    let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "the config makes a classic North Star mistake:\n  {}",
            errors.join("\n  ")
        ))
    }
}

pub fn client_settings(config: &Config) -> ClientSettings {
    ClientSettings {
        brokers: config.kafka.brokers.clone(),
        properties: config.kafka.properties.clone(),
    }
}

/// A flag that stops what watches it once set: the pipeline, a demo's event thread.
pub fn stop_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// Runs the pipeline until `stop` is set (by a signal, or by the caller).
pub fn run_pipeline(config: Config, stop: Arc<AtomicBool>) -> Result<()> {
    run_pipeline_with_clock(config, stop, EventClock::wall())
}

/// [`run_pipeline`] judging event time by `clock` (the demo's runs faster).
pub fn run_pipeline_with_clock(
    config: Config,
    stop: Arc<AtomicBool>,
    clock: EventClock,
) -> Result<()> {
    refuse_lint_errors(&config)?;
    let protection = http_protection(&config)?;
    let plan = Plan::from_config(&config);
    let http_limits = http_limits(&config);
    std::fs::create_dir_all(&config.state.path).with_context(|| {
        format!(
            "cannot create the state directory {}",
            config.state.path.display()
        )
    })?;
    let store = Store::open(
        &config.state.path,
        &plan,
        &StoreOptions {
            sync_writes: config.state.sync_writes,
            max_open_files: nsm_state::DEFAULT_MAX_OPEN_FILES,
            ..StoreOptions::default()
        },
    )?;
    info!(path = %config.state.path.display(), metrics = plan.metrics().len(), zone = plan.calendar().zone_name(), "state opened");

    let telemetry = Arc::new(Telemetry::new(&plan, VERSION));
    let published = Arc::new(RwLock::new(Published::default()));
    let readiness = Arc::new(Readiness::default());
    readiness.set_not_ready("waiting for the partition assignment");
    let liveness = Arc::new(Liveness::default());
    let dead_letter_stats = Arc::new(DeadLetterStats::default());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nsm-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.http.listen))
        .with_context(|| format!("cannot listen on {} (http.listen)", config.http.listen))?;
    info!(
        address = %config.http.listen,
        tls = protection.tls.is_some(),
        basic_auth = protection.basic_auth.is_some(),
        "serving /metrics, /healthz, /readyz and /api/v1"
    );
    let app_state = AppState {
        plan: Arc::new(plan.clone()),
        store: store.clone(),
        telemetry: telemetry.clone(),
        published: published.clone(),
        readiness: readiness.clone(),
        liveness: liveness.clone(),
    };
    let (http_stop_sender, mut http_stop) = watch::channel(false);
    let server = runtime.spawn(nsm_http::serve(
        listener,
        app_state,
        protection,
        http_limits,
        async move {
            let _ = http_stop.wait_for(|stopped| *stopped).await;
        },
    ));
    runtime.spawn(stop_on_signal(stop.clone()));

    ensure_dead_letter_topic(&config)?;
    let needs_inputs = config.state.changelog_topic.is_some() || !plan.rekey_fields().is_empty();
    let inputs = if needs_inputs {
        input_topics(&config, &readiness, &stop)?
    } else {
        Vec::new()
    };
    let repartition = ensure_repartition_topic(&config, &plan, inputs.clone())?;
    // The repartition topic's partitions have changelog partitions of their own, after the
    // input topics'.
    let mut layout = nsm_state::ChangelogLayout::default();
    let mut changelog_partitions = most_partitions(&inputs);
    if let Some(repartition) = &repartition {
        layout = layout.with_offset(&repartition.topic, changelog_partitions);
        changelog_partitions += repartition.partitions;
    }
    let changelog = match &config.state.changelog_topic {
        Some(topic) => {
            ensure_changelog_topic(&config, topic, changelog_partitions)?;
            info!(topic = %topic, "state changes go to the changelog topic; partitions taken over are restored from it");
            Some(Changelog::new(
                &client_settings(&config),
                topic,
                &store,
                stop.clone(),
                layout,
            )?)
        }
        None => {
            warn!("state.changelog = false: a partition that moves to another instance starts from empty state there; run one instance only");
            None
        }
    };
    // Metrics added or changed are backfilled from the history into a store of their own,
    // beside the live one (docs/design/backfill.md).
    let backfill_dir = crate::backfill::backfill_path(&config.state.path);
    std::fs::create_dir_all(&backfill_dir).with_context(|| {
        format!(
            "cannot create the backfill directory {}",
            backfill_dir.display()
        )
    })?;
    let backfill_store = Store::open(&backfill_dir, &plan, &StoreOptions::default())?;
    let backfills = crate::backfill::Backfills::start(
        plan.clone(),
        backfill_store,
        backfill_dir,
        crate::backfill::Setting {
            settings: client_settings(&config),
            // Each backfilling partition's engine: a share of the live budget.
            memory_limit: (config.state.memory_limit / 8).max(1 << 20),
            clock,
            rate: config.state.backfill_rate,
            rekeying: repartition
                .as_ref()
                .map(|repartition| crate::backfill::Rekeying {
                    partitions: repartition.partitions,
                    inputs: nsm_core::engine::Inputs::text_of(&inputs),
                }),
        },
    )
    .context("cannot start the backfill thread")?;
    let options = ConsumerOptions {
        client: client_settings(&config),
        topics: config.kafka.topics.clone(),
        group_id: config.kafka.group_id.clone(),
        dead_letter_topic: config.kafka.dead_letter_topic.clone(),
        dead_letter_on_failure: config.kafka.dead_letter_on_failure,
        checkpoint_interval: config.state.flush_interval,
        start_from: config.kafka.start_from,
        repartition_topic: repartition
            .as_ref()
            .map(|repartition| repartition.topic.clone()),
    };
    let pipeline = Pipeline::new(PipelineParts {
        plan,
        store,
        changelog,
        telemetry,
        published,
        readiness: readiness.clone(),
        dead_letter_stats: dead_letter_stats.clone(),
        idle_timeout: config.time.idle_timeout,
        flush_max_entries: config.state.flush_max_entries,
        memory_limit: config.state.memory_limit,
        liveness,
        stuck_after: stuck_after(&config),
        clock,
        repartition,
        backfills: Some(backfills),
    });
    let consumer_stop = stop.clone();
    let consumer = std::thread::Builder::new()
        .name("nsm-consumer".into())
        .spawn(move || {
            nsm_kafka::run_consumer(&options, pipeline, dead_letter_stats, consumer_stop)
        })
        .context("cannot start the consumer thread")?;
    let result = consumer
        .join()
        .map_err(|_| anyhow!("the consumer thread panicked"))?;
    stop.store(true, Ordering::SeqCst);
    // A failure already said why nsm is not ready (a state write failed...): keep that reason.
    if readiness.is_ready() {
        readiness.set_not_ready("shutting down");
    }
    let _ = http_stop_sender.send(true);
    runtime.block_on(async {
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => warn!(error = %error, "http server error"),
            Ok(Err(error)) => warn!(error = %error, "http server task failed"),
            Err(_) => warn!("http server did not stop within 5s"),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result.context("the consumer stopped with an error")?;
    info!("stopped cleanly; state and offsets are stored");
    Ok(())
}

/// The HTTP server's timeouts and connection limit from `[http]`, after raising the open-file
/// limit: connections get only the descriptors RocksDB's table files and the reserve leave.
fn http_limits(config: &Config) -> Limits {
    let file_limit = open_files::raise_limit();
    let table_files = u64::try_from(nsm_state::DEFAULT_MAX_OPEN_FILES).unwrap_or(0);
    let max_connections =
        open_files::connections_within(file_limit, table_files, config.http.max_connections);
    if max_connections < config.http.max_connections {
        warn!(
            open_files = file_limit,
            table_files,
            reserved = open_files::RESERVED,
            max_connections,
            "the open-file limit leaves room for fewer HTTP connections than \
             http.max_connections; raise it (LimitNOFILE= in systemd, ulimit -n)"
        );
    } else {
        info!(open_files = file_limit, max_connections, "open-file limit");
    }
    Limits {
        header_timeout: config.http.header_timeout,
        idle_timeout: config.http.idle_timeout,
        max_connections,
    }
}

/// HTTPS and basic auth from `[http.tls]` and `[http.basic_auth]`. The certificate and key
/// are loaded here, before anything starts, so a wrong path stops nsm at once with the path.
pub fn http_protection(config: &Config) -> Result<Protection> {
    let tls = match &config.http.tls {
        Some(tls) => Some(nsm_http::tls_server_config(&tls.cert_file, &tls.key_file)?),
        None => None,
    };
    let basic_auth = config
        .http
        .basic_auth
        .as_ref()
        .and_then(|users| BasicAuth::new(users.iter()));
    if basic_auth.is_some() && tls.is_none() {
        warn!("http.basic_auth without http.tls: passwords cross the network in clear text");
    }
    Ok(Protection { tls, basic_auth })
}

/// The dead-letter topic must exist before the first rejected event: the dead-letter producer
/// retries forever, so a missing topic would hold every checkpoint back. nsm creates it when
/// the broker allows, and otherwise stops with a clear error.
fn ensure_dead_letter_topic(config: &Config) -> Result<()> {
    let settings = client_settings(config);
    let topic = config.kafka.dead_letter_topic.as_str();
    if nsm_kafka::topic_partition_count(&settings, topic)?.is_some() {
        return Ok(());
    }
    if let Err(error) = nsm_kafka::ensure_topics_replicated(
        &settings,
        &[(topic, 1)],
        config.kafka.replication_factor,
    ) {
        warn!(topic, error = %error, "cannot create the dead-letter topic");
    }
    match nsm_kafka::topic_partition_count(&settings, topic)? {
        Some(_) => {
            info!(topic, "dead-letter topic created");
            Ok(())
        }
        None => Err(anyhow!("the dead-letter topic {topic:?} (kafka.dead_letter_topic) does not exist and cannot be created; create it")),
    }
}

/// Every input topic and its partitions. Until every input topic exists its partitions are
/// unknown, so nsm waits for them, not ready and saying why, rather than guess the size of the
/// topics it creates from them.
fn input_topics(
    config: &Config,
    readiness: &Readiness,
    stop: &AtomicBool,
) -> Result<Vec<(String, u32)>> {
    let settings = client_settings(config);
    let mut waiting_since: Option<Instant> = None;
    let inputs = loop {
        let mut inputs = Vec::new();
        let mut missing = Vec::new();
        for input in &config.kafka.topics {
            match nsm_kafka::topic_partition_count(&settings, input)? {
                Some(count) => inputs.push((input.clone(), u32::try_from(count).unwrap_or(0))),
                None => missing.push(input.as_str()),
            }
        }
        if missing.is_empty() {
            break inputs;
        }
        if stop.load(Ordering::Relaxed) {
            return Err(anyhow!(
                "stopped while waiting for the input topic(s) {missing:?}"
            ));
        }
        if waiting_since.is_none() {
            warn!(topics = ?missing, "input topic(s) missing: waiting for them before sizing the topics nsm creates (kafka.topics)");
            readiness.set_not_ready(format!(
                "waiting for the input topic(s) {} to exist (kafka.topics)",
                missing.join(", ")
            ));
            waiting_since = Some(Instant::now());
        }
        std::thread::sleep(INPUT_TOPIC_RECHECK);
    };
    if let Some(since) = waiting_since {
        info!(
            waited_ms = since.elapsed().as_millis() as u64,
            "the input topics exist"
        );
        readiness.set_not_ready("waiting for the partition assignment");
    }
    Ok(inputs)
}

/// The largest input topic's partitions.
fn most_partitions(inputs: &[(String, u32)]) -> u32 {
    inputs
        .iter()
        .map(|(_, partitions)| *partitions)
        .max()
        .unwrap_or(1)
        .max(1)
}

/// The changelog needs a partition for every input partition number (as many as the input
/// topic with the most), then one for each repartition partition; partitions added later are
/// added to the changelog when they are taken (`Changelog::restore`).
fn ensure_changelog_topic(config: &Config, topic: &str, partitions: u32) -> Result<()> {
    nsm_kafka::ensure_changelog_topic(
        &client_settings(config),
        topic,
        partitions as usize,
        config.kafka.replication_factor,
    )?;
    Ok(())
}

/// The repartition topic, created with as many partitions as the largest input topic. An
/// existing one keeps its partitions: an entity's partition is its hash modulo their number,
/// so changing it would split entities counted so far.
fn ensure_repartition_topic(
    config: &Config,
    plan: &Plan,
    inputs: Vec<(String, u32)>,
) -> Result<Option<Repartition>> {
    if plan.rekey_fields().is_empty() {
        return Ok(None);
    }
    let settings = client_settings(config);
    let topic = config.kafka.repartition_topic.as_str();
    let partitions = match nsm_kafka::topic_partition_count(&settings, topic)? {
        Some(found) => found,
        None => {
            let wanted = most_partitions(&inputs);
            nsm_kafka::ensure_topics_replicated(
                &settings,
                &[(topic, i32::try_from(wanted).unwrap_or(i32::MAX))],
                config.kafka.replication_factor,
            )
            .with_context(|| {
                format!(
                    "cannot create the repartition topic {topic:?} (kafka.repartition_topic); \
                     create it with {wanted} partitions"
                )
            })?;
            nsm_kafka::topic_partition_count(&settings, topic)?.ok_or_else(|| {
                anyhow!("the repartition topic {topic:?} (kafka.repartition_topic) does not exist and cannot be created; create it with {wanted} partitions")
            })?
        }
    };
    let fields: Vec<String> = plan
        .rekey_fields()
        .iter()
        .map(ToString::to_string)
        .collect();
    info!(topic, partitions, by = ?fields,
          "metrics counting another entity than the message key (kafka.key_field) are counted through the repartition topic");
    Ok(Some(Repartition::new(
        topic,
        u32::try_from(partitions).unwrap_or(1),
        &inputs,
        plan,
    )))
}

/// How long a turn of the consumer loop or a checkpoint write may last before `/healthz`
/// fails: `max.poll.interval.ms` (librdkafka's default 300 s), after which the group takes a
/// consumer that has not polled for dead anyway.
fn stuck_after(config: &Config) -> Duration {
    let millis = config
        .kafka
        .properties
        .get("max.poll.interval.ms")
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(300_000);
    Duration::from_millis(millis)
}

/// How often a missing input topic is looked for at start.
const INPUT_TOPIC_RECHECK: Duration = Duration::from_secs(2);

/// Sets `stop` on the first SIGINT or SIGTERM.
async fn stop_on_signal(stop: Arc<AtomicBool>) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                warn!(error = %error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received: stopping"),
        _ = terminate => info!("SIGTERM received: stopping"),
    }
    stop.store(true, Ordering::SeqCst);
}
