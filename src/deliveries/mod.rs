//! Deliveries: the dispatcher runs each (event, trigger) match as attempts, with the
//! trigger's concurrency limit, ordering key, timeout and retry schedule, and records every
//! attempt. Nothing is dropped: a delivery ends succeeded, dead (replayable) or throttled.
//!
//! Memory is bounded: at most `store.deliveries_in_memory` open deliveries are held. Past
//! that, the rest wait in the store (where they already are) and are read back in id order
//! as room frees up, so a slow action or a long outage cannot exhaust memory. A retry due
//! more than [`PARK_RETRY_AFTER`] ahead waits in the store too (unless an ordering key must
//! hold its place), and so does a start that a trigger's rate puts off that far (or past
//! half the memory), so that one failing or rate-limited target does not fill memory and
//! starve the rest.

use crate::actions::{ActionContext, ActionError};
use crate::router::Router;
use crate::store::{now_ms, AttemptRecord, Bus, OpenDelivery, State, StoreError};
use crate::telemetry::Metrics;
use cloudevents::Event;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A delivery the dispatcher holds.
#[derive(Debug, Clone)]
pub struct Job {
    /// Delivery id.
    pub id: i64,
    /// Trigger index in the router.
    pub trigger: usize,
    /// The event.
    pub event: Arc<Event>,
    /// Attempts made (all time).
    pub attempts: u32,
    /// Attempts before the last replay.
    pub attempt_base: u32,
    /// Ordering key.
    pub ordering_key: Option<String>,
    /// When the event arrived (ms since the epoch).
    pub received_at: i64,
    /// Not to be attempted before this time (ms since the epoch).
    pub not_before: Option<i64>,
}

impl Job {
    /// A job from a stored open delivery; an error (why it cannot run) when its trigger is
    /// gone or its event unreadable.
    pub fn from_open(d: OpenDelivery, router: &Router) -> Result<Job, String> {
        let Some(trigger) = router.position(&d.trigger) else {
            return Err(format!("trigger `{}` is no longer configured", d.trigger));
        };
        let event = crate::event::from_json(&d.event_body)
            .map_err(|e| format!("stored event is unreadable: {e}"))?;
        Ok(Job {
            id: d.id,
            trigger,
            event: Arc::new(event),
            attempts: d.attempts,
            attempt_base: d.attempt_base,
            ordering_key: d.ordering_key,
            received_at: d.received_at,
            not_before: d.next_at,
        })
    }
}

/// How late a rate-limited start may be made up for (about two timer ticks).
const RATE_SLACK: Duration = Duration::from_millis(2);

/// Retries due further ahead than this (ms) wait in the store rather than in memory.
pub const PARK_RETRY_AFTER: i64 = 2_000;

/// How a job reaches the dispatcher.
#[derive(Debug)]
pub enum Admission {
    /// Just ingested: its id is newer than any delivery read back from the store.
    Ingested(Job),
    /// Deliveries were made pending again in the store (replay): read them back from there,
    /// so that a replay is run once even if a pass already found it.
    Rescan,
}

/// Open deliveries may be waiting in the store, not in memory: they are read back in passes
/// over the ids.
struct Backlog {
    /// Last id read in this pass.
    cursor: i64,
    /// A delivery at or below the cursor was left in the store: another pass is needed.
    behind: bool,
}

struct Timed(i64, u64, Job);
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

struct Done {
    job: Job,
    record: AttemptRecord,
    error: Option<ActionError>,
    /// The bus gave the delivery to this process; `false`: nothing ran (another node has
    /// it, an earlier delivery of its ordering key is open, or the store was unreachable).
    claimed: bool,
}

/// An attempt's record that the store could not take yet; written again until it does.
struct Unrecorded {
    id: i64,
    record: AttemptRecord,
    state: State,
    next_at: Option<i64>,
}

/// The dispatcher; see the module doc.
pub struct Dispatcher {
    router: Arc<Router>,
    bus: Arc<dyn Bus>,
    ctx: ActionContext,
    metrics: Arc<Metrics>,
    rx: mpsc::UnboundedReceiver<Admission>,
    /// Other nodes consume the same bus: a claim decides who runs a delivery, and passes
    /// over the store look for what they left.
    shared: Option<Duration>,
    /// Attempt records the store refused (it was unreachable), oldest first.
    unrecorded: VecDeque<Unrecorded>,
    ready: Vec<VecDeque<Job>>,
    running: Vec<usize>,
    /// Per trigger with a rate: the earliest time the next attempt may start.
    next_start: Vec<Option<tokio::time::Instant>>,
    keys: HashMap<(usize, String), VecDeque<Job>>,
    timers: BinaryHeap<Reverse<Timed>>,
    timer_seq: u64,
    tasks: JoinSet<Done>,
    /// The job of each running attempt task, and when it started (ms since the epoch): a
    /// task that panics or is abandoned at shutdown still gets its attempt recorded.
    in_flight: HashMap<tokio::task::Id, (Job, i64)>,
    held: HashSet<i64>,
    max_held: usize,
    backlog: Option<Backlog>,
    /// Highest id read back from the store; an ingested job at or below it is held already.
    max_read: i64,
    /// When the earliest retry waiting in the store is due (ms since the epoch).
    parked_due: Option<i64>,
    /// More due retries wait in the store than there was room for.
    parked_left: bool,
    /// Starts put off by a rate, to record in the store.
    deferred: Vec<(i64, i64)>,
}

impl Dispatcher {
    /// Creates a dispatcher fed by `rx` that holds at most `max_held` deliveries. It starts
    /// by reading back what a previous run left open (pending, retrying, interrupted).
    pub fn new(
        router: Arc<Router>,
        bus: Arc<dyn Bus>,
        ctx: ActionContext,
        metrics: Arc<Metrics>,
        rx: mpsc::UnboundedReceiver<Admission>,
        max_held: usize,
    ) -> Dispatcher {
        let n = router.triggers.len();
        Dispatcher {
            router,
            shared: bus.poll_interval(),
            bus,
            ctx,
            metrics,
            rx,
            unrecorded: VecDeque::new(),
            ready: (0..n).map(|_| VecDeque::new()).collect(),
            running: vec![0; n],
            next_start: vec![None; n],
            keys: HashMap::new(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            held: HashSet::new(),
            max_held: max_held.max(1),
            backlog: Some(Backlog {
                cursor: 0,
                behind: false,
            }),
            max_read: 0,
            parked_due: None,
            parked_left: false,
            deferred: Vec::new(),
        }
    }

    /// Takes a job from ingest, or leaves it in the store when memory is full; a rescan
    /// starts a pass over the store (or asks the current one for another).
    fn admit(&mut self, admission: Admission) {
        let job = match admission {
            Admission::Ingested(job) => job,
            Admission::Rescan => {
                match &mut self.backlog {
                    Some(b) => b.behind = true,
                    None => {
                        self.backlog = Some(Backlog {
                            cursor: 0,
                            behind: false,
                        })
                    }
                }
                return;
            }
        };
        // Read back from the store already? With a shared bus the claim tells instead.
        if self.held.contains(&job.id) || (self.shared.is_none() && job.id <= self.max_read) {
            return;
        }
        if self.backlog.is_none() && self.held.len() >= self.max_held {
            tracing::warn!(
                held = self.held.len(),
                "more open deliveries than store.deliveries_in_memory; the rest wait in the store"
            );
            self.backlog = Some(Backlog {
                cursor: 0,
                behind: false,
            });
        }
        if let Some(b) = &mut self.backlog {
            b.behind |= job.id <= b.cursor;
            return;
        }
        self.hold(job);
    }

    fn hold(&mut self, job: Job) {
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

    fn schedule(&mut self, job: Job) {
        let now = now_ms();
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
    fn enqueue(&mut self, job: Job) {
        let t = job.trigger;
        if let (Some(spacing), None) = (self.router.triggers[t].policy.spacing, &job.ordering_key) {
            let now = tokio::time::Instant::now();
            let first = self.next_start[t].unwrap_or(now).max(now);
            let queued = u32::try_from(self.ready[t].len()).unwrap_or(u32::MAX);
            let wait = (first - now).saturating_add(spacing.saturating_mul(queued));
            let park = Duration::from_millis(PARK_RETRY_AFTER as u64);
            if wait > park || self.ready[t].len() >= self.max_held / 2 {
                let at = now_ms() + wait.as_millis().min(i64::MAX as u128) as i64;
                self.held.remove(&job.id);
                self.deferred.push((job.id, at));
                self.parked_due = Some(self.parked_due.map_or(at, |d| d.min(at)));
                return;
            }
        }
        self.ready[t].push_back(job);
    }

    /// Sends the put-off starts to the store (before any read of it, which flushes first).
    async fn send_deferred(&mut self) {
        for (id, at) in std::mem::take(&mut self.deferred) {
            // Not recorded: the delivery is due at once in the store, which only runs it
            // earlier than the rate wanted after a restart.
            if let Err(e) = self.bus.defer(id, at).await {
                tracing::warn!(delivery = id, error = %e, "cannot record a start put off by the trigger's rate");
            }
        }
    }

    fn release_key(&mut self, job: &Job) {
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
    fn start_ready(&mut self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let mut wake: Option<tokio::time::Instant> = None;
        for t in 0..self.ready.len() {
            let policy = &self.router.triggers[t].policy;
            let (limit, spacing) = (policy.concurrency, policy.spacing);
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
                let task = self.tasks.spawn(attempt(router, bus, ctx, job.clone()));
                self.in_flight.insert(task.id(), (job, now_ms()));
            }
        }
        self.metrics.queue_depth.set(self.held.len() as i64);
        wake
    }

    async fn complete(&mut self, done: Done) {
        let Done {
            mut job,
            record,
            error,
            claimed,
        } = done;
        self.running[job.trigger] -= 1;
        if !claimed {
            // It stays open in the store for whoever may run it (a pass finds it again).
            self.held.remove(&job.id);
            self.release_key(&job);
            return;
        }
        let trigger = &self.router.triggers[job.trigger];
        job.attempts = record.n;
        let state = next_state(
            &error,
            job.attempts - job.attempt_base,
            trigger.policy.max_attempts,
        );
        let next_at = match state {
            State::Succeeded => {
                self.metrics.delivery_latency(
                    &trigger.name,
                    (now_ms() - job.received_at).max(0) as f64 / 1000.0,
                );
                None
            }
            State::Retrying => {
                let delay = trigger
                    .policy
                    .retry_delay(job.attempts - job.attempt_base + 1);
                Some(now_ms() + delay.as_millis() as i64)
            }
            _ => None,
        };
        self.metrics.delivery(&trigger.name, state.as_str());
        match (&error, state) {
            (Some(e), State::Dead) => {
                tracing::warn!(trigger = %trigger.name, delivery = job.id, attempts = job.attempts, error = %e.message, "delivery dead-lettered")
            }
            (Some(e), _) => {
                tracing::info!(trigger = %trigger.name, delivery = job.id, attempt = job.attempts, error = %e.message, "attempt failed; will retry")
            }
            _ => tracing::debug!(trigger = %trigger.name, delivery = job.id, "delivered"),
        }
        self.record(job.id, record, state, next_at).await;
        if state == State::Retrying {
            job.not_before = next_at;
            self.schedule(job);
        } else {
            self.held.remove(&job.id);
            self.release_key(&job);
        }
    }

    /// Reads back what waits in the store, while there is room: due retries, then open
    /// deliveries a pass at a time.
    async fn refill(&mut self) {
        if !self.record_unrecorded().await {
            return; // the store is unreachable: reading from it would fail too
        }
        self.send_deferred().await;
        self.read_due_retries().await;
        while self.backlog.is_some() {
            let room = self.max_held.saturating_sub(self.held.len());
            if room < (self.max_held / 10).max(1) {
                return;
            }
            let cursor = self.backlog.as_ref().map_or(0, |b| b.cursor);
            // Attempts finished before now must be committed, or they would read as open.
            self.bus.flush().await;
            let due_by = now_ms() + PARK_RETRY_AFTER;
            let open = match self.bus.open_deliveries(cursor, room, due_by).await {
                Ok(open) => open,
                Err(e) => {
                    tracing::error!(error = %e, "reading open deliveries back from the store; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return;
                }
            };
            let end_of_pass = open.len() < room;
            let mut cursor = cursor;
            let before = self.held.len();
            for d in open {
                cursor = d.id;
                self.max_read = self.max_read.max(d.id);
                self.take_back(d).await;
            }
            let read = self.held.len() - before;
            if read > 0 {
                tracing::info!(read, "open deliveries read back from the store");
            }
            let b = self.backlog.as_mut().expect("the loop checks it");
            b.cursor = cursor;
            if end_of_pass {
                // The pass skipped later retries: learn when the first is due.
                self.parked_left = true;
                if b.behind {
                    *b = Backlog {
                        cursor: 0,
                        behind: false,
                    };
                } else {
                    self.backlog = None;
                }
            }
            if read > 0 {
                return; // start these; the next turn of the loop reads on
            }
        }
    }

    /// Reads back the retries that waited in the store and are now due.
    async fn read_due_retries(&mut self) {
        let now = now_ms();
        if !(self.parked_left || self.parked_due.is_some_and(|t| t <= now)) {
            return;
        }
        let room = self.max_held.saturating_sub(self.held.len());
        if room == 0 {
            // Read them once room frees up (a completion wakes the loop).
            self.parked_left = true;
            self.parked_due = None;
            return;
        }
        self.bus.flush().await;
        // Held retries can be among the due ones: ask for enough to see past them.
        let due = match self.bus.due_deliveries(now, room + self.held.len()).await {
            Ok(due) => due,
            Err(e) => {
                tracing::error!(error = %e, "reading due retries back from the store; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            }
        };
        let before = self.held.len();
        for d in due {
            if self.held.len() >= self.max_held {
                break;
            }
            self.take_back(d).await;
        }
        self.parked_left = self.held.len() - before == room;
        // Starts put off just now are not in the store yet: they count too.
        let local = self.deferred.iter().map(|d| d.1).min();
        let stored = match self.bus.next_due_after(now).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "reading the next retry time from the store");
                Some(now + 1000)
            }
        };
        self.parked_due = stored.into_iter().chain(local).min();
    }

    /// Holds a delivery read from the store, unless held already or no longer runnable.
    async fn take_back(&mut self, d: OpenDelivery) {
        if self.held.contains(&d.id) {
            return;
        }
        let (id, attempts) = (d.id, d.attempts);
        match Job::from_open(d, &self.router) {
            Ok(job) => self.hold(job),
            Err(why) => {
                tracing::warn!(delivery = id, "{why}; dead-lettered");
                let rec = AttemptRecord {
                    n: attempts + 1,
                    started_at: now_ms(),
                    duration_ms: 0,
                    outcome: "failed".into(),
                    detail: why,
                };
                self.record(id, rec, State::Dead, None).await;
            }
        }
    }

    /// Reads back what a previous run left open, as far as memory allows; call before
    /// [`Dispatcher::run`] so that readiness means recovery is done.
    pub async fn recover(&mut self) {
        self.refill().await;
    }

    /// Runs until `shutdown`, then drains: running attempts get `drain` to finish; those
    /// still running are abandoned and stay pending in the store for the next start.
    pub async fn run(mut self, shutdown: CancellationToken, drain: Duration) {
        loop {
            self.refill().await;
            let rate_wake = self.start_ready();
            self.send_deferred().await;
            let next_timer = self
                .timers
                .peek()
                .map(|Reverse(t)| t.0)
                .into_iter()
                .chain(self.parked_due)
                .min();
            let sleep = async {
                match next_timer {
                    Some(t) => {
                        tokio::time::sleep(Duration::from_millis((t - now_ms()).max(0) as u64))
                            .await
                    }
                    None => std::future::pending().await,
                }
            };
            let rate_sleep = async {
                match rate_wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // A shared bus is read now and then for what other nodes left; records the
            // store refused are written again.
            let poll_every = match (self.shared, self.unrecorded.is_empty()) {
                (Some(every), _) => Some(every),
                (None, false) => Some(Duration::from_secs(1)),
                (None, true) => None,
            };
            let poll = async {
                match poll_every {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = rate_sleep => {}
                _ = poll => {
                    if self.shared.is_some() {
                        self.admit(Admission::Rescan);
                        self.parked_left = true;
                    }
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    match joined {
                        Ok((task, done)) => {
                            self.in_flight.remove(&task);
                            self.complete(done).await;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "a delivery attempt task failed");
                            if let Some((job, started)) = self.in_flight.remove(&e.id()) {
                                let why = format!("the attempt stopped unexpectedly ({e}); it will be retried");
                                self.complete(unfinished(job, started, "failed", why)).await;
                            }
                        }
                    }
                }
                admission = self.rx.recv() => match admission {
                    Some(a) => {
                        self.admit(a);
                        while let Ok(a) = self.rx.try_recv() {
                            self.admit(a);
                        }
                    }
                    None => break,
                },
                _ = sleep => {
                    let now = now_ms();
                    while self.timers.peek().is_some_and(|Reverse(t)| t.0 <= now) {
                        let Reverse(Timed(_, _, job)) = self.timers.pop().expect("peeked");
                        self.ready[job.trigger].push_back(job);
                    }
                }
            }
        }
        let in_flight = self.tasks.len();
        if in_flight > 0 {
            tracing::info!(in_flight, "draining deliveries");
        }
        let deadline = tokio::time::Instant::now() + drain;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(Ok((task, done)))) => {
                    self.in_flight.remove(&task);
                    self.record_drained(done).await;
                }
                Ok(Some(Err(e))) => {
                    if let Some((job, started)) = self.in_flight.remove(&e.id()) {
                        let why =
                            format!("the attempt stopped unexpectedly ({e}); it will be retried");
                        self.record_drained(unfinished(job, started, "failed", why))
                            .await;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        abandoned = self.tasks.len(),
                        "drain timeout; the attempts still running are recorded as interrupted and run again at the next start"
                    );
                    for (_, (job, started)) in std::mem::take(&mut self.in_flight) {
                        let why = format!(
                            "interrupted: reflex stopped or reloaded while the attempt ran (still running after {drain:?}); it will be retried"
                        );
                        self.record_drained(unfinished(job, started, "interrupted", why))
                            .await;
                    }
                    self.tasks.abort_all();
                    // Let the aborted tasks go before the last flush: none may write after it.
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        if !self.record_unrecorded().await {
            tracing::error!(
                left = self.unrecorded.len(),
                "stopping with attempt records the store refused; those deliveries run again at the next start"
            );
        }
        self.bus.flush().await;
    }
}

impl Dispatcher {
    /// Records an attempt that finished (or was cut off) while draining; a retry is left,
    /// with its backoff, for the next start.
    async fn record_drained(&mut self, done: Done) {
        let Done {
            job,
            record,
            error,
            claimed,
        } = done;
        self.running[job.trigger] -= 1;
        if !claimed {
            return;
        }
        let policy = &self.router.triggers[job.trigger].policy;
        let in_budget = record.n - job.attempt_base;
        let state = next_state(&error, in_budget, policy.max_attempts);
        let next_at = (state == State::Retrying)
            .then(|| now_ms() + policy.retry_delay(in_budget + 1).as_millis() as i64);
        self.record(job.id, record, state, next_at).await;
    }

    /// Records an attempt; one the store refuses is kept and written again later.
    async fn record(&mut self, id: i64, record: AttemptRecord, state: State, next_at: Option<i64>) {
        self.unrecorded.push_back(Unrecorded {
            id,
            record,
            state,
            next_at,
        });
        self.record_unrecorded().await;
    }

    /// Writes the records kept back, oldest first; `false` while the store refuses them.
    async fn record_unrecorded(&mut self) -> bool {
        while let Some(u) = self.unrecorded.pop_front() {
            let result = self
                .bus
                .finish_attempt(u.id, u.record.clone(), u.state, u.next_at)
                .await;
            if let Err(e) = result {
                log_unrecorded(u.id, &e, self.unrecorded.len() + 1);
                self.unrecorded.push_front(u);
                return false;
            }
        }
        true
    }
}

fn log_unrecorded(id: i64, e: &StoreError, waiting: usize) {
    tracing::error!(delivery = id, waiting, error = %e, "cannot record an attempt; it is kept and written again once the store answers");
}

/// The record of an attempt whose task did not return (it panicked, or was abandoned).
fn unfinished(job: Job, started_at: i64, outcome: &str, detail: String) -> Done {
    Done {
        record: AttemptRecord {
            n: job.attempts + 1,
            started_at,
            duration_ms: (now_ms() - started_at).max(0),
            outcome: outcome.into(),
            detail: detail.clone(),
        },
        job,
        error: Some(ActionError::transient(detail)),
        claimed: true,
    }
}

/// The state after an attempt: succeeded, dead (permanent error or out of attempts since
/// the last replay), or retrying.
fn next_state(error: &Option<ActionError>, attempts_in_budget: u32, max_attempts: u32) -> State {
    match error {
        None => State::Succeeded,
        Some(e) if e.permanent => State::Dead,
        Some(_) if attempts_in_budget >= max_attempts => State::Dead,
        Some(_) => State::Retrying,
    }
}

async fn attempt(router: Arc<Router>, bus: Arc<dyn Bus>, ctx: ActionContext, job: Job) -> Done {
    let trigger = &router.triggers[job.trigger];
    let started_at = now_ms();
    let claimed = match bus.claim(job.id).await {
        Ok(claimed) => claimed,
        Err(e) => {
            tracing::warn!(delivery = job.id, error = %e, "cannot claim the delivery; it stays open in the store");
            false
        }
    };
    if !claimed {
        return Done {
            record: AttemptRecord {
                n: job.attempts,
                started_at,
                duration_ms: 0,
                outcome: String::new(),
                detail: String::new(),
            },
            job,
            error: None,
            claimed: false,
        };
    }
    let clock = std::time::Instant::now();
    let n = job.attempts + 1;
    let result = tokio::time::timeout(
        trigger.policy.timeout,
        trigger.action.execute(&job.event, &ctx),
    )
    .await;
    let duration_ms = clock.elapsed().as_millis() as i64;
    let (outcome, detail, error) = match result {
        Ok(Ok(o)) => ("succeeded", o.detail, None),
        Ok(Err(e)) => ("failed", e.message.clone(), Some(e)),
        Err(_) => {
            let msg = format!(
                "attempt timed out after {:?} ({} action)",
                trigger.policy.timeout,
                trigger.action.kind()
            );
            ("timeout", msg.clone(), Some(ActionError::transient(msg)))
        }
    };
    Done {
        record: AttemptRecord {
            n,
            started_at,
            duration_ms,
            outcome: outcome.into(),
            detail,
        },
        job,
        error,
        claimed: true,
    }
}
