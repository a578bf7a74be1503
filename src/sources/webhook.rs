//! `type: webhook` — JSON from any system (Graylog, Splunk, Loki, Log Insight…), checked
//! (auth, size, JSON Schema) and mapped to a CloudEvent with templates over `body`.

use super::auth::{AuthConfig, Replays};
use super::util::{post_route, read_body, reject, submit, Rejection};
use crate::config::{ByteSize, Config, Diagnostics, Text};
use crate::event::ROUTING_KEY_EXT;
use crate::ingest::Ingest;
use crate::template::Template;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use cloudevents::{EventBuilder, EventBuilderV10};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// Configuration of `type: webhook`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique source name.
    #[schemars(with = "String")]
    pub name: Text,
    /// URL path on the sources listener, e.g. `/hooks/graylog`.
    #[schemars(with = "String")]
    pub path: Text,
    /// Request authentication.
    #[serde(default)]
    pub auth: AuthConfig,
    /// A JSON Schema the body must satisfy.
    pub schema: Option<Value>,
    /// How the body becomes an event.
    #[serde(default)]
    pub mapping: MappingConfig,
    /// Largest accepted body (default: `http.max_body`).
    pub max_body: Option<ByteSize>,
}

/// Templates over `body` (the parsed JSON) that fill the event.
#[derive(Debug, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// The event type; `reflex.webhook.<source name>` by default.
    #[serde(rename = "type")]
    pub ty: Option<String>,
    /// The subject, e.g. `{{ body.vm }}`.
    pub subject: Option<String>,
    /// The id; give one from the body to make retries of the sender deduplicate. A new
    /// UUIDv7 by default.
    pub id: Option<String>,
    /// The data as JSON, e.g. `{{ body.fields | tojson }}`; the whole body by default.
    pub data: Option<String>,
    /// The routing key (extension `routingkey`).
    pub routing_key: Option<String>,
}

/// A compiled [`MappingConfig`]: how a JSON body becomes an event (webhook and AMQP sources).
pub(crate) struct Mapping {
    ty: Template,
    subject: Option<Template>,
    id: Option<Template>,
    data: Option<Template>,
    routing_key: Option<Template>,
}

impl Mapping {
    /// Compiles the templates; `default_ty` when `type` is not given. The error names the
    /// field.
    pub(crate) fn compile(c: &MappingConfig, default_ty: &str) -> Result<Mapping, String> {
        let tpl = |field: &str, src: Option<&str>| -> Result<Option<Template>, String> {
            src.map(Template::compile)
                .transpose()
                .map_err(|e| format!("mapping.{field}: {e}"))
        };
        Ok(Mapping {
            ty: tpl("type", Some(c.ty.as_deref().unwrap_or(default_ty)))?.expect("a type template"),
            subject: tpl("subject", c.subject.as_deref())?,
            id: tpl("id", c.id.as_deref())?,
            data: tpl("data", c.data.as_deref())?,
            routing_key: tpl("routing_key", c.routing_key.as_deref())?,
        })
    }

    /// The event of `body` received by source `source`; its id from the `id` template, else
    /// `default_id`, else a new UUIDv7. The error names the field that failed.
    pub(crate) fn event(
        &self,
        source: &str,
        body: Value,
        default_id: Option<String>,
    ) -> Result<cloudevents::Event, String> {
        // One conversion of the body for all mapping templates, without copying it first.
        let ctx =
            minijinja::context! { body => minijinja::Value::from(minijinja::value::Serde(&body)) };
        let render = |field: &str, t: &Template| -> Result<String, String> {
            t.render_value(&ctx)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("mapping.{field}: {e}"))
        };
        let ty = render("type", &self.ty)?;
        if ty.is_empty() {
            return Err("mapping.type rendered empty for this body".into());
        }
        let id = match &self.id {
            Some(t) => render("id", t)?,
            None => default_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        };
        if id.is_empty() {
            return Err("mapping.id rendered empty for this body".into());
        }
        let data = match &self.data {
            Some(t) => {
                let s = render("data", t)?;
                serde_json::from_str(&s).unwrap_or(Value::String(s))
            }
            None => body,
        };
        let mut b = EventBuilderV10::new()
            .id(id)
            .source(format!("/reflex/sources/{source}"))
            .ty(ty)
            .time(chrono::Utc::now())
            .data("application/json", data);
        if let Some(t) = &self.subject {
            let s = render("subject", t)?;
            if !s.is_empty() {
                b = b.subject(s);
            }
        }
        if let Some(t) = &self.routing_key {
            b = b.extension(ROUTING_KEY_EXT, render("routing_key", t)?);
        }
        b.build()
            .map_err(|e| format!("the mapped event is invalid: {e}"))
    }
}

/// A compiled webhook source.
pub struct Webhook {
    name: String,
    path: String,
    auth: AuthConfig,
    replays: Replays,
    schema: Option<jsonschema::Validator>,
    mapping: Mapping,
    limit: usize,
}

impl Webhook {
    /// Compiles templates and the schema.
    pub fn build(
        c: &WebhookConfig,
        loc: &serde_saphyr::Location,
        config: &Config,
        diags: &mut Diagnostics,
    ) -> Option<Webhook> {
        let name = &c.name.value;
        let mut ok = true;
        let mapping = match Mapping::compile(&c.mapping, &format!("reflex.webhook.{name}")) {
            Ok(m) => Some(m),
            Err(e) => {
                diags.at(loc, format!("source `{name}`: {e}"));
                ok = false;
                None
            }
        };
        if let Err(e) = c.auth.check() {
            diags.at(loc, format!("source `{name}`: {e}"));
            ok = false;
        }
        let schema = match &c.schema {
            Some(s) => match jsonschema::validator_for(s) {
                Ok(v) => Some(v),
                Err(e) => {
                    diags.at(
                        loc,
                        format!("source `{name}`: schema is not a valid JSON Schema: {e}"),
                    );
                    ok = false;
                    None
                }
            },
            None => None,
        };
        if !ok {
            return None;
        }
        Some(Webhook {
            name: name.clone(),
            path: c.path.value.clone(),
            auth: c.auth.clone(),
            replays: Replays::default(),
            schema,
            mapping: mapping?,
            limit: c.max_body.unwrap_or(config.http.max_body).0,
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
        match self.to_event(&headers, body).await {
            Ok(event) => {
                let answer = submit(ingest, &self.name, vec![event]).await;
                if answer.status() == StatusCode::ACCEPTED {
                    self.replays.accepted(&self.auth, &headers);
                }
                answer
            }
            Err(r) => reject(ingest, &self.name, r),
        }
    }

    /// Authenticates, validates and maps one request to its event (the fuzz target's entry).
    pub async fn to_event(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<cloudevents::Event, Rejection> {
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(Rejection::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("content-type must be application/json, got `{ct}`"),
            ));
        }
        self.auth.verify_headers(headers)?;
        let bytes = read_body(body, self.limit).await?;
        if self.auth.signs_body() {
            self.auth.verify(headers, &bytes)?;
        }
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        if let Some(schema) = &self.schema {
            if let Some(err) = schema.iter_errors(&body).next() {
                let mut r = Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "schema",
                    format!(
                        "the body does not match the schema at `{}`: {err}",
                        err.instance_path()
                    ),
                );
                r.detail = Some(json!({
                    "instance_path": err.instance_path().to_string(),
                    "schema_path": err.schema_path().to_string(),
                }));
                return Err(r);
            }
        }
        // A Standard Webhooks sender names each message, and repeats the name when it
        // retries: the (verified) `webhook-id` makes the retries deduplicate.
        let default_id = match &self.auth {
            AuthConfig::StandardWebhooks { .. } => headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            _ => None,
        };
        self.mapping
            .event(&self.name, body, default_id)
            .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, "mapping", e))
    }
}
