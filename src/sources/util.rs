//! Request plumbing shared by HTTP sources: JSON error replies, body limits, ingest replies.

use crate::ingest::{Accepted, Ingest, IngestError};
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cloudevents::Event;
use serde_json::json;

/// A refused request: status, machine-readable reason, message and optional detail.
#[derive(Debug)]
pub struct Rejection {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable reason (`unauthorized`, `schema`, `too_large`…).
    pub reason: &'static str,
    /// What is wrong, for a human.
    pub message: String,
    /// Extra fields (e.g. the failing schema path).
    pub detail: Option<serde_json::Value>,
}

impl Rejection {
    /// A rejection without detail.
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            status,
            reason,
            message: message.into(),
            detail: None,
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": { "reason": self.reason, "message": self.message } });
        if let Some(d) = self.detail {
            body["error"]["detail"] = d;
        }
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// Reads the body up to `limit` bytes; larger bodies get `413`.
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, Rejection> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // axum wraps http-body-util's LengthLimitError; its message is the stable signal.
        let why = format!("{e:?}");
        let too_large = why.contains("LengthLimitError");
        if why.contains("TimeoutError") || why.contains("Elapsed") {
            Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body did not arrive within http.body_timeout",
            )
        } else if too_large {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is larger than the limit of {limit} bytes"),
            )
        } else {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read the body: {e}"),
            )
        }
    })
}

/// What a sender is told when the store cannot take its event.
pub const STORE_REFUSED: &str = "the event could not be stored; it was not accepted, retry later";

/// Logs a store failure at most once a second (an outage fails every request), with the
/// number of failures not logged since the last line.
fn log_store_error(source: &str, e: &dyn std::fmt::Display) {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    static QUIET: AtomicU64 = AtomicU64::new(0);
    let now = crate::store::now_ms();
    let last = LAST.load(Ordering::Relaxed);
    if now - last >= 1000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let not_logged = QUIET.swap(0, Ordering::Relaxed);
        tracing::error!(source, error = %e, not_logged, "cannot store events; they are refused with 503");
    } else {
        QUIET.fetch_add(1, Ordering::Relaxed);
    }
}

/// Submits events and turns the result into `202` with ids, `503` or `500`.
pub async fn submit(ingest: &Ingest, source: &str, events: Vec<Event>) -> Response {
    match ingest.submit(source, events).await {
        Ok(accepted) => accepted_response(&accepted),
        Err(IngestError::Overloaded(n)) => {
            ingest.metrics().event_rejected(source, "overloaded");
            Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!("{n} events are waiting to be stored; retry later"),
            )
            .into_response()
        }
        Err(e @ IngestError::TooDeep { .. }) => {
            ingest.metrics().event_rejected(source, "too_deep");
            Rejection::new(StatusCode::BAD_REQUEST, "too_deep", e.to_string()).into_response()
        }
        Err(IngestError::Stopping) => {
            ingest.metrics().event_rejected(source, "stopping");
            Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "reflex is stopping or reloading; the event was not accepted, retry shortly",
            )
            .into_response()
        }
        Err(IngestError::Bus(e)) => {
            ingest.metrics().event_rejected(source, "bus");
            log_store_error(source, &e);
            Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus",
                "the event bus cannot take events now; the event was not accepted, retry shortly",
            )
            .into_response()
        }
        Err(IngestError::Store(e)) => {
            ingest.metrics().event_rejected(source, "store");
            log_store_error(source, &e);
            // The cause (a path, a host, a driver's words) is for the operator's log, not
            // for whoever sent the request.
            Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "store", STORE_REFUSED).into_response()
        }
    }
}

fn accepted_response(accepted: &[Accepted]) -> Response {
    let ids: Vec<&str> = accepted.iter().map(|a| a.id.as_str()).collect();
    let duplicates: Vec<&str> = accepted
        .iter()
        .filter(|a| a.duplicate)
        .map(|a| a.id.as_str())
        .collect();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "ids": ids, "duplicates": duplicates })),
    )
        .into_response()
}

/// Adds a POST route at `path` that hands each request to `handle` with the source.
pub fn post_route<S, F, Fut>(
    router: axum::Router,
    path: &str,
    source: S,
    ingest: Ingest,
    handle: F,
) -> axum::Router
where
    S: Send + Sync + 'static,
    F: Fn(std::sync::Arc<S>, Ingest, axum::http::HeaderMap, Body) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    let source = std::sync::Arc::new(source);
    router.route(
        path,
        axum::routing::post(move |headers: axum::http::HeaderMap, body: Body| {
            handle.clone()(source.clone(), ingest.clone(), headers, body)
        }),
    )
}

/// Counts and returns a rejection.
pub fn reject(ingest: &Ingest, source: &str, r: Rejection) -> Response {
    ingest.metrics().event_rejected(source, r.reason);
    r.into_response()
}
