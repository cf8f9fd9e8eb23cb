//! Peak memory with millions of distinct users (see the crate doc).

use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use nsm_core::engine::{AggValue, Engine, Outcome, Plan, DEFAULT_MEMBER_CACHE};
use nsm_core::{Config, PartitionKey};
use nsm_state::{Store, StoreOptions};

/// Metrics of a collaboration product, as `make bench` measures them.
const CONFIG: &str = r#"
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
const NOW_MS: i64 = 1_795_435_200_000; // 2026-11-23T12:00:00Z
const WEEK_MS: i64 = 7 * 86_400_000;
/// One trailing step: events start after it, so all are in the trailing 7 days.
const STEP_MS: i64 = 15 * 60_000;
/// Events between two checkpoints, as a busy pipeline takes them in one flush interval.
const CHECKPOINT_EVERY: u64 = 50_000;

#[derive(Clone, Copy, ValueEnum)]
pub enum StoreKind {
    /// Members in RocksDB behind the bounded cache, as `nsm run` keeps them.
    Rocksdb,
    /// Members in memory (a map of every entry): the baseline that grows with the users.
    Memory,
}

#[derive(Args)]
pub struct MemoryArgs {
    /// Distinct users; each sends two messages.
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    #[arg(long, value_enum, default_value_t = StoreKind::Rocksdb)]
    store: StoreKind,
    /// State directory (a temporary one by default).
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
}

pub fn run(args: &MemoryArgs) -> anyhow::Result<()> {
    let config = Config::from_toml(CONFIG, &|_| None)
        .map_err(|errors| anyhow::anyhow!("bench config: {errors}"))?;
    let plan = Plan::from_config(&config);
    let temporary = tempfile::tempdir()?;
    let path = args
        .state_dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    let store = Store::open(&path, &plan, &StoreOptions::default())?;
    let mut engine = match args.store {
        StoreKind::Rocksdb => {
            Engine::with_reader(plan.clone(), Box::new(store.clone()), DEFAULT_MEMBER_CACHE)
        }
        StoreKind::Memory => Engine::new(plan.clone()),
    };
    let key = PartitionKey::new("events", 0);
    engine.restore_partition(key.clone(), store.load_partition(&key)?);

    let users = args.users.max(1);
    let events = 2 * users;
    let spacing_ms = (WEEK_MS - 2 * STEP_MS) as f64 / events as f64;
    let start_ms = NOW_MS - WEEK_MS + STEP_MS;
    let stride = coprime_stride(users);
    let started = Instant::now();
    let mut payload = Vec::with_capacity(512);
    let mut bytes = 0u64;
    // Users with a message: the exact answer (one bit each).
    let mut messaged = vec![0u64; users.div_ceil(64) as usize];
    for index in 0..events {
        // First every user in order, then every user again in a scrambled order.
        let user = if index < users {
            index
        } else {
            ((index - users) as u128 * stride as u128 % users as u128) as u64
        };
        let time_ms = start_ms + (index as f64 * spacing_ms) as i64;
        if write_event(&mut payload, index, user, time_ms) {
            messaged[(user / 64) as usize] |= 1 << (user % 64);
        }
        bytes += payload.len() as u64;
        match engine.apply(&key, index as i64, &payload, NOW_MS) {
            Outcome::Applied { .. } => {}
            other => bail!("event {index} was not applied: {other:?}"),
        }
        if (index + 1) % CHECKPOINT_EVERY == 0 {
            store.write(&engine.take_changes())?;
        }
    }
    store.write(&engine.take_changes())?;
    let elapsed = started.elapsed().as_secs_f64();

    let values = engine.metric_values(NOW_MS);
    let trailing = plan
        .metric_index("users_7d")
        .context("users_7d is in the bench config")?;
    let counted = values
        .iter()
        .find(|value| value.metric == trailing)
        .map(|value| value.current.value);
    let expected: u64 = messaged
        .iter()
        .map(|word| u64::from(word.count_ones()))
        .sum();
    if counted != Some(AggValue::Distinct(expected)) {
        bail!("users_7d is {counted:?}, expected {expected}: not exact");
    }
    let (peak_kib, resident_kib) = process_memory_kib()?;
    println!(
        "{{\"bench\":\"memory\",\"store\":\"{}\",\"users\":{users},\"events\":{events},\
         \"mean_event_bytes\":{},\"users_7d\":{expected},\"peak_rss_mib\":{:.1},\"rss_mib\":{:.1},\
         \"resident_member_entries\":{},\"seconds\":{elapsed:.1},\"events_per_second\":{:.0}}}",
        match args.store {
            StoreKind::Rocksdb => "rocksdb",
            StoreKind::Memory => "memory",
        },
        bytes / events,
        peak_kib as f64 / 1024.0,
        resident_kib as f64 / 1024.0,
        engine.resident_members(),
        events as f64 / elapsed,
    );
    Ok(())
}

/// A product event of about 400 bytes, in the shape of the demo's; whether it is a message.
fn write_event(out: &mut Vec<u8>, index: u64, user: u64, time_ms: i64) -> bool {
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
fn coprime_stride(n: u64) -> u64 {
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

/// Peak and current resident memory of this process, in KiB (Linux).
fn process_memory_kib() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse::<u64>().ok())
            .with_context(|| format!("{name} in /proc/self/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}
