//! Distinctive secrets in every place a secret can go, every failure path provoked, then
//! the log, the API, the metrics and `reflex check` searched for them: none may appear.

use crate::common::Receiver;
use crate::e2e_binary::{free_port, BIN};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Each one distinct, so that a leak names where it came from.
const SECRETS: &[&str] = &[
    "ZqApiTok3n",
    "ZqSourceTok3n",
    "ZqHmacK3y",
    "ZqUrlPath5ecret",
    "ZqHeader5ecret",
    "ZqBody5ecret",
    "ZqExecEnv5ecret",
    "ZqVcPassw0rd",
    "ZqSlackHook5ecret",
    "ZqPagerKey5ecret",
    "ZqAmqpPassw0rd",
    "ZqSlackSigning5ecret",
];

#[tokio::test]
async fn secrets_appear_nowhere() {
    let sim = vsphere::sim::Simulator::start();
    let dir = tempfile::tempdir().unwrap();
    // A receiver that fails and echoes a secret back in its error page, as a misbehaving
    // service might.
    let rcv = Receiver::start_with_reply(Some((
        vec![("content-type", "text/plain".into())],
        "denied for token ZqHeader5ecret".into(),
    )))
    .await;
    rcv.status.store(500, std::sync::atomic::Ordering::SeqCst);
    let closed = free_port();
    let (http, api) = (free_port(), free_port());
    let rcv_url = format!("http://{}", rcv.addr);
    let config = dir.path().join("reflex.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
http: {{listen: "127.0.0.1:{http}"}}
api: {{listen: "127.0.0.1:{api}", token: ZqApiTok3n, metrics_token: true}}
store: {store}
secrets:
  path: ZqUrlPath5ecret
  header: ZqHeader5ecret
  body: ZqBody5ecret
  exec: ZqExecEnv5ecret
vcenters:
  vc:
    url: {vc}
    username: user
    password: ZqVcPassw0rd
    insecure: true
sources:
  - {{name: hook, type: webhook, path: /hook, auth: {{type: bearer, token: ZqSourceTok3n}}}}
  - {{name: signed, type: webhook, path: /signed, auth: {{type: hmac, header: X-Sig, secret: ZqHmacK3y}}}}
  - {{name: vcev, type: vcenter, vcenter: vc, poll_interval: 1s}}
  - {{name: chat, type: slack, path: /slack, signing_secret: ZqSlackSigning5ecret, verbs: {{x: {{help: "x"}}}}}}
triggers:
  - name: closed-port
    action:
      type: http_request
      url: "http://127.0.0.1:{closed}/services/{{{{ secrets.path }}}}"
      headers: {{Authorization: "Bearer {{{{ secrets.header }}}}"}}
      body: "{{{{ secrets.body }}}}"
    delivery: {{max_attempts: 2, backoff: 50ms}}
  - name: echoing-500
    action:
      type: http_request
      url: "{rcv}/{{{{ secrets.path }}}}"
      headers: {{X-Token: "{{{{ secrets.header }}}}"}}
    delivery: {{max_attempts: 2, backoff: 50ms}}
  - name: exec-prints
    action: {{type: exec, command: /bin/sh, args: ["-c", "echo token=$T; echo $T >&2; exit 3"], env: {{T: "{{{{ secrets.exec }}}}"}}}}
    delivery: {{max_attempts: 2, backoff: 50ms}}
  - name: slack-webhook
    action: {{type: notify.slack, webhook_url: "http://127.0.0.1:{closed}/services/ZqSlackHook5ecret", text: "x"}}
    delivery: {{max_attempts: 2, backoff: 50ms}}
  - name: pagerduty-key
    action: {{type: notify.pagerduty, routing_key: ZqPagerKey5ecret, summary: "x", url: "{rcv}/enqueue"}}
    delivery: {{max_attempts: 2, backoff: 50ms}}
  - name: amqp-login
    action: {{type: amqp, url: "amqp://guest:ZqAmqpPassw0rd@127.0.0.1:5672/%2f", exchange: amq.topic}}
    delivery: {{max_attempts: 2, backoff: 50ms}}
  - name: vcenter-login
    action: {{type: vsphere.power, vcenter: vc, op: "on", vm: {{name: "{{{{ event.subject }}}}"}}}}
    delivery: {{max_attempts: 2, backoff: 50ms}}
"#,
            store = crate::common::store_config(&dir.path().join("data")),
            vc = sim.url,
            rcv = rcv_url,
        ),
    )
    .unwrap();
    let log = dir.path().join("reflex.log");
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::from(
            std::fs::File::create(dir.path().join("out.log")).unwrap(),
        ))
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let api_url = format!("http://127.0.0.1:{api}");
    if !crate::e2e_binary::is_ready(&api_url).await {
        let _ = child.kill();
        panic!("not ready: {}", std::fs::read_to_string(&log).unwrap());
    }
    let c = reqwest::Client::new();
    let hook = format!("http://127.0.0.1:{http}/hook");
    // Refused requests: a wrong token, a wrong signature.
    let r = c
        .post(&hook)
        .bearer_auth("nope")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("http://127.0.0.1:{http}/signed"))
        .header("x-sig", "00")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("http://127.0.0.1:{http}/slack"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header(
            "x-slack-request-timestamp",
            chrono::Utc::now().timestamp().to_string(),
        )
        .header("x-slack-signature", "v0=00")
        .body("command=%2Fiaas&text=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // One event that every trigger fails on.
    let r = c
        .post(&hook)
        .bearer_auth("ZqSourceTok3n")
        .header("content-type", "application/json")
        .body(r#"{"vm": "DC0_H0_VM0"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let get = |path: String| {
        let c = c.clone();
        let url = format!("{api_url}{path}");
        async move {
            c.get(url)
                .bearer_auth("ZqApiTok3n")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    // Every delivery dead (each failure path ran to its end).
    let mut dead = serde_json::Value::Null;
    for _ in 0..200 {
        dead = serde_json::from_str(&get("/api/v1/deliveries?state=dead".into()).await).unwrap();
        if dead["deliveries"].as_array().map(Vec::len) == Some(7) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<i64> = dead["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 7, "every trigger's delivery dead: {dead}");

    let mut seen = String::new();
    for path in [
        "/api/v1/events",
        "/api/v1/deliveries",
        "/api/v1/triggers",
        "/api/v1/nodes",
        "/metrics",
    ] {
        seen.push_str(&get(path.into()).await);
    }
    let events: serde_json::Value =
        serde_json::from_str(&get("/api/v1/events".into()).await).unwrap();
    for e in events["events"].as_array().unwrap() {
        seen.push_str(&get(format!("/api/v1/events/{}", e["seq"])).await);
    }
    let mut details = String::new();
    for id in &ids {
        details.push_str(&get(format!("/api/v1/deliveries/{id}")).await);
    }
    // The failures are recorded (so the search below looks at real error text)…
    for what in ["exit", "500", "127.0.0.1"] {
        assert!(
            details.contains(what),
            "no `{what}` in the attempt records: {details}"
        );
    }
    seen.push_str(&details);
    let check = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    seen.push_str(&String::from_utf8_lossy(&check.stdout));
    seen.push_str(&String::from_utf8_lossy(&check.stderr));
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("echoing-500"),
        "the log has the failures: {logged}"
    );
    // …and none of the secrets is anywhere.
    for s in SECRETS {
        assert!(
            !seen.contains(s),
            "`{s}` leaked into the API, metrics or check: {seen}"
        );
        assert!(!logged.contains(s), "`{s}` leaked into the log: {logged}");
    }
}
