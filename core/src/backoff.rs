//! Waiting: backoff between retries and reconnects, sleeping that a shutdown cuts short.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Reconnect backoff after a lost connection: starts here, doubles, capped.
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Sleep up to `d`, waking early when `stop` is set.
pub fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Exponential backoff with jitter: a random delay in [d/2, d] where d doubles per
/// attempt from `initial_ms` up to `max_ms`, so many daemons retrying the same failure
/// do not hit the same resource in lockstep.
pub fn backoff_delay(attempt: u32, initial_ms: u64, max_ms: u64) -> Duration {
    let exp = initial_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(32));
    let d = exp.min(max_ms).max(1);
    Duration::from_millis(d / 2 + fastrand::u64(0..=d / 2))
}

pub use epidemic_plugin_sdk::backend::kit::now_us;

#[cfg(test)]
mod tests {
    use super::backoff_delay;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_caps() {
        for _ in 0..100 {
            let d1 = backoff_delay(1, 100, 1_000);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = backoff_delay(3, 100, 1_000);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d10 = backoff_delay(10, 100, 1_000);
            assert!(d10 >= Duration::from_millis(500) && d10 <= Duration::from_millis(1_000));
        }
    }
}
