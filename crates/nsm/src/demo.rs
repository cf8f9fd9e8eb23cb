//! `nsm demo`: the embedded default. An in-process Kafka broker (librdkafka's mock cluster, a
//! real protocol endpoint), the demo generator producing into it, and the pipeline consuming
//! through the same client path as production.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{anyhow, Context, Result};
use nsm_core::Config;
use nsm_kafka::{ClientSettings, EventProducer};
use tracing::info;

use crate::generator::{run_generator, stop_flag, GeneratorOptions, Product, Scenario};
use crate::run::{load_config, run_pipeline};

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
    eprintln!(
        "\nnsm demo: up to {} events/s of {} flow through an in-process Kafka broker.\n  \
         scenario: {} (over {}).\n  \
         curl http://{}/metrics | grep nsm_metric_value\n  \
         curl http://{}/api/v1/metrics\n  Ctrl-C stops everything.\n",
        args.rate,
        args.product.describe(),
        args.scenario.describe(),
        humantime::format_duration(args.scenario_period),
        args.listen,
        args.listen
    );

    let stop = stop_flag();
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
    };
    let generator = std::thread::Builder::new()
        .name("nsm-demo-generator".into())
        .spawn(move || run_generator(&producer, options, &generator_stop))
        .context("cannot start the generator")?;
    let result = run_pipeline(config, stop.clone());
    stop.store(true, Ordering::SeqCst);
    let generated = generator
        .join()
        .map_err(|_| anyhow!("the generator panicked"))?;
    drop(cluster);
    result?;
    generated.map(|_| ())
}
