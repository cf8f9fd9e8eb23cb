//! Named demo scenarios: how the stream changes over time so a user can watch each alert's
//! situation happen (`nsm demo --scenario`, `make run SCENARIO=...`).
//!
//! A scenario shapes the product's normal stream over one `period` (it ramps from the start of
//! the stream to `period`, then holds): it skips some of the generator's slots (traffic that
//! grows, or stops), raises the price of revenue events, or adds guardrail events. Every
//! product's config reads the same kinds of events, so one shaping fits all three products.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

use super::{euros, Draft, Product};

/// What the stream does over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Scenario {
    /// Traffic doubles over the period: the North Star, its inputs and revenue grow
    /// together. No business alert.
    #[default]
    Healthy,
    /// Traffic stays flat while revenue events get up to twice as expensive (a price rise):
    /// revenue grows and the North Star does not (NSMFlatWhileRevenueGrows,
    /// NSMGrowingSlowerThanRevenue).
    NsmFlattens,
    /// Healthy growth, plus a guardrail event (complaints, escalations) that becomes a
    /// quarter of the stream over the period, five to twenty times its normal share, while
    /// the North Star still grows (GuardrailBreached, NSMUpWhileGuardrailDown).
    GuardrailBreach,
    /// Healthy traffic for one period, then nothing at all (NoEvents, WatermarkStale; the
    /// business alerts are held back).
    TrafficStops,
    /// Steady traffic; half-way through the period three in four of the North Star's events
    /// stop (a broken release), the rest of the stream unchanged: the fast-burn alert pages.
    Collapse,
    /// Steady traffic; half-way through the period the North Star's event is renamed by its
    /// producers (tracking broke): it vanishes from what nsm counts.
    TrackingBreaks,
}

impl Scenario {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Healthy => "healthy growth: traffic doubles over the period",
            Self::NsmFlattens => {
                "the North Star flattens while revenue grows: flat traffic, prices up to 2x"
            }
            Self::GuardrailBreach => {
                "a guardrail breach: growth, and guardrail events up to a quarter of the stream"
            }
            Self::TrafficStops => "traffic stops: healthy traffic for one period, then none",
            Self::Collapse => {
                "a collapse: steady traffic, then 3 in 4 of the North Star's events stop mid-period"
            }
            Self::TrackingBreaks => {
                "tracking breaks: steady traffic, then the North Star's event is renamed mid-period"
            }
        }
    }
}

/// The revenue event of a product and the property its revenue sums.
pub(super) fn revenue_event(product: Product) -> (&'static str, &'static str) {
    match product {
        Product::Chatbot => ("subscription_paid", "amount"),
        Product::Collaboration => ("payment_succeeded", "amount"),
        Product::Marketplace => ("booking_confirmed", "fee"),
    }
}

/// The event each product's North Star counts.
pub(super) fn north_star_event(product: Product) -> &'static str {
    match product {
        Product::Chatbot => "conversation_resolved",
        Product::Collaboration => "message_sent",
        Product::Marketplace => "booking_confirmed",
    }
}

/// What producers rename the North Star's event to in `TrackingBreaks`.
const RENAMED_NORTH_STAR_EVENT: &str = "north_star_event_renamed_v2";

/// A guardrail event of a product, counted by a guardrail of its config as it is generated.
pub(super) fn guardrail_event(product: Product) -> &'static str {
    match product {
        Product::Chatbot => "escalated_to_human",
        Product::Collaboration | Product::Marketplace => "complaint_filed",
    }
}

/// The progress of the scenario: 0 at the start of the stream, 1 from `period` on.
pub fn progress(elapsed: Duration, period: Duration) -> f64 {
    if period.is_zero() {
        return 1.0;
    }
    (elapsed.as_secs_f64() / period.as_secs_f64()).min(1.0)
}

/// What the scenario does with one slot of the stream.
pub(super) enum Slot {
    /// Nothing is sent in this slot.
    Skip,
    /// A normal event of the product.
    Normal,
    /// A guardrail event instead of a normal one.
    Guardrail,
}

impl Scenario {
    /// The fate of one slot at `elapsed` into the stream.
    pub(super) fn slot(self, rng: &mut StdRng, elapsed: Duration, period: Duration) -> Slot {
        let x = progress(elapsed, period);
        // Growing traffic: half the slots are used at the start, all of them after a period.
        let growing = |rng: &mut StdRng| {
            if rng.random::<f64>() < 0.5 + 0.5 * x {
                Slot::Normal
            } else {
                Slot::Skip
            }
        };
        match self {
            Self::Healthy => growing(rng),
            Self::NsmFlattens | Self::Collapse | Self::TrackingBreaks => {
                if rng.random::<f64>() < 0.5 {
                    Slot::Normal
                } else {
                    Slot::Skip
                }
            }
            // Guardrail events are 1% (complaints) to 5% (escalations) of a product's mix;
            // a quarter of the slots at the end of the period is five to twenty times that.
            Self::GuardrailBreach if rng.random::<f64>() < 0.25 * x => Slot::Guardrail,
            Self::GuardrailBreach => growing(rng),
            Self::TrafficStops if elapsed >= period => Slot::Skip,
            Self::TrafficStops => growing(rng),
        }
    }

    /// Whether a normal event is dropped: three in four of the North Star's events from
    /// mid-period on in `Collapse` (well below the fast burn's ratio, so a demo shows the page
    /// whatever the noise; the promtool scenarios prove the −50% case).
    pub(super) fn drops(
        self,
        rng: &mut StdRng,
        product: Product,
        draft: &Draft,
        elapsed: Duration,
        period: Duration,
    ) -> bool {
        self == Self::Collapse
            && elapsed >= period / 2
            && draft.name == north_star_event(product)
            && rng.random::<f64>() < 0.75
    }

    /// Changes the event itself: in `NsmFlattens`, revenue events cost up to twice as much; in
    /// `TrackingBreaks`, the North Star's event gets another name from mid-period on.
    pub(super) fn reshape(
        self,
        product: Product,
        draft: &mut Draft,
        elapsed: Duration,
        period: Duration,
    ) {
        if self == Self::TrackingBreaks
            && elapsed >= period / 2
            && draft.name == north_star_event(product)
        {
            draft.name = RENAMED_NORTH_STAR_EVENT;
            return;
        }
        if self != Self::NsmFlattens {
            return;
        }
        let (event, property) = revenue_event(product);
        if draft.name != event {
            return;
        }
        let factor = 1.0 + progress(elapsed, period);
        if let Some(amount) = draft
            .fields
            .get_mut("properties")
            .and_then(|properties| properties.get_mut(property))
        {
            if let Some(euros_now) = amount.as_f64() {
                let cents = (euros_now * 100.0 * factor).round() as u64;
                *amount = euros(cents);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::{EventGenerator, GeneratorOptions};
    use super::*;

    const SLOTS: u32 = 40_000;
    const PERIOD: Duration = Duration::from_secs(600);
    /// The share of slots at each end of the period compared.
    const EDGE: u32 = SLOTS / 10;

    /// The North Star's event of each product (counted; marketplace sums its nights, which no
    /// scenario changes, so the count follows the sum).
    fn north_star_event(product: Product) -> &'static str {
        match product {
            Product::Chatbot => "conversation_resolved",
            Product::Collaboration => "message_sent",
            Product::Marketplace => "booking_confirmed",
        }
    }

    #[derive(Debug, Default)]
    struct Tally {
        events: u32,
        north_star: u32,
        revenue: f64,
        guardrail: u32,
    }

    /// The events of `SLOTS` slots spread evenly over `from`..`from + PERIOD`, tallied for
    /// the first and the last `EDGE` slots.
    fn run(product: Product, scenario: Scenario, from: Duration) -> (Tally, Tally) {
        let mut generator = EventGenerator::new(GeneratorOptions {
            product,
            topic: product.topic().into(),
            rate: 1,
            count: None,
            users: 5_000,
            seed: 11,
            bad_share: 0.0,
            scenario: Some(scenario),
            scenario_period: PERIOD,
            clock: crate::clock::EventClock::wall(),
            history: std::time::Duration::ZERO,
        });
        let (revenue_name, revenue_property) = revenue_event(product);
        let (mut early, mut late) = (Tally::default(), Tally::default());
        for slot in 0..SLOTS {
            let elapsed = from + PERIOD.mul_f64(f64::from(slot) / f64::from(SLOTS));
            let event = generator.next_scenario_event(1_772_618_400_000, elapsed);
            let tally = if slot < EDGE {
                &mut early
            } else if slot >= SLOTS - EDGE {
                &mut late
            } else {
                continue;
            };
            let Some(event) = event else { continue };
            let json: Value = serde_json::from_str(&event.payload).expect("valid JSON");
            let name = json["event"].as_str().expect("event name");
            tally.events += 1;
            tally.north_star += u32::from(name == north_star_event(product));
            tally.guardrail += u32::from(name == guardrail_event(product));
            if name == revenue_name {
                tally.revenue += json["properties"][revenue_property]
                    .as_f64()
                    .expect("amount");
            }
        }
        (early, late)
    }

    fn products() -> [Product; 3] {
        [
            Product::Chatbot,
            Product::Collaboration,
            Product::Marketplace,
        ]
    }

    fn growth(early: f64, late: f64) -> f64 {
        late / early
    }

    #[test]
    fn healthy_grows_the_north_star_and_revenue_together() {
        for product in products() {
            let (early, late) = run(product, Scenario::Healthy, Duration::ZERO);
            let north_star = growth(early.north_star.into(), late.north_star.into());
            let revenue = growth(early.revenue, late.revenue);
            assert!(north_star > 1.5, "{product:?}: {early:?} {late:?}");
            assert!(revenue > 1.4, "{product:?}: {early:?} {late:?}");
            let guardrail = growth(early.guardrail.into(), late.guardrail.into());
            assert!(
                guardrail < 2.5,
                "{product:?}: guardrails grow with traffic only"
            );
        }
    }

    #[test]
    fn nsm_flattens_keeps_the_north_star_flat_while_revenue_grows() {
        for product in products() {
            let (early, late) = run(product, Scenario::NsmFlattens, Duration::ZERO);
            let north_star = growth(early.north_star.into(), late.north_star.into());
            let revenue = growth(early.revenue, late.revenue);
            assert!(
                (0.9..1.1).contains(&north_star),
                "{product:?}: North Star {north_star}: {early:?} {late:?}"
            );
            assert!(
                revenue > 1.5,
                "{product:?}: revenue {revenue}: {early:?} {late:?}"
            );
        }
    }

    #[test]
    fn guardrail_breach_multiplies_the_guardrail_event() {
        for product in products() {
            let (early, late) = run(product, Scenario::GuardrailBreach, Duration::ZERO);
            let guardrail = growth(early.guardrail.into(), late.guardrail.into());
            assert!(
                guardrail > 5.0,
                "{product:?}: guardrail {guardrail}: {early:?} {late:?}"
            );
            let north_star = growth(early.north_star.into(), late.north_star.into());
            assert!(
                north_star > 1.2,
                "{product:?}: the North Star still grows: {early:?} {late:?}"
            );
        }
    }

    #[test]
    fn traffic_stops_after_one_period() {
        for product in products() {
            let (early, late) = run(product, Scenario::TrafficStops, Duration::ZERO);
            assert!(
                early.events > 0 && late.events > early.events,
                "{product:?}"
            );
            let (after_early, after_late) = run(product, Scenario::TrafficStops, PERIOD);
            assert_eq!(after_early.events + after_late.events, 0, "{product:?}");
        }
    }

    #[test]
    fn progress_ramps_over_the_period_then_holds() {
        assert_eq!(progress(Duration::ZERO, PERIOD), 0.0);
        assert_eq!(progress(PERIOD / 2, PERIOD), 0.5);
        assert_eq!(progress(PERIOD * 3, PERIOD), 1.0);
        assert_eq!(progress(PERIOD, Duration::ZERO), 1.0);
    }
}
