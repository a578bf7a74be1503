//! The management API (JSON over HTTP), metrics and health. Loopback by default; when a
//! token is configured every `/api/*` request must carry it.

use crate::config::Secret;
use crate::deliveries::attempt::ALL;
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

pub mod auth;
mod ui;
use auth::Principal;

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
    /// The paused triggers.
    pub pauses: crate::deliveries::Pauses,
    /// The API listens on loopback only: requests must name a loopback host.
    pub loopback_only: bool,
    /// The configured vCenters (paused scopes name one).
    pub vcenters: crate::vcenters::Vcenters,
    /// The users of `api.users`, and the sign-in bounds.
    pub people: auth::People,
    /// The configuration file reflex runs (the console shows it, secrets redacted).
    pub config_path: Option<std::path::PathBuf>,
    /// The API listener serves TLS (session cookies are then `Secure`).
    pub tls: bool,
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
        .route("/triggers/{name}/pause", post(pause_trigger))
        .route("/triggers/{name}/resume", post(resume_trigger))
        .route("/approvals", get(list_approvals))
        .route("/approvals/{id}", get(show_approval))
        .route("/approvals/{id}/approve", post(approve))
        .route("/approvals/{id}/reject", post(reject_approval))
        .route("/pauses", get(list_pauses).post(add_pause))
        .route("/pauses/{key}/lift", post(lift_pause))
        .route("/pauses/{key}/discard", post(discard_paused))
        .route("/nodes", get(list_nodes))
        .route("/reload", post(reload))
        .route("/audit", get(list_audit))
        .route("/whoami", get(whoami))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{id}/revoke", post(revoke_token));
    let api = guarded(api, &state);
    let metrics_route = if state.metrics_token {
        guarded(Router::new().route("/metrics", get(metrics)), &state)
    } else {
        Router::new().route("/metrics", get(metrics))
    };
    Router::new()
        .nest("/api/v1", api)
        .merge(
            ui::routes(state.clone()).layer(axum::middleware::from_fn_with_state(
                state.clone(),
                same_site_only,
            )),
        )
        .merge(metrics_route)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Routes behind the role table and the audit log ([`auth::authorize`], on matched routes
/// only) and the same-site check.
fn guarded(routes: Router<Shared>, state: &Shared) -> Router<Shared> {
    routes
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            same_site_only,
        ))
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

/// Whether a `Host` header names this machine's loopback (`localhost`, `127.x.x.x`,
/// `[::1]`, with any port). A page that reaches a loopback API through DNS rebinding names
/// its own host instead.
fn names_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A loopback API answers only requests that name loopback (DNS rebinding), and no API
/// takes a change from another site's page (a browser sends one without a token).
async fn same_site_only(AxState(s): AxState<Shared>, req: Request, next: Next) -> Response {
    if s.loopback_only {
        let host = req
            .headers()
            .get(axum::http::header::HOST)
            .and_then(|v| v.to_str().ok());
        if host.is_some_and(|h| !names_loopback(h)) {
            return Rejection::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                "this API listens on loopback: address it as localhost, 127.0.0.1 or [::1] (another name is how a web page reaches it through DNS rebinding)",
            )
            .into_response();
        }
    }
    if req.method() != axum::http::Method::GET && from_another_site(req.headers()) {
        return Rejection::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "requests from another site's page cannot change state; use the CLI or a script",
        )
        .into_response();
    }
    next.run(req).await
}

/// Who the caller is, as the API sees them.
async fn whoami(axum::Extension(p): axum::Extension<Principal>) -> Response {
    let via = match p.via {
        auth::Via::Anonymous => "anonymous",
        auth::Via::AdminToken => "api.token",
        auth::Via::UserToken(_) => "user token",
        auth::Via::Session { .. } => "session",
    };
    Json(json!({"name": p.name, "role": p.role.as_str(), "via": via})).into_response()
}

#[derive(Deserialize)]
struct AuditParams {
    limit: Option<u32>,
    before: Option<i64>,
}

async fn list_audit(AxState(s): AxState<Shared>, Query(q): Query<AuditParams>) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match s.backend.store.audit_log(limit, q.before).await {
        Ok(list) => Json(json!({"entries": list.iter().map(|e| json!({
            "id": e.id, "at": ms_to_rfc3339(e.at), "actor": e.actor, "role": e.role,
            "action": e.action, "target": e.target, "detail": e.detail, "remote": e.remote,
        })).collect::<Vec<_>>()}))
        .into_response(),
        Err(e) => store_error(e),
    }
}

async fn list_tokens(AxState(s): AxState<Shared>) -> Response {
    match s.backend.store.api_tokens().await {
        Ok(list) => Json(json!({"tokens": list.iter().map(|t| json!({
            "id": t.id, "user": t.user, "label": t.label,
            "created_at": ms_to_rfc3339(t.created_at),
            "revoked_at": t.revoked_at.map(ms_to_rfc3339),
            "user_known": s.people.user(&t.user).is_some(),
        })).collect::<Vec<_>>()}))
        .into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    user: String,
    #[serde(default)]
    label: String,
}

/// Makes a token for a user of `api.users`; the answer is the only place it is shown.
async fn create_token(
    AxState(s): AxState<Shared>,
    body: Result<Json<NewToken>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(t) = match body {
        Ok(b) => b,
        Err(e) => {
            return bad_request(format!(
                "the body must be {{\"user\": NAME, \"label\": TEXT}}: {e}"
            ))
        }
    };
    let Some(user) = s.people.user(&t.user) else {
        return bad_request(format!(
            "`{}` is not a user of api.users; add them to the configuration (and reload) first",
            t.user
        ));
    };
    if t.label.len() > 200 {
        return bad_request("the label is longer than 200 characters");
    }
    let token = auth::new_secret("rfx_");
    match s
        .backend
        .store
        .create_api_token(&user.name, &t.label, &auth::hash_token(&token))
        .await
    {
        Ok(id) => (
            StatusCode::CREATED,
            Json(json!({"id": id, "user": user.name, "role": user.role.as_str(), "label": t.label, "token": token})),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

async fn revoke_token(AxState(s): AxState<Shared>, Path(id): Path<i64>) -> Response {
    match s.backend.store.revoke_api_token(id).await {
        Ok(true) => Json(json!({"id": id, "revoked": true})).into_response(),
        Ok(false) => Rejection::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no token {id} that is not revoked already (`reflex tokens list`)"),
        )
        .into_response(),
        Err(e) => store_error(e),
    }
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
    let paused = match s.backend.store.paused_triggers().await {
        Ok(p) => p,
        Err(e) => return store_error(e),
    };
    let v: Vec<Value> = s
        .router
        .triggers
        .iter()
        .map(|t| {
            let pause = paused.iter().find(|p| p.trigger == t.name).or_else(|| {
                t.policy
                    .global_radius
                    .and_then(|_| paused.iter().find(|p| p.trigger == ALL))
            });
            json!({"name": t.name, "action": t.action.kind(), "max_attempts": t.policy.max_attempts,
                   "concurrency": t.policy.concurrency, "timeout_ms": t.policy.timeout.as_millis() as u64,
                   "dry_run": t.policy.dry_run,
                   "blast_radius": t.policy.blast_radius.map(|(max, w)| json!({"max": max, "within_ms": w.as_millis() as u64})),
                   "counts_toward_global_blast_radius": t.policy.global_radius.is_some(),
                   "paused": pause.map(|p| json!({"since": p.since, "reason": p.reason}))})
        })
        .collect();
    let all = paused.iter().find(|p| p.trigger == ALL);
    Json(json!({ "triggers": v,
                 "all_paused": all.map(|p| json!({"since": p.since, "reason": p.reason})) }))
    .into_response()
}

/// Pauses a trigger by hand: its deliveries wait until it is resumed.
async fn pause_trigger(AxState(s): AxState<Shared>, Path(name): Path<String>) -> Response {
    if name != ALL && s.router.position(&name).is_none() {
        return Rejection::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no trigger `{name}` (`*` stands for every trigger that may change something)"),
        )
        .into_response();
    }
    if let Err(e) = s
        .backend
        .store
        .pause_trigger(&name, "paused by an operator")
        .await
    {
        return store_error(e);
    }
    s.pauses.mark(&name, true);
    tracing::warn!(trigger = %name, "trigger paused through the API");
    Json(json!({"trigger": name, "paused": true})).into_response()
}

/// `GET /approvals` parameters.
#[derive(Deserialize)]
struct ApprovalParams {
    state: Option<String>,
    limit: Option<u32>,
}

fn approval_json(a: &crate::store::Approval) -> Value {
    let mut v = serde_json::to_value(a).unwrap_or_default();
    v["requested_at"] = json!(ms_to_rfc3339(a.requested_at));
    v["expires_at"] = json!(ms_to_rfc3339(a.expires_at));
    v["decided_at"] = json!(a.decided_at.map(ms_to_rfc3339));
    v
}

/// Lists approvals, newest first (`?state=waiting`).
async fn list_approvals(AxState(s): AxState<Shared>, Query(p): Query<ApprovalParams>) -> Response {
    let state = match p.state.as_deref() {
        None => None,
        Some(name) => match crate::store::ApprovalState::parse(name) {
            Some(st) => Some(st),
            None => {
                return Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("state `{name}` is not one of waiting, approved, rejected, expired"),
                )
                .into_response()
            }
        },
    };
    match s
        .backend
        .store
        .approvals(state, p.limit.unwrap_or(100).clamp(1, 1000))
        .await
    {
        Ok(list) => Json(json!({"approvals": list.iter().map(approval_json).collect::<Vec<_>>()}))
            .into_response(),
        Err(e) => store_error(e),
    }
}

async fn show_approval(AxState(s): AxState<Shared>, Path(id): Path<i64>) -> Response {
    match s.backend.store.approval(id).await {
        Ok(Some(a)) => Json(approval_json(&a)).into_response(),
        Ok(None) => store_error(StoreError::NotFound(format!("approval {id}"))),
        Err(e) => store_error(e),
    }
}

/// The body of an approval's decision.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Decision {
    /// Who decides (recorded); the API token's holder when not given.
    by: Option<String>,
    /// Why.
    reason: Option<String>,
}

async fn approve(
    AxState(s): AxState<Shared>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<i64>,
    body: Option<Json<Decision>>,
) -> Response {
    decide(s, id, true, decision(&who, body)).await
}

async fn reject_approval(
    AxState(s): AxState<Shared>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<i64>,
    body: Option<Json<Decision>>,
) -> Response {
    decide(s, id, false, decision(&who, body)).await
}

/// A person known by name decides as themselves, whatever `by` says; the shared token's
/// holder says who they are.
fn decision(who: &Principal, body: Option<Json<Decision>>) -> Decision {
    let mut d = body.map(|b| b.0).unwrap_or_default();
    if who.is_user() {
        d.by = Some(who.name.clone());
    }
    d
}

/// Approves or rejects a waiting approval, then wakes its delivery: it runs (after its plan
/// is checked again) or ends dead at once.
async fn decide(s: Shared, id: i64, approve: bool, d: Decision) -> Response {
    use crate::deliveries::approval::DecideError;
    let by =
        d.by.filter(|b| !b.trim().is_empty())
            .unwrap_or_else(|| "the API token's holder".to_string());
    let decider = crate::deliveries::approval::Decider::new(
        s.backend.store.clone(),
        s.backend.bus.clone(),
        s.dispatch.clone(),
    );
    match decider.decide(id, approve, &by, d.reason).await {
        Ok(a) => Json(approval_json(&a)).into_response(),
        Err(DecideError::Bad(m)) => {
            Rejection::new(StatusCode::BAD_REQUEST, "bad_request", m).into_response()
        }
        Err(DecideError::Conflict(m)) => {
            Rejection::new(StatusCode::CONFLICT, "conflict", m).into_response()
        }
        Err(DecideError::Store(e)) => store_error(e),
    }
}

/// The body of `POST /pauses`: one scope of one vCenter.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPause {
    vcenter: String,
    cluster: Option<String>,
    folder: Option<String>,
    tag: Option<String>,
    resource_pool: Option<String>,
    reason: Option<String>,
}

/// The deliveries a paused scope holds now (waiting, with the pause in their reason).
async fn held_by(s: &AppState, key: &str) -> Result<Vec<crate::store::DeliveryRecord>, StoreError> {
    let marker = format!("held by a pause ({key})");
    let mut held = Vec::new();
    let mut before = None;
    loop {
        let page = s
            .backend
            .store
            .deliveries(DeliveryQuery {
                limit: 1000,
                before,
                state: Some(State::Retrying),
                trigger: None,
            })
            .await?;
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        let full = page.len() == 1000;
        held.extend(
            page.into_iter()
                .filter(|d| d.last_error.as_deref().is_some_and(|e| e.contains(&marker))),
        );
        if !full {
            break;
        }
    }
    Ok(held)
}

/// Lists the paused scopes with the deliveries each holds.
async fn list_pauses(AxState(s): AxState<Shared>) -> Response {
    let paused = match s.backend.store.paused_triggers().await {
        Ok(p) => p,
        Err(e) => return store_error(e),
    };
    let mut out = Vec::new();
    for p in paused {
        let Some(scope) = crate::deliveries::Scope::parse(&p.trigger) else {
            continue;
        };
        let held = match held_by(&s, &p.trigger).await {
            Ok(h) => h,
            Err(e) => return store_error(e),
        };
        out.push(json!({"key": p.trigger, "vcenter": scope.vcenter, "kind": scope.kind, "name": scope.name,
                        "since": ms_to_rfc3339(p.since), "reason": p.reason,
                        "held": held.iter().map(|d| d.id).collect::<Vec<_>>()}));
    }
    Json(json!({ "pauses": out })).into_response()
}

/// Pauses a scope of a vCenter: changes to what is in it are held from now on.
async fn add_pause(
    AxState(s): AxState<Shared>,
    body: Result<Json<NewPause>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(p) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("the body must be {{\"vcenter\", and one of \"cluster\", \"folder\", \"tag\", \"resource_pool\", and \"reason\"}}: {e}")),
    };
    if !s.vcenters.contains(&p.vcenter) {
        return bad_request(format!("no vCenter `{}` under `vcenters:`", p.vcenter));
    }
    let given: Vec<(&str, String)> = [
        ("cluster", p.cluster),
        ("folder", p.folder),
        ("tag", p.tag),
        ("resource_pool", p.resource_pool),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v.trim().to_string())))
    .collect();
    let [(kind, name)] = given.as_slice() else {
        return bad_request("give exactly one of `cluster`, `folder`, `tag`, `resource_pool`");
    };
    if name.is_empty() || name.chars().count() > 200 {
        return bad_request(format!("the {kind}'s name must be 1 to 200 characters"));
    }
    let reason = p
        .reason
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "paused by an operator".into());
    if reason.chars().count() > 2000 {
        return bad_request("`reason` is at most 2000 characters");
    }
    let scope = crate::deliveries::Scope {
        vcenter: p.vcenter,
        kind: kind.to_string(),
        name: name.clone(),
    };
    let key = scope.key();
    if let Err(e) = s.backend.store.pause_trigger(&key, &reason).await {
        return store_error(e);
    }
    s.pauses.mark(&key, true);
    tracing::warn!(scope = %key, %reason, "scope paused through the API");
    Json(json!({"key": key, "paused": true})).into_response()
}

/// A paused scope by its key, or the answer saying there is none.
async fn paused_scope(s: &AppState, key: &str) -> Result<crate::deliveries::Scope, Response> {
    let not_found = || {
        Rejection::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no paused scope `{key}` (`reflex pauses` lists them)"),
        )
        .into_response()
    };
    let scope = crate::deliveries::Scope::parse(key).ok_or_else(not_found)?;
    match s.backend.store.paused_triggers().await {
        Ok(p) if p.iter().any(|p| p.trigger == key) => Ok(scope),
        Ok(_) => Err(not_found()),
        Err(e) => Err(store_error(e)),
    }
}

/// Lifts a scope's pause: the changes it held run now.
async fn lift_pause(AxState(s): AxState<Shared>, Path(key): Path<String>) -> Response {
    if let Err(r) = paused_scope(&s, &key).await {
        return r;
    }
    let held = match held_by(&s, &key).await {
        Ok(h) => h,
        Err(e) => return store_error(e),
    };
    if let Err(e) = s.backend.store.resume_trigger(&key).await {
        return store_error(e);
    }
    s.pauses.mark(&key, false);
    for d in &held {
        if let Err(e) = s.backend.bus.wake(d.id).await {
            tracing::warn!(delivery = d.id, error = %e, "cannot wake a held delivery; it runs at its next look");
        }
    }
    let _ = s.dispatch.send(Admission::Rescan);
    tracing::warn!(scope = %key, released = held.len(), "scope pause lifted through the API");
    Json(json!({"key": key, "paused": false, "released": held.iter().map(|d| d.id).collect::<Vec<_>>()}))
        .into_response()
}

/// Ends the changes a paused scope holds, dead (replayable), and keeps the pause.
async fn discard_paused(AxState(s): AxState<Shared>, Path(key): Path<String>) -> Response {
    if let Err(r) = paused_scope(&s, &key).await {
        return r;
    }
    let held = match held_by(&s, &key).await {
        Ok(h) => h,
        Err(e) => return store_error(e),
    };
    // Each held delivery is marked (in the store, so every node sees it) and woken: its
    // next attempt ends it dead without running anything. Ended here instead, a delivery
    // the embedded bus holds in memory would still run at its next look.
    let mut discarded = Vec::new();
    for d in &held {
        let mark = crate::deliveries::attempt::discard_mark(d.id);
        if let Err(e) = s
            .backend
            .store
            .pause_trigger(&mark, &format!("discarded while {key} was paused"))
            .await
        {
            return store_error(e);
        }
        s.pauses.mark(&mark, true);
        if let Err(e) = s.backend.bus.wake(d.id).await {
            tracing::warn!(delivery = d.id, error = %e, "cannot wake a discarded delivery; it ends at its next look");
        }
        discarded.push(d.id);
    }
    let _ = s.dispatch.send(Admission::Rescan);
    tracing::warn!(scope = %key, discarded = discarded.len(), "held changes discarded through the API");
    Json(json!({"key": key, "discarded": discarded})).into_response()
}

/// Lifts a trigger's pause; its waiting deliveries run again.
async fn resume_trigger(AxState(s): AxState<Shared>, Path(name): Path<String>) -> Response {
    if name != ALL && s.router.position(&name).is_none() {
        return Rejection::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no trigger `{name}` (`*` stands for every trigger that may change something)"),
        )
        .into_response();
    }
    if let Err(e) = s.backend.store.resume_trigger(&name).await {
        return store_error(e);
    }
    s.pauses.mark(&name, false);
    // Its deliveries wait in the store: read them back.
    let _ = s.dispatch.send(Admission::Rescan);
    tracing::info!(trigger = %name, "trigger resumed through the API");
    Json(json!({"trigger": name, "paused": false})).into_response()
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
