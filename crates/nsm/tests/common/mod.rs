//! Helpers shared by the integration and end-to-end tests: real processes, real ports.

#![allow(dead_code)]

mod relay;

pub use relay::Relay;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const NSM: &str = env!("CARGO_BIN_EXE_nsm");

/// A free port for a server a test starts, taken below the kernel's ephemeral range (32768
/// and up on Linux): a port found free there can be taken by a client of the tests (a Kafka
/// connection, a scrape) before the server binds it, which failed a test with "Address
/// already in use". Each process walks its own stretch of 20000..32000.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id() % 120 * 100;
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + step) % SPAN).expect("below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A child process killed when the test ends, whatever happens.
pub struct Process {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command, log_dir: &Path) -> Process {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = command
            .stdout(Stdio::from(file.try_clone().expect("clone log")))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        Process {
            child,
            name: name.to_string(),
            log,
        }
    }

    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "kill -TERM {pid}");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > timeout {
                panic!(
                    "{} did not stop within {timeout:?} of SIGTERM; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET: status and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Samples of the Prometheus text format, by `name{labels}` as written.
pub fn scrape(port: u16) -> Option<BTreeMap<String, f64>> {
    let (status, body) = http_get(port, "/metrics")?;
    if status != 200 {
        return None;
    }
    let mut samples = BTreeMap::new();
    for line in body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
    {
        let (series, value) = line.rsplit_once(' ')?;
        samples.insert(series.to_string(), value.parse().ok()?);
    }
    Some(samples)
}

pub fn metric_value(samples: &BTreeMap<String, f64>, metric: &str, window: &str) -> Option<f64> {
    samples
        .get(&format!(
            "nsm_metric_value{{metric=\"{metric}\",window=\"{window}\"}}"
        ))
        .copied()
}

/// Polls `check` until it returns `Some`, or panics with `what` and the process log.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    process: Option<&Process>,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if started.elapsed() > timeout {
            let log = process.map(Process::log_text).unwrap_or_default();
            panic!("timed out after {timeout:?} waiting for {what}; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs an nsm tool command to completion and returns its standard output.
pub fn nsm_tool(args: &[&str]) -> String {
    let output = Command::new(NSM).args(args).output().expect("run nsm");
    assert!(
        output.status.success(),
        "nsm {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The start of the UTC hour `hours_back` hours before now.
pub fn hour_start_ms(hours_back: i64) -> i64 {
    let hour = 3_600_000;
    (now_ms() / hour - hours_back) * hour
}

pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .expect("timestamp")
        .to_string()
}

/// A config for tests: UTC, hour and day windows, one hour of lateness.
pub fn test_config(brokers: &str, topic: &str, state: &Path, port: u16, group: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
dead_letter_topic = "{topic}-dlq"
key_field = "user_id"
[kafka.properties]
"topic.metadata.refresh.interval.ms" = "1000"
# A killed instance is noticed in seconds, so a restart gets its partitions back quickly.
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[time]
zone = "UTC"
allowed_lateness = "1h"
idle_timeout = "1h"
[state]
path = "{state}"
retention = "35d"
flush_interval = "100ms"
[http]
listen = "127.0.0.1:{port}"
[north_star]
name = "daily_active_messagers"
description = "Users who sent a message today"
kind = "distinct"
field = "user_id"
where = {{ event = "message_sent" }}
window = "1d"
[[inputs]]
name = "messages_sent"
owner = "messaging-team"
kind = "count"
where = {{ event = "message_sent" }}
window = "1h"
[[inputs]]
name = "revenue_per_messager"
owner = "growth-team"
kind = "ratio"
numerator = "revenue"
denominator = "daily_active_messagers"
[[guardrails]]
name = "complaints"
owner = "support-team"
kind = "count"
where = {{ event = "complaint_filed" }}
window = "1d"
[revenue]
name = "revenue"
kind = "sum"
field = "properties.amount"
where = {{ event = "payment_succeeded" }}
window = "1d"
by = ["user_id"]
top = 3
"#,
        state = state.display()
    )
}

/// A known stream: valid events in two consecutive hours, then invalid and late ones.
pub struct KnownStream {
    pub lines: Vec<String>,
    pub hour_ms: i64,
    /// Distinct users who sent messages in the day of `hour_ms`.
    pub messagers: usize,
    pub messages_current_hour: usize,
    pub messages_previous_hour: usize,
    pub complaints: usize,
    pub revenue: f64,
    pub invalid: BTreeMap<&'static str, usize>,
    pub late: usize,
    /// Payments sent twice with the same event id (a producer retry), counted once.
    pub duplicates: usize,
}

pub fn known_stream(users: usize, per_user: usize) -> KnownStream {
    // Two hours back, so both hours are in the same UTC day unless it is just after
    // midnight; then use the previous day's last hours.
    let mut hour_ms = hour_start_ms(2);
    let day = 86_400_000;
    if hour_ms % day == 0 {
        hour_ms -= 2 * 3_600_000;
    }
    let previous_hour = hour_ms - 3_600_000;
    let mut lines = Vec::new();
    let mut messages_previous_hour = 0;
    for user in 0..users {
        let time = previous_hour + (user as i64 % 3_000) * 1_000;
        lines.push(format!(
            r#"{{"event":"message_sent","user_id":"u{user}","timestamp":"{}"}}"#,
            rfc3339(time)
        ));
        messages_previous_hour += 1;
    }
    let mut messages_current_hour = 0;
    // Spread over the first 50 minutes of the hour, whatever the size of the stream, so
    // every message of "the current hour" really falls in it.
    let spacing_ms = (50 * 60_000 / (users * per_user).max(1) as i64).clamp(1, 100);
    for round in 0..per_user {
        for user in 0..users {
            let time = hour_ms + (round * users + user) as i64 * spacing_ms;
            lines.push(format!(
                r#"{{"event":"message_sent","user_id":"u{user}","timestamp":{time}}}"#
            ));
            messages_current_hour += 1;
        }
    }
    let mut complaints = 0;
    let mut revenue_cents = 0i64;
    let mut duplicates = 0;
    for user in 0..users {
        let time = hour_ms + 1_000_000 + user as i64;
        if user % 10 == 0 {
            lines.push(format!(
                r#"{{"event":"complaint_filed","user_id":"u{user}","timestamp":{time}}}"#
            ));
            complaints += 1;
        }
        if user % 4 == 0 {
            let cents = 999 + user as i64;
            let payment = format!(
                r#"{{"event_id":"pay-{user}","event":"payment_succeeded","user_id":"u{user}","timestamp":{time},"properties":{{"amount":{}.{:02}}}}}"#,
                cents / 100,
                cents % 100
            );
            if user % 8 == 0 {
                lines.push(payment.clone());
                duplicates += 1;
            }
            lines.push(payment);
            revenue_cents += cents;
        }
    }
    let mut invalid = BTreeMap::new();
    let bad: [(&str, String); 5] = [
        (
            "invalid_json",
            "{\"event\": \"message_sent\", oops".to_string(),
        ),
        ("not_an_object", "[1, 2, 3]".to_string()),
        (
            "missing_timestamp",
            r#"{"event":"message_sent","user_id":"u1"}"#.to_string(),
        ),
        (
            "invalid_timestamp",
            r#"{"event":"message_sent","user_id":"u1","timestamp":"last tuesday"}"#.to_string(),
        ),
        (
            "wrong_type",
            format!(
                r#"{{"event":"payment_succeeded","user_id":"u1","timestamp":{},"properties":{{"amount":"12"}}}}"#,
                hour_ms + 5
            ),
        ),
    ];
    for (reason, line) in bad {
        lines.push(line);
        *invalid.entry(reason).or_default() += 1;
    }
    // Two hours behind the watermark with one hour allowed: late, twice (a duplicate).
    let late_line = format!(
        r#"{{"event":"message_sent","user_id":"late-user","timestamp":{}}}"#,
        hour_ms - 2 * 3_600_000
    );
    lines.push(late_line.clone());
    lines.push(late_line);
    KnownStream {
        lines,
        hour_ms,
        messagers: users,
        messages_current_hour,
        messages_previous_hour,
        complaints,
        revenue: revenue_cents as f64 / 100.0,
        invalid,
        late: 2,
        duplicates,
    }
}

/// The tansu broker binary: on the PATH or in ~/.cargo/bin (`make test` installs it).
pub fn tansu_binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("tansu"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain(std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin/tansu")));
    for candidate in candidates {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("tansu is not installed: `make test` installs it (cargo install tansu --locked --features dynostore)");
}

/// A tansu broker in memory on a free port, with its log in `dir`; and its address.
pub fn start_tansu(dir: &Path) -> (Process, String) {
    let port = free_port();
    (spawn_tansu(dir, port, port), format!("127.0.0.1:{port}"))
}

/// A tansu broker reached through a relay that can cut it off; and the relay's address,
/// which the broker advertises, so every client connection goes through the relay.
pub fn start_tansu_behind_relay(dir: &Path) -> (Process, Relay, String) {
    let port = free_port();
    let relay = Relay::start(port);
    let broker = spawn_tansu(dir, port, relay.port());
    let address = format!("127.0.0.1:{}", relay.port());
    (broker, relay, address)
}

fn spawn_tansu(dir: &Path, port: u16, advertised_port: u16) -> Process {
    let broker = Process::spawn(
        "tansu",
        Command::new(tansu_binary()).args([
            "broker",
            "--storage-engine",
            "memory://tansu/",
            "--listener-url",
            &format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{advertised_port}"),
        ]),
        dir,
    );
    wait_for(
        "tansu to listen",
        Duration::from_secs(30),
        Some(&broker),
        || TcpStream::connect(("127.0.0.1", port)).ok(),
    );
    broker
}

/// Messages consumed, over every partition.
pub fn consumed_total(samples: &std::collections::BTreeMap<String, f64>) -> f64 {
    series_values(samples, "nsm_events_consumed_total").sum()
}

/// The values of every series of the metric `name`, whatever their labels.
pub fn series_values<'a>(
    samples: &'a std::collections::BTreeMap<String, f64>,
    name: &'a str,
) -> impl Iterator<Item = f64> + 'a {
    samples
        .iter()
        .filter(move |(series, _)| {
            series
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .map(|(_, value)| *value)
}

/// A tmpfs mounted at `path` (root only), unmounted when dropped. `None`, with the reason on
/// standard error, where mounting is not permitted: the caller skips its test.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, options: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).expect("mount point");
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .output();
        match output {
            Ok(output) if output.status.success() => Some(Tmpfs {
                path: path.to_path_buf(),
            }),
            Ok(output) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here ({}); this test needs a file system \
                     that refuses writes",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("SKIPPED: cannot run mount ({error})");
                None
            }
        }
    }

    pub fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.path)
            .status()
            .expect("mount -o remount");
        assert!(status.success(), "remount {options}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
