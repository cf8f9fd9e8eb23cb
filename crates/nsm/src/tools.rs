//! Small commands around the pipeline: `check`, `produce`, `read`, `generate`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nsm_core::metric::{MetricKind, Role};
use nsm_kafka::{ensure_topics, read_topic, ClientSettings, EventProducer};
use serde_json::json;

use crate::demo_events::{run_generator, GeneratorOptions, Product};
use crate::run::{http_protection, load_config};

/// Prints a summary of a valid config, or every problem of an invalid one.
pub fn check(path: &Path) -> Result<()> {
    let config = load_config(path)?;
    // Secret files are read by load_config; the certificate and key are loaded here, so
    // that a check before the start (systemd's ExecStartPre) catches a wrong path too.
    let protection = http_protection(&config)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}: valid", path.display())?;
    writeln!(
        out,
        "  kafka: {} topic(s) {:?} on {}, group {:?}, dead letters to {:?}",
        config.kafka.topics.len(),
        config.kafka.topics,
        config.kafka.brokers,
        config.kafka.group_id,
        config.kafka.dead_letter_topic
    )?;
    let plan = nsm_core::engine::Plan::from_config(&config);
    if !plan.rekey_fields().is_empty() {
        let rekeyed: Vec<&str> = (0..plan.metrics().len())
            .filter(|index| plan.route(*index) != nsm_core::engine::Route::Local)
            .map(|index| plan.metrics()[index].name.as_str())
            .collect();
        let fields: Vec<String> = plan
            .rekey_fields()
            .iter()
            .map(ToString::to_string)
            .collect();
        if config.events.dedup_across_partitions {
            writeln!(
                out,
                "  repartition: copies of an event may be on different partitions \
                 (events.dedup_across_partitions): every metric ({}) is counted through the \
                 topic {:?} (kafka.repartition_topic), keyed by {}, where each event's copies \
                 meet and count once",
                rekeyed.join(", "),
                config.kafka.repartition_topic,
                fields.join(", ")
            )?;
        } else {
            writeln!(
                out,
                "  repartition: {} count {} while events are keyed by {}: counted exactly \
                 through the topic {:?} (kafka.repartition_topic), keyed by {}",
                rekeyed.join(", "),
                fields.join(", "),
                config
                    .kafka
                    .key_field
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                config.kafka.repartition_topic,
                fields.join(", ")
            )?;
        }
    }
    let users = config
        .http
        .basic_auth
        .as_ref()
        .map_or(0, |users| users.len());
    writeln!(
        out,
        "  http: {}://{}{}",
        if protection.tls.is_some() {
            "https"
        } else {
            "http"
        },
        config.http.listen,
        match users {
            0 => String::new(),
            1 => ", basic auth for 1 user".to_string(),
            users => format!(", basic auth for {users} users"),
        }
    )?;
    writeln!(
        out,
        "  time: zone {}, week starts {:?}, allowed lateness {}ms",
        config.time.calendar.zone_name(),
        config.time.calendar.week_start(),
        config.time.allowed_lateness_ms
    )?;
    for role in [Role::NorthStar, Role::Input, Role::Guardrail, Role::Revenue] {
        for metric in config.metrics_with_role(role) {
            let what = match &metric.kind {
                MetricKind::Count => "count of events".to_string(),
                MetricKind::Sum { field } => format!("sum of {field}"),
                MetricKind::Distinct { field } => format!("distinct {field}"),
                MetricKind::Ratio {
                    numerator,
                    denominator,
                } => format!("{numerator} / {denominator}"),
                MetricKind::Threshold {
                    entity,
                    actor: Some(actor),
                    at_least,
                } => format!("{entity} with at least {at_least} distinct {actor}"),
                MetricKind::Conversion {
                    entity, within_ms, ..
                } => format!("{entity} converting within {}s", within_ms / 1000),
                MetricKind::Retention { of } => {
                    format!("share of last window's {of} back in this one")
                }
                MetricKind::Threshold {
                    entity,
                    actor: None,
                    at_least,
                } => format!("{entity} with at least {at_least} events"),
            };
            let filter = metric.filter.describe();
            let owner = metric
                .owner
                .as_deref()
                .map(|owner| format!(", owner {owner}"))
                .unwrap_or_default();
            writeln!(
                out,
                "  {:<10} {}: {what} where {filter}, per {}{owner}",
                role.label(),
                metric.name,
                metric.window_label()
            )?;
        }
    }
    let findings = nsm_core::lint::lint(&config);
    if findings.is_empty() {
        writeln!(out, "  lint: no findings")?;
    }
    for finding in &findings {
        writeln!(out, "  {finding}")?;
    }
    let errors = findings.iter().filter(|finding| finding.is_error()).count();
    if errors > 0 {
        bail!(
            "{}: {errors} lint error{} (listed above); nsm run refuses this config too",
            path.display(),
            if errors == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

#[derive(Debug, clap::Args)]
pub struct ConnectionArgs {
    /// Kafka bootstrap servers (host:port,...).
    #[arg(long, env = "NSM_BROKERS")]
    brokers: String,
    /// librdkafka property, repeatable (`--property security.protocol=SSL`).
    #[arg(long = "property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
}

impl ConnectionArgs {
    fn settings(&self) -> ClientSettings {
        let mut settings = ClientSettings::new(self.brokers.clone());
        settings.properties = self.properties.iter().cloned().collect();
        settings
    }
}

#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[arg(long)]
    topic: String,
    /// File of messages, one per line; `-` or absent reads standard input. Lines are sent as
    /// they are, valid JSON or not.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Top-level JSON field whose value becomes the message key (keeps an entity in one
    /// partition).
    #[arg(long)]
    key_field: Option<String>,
    /// Create the topic with this many partitions if it does not exist.
    #[arg(long)]
    partitions: Option<i32>,
}

pub fn produce(args: ProduceArgs) -> Result<()> {
    let settings = args.connection.settings();
    if let Some(partitions) = args.partitions {
        ensure_topics(&settings, &[(args.topic.as_str(), partitions)])?;
    }
    let reader: Box<dyn BufRead> = match &args.file {
        Some(path) if path.as_os_str() != "-" => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        )),
        _ => Box::new(std::io::stdin().lock()),
    };
    let producer = EventProducer::new(&settings)?;
    let mut sent = 0u64;
    for line in reader.split(b'\n') {
        let line = line.context("cannot read input")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let key = args.key_field.as_ref().and_then(|field| {
            let value: serde_json::Value = serde_json::from_slice(&line).ok()?;
            match value.get(field)? {
                serde_json::Value::String(text) => Some(text.clone()),
                other => Some(other.to_string()),
            }
        });
        producer.send(&args.topic, key.as_deref().map(str::as_bytes), &line)?;
        sent += 1;
    }
    producer
        .flush(Duration::from_secs(60))
        .context("not every message was delivered within 60s")?;
    eprintln!("produced {sent} messages to {}", args.topic);
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[arg(long)]
    topic: String,
    /// Stop once no message arrived for this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    quiet: Duration,
    /// Stop after this long in any case.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    deadline: Duration,
}

pub fn read(args: ReadArgs) -> Result<()> {
    let records = read_topic(
        &args.connection.settings(),
        &args.topic,
        args.quiet,
        args.deadline,
    )?;
    let mut out = std::io::stdout().lock();
    for record in records {
        let headers: serde_json::Map<String, serde_json::Value> = record
            .headers
            .iter()
            .map(|(key, value)| (key.clone(), json!(value)))
            .collect();
        let line = json!({
            "partition": record.partition,
            "offset": record.offset,
            "key": record.key.as_deref().map(String::from_utf8_lossy),
            "headers": headers,
            "payload": String::from_utf8_lossy(&record.payload),
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    /// The product whose events to generate (its example config in config/ measures them).
    #[arg(long, value_enum, default_value_t = Product::default())]
    product: Product,
    /// Topic to produce to [default: the product config's topic, e.g. collaboration-events].
    #[arg(long)]
    topic: Option<String>,
    /// Events per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Stop after this many events (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// People in the stream: users (collaboration), end customers (chatbot) or guests
    /// (marketplace); teams, workspaces and hosts scale with it.
    #[arg(long, default_value_t = 5000)]
    users: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of deliberately broken events, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    bad_share: f64,
    /// Create the topic with this many partitions if it does not exist.
    #[arg(long)]
    partitions: Option<i32>,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.bad_share) {
        bail!("--bad-share must be between 0 and 1");
    }
    let topic = args
        .topic
        .unwrap_or_else(|| args.product.topic().to_string());
    let settings = args.connection.settings();
    if let Some(partitions) = args.partitions {
        ensure_topics(&settings, &[(topic.as_str(), partitions)])?;
    }
    let producer = EventProducer::new(&settings)?;
    let stop = crate::run::stop_flag();
    let options = GeneratorOptions {
        product: args.product,
        topic,
        rate: args.rate,
        count: args.count,
        users: args.users,
        seed: args.seed,
        bad_share: args.bad_share,
        scenario: None,
        scenario_period: std::time::Duration::ZERO,
        clock: crate::clock::EventClock::wall(),
        history: std::time::Duration::ZERO,
    };
    let sent = run_generator(&producer, options, &stop)
        .map_err(|error| anyhow!("generator: {error:#}"))?;
    eprintln!("generated {sent} events");
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct HashPasswordArgs {
    /// bcrypt cost: each step doubles the work of checking a password (and of guessing it).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
    cost: u32,
}

/// `nsm hash-password`: the password comes from standard input, never from an argument that
/// `ps` or a shell history would show.
pub fn hash_password(args: HashPasswordArgs) -> Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line
        .strip_suffix("\r\n")
        .or_else(|| line.strip_suffix('\n'))
        .unwrap_or(&line);
    if password.is_empty() {
        bail!(
            "no password on standard input: `nsm hash-password < file`, or type it and press Enter"
        );
    }
    let hash = nsm_http::hash_password(password, args.cost)?;
    println!("{hash}");
    Ok(())
}
