//! `bus: {type: amqp}` — deliveries on RabbitMQ.
//!
//! Topology, declared idempotently at start (a queue that exists with other arguments
//! stops the start, or the reload, with the reason):
//!
//! - `EXCHANGE` (`reflex.events`): a durable topic exchange. Ingest publishes each stored
//!   event to it, persistent, routing key its type, and answers `202` only on the broker's
//!   confirm. A header names the event's deliveries (`x-reflex-deliveries`: trigger → id).
//! - `PREFIX.trigger.NAME`: a durable quorum queue per trigger, bound by the types its
//!   filters can match (`#` when they do not narrow the type). Every node consumes it
//!   (competing consumers, manual acks, prefetch = the trigger's `concurrency`); a trigger
//!   with an `ordering_key` gets `x-single-active-consumer`, and the store's claim keeps
//!   each key in order across nodes. The store records each queue's keys, so that a start
//!   or reload unbinds the ones a changed filter, or a removed trigger, no longer implies.
//! - `PREFIX.delay.NAME.MS`: quorum queues whose messages expire after MS and are
//!   dead-lettered (at least once) back to the trigger's queue: a retry waits there, never
//!   in front of other messages. The wait is rounded up to the next of a few steps.
//! - `PREFIX.dead`: a copy of every dead-lettered delivery for the broker's tooling (at
//!   most 100,000, oldest dropped first). The store keeps the record that
//!   `reflex deliveries --state dead` lists and `reflex replay` replays.
//!
//! The store stays the history and the arbiter: a delivery runs only when the store's claim
//! gives it to a node, so a message seen twice (a redelivery after a node died, a copy
//! published again after a failed confirm) runs once. This is why the AMQP bus needs the
//! shared PostgreSQL store.

use super::AmqpBusConfig;
use crate::actions::ActionContext;
use crate::amqp::{explain, Broker};
use crate::deliveries::Job;
use crate::router::Router;
use crate::store::{AttemptRecord, Bus, OpenDelivery, State, Store, StoreError};
use crate::telemetry::Metrics;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The waits a retry is rounded up to (ms): one delay queue per trigger and step.
pub const DELAY_STEPS: &[i64] = &[
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000,
    1_800_000, 3_600_000,
];

/// Most messages kept in the dead-letter copy queue.
const DEAD_COPIES: i64 = 100_000;

/// An event stored at ingest, to publish.
pub struct Published {
    /// Its structured JSON.
    pub body: String,
    /// Its type (the routing key).
    pub ty: String,
    /// Its deliveries: (trigger name, delivery id).
    pub deliveries: Vec<(String, i64)>,
    /// When it was received (ms since the epoch).
    pub received_at: i64,
}

/// The AMQP bus; see the module doc.
pub struct AmqpBus {
    broker: Broker,
    exchange: String,
    prefix: String,
    store: Arc<dyn Store>,
    store_bus: Arc<dyn Bus>,
    publisher: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    delays: Mutex<HashSet<String>>,
    /// Events stored whose publishing failed: published again in the background.
    unpublished: Mutex<Vec<Published>>,
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn header_i64(d: &Delivery, name: &str) -> Option<i64> {
    match d.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(*n as i64),
        AMQPValue::LongString(s) => s.to_string().parse().ok(),
        _ => None,
    }
}

fn header_str(d: &Delivery, name: &str) -> Option<String> {
    match d.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

impl AmqpBus {
    /// Connects and declares the exchange and every trigger's queues.
    pub async fn open(
        c: &AmqpBusConfig,
        store: Arc<dyn Store>,
        store_bus: Arc<dyn Bus>,
        router: &Router,
    ) -> Result<Arc<AmqpBus>, String> {
        let broker = Broker::new(c.url.clone(), c.ca_file.as_deref(), "bus")?;
        let bus = Arc::new(AmqpBus {
            broker,
            exchange: c.exchange.clone(),
            prefix: c.prefix.clone(),
            store,
            store_bus,
            publisher: tokio::sync::Mutex::new(None),
            delays: Mutex::new(HashSet::new()),
            unpublished: Mutex::new(Vec::new()),
        });
        bus.declare(router).await?;
        Ok(bus)
    }

    /// `PREFIX.trigger.NAME`.
    pub fn trigger_queue(&self, trigger: &str) -> String {
        format!("{}.trigger.{trigger}", self.prefix)
    }

    async fn declare(&self, router: &Router) -> Result<(), String> {
        let ch = self.channel().await?;
        let what =
            |name: &str, e: lapin::Error| format!("bus: declaring `{name}`: {}", explain(&e));
        ch.exchange_declare(
            self.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| what(&self.exchange, e))?;
        let dead = format!("{}.dead", self.prefix);
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long("quorum"));
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(DEAD_COPIES));
        self.declare_queue(&ch, &dead, args).await?;
        let before = self
            .store
            .bus_bindings()
            .await
            .map_err(|e| format!("bus: reading the bindings recorded before: {e}"))?;
        for t in &router.triggers {
            let queue = self.trigger_queue(&t.name);
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), long("quorum"));
            if t.policy.ordering_key.is_some() {
                args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            }
            self.declare_queue(&ch, &queue, args).await.map_err(|e| {
                format!("{e} (trigger `{}`: adding or removing `ordering_key` changes its queue's arguments; delete the queue on the broker once it is empty, then start again)", t.name)
            })?;
            let keys = t.type_bindings();
            for key in &keys {
                ch.queue_bind(
                    queue.as_str().into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| what(&queue, e))?;
            }
            self.unbind_stale(&ch, &queue, &keys, &before).await?;
        }
        // A trigger gone from the configuration: its queue no longer gets copies (the
        // queue itself stays, with what it holds, for the operator to delete).
        let current: HashSet<String> = router
            .triggers
            .iter()
            .map(|t| self.trigger_queue(&t.name))
            .collect();
        let ours = format!("{}.trigger.", self.prefix);
        let gone: HashSet<&String> = before
            .iter()
            .map(|(q, _)| q)
            .filter(|q| q.starts_with(&ours) && !current.contains(*q))
            .collect();
        for queue in gone {
            // The operator may have deleted it already: the broker then closes the channel,
            // so each gets a channel of its own, and a failure only warns.
            let ch = self.channel().await?;
            match self.unbind_stale(&ch, queue, &[], &before).await {
                Ok(()) => {
                    tracing::warn!(queue = %queue, "bus: the queue of a trigger no longer configured is unbound; delete it on the broker once it is empty")
                }
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "bus: the queue of a trigger no longer configured could not be unbound (deleted already?)");
                    let _ = self.store.set_bus_bindings(queue, &[]).await;
                }
            }
        }
        Ok(())
    }

    /// Unbinds the keys `queue` was bound with before (as the store recorded them) that are
    /// not in `keys`, then records `keys`: a changed filter stops routing the old types.
    async fn unbind_stale(
        &self,
        ch: &Channel,
        queue: &str,
        keys: &[String],
        before: &[(String, String)],
    ) -> Result<(), String> {
        for (_, key) in before
            .iter()
            .filter(|(q, k)| q == queue && !keys.contains(k))
        {
            ch.queue_unbind(
                queue.into(),
                self.exchange.as_str().into(),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("bus: unbinding `{queue}` from `{key}`: {}", explain(&e)))?;
        }
        self.store
            .set_bus_bindings(queue, keys)
            .await
            .map_err(|e| format!("bus: recording the bindings of `{queue}`: {e}"))
    }

    async fn declare_queue(
        &self,
        ch: &Channel,
        name: &str,
        args: FieldTable,
    ) -> Result<(), String> {
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("bus: declaring queue `{name}`: {}", explain(&e)))
    }

    /// The publishing channel (confirm mode), opened again after it broke.
    async fn channel(&self) -> Result<Channel, String> {
        let mut open = self.publisher.lock().await;
        if let Some((conn, ch)) = open.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        *open = None;
        let conn = self
            .broker
            .connect("reflex bus")
            .await
            .map_err(|e| format!("bus: {e}"))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| format!("bus: opening a channel: {}", explain(&e)))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("bus: confirm mode: {}", explain(&e)))?;
        *open = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Answers once the broker can take messages (before events are stored), or why not.
    pub async fn ready(&self) -> Result<(), String> {
        self.channel().await.map(|_| ())
    }

    /// Publishes stored events and waits for every confirm. On failure they are kept and
    /// published again in the background ([`AmqpBus::republish`]).
    pub async fn publish_events(&self, events: Vec<Published>) -> Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        match self.try_publish(&events).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.unpublished
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(events);
                Err(e)
            }
        }
    }

    async fn try_publish(&self, events: &[Published]) -> Result<(), String> {
        let ch = self.channel().await?;
        let mut confirms = Vec::with_capacity(events.len());
        for e in events {
            let mut table = FieldTable::default();
            for (trigger, id) in &e.deliveries {
                table.insert(trigger.as_str().into(), AMQPValue::LongLongInt(*id));
            }
            let mut headers = FieldTable::default();
            headers.insert("x-reflex-deliveries".into(), AMQPValue::FieldTable(table));
            headers.insert(
                "x-reflex-received-at".into(),
                AMQPValue::LongLongInt(e.received_at),
            );
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/cloudevents+json".into())
                .with_headers(headers);
            let c = ch
                .basic_publish(
                    self.exchange.as_str().into(),
                    ShortString::from(e.ty.as_str()),
                    BasicPublishOptions {
                        mandatory: !e.deliveries.is_empty(),
                        immediate: false,
                    },
                    e.body.as_bytes(),
                    props,
                )
                .await
                .map_err(|err| format!("bus: publishing: {}", explain(&err)))?;
            confirms.push(c);
        }
        for c in confirms {
            let confirmation = c.await.map_err(|err| {
                format!("bus: waiting for the broker's confirm: {}", explain(&err))
            })?;
            if confirmation.is_nack() {
                return Err("bus: the broker did not take an event (nack)".into());
            }
            if let Some(r) = confirmation.take_message() {
                return Err(format!(
                    "bus: an event reached no trigger queue ({} {}): were reflex's queues deleted on the broker?",
                    r.reply_code, r.reply_text
                ));
            }
        }
        Ok(())
    }

    /// Publishes one delivery straight to `queue` (a trigger's or a delay queue).
    async fn send(&self, queue: &str, trigger: &str, d: &Direct) -> Result<(), String> {
        let ch = self.channel().await?;
        let mut headers = FieldTable::default();
        headers.insert("x-reflex-trigger".into(), long(trigger));
        headers.insert("x-reflex-delivery".into(), AMQPValue::LongLongInt(d.id));
        headers.insert(
            "x-reflex-attempts".into(),
            AMQPValue::LongLongInt(d.attempts as i64),
        );
        headers.insert(
            "x-reflex-attempt-base".into(),
            AMQPValue::LongLongInt(d.attempt_base as i64),
        );
        headers.insert(
            "x-reflex-received-at".into(),
            AMQPValue::LongLongInt(d.received_at),
        );
        if let Some(t) = &d.last_error {
            headers.insert("x-reflex-last-error".into(), long(t));
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/cloudevents+json".into())
            .with_headers(headers);
        let confirmation = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                d.body.as_bytes(),
                props,
            )
            .await
            .map_err(|e| format!("bus: publishing to `{queue}`: {}", explain(&e)))?
            .await
            .map_err(|e| format!("bus: confirm from `{queue}`: {}", explain(&e)))?;
        if confirmation.is_nack() || confirmation.take_message().is_some() {
            return Err(format!("bus: queue `{queue}` did not take the delivery"));
        }
        Ok(())
    }

    /// Puts a delivery in the trigger's delay queue for at least `wait_ms`.
    async fn delay(&self, trigger: &str, d: &Direct, wait_ms: i64) -> Result<(), String> {
        let step = DELAY_STEPS
            .iter()
            .copied()
            .find(|s| *s >= wait_ms)
            .unwrap_or(*DELAY_STEPS.last().expect("steps"));
        let queue = format!("{}.delay.{trigger}.{step}", self.prefix);
        let known = self
            .delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&queue);
        if !known {
            let ch = self.channel().await?;
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), long("quorum"));
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(step));
            args.insert("x-dead-letter-exchange".into(), long(""));
            args.insert(
                "x-dead-letter-routing-key".into(),
                long(&self.trigger_queue(trigger)),
            );
            args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
            args.insert("x-overflow".into(), long("reject-publish"));
            self.declare_queue(&ch, &queue, args).await?;
            self.delays
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(queue.clone());
        }
        self.send(&queue, trigger, d).await
    }

    /// Publishes again, every second, what failed to publish at ingest.
    pub async fn republish(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let waiting =
                std::mem::take(&mut *self.unpublished.lock().unwrap_or_else(|p| p.into_inner()));
            if waiting.is_empty() {
                continue;
            }
            let n = waiting.len();
            match self.try_publish(&waiting).await {
                Ok(()) => tracing::info!(events = n, "events stored earlier are on the bus now"),
                Err(e) => {
                    tracing::warn!(events = n, error = %e, "events stored are not on the bus yet; trying again");
                    self.unpublished
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(waiting);
                }
            }
        }
    }

    /// A sender sent again an event the store has (a duplicate): the first try may have
    /// been stored without being published (the node died, or the broker failed, between
    /// the commit and the confirm, and the sender got no `202`). Its deliveries still
    /// pending and never attempted are published again before this try is acknowledged;
    /// a copy of one already queued runs once (the claim refuses the other).
    pub async fn republish_duplicate(
        &self,
        received_by: &str,
        ce_source: &str,
        ce_id: &str,
    ) -> Result<(), String> {
        let q = crate::store::EventQuery {
            limit: 10,
            source: Some(ce_source.to_string()),
            id: Some(ce_id.to_string()),
            ..Default::default()
        };
        let found = self.store.events(q).await.map_err(|e| e.to_string())?;
        for e in found.iter().filter(|e| e.received_by == received_by) {
            let Some(detail) = self.store.event(e.seq).await.map_err(|e| e.to_string())? else {
                continue;
            };
            for d in detail.deliveries {
                if d.state != State::Pending || d.attempts > 0 {
                    continue;
                }
                let direct = Direct {
                    id: d.id,
                    body: detail.body.clone(),
                    attempts: 0,
                    attempt_base: 0,
                    received_at: detail.received_at,
                    last_error: None,
                };
                self.send(&self.trigger_queue(&d.trigger), &d.trigger, &direct)
                    .await?;
            }
        }
        Ok(())
    }

    /// At start: deliveries the store has open and never attempted are published again to
    /// their trigger's queue, for those a crash left between the store's commit and the
    /// broker's confirm. Copies of ones already queued run once (the claim refuses the
    /// other).
    pub async fn sweep(&self, router: &Router) -> Result<usize, String> {
        let mut after = 0;
        let mut sent = 0;
        loop {
            let open = self
                .store_bus
                .open_deliveries(after, 500, crate::store::now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let Some(last) = open.last().map(|d| d.id) else {
                return Ok(sent);
            };
            after = last;
            for d in open {
                if router.position(&d.trigger).is_none() {
                    // No consumer will ever take it: dead (replayable), with why.
                    self.dead_letter_orphan(&d).await;
                    continue;
                }
                if d.attempts > 0 {
                    continue;
                }
                let queue = self.trigger_queue(&d.trigger);
                self.send(&queue, &d.trigger, &Direct::from_open(&d))
                    .await?;
                sent += 1;
            }
        }
    }

    /// Ends an open delivery whose trigger is no longer configured: dead, with why, as the
    /// embedded bus does (a replay brings it back once a trigger of that name exists).
    async fn dead_letter_orphan(&self, d: &OpenDelivery) {
        match self.store_bus.claim(d.id).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(delivery = d.id, error = %e, "cannot claim a delivery of a removed trigger; it stays open");
                return;
            }
        }
        let now = crate::store::now_ms();
        let record = AttemptRecord {
            n: d.attempts + 1,
            started_at: now,
            duration_ms: 0,
            outcome: "failed".into(),
            detail: format!(
                "trigger `{}` is no longer configured; replay the delivery once a trigger of that name exists",
                d.trigger
            ),
        };
        if let Err(e) = self
            .store_bus
            .finish_attempt(d.id, record, State::Dead, None)
            .await
        {
            tracing::warn!(delivery = d.id, error = %e, "cannot dead-letter a delivery of a removed trigger");
        }
    }

    /// Starts a consumer per trigger; they run until `stop`, then let their running
    /// attempts finish for up to `drain` before unacknowledged messages go back to the
    /// queue.
    pub fn consume(
        self: &Arc<Self>,
        router: Arc<Router>,
        ctx: ActionContext,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        drain: Duration,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..router.triggers.len())
            .map(|t| {
                let c = Consumer {
                    bus: self.clone(),
                    router: router.clone(),
                    ctx: ctx.clone(),
                    metrics: metrics.clone(),
                    trigger: t,
                    next_start: Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now())),
                    in_flight: Default::default(),
                };
                tokio::spawn(c.run(stop.clone(), drain))
            })
            .collect()
    }
}

/// A delivery sent straight to a queue, with what its next attempt needs.
struct Direct {
    id: i64,
    body: String,
    attempts: u32,
    attempt_base: u32,
    received_at: i64,
    last_error: Option<String>,
}

impl Direct {
    fn from_open(d: &OpenDelivery) -> Direct {
        Direct {
            id: d.id,
            body: d.event_body.clone(),
            attempts: d.attempts,
            attempt_base: d.attempt_base,
            received_at: d.received_at,
            last_error: d.last_error.clone(),
        }
    }
}

/// One trigger's consumer on one node.
struct Consumer {
    bus: Arc<AmqpBus>,
    router: Arc<Router>,
    ctx: ActionContext,
    metrics: Arc<Metrics>,
    trigger: usize,
    /// The earliest start of the next attempt (the trigger's `rate`, on this node).
    next_start: Arc<tokio::sync::Mutex<tokio::time::Instant>>,
    /// The deliveries being run now: id → (attempts made before, when it began), so that
    /// one cut off by the drain is recorded as interrupted.
    in_flight: std::sync::Mutex<std::collections::HashMap<i64, (u32, i64)>>,
}

/// Takes a delivery out of [`Consumer::in_flight`] however its handling ends.
struct InFlight<'a>(&'a Consumer, i64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.in_flight.lock() {
            m.remove(&self.1);
        }
    }
}

impl Consumer {
    fn name(&self) -> &str {
        &self.router.triggers[self.trigger].name
    }

    async fn run(self, stop: CancellationToken, drain: Duration) {
        let this = Arc::new(self);
        let mut wait = Duration::from_millis(500);
        loop {
            match this.clone().session(&stop, drain).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(trigger = %this.name(), error = %e, retry_in = ?wait, "the trigger's consumer stopped; it connects again");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// One connection's life: consumes until `stop` (then `Ok`) or until it breaks.
    async fn session(
        self: Arc<Self>,
        stop: &CancellationToken,
        drain: Duration,
    ) -> Result<(), String> {
        let name = self.name().to_string();
        let conn = self
            .bus
            .broker
            .connect(&format!("reflex trigger {name}"))
            .await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {}", explain(&e)))?;
        let prefetch = self.router.triggers[self.trigger]
            .policy
            .concurrency
            .clamp(1, u16::MAX as usize) as u16;
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("basic.qos: {}", explain(&e)))?;
        let queue = self.bus.trigger_queue(&name);
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("consuming `{queue}`: {}", explain(&e)))?;
        let mut running = tokio::task::JoinSet::new();
        let result = loop {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                Some(_) = running.join_next(), if !running.is_empty() => {}
                next = consumer.next() => match next {
                    Some(Ok(d)) => {
                        let this = self.clone();
                        running.spawn(async move { this.handle(d).await });
                    }
                    Some(Err(e)) => break Err(format!("consumer of `{queue}`: {}", explain(&e))),
                    None => break Err(format!("the broker ended the consumer of `{queue}`")),
                },
            }
        };
        // Running attempts get `drain` to finish; the rest go back to the queue with the
        // channel (and run again elsewhere: at least once).
        let drained = tokio::time::timeout(drain, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.record_interrupted(drain).await;
        }
        running.abort_all();
        let _ = ch.close(200, "reflex is stopping".into()).await;
        let _ = conn.close(200, "reflex is stopping".into()).await;
        result
    }

    /// Records the attempts still running after the drain as interrupted (their messages
    /// go back to the queue with the channel, and run again).
    async fn record_interrupted(&self, drain: Duration) {
        let cut: Vec<(i64, (u32, i64))> = match self.in_flight.lock() {
            Ok(m) => m.iter().map(|(k, v)| (*k, *v)).collect(),
            Err(_) => return,
        };
        tracing::warn!(trigger = %self.name(), abandoned = cut.len(), "drain timeout; the attempts still running are recorded as interrupted and run again");
        let now = crate::store::now_ms();
        for (id, (attempts, began)) in cut {
            // Only an attempt that started (its delivery is running) is one to record.
            let made = match self.bus.store.delivery(id).await {
                Ok(Some((d, _))) if d.state == State::Running => d.attempts.max(attempts),
                _ => continue,
            };
            let record = AttemptRecord {
                n: made + 1,
                started_at: began,
                duration_ms: now - began,
                outcome: "interrupted".into(),
                detail: format!(
                    "interrupted: reflex stopped or reloaded while the attempt ran (still running after {drain:?}); it will be retried"
                ),
            };
            if let Err(e) = self
                .bus
                .store_bus
                .finish_attempt(id, record, State::Retrying, Some(now))
                .await
            {
                tracing::warn!(delivery = id, error = %e, "cannot record the interrupted attempt; the delivery runs again when its lease ends");
            }
        }
        self.bus.store_bus.flush().await;
    }

    /// Runs one message's delivery and settles it with the broker.
    async fn handle(&self, d: Delivery) {
        if let Err(e) = self.settle(&d).await {
            // Not acknowledged: the broker gives it again once this channel closes.
            tracing::warn!(trigger = %self.name(), error = %e, "a delivery could not be settled with the broker; it will be delivered again");
        }
    }

    async fn settle(&self, d: &Delivery) -> Result<(), String> {
        let name = self.name();
        let id = match header_str(d, "x-reflex-trigger") {
            Some(t) if t == name => header_i64(d, "x-reflex-delivery"),
            Some(_) => None,
            None => d.properties.headers().as_ref().and_then(|h| {
                match h.inner().get("x-reflex-deliveries") {
                    Some(AMQPValue::FieldTable(t)) => match t.inner().get(name) {
                        Some(AMQPValue::LongLongInt(n)) => Some(*n),
                        _ => None,
                    },
                    _ => None,
                }
            }),
        };
        let Some(id) = id else {
            // Routed here by a broad binding, but not a match of this trigger.
            return ack(d).await;
        };
        let body = String::from_utf8_lossy(&d.data).into_owned();
        let event = match crate::event::from_json(&body) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::error!(trigger = %name, delivery = id, error = %e, "a message on the bus is not a stored event; dropped");
                return ack(d).await;
            }
        };
        let mut direct = Direct {
            id,
            body,
            attempts: header_i64(d, "x-reflex-attempts").unwrap_or(0).max(0) as u32,
            attempt_base: header_i64(d, "x-reflex-attempt-base").unwrap_or(0).max(0) as u32,
            received_at: header_i64(d, "x-reflex-received-at").unwrap_or_else(crate::store::now_ms),
            last_error: header_str(d, "x-reflex-last-error"),
        };
        // A message given again (its channel closed mid-attempt) carries the count from
        // before: the store knows the attempts made since (an interrupted one, say).
        if d.redelivered {
            if let Ok(Some((rec, _))) = self.bus.store.delivery(id).await {
                direct.attempts = direct.attempts.max(rec.attempts);
                direct.last_error = rec.last_error.or(direct.last_error);
            }
        }
        // A second copy of a delivery this node is running now (a duplicate's republish, a
        // sweep at start) waits for the first to finish: the store's claim alone would give
        // it to this node again, as the lease is this node's own.
        let fresh = match self.in_flight.lock() {
            Ok(mut m) => match m.entry(id) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((direct.attempts, crate::store::now_ms()));
                    true
                }
            },
            Err(_) => true,
        };
        if !fresh {
            return self.unclaimed(d, direct).await;
        }
        let _in_flight = InFlight(self, id);
        if let Some(spacing) = self.router.triggers[self.trigger].policy.spacing {
            // Every node's consumer spaces its own starts; the rate is shared by them.
            let spacing = spacing * self.bus.store_bus.rate_share();
            let mut next = self.next_start.lock().await;
            let now = tokio::time::Instant::now();
            let at = (*next).max(now);
            *next = at + spacing;
            drop(next);
            tokio::time::sleep_until(at).await;
        }
        let job = Job {
            id,
            trigger: self.trigger,
            event,
            attempts: direct.attempts,
            attempt_base: direct.attempt_base,
            ordering_key: None,
            received_at: direct.received_at,
            not_before: None,
            last_error: direct.last_error.clone(),
        };
        let s = crate::deliveries::attempt_once(
            self.router.clone(),
            self.bus.store_bus.clone(),
            self.ctx.clone(),
            &self.metrics,
            job,
        )
        .await;
        if !s.claimed {
            return self.unclaimed(d, direct).await;
        }
        if !s.recorded {
            self.record(id, s.record.clone(), s.state, s.next_at).await;
        }
        direct.attempts = s.record.n;
        direct.last_error = (s.record.outcome != "succeeded").then(|| s.record.detail.clone());
        match s.state {
            State::Retrying => {
                let wait = s.next_at.map_or(0, |t| t - crate::store::now_ms());
                self.bus.delay(name, &direct, wait.max(1)).await?;
            }
            State::Dead => {
                let dead = format!("{}.dead", self.bus.prefix);
                if let Err(e) = self.bus.send(&dead, name, &direct).await {
                    tracing::warn!(trigger = %name, delivery = id, error = %e, "the dead delivery's copy did not reach the dead-letter queue; the store keeps it");
                }
            }
            _ => {}
        }
        ack(d).await
    }

    /// The store did not give the delivery to this node: let it go when it is finished,
    /// or bring it back later when it waits (not due, its key busy, another node on it).
    async fn unclaimed(&self, d: &Delivery, mut direct: Direct) -> Result<(), String> {
        let found = self
            .bus
            .store
            .delivery(direct.id)
            .await
            .map_err(|e| format!("reading delivery {}: {e}", direct.id))?;
        let Some((rec, _)) = found else {
            return ack(d).await;
        };
        let wait = match rec.state {
            State::Succeeded | State::Dead | State::Throttled => return ack(d).await,
            State::Running => 1_000,
            State::Pending | State::Retrying => rec
                .next_at
                .map_or(1_000, |t| (t - crate::store::now_ms()).max(1_000)),
        };
        direct.attempts = rec.attempts;
        direct.last_error = rec.last_error.clone();
        self.bus.delay(self.name(), &direct, wait).await?;
        ack(d).await
    }

    /// Writes an attempt's record the store refused, until it takes it.
    async fn record(&self, id: i64, record: AttemptRecord, state: State, next_at: Option<i64>) {
        let mut wait = Duration::from_millis(200);
        loop {
            match self
                .bus
                .store_bus
                .finish_attempt(id, record.clone(), state, next_at)
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    crate::deliveries::log_unrecorded(id, &e, 1);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

async fn ack(d: &Delivery) -> Result<(), String> {
    d.ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("acknowledging: {}", explain(&e)))
}

#[async_trait::async_trait]
impl Bus for AmqpBus {
    async fn claim(&self, id: i64) -> Result<bool, StoreError> {
        self.store_bus.claim(id).await
    }
    async fn mark_running(&self, id: i64) -> Result<(), StoreError> {
        self.store_bus.mark_running(id).await
    }
    async fn defer(&self, id: i64, at: i64) -> Result<(), StoreError> {
        self.store_bus.defer(id, at).await
    }
    async fn finish_attempt(
        &self,
        id: i64,
        attempt: AttemptRecord,
        state: State,
        next_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.store_bus
            .finish_attempt(id, attempt, state, next_at)
            .await
    }
    /// Returns the delivery to `pending` in the store, then puts it on its trigger's queue.
    async fn wake(&self, id: i64) -> Result<Option<OpenDelivery>, StoreError> {
        // The waiting copy sits in a delay queue: a fresh one goes to the trigger's queue,
        // and the old one, when it comes back, finds the delivery finished and is dropped.
        let Some(open) = self.store_bus.wake(id).await? else {
            return Ok(None);
        };
        let queue = self.trigger_queue(&open.trigger);
        self.send(&queue, &open.trigger, &Direct::from_open(&open))
            .await
            .map_err(|message| StoreError::Unavailable {
                backend: "amqp",
                message: format!("{message}; the delivery runs when its wait ends"),
            })?;
        Ok(Some(open))
    }
    async fn replay(&self, id: i64) -> Result<OpenDelivery, StoreError> {
        let open = self.store_bus.replay(id).await?;
        let queue = self.trigger_queue(&open.trigger);
        self.send(&queue, &open.trigger, &Direct::from_open(&open))
            .await
            .map_err(|message| StoreError::Unavailable {
                backend: "amqp",
                message: format!("{message}; the delivery is pending in the store and is published again when reflex starts"),
            })?;
        Ok(open)
    }
    /// The broker holds the work: nothing is read back from the store.
    async fn open_deliveries(
        &self,
        _after: i64,
        _limit: usize,
        _due_by: i64,
    ) -> Result<Vec<OpenDelivery>, StoreError> {
        Ok(Vec::new())
    }
    async fn due_deliveries(
        &self,
        _now: i64,
        _limit: usize,
    ) -> Result<Vec<OpenDelivery>, StoreError> {
        Ok(Vec::new())
    }
    async fn next_due_after(&self, _now: i64) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }
    async fn flush(&self) {
        self.store_bus.flush().await
    }
    fn rate_share(&self) -> u32 {
        self.store_bus.rate_share()
    }

    fn poll_interval(&self) -> Option<Duration> {
        None
    }
}
