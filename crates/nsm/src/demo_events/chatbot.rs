//! A support chatbot sold to businesses, measured by `config/support-chatbot.toml`: their
//! customers start conversations, the AI answers from the knowledge base and resolves most of
//! them, hands some over to a human agent, and customers rate the help; agents publish
//! articles; each business (workspace) pays a monthly subscription.
//!
//! Key: the person who acted (`user_id`): the customer in a conversation, the agent who
//! published, the admin who paid. `customers_helped` counts distinct customers, so all of a
//! customer's events share a partition; the North Star is a count and needs no key.

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};

use super::{euros, one_of, skewed, weighted, Draft};

/// End customers per business using the bot.
const CUSTOMERS_PER_WORKSPACE: u32 = 250;
/// Support agents per business.
const AGENTS_PER_WORKSPACE: u32 = 6;
const CHANNELS: [&str; 4] = ["web_widget", "mobile_sdk", "email", "whatsapp"];
const LANGUAGES: [&str; 5] = ["en", "de", "fr", "es", "pt"];
const TOPICS: [&str; 6] = [
    "billing",
    "shipping",
    "returns",
    "account_access",
    "product_question",
    "bug_report",
];
/// Plans and their monthly price, in cents.
const PLANS: [(&str, u64); 3] = [
    ("starter", 4_900),
    ("growth", 19_900),
    ("enterprise", 89_900),
];

/// The mix, per mille: most events are answers inside conversations; one conversation in five
/// is resolved, mostly by the AI; ratings, escalations and articles are rarer, payments rarest.
const MIX: [(&str, u32); 8] = [
    ("conversation_started", 200),
    ("message_answered", 420),
    ("conversation_resolved", 150),
    ("conversation_abandoned", 45),
    ("escalated_to_human", 50),
    ("csat_rated", 90),
    ("article_published", 30),
    ("subscription_paid", 15),
];

fn workspaces(customers: u32) -> u32 {
    (customers / CUSTOMERS_PER_WORKSPACE).max(1)
}

/// An event of a customer in a conversation with a business's bot.
fn customer_draft(
    rng: &mut StdRng,
    customers: u32,
    name: &'static str,
    properties: Value,
) -> Draft {
    let customer = skewed(rng, customers);
    let workspace = customer % workspaces(customers);
    let user_id = format!("customer-{customer}");
    Draft::new(
        user_id.clone(),
        name,
        json!({
            "user_id": user_id,
            "workspace_id": format!("ws-{workspace}"),
            "conversation_id": format!("conv-{customer}-{}", rng.random_range(0..4)),
            "context": {
                "channel": one_of(rng, &CHANNELS),
                "language": LANGUAGES[customer as usize % LANGUAGES.len()],
            },
            "properties": properties,
        }),
    )
}

pub(super) fn event(rng: &mut StdRng, customers: u32) -> Draft {
    let name = weighted(rng, &MIX);
    let properties = match name {
        "conversation_started" => json!({
            "topic": one_of(rng, &TOPICS),
            "entry_point": one_of(rng, &["help_center", "checkout", "order_page", "app_menu"]),
        }),
        "message_answered" => {
            let by_ai = rng.random_bool(0.85);
            json!({
                "answered_by": if by_ai { "ai" } else { "human" },
                "latency_ms": if by_ai { rng.random_range(600..4_000) } else { rng.random_range(30_000..900_000) },
                "sources_cited": if by_ai { rng.random_range(0..4) } else { 0 },
            })
        }
        "conversation_resolved" => return resolved_conversation(rng, customers),
        "conversation_abandoned" => json!({ "idle_seconds": rng.random_range(120..3_600) }),
        "escalated_to_human" => json!({
            "reason": weighted(rng, &[("asked_for_human", 45), ("low_confidence", 35), ("policy_topic", 20)]),
            "queue": one_of(rng, &["tier1", "billing", "technical"]),
        }),
        "csat_rated" => json!({
            // Mostly happy customers, with a tail of 1s and 2s the guardrail counts.
            "score": weighted(rng, &[(1, 6), (2, 6), (3, 13), (4, 30), (5, 45)]),
        }),
        "article_published" => return agent_article(rng, customers),
        _ => return subscription(rng, customers),
    };
    customer_draft(rng, customers, name, properties)
}

/// A resolved conversation: by the AI about six times in ten, else by an agent.
fn resolved_conversation(rng: &mut StdRng, customers: u32) -> Draft {
    let resolved_by = if rng.random_bool(0.62) { "ai" } else { "human" };
    resolution(rng, customers, resolved_by)
}

fn resolution(rng: &mut StdRng, customers: u32, resolved_by: &str) -> Draft {
    let properties = json!({
        "resolved_by": resolved_by,
        "turns": rng.random_range(2..14),
        "topic": one_of(rng, &TOPICS),
    });
    customer_draft(rng, customers, "conversation_resolved", properties)
}

/// The North Star's event: a conversation resolved by the AI.
pub(super) fn north_star_event(rng: &mut StdRng, customers: u32) -> Draft {
    resolution(rng, customers, "ai")
}

fn agent_article(rng: &mut StdRng, customers: u32) -> Draft {
    let workspace = rng.random_range(0..workspaces(customers));
    let agent = format!(
        "agent-{workspace}-{}",
        rng.random_range(0..AGENTS_PER_WORKSPACE)
    );
    Draft::new(
        agent.clone(),
        "article_published",
        json!({
            "user_id": agent,
            "workspace_id": format!("ws-{workspace}"),
            "properties": {
                "article_id": format!("kb-{workspace}-{}", rng.random_range(0..10_000)),
                "topic": one_of(rng, &TOPICS),
                "language": one_of(rng, &LANGUAGES),
                "words": rng.random_range(150..2_500),
            },
        }),
    )
}

fn subscription_draft(rng: &mut StdRng, customers: u32, properties: Value) -> Draft {
    let workspace = rng.random_range(0..workspaces(customers));
    let admin = format!("admin-{workspace}");
    Draft::new(
        admin.clone(),
        "subscription_paid",
        json!({
            "user_id": admin,
            "workspace_id": format!("ws-{workspace}"),
            "properties": properties,
        }),
    )
}

fn subscription(rng: &mut StdRng, customers: u32) -> Draft {
    let (plan, cents) = weighted(rng, &[(PLANS[0], 60), (PLANS[1], 30), (PLANS[2], 10)]);
    let properties = json!({
        "plan": plan,
        "amount": euros(cents),
        "currency": "EUR",
        "period": "month",
    });
    subscription_draft(rng, customers, properties)
}

/// A subscription payment whose amount, which revenue sums, is text.
pub(super) fn wrong_type_event(rng: &mut StdRng, customers: u32) -> Draft {
    let properties = json!({ "plan": "starter", "amount": "forty-nine", "currency": "EUR" });
    subscription_draft(rng, customers, properties)
}
