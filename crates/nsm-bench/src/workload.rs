//! The workload every benchmark shares: a collaboration product's metrics (8 metrics, 3 exact
//! distinct counts, a 7-day trailing distinct count, a segment breakdown, a threshold) and its
//! events of about 400 bytes, in event-time order over the 7 days before a fixed clock.

use nsm_core::engine::Plan;
use nsm_core::Config;

/// Metrics of a collaboration product, as `make bench` measures them.
pub const CONFIG: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
topics = ["events"]
[time]
zone = "UTC"
[state]
retention = "35d"
[north_star]
name = "weekly_active_users"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1w"
[[inputs]]
name = "users_7d"
owner = "growth"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
trailing = "7d"
[[inputs]]
name = "daily_active_teams"
owner = "collaboration"
kind = "distinct"
field = "team_id"
where = { event = "message_sent" }
window = "1d"
[[inputs]]
name = "messages"
owner = "messaging"
kind = "count"
where = { event = "message_sent" }
window = "1h"
[[inputs]]
name = "collaborative_teams"
owner = "collaboration"
kind = "threshold"
entity = "team_id"
field = "user_id"
at_least = 3
where = { event = "message_sent" }
window = "1w"
[[guardrails]]
name = "messages_by_platform"
owner = "clients"
kind = "count"
where = { event = "message_sent" }
by = ["properties.platform"]
window = "1d"
[[guardrails]]
name = "errors"
owner = "clients"
kind = "count"
where = { event = "error_shown" }
window = "1d"
[revenue]
name = "revenue"
kind = "sum"
field = "properties.amount"
where = { event = "payment" }
window = "1w"
"#;

/// The clock of the run: events fill the 7 days before it.
pub const NOW_MS: i64 = 1_795_435_200_000; // 2026-11-23T12:00:00Z
pub const WEEK_MS: i64 = 7 * 86_400_000;
/// One trailing step: events start after it, so all are in the trailing 7 days.
pub const STEP_MS: i64 = 15 * 60_000;
/// Metrics of the kinds [`CONFIG`] lacks, added for the memory run so that every kind's
/// per-entity state is measured: retentions of a calendar and of a trailing distinct count,
/// a trailing threshold, a conversion.
pub const EVERY_KIND: &str = r#"
[[inputs]]
name = "returning_weekly_users"
owner = "growth"
kind = "retention"
of = "weekly_active_users"
[[inputs]]
name = "returning_users_7d"
owner = "growth"
kind = "retention"
of = "users_7d"
[[inputs]]
name = "teams_with_3_senders_7d"
owner = "collaboration"
kind = "threshold"
entity = "team_id"
field = "user_id"
at_least = 3
where = { event = "message_sent" }
trailing = "7d"
[[inputs]]
name = "paid_after_messaging"
owner = "growth"
kind = "conversion"
from = { event = "message_sent" }
where = { event = "payment" }
within = "1d"
window = "1w"
"#;

/// The compiled plan of [`CONFIG`].
pub fn bench_plan() -> anyhow::Result<Plan> {
    plan_of(CONFIG)
}

/// The compiled plan of [`CONFIG`] with [`EVERY_KIND`].
pub fn every_kind_plan() -> anyhow::Result<Plan> {
    // The extra inputs go before `[[guardrails]]`, beside the others.
    let text = CONFIG.replacen("[[guardrails]]", &format!("{EVERY_KIND}[[guardrails]]"), 1);
    plan_of(&text)
}

fn plan_of(text: &str) -> anyhow::Result<Plan> {
    let config = Config::from_toml(text, &|_| None)
        .map_err(|errors| anyhow::anyhow!("bench config: {errors}"))?;
    Ok(Plan::from_config(&config))
}

/// A product event of about 400 bytes, in the shape of the demo's; whether it is a message.
pub fn write_event(out: &mut Vec<u8>, index: u64, user: u64, time_ms: i64) -> bool {
    use std::io::Write;
    out.clear();
    let platform = ["ios", "android", "web"][(user % 3) as usize];
    let team = user / 5;
    // One event in a hundred is a payment, one in fifty an error; the rest are messages.
    let (event, amount) = match index % 100 {
        0 => ("payment", format!("{}.{:02}", 5 + user % 40, index % 100)),
        1 | 51 => ("error_shown", "0".to_string()),
        _ => ("message_sent", "0".to_string()),
    };
    let _ = write!(
        out,
        r#"{{"event_id":"evt-{index:016x}-{user:012x}","event":"{event}","timestamp":{time_ms},"user_id":"user-{user:09}","team_id":"team-{team:08}","session_id":"sess-{:012x}","properties":{{"platform":"{platform}","channel_id":"chan-{:06}","message_length":{},"client_version":"5.{}.{}","locale":"en-US","amount":{amount},"thread":false,"attachments":0}}}}"#,
        user.wrapping_mul(2_654_435_761) ^ (index / 10),
        team % 1000,
        20 + index % 300,
        user % 20,
        index % 7,
    );
    event == "message_sent"
}

/// A stride coprime with `n`, so `i * stride mod n` visits every residue once.
pub fn coprime_stride(n: u64) -> u64 {
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut stride = 1_000_003 % n.max(2);
    while gcd(stride.max(1), n) != 1 {
        stride += 1;
    }
    stride.max(1)
}
