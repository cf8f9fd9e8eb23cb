//! `nsm demo`: the embedded default. An in-process Kafka broker (librdkafka's mock cluster, a
//! real protocol endpoint), the demo generator producing into it, the pipeline consuming
//! through the same client path as production, and a real Prometheus (Debian's, when
//! installed) scraping it with the config's generated rules.
//!
//! Time is compressed (`--time-scale`, a week in ten minutes by default): nsm's event clock
//! and the generator's stamps run that much faster, and the rules are generated with every
//! window-derived duration divided by the same factor, so weekly windows roll over, and the
//! alerts about them fire, within minutes. `--history` weeks of the stream are produced first,
//! so previous windows and baselines exist at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{anyhow, Context, Result};
use nsm_core::Config;
use nsm_kafka::{ClientSettings, EventProducer};
use tracing::{info, warn};

use crate::clock::EventClock;
use crate::demo_events::{run_generator, GeneratorOptions, Product, Scenario};
use crate::run::{load_config, run_pipeline_with_clock};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The product whose events are generated and whose example config, built in from
    /// config/, measures them.
    #[arg(long, value_enum, default_value_t = Product::default())]
    product: Product,
    /// How the stream changes over time, so each alert's situation can be watched: healthy
    /// growth, a North Star flattening while revenue grows, a guardrail breach, traffic
    /// stopping.
    #[arg(long, value_enum, default_value_t = Scenario::default())]
    scenario: Scenario,
    /// The time over which the scenario ramps (traffic-stops: how long traffic flows).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    scenario_period: std::time::Duration,
    /// Events per second of the demo stream (at most; a scenario may leave slots empty).
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Where to serve /metrics and the API.
    #[arg(long, default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// Partitions of the demo topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// How many times faster than the wall clock event time runs (1008: a week in ten
    /// minutes); 1 runs in real time.
    #[arg(long, default_value_t = 1008)]
    time_scale: u32,
    /// Event time before the start filled first with the steady stream, so that previous
    /// windows and baselines exist at once ("0s": none).
    #[arg(long, default_value = "3w", value_parser = humantime::parse_duration)]
    history: std::time::Duration,
    /// Where the demo's Prometheus serves its UI and API ("off": no Prometheus).
    #[arg(long, default_value = "127.0.0.1:9090")]
    prometheus: String,
    /// Run the demo with this config instead of the product's built-in one (its brokers and
    /// state path are replaced by the embedded broker and a temporary directory). The stream
    /// is still the --product one, so the config should filter on its events.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => load_config(path)?,
        None => Config::from_toml(args.product.config_text(), &|name| std::env::var(name).ok())
            .map_err(|errors| anyhow!("built-in {}: {errors}", args.product.config_file()))?,
    };
    let topic = config
        .kafka
        .topics
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the demo config names no topic"))?;
    // The mock broker cannot create topics through the admin API: nsm's own are made here.
    let mut topics = vec![
        (topic.as_str(), args.partitions),
        (config.kafka.dead_letter_topic.as_str(), 1),
    ];
    if let Some(changelog) = &config.state.changelog_topic {
        topics.push((changelog.as_str(), args.partitions));
    }
    let cluster =
        nsm_kafka::mock::start(&topics).context("cannot start the in-process Kafka broker")?;
    // The embedded broker starts empty every time, so the state must too: stored offsets of
    // an earlier run would point past the new topic's end.
    let state_dir = tempfile::Builder::new()
        .prefix("nsm-demo-state-")
        .tempdir()
        .context("cannot create a state directory")?;
    config.kafka.brokers = cluster.bootstrap_servers();
    config.kafka.properties.clear();
    config.state.path = state_dir.path().to_path_buf();
    config.http.listen = args.listen;
    info!(brokers = %config.kafka.brokers, topic = %topic, state = %state_dir.path().display(), "embedded broker started");
    let week_takes = std::time::Duration::from_secs(7 * 86_400 / u64::from(args.time_scale.max(1)));
    eprintln!(
        "\nnsm demo: up to {} events/s of {} flow through an in-process Kafka broker.\n  \
         time runs {}x faster than the wall clock: a week of events takes {}; {} of history \
         come first.\n  \
         scenario: {} (over {}).\n  \
         curl http://{}/metrics | grep nsm_metric_value\n  \
         curl http://{}/api/v1/metrics\n{}  Ctrl-C stops everything.\n",
        args.rate,
        args.product.describe(),
        args.time_scale,
        humantime::format_duration(week_takes),
        humantime::format_duration(args.history),
        args.scenario.describe(),
        humantime::format_duration(args.scenario_period),
        args.listen,
        args.listen,
        match args.prometheus.as_str() {
            "off" => String::new(),
            listen => format!(
                "  Prometheus with the generated rules: http://{listen}/alerts (alerts), \
                 http://{listen}/graph?g0.expr=nsm%3Ametric_value%3Asum (values)\n"
            ),
        }
    );

    let clock = EventClock::scaled(args.time_scale);
    let source = args
        .config
        .as_ref()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| args.product.config_file().to_string());
    let prometheus_dir = tempfile::Builder::new()
        .prefix("nsm-demo-prometheus-")
        .tempdir()
        .context("cannot create a directory for Prometheus")?;
    let _prometheus = match args.prometheus.as_str() {
        "off" => None,
        listen => start_prometheus(
            &config,
            &source,
            args.time_scale,
            listen,
            prometheus_dir.path(),
        )?,
    };

    let stop = crate::run::stop_flag();
    let producer = EventProducer::new(&ClientSettings::new(config.kafka.brokers.clone()))?;
    let generator_stop = stop.clone();
    let options = GeneratorOptions {
        product: args.product,
        topic,
        rate: args.rate,
        count: None,
        users: 5_000,
        seed: 42,
        bad_share: 0.002,
        scenario: Some(args.scenario),
        scenario_period: args.scenario_period,
        clock,
        history: args.history,
    };
    let generator = std::thread::Builder::new()
        .name("nsm-demo-generator".into())
        .spawn(move || run_generator(&producer, options, &generator_stop))
        .context("cannot start the generator")?;
    let result = run_pipeline_with_clock(config, stop.clone(), clock);
    stop.store(true, Ordering::SeqCst);
    let generated = generator
        .join()
        .map_err(|_| anyhow!("the generator panicked"))?;
    drop(cluster);
    result?;
    generated.map(|_| ())
}

/// Debian's Prometheus, as `make deps` installs it (and the end-to-end tests run it).
const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus child process, stopped with the demo.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts Prometheus on `listen`, scraping the demo's nsm every half second (a weekly
/// baseline's 10-minute step is 0.6 s of wall clock at the default scale, and the fast-burn
/// rules read the value at each step boundary) and evaluating the
/// config's rules with its durations divided by `time_scale`. Without a Prometheus installed
/// the demo goes on without it, saying so.
fn start_prometheus(
    config: &Config,
    source: &str,
    time_scale: u32,
    listen: &str,
    dir: &std::path::Path,
) -> Result<Option<Prometheus>> {
    if !std::path::Path::new(PROMETHEUS).exists() {
        warn!(
            "{PROMETHEUS} is not installed (make deps installs it): the demo runs without \
             Prometheus and its alerts"
        );
        return Ok(None);
    }
    std::fs::create_dir_all(dir).context("cannot create the Prometheus directory")?;
    let rules = dir.join("nsm.rules.yml");
    std::fs::write(&rules, nsm_gen::rules_scaled(config, source, time_scale))
        .context("cannot write the demo's rule file")?;
    let prometheus_config = dir.join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!(
            "# nsm demo: event time runs {time_scale}x faster than the wall clock.\n\
             global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: nsm\n    static_configs:\n      - targets: ['{nsm}']\n",
            rules = rules.display(),
            nsm = config.http.listen,
        ),
    )
    .context("cannot write the demo's Prometheus config")?;
    let log = std::fs::File::create(dir.join("prometheus.log"))
        .context("cannot create the Prometheus log")?;
    let child = std::process::Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", prometheus_config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {PROMETHEUS}"))?;
    let mut prometheus = Prometheus(child);
    // A port already taken (another Prometheus) makes it exit at once: say so, go on.
    std::thread::sleep(std::time::Duration::from_millis(500));
    if let Ok(Some(status)) = prometheus.0.try_wait() {
        warn!(%status, log = %dir.join("prometheus.log").display(),
              "Prometheus stopped at start (is {listen} taken?); the demo runs without it");
        return Ok(None);
    }
    info!(address = %listen, rules = %rules.display(), time_scale, "Prometheus started");
    Ok(Some(prometheus))
}
