//! The dispatcher's one clock. Every time it reads or sleeps toward (retry due times, rate
//! spacing, attempt durations, the drain) comes from here, so that a test can run it on
//! tokio's paused time and check a schedule exactly instead of sleeping.

use std::time::Duration;

/// Milliseconds since the epoch, as the store keeps times.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's clock: times in the store are compared across nodes.
    System,
    /// The system's time at `start`, advanced by tokio's clock since (paused in tests).
    Tokio {
        /// The system's time at `start` (ms since the epoch).
        epoch_ms: i64,
        /// When the clock was made.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's time (paused under `#[tokio::test(start_paused = true)]`).
    pub fn tokio() -> Clock {
        Clock::Tokio {
            epoch_ms: crate::store::now_ms(),
            start: tokio::time::Instant::now(),
        }
    }

    /// Now, in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => crate::store::now_ms(),
            Clock::Tokio { epoch_ms, start } => {
                epoch_ms + start.elapsed().as_millis().min(i64::MAX as u128) as i64
            }
        }
    }

    /// Sleeps until `at` (ms since the epoch) on tokio's timer.
    pub async fn sleep_until_ms(&self, at: i64) {
        let wait = (at - self.now_ms()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await
    }
}
