//! Actions: what a delivery does. One file per kind, chosen by `type:` through [`ActionConfig`].

pub mod emit;
pub mod exec;
pub mod http;
pub mod http_request;
pub mod vsphere;

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
    /// Disconnect a VM's NICs (connected and connect-at-power-on both false).
    #[serde(rename = "vsphere.disconnect_nics")]
    VsphereDisconnectNics(vsphere::NicsConfig),
    /// Connect a VM's NICs.
    #[serde(rename = "vsphere.connect_nics")]
    VsphereConnectNics(vsphere::NicsConfig),
    /// Power on, off, reset, suspend, shut down or reboot a VM.
    #[serde(rename = "vsphere.power")]
    VspherePower(vsphere::PowerConfig),
    /// Set a VM's CPU count and memory, within maximums, guarded by its changeVersion.
    #[serde(rename = "vsphere.reconfigure")]
    VsphereReconfigure(vsphere::ReconfigureConfig),
    /// Attach a tag (optionally replacing the category's other tags).
    #[serde(rename = "vsphere.tag")]
    VsphereTag(vsphere::TagConfig),
    /// Detach a tag.
    #[serde(rename = "vsphere.untag")]
    VsphereUntag(vsphere::TagConfig),
    /// Move a VM to a datastore, or to the allowed one with the most free space.
    #[serde(rename = "vsphere.relocate")]
    VsphereRelocate(vsphere::RelocateConfig),
    /// Enter or exit host maintenance mode.
    #[serde(rename = "vsphere.host_maintenance")]
    VsphereHostMaintenance(vsphere::HostMaintenanceConfig),
    /// Delete a VM (powering it off first when asked).
    #[serde(rename = "vsphere.delete_vm")]
    VsphereDeleteVm(vsphere::DeleteConfig),
    /// Clone a VM or a template.
    #[serde(rename = "vsphere.clone_vm")]
    VsphereCloneVm(vsphere::CloneConfig),
    /// Create an empty VM.
    #[serde(rename = "vsphere.create_vm")]
    VsphereCreateVm(vsphere::CreateConfig),
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
    /// See [`vsphere::VsphereAction`].
    Vsphere(vsphere::VsphereAction),
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
    /// The configured vCenters.
    pub vcenters: crate::vcenters::Vcenters,
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
            ActionConfig::VsphereDisconnectNics(c) => {
                vsphere::VsphereAction::nics(c, false).map(Action::Vsphere)
            }
            ActionConfig::VsphereConnectNics(c) => {
                vsphere::VsphereAction::nics(c, true).map(Action::Vsphere)
            }
            ActionConfig::VspherePower(c) => vsphere::VsphereAction::power(c).map(Action::Vsphere),
            ActionConfig::VsphereTag(c) => {
                vsphere::VsphereAction::tag(c, false).map(Action::Vsphere)
            }
            ActionConfig::VsphereUntag(c) => {
                vsphere::VsphereAction::tag(c, true).map(Action::Vsphere)
            }
            ActionConfig::VsphereRelocate(c) => {
                vsphere::VsphereAction::relocate(c).map(Action::Vsphere)
            }
            ActionConfig::VsphereHostMaintenance(c) => {
                vsphere::VsphereAction::host_maintenance(c).map(Action::Vsphere)
            }
            ActionConfig::VsphereDeleteVm(c) => {
                vsphere::VsphereAction::delete(c).map(Action::Vsphere)
            }
            ActionConfig::VsphereCreateVm(c) => {
                vsphere::VsphereAction::create(c).map(Action::Vsphere)
            }
            ActionConfig::VsphereCloneVm(c) => {
                vsphere::VsphereAction::clone_vm(c).map(Action::Vsphere)
            }
            ActionConfig::VsphereReconfigure(c) => {
                vsphere::VsphereAction::reconfigure(c).map(Action::Vsphere)
            }
        };
        let r = r.and_then(|a| match &a {
            Action::Vsphere(v) if !config.vcenters.contains_key(v.vcenter()) => Err(format!(
                "vcenter `{}` is not configured under `vcenters:` (configured: {:?})",
                v.vcenter(),
                config.vcenters.keys().collect::<Vec<_>>()
            )),
            _ => Ok(a),
        });
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
            Action::Vsphere(_) => "vsphere",
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
            Action::Vsphere(a) => a.execute(event, ctx).await,
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
