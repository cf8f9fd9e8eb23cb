//! nsm's "now" for event time: the wall clock, or, for `nsm demo --time-scale N`, a clock that
//! runs N times faster from the moment the demo starts, so that weeks of event time (and the
//! alerts about them) pass in minutes. The generator stamps events with the same clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, from the system clock.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// The clock event time is judged by (lateness, future skew, idle partitions, which window
/// is current).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventClock {
    /// Wall-clock time from which the clock runs faster.
    origin_ms: i64,
    scale: u32,
}

impl EventClock {
    /// The wall clock itself: what `nsm run` uses.
    pub fn wall() -> EventClock {
        EventClock {
            origin_ms: 0,
            scale: 1,
        }
    }

    /// A clock equal to the wall clock now, then running `scale` times faster.
    pub fn scaled(scale: u32) -> EventClock {
        EventClock {
            origin_ms: wall_clock_ms(),
            scale: scale.max(1),
        }
    }

    pub fn scale(&self) -> u32 {
        self.scale
    }

    pub fn now_ms(&self) -> i64 {
        self.at(wall_clock_ms())
    }

    /// The clock's time when the wall clock says `wall_ms`.
    fn at(&self, wall_ms: i64) -> i64 {
        if self.scale == 1 {
            return wall_ms;
        }
        let elapsed = wall_ms.saturating_sub(self.origin_ms);
        self.origin_ms
            .saturating_add(elapsed.saturating_mul(i64::from(self.scale)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scaled_clock_starts_at_the_wall_clock_and_runs_faster() {
        let clock = EventClock {
            origin_ms: 1_000_000,
            scale: 1008,
        };
        assert_eq!(clock.at(1_000_000), 1_000_000);
        // Ten minutes of wall clock are a week.
        assert_eq!(clock.at(1_000_000 + 600_000), 1_000_000 + 7 * 86_400_000);
        assert_eq!(EventClock::wall().at(42), 42);
    }
}
