//! What `/healthz` watches: the threads that must keep coming back. A thread stuck in a call
//! that never returns (a disk that hangs, a lock never released) leaves nsm up but doing
//! nothing; `/healthz` then fails, so that the supervisor restarts it, and says which thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Every watched thread.
#[derive(Debug)]
pub struct Liveness {
    origin: Instant,
    watches: RwLock<Vec<Arc<Watch>>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            origin: Instant::now(),
            watches: RwLock::default(),
        }
    }
}

/// One thread's work: stuck when a piece of it has been running longer than `limit`.
#[derive(Debug)]
pub struct Watch {
    name: &'static str,
    limit: Duration,
    origin: Instant,
    /// When the piece of work running started, in ms since `origin` plus one; 0 when idle.
    busy_since: AtomicU64,
}

impl Watch {
    /// A piece of work starts now (a loop's next turn, a write).
    pub fn busy(&self) {
        let since = self.origin.elapsed().as_millis() as u64 + 1;
        self.busy_since.store(since, Ordering::Relaxed);
    }

    /// Nothing is running: nothing can be stuck.
    pub fn idle(&self) {
        self.busy_since.store(0, Ordering::Relaxed);
    }

    /// How long the piece of work running has run, at `now`.
    fn running_at(&self, now: Instant) -> Option<Duration> {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => None,
            since => {
                let started = self.origin + Duration::from_millis(since - 1);
                Some(now.saturating_duration_since(started))
            }
        }
    }
}

impl Liveness {
    /// Watches a thread whose pieces of work must each end within `limit`; idle at first.
    pub fn watch(&self, name: &'static str, limit: Duration) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            name,
            limit,
            origin: self.origin,
            busy_since: AtomicU64::new(0),
        });
        self.watches
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(watch.clone());
        watch
    }

    /// What is stuck at `now`, one line each.
    pub fn stuck_at(&self, now: Instant) -> Vec<String> {
        self.watches
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter_map(|watch| {
                let running = watch.running_at(now)?;
                (running > watch.limit).then(|| {
                    format!(
                        "{} has not come back for {} s (limit {} s)",
                        watch.name,
                        running.as_secs(),
                        watch.limit.as_secs()
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_busy_longer_than_its_limit_is_stuck_and_an_idle_one_never() {
        let liveness = Liveness::default();
        let consumer = liveness.watch("the consumer loop", Duration::from_secs(300));
        let checkpoint = liveness.watch("the checkpoint writer", Duration::from_secs(60));
        let start = Instant::now();
        assert!(liveness
            .stuck_at(start + Duration::from_secs(3600))
            .is_empty());
        consumer.busy();
        checkpoint.busy();
        assert!(liveness
            .stuck_at(start + Duration::from_secs(59))
            .is_empty());
        let stuck = liveness.stuck_at(start + Duration::from_secs(62));
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        assert!(
            stuck[0].starts_with("the checkpoint writer has not come back for 6")
                && stuck[0].ends_with("s (limit 60 s)"),
            "{stuck:?}"
        );
        checkpoint.idle();
        consumer.busy();
        let turned = Instant::now();
        assert!(liveness
            .stuck_at(turned + Duration::from_secs(299))
            .is_empty());
        let stuck = liveness.stuck_at(turned + Duration::from_secs(302));
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        assert!(stuck[0].starts_with("the consumer loop has not come back for"));
    }
}
