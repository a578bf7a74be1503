//! The bus: how deliveries travel from ingest to the nodes that run them.
//!
//! `embedded` (the default) keeps them in the store's own tables (see [`crate::store::Bus`]);
//! `amqp` puts them on RabbitMQ queues, one per trigger, with the store still keeping the
//! history and deciding, by its claim, that each delivery runs once (see [`amqp`]).

pub mod amqp;

use crate::config::Secret;
use schemars::JsonSchema;
use serde::Deserialize;

/// `bus:` in the configuration.
#[derive(Debug, Deserialize, JsonSchema, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BusConfig {
    /// Deliveries in the store's tables (SQLite or PostgreSQL).
    #[default]
    Embedded,
    /// Deliveries on RabbitMQ: a topic exchange for events, a quorum queue per trigger.
    Amqp(AmqpBusConfig),
}

/// `bus: {type: amqp}`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AmqpBusConfig {
    /// The broker: `amqp://USER:PASSWORD@HOST:5672/VHOST` or `amqps://…` (a secret).
    #[schemars(with = "String")]
    pub url: Secret,
    /// Extra CA certificates (PEM) to trust for `amqps://`.
    pub ca_file: Option<String>,
    /// The topic exchange events are published to (routing key: the event type).
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// The prefix of the queues reflex declares (`PREFIX.trigger.NAME`, `PREFIX.delay.…`,
    /// `PREFIX.dead`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_exchange() -> String {
    "reflex.events".into()
}

fn default_prefix() -> String {
    "reflex".into()
}
