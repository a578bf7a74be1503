//! Users, roles and tokens: every API route walked with every role; users' own tokens made,
//! used and revoked; the audit log of every change.

use crate::common::*;
use serde_json::{json, Value};

/// Every route with the least role it needs, written out here on its own (not read from
/// the server's table), so that a route whose role changes fails this test.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("GET", "/api/v1/events", "viewer"),
    ("POST", "/api/v1/events", "operator"),
    ("GET", "/api/v1/events/1", "viewer"),
    ("GET", "/api/v1/deliveries", "viewer"),
    ("GET", "/api/v1/deliveries/1", "viewer"),
    ("POST", "/api/v1/deliveries/1/replay", "operator"),
    ("GET", "/api/v1/triggers", "viewer"),
    ("POST", "/api/v1/triggers/t/pause", "operator"),
    ("POST", "/api/v1/triggers/t/resume", "operator"),
    ("GET", "/api/v1/approvals", "viewer"),
    ("GET", "/api/v1/approvals/1", "viewer"),
    ("POST", "/api/v1/approvals/1/approve", "operator"),
    ("POST", "/api/v1/approvals/1/reject", "operator"),
    ("GET", "/api/v1/pauses", "viewer"),
    ("POST", "/api/v1/pauses", "operator"),
    (
        "POST",
        "/api/v1/pauses/scope:vc:cluster:c1/lift",
        "operator",
    ),
    (
        "POST",
        "/api/v1/pauses/scope:vc:cluster:c1/discard",
        "operator",
    ),
    ("GET", "/api/v1/nodes", "viewer"),
    ("GET", "/api/v1/audit", "viewer"),
    ("GET", "/api/v1/whoami", "viewer"),
    ("GET", "/api/v1/tokens", "admin"),
    ("POST", "/api/v1/tokens", "admin"),
    ("POST", "/api/v1/tokens/999/revoke", "admin"),
    ("GET", "/metrics", "viewer"),
    ("GET", "/ui/overview", "viewer"),
    ("GET", "/ui/overview/live", "viewer"),
    ("GET", "/ui/events", "viewer"),
    ("GET", "/ui/events/1", "viewer"),
    ("GET", "/ui/deliveries", "viewer"),
    ("POST", "/ui/deliveries/1/replay", "operator"),
    ("GET", "/ui/triggers", "viewer"),
    ("POST", "/ui/triggers/t/pause", "operator"),
    ("POST", "/ui/triggers/t/resume", "operator"),
    ("POST", "/ui/triggers/t/replay-dead", "operator"),
    ("POST", "/ui/pauses", "operator"),
    ("POST", "/ui/pauses/scope:vc:cluster:c1/lift", "operator"),
    ("POST", "/ui/pauses/scope:vc:cluster:c1/discard", "operator"),
    ("GET", "/ui/approvals", "viewer"),
    ("POST", "/ui/approvals/1/approve", "operator"),
    ("POST", "/ui/approvals/1/reject", "operator"),
    ("GET", "/ui/audit", "viewer"),
    ("GET", "/ui/config", "admin"),
    ("POST", "/ui/config/check", "admin"),
    ("POST", "/ui/logout", "viewer"),
    // Last: an admin's reload restarts the pipeline.
    ("POST", "/api/v1/reload", "admin"),
    ("POST", "/ui/config/reload", "admin"),
];

const ROLES: [&str; 3] = ["viewer", "operator", "admin"];

fn rank(role: &str) -> usize {
    ROLES.iter().position(|r| *r == role).unwrap()
}

async fn call(r: &Reflex, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let url = format!("{}{path}", r.api);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut req = match method {
        "GET" => client.get(url),
        _ if path.starts_with("/ui/") => client
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(&[("reason", "test")])),
        _ => client.post(url).json(&json!({})),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_route_enforces_its_role_for_every_role() {
    let r = Reflex::start(
        r#"
api:
  listen: 127.0.0.1:0
  token: r0les-adm1n-t0ken
  metrics_token: true
  users:
    - {name: vera, role: viewer}
    - {name: otto, role: operator}
    - {name: ada, role: admin}
triggers:
  - name: t
    filters: [{exact: {type: never}}]
    action: {type: http, url: "http://127.0.0.1:9/"}
"#,
    )
    .await;

    // The test's table is the server's table: a new route must be added here too.
    let mut server: Vec<(String, String)> = reflex::api::auth::ROUTES
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .collect();
    server.sort();
    assert_eq!(server.len(), EXPECTED.len(), "{server:?}");

    // Each user gets a token of their own from the admin token.
    let mut tokens = Vec::new();
    for (user, role) in [("vera", "viewer"), ("otto", "operator"), ("ada", "admin")] {
        let resp = r
            .client
            .post(format!("{}/api/v1/tokens", r.api))
            .bearer_auth("r0les-adm1n-t0ken")
            .json(&json!({"user": user, "label": "roles test"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let b: Value = resp.json().await.unwrap();
        assert_eq!(b["role"], role);
        let token = b["token"].as_str().unwrap().to_string();
        let (st, who) = call(&r, "GET", "/api/v1/whoami", Some(&token)).await;
        assert_eq!((st, who["name"].as_str()), (200, Some(user)), "{who}");
        tokens.push((role, token));
    }

    for (method, path, needs) in EXPECTED {
        // Without credentials: 401 everywhere (a console page sends to the sign-in page).
        let (st, body) = call(&r, method, path, None).await;
        let expect = if path.starts_with("/ui/") && *method == "GET" {
            303
        } else {
            401
        };
        assert_eq!(st, expect, "{method} {path} without a token: {body}");
        let (st, _) = call(&r, method, path, Some("rfx_not-a-real-token")).await;
        assert_eq!(st, expect, "{method} {path} with a wrong token");
        for (role, token) in &tokens {
            let (st, body) = call(&r, method, path, Some(token)).await;
            if rank(role) >= rank(needs) {
                assert!(
                    st != 401 && st != 403,
                    "{method} {path} as {role} (needs {needs}) was refused: {st} {body}"
                );
            } else {
                assert_eq!(
                    st, 403,
                    "{method} {path} as {role} (needs {needs}) was let through: {body}"
                );
                if path.starts_with("/api") {
                    assert_eq!(body["error"]["reason"], "forbidden", "{body}");
                }
            }
        }
    }
    r.wait_ready().await;

    // Every change was recorded: who, what, from where, and the outcome (refusals too).
    let (st, log) = call(&r, "GET", "/api/v1/audit?limit=1000", Some(&tokens[0].1)).await;
    assert_eq!(st, 200);
    let entries = log["entries"].as_array().unwrap();
    let find = |actor: &str, action: &str| {
        entries
            .iter()
            .find(|e| {
                e["actor"] == actor
                    && e["action"] == action
                    && e["target"].as_str().unwrap().starts_with("/api/")
            })
            .unwrap_or_else(|| panic!("no {action} by {actor}: {log}"))
            .clone()
    };
    let replay = find("otto", "delivery.replay");
    assert_eq!(replay["role"], "operator");
    assert_eq!(replay["target"], "/api/v1/deliveries/1/replay");
    assert_eq!(replay["remote"], "127.0.0.1");
    assert!(
        replay["detail"].as_str().unwrap().starts_with("404"),
        "{replay}"
    );
    let refused = find("vera", "trigger.pause");
    assert_eq!(refused["detail"], "refused: role");
    find("api.token", "token.create");
    find("ada", "config.reload");
    // Reads are not changes.
    assert!(!entries.iter().any(|e| e["action"] == ""), "{log}");

    // A revoked token stops working at once; the list shows it revoked, never the token.
    let (_, list) = call(&r, "GET", "/api/v1/tokens", Some(&tokens[2].1)).await;
    let vera = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["user"] == "vera")
        .unwrap()
        .clone();
    assert!(!list.to_string().contains(&tokens[0].1));
    let (st, _) = call(
        &r,
        "POST",
        &format!("/api/v1/tokens/{}/revoke", vera["id"]),
        Some(&tokens[2].1),
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = call(&r, "GET", "/api/v1/events", Some(&tokens[0].1)).await;
    assert_eq!(st, 401);
    // A token for someone who is not a user is refused with the reason.
    let resp = r
        .client
        .post(format!("{}/api/v1/tokens", r.api))
        .bearer_auth(&tokens[2].1)
        .json(&json!({"user": "mallory"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`mallory` is not a user of api.users"),
        "{body}"
    );
    r.stop().await;
}

#[tokio::test]
async fn without_authentication_configured_loopback_acts_as_anonymous_admin() {
    let r = Reflex::start("api: {listen: 127.0.0.1:0}\n").await;
    let (st, who) = call(&r, "GET", "/api/v1/whoami", None).await;
    assert_eq!((st, who["role"].as_str()), (200, Some("admin")), "{who}");
    let (st, _) = call(&r, "POST", "/api/v1/triggers/x/pause", None).await;
    assert_ne!(st, 401);
    let (_, log) = call(&r, "GET", "/api/v1/audit", None).await;
    assert_eq!(log["entries"][0]["actor"], "anonymous", "{log}");
    r.stop().await;
}
