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

pub mod approval;
pub mod attempt;
mod backlog;
mod clock;
mod drain;
mod retry;
mod schedule;
#[cfg(test)]
mod tests;

pub(crate) use approval::gate as approval_gate;
pub use approval::APPROVAL_REQUESTED;
pub use backlog::PARK_RETRY_AFTER;
pub use clock::Clock;
pub use retry::RetrySchedule;

use crate::actions::ActionContext;
use crate::router::Router;
use crate::store::{AttemptRecord, Bus, OpenDelivery, State, StoreError};
use crate::telemetry::Metrics;
use attempt::Done;
use backlog::Backlog;
use cloudevents::Event;
use drain::unfinished;
use retry::decide;
use schedule::Timed;
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
    /// The last attempt's record when it failed: the vCenter task it left running, a
    /// workflow's steps done, for the next attempt.
    pub last_error: Option<String>,
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
            last_error: d.last_error,
        })
    }
}

/// How a job reaches the dispatcher.
#[derive(Debug)]
pub enum Admission {
    /// Just ingested: its id is newer than any delivery read back from the store.
    Ingested(Job),
    /// Deliveries were made pending again in the store (replay): read them back from there,
    /// so that a replay is run once even if a pass already found it.
    Rescan,
}

/// The dispatcher; see the module doc.
pub struct Dispatcher {
    /// Every time the dispatcher reads or waits for.
    clock: Clock,
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
            clock: Clock::System,
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

    /// Runs on `clock` instead of the system's (tests use [`Clock::tokio`] on paused time).
    pub fn with_clock(mut self, clock: Clock) -> Dispatcher {
        self.clock = clock;
        self
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

    async fn complete(&mut self, done: Done) {
        let Done {
            mut job,
            record,
            error,
            claimed,
            decided,
            recorded,
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
        job.last_error = (record.outcome != "succeeded").then(|| record.detail.clone());
        let (state, next_at) =
            decided.unwrap_or_else(|| decide(&trigger.policy, self.clock, &job, record.n, &error));
        if state == State::Succeeded {
            self.metrics.delivery_latency(
                &trigger.name,
                (self.clock.now_ms() - job.received_at).max(0) as f64 / 1000.0,
            );
        }
        self.metrics.delivery(&trigger.name, state.as_str());
        match (&error, state) {
            (Some(e), _) if e.waiting_until.is_some() => {
                tracing::info!(trigger = %trigger.name, delivery = job.id, detail = %e.message, "the delivery waits for an approval")
            }
            (Some(e), State::Dead) => {
                tracing::warn!(trigger = %trigger.name, delivery = job.id, attempts = job.attempts, error = %e.message, "delivery dead-lettered")
            }
            (Some(e), _) => {
                tracing::info!(trigger = %trigger.name, delivery = job.id, attempt = job.attempts, error = %e.message, "attempt failed; will retry")
            }
            _ => tracing::debug!(trigger = %trigger.name, delivery = job.id, "delivered"),
        }
        if !recorded {
            self.record(job.id, record, state, next_at).await;
        }
        if state == State::Retrying {
            job.not_before = next_at;
            self.schedule(job);
        } else {
            self.held.remove(&job.id);
            self.release_key(&job);
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
            let next_timer = self.next_timer();
            let clock = self.clock;
            let sleep = async {
                match next_timer {
                    Some(t) => clock.sleep_until_ms(t).await,
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
                                self.complete(unfinished(job, started, self.clock.now_ms(), "failed", why)).await;
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
                _ = sleep => self.fire_timers(),
            }
        }
        self.drain(drain).await;
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

/// An attempt's record that the store could not take yet; written again until it does.
struct Unrecorded {
    id: i64,
    record: AttemptRecord,
    state: State,
    next_at: Option<i64>,
}

pub(crate) fn log_unrecorded(id: i64, e: &StoreError, waiting: usize) {
    tracing::error!(delivery = id, waiting, error = %e, "cannot record an attempt; it is kept and written again once the store answers");
}

/// What one attempt run outside the dispatcher did (the AMQP bus's consumers).
pub(crate) struct Settled {
    /// The store gave the delivery to this node; `false`: nothing ran.
    pub(crate) claimed: bool,
    /// The delivery's new state and next attempt's time.
    pub(crate) state: State,
    pub(crate) next_at: Option<i64>,
    /// The attempt's record (its number is the delivery's attempt count now).
    pub(crate) record: AttemptRecord,
    /// The store took the record; `false`: write it again before letting the delivery go.
    pub(crate) recorded: bool,
}

/// Claims `job` on `bus` and runs one attempt of it, recorded on `bus`, with the metrics and
/// logs of the dispatcher.
pub(crate) async fn attempt_once(
    router: Arc<Router>,
    bus: Arc<dyn Bus>,
    ctx: ActionContext,
    metrics: &Metrics,
    job: Job,
) -> Settled {
    let clock = Clock::System;
    let received_at = job.received_at;
    let done = attempt::attempt(router.clone(), bus, ctx, clock, job).await;
    let (state, next_at) = done.decided.unwrap_or((State::Pending, None));
    if done.claimed {
        let trigger = &router.triggers[done.job.trigger];
        if state == State::Succeeded {
            metrics.delivery_latency(
                &trigger.name,
                (clock.now_ms() - received_at).max(0) as f64 / 1000.0,
            );
        }
        metrics.delivery(&trigger.name, state.as_str());
        match (&done.error, state) {
            (Some(e), State::Dead) => {
                tracing::warn!(trigger = %trigger.name, delivery = done.job.id, attempts = done.record.n, error = %e.message, "delivery dead-lettered")
            }
            (Some(e), _) => {
                tracing::info!(trigger = %trigger.name, delivery = done.job.id, attempt = done.record.n, error = %e.message, "attempt failed; will retry")
            }
            _ => tracing::debug!(trigger = %trigger.name, delivery = done.job.id, "delivered"),
        }
    }
    Settled {
        claimed: done.claimed,
        state,
        next_at,
        record: done.record,
        recorded: done.recorded,
    }
}

/// The triggers paused now (by a guard rail or an operator), as this node knows them: read
/// from the store every second, and changed at once by this node's own pauses and resumes.
/// Also the changes `deliveries.blast_radius` counts that run now on this node.
#[derive(Clone, Default)]
pub struct Pauses {
    paused: Arc<std::sync::RwLock<HashSet<String>>>,
    /// One look at the global count at a time, so that two attempts cannot both take the
    /// last change left.
    checking: Arc<tokio::sync::Mutex<()>>,
    /// Counted changes running now (not yet in the store's count).
    in_flight: Arc<std::sync::atomic::AtomicU64>,
}

/// A paused scope of a vCenter: changes by `vsphere.*` actions to what is in it are held
/// until the pause is lifted (they run then) or discarded (they end dead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The vCenter, by its name under `vcenters:`.
    pub vcenter: String,
    /// `cluster`, `folder`, `tag` (`CATEGORY/TAG` or `TAG`) or `resource_pool`.
    pub kind: String,
    /// The cluster's, folder's, tag's or pool's name.
    pub name: String,
}

/// What a scope can be.
pub const SCOPE_KINDS: [&str; 4] = ["cluster", "folder", "tag", "resource_pool"];

impl Scope {
    /// The name its pause is stored under: `scope:VCENTER:KIND:NAME`.
    pub fn key(&self) -> String {
        format!("scope:{}:{}:{}", self.vcenter, self.kind, self.name)
    }

    /// The scope a pause's name stands for, if it is one.
    pub fn parse(key: &str) -> Option<Scope> {
        let mut parts = key.strip_prefix("scope:")?.splitn(3, ':');
        let (vcenter, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
        (!vcenter.is_empty() && SCOPE_KINDS.contains(&kind) && !name.is_empty()).then(|| Scope {
            vcenter: vcenter.into(),
            kind: kind.into(),
            name: name.into(),
        })
    }
}

impl Pauses {
    /// The paused scopes of vCenter `vcenter`.
    pub fn scopes(&self, vcenter: &str) -> Vec<Scope> {
        self.paused
            .read()
            .map(|p| {
                p.iter()
                    .filter_map(|k| Scope::parse(k))
                    .filter(|s| s.vcenter == vcenter)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `trigger` is paused.
    pub fn is_paused(&self, trigger: &str) -> bool {
        self.paused
            .read()
            .map(|p| !p.is_empty() && p.contains(trigger))
            .unwrap_or(false)
    }
    /// Replaces the set (from the store).
    pub fn set(&self, triggers: impl IntoIterator<Item = String>) {
        if let Ok(mut p) = self.paused.write() {
            *p = triggers.into_iter().collect();
        }
    }
    /// Marks `trigger` paused (`true`) or not.
    pub fn mark(&self, trigger: &str, paused: bool) {
        if let Ok(mut p) = self.paused.write() {
            if paused {
                p.insert(trigger.to_string());
            } else {
                p.remove(trigger);
            }
        }
    }
}
