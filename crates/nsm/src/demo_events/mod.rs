//! The demo event generator: a realistic, seeded stream of one product's events, the stream
//! that product's config in `config/` measures. One module per product says what its users do
//! and how its events are keyed; this module adds what every stream shares: the envelope (id,
//! name, timestamp as RFC 3339 text or epoch milliseconds, alternately), skewed activity, and
//! a small share of deliberately bad events (truncated JSON, a wrong type, late).
//!
//! Keys matter: distinct counts are kept per Kafka partition and summed, so each product keys
//! its events by the entity its distinct metrics count, keeping one entity in one partition.

mod chatbot;
mod collaboration;
mod marketplace;
mod scenario;
#[cfg(test)]
mod tests;

pub use scenario::Scenario;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use nsm_kafka::EventProducer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use crate::clock::EventClock;

/// A product the demo can simulate, each with its example config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Product {
    /// A support chatbot; North Star: conversations resolved by AI per week.
    Chatbot,
    /// A team chat tool; North Star: weekly active teams.
    #[default]
    Collaboration,
    /// A holiday-rental marketplace; North Star: nights booked per week.
    Marketplace,
}

impl Product {
    /// Where that config lives in the repository.
    pub fn config_file(self) -> &'static str {
        match self {
            Self::Chatbot => "config/support-chatbot.toml",
            Self::Collaboration => "config/collaboration.toml",
            Self::Marketplace => "config/marketplace.toml",
        }
    }

    /// The shipped config that measures this product's stream, built into the binary.
    pub fn config_text(self) -> &'static str {
        match self {
            Self::Chatbot => include_str!("../../../../config/support-chatbot.toml"),
            Self::Collaboration => include_str!("../../../../config/collaboration.toml"),
            Self::Marketplace => include_str!("../../../../config/marketplace.toml"),
        }
    }

    /// The topic that config reads.
    pub fn topic(self) -> &'static str {
        match self {
            Self::Chatbot => "chatbot-events",
            Self::Collaboration => "collaboration-events",
            Self::Marketplace => "marketplace-events",
        }
    }

    /// What the stream is, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Chatbot => {
                "a support chatbot (North Star: conversations resolved by AI per week)"
            }
            Self::Collaboration => "a collaboration tool (North Star: weekly active teams)",
            Self::Marketplace => {
                "a holiday-rental marketplace (North Star: nights booked per week)"
            }
        }
    }
}

/// Shape of the generated stream.
#[derive(Debug, Clone)]
pub struct GeneratorOptions {
    pub product: Product,
    pub topic: String,
    /// Events per second.
    pub rate: u32,
    /// Stop after this many events (`None`: until stopped).
    pub count: Option<u64>,
    /// People in the stream: users (collaboration), end customers (chatbot) or guests
    /// (marketplace). Teams, workspaces and hosts scale with it.
    pub users: u32,
    pub seed: u64,
    /// Share of deliberately broken events (truncated JSON, wrong types, late), 0..1.
    pub bad_share: f64,
    /// How the stream changes over time; `None` keeps it steady (`nsm generate`).
    pub scenario: Option<Scenario>,
    /// The time over which the scenario ramps (see [`Scenario`]).
    pub scenario_period: Duration,
    /// What live events are stamped with: the wall clock, or the demo's faster one.
    pub clock: EventClock,
    /// Event time before the start to fill first, as fast as the broker takes it, with the
    /// steady stream at the live density (events per second of event time), so that
    /// previous windows and baselines exist at once.
    pub history: Duration,
}

/// How a deliberately bad event is broken, and so why nsm must reject it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flaw {
    /// The JSON text is cut in half.
    Truncated,
    /// A field a metric reads (an amount, a number of nights) is text instead of a number.
    WrongType,
    /// The product's North Star event, three hours older than the stream.
    Late,
}

/// How far behind the stream a late event is: beyond the configs' allowed lateness of 1h.
const LATE_BY_MS: i64 = 3 * 3_600_000;

/// One generated event: its Kafka key and JSON payload.
pub struct GeneratedEvent {
    pub key: String,
    pub payload: String,
    /// Set on the deliberately bad events.
    pub flaw: Option<Flaw>,
}

/// An event as a product module builds it: the Kafka key, the event name, and its other
/// top-level fields (ids, context, properties). The envelope is added here.
struct Draft {
    key: String,
    name: &'static str,
    fields: Map<String, Value>,
}

impl Draft {
    /// `fields` is a JSON object literal (`json!({ "user_id": ..., "properties": ... })`).
    fn new(key: String, name: &'static str, fields: Value) -> Draft {
        debug_assert!(fields.is_object(), "the fields of {name} are not an object");
        let fields = match fields {
            Value::Object(fields) => fields,
            _ => Map::new(),
        };
        Draft { key, name, fields }
    }
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
        let (flaw, draft) = self.draw();
        self.finish(draft, flaw, time_ms)
    }

    /// The next slot of the stream `elapsed` after its start, shaped by the scenario: `None`
    /// when the scenario sends nothing in it. Without a scenario, [`Self::next_event`].
    pub fn next_scenario_event(
        &mut self,
        time_ms: i64,
        elapsed: Duration,
    ) -> Option<GeneratedEvent> {
        let Some(scenario) = self.options.scenario else {
            return Some(self.next_event(time_ms));
        };
        let period = self.options.scenario_period;
        let product = self.options.product;
        match scenario.slot(&mut self.rng, elapsed, period) {
            scenario::Slot::Skip => None,
            scenario::Slot::Normal => {
                let (flaw, mut draft) = self.draw();
                if flaw.is_none() {
                    if scenario.drops(&mut self.rng, product, &draft, elapsed, period) {
                        return None;
                    }
                    scenario.reshape(product, &mut draft, elapsed, period);
                }
                Some(self.finish(draft, flaw, time_ms))
            }
            scenario::Slot::Guardrail => {
                let users = self.options.users.max(1);
                let name = scenario::guardrail_event(product);
                // Guardrail events are about 1% of a product's mix: draw until one comes.
                let draft = (0..100_000)
                    .map(|_| product_event(product, &mut self.rng, users))
                    .find(|draft| draft.name == name)
                    .unwrap_or_else(|| product_event(product, &mut self.rng, users));
                Some(self.finish(draft, None, time_ms))
            }
        }
    }

    /// A drawn event and its deliberate flaw, if any.
    fn draw(&mut self) -> (Option<Flaw>, Draft) {
        let users = self.options.users.max(1);
        let product = self.options.product;
        let rng = &mut self.rng;
        let flaw = if rng.random::<f64>() < self.options.bad_share {
            Some([Flaw::Truncated, Flaw::WrongType, Flaw::Late][rng.random_range(0..3)])
        } else {
            None
        };
        let draft = match (product, flaw) {
            (Product::Chatbot, Some(Flaw::WrongType)) => chatbot::wrong_type_event(rng, users),
            (Product::Chatbot, Some(_)) => chatbot::north_star_event(rng, users),
            (Product::Chatbot, None) => chatbot::event(rng, users),
            (Product::Collaboration, Some(Flaw::WrongType)) => {
                collaboration::wrong_type_event(rng, users)
            }
            (Product::Collaboration, Some(_)) => collaboration::north_star_event(rng, users),
            (Product::Collaboration, None) => collaboration::event(rng, users),
            (Product::Marketplace, Some(Flaw::WrongType)) => {
                marketplace::wrong_type_event(rng, users)
            }
            (Product::Marketplace, Some(_)) => marketplace::north_star_event(rng, users),
            (Product::Marketplace, None) => marketplace::event(rng, users),
        };
        (flaw, draft)
    }

    /// The envelope around `draft`, stamped `time_ms` (older when late), cut when truncated.
    fn finish(&mut self, draft: Draft, flaw: Option<Flaw>, time_ms: i64) -> GeneratedEvent {
        self.sequence += 1;
        let time_ms = if flaw == Some(Flaw::Late) {
            time_ms - LATE_BY_MS
        } else {
            time_ms
        };
        let mut payload = self.envelope(draft.name, time_ms, draft.fields);
        if flaw == Some(Flaw::Truncated) {
            let mut cut = payload.len() / 2;
            while !payload.is_char_boundary(cut) {
                cut -= 1;
            }
            payload.truncate(cut);
        }
        GeneratedEvent {
            key: draft.key,
            payload,
            flaw,
        }
    }

    fn envelope(&self, name: &str, time_ms: i64, fields: Map<String, Value>) -> String {
        // Half the events carry RFC 3339 text, half epoch milliseconds: both are accepted.
        let timestamp = match jiff::Timestamp::from_millisecond(time_ms) {
            Ok(timestamp) if self.sequence.is_multiple_of(2) => json!(timestamp.to_string()),
            _ => json!(time_ms),
        };
        let mut event = Map::with_capacity(fields.len() + 3);
        event.insert(
            "event_id".into(),
            json!(format!("evt-{}-{}", self.options.seed, self.sequence)),
        );
        event.insert("event".into(), json!(name));
        event.insert("timestamp".into(), timestamp);
        event.extend(fields);
        Value::Object(event).to_string()
    }
}

/// A normal event of `product`.
fn product_event(product: Product, rng: &mut StdRng, users: u32) -> Draft {
    match product {
        Product::Chatbot => chatbot::event(rng, users),
        Product::Collaboration => collaboration::event(rng, users),
        Product::Marketplace => marketplace::event(rng, users),
    }
}

/// An index below `count`, skewed towards 0: a few entities are very active, most are
/// occasional, as in every real product.
fn skewed(rng: &mut StdRng, count: u32) -> u32 {
    let draw: f64 = rng.random();
    (((draw * draw) * f64::from(count)) as u32).min(count.saturating_sub(1))
}

/// One of `choices`, each as likely as its weight.
fn weighted<T: Copy>(rng: &mut StdRng, choices: &[(T, u32)]) -> T {
    let total: u32 = choices.iter().map(|(_, weight)| weight).sum();
    let mut draw = rng.random_range(0..total.max(1));
    for &(choice, weight) in choices {
        if draw < weight {
            return choice;
        }
        draw -= weight;
    }
    choices[choices.len() - 1].0
}

/// One of `choices`, uniformly.
fn one_of<T: Copy>(rng: &mut StdRng, choices: &[T]) -> T {
    choices[rng.random_range(0..choices.len())]
}

/// Money as a JSON number with two decimals: `1234` cents is written `12.34` (serde_json writes
/// the shortest text that reads back as the same float, and nsm sums that text exactly).
fn euros(cents: u64) -> Value {
    json!(cents as f64 / 100.0)
}

/// One event in this many is sent twice, as a producer retry would.
const RETRY_EVERY: u64 = 500;

/// Fills the history first when asked, then produces events at the configured rate, stamped
/// with the options' clock, until the count is reached or `stop` is set.
pub fn run_generator(
    producer: &EventProducer,
    options: GeneratorOptions,
    stop: &AtomicBool,
) -> Result<u64> {
    let topic = options.topic.clone();
    let rate = options.rate.max(1);
    let count = options.count;
    let product = options.product;
    let mut generator = EventGenerator::new(options);
    let mut sent: u64 = 0;
    let mut flawed: u64 = 0;
    let mut retried: u64 = 0;
    let mut skipped: u64 = 0;
    let history = generator.options.history;
    if !history.is_zero() {
        let seeded = seed_history(producer, &mut generator, &topic, history, stop)?;
        info!(events = seeded, history = %humantime::format_duration(history), "history filled");
    }
    let clock = generator.options.clock;
    let started = Instant::now();
    info!(topic = %topic, ?product, rate, "demo generator started");
    while !stop.load(Ordering::Relaxed) && count.is_none_or(|count| sent < count) {
        // Pace by elapsed time so the rate holds whatever the batch cost.
        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let now_ms = clock.now_ms();
        let elapsed = started.elapsed();
        while sent < due && count.is_none_or(|count| sent < count) {
            // `sent` counts the slots of the stream; a scenario may leave some empty.
            let Some(event) = generator.next_scenario_event(now_ms, elapsed) else {
                sent += 1;
                skipped += 1;
                continue;
            };
            flawed += u64::from(event.flaw.is_some());
            producer.send(&topic, Some(event.key.as_bytes()), event.payload.as_bytes())?;
            sent += 1;
            // Every so often, a producer retry: the same event again, which nsm counts once
            // (nsm_events_duplicate_total). Not counted in `sent`: the stream has one event.
            if sent.is_multiple_of(RETRY_EVERY) && event.flaw.is_none() {
                producer.send(&topic, Some(event.key.as_bytes()), event.payload.as_bytes())?;
                retried += 1;
            }
        }
    }
    producer.flush(Duration::from_secs(30))?;
    info!(
        sent,
        deliberately_bad = flawed,
        retried,
        left_empty_by_scenario = skipped,
        "demo generator stopped"
    );
    Ok(sent)
}

/// How fast the history is produced, in slots of the stream (a scenario leaves some empty):
/// below what a debug build of nsm reads on two cores, since the in-process broker keeps about
/// 5 MB a partition and would cut a backlog produced faster from its front.
const HISTORY_SLOTS_PER_SECOND: f64 = 5_000.0;
/// At most this many slots of history; a longer history is thinner than the live stream.
const MAX_HISTORY_SLOTS: f64 = 1_000_000.0;

/// The stream as the scenario starts it, from `history` of event time before now up to the
/// moment the live stream takes over, in time order: `rate` slots per wall-clock second cover
/// `clock.scale()` seconds of event time, as live. The clock moves on while the history is
/// produced, and the history follows it, so the live stream starts where the history ends.
fn seed_history(
    producer: &EventProducer,
    generator: &mut EventGenerator,
    topic: &str,
    history: Duration,
    stop: &AtomicBool,
) -> Result<u64> {
    let clock = generator.options.clock;
    let rate = f64::from(generator.options.rate.max(1));
    let history_ms = history.as_millis() as f64;
    // Event time between two slots, as live, unless that makes too many.
    let live_step_ms = f64::from(clock.scale()) * 1000.0 / rate;
    let step_ms = live_step_ms.max(history_ms / MAX_HISTORY_SLOTS);
    if step_ms > live_step_ms {
        warn!(
            "the history is {:.0} times thinner than the live stream (at most {MAX_HISTORY_SLOTS} \
             slots): a shorter --history or a larger --time-scale keeps it as dense",
            step_ms / live_step_ms
        );
    }
    let mut time_ms = clock.now_ms() as f64 - history_ms;
    info!(history = %humantime::format_duration(history), "filling the history before the live stream");
    let started = Instant::now();
    let (mut slots, mut sent) = (0_u64, 0_u64);
    while time_ms < clock.now_ms() as f64 && !stop.load(Ordering::Relaxed) {
        while slots as f64 > started.elapsed().as_secs_f64() * HISTORY_SLOTS_PER_SECOND {
            std::thread::sleep(Duration::from_millis(5));
        }
        slots += 1;
        // The scenario as it starts: the density the live stream starts with.
        if let Some(event) = generator.next_scenario_event(time_ms as i64, Duration::ZERO) {
            producer.send(topic, Some(event.key.as_bytes()), event.payload.as_bytes())?;
            sent += 1;
            if sent.is_multiple_of(50_000) {
                info!(
                    sent,
                    behind_ms = clock.now_ms() - time_ms as i64,
                    "filling the history"
                );
            }
        }
        time_ms += step_ms;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(sent)
}
