//! `type: http_request` — any REST call with templated method, URL, headers and body.
//! Templates see `event` and `secrets`; headers are never recorded (they carry tokens).

use super::{describe_reqwest, status_error, ActionContext, ActionError, Outcome};
use crate::template::Template;
use cloudevents::Event;
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Configuration of `type: http_request`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpRequestConfig {
    /// Method (template), `POST` by default.
    #[serde(default = "default_method")]
    pub method: String,
    /// URL (template). Values are percent-encoded as they are inserted
    /// (`{{ event.subject }}` cannot add a path segment or a query); `{{ x | safe }}`
    /// inserts one as it is, e.g. a Slack webhook path kept in a secret.
    pub url: String,
    /// Headers (templates), e.g. `Authorization: "Bearer {{ secrets.token }}"`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body (template); none when absent.
    pub body: Option<String>,
}

fn default_method() -> String {
    "POST".into()
}

/// A compiled `http_request` action.
#[derive(Debug)]
pub struct HttpRequestAction {
    method: Template,
    url: Template,
    headers: Vec<(reqwest::header::HeaderName, Template)>,
    body: Option<Template>,
}

impl HttpRequestAction {
    /// Compiles every template.
    pub fn build(c: &HttpRequestConfig) -> Result<HttpRequestAction, String> {
        let mut headers = Vec::new();
        for (k, v) in &c.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("invalid header name `{k}`"))?;
            headers.push((
                name,
                Template::compile(v).map_err(|e| format!("header `{k}`: {e}"))?,
            ));
        }
        Ok(HttpRequestAction {
            method: Template::compile(&c.method).map_err(|e| format!("method: {e}"))?,
            url: Template::compile_url(&c.url).map_err(|e| format!("url: {e}"))?,
            headers,
            body: c
                .body
                .as_deref()
                .map(Template::compile)
                .transpose()
                .map_err(|e| format!("body: {e}"))?,
        })
    }

    /// Renders and sends the request.
    pub async fn execute(
        &self,
        event: &Event,
        ctx: &ActionContext,
    ) -> Result<Outcome, ActionError> {
        let view = super::template_view(event, Some(&ctx.secrets));
        let render = |t: &Template| t.render(&view).map_err(ActionError::permanent);
        let method_s = render(&self.method)?;
        let method = reqwest::Method::from_bytes(method_s.trim().to_uppercase().as_bytes())
            .map_err(|_| ActionError::permanent(format!("invalid HTTP method `{method_s}`")))?;
        let url_s = render(&self.url)?;
        let url = super::http::parse_http_url(url_s.trim()).map_err(ActionError::permanent)?;
        let mut req = ctx.client.request(method.clone(), url.clone());
        for (name, t) in &self.headers {
            let v = render(t)?;
            let v = reqwest::header::HeaderValue::from_str(&v).map_err(|_| {
                ActionError::permanent(format!("header `{name}` rendered to an invalid value"))
            })?;
            req = req.header(name, v);
        }
        if let Some(b) = &self.body {
            req = req.body(render(b)?);
        }
        let what = format!("{method} {}", redact_url(&url));
        if super::dry_run() {
            return Ok(super::would(format!(
                "{what} ({} header(s), {})",
                self.headers.len(),
                match &self.body {
                    Some(b) => format!("{}-byte body", render(b)?.len()),
                    None => "no body".into(),
                }
            )));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ActionError::transient(format!("{what}: {}", describe_reqwest(&e))))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        // Only its start is kept (in an error's record): the rest is not read.
        let body = super::read_bounded(resp, 64 * 1024)
            .await
            .map(|(b, _)| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if let Some(mut err) = status_error(status, &headers, &body) {
            err.message = format!("{what}: {}", err.message);
            return Err(err);
        }
        Ok(Outcome {
            detail: format!("{what}: HTTP {status}"),
            output: Some(serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body))),
        })
    }
}

/// Drops user info and query from a URL before it is recorded (they may hold credentials).
fn redact_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if u.query().is_some() {
        u.set_query(Some("…"));
    }
    u.to_string()
}
