//! `type: slack` — Slack slash commands and interactive payloads (ChatOps, seed 001).
//! Requests are verified exactly as Slack specifies: HMAC-SHA256 with the app's signing
//! secret over `v0:{X-Slack-Request-Timestamp}:{raw body}`, compared in constant time,
//! timestamps more than 5 minutes away refused, a request already accepted refused.
//!
//! A command's text is split into a verb and its arguments (`/iaas clone web-01 as web-02`
//! → verb `clone`, args `[web-01, as, web-02]`). Which users and channels may use which
//! verb is checked before an event is made; Slack gets its answer at once (well within its
//! 3 seconds): an acknowledgement once the event is durable, the help text for an unknown
//! verb, or the reason of a refusal. Results go to the request's `response_url` from an
//! action (`http_request` to `{{ event.data.response_url | safe }}`).
//!
//! Approvals can be decided with buttons: a message with a button whose `action_id` is
//! `reflex.approve` or `reflex.reject` and whose `value` is the approval's number decides
//! it when the user who clicked is one of the source's `approvers`, and the message is
//! replaced (through its `response_url`) by who decided. Such a click is not an event.

use super::auth::{AuthConfig, Encoding, HmacTimestamp, Replays};
use super::util::{post_route, read_body, reject, Rejection};
use crate::config::{ByteSize, Config, Diagnostics, Secret, Text};
use crate::deliveries::approval::Decider;
use crate::ingest::Ingest;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cloudevents::{Event, EventBuilder, EventBuilderV10};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// The event type of a slash command.
pub const COMMAND_TYPE: &str = "com.reflex.slack.command";
/// The event type of an interactive payload (a button, a menu, a modal).
pub const INTERACTION_TYPE: &str = "com.reflex.slack.interaction";

/// Configuration of `type: slack`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Unique source name.
    #[schemars(with = "String")]
    pub name: Text,
    /// URL path on the sources listener: the slash command's and the app's interactivity
    /// Request URL.
    #[schemars(with = "String")]
    pub path: Text,
    /// The app's signing secret (Basic Information → App Credentials).
    pub signing_secret: Secret,
    /// The verbs the command takes, each with who may use it; any other verb gets the help.
    pub verbs: BTreeMap<String, VerbConfig>,
    /// Largest accepted body (default: `http.max_body`).
    pub max_body: Option<ByteSize>,
    /// Slack user ids (`U…`) who may decide approvals with the `reflex.approve` and
    /// `reflex.reject` buttons; nobody when empty.
    #[serde(default)]
    pub approvers: Vec<String>,
}

/// One verb: what it does (for the help) and who may use it where.
#[derive(Debug, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct VerbConfig {
    /// One line for the help text, e.g. `clone VM as NEW — clone a VM`.
    #[serde(default)]
    pub help: String,
    /// Slack user ids (`U…`) allowed; anyone when empty.
    #[serde(default)]
    pub users: Vec<String>,
    /// Slack channel ids (`C…`) where the verb may be used; anywhere when empty.
    #[serde(default)]
    pub channels: Vec<String>,
}

/// A compiled Slack source.
pub struct Slack {
    name: String,
    path: String,
    auth: AuthConfig,
    replays: Replays,
    verbs: BTreeMap<String, VerbConfig>,
    limit: usize,
    approvers: Vec<String>,
    /// Takes the buttons' decisions (set when the route is made).
    decider: Option<Decider>,
    /// Answers to `response_url`: bounded, redirects not followed.
    client: reqwest::Client,
}

/// The `action_id` of a button approving an approval (its `value`: the approval's number).
pub const APPROVE_ACTION: &str = "reflex.approve";
/// The `action_id` of a button rejecting one.
pub const REJECT_ACTION: &str = "reflex.reject";

/// What Slack shows the user who typed the command (only to them).
fn ephemeral(text: impl Into<String>) -> Response {
    (
        StatusCode::OK,
        Json(json!({"response_type": "ephemeral", "text": text.into()})),
    )
        .into_response()
}

impl Slack {
    /// Builds the verification and the verb table.
    pub fn build(
        c: &SlackConfig,
        loc: &serde_saphyr::Location,
        config: &Config,
        diags: &mut Diagnostics,
    ) -> Option<Slack> {
        let name = &c.name.value;
        if c.verbs.is_empty() {
            diags.at(
                loc,
                format!(
                    "source `{name}`: no verbs; give at least one (e.g. `verbs: {{status: {{}}}}`)"
                ),
            );
            return None;
        }
        if let Some(v) = c
            .verbs
            .keys()
            .find(|v| v.is_empty() || v.chars().any(char::is_whitespace))
        {
            diags.at(loc, format!("source `{name}`: verb `{v}` must be one word"));
            return None;
        }
        let verbs = c
            .verbs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_lowercase(),
                    VerbConfig {
                        help: v.help.clone(),
                        users: v.users.clone(),
                        channels: v.channels.clone(),
                    },
                )
            })
            .collect();
        Some(Slack {
            name: name.clone(),
            path: c.path.value.clone(),
            auth: AuthConfig::Hmac {
                header: "x-slack-signature".into(),
                secret: c.signing_secret.clone(),
                prefix: "v0=".into(),
                encoding: Encoding::Hex,
                timestamp: Some(HmacTimestamp {
                    header: "x-slack-request-timestamp".into(),
                    signed: "v0:{timestamp}:{body}".into(),
                    tolerance: None,
                }),
            },
            replays: Replays::default(),
            verbs,
            limit: c.max_body.unwrap_or(config.http.max_body).0,
            approvers: c.approvers.clone(),
            decider: None,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        })
    }

    /// Adds the POST route; `decider` takes the approval buttons' decisions.
    pub fn route(mut self, router: axum::Router, ingest: Ingest, decider: Decider) -> axum::Router {
        self.decider = Some(decider);
        let path = self.path.clone();
        post_route(
            router,
            &path,
            self,
            ingest,
            |this, ingest, headers, body| async move { this.handle(&ingest, headers, body).await },
        )
    }

    async fn handle(&self, ingest: &Ingest, headers: HeaderMap, body: Body) -> Response {
        if let Err(r) = self.replays.refuse(&self.auth, &headers) {
            return reject(ingest, &self.name, r);
        }
        let answer = match self.verified(&headers, body).await {
            Ok(form) => self.answer(ingest, form).await,
            Err(r) => return reject(ingest, &self.name, r),
        };
        // Remembered whatever the answer: Slack does not resend a command it got an answer to.
        self.replays.accepted(&self.auth, &headers);
        answer
    }

    /// The verified request's form fields.
    async fn verified(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<HashMap<String, String>, Rejection> {
        self.auth.verify_headers(headers)?;
        let bytes = read_body(body, self.limit).await?;
        self.auth.verify(headers, &bytes)?;
        Ok(url::form_urlencoded::parse(&bytes).into_owned().collect())
    }

    async fn answer(&self, ingest: &Ingest, form: HashMap<String, String>) -> Response {
        let event = if let Some(payload) = form.get("payload") {
            if let Some(answer) = self.approval_button(payload) {
                return answer;
            }
            match self.interaction(payload) {
                Ok(e) => e,
                Err(r) => return reject(ingest, &self.name, r),
            }
        } else {
            match self.command(&form) {
                Ok(e) => e,
                Err(text) => return ephemeral(text),
            }
        };
        let ack = match event.data() {
            Some(cloudevents::Data::Json(d)) if d.get("verb").is_some() => {
                format!("Working on `{}`…", d["text"].as_str().unwrap_or_default())
            }
            _ => String::new(),
        };
        match ingest.submit(&self.name, vec![event]).await {
            Ok(_) if ack.is_empty() => StatusCode::OK.into_response(),
            Ok(_) => ephemeral(ack),
            Err(e) => {
                ingest.metrics().event_rejected(&self.name, "store");
                tracing::warn!(source = %self.name, error = %e, "a Slack request could not be stored");
                // Slack shows a bare error for any other status; the user gets the reason.
                ephemeral("reflex could not accept this right now; try again in a moment")
            }
        }
    }

    /// The event of a slash command, or the text to answer when there is none to make
    /// (help, refusal).
    fn command(&self, form: &HashMap<String, String>) -> Result<Event, String> {
        let field = |k: &str| form.get(k).cloned().unwrap_or_default();
        let text = field("text");
        let mut words = text.split_whitespace();
        let verb = words.next().unwrap_or("").to_lowercase();
        let args: Vec<&str> = words.collect();
        let Some(rule) = self.verbs.get(&verb) else {
            let mut help = if verb.is_empty() || verb == "help" {
                format!("Usage: {} VERB ARGS…\n", field("command"))
            } else {
                format!("Unknown verb `{verb}`. ")
            };
            help.push_str("Verbs:");
            for (v, c) in &self.verbs {
                help.push_str(&format!(
                    "\n• `{v}`{}",
                    if c.help.is_empty() {
                        String::new()
                    } else {
                        format!(" — {}", c.help)
                    }
                ));
            }
            return Err(help);
        };
        let (user, channel) = (field("user_id"), field("channel_id"));
        if !rule.users.is_empty() && !rule.users.contains(&user) {
            tracing::info!(source = %self.name, %user, %verb, "a Slack user was refused a verb");
            return Err(format!(
                "You may not use `{verb}`: it is limited to some users. Ask an operator of reflex."
            ));
        }
        if !rule.channels.is_empty() && !rule.channels.contains(&channel) {
            return Err(format!(
                "`{verb}` cannot be used in this channel; it is limited to some channels."
            ));
        }
        let data = json!({
            "verb": verb,
            "args": args,
            "text": text,
            "command": field("command"),
            "user": user,
            "user_name": field("user_name"),
            "channel": channel,
            "channel_name": field("channel_name"),
            "team": field("team_id"),
            "response_url": field("response_url"),
            "trigger_id": field("trigger_id"),
        });
        let id = match form.get("trigger_id") {
            Some(t) if !t.is_empty() => t.clone(),
            _ => uuid::Uuid::now_v7().to_string(),
        };
        EventBuilderV10::new()
            .id(id)
            .source(format!("/reflex/sources/{}", self.name))
            .ty(COMMAND_TYPE)
            .subject(verb)
            .time(chrono::Utc::now())
            .data("application/json", data)
            .build()
            .map_err(|e| format!("the command could not be turned into an event: {e}"))
    }

    /// Decides an approval when the payload is a click on a `reflex.approve` or
    /// `reflex.reject` button: the answer to Slack, at once (the decision and the message
    /// saying who took it follow, within Slack's 3 seconds or not). `None`: any other payload.
    fn approval_button(&self, payload: &str) -> Option<Response> {
        let data: Value = serde_json::from_str(payload).ok()?;
        let action = data["actions"].as_array()?.iter().find(|a| {
            matches!(
                a["action_id"].as_str(),
                Some(APPROVE_ACTION) | Some(REJECT_ACTION)
            )
        })?;
        let approve = action["action_id"] == APPROVE_ACTION;
        let user = data["user"]["id"].as_str().unwrap_or_default().to_string();
        let name = data["user"]["username"]
            .as_str()
            .or(data["user"]["name"].as_str())
            .unwrap_or_default()
            .to_string();
        let response_url = data["response_url"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let id = action["value"]
            .as_str()
            .and_then(|v| v.trim().parse::<i64>().ok());
        let (this, client) = (self.name.clone(), self.client.clone());
        let say = move |body: Value| async move {
            if response_url.is_empty() {
                return;
            }
            match client.post(&response_url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(source = %this, status = %r.status(), "Slack refused the answer to an approval button")
                }
                Err(e) => {
                    tracing::warn!(source = %this, error = %e, "cannot answer an approval button in Slack")
                }
            }
        };
        let ephemeral = |text: String| json!({"response_type": "ephemeral", "replace_original": false, "text": text});
        let Some(id) = id else {
            tokio::spawn(say(ephemeral(format!(
                "This button carries no approval number (`{}`); decide with `reflex approve ID`.",
                action["value"].as_str().unwrap_or_default()
            ))));
            return Some(StatusCode::OK.into_response());
        };
        if user.is_empty() || !self.approvers.contains(&user) {
            tracing::warn!(source = %self.name, %user, approval = id, "a Slack user who is not an approver clicked an approval button");
            tokio::spawn(say(ephemeral(format!(
                "You may not decide approval #{id}: only this source's approvers may. Ask an operator of reflex."
            ))));
            return Some(StatusCode::OK.into_response());
        }
        let decider = self.decider.clone()?;
        let by = if name.is_empty() || name == user {
            format!("{user} in Slack")
        } else {
            format!("{name} ({user}) in Slack")
        };
        tokio::spawn(async move {
            let reason = (!approve).then(|| "rejected with Slack's button".to_string());
            let answer = match decider.decide(id, approve, &by, reason).await {
                Ok(a) => json!({
                    "replace_original": true,
                    "text": format!(
                        "Approval #{id} ({}) {} by <@{user}>: {}",
                        a.trigger,
                        a.state.as_str(),
                        a.plan
                    ),
                }),
                Err(e) => ephemeral(format!("Approval #{id} was not decided: {e}")),
            };
            say(answer).await;
        });
        Some(StatusCode::OK.into_response())
    }

    /// The event of an interactive payload (its JSON as data; subject its type).
    fn interaction(&self, payload: &str) -> Result<Event, Rejection> {
        let data: Value = serde_json::from_str(payload).map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_payload",
                format!("the `payload` field is not JSON: {e}"),
            )
        })?;
        let kind = data["type"].as_str().unwrap_or("unknown").to_string();
        let id = data["trigger_id"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        EventBuilderV10::new()
            .id(id)
            .source(format!("/reflex/sources/{}", self.name))
            .ty(INTERACTION_TYPE)
            .subject(kind)
            .time(chrono::Utc::now())
            .data("application/json", data)
            .build()
            .map_err(|e| {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_payload",
                    format!("the payload could not be turned into an event: {e}"),
                )
            })
    }
}
