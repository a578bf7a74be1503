//! The management API (JSON over HTTP), metrics and health. Loopback by default; when a
//! token is configured every `/api/*` request must carry it.

use crate::config::Secret;
use crate::deliveries::{Admission, Job};
use crate::ingest::Ingest;
use crate::router::Router as TriggerRouter;
use crate::sources::auth::AuthConfig;
use crate::sources::util::{reject, submit, Rejection};
use crate::store::{
    Backend, DeliveryQuery, DeliveryRecord, EventQuery, EventSummary, State, StoreError,
};
use crate::telemetry::Metrics;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What the API handlers share.
pub struct AppState {
    /// The store and the bus.
    pub backend: Backend,
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
    /// The store answered its last health check (checked every second).
    pub store_ok: AtomicBool,
    /// Largest body for `POST /api/v1/events`.
    pub max_body: usize,
    /// `/metrics` asks for the token too.
    pub metrics_token: bool,
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
        .route("/nodes", get(list_nodes))
        .route("/reload", post(reload))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    let metrics_route =
        if state.metrics_token {
            Router::new().route("/metrics", get(metrics)).layer(
                axum::middleware::from_fn_with_state(state.clone(), require_token),
            )
        } else {
            Router::new().route("/metrics", get(metrics))
        };
    Router::new()
        .nest("/api/v1", api)
        .merge(metrics_route)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Whether a browser sent this request from another site's page: its `Origin` names
/// another host than the one it asked (`Host`), or `Sec-Fetch-Site` says cross-site. The
/// CLI and scripts send neither.
fn from_another_site(headers: &axum::http::HeaderMap) -> bool {
    let get = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if get("sec-fetch-site") == Some("cross-site") {
        return true;
    }
    match get("origin") {
        None => false,
        Some(origin) => {
            let origin_host = origin
                .split_once("://")
                .map(|(_, rest)| rest.trim_end_matches('/'));
            origin_host.is_none() || origin_host != get("host")
        }
    }
}

async fn require_token(AxState(s): AxState<Shared>, req: Request, next: Next) -> Response {
    // A page on another site can make a browser POST to a loopback API without a token:
    // state changes from such requests are refused.
    if req.method() != axum::http::Method::GET && from_another_site(req.headers()) {
        return Rejection::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "requests from another site's page cannot change state; use the CLI or a script",
        )
        .into_response();
    }
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
    if !s.ready.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    } else if !s.store_ok.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

/// OpenMetrics for a scraper that asks for it (Prometheus does), the Prometheus text
/// format otherwise (curl, `promtool check metrics`).
async fn metrics(AxState(s): AxState<Shared>, headers: axum::http::HeaderMap) -> Response {
    if let Some(bytes) = s.backend.store.size_bytes().await {
        s.metrics.store_bytes.set(bytes);
    }
    let open_metrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if open_metrics {
        (
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            s.metrics.render(),
        )
            .into_response()
    } else {
        (
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            s.metrics.render_text(),
        )
            .into_response()
    }
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
        e if e.is_unavailable() => {
            Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()).into_response()
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
    let since = match q.since.as_deref().map(chrono::DateTime::parse_from_rfc3339) {
        None => None,
        Some(Ok(t)) => Some(t.timestamp_millis()),
        Some(Err(e)) => {
            return bad_request(format!(
                "since: {e}; expected an RFC 3339 time such as 2026-11-25T08:00:00Z"
            ))
        }
    };
    let query = EventQuery {
        limit: q.limit.unwrap_or(50).min(1000),
        before: q.before,
        after: q.after,
        ty: q.ty,
        subject: q.subject,
        source: q.source,
        id: q.id,
        text: q.q,
        since,
    };
    match s.backend.store.events(query).await {
        Ok(v) => {
            let v: Vec<Value> = v.iter().map(event_json).collect();
            Json(json!({ "events": v })).into_response()
        }
        Err(e) => store_error(e),
    }
}

fn event_json(e: &EventSummary) -> Value {
    json!({
        "seq": e.seq, "id": e.id, "source": e.source, "type": e.ty, "subject": e.subject,
        "received_by": e.received_by, "received_at": ms_to_rfc3339(e.received_at),
    })
}

async fn show_event(AxState(s): AxState<Shared>, Path(seq): Path<i64>) -> Response {
    match s.backend.store.event(seq).await {
        Ok(Some(e)) => {
            let deliveries: Vec<Value> = e
                .deliveries
                .iter()
                .map(|d| json!({"id": d.id, "trigger": d.trigger, "state": d.state, "attempts": d.attempts, "last_error": d.last_error}))
                .collect();
            let event: Value = serde_json::from_str(&e.body).unwrap_or(Value::String(e.body));
            Json(json!({"seq": e.seq, "received_by": e.received_by, "received_at": ms_to_rfc3339(e.received_at), "event": event, "deliveries": deliveries})).into_response()
        }
        Ok(None) => store_error(StoreError::NotFound(format!("event {seq}"))),
        Err(e) => store_error(e),
    }
}

fn delivery_json(d: &DeliveryRecord) -> Value {
    json!({
        "id": d.id, "event_seq": d.event_seq, "trigger": d.trigger, "state": d.state,
        "attempts": d.attempts, "ordering_key": d.ordering_key,
        "next_attempt_at": d.next_at.map(ms_to_rfc3339), "created_at": ms_to_rfc3339(d.created_at),
        "updated_at": ms_to_rfc3339(d.updated_at), "last_error": d.last_error,
        "event_id": d.event_id, "event_type": d.event_type,
    })
}

async fn list_deliveries(AxState(s): AxState<Shared>, Query(q): Query<ListQuery>) -> Response {
    let state = match q.state.as_deref().map(|st| (st, State::parse(st))) {
        None => None,
        Some((_, Some(state))) => Some(state),
        Some((st, None)) => return bad_request(format!("unknown state `{st}`; expected pending, running, retrying, succeeded, dead or throttled")),
    };
    let query = DeliveryQuery {
        limit: q.limit.unwrap_or(50).min(1000),
        before: q.before,
        state,
        trigger: q.trigger,
    };
    match s.backend.store.deliveries(query).await {
        Ok(v) => {
            let v: Vec<Value> = v.iter().map(delivery_json).collect();
            Json(json!({ "deliveries": v })).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn show_delivery(AxState(s): AxState<Shared>, Path(id): Path<i64>) -> Response {
    match s.backend.store.delivery(id).await {
        Ok(Some((d, attempts))) => {
            let mut v = delivery_json(&d);
            v["attempt_log"] = attempts
                .iter()
                .map(|a| json!({"n": a.n, "started_at": ms_to_rfc3339(a.started_at), "duration_ms": a.duration_ms, "outcome": a.outcome, "detail": a.detail}))
                .collect();
            Json(v).into_response()
        }
        Ok(None) => store_error(StoreError::NotFound(format!("delivery {id}"))),
        Err(e) => store_error(e),
    }
}

async fn replay(AxState(s): AxState<Shared>, Path(id): Path<i64>) -> Response {
    // Checked before anything changes: a delivery whose trigger is gone stays dead (a
    // replay would only dead-letter it again, with one more attempt on record).
    match s.backend.store.delivery(id).await {
        Ok(Some((d, _))) if s.router.position(&d.trigger).is_none() => {
            return Rejection::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "delivery {id} cannot be replayed: trigger `{}` is no longer configured",
                    d.trigger
                ),
            )
            .into_response()
        }
        Ok(Some(_)) => {}
        Ok(None) => return store_error(StoreError::NotFound(format!("delivery {id}"))),
        Err(e) => return store_error(e),
    }
    let result = s.backend.bus.replay(id).await;
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

async fn list_nodes(AxState(s): AxState<Shared>) -> Response {
    match s.backend.store.nodes().await {
        Ok(nodes) => {
            let v: Vec<Value> = nodes
                .iter()
                .map(|n| json!({"id": n.id, "started_at": ms_to_rfc3339(n.started_at),
                    "heartbeat_at": ms_to_rfc3339(n.heartbeat_at), "version": n.version, "singletons": n.singletons}))
                .collect();
            Json(json!({ "backend": s.backend.store.backend(), "nodes": v })).into_response()
        }
        Err(e) => store_error(e),
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
