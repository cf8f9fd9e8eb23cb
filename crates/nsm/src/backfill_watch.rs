//! `nsm backfill --config nsm.toml`: follows a running nsm's backfills
//! (docs/design/backfill.md) on its `/metrics`, with a progress bar per partition, until every
//! one is swapped in.

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;

const SERIES: &str = "nsm_backfill_progress_ratio{";
const BAR_WIDTH: usize = 30;

#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    /// The config the running nsm uses: `/metrics` is read at its `http.listen`.
    #[arg(long, short, env = "NSM_CONFIG")]
    config: PathBuf,
    /// A user of `[http.basic_auth]`, when `/metrics` needs one; the password is read from
    /// the environment variable NSM_PASSWORD.
    #[arg(long)]
    user: Option<String>,
    /// Give up after this long without every backfill swapped in (`30m`, `2h`); by default
    /// waits as long as it takes.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

/// Follows the backfills until each is swapped in (exit 0), or the timeout passes.
pub fn watch(args: BackfillArgs) -> Result<()> {
    let config = crate::run::load_config(&args.config)?;
    if config.http.tls.is_some() {
        bail!(
            "nsm backfill reads /metrics over plain HTTP, and http.tls is set: follow \
             nsm_backfill_progress_ratio in Prometheus instead"
        );
    }
    let authorization = match (&config.http.basic_auth, &args.user) {
        (None, _) => None,
        (Some(_), Some(user)) => {
            let password = std::env::var("NSM_PASSWORD")
                .context("--user needs the password in the environment variable NSM_PASSWORD")?;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            Some(format!("Basic {token}"))
        }
        (Some(_), None) => bail!(
            "/metrics needs a user of [http.basic_auth]: pass --user, and the password in NSM_PASSWORD"
        ),
    };
    let mut address = config.http.listen;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let started = Instant::now();
    let terminal = std::io::stdout().is_terminal();
    let mut drawn_lines = 0;
    let mut last_drawn = String::new();
    loop {
        if args
            .timeout
            .is_some_and(|timeout| started.elapsed() >= timeout)
        {
            bail!(
                "the backfills were not all swapped in within {:?}",
                args.timeout.unwrap_or_default()
            );
        }
        let progress = match get(address, "/metrics", authorization.as_deref()) {
            Ok((200, body)) => backfill_progress(&body),
            Ok((status, _)) => bail!("http://{address}/metrics answered {status}"),
            Err(error) => {
                eprintln!("waiting for nsm at http://{address}: {error}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if progress.is_empty() {
            // Not one: none to run, once nsm has taken its partitions (ready).
            if matches!(get(address, "/readyz", None), Ok((200, _))) {
                println!("no backfill running: every metric holds the history of the partitions this nsm owns");
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        let drawing: String = progress
            .iter()
            .map(|(partition, ratio)| bar(partition, *ratio, terminal))
            .collect();
        if terminal {
            if drawn_lines > 0 {
                print!("\x1b[{drawn_lines}A");
            }
            print!("{drawing}");
            drawn_lines = progress.len();
        } else if drawing != last_drawn {
            print!("{drawing}");
        }
        std::io::stdout().flush().ok();
        last_drawn = drawing;
        if progress.iter().all(|(_, ratio)| *ratio >= 1.0) {
            println!("every backfill is swapped in: the metrics added or changed hold the retained history");
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// One line: the partition, its bar and percentage (on a terminal, the rest of the line
/// erased, as it is drawn over the last one).
fn bar(partition: &str, ratio: f64, terminal: bool) -> String {
    let filled = ((ratio.clamp(0.0, 1.0) * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
    format!(
        "{partition:<24} [{}{}] {:>3.0}%{}\n",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        ratio * 100.0,
        if terminal { "\x1b[K" } else { "" }
    )
}

/// Each partition's backfill progress in an exposition: `topic/partition` and the ratio.
fn backfill_progress(exposition: &str) -> Vec<(String, f64)> {
    let mut progress: Vec<(String, f64)> = exposition
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(SERIES)?;
            let (labels, value) = rest.split_once("} ")?;
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                    .and_then(|value| value.strip_suffix('"'))
                    .map(str::to_string)
            };
            Some((
                format!("{}/{}", label("topic")?, label("partition")?),
                value.trim().parse().ok()?,
            ))
        })
        .collect();
    progress.sort_by(|a, b| a.0.cmp(&b.0));
    progress
}

/// A plain HTTP/1.0 GET: status and body.
fn get(address: SocketAddr, path: &str, authorization: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = authorization
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\n{auth}\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_read_per_partition_from_the_exposition() {
        let exposition = "# HELP nsm_backfill_progress_ratio x\n\
             nsm_backfill_progress_ratio{partition=\"1\",topic=\"events\"} 0.5\n\
             nsm_backfill_progress_ratio{partition=\"0\",topic=\"events\"} 1\n\
             nsm_events_consumed_total{partition=\"0\",topic=\"events\"} 7\n";
        assert_eq!(
            backfill_progress(exposition),
            [("events/0".to_string(), 1.0), ("events/1".to_string(), 0.5)]
        );
        assert_eq!(
            bar("events/1", 0.5, false),
            "events/1                 [###############---------------]  50%\n"
        );
    }
}
