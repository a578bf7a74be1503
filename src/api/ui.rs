//! The operator's console under `/ui`: server-rendered pages (askama) with htmx, both
//! embedded in the binary (no CDN, works offline). Every page and action goes through
//! the same role table and audit log as the JSON API ([`super::auth`]); the actions call
//! the API's own handlers, so the console cannot do what the API would refuse.

use super::auth::{self, Principal, Via, SESSION_COOKIE};
use super::Shared;
use crate::config::Role;
use crate::store::{
    Approval, ApprovalState, DeliveryQuery, DeliveryRecord, EventQuery, EventSummary, State,
};
use askama::Template;
use axum::extract::{Form, Path, Query, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;

const HTMX: &str = include_str!("../../ui/static/htmx.min.js");
const STYLE: &str = include_str!("../../ui/static/style.css");

/// The console's routes: sign-in and static files open, the rest behind [`auth::authorize`].
pub fn routes(state: Shared) -> Router<Shared> {
    let guarded = Router::new()
        .route("/ui/overview", get(overview))
        .route("/ui/overview/live", get(overview_live))
        .route("/ui/events", get(events))
        .route("/ui/events/{seq}", get(event))
        .route("/ui/deliveries", get(deliveries))
        .route("/ui/deliveries/{id}/replay", post(replay))
        .route("/ui/triggers", get(triggers))
        .route("/ui/triggers/{name}/pause", post(pause))
        .route("/ui/triggers/{name}/resume", post(resume))
        .route("/ui/triggers/{name}/replay-dead", post(replay_dead))
        .route("/ui/pauses", post(pause_scope))
        .route("/ui/pauses/{key}/lift", post(lift_scope))
        .route("/ui/pauses/{key}/discard", post(discard_scope))
        .route("/ui/approvals", get(approvals))
        .route("/ui/approvals/{id}/approve", post(approve))
        .route("/ui/approvals/{id}/reject", post(reject))
        .route("/ui/audit", get(audit))
        .route("/ui/config", get(config))
        .route("/ui/config/check", post(config_check))
        .route("/ui/config/reload", post(config_reload))
        .route("/ui/logout", post(logout))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ));
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/overview") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/overview") }))
        .route("/ui/login", get(login_page).post(login))
        .route(
            "/ui/static/htmx.min.js",
            get(|| async { asset(HTMX, "text/javascript") }),
        )
        .route(
            "/ui/static/style.css",
            get(|| async { asset(STYLE, "text/css") }),
        )
        .merge(guarded)
}

fn asset(body: &'static str, ty: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// What every page's frame shows: who is signed in and what they may do.
struct Frame {
    user: String,
    role: &'static str,
    csrf: String,
    operator: bool,
    admin: bool,
    page: &'static str,
}

impl Frame {
    fn of(p: &Principal, page: &'static str) -> Frame {
        Frame {
            user: p.name.clone(),
            role: p.role.as_str(),
            csrf: p.csrf().unwrap_or("").to_string(),
            operator: p.role >= Role::Operator,
            admin: p.role >= Role::Admin,
            page,
        }
    }
}

fn render(t: impl Template) -> Response {
    match t.render() {
        Ok(html) => (
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::X_FRAME_OPTIONS, "DENY"),
            ],
            Html(html),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a console page could not be rendered");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// A page's message: what an action did, or why it was refused.
#[derive(Default)]
struct Flash {
    ok: Option<String>,
    error: Option<String>,
}

/// Reads an API handler's answer as the console's message.
async fn outcome(resp: Response, done: &str) -> Flash {
    let ok = resp.status().is_success();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    if ok {
        Flash {
            ok: Some(done.to_string()),
            error: None,
        }
    } else {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        Flash {
            ok: None,
            error: Some(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("the action failed")
                    .to_string(),
            ),
        }
    }
}

/// A store failure on a page.
fn unavailable(e: crate::store::StoreError) -> Response {
    tracing::warn!(error = %e, "a console page could not read the store");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Html("<p>The store did not answer; reload the page in a moment.</p>".to_string()),
    )
        .into_response()
}

// ---- sign-in ----

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    error: Option<String>,
    user: String,
}

async fn login_page() -> Response {
    render(LoginPage {
        error: None,
        user: String::new(),
    })
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

async fn login(
    AxState(s): AxState<Shared>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let remote = peer.ip().to_string();
    let keys = [format!("ip:{remote}"), format!("user:{}", f.user)];
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let who = Principal {
        name: f.user.chars().take(64).collect(),
        role: Role::Viewer,
        via: Via::Anonymous,
        remote: remote.clone(),
    };
    if let Some(wait) = s.people.login_blocked(&keys) {
        auth::audit(&s, &who, "login", "/ui/login", "refused: too many failures").await;
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            render(LoginPage {
                error: Some(format!(
                    "Too many failed sign-ins; try again in {} s.",
                    wait.as_secs().max(1)
                )),
                user: f.user,
            }),
        )
            .into_response();
        r.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(wait.as_secs().max(1)),
        );
        return r;
    }
    let Some(role) = s.people.check_password(&f.user, &f.password).await else {
        s.people.login_failed(&keys);
        auth::audit(
            &s,
            &who,
            "login",
            "/ui/login",
            "refused: wrong user or password",
        )
        .await;
        return (
            StatusCode::UNAUTHORIZED,
            render(LoginPage {
                error: Some("Wrong user name or password.".into()),
                user: f.user,
            }),
        )
            .into_response();
    };
    let token = auth::new_secret("");
    let session = crate::store::Session {
        user: f.user.clone(),
        csrf: auth::new_secret(""),
        expires_at: crate::store::now_ms() + s.people.session_ttl.as_millis() as i64,
    };
    if let Err(e) = s
        .backend
        .store
        .create_session(&auth::hash_token(&token), &session)
        .await
    {
        return unavailable(e);
    }
    auth::audit(
        &s,
        &Principal { role, ..who },
        "login",
        "/ui/login",
        "signed in",
    )
    .await;
    // `Secure` when the request came over TLS (a proxy says so with X-Forwarded-Proto).
    let secure = s.tls
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes() == b"https");
    let cookie = format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        s.people.session_ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/ui/overview".to_string()),
        ],
    )
        .into_response()
}

async fn logout(AxState(s): AxState<Shared>, Extension(p): Extension<Principal>) -> Response {
    if let Via::Session { hash, .. } = &p.via {
        if let Err(e) = s.backend.store.end_session(hash).await {
            return unavailable(e);
        }
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
            ),
            (header::LOCATION, "/ui/login".to_string()),
        ],
    )
        .into_response()
}

// ---- overview ----

struct SourceHealth {
    name: String,
    up: bool,
    stalls: String,
    lag: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    f: Frame,
    live: Live,
}

#[derive(Template)]
#[template(path = "overview_live.html")]
struct Live {
    per_minute: Vec<(String, u64, u32)>,
    peak: u64,
    total_hour: u64,
    states: Vec<(&'static str, String, u32)>,
    sources: Vec<SourceHealth>,
    paused: Vec<(String, String)>,
    waiting: Vec<Approval>,
}

async fn live(s: &Shared) -> Result<Live, crate::store::StoreError> {
    let now = crate::store::now_ms();
    let since = now - 60 * 60_000;
    let recent = s
        .backend
        .store
        .events(EventQuery {
            limit: 5000,
            since: Some(since),
            ..Default::default()
        })
        .await?;
    let mut buckets = [0u64; 60];
    for e in &recent {
        let i = ((now - e.received_at) / 60_000).clamp(0, 59) as usize;
        buckets[59 - i] += 1;
    }
    let peak = buckets.iter().copied().max().unwrap_or(0).max(1);
    let per_minute = buckets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                format!("{} min ago: {n}", 59 - i),
                *n,
                ((*n * 40) / peak) as u32,
            )
        })
        .collect();
    let mut states = Vec::new();
    let mut most = 1;
    let mut counts = Vec::new();
    for st in [
        State::Pending,
        State::Running,
        State::Retrying,
        State::Succeeded,
        State::Dead,
        State::Throttled,
    ] {
        let n = s
            .backend
            .store
            .deliveries(DeliveryQuery {
                limit: 1000,
                state: Some(st),
                ..Default::default()
            })
            .await?
            .len();
        most = most.max(n);
        counts.push((st.as_str(), n));
    }
    for (name, n) in counts {
        let shown = if n >= 1000 {
            "1000+".into()
        } else {
            n.to_string()
        };
        states.push((name, shown, ((n * 200) / most) as u32));
    }
    let paused = s
        .backend
        .store
        .paused_triggers()
        .await?
        .into_iter()
        .map(|p| (p.trigger, p.reason))
        .collect();
    let waiting = s
        .backend
        .store
        .approvals(Some(ApprovalState::Waiting), 20)
        .await?;
    Ok(Live {
        per_minute,
        peak,
        total_hour: recent.len() as u64,
        states,
        sources: source_health(&s.metrics.render_text()),
        paused,
        waiting,
    })
}

/// Each source's health as the metrics tell it: up, stalls, and a vCenter's lag.
fn source_health(metrics: &str) -> Vec<SourceHealth> {
    let mut out: Vec<SourceHealth> = Vec::new();
    let label = |line: &str| {
        line.split("source=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map(str::to_string)
    };
    let value = |line: &str| line.rsplit(' ').next().unwrap_or("").to_string();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some(name) = label(line) else { continue };
        let entry = match out.iter_mut().position(|h| h.name == name) {
            Some(i) => &mut out[i],
            None => {
                out.push(SourceHealth {
                    name,
                    up: true,
                    stalls: "0".into(),
                    lag: "-".into(),
                });
                out.last_mut().expect("just pushed")
            }
        };
        if line.starts_with("reflex_source_up") {
            entry.up = value(line) != "0";
        } else if line.starts_with("reflex_source_stalls") {
            entry.stalls = value(line);
        } else if line.starts_with("reflex_vcenter_lag_seconds") {
            entry.lag = format!("{} s", value(line));
        }
    }
    out
}

async fn overview(AxState(s): AxState<Shared>, Extension(p): Extension<Principal>) -> Response {
    match live(&s).await {
        Ok(live) => render(OverviewPage {
            f: Frame::of(&p, "overview"),
            live,
        }),
        Err(e) => unavailable(e),
    }
}

async fn overview_live(AxState(s): AxState<Shared>) -> Response {
    match live(&s).await {
        Ok(live) => render(live),
        Err(e) => unavailable(e),
    }
}

// ---- events ----

#[derive(Deserialize, Default)]
struct EventSearch {
    #[serde(default, rename = "type")]
    ty: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    since: String,
}

#[derive(Template)]
#[template(path = "events.html")]
struct EventsPage {
    f: Frame,
    /// This page's own URL, which the table polls for live updates.
    here: String,
    search: EventSearch,
    rows: Vec<(EventSummary, String)>,
    error: Option<String>,
}

fn some(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

async fn events(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Query(search): Query<EventSearch>,
) -> Response {
    let mut error = None;
    let since = match some(&search.since).map(|t| chrono::DateTime::parse_from_rfc3339(&t)) {
        None => None,
        Some(Ok(t)) => Some(t.timestamp_millis()),
        Some(Err(e)) => {
            error = Some(format!(
                "since: {e}; write an RFC 3339 time such as 2026-11-25T08:00:00Z"
            ));
            None
        }
    };
    let q = EventQuery {
        limit: 100,
        ty: some(&search.ty),
        subject: some(&search.subject),
        source: some(&search.source),
        text: some(&search.q),
        since,
        ..Default::default()
    };
    match s.backend.store.events(q).await {
        Ok(list) => render(EventsPage {
            f: Frame::of(&p, "events"),
            here: format!(
                "/ui/events?{}",
                url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("q", &search.q)
                    .append_pair("type", &search.ty)
                    .append_pair("subject", &search.subject)
                    .append_pair("source", &search.source)
                    .append_pair("since", &search.since)
                    .finish()
            ),
            rows: list
                .into_iter()
                .map(|e| {
                    let t = time(e.received_at);
                    (e, t)
                })
                .collect(),
            search,
            error,
        }),
        Err(e) => unavailable(e),
    }
}

struct AttemptRow {
    n: u32,
    at: String,
    duration_ms: i64,
    outcome: String,
    detail: String,
}

struct DeliveryRow {
    d: DeliveryRecord,
    updated: String,
    attempts: Vec<AttemptRow>,
    replayable: bool,
}

#[derive(Template)]
#[template(path = "event.html")]
struct EventPage {
    f: Frame,
    seq: i64,
    received_by: String,
    received: String,
    json: String,
    deliveries: Vec<DeliveryRow>,
    flash: Flash,
}

async fn event_page(s: &Shared, p: &Principal, seq: i64, flash: Flash) -> Response {
    let detail = match s.backend.store.event(seq).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                Html(format!(
                    "<p>No event {seq}. <a href=\"/ui/events\">Events</a></p>"
                )),
            )
                .into_response()
        }
        Err(e) => return unavailable(e),
    };
    let json = serde_json::from_str::<serde_json::Value>(&detail.body)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or(detail.body.clone());
    let mut deliveries = Vec::new();
    for d in detail.deliveries {
        let attempts = match s.backend.store.delivery(d.id).await {
            Ok(Some((_, a))) => a
                .into_iter()
                .map(|a| AttemptRow {
                    n: a.n,
                    at: time(a.started_at),
                    duration_ms: a.duration_ms,
                    outcome: a.outcome,
                    detail: a.detail,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return unavailable(e),
        };
        deliveries.push(DeliveryRow {
            updated: time(d.updated_at),
            replayable: matches!(d.state, State::Dead | State::Throttled),
            d,
            attempts,
        });
    }
    render(EventPage {
        f: Frame::of(p, "events"),
        seq,
        received_by: detail.received_by,
        received: time(detail.received_at),
        json: crate::config::secret::redact(&json).into_owned(),
        deliveries,
        flash,
    })
}

async fn event(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Path(seq): Path<i64>,
) -> Response {
    event_page(&s, &p, seq, Flash::default()).await
}

// ---- deliveries ----

#[derive(Deserialize, Default)]
struct DeliverySearch {
    #[serde(default)]
    state: String,
    #[serde(default)]
    trigger: String,
}

#[derive(Template)]
#[template(path = "deliveries.html")]
struct DeliveriesPage {
    f: Frame,
    /// This page's own URL, which the table polls for live updates.
    here: String,
    search: DeliverySearch,
    rows: Vec<DeliveryRow>,
    flash: Flash,
    states: Vec<&'static str>,
}

async fn deliveries_page(
    s: &Shared,
    p: &Principal,
    search: DeliverySearch,
    flash: Flash,
) -> Response {
    let state = match some(&search.state) {
        None => None,
        Some(st) => match State::parse(&st) {
            Some(st) => Some(st),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    Html(format!("<p>Unknown state `{}`.</p>", html_escape(&st))),
                )
                    .into_response()
            }
        },
    };
    let q = DeliveryQuery {
        limit: 200,
        state,
        trigger: some(&search.trigger),
        ..Default::default()
    };
    match s.backend.store.deliveries(q).await {
        Ok(list) => render(DeliveriesPage {
            f: Frame::of(p, "deliveries"),
            here: format!(
                "/ui/deliveries?{}",
                url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("state", &search.state)
                    .append_pair("trigger", &search.trigger)
                    .finish()
            ),
            rows: list
                .into_iter()
                .map(|d| DeliveryRow {
                    updated: time(d.updated_at),
                    replayable: matches!(d.state, State::Dead | State::Throttled),
                    d,
                    attempts: Vec::new(),
                })
                .collect(),
            search,
            flash,
            states: vec![
                "pending",
                "running",
                "retrying",
                "succeeded",
                "dead",
                "throttled",
            ],
        }),
        Err(e) => unavailable(e),
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn deliveries(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Query(search): Query<DeliverySearch>,
) -> Response {
    deliveries_page(&s, &p, search, Flash::default()).await
}

async fn replay(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Response {
    let seq = match s.backend.store.delivery(id).await {
        Ok(Some((d, _))) => Some(d.event_seq),
        _ => None,
    };
    let resp = super::replay(AxState(s.clone()), Path(id)).await;
    let flash = outcome(
        resp,
        &format!("Delivery {id} replayed: it is pending again."),
    )
    .await;
    match seq {
        Some(seq) => event_page(&s, &p, seq, flash).await,
        None => deliveries_page(&s, &p, DeliverySearch::default(), flash).await,
    }
}

async fn replay_dead(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    let dead = match s
        .backend
        .store
        .deliveries(DeliveryQuery {
            limit: 1000,
            state: Some(State::Dead),
            trigger: Some(name.clone()),
            ..Default::default()
        })
        .await
    {
        Ok(d) => d,
        Err(e) => return unavailable(e),
    };
    let (mut ok, mut failed) = (0, Vec::new());
    for d in &dead {
        let resp = super::replay(AxState(s.clone()), Path(d.id)).await;
        match outcome(resp, "").await.error {
            None => ok += 1,
            Some(e) => failed.push(format!("{}: {e}", d.id)),
        }
    }
    let flash = Flash {
        ok: Some(format!(
            "{ok} dead deliveries of `{name}` replayed (the first 1000 at most)."
        )),
        error: (!failed.is_empty()).then(|| failed.join("; ")),
    };
    deliveries_page(
        &s,
        &p,
        DeliverySearch {
            state: String::new(),
            trigger: name,
        },
        flash,
    )
    .await
}

// ---- triggers ----

struct TriggerRow {
    name: String,
    matches: String,
    action: String,
    max_attempts: u32,
    concurrency: usize,
    dry_run: bool,
    paused: Option<String>,
    dead: usize,
}

/// A paused scope of a vCenter and the changes it holds.
struct ScopeRow {
    key: String,
    what: String,
    since: String,
    reason: String,
    held: usize,
}

#[derive(Template)]
#[template(path = "triggers.html")]
struct TriggersPage {
    f: Frame,
    rows: Vec<TriggerRow>,
    /// Every changing trigger paused together (`*`: the global blast radius, or a person).
    all_paused: Option<String>,
    scopes: Vec<ScopeRow>,
    /// The vCenters a scope can be paused on.
    vcenters: Vec<String>,
    flash: Flash,
}

/// The paused scopes, as the API lists them.
async fn scopes(s: &Shared) -> Vec<ScopeRow> {
    let resp = super::list_pauses(AxState(s.clone())).await;
    let body = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    v["pauses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let text = |k: &str| p[k].as_str().unwrap_or("").to_string();
            ScopeRow {
                key: text("key"),
                what: format!("{} {} in {}", text("kind"), text("name"), text("vcenter")),
                since: text("since"),
                reason: text("reason"),
                held: p["held"].as_array().map_or(0, Vec::len),
            }
        })
        .collect()
}

async fn triggers_page(s: &Shared, p: &Principal, flash: Flash) -> Response {
    let paused = match s.backend.store.paused_triggers().await {
        Ok(p) => p,
        Err(e) => return unavailable(e),
    };
    let mut rows = Vec::new();
    for t in &s.router.triggers {
        let dead = match s
            .backend
            .store
            .deliveries(DeliveryQuery {
                limit: 1000,
                state: Some(State::Dead),
                trigger: Some(t.name.clone()),
                ..Default::default()
            })
            .await
        {
            Ok(d) => d.len(),
            Err(e) => return unavailable(e),
        };
        rows.push(TriggerRow {
            name: t.name.clone(),
            matches: t.matches.clone(),
            action: t.action.kind().to_string(),
            max_attempts: t.policy.max_attempts,
            concurrency: t.policy.concurrency,
            dry_run: t.policy.dry_run,
            paused: paused
                .iter()
                .find(|p| p.trigger == t.name)
                .map(|p| format!("since {}: {}", time(p.since), p.reason)),
            dead,
        });
    }
    let all_paused = paused
        .iter()
        .find(|p| p.trigger == crate::deliveries::attempt::ALL)
        .map(|p| format!("since {}: {}", time(p.since), p.reason));
    render(TriggersPage {
        f: Frame::of(p, "triggers"),
        rows,
        all_paused,
        scopes: scopes(s).await,
        vcenters: s.vcenters.names().map(String::from).collect(),
        flash,
    })
}

/// The triggers page with what an API handler answered to an action taken on it.
async fn on_triggers_page(s: &Shared, p: &Principal, resp: Response, done: &str) -> Response {
    let flash = outcome(resp, done).await;
    triggers_page(s, p, flash).await
}

async fn triggers(AxState(s): AxState<Shared>, Extension(p): Extension<Principal>) -> Response {
    triggers_page(&s, &p, Flash::default()).await
}

async fn pause(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    let resp = super::pause_trigger(AxState(s.clone()), Path(name.clone())).await;
    on_triggers_page(&s, &p, resp, &format!("Trigger `{name}` paused.")).await
}

async fn resume(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    let resp = super::resume_trigger(AxState(s.clone()), Path(name.clone())).await;
    on_triggers_page(&s, &p, resp, &format!("Trigger `{name}` resumed.")).await
}

#[derive(Deserialize)]
struct ScopeForm {
    vcenter: String,
    kind: String,
    name: String,
    #[serde(default)]
    reason: String,
}

/// Pauses a scope of a vCenter from the triggers page (the API's `POST /pauses`).
async fn pause_scope(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Form(f): Form<ScopeForm>,
) -> Response {
    let mut body = super::NewPause {
        vcenter: f.vcenter.clone(),
        cluster: None,
        folder: None,
        tag: None,
        resource_pool: None,
        reason: some(&f.reason),
    };
    let slot = match f.kind.as_str() {
        "cluster" => &mut body.cluster,
        "folder" => &mut body.folder,
        "tag" => &mut body.tag,
        "resource_pool" => &mut body.resource_pool,
        other => {
            let flash = Flash {
                ok: None,
                error: Some(format!(
                    "`{}` is not a scope: pause a cluster, folder, tag or resource_pool",
                    other.chars().take(40).collect::<String>()
                )),
            };
            return triggers_page(&s, &p, flash).await;
        }
    };
    *slot = Some(f.name.clone());
    let resp = super::add_pause(AxState(s.clone()), Ok(axum::Json(body))).await;
    on_triggers_page(
        &s,
        &p,
        resp,
        &format!(
            "{} `{}` of `{}` paused: changes in it wait until the pause is lifted.",
            f.kind,
            f.name.trim(),
            f.vcenter
        ),
    )
    .await
}

async fn lift_scope(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
) -> Response {
    let resp = super::lift_pause(AxState(s.clone()), Path(key.clone())).await;
    on_triggers_page(
        &s,
        &p,
        resp,
        &format!("`{key}` lifted: the changes it held run now."),
    )
    .await
}

async fn discard_scope(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
) -> Response {
    let resp = super::discard_paused(AxState(s.clone()), Path(key.clone())).await;
    on_triggers_page(
        &s,
        &p,
        resp,
        &format!("What `{key}` held is discarded: those deliveries end dead, nothing changed."),
    )
    .await
}

// ---- approvals ----

#[derive(Template)]
#[template(path = "approvals.html")]
struct ApprovalsPage {
    f: Frame,
    rows: Vec<(Approval, String)>,
    flash: Flash,
}

async fn approvals_page(s: &Shared, p: &Principal, flash: Flash) -> Response {
    match s.backend.store.approvals(None, 100).await {
        Ok(list) => render(ApprovalsPage {
            f: Frame::of(p, "approvals"),
            rows: list
                .into_iter()
                .map(|a| {
                    let t = time(a.requested_at);
                    (a, t)
                })
                .collect(),
            flash,
        }),
        Err(e) => unavailable(e),
    }
}

async fn approvals(AxState(s): AxState<Shared>, Extension(p): Extension<Principal>) -> Response {
    approvals_page(&s, &p, Flash::default()).await
}

#[derive(Deserialize)]
struct ReasonForm {
    #[serde(default)]
    reason: String,
}

async fn decide(s: Shared, p: Principal, id: i64, approve: bool, reason: String) -> Response {
    let body = Some(axum::Json(super::Decision {
        by: None,
        reason: some(&reason),
    }));
    let resp = if approve {
        super::approve(AxState(s.clone()), Extension(p.clone()), Path(id), body).await
    } else {
        super::reject_approval(AxState(s.clone()), Extension(p.clone()), Path(id), body).await
    };
    let verb = if approve { "approved" } else { "rejected" };
    let flash = outcome(resp, &format!("Approval #{id} {verb}.")).await;
    approvals_page(&s, &p, flash).await
}

async fn approve(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
    Form(f): Form<ReasonForm>,
) -> Response {
    decide(s, p, id, true, f.reason).await
}

async fn reject(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
    Form(f): Form<ReasonForm>,
) -> Response {
    decide(s, p, id, false, f.reason).await
}

// ---- audit ----

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    f: Frame,
    rows: Vec<(crate::store::AuditEntry, String)>,
}

async fn audit(AxState(s): AxState<Shared>, Extension(p): Extension<Principal>) -> Response {
    match s.backend.store.audit_log(200, None).await {
        Ok(list) => render(AuditPage {
            f: Frame::of(&p, "audit"),
            rows: list
                .into_iter()
                .map(|e| {
                    let t = time(e.at);
                    (e, t)
                })
                .collect(),
        }),
        Err(e) => unavailable(e),
    }
}

// ---- configuration ----

#[derive(Template)]
#[template(path = "config.html")]
struct ConfigPage {
    f: Frame,
    path: String,
    text: String,
    flash: Flash,
    problems: Vec<String>,
}

fn running_config(s: &Shared) -> (String, String) {
    match &s.config_path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|e| format!("# cannot read {}: {e}", path.display()));
            (
                path.display().to_string(),
                crate::config::secret::redact(&text).into_owned(),
            )
        }
        None => (
            "(none)".into(),
            "# this reflex was started without a configuration file".into(),
        ),
    }
}

async fn config(AxState(s): AxState<Shared>, Extension(p): Extension<Principal>) -> Response {
    let (path, text) = running_config(&s);
    render(ConfigPage {
        f: Frame::of(&p, "config"),
        path,
        text,
        flash: Flash::default(),
        problems: Vec::new(),
    })
}

#[derive(Deserialize)]
struct ConfigForm {
    #[serde(default)]
    text: String,
}

/// Checks an edited copy as `reflex check` would; nothing is written or run.
async fn config_check(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
    Form(f): Form<ConfigForm>,
) -> Response {
    let (path, _) = running_config(&s);
    let result = crate::config::parse("edited copy", &f.text)
        .map_err(|e| e.to_string())
        .and_then(|c| crate::compile("edited copy".into(), c).map_err(|e| e.to_string()));
    let (flash, problems) = match result {
        Ok(c) => (
            Flash {
                ok: Some(format!(
                    "The edited copy passes its checks ({} sources, {} triggers). Nothing was saved: write it to {path} and reload.",
                    c.sources.len(),
                    c.router.triggers.len()
                )),
                error: None,
            },
            c.warnings,
        ),
        Err(e) => (
            Flash {
                ok: None,
                error: Some("The edited copy has problems:".into()),
            },
            crate::config::secret::redact(&e)
                .lines()
                .map(str::to_string)
                .collect(),
        ),
    };
    render(ConfigPage {
        f: Frame::of(&p, "config"),
        path,
        text: crate::config::secret::redact(&f.text).into_owned(),
        flash,
        problems,
    })
}

async fn config_reload(
    AxState(s): AxState<Shared>,
    Extension(p): Extension<Principal>,
) -> Response {
    let resp = super::reload(AxState(s.clone())).await;
    let flash = outcome(
        resp,
        "Reload started: intake pauses while running deliveries finish, then the file's configuration runs.",
    )
    .await;
    let (path, text) = running_config(&s);
    render(ConfigPage {
        f: Frame::of(&p, "config"),
        path,
        text,
        flash,
        problems: Vec::new(),
    })
}
