//! The management API (JSON over HTTP), metrics and health. Loopback by default; when a
//! token is configured every `/api/*` request must carry it.

use crate::config::Secret;
use crate::deliveries::{Admission, Job};
use crate::ingest::Ingest;
use crate::router::Router as TriggerRouter;
use crate::sources::auth::AuthConfig;
use crate::sources::util::{reject, submit, Rejection};
use crate::store::{State, Store, StoreError};
use crate::telemetry::Metrics;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::OptionalExtension;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What the API handlers share.
pub struct AppState {
    /// The store.
    pub store: Store,
    /// The triggers.
    pub router: Arc<TriggerRouter>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The ingest path (for `POST /api/v1/events`).
    pub ingest: Ingest,
    /// Ingested deliveries and replay rescans go here.
    pub dispatch: mpsc::UnboundedSender<Admission>,
    /// The API token, if any.
    pub token: Option<Secret>,
    /// Set once start-up recovery is done.
    pub ready: AtomicBool,
    /// Largest body for `POST /api/v1/events`.
    pub max_body: usize,
    /// Where `POST /api/v1/reload` goes; `None` when reflex runs without a file.
    pub reload: Option<mpsc::Sender<crate::ReloadRequest>>,
}

type Shared = Arc<AppState>;

/// The API listener's routes.
pub fn routes(state: Shared) -> Router {
    let api = Router::new()
        .route("/events", get(list_events).post(post_events))
        .route("/events/{seq}", get(show_event))
        .route("/deliveries", get(list_deliveries))
        .route("/deliveries/{id}", get(show_delivery))
        .route("/deliveries/{id}/replay", post(replay))
        .route("/triggers", get(list_triggers))
        .route("/reload", post(reload))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .nest("/api/v1", api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn require_token(AxState(s): AxState<Shared>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let auth = AuthConfig::Bearer {
            token: token.clone(),
        };
        if let Err(r) = auth.verify(req.headers(), b"") {
            return r.into_response();
        }
    }
    next.run(req).await
}

async fn readyz(AxState(s): AxState<Shared>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn metrics(AxState(s): AxState<Shared>) -> Response {
    s.metrics.store_bytes.set(s.store.size_bytes());
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::NotFound(what) => Rejection::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
        .into_response(),
        StoreError::Conflict(msg) => {
            Rejection::new(StatusCode::CONFLICT, "conflict", msg).into_response()
        }
        e => Rejection::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
            .into_response(),
    }
}

fn bad_request(msg: impl Into<String>) -> Response {
    Rejection::new(StatusCode::BAD_REQUEST, "bad_request", msg).into_response()
}

fn ms_to_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<u32>,
    before: Option<i64>,
    /// Events after this seq, oldest first (for following new events).
    after: Option<i64>,
    state: Option<String>,
    trigger: Option<String>,
    #[serde(rename = "type")]
    ty: Option<String>,
    subject: Option<String>,
    source: Option<String>,
    id: Option<String>,
    /// Text anywhere in the event (attributes and data).
    q: Option<String>,
    /// Received at or after this time (RFC 3339).
    since: Option<String>,
}

async fn list_events(AxState(s): AxState<Shared>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(50).min(1000);
    let since = match q.since.as_deref().map(chrono::DateTime::parse_from_rfc3339) {
        None => None,
        Some(Ok(t)) => Some(t.timestamp_millis()),
        Some(Err(e)) => {
            return bad_request(format!(
                "since: {e}; expected an RFC 3339 time such as 2026-11-25T08:00:00Z"
            ))
        }
    };
    // Newest first below `before`, or oldest first above `after` (to follow new events).
    let (bound, order, from) = match q.after {
        Some(after) => ("seq > ?1 AND seq < ?9", "ASC", after),
        None => (
            "seq < ?1 AND seq < ?9",
            "DESC",
            q.before.unwrap_or(i64::MAX),
        ),
    };
    let before = q.before.unwrap_or(i64::MAX);
    // `q` is matched as plain text: LIKE's wildcards in it are escaped.
    let text = q.q.as_ref().map(|t| {
        format!(
            "%{}%",
            t.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });
    let (ty, subject, source, id) = (
        q.ty.clone(),
        q.subject.clone(),
        q.source.clone(),
        q.id.clone(),
    );
    let r = s
        .store
        .read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT seq, ce_id, ce_source, type, subject, source_name, received_at FROM events
                 WHERE {bound} AND (?2 IS NULL OR type = ?2) AND (?3 IS NULL OR subject = ?3)
                   AND (?4 IS NULL OR ce_source = ?4) AND (?5 IS NULL OR ce_id = ?5)
                   AND (?6 IS NULL OR body LIKE ?6 ESCAPE '\\') AND (?7 IS NULL OR received_at >= ?7)
                 ORDER BY seq {order} LIMIT ?8"
            ))?;
            let params =
                rusqlite::params![from, ty, subject, source, id, text, since, limit, before];
            let rows = st.query_map(params, |r| {
                Ok(json!({
                    "seq": r.get::<_, i64>(0)?, "id": r.get::<_, String>(1)?, "source": r.get::<_, String>(2)?,
                    "type": r.get::<_, String>(3)?, "subject": r.get::<_, Option<String>>(4)?,
                    "received_by": r.get::<_, String>(5)?, "received_at": ms_to_rfc3339(r.get(6)?),
                }))
            })?;
            rows.collect::<rusqlite::Result<Vec<Value>>>()
        })
        .await;
    match r {
        Ok(v) => Json(json!({ "events": v })).into_response(),
        Err(e) => store_error(e),
    }
}

async fn show_event(AxState(s): AxState<Shared>, Path(seq): Path<i64>) -> Response {
    let r = s
        .store
        .read(move |c| {
            let ev = c
                .query_row(
                    "SELECT seq, source_name, received_at, body FROM events WHERE seq=?1",
                    [seq],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?)),
                )
                .optional()?;
            let Some((seq, source_name, received_at, body)) = ev else { return Ok(None) };
            let mut st = c.prepare_cached("SELECT id, trigger, state, attempts, last_error FROM deliveries WHERE event_seq=?1 ORDER BY id")?;
            let deliveries = st
                .query_map([seq], |r| {
                    Ok(json!({"id": r.get::<_, i64>(0)?, "trigger": r.get::<_, String>(1)?, "state": r.get::<_, String>(2)?,
                              "attempts": r.get::<_, i64>(3)?, "last_error": r.get::<_, Option<String>>(4)?}))
                })?
                .collect::<rusqlite::Result<Vec<Value>>>()?;
            let event: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
            Ok(Some(json!({"seq": seq, "received_by": source_name, "received_at": ms_to_rfc3339(received_at), "event": event, "deliveries": deliveries})))
        })
        .await;
    match r {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => store_error(StoreError::NotFound(format!("event {seq}"))),
        Err(e) => store_error(e),
    }
}

fn delivery_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    Ok(json!({
        "id": r.get::<_, i64>(0)?, "event_seq": r.get::<_, i64>(1)?, "trigger": r.get::<_, String>(2)?,
        "state": r.get::<_, String>(3)?, "attempts": r.get::<_, i64>(4)?, "ordering_key": r.get::<_, Option<String>>(5)?,
        "next_attempt_at": r.get::<_, Option<i64>>(6)?.map(ms_to_rfc3339), "created_at": ms_to_rfc3339(r.get(7)?),
        "updated_at": ms_to_rfc3339(r.get(8)?), "last_error": r.get::<_, Option<String>>(9)?,
        "event_id": r.get::<_, String>(10)?, "event_type": r.get::<_, String>(11)?,
    }))
}

const DELIVERY_COLUMNS: &str = "d.id, d.event_seq, d.trigger, d.state, d.attempts, d.ordering_key, d.next_at, d.created_at, d.updated_at, d.last_error, e.ce_id, e.type";

async fn list_deliveries(AxState(s): AxState<Shared>, Query(q): Query<ListQuery>) -> Response {
    if let Some(st) = &q.state {
        if State::parse(st).is_none() {
            return bad_request(format!("unknown state `{st}`; expected pending, running, retrying, succeeded, dead or throttled"));
        }
    }
    let limit = q.limit.unwrap_or(50).min(1000);
    let before = q.before.unwrap_or(i64::MAX);
    let (state, trigger) = (q.state.clone(), q.trigger.clone());
    let r = s
        .store
        .read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE d.id < ?1 AND (?2 IS NULL OR d.state = ?2) AND (?3 IS NULL OR d.trigger = ?3)
                 ORDER BY d.id DESC LIMIT ?4"
            ))?;
            let rows = st.query_map(
                rusqlite::params![before, state, trigger, limit],
                delivery_json,
            )?;
            rows.collect::<rusqlite::Result<Vec<Value>>>()
        })
        .await;
    match r {
        Ok(v) => Json(json!({ "deliveries": v })).into_response(),
        Err(e) => store_error(e),
    }
}

async fn show_delivery(AxState(s): AxState<Shared>, Path(id): Path<i64>) -> Response {
    let r = s
        .store
        .read(move |c| {
            let d = c
                .query_row(
                    &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id=?1"),
                    [id],
                    delivery_json,
                )
                .optional()?;
            let Some(mut d) = d else { return Ok(None) };
            let mut st = c.prepare_cached("SELECT n, started_at, duration_ms, outcome, detail FROM attempts WHERE delivery_id=?1 ORDER BY n")?;
            let attempts = st
                .query_map([id], |r| {
                    Ok(json!({"n": r.get::<_, i64>(0)?, "started_at": ms_to_rfc3339(r.get(1)?), "duration_ms": r.get::<_, i64>(2)?,
                              "outcome": r.get::<_, String>(3)?, "detail": r.get::<_, String>(4)?}))
                })?
                .collect::<rusqlite::Result<Vec<Value>>>()?;
            d["attempt_log"] = Value::Array(attempts);
            Ok(Some(d))
        })
        .await;
    match r {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => store_error(StoreError::NotFound(format!("delivery {id}"))),
        Err(e) => store_error(e),
    }
}

async fn replay(AxState(s): AxState<Shared>, Path(id): Path<i64>) -> Response {
    let result = s.store.replay(id).await;
    if result.is_ok() {
        // The dispatcher reads it back from the store; one with no trigger is dead-lettered.
        let _ = s.dispatch.send(Admission::Rescan);
    }
    match result {
        Ok(open) => match Job::from_open(open, &s.router) {
            Ok(_) => (
                StatusCode::ACCEPTED,
                Json(json!({"id": id, "state": "pending"})),
            )
                .into_response(),
            Err(why) => Rejection::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("delivery {id} cannot be replayed: {why}"),
            )
            .into_response(),
        },
        Err(e) => store_error(e),
    }
}

async fn reload(AxState(s): AxState<Shared>) -> Response {
    let Some(tx) = &s.reload else {
        return Rejection::new(
            StatusCode::CONFLICT,
            "conflict",
            "this reflex was not started from a configuration file; nothing to reload",
        )
        .into_response();
    };
    let (answer, result) = tokio::sync::oneshot::channel();
    if tx.send(answer).await.is_err() {
        return Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "reflex is stopping",
        )
        .into_response();
    }
    match result.await {
        Ok(Ok(())) => (
            StatusCode::ACCEPTED,
            Json(json!({"reload": "started", "detail": "intake pauses while running deliveries finish, then the new configuration runs"})),
        )
            .into_response(),
        Ok(Err(problems)) => {
            Rejection::new(StatusCode::BAD_REQUEST, "invalid_config", problems).into_response()
        }
        Err(_) => Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "reflex is stopping",
        )
        .into_response(),
    }
}

async fn list_triggers(AxState(s): AxState<Shared>) -> Response {
    let v: Vec<Value> = s
        .router
        .triggers
        .iter()
        .map(|t| {
            json!({"name": t.name, "action": t.action.kind(), "max_attempts": t.policy.max_attempts,
                   "concurrency": t.policy.concurrency, "timeout_ms": t.policy.timeout.as_millis() as u64})
        })
        .collect();
    Json(json!({ "triggers": v })).into_response()
}

async fn post_events(AxState(s): AxState<Shared>, headers: HeaderMap, body: Body) -> Response {
    match crate::sources::cloudevents::parse_request(
        &headers,
        body,
        s.max_body,
        1000,
        &AuthConfig::None,
    )
    .await
    {
        Ok(events) => submit(&s.ingest, "api", events).await,
        Err(r) => reject(&s.ingest, "api", r),
    }
}
