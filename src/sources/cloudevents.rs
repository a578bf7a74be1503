//! `type: cloudevents` — CloudEvents 1.0 over HTTP in binary, structured and batch modes.

use super::auth::{AuthConfig, Replays};
use super::util::{post_route, read_body, reject, submit, Rejection};
use crate::config::{ByteSize, Config, Diagnostics, Text};
use crate::ingest::Ingest;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use cloudevents::Event;
use schemars::JsonSchema;
use serde::Deserialize;

/// Configuration of `type: cloudevents`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudEventsConfig {
    /// Unique source name.
    #[schemars(with = "String")]
    pub name: Text,
    /// URL path on the sources listener, e.g. `/events`.
    #[schemars(with = "String")]
    pub path: Text,
    /// Request authentication.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Largest accepted body (default: `http.max_body`).
    pub max_body: Option<ByteSize>,
    /// Most events in one batch request.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Only events whose CloudEvents `source` and `type` start with one of these prefixes
    /// are accepted (a request with any other is refused whole, `403 not_accepted`).
    #[serde(default)]
    pub accept: AcceptConfig,
}

/// Prefixes of the CloudEvents `source` and `type` a source accepts; empty: any.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptConfig {
    /// Prefixes of `source`, e.g. `/alerts/`.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Prefixes of `type`, e.g. `com.example.`.
    #[serde(default)]
    pub types: Vec<String>,
}

impl AcceptConfig {
    /// Why `event` is not accepted, if it is not.
    fn refuses(&self, event: &Event) -> Option<String> {
        use cloudevents::AttributesReader;
        let fits = |prefixes: &[String], value: &str| {
            prefixes.is_empty() || prefixes.iter().any(|p| value.starts_with(p.as_str()))
        };
        if !fits(&self.sources, &event.source().to_string()) {
            return Some(format!(
                "event `{}`: source `{}` is not among this endpoint's accepted sources",
                event.id(),
                event.source()
            ));
        }
        if !fits(&self.types, event.ty()) {
            return Some(format!(
                "event `{}`: type `{}` is not among this endpoint's accepted types",
                event.id(),
                event.ty()
            ));
        }
        None
    }
}

fn default_max_batch() -> usize {
    1000
}

/// A compiled CloudEvents source.
pub struct CloudEvents {
    name: String,
    path: String,
    auth: AuthConfig,
    replays: Replays,
    limit: usize,
    max_batch: usize,
    accept: AcceptConfig,
}

impl CloudEvents {
    /// Nothing to compile beyond the common checks.
    pub fn build(
        c: &CloudEventsConfig,
        loc: &serde_saphyr::Location,
        config: &Config,
        diags: &mut Diagnostics,
    ) -> Option<CloudEvents> {
        if c.max_batch == 0 {
            diags.at(
                loc,
                format!("source `{}`: max_batch must be at least 1", c.name.value),
            );
            return None;
        }
        if let Err(e) = c.auth.check() {
            diags.at(loc, format!("source `{}`: {e}", c.name.value));
            return None;
        }
        Some(CloudEvents {
            name: c.name.value.clone(),
            path: c.path.value.clone(),
            auth: c.auth.clone(),
            replays: Replays::default(),
            limit: c.max_body.unwrap_or(config.http.max_body).0,
            max_batch: c.max_batch,
            accept: c.accept.clone(),
        })
    }

    /// Adds the POST route.
    pub fn route(self, router: axum::Router, ingest: Ingest) -> axum::Router {
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
        match self.parse(&headers, body).await {
            Ok(events) => {
                let answer = submit(ingest, &self.name, events).await;
                if answer.status() == StatusCode::ACCEPTED {
                    self.replays.accepted(&self.auth, &headers);
                }
                answer
            }
            Err(r) => reject(ingest, &self.name, r),
        }
    }

    async fn parse(&self, headers: &HeaderMap, body: Body) -> Result<Vec<Event>, Rejection> {
        let events = parse_request(headers, body, self.limit, self.max_batch, &self.auth).await?;
        if let Some(why) = events.iter().find_map(|e| self.accept.refuses(e)) {
            return Err(Rejection::new(StatusCode::FORBIDDEN, "not_accepted", why));
        }
        Ok(events)
    }
}

/// Parses a CloudEvents HTTP request in any mode (shared with the API's `POST /api/v1/events`).
pub async fn parse_request(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    max_batch: usize,
    auth: &AuthConfig,
) -> Result<Vec<Event>, Rejection> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let binary = headers.contains_key("ce-specversion");
    let batch = ct == "application/cloudevents-batch+json";
    if !binary && !batch && ct != "application/cloudevents+json" {
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "expected a binary-mode CloudEvent (ce-* headers), application/cloudevents+json or application/cloudevents-batch+json; got content-type `{ct}`"
            ),
        ));
    }
    auth.verify_headers(headers)?;
    let bytes = read_body(body, limit).await?;
    if auth.signs_body() {
        auth.verify(headers, &bytes)?;
    }
    let invalid = |e: String| Rejection::new(StatusCode::BAD_REQUEST, "invalid_cloudevent", e);
    if batch {
        let raw: Vec<serde_json::Value> = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("the batch is not a JSON array of events: {e}")))?;
        if raw.len() > max_batch {
            return Err(Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                format!(
                    "the batch has {} events; the limit is {max_batch}",
                    raw.len()
                ),
            ));
        }
        return raw
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                serde_json::from_value::<Event>(v)
                    .map_err(|e| invalid(format!("event [{i}] of the batch is invalid: {e}")))
            })
            .collect();
    }
    let mut event = cloudevents::binding::http::to_event(headers, bytes.to_vec())
        .map_err(|e| invalid(format!("invalid CloudEvent: {e}")))?;
    // Binary mode with no Content-Type (the Python SDK's default): the SDKs read a body
    // that parses as JSON as JSON, so filters see `event.data.*` as the sender meant.
    if ct.is_empty() {
        if let Some(cloudevents::Data::Binary(raw)) = event.data() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) {
                event.set_data_unchecked(v);
            }
        }
    }
    Ok(vec![event])
}
