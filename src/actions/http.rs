//! `type: http` — POST the CloudEvent to a function, binary or structured. A CloudEvent in
//! the reply is ingested as a new event.

use super::{describe_reqwest, status_error, ActionContext, ActionError, Outcome};
use cloudevents::binding::http::{header_prefix, to_event};
use cloudevents::event::AttributeValue;
use cloudevents::{AttributesReader, Event};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
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
        if super::dry_run() {
            return Ok(super::would(format!(
                "POST the event to {} ({:?} mode)",
                self.url, self.mode
            )));
        }
        let req = ctx.client.post(self.url.clone());
        let req = match self.mode {
            Mode::Structured => req
                .header("content-type", "application/cloudevents+json")
                .body(crate::event::to_json(event)),
            Mode::Binary => {
                let (headers, body) = binary_parts(event).map_err(ActionError::permanent)?;
                req.headers(headers).body(body)
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
                output: None,
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
        let mut reply = to_event(&headers, body).map_err(|e| {
            ActionError::permanent(format!(
                "the reply of {} is not a valid CloudEvent: {e}",
                self.url
            ))
        })?;
        reply.set_extension(super::CHAIN_DEPTH_EXT, super::next_depth(event)?);
        let id = reply.id().to_string();
        let source = format!("reply:{}", self.url.host_str().unwrap_or("http"));
        ctx.ingest
            .submit(&source, vec![reply])
            .await
            .map_err(|e| ActionError::transient(format!("ingesting the reply event {id}: {e}")))?;
        Ok(Outcome {
            output: None,
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

/// The headers and body of the binary content mode; an error names an attribute whose value
/// cannot be an HTTP header (a control character), which structured mode can carry.
pub fn binary_parts(event: &Event) -> Result<(HeaderMap, Vec<u8>), String> {
    // Built as a header map directly: the names of the standard attributes are constants,
    // so the hot path parses no header names (the profile of the full pipeline showed the
    // per-header parsing of a builder at 2 % of the workers' time).
    let mut headers = HeaderMap::with_capacity(10);
    for (name, value) in event.iter() {
        let header = match name {
            "datacontenttype" => CONTENT_TYPE,
            "specversion" => HeaderName::from_static("ce-specversion"),
            "id" => HeaderName::from_static("ce-id"),
            "source" => HeaderName::from_static("ce-source"),
            "type" => HeaderName::from_static("ce-type"),
            "subject" => HeaderName::from_static("ce-subject"),
            "time" => HeaderName::from_static("ce-time"),
            "dataschema" => HeaderName::from_static("ce-dataschema"),
            other => HeaderName::try_from(header_prefix(other)).map_err(|_| {
                format!(
                    "the extension `{other}` cannot be an HTTP header name; use `mode: structured`"
                )
            })?,
        };
        let v = match value {
            AttributeValue::Time(t) => t.to_rfc3339(),
            other => other.to_string(),
        };
        let v = HeaderValue::try_from(v).map_err(|_| {
            format!("the attribute `{name}` holds a character an HTTP header cannot carry (a line break or another control character); use `mode: structured`")
        })?;
        headers.insert(header, v);
    }
    let body = match event.data() {
        None => Vec::new(),
        Some(cloudevents::Data::Binary(b)) => b.clone(),
        Some(cloudevents::Data::String(s)) => s.clone().into_bytes(),
        Some(cloudevents::Data::Json(v)) => serde_json::to_vec(v).expect("JSON serializes"),
    };
    Ok((headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn event(subject: &str) -> Event {
        EventBuilderV10::new()
            .id("1")
            .source("/s")
            .ty("t.x")
            .subject(subject)
            .extension("receivedby", "hook")
            .data("application/json", serde_json::json!({"a": "b"}))
            .build()
            .unwrap()
    }

    #[test]
    fn binary_mode_puts_attributes_in_ce_headers() {
        let (h, body) = binary_parts(&event("vm-1")).unwrap();
        assert_eq!(h["ce-id"], "1");
        assert_eq!(h["ce-source"], "/s");
        assert_eq!(h["ce-type"], "t.x");
        assert_eq!(h["ce-subject"], "vm-1");
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-receivedby"], "hook");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(body, br#"{"a":"b"}"#);
    }

    #[test]
    fn a_value_no_header_can_carry_is_refused_by_name() {
        let err = binary_parts(&event("line\nbreak")).unwrap_err();
        assert!(
            err.contains("`subject`") && err.contains("structured"),
            "{err}"
        );
    }
}
