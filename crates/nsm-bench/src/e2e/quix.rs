//! The Quix Streams peer (`crates/nsm-bench/quix/peer.py`): a third reader of the bench topic,
//! timed as the bare consumer and nsm are, from its first message to its last, with its
//! process' CPU over that span read from /proc.
//!
//! The peer says `nsm-bench-peer first` once it has processed its first event and
//! `nsm-bench-peer done {json}` once it has processed all of them, and waits for a line after
//! each: the bench reads the clock and the CPU while the peer waits, so neither figure holds
//! the peer's start (imports, topic creation, group join) or its stop (last checkpoint).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use super::{Running, Span};
use crate::procfs;

/// The peer script in the source tree this bench was built from.
pub const DEFAULT_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/quix/peer.py");
/// How the peer's lines to the bench start; anything else it prints is not for the bench.
const PROTOCOL: &str = "nsm-bench-peer ";
/// Longest wait for the peer, per million events: Python reads an order of magnitude slower
/// than nsm, and nothing here should stop a slow run that is progressing.
const PATIENCE_PER_MILLION: Duration = Duration::from_secs(900);

/// How to run the peer: a Python with `requirements.txt` installed, and the script.
pub struct QuixPeer<'a> {
    pub python: &'a Path,
    pub script: &'a Path,
}

/// The peer's read of the stream, and what it computed.
pub struct QuixRead {
    pub span: Span,
    /// Events it processed.
    pub events: u64,
    /// The peer's weekly active users, by the start of its (Thursday) week in ms.
    pub weekly_active_users: Value,
}

/// Runs the peer over the `events` events of `topic`, in a new consumer group and state
/// directory (the broker is new to this bench run, and so is `dir`), and times it.
pub fn quix_consumes(
    peer: &QuixPeer<'_>,
    brokers: &str,
    topic: &str,
    events: u64,
    dir: &Path,
) -> anyhow::Result<QuixRead> {
    let patience = PATIENCE_PER_MILLION * (events / 1_000_000 + 1) as u32;
    let deadline = Instant::now() + patience;
    let state: PathBuf = dir.join("quix-state");
    let mut running = Running::spawn_talking(
        "quix",
        Command::new(peer.python)
            .arg(peer.script)
            .args(["--brokers", brokers, "--topic", topic])
            .args(["--events", &events.to_string()])
            .args(["--group", "nsm-bench-quix", "--state-dir"])
            .arg(&state),
        dir,
    )?;
    let mut answer = running.child.stdin.take().context("the peer's stdin")?;
    let lines = read_lines(running.child.stdout.take().context("the peer's stdout")?);
    let pid = running.child.id().to_string();

    expect(&running, &lines, "first", deadline)?;
    let started = Instant::now();
    let cpu = procfs::cpu_seconds(&pid)?;
    writeln!(answer).context("answering the peer")?;

    let summary = expect(&running, &lines, "done", deadline)?;
    let span = Span {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: procfs::cpu_seconds(&pid)? - cpu,
    };
    writeln!(answer).context("answering the peer")?;
    running.wait_for_exit(Duration::from_secs(120))?;

    let summary: Value = serde_json::from_str(&summary).context("the peer's summary")?;
    let processed = check_summary(&summary, events, &running)?;
    Ok(QuixRead {
        span,
        events: processed,
        weekly_active_users: summary["weekly_active_users"].clone(),
    })
}

/// The peer must have processed the events asked for, and dropped none as late (as nsm
/// must); returns how many it processed.
fn check_summary(summary: &Value, events: u64, running: &Running) -> anyhow::Result<u64> {
    let processed = summary["events"].as_u64().unwrap_or(0);
    let late = summary["late"].as_u64().unwrap_or(u64::MAX);
    if processed != events || late != 0 {
        bail!(
            "the Quix peer processed {processed} of {events} events, {late} late: see {}",
            running.log.display()
        );
    }
    Ok(processed)
}

/// The peer's stdout, line by line, from a thread: the bench waits with a deadline.
fn read_lines(stdout: ChildStdout) -> Receiver<String> {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if send.send(line).is_err() {
                return;
            }
        }
    });
    receive
}

/// Waits for the peer's `word` line; returns what follows the word.
fn expect(
    running: &Running,
    lines: &Receiver<String>,
    word: &str,
    deadline: Instant,
) -> anyhow::Result<String> {
    loop {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let said = line.strip_prefix(PROTOCOL).and_then(|rest| {
                    rest.strip_prefix(word)
                        .filter(|after| after.is_empty() || after.starts_with(' '))
                });
                if let Some(after) = said {
                    return Ok(after.trim_start().to_string());
                }
            }
            Err(RecvTimeoutError::Timeout) => running.check_alive()?,
            Err(RecvTimeoutError::Disconnected) => {
                // Its stdout closed: it exited, or is about to.
                std::thread::sleep(Duration::from_millis(500));
                running.check_alive()?;
                bail!("the Quix peer closed its stdout before `{word}`");
            }
        }
        if Instant::now() > deadline {
            bail!(
                "gave up waiting for the Quix peer's `{word}`: see {}",
                running.log.display()
            );
        }
    }
}
