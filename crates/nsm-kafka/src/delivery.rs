//! Waiting for a threaded producer's records to be acknowledged.
//!
//! Not rdkafka's `flush`: with a `ThreadedProducer` the delivery reports are served by the
//! producer's own thread, and `flush` then sleeps in polls of 100 ms that never see them, so
//! every wait took at least 100 ms (measured: 2 × 100 ms of each checkpoint's changelog
//! write). librdkafka counts a message in the queue length (`in_flight_count`) until it is
//! destroyed, which it does after its delivery callback returned: at zero, every callback
//! has run.

use std::time::{Duration, Instant};

/// How often a wait looks at the queue length.
const POLL: Duration = Duration::from_millis(1);

/// Waits until `in_flight` (a producer's queue length) is zero: true then, false if
/// `give_up` said so first. `on_slow` is called once when the wait passes `slow`.
pub(crate) fn wait_delivered(
    in_flight: &dyn Fn() -> i32,
    give_up: &dyn Fn() -> bool,
    slow: Duration,
    on_slow: &mut dyn FnMut(),
) -> bool {
    let started = Instant::now();
    let mut warned = false;
    while in_flight() > 0 {
        if give_up() {
            return false;
        }
        if !warned && started.elapsed() > slow {
            warned = true;
            on_slow();
        }
        std::thread::sleep(POLL);
    }
    true
}
