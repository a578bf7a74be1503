//! Actions: what a delivery does. One file per kind, chosen by `type:` through [`ActionConfig`].

pub mod amqp;
pub mod email;
pub mod emit;
pub mod exec;
pub mod http;
pub mod http_request;
pub mod notify;
#[cfg(test)]
pub mod scripted;
pub mod vsphere;
pub mod workflow;

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
    /// A message to an AMQP exchange (RabbitMQ), persistent and confirmed.
    Amqp(amqp::AmqpConfig),
    /// Ordered steps, each an action, with conditions and results for later steps.
    Workflow(workflow::WorkflowConfig),
    /// A Slack message (incoming webhook or chat.postMessage).
    #[serde(rename = "notify.slack")]
    NotifySlack(notify::SlackConfig),
    /// A Microsoft Teams message (incoming webhook).
    #[serde(rename = "notify.teams")]
    NotifyTeams(notify::TeamsConfig),
    /// A PagerDuty alert: trigger, acknowledge or resolve (Events API v2).
    #[serde(rename = "notify.pagerduty")]
    NotifyPagerduty(notify::PagerDutyConfig),
    /// A POST signed as Standard Webhooks specifies.
    #[serde(rename = "notify.webhook")]
    NotifyWebhook(notify::SignedWebhookConfig),
    /// An e-mail over SMTP (STARTTLS or TLS; clear text to a loopback relay only).
    #[serde(rename = "notify.email")]
    NotifyEmail(email::EmailConfig),
    /// Disconnect a VM's NICs (connected and connect-at-power-on both false).
    #[serde(rename = "vsphere.disconnect_nics")]
    VsphereDisconnectNics(vsphere::NicsConfig),
    /// Connect a VM's NICs.
    #[serde(rename = "vsphere.connect_nics")]
    VsphereConnectNics(vsphere::NicsConfig),
    /// Read a VM's facts (power state, CPUs, memory, tags by category, custom attributes,
    /// datastores, host, folder, changeVersion) for later workflow steps.
    #[serde(rename = "vsphere.get_vm")]
    VsphereGetVm(vsphere::GetVmConfig),
    /// Read a host's facts (connection, power and maintenance state, cluster, CPU cores,
    /// memory, its VMs and how many are on) for later workflow steps.
    #[serde(rename = "vsphere.get_host")]
    VsphereGetHost(vsphere::GetHostConfig),
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

impl ActionConfig {
    /// Whether the action waits for vCenter tasks (which may take up to
    /// [`vsphere::TASK_ATTEMPT`](crate::actions::vsphere::TASK_ATTEMPT)), so that its attempts need more time than the default.
    pub fn runs_vcenter_tasks(&self) -> bool {
        if let ActionConfig::Workflow(w) = self {
            return workflow::WorkflowAction::runs_vcenter_tasks(w);
        }
        !matches!(
            self,
            ActionConfig::Http(_)
                | ActionConfig::HttpRequest(_)
                | ActionConfig::Exec(_)
                | ActionConfig::Emit(_)
                | ActionConfig::Amqp(_)
                | ActionConfig::NotifySlack(_)
                | ActionConfig::NotifyTeams(_)
                | ActionConfig::NotifyPagerduty(_)
                | ActionConfig::NotifyWebhook(_)
                | ActionConfig::NotifyEmail(_)
        )
    }

    /// Whether the action may change something outside reflex: anything but notifications,
    /// emitted events and reads. What `deliveries.blast_radius` counts.
    pub fn may_change(&self) -> bool {
        match self {
            ActionConfig::Workflow(w) => w
                .steps
                .iter()
                .chain(&w.on_failure)
                .any(|s| s.action.may_change()),
            ActionConfig::Emit(_)
            | ActionConfig::NotifySlack(_)
            | ActionConfig::NotifyTeams(_)
            | ActionConfig::NotifyPagerduty(_)
            | ActionConfig::NotifyWebhook(_)
            | ActionConfig::NotifyEmail(_)
            | ActionConfig::VsphereGetVm(_)
            | ActionConfig::VsphereGetHost(_) => false,
            _ => true,
        }
    }

    /// The time allowed for one attempt when the trigger does not say.
    pub fn default_timeout(&self) -> std::time::Duration {
        if self.runs_vcenter_tasks() {
            vsphere::TASK_ATTEMPT
        } else {
            std::time::Duration::from_secs(30)
        }
    }
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
    /// See [`amqp::AmqpAction`].
    Amqp(Box<amqp::AmqpAction>),
    /// See [`workflow::WorkflowAction`].
    Workflow(Box<workflow::WorkflowAction>),
    /// See [`notify::NotifyAction`].
    Notify(Box<notify::NotifyAction>),
    /// See [`email::EmailAction`].
    Email(Box<email::EmailAction>),
    /// See [`vsphere::VsphereAction`].
    Vsphere(vsphere::VsphereAction),
    /// Answers from a script (tests of the dispatcher's timing).
    #[cfg(test)]
    Scripted(scripted::Scripted),
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
    /// The paused triggers.
    pub pauses: crate::deliveries::Pauses,
    /// One change under a cluster's budgets at a time, across nodes.
    pub budget_locks: crate::vcenters::BudgetLocks,
}

tokio::task_local! {
    /// The steps a workflow ran so far (`steps.NAME.{status, output, detail, error}`),
    /// for the templates of its next step.
    static STEPS: serde_json::Value;
    /// What the attempt running now knows of the delivery's history.
    pub(crate) static ATTEMPT: AttemptInfo;
    /// The action runs dry: it reads, and records what it would do, changing nothing.
    pub(crate) static DRY_RUN: bool;
    /// A correlated delivery's events (`events` in templates), oldest first.
    pub(crate) static CORRELATED: serde_json::Value;
}

/// The CloudEvents extension counting how many actions led to an event (emit, replies).
pub const CHAIN_DEPTH_EXT: &str = "reflexdepth";

/// Longest chain of events made by actions from events made by actions: past it an action
/// refuses to make another (a loop between triggers), and its delivery is dead with why.
pub const MAX_CHAIN_DEPTH: i64 = 8;

/// The chain depth of an event an action makes from `parent`, or why it may not make it.
pub(crate) fn next_depth(parent: &Event) -> Result<i64, ActionError> {
    let depth = crate::event::attribute(parent, CHAIN_DEPTH_EXT)
        .and_then(|d| d.parse::<i64>().ok())
        .unwrap_or(0)
        + 1;
    if depth > MAX_CHAIN_DEPTH {
        return Err(ActionError::permanent(format!(
            "loop guard: this would be event {depth} of a chain of events made by actions; the limit is {MAX_CHAIN_DEPTH} (do triggers feed each other in a loop?)"
        )));
    }
    Ok(depth)
}

impl Action {
    /// What the action would do now: a dry run of it (vSphere actions read the live state),
    /// whatever the attempt's own mode.
    pub(crate) async fn plan(
        &self,
        event: &Event,
        ctx: &ActionContext,
    ) -> Result<Outcome, ActionError> {
        DRY_RUN
            .scope(
                true,
                ::vsphere::journal::TaskJournal::resuming(None)
                    .planning(true)
                    .scope_owned(Box::pin(self.execute(event, ctx))),
            )
            .await
    }
}

/// Whether the action running now is a dry run.
pub(crate) fn dry_run() -> bool {
    DRY_RUN.try_with(|d| *d).unwrap_or(false)
}

/// A dry run's outcome: what the action would do.
pub(crate) fn would(what: impl std::fmt::Display) -> Outcome {
    Outcome {
        detail: format!("dry run: would {what}; nothing was done"),
        output: None,
    }
}

/// What the attempt running now knows of the delivery's history (set by the dispatcher).
#[derive(Debug, Clone, Default)]
pub(crate) struct AttemptInfo {
    /// The delivery (approvals are kept per delivery and step).
    pub(crate) delivery: i64,
    /// Its trigger.
    pub(crate) trigger: String,
    /// The previous attempt's record, when it failed (a workflow resumes from it).
    pub(crate) previous_error: Option<String>,
    /// No attempt follows this one if it fails (its budget is spent).
    pub(crate) last: bool,
}

/// What action templates see: `event`, `secrets` where the action allows them, and inside
/// a workflow the `steps` run so far.
pub(crate) fn template_view(
    event: &Event,
    secrets: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut view = serde_json::Map::new();
    view.insert("event".into(), crate::event::view(event));
    if let Some(s) = secrets {
        view.insert("secrets".into(), s.clone());
    }
    if let Ok(steps) = STEPS.try_with(|s| s.clone()) {
        view.insert("steps".into(), steps);
    }
    if let Ok(events) = CORRELATED.try_with(|e| e.clone()) {
        view.insert("events".into(), events);
    }
    serde_json::Value::Object(view)
}

/// A successful attempt.
#[derive(Debug, Default)]
pub struct Outcome {
    /// A short description of what was done, kept in the attempt.
    pub detail: String,
    /// What the action read or answered, for later steps of a workflow
    /// (`steps.NAME.output`): an `http_request`'s JSON reply, a workflow's steps.
    pub output: Option<serde_json::Value>,
}

/// A failed attempt; `permanent` failures are dead-lettered without further retries.
#[derive(Debug)]
pub struct ActionError {
    /// The error, verbatim.
    pub message: String,
    /// Retrying cannot help (e.g. HTTP 400, a missing program).
    pub permanent: bool,
    /// The HTTP status the target answered, when it answered one.
    pub status: Option<u16>,
    /// When the target asked to be retried (its `Retry-After`), if it did.
    pub retry_after: Option<std::time::Duration>,
    /// Not a failure: the change waits for an approval until this time (ms since the
    /// epoch); the delivery sleeps until then or until someone decides.
    pub waiting_until: Option<i64>,
}

impl ActionError {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        ActionError {
            message: message.into(),
            permanent: false,
            status: None,
            retry_after: None,
            waiting_until: None,
        }
    }
    /// A failure retrying cannot fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        ActionError {
            message: message.into(),
            permanent: true,
            status: None,
            retry_after: None,
            waiting_until: None,
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
            ActionConfig::Workflow(c) => {
                return workflow::WorkflowAction::build(c, trigger, config, loc, diags)
                    .map(|w| Action::Workflow(Box::new(w)))
            }
            ActionConfig::Http(c) => http::HttpAction::build(c).map(Action::Http),
            ActionConfig::NotifySlack(c) => {
                notify::NotifyAction::slack(c).map(|a| Action::Notify(Box::new(a)))
            }
            ActionConfig::NotifyTeams(c) => {
                notify::NotifyAction::teams(c).map(|a| Action::Notify(Box::new(a)))
            }
            ActionConfig::NotifyPagerduty(c) => {
                notify::NotifyAction::pagerduty(c).map(|a| Action::Notify(Box::new(a)))
            }
            ActionConfig::NotifyWebhook(c) => {
                notify::NotifyAction::webhook(c).map(|a| Action::Notify(Box::new(a)))
            }
            ActionConfig::NotifyEmail(c) => {
                email::EmailAction::build(c).map(|a| Action::Email(Box::new(a)))
            }
            ActionConfig::HttpRequest(c) => {
                http_request::HttpRequestAction::build(c).map(Action::HttpRequest)
            }
            ActionConfig::Exec(c) => exec::ExecAction::build(c).map(Action::Exec),
            ActionConfig::Emit(c) => emit::EmitAction::build(c, trigger).map(Action::Emit),
            ActionConfig::Amqp(c) => amqp::AmqpAction::build(c).map(|a| Action::Amqp(Box::new(a))),
            ActionConfig::VsphereDisconnectNics(c) => {
                vsphere::VsphereAction::nics(c, false).map(Action::Vsphere)
            }
            ActionConfig::VsphereConnectNics(c) => {
                vsphere::VsphereAction::nics(c, true).map(Action::Vsphere)
            }
            ActionConfig::VspherePower(c) => vsphere::VsphereAction::power(c).map(Action::Vsphere),
            ActionConfig::VsphereGetVm(c) => vsphere::VsphereAction::get_vm(c).map(Action::Vsphere),
            ActionConfig::VsphereGetHost(c) => {
                vsphere::VsphereAction::get_host(c).map(Action::Vsphere)
            }
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
            Action::Amqp(_) => "amqp",
            Action::Workflow(_) => "workflow",
            Action::Notify(_) => "notify",
            Action::Email(_) => "notify.email",
            Action::Vsphere(_) => "vsphere",
            #[cfg(test)]
            Action::Scripted(_) => "scripted",
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
            Action::Amqp(a) => a.execute(event).await,
            Action::Workflow(a) => Box::pin(a.execute(event, ctx)).await,
            Action::Notify(a) => a.execute(event, ctx).await,
            Action::Email(a) => a.execute(event, ctx).await,
            Action::Vsphere(a) => a.execute(event, ctx).await,
            #[cfg(test)]
            Action::Scripted(a) => a.execute(event).await,
        }
    }
}

/// Classifies an HTTP status: 2xx ok, 408/425/429 and 5xx transient, other 4xx permanent.
/// A `Retry-After` on a 429 or 503 is kept for the retry schedule.
pub(crate) fn status_error(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
) -> Option<ActionError> {
    if status.is_success() {
        return None;
    }
    let snippet: String = body.chars().take(1024).collect();
    let msg = if status.is_redirection() {
        format!("HTTP {status}: redirects are not followed (they would carry the action's headers elsewhere); point the action at the final URL")
    } else {
        format!("HTTP {status}: {snippet}")
    };
    let transient = status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429);
    let retry_after = matches!(status.as_u16(), 429 | 503)
        .then(|| headers.get(reqwest::header::RETRY_AFTER))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
    Some(ActionError {
        message: msg,
        permanent: !transient,
        status: Some(status.as_u16()),
        retry_after,
        waiting_until: None,
    })
}

/// A `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 §10.2.3); a date in the
/// past means now. `None` when it is neither.
pub(crate) fn parse_retry_after(
    value: &str,
    now: std::time::SystemTime,
) -> Option<std::time::Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Largest reply body read from a target; the rest is not read (a CloudEvent reply
/// larger than this is refused).
pub(crate) const MAX_REPLY: usize = 1024 * 1024;

/// Reads at most `limit` bytes of a reply body; `true` when there was more.
pub(crate) async fn read_bounded(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = limit - out.len();
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok((out, true));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, false))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        // 2023-11-14T22:13:20Z is `now`; a minute later:
        let date = httpdate::fmt_http_date(now + Duration::from_secs(60));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(60)));
        // A date in the past means now.
        let past = httpdate::fmt_http_date(now - Duration::from_secs(60));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn a_429_or_503_keeps_its_retry_after_and_status() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "30".parse().unwrap());
        let e = status_error(reqwest::StatusCode::TOO_MANY_REQUESTS, &h, "slow down").unwrap();
        assert_eq!(
            (e.status, e.retry_after, e.permanent),
            (Some(429), Some(Duration::from_secs(30)), false)
        );
        let e = status_error(reqwest::StatusCode::SERVICE_UNAVAILABLE, &h, "").unwrap();
        assert_eq!(e.retry_after, Some(Duration::from_secs(30)));
        // Other statuses do not ask to be retried later.
        let e = status_error(reqwest::StatusCode::INTERNAL_SERVER_ERROR, &h, "").unwrap();
        assert_eq!(e.retry_after, None);
        assert!(status_error(reqwest::StatusCode::OK, &h, "").is_none());
    }
}
