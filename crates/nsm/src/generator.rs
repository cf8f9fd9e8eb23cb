//! The demo event generator: a realistic stream of product events of a collaboration tool
//! (messages, page views, team creation, payments, complaints), keyed by user so that each
//! user's events stay in one partition, as exact distinct counts require.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use nsm_kafka::EventProducer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::info;

use crate::pipeline::wall_clock_ms;

/// Shape of the generated stream.
#[derive(Debug, Clone)]
pub struct GeneratorOptions {
    pub topic: String,
    /// Events per second.
    pub rate: u32,
    /// Stop after this many events (`None`: until stopped).
    pub count: Option<u64>,
    pub users: u32,
    pub seed: u64,
    /// Share of deliberately broken events (invalid JSON, wrong types, late), 0..1.
    pub bad_share: f64,
}

const CHANNELS: [&str; 5] = ["general", "random", "engineering", "sales", "support"];
const PLANS: [(&str, &str); 3] = [("starter", "8.00"), ("pro", "12.50"), ("business", "20.00")];
const COUNTRIES: [&str; 6] = ["DE", "FR", "US", "GB", "NL", "ES"];
const CLIENTS: [&str; 3] = ["web", "ios", "android"];

/// One generated event: its Kafka key and JSON payload.
pub struct GeneratedEvent {
    pub key: String,
    pub payload: String,
}

pub struct EventGenerator {
    rng: StdRng,
    options: GeneratorOptions,
    sequence: u64,
}

impl EventGenerator {
    pub fn new(options: GeneratorOptions) -> Self {
        Self {
            rng: StdRng::seed_from_u64(options.seed),
            options,
            sequence: 0,
        }
    }

    /// The next event, stamped `time_ms`.
    pub fn next_event(&mut self, time_ms: i64) -> GeneratedEvent {
        self.sequence += 1;
        let rng = &mut self.rng;
        // Activity is skewed: a few users are very active, most are occasional.
        let skew: f64 = rng.random::<f64>();
        let user = ((skew * skew) * f64::from(self.options.users)) as u32;
        let team = user / 8;
        let key = format!("user-{user}");
        let event_id = format!("evt-{}-{}", self.options.seed, self.sequence);
        let roll: f64 = rng.random();
        if roll < self.options.bad_share {
            let payload = match rng.random_range(0..3) {
                0 => format!("{{\"event\":\"message_sent\",\"user_id\":\"{key}\",\"timestamp\":"),
                1 => format!(
                    r#"{{"event_id":"{event_id}","event":"payment_succeeded","user_id":"{key}","timestamp":{time_ms},"properties":{{"amount":"twelve"}}}}"#
                ),
                _ => format!(
                    r#"{{"event_id":"{event_id}","event":"message_sent","user_id":"{key}","timestamp":{},"properties":{{}}}}"#,
                    time_ms - 3 * 3_600_000
                ),
            };
            return GeneratedEvent { key, payload };
        }
        let roll: f64 = rng.random();
        let (name, properties) = if roll < 0.70 {
            let channel = CHANNELS[rng.random_range(0..CHANNELS.len())];
            (
                "message_sent",
                format!(
                    r#"{{"channel":"{channel}","length":{}}}"#,
                    rng.random_range(1..400)
                ),
            )
        } else if roll < 0.93 {
            (
                "page_viewed",
                format!(
                    r#"{{"path":"/teams/{team}/settings","duration_ms":{}}}"#,
                    rng.random_range(100..30_000)
                ),
            )
        } else if roll < 0.95 {
            (
                "team_created",
                format!(r#"{{"team_size":{}}}"#, rng.random_range(2..30)),
            )
        } else if roll < 0.995 {
            let (plan, amount) = PLANS[rng.random_range(0..PLANS.len())];
            (
                "payment_succeeded",
                format!(r#"{{"plan":"{plan}","amount":{amount},"currency":"EUR"}}"#),
            )
        } else {
            (
                "complaint_filed",
                format!(
                    r#"{{"category":"{}"}}"#,
                    ["billing", "bug", "performance"][rng.random_range(0..3)]
                ),
            )
        };
        let country = COUNTRIES[(user as usize) % COUNTRIES.len()];
        let client = CLIENTS[rng.random_range(0..CLIENTS.len())];
        // Half the events carry RFC 3339 text, half epoch milliseconds: both are accepted.
        let timestamp = if self.sequence.is_multiple_of(2) {
            match jiff::Timestamp::from_millisecond(time_ms) {
                Ok(timestamp) => format!("\"{timestamp}\""),
                Err(_) => time_ms.to_string(),
            }
        } else {
            time_ms.to_string()
        };
        let payload = format!(
            r#"{{"event_id":"{event_id}","event":"{name}","timestamp":{timestamp},"user_id":"{key}","team_id":"team-{team}","context":{{"client":"{client}","app_version":"4.{}.{}","country":"{country}","locale":"en-{country}"}},"properties":{properties}}}"#,
            user % 7,
            user % 13
        );
        GeneratedEvent { key, payload }
    }
}

/// Produces events at the configured rate, stamped with the wall clock, until the count is
/// reached or `stop` is set.
pub fn run_generator(
    producer: &EventProducer,
    options: GeneratorOptions,
    stop: &AtomicBool,
) -> Result<u64> {
    let topic = options.topic.clone();
    let rate = options.rate.max(1);
    let count = options.count;
    let mut generator = EventGenerator::new(options);
    let started = Instant::now();
    let mut sent: u64 = 0;
    info!(topic = %topic, rate, "demo generator started");
    while !stop.load(Ordering::Relaxed) && count.is_none_or(|count| sent < count) {
        // Pace by elapsed time so the rate holds whatever the batch cost.
        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let now_ms = wall_clock_ms();
        while sent < due && count.is_none_or(|count| sent < count) {
            let event = generator.next_event(now_ms);
            producer.send(&topic, Some(event.key.as_bytes()), event.payload.as_bytes())?;
            sent += 1;
        }
    }
    producer.flush(Duration::from_secs(30))?;
    info!(sent, "demo generator stopped");
    Ok(sent)
}

/// Shared stop flag for a generator thread.
pub fn stop_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
