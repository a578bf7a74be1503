//! `type: alertmanager` — Prometheus Alertmanager's webhook notifications (payload version
//! 4). A notification carries a group of alerts; each alert becomes its own event, firing or
//! resolved, so that a trigger runs once per alert with the alert's instance as subject. The
//! event id is the alert's fingerprint with its start and status: Alertmanager repeats a
//! notification every `repeat_interval` (and resends a whole group when one alert changes),
//! and those repeats are duplicates of events already stored.

use super::auth::AuthConfig;
use super::util::{post_route, read_body, reject, submit, Rejection};
use crate::config::{ByteSize, Config, Diagnostics, Text};
use crate::ingest::Ingest;
use crate::template::Template;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use cloudevents::{Event, EventBuilder, EventBuilderV10};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The event type of a firing alert (`.resolved` for a resolved one) unless `event_type` says
/// otherwise.
pub const TYPE_PREFIX: &str = "com.reflex.alertmanager";

/// Configuration of `type: alertmanager`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// Unique source name.
    #[schemars(with = "String")]
    pub name: Text,
    /// URL path on the sources listener, the `url` of Alertmanager's `webhook_configs`.
    #[schemars(with = "String")]
    pub path: Text,
    /// Request authentication: `bearer` for Alertmanager's `http_config.authorization`,
    /// `basic` for its `basic_auth`.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The event type, a template over `alert`; `com.reflex.alertmanager.firing` or
    /// `com.reflex.alertmanager.resolved` by default.
    pub event_type: Option<String>,
    /// The subject, a template over `alert` (e.g. `{{ alert.labels.vm }}`); the alert's
    /// `instance` label by default.
    pub subject: Option<String>,
    /// Largest accepted body (default: `http.max_body`).
    pub max_body: Option<ByteSize>,
}

/// A notification as Alertmanager sends it (the fields reflex reads).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notification {
    version: String,
    #[serde(default)]
    receiver: String,
    #[serde(default)]
    group_key: String,
    #[serde(default, rename = "externalURL")]
    external_url: String,
    #[serde(default)]
    truncated_alerts: u64,
    alerts: Vec<Alert>,
}

/// One alert of a notification.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Alert {
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    starts_at: String,
    #[serde(default)]
    ends_at: String,
    #[serde(default, rename = "generatorURL")]
    generator_url: String,
    #[serde(default)]
    fingerprint: String,
}

/// A compiled Alertmanager source.
pub struct Alertmanager {
    name: String,
    path: String,
    auth: AuthConfig,
    event_type: Option<Template>,
    subject: Template,
    limit: usize,
}

fn bad(reason: &'static str, message: impl Into<String>) -> Rejection {
    Rejection::new(StatusCode::BAD_REQUEST, reason, message)
}

impl Alertmanager {
    /// Compiles the templates.
    pub fn build(
        c: &AlertmanagerConfig,
        loc: &serde_saphyr::Location,
        config: &Config,
        diags: &mut Diagnostics,
    ) -> Option<Alertmanager> {
        let name = &c.name.value;
        let mut ok = true;
        let mut tpl = |field: &str, src: &str| match Template::compile(src) {
            Ok(t) => Some(t),
            Err(e) => {
                diags.at(loc, format!("source `{name}`: {field}: {e}"));
                ok = false;
                None
            }
        };
        let event_type = c.event_type.as_deref().map(|s| tpl("event_type", s));
        let subject = tpl(
            "subject",
            c.subject
                .as_deref()
                .unwrap_or("{{ alert.labels.instance }}"),
        );
        if let Err(e) = c.auth.check() {
            diags.at(loc, format!("source `{name}`: {e}"));
            ok = false;
        }
        if !ok {
            return None;
        }
        Some(Alertmanager {
            name: name.clone(),
            path: c.path.value.clone(),
            auth: c.auth.clone(),
            event_type: event_type.flatten(),
            subject: subject?,
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
        match self.to_events(&headers, body).await {
            Ok(events) => submit(ingest, &self.name, events).await,
            Err(r) => reject(ingest, &self.name, r),
        }
    }

    /// Authenticates one request and turns its notification into one event per alert.
    pub async fn to_events(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Vec<Event>, Rejection> {
        self.auth.verify_headers(headers)?;
        let bytes = read_body(body, self.limit).await?;
        if self.auth.signs_body() {
            self.auth.verify(headers, &bytes)?;
        }
        let n: Notification = serde_json::from_slice(&bytes).map_err(|e| {
            bad(
                "invalid_notification",
                format!("the body is not an Alertmanager notification: {e}"),
            )
        })?;
        if n.version != "4" {
            return Err(bad(
                "unsupported_version",
                format!(
                    "Alertmanager payload version `{}` is not supported; reflex reads version 4 (Alertmanager 0.16 and later)",
                    n.version
                ),
            ));
        }
        if n.truncated_alerts > 0 {
            tracing::warn!(source = %self.name, truncated = n.truncated_alerts, group = %n.group_key,
                "Alertmanager left alerts out of a notification (its max_alerts): they arrive only when the group is sent again");
        }
        n.alerts
            .iter()
            .enumerate()
            .map(|(i, a)| self.event(&n, i, a))
            .collect()
    }

    fn event(&self, n: &Notification, i: usize, a: &Alert) -> Result<Event, Rejection> {
        let at = |field: &str| format!("alerts[{i}].{field}");
        if a.status != "firing" && a.status != "resolved" {
            return Err(bad(
                "invalid_notification",
                format!(
                    "{} is `{}`; it must be `firing` or `resolved`",
                    at("status"),
                    a.status
                ),
            ));
        }
        let time = |field: &str, v: &str| {
            chrono::DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|e| {
                    bad(
                        "invalid_notification",
                        format!("{} `{v}` is not an RFC 3339 time: {e}", at(field)),
                    )
                })
        };
        let starts = time("startsAt", &a.starts_at)?;
        // A resolved alert happened when it ended; a firing one when it started.
        let when = if a.status == "resolved" && !a.ends_at.is_empty() {
            time("endsAt", &a.ends_at)?
        } else {
            starts
        };
        // Alertmanager's fingerprint identifies the alert by its labels; one from an older
        // sender without it is made the same way, from the sorted labels.
        let fingerprint = if a.fingerprint.is_empty() {
            let mut h = Sha256::new();
            for (k, v) in &a.labels {
                h.update(k.as_bytes());
                h.update([0xff]);
                h.update(v.as_bytes());
                h.update([0xfe]);
            }
            super::auth::hex(&h.finalize()[..8])
        } else {
            a.fingerprint.clone()
        };
        let data = json!({
            "status": a.status,
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": a.starts_at,
            "endsAt": a.ends_at,
            "generatorURL": a.generator_url,
            "fingerprint": fingerprint,
            "receiver": n.receiver,
            "groupKey": n.group_key,
            "externalURL": n.external_url,
        });
        let ctx =
            minijinja::context! { alert => minijinja::Value::from(minijinja::value::Serde(&data)) };
        let render = |field: &str, t: &Template| {
            t.render_value(&ctx)
                .map(|s| s.trim().to_string())
                .map_err(|e| bad("mapping", format!("{field} for {}: {e}", at("labels"))))
        };
        let ty = match &self.event_type {
            Some(t) => render("event_type", t)?,
            None => format!("{TYPE_PREFIX}.{}", a.status),
        };
        if ty.is_empty() {
            return Err(bad(
                "mapping",
                format!("event_type rendered empty for {}", at("labels")),
            ));
        }
        let mut b = EventBuilderV10::new()
            .id(format!(
                "{fingerprint}:{}:{}",
                starts.timestamp_millis(),
                a.status
            ))
            .source(format!("/reflex/sources/{}", self.name))
            .ty(ty)
            .time(when)
            .data("application/json", data);
        let subject = render("subject", &self.subject)?;
        if !subject.is_empty() {
            b = b.subject(subject);
        }
        b.build().map_err(|e| {
            bad(
                "mapping",
                format!("the event of {} is invalid: {e}", at("")),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn source(subject: Option<&str>) -> Alertmanager {
        Alertmanager {
            name: "am".into(),
            path: "/am".into(),
            auth: AuthConfig::None,
            event_type: None,
            subject: Template::compile(subject.unwrap_or("{{ alert.labels.instance }}")).unwrap(),
            limit: 1 << 20,
        }
    }

    async fn events(s: &Alertmanager, body: Value) -> Result<Vec<Event>, Rejection> {
        s.to_events(&HeaderMap::new(), Body::from(body.to_string()))
            .await
    }

    fn alert(status: &str, instance: &str) -> Value {
        json!({"status": status, "labels": {"alertname": "A", "instance": instance},
               "annotations": {}, "startsAt": "2026-11-30T22:45:47.116834779Z",
               "endsAt": "2026-11-30T22:50:00Z", "generatorURL": "", "fingerprint": ""})
    }

    #[tokio::test]
    async fn one_event_per_alert_with_a_stable_id_and_the_instance_as_subject() {
        let s = source(None);
        let body =
            json!({"version": "4", "alerts": [alert("firing", "a"), alert("resolved", "b")]});
        let e = events(&s, body.clone()).await.unwrap();
        assert_eq!(e.len(), 2);
        use cloudevents::AttributesReader;
        assert_eq!(e[0].ty(), "com.reflex.alertmanager.firing");
        assert_eq!(e[1].ty(), "com.reflex.alertmanager.resolved");
        assert_eq!(e[0].subject(), Some("a"));
        // Without a fingerprint one is made from the labels; the same alert, the same id.
        let again = events(&s, body).await.unwrap();
        assert_eq!(e[0].id(), again[0].id());
        assert_ne!(e[0].id(), e[1].id());
        // A resolved alert's time is when it ended.
        assert_eq!(
            e[1].time().unwrap().to_rfc3339(),
            "2026-11-30T22:50:00+00:00"
        );
    }

    #[tokio::test]
    async fn bad_notifications_are_refused_with_the_field() {
        let s = source(None);
        let r = events(&s, json!({"version": "3", "alerts": []}))
            .await
            .unwrap_err();
        assert_eq!(r.reason, "unsupported_version");
        let mut a = alert("firing", "a");
        a["startsAt"] = json!("yesterday");
        let r = events(
            &s,
            json!({"version": "4", "alerts": [alert("firing", "a"), a]}),
        )
        .await
        .unwrap_err();
        assert!(r.message.contains("alerts[1].startsAt"), "{}", r.message);
        let r = events(
            &s,
            json!({"version": "4", "alerts": [alert("pending", "a")]}),
        )
        .await
        .unwrap_err();
        assert!(r.message.contains("alerts[0].status"), "{}", r.message);
        let r = events(&s, json!({"alerts": []})).await.unwrap_err();
        assert_eq!(r.reason, "invalid_notification");
    }

    #[tokio::test]
    async fn the_subject_template_sees_the_alert() {
        let s = source(Some(
            "{{ alert.labels.alertname }}/{{ alert.labels.instance }}",
        ));
        let e = events(
            &s,
            json!({"version": "4", "alerts": [alert("firing", "x")]}),
        )
        .await
        .unwrap();
        use cloudevents::AttributesReader;
        assert_eq!(e[0].subject(), Some("A/x"));
    }
}
