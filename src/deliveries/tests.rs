//! The dispatcher's timing on tokio's paused time: retries follow the schedule to the
//! millisecond, `Retry-After` and the 429 floor hold, a rate spaces starts, and the drain
//! records what it cuts off. The bus is kept in memory so that nothing but the dispatcher's
//! own timers moves the clock; the suite in `tests/` runs the same paths on the real stores.

use super::{Admission, Clock, Dispatcher, Job};
use crate::actions::scripted::{Scripted, Step};
use crate::actions::{Action, ActionContext, ActionError};
use crate::store::{AttemptRecord, Bus, OpenDelivery, State, StoreError};
use async_trait::async_trait;
use cloudevents::{EventBuilder, EventBuilderV10};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

struct Row {
    open: OpenDelivery,
    state: State,
    history: Vec<(AttemptRecord, State)>,
}

/// A bus in memory with the store-backed bus's semantics (one consumer).
#[derive(Default)]
struct MemoryBus {
    rows: Mutex<BTreeMap<i64, Row>>,
}

impl MemoryBus {
    fn add(&self, job: &Job, trigger: &str) {
        let open = OpenDelivery {
            id: job.id,
            trigger: trigger.into(),
            ordering_key: job.ordering_key.clone(),
            attempts: 0,
            attempt_base: 0,
            next_at: None,
            event_body: crate::event::to_json(&job.event),
            received_at: job.received_at,
            last_error: None,
        };
        let row = Row {
            open,
            state: State::Pending,
            history: Vec::new(),
        };
        self.rows.lock().unwrap().insert(job.id, row);
    }

    fn history(&self, id: i64) -> Vec<(AttemptRecord, State)> {
        self.rows.lock().unwrap()[&id].history.clone()
    }

    fn is_open(r: &Row) -> bool {
        matches!(r.state, State::Pending | State::Retrying | State::Running)
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn claim(&self, id: i64) -> Result<bool, StoreError> {
        let mut rows = self.rows.lock().unwrap();
        let r = rows.get_mut(&id).expect("known delivery");
        let ok = matches!(r.state, State::Pending | State::Retrying);
        if ok {
            r.state = State::Running;
        }
        Ok(ok)
    }
    async fn defer(&self, id: i64, at: i64) -> Result<(), StoreError> {
        self.rows.lock().unwrap().get_mut(&id).unwrap().open.next_at = Some(at);
        Ok(())
    }
    async fn finish_attempt(
        &self,
        id: i64,
        attempt: AttemptRecord,
        state: State,
        next_at: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut rows = self.rows.lock().unwrap();
        let r = rows.get_mut(&id).unwrap();
        r.open.attempts = attempt.n;
        r.open.next_at = next_at;
        r.state = state;
        r.history.push((attempt, state));
        Ok(())
    }
    async fn replay(&self, id: i64) -> Result<OpenDelivery, StoreError> {
        Err(StoreError::NotFound(format!(
            "delivery {id}: replay is not part of these tests"
        )))
    }
    async fn wake(&self, id: i64) -> Result<Option<OpenDelivery>, StoreError> {
        Err(StoreError::NotFound(format!(
            "delivery {id}: approvals are not part of these tests"
        )))
    }
    async fn open_deliveries(
        &self,
        after: i64,
        limit: usize,
        due_by: i64,
    ) -> Result<Vec<OpenDelivery>, StoreError> {
        let rows = self.rows.lock().unwrap();
        Ok(rows
            .range(after + 1..)
            .map(|(_, r)| r)
            .filter(|r| Self::is_open(r))
            .filter(|r| {
                r.state == State::Pending
                    || r.open.ordering_key.is_some()
                    || r.open.next_at.is_none_or(|t| t <= due_by)
            })
            .take(limit)
            .map(|r| r.open.clone())
            .collect())
    }
    async fn due_deliveries(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<OpenDelivery>, StoreError> {
        let rows = self.rows.lock().unwrap();
        let mut due: Vec<OpenDelivery> = rows
            .values()
            .filter(|r| Self::is_open(r) && r.open.next_at.is_some_and(|t| t <= now))
            .map(|r| r.open.clone())
            .collect();
        due.sort_by_key(|d| d.next_at);
        due.truncate(limit);
        Ok(due)
    }
    async fn next_due_after(&self, now: i64) -> Result<Option<i64>, StoreError> {
        let rows = self.rows.lock().unwrap();
        Ok(rows
            .values()
            .filter(|r| Self::is_open(r))
            .filter_map(|r| r.open.next_at)
            .filter(|t| *t > now)
            .min())
    }
    async fn flush(&self) {}
    fn poll_interval(&self) -> Option<Duration> {
        None
    }
}

/// A dispatcher on paused time with one trigger whose `delivery:` is `delivery` and whose
/// action answers from `script`.
struct Harness {
    bus: Arc<MemoryBus>,
    tx: mpsc::UnboundedSender<Admission>,
    started: mpsc::UnboundedReceiver<(String, Instant)>,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<()>,
    clock: Clock,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn start(delivery: &str, script: Vec<Step>, drain: Duration) -> Harness {
        let yaml = format!(
            "triggers:\n  - name: t\n    filters: [{{exact: {{type: x}}}}]\n    action: {{type: emit, event_type: out}}\n    delivery: {delivery}\n"
        );
        let cfg = crate::config::parse("t.yaml", &yaml).unwrap();
        let mut diags = crate::config::Diagnostics::default();
        let mut router = crate::router::Router::build(&cfg, &mut diags);
        assert!(diags.0.is_empty(), "{:?}", diags.0);
        let (action, started) = Scripted::new(script);
        router.triggers[0].action = Action::Scripted(action);
        let router = Arc::new(router);
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(
            &dir.path().join("t.db"),
            crate::store::DedupLimits::window(Duration::from_secs(3600)),
        )
        .unwrap();
        let metrics = Arc::new(crate::telemetry::Metrics::new());
        let (tx, rx) = mpsc::unbounded_channel();
        let ingest = crate::ingest::Ingest::new(
            Arc::new(store),
            router.clone(),
            metrics.clone(),
            16,
            tx.clone(),
            None,
        );
        let ctx = ActionContext {
            pauses: Default::default(),
            client: reqwest::Client::new(),
            ingest,
            secrets: Arc::new(serde_json::json!({})),
            vcenters: Default::default(),
            budget_locks: Default::default(),
        };
        let bus = Arc::new(MemoryBus::default());
        let clock = Clock::tokio();
        let dispatcher =
            Dispatcher::new(router, bus.clone(), ctx, metrics, rx, 1000).with_clock(clock);
        let stop = CancellationToken::new();
        let run = tokio::spawn(dispatcher.run(stop.clone(), drain));
        Harness {
            bus,
            tx,
            started,
            stop,
            run,
            clock,
            _dir: dir,
        }
    }

    /// Ingests delivery `id` of a new event.
    fn deliver(&self, id: i64) {
        let event = EventBuilderV10::new()
            .id(format!("e{id}"))
            .source("/t")
            .ty("x")
            .build()
            .unwrap();
        let job = Job {
            id,
            trigger: 0,
            event: Arc::new(event),
            attempts: 0,
            attempt_base: 0,
            ordering_key: None,
            received_at: self.clock.now_ms(),
            not_before: None,
            last_error: None,
        };
        self.bus.add(&job, "t");
        self.tx.send(Admission::Ingested(job)).unwrap();
    }

    /// The start times of the next `n` attempts, relative to `t0`, in ms.
    async fn starts(&mut self, n: usize, t0: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..n {
            let (_, at) = tokio::time::timeout(Duration::from_secs(3600), self.started.recv())
                .await
                .expect("an attempt within the hour")
                .unwrap();
            out.push((at - t0).as_millis() as u64);
        }
        out
    }

    async fn stop(self) -> Arc<MemoryBus> {
        self.stop.cancel();
        self.run.await.unwrap();
        self.bus
    }
}

fn failing(status: Option<u16>, retry_after: Option<Duration>) -> Step {
    let mut e = ActionError::transient("HTTP 503 Service Unavailable");
    e.status = status;
    e.retry_after = retry_after;
    (Duration::ZERO, Err(e))
}

#[tokio::test(start_paused = true)]
async fn retries_follow_the_list_of_delays_then_dead_letter() {
    let mut h = Harness::start(
        "{max_attempts: 4, delays: [1s, 10s, 1m], jitter: 0}",
        (0..4).map(|_| failing(None, None)).collect(),
        Duration::from_secs(5),
    );
    let t0 = Instant::now();
    h.deliver(1);
    // 1 s is held on a timer, 10 s and 1 min wait in the store and are read back when due.
    assert_eq!(h.starts(4, t0).await, vec![0, 1_000, 11_000, 71_000]);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let bus = h.stop().await;
    let history = bus.history(1);
    let states: Vec<State> = history.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        states,
        vec![
            State::Retrying,
            State::Retrying,
            State::Retrying,
            State::Dead
        ]
    );
    assert_eq!(
        history.iter().map(|(r, _)| r.n).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

#[tokio::test(start_paused = true)]
async fn exponential_backoff_with_jitter_stays_within_its_bounds() {
    let mut h = Harness::start(
        "{max_attempts: 5, backoff: 2s, max_backoff: 5s}",
        (0..4).map(|_| failing(None, None)).collect(),
        Duration::from_secs(5),
    );
    let t0 = Instant::now();
    h.deliver(1);
    let s = h.starts(5, t0).await;
    let gaps: Vec<u64> = s.windows(2).map(|w| w[1] - w[0]).collect();
    // 2 s, 4 s, then the 5 s cap, each with up to half taken off at random.
    for (gap, full) in gaps.iter().zip([2_000u64, 4_000, 5_000, 5_000]) {
        assert!(
            *gap >= full / 2 && *gap <= full + 1,
            "gap {gap} ms for a {full} ms delay: {gaps:?}"
        );
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_clamped_and_a_429_waits_the_floor() {
    let mut h = Harness::start(
        "{max_attempts: 5, backoff: 1s, jitter: 0, max_retry_after: 2m, min_backoff_after_429: 5s}",
        vec![
            failing(Some(503), Some(Duration::from_secs(30))),
            failing(Some(503), Some(Duration::from_secs(86_400))),
            failing(Some(429), None),
        ],
        Duration::from_secs(5),
    );
    let t0 = Instant::now();
    h.deliver(1);
    // +30 s (Retry-After), +120 s (a day, clamped), +5 s (429 floor over the 4 s backoff).
    assert_eq!(h.starts(4, t0).await, vec![0, 30_000, 150_000, 155_000]);
    let bus = h.stop().await;
    assert_eq!(bus.history(1).last().unwrap().1, State::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn a_rate_spaces_the_starts_evenly() {
    let mut h = Harness::start("{rate: 4/s}", vec![], Duration::from_secs(5));
    let t0 = Instant::now();
    for id in 1..=6 {
        h.deliver(id);
    }
    assert_eq!(h.starts(6, t0).await, vec![0, 250, 500, 750, 1_000, 1_250]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_drain_waits_for_short_attempts_and_records_long_ones_as_interrupted() {
    let mut h = Harness::start(
        "{concurrency: 2}",
        vec![
            (Duration::from_secs(3), Ok(())),
            (Duration::from_secs(600), Ok(())),
        ],
        Duration::from_secs(10),
    );
    let t0 = Instant::now();
    h.deliver(1);
    h.deliver(2);
    h.starts(2, t0).await;
    let stopping = Instant::now();
    let bus = h.stop().await;
    // The drain ends at its deadline, not when the long attempt would have.
    assert_eq!(stopping.elapsed(), Duration::from_secs(10));
    let (quick, long) = (bus.history(1), bus.history(2));
    assert_eq!(quick.len(), 1);
    assert_eq!(quick[0].1, State::Succeeded);
    assert_eq!(quick[0].0.duration_ms, 3_000);
    assert_eq!(long.len(), 1);
    assert_eq!(long[0].0.outcome, "interrupted");
    assert_eq!(long[0].1, State::Retrying);
}

#[test]
fn scopes_are_named_and_read_back() {
    use super::Scope;
    let s = Scope {
        vcenter: "vc1".into(),
        kind: "tag".into(),
        name: "env:prod/frozen".into(),
    };
    assert_eq!(s.key(), "scope:vc1:tag:env:prod/frozen");
    assert_eq!(Scope::parse(&s.key()), Some(s));
    for bad in [
        "scope:vc1:planet:earth",
        "scope::cluster:c",
        "scope:vc1:cluster:",
        "vc1:cluster:c",
        "discard:12",
        "*",
    ] {
        assert_eq!(Scope::parse(bad), None, "{bad}");
    }
    let p = super::Pauses::default();
    p.set(["scope:vc1:cluster:A", "scope:vc2:cluster:B", "fix", "*"].map(String::from));
    assert_eq!(p.scopes("vc1").len(), 1);
    assert_eq!(p.scopes("vc1")[0].name, "A");
    assert!(p.scopes("vc3").is_empty());
}
