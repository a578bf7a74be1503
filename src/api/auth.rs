//! Who is asking and what they may do: the admin token (`api.token`), users' own API
//! tokens (kept hashed in the store), console sessions (a cookie, with a CSRF token); one
//! role per route, checked for every request; every change recorded in the audit log.

use super::Shared;
use crate::config::{Role, UserConfig};
use crate::sources::util::Rejection;
use crate::store::NewAudit;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::Digest;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The console's session cookie.
pub const SESSION_COOKIE: &str = "reflex_session";
/// The header a session's API requests and htmx requests carry the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Every route of `/api/v1` and `/metrics`: method, path as routed, the least role that may
/// use it, and for changes the action's name in the audit log. A route missing here needs
/// `admin` (fail closed).
pub const ROUTES: &[(&str, &str, Role, &str)] = &[
    ("GET", "/api/v1/events", Role::Viewer, ""),
    ("POST", "/api/v1/events", Role::Operator, "event.publish"),
    ("GET", "/api/v1/events/{seq}", Role::Viewer, ""),
    ("GET", "/api/v1/deliveries", Role::Viewer, ""),
    ("GET", "/api/v1/deliveries/{id}", Role::Viewer, ""),
    (
        "POST",
        "/api/v1/deliveries/{id}/replay",
        Role::Operator,
        "delivery.replay",
    ),
    ("GET", "/api/v1/triggers", Role::Viewer, ""),
    (
        "POST",
        "/api/v1/triggers/{name}/pause",
        Role::Operator,
        "trigger.pause",
    ),
    (
        "POST",
        "/api/v1/triggers/{name}/resume",
        Role::Operator,
        "trigger.resume",
    ),
    ("GET", "/api/v1/approvals", Role::Viewer, ""),
    ("GET", "/api/v1/approvals/{id}", Role::Viewer, ""),
    (
        "POST",
        "/api/v1/approvals/{id}/approve",
        Role::Operator,
        "approval.approve",
    ),
    (
        "POST",
        "/api/v1/approvals/{id}/reject",
        Role::Operator,
        "approval.reject",
    ),
    ("GET", "/api/v1/pauses", Role::Viewer, ""),
    ("POST", "/api/v1/pauses", Role::Operator, "scope.pause"),
    (
        "POST",
        "/api/v1/pauses/{key}/lift",
        Role::Operator,
        "scope.lift",
    ),
    (
        "POST",
        "/api/v1/pauses/{key}/discard",
        Role::Operator,
        "scope.discard",
    ),
    ("GET", "/api/v1/nodes", Role::Viewer, ""),
    ("GET", "/api/v1/audit", Role::Viewer, ""),
    ("GET", "/api/v1/whoami", Role::Viewer, ""),
    ("POST", "/api/v1/reload", Role::Admin, "config.reload"),
    ("GET", "/api/v1/tokens", Role::Admin, ""),
    ("POST", "/api/v1/tokens", Role::Admin, "token.create"),
    (
        "POST",
        "/api/v1/tokens/{id}/revoke",
        Role::Admin,
        "token.revoke",
    ),
    ("GET", "/metrics", Role::Viewer, ""),
    ("GET", "/ui/overview", Role::Viewer, ""),
    ("GET", "/ui/overview/live", Role::Viewer, ""),
    ("GET", "/ui/events", Role::Viewer, ""),
    ("GET", "/ui/events/{seq}", Role::Viewer, ""),
    ("GET", "/ui/deliveries", Role::Viewer, ""),
    (
        "POST",
        "/ui/deliveries/{id}/replay",
        Role::Operator,
        "delivery.replay",
    ),
    ("GET", "/ui/triggers", Role::Viewer, ""),
    (
        "POST",
        "/ui/triggers/{name}/pause",
        Role::Operator,
        "trigger.pause",
    ),
    (
        "POST",
        "/ui/triggers/{name}/resume",
        Role::Operator,
        "trigger.resume",
    ),
    (
        "POST",
        "/ui/triggers/{name}/replay-dead",
        Role::Operator,
        "delivery.replay_dead",
    ),
    ("POST", "/ui/pauses", Role::Operator, "scope.pause"),
    (
        "POST",
        "/ui/pauses/{key}/lift",
        Role::Operator,
        "scope.lift",
    ),
    (
        "POST",
        "/ui/pauses/{key}/discard",
        Role::Operator,
        "scope.discard",
    ),
    ("GET", "/ui/approvals", Role::Viewer, ""),
    (
        "POST",
        "/ui/approvals/{id}/approve",
        Role::Operator,
        "approval.approve",
    ),
    (
        "POST",
        "/ui/approvals/{id}/reject",
        Role::Operator,
        "approval.reject",
    ),
    ("GET", "/ui/audit", Role::Viewer, ""),
    ("GET", "/ui/config", Role::Admin, ""),
    ("POST", "/ui/config/check", Role::Admin, "config.check"),
    ("POST", "/ui/config/reload", Role::Admin, "config.reload"),
    ("POST", "/ui/logout", Role::Viewer, "logout"),
];

/// The role a route needs and its action's name for the audit log.
pub fn route_rule(method: &Method, path: &str) -> (Role, &'static str) {
    ROUTES
        .iter()
        .find(|(m, p, _, _)| *m == method.as_str() && *p == path)
        .map_or((Role::Admin, "change"), |(_, _, r, a)| (*r, *a))
}

/// Who made a request, in which role, and from where.
#[derive(Debug, Clone)]
pub struct Principal {
    /// A user's name, `api.token`, or `anonymous`.
    pub name: String,
    /// What they may do.
    pub role: Role,
    /// How they proved it.
    pub via: Via,
    /// The client's address.
    pub remote: String,
}

/// How a request was authenticated.
#[derive(Debug, Clone)]
pub enum Via {
    /// No authentication is configured (loopback only): every request acts as admin.
    Anonymous,
    /// The shared `api.token`.
    AdminToken,
    /// A user's own API token (its id).
    UserToken(i64),
    /// A console session: the hash of its cookie and its CSRF token.
    Session {
        /// The session's key in the store.
        hash: String,
        /// What its forms carry.
        csrf: String,
    },
}

impl Principal {
    /// Whether this is a person known by name (their name is recorded, not one they give).
    pub fn is_user(&self) -> bool {
        matches!(self.via, Via::UserToken(_) | Via::Session { .. })
    }

    /// The CSRF token of a console session.
    pub fn csrf(&self) -> Option<&str> {
        match &self.via {
            Via::Session { csrf, .. } => Some(csrf),
            _ => None,
        }
    }
}

/// The people of `api.users`, and the bounds on signing in.
pub struct People {
    users: HashMap<String, UserConfig>,
    /// Authentication is required (a token or a user is configured).
    pub required: bool,
    /// How long a session lasts.
    pub session_ttl: Duration,
    /// Failed sign-ins by client address and by user name: (count, window start).
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

/// Failed sign-ins allowed per client address, and per user name, within [`LOGIN_WINDOW`].
pub const LOGIN_FAILURES: u32 = 5;
/// The window of [`LOGIN_FAILURES`].
pub const LOGIN_WINDOW: Duration = Duration::from_secs(300);

impl People {
    /// From the configuration.
    pub fn new(users: &[UserConfig], token_set: bool, session_ttl: Duration) -> People {
        People {
            users: users.iter().map(|u| (u.name.clone(), u.clone())).collect(),
            required: token_set || !users.is_empty(),
            session_ttl,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// A configured user.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.get(name)
    }

    /// How long until sign-ins by `keys` are allowed again, when too many failed.
    pub fn login_blocked(&self, keys: &[&str]) -> Option<Duration> {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        f.retain(|_, (_, at)| now.duration_since(*at) < LOGIN_WINDOW);
        keys.iter()
            .filter_map(|k| f.get(*k))
            .filter(|(n, _)| *n >= LOGIN_FAILURES)
            .map(|(_, at)| LOGIN_WINDOW.saturating_sub(now.duration_since(*at)))
            .max()
    }

    /// Counts a failed sign-in against each of `keys`.
    pub fn login_failed(&self, keys: &[&str]) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for k in keys {
            let e = f.entry(k.to_string()).or_insert((0, now));
            if now.duration_since(e.1) >= LOGIN_WINDOW {
                *e = (0, now);
            }
            e.0 += 1;
        }
    }

    /// Checks a user's password (argon2, off the async threads). `None`: wrong name or
    /// password, or a user without a password.
    pub async fn check_password(&self, name: &str, password: &str) -> Option<Role> {
        let user = self.users.get(name)?;
        let hash = user.password_hash.clone()?;
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
            .await
            .unwrap_or(false);
        ok.then_some(user.role)
    }
}

/// A new secret token (API token, session, CSRF): 32 random bytes, base64url.
pub fn new_secret(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// How the store keeps a token: its SHA-256, in hex. Tokens are random and long, so a
/// fast hash is enough (passwords get argon2).
pub fn hash_token(token: &str) -> String {
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An argon2id hash of `password` in PHC form, with a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt).map_err(|e| format!("making a salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

/// Whether `password` matches the PHC hash (constant time, by argon2's own check).
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    match argon2::PasswordHash::new(hash) {
        Ok(h) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// The value of a cookie of the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether two secrets are equal, in constant time.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn unauthorized(detail: &str) -> Response {
    let mut r = Rejection::new(StatusCode::UNAUTHORIZED, "unauthorized", detail).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"reflex\""),
    );
    r
}

/// Who is asking: from a bearer token, else a session cookie. `Err` is the answer to
/// give (401, or 503 when the store cannot say).
pub async fn identify(
    s: &Shared,
    headers: &HeaderMap,
    remote: String,
) -> Result<Principal, Response> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    // Nothing to check against: loopback answers everyone as anonymous (a script that
    // sends a token anyway is not refused).
    if !s.people.required {
        return Ok(Principal {
            name: "anonymous".into(),
            role: Role::Admin,
            via: Via::Anonymous,
            remote,
        });
    }
    match bearer {
        Some(Some(token)) => {
            let token = token.trim();
            if let Some(admin) = &s.token {
                if same_secret(token, admin.expose()) {
                    return Ok(Principal {
                        name: "api.token".into(),
                        role: Role::Admin,
                        via: Via::AdminToken,
                        remote,
                    });
                }
            }
            let found = s
                .backend
                .store
                .api_token(&hash_token(token))
                .await
                .map_err(|e| store_unavailable(&e))?;
            match found.and_then(|t| s.people.user(&t.user).map(|u| (t.id, u))) {
                Some((id, u)) => Ok(Principal {
                    name: u.name.clone(),
                    role: u.role,
                    via: Via::UserToken(id),
                    remote,
                }),
                None => Err(unauthorized(
                    "the bearer token is not valid (revoked, mistyped, or its user is no longer in api.users)",
                )),
            }
        }
        Some(None) => Err(unauthorized(
            "the Authorization header must be `Bearer TOKEN`",
        )),
        None => {
            if let Some(c) = cookie(headers, SESSION_COOKIE) {
                let hash = hash_token(c);
                let found = s
                    .backend
                    .store
                    .session(&hash, crate::store::now_ms())
                    .await
                    .map_err(|e| store_unavailable(&e))?;
                if let Some(session) = found {
                    if let Some(u) = s.people.user(&session.user) {
                        return Ok(Principal {
                            name: u.name.clone(),
                            role: u.role,
                            via: Via::Session {
                                hash,
                                csrf: session.csrf,
                            },
                            remote,
                        });
                    }
                }
            }
            Err(unauthorized(
                "authentication required: send `Authorization: Bearer TOKEN` (api.token, or a user's token from `reflex tokens create`)",
            ))
        }
    }
}

fn store_unavailable(e: &crate::store::StoreError) -> Response {
    tracing::warn!(error = %e, "cannot check a request's credentials: the store did not answer");
    let mut r = Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "credentials cannot be checked now (the store did not answer); try again",
    )
    .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    r
}

/// The client's address, as the listener saw it.
pub fn remote_of(req: &Request) -> String {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".into(), |c| c.0.ip().to_string())
}

/// For every API route: who is asking, whether their role allows the route, a session's
/// CSRF token on changes, and the audit log entry of every change.
pub async fn authorize(
    axum::extract::State(s): axum::extract::State<Shared>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_string(), |m| m.as_str().to_string());
    let method = req.method().clone();
    let (needed, action) = route_rule(&method, &path);
    let remote = remote_of(&req);
    // The path as the client sent it (inside `nest` the URI lacks the prefix).
    let target = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| req.uri().path().to_string(), |u| u.0.path().to_string());
    let console = path.starts_with("/ui/");
    let who = match identify(&s, req.headers(), remote).await {
        Ok(p) => p,
        // A console page without a session goes to the sign-in page.
        Err(r) if console && r.status() == StatusCode::UNAUTHORIZED && method == Method::GET => {
            return axum::response::Redirect::to("/ui/login").into_response()
        }
        Err(r) => return r,
    };
    let changes = method != Method::GET && method != Method::HEAD;
    if changes {
        if let Some(csrf) = who.csrf().map(str::to_string) {
            let (sent, rebuilt) = csrf_of(req).await;
            req = rebuilt;
            if !same_secret(&sent, &csrf) {
                audit(
                    &s,
                    &who,
                    action,
                    &target,
                    "refused: CSRF token missing or wrong",
                )
                .await;
                return Rejection::new(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    "a change from a console session must carry the session's CSRF token (x-csrf-token, or the form's csrf field); reload the page",
                )
                .into_response();
            }
        }
    }
    if who.role < needed {
        if changes {
            audit(&s, &who, action, &target, "refused: role").await;
        }
        let message = format!(
            "{} {} needs the {} role; {} is {}",
            method,
            path,
            needed.as_str(),
            who.name,
            who.role.as_str()
        );
        if console {
            return (
                StatusCode::FORBIDDEN,
                axum::response::Html(format!(
                    "<!doctype html><title>reflex · not allowed</title><p>Not allowed: {}.</p><p><a href=\"/ui/overview\">Back</a></p>",
                    message.replace('<', "&lt;")
                )),
            )
                .into_response();
        }
        return Rejection::new(StatusCode::FORBIDDEN, "forbidden", message).into_response();
    }
    req.extensions_mut().insert(who.clone());
    let response = next.run(req).await;
    if changes {
        let status = response.status();
        audit(
            &s,
            &who,
            action,
            &target,
            &format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
        )
        .await;
    }
    response
}

/// The CSRF token a change carries: the `x-csrf-token` header (htmx sends it), else the
/// `csrf` field of a form body (read, bounded, and put back for the handler).
async fn csrf_of(req: Request) -> (String, Request) {
    if let Some(v) = req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()) {
        return (v.to_string(), req);
    }
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return (String::new(), req);
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let sent = url::form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    (
        sent,
        Request::from_parts(parts, axum::body::Body::from(bytes)),
    )
}

/// Appends to the audit log; a failure is logged, the action stands.
pub async fn audit(s: &Shared, who: &Principal, action: &str, target: &str, detail: &str) {
    let entry = NewAudit {
        actor: who.name.clone(),
        role: who.role.as_str().into(),
        action: action.into(),
        target: target.into(),
        detail: detail.into(),
        remote: who.remote.clone(),
    };
    tracing::info!(actor = %entry.actor, role = %entry.role, action = %entry.action, target = %entry.target, detail = %entry.detail, remote = %entry.remote, "audit");
    if let Err(e) = s.backend.store.record_audit(&entry).await {
        tracing::error!(error = %e, action = %entry.action, actor = %entry.actor, "the audit log could not be written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "correct horsE"));
        assert!(!verify_password("not a hash", "x"));
        assert_ne!(h, hash_password("correct horse").unwrap(), "salted");
    }

    #[test]
    fn routes_are_listed_once_and_unknown_ones_need_admin() {
        let mut seen = std::collections::HashSet::new();
        for (m, p, _, _) in ROUTES {
            assert!(seen.insert((m, p)), "{m} {p} twice");
        }
        assert_eq!(route_rule(&Method::POST, "/api/v1/whatever").0, Role::Admin);
        assert_eq!(route_rule(&Method::GET, "/api/v1/events").0, Role::Viewer);
    }

    #[test]
    fn login_failures_block_for_the_window() {
        let p = People::new(&[], false, Duration::from_secs(60));
        for _ in 0..LOGIN_FAILURES - 1 {
            p.login_failed(&["ip:1", "user:a"]);
        }
        assert!(p.login_blocked(&["ip:1"]).is_none());
        p.login_failed(&["ip:1", "user:a"]);
        assert!(p.login_blocked(&["ip:2", "user:a"]).is_some());
        assert!(p.login_blocked(&["ip:2", "user:b"]).is_none());
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; reflex_session=xyz; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("xyz"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
