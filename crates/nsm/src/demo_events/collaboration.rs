//! A collaboration tool (team chat), measured by `config/collaboration.toml`: people in teams
//! send messages, react and share files, invite colleagues, sometimes leave or complain;
//! teams pay a subscription per seat.
//!
//! Key: the team. The North Star counts distinct `team_id`, so all of a team's events must
//! share a partition. Every user belongs to exactly one team here, so the distinct users of
//! `daily_active_users` stay in one partition too.

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};

use super::{euros, one_of, skewed, weighted, Draft};

/// People per team: users 0..8 are team 0, 8..16 team 1, and so on.
const TEAM_SIZE: u32 = 8;
const CHANNELS: [&str; 6] = [
    "general",
    "random",
    "engineering",
    "sales",
    "support",
    "announcements",
];
const CLIENTS: [&str; 4] = ["web", "desktop", "ios", "android"];
const COUNTRIES: [&str; 6] = ["DE", "FR", "US", "GB", "NL", "ES"];
const REACTIONS: [&str; 5] = ["thumbsup", "eyes", "tada", "heart", "white_check_mark"];
/// Plans and their price per seat and month, in cents.
const PLANS: [(&str, u64); 3] = [("starter", 400), ("pro", 675), ("business", 1250)];

/// The mix of a working week, per mille: mostly messages and reactions; invites, new teams,
/// payments, people leaving and complaints are rare.
const MIX: [(&str, u32); 9] = [
    ("message_sent", 600),
    ("reaction_added", 120),
    ("page_viewed", 130),
    ("file_shared", 60),
    ("invite_accepted", 30),
    ("team_created", 20),
    ("payment_succeeded", 20),
    ("team_left", 10),
    ("complaint_filed", 10),
];

/// Someone in a team: the user, their team, and the fields every event of theirs carries.
struct Member {
    user: u32,
    team: u32,
}

impl Member {
    fn pick(rng: &mut StdRng, users: u32) -> Member {
        let user = skewed(rng, users);
        Member {
            user,
            team: user / TEAM_SIZE,
        }
    }

    fn draft(&self, rng: &mut StdRng, name: &'static str, properties: Value) -> Draft {
        let country = COUNTRIES[self.user as usize % COUNTRIES.len()];
        Draft::new(
            format!("team-{}", self.team),
            name,
            json!({
                "user_id": format!("user-{}", self.user),
                "team_id": format!("team-{}", self.team),
                "context": {
                    "client": one_of(rng, &CLIENTS),
                    "app_version": format!("4.{}.{}", self.user % 7, self.user % 13),
                    "country": country,
                    "locale": format!("en-{country}"),
                },
                "properties": properties,
            }),
        )
    }
}

pub(super) fn event(rng: &mut StdRng, users: u32) -> Draft {
    let member = Member::pick(rng, users);
    let name = weighted(rng, &MIX);
    let properties = match name {
        "message_sent" => message(rng),
        "reaction_added" => json!({ "emoji": one_of(rng, &REACTIONS) }),
        "page_viewed" => json!({
            "path": one_of(rng, &["/channels", "/threads", "/search", "/settings/team"]),
            "duration_ms": rng.random_range(300..60_000),
        }),
        "file_shared" => json!({
            "mime_type": one_of(rng, &["image/png", "application/pdf", "text/csv"]),
            "size_bytes": rng.random_range(2_000..20_000_000),
        }),
        "invite_accepted" => json!({
            "invited_by": format!("user-{}", member.team * TEAM_SIZE),
            "invite_channel": one_of(rng, &["email", "link", "slack_import"]),
        }),
        "team_created" => json!({
            "plan": "trial",
            "expected_size": rng.random_range(2..50),
        }),
        "payment_succeeded" => {
            let (plan, cents_per_seat) = one_of(rng, &PLANS);
            let seats = rng.random_range(2..=TEAM_SIZE);
            json!({
                "plan": plan,
                "seats": seats,
                "amount": euros(cents_per_seat * u64::from(seats)),
                "currency": "EUR",
            })
        }
        "team_left" => json!({
            "reason": one_of(rng, &["changed_jobs", "too_many_notifications", "moved_to_other_tool"]),
        }),
        _ => json!({
            "category": one_of(rng, &["billing", "bug", "performance", "notifications"]),
        }),
    };
    member.draft(rng, name, properties)
}

fn message(rng: &mut StdRng) -> Value {
    json!({
        "channel": one_of(rng, &CHANNELS),
        "length": rng.random_range(1..400),
        "in_thread": rng.random_bool(0.3),
        "mentions": weighted(rng, &[(0, 80), (1, 15), (2, 5)]),
    })
}

/// The North Star's event: a message sent.
pub(super) fn north_star_event(rng: &mut StdRng, users: u32) -> Draft {
    let member = Member::pick(rng, users);
    let properties = message(rng);
    member.draft(rng, "message_sent", properties)
}

/// A payment whose amount, which revenue sums, is text.
pub(super) fn wrong_type_event(rng: &mut StdRng, users: u32) -> Draft {
    let member = Member::pick(rng, users);
    member.draft(
        rng,
        "payment_succeeded",
        json!({ "plan": "pro", "amount": "fifty-four", "currency": "EUR" }),
    )
}
