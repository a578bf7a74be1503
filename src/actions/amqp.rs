//! `type: amqp` — publishes the event (or a template over it) to an exchange, persistent and
//! confirmed by the broker, as seed 000's webhook server handed alerts to Aria Orchestrator's
//! AMQP policy. An attempt succeeds only once the broker confirms the message and a queue
//! took it (published `mandatory`: a message no queue is bound for is a failed attempt,
//! not a silent drop).

use super::{ActionError, Outcome};
use crate::amqp::{explain, Broker};
use crate::config::Secret;
use crate::template::Template;
use cloudevents::{AttributesReader, Event};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Configuration of `type: amqp`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// The broker: `amqp://USER:PASSWORD@HOST:5672/VHOST` or `amqps://…` (a secret, e.g.
    /// `${env:AMQP_URL}`).
    #[schemars(with = "String")]
    pub url: Secret,
    /// Extra CA certificates (PEM) to trust for `amqps://`; TLS verification is always on.
    pub ca_file: Option<String>,
    /// The exchange; the default exchange (`""`, routing by queue name) when absent.
    #[serde(default)]
    pub exchange: String,
    /// The routing key (template); the event's type by default.
    pub routing_key: Option<String>,
    /// Message headers (templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body (template); the event as a structured CloudEvent (JSON) by default.
    pub body: Option<String>,
    /// The body's content type; `application/cloudevents+json` for the event,
    /// `application/json` for a `body` template, by default.
    pub content_type: Option<String>,
}

/// A compiled `amqp` action; it keeps one connection and confirming channel, opened at the
/// first attempt and opened again after it breaks.
#[derive(Debug)]
pub struct AmqpAction {
    broker: Broker,
    exchange: String,
    routing_key: Option<Template>,
    headers: Vec<(String, Template)>,
    body: Option<Template>,
    content_type: String,
    open: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl AmqpAction {
    /// Checks the URL and CA file and compiles the templates.
    pub fn build(c: &AmqpConfig) -> Result<AmqpAction, String> {
        let broker = Broker::new(c.url.clone(), c.ca_file.as_deref(), "amqp")?;
        let tpl = |s: &str, what: &str| Template::compile(s).map_err(|e| format!("{what}: {e}"));
        let headers = c
            .headers
            .iter()
            .map(|(k, v)| Ok((k.clone(), tpl(v, &format!("headers.{k}"))?)))
            .collect::<Result<_, String>>()?;
        Ok(AmqpAction {
            broker,
            exchange: c.exchange.clone(),
            routing_key: c
                .routing_key
                .as_deref()
                .map(|s| tpl(s, "routing_key"))
                .transpose()?,
            headers,
            body: c.body.as_deref().map(|s| tpl(s, "body")).transpose()?,
            content_type: c.content_type.clone().unwrap_or_else(|| {
                if c.body.is_some() {
                    "application/json".into()
                } else {
                    "application/cloudevents+json".into()
                }
            }),
            open: tokio::sync::Mutex::new(None),
        })
    }

    /// The open channel, or a new connection and channel in confirm mode.
    async fn channel(&self) -> Result<Channel, ActionError> {
        let mut open = self.open.lock().await;
        if let Some((conn, ch)) = open.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        *open = None;
        let conn = self
            .broker
            .connect("reflex amqp action")
            .await
            .map_err(|e| ActionError::transient(format!("amqp: {e}")))?;
        let ch = conn.create_channel().await.map_err(|e| self.failed(&e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.failed(&e))?;
        *open = Some((conn, ch.clone()));
        Ok(ch)
    }

    fn failed(&self, e: &lapin::Error) -> ActionError {
        ActionError::transient(format!(
            "amqp: publishing to exchange `{}` on {}: {}",
            self.exchange,
            self.broker.display(),
            explain(e)
        ))
    }

    /// Publishes one message and waits for the broker's confirm.
    pub async fn execute(&self, event: &Event) -> Result<Outcome, ActionError> {
        let view = super::template_view(event, None);
        let render = |t: &Template, what: &str| {
            t.render(&view)
                .map_err(|e| ActionError::permanent(format!("amqp: {what}: {e}")))
        };
        let routing_key = match &self.routing_key {
            Some(t) => render(t, "routing_key")?.trim().to_string(),
            None => event.ty().to_string(),
        };
        if routing_key.len() > 255 {
            return Err(ActionError::permanent(format!(
                "amqp: the routing key is {} bytes; AMQP allows 255",
                routing_key.len()
            )));
        }
        let body = match &self.body {
            Some(t) => render(t, "body")?.into_bytes(),
            None => crate::event::to_json(event).into_bytes(),
        };
        let mut headers = FieldTable::default();
        for (k, t) in &self.headers {
            headers.insert(
                ShortString::from(k.as_str()),
                AMQPValue::LongString(LongString::from(render(t, &format!("headers.{k}"))?)),
            );
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(self.content_type.as_str().into())
            .with_message_id(event.id().into())
            .with_type(event.ty().into())
            .with_app_id("reflex".into())
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_headers(headers);
        if super::dry_run() {
            return Ok(super::would(format!(
                "publish {} bytes to exchange `{}` with routing key `{routing_key}`",
                body.len(),
                self.exchange
            )));
        }
        let ch = self.channel().await?;
        let confirm = ch
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                props,
            )
            .await
            .map_err(|e| self.failed(&e))?;
        let confirmation = confirm.await.map_err(|e| self.failed(&e))?;
        if confirmation.is_nack() {
            return Err(ActionError::transient(format!(
                "amqp: the broker did not take the message (nack) on exchange `{}`",
                self.exchange
            )));
        }
        if let Some(returned) = confirmation.take_message() {
            return Err(ActionError::transient(format!(
                "amqp: no queue is bound to exchange `{}` for routing key `{routing_key}` ({} {}); the message was not kept",
                self.exchange, returned.reply_code, returned.reply_text
            )));
        }
        Ok(Outcome {
            output: None,
            detail: format!(
                "published {} bytes to exchange `{}` with routing key `{routing_key}` (confirmed)",
                body.len(),
                self.exchange
            ),
        })
    }
}
