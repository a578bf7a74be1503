//! The ingest path every source shares: admission (bounded), routing, one durable write of
//! the events with their deliveries, then hand-off to the dispatcher.

use crate::deliveries::{Admission, Job};
use crate::router::Router;
use crate::store::{NewDelivery, NewEvent, State, Store, StoreError};
use crate::telemetry::Metrics;
use cloudevents::{AttributesReader, Event};
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};

/// Why an ingest was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Too many events are waiting to become durable; the sender should retry later.
    #[error("overloaded: {0} events are waiting to be stored; retry later")]
    Overloaded(usize),
    /// The store failed; nothing was acknowledged.
    #[error("the event could not be stored: {0}")]
    Store(#[from] StoreError),
    /// The pipeline is stopping (shutdown or reload); the sender should retry.
    #[error("reflex is stopping or reloading; retry shortly")]
    Stopping,
    /// The bus (RabbitMQ) cannot take events now; nothing was acknowledged.
    #[error("{0}")]
    Bus(String),
    /// An event's data nests deeper than reflex stores (it could not be read back).
    #[error("event `{id}`: its data nests {depth} levels deep; the limit is {limit}")]
    TooDeep {
        /// The event's id.
        id: String,
        /// How deep its data nests (at least).
        depth: usize,
        /// [`crate::event::MAX_DEPTH`].
        limit: usize,
    },
}

/// The result for one accepted event.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The event's id.
    pub id: String,
    /// Seen within the dedup window: acknowledged, not delivered again.
    pub duplicate: bool,
}

struct Inner {
    store: Arc<dyn Store>,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    capacity: usize,
    stopping: std::sync::atomic::AtomicBool,
    dispatch: mpsc::UnboundedSender<Admission>,
    /// With `bus: amqp`: stored events are published there instead of handed to the
    /// dispatcher.
    bus: Option<Arc<crate::bus::amqp::AmqpBus>>,
}

/// Handle to the ingest path; cheap to clone.
#[derive(Clone)]
pub struct Ingest(Arc<Inner>);

/// The extension attribute naming the reflex source that received an event.
pub const RECEIVED_BY: &str = "receivedby";

impl Ingest {
    /// Creates the ingest path with room for `capacity` events not yet durable.
    pub fn new(
        store: Arc<dyn Store>,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        capacity: usize,
        dispatch: mpsc::UnboundedSender<Admission>,
        bus: Option<Arc<crate::bus::amqp::AmqpBus>>,
    ) -> Ingest {
        Ingest(Arc::new(Inner {
            store,
            router,
            metrics,
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            stopping: Default::default(),
            dispatch,
            bus,
        }))
    }

    /// Refuses new events from now on and waits until those in progress are stored, so
    /// that nothing is acknowledged after the pipeline that would deliver it has stopped.
    pub async fn close(&self) {
        let inner = &self.0;
        inner
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        let _all = inner.permits.acquire_many(inner.capacity as u32).await;
    }

    /// The store events go to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.0.store
    }

    /// The metrics, for sources to count rejections.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Routes and stores events; returns once they are durable.
    pub async fn submit(
        &self,
        source_name: &str,
        events: Vec<Event>,
    ) -> Result<Vec<Accepted>, IngestError> {
        let inner = &self.0;
        if inner.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(IngestError::Stopping);
        }
        // Refused whole, before anything is stored: what is acknowledged can be read back.
        for e in &events {
            if let Some(cloudevents::Data::Json(v)) = e.data() {
                let depth = crate::event::json_depth(v, crate::event::MAX_DEPTH + 1);
                if depth > crate::event::MAX_DEPTH {
                    return Err(IngestError::TooDeep {
                        id: e.id().to_string(),
                        depth,
                        limit: crate::event::MAX_DEPTH,
                    });
                }
            }
        }
        let n = events.len();
        let _permit = inner
            .permits
            .try_acquire_many(n.min(inner.capacity) as u32)
            .map_err(|_| IngestError::Overloaded(inner.capacity))?;
        inner.metrics.ingest_in_flight.inc_by(n as i64);
        let result = self.store_and_dispatch(source_name, events).await;
        inner.metrics.ingest_in_flight.dec_by(n as i64);
        result
    }

    async fn store_and_dispatch(
        &self,
        source_name: &str,
        events: Vec<Event>,
    ) -> Result<Vec<Accepted>, IngestError> {
        let inner = &self.0;
        let mut new = Vec::with_capacity(events.len());
        let mut routed = Vec::with_capacity(events.len());
        for mut event in events {
            crate::event::normalize(&mut event);
            // Which reflex source took the event, for filters (`exact: {receivedby: vc}`),
            // CEL and templates. Always set here, over whatever the sender put there, so that
            // a trigger can trust it.
            event.set_extension(RECEIVED_BY, source_name);
            let (mut errors, mut guarded) = (Vec::new(), Vec::new());
            let matches = inner.router.route_noting(&event, &mut errors, &mut guarded);
            for i in guarded {
                let trigger = &inner.router.triggers[i].name;
                inner.metrics.guard_rail(trigger, "loop_guard", "skipped");
                tracing::debug!(trigger = %trigger, event_id = event.id(), "loop guard: the event was caused by reflex's own change; the trigger does not fire on it");
            }
            for e in errors {
                tracing::warn!(source = source_name, event_id = event.id(), "{e}");
                if let Some(name) = e
                    .strip_prefix("trigger `")
                    .and_then(|r| r.split('`').next())
                {
                    inner.metrics.expression_error(name);
                }
            }
            new.push(NewEvent {
                source_name: source_name.to_string(),
                ce_source: event.source().to_string(),
                ce_id: event.id().to_string(),
                ty: event.ty().to_string(),
                subject: event.subject().map(str::to_string),
                body: crate::event::to_json(&event),
                deliveries: matches
                    .iter()
                    .map(|m| NewDelivery {
                        trigger: inner.router.triggers[m.trigger].name.clone(),
                        ordering_key: m.ordering_key.clone(),
                        throttle: m.throttle.clone(),
                        correlate: m.correlate.clone(),
                    })
                    .collect(),
            });
            routed.push((Arc::new(event), matches));
        }
        // On the AMQP bus an event is acknowledged once the broker confirmed it: a broker
        // that cannot take it is found out before anything is stored.
        type Kept = (String, String, String, String);
        let published: Option<Vec<Kept>> = match &inner.bus {
            Some(bus) => {
                bus.ready().await.map_err(IngestError::Bus)?;
                Some(
                    new.iter()
                        .map(|n| {
                            (
                                n.body.clone(),
                                n.ty.clone(),
                                n.ce_source.clone(),
                                n.ce_id.clone(),
                            )
                        })
                        .collect(),
                )
            }
            None => None,
        };
        let stored = inner.store.ingest(new).await?;
        let received_at = crate::store::now_ms();
        let mut accepted = Vec::with_capacity(stored.len());
        if let (Some(bus), Some(published)) = (&inner.bus, published) {
            let mut out = Vec::new();
            for ((s, (event, matches)), (body, ty, ce_source, ce_id)) in
                stored.into_iter().zip(routed).zip(published)
            {
                accepted.push(Accepted {
                    id: event.id().to_string(),
                    duplicate: s.duplicate,
                });
                if s.duplicate {
                    inner.metrics.event_duplicate(source_name);
                    bus.republish_duplicate(source_name, &ce_source, &ce_id)
                        .await
                        .map_err(IngestError::Bus)?;
                    continue;
                }
                inner.metrics.event_received(source_name, 1);
                let mut deliveries = Vec::new();
                for ((id, state), m) in s.deliveries.into_iter().zip(matches) {
                    let trigger = &inner.router.triggers[m.trigger].name;
                    if state == State::Throttled {
                        inner.metrics.delivery(trigger, "throttled");
                        continue;
                    }
                    deliveries.push((trigger.clone(), id));
                }
                out.push(crate::bus::amqp::Published {
                    body,
                    ty,
                    deliveries,
                    received_at,
                });
            }
            bus.publish_events(out).await.map_err(IngestError::Bus)?;
            return Ok(accepted);
        }
        for (s, (event, matches)) in stored.into_iter().zip(routed) {
            accepted.push(Accepted {
                id: event.id().to_string(),
                duplicate: s.duplicate,
            });
            if s.duplicate {
                inner.metrics.event_duplicate(source_name);
                continue;
            }
            inner.metrics.event_received(source_name, 1);
            for ((id, state), m) in s.deliveries.into_iter().zip(matches) {
                let trigger = &inner.router.triggers[m.trigger].name;
                if state == State::Throttled {
                    inner.metrics.delivery(trigger, "throttled");
                    continue;
                }
                let _ = inner.dispatch.send(Admission::Ingested(Job {
                    id,
                    trigger: m.trigger,
                    event: event.clone(),
                    attempts: 0,
                    attempt_base: 0,
                    ordering_key: m.ordering_key,
                    received_at,
                    not_before: None,
                    last_error: None,
                }));
            }
        }
        Ok(accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::EventBuilder;

    #[tokio::test]
    async fn closed_ingest_refuses_and_acknowledges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(
                &dir.path().join("s.db"),
                crate::store::DedupLimits::window(std::time::Duration::from_secs(60)),
            )
            .unwrap(),
        );
        let config = crate::config::parse("t.yaml", "sources: []\n").unwrap();
        let router = Arc::new(Router::build(&config, &mut Default::default()));
        let (tx, _rx) = mpsc::unbounded_channel();
        let ingest = Ingest::new(store.clone(), router, Arc::new(Metrics::new()), 8, tx, None);
        let event = |id: &str| {
            cloudevents::EventBuilderV10::new()
                .id(id)
                .source("/t")
                .ty("t")
                .build()
                .unwrap()
        };
        assert!(ingest.submit("t", vec![event("a")]).await.is_ok());
        ingest.close().await;
        assert!(matches!(
            ingest.submit("t", vec![event("b")]).await,
            Err(IngestError::Stopping)
        ));
        let q = crate::store::EventQuery {
            limit: 10,
            ..Default::default()
        };
        assert_eq!(store.events(q).await.unwrap().len(), 1);
    }
}
