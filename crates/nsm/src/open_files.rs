//! The process's open-file limit: raised at start as far as the hard limit allows, and shared
//! between RocksDB's table files, HTTP connections and everything else. A process out of file
//! descriptors fails its next state write (RocksDB cannot open the file it needs) and stops;
//! so HTTP connections, the one use a client outside controls, get only what is left.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tracing::{info, warn};

/// Descriptors kept for everything but table files and HTTP connections: RocksDB's write-ahead
/// log, manifest, info log and directory, librdkafka's sockets and wake-up pipes (a few per
/// broker and client: consumer, producers, changelog reader, admin), the runtime, stdio.
pub const RESERVED: u64 = 256;
/// The soft limit is raised to at most this, the value of `LimitNOFILE` in the systemd unit.
const TARGET: u64 = 65_536;
/// HTTP connections kept whatever the limit, so that scrapes still find a place.
const MIN_CONNECTIONS: usize = 16;

/// Raises the soft limit on open files toward the hard limit (at most [`TARGET`]), as Go's
/// runtime does at start: a hard limit set high with a soft limit of 1,024 (systemd's
/// default) is common. Returns the limit in force, `None` when unlimited.
pub fn raise_limit() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current?;
    let wanted = limit.maximum.map_or(TARGET, |maximum| maximum.min(TARGET));
    if wanted <= current {
        return Some(current);
    }
    let raised = Rlimit {
        current: Some(wanted),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            info!(from = current, to = wanted, "open-file limit raised");
            Some(wanted)
        }
        Err(error) => {
            warn!(limit = current, error = %error, "cannot raise the open-file limit");
            Some(current)
        }
    }
}

/// How many HTTP connections fit in `limit` beside `table_files` and [`RESERVED`]: `wanted`,
/// or fewer (at least [`MIN_CONNECTIONS`]) when the limit is too low for it.
pub fn connections_within(limit: Option<u64>, table_files: u64, wanted: usize) -> usize {
    let Some(limit) = limit else {
        return wanted;
    };
    let left = limit.saturating_sub(table_files + RESERVED);
    let left = usize::try_from(left).unwrap_or(usize::MAX);
    wanted.min(left.max(MIN_CONNECTIONS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_what_table_files_and_the_reserve_leave() {
        // The defaults fit the common limit of 1,024 exactly.
        assert_eq!(connections_within(Some(1024), 512, 256), 256);
        assert_eq!(connections_within(Some(65_536), 512, 4096), 4096);
        assert_eq!(connections_within(None, 512, 4096), 4096);
        assert_eq!(connections_within(Some(1024), 512, 1000), 256);
        assert_eq!(connections_within(Some(512), 512, 256), MIN_CONNECTIONS);
    }

    #[test]
    fn the_limit_is_raised_within_the_hard_limit() {
        let before = getrlimit(Resource::Nofile);
        let limit = raise_limit();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(limit, after.current);
        assert_eq!(
            after.maximum, before.maximum,
            "the hard limit is left alone"
        );
        assert!(after.current >= before.current);
        if let (Some(current), Some(maximum)) = (after.current, after.maximum) {
            assert_eq!(
                current,
                maximum.min(TARGET).max(before.current.unwrap_or(0))
            );
        }
    }
}
