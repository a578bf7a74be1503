//! The retry schedule: when the next attempt of a failed delivery is due. It is data (a list
//! of delays or an exponential backoff, a jitter, the bounds put on a target's
//! `Retry-After`), so that it can be read, configured and tested without running anything.

use crate::actions::ActionError;
use crate::store::State;
use std::time::Duration;

/// How long a delivery waits before each retry; built from a trigger's `delivery` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySchedule {
    /// Delays before attempt 2, 3, …; the last one repeats. Empty: exponential from
    /// `backoff`, doubling up to `max_backoff`.
    pub delays: Vec<Duration>,
    /// First delay of the exponential schedule.
    pub backoff: Duration,
    /// Longest delay of the schedule (a `Retry-After` has its own bound).
    pub max_backoff: Duration,
    /// Share of each delay taken off at random (0: none; 0.5: somewhere in [d/2, d]), so that
    /// the retries of a burst spread out instead of arriving together.
    pub jitter: f64,
    /// Longest `Retry-After` honoured; a longer one is cut to this.
    pub max_retry_after: Duration,
    /// Least delay after the target answered 429 Too Many Requests, whatever the schedule
    /// or its `Retry-After` says: a target that is shedding load is not hit again at once.
    pub min_after_429: Duration,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule {
            delays: Vec::new(),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            jitter: 0.5,
            max_retry_after: Duration::from_secs(3600),
            min_after_429: Duration::from_secs(5),
        }
    }
}

impl RetrySchedule {
    /// The delay before attempt `next` (2 = the first retry) after `error`; `unit` is a
    /// random draw in [0, 1) (given, so that the schedule itself is deterministic).
    pub fn delay(&self, next: u32, error: &ActionError, unit: f64) -> Duration {
        let retry = next.saturating_sub(2) as usize;
        let base = match self.delays.as_slice() {
            [] => self
                .backoff
                .saturating_mul(1u32 << retry.min(30))
                .min(self.max_backoff),
            delays => delays[retry.min(delays.len() - 1)].min(self.max_backoff),
        };
        let jitter = self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        let mut delay = base.saturating_sub(base.mul_f64(jitter));
        // The target said when: never earlier than that (within reason).
        if let Some(after) = error.retry_after {
            delay = delay.max(after.min(self.max_retry_after));
        }
        if error.status == Some(429) {
            delay = delay.max(self.min_after_429);
        }
        delay
    }

    /// [`RetrySchedule::delay`] with a fresh random draw.
    pub fn next_delay(&self, next: u32, error: &ActionError) -> Duration {
        self.delay(next, error, rand::random::<f64>())
    }
}

/// The state after an attempt: succeeded, dead (permanent error or out of attempts since
/// the last replay), or retrying.
pub(super) fn next_state(
    error: &Option<ActionError>,
    attempts_in_budget: u32,
    max_attempts: u32,
) -> State {
    match error {
        None => State::Succeeded,
        Some(e) if e.permanent => State::Dead,
        Some(_) if attempts_in_budget >= max_attempts => State::Dead,
        Some(_) => State::Retrying,
    }
}

/// The state a delivery is left in after attempt `made` ended with `error`, and when its
/// next attempt is due (a retry).
pub(super) fn decide(
    policy: &crate::router::DeliveryPolicy,
    clock: super::Clock,
    job: &super::Job,
    made: u32,
    error: &Option<ActionError>,
) -> (State, Option<i64>) {
    // Waiting for a person is not a failure: the delivery sleeps until the deadline.
    if let Some(until) = error.as_ref().and_then(|e| e.waiting_until) {
        return (State::Retrying, Some(until));
    }
    let state = next_state(error, made - job.attempt_base, policy.max_attempts);
    let next_at = match (state, error) {
        (State::Retrying, Some(e)) => {
            let delay = policy.retry.next_delay(made - job.attempt_base + 1, e);
            Some(clock.now_ms() + delay.as_millis().min(i64::MAX as u128) as i64)
        }
        _ => None,
    };
    (state, next_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> ActionError {
        ActionError::transient("HTTP 503")
    }

    fn exponential() -> RetrySchedule {
        RetrySchedule {
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            ..RetrySchedule::default()
        }
    }

    #[test]
    fn exponential_doubles_up_to_the_cap() {
        let s = exponential();
        let at = |n| s.delay(n, &failed(), 0.0).as_secs();
        assert_eq!(
            [at(2), at(3), at(4), at(5), at(6), at(40)],
            [1, 2, 4, 8, 8, 8]
        );
    }

    #[test]
    fn jitter_takes_off_at_most_its_share() {
        let s = exponential();
        assert_eq!(s.delay(4, &failed(), 0.0), Duration::from_secs(4));
        let least = s.delay(4, &failed(), 0.999_999);
        assert!(
            least > Duration::from_secs(2) && least < Duration::from_millis(2001),
            "{least:?}"
        );
        let none = RetrySchedule {
            jitter: 0.0,
            ..exponential()
        };
        assert_eq!(none.delay(4, &failed(), 0.9), Duration::from_secs(4));
    }

    #[test]
    fn a_list_of_delays_is_followed_and_its_last_repeats() {
        let s = RetrySchedule {
            delays: vec![
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_secs(120),
            ],
            max_backoff: Duration::from_secs(300),
            jitter: 0.0,
            ..RetrySchedule::default()
        };
        let at = |n| s.delay(n, &failed(), 0.5).as_secs();
        assert_eq!([at(2), at(3), at(4), at(5), at(9)], [10, 60, 120, 120, 120]);
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        let s = RetrySchedule {
            max_retry_after: Duration::from_secs(60),
            ..exponential()
        };
        let mut e = failed();
        e.retry_after = Some(Duration::from_secs(30));
        // Longer than the schedule's 1 s: the target's word wins, with no jitter below it.
        assert_eq!(s.delay(2, &e, 0.9), Duration::from_secs(30));
        e.retry_after = Some(Duration::from_secs(86_400));
        assert_eq!(s.delay(2, &e, 0.9), Duration::from_secs(60));
        // Shorter than the schedule: the schedule still applies.
        e.retry_after = Some(Duration::ZERO);
        assert_eq!(s.delay(5, &e, 0.0), Duration::from_secs(8));
    }

    #[test]
    fn a_429_waits_at_least_the_floor() {
        let s = exponential();
        let mut e = failed();
        e.status = Some(429);
        assert_eq!(s.delay(2, &e, 0.0), Duration::from_secs(5));
        e.retry_after = Some(Duration::from_secs(1));
        assert_eq!(s.delay(2, &e, 0.0), Duration::from_secs(5));
        e.retry_after = Some(Duration::from_secs(20));
        assert_eq!(s.delay(2, &e, 0.0), Duration::from_secs(20));
    }
}
