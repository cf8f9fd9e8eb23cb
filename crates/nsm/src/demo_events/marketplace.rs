//! A holiday-rental marketplace, measured by `config/marketplace.toml`: guests search, view
//! listings, book and sometimes cancel or complain; hosts publish listings and open calendar
//! nights; the marketplace takes a service fee on each booking.
//!
//! Key: the host for every event that names one (listings, calendars, bookings,
//! cancellations, reviews, complaints), the guest for searches, which name no host.
//! `active_hosts` counts distinct hosts, so all of a host's events share a partition; the
//! North Star sums nights and needs no key. A distinct count of guests would not be exact
//! with this key (a guest books from many hosts); the configs count none.

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};

use super::{euros, one_of, skewed, weighted, Draft};

/// Guests per host: a marketplace has far more demand than supply.
const GUESTS_PER_HOST: u32 = 10;
const CITIES: [&str; 6] = [
    "Lisbon",
    "Paris",
    "Barcelona",
    "Berlin",
    "Rome",
    "Amsterdam",
];
const PLATFORMS: [&str; 3] = ["web", "ios", "android"];
/// The marketplace's service fee: 12 % of the stay's price.
const FEE_PERCENT: u64 = 12;

/// The mix, per mille: searches and listing views dominate; about one search in nine ends in
/// a booking; hosts update calendars more often than they publish listings.
const MIX: [(&str, u32); 8] = [
    ("search_performed", 520),
    ("listing_viewed", 250),
    ("booking_confirmed", 60),
    ("booking_cancelled", 15),
    ("calendar_updated", 90),
    ("listing_published", 15),
    ("review_submitted", 35),
    ("complaint_filed", 15),
];

/// A listing of a host, in a city, at a price per night in whole euros.
struct Listing {
    host: u32,
    number: u32,
    city: &'static str,
    nightly_price: u64,
}

impl Listing {
    fn pick(rng: &mut StdRng, guests: u32) -> Listing {
        let host = skewed(rng, (guests / GUESTS_PER_HOST).max(1));
        // Most hosts have one listing, some up to three; a listing keeps its city and price.
        let number = rng.random_range(0..=host % 3);
        let seed = host.wrapping_mul(31).wrapping_add(number);
        Listing {
            host,
            number,
            city: CITIES[seed as usize % CITIES.len()],
            nightly_price: 45 + u64::from(seed % 28) * 10,
        }
    }

    fn id(&self) -> String {
        format!("listing-{}-{}", self.host, self.number)
    }

    /// An event about this listing, keyed by its host; `guest` when a guest acted.
    fn draft(
        &self,
        rng: &mut StdRng,
        name: &'static str,
        guest: Option<u32>,
        properties: Value,
    ) -> Draft {
        let host_id = format!("host-{}", self.host);
        let mut fields = json!({
            "host_id": host_id,
            "listing_id": self.id(),
            "context": { "platform": one_of(rng, &PLATFORMS) },
            "properties": properties,
        });
        if let (Some(guest), Value::Object(fields)) = (guest, &mut fields) {
            fields.insert("guest_id".into(), json!(format!("guest-{guest}")));
        }
        Draft::new(host_id, name, fields)
    }
}

pub(super) fn event(rng: &mut StdRng, guests: u32) -> Draft {
    let name = weighted(rng, &MIX);
    if name == "search_performed" {
        return search(rng, guests);
    }
    let listing = Listing::pick(rng, guests);
    let guest = skewed(rng, guests);
    match name {
        "listing_viewed" => {
            let properties = json!({
                "city": listing.city,
                "nightly_price": listing.nightly_price,
                "photos_viewed": rng.random_range(1..25),
            });
            listing.draft(rng, name, Some(guest), properties)
        }
        "booking_confirmed" => {
            let nights = nights(rng);
            booking(rng, &listing, guest, nights)
        }
        "booking_cancelled" => {
            let properties = json!({
                "booking_id": format!("bk-{}-{}", listing.id(), rng.random_range(0..1_000)),
                // Guests cancel far more often than hosts; host cancellations are the
                // guardrail: a guest left without a stay.
                "cancelled_by": weighted(rng, &[("guest", 70), ("host", 30)]),
                "days_before_checkin": rng.random_range(0..60),
            });
            listing.draft(rng, name, Some(guest), properties)
        }
        "calendar_updated" => {
            let properties = json!({
                "nights_opened": rng.random_range(1..60),
                "nightly_price": listing.nightly_price,
            });
            listing.draft(rng, name, None, properties)
        }
        "listing_published" => {
            let properties = json!({
                "city": listing.city,
                "nightly_price": listing.nightly_price,
                "bedrooms": rng.random_range(1..5),
                "instant_book": rng.random_bool(0.6),
            });
            listing.draft(rng, name, None, properties)
        }
        "review_submitted" => {
            let properties = json!({
                "rating": weighted(rng, &[(1, 3), (2, 4), (3, 10), (4, 33), (5, 50)]),
            });
            listing.draft(rng, name, Some(guest), properties)
        }
        _ => {
            let properties = json!({
                "filed_by": weighted(rng, &[("guest", 75), ("host", 25)]),
                "category": one_of(rng, &["not_as_described", "cleanliness", "damage", "no_show", "payment"]),
            });
            listing.draft(rng, name, Some(guest), properties)
        }
    }
}

/// A guest's search: names no host, so it is keyed by the guest.
fn search(rng: &mut StdRng, guests: u32) -> Draft {
    let guest_id = format!("guest-{}", skewed(rng, guests));
    Draft::new(
        guest_id.clone(),
        "search_performed",
        json!({
            "guest_id": guest_id,
            "context": { "platform": one_of(rng, &PLATFORMS) },
            "properties": {
                "city": one_of(rng, &CITIES),
                "guests": weighted(rng, &[(1, 20), (2, 45), (3, 10), (4, 20), (6, 5)]),
                "nights_requested": rng.random_range(1..15),
                "checkin_in_days": rng.random_range(1..120),
                "results": rng.random_range(0..400),
            },
        }),
    )
}

/// Length of a stay: mostly weekends and short trips, some weeks, a few longer stays.
fn nights(rng: &mut StdRng) -> u64 {
    weighted(
        rng,
        &[
            (1, 12),
            (2, 25),
            (3, 20),
            (4, 12),
            (5, 8),
            (7, 15),
            (10, 4),
            (14, 4),
        ],
    )
}

fn booking(rng: &mut StdRng, listing: &Listing, guest: u32, nights: u64) -> Draft {
    let price_cents = nights * listing.nightly_price * 100;
    let properties = json!({
        "booking_id": format!("bk-{}-{}", listing.id(), rng.random_range(0..1_000)),
        "nights": nights,
        "city": listing.city,
        "guests": rng.random_range(1..5),
        "price": euros(price_cents),
        "fee": euros(price_cents * FEE_PERCENT / 100),
        "currency": "EUR",
    });
    listing.draft(rng, "booking_confirmed", Some(guest), properties)
}

/// The North Star's event: a booking confirmed.
pub(super) fn north_star_event(rng: &mut StdRng, guests: u32) -> Draft {
    let listing = Listing::pick(rng, guests);
    let guest = skewed(rng, guests);
    let nights = nights(rng);
    booking(rng, &listing, guest, nights)
}

/// A booking whose number of nights, which the North Star sums, is text.
pub(super) fn wrong_type_event(rng: &mut StdRng, guests: u32) -> Draft {
    let listing = Listing::pick(rng, guests);
    let guest = skewed(rng, guests);
    let mut draft = booking(rng, &listing, guest, 3);
    if let Some(Value::Object(properties)) = draft.fields.get_mut("properties") {
        properties.insert("nights".into(), json!("three"));
    }
    draft
}
