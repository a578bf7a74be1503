//! `type: http` — POST the CloudEvent to a function, binary or structured. A CloudEvent in
//! the reply is ingested as a new event.

use super::{describe_reqwest, status_error, ActionContext, ActionError, Outcome};
use cloudevents::binding::http::{header_prefix, to_event};
use cloudevents::event::AttributeValue;
use cloudevents::{AttributesReader, Event};
use schemars::JsonSchema;
use serde::Deserialize;

/// Configuration of `type: http`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The function's URL.
    pub url: String,
    /// `binary` (attributes in `ce-` headers) or `structured` (one JSON document).
    #[serde(default)]
    pub mode: Mode,
}

/// CloudEvents HTTP content mode.
#[derive(Debug, Deserialize, JsonSchema, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Attributes in `ce-` headers, data as the body.
    #[default]
    Binary,
    /// `application/cloudevents+json`.
    Structured,
}

/// A compiled `http` action.
#[derive(Debug)]
pub struct HttpAction {
    url: reqwest::Url,
    mode: Mode,
}

impl HttpAction {
    /// Validates the URL.
    pub fn build(c: &HttpConfig) -> Result<HttpAction, String> {
        let url = parse_http_url(&c.url)?;
        Ok(HttpAction { url, mode: c.mode })
    }

    /// POSTs the event and ingests a CloudEvent reply.
    pub async fn execute(
        &self,
        event: &Event,
        ctx: &ActionContext,
    ) -> Result<Outcome, ActionError> {
        let req = ctx.client.post(self.url.clone());
        let req = match self.mode {
            Mode::Structured => req
                .header("content-type", "application/cloudevents+json")
                .body(crate::event::to_json(event)),
            Mode::Binary => {
                let (headers, body) = binary_parts(event);
                let mut req = req;
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                req.body(body)
            }
        };
        let resp = req.send().await.map_err(|e| {
            ActionError::transient(format!("POST {}: {}", self.url, describe_reqwest(&e)))
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let (body, truncated) = super::read_bounded(resp, super::MAX_REPLY)
            .await
            .map_err(|e| {
                ActionError::transient(format!(
                    "reading the reply of {}: {}",
                    self.url,
                    describe_reqwest(&e)
                ))
            })?;
        if let Some(err) = status_error(status, &headers, &String::from_utf8_lossy(&body)) {
            return Err(err);
        }
        let is_ce = headers.contains_key("ce-specversion")
            || headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/cloudevents+json"));
        if !is_ce {
            return Ok(Outcome {
                detail: format!("HTTP {status}"),
            });
        }
        if truncated {
            return Err(ActionError::permanent(format!(
                "the reply of {} is a CloudEvent larger than {} bytes; it was not read",
                self.url,
                super::MAX_REPLY
            )));
        }
        let reply = to_event(&headers, body).map_err(|e| {
            ActionError::permanent(format!(
                "the reply of {} is not a valid CloudEvent: {e}",
                self.url
            ))
        })?;
        let id = reply.id().to_string();
        let source = format!("reply:{}", self.url.host_str().unwrap_or("http"));
        ctx.ingest
            .submit(&source, vec![reply])
            .await
            .map_err(|e| ActionError::transient(format!("ingesting the reply event {id}: {e}")))?;
        Ok(Outcome {
            detail: format!("HTTP {status}; reply event {id} ingested"),
        })
    }
}

/// Parses an http(s) URL with a precise error.
pub(crate) fn parse_http_url(raw: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("invalid url `{raw}`: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("url `{raw}` must be http:// or https://"));
    }
    Ok(url)
}

/// The headers and body of the binary content mode.
pub fn binary_parts(event: &Event) -> (Vec<(String, String)>, Vec<u8>) {
    let mut headers = Vec::new();
    for (name, value) in event.iter() {
        if name == "datacontenttype" {
            headers.push(("content-type".to_string(), value.to_string()));
            continue;
        }
        let v = match value {
            AttributeValue::Time(t) => t.to_rfc3339(),
            other => other.to_string(),
        };
        headers.push((header_prefix(name), v));
    }
    let body = match event.data() {
        None => Vec::new(),
        Some(cloudevents::Data::Binary(b)) => b.clone(),
        Some(cloudevents::Data::String(s)) => s.clone().into_bytes(),
        Some(cloudevents::Data::Json(v)) => serde_json::to_vec(v).expect("JSON serializes"),
    };
    (headers, body)
}
