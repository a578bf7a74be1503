//! `type: amqp` — consumes a queue on an AMQP 0-9-1 broker (RabbitMQ) into events. A message
//! is a CloudEvent in binary mode (attributes in `cloudEvents:*`, `cloudEvents_*` or `ce_*`
//! headers), a structured CloudEvent (`application/cloudevents+json`), or any JSON body mapped
//! like the webhook source's. It is acknowledged only once its event is durable; a message
//! that cannot become an event (a poison message) is rejected without requeue, so that it
//! goes to the queue's dead-letter exchange if it has one, and is counted — never requeued
//! forever. The connection is opened again with backoff when it breaks; what was not
//! acknowledged is redelivered by the broker and deduplicated by event id.

use super::webhook::{Mapping, MappingConfig};
use crate::amqp::{explain, Broker};
use crate::config::{Config, Diagnostics, Secret, Text};
use crate::ingest::{Ingest, IngestError};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use schemars::JsonSchema;
use serde::Deserialize;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Configuration of `type: amqp`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AmqpSourceConfig {
    /// Unique source name.
    #[schemars(with = "String")]
    pub name: Text,
    /// The broker: `amqp://USER:PASSWORD@HOST:5672/VHOST` or `amqps://…` (a secret).
    #[schemars(with = "String")]
    pub url: Secret,
    /// Extra CA certificates (PEM) to trust for `amqps://`.
    pub ca_file: Option<String>,
    /// The queue to consume. It must exist unless `declare` is set.
    pub queue: String,
    /// Declare the queue (durable, quorum) when it does not exist.
    #[serde(default)]
    pub declare: bool,
    /// Messages taken at once before their acknowledgement (basic.qos); default 64.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// How a JSON body that is not a CloudEvent becomes an event (templates over `body`);
    /// the type is `reflex.amqp.<source name>` by default.
    #[serde(default)]
    pub mapping: MappingConfig,
    /// Largest message body accepted; larger ones are rejected as poison. Default 1 MiB.
    pub max_body: Option<crate::config::ByteSize>,
}

fn default_prefetch() -> u16 {
    64
}

/// A compiled `amqp` source.
pub struct AmqpSource {
    name: String,
    broker: Broker,
    queue: String,
    declare: bool,
    prefetch: u16,
    mapping: Mapping,
    max_body: usize,
}

/// Header prefixes that carry CloudEvents attributes in AMQP binary mode.
const CE_PREFIXES: &[&str] = &["cloudEvents:", "cloudEvents_", "ce_", "ce-"];

impl AmqpSource {
    /// Checks the URL, the queue name and the mapping.
    pub fn build(
        c: &AmqpSourceConfig,
        loc: &serde_saphyr::Location,
        _config: &Config,
        diags: &mut Diagnostics,
    ) -> Option<AmqpSource> {
        let name = &c.name.value;
        let what = format!("source `{name}`");
        let mut ok = true;
        let broker = match Broker::new(c.url.clone(), c.ca_file.as_deref(), &what) {
            Ok(b) => Some(b),
            Err(e) => {
                diags.at(loc, e);
                ok = false;
                None
            }
        };
        if c.queue.is_empty() || c.queue.len() > 255 {
            diags.at(
                loc,
                format!("{what}: queue must be a name of 1 to 255 bytes"),
            );
            ok = false;
        }
        if c.prefetch == 0 {
            diags.at(
                loc,
                format!("{what}: prefetch must be at least 1 (0 would take every message at once)"),
            );
            ok = false;
        }
        let mapping = match Mapping::compile(&c.mapping, &format!("reflex.amqp.{name}")) {
            Ok(m) => Some(m),
            Err(e) => {
                diags.at(loc, format!("{what}: {e}"));
                ok = false;
                None
            }
        };
        if !ok {
            return None;
        }
        Some(AmqpSource {
            name: name.clone(),
            broker: broker?,
            queue: c.queue.clone(),
            declare: c.declare,
            prefetch: c.prefetch,
            mapping: mapping?,
            max_body: c.max_body.map_or(1024 * 1024, |b| b.0),
        })
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Consumes until `shutdown`, connecting again with backoff (up to 30 s) after a failure.
    pub async fn run(self, ingest: Ingest, shutdown: CancellationToken) {
        let mut wait = Duration::from_millis(500);
        loop {
            let started = tokio::time::Instant::now();
            match self.consume(&ingest, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(source = %self.name, queue = %self.queue, error = %e, retry_in = ?wait, "the AMQP source is not consuming; it connects again");
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                wait = Duration::from_millis(500);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// One connection's life: `Ok` when reflex stops, an error when the connection breaks.
    async fn consume(&self, ingest: &Ingest, shutdown: &CancellationToken) -> Result<(), String> {
        let conn = self
            .broker
            .connect(&format!("reflex source {}", self.name))
            .await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {}", explain(&e)))?;
        let mut args = FieldTable::default();
        if self.declare {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        ch.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions {
                passive: !self.declare,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(|e| format!("queue `{}`: {}", self.queue, explain(&e)))?;
        ch.basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("basic.qos: {}", explain(&e)))?;
        let mut consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                format!("reflex-{}", self.name).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("consuming queue `{}`: {}", self.queue, explain(&e)))?;
        tracing::info!(source = %self.name, queue = %self.queue, broker = %self.broker.display(), "consuming");
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Unacknowledged messages go back to the queue when the channel closes.
                    let _ = ch.close(200, "reflex is stopping".into()).await;
                    let _ = conn.close(200, "reflex is stopping".into()).await;
                    return Ok(());
                }
                d = consumer.next() => d,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(format!("the consumer failed: {}", explain(&e))),
                None => return Err("the broker ended the consumer (queue deleted?)".into()),
            };
            self.take(ingest, delivery, shutdown).await?;
        }
    }

    /// Stores one message's event and acknowledges it, or rejects a poison message.
    async fn take(
        &self,
        ingest: &Ingest,
        d: Delivery,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let event = match self.event(&d) {
            Ok(e) => e,
            Err((reason, why)) => {
                tracing::warn!(source = %self.name, reason, error = %why, "a message cannot become an event; rejected to the queue's dead-letter exchange");
                ingest.metrics().events_rejected_n(&self.name, reason, 1);
                d.reject(BasicRejectOptions { requeue: false })
                    .await
                    .map_err(|e| format!("rejecting a message: {}", explain(&e)))?;
                return Ok(());
            }
        };
        let mut wait = Duration::from_millis(100);
        loop {
            match ingest.submit(&self.name, vec![event.clone()]).await {
                Ok(_) => break,
                Err(IngestError::Stopping) => return Ok(()),
                Err(e @ IngestError::TooDeep { .. }) => {
                    ingest
                        .metrics()
                        .events_rejected_n(&self.name, "too_deep", 1);
                    tracing::warn!(source = %self.name, error = %e, "a message cannot become an event; rejected");
                    d.reject(BasicRejectOptions { requeue: false })
                        .await
                        .map_err(|e| format!("rejecting a message: {}", explain(&e)))?;
                    return Ok(());
                }
                Err(e) => {
                    // Held, not acknowledged: the broker keeps it, and the prefetch bounds
                    // how many wait like this.
                    tracing::warn!(source = %self.name, error = %e, "a message is not stored yet; it waits unacknowledged");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        d.ack(BasicAckOptions::default())
            .await
            .map_err(|e| format!("acknowledging a stored message: {}", explain(&e)))?;
        Ok(())
    }

    /// The event of a message, or why it cannot be one (a metrics reason and a message).
    fn event(&self, d: &Delivery) -> Result<cloudevents::Event, (&'static str, String)> {
        if d.data.len() > self.max_body {
            return Err((
                "oversized",
                format!(
                    "the body is {} bytes; the limit is {} (max_body)",
                    d.data.len(),
                    self.max_body
                ),
            ));
        }
        let content_type = d
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default();
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let mut ce = HeaderMap::new();
        if let Some(headers) = d.properties.headers() {
            for (k, v) in headers {
                let k = k.as_str();
                let Some(attr) = CE_PREFIXES.iter().find_map(|p| k.strip_prefix(p)) else {
                    continue;
                };
                let value = match v {
                    AMQPValue::LongString(s) => s.to_string(),
                    AMQPValue::ShortString(s) => s.to_string(),
                    AMQPValue::Timestamp(t) => chrono::DateTime::from_timestamp(*t as i64, 0)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default(),
                    _ => continue,
                };
                let name =
                    HeaderName::from_bytes(format!("ce-{}", attr.to_ascii_lowercase()).as_bytes());
                let value = HeaderValue::from_str(&value);
                if let (Ok(n), Ok(v)) = (name, value) {
                    ce.insert(n, v);
                }
            }
        }
        let invalid = |e: String| ("invalid_cloudevent", e);
        if ce.contains_key("ce-specversion") || essence == "application/cloudevents+json" {
            if let Ok(v) = HeaderValue::from_str(&content_type) {
                if !content_type.is_empty() {
                    ce.insert("content-type", v);
                }
            }
            let mut event = cloudevents::binding::http::to_event(&ce, d.data.clone())
                .map_err(|e| invalid(format!("invalid CloudEvent: {e}")))?;
            if essence.is_empty() {
                if let Some(cloudevents::Data::Binary(raw)) = event.data() {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) {
                        event.set_data_unchecked(v);
                    }
                }
            }
            return Ok(event);
        }
        let body: serde_json::Value = serde_json::from_slice(&d.data)
            .map_err(|e| ("invalid_json", format!("the body is not JSON: {e}")))?;
        let default_id = d
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .filter(|m| !m.is_empty());
        self.mapping
            .event(&self.name, body, default_id)
            .map_err(|e| ("mapping", e))
    }
}
