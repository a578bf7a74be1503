//! Actions: what a delivery does. One file per kind, chosen by `type:` through [`ActionConfig`].

pub mod emit;
pub mod exec;
pub mod http;
pub mod http_request;

use crate::config::{Config, Diagnostics};
use crate::ingest::Ingest;
use cloudevents::Event;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Location;
use std::sync::Arc;

/// An action in the configuration, chosen by `type:`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ActionConfig {
    /// POST the CloudEvent to a function (Knative/OpenFaaS style).
    Http(http::HttpConfig),
    /// Any REST call, templated.
    HttpRequest(http_request::HttpRequestConfig),
    /// A local program with the event on stdin.
    Exec(exec::ExecConfig),
    /// A new event back into reflex.
    Emit(emit::EmitConfig),
}

/// A compiled action.
#[derive(Debug)]
pub enum Action {
    /// See [`http::HttpAction`].
    Http(http::HttpAction),
    /// See [`http_request::HttpRequestAction`].
    HttpRequest(http_request::HttpRequestAction),
    /// See [`exec::ExecAction`].
    Exec(exec::ExecAction),
    /// See [`emit::EmitAction`].
    Emit(emit::EmitAction),
}

/// What an action needs from the running server.
#[derive(Clone)]
pub struct ActionContext {
    /// Shared HTTP client (TLS verification on).
    pub client: reqwest::Client,
    /// Where emitted and reply events go.
    pub ingest: Ingest,
    /// `secrets.*` for templates.
    pub secrets: Arc<serde_json::Value>,
}

/// A successful attempt.
#[derive(Debug, Default)]
pub struct Outcome {
    /// A short description of what was done, kept in the attempt.
    pub detail: String,
}

/// A failed attempt; `permanent` failures are dead-lettered without further retries.
#[derive(Debug)]
pub struct ActionError {
    /// The error, verbatim.
    pub message: String,
    /// Retrying cannot help (e.g. HTTP 400, a missing program).
    pub permanent: bool,
}

impl ActionError {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        ActionError {
            message: message.into(),
            permanent: false,
        }
    }
    /// A failure retrying cannot fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        ActionError {
            message: message.into(),
            permanent: true,
        }
    }
}

impl Action {
    /// Compiles the action of trigger `trigger`, recording problems in `diags`.
    pub fn build(
        cfg: &ActionConfig,
        trigger: &str,
        config: &Config,
        loc: &Location,
        diags: &mut Diagnostics,
    ) -> Option<Action> {
        let r = match cfg {
            ActionConfig::Http(c) => http::HttpAction::build(c).map(Action::Http),
            ActionConfig::HttpRequest(c) => {
                http_request::HttpRequestAction::build(c).map(Action::HttpRequest)
            }
            ActionConfig::Exec(c) => exec::ExecAction::build(c).map(Action::Exec),
            ActionConfig::Emit(c) => emit::EmitAction::build(c, trigger).map(Action::Emit),
        };
        let _ = config;
        match r {
            Ok(a) => Some(a),
            Err(e) => {
                diags.at(loc, format!("trigger `{trigger}`: action: {e}"));
                None
            }
        }
    }

    /// The kind, as written in `type:`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Http(_) => "http",
            Action::HttpRequest(_) => "http_request",
            Action::Exec(_) => "exec",
            Action::Emit(_) => "emit",
        }
    }

    /// Runs one attempt.
    pub async fn execute(
        &self,
        event: &Event,
        ctx: &ActionContext,
    ) -> Result<Outcome, ActionError> {
        match self {
            Action::Http(a) => a.execute(event, ctx).await,
            Action::HttpRequest(a) => a.execute(event, ctx).await,
            Action::Exec(a) => a.execute(event).await,
            Action::Emit(a) => a.execute(event, ctx).await,
        }
    }
}

/// Classifies an HTTP status: 2xx ok, 408/425/429 and 5xx transient, other 4xx permanent.
pub(crate) fn status_error(status: reqwest::StatusCode, body: &str) -> Option<ActionError> {
    if status.is_success() {
        return None;
    }
    let snippet: String = body.chars().take(1024).collect();
    let msg = format!("HTTP {status}: {snippet}");
    let transient = status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429);
    Some(ActionError {
        message: msg,
        permanent: !transient,
    })
}

/// Describes a reqwest error with its causes (connection refused, timeout…).
pub(crate) fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
