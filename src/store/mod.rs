//! The store and the bus: the two seams between reflex and the engines that keep its data.
//!
//! [`Store`] keeps events and their history, attempts, dedup keys, throttle windows and
//! source checkpoints; [`Bus`] carries deliveries to the dispatcher (claim, defer, finish,
//! dead-letter, replay). Both are implemented on SQLite (embedded, one process, the
//! default) and on PostgreSQL (shared by several nodes); with either, the bus is kept in
//! the store's own tables, so an event and its deliveries are made durable in one commit.
//! Nothing outside these backend modules speaks SQL.

mod dedup;
pub mod postgres;
pub mod sqlite;
mod sqlite_schema;

pub use dedup::DedupLimits;

use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// Store and bus failures, the same for every backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend answered with an error (a statement failed, a constraint was broken).
    #[error("store ({backend}) {what}: {message}")]
    Backend {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// What was being done (a file, an operation).
        what: String,
        /// The backend's message.
        message: String,
    },
    /// The backend cannot be reached (server down, connection refused, pool exhausted):
    /// the caller should retry later.
    #[error("store ({backend}) unavailable: {message}; retry once it is reachable again")]
    Unavailable {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// Why.
        message: String,
    },
    /// The store could not be opened as configured.
    #[error("{0}")]
    Config(String),
    /// The directory or file could not be created.
    #[error("cannot create the store at {path}: {source}")]
    Io {
        /// The database file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The store was shut down (the server is stopping).
    #[error("the store is shut down")]
    Closed,
    /// No such object.
    #[error("{0} not found")]
    NotFound(String),
    /// The request does not apply to the object's state.
    #[error("{0}")]
    Conflict(String),
}

impl StoreError {
    /// Whether retrying later may succeed (the engine was unreachable, not wrong).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. } | StoreError::Closed)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A delivery's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its first attempt.
    Pending,
    /// An attempt is running.
    Running,
    /// Failed; another attempt is scheduled.
    Retrying,
    /// An attempt succeeded.
    Succeeded,
    /// Out of attempts or failed permanently (dead letter).
    Dead,
    /// Suppressed by the trigger's `once_within` throttle.
    Throttled,
}

impl State {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running => "running",
            State::Retrying => "retrying",
            State::Succeeded => "succeeded",
            State::Dead => "dead",
            State::Throttled => "throttled",
        }
    }
    /// Parses a state name.
    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "running" => State::Running,
            "retrying" => State::Retrying,
            "succeeded" => State::Succeeded,
            "dead" => State::Dead,
            "throttled" => State::Throttled,
            _ => return None,
        })
    }
}

/// An event to persist with the deliveries its matches create.
#[derive(Debug)]
pub struct NewEvent {
    /// The reflex source that received it.
    pub source_name: String,
    /// CloudEvents `source` attribute.
    pub ce_source: String,
    /// CloudEvents `id`.
    pub ce_id: String,
    /// CloudEvents `type`.
    pub ty: String,
    /// CloudEvents `subject`.
    pub subject: Option<String>,
    /// The event in structured JSON.
    pub body: String,
    /// The deliveries to create.
    pub deliveries: Vec<NewDelivery>,
}

/// A delivery to create.
#[derive(Debug)]
pub struct NewDelivery {
    /// Trigger name.
    pub trigger: String,
    /// Ordering key, if the trigger has one.
    pub ordering_key: Option<String>,
    /// Throttle key and window, if the trigger has one.
    pub throttle: Option<(String, Duration)>,
    /// Correlation, if the trigger has one.
    pub correlate: Option<Correlate>,
}

/// Why a delivery counted in a correlation waits (its `last_error`).
pub fn correlation_note(c: &Correlate, counted: u32) -> String {
    format!(
        "held for correlation: {counted} of {} events with key `{}` within {:?}; the action runs once all {} have arrived, with all of them",
        c.count, c.key, c.within, c.count
    )
}

/// A delivery's place in its trigger's correlation: it runs only as the `count`th event of
/// its key within the window, with the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correlate {
    /// The rendered key.
    pub key: String,
    /// Events needed.
    pub count: u32,
    /// The window.
    pub within: Duration,
}

/// What the store did with a [`NewEvent`].
#[derive(Debug)]
pub struct Stored {
    /// The event's number in this store (0 for a duplicate).
    pub seq: i64,
    /// The (source, id) pair was seen within the dedup window: nothing was stored.
    pub duplicate: bool,
    /// Created deliveries, in the order of `NewEvent::deliveries`.
    pub deliveries: Vec<(i64, State)>,
}

/// An open delivery read back at start-up or on replay.
#[derive(Debug, Clone)]
pub struct OpenDelivery {
    /// Delivery id.
    pub id: i64,
    /// Trigger name.
    pub trigger: String,
    /// Ordering key.
    pub ordering_key: Option<String>,
    /// Attempts made so far (all time).
    pub attempts: u32,
    /// Attempts made before the last replay (the budget restarts there).
    pub attempt_base: u32,
    /// When the next attempt is due (ms since the epoch), if scheduled.
    pub next_at: Option<i64>,
    /// The event, structured JSON.
    pub event_body: String,
    /// When the event was received (ms since the epoch).
    pub received_at: i64,
    /// The last failed attempt's detail.
    pub last_error: Option<String>,
}

/// One attempt's record.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    /// 1-based attempt number.
    pub n: u32,
    /// Start (ms since the epoch).
    pub started_at: i64,
    /// How long it ran.
    pub duration_ms: i64,
    /// `succeeded`, `failed` or `timeout`.
    pub outcome: String,
    /// What happened, verbatim.
    pub detail: String,
}

/// Retention limits applied by [`Store::prune`].
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Oldest finished event kept.
    pub max_age: Option<Duration>,
    /// Most events kept.
    pub max_events: Option<u64>,
    /// Dedup keys to keep.
    pub dedup: DedupLimits,
}

/// Which events to list: newest first below `before`, or oldest first above `after`.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Most events returned.
    pub limit: u32,
    /// Events with a smaller seq (newest first).
    pub before: Option<i64>,
    /// Events with a larger seq, oldest first (to follow new events).
    pub after: Option<i64>,
    /// CloudEvents `type`.
    pub ty: Option<String>,
    /// CloudEvents `subject`.
    pub subject: Option<String>,
    /// CloudEvents `source`.
    pub source: Option<String>,
    /// CloudEvents `id`.
    pub id: Option<String>,
    /// Plain text anywhere in the stored event (ASCII letters in any case).
    pub text: Option<String>,
    /// Received at or after (ms since the epoch).
    pub since: Option<i64>,
}

/// One event in a list.
#[derive(Debug, Clone, Serialize)]
pub struct EventSummary {
    /// The event's number in this store.
    pub seq: i64,
    /// CloudEvents `id`.
    pub id: String,
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `type`.
    #[serde(rename = "type")]
    pub ty: String,
    /// CloudEvents `subject`.
    pub subject: Option<String>,
    /// The reflex source that received it.
    pub received_by: String,
    /// When it was received (ms since the epoch).
    pub received_at: i64,
}

/// One event with its body and deliveries.
#[derive(Debug, Clone)]
pub struct EventDetail {
    /// The event's number in this store.
    pub seq: i64,
    /// The reflex source that received it.
    pub received_by: String,
    /// When it was received (ms since the epoch).
    pub received_at: i64,
    /// The event, structured JSON.
    pub body: String,
    /// Its deliveries, in id order.
    pub deliveries: Vec<DeliveryRecord>,
}

/// Which deliveries to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    /// Most deliveries returned.
    pub limit: u32,
    /// Deliveries with a smaller id.
    pub before: Option<i64>,
    /// In this state.
    pub state: Option<State>,
    /// Of this trigger.
    pub trigger: Option<String>,
}

/// A delivery as recorded.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    /// Delivery id.
    pub id: i64,
    /// The event's seq.
    pub event_seq: i64,
    /// Trigger name.
    pub trigger: String,
    /// Its state.
    pub state: State,
    /// Attempts made (all time).
    pub attempts: u32,
    /// Ordering key.
    pub ordering_key: Option<String>,
    /// When the next attempt is due (ms since the epoch).
    pub next_at: Option<i64>,
    /// Created (ms since the epoch).
    pub created_at: i64,
    /// Last changed (ms since the epoch).
    pub updated_at: i64,
    /// The last failed attempt's detail.
    pub last_error: Option<String>,
    /// The event's CloudEvents id.
    pub event_id: String,
    /// The event's CloudEvents type.
    pub event_type: String,
}

/// A source's stored position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The position (e.g. a vCenter event key).
    pub position: i64,
    /// Its time, as the source reported it.
    pub time: String,
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for someone to approve or reject it.
    Waiting,
    /// Approved: the change runs (after its plan is checked again).
    Approved,
    /// Rejected: the delivery is dead, nothing was changed.
    Rejected,
    /// Nobody decided within its timeout: rejected so.
    Expired,
}

impl ApprovalState {
    /// Its name in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Waiting => "waiting",
            ApprovalState::Approved => "approved",
            ApprovalState::Rejected => "rejected",
            ApprovalState::Expired => "expired",
        }
    }
    /// From its name.
    pub fn parse(s: &str) -> Option<ApprovalState> {
        Some(match s {
            "waiting" => ApprovalState::Waiting,
            "approved" => ApprovalState::Approved,
            "rejected" => ApprovalState::Rejected,
            "expired" => ApprovalState::Expired,
            _ => return None,
        })
    }
}

/// A change that waits for a person's decision: a trigger's action or a workflow step
/// with `approval: required`, with the plan (its dry run) the approver sees.
#[derive(Debug, Clone, Serialize)]
pub struct Approval {
    /// Its number (`reflex approve ID`).
    pub id: i64,
    /// The delivery that waits.
    pub delivery_id: i64,
    /// The trigger.
    pub trigger: String,
    /// The workflow step, or empty for the trigger's action.
    pub step: String,
    /// Where it stands.
    pub state: ApprovalState,
    /// What the change would do (its dry run), as it was when last shown.
    pub plan: String,
    /// The event's type.
    pub event_type: String,
    /// The event's subject.
    pub subject: Option<String>,
    /// When it was asked for, or asked for again after its plan changed (ms since the epoch).
    pub requested_at: i64,
    /// When it is rejected unless decided (ms since the epoch).
    pub expires_at: i64,
    /// Who decided.
    pub decided_by: Option<String>,
    /// When (ms since the epoch).
    pub decided_at: Option<i64>,
    /// Why (the decision's reason, or why it was asked again).
    pub reason: Option<String>,
}

/// An approval to ask for.
#[derive(Debug, Clone)]
pub struct NewApproval {
    /// The delivery that waits.
    pub delivery_id: i64,
    /// The trigger.
    pub trigger: String,
    /// The workflow step, or empty.
    pub step: String,
    /// The plan.
    pub plan: String,
    /// The event's type.
    pub event_type: String,
    /// The event's subject.
    pub subject: Option<String>,
    /// When it is rejected unless decided (ms since the epoch).
    pub expires_at: i64,
}

/// A change of an approval's state; each applies only from the state it names, so that two
/// people (or nodes) deciding at once cannot both win.
#[derive(Debug, Clone)]
pub enum ApprovalChange {
    /// Waiting → approved (`true`) or rejected, by whom and why.
    Decide {
        /// Approve (`true`) or reject.
        approve: bool,
        /// Who.
        by: String,
        /// Why.
        reason: Option<String>,
    },
    /// Approved → waiting again with a new plan (the state changed since), until `expires_at`.
    Replan {
        /// The new plan.
        plan: String,
        /// Why it is asked again.
        reason: String,
        /// The new deadline.
        expires_at: i64,
    },
    /// Waiting → expired.
    Expire,
}

impl ApprovalChange {
    /// The state the change applies from, and the state it leaves.
    pub fn states(&self) -> (ApprovalState, ApprovalState) {
        match self {
            ApprovalChange::Decide { approve: true, .. } => {
                (ApprovalState::Waiting, ApprovalState::Approved)
            }
            ApprovalChange::Decide { .. } => (ApprovalState::Waiting, ApprovalState::Rejected),
            ApprovalChange::Replan { .. } => (ApprovalState::Approved, ApprovalState::Waiting),
            ApprovalChange::Expire => (ApprovalState::Waiting, ApprovalState::Expired),
        }
    }
}

/// Events, history, attempts, dedup, throttle windows, checkpoints and retention.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// The engine's name (`sqlite`, `postgres`), for logs and errors.
    fn backend(&self) -> &'static str;
    /// Persists events with their deliveries (published on the store-backed bus in the
    /// same commit); returns once they are durable. A repeated (source, id) within the
    /// dedup window is reported as a duplicate and nothing of it is stored.
    async fn ingest(&self, events: Vec<NewEvent>) -> Result<Vec<Stored>, StoreError>;
    /// Lists events.
    async fn events(&self, q: EventQuery) -> Result<Vec<EventSummary>, StoreError>;
    /// One event with its deliveries.
    async fn event(&self, seq: i64) -> Result<Option<EventDetail>, StoreError>;
    /// Lists deliveries (`state: dead` lists the dead letters).
    async fn deliveries(&self, q: DeliveryQuery) -> Result<Vec<DeliveryRecord>, StoreError>;
    /// One delivery with every attempt.
    async fn delivery(
        &self,
        id: i64,
    ) -> Result<Option<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError>;
    /// Stores a source's position; returns once durable. `fence` is the token of the
    /// source's lease ([`Store::hold_lease`]): a node that lost the lease to another
    /// cannot move the position (the write fails with [`StoreError::Conflict`]).
    async fn set_checkpoint(
        &self,
        source: &str,
        cp: Checkpoint,
        fence: i64,
    ) -> Result<(), StoreError>;
    /// Takes or renews the lease `name` (a source that runs on one node at a time) for
    /// [`Store::lease_time`]; its fencing token, or `None` while another node holds it.
    async fn hold_lease(&self, name: &str) -> Result<Option<i64>, StoreError>;
    /// Gives the lease `name` up (at a clean stop), so another node takes over at once.
    async fn release_lease(&self, name: &str) -> Result<(), StoreError>;
    /// How long a lease lasts unless renewed.
    fn lease_time(&self) -> Duration;
    /// Pauses trigger `name` (a guard rail stopped it, or an operator): its deliveries wait,
    /// on every node, until it is resumed. `false`: it was paused already (the first reason
    /// stays).
    async fn pause_trigger(&self, name: &str, reason: &str) -> Result<bool, StoreError>;
    /// Lifts a trigger's pause.
    async fn resume_trigger(&self, name: &str) -> Result<(), StoreError>;
    /// The paused triggers.
    async fn paused_triggers(&self) -> Result<Vec<PausedTrigger>, StoreError>;
    /// Attempts of `triggers` that succeeded since `since` (ms since the epoch), and since
    /// the pause `pause` (a trigger's name, or `*` for all) was last lifted: their changes,
    /// for a blast radius.
    async fn changes_since(
        &self,
        pause: &str,
        triggers: &[String],
        since: i64,
    ) -> Result<u64, StoreError>;
    /// A source's stored position.
    async fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>, StoreError>;
    /// Applies retention; returns the number of events removed.
    async fn prune(&self, r: Retention) -> Result<u64, StoreError>;
    /// Waits until every write sent before is committed.
    async fn flush(&self);
    /// Answers once the engine can be reached, or says why not.
    async fn health(&self) -> Result<(), StoreError>;
    /// Bytes the store takes on disk, where the engine tells.
    async fn size_bytes(&self) -> Option<u64>;
    /// The nodes sharing this store, with their last heartbeat and the singletons each
    /// The events a correlated delivery fired with (structured JSON, oldest first); empty
    /// for any other delivery.
    async fn correlated_events(&self, delivery: i64) -> Result<Vec<String>, StoreError>;
    /// Asks for an approval; when one exists for the delivery and step, returns it instead.
    async fn request_approval(&self, a: NewApproval) -> Result<Approval, StoreError>;
    /// The approval of a delivery's step (empty: its trigger's action).
    async fn approval_for(&self, delivery: i64, step: &str)
        -> Result<Option<Approval>, StoreError>;
    /// One approval.
    async fn approval(&self, id: i64) -> Result<Option<Approval>, StoreError>;
    /// Approvals, newest first, in `state` if given.
    async fn approvals(
        &self,
        state: Option<ApprovalState>,
        limit: u32,
    ) -> Result<Vec<Approval>, StoreError>;
    /// Applies `change` when the approval is in the state it applies from; `None` when it
    /// is not (someone else decided first, or it is gone).
    async fn change_approval(
        &self,
        id: i64,
        change: ApprovalChange,
    ) -> Result<Option<Approval>, StoreError>;
    /// holds (one entry, this process, for the embedded store).
    async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError>;
    /// The routing keys the AMQP bus bound each trigger queue with, as (queue, key), as
    /// the last start or reload declared them.
    async fn bus_bindings(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Records the keys `queue` is bound with now (none: its trigger is gone).
    async fn set_bus_bindings(&self, queue: &str, keys: &[String]) -> Result<(), StoreError>;
    /// Keeps a new API token of `user` by its hash (the token itself is never stored);
    /// returns its id.
    async fn create_api_token(
        &self,
        user: &str,
        label: &str,
        hash: &str,
    ) -> Result<i64, StoreError>;
    /// The token with this hash, unless revoked.
    async fn api_token(&self, hash: &str) -> Result<Option<ApiToken>, StoreError>;
    /// Every API token, revoked ones too, newest first.
    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError>;
    /// Revokes a token; `false` when there is none with this id or it was revoked already.
    async fn revoke_api_token(&self, id: i64) -> Result<bool, StoreError>;
    /// Opens a console session, kept by the hash of its cookie's value.
    async fn create_session(&self, hash: &str, s: &Session) -> Result<(), StoreError>;
    /// The session with this hash, unless it expired before `now`.
    async fn session(&self, hash: &str, now: i64) -> Result<Option<Session>, StoreError>;
    /// Ends a session (logging out), and forgets every expired one.
    async fn end_session(&self, hash: &str) -> Result<(), StoreError>;
    /// Appends to the audit log.
    async fn record_audit(&self, entry: &NewAudit) -> Result<(), StoreError>;
    /// The audit log, newest first: `limit` entries older than `before` (an id) if given.
    async fn audit_log(
        &self,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<AuditEntry>, StoreError>;
}

/// An API token of a user. The token is shown once, when made; the store keeps its hash.
#[derive(Debug, Clone, Serialize)]
pub struct ApiToken {
    /// Its number (to revoke it).
    pub id: i64,
    /// Whose it is: a user of `api.users`, whose role it carries.
    pub user: String,
    /// What it is for, as given when made.
    pub label: String,
    /// When it was made (ms since the epoch).
    pub created_at: i64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

/// A person's signed-in console session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The user.
    pub user: String,
    /// The token every form and state-changing request of the session must carry.
    pub csrf: String,
    /// When it ends (ms since the epoch).
    pub expires_at: i64,
}

/// What the audit log records of one state-changing action by a person or a script.
#[derive(Debug, Clone)]
pub struct NewAudit {
    /// Who: a user's name, `api.token`, or `anonymous` (loopback, no authentication set).
    pub actor: String,
    /// The role they acted in.
    pub role: String,
    /// What: `replay`, `pause`, `approve`, `reload`, `login`, `token.create`…
    pub action: String,
    /// On what: a delivery id, a trigger's name, a user.
    pub target: String,
    /// The outcome and any reason given.
    pub detail: String,
    /// From where: the client's address.
    pub remote: String,
}

/// One entry of the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// Its number.
    pub id: i64,
    /// When (ms since the epoch).
    pub at: i64,
    /// Who.
    pub actor: String,
    /// In which role.
    pub role: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// Outcome and reason.
    pub detail: String,
    /// From where.
    pub remote: String,
}

/// A paused trigger.
#[derive(Debug, Clone, Serialize)]
pub struct PausedTrigger {
    /// Its name.
    pub trigger: String,
    /// Since when (ms since the epoch).
    pub since: i64,
    /// Why.
    pub reason: String,
}

/// A reflex process sharing the store.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    /// The node's name (`store.node`).
    pub id: String,
    /// When it started (ms since the epoch).
    pub started_at: i64,
    /// Its last heartbeat (ms since the epoch).
    pub heartbeat_at: i64,
    /// Its reflex version.
    pub version: String,
    /// The sources that run once in the cluster which this node runs now.
    pub singletons: Vec<String>,
}

/// How long an attempt runs before its delivery is shown as `running` on a bus whose claim
/// does not mark it (see [`Bus::mark_running`]).
pub const RUNNING_MARK_AFTER: Duration = Duration::from_millis(500);

/// Deliveries between ingest and the dispatcher: claim, defer, finish (retry or dead
/// letter), replay, and reading back what waits.
#[async_trait::async_trait]
pub trait Bus: Send + Sync {
    /// Takes a delivery to run an attempt now. `false`: another node has it or it is no
    /// longer open (or, with an ordering key, an earlier one of its key is open); leave it.
    async fn claim(&self, id: i64) -> Result<bool, StoreError>;
    /// Shows a claimed delivery whose attempt has run for [`RUNNING_MARK_AFTER`] as
    /// `running`. A bus whose claim marks it already (a shared one) does nothing here;
    /// the embedded one marks only such long attempts, because a mark costs a write and a
    /// crash re-runs the attempt whatever the mark says.
    async fn mark_running(&self, _id: i64) -> Result<(), StoreError> {
        Ok(())
    }
    /// Puts off an open delivery until `at` (ms since the epoch).
    async fn defer(&self, id: i64, at: i64) -> Result<(), StoreError>;
    /// Records an attempt and the delivery's new state (`next_at` for a retry).
    async fn finish_attempt(
        &self,
        id: i64,
        attempt: AttemptRecord,
        state: State,
        next_at: Option<i64>,
    ) -> Result<(), StoreError>;
    /// Makes a delivery that waits for an approval due now, after a decision; the attempt
    /// that put it to wait does not count toward its `max_attempts`. `None`: it no longer
    /// waits (finished, or running).
    async fn wake(&self, id: i64) -> Result<Option<OpenDelivery>, StoreError>;
    /// Returns a dead or throttled delivery to `pending` with a fresh attempt budget.
    async fn replay(&self, id: i64) -> Result<OpenDelivery, StoreError>;
    /// Up to `limit` deliveries still to do with an id above `after`, in id order: pending
    /// ones, and retrying ones due by `due_by` or holding an ordering key.
    async fn open_deliveries(
        &self,
        after: i64,
        limit: usize,
        due_by: i64,
    ) -> Result<Vec<OpenDelivery>, StoreError>;
    /// Up to `limit` open deliveries put off until `now` or earlier, earliest first.
    async fn due_deliveries(&self, now: i64, limit: usize)
        -> Result<Vec<OpenDelivery>, StoreError>;
    /// When the next delivery put off beyond `now` is due.
    async fn next_due_after(&self, now: i64) -> Result<Option<i64>, StoreError>;
    /// Waits until every write sent before is committed.
    async fn flush(&self);
    /// How often to look for work other nodes left (a shared bus), or `None` when this
    /// process is the only consumer.
    fn poll_interval(&self) -> Option<Duration>;
    /// How many live nodes share each trigger's `rate:`: each node spaces its own starts
    /// by the rate's interval times this, so that together they keep to the rate. 1 when
    /// this process is the only consumer.
    fn rate_share(&self) -> u32 {
        1
    }
}

/// The store and the bus of one configuration.
#[derive(Clone)]
pub struct Backend {
    /// Events and history.
    pub store: Arc<dyn Store>,
    /// Deliveries.
    pub bus: Arc<dyn Bus>,
}

impl Backend {
    /// Opens the store the configuration names: PostgreSQL when `store.url` is set,
    /// otherwise the embedded SQLite file. `api` names this node by default.
    pub async fn open(
        config: &crate::config::StoreConfig,
        api: std::net::SocketAddr,
    ) -> Result<Backend, StoreError> {
        let dedup = DedupLimits {
            window: config.dedup_window.0,
            max_keys: config.dedup_max_keys,
        };
        match &config.url {
            Some(url) => {
                let node = config
                    .node
                    .clone()
                    .unwrap_or_else(|| format!("{}:{}", host_name(), api.port()));
                let pg = postgres::PgStore::open(postgres::PgOptions {
                    url: url.expose().to_string(),
                    pool_size: config.pool_size,
                    lease: config.lease.0,
                    node,
                    dedup_window: dedup.window,
                })
                .await?;
                let pg = Arc::new(pg);
                Ok(Backend {
                    store: pg.clone(),
                    bus: pg,
                })
            }
            None => {
                let path = config.path.clone();
                let sqlite =
                    tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&path, dedup))
                        .await
                        .map_err(|_| StoreError::Closed)??;
                let sqlite = Arc::new(sqlite);
                Ok(Backend {
                    store: sqlite.clone(),
                    bus: sqlite,
                })
            }
        }
    }
}

/// This machine's host name, for naming a node.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "reflex".into())
}
