//! `type: emit` — a new event back into reflex, for chains (tag on alarm, then act on power-off).

use super::{ActionContext, ActionError, Outcome};
use crate::template::Template;
use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use schemars::JsonSchema;
use serde::Deserialize;

/// Configuration of `type: emit`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmitConfig {
    /// The new event's type (template).
    pub event_type: String,
    /// Its subject (template).
    pub subject: Option<String>,
    /// Its data (template rendering JSON; the triggering event's data when absent).
    pub data: Option<String>,
}

/// A compiled `emit` action.
#[derive(Debug)]
pub struct EmitAction {
    source: String,
    event_type: Template,
    subject: Option<Template>,
    data: Option<Template>,
}

impl EmitAction {
    /// Compiles the templates; the new events' source names the trigger.
    pub fn build(c: &EmitConfig, trigger: &str) -> Result<EmitAction, String> {
        Ok(EmitAction {
            source: format!("/reflex/triggers/{trigger}"),
            event_type: Template::compile(&c.event_type).map_err(|e| format!("event_type: {e}"))?,
            subject: c
                .subject
                .as_deref()
                .map(Template::compile)
                .transpose()
                .map_err(|e| format!("subject: {e}"))?,
            data: c
                .data
                .as_deref()
                .map(Template::compile)
                .transpose()
                .map_err(|e| format!("data: {e}"))?,
        })
    }

    /// Builds and ingests the new event. Its id derives from the triggering event's, so a
    /// retried attempt is absorbed by dedup instead of emitting twice.
    pub async fn execute(
        &self,
        event: &Event,
        ctx: &ActionContext,
    ) -> Result<Outcome, ActionError> {
        let view = super::template_view(event, None);
        let ty = self
            .event_type
            .render(&view)
            .map_err(ActionError::permanent)?;
        if ty.trim().is_empty() {
            return Err(ActionError::permanent("emit: event_type rendered empty"));
        }
        let data = match &self.data {
            Some(t) => {
                let s = t.render(&view).map_err(ActionError::permanent)?;
                serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s))
            }
            None => crate::event::data_json(event),
        };
        let id = format!("{}:{}", event.id(), ty.trim());
        let depth = super::next_depth(event)?;
        let mut b = EventBuilderV10::new()
            .id(id.clone())
            .extension(super::CHAIN_DEPTH_EXT, depth)
            .source(self.source.clone())
            .ty(ty.trim())
            .time(chrono::Utc::now())
            .data("application/json", data);
        if let Some(s) = &self.subject {
            b = b.subject(s.render(&view).map_err(ActionError::permanent)?);
        }
        let new = b
            .build()
            .map_err(|e| ActionError::permanent(format!("emit: {e}")))?;
        if super::dry_run() {
            return Ok(super::would(format!(
                "emit event {id} of type `{}`",
                ty.trim()
            )));
        }
        ctx.ingest
            .submit(&self.source, vec![new])
            .await
            .map_err(|e| ActionError::transient(format!("emit: {e}")))?;
        Ok(Outcome {
            output: None,
            detail: format!("emitted {id}"),
        })
    }
}
