//! The console over real HTTP, as a browser uses it: sign-in with a password, a session
//! cookie, CSRF tokens on every change, roles on pages and actions, sign-out, the sign-in
//! bound, and the audit log.

use crate::common::*;
use serde_json::json;
use std::sync::atomic::Ordering;

const ADMIN_TOKEN: &str = "c0nsole-adm1n-t0ken";

/// A browser: no redirects followed, cookies kept by hand.
struct Browser {
    client: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

impl Browser {
    fn new(base: &str) -> Browser {
        Browser {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: base.to_string(),
            cookie: None,
        }
    }

    async fn get(&self, path: &str) -> (u16, String, reqwest::header::HeaderMap) {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        let resp = req.send().await.unwrap();
        let (st, h) = (resp.status().as_u16(), resp.headers().clone());
        (st, resp.text().await.unwrap(), h)
    }

    async fn post(
        &self,
        path: &str,
        form: &[(&str, &str)],
    ) -> (u16, String, reqwest::header::HeaderMap) {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(form));
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        let resp = req.send().await.unwrap();
        let (st, h) = (resp.status().as_u16(), resp.headers().clone());
        (st, resp.text().await.unwrap(), h)
    }

    async fn login(&mut self, user: &str, password: &str) -> u16 {
        let (st, _, h) = self
            .post("/ui/login", &[("user", user), ("password", password)])
            .await;
        if let Some(c) = h.get("set-cookie") {
            let c = c.to_str().unwrap();
            assert!(c.contains("HttpOnly"), "{c}");
            assert!(c.contains("SameSite=Strict"), "{c}");
            self.cookie = Some(c.split(';').next().unwrap().to_string());
        }
        st
    }
}

#[tokio::test]
async fn a_console_session_signs_in_replays_a_dead_delivery_and_signs_out() {
    let otto = reflex::api::auth::hash_password("otto-pa55word").unwrap();
    let vera = reflex::api::auth::hash_password("vera-pa55word").unwrap();
    let recv = Receiver::start().await;
    recv.status.store(500, Ordering::SeqCst);
    let mut r = Reflex::start(&format!(
        r#"
api:
  listen: 127.0.0.1:0
  token: {ADMIN_TOKEN}
  users:
    - {{name: otto, role: operator, password_hash: "{otto}"}}
    - {{name: vera, role: viewer, password_hash: "{vera}"}}
triggers:
  - name: notify-ops
    filters: [{{exact: {{type: disk.full}}}}]
    action: {{type: http, url: "{}"}}
    delivery: {{max_attempts: 1}}
"#,
        recv.url()
    ))
    .await;
    r.client = client_with_token(ADMIN_TOKEN);
    let resp = r
        .client
        .post(format!("{}/api/v1/events", r.api))
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": "ev-console-1", "source": "/test", "type": "disk.full",
                   "subject": "datastore-07", "data": {"note": "needle-in-the-haystack"}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let dead = r
        .wait_deliveries("state=dead&trigger=notify-ops", 20, |l| l.len() == 1)
        .await;
    let (id, seq) = (
        dead[0]["id"].as_i64().unwrap(),
        dead[0]["event_seq"].as_i64().unwrap(),
    );

    let mut b = Browser::new(&r.api);
    // Not signed in: every page sends to the sign-in page; a change is refused.
    let (st, _, h) = b.get("/ui/overview").await;
    assert_eq!((st, h["location"].to_str().unwrap()), (303, "/ui/login"));
    let (st, _, _) = b.post(&format!("/ui/deliveries/{id}/replay"), &[]).await;
    assert_eq!(st, 401);
    assert_eq!(b.login("otto", "wrong-password").await, 401);
    assert!(b.cookie.is_none());
    assert_eq!(b.login("otto", "otto-pa55word").await, 303);

    // The overview, and the event found by a word of its data.
    let (st, page, _) = b.get("/ui/overview").await;
    assert_eq!(st, 200);
    assert!(page.contains("otto (operator)"), "{page}");
    assert!(page.contains("hx-get=\"/ui/overview/live\""), "{page}");
    let (_, page, _) = b.get("/ui/triggers").await;
    assert!(page.contains("type = disk.full"), "{page}");
    assert!(!page.contains("id=\"all-paused\""), "{page}");
    // Every changing trigger paused together (`*`) shows, and resumes from the console.
    let resp = r
        .client
        .post(format!("{}/api/v1/triggers/*/pause", r.api))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let (_, page, _) = b.get("/ui/triggers").await;
    assert!(page.contains("id=\"all-paused\""), "{page}");
    let token = csrf_of(&page);
    let (st, page, _) = b.post("/ui/triggers/%2A/resume", &[("csrf", &token)]).await;
    assert_eq!(st, 200, "{page}");
    assert!(page.contains("Trigger `*` resumed."), "{page}");
    assert!(!page.contains("id=\"all-paused\""), "{page}");
    let (st, page, _) = b.get("/ui/events?q=needle-in-the").await;
    assert_eq!(st, 200);
    assert!(
        page.contains(&format!("href=\"/ui/events/{seq}\"")),
        "{page}"
    );
    let (_, page, _) = b.get("/ui/events?q=not-there-at-all").await;
    assert!(
        !page.contains(&format!("href=\"/ui/events/{seq}\"")),
        "{page}"
    );
    let (st, page, _) = b.get(&format!("/ui/events/{seq}")).await;
    assert_eq!(st, 200);
    assert!(page.contains("needle-in-the-haystack"), "{page}");
    assert!(page.contains("class=\"replay\""), "{page}");
    let token = csrf_of(&page);

    // A change without the session's CSRF token is refused; with it, the replay runs.
    let (st, body, _) = b.post(&format!("/ui/deliveries/{id}/replay"), &[]).await;
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("csrf"), "{body}");
    let (st, _, _) = b
        .post(
            &format!("/ui/deliveries/{id}/replay"),
            &[("csrf", "forged")],
        )
        .await;
    assert_eq!(st, 403);
    recv.status.store(200, Ordering::SeqCst);
    let (st, page, _) = b
        .post(&format!("/ui/deliveries/{id}/replay"), &[("csrf", &token)])
        .await;
    assert_eq!(st, 200, "{page}");
    assert!(page.contains(&format!("Delivery {id} replayed")), "{page}");
    r.wait_deliveries("state=succeeded&trigger=notify-ops", 20, |l| l.len() == 1)
        .await;

    // A viewer sees no replay button, and their forged POST (with their own valid CSRF
    // token) is refused for the role.
    let mut v = Browser::new(&r.api);
    assert_eq!(v.login("vera", "vera-pa55word").await, 303);
    let (_, page, _) = v.get(&format!("/ui/events/{seq}")).await;
    assert!(!page.contains("class=\"replay\""), "{page}");
    let vtoken = csrf_of(&page);
    let (st, body, _) = v
        .post(&format!("/ui/deliveries/{id}/replay"), &[("csrf", &vtoken)])
        .await;
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("needs the operator role"), "{body}");
    let (st, _, _) = v.get("/ui/config").await;
    assert_eq!(st, 403);

    // Signing out ends the session: the old cookie is refused.
    let (st, _, h) = b.post("/ui/logout", &[("csrf", &token)]).await;
    assert_eq!(st, 303);
    assert!(h["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let (st, _, h) = b.get("/ui/overview").await;
    assert_eq!((st, h["location"].to_str().unwrap()), (303, "/ui/login"));

    // Sign-ins are bounded: after 5 failures from one address (otto's mistyped password
    // above was the first), even the right password waits.
    let mut m = Browser::new(&r.api);
    for _ in 0..4 {
        assert_eq!(m.login("vera", "guess").await, 401);
    }
    assert_eq!(m.login("vera", "vera-pa55word").await, 429);

    // The audit log has who did what from where.
    let log = r.api_get("/api/v1/audit?limit=100").await;
    let entries = log["entries"].as_array().unwrap();
    let has = |actor: &str, action: &str, detail: &str| {
        entries.iter().any(|e| {
            e["actor"] == actor
                && e["action"] == action
                && e["detail"].as_str().unwrap().starts_with(detail)
                && e["remote"] == "127.0.0.1"
        })
    };
    assert!(has("otto", "login", "signed in"), "{log}");
    assert!(has("otto", "login", "refused"), "{log}");
    assert!(has("otto", "delivery.replay", "200"), "{log}");
    assert!(has("otto", "delivery.replay", "refused: CSRF"), "{log}");
    assert!(has("vera", "delivery.replay", "refused: role"), "{log}");
    assert!(has("otto", "logout", "303"), "{log}");
    assert!(has("vera", "login", "refused: too many"), "{log}");
    r.stop().await;
}
