//! Every status code of the HTTP sources, and what gets stored.

use crate::common::{cloudevent, post_ce, Receiver, Reflex};
use serde_json::json;

const CONFIG: &str = r#"
secrets:
  tok: s3cret
sources:
  - name: hook
    type: webhook
    path: /hooks/a
    auth: {type: bearer, token: "${env:REFLEX_IT_TOKEN}"}
    max_body: 200
    schema:
      type: object
      required: [alert, vm]
      properties:
        alert: {type: string}
        vm: {type: string}
        count: {type: integer}
    mapping:
      type: "alert.{{ body.alert }}"
      subject: "{{ body.vm }}"
      id: "{{ body.id }}"
      routing_key: "alerts.{{ body.vm }}"
  - name: signed
    type: webhook
    path: /hooks/signed
    auth: {type: hmac, header: X-Signature, secret: k3y, prefix: "sha256="}
  - name: slack
    type: webhook
    path: /hooks/slack
    auth:
      type: hmac
      header: X-Slack-Signature
      prefix: "v0="
      secret: k3y
      timestamp: {header: X-Slack-Request-Timestamp, signed: "v0:{timestamp}:{body}", tolerance: 1m}
  - name: std
    type: webhook
    path: /hooks/std
    auth: {type: standard_webhooks, secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
  - name: ce
    type: cloudevents
    path: /events
    max_batch: 3
"#;

async fn start() -> Reflex {
    std::env::set_var("REFLEX_IT_TOKEN", "t0ken");
    Reflex::start(CONFIG).await
}

async fn post_hook(r: &Reflex, token: Option<&str>, ct: &str, body: String) -> reqwest::Response {
    let mut req = r
        .client
        .post(format!("{}/hooks/a", r.http))
        .header("content-type", ct)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn error_reason(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    (status, body["error"].clone())
}

#[tokio::test]
async fn webhook_statuses_and_mapping() {
    let r = start().await;
    let good = json!({"alert": "disk_full", "vm": "web-1", "id": "a-1"}).to_string();

    let resp = post_hook(&r, Some("t0ken"), "application/json", good.clone()).await;
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["ids"], json!(["a-1"]));

    // The stored event carries the mapped attributes.
    let events = r.api_get("/api/v1/events").await;
    let seq = events["events"][0]["seq"].as_i64().unwrap();
    let ev = r.api_get(&format!("/api/v1/events/{seq}")).await;
    assert_eq!(ev["event"]["type"], "alert.disk_full");
    assert_eq!(ev["event"]["subject"], "web-1");
    assert_eq!(ev["event"]["routingkey"], "alerts.web-1");
    assert_eq!(ev["event"]["source"], "/reflex/sources/hook");
    assert_eq!(ev["event"]["data"]["vm"], "web-1");

    let (s, e) = error_reason(post_hook(&r, None, "application/json", good.clone()).await).await;
    assert_eq!((s, e["reason"].as_str().unwrap()), (401, "unauthorized"));
    let (s, _) =
        error_reason(post_hook(&r, Some("wrong"), "application/json", good.clone()).await).await;
    assert_eq!(s, 401);

    let (s, e) = error_reason(post_hook(&r, Some("t0ken"), "text/plain", good.clone()).await).await;
    assert_eq!(
        (s, e["reason"].as_str().unwrap()),
        (415, "unsupported_media_type")
    );

    let (s, e) =
        error_reason(post_hook(&r, Some("t0ken"), "application/json", "{not json".into()).await)
            .await;
    assert_eq!((s, e["reason"].as_str().unwrap()), (400, "invalid_json"));

    let bad = json!({"alert": "x", "vm": "v", "count": "three"}).to_string();
    let (s, e) = error_reason(post_hook(&r, Some("t0ken"), "application/json", bad).await).await;
    assert_eq!((s, e["reason"].as_str().unwrap()), (400, "schema"));
    assert_eq!(e["detail"]["instance_path"], "/count");
    assert_eq!(e["detail"]["schema_path"], "/properties/count/type");

    let missing = json!({"alert": "x"}).to_string();
    let (s, e) =
        error_reason(post_hook(&r, Some("t0ken"), "application/json", missing).await).await;
    assert_eq!(s, 400);
    assert!(e["message"].as_str().unwrap().contains("vm"), "{e}");

    let big = json!({"alert": "x", "vm": "v", "pad": "x".repeat(300)}).to_string();
    let (s, e) = error_reason(post_hook(&r, Some("t0ken"), "application/json", big).await).await;
    assert_eq!((s, e["reason"].as_str().unwrap()), (413, "too_large"));

    // Nothing invalid entered the store.
    let events = r.api_get("/api/v1/events").await;
    assert_eq!(events["events"].as_array().unwrap().len(), 1);

    let m = r.metrics().await;
    assert!(
        m.contains(r#"reflex_events_rejected_total{source="hook",reason="schema"} 2"#),
        "{m}"
    );
    assert!(
        m.contains(r#"reflex_events_received_total{source="hook"} 1"#),
        "{m}"
    );
    r.stop().await;
}

/// A timestamped HMAC (Slack's scheme): a stale timestamp is refused before the body is
/// read, and a captured request sent again is refused as a replay and stored once.
#[tokio::test]
async fn timestamped_hmac_refuses_stale_and_replayed_requests() {
    let r = start().await;
    let body = br#"{"a":1}"#.to_vec();
    let send = |t: i64, body: Vec<u8>| {
        let sig =
            reflex::sources::auth::sign_timestamped(b"k3y", "v0:{timestamp}:{body}", t, &body);
        r.client
            .post(format!("{}/hooks/slack", r.http))
            .header("content-type", "application/json")
            .header("x-slack-request-timestamp", t.to_string())
            .header("x-slack-signature", format!("v0={sig}"))
            .body(body)
            .send()
    };
    let now = chrono::Utc::now().timestamp();
    assert_eq!(send(now, body.clone()).await.unwrap().status(), 202);
    let (status, err) = error_reason(send(now, body.clone()).await.unwrap()).await;
    assert_eq!(
        (status, err["reason"].as_str()),
        (409, Some("replayed")),
        "{err}"
    );
    // The same body sent anew (a new timestamp, a new signature) is a new request.
    assert_eq!(send(now + 1, body.clone()).await.unwrap().status(), 202);
    let (status, err) = error_reason(send(now - 120, body.clone()).await.unwrap()).await;
    assert_eq!(status, 401, "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("away from now"),
        "{err}"
    );
    let events = r.api_get("/api/v1/events?limit=100").await;
    let n = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["received_by"] == "slack")
        .count();
    assert_eq!(n, 2, "{events}");
    r.stop().await;
}

#[tokio::test]
async fn hmac_and_standard_webhooks() {
    let r = start().await;
    let body = br#"{"a":1}"#.to_vec();
    let sig = reflex::sources::auth::sign_hex(b"k3y", &body);
    let send = |sig: String| {
        r.client
            .post(format!("{}/hooks/signed", r.http))
            .header("content-type", "application/json")
            .header("x-signature", sig)
            .body(body.clone())
            .send()
    };
    assert_eq!(send(format!("sha256={sig}")).await.unwrap().status(), 202);
    assert_eq!(
        send(format!("sha256={}", "0".repeat(64)))
            .await
            .unwrap()
            .status(),
        401
    );

    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let now = chrono::Utc::now().timestamp();
    let send_std = |ts: i64, sig: String| {
        r.client
            .post(format!("{}/hooks/std", r.http))
            .header("content-type", "application/json")
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(body.clone())
            .send()
    };
    let good = reflex::sources::auth::sign_standard(secret, "msg_1", now, &body);
    let first: serde_json::Value = send_std(now, good.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["ids"], json!(["msg_1"]), "{first}");
    // The sender's retry of the same message (same webhook-id) is a duplicate.
    let retry: serde_json::Value = send_std(now, good).await.unwrap().json().await.unwrap();
    assert_eq!(retry["duplicates"], json!(["msg_1"]), "{retry}");
    let stale = reflex::sources::auth::sign_standard(secret, "msg_1", now - 600, &body);
    assert_eq!(send_std(now - 600, stale).await.unwrap().status(), 401);
    r.stop().await;
}

#[tokio::test]
async fn cloudevents_modes_and_dedup() {
    let r = start().await;
    // Structured.
    let resp = post_ce(
        &r,
        "/events",
        cloudevent("s-1", "t.structured", json!({"x": 1})),
    )
    .await;
    assert_eq!(resp.status(), 202);
    // Binary.
    let resp = r
        .client
        .post(format!("{}/events", r.http))
        .header("ce-specversion", "1.0")
        .header("ce-id", "b-1")
        .header("ce-source", "/bin")
        .header("ce-type", "t.binary")
        .header("ce-subject", "vm-9")
        .header("ce-vsphereapiversion", "8.0")
        .header("content-type", "application/json")
        .body(r#"{"y":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // Batch.
    let batch = format!(
        "[{},{}]",
        cloudevent("k-1", "t.batch", json!(1)),
        cloudevent("k-2", "t.batch", json!(2))
    );
    let resp = r
        .client
        .post(format!("{}/events", r.http))
        .header("content-type", "application/cloudevents-batch+json")
        .body(batch)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["ids"], json!(["k-1", "k-2"]));
    // A batch over max_batch is refused whole.
    let four = format!(
        "[{}]",
        (0..4)
            .map(|i| cloudevent(&format!("z-{i}"), "t", json!(i)))
            .collect::<Vec<_>>()
            .join(",")
    );
    let resp = r
        .client
        .post(format!("{}/events", r.http))
        .header("content-type", "application/cloudevents-batch+json")
        .body(four)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // Invalid CloudEvent: no id.
    let resp = post_ce(
        &r,
        "/events",
        json!({"specversion": "1.0", "source": "/x", "type": "t"}).to_string(),
    )
    .await;
    let (s, e) = error_reason(resp).await;
    assert_eq!(
        (s, e["reason"].as_str().unwrap()),
        (400, "invalid_cloudevent")
    );
    // Not a CloudEvent at all.
    let resp = r.post_json("/events", &json!({"a": 1})).await;
    assert_eq!(resp.status(), 415);
    // Duplicate (source, id): accepted, reported, stored once.
    let resp = post_ce(
        &r,
        "/events",
        cloudevent("s-1", "t.structured", json!({"x": 1})),
    )
    .await;
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["duplicates"], json!(["s-1"]));

    let events = r.api_get("/api/v1/events?limit=100").await;
    let list = events["events"].as_array().unwrap();
    assert_eq!(list.len(), 4, "{list:#?}");
    let bin = list.iter().find(|e| e["id"] == "b-1").unwrap();
    let ev = r.api_get(&format!("/api/v1/events/{}", bin["seq"])).await;
    assert_eq!(ev["event"]["subject"], "vm-9");
    assert_eq!(ev["event"]["vsphereapiversion"], "8.0");
    assert_eq!(ev["event"]["data"]["y"], 2);
    r.stop().await;
}

#[tokio::test]
async fn overload_answers_503_and_keeps_every_202() {
    let r = Reflex::start(
        r#"
http:
  listen: 127.0.0.1:0
  queue: 1
sources:
  - {name: ce, type: cloudevents, path: /events}
"#,
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let client = r.client.clone();
        let url = format!("{}/events", r.http);
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .header("content-type", "application/cloudevents+json")
                .body(cloudevent(&format!("o-{i}"), "t", json!(i)))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().contains_key("retry-after");
            let body: serde_json::Value = resp.json().await.unwrap();
            (i, status, retry_after, body)
        }));
    }
    let mut accepted = std::collections::HashSet::new();
    let mut overloaded = 0;
    for t in tasks {
        let (i, status, retry_after, body) = t.await.unwrap();
        match status {
            202 => {
                accepted.insert(format!("o-{i}"));
            }
            503 => {
                overloaded += 1;
                assert!(retry_after);
                assert_eq!(body["error"]["reason"], "overloaded");
            }
            s => panic!("unexpected status {s}: {body}"),
        }
    }
    assert!(
        overloaded > 0,
        "queue of 1 never overflowed under 300 concurrent requests"
    );
    let events = r.api_get("/api/v1/events?limit=1000").await;
    let stored: std::collections::HashSet<String> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stored, accepted, "every 202 is stored, nothing else");
    r.stop().await;
}

#[tokio::test]
async fn api_token_is_required_when_set() {
    let r = Reflex::start(
        r#"
api:
  listen: 127.0.0.1:0
  token: api-t0k
"#,
    )
    .await;
    let resp = r
        .client
        .get(format!("{}/api/v1/events", r.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = r
        .client
        .get(format!("{}/api/v1/events", r.api))
        .bearer_auth("api-t0k")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(
        r.client
            .get(format!("{}/healthz", r.api))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    r.stop().await;
}

#[tokio::test]
async fn event_history_search() {
    let r = start().await;
    let events = [
        (
            "s-1",
            "vm.alarm",
            "web-1",
            json!({"alarm": "VM CPU Usage", "status": "red"}),
        ),
        (
            "s-2",
            "vm.alarm",
            "web-2",
            json!({"alarm": "VM Memory Usage", "status": "yellow"}),
        ),
        (
            "s-3",
            "host.maintenance",
            "esx-1",
            json!({"note": "100% busy"}),
        ),
        (
            "s-4",
            "vm.alarm",
            "web-1",
            json!({"alarm": "VM Storage Usage", "status": "red"}),
        ),
    ];
    for (id, ty, subject, data) in &events {
        let mut ce: serde_json::Value =
            serde_json::from_str(&cloudevent(id, ty, data.clone())).unwrap();
        ce["subject"] = json!(subject);
        assert_eq!(post_ce(&r, "/events", ce.to_string()).await.status(), 202);
    }
    let ids = |v: serde_json::Value| -> Vec<String> {
        v["events"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    let get = |q: &'static str| {
        let path = format!("/api/v1/events?{q}");
        let r = &r;
        async move { r.api_get(&path).await }
    };
    assert_eq!(ids(get("type=vm.alarm").await), ["s-4", "s-2", "s-1"]);
    assert_eq!(
        ids(get("type=vm.alarm&subject=web-1").await),
        ["s-4", "s-1"]
    );
    assert_eq!(
        ids(get("q=memory%20usage").await),
        ["s-2"],
        "text, any case"
    );
    assert_eq!(ids(get("q=%25").await), ["s-3"], "`%` is matched as itself");
    assert_eq!(ids(get("source=/test&id=s-3").await), ["s-3"]);
    assert_eq!(
        ids(get("since=2000-01-01T00:00:00Z&limit=2").await),
        ["s-4", "s-3"]
    );
    assert!(ids(get("since=2999-01-01T00:00:00Z").await).is_empty());
    // Following new events: oldest first after a seq.
    let all = get("limit=10").await;
    let first = all["events"][3]["seq"].as_i64().unwrap();
    let after = r
        .api_get(&format!("/api/v1/events?after={first}&type=vm.alarm"))
        .await;
    assert_eq!(ids(after), ["s-2", "s-4"]);
    let resp = r
        .client
        .get(format!("{}/api/v1/events?since=yesterday", r.api))
        .send()
        .await
        .unwrap();
    let (status, e) = error_reason(resp).await;
    assert_eq!(status, 400);
    assert!(e["message"].as_str().unwrap().contains("RFC 3339"), "{e}");
    r.stop().await;
}

/// A binary-mode CloudEvent without Content-Type (the CloudEvents Python SDK's default) is
/// read as JSON when its body is JSON, so filters see its fields.
#[tokio::test]
async fn binary_mode_without_content_type_is_read_as_json() {
    let mut rcv = Receiver::start().await;
    let r = Reflex::start(&format!(
        r#"
sources:
  - {{name: ce, type: cloudevents, path: /events}}
triggers:
  - name: critical
    when: 'event.data.severity == "critical"'
    action: {{type: http, url: "{}", mode: structured}}
"#,
        rcv.url()
    ))
    .await;
    let resp = r
        .client
        .post(format!("{}/events", r.http))
        .header("ce-specversion", "1.0")
        .header("ce-id", "py-1")
        .header("ce-source", "/python")
        .header("ce-type", "alert")
        .body(r#"{"severity": "critical"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let got = rcv.next(5).await;
    let ev: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        ev["data"],
        serde_json::json!({"severity": "critical"}),
        "{ev}"
    );
    // A body that is not JSON stays binary.
    let resp = r
        .client
        .post(format!("{}/events", r.http))
        .header("ce-specversion", "1.0")
        .header("ce-id", "py-2")
        .header("ce-source", "/python")
        .header("ce-type", "alert")
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let listed = r.api_get("/api/v1/events?id=py-2").await;
    let stored = r
        .api_get(&format!("/api/v1/events/{}", listed["events"][0]["seq"]))
        .await;
    assert_eq!(stored["event"]["data_base64"], "bm90IGpzb24=", "{stored}");
    r.stop().await;
}

/// Data nested deeper than reflex can read back is refused at ingest with 400, not
/// acknowledged and then dead-lettered; data just under the limit is stored and readable.
#[tokio::test]
async fn data_nested_too_deep_is_refused_at_ingest() {
    let r = Reflex::start(
        r#"
sources:
  - {name: ce, type: cloudevents, path: /events}
"#,
    )
    .await;
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let body = |id: &str, depth: usize| {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/t","type":"t","datacontenttype":"application/json","data":{}}}"#,
            nested(depth)
        )
    };
    let resp = post_ce(&r, "/events", body("deep", 120)).await;
    assert_eq!(resp.status(), 400);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["reason"], "too_deep", "{err}");
    let resp = post_ce(&r, "/events", body("fine", 64)).await;
    assert_eq!(resp.status(), 202);
    let listed = r.api_get("/api/v1/events?id=fine").await;
    let stored = r
        .api_get(&format!("/api/v1/events/{}", listed["events"][0]["seq"]))
        .await;
    assert_eq!(stored["event"]["id"], "fine", "{stored}");
    let listed = r.api_get("/api/v1/events?id=deep").await;
    assert_eq!(listed["events"], json!([]));
    r.stop().await;
}

/// `/metrics` answers the Prometheus text format unless OpenMetrics is asked for.
#[tokio::test]
async fn metrics_in_both_formats() {
    let r = Reflex::start("sources:\n  - {name: ce, type: cloudevents, path: /events}\n").await;
    post_ce(&r, "/events", cloudevent("m-1", "t", json!({}))).await;
    let plain = r
        .client
        .get(format!("{}/metrics", r.api))
        .send()
        .await
        .unwrap();
    assert_eq!(
        plain.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = plain.text().await.unwrap();
    assert!(
        text.contains("# HELP reflex_events_received_total "),
        "{text}"
    );
    assert!(
        text.contains("reflex_events_received_total{source=\"ce\"} 1"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    // A Prometheus text-format parser reads every sample, and each has its HELP.
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("the exposition parses");
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "reflex_events_received_total"
                && s.labels.get("source") == Some("ce")),
        "{:?}",
        scrape.samples
    );
    for sample in &scrape.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|sfx| sample.metric.strip_suffix(sfx))
            .unwrap_or(&sample.metric);
        assert!(
            scrape.docs.contains_key(family) || scrape.docs.contains_key(&sample.metric),
            "no HELP for {} in\n{text}",
            sample.metric
        );
    }
    let open = r
        .client
        .get(format!("{}/metrics", r.api))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(open.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(open.text().await.unwrap().ends_with("# EOF\n"));
    r.stop().await;
}

/// A request without credentials is answered `401` from its headers: a sender announcing a
/// large body gets no chance to make reflex read it.
#[tokio::test]
async fn no_credentials_gets_401_before_the_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = Reflex::start(
        r#"
sources:
  - {name: hook, type: webhook, path: /h, auth: {type: bearer, token: t0ken}}
  - {name: signed, type: webhook, path: /s, auth: {type: hmac, header: X-Sig, secret: k3y}}
"#,
    )
    .await;
    let addr = r.http.trim_start_matches("http://").to_string();
    for path in ["/h", "/s"] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // Headers announcing 900 KB, and only a few bytes of it.
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n{{\"a\":")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("no answer while the body is still owed")
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 401"), "{path}: {head}");
    }
    r.stop().await;
}

/// The sources listener bounds what a client can hold: a stalled header is cut off after
/// `header_timeout`, a trickling body gets `408` after `body_timeout`, connections past
/// `max_connections` are closed at once, and normal senders are served again as soon as
/// the stalled ones are gone.
#[tokio::test]
async fn the_listener_bounds_stalled_clients_and_connections() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = Reflex::start(
        r#"
http: {header_timeout: 1s, body_timeout: 1s, max_connections: 3}
sources:
  - {name: ce, type: cloudevents, path: /events}
"#,
    )
    .await;
    let addr = r.http.trim_start_matches("http://").to_string();
    // Reads until the server closes or answers; returns what came and when.
    async fn answer(s: &mut tokio::net::TcpStream, within: Duration) -> (String, Duration) {
        let start = Instant::now();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(within, s.read(&mut buf))
            .await
            .expect("the server neither answered nor closed in time")
            .unwrap_or(0);
        (
            String::from_utf8_lossy(&buf[..n]).to_string(),
            start.elapsed(),
        )
    }

    // A trickling body: 408 after about a second.
    let mut slow_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/cloudevents+json\r\nContent-Length: 100\r\n\r\n{\"specversion\"")
        .await
        .unwrap();
    let (head, took) = answer(&mut slow_body, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(took >= Duration::from_millis(800), "{took:?}");
    drop(slow_body);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Three clients stall mid-header and take every connection slot.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /events HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A fourth is closed at once.
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (head, took) = answer(&mut extra, Duration::from_secs(1)).await;
    assert!(
        head.is_empty() && took < Duration::from_millis(500),
        "{head:?} after {took:?}"
    );
    // The stalled ones are cut off after the header timeout…
    for s in &mut stalled {
        let (_, took) = answer(s, Duration::from_secs(5)).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    // …and a normal sender is served.
    let resp = post_ce(&r, "/events", cloudevent("after-stall", "t", json!({}))).await;
    assert_eq!(resp.status(), 202);
    r.stop().await;
}

/// A web page on another site cannot make a browser change state through the API on
/// loopback, nor read it through DNS rebinding; the CLI and scripts (no Origin) and
/// same-origin requests can.
#[tokio::test]
async fn the_api_refuses_state_changes_from_another_sites_page() {
    let r = Reflex::start("sources:\n  - {name: ce, type: cloudevents, path: /events}\n").await;
    let post = |origin: Option<&'static str>, fetch_site: Option<&'static str>| {
        let mut req = r
            .client
            .post(format!("{}/api/v1/events", r.api))
            .header("content-type", "application/cloudevents+json")
            .body(cloudevent("o-1", "t", json!({})));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(f) = fetch_site {
            req = req.header("sec-fetch-site", f);
        }
        req.send()
    };
    let evil = post(Some("http://evil.example"), None).await.unwrap();
    assert_eq!(evil.status(), 403);
    let evil = post(None, Some("cross-site")).await.unwrap();
    assert_eq!(evil.status(), 403);
    let same = format!("http://{}", r.api.trim_start_matches("http://"));
    let same: &'static str = Box::leak(same.into_boxed_str());
    assert_eq!(post(Some(same), None).await.unwrap().status(), 202);
    assert_eq!(post(None, None).await.unwrap().status(), 202);
    // Reads stay open to any page (they need the token off loopback).
    let read = r
        .client
        .get(format!("{}/api/v1/events", r.api))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    // A page that reached the loopback API through DNS rebinding names its own host: refused,
    // reads too; the names of loopback are served.
    for (host, status) in [
        ("evil.example", 403),
        ("evil.example:9090", 403),
        ("localhost:9090", 200),
        ("127.0.0.1", 200),
        ("[::1]:9090", 200),
    ] {
        let resp = r
            .client
            .get(format!("{}/api/v1/events", r.api))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "Host: {host}");
    }
    r.stop().await;
}

/// `api.metrics_token: true` puts `/metrics` behind the API token; by default it is open.
#[tokio::test]
async fn metrics_behind_the_token_when_asked() {
    let r = Reflex::start(
        "api: {token: m3trics-t0ken, metrics_token: true}\nsources:\n  - {name: ce, type: cloudevents, path: /events}\n",
    )
    .await;
    let get = |token: Option<&'static str>| {
        let mut req = r.client.get(format!("{}/metrics", r.api));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(get(Some("wrong")).await.unwrap().status(), 401);
    assert_eq!(get(Some("m3trics-t0ken")).await.unwrap().status(), 200);
    r.stop().await;
    let open = Reflex::start(
        "api: {token: m3trics-t0ken}\nsources:\n  - {name: ce, type: cloudevents, path: /events}\n",
    )
    .await;
    let resp = open
        .client
        .get(format!("{}/metrics", open.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    open.stop().await;
}

/// Dedup is per receiving source: a sender on one source cannot claim another source's
/// (source, id) pairs and have its real events dropped; a repeat on the same source is
/// still a duplicate.
#[tokio::test]
async fn dedup_is_per_receiving_source() {
    let r = Reflex::start(
        "sources:\n  - {name: open, type: cloudevents, path: /open}\n  - {name: trusted, type: cloudevents, path: /trusted}\n",
    )
    .await;
    let rr = &r;
    let send = |path: &'static str| async move {
        let resp = post_ce(rr, path, cloudevent("vc-42", "t", json!({}))).await;
        assert_eq!(resp.status(), 202);
        let body: serde_json::Value = resp.json().await.unwrap();
        body["duplicates"].as_array().unwrap().len()
    };
    // The open source sees the id first…
    assert_eq!(send("/open").await, 0);
    // …and the trusted source's event with the same (source, id) is still taken.
    assert_eq!(send("/trusted").await, 0);
    assert_eq!(send("/trusted").await, 1);
    assert_eq!(send("/open").await, 1);
    r.stop().await;
}

/// A repeated (source, id) is a duplicate within `store.dedup_window` and a new event
/// after it, on either backend; the repeat that was taken is then a duplicate in turn.
#[tokio::test]
async fn dedup_holds_for_its_window_and_not_after() {
    let r = Reflex::start(
        "store: {path: $DIR/reflex.db, dedup_window: 1s}\nsources:\n  - {name: ce, type: cloudevents, path: /events}\n",
    )
    .await;
    let rr = &r;
    let send = || async move {
        let resp = post_ce(rr, "/events", cloudevent("once", "t", json!({}))).await;
        assert_eq!(resp.status(), 202);
        let body: serde_json::Value = resp.json().await.unwrap();
        body["duplicates"].as_array().unwrap().len()
    };
    assert_eq!(send().await, 0);
    assert_eq!(send().await, 1, "a repeat within the window");
    // Keys live between the window and 1/16 more.
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    assert_eq!(
        send().await,
        0,
        "the same id after the window is a new event"
    );
    assert_eq!(send().await, 1, "and its repeat a duplicate");
    let events = r.api_get("/api/v1/events").await;
    assert_eq!(events["events"].as_array().unwrap().len(), 2, "{events}");
    r.stop().await;
}

/// A CloudEvents source can restrict the `source` and `type` prefixes it accepts; a request
/// with any other event is refused whole (403) and nothing of it is stored.
#[tokio::test]
async fn a_source_accepts_only_its_prefixes() {
    let r = Reflex::start(
        "sources:\n  - {name: alerts, type: cloudevents, path: /alerts, accept: {sources: [/test], types: [com.example.]}}\n",
    )
    .await;
    let ok = post_ce(
        &r,
        "/alerts",
        cloudevent("p-1", "com.example.disk", json!({})),
    )
    .await;
    assert_eq!(ok.status(), 202);
    let wrong_type = post_ce(
        &r,
        "/alerts",
        cloudevent("p-2", "com.vmware.vsphere.VmPoweredOffEvent", json!({})),
    )
    .await;
    assert_eq!(wrong_type.status(), 403);
    let err: serde_json::Value = wrong_type.json().await.unwrap();
    assert_eq!(err["error"]["reason"], "not_accepted", "{err}");
    let other_source = serde_json::json!({"specversion": "1.0", "id": "p-3", "source": "https://vc1/sdk", "type": "com.example.disk"}).to_string();
    assert_eq!(post_ce(&r, "/alerts", other_source).await.status(), 403);
    let stored = r.api_get("/api/v1/events").await;
    let ids: Vec<&str> = stored["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["p-1"]);
    r.stop().await;
}
