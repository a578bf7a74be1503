//! Scheduling: which held delivery starts when. Deliveries of one ordering key wait for
//! each other; a retry waits on a timer (or in the store when far off); a trigger's
//! concurrency limit and rate decide how many start now.

use super::attempt::attempt;
use super::backlog::PARK_RETRY_AFTER;
use super::{Dispatcher, Job};
use std::cmp::Reverse;
use std::collections::VecDeque;
use std::time::Duration;

/// How late a rate-limited start may be made up for (about two timer ticks).
const RATE_SLACK: Duration = Duration::from_millis(2);

/// A job waiting for its time: (due, ms since the epoch; sequence, for a stable order).
pub(super) struct Timed(pub(super) i64, u64, pub(super) Job);
impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}

impl Dispatcher {
    pub(super) fn hold(&mut self, job: Job) {
        self.held.insert(job.id);
        if let Some(k) = &job.ordering_key {
            let key = (job.trigger, k.clone());
            if let Some(waiting) = self.keys.get_mut(&key) {
                waiting.push_back(job);
                return;
            }
            self.keys.insert(key, VecDeque::new());
        }
        self.schedule(job);
    }

    pub(super) fn schedule(&mut self, job: Job) {
        let now = self.clock.now_ms();
        match job.not_before {
            Some(t) if t > now + PARK_RETRY_AFTER && job.ordering_key.is_none() => {
                // The store has it as `retrying` with this time; it is read back when due.
                self.held.remove(&job.id);
                self.parked_due = Some(self.parked_due.map_or(t, |d| d.min(t)));
            }
            Some(t) if t > now => {
                self.timer_seq += 1;
                self.timers.push(Reverse(Timed(t, self.timer_seq, job)));
            }
            _ => self.enqueue(job),
        }
    }

    /// Queues a job to start; one that its trigger's rate would start more than
    /// [`PARK_RETRY_AFTER`] from now, or past half the memory, waits in the store instead.
    pub(super) fn enqueue(&mut self, job: Job) {
        let t = job.trigger;
        let spacing = self.router.triggers[t].policy.spacing;
        if let (Some(spacing), None) = (
            spacing.map(|s| s * self.bus.rate_share()),
            &job.ordering_key,
        ) {
            let now = tokio::time::Instant::now();
            let first = self.next_start[t].unwrap_or(now).max(now);
            let queued = u32::try_from(self.ready[t].len()).unwrap_or(u32::MAX);
            let wait = (first - now).saturating_add(spacing.saturating_mul(queued));
            let park = Duration::from_millis(PARK_RETRY_AFTER as u64);
            if wait > park || self.ready[t].len() >= self.max_held / 2 {
                let at = self.clock.now_ms() + wait.as_millis().min(i64::MAX as u128) as i64;
                self.held.remove(&job.id);
                self.deferred.push((job.id, at));
                self.parked_due = Some(self.parked_due.map_or(at, |d| d.min(at)));
                return;
            }
        }
        self.ready[t].push_back(job);
    }

    pub(super) fn release_key(&mut self, job: &Job) {
        if let Some(k) = &job.ordering_key {
            let key = (job.trigger, k.clone());
            let next = self.keys.get_mut(&key).and_then(VecDeque::pop_front);
            match next {
                Some(next) => self.schedule(next),
                None => {
                    self.keys.remove(&key);
                }
            }
        }
    }

    /// Starts what the concurrency limits and rates allow; returns when a rate next allows
    /// a start that is waiting.
    pub(super) fn start_ready(&mut self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let mut wake: Option<tokio::time::Instant> = None;
        // Nodes sharing a store share each rate: each spaces its starts by their number.
        let share = self.bus.rate_share();
        for t in 0..self.ready.len() {
            let policy = &self.router.triggers[t].policy;
            let (limit, spacing) = (policy.concurrency, policy.spacing.map(|s| s * share));
            while self.running[t] < limit && !self.ready[t].is_empty() {
                if let Some(spacing) = spacing {
                    let next = self.next_start[t].unwrap_or(now);
                    if next > now {
                        wake = Some(wake.map_or(next, |w| w.min(next)));
                        break;
                    }
                    // Lateness of up to one timer tick is made up (so rates above 1000/s
                    // hold), never more: an idle trigger does not save up a burst.
                    let floor = now.checked_sub(RATE_SLACK).unwrap_or(now);
                    self.next_start[t] = Some(next.max(floor) + spacing);
                }
                let job = self.ready[t].pop_front().expect("not empty");
                self.running[t] += 1;
                let router = self.router.clone();
                let bus = self.bus.clone();
                let ctx = self.ctx.clone();
                let task = self
                    .tasks
                    .spawn(attempt(router, bus, ctx, self.clock, job.clone()));
                self.in_flight.insert(task.id(), (job, self.clock.now_ms()));
            }
        }
        self.metrics.queue_depth.set(self.held.len() as i64);
        wake
    }

    /// Moves the jobs whose timers are due to their triggers' ready queues.
    pub(super) fn fire_timers(&mut self) {
        let now = self.clock.now_ms();
        while self.timers.peek().is_some_and(|Reverse(t)| t.0 <= now) {
            let Reverse(Timed(_, _, job)) = self.timers.pop().expect("peeked");
            self.ready[job.trigger].push_back(job);
        }
    }

    /// When the next timer is due: a retry held in memory or one waiting in the store.
    pub(super) fn next_timer(&self) -> Option<i64> {
        self.timers
            .peek()
            .map(|Reverse(t)| t.0)
            .into_iter()
            .chain(self.parked_due)
            .min()
    }
}
