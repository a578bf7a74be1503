//! `type: notify.slack`, `notify.teams`, `notify.pagerduty`, `notify.webhook` — telling
//! people (or another system) what happened, with templates over `event` (and `steps` in a
//! workflow). Webhook URLs, tokens, routing keys and signing secrets are secrets: masked in
//! every record, log and answer. Redirects are not followed.

use super::{describe_reqwest, status_error, ActionContext, ActionError, Outcome};
use crate::config::Secret;
use crate::template::Template;
use cloudevents::{AttributesReader, Event};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// `notify.slack`: an incoming webhook, or `chat.postMessage` with a bot token.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// An incoming webhook URL (`https://hooks.slack.com/services/…`), a secret.
    #[schemars(with = "Option<String>")]
    pub webhook_url: Option<Secret>,
    /// A bot token (`xoxb-…`) for `chat.postMessage`, a secret; with `channel`.
    #[schemars(with = "Option<String>")]
    pub token: Option<Secret>,
    /// The channel for `chat.postMessage` (template), e.g. `#ops` or `C0123456`.
    pub channel: Option<String>,
    /// The message (template; Slack's mrkdwn).
    pub text: String,
    /// Block Kit blocks (template rendering a JSON array).
    pub blocks: Option<String>,
    /// The Web API base (default `https://slack.com/api`).
    pub api_url: Option<String>,
}

/// `notify.teams`: a Microsoft Teams incoming webhook (a MessageCard).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TeamsConfig {
    /// The incoming webhook URL, a secret.
    #[schemars(with = "String")]
    pub webhook_url: Secret,
    /// The card's title (template).
    pub title: Option<String>,
    /// The message (template; Markdown).
    pub text: String,
}

/// `notify.pagerduty`: PagerDuty Events API v2.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PagerDutyConfig {
    /// The integration's routing key, a secret.
    #[schemars(with = "String")]
    pub routing_key: Secret,
    /// `trigger`, `acknowledge` or `resolve` (template), `trigger` by default.
    pub event_action: Option<String>,
    /// The key that ties a resolve to its trigger (template), the event's subject by default.
    pub dedup_key: Option<String>,
    /// The alert's summary (template), required for `trigger`.
    pub summary: Option<String>,
    /// `critical`, `error`, `warning` or `info` (template), `error` by default.
    pub severity: Option<String>,
    /// Where the problem is (template), the event's source by default.
    pub source: Option<String>,
    /// The Events API URL (default `https://events.pagerduty.com/v2/enqueue`).
    pub url: Option<String>,
}

/// `notify.webhook`: a POST signed as Standard Webhooks specifies.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedWebhookConfig {
    /// The receiver's URL.
    pub url: String,
    /// The signing secret (`whsec_` + base64, or raw), a secret.
    #[schemars(with = "String")]
    pub secret: Secret,
    /// The body (template); the event as a structured CloudEvent by default.
    pub body: Option<String>,
}

/// A compiled `notify.*` action.
#[derive(Debug)]
pub enum NotifyAction {
    /// Slack.
    Slack {
        /// Webhook URL or (API URL, token, channel).
        to: SlackTarget,
        /// Message.
        text: Template,
        /// Blocks JSON.
        blocks: Option<Template>,
    },
    /// Teams.
    Teams {
        /// Webhook.
        url: Secret,
        /// Title.
        title: Option<Template>,
        /// Message.
        text: Template,
    },
    /// PagerDuty.
    PagerDuty {
        /// Routing key.
        key: Secret,
        /// Action, dedup key, summary, severity, source.
        fields: Box<[Option<Template>; 5]>,
        /// API URL.
        url: reqwest::Url,
    },
    /// Standard Webhooks.
    Webhook {
        /// Receiver.
        url: reqwest::Url,
        /// Signing secret.
        secret: Secret,
        /// Body.
        body: Option<Template>,
    },
}

/// Where a Slack message goes.
#[derive(Debug)]
pub enum SlackTarget {
    /// An incoming webhook.
    Webhook(Secret),
    /// `chat.postMessage`.
    Api {
        /// `…/chat.postMessage`.
        url: reqwest::Url,
        /// Bot token.
        token: Secret,
        /// Channel template.
        channel: Template,
    },
}

fn tpl(s: &str, what: &str) -> Result<Template, String> {
    Template::compile(s).map_err(|e| format!("{what}: {e}"))
}

fn opt(s: &Option<String>, what: &str) -> Result<Option<Template>, String> {
    s.as_deref().map(|s| tpl(s, what)).transpose()
}

fn secret_url(s: &Secret, what: &str) -> Result<(), String> {
    // The value is a secret: the error names the field, not the URL.
    super::http::parse_http_url(s.expose())
        .map(|_| ())
        .map_err(|_| format!("{what} is not an http(s) URL"))
}

impl NotifyAction {
    /// `notify.slack`.
    pub fn slack(c: &SlackConfig) -> Result<NotifyAction, String> {
        let to = match (&c.webhook_url, &c.token) {
            (Some(u), None) => {
                secret_url(u, "webhook_url")?;
                SlackTarget::Webhook(u.clone())
            }
            (None, Some(t)) => {
                let base = c.api_url.as_deref().unwrap_or("https://slack.com/api");
                let url = super::http::parse_http_url(&format!(
                    "{}/chat.postMessage",
                    base.trim_end_matches('/')
                ))?;
                SlackTarget::Api {
                    url,
                    token: t.clone(),
                    channel: tpl(
                        c.channel
                            .as_deref()
                            .ok_or("chat.postMessage needs `channel` with `token`")?,
                        "channel",
                    )?,
                }
            }
            _ => return Err("give `webhook_url` (incoming webhook) or `token` and `channel` (chat.postMessage), one of the two".into()),
        };
        Ok(NotifyAction::Slack {
            to,
            text: tpl(&c.text, "text")?,
            blocks: opt(&c.blocks, "blocks")?,
        })
    }

    /// `notify.teams`.
    pub fn teams(c: &TeamsConfig) -> Result<NotifyAction, String> {
        secret_url(&c.webhook_url, "webhook_url")?;
        Ok(NotifyAction::Teams {
            url: c.webhook_url.clone(),
            title: opt(&c.title, "title")?,
            text: tpl(&c.text, "text")?,
        })
    }

    /// `notify.pagerduty`.
    pub fn pagerduty(c: &PagerDutyConfig) -> Result<NotifyAction, String> {
        Ok(NotifyAction::PagerDuty {
            key: c.routing_key.clone(),
            fields: Box::new([
                opt(&c.event_action, "event_action")?,
                opt(&c.dedup_key, "dedup_key")?,
                opt(&c.summary, "summary")?,
                opt(&c.severity, "severity")?,
                opt(&c.source, "source")?,
            ]),
            url: super::http::parse_http_url(
                c.url
                    .as_deref()
                    .unwrap_or("https://events.pagerduty.com/v2/enqueue"),
            )?,
        })
    }

    /// `notify.webhook`.
    pub fn webhook(c: &SignedWebhookConfig) -> Result<NotifyAction, String> {
        Ok(NotifyAction::Webhook {
            url: super::http::parse_http_url(&c.url)?,
            secret: c.secret.clone(),
            body: opt(&c.body, "body")?,
        })
    }

    /// Sends the notification.
    pub async fn execute(
        &self,
        event: &Event,
        ctx: &ActionContext,
    ) -> Result<Outcome, ActionError> {
        let view = super::template_view(event, Some(&ctx.secrets));
        let render = |t: &Template, what: &str| {
            t.render(&view)
                .map(|s| s.trim().to_string())
                .map_err(|e| ActionError::permanent(format!("{what}: {e}")))
        };
        let json_of = |t: &Template, what: &str| -> Result<Value, ActionError> {
            let s = render(t, what)?;
            serde_json::from_str(&s)
                .map_err(|e| ActionError::permanent(format!("{what} did not render JSON: {e}")))
        };
        let (what, req) = match self {
            NotifyAction::Slack { to, text, blocks } => {
                let mut msg = json!({"text": render(text, "text")?});
                if let Some(b) = blocks {
                    msg["blocks"] = json_of(b, "blocks")?;
                }
                match to {
                    SlackTarget::Webhook(url) => (
                        "Slack incoming webhook",
                        ctx.client.post(url.expose()).json(&msg),
                    ),
                    SlackTarget::Api {
                        url,
                        token,
                        channel,
                    } => {
                        msg["channel"] = Value::String(render(channel, "channel")?);
                        (
                            "Slack chat.postMessage",
                            ctx.client
                                .post(url.clone())
                                .bearer_auth(token.expose())
                                .json(&msg),
                        )
                    }
                }
            }
            NotifyAction::Teams { url, title, text } => {
                let mut card = json!({
                    "@type": "MessageCard",
                    "@context": "https://schema.org/extensions",
                    "text": render(text, "text")?,
                });
                if let Some(t) = title {
                    let t = render(t, "title")?;
                    card["title"] = Value::String(t.clone());
                    card["summary"] = Value::String(t);
                } else {
                    card["summary"] = Value::String(event.ty().to_string());
                }
                (
                    "Teams incoming webhook",
                    ctx.client.post(url.expose()).json(&card),
                )
            }
            NotifyAction::PagerDuty { key, fields, url } => {
                let [action, dedup, summary, severity, source] = fields.as_ref();
                let get = |t: &Option<Template>, what: &str, default: &str| match t {
                    Some(t) => render(t, what),
                    None => Ok(default.to_string()),
                };
                let action = get(action, "event_action", "trigger")?;
                if !matches!(action.as_str(), "trigger" | "acknowledge" | "resolve") {
                    return Err(ActionError::permanent(format!(
                        "event_action rendered `{action}`; PagerDuty takes trigger, acknowledge or resolve"
                    )));
                }
                let dedup = get(dedup, "dedup_key", event.subject().unwrap_or(event.id()))?;
                let mut body = json!({
                    "routing_key": key.expose(),
                    "event_action": action,
                    "dedup_key": dedup,
                });
                if action == "trigger" {
                    let severity = get(severity, "severity", "error")?;
                    if !matches!(severity.as_str(), "critical" | "error" | "warning" | "info") {
                        return Err(ActionError::permanent(format!(
                            "severity rendered `{severity}`; PagerDuty takes critical, error, warning or info"
                        )));
                    }
                    body["payload"] = json!({
                        "summary": get(summary, "summary", &format!("{} {}", event.ty(), event.subject().unwrap_or("")))?,
                        "severity": severity,
                        "source": get(source, "source", &event.source().to_string())?,
                        "custom_details": crate::event::view(event),
                    });
                }
                (
                    "PagerDuty Events API",
                    ctx.client.post(url.clone()).json(&body),
                )
            }
            NotifyAction::Webhook { url, secret, body } => {
                let body = match body {
                    Some(t) => render(t, "body")?,
                    None => crate::event::to_json(event),
                };
                let id = format!("msg_{}", event.id());
                let ts = chrono::Utc::now().timestamp();
                let sig =
                    crate::sources::auth::sign_standard(secret.expose(), &id, ts, body.as_bytes());
                (
                    "signed webhook",
                    ctx.client
                        .post(url.clone())
                        .header("content-type", "application/json")
                        .header("webhook-id", id)
                        .header("webhook-timestamp", ts.to_string())
                        .header("webhook-signature", sig)
                        .body(body),
                )
            }
        };
        if super::dry_run() {
            return Ok(super::would(format!("send a {what} notification")));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ActionError::transient(format!("{what}: {}", describe_reqwest(&e))))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = super::read_bounded(resp, 64 * 1024)
            .await
            .map(|(b, _)| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if let Some(mut e) = status_error(status, &headers, &body) {
            e.message = format!("{what}: {}", e.message);
            return Err(e);
        }
        // chat.postMessage answers 200 with `ok: false` for its errors.
        if let NotifyAction::Slack {
            to: SlackTarget::Api { .. },
            ..
        } = self
        {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v["ok"] != true {
                let err = v["error"]
                    .as_str()
                    .unwrap_or("no `ok` in the answer")
                    .to_string();
                let msg = format!("{what}: Slack answered error `{err}`");
                return Err(
                    if matches!(
                        err.as_str(),
                        "ratelimited" | "internal_error" | "fatal_error" | "service_unavailable"
                    ) {
                        ActionError::transient(msg)
                    } else {
                        ActionError::permanent(msg)
                    },
                );
            }
        }
        Ok(Outcome {
            detail: format!("{what}: HTTP {status}"),
            output: serde_json::from_str(&body).ok(),
        })
    }
}
