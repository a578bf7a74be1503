//! Sources: where events come from. One file per kind, chosen by `type:` through
//! [`SourceConfig`]; shared request plumbing (auth, body limits, replies) lives in `util`.

pub mod alertmanager;
pub mod amqp;
pub mod auth;
pub mod cloudevents;
pub mod schedule;
pub mod slack;
pub mod syslog;
pub mod util;
pub mod vcenter;
pub mod webhook;

use crate::config::{Config, Diagnostics};
use crate::ingest::Ingest;
use axum::Router;
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::HashMap;

/// A source in the configuration, chosen by `type:`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// JSON from any system (logging, monitoring), mapped to an event.
    Webhook(webhook::WebhookConfig),
    /// CloudEvents over HTTP: binary, structured and batch.
    Cloudevents(cloudevents::CloudEventsConfig),
    /// vSphere events from a vCenter's EventManager.
    Vcenter(vcenter::VcenterSourceConfig),
    /// Prometheus Alertmanager's webhook: one event per alert.
    Alertmanager(alertmanager::AlertmanagerConfig),
    /// An event at each time of a cron expression.
    Schedule(schedule::ScheduleConfig),
    /// Syslog over UDP and TCP, lines turned into events by rules.
    Syslog(syslog::SyslogConfig),
    /// Slack slash commands and interactive payloads (ChatOps).
    Slack(slack::SlackConfig),
    /// A queue on an AMQP broker (RabbitMQ).
    Amqp(amqp::AmqpSourceConfig),
}

impl SourceConfig {
    /// Whether it accepts events from anyone who can reach the listener.
    pub fn unauthenticated(&self) -> bool {
        match self {
            SourceConfig::Webhook(c) => matches!(c.auth, auth::AuthConfig::None),
            SourceConfig::Cloudevents(c) => matches!(c.auth, auth::AuthConfig::None),
            SourceConfig::Vcenter(_) => false,
            SourceConfig::Alertmanager(c) => matches!(c.auth, auth::AuthConfig::None),
            SourceConfig::Schedule(_) => false,
            SourceConfig::Syslog(_) | SourceConfig::Slack(_) | SourceConfig::Amqp(_) => false,
        }
    }

    pub(crate) fn name(&self) -> &crate::config::Text {
        match self {
            SourceConfig::Webhook(c) => &c.name,
            SourceConfig::Cloudevents(c) => &c.name,
            SourceConfig::Vcenter(c) => &c.name,
            SourceConfig::Alertmanager(c) => &c.name,
            SourceConfig::Schedule(c) => &c.name,
            SourceConfig::Syslog(c) => &c.name,
            SourceConfig::Slack(c) => &c.name,
            SourceConfig::Amqp(c) => &c.name,
        }
    }
    /// The HTTP path, for sources served on the sources listener.
    fn path(&self) -> Option<&crate::config::Text> {
        match self {
            SourceConfig::Webhook(c) => Some(&c.path),
            SourceConfig::Cloudevents(c) => Some(&c.path),
            SourceConfig::Vcenter(_) => None,
            SourceConfig::Alertmanager(c) => Some(&c.path),
            SourceConfig::Slack(c) => Some(&c.path),
            SourceConfig::Schedule(_) | SourceConfig::Syslog(_) | SourceConfig::Amqp(_) => None,
        }
    }
}

/// A compiled source: its route on the sources listener.
pub enum Source {
    /// See [`webhook::Webhook`].
    Webhook(webhook::Webhook),
    /// See [`cloudevents::CloudEvents`].
    CloudEvents(cloudevents::CloudEvents),
    /// See [`vcenter::VcenterSource`].
    Vcenter(vcenter::VcenterSource),
    /// See [`alertmanager::Alertmanager`].
    Alertmanager(alertmanager::Alertmanager),
    /// See [`schedule::Schedule`].
    Schedule(Box<schedule::Schedule>),
    /// See [`syslog::Syslog`].
    Syslog(Box<syslog::Syslog>),
    /// See [`slack::Slack`].
    Slack(slack::Slack),
    /// See [`amqp::AmqpSource`].
    Amqp(Box<amqp::AmqpSource>),
}

/// A source that runs a task of its own instead of answering requests.
pub enum Task {
    /// See [`vcenter::VcenterSource`].
    Vcenter(vcenter::VcenterSource),
    /// See [`schedule::Schedule`].
    Schedule(Box<schedule::Schedule>),
    /// See [`syslog::Syslog`].
    Syslog(Box<syslog::Syslog>),
    /// See [`amqp::AmqpSource`].
    Amqp(Box<amqp::AmqpSource>),
}

impl Task {
    /// The source's name.
    pub fn name(&self) -> &str {
        match self {
            Task::Vcenter(v) => v.name(),
            Task::Schedule(s) => s.name(),
            Task::Syslog(s) => s.name(),
            Task::Amqp(s) => s.name(),
        }
    }

    /// Binds what the source listens on (before anything is served, so that a port in use
    /// stops the start with its reason).
    pub async fn bind(&mut self) -> anyhow::Result<()> {
        match self {
            Task::Syslog(s) => s.bind().await,
            Task::Vcenter(_) | Task::Schedule(_) | Task::Amqp(_) => Ok(()),
        }
    }

    /// Runs the source until `shutdown`.
    pub async fn run(
        self,
        ingest: Ingest,
        store: std::sync::Arc<dyn crate::store::Store>,
        vcenters: crate::vcenters::Vcenters,
        metrics: std::sync::Arc<crate::telemetry::Metrics>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        match self {
            Task::Vcenter(v) => v.run(ingest, store, vcenters, metrics, shutdown).await,
            Task::Schedule(s) => {
                s.run(ingest, store, crate::deliveries::Clock::System, shutdown)
                    .await
            }
            Task::Syslog(s) => s.run(ingest, shutdown).await,
            Task::Amqp(s) => s.run(ingest, shutdown).await,
        }
    }
}

/// Paths that the sources listener answers itself.
const RESERVED: &[&str] = &["/healthz", "/readyz"];

/// Compiles every source, recording every problem in `diags`.
pub fn build(config: &Config, diags: &mut Diagnostics) -> Vec<Source> {
    let mut names: HashMap<&str, ()> = HashMap::new();
    let mut paths: HashMap<&str, &str> = HashMap::new();
    let mut out = Vec::new();
    for spanned in &config.sources {
        let s = &spanned.value;
        // Positions inside a `type:`-tagged item are not kept by serde; the item's is.
        let at = |t: &crate::config::Text| {
            if t.referenced.line() > 0 {
                t.referenced
            } else {
                spanned.referenced
            }
        };
        let name = s.name();
        let path = s.path();
        if name.value.is_empty()
            || !name
                .value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            diags.at(
                &at(name),
                format!(
                    "source name `{}` must be non-empty letters, digits, `-` or `_`",
                    name.value
                ),
            );
        } else if names.insert(&name.value, ()).is_some() {
            diags.at(&at(name), format!("duplicate source name `{}`", name.value));
        }
        if let Some(path) = path {
            if !path.value.starts_with('/') || path.value.contains(['{', '}', '*']) {
                diags.at(
                    &at(path),
                    format!(
                        "source `{}`: path `{}` must start with `/` and be literal",
                        name.value, path.value
                    ),
                );
            } else if RESERVED.contains(&path.value.as_str()) {
                diags.at(
                    &at(path),
                    format!("source `{}`: path `{}` is reserved", name.value, path.value),
                );
            } else if let Some(other) = paths.insert(&path.value, &name.value) {
                diags.at(
                    &at(path),
                    format!(
                        "source `{}`: path `{}` is already used by source `{other}`",
                        name.value, path.value
                    ),
                );
            }
        }
        let built = match s {
            SourceConfig::Webhook(c) => {
                webhook::Webhook::build(c, &at(&c.name), config, diags).map(Source::Webhook)
            }
            SourceConfig::Cloudevents(c) => {
                cloudevents::CloudEvents::build(c, &at(&c.name), config, diags)
                    .map(Source::CloudEvents)
            }
            SourceConfig::Vcenter(c) => {
                vcenter::VcenterSource::build(c, &at(&c.name), config, diags).map(Source::Vcenter)
            }
            SourceConfig::Alertmanager(c) => {
                alertmanager::Alertmanager::build(c, &at(&c.name), config, diags)
                    .map(Source::Alertmanager)
            }
            SourceConfig::Schedule(c) => schedule::Schedule::build(c, &at(&c.name), config, diags)
                .map(|s| Source::Schedule(Box::new(s))),
            SourceConfig::Syslog(c) => syslog::Syslog::build(c, &at(&c.name), config, diags)
                .map(|s| Source::Syslog(Box::new(s))),
            SourceConfig::Slack(c) => {
                slack::Slack::build(c, &at(&c.name), config, diags).map(Source::Slack)
            }
            SourceConfig::Amqp(c) => amqp::AmqpSource::build(c, &at(&c.name), config, diags)
                .map(|s| Source::Amqp(Box::new(s))),
        };
        out.extend(built);
    }
    out
}

/// The sources listener's routes, and the sources that run tasks instead of listening.
pub fn routes(
    sources: Vec<Source>,
    ingest: Ingest,
    decider: crate::deliveries::approval::Decider,
) -> (Router, Vec<Task>) {
    let mut router = Router::new();
    let mut pollers = Vec::new();
    for s in sources {
        router = match s {
            Source::Webhook(w) => w.route(router, ingest.clone()),
            Source::CloudEvents(c) => c.route(router, ingest.clone()),
            Source::Alertmanager(a) => a.route(router, ingest.clone()),
            Source::Slack(s) => s.route(router, ingest.clone(), decider.clone()),
            Source::Vcenter(v) => {
                pollers.push(Task::Vcenter(v));
                router
            }
            Source::Schedule(s) => {
                pollers.push(Task::Schedule(s));
                router
            }
            Source::Syslog(s) => {
                pollers.push(Task::Syslog(s));
                router
            }
            Source::Amqp(s) => {
                pollers.push(Task::Amqp(s));
                router
            }
        };
    }
    (router, pollers)
}
